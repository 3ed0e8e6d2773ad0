"""Enrollment: Kerberos against a real MIT KDC, one-time join tokens, the workgroup secret; refusals."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, InProcessServer, ServerProcess
from cryptography import x509
from krb5_realm import REALM, Realm, realm_unavailable, start_realm

from policyagent.auth.client import (
    EnrollmentError,
    EnrollResult,
    JoinToken,
    Kerberos,
    WorkgroupSecret,
    enroll,
)
from policyagent.pb import admin_grpc, admin_pb
from policyagent.pki.ca import common_name, role_of
from policyagent.pki.identity import EnrollmentRefused, IdentityStore, Peer
from policyagent.pki.tls import HOST_CERT, HOST_KEY, load_cert_dir

SERVICE = f"policyagent/server.example.test@{REALM}"
WORKGROUP_SECRET = "the-workgroup-enrollment-secret"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyagent.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def ca_of(server: ServerProcess) -> bytes:
    return (server.data_dir / "pki" / "ca.crt").read_bytes()


def join_token(server: ServerProcess, computer: str, *extra: str) -> str:
    result = cli("join-token", "create", computer, "--data-dir", str(server.data_dir), *extra)
    assert result.returncode == 0, result.stderr
    assert "one-time join token for computer" in result.stderr
    return result.stdout.strip()


def refused(fn: Callable[[], object]) -> str:
    with pytest.raises(EnrollmentError) as info:
        fn()
    return str(info.value)


def host_cert(result: EnrollResult) -> x509.Certificate:
    return x509.load_pem_x509_certificate(result.cert_path.read_bytes())


# ---------------------------------------------------------------- Kerberos


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    """A throwaway MIT realm: host/agent1, a user, and the server's service principal."""
    reason = realm_unavailable()
    if reason:
        pytest.skip(f"cannot run a KDC here: {reason}")
    started = start_realm(tmp_path_factory.mktemp("krb5"))
    try:
        started.add_principal(SERVICE.split("@")[0])
        started.add_principal("host/agent1.example.test")
        started.add_principal("alice")
        yield started
    finally:
        started.stop()


