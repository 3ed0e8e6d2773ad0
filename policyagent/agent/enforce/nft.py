"""The host's filter table as one nftables table: render it, replace it atomically, read it back.

`render()` turns the compiled filter entries (already ordered most specific first) and the
exemptions into a complete nft script for one `inet` table; `apply()` replaces the loaded table with
it in a single transaction (all or nothing: on any error the previous table stays as it was). Shape of
each chain (input and output, both `policy accept`, priority 0):

    iif/oif "lo" accept
    exemptions                       (proto/port as source OR destination, peer CIDR)
    IPv6 neighbour discovery + MLD   (so IPv6 keeps working)
    entries, in the given order      (every rule commented "pa:<index>")

A NEGOTIATE entry is "must be protected": in output it passes only through the IPsec TUN device
(kernel-libipsec) or an IPsec route (kernel ESP, `tun=None`), or to a soft-associated peer when the
entry falls back to clear; anything else is logged to the agent's NFLOG group with prefix
`pa-acq:<index> ` (the trigger to negotiate with that peer) and dropped. In input it is accepted
from the TUN device / with a secpath, in clear when the entry allows inbound passthrough or the peer
is soft-associated, and otherwise dropped (rate-limited log `pa-drop:<index> `).

The soft sets (`soft4`, `soft6`) hold the peers allowed in clear after an IKE fallback; their
elements time out on their own and survive `apply()` (re-added with their remaining timeout).
Entry counters start again at zero with every `apply()` (the table is new).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from policyagent.agent.enforce.desired import BLOCK, NEGOTIATE, PERMIT, Exemption, FilterEntry, Selector

DEFAULT_TABLE = "policyagent"
DEFAULT_TUN = "ipsec0"
DEFAULT_LOG_GROUP = 7
ACQUIRE_PREFIX = "pa-acq:"  # + "<index> ": a packet that needs an SA and had none (output)
DROP_PREFIX = "pa-drop:"  # + "<index> ": clear inbound that had to arrive protected
ENTRY_COMMENT = "pa:"  # + "<index>": every rule generated for an entry
EXEMPT_COMMENT = "pa-ex:"  # + "<index>": rules generated for an exemption
DROP_LOG_RATE = "10/second"

# ICMPv6 that IPv6 needs to work at all: router/neighbour discovery and multicast listener messages.
ICMPV6_ALWAYS = (
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-query",
    "mld-listener-report",
    "mld-listener-done",
    "mld2-listener-report",
)

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}
_PORT_PROTOS = frozenset({6, 17, 33, 132, 136})  # tcp, udp, dccp, sctp, udplite: have 16-bit ports first
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
_TABLE_RE = re.compile(r"^table inet ([A-Za-z][A-Za-z0-9_]*) \{", re.MULTILINE)
_SOFT_SETS = ("soft4", "soft6")
_NFT_TIMEOUT_S = 30.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NftError(Exception):
    """nft refused a script or command. The message carries nft's stderr (it names the failing line;
    for `apply()` the line numbers count the two-line preamble `table ...` / `delete table ...`, and
    `script` holds exactly what was submitted)."""

    def __init__(self, message: str, script: str = "") -> None:
        super().__init__(message)
        self.script = script


# ---------------------------------------------------------------------------------------------- render


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"invalid nft {what} name: {value!r}")
    return value


def _networks(cidrs: Iterable[str]) -> dict[int, list[Network]]:
    """CIDRs split by IP version, each family collapsed (overlaps merged, sorted)."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"invalid address or CIDR: {cidr!r}") from exc
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return {4: list(ipaddress.collapse_addresses(v4)), 6: list(ipaddress.collapse_addresses(v6))}


def _net_text(net: Network) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _addr_expr(nets: Sequence[Network]) -> str:
    if len(nets) == 1:
        return _net_text(nets[0])
    return "{ " + ", ".join(_net_text(n) for n in nets) + " }"


def _proto_text(proto: int) -> str:
    return _PROTO_NAMES.get(proto, str(proto))


