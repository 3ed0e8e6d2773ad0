"""The capability probe and the charon supervisor: unit checks, then real charon-systemd in namespaces.

Namespace tests run one charon-systemd per host (`Charon(netns=...)`, tests only), talk VICI to it, and
check the wire with tcpdump/tshark. They skip with the reason when this machine cannot run them.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Host, Lan, netns_unavailable, tshark_lines, two_hosts
from vici.exception import CommandException

from policyagent.agent.enforce import caps
from policyagent.agent.enforce.caps import BACKEND_LIBIPSEC, BACKEND_NETLINK
from policyagent.agent.enforce.charon import MAX_LOG_LEVEL, Charon, CharonError, render_conf

PSK = "charon-test-psk-0123456789abcdef"


# --- capability probe ------------------------------------------------------------------------------


def _kernel_config() -> dict[str, str]:
    """CONFIG_* from /proc/config.gz ({} if the kernel does not expose it): an oracle independent of XFRM."""
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if m := re.match(r"(CONFIG_\w+)=(\S+)", line):
            out[m[1]] = m[2]
        elif m := re.match(r"# (CONFIG_\w+) is not set", line):
            out[m[1]] = "n"
    return out


def test_probe_matches_kernel_and_packages() -> None:
    t0 = time.monotonic()
    host = caps.probe(refresh=True)
    assert time.monotonic() - t0 < 0.5
    assert caps.probe() is host  # cached per process

    config = _kernel_config()
    for option, found in (("CONFIG_INET_ESP", host.kernel_esp), ("CONFIG_INET_AH", host.kernel_ah),
                          ("CONFIG_INET_IPCOMP", host.ipcomp)):
        if config.get(option) == "n":
            assert not found, option
        elif config.get(option) == "y":
            assert found, option
    assert host.transport_mode == host.kernel_esp
    if not host.kernel_esp:
        assert host.esp_error  # the kernel's own words, e.g. "Error: Requested type not found."

    assert host.libipsec_plugin == caps.LIBIPSEC_PLUGIN.is_file()
    if host.kernel_esp:
        assert host.backend == BACKEND_NETLINK
    elif host.libipsec_plugin:
        assert host.backend == BACKEND_LIBIPSEC
    else:
        assert host.backend == "" and "libcharon-extra-plugins" in " ".join(host.problems())
    if host.charon_path:
        assert Path(host.charon_path).name == "charon-systemd"
    else:
        assert "charon-systemd not found (Debian package charon-systemd)" in host.problems()
    if not host.nft_path:
        assert "nft not found (Debian package nftables)" in host.problems()
    assert host.is_root == (os.geteuid() == 0)


def test_probe_on_this_machine_kind() -> None:
    """Machines of this project's kind: no kernel ESP, strongSwan's userspace backend, everything installed."""
    host = caps.probe()
    if _kernel_config().get("CONFIG_INET_ESP", "n") != "n":
        pytest.skip("this kernel has ESP; the libipsec expectations do not apply")
    if reason := netns_unavailable("charon-systemd", "nft"):
        pytest.skip(reason)
    assert not host.kernel_esp and not host.kernel_ah and not host.ipcomp and not host.transport_mode
    assert host.backend == BACKEND_LIBIPSEC
    assert host.problems() == []
    assert host.charon_version.startswith("5.")
    proto = host.to_proto()
    assert proto.enforcer == "strongswan" and proto.enforces
    assert (proto.kernel_esp, proto.kernel_ah, proto.ipcomp, proto.transport_mode) == (False, False, False, False)
    assert list(proto.features) == ["ikev1", "ikev2", "libipsec", "esp-in-udp"]


def test_probe_leaves_the_hosts_sad_alone() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to read the XFRM state")
    before = subprocess.run(["ip", "xfrm", "state"], capture_output=True, text=True, check=False).stdout
    caps.probe(refresh=True)
    after = subprocess.run(["ip", "xfrm", "state"], capture_output=True, text=True, check=False).stdout
    assert "192.0.2.1" not in after and before == after


def test_problems_and_proto_when_nothing_is_there() -> None:
    host = caps.HostCapabilities(
        kernel_esp=False, kernel_ah=False, ipcomp=False, transport_mode=False,
        backend_reason="no kernel ESP (x) and no kernel-libipsec plugin (Debian package libcharon-extra-plugins)",
    )
    assert host.problems() == [
        "not root (charon and nft need root)",
        "charon-systemd not found (Debian package charon-systemd)",
        "no kernel ESP (x) and no kernel-libipsec plugin (Debian package libcharon-extra-plugins)",
        "nft not found (Debian package nftables)",
        "the Python package vici is not installed (pip install 'vici>=6.0')",
    ]
    proto = host.to_proto()
    assert proto.enforcer == "strongswan" and not proto.enforces and list(proto.features) == []
    netlink = caps.HostCapabilities(
        kernel_esp=True, kernel_ah=True, ipcomp=True, transport_mode=True, is_root=True,
        charon_path="/usr/sbin/charon-systemd", nft_path="/usr/sbin/nft", vici_importable=True,
        backend=BACKEND_NETLINK,
    )
    assert netlink.problems() == []
    proto = netlink.to_proto()
    assert proto.enforces and proto.kernel_esp and proto.kernel_ah and proto.ipcomp and proto.transport_mode
    assert list(proto.features) == ["ikev1", "ikev2", "kernel-netlink", "esp-in-udp"]


# --- strongswan.conf and start failures (no root needed) --------------------------------------------


def test_conf_libipsec_has_the_host_to_host_trio(tmp_path: Path) -> None:
    conf = render_conf(tmp_path, BACKEND_LIBIPSEC, (2, 1.0, 1.0))
    flat = re.sub(r"\s+", " ", conf)
    assert flat.startswith("# ") and "charon-systemd { load_modular = yes install_virtual_ip = no" in flat
    assert "retransmit_tries = 2 retransmit_timeout = 1.0 retransmit_base = 1.0" in flat
    assert "include /etc/strongswan.d/charon/*.conf" in flat
    assert f"vici {{ load = yes socket = unix://{tmp_path}/charon.vici }}" in flat
    assert "kernel-libipsec { load = yes allow_peer_ts = yes }" in flat
    assert "kernel-netlink { fwmark = !0x42 }" in flat and "socket-default { fwmark = 0x42 }" in flat
    assert "stroke { load = no }" in flat  # no /var/run/charon.ctl shared with a system strongSwan
    assert f"main {{ path = {tmp_path}/charon.log" in flat and "trace {" not in flat
    # the include comes first, so our plugin settings override the packaged defaults
    assert flat.index("include") < flat.index("kernel-libipsec")


def test_conf_netlink_and_trace_levels(tmp_path: Path) -> None:
    conf = render_conf(tmp_path, BACKEND_NETLINK, (3, 0.5, 1.5), trace_path=tmp_path / "ike.trace")
    flat = re.sub(r"\s+", " ", conf)
    assert "kernel-libipsec { load = no }" in flat and "fwmark" not in flat
    assert "retransmit_tries = 3 retransmit_timeout = 0.5 retransmit_base = 1.5" in flat
    assert f"trace {{ path = {tmp_path}/ike.trace" in flat
    # no log file ever gets raw dumps (3) or key material (4)
    levels = [int(v) for v in re.findall(r"\b(?:default|ike|cfg|knl|net|enc|chd|esp) = (-?\d+)", conf)]
    assert levels and max(levels) <= MAX_LOG_LEVEL
    assert "ike = 2" in conf and "enc = 0" in conf


def test_unknown_backend_and_missing_daemon(tmp_path: Path) -> None:
    with pytest.raises(CharonError, match="unknown IPsec backend"):
        Charon(tmp_path, backend="xfrm-magic")
    with pytest.raises(CharonError, match="charon-systemd exited with status 1 while starting"):
        Charon(tmp_path / "false", backend=BACKEND_LIBIPSEC, charon_path="/bin/false").start()


def test_start_times_out_with_the_daemons_output(tmp_path: Path) -> None:
    fake = tmp_path / "fake-charon"
    fake.write_text("#!/bin/sh\necho \"fake charon conf=$STRONGSWAN_CONF\"\nexec sleep 30\n")
    fake.chmod(0o755)
    c = Charon(tmp_path / "run", backend=BACKEND_LIBIPSEC, charon_path=str(fake))
    t0 = time.monotonic()
    with pytest.raises(CharonError) as info:
        c.start(timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert "did not answer" in str(info.value)
    assert f"fake charon conf={tmp_path}/run/strongswan.conf" in str(info.value)
    assert not c.alive() and not (tmp_path / "run" / "charon.pid").exists()


# --- real charon-systemd in namespaces --------------------------------------------------------------


def _skip_reason() -> str | None:
    reason = netns_unavailable("charon-systemd", "tcpdump", "tshark", "ping")
    if reason:
        return reason
    problems = caps.probe().problems()
    return "; ".join(problems) if problems else None


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    if reason := _skip_reason():
        pytest.skip(reason)
    with two_hosts(tmp_path_factory.mktemp("lan")) as lan:  # captures go to pytest's temp dir, not /tmp
        yield lan


class Daemons:
    """Charons started by one test; all stopped (before the namespaces go) when it ends."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Charon] = []

    def start(self, host: Host, name: str = "") -> Charon:
        c = Charon(self.base / (name or host.name), backend=caps.probe().backend, netns=host.netns)
        self.started.append(c)
        c.start()
        return c

    def stop_all(self) -> None:
        for c in self.started:
            c.stop()


