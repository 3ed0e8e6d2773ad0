"""PKI: the CA and its files, roles in certificates, mTLS authorization, revocation, PSKs encrypted at rest."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from builders import filter_action, filter_list, policy_using
from conftest import RPC_TIMEOUT_S, InProcessServer, ServerProcess
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.netsh.main import main as netsh
from policyagent.model.errors import StoreError
from policyagent.model.objects import Kind
from policyagent.model.writes import Put
from policyagent.pb import admin_grpc, admin_pb, dist_grpc, dist_pb, pb
from policyagent.pki.authz import (
    ADMIN_MESSAGE,
    AGENT_MESSAGE,
    AuthzInterceptor,
    Peer,
    require_agent,
)
from policyagent.pki.ca import CertificateAuthority, cert_pem, key_pem, make_csr, new_key, role_of
from policyagent.pki.identity import IdentityStore, Revocations
from policyagent.pki.secretbox import SecretBox
from policyagent.pki.server import ServerPki
from policyagent.pki.tls import ADMIN_DIR_ENV, ClientCertificate, load_cert_dir
from policyagent.store.sqlite import SqliteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "policyagent.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def client_cert(ca: CertificateAuthority, role: Any, name: str) -> ClientCertificate:
    issued = ca.issue(role, name)
    assert issued.key is not None
    return ClientCertificate(cert_pem(issued.cert), key_pem(issued.key), ca.cert_pem, Path("."))


def code_and_details(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert isinstance(err, grpc.Call)
    return err.code(), err.details() or ""


def get_store(address: str, cert: ClientCertificate | None, ca: bytes) -> admin_pb.GetStoreResponse:
    creds = cert.channel_credentials() if cert else grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(address, creds) as channel:
        response: admin_pb.GetStoreResponse = admin_grpc.PolicyAdminStub(channel).GetStore(
            admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S
        )
        return response


# ---------------------------------------------------------------- CA and certificates


def test_ca_is_created_at_first_start_with_private_modes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    pki = ServerPki.open(data, ["192.0.2.7", "pa.example.test"])
    try:
        assert pki.created
        assert mode(data / "pki") == 0o700 and mode(data / "admin") == 0o700
        for key in ("pki/ca.key", "pki/server.key", "pki/secrets.key", "admin/admin.key", "identity.sqlite3"):
            assert mode(data / key) == 0o600, key
        assert (data / "admin" / "ca.crt").read_bytes() == (data / "pki" / "ca.crt").read_bytes()
        ca_serial = pki.ca.cert.serial_number
    finally:
        pki.close()
    again = ServerPki.open(data)
    try:
        assert not again.created and again.ca.cert.serial_number == ca_serial
    finally:
        again.close()


def test_server_certificate_names_the_listen_addresses(tmp_path: Path) -> None:
    pki = ServerPki.open(tmp_path, ["192.0.2.7", "pa.example.test", "0.0.0.0"])
    try:
        cert = x509.load_pem_x509_certificate(pki.server_cert_chain)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = set(sans.get_values_for_type(x509.IPAddress))
        assert ips == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "192.0.2.7")}
        assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "pa.example.test"}
        assert role_of(cert) == "server"
        assert pki.ca.verify_issued(cert)
    finally:
        pki.close()


def test_host_and_admin_certificates_carry_role_and_name(tmp_path: Path) -> None:
    ca, _ = CertificateAuthority.load_or_create(tmp_path / "pki")
    key = new_key()
    host = ca.issue_from_csr("agent", "web1", make_csr(key, "whatever-the-agent-says")).cert
    assert host.public_key() == key.public_key()
    assert role_of(host) == "agent"
    assert host.subject.rfc4514_string() == "CN=web1,OU=agent,O=policyagent"
    eku = host.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    admin = ca.issue("admin", "alice").cert
    assert role_of(admin) == "admin" and ca.verify_issued(admin)
    other, _ = CertificateAuthority.load_or_create(tmp_path / "other")
    assert not ca.verify_issued(other.issue("admin", "mallory").cert)


def test_admin_cert_issue_writes_cert_key_and_ca(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = start_server()
    out = tmp_path / "alice"
    result = cli("admin-cert", "issue", "alice", "--data-dir", str(server.data_dir), "--out", str(out))
    assert f"written to {out}" in result.stdout
    assert mode(out / "admin.key") == 0o600 and mode(out) == 0o700
    cert = load_cert_dir(out)
    assert role_of(x509.load_pem_x509_certificate(cert.cert)) == "admin"
    assert cert.ca == (server.data_dir / "pki" / "ca.crt").read_bytes()
    assert netsh(["-r", server.address, "--cert-dir", str(out), "ipsec", "static", "show", "policy", "all"]) == 0
    listing = cli("admin-cert", "list", "--data-dir", str(server.data_dir)).stdout
    assert "alice\tserial" in listing and "valid" in listing


# ---------------------------------------------------------------- authorization over mTLS


def test_revoked_admin_certificate_is_refused_at_once(
    start_server: Callable[..., ServerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server()
    out = tmp_path / "bob"
    cli("admin-cert", "issue", "bob", "--data-dir", str(server.data_dir), "--out", str(out))
    bob = load_cert_dir(out)
    get_store(server.address, bob, bob.ca)
    result = cli("admin-cert", "revoke", "bob", "--data-dir", str(server.data_dir))
    assert "revoked admin bob" in result.stdout and "applies it now" in result.stdout
    # SIGHUP is asynchronous: the server applies it within milliseconds.
    deadline = time.monotonic() + 10
    while True:
        try:
            get_store(server.address, bob, bob.ca)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "certificate revoked" in (exc.details() or "")
            break
        assert time.monotonic() < deadline, "the revocation was not applied"
        time.sleep(0.02)
    capsys.readouterr()
    assert netsh(["-r", server.address, "--cert-dir", str(out), "ipsec", "static", "show", "policy", "all"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused the admin certificate" in err and "certificate revoked" in err
    # Other admins are unaffected; revoking again says there is nothing to revoke.
    get_store(server.address, load_cert_dir(Path(os.environ[ADMIN_DIR_ENV])), bob.ca)
    again = cli("admin-cert", "revoke", "bob", "--data-dir", str(server.data_dir), check=False)
    assert again.returncode == 2 and "has no valid certificate" in again.stderr


def test_agent_certificate_cannot_call_admin_apis(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    ca, _ = CertificateAuthority.load_or_create(server.data_dir / "pki")
    agent = client_cert(ca, "agent", "web1")
    code, details = code_and_details(lambda: get_store(server.address, agent, ca.cert_pem))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith(ADMIN_MESSAGE) and "'web1' presented an agent certificate" in details


def test_without_a_certificate_only_enrollment_and_health_answer(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    ca = (server.data_dir / "pki" / "ca.crt").read_bytes()
    # The enrollment port: TLS, no client certificate; admin calls are UNAUTHENTICATED.
    code, details = code_and_details(lambda: get_store(server.enroll_address, None, ca))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith(ADMIN_MESSAGE)
    with grpc.secure_channel(server.enroll_address, grpc.ssl_channel_credentials(ca)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # The main port does not even complete the TLS handshake without a certificate.
    code, _ = code_and_details(lambda: get_store(server.address, None, ca))
    assert code == grpc.StatusCode.UNAVAILABLE
    # Nor with a certificate from another CA.
    other, _ = CertificateAuthority.load_or_create(server.data_dir.parent / "other-ca")
    code, _ = code_and_details(lambda: get_store(server.address, client_cert(other, "admin", "x"), ca))
    assert code == grpc.StatusCode.UNAVAILABLE


class _Distribution(dist_grpc.DistributionServicer):
    """A stand-in for the hub: Fetch answers with the caller's computer name (from its certificate)."""

    async def Fetch(self, request: dist_pb.FetchRequest, context: Any) -> dist_pb.EffectivePolicy:
        peer = await require_agent(context)
        return dist_pb.EffectivePolicy(computer=peer.name)