def _l4(proto: int, sport: int, dport: int) -> list[str]:
    """`meta l4proto` and `th sport/dport` matches; ports with proto 0 mean TCP or UDP."""
    if not 0 <= proto <= 255:
        raise ValueError(f"invalid IP protocol {proto}")
    for port in (sport, dport):
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
    parts: list[str] = []
    if sport or dport:
        if proto == 0:
            parts.append("meta l4proto { tcp, udp }")
        elif proto in _PORT_PROTOS:
            parts.append(f"meta l4proto {_proto_text(proto)}")
        else:
            raise ValueError(f"ports given for protocol {proto}, which has none")
    elif proto:
        parts.append(f"meta l4proto {_proto_text(proto)}")
    if sport:
        parts.append(f"th sport {sport}")
    if dport:
        parts.append(f"th dport {dport}")
    return parts


def _selector_matches(sel: Selector) -> list[tuple[int | None, str]]:
    """One (family, match text) per IP family the selector can match; family None = any family.

    An empty address tuple is any address: it restricts nothing, unless the other side names
    addresses of one family only. A selector whose sides share no family matches nothing ([])."""
    l4 = _l4(sel.proto, sel.sport, sel.dport)
    if not sel.src and not sel.dst:
        return [(None, " ".join(l4))]
    src, dst = _networks(sel.src), _networks(sel.dst)
    out: list[tuple[int | None, str]] = []
    for fam, kw in ((4, "ip"), (6, "ip6")):
        if (sel.src and not src[fam]) or (sel.dst and not dst[fam]):
            continue
        parts: list[str] = []
        if src[fam]:
            parts.append(f"{kw} saddr {_addr_expr(src[fam])}")
        if dst[fam]:
            parts.append(f"{kw} daddr {_addr_expr(dst[fam])}")
        out.append((fam, " ".join([*parts, *l4])))
    return out


