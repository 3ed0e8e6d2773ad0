"""Everything identity the server holds, opened once at start: `ServerPki.open(data_dir, hosts)`.

At the first start it creates, under the data directory:

    pki/            (0700) ca.key (0600), ca.crt, server.key (0600), server.crt, secrets.key (0600)
    identity.sqlite3 (0600) issued and revoked certificates, join tokens, enrolled computers
    admin/          (0700) admin.crt, admin.key (0600), ca.crt: the local administrator's certificate,
                    so `netsh` run on the server host (./policyagent-data/admin) works at once

The server's TLS certificate is reissued at every start, for the addresses it is
told (listen host, --tls-name) plus localhost, 127.0.0.1 and ::1.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from policyagent.pki.ca import (
    SERVER_CERT,
    SERVER_KEY,
    CertificateAuthority,
    cert_pem,
    key_pem,
    private_dir,
    server_sans,
    write_private,
    write_public,
)
from policyagent.pki.identity import IDENTITY_FILE, IdentityStore, Peer, Revocations
from policyagent.pki.secretbox import SecretBox
from policyagent.pki.tls import ADMIN_CERT, ADMIN_KEY, CA_FILE, LOCAL_ADMIN_SUBDIR

PKI_SUBDIR = "pki"
LOCAL_ADMIN_NAME = "local-admin"


def write_admin_dir(directory: Path, ca: CertificateAuthority, identity: IdentityStore, name: str) -> Peer:
    """Issue an admin certificate for `name` and write admin.crt, admin.key (0600), ca.crt into `directory`."""
    issued = ca.issue("admin", name)
    assert issued.key is not None
    private_dir(directory)
    write_private(directory / ADMIN_KEY, key_pem(issued.key))
    write_public(directory / ADMIN_CERT, cert_pem(issued.cert))
    write_public(directory / CA_FILE, ca.cert_pem)
    identity.record_issued(issued.cert)
    return Peer(role="admin", name=name, serial=issued.serial)


@dataclass
class ServerPki:
    """The CA, the identity database, the revocation list, the secrets key and the server's TLS pair."""

    data_dir: Path
    ca: CertificateAuthority
    identity: IdentityStore
    revocations: Revocations
    secret_box: SecretBox
    server_cert_chain: bytes
    server_key: bytes
    created: bool

    @classmethod
    def open(cls, data_dir: Path, hosts: Iterable[str] = ()) -> ServerPki:
        """Open (creating at the first start) the server's PKI in `data_dir`. Blocking: run off the loop."""
        pki_dir = data_dir / PKI_SUBDIR
        ca, created = CertificateAuthority.load_or_create(pki_dir, ca_name=f"policyagent CA {socket.gethostname()}")
        identity = IdentityStore(data_dir / IDENTITY_FILE)
        box = SecretBox.load_or_create(pki_dir)
        admin_dir = data_dir / LOCAL_ADMIN_SUBDIR
        if created or not (admin_dir / ADMIN_CERT).exists():
            write_admin_dir(admin_dir, ca, identity, LOCAL_ADMIN_NAME)
        dns, ips = server_sans(hosts)
        issued = ca.issue("server", dns[-1] if len(dns) > 1 else "localhost", dns_names=dns, ip_addresses=ips)
        assert issued.key is not None
        identity.record_issued(issued.cert)
        chain = cert_pem(issued.cert) + ca.cert_pem
        key = key_pem(issued.key)
        write_private(pki_dir / SERVER_KEY, key)
        write_public(pki_dir / SERVER_CERT, chain)
        revocations = Revocations(identity.revoked_serials())
        return cls(data_dir, ca, identity, revocations, box, chain, key, created)

    def server_credentials(self, *, client_certificates: bool = True) -> grpc.ServerCredentials:
        """gRPC TLS with our server certificate: with client_certificates=False, the enrollment
        port's (server authenticated only); with True, a grpc.aio server that requires client
        certificates verified against our CA (the main port itself is the front, which uses
        `main_port_ssl_context`; tests serve the hub this way).

        Two ports because grpc's Python API cannot ask for an *optional* client
        certificate: `require_client_auth=False` does not request one at all. The
        AuthzInterceptor runs on every call, so nothing but Enrollment and health answers
        a caller without a certificate.
        """
        return grpc.ssl_server_credentials(
            [(self.server_key, self.server_cert_chain)],
            root_certificates=self.ca.cert_pem,
            require_client_auth=client_certificates,
        )

    def main_port_ssl_context(self) -> ssl.SSLContext:
        """TLS for the main port's front (policyagent/server/front.py): TLS 1.2+, ALPN h2, a client
        certificate required and verified against our CA, no session resumption (every connection
        proves its certificate)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        pki_dir = self.data_dir / PKI_SUBDIR
        context.load_cert_chain(pki_dir / SERVER_CERT, pki_dir / SERVER_KEY)
        context.load_verify_locations(cadata=self.ca.cert_pem.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["h2"])
        context.num_tickets = 0
        return context

    def reload_revocations(self) -> list[Peer]:
        """Re-read the revoked serials (after `policyagent ... revoke` changed the database); the new ones.

        Blocking (reads SQLite). The caller passes the result to `revocations.revoked()` on the loop.
        """
        serials = self.identity.revoked_serials()
        new = serials - {s for s in serials if self.revocations.is_revoked(s)}
        peers = [
            Peer(role="agent" if rec.role == "agent" else "admin", name=rec.name, serial=rec.serial)
            for rec in self.identity.certificates()
            if rec.serial in new and rec.role in ("agent", "admin")
        ]
        return peers

    def close(self) -> None:
        self.identity.close()
