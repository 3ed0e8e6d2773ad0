"""The nftables filter table (agent/enforce/nft.py) and the NFLOG listener (agent/enforce/nflog.py).

Pure render tests check the exact rules that matter, on the table flattened (every jump replaced by
the rules of its target, guard first: what a packet is evaluated against, in order); namespace tests
(two hosts a, b on a LAN, no strongSwan) load tables, whole and by difference (`NftTable`), and check
traffic, counters, NFLOG records, and that a table loaded by difference is exactly the one a full
load of the same entries gives.
"""

from __future__ import annotations

import dataclasses
import json
import re
import select
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from netns import Host, Lan, netns_unavailable, two_hosts

from policyagent.agent.enforce import nft
from policyagent.agent.enforce.desired import BLOCK, NEGOTIATE, PERMIT, Exemption, FilterEntry, Selector
from policyagent.agent.enforce.nflog import NFULA_PAYLOAD, NFULA_PREFIX, parse_packet_message

IKE = Exemption("IKE", proto=17, port=500)
K = nft.entry_key


def entry(index: int, selector: Selector, verdict: str, **kw: object) -> FilterEntry:
    return FilterEntry(index, f"id{index}", f"entry {index}", selector, verdict, 100 - index, **kw)  # type: ignore[arg-type]


def chains(script: str) -> dict[str, list[str]]:
    """The rule lines of every chain of a rendered script (no comments, no chain header)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in script.splitlines():
        text = line.strip()
        if line.startswith("\tchain "):
            current = out.setdefault(line.split()[1], [])
        elif line == "\t}":
            current = None
        elif current is not None and text and not text.startswith(("#", "type filter hook")):
            current.append(text)
    return out


_JUMP = re.compile(r"^(.*?) ?jump (\S+)$")


def chain(script: str, name: str) -> list[str]:
    """Chain `name` flattened: each "<guard> jump X" replaced by X's rules (flattened), guard first."""
    all_chains = chains(script)

    def expand(name: str) -> list[str]:
        out: list[str] = []
        for rule in all_chains[name]:
            jump = _JUMP.match(rule)
            if jump and jump.group(2) in all_chains:
                out += [" ".join(p for p in (jump.group(1), r) if p) for r in expand(jump.group(2))]
            else:
                out.append(rule)
        return out

    return expand(name)


def entry_rules(script: str, name: str, e: FilterEntry) -> list[str]:
    return [r for r in chain(script, name) if r.endswith(f'comment "pa:{K(e)}"')]


# ---------------------------------------------------------------------------------------------- keys and render


def test_entry_key_is_content_not_position() -> None:
    e = entry(3, Selector(dst=("10.1.0.5/32",), proto=6, dport=22), NEGOTIATE, connection="c1")
    key = K(e)
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    # position, label and weight are not what the rules are made of
    assert K(dataclasses.replace(e, index=70, label="moved", weight=1)) == key
    for changed in (
        dataclasses.replace(e, id="other"),
        dataclasses.replace(e, selector=Selector(dst=("10.1.0.6/32",), proto=6, dport=22)),
        dataclasses.replace(e, selector=Selector(dst=("10.1.0.5/32",), proto=6, dport=23)),
        dataclasses.replace(e, verdict=BLOCK),
        dataclasses.replace(e, inbound_passthrough=True),
        dataclasses.replace(e, fallback_to_clear=True),
        dataclasses.replace(e, connection="c2"),
    ):
        assert K(changed) != key
    # inserting an entry changes no other entry's rules
    a, b, c = entry(0, AB, NEGOTIATE), entry(1, Selector(proto=1), PERMIT), entry(2, Selector(), BLOCK)
    before = nft.render([a, c], [])
    after = nft.render([a, dataclasses.replace(b, index=1), dataclasses.replace(c, index=2)], [])
    for name in ("input", "output"):
        assert entry_rules(before, name, a) == entry_rules(after, name, a)
        assert entry_rules(before, name, c) == entry_rules(after, name, c)
        assert chain(after, name)[-len(entry_rules(after, name, c)) - 1 :] == [
            f'meta l4proto icmp counter accept comment "pa:{K(b)}"',
            f'counter drop comment "pa:{K(c)}"',
        ]