def test_distribution_needs_an_unrevoked_agent_certificate(tmp_path: Path) -> None:
    pki = ServerPki.open(tmp_path / "data", ["127.0.0.1"])
    seen: list[Peer] = []
    pki.revocations.subscribe(seen.append)
    agent = client_cert(pki.ca, "agent", "web1")
    admin = client_cert(pki.ca, "admin", "alice")

    async def scenario() -> None:
        server = aio.server(interceptors=[AuthzInterceptor(pki.revocations)])
        dist_grpc.add_DistributionServicer_to_server(_Distribution(), server)
        port = server.add_secure_port("127.0.0.1:0", pki.server_credentials())
        await server.start()
        try:

            async def fetch(cert: ClientCertificate) -> dist_pb.EffectivePolicy:
                async with aio.secure_channel(f"127.0.0.1:{port}", cert.channel_credentials()) as channel:
                    result: dist_pb.EffectivePolicy = await dist_grpc.DistributionStub(channel).Fetch(
                        dist_pb.FetchRequest(), timeout=RPC_TIMEOUT_S
                    )
                    return result

            assert (await fetch(agent)).computer == "web1"
            with pytest.raises(aio.AioRpcError) as info:
                await fetch(admin)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (info.value.details() or "").startswith(AGENT_MESSAGE)
            peer = Peer("agent", "web1", x509.load_pem_x509_certificate(agent.cert).serial_number)
            pki.revocations.revoked([peer])
            assert seen == [peer]
            with pytest.raises(aio.AioRpcError) as info:
                await fetch(agent)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "certificate revoked" in (info.value.details() or "")
        finally:
            await server.stop(0)

    try:
        asyncio.run(scenario())
    finally:
        pki.close()


