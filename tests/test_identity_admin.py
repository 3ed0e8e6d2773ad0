"""IdentityAdmin: join tokens, revocation and the certificate list over mTLS (`... -r HOST:PORT`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, InProcessServer, ServerProcess, admin_certificate
from cryptography import x509
from test_enrollment import ca_of, cli, host_cert

from clients.identity.client import IdentityClient
from policyagent.auth.client import JoinToken, enroll
from policyagent.model.errors import NotFoundError, ValidationError
from policyagent.pb import dist_grpc, dist_pb, identity_grpc, identity_pb
from policyagent.pki.ca import CertificateAuthority, cert_pem, key_pem
from policyagent.pki.identity import Peer
from policyagent.pki.tls import HOST_CERT, HOST_KEY, ClientCertificate, load_cert_dir


def fetch(address: str, cert: ClientCertificate) -> dist_pb.EffectivePolicy:
    with grpc.secure_channel(address, cert.channel_credentials()) as channel:
        result: dist_pb.EffectivePolicy = dist_grpc.DistributionStub(channel).Fetch(
            dist_pb.FetchRequest(), timeout=RPC_TIMEOUT_S
        )
        return result


def list_certificates(address: str, cert: ClientCertificate) -> identity_pb.ListCertificatesResponse:
    with grpc.secure_channel(address, cert.channel_credentials()) as channel:
        result: identity_pb.ListCertificatesResponse = identity_grpc.IdentityAdminStub(channel).ListCertificates(
            identity_pb.ListCertificatesRequest(), timeout=RPC_TIMEOUT_S
        )
        return result


def refused(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert isinstance(info.value, grpc.Call)
    return info.value.code(), info.value.details() or ""


def test_remote_join_token_enrollment_revocation_and_list(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server()
    created = cli("join-token", "create", "Remote1", "--ttl", "10m", "-r", server.address)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("pajt1.") and "one-time join token for computer remote1" in created.stderr
    result = enroll(server.enroll_address, "remote1", JoinToken(token), tmp_path / "remote1", ca_of(server))
    serial = host_cert(result).serial_number
    agent = load_cert_dir(tmp_path / "remote1", HOST_CERT, HOST_KEY)
    assert fetch(server.address, agent).computer == "remote1"

    revoked = cli("host-cert", "revoke", "remote1", "-r", server.address)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked computer remote1: 1 certificate(s) ({serial:x})" in revoked.stdout
    assert "applied it at once" in revoked.stdout
    # At once: no SIGHUP, no waiting.
    code, details = refused(lambda: fetch(server.address, agent))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "certificate revoked" in details

    remote = cli("host-cert", "list", "-r", server.address)
    assert remote.returncode == 0, remote.stderr
    line = next(x for x in remote.stdout.splitlines() if x.startswith("remote1\t"))
    assert f"serial {serial:x}" in line and "revoked" in line and "revoked by an administrator" in line
    # The same listing as on the server host (the same function prints it).
    local = cli("host-cert", "list", "--data-dir", str(server.data_dir))
    assert local.stdout == remote.stdout
    again = cli("host-cert", "revoke", "remote1", "-r", server.address)
    assert again.returncode == 2 and "has no valid certificate to revoke" in again.stderr


def test_identity_admin_needs_an_unrevoked_admin_certificate(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server()
    ca, _ = CertificateAuthority.load_or_create(server.data_dir / "pki")
    issued = ca.issue("agent", "web9")
    assert issued.key is not None
    agent = ClientCertificate(cert_pem(issued.cert), key_pem(issued.key), ca.cert_pem, tmp_path)
    code, details = refused(lambda: list_certificates(server.address, agent))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "needs an admin certificate" in details

    out = tmp_path / "bob"
    assert cli("admin-cert", "issue", "bob", "--data-dir", str(server.data_dir), "--out", str(out)).returncode == 0
    bob = load_cert_dir(out)
    names = {c.name for c in list_certificates(server.address, bob).certificates}
    assert "bob" in names
    revoked = cli("admin-cert", "revoke", "bob", "-r", server.address)
    assert revoked.returncode == 0 and "revoked admin bob: 1 certificate(s)" in revoked.stdout, revoked.stderr
    code, details = refused(lambda: list_certificates(server.address, bob))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "certificate revoked" in details
    with_bob = cli("join-token", "create", "pc1", "-r", server.address, "--cert-dir", str(out))
    assert with_bob.returncode == 2
    assert "refused the admin certificate" in with_bob.stderr and "certificate revoked" in with_bob.stderr
    listing = cli("admin-cert", "list", "-r", server.address)
    bob_line = next(x for x in listing.stdout.splitlines() if x.startswith("bob\t"))
    assert "\trevoked " in bob_line


def test_remote_revocation_tells_subscribers_before_it_answers(
    inproc_server: Callable[..., InProcessServer], tmp_path: Path
) -> None:
    inproc = inproc_server()
    pki = inproc.server.pki
    seen: list[Peer] = []
    pki.revocations.subscribe(seen.append)
    client = IdentityClient(inproc.address, certificate=admin_certificate())
    try:
        created = client.create_join_token("App7", 0, "Corp.Example")
        assert (created.computer, created.domain) == ("app7", "corp.example")
        result = enroll(inproc.server.enroll_address, "app7",
                        JoinToken(created.token), tmp_path / "a", pki.ca.cert_pem)
        assert (result.membership, result.domain) == ("domain", "corp.example")
        serial = x509.load_pem_x509_certificate(result.cert_path.read_bytes()).serial_number
        assert client.revoke("agent", "APP7") == [f"{serial:x}"]
        assert seen == [Peer("agent", "app7", serial)] and pki.revocations.is_revoked(serial)
        records = [r for r in client.certificates("agent") if r.name == "app7"]
        assert len(records) == 1 and records[0].revoked_ms is not None
        assert {r.role for r in client.certificates()} >= {"agent", "server"}
        with pytest.raises(NotFoundError, match="has no valid certificate"):
            client.revoke("admin", "nobody")
        with pytest.raises(ValidationError, match="is not valid"):
            client.create_join_token("bad name!", 60)
    finally:
        client.close()