def test_render_skeleton_and_order() -> None:
    entries = [
        entry(0, Selector(dst=("10.1.0.5/32",), proto=1), PERMIT),
        entry(1, Selector(), BLOCK),
    ]
    script = nft.render(entries, [IKE, Exemption("policy server", 6, 0, "10.9.0.0/16")], soft_timeout_s=60)
    assert script.startswith("table inet policyagent {\n")
    assert "\tset soft4 { type ipv4_addr; flags timeout; timeout 60s; }" in script
    assert "\tset soft6 { type ipv6_addr; flags timeout; timeout 60s; }" in script
    for name, short, lo, peer in (("input", "in", 'iif "lo"', "saddr"), ("output", "out", 'oif "lo"', "daddr")):
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
            f'ip daddr 10.1.0.5 meta l4proto icmp counter accept comment "pa:{K(entries[0])}"',
            f'counter drop comment "pa:{K(entries[1])}"',
        ]
        # the shape: base chain → run chain → entry chains, the entry's match as the jump's guard
        base = chains(script)[name]
        assert base[-1].startswith(f"jump b_{short}_") and sum(r.startswith("jump ") for r in base) == 1
        run = chains(script)[base[-1].split()[-1]]
        assert run == [
            f"ip daddr 10.1.0.5 meta l4proto icmp jump e_{short}_{K(entries[0])}",
            f"jump e_{short}_{K(entries[1])}",
        ]
        assert chains(script)[f"e_{short}_{K(entries[0])}"] == [f'counter accept comment "pa:{K(entries[0])}"']


def test_render_families() -> None:
    sel_mixed = Selector(src=("10.0.0.1/32", "fd00::1/128"), dst=())
    sel_v6 = Selector(src=(), dst=("fd00::/64",))
    sel_none = Selector(src=("10.0.0.0/8",), dst=("fd00::/64",))
    sel_sets = Selector(src=("10.0.0.1/32", "10.0.0.0/24", "10.0.1.0/24"), dst=("10.2.0.0/16", "fd01::/64"))
    e0, e1, e2, e3 = (
        entry(0, sel_mixed, BLOCK),
        entry(1, sel_v6, PERMIT),
        entry(2, sel_none, BLOCK),
        entry(3, sel_sets, PERMIT),
    )
    script = nft.render([e0, e1, e2, e3], [])
    for name in ("input", "output"):
        assert entry_rules(script, name, e0) == [
            f'ip saddr 10.0.0.1 counter drop comment "pa:{K(e0)}"',
            f'ip6 saddr fd00::1 counter drop comment "pa:{K(e0)}"',
        ]
        assert entry_rules(script, name, e1) == [f'ip6 daddr fd00::/64 counter accept comment "pa:{K(e1)}"']
        assert entry_rules(script, name, e2) == []
        # overlapping CIDRs are merged; the v6 destination alone cannot pair with a v4-only source
        assert entry_rules(script, name, e3) == [
            f'ip saddr 10.0.0.0/23 ip daddr 10.2.0.0/16 counter accept comment "pa:{K(e3)}"'
        ]
    # an entry matching in both families: an unguarded jump, complete rules in its chain
    assert f"jump e_in_{K(e0)}" in [r for rules in chains(script).values() for r in rules]
    assert f"e_in_{K(e2)}" not in chains(script) and K(e2) not in script.replace("# entry 2", "")
    assert "# entry 2 block: entry 2 (matches no packet" in script
    e = entry(0, Selector(src=("10.0.0.1/32", "10.0.0.9/32")), PERMIT)
    several = nft.render([e], [])
    assert entry_rules(several, "input", e) == [f'ip saddr {{ 10.0.0.1, 10.0.0.9 }} counter accept comment "pa:{K(e)}"']