def test_revocations_subscribers_and_reload(tmp_path: Path) -> None:
    pki = ServerPki.open(tmp_path, [])
    try:
        issued = pki.ca.issue("admin", "carol")
        pki.identity.record_issued(issued.cert)
        calls: list[Peer] = []
        unsubscribe = pki.revocations.subscribe(calls.append)
        # What `policyagent admin-cert revoke` does in another process, then SIGHUP → reload.
        other = IdentityStore(tmp_path / "identity.sqlite3")
        other.revoke("admin", "CAROL")
        other.close()
        new = pki.reload_revocations()
        assert [(p.role, p.name, p.serial) for p in new] == [("admin", "carol", issued.serial)]
        pki.revocations.revoked(new)
        assert calls == new and pki.revocations.is_revoked(issued.serial)
        unsubscribe()
        pki.revocations.revoked([Peer("agent", "x", 1)])
        assert len(calls) == 1
        assert pki.reload_revocations() == []
    finally:
        pki.close()


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    revocations = Revocations()
    calls: list[str] = []

    def boom(peer: Peer) -> None:
        raise RuntimeError("subscriber bug")

    revocations.subscribe(boom)
    revocations.subscribe(lambda p: calls.append(p.name))
    revocations.revoked([Peer("agent", "a", 7)])
    assert calls == ["a"] and revocations.is_revoked(7)