@pytest.fixture
def daemons(lan: Lan, tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.stop_all()


def _h2h_conn(me: Host, peer: Host) -> dict[str, object]:
    """IKEv1 main mode, PSK, host-to-host tunnel between the two addresses (ESP-in-UDP under libipsec)."""
    return {
        "h2h": {
            "version": "1",
            "aggressive": "no",
            "local_addrs": [me.ip],
            "remote_addrs": [peer.ip],
            "proposals": ["aes128-sha256-modp2048"],
            "encap": "yes",
            "local-1": {"auth": "psk", "id": me.ip},
            "remote-1": {"auth": "psk", "id": peer.ip},
            "children": {
                "h2h": {
                    "mode": "tunnel",
                    "local_ts": [f"{me.ip}/32"],
                    "remote_ts": [f"{peer.ip}/32"],
                    "esp_proposals": ["aes128-sha256"],
                    "start_action": "none",
                }
            },
        }
    }


def test_ikev1_host_to_host_over_vici(lan: Lan, daemons: Daemons) -> None:
    a, b = lan.hosts["a"], lan.hosts["b"]
    ca, cb = daemons.start(a), daemons.start(b)
    assert ca.version()["daemon"] == "charon-systemd"
    for c, me, peer in ((ca, a, b), (cb, b, a)):
        with c.session() as s:
            s.load_conn(_h2h_conn(me, peer))
            s.load_shared({"id": "psk-h2h", "type": "IKE", "data": PSK, "owners": [a.ip, b.ip]})
    with b.capture() as pcap:
        with ca.session() as s:
            logs = [m.get("msg", b"").decode() for m in s.initiate({"child": "h2h", "timeout": 5000})]
        assert any("CHILD_SA h2h{" in line and "established" in line for line in logs), logs
        assert a.ping(b.ip, count=2), "a -> b over the SA"
        assert b.ping(a.ip, count=2), "b -> a over the SA"
    with cb.session() as s:
        sas = list(s.list_sas())
    child = next(iter(sas[0]["h2h"]["child-sas"].values()))
    assert child["state"] == b"INSTALLED" and child["mode"] == b"TUNNEL" and child["encap"] == b"yes"
    # both directions crossed the SA (a first packet may be lost while ARP resolves, so not exactly 4 each)
    assert int(child["packets-in"]) >= 2 and int(child["packets-out"]) >= 2
    esp = tshark_lines(pcap, "esp")
    assert esp, tshark_lines(pcap)
    assert all("4500" in line for line in tshark_lines(pcap, "esp", fields=["udp.srcport", "udp.dstport"]))
    assert tshark_lines(pcap, "icmp") == [], "ICMP in clear on b's wire"
    assert PSK not in ca.log_path.read_text()


def test_watch_reports_a_crash_and_restart_brings_vici_back(lan: Lan, daemons: Daemons) -> None:
    c = daemons.start(lan.hosts["a"])
    exits: list[int] = []
    fired = threading.Event()

    def on_exit(rc: int) -> None:
        exits.append(rc)
        fired.set()

    c.watch(on_exit)
    old = c.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert fired.wait(5), "watch callback did not fire"
    assert exits == [-signal.SIGKILL] and not c.alive()
    fired.clear()
    c.restart()
    assert c.alive() and c.pid != old
    assert c.vici_path.is_socket() and c.version()["version"].startswith("5.")
    assert Path(c.pid_path).read_text().strip() == str(c.pid)
    # the watch carries over to the new daemon, and a deliberate stop is no crash
    c.stop()
    assert not fired.wait(0.5) and exits == [-signal.SIGKILL]


def test_ike_trace_on_and_off_without_restart(lan: Lan, daemons: Daemons, tmp_path: Path) -> None:
    a = lan.hosts["a"]
    c = daemons.start(a)
    pid = c.pid
    trace = tmp_path / "trace" / "ike.log"

    def activity(name: str) -> None:
        with c.session() as s:  # config-level activity that the trace logs at level 1-2
            s.load_conn({name: {"version": "1", "local_addrs": [a.ip], "remote_addrs": ["192.0.2.9"],
                                "local-1": {"auth": "psk"}, "remote-1": {"auth": "psk"},
                                "children": {name: {"mode": "tunnel", "start_action": "none"}}}})
            s.unload_conn({"name": name})

    c.set_ike_trace(trace)
    assert c.ike_trace == trace
    activity("traced")
    text = trace.read_text()
    assert "added vici connection: traced" in text
    c.set_ike_trace(None)
    size = trace.stat().st_size
    activity("untraced")
    time.sleep(0.2)
    assert trace.stat().st_size == size, "trace file still growing after set_ike_trace(None)"
    assert "untraced" in c.log_path.read_text()  # the main log carries on
    assert c.pid == pid and c.alive()
    assert "trace {" not in c.conf_path.read_text()


def test_stop_leaves_no_daemon_and_no_socket(lan: Lan, daemons: Daemons) -> None:
    c = daemons.start(lan.hosts["a"])
    pid = c.pid
    assert pid is not None and c.vici_path.is_socket()
    c.stop()
    assert not c.alive() and c.pid is None
    assert not Path(f"/proc/{pid}").exists()
    assert not c.vici_path.exists() and not c.pid_path.exists()
    c.stop()  # idempotent


def test_start_ends_a_charon_left_by_an_earlier_agent(lan: Lan, daemons: Daemons) -> None:
    first = daemons.start(lan.hosts["a"], "shared")
    old = first.pid
    assert old is not None
    # a new agent process on the same run_dir: it knows the old daemon only by the pid file
    second = daemons.start(lan.hosts["a"], "shared")
    assert second.pid != old and second.alive()
    assert first._proc is not None and first._proc.wait(5) is not None  # reap our zombie
    assert not Path(f"/proc/{old}").exists()
    assert second.version()["daemon"] == "charon-systemd"


def test_the_systems_charon_is_used_over_its_socket_without_supervising_it(
    lan: Lan, daemons: Daemons, tmp_path: Path
) -> None:
    """`--charon-vici`: ExternalCharon talks to a charon it did not start, notices when it goes away,
    waits for it to come back, and refuses to reconfigure its logging."""
    from policyagent.agent.enforce.charon import ExternalCharon

    system = daemons.start(lan.hosts["a"], "system")  # stands in for the distribution's charon
    ext = ExternalCharon(system.vici_path, tmp_path / "agent-charon")
    ext.start(timeout=5)
    assert ext.alive() and ext.version()["daemon"] == "charon-systemd" and ext.pid is None
    gone = threading.Event()
    ext.watch(lambda code: gone.set())
    ext.stop()  # the agent stopping leaves the system's charon running
    assert system.alive()
    ext.watch(lambda code: gone.set())
    os.kill(system.pid or 0, signal.SIGKILL)
    assert gone.wait(10), "the watch did not notice the system charon went away"
    with pytest.raises(CharonError, match="does not answer"):
        ext.restart(timeout=0.5)
    system.restart()
    ext.restart(timeout=10)
    assert ext.alive()
    with pytest.raises(CharonError, match=r"strongswan\.conf"):
        ext.set_ike_trace(tmp_path / "trace.log")
    ext.stop()


def test_kernel_netlink_backend_reaches_quick_mode_and_reports_what_this_kernel_lacks(
    lan: Lan, tmp_path: Path
) -> None:
    """On hosts with kernel ESP the agent runs charon with kernel-netlink and compiles transport mode.
    This kernel has XFRM but no ESP: the whole IKEv1 negotiation (main mode + quick mode for transport
    mode, from compile()'s own output) completes, and installing the SA is what fails — the part only a
    full kernel exercises."""
    from policyagent.agent.enforce.compile import NETLINK, CompileInput, HostAddresses, Platform, compile_policy
    from policyagent.pb import dist_pb, pb

    a, b = lan.hosts["a"], lan.hosts["b"]
    charons = {}
    try:
        for me, peer in ((a, b), (b, a)):
            policy = dist_pb.EffectivePolicy(source="domain", membership="domain", version="v")
            policy.policy.name = "netlink"
            policy.policy.isakmp.methods.add(
                encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256, dh_group=pb.DH_GROUP_MODP2048
            )
            fl = policy.filter_lists.add(id="fl", name="peer")
            fl.filters.add(
                id="f", mirrored=True, source=pb.Address(kind=pb.ADDRESS_KIND_ME),
                destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=peer.ip),
            )
            policy.filter_actions.add(
                id="fa", name="neg", action=pb.ACTION_TYPE_NEGOTIATE,
                methods=[pb.QuickModeMethod(esp=pb.EspTransform(encryption=pb.CIPHER_AES128, integrity=pb.INTEGRITY_SHA256))],
            )
            rule = policy.policy.rules.add(id="r1", filter_list_id="fl", filter_action_id="fa", active=True)
            rule.auth_methods.add(preshared_key=pb.PresharedKeyAuth(key=PSK))
            desired = compile_policy(
                CompileInput(policy=policy, host=HostAddresses(addresses=(me.ip,)), platform=Platform(backend=NETLINK))
            )
            assert desired.problems == ()
            (conn,) = desired.connections
            assert next(iter(conn.body["children"].values()))["mode"] == "transport" and "encap" not in conn.body
            c = Charon(tmp_path / me.name, backend=BACKEND_NETLINK, netns=me.netns)
            c.start()
            charons[me.name] = c
            with c.session() as s:
                s.load_conn({conn.name: conn.body})
                (secret,) = desired.secrets
                s.load_shared({"id": secret.name, "type": "IKE", "data": secret.data, "owners": list(secret.owners)})
        child = next(iter(conn.body["children"]))  # same names on both sides: compiled from the same rule
        with charons["b"].session(timeout=15) as s, pytest.raises(CommandException):
            list(s.initiate({"child": child, "timeout": 10000}))
        log = charons["b"].log_path.read_text() + charons["a"].log_path.read_text()
        assert "established between" in log, "main mode did not complete"
        assert "selected proposal: ESP:AES_CBC_128/HMAC_SHA2_256_128" in log, "quick mode did not agree"
        assert "unable to install" in log and "SAD" in log, "expected the kernel to refuse the SA"
    finally:
        for c in charons.values():
            c.stop()