def test_render_ports_and_protocols() -> None:
    es = [
        entry(0, Selector(proto=6, sport=1024, dport=22), PERMIT),
        entry(1, Selector(dport=53), PERMIT),
        entry(2, Selector(proto=50), BLOCK),
        entry(3, Selector(proto=17, sport=68), PERMIT),
    ]
    script = nft.render(es, [Exemption("kerberos", 0, 88)])
    rules = chain(script, "output")
    assert f'meta l4proto tcp th sport 1024 th dport 22 counter accept comment "pa:{K(es[0])}"' in rules
    assert f'meta l4proto {{ tcp, udp }} th dport 53 counter accept comment "pa:{K(es[1])}"' in rules
    assert f'meta l4proto 50 counter drop comment "pa:{K(es[2])}"' in rules
    assert f'meta l4proto udp th sport 68 counter accept comment "pa:{K(es[3])}"' in rules
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
    with pytest.raises(ValueError, match="interface"):
        nft.NftTable(tun='ipsec0" accept', log_group=7)


AB = Selector(src=("10.1.0.1/32",), dst=("10.1.0.2/32",))
M = "ip saddr 10.1.0.1 ip daddr 10.1.0.2"


def test_render_negotiate_plain() -> None:
    e = entry(4, AB, NEGOTIATE)
    k = K(e)
    script = nft.render([e], [], log_group=9)
    assert entry_rules(script, "output", e) == [
        f'{M} oifname "ipsec0" counter accept comment "pa:{k}"',
        f'{M} log prefix "pa-acq:{k} " group 9 counter drop comment "pa:{k}"',
    ]
    assert entry_rules(script, "input", e) == [
        f'{M} iifname "ipsec0" counter accept comment "pa:{k}"',
        f'{M} limit rate 10/second log prefix "pa-drop:{k} " group 9 comment "pa:{k}"',
        f'{M} counter drop comment "pa:{k}"',
    ]


def test_render_negotiate_passthrough_and_fallback() -> None:
    e0 = entry(0, AB, NEGOTIATE, inbound_passthrough=True)
    e1 = entry(1, AB, NEGOTIATE, fallback_to_clear=True)
    e2 = entry(2, Selector(proto=6), NEGOTIATE, fallback_to_clear=True, inbound_passthrough=True)
    k0, k1, k2 = K(e0), K(e1), K(e2)
    script = nft.render([e0, e1, e2], [])
    assert entry_rules(script, "input", e0) == [
        f'{M} iifname "ipsec0" counter accept comment "pa:{k0}"',
        f'{M} counter accept comment "pa:{k0}"',
    ]
    assert entry_rules(script, "output", e0) == [  # passthrough is inbound only
        f'{M} oifname "ipsec0" counter accept comment "pa:{k0}"',
        f'{M} log prefix "pa-acq:{k0} " group 7 counter drop comment "pa:{k0}"',
    ]
    assert entry_rules(script, "output", e1) == [
        f'{M} oifname "ipsec0" counter accept comment "pa:{k1}"',
        f'{M} ip daddr @soft4 counter accept comment "pa:{k1}"',
        f'{M} log prefix "pa-acq:{k1} " group 7 counter drop comment "pa:{k1}"',
    ]
    assert entry_rules(script, "input", e1) == [
        f'{M} iifname "ipsec0" counter accept comment "pa:{k1}"',
        f'{M} ip saddr @soft4 counter accept comment "pa:{k1}"',
        f'{M} limit rate 10/second log prefix "pa-drop:{k1} " group 7 comment "pa:{k1}"',
        f'{M} counter drop comment "pa:{k1}"',
    ]
    # no address: both soft sets; passthrough makes the inbound soft check moot
    assert entry_rules(script, "output", e2) == [
        f'meta l4proto tcp oifname "ipsec0" counter accept comment "pa:{k2}"',
        f'meta l4proto tcp ip daddr @soft4 counter accept comment "pa:{k2}"',
        f'meta l4proto tcp ip6 daddr @soft6 counter accept comment "pa:{k2}"',
        f'meta l4proto tcp log prefix "pa-acq:{k2} " group 7 counter drop comment "pa:{k2}"',
    ]
    assert entry_rules(script, "input", e2) == [
        f'meta l4proto tcp iifname "ipsec0" counter accept comment "pa:{k2}"',
        f'meta l4proto tcp counter accept comment "pa:{k2}"',
    ]


