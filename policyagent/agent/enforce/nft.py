"""The host's filter table as one nftables table: render it, load it (whole or by difference), read it back.

Layout of table `inet <table>`; every name in it is derived from content, so the same entries and
exemptions always give the same table, however it was loaded:

    set soft4, soft6              peers allowed in clear after an IKE fallback (elements time out)
    chain e_in_<key>, e_out_<key> one entry's rules for one direction, every rule commented "pa:<key>"
    chain b_in_<h>, b_out_<h>     a run of consecutive entries: "<guard> jump e_<dir>_<key>", in order
    chain input, output           the base chains (hook, priority 0, policy accept):
        iif/oif "lo" accept
        exemptions                        (proto/port as source OR destination, peer CIDR)
        IPv6 neighbour discovery + MLD    (so IPv6 keeps working)
        jump b_<dir>_<h>                  the runs in order: entries most specific first

`<key>` is `entry_key(entry)`: 12 hex digits of SHA-256 over what the entry's rules are made of (id,
selector, verdict, flags, connection), not its position, so inserting an entry renames nothing else.
The guard of a jump is the entry's match (addresses, protocol, ports) when it has a single one, and
the entry chain holds the rest of each rule; an entry that matches in both IPv4 and IPv6 has an
unguarded jump and complete rules. A packet meets exactly the rules, in the same order, with the same
verdicts, as in the flat list "entry after entry, each rule prefixed with its match" (a chain that
gives no verdict returns to the next entry, as the flat list goes on), and one that matches no entry
costs one guard test per entry. Run boundaries are content-defined (after an entry whose key's last
byte is a multiple of 32, or after 128 entries): an edit changes the one or two runs around it, and
`<h>` (12 hex digits of SHA-256 over the run's keys) names a run by its content.

A NEGOTIATE entry is "must be protected": in output it passes only through the IPsec TUN device
(kernel-libipsec) or an IPsec route (kernel ESP, `tun=None`), or to a soft-associated peer when the
entry falls back to clear; anything else is logged to the agent's NFLOG group with prefix
`pa-acq:<key> ` (the trigger to negotiate with that peer) and dropped. In input it is accepted from
the TUN device / with a secpath, in clear when the entry allows inbound passthrough or the peer is
soft-associated, and otherwise dropped (rate-limited log `pa-drop:<key> `).

Two ways to load it:

- `apply(render(...))` replaces the whole table in one transaction (counters start again at zero).
- `NftTable.apply(entries, exemptions)` replaces it the first time, then submits only the difference,
  in one transaction: new entry and run chains are added, chains no longer used are deleted, and the
  base chains are flushed and refilled (a few dozen rules). Unchanged entries keep their chains,
  rules, handles and counters. Why chains and not rules inserted at a handle: nft 1.0.6 loads every
  rule of the ruleset into its cache for `insert/add rule ... position|index` and for `--echo`
  (about 0.2 s with 10,000 rules), but not for `add chain`, `add rule` (append), `flush chain`,
  `delete chain`, `delete rule ... handle`.

The soft sets' elements survive both (a full replace re-adds them with their remaining timeout).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from policyagent.agent.enforce.desired import BLOCK, NEGOTIATE, PERMIT, Exemption, FilterEntry, Selector

_log = logging.getLogger("policyagent.agent.enforce")

DEFAULT_TABLE = "policyagent"
DEFAULT_TUN = "ipsec0"
DEFAULT_LOG_GROUP = 7
ACQUIRE_PREFIX = "pa-acq:"  # + "<key> ": a packet that needs an SA and had none (output)
DROP_PREFIX = "pa-drop:"  # + "<key> ": clear inbound that had to arrive protected
ENTRY_COMMENT = "pa:"  # + "<key>": every rule generated for an entry
EXEMPT_COMMENT = "pa-ex:"  # + "<index>": rules generated for an exemption
ENTRY_CHAIN = "e_"  # + "<in|out>_<key>": one entry's rules
RUN_CHAIN = "b_"  # + "<in|out>_<h>": jumps to the entry chains of a run of entries
DROP_LOG_RATE = "10/second"
KEY_LENGTH = 12  # hex digits of an entry key / run name
RUN_MEAN = 32  # a run ends after an entry whose key's last byte is a multiple of this ...
RUN_MAX = 128  # ... or after this many entries

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
# (base chain, short name used in chain names, loopback accept)
_DIRECTIONS = (("input", "in", 'iif "lo"'), ("output", "out", 'oif "lo"'))

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Filters = tuple[tuple[FilterEntry, ...], tuple[Exemption, ...]]  # what a filter table is made from
Mode = Literal["full", "incremental", "unchanged"]


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


def _key_material(entry: FilterEntry) -> tuple[object, ...]:
    """Everything an entry's rules are made of (not its position, label or weight)."""
    sel = entry.selector
    return (
        entry.id,
        sel.src,
        sel.dst,
        sel.proto,
        sel.sport,
        sel.dport,
        entry.verdict,
        entry.inbound_passthrough,
        entry.fallback_to_clear,
        entry.connection,
    )


