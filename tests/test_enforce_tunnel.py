"""Tunnel rules on the wire: two tunnel rules to the same gateway for two remote networks give two SAs,
each with its own keys and SPIs (strongSwan, kernel-libipsec: ESP in UDP 4500, tunnel mode).

Its own site (test_enforce_netns.Site on a LAN and subnet of its own, so it runs side by side with the
other enforcement modules). The "networks" are extra addresses on each host's loopback, routed over
the LAN:

    a: 10.1.1.1/32 on lo (network 10.1.1.0/24)       route 10.2.0.0/16 via b
    b: 10.2.1.1/32, 10.2.2.1/32 on lo (10.2.1.0/24, 10.2.2.0/24)   route 10.1.1.0/24 via a

Policies are made with netsh (pre-shared key). "Tunnel A" (a's OU): 10.1.1.0/24 → 10.2.1.0/24 and
10.1.1.0/24 → 10.2.2.0/24 with tunnel endpoint b, and the inbound halves 10.2.1.0/24 → 10.1.1.0/24,
10.2.2.0/24 → 10.1.1.0/24 with tunnel endpoint a (Windows needs one rule per direction; the filters are
not mirrored); "Tunnel B" (b's OU) is the mirror image. Every rule negotiates with the same filter action.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import start_server_process
from netns import Host, tshark_lines
from test_enforce_netns import (
    OU_A,
    OU_B,
    PSK,
    TCP_SERVER,
    Site,
    cli,
    netsh,
    wait_until,
)
from test_enforce_netns import pytestmark as _netns_marks

from policyagent.pb import agent_pb

pytestmark = _netns_marks  # slow; skipped where strongSwan enforcement cannot run

NET_A = "10.1.1.0/24"
NET_B1 = "10.2.1.0/24"
NET_B2 = "10.2.2.0/24"
A_NET_IP = "10.1.1.1"
B1_IP = "10.2.1.1"
B2_IP = "10.2.2.1"
TUNNEL_A = "Tunnel A"
TUNNEL_B = "Tunnel B"
ACTION = "Tunnel: negotiate"
PORT = 5001
MARKER = "tunnel-secret-payload"

# A TCP transfer from a bound source address: MARKER + filler out, the server's echo back.
TCP_BOUND_CLIENT = r"""
import socket, sys
src, dst, port, size, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
payload = (sys.argv[6] + "-" + "x" * size).encode() + b"\n"
try:
    c = socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0))
    c.settimeout(timeout)
    c.sendall(payload)
    data = b""
    while True:
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    print("OK" if data == b"echo:" + payload else "SHORT", len(data))
except OSError as e:
    print("FAIL", type(e).__name__, e)