def test_render_negotiate_kernel_esp() -> None:
    e = entry(0, AB, NEGOTIATE)
    script = nft.render([e], [], tun=None)
    assert entry_rules(script, "output", e)[0] == f'{M} rt ipsec exists counter accept comment "pa:{K(e)}"'
    assert entry_rules(script, "input", e)[0] == f'{M} meta ipsec exists counter accept comment "pa:{K(e)}"'
    assert "ipsec0" not in script


def test_every_entry_rule_is_commented() -> None:
    entries = [
        entry(0, Selector(src=("10.0.0.1/32", "fd00::1/128"), proto=17, dport=9), NEGOTIATE, fallback_to_clear=True),
        entry(1, Selector(), NEGOTIATE),
        entry(2, Selector(dst=("10.0.0.0/8",)), PERMIT),
    ]
    script = nft.render(entries, [IKE])
    comments = tuple(f'"pa:{K(e)}"' for e in entries)
    for name in ("input", "output"):
        rules = chain(script, name)
        first = next(i for i, r in enumerate(rules) if r.endswith('comment "pa-nd"')) + 1
        assert all(r.endswith(comments) for r in rules[first:])
    for chain_name, rules in chains(script).items():
        if chain_name.startswith("e_"):
            assert all(r.endswith(f'comment "pa:{chain_name.split("_")[-1]}"') for r in rules)


def many(n: int, start: int = 0) -> list[FilterEntry]:
    """n varied entries (every verdict and flag, IPv4, IPv6, both, ports, no match)."""
    out = []
    for i in range(start, start + n):
        host = f"10.60.{i // 200}.{i % 200 + 1}/32"
        kind = i % 7
        if kind == 0:
            out.append(entry(i, Selector(src=("10.77.0.1/32",), dst=(host,)), NEGOTIATE, connection=f"c{i}"))
        elif kind == 1:
            out.append(entry(i, Selector(src=(host,), dst=("10.77.0.1/32",)), NEGOTIATE, fallback_to_clear=True))
        elif kind == 2:
            out.append(entry(i, Selector(dst=(host, f"fd60::{i:x}/128"), proto=6, dport=i % 60000 + 1), PERMIT))
        elif kind == 3:
            out.append(entry(i, Selector(src=(f"fd61::{i:x}/128",), proto=17), NEGOTIATE, inbound_passthrough=True))
        elif kind == 4:
            out.append(entry(i, Selector(dst=(host, "10.61.0.0/16")), BLOCK))
        elif kind == 5:
            out.append(entry(i, Selector(src=(host,), dst=(f"fd62::{i:x}/128",)), BLOCK))  # matches nothing
        else:
            out.append(entry(i, Selector(proto=6, sport=i % 60000 + 1), NEGOTIATE, fallback_to_clear=True))
    return out


def reindexed(entries: Sequence[FilterEntry]) -> list[FilterEntry]:
    """As compile() numbers them: index = position."""
    return [dataclasses.replace(e, index=i) for i, e in enumerate(entries)]


def test_runs_are_local() -> None:
    """Run boundaries depend on content: inserting or removing one entry changes at most the runs around it."""
    keys = [K(e) for e in many(600)]
    runs = nft._runs(keys)
    assert 8 <= len(runs) <= 60 and [k for _n, run in runs for k in run] == keys
    assert all(len(run) <= nft.RUN_MAX for _n, run in runs)
    names = {n for n, _r in runs}
    for pos in (0, 1, 77, 300, 599):
        for edited in ([*keys[:pos], "0123456789ab", *keys[pos:]], keys[:pos] + keys[pos + 1 :]):
            new = {n for n, _r in nft._runs(edited)}
            assert len(new - names) <= 2 and len(names - new) <= 2, pos


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