def _hash_key(material: tuple[object, ...]) -> str:
    blob = json.dumps(material, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def entry_key(entry: FilterEntry) -> str:
    """The entry's stable key: in its rules' comments ("pa:<key>"), log prefixes ("pa-acq:<key> ",
    "pa-drop:<key> ") and chain names. Changes exactly when what its rules are made of changes."""
    return _hash_key(_key_material(entry))


def _entry_parts(
    entry: FilterEntry,
    key: str,
    direction: str,
    matches: Sequence[tuple[int | None, str]],
    tun: str | None,
    log_group: int,
) -> list[tuple[str, list[str]]]:
    """Per IP family the selector can match (`matches`): (the match, the rest of each rule for it)."""
    comment = f'comment "{ENTRY_COMMENT}{key}"'
    out: list[tuple[str, list[str]]] = []
    for fam, match in matches:
        tails: list[str] = []
        if entry.verdict == PERMIT:
            tails.append(_rule("counter accept", comment))
        elif entry.verdict == BLOCK:
            tails.append(_rule("counter drop", comment))
        elif entry.verdict == NEGOTIATE and direction == "output":
            tails.append(_rule(f'oifname "{tun}"' if tun else "rt ipsec exists", "counter accept", comment))
            if entry.fallback_to_clear:
                tails += [_rule(soft, "counter accept", comment) for soft in _soft_checks(fam, direction)]
            tails.append(_rule(f'log prefix "{ACQUIRE_PREFIX}{key} " group {log_group}', "counter drop", comment))
        elif entry.verdict == NEGOTIATE:
            tails.append(_rule(f'iifname "{tun}"' if tun else "meta ipsec exists", "counter accept", comment))
            if entry.inbound_passthrough:
                tails.append(_rule("counter accept", comment))
            else:
                if entry.fallback_to_clear:
                    tails += [_rule(soft, "counter accept", comment) for soft in _soft_checks(fam, direction)]
                tails.append(
                    _rule(f'limit rate {DROP_LOG_RATE} log prefix "{DROP_PREFIX}{key} " group {log_group}', comment)
                )
                tails.append(_rule("counter drop", comment))
        else:
            raise ValueError(f"entry {entry.index}: unknown verdict {entry.verdict!r}")
        out.append((match, tails))
    return out


@dataclass(frozen=True)
class _Rendered:
    """One entry's chains, as `entry_key()` determines them (the same for every entry with that key)."""

    key: str
    material: tuple[object, ...]
    chains: tuple[tuple[str, tuple[str, ...]], ...]  # per direction (guard, rules); () = matches no packet


def _render_entry(
    entry: FilterEntry, key: str, material: tuple[object, ...], tun: str | None, log_group: int
) -> _Rendered:
    matches = _selector_matches(entry.selector)
    if not matches:  # the selector's sides share no IP family
        return _Rendered(key, material, ())
    chains: list[tuple[str, tuple[str, ...]]] = []
    for direction, _short, _lo in _DIRECTIONS:
        parts = _entry_parts(entry, key, direction, matches, tun, log_group)
        if len(parts) == 1:
            chains.append((parts[0][0], tuple(parts[0][1])))
        else:
            chains.append(("", tuple(_rule(match, tail) for match, tails in parts for tail in tails)))
    return _Rendered(key, material, tuple(chains))


def _run_name(keys: Sequence[str]) -> str:
    return hashlib.sha256(" ".join(keys).encode()).hexdigest()[:KEY_LENGTH]


def _runs(keys: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The entry keys (in order) cut into runs with content-defined boundaries: (name, keys) each."""
    runs: list[tuple[str, ...]] = []
    current: list[str] = []
    for key in keys:
        current.append(key)
        if int(key[-2:], 16) % RUN_MEAN == 0 or len(current) >= RUN_MAX:
            runs.append(tuple(current))
            current = []
    if current:
        runs.append(tuple(current))
    named: dict[str, tuple[str, ...]] = {}
    for run in runs:
        if named.setdefault(_run_name(run), run) != run:  # pragma: no cover - a 48-bit hash collision
            raise ValueError("two runs of filter entries hash to the same chain name")
    return tuple((_run_name(run), run) for run in runs)


@dataclass(frozen=True)
class _Layout:
    """What a loaded table is made of, apart from the entry chains' contents (named by their keys)."""

    exemptions: tuple[Exemption, ...]
    runs: tuple[tuple[str, tuple[str, ...]], ...]

    def keys(self) -> list[str]:
        """Keys of the entry chains, in order of first use, without repeats."""
        return list(dict.fromkeys(key for _name, run in self.runs for key in run))


def _check_settings(table: str, tun: str | None, log_group: int, soft_timeout_s: int) -> None:
    _check_name(table, "table")
    if tun is not None and not _IFNAME_RE.match(tun):
        raise ValueError(f"invalid interface name: {tun!r}")
    if not 0 <= log_group <= 65535:
        raise ValueError(f"invalid NFLOG group {log_group}")
    if soft_timeout_s < 1:
        raise ValueError("soft_timeout_s must be at least 1")


class _Renderer:
    """Renders entries, each key once: what it rendered stays cached until `prune()`."""

    def __init__(self, tun: str | None, log_group: int) -> None:
        self.tun, self.log_group = tun, log_group
        self.cache: dict[str, _Rendered] = {}  # by key
        self._by_material: dict[tuple[object, ...], _Rendered] = {}  # spares hashing entries seen before

    def entries(self, entries: Iterable[FilterEntry]) -> list[tuple[FilterEntry, _Rendered]]:
        out: list[tuple[FilterEntry, _Rendered]] = []
        for entry in entries:
            material = _key_material(entry)
            done = self._by_material.get(material)
            if done is None:
                key = _hash_key(material)
                other = self.cache.get(key)
                if other is not None and other.material != material:  # pragma: no cover - 48-bit hash collision
                    raise ValueError(f"entries {other.material[0]!r} and {entry.id!r} have the same key {key}")
                done = _render_entry(entry, key, material, self.tun, self.log_group)
                self.cache[key] = self._by_material[material] = done
            out.append((entry, done))
        return out

    def prune(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        self.cache = {k: v for k, v in self.cache.items() if k in keep}
        self._by_material = {v.material: v for v in self.cache.values()}


def _layout(rendered: Sequence[tuple[FilterEntry, _Rendered]], exemptions: Sequence[Exemption]) -> _Layout:
    return _Layout(tuple(exemptions), _runs([r.key for _e, r in rendered if r.chains]))


def _base_rules(direction: str, short: str, lo: str, layout: _Layout) -> list[str]:
    """The base chain's rules (script comments for the exemptions included: lines starting with '#')."""
    rules = [f"{lo} accept"]
    for i, ex in enumerate(layout.exemptions):
        rules.append(f"# exemption {i}: {_clean(ex.reason)}")
        rules += _exemption_rules(i, ex, direction)
    rules.append(f'icmpv6 type {{ {", ".join(ICMPV6_ALWAYS)} }} accept comment "pa-nd"')
    rules += [f"jump {RUN_CHAIN}{short}_{name}" for name, _run in layout.runs]
    return rules


def _run_rules(short: str, run: Sequence[str], rendered: Mapping[str, _Rendered], index: int) -> list[str]:
    return [_rule(rendered[key].chains[index][0], f"jump {ENTRY_CHAIN}{short}_{key}") for key in run]


def _script(
    table: str,
    soft_timeout_s: int,
    rendered: Sequence[tuple[FilterEntry, _Rendered]],
    layout: _Layout,
) -> str:
    """The complete script for the table (see the module docstring)."""
    by_key = {r.key: r for _e, r in rendered}
    lines = [
        f"table inet {table} {{",
        f"\tset soft4 {{ type ipv4_addr; flags timeout; timeout {soft_timeout_s}s; }}",
        f"\tset soft6 {{ type ipv6_addr; flags timeout; timeout {soft_timeout_s}s; }}",
    ]
    for entry, r in rendered:
        if not r.chains:
            lines.append(
                f"\t# entry {entry.index} {entry.verdict}: {_clean(entry.label or entry.id)} (matches no packet: "
                "source and destination share no IP family)"
            )
    for index, (_direction, short, _lo) in enumerate(_DIRECTIONS):
        seen: set[str] = set()
        for entry, r in rendered:
            if not r.chains or r.key in seen:
                continue
            seen.add(r.key)
            lines.append(
                f"\tchain {ENTRY_CHAIN}{short}_{r.key} {{ # entry {entry.index} {entry.verdict}: "
                f"{_clean(entry.label or entry.id)}"
            )
            lines += [f"\t\t{rule}" for rule in r.chains[index][1]]
            lines.append("\t}")
    for index, (_direction, short, _lo) in enumerate(_DIRECTIONS):
        for name, run in dict(layout.runs).items():
            lines.append(f"\tchain {RUN_CHAIN}{short}_{name} {{")
            lines += [f"\t\t{rule}" for rule in _run_rules(short, run, by_key, index)]
            lines.append("\t}")
    for direction, short, lo in _DIRECTIONS:
        lines += ["", f"\tchain {direction} {{", f"\t\ttype filter hook {direction} priority 0; policy accept;"]
        lines += [f"\t\t{rule}" for rule in _base_rules(direction, short, lo, layout)]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


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
    _check_settings(table, tun, log_group, soft_timeout_s)
    rendered = _Renderer(tun, log_group).entries(entries)
    return _script(table, soft_timeout_s, rendered, _layout(rendered, exemptions))


def _diff_script(table: str, old: _Layout, new: _Layout, rendered: Mapping[str, _Rendered]) -> str:
    """One transaction that turns a loaded table made of `old` into one made of `new`.

    Order matters: the base chains are flushed first (nothing jumps to the old runs any more), then
    old runs are deleted (nothing jumps to removed entries' chains any more), then removed entries'
    chains; new entry chains exist before the new runs that jump to them, which exist before the
    base chains are refilled."""
    t = f"inet {table}"
    old_runs, new_runs = dict(old.runs), dict(new.runs)
    old_keys, new_keys = old.keys(), new.keys()
    gone_keys, added_keys = set(old_keys) - set(new_keys), set(new_keys) - set(old_keys)
    lines = [f"flush chain {t} {direction}" for direction, _short, _lo in _DIRECTIONS]
    for name in old_runs:
        if name not in new_runs:
            lines += [f"delete chain {t} {RUN_CHAIN}{short}_{name}" for _d, short, _lo in _DIRECTIONS]
    for key in old_keys:
        if key in gone_keys:
            lines += [f"delete chain {t} {ENTRY_CHAIN}{short}_{key}" for _d, short, _lo in _DIRECTIONS]
    for key in new_keys:
        if key not in added_keys:
            continue
        for index, (_direction, short, _lo) in enumerate(_DIRECTIONS):
            chain = f"{ENTRY_CHAIN}{short}_{key}"
            lines.append(f"add chain {t} {chain}")
            lines += [f"add rule {t} {chain} {rule}" for rule in rendered[key].chains[index][1]]
    for name, run in new_runs.items():
        if name in old_runs:
            continue
        for index, (_direction, short, _lo) in enumerate(_DIRECTIONS):
            chain = f"{RUN_CHAIN}{short}_{name}"
            lines.append(f"add chain {t} {chain}")
            lines += [f"add rule {t} {chain} {rule}" for rule in _run_rules(short, run, rendered, index)]
    for direction, short, lo in _DIRECTIONS:
        lines += [f"add rule {t} {direction} {r}" for r in _base_rules(direction, short, lo, new) if r[0] != "#"]
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


def _replace(table: str, script: str, netns: str | None) -> None:
    """Replace table `inet <table>` with `script` (which defines it) in one transaction, soft sets kept."""
    carry: list[str] = []
    for name in _SOFT_SETS:
        if not re.search(rf"^\s*set {name} \{{", script, re.MULTILINE):
            continue
        for addr, remaining in _set_elements(table, name, netns).items():
            if remaining >= 1:
                carry.append(f"add element inet {table} {name} {{ {addr} timeout {int(remaining)}s }}")
    full = "\n".join([f"table inet {table}", f"delete table inet {table}", script.rstrip("\n"), *carry]) + "\n"
    _run_script(full, netns)


def apply(script: str, *, netns: str | None = None) -> None:
    """Replace table `inet <table>` (the one `script` defines) with `script` in one transaction.

    The soft sets' elements are read first and re-added with their remaining timeout, in the same
    transaction. Raises NftError (nft's stderr) on failure; the loaded table is then unchanged."""
    match = _TABLE_RE.search(script)
    if not match:
        raise NftError("script defines no 'table inet <name> {'", script)
    _replace(match.group(1), script, netns)


def flush(*, netns: str | None = None, table: str = DEFAULT_TABLE) -> None:
    """Delete the table (no error when it is not there)."""
    _check_name(table, "table")
    _run_script(f"table inet {table}\ndelete table inet {table}\n", netns)


class NftTable:
    """The filter table of one host (or namespace), kept in step with the entries by difference.

    `apply(entries, exemptions)` makes the table hold exactly what `render(entries, exemptions, ...)`
    describes. The first time (and after `flush()`, or when the table is gone or an incremental
    transaction fails) it replaces the whole table in one transaction, soft-set elements kept; then
    it submits only the difference in one transaction (see the module docstring): entries that did
    not change keep their rules, handles and counters, and an entry is rendered once per key. On any
    error it raises NftError and the loaded table stays as it was. Not thread-safe: one caller at a
    time (the enforcer holds its lock)."""

    def __init__(
        self,
        *,
        tun: str | None,
        log_group: int,
        table: str = DEFAULT_TABLE,
        netns: str | None = None,
        soft_timeout_s: int = 300,
    ) -> None:
        _check_settings(table, tun, log_group, soft_timeout_s)
        self.table, self.tun, self.log_group, self.netns = table, tun, log_group, netns
        self.soft_timeout_s = soft_timeout_s
        self._renderer = _Renderer(tun, log_group)
        self._loaded: _Layout | None = None  # what the kernel table is made of; None = unknown
        self._keys: dict[str, FilterEntry] = {}
        self.last_mode: Mode | None = None  # how the last successful apply() went
        self.last_script = ""  # what the last apply() submitted ("" when unchanged)
        self.fallback_reason = ""  # why the last apply() replaced the table after an incremental failure

    def keys(self) -> dict[str, FilterEntry]:
        """Entry key (as in the log prefixes) → entry, for the loaded entries. Do not modify it: it is
        replaced, not changed, by `apply()`."""
        return self._keys

    def _exists(self) -> bool:
        """Is the table there? (Listing a set is cheap; listing the table or tables fetches every rule.)"""
        return _nft(["list", "set", "inet", self.table, "soft4"], netns=self.netns).returncode == 0

    def _prepare(
        self, entries: Sequence[FilterEntry], exemptions: Sequence[Exemption]
    ) -> tuple[list[tuple[FilterEntry, _Rendered]], _Layout]:
        rendered = self._renderer.entries(entries)
        return rendered, _layout(rendered, exemptions)

    def apply(self, entries: Sequence[FilterEntry], exemptions: Sequence[Exemption]) -> None:
        """Make the table hold `entries` (most specific first) and `exemptions`. Raises ValueError when
        something cannot be rendered, NftError when nft refuses (the table is then unchanged)."""
        rendered, layout = self._prepare(entries, exemptions)
        mode: Mode = "full"
        script = ""
        self.fallback_reason = ""
        if self._loaded is not None and layout == self._loaded:
            if self._exists():
                mode = "unchanged"
        elif self._loaded is not None:
            script = _diff_script(self.table, self._loaded, layout, self._renderer.cache)
            try:
                _run_script(script, self.netns)
                mode = "incremental"
            except NftError as exc:
                self.fallback_reason = str(exc)
                _log.warning("incremental filter table update failed (%s); replacing the whole table", exc)
        if mode == "full":
            script = _script(self.table, self.soft_timeout_s, rendered, layout)
            _replace(self.table, script, self.netns)
        self._loaded = layout
        keys: dict[str, FilterEntry] = {}
        for entry, r in rendered:
            keys.setdefault(r.key, entry)  # the same key twice: the same rules; the first (most specific) wins
        self._keys = keys
        self._renderer.prune(keys)
        self.last_mode, self.last_script = mode, script

    def flush(self) -> None:
        """Delete the table (no error when it is not there); the next apply() replaces it whole."""
        self._loaded = None
        self._keys = {}
        flush(netns=self.netns, table=self.table)


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


def entry_counters(*, netns: str | None = None, table: str = DEFAULT_TABLE) -> dict[str, tuple[int, int]]:
    """Entry key → (packets, bytes), summed over the counters of the rules commented "pa:<key>"."""
    _check_name(table, "table")
    items = _json(["list", "table", "inet", table], netns)
    if items is None:
        raise NftError(f"cannot list table inet {table}")
    out: dict[str, tuple[int, int]] = {}
    for item in items:
        rule = item.get("rule")
        if not isinstance(rule, dict):
            continue
        comment = rule.get("comment", "")
        if not isinstance(comment, str) or not comment.startswith(ENTRY_COMMENT):
            continue
        key = comment[len(ENTRY_COMMENT) :]
        packets, nbytes = out.get(key, (0, 0))
        for expr in rule.get("expr", []):
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict):
                packets += int(counter.get("packets", 0))
                nbytes += int(counter.get("bytes", 0))
        out[key] = (packets, nbytes)
    return out


__all__ = [
    "ACQUIRE_PREFIX",
    "DROP_PREFIX",
    "ENTRY_COMMENT",
    "Filters",
    "NftError",
    "NftTable",
    "apply",
    "entry_counters",
    "entry_key",
    "flush",
    "render",
    "soft_add",
    "soft_list",
    "soft_remove",
]