@pytest.fixture
def kerberos_server(
    realm: Realm, start_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> ServerProcess:
    for key, value in realm.env.items():
        monkeypatch.setenv(key, value)  # the server subprocess and this process's gssapi read it
    return start_server(
        extra=["--kerberos-keytab", str(realm.keytab(SERVICE.split("@")[0])), "--kerberos-principal", SERVICE]
    )


def test_kerberos_enrollment_makes_a_domain_member(kerberos_server: ServerProcess, realm: Realm, tmp_path: Path) -> None:
    proof = Kerberos(SERVICE, keytab=realm.keytab("host/agent1.example.test"),
                     client_principal=f"host/agent1.example.test@{REALM}")
    result = enroll(kerberos_server.enroll_address, "", proof, tmp_path / "agent1", ca_of(kerberos_server))
    assert (result.computer, result.membership, result.domain, result.realm) == (
        "agent1", "domain", "example.test", REALM
    )
    cert = host_cert(result)
    assert role_of(cert) == "agent" and common_name(cert) == "agent1"
    assert stat.S_IMODE(result.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "agent1").stat().st_mode) == 0o700
    identity = IdentityStore(kerberos_server.data_dir / "identity.sqlite3")
    try:
        record = identity.computer("AGENT1")
        assert record is not None and (record.membership, record.domain, record.proof) == (
            "domain", "example.test", "kerberos"
        )
    finally:
        identity.close()
    # The host certificate works on the main port, and not for admin calls.
    agent = load_cert_dir(tmp_path / "agent1", HOST_CERT, HOST_KEY)
    with grpc.secure_channel(kerberos_server.address, agent.channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as info:
            admin_grpc.PolicyAdminStub(channel).GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
        assert isinstance(info.value, grpc.Call) and info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_kerberos_refuses_a_name_other_than_the_principal(
    kerberos_server: ServerProcess, realm: Realm, tmp_path: Path
) -> None:
    proof = Kerberos(SERVICE, keytab=realm.keytab("host/agent1.example.test"),
                     client_principal=f"host/agent1.example.test@{REALM}")
    reason = refused(lambda: enroll(kerberos_server.enroll_address, "dc1", proof, tmp_path, ca_of(kerberos_server)))
    assert "enrollment refused" in reason and "which is not computer 'dc1'" in reason
    assert not (tmp_path / HOST_KEY).exists()  # nothing written on refusal


def test_kerberos_refuses_a_user_principal(kerberos_server: ServerProcess, realm: Realm, tmp_path: Path) -> None:
    proof = Kerberos(SERVICE, keytab=realm.keytab("alice"), client_principal=f"alice@{REALM}")
    reason = refused(lambda: enroll(kerberos_server.enroll_address, "", proof, tmp_path, ca_of(kerberos_server)))
    assert "is not a computer's host principal" in reason


def test_kerberos_refuses_a_garbage_token(kerberos_server: ServerProcess) -> None:
    from policyagent.pb import enroll_grpc, enroll_pb
    from policyagent.pki.ca import make_csr, new_key

    creds = grpc.ssl_channel_credentials(ca_of(kerberos_server))
    with grpc.secure_channel(kerberos_server.enroll_address, creds) as channel:
        request = enroll_pb.EnrollRequest(csr_pem=make_csr(new_key(), "x"), kerberos_token=b"\x60\x01garbage")
        with pytest.raises(grpc.RpcError) as info:
            enroll_grpc.EnrollmentStub(channel).Enroll(request, timeout=RPC_TIMEOUT_S)
    assert isinstance(info.value, grpc.Call) and info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (info.value.details() or "").startswith("enrollment refused: Kerberos token refused")


def test_kerberos_is_refused_where_it_is_not_enabled(
    server: ServerProcess, realm: Realm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in realm.env.items():
        monkeypatch.setenv(key, value)
    proof = Kerberos(SERVICE, keytab=realm.keytab("host/agent1.example.test"),
                     client_principal=f"host/agent1.example.test@{REALM}")
    reason = refused(lambda: enroll(server.enroll_address, "", proof, tmp_path, ca_of(server)))
    assert "Kerberos enrollment is not enabled on this server" in reason


# ---------------------------------------------------------------- join tokens


def test_join_token_enrollment_and_refusals(server: ServerProcess, tmp_path: Path) -> None:
    token = join_token(server, "Web1", "--ttl", "1h")
    assert token.startswith("pajt1.")
    wrong = refused(lambda: enroll(server.enroll_address, "web2", JoinToken(token), tmp_path / "x", ca_of(server)))
    assert "this join token is for computer 'web1', not 'web2'" in wrong
    result = enroll(server.enroll_address, "web1", JoinToken(token), tmp_path / "web1", ca_of(server))
    assert (result.computer, result.membership, result.domain) == ("web1", "workgroup", "")
    reused = refused(lambda: enroll(server.enroll_address, "web1", JoinToken(token), tmp_path / "y", ca_of(server)))
    assert "this join token was already used" in reused
    unknown = refused(
        lambda: enroll(server.enroll_address, "web1", JoinToken("pajt1.nope"), tmp_path / "z", ca_of(server))
    )
    assert "unknown join token" in unknown
    # The token is stored hashed: its text is nowhere in the identity database.
    raw = b"".join(p.read_bytes() for p in server.data_dir.glob("identity.sqlite3*"))
    assert token.encode() not in raw


def test_join_token_expires(server: ServerProcess, tmp_path: Path) -> None:
    token = join_token(server, "shortlived", "--ttl", "0.2s")
    time.sleep(0.3)
    reason = refused(lambda: enroll(server.enroll_address, "shortlived", JoinToken(token), tmp_path, ca_of(server)))
    assert "this join token expired at" in reason


def test_join_token_can_vouch_for_a_domain(server: ServerProcess, tmp_path: Path) -> None:
    token = join_token(server, "db1", "--domain", "Corp.Example")
    result = enroll(server.enroll_address, "db1", JoinToken(token), tmp_path, ca_of(server))
    assert (result.membership, result.domain) == ("domain", "corp.example")


def test_reenrollment_revokes_the_old_certificate_and_tells_subscribers(
    inproc_server: Callable[..., InProcessServer], tmp_path: Path
) -> None:
    inproc = inproc_server()
    pki = inproc.server.pki
    seen: list[Peer] = []
    pki.revocations.subscribe(seen.append)
    first_token, _ = pki.identity.create_join_token("app1", 3600, "test")
    first = enroll(inproc.server.enroll_address, "app1", JoinToken(first_token), tmp_path / "a", pki.ca.cert_pem)
    old_serial = host_cert(first).serial_number
    second_token, _ = pki.identity.create_join_token("app1", 3600, "test")
    enroll(inproc.server.enroll_address, "app1", JoinToken(second_token), tmp_path / "b", pki.ca.cert_pem)
    assert seen == [Peer("agent", "app1", old_serial)]
    assert pki.revocations.is_revoked(old_serial)
    # Enrollment registered the computer in the server's topology registry (on its store thread).
    topology = inproc.server.topology_store
    computer = asyncio.run_coroutine_threadsafe(
        inproc.server._in_store_thread(topology.get_computer, "app1"), inproc.loop
    ).result(RPC_TIMEOUT_S)
    assert computer is not None and (computer.membership, computer.domain) == ("workgroup", "WORKGROUP")


def test_nothing_is_half_enrolled(tmp_path: Path) -> None:
    from policyagent.pki.ca import CertificateAuthority

    ca, _ = CertificateAuthority.load_or_create(tmp_path / "pki")
    identity = IdentityStore(tmp_path / "identity.sqlite3")
    token, _ = identity.create_join_token("app2", 3600, "test")

    def registry_down(name: str, membership: str, domain: str) -> None:
        raise RuntimeError("topology store unavailable")

    with pytest.raises(RuntimeError):
        identity.enroll(
            computer="app2", membership="workgroup", domain="", proof="join-token",
            issue=lambda: ca.issue("agent", "app2").cert, join_token=token, record_computer=registry_down,
        )
    assert identity.computer("app2") is None and identity.certificates("agent") == []
    # The token was not used up: the enrollment can be retried.
    _cert, replaced = identity.enroll(
        computer="app2", membership="workgroup", domain="", proof="join-token",
        issue=lambda: ca.issue("agent", "app2").cert, join_token=token,
    )
    assert replaced == [] and identity.computer("app2") is not None
    with pytest.raises(EnrollmentRefused, match="already used"):
        identity.enroll(
            computer="app2", membership="workgroup", domain="", proof="join-token",
            issue=lambda: ca.issue("agent", "app2").cert, join_token=token,
        )
    identity.close()


# ---------------------------------------------------------------- workgroup secret


@pytest.fixture
def workgroup_server(start_server: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    secret_file = tmp_path / "workgroup.secret"
    secret_file.write_text(WORKGROUP_SECRET + "\n")
    os.chmod(secret_file, 0o600)
    return start_server(extra=["--workgroup-secret-file", str(secret_file)])


def test_workgroup_secret_enrollment(workgroup_server: ServerProcess, tmp_path: Path) -> None:
    server = workgroup_server
    result = enroll(server.enroll_address, "kiosk7", WorkgroupSecret(WORKGROUP_SECRET), tmp_path / "k", ca_of(server))
    assert (result.computer, result.membership, result.domain, result.realm) == ("kiosk7", "workgroup", "", "")
    wrong = refused(
        lambda: enroll(server.enroll_address, "kiosk8", WorkgroupSecret("guess"), tmp_path / "w", ca_of(server))
    )
    assert wrong.endswith("enrollment refused: wrong workgroup secret")
    # The shared secret cannot take over a name that is enrolled already.
    taken = refused(
        lambda: enroll(server.enroll_address, "KIOSK7", WorkgroupSecret(WORKGROUP_SECRET), tmp_path / "t", ca_of(server))
    )
    assert "computer 'kiosk7' is already enrolled" in taken and "policyagent host-cert revoke kiosk7" in taken
    # After the admin revokes it, it may enroll again.
    revoke = cli("host-cert", "revoke", "kiosk7", "--data-dir", str(server.data_dir))
    assert revoke.returncode == 0, revoke.stderr
    enroll(server.enroll_address, "kiosk7", WorkgroupSecret(WORKGROUP_SECRET), tmp_path / "k2", ca_of(server))


def test_workgroup_secret_is_refused_where_it_is_not_enabled(server: ServerProcess, tmp_path: Path) -> None:
    reason = refused(lambda: enroll(server.enroll_address, "pc1", WorkgroupSecret("x" * 20), tmp_path, ca_of(server)))
    assert "workgroup enrollment is not enabled on this server" in reason


# ---------------------------------------------------------------- trusting the server


def test_trust_on_first_use_needs_the_ca_fingerprint(server: ServerProcess, tmp_path: Path) -> None:
    token = join_token(server, "tofu1")
    none = refused(lambda: enroll(server.enroll_address, "tofu1", JoinToken(token), tmp_path / "n", None))
    assert "cannot be authenticated" in none
    bad = refused(
        lambda: enroll(server.enroll_address, "tofu1", JoinToken(token), tmp_path / "b", None, ca_fingerprint="ab" * 32)
    )
    assert "presented no CA with fingerprint" in bad
    printed = cli("ca", "fingerprint", "--data-dir", str(server.data_dir))
    assert printed.returncode == 0 and printed.stdout.startswith("SHA256:")
    fingerprint = printed.stdout.strip().removeprefix("SHA256:")
    result = enroll(server.enroll_address, "tofu1", JoinToken(token), tmp_path / "ok", None, ca_fingerprint=fingerprint)
    assert result.ca_path.read_bytes() == ca_of(server)


def test_a_server_with_another_ca_is_not_trusted(server: ServerProcess, tmp_path: Path) -> None:
    from policyagent.pki.ca import CertificateAuthority

    other, _ = CertificateAuthority.load_or_create(tmp_path / "other")
    token = join_token(server, "pc9")
    reason = refused(lambda: enroll(server.enroll_address, "pc9", JoinToken(token), tmp_path / "x", other.cert_pem))
    assert "cannot reach the enrollment service" in reason