def packets(host: Host) -> dict[str, int]:
    return {k: p for k, (p, _b) in nft.entry_counters(netns=host.netns).items()}


def listing(host: Host) -> list[dict[str, Any]]:
    out = host.run(["nft", "-j", "list", "table", "inet", nft.DEFAULT_TABLE]).stdout
    return [item for item in json.loads(out)["nftables"] if "metainfo" not in item]


def _no_counts(expr: Any) -> Any:
    return {"counter": None} if isinstance(expr, dict) and "counter" in expr else expr


def structure(host: Host) -> dict[str, Any]:
    """The loaded table, handles and counter values left out: chain → (hook settings, rules in order), sets."""
    out: dict[str, Any] = {}
    for item in listing(host):
        if "chain" in item:
            c = item["chain"]
            out.setdefault(c["name"], {"rules": []})["hook"] = [c.get(k) for k in ("type", "hook", "prio", "policy")]
        elif "rule" in item:
            r = item["rule"]
            rule = [_no_counts(e) for e in r["expr"]] + [r.get("comment")]
            out.setdefault(r["chain"], {"rules": []})["rules"].append(rule)
        elif "set" in item:
            s = item["set"]
            out["@" + s["name"]] = [s.get(k) for k in ("type", "flags", "timeout")]
    return out


def rule_state(host: Host, key: str) -> list[tuple[str, int, int]]:
    """(chain, handle, packets) of every rule of entry `key`."""
    out = []
    for item in listing(host):
        r = item.get("rule")
        if r and r.get("comment") == f"pa:{key}":
            count = sum(e["counter"]["packets"] for e in r["expr"] if isinstance(e, dict) and "counter" in e)
            out.append((r["chain"], r["handle"], count))
    return out


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
    a, b = ab
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
        dataclasses.replace(entry(6, Selector(proto=47), BLOCK), label='gre } ; "quoted" # hash\nnext line'),
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
    assert set(nft.entry_counters(netns=a.netns)) == {K(entries[i]) for i in (0, 1, 2, 4, 5, 6)}
    table = nft.NftTable(tun=None, log_group=7, netns=a.netns)  # the same, by difference
    table.apply(entries[3:], exemptions[1:])
    table.apply(entries, exemptions)
    assert mode(table) == "incremental" and structure(a) == full_reference(b, entries, exemptions, tun=None)


@needs_netns
def test_ns_block_and_permit(ab: tuple[Host, Host]) -> None:
    a, b = ab
    assert a.ping(b.ip)
    block = entry(0, sel(a, b), BLOCK)
    load(a, [block])
    assert not a.ping(b.ip, wait=0.5)
    assert packets(a)[K(block)] >= 1
    assert b.ping(a.ip, wait=0.5) is False  # a's input: b->a is not matched, but a's reply a->b is
    out, back = entry(0, sel(a, b), PERMIT), entry(1, sel(b, a), PERMIT)
    load(a, [out, back])
    assert a.ping(b.ip)
    counts = packets(a)
    assert counts[K(out)] >= 1 and counts[K(back)] >= 1