def _rule(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _clean(text: str) -> str:
    """Free text for a `#` script comment: one line, printable."""
    return "".join(c if c.isprintable() else " " for c in text)[:200]


def _exemption_rules(i: int, ex: Exemption, direction: str) -> list[str]:
    comment = f'comment "{EXEMPT_COMMENT}{i}"'
    peer = ""
    if ex.addr:
        nets = _networks([ex.addr])
        fam = 4 if nets[4] else 6
        kw = "ip" if fam == 4 else "ip6"
        peer = f"{kw} {'daddr' if direction == 'output' else 'saddr'} {_addr_expr(nets[fam])}"
    if ex.port:
        l4 = _l4(ex.proto, 0, ex.port)[0]  # the l4proto part only
        return [
            _rule(peer, l4, f"th sport {ex.port}", "accept", comment),
            _rule(peer, l4, f"th dport {ex.port}", "accept", comment),
        ]
    return [_rule(peer, *_l4(ex.proto, 0, 0), "accept", comment)]


def _soft_checks(fam: int | None, direction: str) -> list[str]:
    side = "daddr" if direction == "output" else "saddr"
    checks = []
    if fam in (None, 4):
        checks.append(f"ip {side} @soft4")
    if fam in (None, 6):
        checks.append(f"ip6 {side} @soft6")
    return checks


def _entry_rules(entry: FilterEntry, direction: str, tun: str | None, log_group: int) -> list[str]:
    i = entry.index
    comment = f'comment "{ENTRY_COMMENT}{i}"'
    rules: list[str] = []
    for fam, match in _selector_matches(entry.selector):
        if entry.verdict == PERMIT:
            rules.append(_rule(match, "counter accept", comment))
        elif entry.verdict == BLOCK:
            rules.append(_rule(match, "counter drop", comment))
        elif entry.verdict == NEGOTIATE and direction == "output":
            protected = f'oifname "{tun}"' if tun else "rt ipsec exists"
            rules.append(_rule(match, protected, "counter accept", comment))
            if entry.fallback_to_clear:
                rules += [_rule(match, soft, "counter accept", comment) for soft in _soft_checks(fam, direction)]
            rules.append(_rule(match, f'log prefix "{ACQUIRE_PREFIX}{i} " group {log_group}', "counter drop", comment))
        elif entry.verdict == NEGOTIATE:
            protected = f'iifname "{tun}"' if tun else "meta ipsec exists"
            rules.append(_rule(match, protected, "counter accept", comment))
            if entry.inbound_passthrough:
                rules.append(_rule(match, "counter accept", comment))
                continue
            if entry.fallback_to_clear:
                rules += [_rule(match, soft, "counter accept", comment) for soft in _soft_checks(fam, direction)]
            rules.append(
                _rule(match, f'limit rate {DROP_LOG_RATE} log prefix "{DROP_PREFIX}{i} " group {log_group}', comment)
            )
            rules.append(_rule(match, "counter drop", comment))
        else:
            raise ValueError(f"entry {i}: unknown verdict {entry.verdict!r}")
    return rules


def render(
    entries: Sequence[FilterEntry],
    exemptions: Sequence[Exemption],
    *,
    tun: str | None = DEFAULT_TUN,
    log_group: int = DEFAULT_LOG_GROUP,
    soft_timeout_s: int = 300,
    table: str = DEFAULT_TABLE,
) -> str:
    """The complete nft script for table `inet <table>` (see the module docstring for its shape).

    Raises ValueError on anything that cannot be rendered safely (bad CIDR, port, name)."""
    _check_name(table, "table")
    if tun is not None and not _IFNAME_RE.match(tun):
        raise ValueError(f"invalid interface name: {tun!r}")
    if not 0 <= log_group <= 65535:
        raise ValueError(f"invalid NFLOG group {log_group}")
    if soft_timeout_s < 1:
        raise ValueError("soft_timeout_s must be at least 1")
    lines = [
        f"table inet {table} {{",
        f"\tset soft4 {{ type ipv4_addr; flags timeout; timeout {soft_timeout_s}s; }}",
        f"\tset soft6 {{ type ipv6_addr; flags timeout; timeout {soft_timeout_s}s; }}",
    ]
    for direction, lo in (("input", 'iif "lo"'), ("output", 'oif "lo"')):
        lines += ["", f"\tchain {direction} {{", f"\t\ttype filter hook {direction} priority 0; policy accept;"]
        lines.append(f"\t\t{lo} accept")
        for i, ex in enumerate(exemptions):
            lines.append(f"\t\t# exemption {i}: {_clean(ex.reason)}")
            lines += [f"\t\t{r}" for r in _exemption_rules(i, ex, direction)]
        lines.append(f'\t\ticmpv6 type {{ {", ".join(ICMPV6_ALWAYS)} }} accept comment "pa-nd"')
        for entry in entries:
            rules = _entry_rules(entry, direction, tun, log_group)
            note = "" if rules else " (matches no packet: source and destination share no IP family)"
            lines.append(f"\t\t# entry {entry.index} {entry.verdict}: {_clean(entry.label or entry.id)}{note}")
            lines += [f"\t\t{r}" for r in rules]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- run


def _nft_argv(args: Sequence[str], netns: str | None) -> list[str]:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return [*prefix, nft, *args]


def _nft(args: Sequence[str], *, netns: str | None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            _nft_argv(args, netns), input=stdin, capture_output=True, text=True, check=False, timeout=_NFT_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"cannot run nft: {exc}", stdin or "") from exc


def _run_script(script: str, netns: str | None) -> None:
    proc = _nft(["-f", "-"], netns=netns, stdin=script)
    if proc.returncode != 0:
        raise NftError(proc.stderr.strip() or f"nft -f exited with {proc.returncode}", script)


def _json(args: Sequence[str], netns: str | None) -> list[dict[str, Any]] | None:
    """`nft -j <args>`'s objects, or None when nft fails (e.g. the table does not exist)."""
    proc = _nft(["-j", *args], netns=netns)
    if proc.returncode != 0:
        return None
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise NftError(f"unreadable nft JSON output: {exc}") from exc
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    return [item for item in items if isinstance(item, dict)]


def _set_elements(table: str, name: str, netns: str | None) -> dict[str, float]:
    items = _json(["list", "set", "inet", table, name], netns)
    out: dict[str, float] = {}
    for item in items or []:
        for elem in item.get("set", {}).get("elem", []) or []:
            if isinstance(elem, dict) and isinstance(elem.get("elem"), dict):
                val, expires = elem["elem"].get("val"), elem["elem"].get("expires")
                if isinstance(val, str):
                    out[val] = float(expires) if isinstance(expires, int | float) else 0.0
            elif isinstance(elem, str):  # an element without timeout
                out[elem] = 0.0
    return out


def _soft_set_of(peer: str) -> tuple[str, str]:
    try:
        addr = ipaddress.ip_address(peer.strip())
    except ValueError as exc:
        raise ValueError(f"invalid peer address: {peer!r}") from exc
    return ("soft4" if addr.version == 4 else "soft6"), str(addr)


def apply(script: str, *, netns: str | None = None) -> None:
    """Replace table `inet <table>` (the one `script` defines) with `script` in one transaction.

    The soft sets' elements are read first and re-added with their remaining timeout, in the same
    transaction. Raises NftError (nft's stderr) on failure; the loaded table is then unchanged."""
    match = _TABLE_RE.search(script)
    if not match:
        raise NftError("script defines no 'table inet <name> {'", script)
    table = match.group(1)
    carry: list[str] = []
    for name in _SOFT_SETS:
        if not re.search(rf"^\s*set {name} \{{", script, re.MULTILINE):
            continue
        for addr, remaining in _set_elements(table, name, netns).items():
            if remaining >= 1:
                carry.append(f"add element inet {table} {name} {{ {addr} timeout {int(remaining)}s }}")
    full = "\n".join([f"table inet {table}", f"delete table inet {table}", script.rstrip("\n"), *carry]) + "\n"
    _run_script(full, netns)


def flush(*, netns: str | None = None, table: str = DEFAULT_TABLE) -> None:
    """Delete the table (no error when it is not there)."""
    _check_name(table, "table")
    _run_script(f"table inet {table}\ndelete table inet {table}\n", netns)


def soft_add(peer: str, timeout_s: int | None = None, *, netns: str | None = None, table: str = DEFAULT_TABLE) -> None:
    """Allow `peer` (an address) in clear for NEGOTIATE entries with fallback, for `timeout_s` seconds
    (None = the set's default). Adding a peer already there restarts its timeout."""
    _check_name(table, "table")
    name, addr = _soft_set_of(peer)
    if timeout_s is not None and timeout_s < 1:
        raise ValueError("timeout_s must be at least 1")
    timeout = f" timeout {timeout_s}s" if timeout_s is not None else ""
    # add + delete + add in one transaction: no error whether or not it was there, and a fresh timeout.
    _run_script(
        f"add element inet {table} {name} {{ {addr} }}\n"
        f"delete element inet {table} {name} {{ {addr} }}\n"
        f"add element inet {table} {name} {{ {addr}{timeout} }}\n",
        netns,
    )


def soft_remove(peer: str, *, netns: str | None = None, table: str = DEFAULT_TABLE) -> None:
    """Forget a soft association (no error when there is none)."""
    _check_name(table, "table")
    name, addr = _soft_set_of(peer)
    _run_script(
        f"add element inet {table} {name} {{ {addr} }}\ndelete element inet {table} {name} {{ {addr} }}\n", netns
    )


def soft_list(*, netns: str | None = None, table: str = DEFAULT_TABLE) -> dict[str, float]:
    """Soft-associated peers → seconds remaining (nft reports whole seconds). Empty without the table."""
    _check_name(table, "table")
    out: dict[str, float] = {}
    for name in _SOFT_SETS:
        out.update(_set_elements(table, name, netns))
    return out


def entry_counters(*, netns: str | None = None, table: str = DEFAULT_TABLE) -> dict[int, tuple[int, int]]:
    """Entry index → (packets, bytes), summed over the counters of the rules commented "pa:<index>"."""
    _check_name(table, "table")
    items = _json(["list", "table", "inet", table], netns)
    if items is None:
        raise NftError(f"cannot list table inet {table}")
    out: dict[int, tuple[int, int]] = {}
    for item in items:
        rule = item.get("rule")
        if not isinstance(rule, dict):
            continue
        comment = rule.get("comment", "")
        if not isinstance(comment, str) or not comment.startswith(ENTRY_COMMENT):
            continue
        try:
            index = int(comment[len(ENTRY_COMMENT) :])
        except ValueError:
            continue
        packets, nbytes = out.get(index, (0, 0))
        for expr in rule.get("expr", []):
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict):
                packets += int(counter.get("packets", 0))
                nbytes += int(counter.get("bytes", 0))
        out[index] = (packets, nbytes)
    return out


__all__ = [
    "ACQUIRE_PREFIX",
    "DROP_PREFIX",
    "NftError",
    "apply",
    "entry_counters",
    "flush",
    "render",
    "soft_add",
    "soft_list",
    "soft_remove",
]
