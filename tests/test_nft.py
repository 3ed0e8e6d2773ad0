"""The nftables filter table (agent/enforce/nft.py) and the NFLOG listener (agent/enforce/nflog.py).

Pure render tests check the exact lines that matter; namespace tests (two hosts a, b on a LAN, no
strongSwan) load the rendered tables and check traffic, counters and NFLOG records.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from netns import Host, Lan, netns_unavailable, two_hosts

from policyagent.agent.enforce import nft
from policyagent.agent.enforce.desired import BLOCK, NEGOTIATE, PERMIT, Exemption, FilterEntry, Selector
from policyagent.agent.enforce.nflog import NFULA_PAYLOAD, NFULA_PREFIX, parse_packet_message

IKE = Exemption("IKE", proto=17, port=500)


def entry(index: int, selector: Selector, verdict: str, **kw: object) -> FilterEntry:
    return FilterEntry(index, f"id{index}", f"entry {index}", selector, verdict, 100 - index, **kw)  # type: ignore[arg-type]


def chain(script: str, name: str) -> list[str]:
    """The rule lines of one chain (no comments, no chain header)."""
    lines = script.splitlines()
    start = lines.index(f"\tchain {name} {{")
    out = []
    for line in lines[start + 2 :]:
        if line == "\t}":
            break
        if not line.strip().startswith("#"):
            out.append(line.strip())
    return out


def entry_rules(script: str, name: str, index: int) -> list[str]:
    return [r for r in chain(script, name) if r.endswith(f'comment "pa:{index}"')]


# ---------------------------------------------------------------------------------------------- render


def test_render_skeleton_and_order() -> None:
    entries = [
        entry(0, Selector(dst=("10.1.0.5/32",), proto=1), PERMIT),
        entry(1, Selector(), BLOCK),
    ]
    script = nft.render(entries, [IKE, Exemption("policy server", 6, 0, "10.9.0.0/16")], soft_timeout_s=60)
    assert script.startswith("table inet policyagent {\n")
    assert "\tset soft4 { type ipv4_addr; flags timeout; timeout 60s; }" in script
    assert "\tset soft6 { type ipv6_addr; flags timeout; timeout 60s; }" in script
    for name, lo, peer in (("input", 'iif "lo"', "saddr"), ("output", 'oif "lo"', "daddr")):
        assert f"\t\ttype filter hook {name} priority 0; policy accept;" in script
        rules = chain(script, name)
        assert rules[0] == f"{lo} accept"
        assert rules[1:4] == [
            'meta l4proto udp th sport 500 accept comment "pa-ex:0"',
            'meta l4proto udp th dport 500 accept comment "pa-ex:0"',
            f'ip {peer} 10.9.0.0/16 meta l4proto tcp accept comment "pa-ex:1"',
        ]
        assert rules[4].startswith("icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, ")
        assert rules[5:] == [
            'ip daddr 10.1.0.5 meta l4proto icmp counter accept comment "pa:0"',
            'counter drop comment "pa:1"',
        ]


def test_render_families() -> None:
    sel_mixed = Selector(src=("10.0.0.1/32", "fd00::1/128"), dst=())
    sel_v6 = Selector(src=(), dst=("fd00::/64",))
    sel_none = Selector(src=("10.0.0.0/8",), dst=("fd00::/64",))
    sel_sets = Selector(src=("10.0.0.1/32", "10.0.0.0/24", "10.0.1.0/24"), dst=("10.2.0.0/16", "fd01::/64"))
    script = nft.render(
        [
            entry(0, sel_mixed, BLOCK),
            entry(1, sel_v6, PERMIT),
            entry(2, sel_none, BLOCK),
            entry(3, sel_sets, PERMIT),
        ],
        [],
    )
    for name in ("input", "output"):
        assert entry_rules(script, name, 0) == [
            'ip saddr 10.0.0.1 counter drop comment "pa:0"',
            'ip6 saddr fd00::1 counter drop comment "pa:0"',
        ]
        assert entry_rules(script, name, 1) == ['ip6 daddr fd00::/64 counter accept comment "pa:1"']
        assert entry_rules(script, name, 2) == []
        # overlapping CIDRs are merged; the v6 destination alone cannot pair with a v4-only source
        assert entry_rules(script, name, 3) == [
            'ip saddr 10.0.0.0/23 ip daddr 10.2.0.0/16 counter accept comment "pa:3"'
        ]
    assert "# entry 2 block: entry 2 (matches no packet" in script
    several = nft.render([entry(0, Selector(src=("10.0.0.1/32", "10.0.0.9/32")), PERMIT)], [])
    assert entry_rules(several, "input", 0) == ['ip saddr { 10.0.0.1, 10.0.0.9 } counter accept comment "pa:0"']


def test_render_ports_and_protocols() -> None:
    script = nft.render(
        [
            entry(0, Selector(proto=6, sport=1024, dport=22), PERMIT),
            entry(1, Selector(dport=53), PERMIT),
            entry(2, Selector(proto=50), BLOCK),
            entry(3, Selector(proto=17, sport=68), PERMIT),
        ],
        [Exemption("kerberos", 0, 88)],
    )
    rules = chain(script, "output")
    assert 'meta l4proto tcp th sport 1024 th dport 22 counter accept comment "pa:0"' in rules
    assert 'meta l4proto { tcp, udp } th dport 53 counter accept comment "pa:1"' in rules
    assert 'meta l4proto 50 counter drop comment "pa:2"' in rules
    assert 'meta l4proto udp th sport 68 counter accept comment "pa:3"' in rules
    assert 'meta l4proto { tcp, udp } th sport 88 accept comment "pa-ex:0"' in rules
    assert 'meta l4proto { tcp, udp } th dport 88 accept comment "pa-ex:0"' in rules
    with pytest.raises(ValueError, match="ports given for protocol 1"):
        nft.render([entry(0, Selector(proto=1, dport=5), PERMIT)], [])
    with pytest.raises(ValueError, match="invalid address"):
        nft.render([entry(0, Selector(src=('10.0.0.1"; flush ruleset; "',)), PERMIT)], [])
    with pytest.raises(ValueError, match="interface"):
        nft.render([], [], tun='ipsec0" accept')
    with pytest.raises(ValueError, match="table"):
        nft.render([], [], table="x y")


AB = Selector(src=("10.1.0.1/32",), dst=("10.1.0.2/32",))
M = "ip saddr 10.1.0.1 ip daddr 10.1.0.2"


def test_render_negotiate_plain() -> None:
    script = nft.render([entry(4, AB, NEGOTIATE)], [], log_group=9)
    assert entry_rules(script, "output", 4) == [
        f'{M} oifname "ipsec0" counter accept comment "pa:4"',
        f'{M} log prefix "pa-acq:4 " group 9 counter drop comment "pa:4"',
    ]
    assert entry_rules(script, "input", 4) == [
        f'{M} iifname "ipsec0" counter accept comment "pa:4"',
        f'{M} limit rate 10/second log prefix "pa-drop:4 " group 9 comment "pa:4"',
        f'{M} counter drop comment "pa:4"',
    ]


def test_render_negotiate_passthrough_and_fallback() -> None:
    script = nft.render(
        [
            entry(0, AB, NEGOTIATE, inbound_passthrough=True),
            entry(1, AB, NEGOTIATE, fallback_to_clear=True),
            entry(2, Selector(proto=6), NEGOTIATE, fallback_to_clear=True, inbound_passthrough=True),
        ],
        [],
    )
    assert entry_rules(script, "input", 0) == [
        f'{M} iifname "ipsec0" counter accept comment "pa:0"',
        f'{M} counter accept comment "pa:0"',
    ]
    assert entry_rules(script, "output", 0) == [  # passthrough is inbound only
        f'{M} oifname "ipsec0" counter accept comment "pa:0"',
        f'{M} log prefix "pa-acq:0 " group 7 counter drop comment "pa:0"',
    ]
    assert entry_rules(script, "output", 1) == [
        f'{M} oifname "ipsec0" counter accept comment "pa:1"',
        f'{M} ip daddr @soft4 counter accept comment "pa:1"',
        f'{M} log prefix "pa-acq:1 " group 7 counter drop comment "pa:1"',
    ]
    assert entry_rules(script, "input", 1) == [
        f'{M} iifname "ipsec0" counter accept comment "pa:1"',
        f'{M} ip saddr @soft4 counter accept comment "pa:1"',
        f'{M} limit rate 10/second log prefix "pa-drop:1 " group 7 comment "pa:1"',
        f'{M} counter drop comment "pa:1"',
    ]
    # no address: both soft sets; passthrough makes the inbound soft check moot
    assert entry_rules(script, "output", 2) == [
        'meta l4proto tcp oifname "ipsec0" counter accept comment "pa:2"',
        'meta l4proto tcp ip daddr @soft4 counter accept comment "pa:2"',
        'meta l4proto tcp ip6 daddr @soft6 counter accept comment "pa:2"',
        'meta l4proto tcp log prefix "pa-acq:2 " group 7 counter drop comment "pa:2"',
    ]
    assert entry_rules(script, "input", 2) == [
        'meta l4proto tcp iifname "ipsec0" counter accept comment "pa:2"',
        'meta l4proto tcp counter accept comment "pa:2"',
    ]


def test_render_negotiate_kernel_esp() -> None:
    script = nft.render([entry(0, AB, NEGOTIATE)], [], tun=None)
    assert entry_rules(script, "output", 0)[0] == f'{M} rt ipsec exists counter accept comment "pa:0"'
    assert entry_rules(script, "input", 0)[0] == f'{M} meta ipsec exists counter accept comment "pa:0"'
    assert "ipsec0" not in script


def test_every_entry_rule_is_commented() -> None:
    entries = [
        entry(0, Selector(src=("10.0.0.1/32", "fd00::1/128"), proto=17, dport=9), NEGOTIATE, fallback_to_clear=True),
        entry(1, Selector(), NEGOTIATE),
        entry(2, Selector(dst=("10.0.0.0/8",)), PERMIT),
    ]
    script = nft.render(entries, [IKE])
    for name in ("input", "output"):
        rules = chain(script, name)
        first = next(i for i, r in enumerate(rules) if r.endswith('comment "pa-nd"')) + 1
        assert all(r.endswith(('"pa:0"', '"pa:1"', '"pa:2"')) for r in rules[first:])


def test_nflog_parse() -> None:
    ip4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 29, 1, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    pkt = parse_packet_message(
        socket.AF_INET, {NFULA_PREFIX: b"pa-acq:3 \0", NFULA_PAYLOAD: ip4 + struct.pack("!HH", 1234, 500)}
    )
    assert (pkt.prefix, pkt.src, pkt.dst, pkt.proto, pkt.sport, pkt.dport) == (
        "pa-acq:3 ",
        "10.0.0.1",
        "10.0.0.2",
        17,
        1234,
        500,
    )
    src, dst = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")
    hop_by_hop = bytes([6, 0]) + b"\0" * 6  # next header tcp, 8 bytes
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 28, 0, 64, src, dst) + hop_by_hop + struct.pack("!HH", 40000, 22)
    pkt = parse_packet_message(socket.AF_INET6, {NFULA_PAYLOAD: ip6})
    assert (pkt.family, pkt.src, pkt.dst, pkt.proto, pkt.sport, pkt.dport) == (
        socket.AF_INET6,
        "fd00::1",
        "fd00::2",
        6,
        40000,
        22,
    )
    assert parse_packet_message(socket.AF_INET, {}).src == ""


# ---------------------------------------------------------------------------------------------- namespaces

_SKIP = netns_unavailable("nft", "ping")
needs_netns = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

UDP_SERVER = textwrap.dedent(
    """
    import json, socket, sys
    port, timeout, echo = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "echo"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(timeout)
    print("ready", flush=True)
    try:
        data, peer = s.recvfrom(2048)
    except TimeoutError:
        print(json.dumps({"got": None}), flush=True)
        sys.exit(0)
    if echo:
        s.sendto(data, peer)
    print(json.dumps({"got": data.decode(), "from": peer[0]}), flush=True)
    """
)

UDP_CLIENT = textwrap.dedent(
    """
    import socket, sys
    dst, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"hello", (dst, port))
        print("reply " + s.recvfrom(2048)[0].decode() if timeout > 0 else "sent")
    except PermissionError:
        print("eperm")  # dropped by the output chain
    except TimeoutError:
        print("timeout")
    """
)

LISTENER = textwrap.dedent(
    """
    import dataclasses, json, sys
    from policyagent.agent.enforce.nflog import NflogListener
    with NflogListener(int(sys.argv[1])) as nl:
        print("ready", flush=True)
        for pkt in nl.recv(timeout=float(sys.argv[2])):
            d = dataclasses.asdict(pkt)
            d["payload"] = len(pkt.payload)
            print(json.dumps(d), flush=True)
    """
)


def _wait_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready, "helper did not start"
    assert proc.stdout.readline().strip() == b"ready"


def udp_server(host: Host, port: int, timeout: float, echo: bool = False) -> subprocess.Popen[bytes]:
    proc = host.popen(
        [sys.executable, "-c", UDP_SERVER, str(port), str(timeout), "echo" if echo else "-"], stdout=subprocess.PIPE
    )
    _wait_ready(proc)
    return proc


def server_result(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=10)
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def udp_send(host: Host, dst: str, port: int, wait_reply: float = 0.0) -> str:
    return host.run([sys.executable, "-c", UDP_CLIENT, dst, str(port), str(wait_reply)]).stdout.strip()


def load(host: Host, entries: list[FilterEntry], exemptions: list[Exemption] | None = None, **kw: object) -> str:
    script = nft.render(entries, exemptions or [], **kw)  # type: ignore[arg-type]
    nft.apply(script, netns=host.netns)
    return script


def packets(host: Host) -> dict[int, int]:
    return {i: p for i, (p, _b) in nft.entry_counters(netns=host.netns).items()}


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    if _SKIP:
        pytest.skip(_SKIP)
    with two_hosts() as lan:
        yield lan


@pytest.fixture
def ab(lan: Lan) -> Iterator[tuple[Host, Host]]:
    a, b = lan.hosts["a"], lan.hosts["b"]
    yield a, b
    for host in (a, b):
        nft.flush(netns=host.netns)


def sel(src: Host | None, dst: Host | None, proto: int = 0, dport: int = 0) -> Selector:
    return Selector(
        src=(f"{src.ip}/32",) if src else (), dst=(f"{dst.ip}/32",) if dst else (), proto=proto, dport=dport
    )


@needs_netns
def test_ns_everything_renders_loadable(ab: tuple[Host, Host]) -> None:
    a, _b = ab
    entries = [
        entry(
            0,
            Selector(src=("10.0.0.1/32", "fd00::1/128"), proto=17, sport=5, dport=9),
            NEGOTIATE,
            fallback_to_clear=True,
        ),
        entry(1, Selector(dst=("fd00::/64",)), NEGOTIATE, inbound_passthrough=True),
        entry(2, Selector(dport=53), PERMIT),
        entry(3, Selector(src=("10.0.0.0/8",), dst=("fd00::/8",)), BLOCK),
        entry(4, Selector(proto=50), BLOCK),
        entry(5, Selector(), NEGOTIATE),
    ]
    exemptions = [
        IKE,
        Exemption("natt", 17, 4500, "10.0.0.0/8"),
        Exemption("v6 peer", 0, 0, "fd00::9/128"),
        Exemption("k", 0, 88),
    ]
    for tun in ("ipsec0", None):
        load(a, entries, exemptions, tun=tun)
    listed = a.run(["nft", "list", "table", "inet", "policyagent"]).stdout
    assert "rt ipsec exists" in listed and "meta ipsec exists" in listed
    assert set(nft.entry_counters(netns=a.netns)) == {0, 1, 2, 4, 5}


@needs_netns
def test_ns_block_and_permit(ab: tuple[Host, Host]) -> None:
    a, b = ab
    assert a.ping(b.ip)
    load(a, [entry(0, sel(a, b), BLOCK)])
    assert not a.ping(b.ip, wait=0.5)
    assert packets(a)[0] >= 1
    assert b.ping(a.ip, wait=0.5) is False  # a's input: b->a is not matched, but a's reply a->b is
    load(a, [entry(0, sel(a, b), PERMIT), entry(1, sel(b, a), PERMIT)])
    assert a.ping(b.ip)
    counts = packets(a)
    assert counts[0] >= 1 and counts[1] >= 1


@needs_netns
def test_ns_most_specific_first(ab: tuple[Host, Host]) -> None:
    a, b = ab
    icmp_permits = [entry(0, sel(a, b, proto=1), PERMIT), entry(1, sel(b, a, proto=1), PERMIT)]
    load(a, [*icmp_permits, entry(2, Selector(), BLOCK)])
    assert a.ping(b.ip)
    assert udp_send(a, b.ip, 9999) == "eperm"
    counts = packets(a)
    assert counts[0] >= 1 and counts[1] >= 1 and counts[2] >= 1
    # the same entries with block-all first: nothing passes (order is the precedence)
    load(a, [entry(0, Selector(), BLOCK), *icmp_permits])
    assert not a.ping(b.ip, wait=0.5)


@needs_netns
def test_ns_exemptions_pass(ab: tuple[Host, Host]) -> None:
    a, b = ab
    for host in (a, b):
        load(host, [entry(0, Selector(), BLOCK)], [IKE])
    server = udp_server(b, 500, 5, echo=True)
    assert udp_send(a, b.ip, 500, wait_reply=3) == "reply hello"  # a->b dport 500, b->a sport 500
    assert server_result(server) == {"got": "hello", "from": a.ip}
    assert udp_send(a, b.ip, 501) == "eperm"
    assert not a.ping(b.ip, wait=0.3)


@needs_netns
def test_ns_negotiate_without_sa_logs_and_drops(ab: tuple[Host, Host]) -> None:
    a, b = ab
    load(a, [entry(0, sel(a, b), NEGOTIATE), entry(1, sel(b, a), NEGOTIATE)], log_group=7)
    listener = a.popen([sys.executable, "-c", LISTENER, "7", "5"], stdout=subprocess.PIPE)
    _wait_ready(listener)
    assert udp_send(a, b.ip, 9999) == "eperm"
    out, _ = listener.communicate(timeout=10)
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert records, "no NFLOG record"
    rec = records[0]
    assert rec["prefix"] == "pa-acq:0 "
    assert (rec["family"], rec["src"], rec["dst"], rec["proto"], rec["dport"]) == (socket.AF_INET, a.ip, b.ip, 17, 9999)
    assert rec["payload"] >= 28
    assert packets(a)[0] >= 1


@needs_netns
def test_ns_soft_association_fallback(ab: tuple[Host, Host]) -> None:
    a, b = ab
    entries = [
        entry(0, sel(a, b), NEGOTIATE, fallback_to_clear=True),
        entry(1, sel(b, a), NEGOTIATE, fallback_to_clear=True),
    ]
    load(a, entries)
    assert not a.ping(b.ip, wait=0.3)
    nft.soft_add(b.ip, netns=a.netns)
    assert a.ping(b.ip)
    remaining = nft.soft_list(netns=a.netns)
    assert set(remaining) == {b.ip} and 290 <= remaining[b.ip] <= 300
    nft.soft_add(b.ip, 30, netns=a.netns)  # again: no error, new timeout
    assert nft.soft_list(netns=a.netns)[b.ip] <= 30
    # the soft set survives a re-apply, with its remaining timeout
    load(a, entries)
    assert 25 <= nft.soft_list(netns=a.netns)[b.ip] <= 30
    assert a.ping(b.ip)
    nft.soft_remove(b.ip, netns=a.netns)
    nft.soft_remove(b.ip, netns=a.netns)  # absent: no error
    assert nft.soft_list(netns=a.netns) == {}
    assert not a.ping(b.ip, wait=0.3)


@needs_netns
def test_ns_inbound_passthrough(ab: tuple[Host, Host]) -> None:
    a, b = ab
    # b: traffic from a must be protected; clear inbound is accepted only with passthrough
    load(b, [entry(0, sel(a, b), NEGOTIATE, inbound_passthrough=True), entry(1, sel(b, a), NEGOTIATE)])
    server = udp_server(b, 7000, 3)
    assert udp_send(a, b.ip, 7000) == "sent"
    assert server_result(server) == {"got": "hello", "from": a.ip}
    assert not a.ping(b.ip, wait=0.3)  # the request gets in; b's clear reply is held for negotiation
    counts = packets(b)
    assert counts[0] >= 2 and counts[1] >= 1

    load(b, [entry(0, sel(a, b), NEGOTIATE), entry(1, sel(b, a), NEGOTIATE)])
    server = udp_server(b, 7001, 0.7)
    assert udp_send(a, b.ip, 7001) == "sent"
    assert server_result(server) == {"got": None}
    assert packets(b)[0] >= 1


@needs_netns
def test_ns_failed_apply_keeps_old_table(ab: tuple[Host, Host]) -> None:
    a, b = ab
    good = load(a, [entry(0, sel(a, b), BLOCK)])
    nft.soft_add("10.99.0.1", netns=a.netns)
    assert not a.ping(b.ip, wait=0.3)
    bad = nft.render([entry(0, sel(a, b), PERMIT), entry(1, Selector(), PERMIT)], []).replace(
        'counter accept comment "pa:1"', 'counter acceptx comment "pa:1"'
    )
    with pytest.raises(nft.NftError) as err:
        nft.apply(bad, netns=a.netns)
    assert "Error" in str(err.value) and "acceptx" in str(err.value)
    assert err.value.script.startswith("table inet policyagent\ndelete table inet policyagent\n")
    listed = a.run(["nft", "list", "table", "inet", "policyagent"]).stdout
    assert "counter packets" in listed and 'drop comment "pa:0"' in listed and "pa:1" not in listed
    assert "10.99.0.1" in nft.soft_list(netns=a.netns)
    assert not a.ping(b.ip, wait=0.3)
    with pytest.raises(nft.NftError, match="no 'table inet"):
        nft.apply("flush ruleset\n", netns=a.netns)
    assert good  # the good script is still what is loaded
    nft.flush(netns=a.netns)
    nft.flush(netns=a.netns)  # absent: no error
    assert a.ping(b.ip)