@needs_netns
def test_ns_most_specific_first(ab: tuple[Host, Host]) -> None:
    a, b = ab
    icmp_permits = [entry(0, sel(a, b, proto=1), PERMIT), entry(1, sel(b, a, proto=1), PERMIT)]
    block_all = entry(2, Selector(), BLOCK)
    load(a, [*icmp_permits, block_all])
    assert a.ping(b.ip)
    assert udp_send(a, b.ip, 9999) == "eperm"
    counts = packets(a)
    assert counts[K(icmp_permits[0])] >= 1 and counts[K(icmp_permits[1])] >= 1 and counts[K(block_all)] >= 1
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
    out, back = entry(0, sel(a, b), NEGOTIATE), entry(1, sel(b, a), NEGOTIATE)
    table = nft.NftTable(tun="ipsec0", log_group=7, netns=a.netns)
    table.apply([out, back], [])
    listener = a.popen([sys.executable, "-c", LISTENER, "7", "5"], stdout=subprocess.PIPE)
    _wait_ready(listener)
    assert udp_send(a, b.ip, 9999) == "eperm"
    out_, _ = listener.communicate(timeout=10)
    records = [json.loads(line) for line in out_.decode().splitlines()]
    assert records, "no NFLOG record"
    rec = records[0]
    assert rec["prefix"] == f"pa-acq:{K(out)} "
    assert table.keys()[rec["prefix"][len(nft.ACQUIRE_PREFIX) :].strip()] is out  # what the enforcer looks up
    assert (rec["family"], rec["src"], rec["dst"], rec["proto"], rec["dport"]) == (socket.AF_INET, a.ip, b.ip, 17, 9999)
    assert rec["payload"] >= 28
    assert packets(a)[K(out)] >= 1


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
    inbound, outbound = entry(0, sel(a, b), NEGOTIATE, inbound_passthrough=True), entry(1, sel(b, a), NEGOTIATE)
    load(b, [inbound, outbound])
    server = udp_server(b, 7000, 3)
    assert udp_send(a, b.ip, 7000) == "sent"
    assert server_result(server) == {"got": "hello", "from": a.ip}
    assert not a.ping(b.ip, wait=0.3)  # the request gets in; b's clear reply is held for negotiation
    counts = packets(b)
    assert counts[K(inbound)] >= 2 and counts[K(outbound)] >= 1

    strict = entry(0, sel(a, b), NEGOTIATE)
    load(b, [strict, outbound])
    server = udp_server(b, 7001, 0.7)
    assert udp_send(a, b.ip, 7001) == "sent"
    assert server_result(server) == {"got": None}
    assert packets(b)[K(strict)] >= 1


@needs_netns
def test_ns_failed_apply_keeps_old_table(ab: tuple[Host, Host]) -> None:
    a, b = ab
    old = entry(0, sel(a, b), BLOCK)
    good = load(a, [old])
    nft.soft_add("10.99.0.1", netns=a.netns)
    assert not a.ping(b.ip, wait=0.3)
    new0, new1 = entry(0, sel(a, b), PERMIT), entry(1, Selector(), PERMIT)
    bad = nft.render([new0, new1], []).replace(
        f'counter accept comment "pa:{K(new1)}"', f'counter acceptx comment "pa:{K(new1)}"'
    )
    with pytest.raises(nft.NftError) as err:
        nft.apply(bad, netns=a.netns)
    assert "Error" in str(err.value) and "acceptx" in str(err.value)
    assert err.value.script.startswith("table inet policyagent\ndelete table inet policyagent\n")
    listed = a.run(["nft", "list", "table", "inet", "policyagent"]).stdout
    assert "counter packets" in listed and f'drop comment "pa:{K(old)}"' in listed and K(new1) not in listed
    assert "10.99.0.1" in nft.soft_list(netns=a.netns)
    assert not a.ping(b.ip, wait=0.3)
    with pytest.raises(nft.NftError, match="no 'table inet"):
        nft.apply("flush ruleset\n", netns=a.netns)
    assert good  # the good script is still what is loaded
    nft.flush(netns=a.netns)
    nft.flush(netns=a.netns)  # absent: no error
    assert a.ping(b.ip)


# ---------------------------------------------------------------------------------------------- NftTable


def mode(table: nft.NftTable) -> str | None:
    """How the table's last apply() went (a function, so that type checkers do not narrow it between applies)."""
    return table.last_mode


def full_reference(
    host: Host, entries: Sequence[FilterEntry], exemptions: Sequence[Exemption], tun: str | None = "ipsec0"
) -> dict[str, Any]:
    """The table a full load of `entries` gives (loaded on `host`), for comparison."""
    nft.apply(nft.render(entries, exemptions, tun=tun, log_group=7), netns=host.netns)
    return structure(host)


