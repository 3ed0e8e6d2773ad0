"""The agent's side of enrollment: make a key and CSR, prove who it is, store the certificate.

    result = enroll("server.example:50052", "agent1", JoinToken("pajt1...."), Path("/var/lib/policyagent"),
                    ca_bundle=Path("ca.crt").read_bytes())

Trust in the server is never blind. The server is authenticated by a CA
certificate the admin hands out of band (`ca_bundle`, e.g. <data-dir>/pki/ca.crt),
or, on first contact, by the CA's SHA-256 fingerprint (`ca_fingerprint`, as
`policyagent ca fingerprint` prints it on the server): the CA the server
presents in its TLS chain is used only if its fingerprint matches, and the
gRPC connection then verifies the server against it as usual.

Files written in `key_dir` (created 0700): host.key (0600, made here, never
sent anywhere), host.crt, ca.crt.
"""

from __future__ import annotations

import hmac
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from policyagent.auth.kerberos import KerberosUnavailable, initiate_token
from policyagent.pb import enroll_grpc, enroll_pb
from policyagent.pki.ca import (
    PkiError,
    cert_pem,
    fingerprint,
    key_pem,
    load_cert,
    make_csr,
    new_key,
    private_dir,
    write_private,
    write_public,
)
from policyagent.pki.tls import CA_FILE, HOST_CERT, HOST_KEY, tls_options

ENROLL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Kerberos:
    """Prove domain membership with the host's Kerberos credentials.

    `service_principal` is the server's (e.g. policyagent/server.example.test@EXAMPLE.TEST);
    `keytab` (e.g. /etc/krb5.keytab) and `client_principal` (host/agent1.example.test) select
    the host's keys; without a keytab the default ticket cache is used.
    """

    service_principal: str
    keytab: Path | None = None
    client_principal: str | None = None


@dataclass(frozen=True)
class JoinToken:
    """A one-time token an admin made with `policyagent join-token create COMPUTER`."""

    token: str


@dataclass(frozen=True)
class WorkgroupSecret:
    """The workgroup's pre-shared enrollment secret."""

    secret: str


Proof = Kerberos | JoinToken | WorkgroupSecret


@dataclass(frozen=True)
class EnrollResult:
    computer: str
    membership: str  # "domain" | "workgroup"
    domain: str
    realm: str
    cert_path: Path
    key_path: Path
    ca_path: Path


class EnrollmentError(Exception):
    """Enrollment failed; the message says why on one line (the server's reason when it refused)."""


def _split_target(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise EnrollmentError(f"give the server's enrollment address as HOST:PORT, not {server!r}")
    return host.strip("[]"), int(port)


def fetch_ca_by_fingerprint(server: str, ca_fingerprint: str, timeout: float = 10.0) -> bytes:
    """The CA certificate (PEM) the server presents in its TLS chain, if its SHA-256 fingerprint matches.

    Trust on first use, pinned: the chain is read without verification, then only a
    certificate whose fingerprint equals `ca_fingerprint` (hex, colons allowed) is accepted.
    """
    wanted = ca_fingerprint.replace(":", "").strip().lower()
    if len(wanted) != 64:
        raise EnrollmentError("the CA fingerprint must be a SHA-256 (64 hex digits)")
    host, port = _split_target(server)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted from this connection but the pinned CA
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # Python 3.13 has SSLSocket.get_unverified_chain(); 3.11 has it on the _ssl object.
            sslobj = getattr(tls, "_sslobj", None)
            chain = sslobj.get_unverified_chain() if sslobj is not None else None
            ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain or []]  # type: ignore[attr-defined]
    except OSError as exc:
        raise EnrollmentError(f"cannot reach {server} to fetch its CA: {exc}") from exc
    for der in ders:
        cert = x509.load_der_x509_certificate(der)
        if hmac.compare_digest(fingerprint(cert), wanted):
            return cert_pem(cert)
    raise EnrollmentError(
        f"the server at {server} presented no CA with fingerprint {wanted}; refusing to trust it"
    )


def enroll(
    server: str,
    computer: str,
    proof: Proof,
    key_dir: Path,
    ca_bundle: bytes | None,
    *,
    ca_fingerprint: str | None = None,
    timeout: float = ENROLL_TIMEOUT_S,
) -> EnrollResult:
    """Enroll this machine with the server's Enrollment service at `server` (its enrollment port).

    Makes a new key, sends a CSR with the proof, and stores
    host.crt and ca.crt. The server is authenticated by `ca_bundle` or, if that is
    None, by the CA matching `ca_fingerprint`; with neither, EnrollmentError.
    Blocking. Raises EnrollmentError with the server's reason when it refuses.
    """
    if ca_bundle is None:
        if not ca_fingerprint:
            raise EnrollmentError(
                "the server cannot be authenticated: give its CA certificate (ca_bundle) "
                "or the CA's SHA-256 fingerprint (--ca-fingerprint)"
            )
        ca_bundle = fetch_ca_by_fingerprint(server, ca_fingerprint)
    # A fresh key for every enrollment, written only once the certificate for it came back.
    key = new_key()
    request = enroll_pb.EnrollRequest(csr_pem=make_csr(key, computer or "agent"), computer=computer)
    if isinstance(proof, Kerberos):
        try:
            request.kerberos_token = initiate_token(
                proof.service_principal, keytab=proof.keytab, client_principal=proof.client_principal
            )
        except KerberosUnavailable as exc:
            raise EnrollmentError(str(exc)) from exc
    elif isinstance(proof, JoinToken):
        request.join_token = proof.token
    else:
        request.workgroup_secret = proof.secret
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_bundle)
    with grpc.secure_channel(server, credentials, options=tls_options(server)) as channel:
        try:
            response: enroll_pb.EnrollResponse = enroll_grpc.EnrollmentStub(channel).Enroll(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise EnrollmentError(
                    f"cannot reach the enrollment service at {server} ({detail}); check the address "
                    "and that the CA you were given is this server's"
                ) from exc
            raise EnrollmentError(detail or str(code)) from exc
    try:
        cert = load_cert(response.certificate_pem)
    except PkiError as exc:
        raise EnrollmentError(f"the server sent an unusable certificate: {exc}") from exc
    if cert.public_key() != key.public_key():
        raise EnrollmentError("the server's certificate is not for this machine's key")
    private_dir(key_dir)
    key_path, cert_path, ca_path = key_dir / HOST_KEY, key_dir / HOST_CERT, key_dir / CA_FILE
    write_private(key_path, key_pem(key))
    write_public(ca_path, response.ca_certificate_pem or ca_bundle)
    write_public(cert_path, response.certificate_pem)
    return EnrollResult(
        computer=response.computer,
        membership=response.membership,
        domain=response.domain,
        realm=response.realm,
        cert_path=cert_path,
        key_path=key_path,
        ca_path=ca_path,
    )