"""


def _filters(src: str, dst: str) -> str:
    net, _, bits = src.partition("/")
    dnet, _, dbits = dst.partition("/")
    return f"srcaddr={net} srcmask={bits} dstaddr={dnet} dstmask={dbits} mirrored=no"


class TunnelSite(Site):
    """test_enforce_netns.Site on a subnet of its own, with the tunnel policies instead of the defaults and
    the hosts' networks on their loopbacks."""

    def networks(self) -> None:
        a, b = self.a, self.b
        a.add_address(f"{A_NET_IP}/32")
        b.add_address(f"{B1_IP}/32")
        b.add_address(f"{B2_IP}/32")
        a.run(["ip", "route", "replace", "10.2.0.0/16", "via", b.ip])
        b.run(["ip", "route", "replace", NET_A, "via", a.ip])

    def start_server(self) -> None:
        self.server = start_server_process(self.base / "data", listen=f"{self.root_ip}:0", log_dir=self.base)
        a, b = self.a, self.b
        static = [
            f'add filteraction name="{ACTION}" action=negotiate qmsecmethods="ESP[AES128,SHA256] ESP[3DES,SHA1]"',
        ]
        lists: dict[tuple[str, str], str] = {}
        for src, dst in ((NET_A, NET_B1), (NET_A, NET_B2), (NET_B1, NET_A), (NET_B2, NET_A)):
            name = f"Tunnel: {src} to {dst}"
            lists[(src, dst)] = name
            static += [f'add filterlist name="{name}"', f'add filter filterlist="{name}" {_filters(src, dst)}']
        # (policy, its rules: (filter list, tunnel endpoint)); each side's outbound rules first
        for policy, rules in (
            (TUNNEL_A, [((NET_A, NET_B1), b.ip), ((NET_A, NET_B2), b.ip), ((NET_B1, NET_A), a.ip), ((NET_B2, NET_A), a.ip)]),
            (TUNNEL_B, [((NET_B1, NET_A), a.ip), ((NET_B2, NET_A), a.ip), ((NET_A, NET_B1), b.ip), ((NET_A, NET_B2), b.ip)]),
        ):
            static.append(f'add policy name="{policy}" activatedefaultrule=no')
            for n, (pair, endpoint) in enumerate(rules, start=1):
                static.append(
                    f'add rule name="{policy} {n}" policy="{policy}" filterlist="{lists[pair]}" '
                    f'filteraction="{ACTION}" tunnel={endpoint} psk="{PSK}"'
                )
        for line in static:
            netsh(self.address, f"ipsec static {line}")
        for ou in (OU_A, OU_B):
            cli("ou", "add", ou, "-r", self.address)
        cli("gpo", "add", "GPO-A", "--policy", TUNNEL_A, "-r", self.address)
        cli("gpo", "add", "GPO-B", "--policy", TUNNEL_B, "-r", self.address)
        cli("gpo", "link", "GPO-A", f"ou:{OU_A}", "-r", self.address)
        cli("gpo", "link", "GPO-B", f"ou:{OU_B}", "-r", self.address)

    def vici_sas(self, host: Host) -> list[dict[str, Any]]:
        from policyagent.agent.enforce.charon import ViciSession

        with ViciSession(self.charon_vici(host), 5.0) as session:
            return list(session.list_sas())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[TunnelSite]:
    s = TunnelSite(tmp_path_factory.mktemp("tunnel"))
    failed = request.session.testsfailed
    try:
        s.networks()
        s.bring_up()
        s.b.popen([sys.executable, "-c", TCP_SERVER, str(PORT)], stdout=subprocess.DEVNULL)
        s.wait_listening(s.b, PORT)
        yield s
        if request.session.testsfailed > failed:
            s.dump_logs(8000)
    except BaseException:
        s.dump_logs(8000)
        raise
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- helpers


def ping_from(host: Host, src: str, dst: str, count: int = 1, wait: float = 1.0) -> bool:
    out = host.run(
        ["ping", "-n", "-q", "-I", src, "-c", str(count), "-i", "0.2", "-W", str(wait), dst], check=False,
        timeout=count * (0.2 + wait) + 5,
    )
    return out.returncode == 0


def until_ping(host: Host, src: str, dst: str, timeout: float = 8.0) -> None:
    """`src` → `dst` answers (the first packets are dropped while the agent negotiates)."""

    def answered() -> None:
        assert ping_from(host, src, dst, wait=0.5), f"no answer from {dst}"

    wait_until(answered, f"ping -I {src} {dst}", timeout)


def tcp_bound(host: Host, src: str, dst: str, size: int, timeout: float = 10.0) -> str:
    out = host.run(
        [sys.executable, "-c", TCP_BOUND_CLIENT, src, dst, str(PORT), str(size), str(timeout), MARKER],
        check=False, timeout=timeout + 10,
    )
    return out.stdout.strip()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(_text(v) for v in (value or []))


def installed_children(site: TunnelSite, host: Host, peer: str) -> list[dict[str, Any]]:
    """`host`'s INSTALLED CHILD_SAs with `peer`: local/remote TS, SPIs, the IKE SA's name and SPIs."""
    out = []
    for entry in site.vici_sas(host):
        for ike_name, ike in entry.items():
            if _text(ike.get("remote-host")) != peer:
                continue
            for child in (ike.get("child-sas") or {}).values():
                if _text(child.get("state")) != "INSTALLED":
                    continue
                out.append(
                    {
                        "ike": str(ike_name),
                        "ike_spis": (_text(ike.get("initiator-spi")), _text(ike.get("responder-spi"))),
                        "local_ts": _texts(child.get("local-ts")),
                        "remote_ts": _texts(child.get("remote-ts")),
                        "spi_in": _text(child.get("spi-in")),
                        "spi_out": _text(child.get("spi-out")),
                        "encap": _text(child.get("encap")),
                        "mode": _text(child.get("mode")),
                    }
                )
    return out


def by_ts(children: list[dict[str, Any]]) -> dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, Any]]:
    return {(c["local_ts"], c["remote_ts"]): c for c in children}


# ---------------------------------------------------------------------------------------------- tests