@needs_netns
def test_ns_table_incremental_equals_full(ab: tuple[Host, Host]) -> None:
    """Every edit, applied by difference on a, gives exactly the table a full load of the new entries gives on b."""
    a, b = ab
    table = nft.NftTable(tun="ipsec0", log_group=7, netns=a.netns)
    base = many(150)
    extra = many(10, start=500)
    natt = Exemption("natt", 17, 4500, "10.0.0.0/8")
    steps: list[tuple[str, list[FilterEntry], list[Exemption], str]] = [
        ("first", base, [IKE], "full"),
        ("same again", base, [IKE], "unchanged"),
        ("insert one in the middle", base[:70] + extra[:1] + base[70:], [IKE], "incremental"),
        ("remove one", base[:70] + extra[:1] + base[70:100] + base[101:], [IKE], "incremental"),
        ("insert first, append last", extra[1:2] + base + extra[2:3], [IKE], "incremental"),
        ("swap two far apart", [*base[:5], base[120], *base[6:120], base[5], *base[121:]], [IKE], "incremental"),
        ("move a block", base[40:60] + base[:40] + base[60:], [IKE], "incremental"),
        (
            "change one entry's content",
            [*base[:30], dataclasses.replace(base[30], selector=Selector(dst=("10.62.0.1/32",))), *base[31:]],
            [IKE],
            "incremental",
        ),
        ("exemptions only", base, [IKE, natt], "incremental"),
        ("many at once", extra + base[::2], [natt], "incremental"),
        (
            "labels and positions only",
            [dataclasses.replace(e, label="relabelled") for e in extra + base[::2]],
            [natt],
            "unchanged",
        ),
        ("empty", [], [], "incremental"),
        ("back", base, [IKE], "incremental"),
    ]
    for what, entries, exemptions, expected in steps:
        entries = reindexed(entries)
        table.apply(entries, exemptions)
        assert mode(table) == expected, what
        assert structure(a) == full_reference(b, entries, exemptions), what
        assert table.keys() == {K(e): e for e in entries}, what
    # a one-entry edit is a small transaction: no entry chain but the new one's is written
    edited = reindexed(base[:70] + extra[:1] + base[70:])
    table.apply(edited, [IKE])
    assert mode(table) == "incremental"
    written = [line for line in table.last_script.splitlines() if line.startswith("add chain inet policyagent e_")]
    assert written == [f"add chain inet policyagent e_{d}_{K(extra[0])}" for d in ("in", "out")]
    assert table.last_script.count("\n") < 200


@needs_netns
def test_ns_table_keeps_unchanged_entries(ab: tuple[Host, Host]) -> None:
    """Entries that did not change keep their rules' handles and counters; traffic follows the new order."""
    a, b = ab
    icmp_out, icmp_in = entry(0, sel(a, b, proto=1), PERMIT), entry(1, sel(b, a, proto=1), PERMIT)
    rest = many(60, start=100)
    table = nft.NftTable(tun="ipsec0", log_group=7, netns=a.netns)
    table.apply(reindexed([*rest[:30], icmp_out, icmp_in, *rest[30:]]), [IKE])
    assert mode(table) == "full"
    assert a.ping(b.ip, count=3)
    before = {e: rule_state(a, K(e)) for e in (icmp_out, icmp_in, rest[10], rest[50])}
    assert sum(count for _c, _h, count in before[icmp_out]) >= 3  # the output rule; a's input sees none
    block_b = entry(0, sel(a, b), BLOCK)
    # insert before them, remove others before and after: an incremental transaction
    table.apply(reindexed([block_b, *rest[:5], *rest[6:30], icmp_out, icmp_in, *rest[30:40], *rest[41:]]), [IKE])
    assert mode(table) == "incremental"
    for e, state in before.items():
        assert rule_state(a, K(e)) == state, e.id
    assert rule_state(a, K(rest[5])) == [] and rule_state(a, K(rest[40])) == []
    assert not a.ping(b.ip, wait=0.3)  # the new block entry comes first
    assert rule_state(a, K(icmp_out)) == before[icmp_out]
    assert packets(a)[K(block_b)] >= 1
    # move it after the permits: ping works again, the permits count on from where they were
    table.apply(reindexed([*rest[:5], *rest[6:30], icmp_out, icmp_in, block_b, *rest[30:40], *rest[41:]]), [IKE])
    assert mode(table) == "incremental"
    assert a.ping(b.ip)
    after = rule_state(a, K(icmp_out))
    assert [(c, h) for c, h, _n in after] == [(c, h) for c, h, _n in before[icmp_out]]
    assert sum(n for _c, _h, n in after) > sum(n for _c, _h, n in before[icmp_out])