def test_netsh_without_a_certificate_says_where_it_looked(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ADMIN_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert netsh(["-r", server.address, "ipsec", "static", "show", "policy", "all"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("netsh: no admin certificate found (looked in policyagent-data/admin, ")
    assert err.count("\n") == 1
    # Help needs no certificate.
    assert netsh(["ipsec", "static", "add", "policy", "help"]) == 0


def test_netsh_finds_the_local_admin_in_policyagent_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the README does: `scripts/dev server` (./policyagent-data) and netsh in the same directory.
    monkeypatch.delenv(ADMIN_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    import conftest

    template, conftest._pki_template = conftest._pki_template, None  # a server with a CA of its own
    try:
        server = conftest.start_server_process(tmp_path / "policyagent-data", log_dir=tmp_path)
    finally:
        conftest._pki_template = template
    try:
        assert netsh(["-r", server.address, "ipsec", "static", "show", "policy", "all", "format=table"]) == 0
        assert "Secure Server" in capsys.readouterr().out
    finally:
        server.close()


# ---------------------------------------------------------------- pre-shared keys at rest

PSK = "correct-horse-battery-staple-4242"


def _psk_policy(store: SqliteStore) -> pb.Policy:
    fl = store.write([Put(filter_list("FL psk"))], principal="t").written[0]
    fa = store.write([Put(filter_action("FA psk"))], principal="t").written[0]
    assert isinstance(fl, pb.FilterList) and isinstance(fa, pb.FilterAction)
    policy = policy_using("PSK policy", fl, fa, rules=2)
    for rule in policy.rules:
        rule.auth_methods.add().preshared_key.key = PSK
    written = store.write([Put(policy)], principal="t").written[0]
    assert isinstance(written, pb.Policy)
    return written


def _raw_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def _psks(policy: pb.Policy) -> list[str]:
    return [m.preshared_key.key for r in policy.rules for m in r.auth_methods if m.WhichOneof("method") == "preshared_key"]


def test_preshared_keys_are_encrypted_at_rest_and_decrypted_on_read(tmp_path: Path) -> None:
    box = SecretBox.load_or_create(tmp_path / "pki")
    assert mode(tmp_path / "pki" / "secrets.key") == 0o600
    db = tmp_path / "store.sqlite3"
    with SqliteStore(db, secret_box=box) as store:
        policy = _psk_policy(store)
        assert _psks(policy) == [PSK, PSK]  # the write result is in clear
        stored = store.get(Kind.POLICY, policy.id)
        assert isinstance(stored, pb.Policy) and _psks(stored) == [PSK, PSK]
        contents, _ = store.snapshot()
        assert [k for p in contents.policies for k in _psks(p)] == [PSK, PSK]
    assert PSK.encode() not in _raw_bytes(db)
    assert b"enc:v1:" in _raw_bytes(db)
    # Without the key, or with another one, the store does not open: never ciphertext as a key.
    with pytest.raises(StoreError, match="encrypted"):
        SqliteStore(db)
    with pytest.raises(StoreError, match="not this server"):
        SqliteStore(db, secret_box=SecretBox(os.urandom(32)))


def test_a_clear_store_is_sealed_when_first_opened_with_the_key(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite3"
    with SqliteStore(db) as store:
        _psk_policy(store)
    assert PSK.encode() in _raw_bytes(db)
    box = SecretBox.load_or_create(tmp_path / "pki")
    with SqliteStore(db, secret_box=box) as store:
        assert [k for p in store.snapshot()[0].policies for k in _psks(p)] == [PSK, PSK]
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT data FROM objects WHERE kind = 'policy'").fetchall()
        conn.close()
        assert all(PSK.encode() not in bytes(r[0]) for r in rows)


def test_server_keeps_preshared_keys_encrypted(inproc_server: Callable[..., InProcessServer]) -> None:
    server = inproc_server()
    assert netsh(["-r", server.address, "ipsec", "static", "add", "filterlist", "name=PSK FL"]) == 0
    assert netsh(["-r", server.address, "ipsec", "static", "add", "filteraction", "name=PSK FA", "action=permit"]) == 0
    assert netsh(["-r", server.address, "ipsec", "static", "add", "policy", "name=PSK P"]) == 0
    assert (
        netsh(
            ["-r", server.address, "ipsec", "static", "add", "rule", "name=r", "policy=PSK P", "filterlist=PSK FL",
             "filteraction=PSK FA", f"psk={PSK}"]
        )
        == 0
    )
    full = server.admin().GetPolicy(admin_pb.GetObjectRequest(name="PSK P", include_secrets=True), timeout=10)
    assert PSK in _psks(full)
    data_dir = server.server.pki.data_dir
    assert PSK.encode() not in _raw_bytes(data_dir / "store.sqlite3")