def test_two_tunnel_rules_to_one_gateway_give_two_sas_with_their_own_spis(site: TunnelSite) -> None:
    a, b = site.a, site.b
    with b.capture(f"udp port 4500 or udp port 500 or icmp or tcp port {PORT}") as pcap:
        until_ping(a, A_NET_IP, B1_IP)
        until_ping(a, A_NET_IP, B2_IP)
        assert ping_from(a, A_NET_IP, B1_IP, count=3), "the 10.2.1.0/24 tunnel stopped answering"
        assert ping_from(a, A_NET_IP, B2_IP, count=3), "the 10.2.2.0/24 tunnel stopped answering"
        for dst in (B1_IP, B2_IP):
            out = tcp_bound(a, A_NET_IP, dst, 200_000)
            assert out.startswith("OK"), f"TCP {A_NET_IP} → {dst}:{PORT}: {out}"

    # b's charon: two CHILD_SAs with a, one per remote network, each with its own SPIs.
    children = wait_until(lambda: _two(installed_children(site, b, a.ip)), "b lists two CHILD_SAs with a", 5)
    tunnels = by_ts(children)
    one, two = tunnels[((NET_B1,), (NET_A,))], tunnels[((NET_B2,), (NET_A,))]
    for child in (one, two):
        assert child["mode"] == "TUNNEL" and child["encap"] == "yes", child
    spis = [one["spi_in"], one["spi_out"], two["spi_in"], two["spi_out"]]
    assert all(spis) and len(set(spis)) == 4, f"the two tunnels share SPIs: {spis}"
    # a's view is the mirror image, with the same SPIs the other way round.
    mirror = by_ts(installed_children(site, a, b.ip))
    for (local, remote), child in ((((NET_A,), (NET_B1,)), one), (((NET_A,), (NET_B2,)), two)):
        theirs = mirror.get((local, remote))
        assert theirs is not None, f"a has no CHILD_SA {local} === {remote}: {sorted(mirror)}"
        assert (theirs["spi_in"], theirs["spi_out"]) == (child["spi_out"], child["spi_in"]), (theirs, child)

    # The wire: ESP in UDP 4500 under exactly those SPIs, nothing of the networks' traffic in clear.
    wire_spis = {
        int(line.strip(), 16) for line in tshark_lines(pcap, "esp", fields=["esp.spi"]) if line.strip()
    }
    assert {int(s, 16) for s in spis} <= wire_spis, f"SPIs on the wire {sorted(map(hex, wire_spis))}, SAs {spis}"
    clear = tshark_lines(
        pcap, f'(not esp and (ip.addr == {NET_A} or ip.addr == 10.2.0.0/16)) or frame contains "{MARKER}"'
    )
    assert clear == [], f"tunnelled traffic in clear on b's wire: {clear[:10]}"
    assert not tshark_lines(pcap, "esp and not udp.port == 4500"), "ESP outside UDP 4500"

    # The agent's own view (AgentLocal) on b: the same two quick-mode SAs, encapsulated, with traffic.
    sas = site.local(b).ListSecurityAssociations(agent_pb.SecurityAssociationsRequest(), timeout=10)
    qm = {(tuple(q.local_ts), tuple(q.remote_ts)): q for q in sas.quick_mode if q.remote_address == a.ip}
    for (local, remote), child in ((((NET_B1,), (NET_A,)), one), (((NET_B2,), (NET_A,)), two)):
        q = qm.get((local, remote))
        assert q is not None, f"the agent lists no quick-mode SA {local} === {remote}: {sorted(qm)}"
        assert q.encapsulated and q.protocol == "ESP", q
        assert (q.spi_in, q.spi_out) == (child["spi_in"], child["spi_out"]), (q, child)
        assert q.packets_in > 0 and q.packets_out > 0, q
    assert any(m.remote_address == a.ip and m.state == "ESTABLISHED" for m in sas.main_mode), sas.main_mode