@needs_netns
def test_ns_table_falls_back_to_full(ab: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = ab
    table = nft.NftTable(tun="ipsec0", log_group=7, netns=a.netns)
    first, second = reindexed(many(40)), reindexed(many(42))  # many(41) adds an entry matching nothing
    table.apply(first, [IKE])
    nft.soft_add("10.99.0.1", 60, netns=a.netns)
    real_diff, real_script = nft._diff_script, nft._script

    # a broken incremental transaction: the whole table is replaced instead
    monkeypatch.setattr(
        nft, "_diff_script", lambda *args: real_diff(*args) + "add rule inet policyagent input acceptx\n"
    )
    table.apply(second, [IKE])
    assert mode(table) == "full" and "acceptx" in table.fallback_reason
    assert structure(a) == full_reference(b, second, [IKE])
    assert 50 <= nft.soft_list(netns=a.netns)["10.99.0.1"] <= 60

    # the full replace fails too: NftError, the loaded table is untouched, and the table still knows it
    monkeypatch.setattr(nft, "_script", lambda *args: real_script(*args).replace("counter drop", "counter dropx"))
    loaded = structure(a)
    with pytest.raises(nft.NftError, match="dropx"):
        table.apply(first, [])
    assert structure(a) == loaded and mode(table) == "full"
    assert table.keys() == {K(e): e for e in second}
    monkeypatch.setattr(nft, "_diff_script", real_diff)
    monkeypatch.setattr(nft, "_script", real_script)
    table.apply(first, [])
    assert mode(table) == "incremental"
    assert structure(a) == full_reference(b, first, [])

    # the table deleted behind its back: unchanged entries and changed ones both load it whole again
    nft.flush(netns=a.netns)
    table.apply(first, [])
    assert mode(table) == "full" and structure(a) == full_reference(b, first, [])
    nft.flush(netns=a.netns)
    table.apply(second, [])
    assert mode(table) == "full" and table.fallback_reason
    assert structure(a) == full_reference(b, second, [])
    # flush(): gone, and the next apply is a full one
    table.flush()
    assert a.run(["nft", "list", "table", "inet", "policyagent"], check=False).returncode != 0
    assert table.keys() == {}
    table.apply(second, [])
    assert mode(table) == "full"


@needs_netns
def test_ns_table_soft_set_survives(ab: tuple[Host, Host]) -> None:
    a, b = ab
    out = entry(0, sel(a, b), NEGOTIATE, fallback_to_clear=True)
    back = entry(1, sel(b, a), NEGOTIATE, fallback_to_clear=True)
    table = nft.NftTable(tun="ipsec0", log_group=7, netns=a.netns)
    table.apply([out, back], [IKE])
    nft.soft_add(b.ip, 30, netns=a.netns)
    assert a.ping(b.ip)
    table.apply(reindexed([*many(5), out, back]), [IKE])  # incremental: the sets are not touched
    assert mode(table) == "incremental"
    assert 25 <= nft.soft_list(netns=a.netns)[b.ip] <= 30
    assert a.ping(b.ip)
    again = nft.NftTable(tun="ipsec0", log_group=7, netns=a.netns)  # a new one replaces the table whole
    again.apply([out, back], [IKE])
    assert mode(again) == "full"
    assert 25 <= nft.soft_list(netns=a.netns)[b.ip] <= 30
    assert a.ping(b.ip)
