"""The IP Security Monitor: statistics and audit events from real charon-systemd pairs in namespaces.

Each namespace test starts one charon per host (`Charon(netns=...)`) and one Monitor per charon; the
Monitors run in the test process (VICI is a unix socket, reachable from any namespace). The pure tests at
the top (audit file, log-line mapping) need no root.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from netns import Host, Lan, netns_unavailable, two_hosts

from policyagent.agent.enforce import caps
from policyagent.agent.enforce.caps import BACKEND_LIBIPSEC
from policyagent.agent.enforce.charon import Charon
from policyagent.agent.enforce.monitor import (
    MAIN_MODE_FIELDS,
    MODE_MAIN,
    MODE_QUICK,
    QUICK_MODE_FIELDS,
    AuditEvent,
    AuditLog,
    Monitor,
    load_audit_file,
)

PSK = "monitor-test-psk-0123456789abcdef"
OTHER_PSK = "monitor-test-other-psk-fedcba9876"
BYTE_KEYS = [k for k, _ in QUICK_MODE_FIELDS if "bytes" in k]


def wait_for(pred: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# --- no root needed ------------------------------------------------------------------------------------------


def test_field_tables_use_the_windows_names() -> None:
    mm = dict(MAIN_MODE_FIELDS)
    qm = dict(QUICK_MODE_FIELDS)
    assert mm["ike_main_modes"] == "IKE Main Mode" and mm["ike_quick_modes"] == "IKE Quick Mode"
    assert mm["isadb_list_size"] == "ISADB List Size" and mm["key_updates"] == "Key Updates"
    assert qm["confidential_bytes_sent"] == "Confidential Bytes Sent"
    assert qm["bytes_received_in_tunnels"] == "Bytes Received In Tunnels"
    assert len(mm) == len(MAIN_MODE_FIELDS) and len(qm) == len(QUICK_MODE_FIELDS)  # keys unique


def test_audit_log_file_modes_rotation_and_query(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", keep=5, max_bytes=600)
    for i in range(12):
        log.append(AuditEvent(541 + i % 7, 1000 + i, {"Filter": f"f{i}"}, f"event {i}"))
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert log.rotated_path.exists() and stat.S_IMODE(log.rotated_path.stat().st_mode) == 0o600
    assert log.path.stat().st_size <= 600
    on_disk = load_audit_file(log.rotated_path) + load_audit_file(log.path)
    assert [e.message for e in on_disk] == [f"event {i}" for i in range(12 - len(on_disk), 12)]
    assert [e.message for e in log.events()] == [f"event {i}" for i in range(7, 12)]  # the last 5 in memory
    assert [e.time_unix_ms for e in log.events(since_unix_ms=1009)] == [1009, 1010, 1011]
    assert [e.id for e in log.events(ids={541})] == [541]  # event 7 (1007): 541 + 0
    assert len(log.events(limit=2)) == 2


def _offline_monitor(tmp_path: Path) -> Monitor:
    charon = Charon(tmp_path / "charon", backend=BACKEND_LIBIPSEC, charon_path="/bin/false")
    return Monitor(charon, tmp_path / "state", clock=lambda: 1_700_000_000.5)


def _log(msg: str, uid: int | None = None, name: str = "(unnamed)", group: str = "IKE") -> dict[str, Any]:
    data: dict[str, Any] = {"group": group, "level": "1", "msg": msg}
    if uid is not None:
        data["ikesa-name"], data["ikesa-uniqueid"] = name, str(uid)
    return data


def test_log_lines_map_to_counters_and_events(tmp_path: Path) -> None:
    """The 5.9.8 texts seen in the namespace runs, fed without charon: what each one counts and writes."""
    mon = _offline_monitor(tmp_path)
    seen: list[AuditEvent] = []
    mon.subscribe(seen.append)
    for msg in (  # responder side of a pre-shared key mismatch (each retransmit fails the same way)
        "received packet: from 10.9.0.1[4500] to 10.9.0.2[4500] (108 bytes)",
        "10.9.0.1 is initiating a Main Mode IKE_SA",
        "invalid ID_V1 payload length, decryption failed?",
        "could not decrypt payloads",
        "message parsing failed",
        "ID_PROT request with message ID 0 processing failed",
        "could not decrypt payloads",
        "ID_PROT request with message ID 0 processing failed",
    ):
        mon._dispatch("log", _log(msg, 3))
    for msg in ("received proposals: IKE:AES_CBC_256/HMAC_SHA2_384_192/PRF_HMAC_SHA2_384/MODP_3072",
                "configured proposals: IKE:AES_CBC_128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048",
                "no proposal found"):
        mon._dispatch("log", _log(msg, 4))
    mon._dispatch("log", _log("ESP decryption or ICV verification failed", group="ESP"))
    mon._dispatch("log", _log("ESP sequence number verification failed:\n  src 10.9.0.1, dst 10.9.0.2", group="ESP"))
    mon._dispatch("log", _log("ESP decryption failed: invalid length", group="ESP"))
    mm, qm = mon._mm, mon._qm
    assert mm["authentication_failures"] == 1 and mm["invalid_packets_received"] == 2
    assert mm["negotiation_failures"] == 2
    assert (qm["packets_not_authenticated"], qm["packets_with_replay_detection"], qm["packets_not_decrypted"]) == (1, 1, 1)
    assert [e.id for e in seen] == [545, 546, 547]
    auth, attr, neg = seen
    assert auth.fields == {"Peer Identity": "address 10.9.0.1",
                           "Filter": "(no connection selected yet): 10.9.0.2 <-> 10.9.0.1"}
    assert "pre-shared key mismatch" in auth.message and auth.time_unix_ms == 1_700_000_000_500
    assert attr.fields["Expected value"].startswith("IKE:AES_CBC_128") and attr.fields["Mode"] == MODE_MAIN
    assert attr.fields["Received value"].startswith("IKE:AES_CBC_256")
    assert neg.fields["Failure Point"] == "Me" and neg.fields["Mode"] == MODE_MAIN
    assert mon.events(ids={545}) == [auth]
    assert [e.id for e in load_audit_file(mon.audit.path)] == [545, 546, 547]


def test_child_bytes_are_retained_and_cert_trust_is_544_offline(tmp_path: Path) -> None:
    mon = _offline_monitor(tmp_path)
    child = {"name": "h2h", "uniqueid": "7", "state": "INSTALLED", "mode": "TUNNEL", "protocol": "ESP",
             "encap": "yes", "spi-in": "c1a0b2c3", "spi-out": "d4e5f607", "bytes-in": "100", "bytes-out": "200",
             "local-ts": ["10.9.0.2/32"], "remote-ts": ["10.9.0.1/32"]}
    ike = {"uniqueid": "5", "state": "ESTABLISHED", "local-host": "10.9.0.2", "remote-host": "10.9.0.1",
           "remote-id": "10.9.0.1", "child-sas": {"h2h-7": child}}
    mon._dispatch("child-updown", {"up": "yes", "h2h": ike})
    # the verified 5.9.8 line for a rekeyed or deleted CHILD_SA carries its final byte counts
    mon._dispatch("log", _log("closing CHILD_SA h2h{7} with SPIs c1a0b2c3_i (1500 bytes) d4e5f607_o (2500 bytes) "
                              "and TS 10.9.0.2/32 === 10.9.0.1/32", 5, "h2h", group="IKE"))
    mon._dispatch("child-updown", {"h2h": {**ike, "child-sas": {"h2h-7": {**child, "state": "DELETED"}}}})
    assert mon._retained["confidential_bytes_received"] == 1500 and mon._retained["bytes_sent_in_tunnels"] == 2500
    assert mon._qm["key_deletions"] == 1 and mon._mm["ike_quick_modes"] == 1
    ended = mon.events(ids={542})
    assert len(ended) == 1 and ended[0].fields == {
        "Filter": "h2h/h2h: 10.9.0.2/32 === 10.9.0.1/32 (tunnel mode, ESP)",
        "Inbound SPI": "c1a0b2c3", "Outbound SPI": "d4e5f607"}
    for msg in ('received end entity cert "CN=host-a"',
                "looking for RSA signature peer configs matching 10.9.0.2...10.9.0.1[10.9.0.1]",
                'no issuer certificate found for "CN=host-a"',
                'issuer is "CN=Test CA1"',
                "no trusted RSA public key found for '10.9.0.1'",
                "no alternative config found"):
        mon._dispatch("log", _log(msg, 6, "h2h", group="CFG"))
    [trust] = mon.events(ids={544})
    assert trust.fields == {"Peer Identity": 'ID 10.9.0.1; certificate "CN=host-a" issued by "CN=Test CA1"; '
                                             "address 10.9.0.1", "Filter": "h2h: 10.9.0.2 <-> 10.9.0.1"}
    mon._dispatch("log", _log("no shared key found for '10.9.0.2'[10.9.0.2] - '10.9.0.3'[10.9.0.3]", 8))
    mon._dispatch("log", _log("IDir '10.9.0.4' does not match to 'someone-else'", 9, "h2h"))
    assert [e.id for e in mon.events(ids={544, 545})] == [544, 545, 545]
    assert mon._mm["authentication_failures"] == 3


# --- real charon pairs in namespaces -------------------------------------------------------------------------


def _skip_reason() -> str | None:
    reason = netns_unavailable("charon-systemd", "ping")
    if reason:
        return reason
    problems = caps.probe().problems()
    return "; ".join(problems) if problems else None


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    if reason := _skip_reason():
        pytest.skip(reason)
    with two_hosts(tmp_path_factory.mktemp("lan")) as lan:
        yield lan


class Rig:
    """Charons and Monitors started by one test; all stopped (before the namespaces go) when it ends."""

    def __init__(self, lan: Lan, base: Path) -> None:
        self.lan = lan
        self.base = base
        self.charons: list[Charon] = []
        self.monitors: list[Monitor] = []

    @property
    def a(self) -> Host:
        return self.lan.hosts["a"]

    @property
    def b(self) -> Host:
        return self.lan.hosts["b"]

    def charon(self, host: Host) -> Charon:
        c = Charon(self.base / f"charon-{host.name}", backend=caps.probe().backend, netns=host.netns)
        self.charons.append(c)
        c.start()
        return c

    def monitor(self, charon: Charon, name: str) -> Monitor:
        m = Monitor(charon, self.base / f"state-{name}")
        self.monitors.append(m)
        m.start()
        assert m.wait_connected(5), "monitor did not register with charon"
        return m

    def close(self) -> None:
        for m in self.monitors:
            m.stop()
        for c in self.charons:
            c.stop()


@pytest.fixture
def rig(lan: Lan, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(lan, tmp_path)
    try:
        yield r
    finally:
        r.close()


def _conn(me: Host, peer: Host, auth: str = "psk", local: dict[str, Any] | None = None,
          remote: dict[str, Any] | None = None) -> dict[str, Any]:
    """IKEv1 main mode, host-to-host tunnel between the two addresses (ESP-in-UDP under libipsec)."""
    return {
        "h2h": {
            "version": "1",
            "aggressive": "no",
            "local_addrs": [me.ip],
            "remote_addrs": [peer.ip],
            "proposals": ["aes128-sha256-modp2048"],
            "encap": "yes",
            "local-1": {"auth": auth, "id": me.ip, **(local or {})},
            "remote-1": {"auth": auth, "id": peer.ip, **(remote or {})},
            "children": {"h2h": {"mode": "tunnel", "local_ts": [f"{me.ip}/32"], "remote_ts": [f"{peer.ip}/32"],
                                  "esp_proposals": ["aes128-sha256"], "start_action": "none"}},
        }
    }


def _load_psk(c: Charon, me: Host, peer: Host, secret: str = PSK) -> None:
    with c.session() as s:
        s.load_conn(_conn(me, peer))
        s.load_shared({"id": "psk-h2h", "type": "IKE", "data": secret, "owners": [me.ip, peer.ip]})


def _initiate(c: Charon, timeout_ms: int = 8000) -> None:
    with c.session(timeout=timeout_ms / 1000 + 5) as s:
        for _ in s.initiate({"child": "h2h", "timeout": timeout_ms}):
            pass


def _initiate_in_background(c: Charon) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(Exception):  # the negotiation is meant to fail
            _initiate(c)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _children(c: Charon) -> list[dict[str, Any]]:
    with c.session() as s:
        sas = list(s.list_sas())
    out = []
    for entry in sas:
        for ike in entry.values():
            for child in ike.get("child-sas", {}).values():
                out.append({k: v.decode() if isinstance(v, bytes) else v for k, v in child.items()})
    return out


def _up_pair(rig: Rig, subscriber: Callable[[AuditEvent], None] | None = None) -> tuple[Charon, Charon, Monitor, Monitor]:
    ca, cb = rig.charon(rig.a), rig.charon(rig.b)
    ma, mb = rig.monitor(ca, "a"), rig.monitor(cb, "b")
    if subscriber is not None:
        ma.subscribe(subscriber)
    _load_psk(ca, rig.a, rig.b)
    _load_psk(cb, rig.b, rig.a)
    _initiate(ca)
    return ca, cb, ma, mb


def _send_esp(host: Host, dst: str, spi: str, seq: int, count: int) -> None:
    """ESP-in-UDP packets with a real SPI and garbage content, from `host` to dst:4500."""
    script = (
        "import socket, struct, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for i in range({count}):\n"
        f"    s.sendto(struct.pack('!II', {int(spi, 16)}, {seq} + i) + bytes(range(64)), ('{dst}', 4500))\n"
    )
    host.run([sys.executable, "-c", script])


def test_sa_up_counts_bytes_and_writes_541(rig: Rig) -> None:
    a, b = rig.a, rig.b
    forwarded: list[AuditEvent] = []
    ca, cb, ma, mb = _up_pair(rig, forwarded.append)
    assert a.ping(b.ip, count=5, interval=0.05), "a -> b over the SA"
    for m in (ma, mb):
        snap = wait_for(lambda m=m: (s := m.snapshot())["main_mode"]["ike_quick_modes"] >= 1 and s, what="quick mode")
        mm, qm = snap["main_mode"], snap["quick_mode"]
        assert mm["ike_main_modes"] == 1 and mm["ike_quick_modes"] == 1
        assert mm["key_additions"] == mm["key_updates"] == qm["key_additions"] == 1
        assert mm["isadb_list_size"] == 1 and mm["connection_list_size"] == 1
        assert qm["active_security_associations"] == 1 and qm["active_tunnels"] == 1
        assert mm["authentication_failures"] == mm["negotiation_failures"] == 0
    # confidential bytes = the sums of list-sas bytes-in/out (inner IP bytes: 5 x 84-byte ICMP echo each way)
    for c, m in ((ca, ma), (cb, mb)):
        children = _children(c)
        qm = m.snapshot()["quick_mode"]
        assert qm["confidential_bytes_sent"] == sum(int(ch["bytes-out"]) for ch in children) >= 5 * 84
        assert qm["confidential_bytes_received"] == sum(int(ch["bytes-in"]) for ch in children) >= 5 * 84
        assert qm["bytes_sent_in_tunnels"] == qm["confidential_bytes_sent"]
        assert qm["bytes_received_in_tunnels"] == qm["confidential_bytes_received"]
        assert qm["transport_bytes_sent"] == qm["authenticated_bytes_sent"] == qm["bad_spi_packets"] == 0
    # audit 541, main mode and quick mode, on both sides
    spi_a = _children(ca)[0]["spi-in"]
    for m, peer, spi_in in ((ma, b, spi_a), (mb, a, _children(cb)[0]["spi-in"])):
        events = wait_for(lambda m=m: len(m.events(ids={541})) >= 2 and m.events(ids={541}), what="541 x2")
        by_mode = {e.fields["Mode"]: e for e in events}
        main, quick = by_mode[MODE_MAIN], by_mode[MODE_QUICK]
        assert set(main.fields) == set(quick.fields) == {"Mode", "Peer Identity", "Filter", "Parameters"}
        assert peer.ip in main.fields["Peer Identity"] and "h2h" in main.fields["Filter"]
        assert "MODP_2048" in main.fields["Parameters"] and "AES_CBC-128" in main.fields["Parameters"]
        assert f"inbound SPI {spi_in}" in quick.fields["Parameters"]
        assert f"/32 === {peer.ip}/32" in quick.fields["Filter"] and "tunnel mode" in quick.fields["Filter"]
    assert [e.id for e in forwarded][:2] == [541, 541]
    # the audit file: 0600 in a 0700 directory, JSON lines, no secret
    audit = rig.base / "state-a" / "audit" / "audit.jsonl"
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit.parent.stat().st_mode) == 0o700
    assert all(json.loads(line)["id"] == 541 for line in audit.read_text().splitlines())
    assert PSK not in audit.read_text()
    # libipsec's ESP errors on b: garbage with b's inbound SPI (not authenticated), then old sequence numbers
    spi_b = _children(cb)[0]["spi-in"]
    _send_esp(a, b.ip, spi_b, seq=1000, count=3)
    _send_esp(a, b.ip, spi_b, seq=1, count=2)
    qm_b = wait_for(lambda: (q := mb.snapshot()["quick_mode"])["packets_with_replay_detection"] >= 2 and q,
                    what="replay counter")
    assert qm_b["packets_not_authenticated"] == 3 and qm_b["bad_spi_packets"] == 0


def test_rekey_and_terminate_keep_totals_and_write_542_543(rig: Rig) -> None:
    a, b = rig.a, rig.b
    ca, _cb, ma, mb = _up_pair(rig)
    assert a.ping(b.ip, count=3, interval=0.05)
    old = _children(ca)[0]
    before = ma.snapshot()["quick_mode"]
    with ca.session() as s:
        s.rekey({"child": "h2h"})
    for m in (ma, mb):
        wait_for(lambda m=m: m.snapshot()["quick_mode"]["rekeys"] == 1, what="rekey counted")
    snap = ma.snapshot()
    assert snap["main_mode"]["ike_quick_modes"] == 2 and snap["quick_mode"]["key_additions"] == 2
    assert snap["quick_mode"]["active_security_associations"] == 1  # the rekeyed one is no longer active
    assert all(snap["quick_mode"][k] >= before[k] for k in BYTE_KEYS)
    assert len(ma.events(ids={541})) == 3  # main mode, quick mode, the rekeyed quick mode
    assert a.ping(b.ip, count=3, interval=0.05)
    during = ma.snapshot()["quick_mode"]
    assert during["confidential_bytes_sent"] >= before["confidential_bytes_sent"] + 3 * 84
    with ca.session() as s:
        for _ in s.terminate({"ike": "h2h", "timeout": 5000}):
            pass
    for m in (ma, mb):
        wait_for(lambda m=m: len(m.events(ids={542})) >= 2 and m.events(ids={543}), what="542 x2 + 543")
    after = ma.snapshot()
    assert after["quick_mode"]["key_deletions"] == 2
    assert after["quick_mode"]["active_security_associations"] == 0 and after["main_mode"]["isadb_list_size"] == 0
    for k in BYTE_KEYS:  # totals never go backwards; nothing was sent after `during`
        assert after["quick_mode"][k] == during[k], k
    ended = ma.events(ids={542})
    assert {(e.fields["Inbound SPI"], e.fields["Outbound SPI"]) for e in ended} >= {(old["spi-in"], old["spi-out"])}
    assert all("h2h/h2h" in e.fields["Filter"] for e in ended)
    assert all(e.fields["Filter"].startswith("h2h: ") for e in ma.events(ids={543}))


def test_psk_mismatch_is_an_authentication_failure_where_detected(rig: Rig) -> None:
    a, b = rig.a, rig.b
    ca, cb = rig.charon(a), rig.charon(b)
    ma, mb = rig.monitor(ca, "a"), rig.monitor(cb, "b")
    _load_psk(ca, a, b, PSK)
    _load_psk(cb, b, a, OTHER_PSK)
    _initiate_in_background(ca)
    # b (the responder) cannot decrypt a's main mode identity message: that is where the mismatch shows
    ev = wait_for(lambda: mb.events(ids={545}), what="545 on b")[0]
    assert a.ip in ev.fields["Peer Identity"] and set(ev.fields) == {"Peer Identity", "Filter"}
    assert f"{b.ip} <-> {a.ip}" in ev.fields["Filter"]
    assert "pre-shared key" in ev.message
    assert mb.snapshot()["main_mode"]["authentication_failures"] == 1
    # a only sees no usable answer and gives up (2 retransmits at 1 s)
    neg = wait_for(lambda: ma.events(ids={547}), timeout=10, what="547 on a")[0]
    assert neg.fields["Failure Point"] == "Peer" and neg.fields["Mode"] == MODE_MAIN
    assert b.ip in neg.fields["Peer Identity"] and neg.fields["Filter"].startswith("h2h: ")
    assert "retransmits" in neg.fields["Extra Status"]
    snap_a = ma.snapshot()["main_mode"]
    assert snap_a["authentication_failures"] == 0 and snap_a["negotiation_failures"] == 1
    assert snap_a["ike_main_modes"] == 0 and snap_a["invalid_packets_received"] >= 1
    for m in (ma, mb):
        text = (m.audit.path).read_text()
        assert PSK not in text and OTHER_PSK not in text


def _ca(cn: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _host_cert(ca: tuple[rsa.RSAPrivateKey, x509.Certificate], cn: str, ip: str) -> tuple[bytes, bytes]:
    ca_key, ca_cert = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_der, cert.public_bytes(serialization.Encoding.DER)


def test_certificate_from_an_untrusted_ca_is_544(rig: Rig) -> None:
    a, b = rig.a, rig.b
    ca1, ca2 = _ca("Monitor Test CA1"), _ca("Monitor Test CA2")
    key_a, cert_a = _host_cert(ca1, "host-a", a.ip)  # a's certificate comes from CA1 ...
    key_b, cert_b = _host_cert(ca2, "host-b", b.ip)
    ca2_der = ca2[1].public_bytes(serialization.Encoding.DER)
    ca, cb = rig.charon(a), rig.charon(b)
    ma, mb = rig.monitor(ca, "a"), rig.monitor(cb, "b")
    for c, me, peer, key, cert in ((ca, a, b, key_a, cert_a), (cb, b, a, key_b, cert_b)):
        with c.session() as s:
            s.load_key({"type": "rsa", "data": key})
            s.load_cert({"type": "X509", "flag": "NONE", "data": cert})
            s.load_cert({"type": "X509", "flag": "CA", "data": ca2_der})  # ... but both trust only CA2
            s.load_conn(_conn(me, peer, auth="pubkey", local={"certs": [cert]}))
    _initiate_in_background(ca)
    ev = wait_for(lambda: mb.events(ids={544}), what="544 on b")[0]
    assert 'certificate "CN=host-a" issued by "CN=Monitor Test CA1"' in ev.fields["Peer Identity"]
    assert a.ip in ev.fields["Peer Identity"] and ev.fields["Filter"].startswith("h2h: ")
    assert "certificate trust" in ev.message
    assert mb.snapshot()["main_mode"]["authentication_failures"] == 1
    neg = wait_for(lambda: ma.events(ids={547}), what="547 on a")[0]
    assert neg.fields["Failure Point"] == "Peer" and neg.fields["Extra Status"] == "notify AUTHENTICATION_FAILED"
    assert "authenticate" in neg.fields["Failure Reason"]
    assert ma.snapshot()["main_mode"]["authentication_failures"] == 0
    assert not ma.events(ids={544, 545}) and not mb.events(ids={541})


def test_peer_not_responding_is_547_with_failure_point_peer(rig: Rig) -> None:
    a, b = rig.a, rig.b
    ca = rig.charon(a)  # no charon on b
    ma = rig.monitor(ca, "a")
    with ca.session() as s:
        s.load_conn(_conn(a, b))
        s.load_shared({"id": "psk-h2h", "type": "IKE", "data": PSK, "owners": [a.ip, b.ip]})
    ma.acquire_started()  # what the enforcer reports around its initiate
    assert ma.snapshot()["main_mode"]["active_acquire"] == 1
    t0 = time.monotonic()
    with contextlib.suppress(Exception):
        _initiate(ca)
    ma.acquire_finished(False)
    ma.soft_association(b.ip)
    ev = wait_for(lambda: ma.events(ids={547}), what="547")[0]
    assert time.monotonic() - t0 < 8
    assert ev.fields["Failure Point"] == "Peer" and ev.fields["Mode"] == MODE_MAIN
    assert ev.fields["Failure Reason"] == "no response from the peer"
    assert ev.fields["Extra Status"] == "gave up after 2 retransmits"
    assert b.ip in ev.fields["Peer Identity"] and ev.fields["Filter"] == f"h2h: {a.ip} <-> {b.ip}"
    mm = ma.snapshot()["main_mode"]
    assert (mm["negotiation_failures"], mm["total_acquire"], mm["active_acquire"], mm["acquire_failures"],
            mm["soft_associations"], mm["ike_main_modes"]) == (1, 1, 0, 1, 1, 0)


def test_monitor_survives_a_charon_restart(rig: Rig) -> None:
    a, b = rig.a, rig.b
    ca, _cb, ma, _mb = _up_pair(rig)
    assert a.ping(b.ip, count=3, interval=0.05)
    before = ma.snapshot()
    pid = ca.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # charon dies without deleting anything: its SAs are gone with it
    wait_for(lambda: not ca.alive(), what="charon gone")
    ca.restart()  # as the enforcer does when charon dies
    restarted_ms = int(time.time() * 1000)
    wait_for(lambda: ma.events(ids={543}), what="543 for the IKE_SA lost with charon")
    lost = wait_for(lambda: ma.events(ids={542}), what="542 for the CHILD_SA lost with charon")
    assert "IKE daemon" in lost[0].message
    assert ma.wait_connected(5)
    _load_psk(ca, a, b)  # a new charon knows nothing: the enforcer re-applies its policy
    _initiate(ca)
    assert a.ping(b.ip, count=3, interval=0.05)
    after = wait_for(lambda: (s := ma.snapshot())["main_mode"]["ike_main_modes"] == 2 and s, what="new main mode")
    assert after["main_mode"]["ike_quick_modes"] == 2 and after["quick_mode"]["key_deletions"] == 1
    assert after["quick_mode"]["active_security_associations"] == 1
    for k in BYTE_KEYS:
        assert after["quick_mode"][k] >= before["quick_mode"][k], k
    assert after["quick_mode"]["confidential_bytes_sent"] >= before["quick_mode"]["confidential_bytes_sent"] + 3 * 84
    fresh = ma.events(since_unix_ms=restarted_ms, ids={541})
    assert {e.fields["Mode"] for e in fresh} == {MODE_MAIN, MODE_QUICK}, "events still arrive after the restart"
    assert os.path.getsize(ma.audit.path) > 0