def _two(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert len(by_ts(children)) >= 2, f"CHILD_SAs so far: {[(c['local_ts'], c['remote_ts']) for c in children]}"
    return children


def test_traffic_between_the_hosts_own_addresses_is_not_tunnelled(site: TunnelSite) -> None:
    a, b = site.a, site.b
    before = {(c["spi_in"], c["spi_out"]) for c in installed_children(site, b, a.ip)}
    with b.capture(f"udp port 4500 or udp port 500 or icmp or tcp port {PORT}") as pcap:
        assert a.ping(b.ip, count=3), "a → b (LAN addresses) should work in clear"
        assert b.ping(a.ip, count=2), "b → a (LAN addresses) should work in clear"
        out = tcp_bound(a, a.ip, b.ip, 1_000)
        assert out.startswith("OK"), out
    icmp = tshark_lines(pcap, f"icmp and ip.src == {a.ip} and ip.dst == {b.ip}")
    assert len(icmp) >= 3, f"a's pings to b should cross the wire in clear: {icmp}"
    assert tshark_lines(pcap, f'frame contains "{MARKER}"'), "LAN-address TCP should travel in clear"
    assert not tshark_lines(pcap, "isakmp"), "traffic no filter covers must not negotiate"
    after = {(c["spi_in"], c["spi_out"]) for c in installed_children(site, b, a.ip)}
    assert after <= before, f"new SAs for LAN traffic: {after - before}"


# A UDP datagram with any source address, written straight onto a link (AF_PACKET: no routing, no filter
# table on the way out) to a given MAC address.
FORGE = r"""
import socket, struct, sys
iface, mac, src, dst, port, payload = sys.argv[1:7]
def csum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
body = payload.encode()
udp = struct.pack("!HHHH", 40000, int(port), 8 + len(body), 0) + body
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
s.send(bytes.fromhex(mac.replace(":", "")) + s.getsockname()[4] + b"\x08\x00" + hdr + udp)
"""

# Every UDP datagram to `port` (any local address) for `seconds`, one line each.
UDP_SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        print(s.recv(200).decode(errors="replace"), flush=True)
    except TimeoutError:
        break
"""


def test_the_inbound_rule_refuses_a_remote_network_in_clear(site: TunnelSite) -> None:
    """The rule whose tunnel endpoint is b (10.1.1.0/24 → 10.2.1.0/24) has b accept that traffic only
    protected: a clear datagram 10.1.1.1 → 10.2.1.1 is dropped (and counted on that entry), while the same
    forged source to b's own LAN address, which no filter covers, is delivered."""
    b = site.b
    udp_port = 5003
    sink = b.popen([sys.executable, "-c", UDP_SINK, str(udp_port), "4"], stdout=subprocess.PIPE)
    assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
    stub = site.local(b)

    def inbound_packets() -> int:
        filters = stub.ListFilters(agent_pb.FiltersRequest(), timeout=10).filters
        entries = [f for f in filters if list(f.source) == [NET_A] and list(f.destination) == [NET_B1]]
        assert entries and all(f.verdict == "negotiate" for f in entries), entries
        return sum(f.packets for f in entries)

    before = inbound_packets()
    b_mac = json.loads(b.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"]
    with b.capture(f"udp port {udp_port}") as pcap:
        for dst, payload in ((b.ip, "clear-to-lan-address"), (B1_IP, "clear-into-tunnel")):
            subprocess.run(
                [sys.executable, "-c", FORGE, site.lan.root_veth, b_mac, A_NET_IP, dst, str(udp_port), payload],
                check=True, timeout=10,
            )
        out, _ = sink.communicate(timeout=10)
    assert len(tshark_lines(pcap, "udp")) == 2, "the forged datagrams never reached b's wire"
    received = out.decode().split()
    assert "clear-to-lan-address" in received, f"the control datagram was not delivered: {received}"
    assert "clear-into-tunnel" not in received, "b accepted clear traffic that its inbound tunnel rule requires protected"
    assert inbound_packets() >= before + 1, "the drop was not counted on the inbound tunnel entry"


def test_changing_one_tunnel_rule_leaves_the_other_tunnel_to_that_gateway_up(site: TunnelSite) -> None:
    """Both rules are children of one connection to b: an edit of one closes only its own SA."""
    a, b = site.a, site.b
    until_ping(a, A_NET_IP, B1_IP)
    until_ping(a, A_NET_IP, B2_IP)
    before = by_ts(installed_children(site, a, b.ip))
    first = before[((NET_A,), (NET_B1,))]
    version = site.fleet()["a"].applied_version
    netsh(site.address, f'ipsec static set rule name="{TUNNEL_A} 2" policy="{TUNNEL_A}" activate=no')
    edited = site.wait_applied("a", not_version=version)
    try:
        after = by_ts(installed_children(site, a, b.ip))
        kept = after.get(((NET_A,), (NET_B1,)))
        assert kept is not None, after
        assert (kept["spi_in"], kept["spi_out"], kept["ike_spis"]) == (
            first["spi_in"], first["spi_out"], first["ike_spis"]
        ), "the unrelated tunnel's SA was replaced"
        assert ((NET_A,), (NET_B2,)) not in after, "the deactivated rule's SA is still up"
        assert ping_from(a, A_NET_IP, B1_IP, count=2)
    finally:
        netsh(site.address, f'ipsec static set rule name="{TUNNEL_A} 2" policy="{TUNNEL_A}" activate=yes')
        site.wait_applied("a", not_version=edited)
