"""Kerberos keying for IKE (agent/enforce/kerbkey.py): the pure core, then real exchanges against an MIT KDC.

Every call passes krb5_env=realm.env: libkrb5 reads KRB5_CONFIG on each GSS call (not only at import),
so the order of the tests does not matter; the module fixture restores the environment afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from krb5_realm import REALM, Realm, realm_unavailable, start_realm

from policyagent.agent.enforce import kerbkey
from policyagent.agent.enforce.kerbkey import (
    KerbKeyError,
    KeyingService,
    KeyMessage,
    MsgType,
    PairKey,
    PairKeyTable,
    ProtocolError,
    decode_header,
    derive_psk,
    encode_frame,
    negotiate_key,
)

AGENT1 = f"host/agent1.example.test@{REALM}"
AGENT2 = f"host/agent2.example.test@{REALM}"
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------------------- pure core


def test_frames_round_trip_and_bad_headers_are_named() -> None:
    frame = encode_frame(MsgType.CONTEXT, b"token")
    assert frame[:4] == b"PK\x01\x01" and struct.unpack("!I", frame[4:8]) == (5,)
    assert decode_header(frame[:8]) == (MsgType.CONTEXT, 5)
    with pytest.raises(ProtocolError, match="not a policyagent keying message"):
        decode_header(b"GET / HT")
    with pytest.raises(ProtocolError, match="unsupported keying protocol version 2"):
        decode_header(b"PK\x02\x01\0\0\0\0")
    with pytest.raises(ProtocolError, match="unknown message type 9"):
        decode_header(b"PK\x01\x09\0\0\0\0")
    with pytest.raises(ProtocolError, match="KEY message of 1025 bytes exceeds the limit of 1024"):
        decode_header(b"PK\x01\x03" + struct.pack("!I", 1025))
    with pytest.raises(ValueError):
        encode_frame(MsgType.ERROR, b"x" * 513)


def test_psk_is_symmetric_in_the_addresses_and_bound_to_key_nonce_and_pair() -> None:
    key, nonce = bytes(range(32)), b"\x07" * 32
    psk = derive_psk(key, nonce, "10.0.0.2", "10.0.0.1")
    assert len(psk) == 32
    assert psk == derive_psk(key, nonce, "10.0.0.1", "10.0.0.2")
    assert psk == derive_psk(key, nonce, "::ffff:10.0.0.1", "10.0.0.2")  # dual-stack socket view
    assert psk != derive_psk(key, b"\x08" * 32, "10.0.0.1", "10.0.0.2")
    assert psk != derive_psk(key, nonce, "10.0.0.1", "10.0.0.3")
    assert psk != derive_psk(bytes(32), nonce, "10.0.0.1", "10.0.0.2")


def test_key_message_round_trip_and_malformed() -> None:
    msg = KeyMessage(b"n" * 32, b"k" * 32, 1234.5, "10.0.0.1", "fd00::2")
    assert KeyMessage.unpack(msg.pack()) == msg
    assert "kkkk" not in repr(msg)
    for bad in (msg.pack()[:-1], msg.pack() + b"x", b"", b"\0" * 72):
        with pytest.raises(ProtocolError, match="malformed KEY message"):
            KeyMessage.unpack(bad)


def test_pair_key_hides_the_psk_and_two_keys_for_one_pair_resolve_the_same_way_on_both_sides() -> None:
    a = PairKey("10.0.0.2", AGENT2, b"\x01" * 32, 1000.0, local_ip="10.0.0.1")
    assert "\\x01" not in repr(a) and "psk" not in repr(a) and a.key_id in repr(a)
    b = PairKey("10.0.0.2", AGENT2, b"\x02" * 32, 1001.0, local_ip="10.0.0.1")
    c = PairKey("10.0.0.2", AGENT2, b"\x03" * 32, 1001.0, local_ip="10.0.0.1")
    assert b.preferred_over(a) and not a.preferred_over(b)
    assert c.preferred_over(b) != b.preferred_over(c)  # same expiry: key_id decides, the same on both hosts

    for order in ([a, b, c], [c, b, a], [b, a, c]):
        table = PairKeyTable()
        for key in order:
            table.offer(key)
        winner = table.get("10.0.0.1", "10.0.0.2")
        assert winner is not None and winner.key_id == max(b, c, key=lambda k: k.key_id).key_id
    assert winner is not None
    assert [k.key_id for k in table.due(now=1001.0 - 299, margin_s=300)] == [winner.key_id]
    assert table.due(now=500.0) == []
    assert table.drop_expired(now=2000.0) == [winner] and table.get("10.0.0.1", "10.0.0.2") is None


def test_initiator_must_be_a_host_of_our_realm() -> None:
    assert kerbkey.initiator_refusal(AGENT1, REALM) is None
    assert "not a computer's host principal" in str(kerbkey.initiator_refusal(f"alice@{REALM}", REALM))
    assert "not a computer's host principal" in str(kerbkey.initiator_refusal(f"HTTP/web.example.test@{REALM}", REALM))
    assert "not a member of realm EXAMPLE.TEST" in str(kerbkey.initiator_refusal("host/x.other.test@OTHER.TEST", REALM))


class _FakeGSSError(Exception):
    def __init__(self, min_code: int, text: str) -> None:
        super().__init__(f"Major (851968): Unspecified GSS failure, Minor ({min_code}): {text}")
        self.min_code = min_code


def test_gss_errors_are_explained_from_the_krb5_code() -> None:
    skew = _FakeGSSError(2**32 - 1765328347, "Clock skew too great")
    assert kerbkey.explain_gss_error(skew) == "clock skew too great between the hosts (synchronize their clocks) (Clock skew too great)"
    unknown = _FakeGSSError(5, "Something else")
    assert kerbkey.explain_gss_error(unknown) == "Something else"


# --------------------------------------------------------------------------------------- real exchanges


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    reason = realm_unavailable()
    if reason:
        pytest.skip(f"cannot run a KDC here: {reason}")
    saved = {k: os.environ.get(k) for k in ("KRB5_CONFIG", "KRB5_KDC_PROFILE")}
    started = start_realm(tmp_path_factory.mktemp("krb5"))
    try:
        for principal in ("host/agent1.example.test", "host/agent2.example.test", "alice", "host/gone.example.test",
                          "host/stale.example.test"):
            started.add_principal(principal)
        started._kadmin("delprinc -force host/gone.example.test")  # its keytab names no principal any more
        started._kadmin("cpw -randkey host/stale.example.test")  # its keytab holds the old keys
        yield started
    finally:
        started.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Agent2:
    """A running keying service for host/agent2 and what its on_key received."""

    def __init__(self, service: KeyingService, keys: list[PairKey]) -> None:
        self.service, self.keys = service, keys


@pytest.fixture
def agent2(realm: Realm) -> Iterator[Callable[..., Agent2]]:
    started: list[KeyingService] = []

    def start(**kwargs: Any) -> Agent2:
        keys: list[PairKey] = []
        options: dict[str, Any] = {"on_key": keys.append, "conn_timeout": 2.0, **kwargs}
        service = KeyingService(
            bind=(LOOPBACK, 0), keytab=realm.keytab("host/agent2.example.test"), principal=AGENT2,
            krb5_env=realm.env, **options,
        )
        service.start()
        started.append(service)
        return Agent2(service, keys)

    yield start
    for service in started:
        service.stop()


def negotiate(realm: Realm, port: int, *, principal: str = AGENT1, target: str = AGENT2, timeout: float = 5.0,
              keytab: Path | None = None) -> PairKey:
    name = principal.split("@")[0]
    return negotiate_key(
        LOOPBACK, port, local_principal=principal, keytab=keytab or realm.keytab(name),
        target_principal=target, krb5_env=realm.env, timeout=timeout,
    )


def refusal(fn: Callable[[], object]) -> KerbKeyError:
    with pytest.raises(KerbKeyError) as info:
        fn()
    assert "\n" not in str(info.value)
    return info.value


def test_both_sides_hold_the_same_psk_and_every_negotiation_a_new_one(realm: Realm, agent2: Callable[..., Agent2]) -> None:
    peer = agent2()
    first = negotiate(realm, peer.service.port)
    assert len(peer.keys) == 1
    accepted = peer.keys[0]
    assert first.psk == accepted.psk and first.key_id == accepted.key_id and len(first.psk) == 32
    assert (first.peer_ip, first.local_ip, first.peer_principal) == (LOOPBACK, LOOPBACK, AGENT2)
    assert (accepted.peer_ip, accepted.peer_principal) == (LOOPBACK, AGENT1)
    assert first.expires_unix == accepted.expires_unix
    assert time.time() + 9 * 3600 < first.expires_unix <= time.time() + 10 * 3600 + 5  # the ticket's end (max_life 10h)

    second = negotiate(realm, peer.service.port)
    assert second.psk != first.psk and second.psk == peer.keys[1].psk
    assert second.expires_unix >= first.expires_unix


def test_wrong_target_principal(realm: Realm, agent2: Callable[..., Agent2]) -> None:
    peer = agent2()
    unknown = refusal(lambda: negotiate(realm, peer.service.port, target=f"host/agent3.example.test@{REALM}"))
    assert unknown.kind == "kerberos"
    assert str(unknown).startswith(f"Kerberos keying with 127.0.0.1 (host/agent3.example.test@{REALM}): ")
    assert "the KDC does not know the target principal" in str(unknown)

    # a real host, but not the one listening there: agent2 cannot decrypt a ticket for agent1
    other = refusal(lambda: negotiate(realm, peer.service.port, target=AGENT1))
    assert other.kind == "refused"
    assert "refused by the peer: Kerberos refused the initiator's ticket" in str(other)
    assert "the ticket is for another principal" in str(other)
    assert peer.keys == []


def test_initiators_outside_the_realm_cannot_key(realm: Realm, agent2: Callable[..., Agent2], tmp_path: Path) -> None:
    peer = agent2()
    gone = refusal(lambda: negotiate(realm, peer.service.port, principal=f"host/gone.example.test@{REALM}"))
    assert gone.kind == "kerberos"
    assert f"cannot get Kerberos credentials as host/gone.example.test@{REALM}" in str(gone)
    assert "not a member of the realm" in str(gone)

    stale = refusal(lambda: negotiate(realm, peer.service.port, principal=f"host/stale.example.test@{REALM}"))
    assert stale.kind == "kerberos" and "stale keytab" in str(stale)

    missing = refusal(lambda: negotiate(realm, peer.service.port, keytab=tmp_path / "none.keytab"))
    assert missing.kind == "local" and "no keytab at" in str(missing) and "not a domain member" in str(missing)
    assert peer.keys == []


def test_the_acceptor_refuses_principals_that_are_not_hosts_or_not_allowed(
    realm: Realm, agent2: Callable[..., Agent2], caplog: pytest.LogCaptureFixture
) -> None:
    peer = agent2()
    user = refusal(lambda: negotiate(realm, peer.service.port, principal=f"alice@{REALM}"))
    assert user.kind == "refused"
    assert f"refused by the peer: initiator alice@{REALM} is not a computer's host principal" in str(user)
    assert f"refused 127.0.0.1 (alice@{REALM})" in caplog.text

    picky = agent2(allowed=lambda ip, principal: principal != AGENT1)
    denied = refusal(lambda: negotiate(realm, picky.service.port))
    assert denied.kind == "refused" and f"initiator {AGENT1} from 127.0.0.1 is not allowed" in str(denied)
    assert peer.keys == [] and picky.keys == []


def test_a_failing_install_is_reported_to_the_initiator(realm: Realm, agent2: Callable[..., Agent2]) -> None:
    def broken(key: PairKey) -> None:
        raise OSError("charon is gone")

    peer = agent2(on_key=broken)
    failed = refusal(lambda: negotiate(realm, peer.service.port))
    assert failed.kind == "refused" and "the peer could not install the key" in str(failed)


def test_garbage_is_logged_and_the_service_keeps_serving(
    realm: Realm, agent2: Callable[..., Agent2], caplog: pytest.LogCaptureFixture
) -> None:
    peer = agent2()
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"PK\x01\x01\xff\xff\xff\xff", b"PK\x01\x01\0\0\0\x05hello"):
        with socket.create_connection((LOOPBACK, peer.service.port), timeout=5) as s:
            s.sendall(junk)
            reply = s.recv(600)
        assert reply[:4] == b"PK\x01\x7f", reply  # an ERROR frame saying why
    assert "not a policyagent keying message" in caplog.text
    assert "CONTEXT message of 4294967295 bytes exceeds the limit" in caplog.text
    assert "Kerberos refused the initiator's ticket" in caplog.text
    key = negotiate(realm, peer.service.port)
    assert [k.psk for k in peer.keys] == [key.psk]


def _relay(listener: socket.socket, target: tuple[str, int], source_ip: str) -> None:
    """Forward one connection to `target` from `source_ip`: what a NAT between the peers does."""
    client, _ = listener.accept()
    upstream = socket.create_connection(target, timeout=5, source_address=(source_ip, 0))

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    pump(upstream, client)
    client.close()
    upstream.close()


def test_keys_are_bound_to_the_addresses_both_sides_see(realm: Realm, agent2: Callable[..., Agent2]) -> None:
    peer = agent2()
    key = negotiate_key(
        LOOPBACK, peer.service.port, local_principal=AGENT1, keytab=realm.keytab("host/agent1.example.test"),
        target_principal=AGENT2, krb5_env=realm.env, timeout=5, source_ip="127.0.0.2",
    )
    assert (key.local_ip, key.peer_ip) == ("127.0.0.2", LOOPBACK)
    assert (peer.keys[0].local_ip, peer.keys[0].peer_ip, peer.keys[0].psk) == (LOOPBACK, "127.0.0.2", key.psk)

    with socket.socket() as nat:
        nat.bind(("127.0.0.3", 0))
        nat.listen(1)
        relay = threading.Thread(target=_relay, args=(nat, (LOOPBACK, peer.service.port), "127.0.0.4"), daemon=True)
        relay.start()
        translated = refusal(lambda: negotiate_key(
            "127.0.0.3", nat.getsockname()[1], local_principal=AGENT1,
            keytab=realm.keytab("host/agent1.example.test"), target_principal=AGENT2, krb5_env=realm.env, timeout=5,
        ))
        relay.join(5)
    assert translated.kind == "refused"
    assert ("address mismatch: the initiator sees 127.0.0.1 -> 127.0.0.3, the acceptor sees 127.0.0.4 -> 127.0.0.1"
            in str(translated))
    assert len(peer.keys) == 1


def test_timeouts_on_both_sides(realm: Realm, agent2: Callable[..., Agent2]) -> None:
    # an initiator facing a port that accepts but never answers gives up after its timeout
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(1)
        t0 = time.monotonic()
        slow = refusal(lambda: negotiate(realm, silent.getsockname()[1], timeout=0.5))
        assert slow.kind == "timeout" and "timed out after 0.5s waiting for the peer's Kerberos reply" in str(slow)
        assert time.monotonic() - t0 < 3

    # a client that connects and stalls holds the service for conn_timeout at most
    peer = agent2(conn_timeout=0.4)
    with socket.create_connection((LOOPBACK, peer.service.port)) as staller:
        staller.sendall(b"PK\x01\x01")  # half a header, then nothing
        t0 = time.monotonic()
        key = negotiate(realm, peer.service.port, timeout=5)
        assert 0.2 < time.monotonic() - t0 < 3
        assert staller.recv(600)[:4] == b"PK\x01\x7f"
    assert peer.keys[-1].psk == key.psk


def test_unreachable_peer_and_unreachable_kdc(realm: Realm, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        closed_port = s.getsockname()[1]
    down = refusal(lambda: negotiate(realm, closed_port))
    assert down.kind == "unreachable" and f"cannot connect to port {closed_port}" in str(down)

    dead_conf = tmp_path / "krb5.conf"
    dead_conf.write_text((realm.dir / "krb5.conf").read_text().replace(f"127.0.0.1:{realm.port}", f"127.0.0.1:{closed_port}"))
    no_kdc = refusal(lambda: negotiate_key(
        LOOPBACK, closed_port, local_principal=AGENT1, keytab=realm.keytab("host/agent1.example.test"),
        target_principal=AGENT2, krb5_env={"KRB5_CONFIG": str(dead_conf)}, timeout=2,
    ))
    assert no_kdc.kind == "kerberos" and "the KDC is unreachable" in str(no_kdc)
    kerbkey.configure_krb5_env(realm.env)


def test_a_peer_address_unlike_its_name_is_logged_not_refused(
    realm: Realm, agent2: Callable[..., Agent2], caplog: pytest.LogCaptureFixture
) -> None:
    peer = agent2(expected_addresses=lambda fqdn: {"agent1.example.test": ["192.0.2.1"]}.get(fqdn, []))
    with caplog.at_level(logging.WARNING):
        negotiate(realm, peer.service.port)
    assert f"{AGENT1} keyed from 127.0.0.1, but agent1.example.test is known at 192.0.2.1 (not enforced)" in caplog.text
    assert len(peer.keys) == 1


def test_service_start_refuses_a_missing_keytab_and_stops_promptly(realm: Realm, tmp_path: Path) -> None:
    service = KeyingService(bind=(LOOPBACK, 0), keytab=tmp_path / "none.keytab", principal=AGENT2,
                            on_key=lambda k: None, krb5_env=realm.env)
    with pytest.raises(KerbKeyError, match="no keytab at"):
        service.start()
    wrong = KeyingService(bind=(LOOPBACK, 0), keytab=realm.keytab("host/agent1.example.test"), principal=AGENT2,
                          on_key=lambda k: None, krb5_env=realm.env)
    with pytest.raises(KerbKeyError, match=r"cannot use .* for host/agent2"):
        wrong.start()

    service = KeyingService(bind=(LOOPBACK, 0), keytab=realm.keytab("host/agent2.example.test"), principal=AGENT2,
                            on_key=lambda k: None, krb5_env=realm.env, conn_timeout=30)
    service.start()
    with socket.create_connection((LOOPBACK, service.port)):  # an exchange in progress is aborted too
        time.sleep(0.05)
        t0 = time.monotonic()
        service.stop()
        assert time.monotonic() - t0 < 1
    assert not any(t.name == "kerbkey-acceptor" and t.is_alive() for t in threading.enumerate())


def test_the_private_ticket_cache_is_destroyed(realm: Realm) -> None:
    import gssapi
    from gssapi.raw.misc import GSSError

    kerbkey.configure_krb5_env(realm.env)
    cache = "MEMORY:policyagent-kerbkey-test"
    name = gssapi.Name(AGENT1, gssapi.NameType.kerberos_principal)
    store: dict[bytes | str, bytes | str] = {"client_keytab": str(realm.keytab("host/agent1.example.test")), "ccache": cache}
    gssapi.Credentials(name=name, usage="initiate", store=store)
    assert gssapi.Credentials(usage="initiate", store={"ccache": cache}).name is not None
    kerbkey._destroy_ccache(cache)
    with pytest.raises(GSSError):
        gssapi.Credentials(usage="initiate", store={"ccache": cache}).lifetime  # noqa: B018
