"""The setting table: one description per setting.

Each `Setting` says what a netsh parameter accepts (kind, range, choices,
default, unit) and what it means. The same objects drive
  * parsing and help in the `netsh` client (clients/netsh),
  * range and name checks in the validator (policyagent.model.validate), which
    names violations by these settings' names, and
  * the generated reference (docs/netsh-static.md, `python -m policyagent.model.settings`).
so the three never drift apart. `STATIC_COMMANDS` lists the `netsh ipsec static`
commands (Windows Server 2003 names, windows-ipsec.md §3.2) with their parameters.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field

from policyagent.model import algorithms as alg
from policyagent.model.errors import ValidationError, Violation
from policyagent.pb import pb


class ValueKind(enum.Enum):
    TEXT = "string"
    NAME = "name"
    BOOL = "yes|no"
    INT = "integer"
    CHOICE = "choice"
    ADDRESS = "address"
    MASK = "mask"
    PORT = "port"
    PROTOCOL = "protocol"
    MMSECMETHODS = "main mode methods"
    QMSECMETHODS = "quick mode methods"
    ROOTCA = "root CA"
    PSK = "pre-shared key"
    TUNNEL = "tunnel endpoint"
    FILE = "file"
    RULE_ID = "rule number"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: ValueKind
    summary: str
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    default: str | None = None
    unit: str = ""
    repeatable: bool = False
    details: str = ""

    def fail(self, message: str) -> ValidationError:
        return ValidationError(Violation("", self.name, message))

    def in_range(self, value: int) -> bool:
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)

    def range_text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.minimum:,}–{self.maximum:,}{unit}".replace(",", " ")

    def check_range(self, value: int, path: str) -> list[Violation]:
        """The validator's range check, naming this setting."""
        if self.in_range(value):
            return []
        return [Violation(path, self.name, f"{value} is out of range ({self.range_text()})")]

    def syntax(self) -> str:
        """How the value is written, for help: `<integer 5–2880 minutes>`."""
        if self.kind is ValueKind.CHOICE:
            return "|".join(self.choices)
        if self.kind is ValueKind.BOOL:
            return "yes|no"
        if self.kind is ValueKind.INT and self.minimum is not None:
            return f"<integer {self.range_text()}>"
        return f"<{self.kind.value}>"

    def parse(self, raw: str) -> object:
        """The typed value of a netsh argument; raises ValidationError naming this setting."""
        return _PARSERS[self.kind](self, raw)


# ----------------------------------------------------------------- parsers


def _parse_text(s: Setting, raw: str) -> str:
    if "\x00" in raw:
        raise s.fail("must not contain NUL characters")
    if s.maximum is not None and len(raw) > s.maximum:
        raise s.fail(f"is longer than {s.maximum} characters")
    return raw


def _parse_name(s: Setting, raw: str) -> str:
    value = _parse_text(s, raw).strip()
    if not value:
        raise s.fail("must not be empty")
    return value


def parse_bool(raw: str) -> bool | None:
    value = raw.strip().lower()
    if value in ("yes", "y", "true", "1", "enable", "on"):
        return True
    if value in ("no", "n", "false", "0", "disable", "off"):
        return False
    return None


def _parse_bool(s: Setting, raw: str) -> bool:
    value = parse_bool(raw)
    if value is None:
        raise s.fail(f'"{raw}" is not yes or no')
    return value


def _parse_int(s: Setting, raw: str) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise s.fail(f'"{raw}" is not a whole number') from None
    if not s.in_range(value):
        raise s.fail(f"{value} is out of range ({s.range_text()})")
    return value


def _parse_choice(s: Setting, raw: str) -> str:
    value = raw.strip().lower()
    matches = [c for c in s.choices if c == value] or [c for c in s.choices if c.startswith(value)]
    if len(matches) != 1 or not value:
        raise s.fail(f'"{raw}" is not one of {", ".join(s.choices)}')
    return matches[0]


@dataclass(frozen=True)
class DnsName:
    """A DNS name given for an address: netsh resolves it once, when the filter is created."""

    name: str


SERVER_KEYWORDS: dict[str, int] = {
    "dns": pb.ADDRESS_KIND_DNS_SERVERS,
    "wins": pb.ADDRESS_KIND_WINS_SERVERS,
    "dhcp": pb.ADDRESS_KIND_DHCP_SERVER,
    "gateway": pb.ADDRESS_KIND_DEFAULT_GATEWAY,
}
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _parse_address(s: Setting, raw: str) -> pb.Address | DnsName:
    value = raw.strip()
    low = value.lower()
    if low == "me":
        return pb.Address(kind=pb.ADDRESS_KIND_ME)
    if low == "any":
        return pb.Address(kind=pb.ADDRESS_KIND_ANY)
    if low in SERVER_KEYWORDS:
        return pb.Address(kind=SERVER_KEYWORDS[low])  # type: ignore[arg-type]
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=str(ip))
    if re.fullmatch(r"[0-9.]+", value):
        raise s.fail(f'"{raw}" is not a valid IPv4 address')
    labels = value.rstrip(".").split(".")
    if value and len(value) <= 253 and all(_DNS_LABEL.match(label) for label in labels):
        return DnsName(value.rstrip("."))
    raise s.fail(f'"{raw}" is not an IP address, a DNS name, or one of me, any, dns, wins, dhcp, gateway')


def _parse_mask(s: Setting, raw: str) -> str:
    value = raw.strip()
    try:
        return normalize_mask(value)
    except ValueError as exc:
        raise s.fail(str(exc)) from None


def normalize_mask(value: str, version: int = 4) -> str:
    """A mask as dotted IPv4 ("255.255.255.0") or prefix length ("24"); contiguous only.

    Returns the canonical form: dotted for IPv4, prefix length for IPv6.
    Raises ValueError with the reason.
    """
    if value.isdigit():
        prefix = int(value)
        limit = 32 if version == 4 else 128
        if prefix > limit:
            raise ValueError(f'prefix length "{value}" is out of range (0–{limit})')
        if version == 6:
            return str(prefix)
        return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    try:
        mask = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f'"{value}" is not a mask (dotted like 255.255.255.0, or a prefix length)') from None
    bits = int(mask)
    inverted = (~bits) & 0xFFFFFFFF
    if inverted & (inverted + 1):
        raise ValueError(f'mask "{value}" is not contiguous (its one-bits must all come first)')
    if version == 6:
        raise ValueError("an IPv6 subnet needs a prefix length, not a dotted mask")
    return str(mask)


def mask_prefix(mask: str) -> int:
    if mask.isdigit():
        return int(mask)
    return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen


def _parse_port(s: Setting, raw: str) -> int:
    return _parse_int(s, raw)


PROTOCOL_NAMES: dict[str, int] = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17, "raw": 255}
PROTOCOL_DISPLAY: dict[int, str] = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 255: "RAW"}


def protocol_text(number: int) -> str:
    return PROTOCOL_DISPLAY.get(number, str(number))


def _parse_protocol(s: Setting, raw: str) -> int:
    value = raw.strip().lower()
    if value in PROTOCOL_NAMES:
        return PROTOCOL_NAMES[value]
    try:
        number = int(value, 10)
    except ValueError:
        raise s.fail(f'"{raw}" is not ANY, ICMP, TCP, UDP, RAW or a protocol number') from None
    if not 0 <= number <= 255:
        raise s.fail(f"protocol number {number} is out of range (0–255)")
    return number


def _parse_mmsecmethods(s: Setting, raw: str) -> list[pb.MainModeMethod]:
    methods: list[pb.MainModeMethod] = []
    tokens = raw.replace(",", " ").split()
    if not tokens:
        raise s.fail("needs at least one method, like 3DES-SHA1-2")
    for token in tokens:
        parts = token.upper().split("-")
        if len(parts) != 3:
            raise s.fail(f'"{token}" is not ConfAlg-HashAlg-GroupNum (like 3DES-SHA1-2)')
        conf, hash_, group = parts
        if conf not in alg.CIPHERS or alg.CIPHERS[conf] not in alg.MM_CIPHERS:
            raise s.fail(f'"{token}": unknown encryption algorithm "{conf}"')
        if hash_ not in alg.INTEGRITIES or alg.INTEGRITIES[hash_] not in alg.MM_INTEGRITIES:
            raise s.fail(f'"{token}": unknown integrity algorithm "{hash_}"')
        if group not in alg.DH_GROUPS:
            raise s.fail(f'"{token}": unknown DH group "{group}" (1, 2, 3 = 2048-bit, 14, 15, 16, 19, 20)')
        methods.append(
            pb.MainModeMethod(
                encryption=alg.CIPHERS[conf],  # type: ignore[arg-type]
                integrity=alg.INTEGRITIES[hash_],  # type: ignore[arg-type]
                dh_group=alg.DH_GROUPS[group],  # type: ignore[arg-type]
            )
        )
    return methods


def format_mmsecmethods(methods: list[pb.MainModeMethod]) -> str:
    return " ".join(
        f"{alg.cipher_name(m.encryption)}-{alg.integrity_name(m.integrity)}-{alg.dh_netsh(m.dh_group)}" for m in methods
    )


DEFAULT_QM_KB = 100_000
DEFAULT_QM_SECONDS = 3_600
_QM_PART = re.compile(r"^(AH|ESP)\[([^\]]*)\]$", re.IGNORECASE)
_QM_LIFE = re.compile(r"^(?:(\d+)K)?(?:/)?(?:(\d+)S)?$", re.IGNORECASE)


def _parse_qmsecmethods(s: Setting, raw: str) -> list[pb.QuickModeMethod]:
    methods: list[pb.QuickModeMethod] = []
    tokens = raw.split()
    if not tokens:
        raise s.fail("needs at least one method, like ESP[3DES,SHA1]")
    for token in tokens:
        body, _, life = token.partition(":")
        method = pb.QuickModeMethod(lifetime_kb=DEFAULT_QM_KB, lifetime_seconds=DEFAULT_QM_SECONDS)
        for part in body.split("+"):
            m = _QM_PART.match(part.strip())
            if not m:
                raise s.fail(f'"{token}" is not AH[Hash], ESP[Conf,Hash] or AH[Hash]+ESP[Conf,Hash]')
            proto, args = m.group(1).upper(), [a.strip().upper() for a in m.group(2).split(",")]
            if proto == "AH":
                if method.HasField("ah"):
                    raise s.fail(f'"{token}" has AH twice')
                if len(args) != 1 or args[0] not in alg.INTEGRITIES:
                    raise s.fail(f'"{token}": AH takes one integrity algorithm (MD5, SHA1, ...)')
                method.ah.integrity = alg.INTEGRITIES[args[0]]  # type: ignore[assignment]
            else:
                if method.HasField("esp"):
                    raise s.fail(f'"{token}" has ESP twice')
                if len(args) != 2:
                    raise s.fail(f'"{token}": ESP takes an encryption and an integrity algorithm')
                if args[0] not in alg.CIPHERS:
                    raise s.fail(f'"{token}": unknown encryption algorithm "{args[0]}"')
                if args[1] not in alg.INTEGRITIES:
                    raise s.fail(f'"{token}": unknown integrity algorithm "{args[1]}"')
                method.esp.encryption = alg.CIPHERS[args[0]]  # type: ignore[assignment]
                method.esp.integrity = alg.INTEGRITIES[args[1]]  # type: ignore[assignment]
        if life:
            lm = _QM_LIFE.match(life.strip())
            if not lm or not (lm.group(1) or lm.group(2)):
                raise s.fail(f'"{token}": lifetime "{life}" is not like 100000k/3600s')
            if lm.group(1):
                method.lifetime_kb = int(lm.group(1))
            if lm.group(2):
                method.lifetime_seconds = int(lm.group(2))
        methods.append(method)
    return methods


def format_qmsecmethod(m: pb.QuickModeMethod) -> str:
    parts = []
    if m.HasField("ah"):
        parts.append(f"AH[{alg.integrity_name(m.ah.integrity)}]")
    if m.HasField("esp"):
        parts.append(f"ESP[{alg.cipher_name(m.esp.encryption)},{alg.integrity_name(m.esp.integrity)}]")
    return "+".join(parts) + f":{m.lifetime_kb}k/{m.lifetime_seconds}s"


def format_qmsecmethods(methods: list[pb.QuickModeMethod]) -> str:
    return " ".join(format_qmsecmethod(m) for m in methods)


_RDN_ATTR = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)$")


def split_dn(dn: str) -> list[tuple[str, str]]:
    """Split an X.500 name ("CN=Root, O=Example") into (attribute, value) pairs.

    Raises ValueError naming the problem. Commas and plus signs inside values
    must be escaped with a backslash or quoted, as in RFC 4514.
    """
    rdns: list[tuple[str, str]] = []
    current = ""
    quoted = False
    escaped = False
    pieces: list[str] = []
    for ch in dn:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current += ch
        elif ch in ",;+" and not quoted:
            pieces.append(current)
            current = ""
        else:
            current += ch
    if quoted:
        raise ValueError("has an unclosed quote")
    if escaped:
        raise ValueError("ends with a lone backslash")
    pieces.append(current)
    for piece in pieces:
        attr, eq, value = piece.partition("=")
        attr, value = attr.strip(), value.strip()
        if not eq:
            raise ValueError(f'"{piece.strip()}" is not attribute=value')
        if not _RDN_ATTR.match(attr):
            raise ValueError(f'"{attr}" is not an attribute name')
        if not value:
            raise ValueError(f'attribute "{attr}" has no value')
        rdns.append((attr, value))
    return rdns


@dataclass(frozen=True)
class RootCa:
    root_ca: str
    certmap: bool = False
    exclude_ca_name: bool = False


def _parse_rootca(s: Setting, raw: str) -> RootCa:
    # netsh: rootca="<CA name> certmap:yes|no excludecaname:yes|no"; \' stands for a quote.
    text = raw.replace("\\'", '"').strip()
    certmap = exclude = False
    while True:
        m = re.search(r"(?:^|\s+)(certmap|excludecaname):(\S+)\s*$", text, re.IGNORECASE)
        if not m:
            break
        flag = parse_bool(m.group(2))
        if flag is None:
            raise s.fail(f'{m.group(1).lower()}: "{m.group(2)}" is not yes or no')
        if m.group(1).lower() == "certmap":
            certmap = flag
        else:
            exclude = flag
        text = text[: m.start()].strip()
    if not text:
        raise s.fail('needs the root CA\'s name, like "CN=Example Root CA, O=Example"')
    try:
        split_dn(text)
    except ValueError as exc:
        raise s.fail(f'"{text}" is not an X.500 name: {exc}') from None
    return RootCa(text, certmap, exclude)


def _parse_psk(s: Setting, raw: str) -> str:
    if not raw:
        raise s.fail("the pre-shared key must not be empty")
    if "\x00" in raw:
        raise s.fail("the pre-shared key must not contain NUL characters")
    return raw


def _parse_tunnel(s: Setting, raw: str) -> str | DnsName:
    if raw.strip().lower() == "none":
        return ""  # no tunnel endpoint: transport mode (how `set rule` removes a tunnel)
    value = _parse_address(s, raw)
    if isinstance(value, DnsName):
        return value
    if value.kind != pb.ADDRESS_KIND_HOST:
        raise s.fail(f'"{raw}" is not an IP address or DNS name')
    return value.ip


def _parse_file(s: Setting, raw: str) -> str:
    return _parse_name(s, raw)


_PARSERS = {
    ValueKind.TEXT: _parse_text,
    ValueKind.NAME: _parse_name,
    ValueKind.BOOL: _parse_bool,
    ValueKind.INT: _parse_int,
    ValueKind.CHOICE: _parse_choice,
    ValueKind.ADDRESS: _parse_address,
    ValueKind.MASK: _parse_mask,
    ValueKind.PORT: _parse_port,
    ValueKind.PROTOCOL: _parse_protocol,
    ValueKind.MMSECMETHODS: _parse_mmsecmethods,
    ValueKind.QMSECMETHODS: _parse_qmsecmethods,
    ValueKind.ROOTCA: _parse_rootca,
    ValueKind.PSK: _parse_psk,
    ValueKind.TUNNEL: _parse_tunnel,
    ValueKind.FILE: _parse_file,
    ValueKind.RULE_ID: _parse_int,
}

# ---------------------------------------------------------------- settings
# Ranges marked [U] in windows-ipsec.md are our choices; docs/policy-model.md lists them.

NAME = Setting("name", ValueKind.NAME, "Name of the object.", maximum=255)
NEWNAME = Setting("newname", ValueKind.NAME, "New name for the object.", maximum=255)
GUID = Setting("guid", ValueKind.NAME, "The object's GUID (instead of its name).")
DESCRIPTION = Setting("description", ValueKind.TEXT, "Free-text description.", maximum=1024, default="")
MMPFS = Setting("mmpfs", ValueKind.BOOL, "Master key perfect forward secrecy (forces qmpermm=1).", default="no")
QMPERMM = Setting(
    "qmpermm",
    ValueKind.INT,
    "Quick mode sessions per main mode (0 = unlimited).",
    minimum=0,
    maximum=2_147_483_647,
    default="0",
)
IKEVERSION = Setting(
    "ikeversion",
    ValueKind.INT,
    "IKE version: 1 (main mode + quick mode, what Windows speaks) or 2 (IKEv2; a policyagent extension).",
    minimum=1,
    maximum=2,
    default="1",
)
MMLIFETIME = Setting(
    "mmlifetime",
    ValueKind.INT,
    "Main mode (master key) lifetime.",
    minimum=5,
    maximum=2_880,
    default="480",
    unit="minutes",
)
ACTIVATEDEFAULTRULE = Setting(
    "activatedefaultrule", ValueKind.BOOL, "Activate the default response rule.", default="yes"
)
POLLINGINTERVAL = Setting(
    "pollinginterval",
    ValueKind.INT,
    "How often agents check for policy changes.",
    minimum=1,
    maximum=43_200,
    default="180",
    unit="minutes",
)
ASSIGN = Setting("assign", ValueKind.BOOL, "Assign the policy in this store (unassigns any other).", default="no")
MMSECMETHODS = Setting(
    "mmsecmethods",
    ValueKind.MMSECMETHODS,
    "Main mode security methods in order of preference, separated by spaces.",
    default="3DES-SHA1-2 3DES-MD5-2 DES-SHA1-1 DES-MD5-1",
    details=(
        "Each method is ConfAlg-HashAlg-GroupNum. ConfAlg: DES, 3DES, AES128, AES192, AES256. "
        "HashAlg: MD5, SHA1, SHA256, SHA384, SHA512. GroupNum: 1 (768-bit), 2 (1024-bit), "
        "3 (2048-bit, sent as IKE group 14), 14, 15, 16, 19, 20."
    ),
)
GPONAME = Setting("gponame", ValueKind.NAME, "Group Policy object to assign the policy to (domain store).")

FILTERLIST = Setting("filterlist", ValueKind.NAME, "Name of the filter list.")
SRCADDR = Setting(
    "srcaddr",
    ValueKind.ADDRESS,
    "Source address.",
    details="me, any, an IP address, a DNS name (resolved once, now), or dns|wins|dhcp|gateway.",
)
DSTADDR = Setting("dstaddr", ValueKind.ADDRESS, "Destination address.", details=SRCADDR.details)
SRCMASK = Setting("srcmask", ValueKind.MASK, "Source mask or prefix length.", default="255.255.255.255")
DSTMASK = Setting("dstmask", ValueKind.MASK, "Destination mask or prefix length.", default="255.255.255.255")
PROTOCOL = Setting(
    "protocol", ValueKind.PROTOCOL, "IP protocol: ANY, ICMP, TCP, UDP, RAW or a number 0–255.", default="ANY"
)
SRCPORT = Setting(
    "srcport", ValueKind.PORT, "Source port (TCP/UDP only; 0 = any).", minimum=0, maximum=65_535, default="0"
)
DSTPORT = Setting(
    "dstport", ValueKind.PORT, "Destination port (TCP/UDP only; 0 = any).", minimum=0, maximum=65_535, default="0"
)
MIRRORED = Setting("mirrored", ValueKind.BOOL, "Also match traffic in the reverse direction.", default="yes")

QMPFS = Setting("qmpfs", ValueKind.BOOL, "Session key perfect forward secrecy.", default="no")
INPASS = Setting(
    "inpass", ValueKind.BOOL, "Accept unsecured communication, but always respond using IPsec.", default="no"
)
SOFT = Setting(
    "soft", ValueKind.BOOL, "Allow unsecured communication with computers that do not answer IKE.", default="no"
)
ACTION = Setting(
    "action",
    ValueKind.CHOICE,
    "What the filter action does.",
    choices=("permit", "block", "negotiate"),
    default="negotiate",
)
QMSECMETHODS = Setting(
    "qmsecmethods",
    ValueKind.QMSECMETHODS,
    "Quick mode security methods in order of preference, separated by spaces.",
    default="ESP[3DES,SHA1] ESP[3DES,MD5] ESP[DES,SHA1] ESP[DES,MD5]",
    details=(
        "Each method is ESP[ConfAlg,AuthAlg], AH[HashAlg] or AH[HashAlg]+ESP[ConfAlg,AuthAlg], "
        "optionally followed by :<kb>k/<seconds>s (default 100000k/3600s). ConfAlg: DES, 3DES, "
        "AES128, AES192, AES256, None. AuthAlg/HashAlg: MD5, SHA1, SHA256, SHA384, SHA512 "
        "(None allowed for ESP integrity when ESP encrypts)."
    ),
)
# Session key lifetimes (Windows XP/2003 UI limits; [U] in the reference).
QM_LIFETIME_KB = Setting(
    "qmsecmethods",
    ValueKind.INT,
    "Session key lifetime in kilobytes.",
    minimum=20_480,
    maximum=2_147_483_647,
    unit="KB",
)
QM_LIFETIME_SECONDS = Setting(
    "qmsecmethods",
    ValueKind.INT,
    "Session key lifetime in seconds.",
    minimum=300,
    maximum=172_800,
    unit="seconds",
)

POLICY = Setting("policy", ValueKind.NAME, "Name of the policy.")
FILTERACTION = Setting("filteraction", ValueKind.NAME, "Name of the filter action.")
TUNNEL = Setting(
    "tunnel",
    ValueKind.TUNNEL,
    "Tunnel endpoint IP address (or DNS name, resolved now); omit for transport.",
    details="tunnel=none removes the tunnel endpoint (transport mode).",
)
CONNTYPE = Setting(
    "conntype",
    ValueKind.CHOICE,
    "Connection type the rule applies to.",
    choices=("all", "lan", "dialup"),
    default="all",
)
ACTIVATE = Setting("activate", ValueKind.BOOL, "Activate the rule.", default="yes")
KERBEROS = Setting("kerberos", ValueKind.BOOL, "Authenticate with Kerberos V5 (domain members only).")
PSK = Setting("psk", ValueKind.PSK, "Authenticate with this pre-shared key.")
ROOTCA = Setting(
    "rootca",
    ValueKind.ROOTCA,
    "Authenticate with certificates from this root CA.",
    repeatable=True,
    details=(
        'rootca="<CA name> certmap:yes|no excludecaname:yes|no"; write quotes inside the name as \\\'. '
        "May be given several times. kerberos=, psk= and rootca= are tried in the order given."
    ),
)
RULE_ID = Setting(
    "id", ValueKind.RULE_ID, "Rule number in the policy (as shown by show rule).", minimum=1, maximum=1_000_000
)
ALL = Setting("all", ValueKind.BOOL, "All objects of this kind.")
LEVEL = Setting("level", ValueKind.CHOICE, "How much to show.", choices=("terse", "normal", "verbose"), default="terse")
FORMAT = Setting("format", ValueKind.CHOICE, "Output layout.", choices=("list", "table"), default="list")
WIDE = Setting("wide", ValueKind.BOOL, "Table format: do not truncate columns.", default="yes")
RESOLVEDNS = Setting("resolvedns", ValueKind.BOOL, "Show DNS names next to addresses.", default="no")
RULETYPE = Setting("type", ValueKind.CHOICE, "Which rules to show.", choices=("tunnel", "transport"))
FILE = Setting("file", ValueKind.FILE, "Path of the export file.")
LOCATION = Setting(
    "location",
    ValueKind.CHOICE,
    "Which store the static commands that follow edit.",
    choices=("local", "persistent", "domain"),
    details=(
        "local and persistent: this computer's agent (its local and persistent stores, on "
        "STATE_DIR/agent.sock and STATE_DIR/persistent.sock); domain: the policy server (-r), whose store "
        "the domain's computers get their policies from."
    ),
)
DOMAIN = Setting(
    "domain",
    ValueKind.NAME,
    "The domain whose store to use (location=domain only).",
    details="Checked against the domain of the policy server's directory (policyagent server --directory).",
)


@dataclass(frozen=True)
class Param:
    setting: Setting
    required: bool = False
    # Parameters in the same non-empty group are alternatives (name= | guid= | all).
    group: str = ""

    @property
    def name(self) -> str:
        return self.setting.name


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("add", "policy")
    summary: str
    params: tuple[Param, ...] = ()
    remarks: str = ""
    positional: tuple[str, ...] = field(default=())  # params that may be given without tag=, in order

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


def _p(setting: Setting, required: bool = False, group: str = "") -> Param:
    return Param(setting, required, group)


_POLICY_SETTINGS = (
    _p(DESCRIPTION),
    _p(MMPFS),
    _p(QMPERMM),
    _p(MMLIFETIME),
    _p(IKEVERSION),
    _p(ACTIVATEDEFAULTRULE),
    _p(POLLINGINTERVAL),
    _p(ASSIGN),
    _p(MMSECMETHODS),
)
_FA_SETTINGS = (_p(DESCRIPTION), _p(QMPFS), _p(INPASS), _p(SOFT), _p(ACTION), _p(QMSECMETHODS))
_RULE_SETTINGS = (
    _p(TUNNEL),
    _p(CONNTYPE),
    _p(ACTIVATE),
    _p(DESCRIPTION),
    _p(KERBEROS),
    _p(PSK),
    _p(ROOTCA),
)
_SHOW = (_p(LEVEL), _p(FORMAT), _p(WIDE))
_FILTER_MATCH = (
    _p(SRCMASK),
    _p(DSTMASK),
    _p(PROTOCOL),
    _p(SRCPORT),
    _p(DSTPORT),
    _p(MIRRORED),
)

STATIC_COMMANDS: tuple[Command, ...] = (
    Command(
        ("add", "policy"),
        "Creates a policy (with its default response rule).",
        (_p(NAME, True), *_POLICY_SETTINGS),
        positional=("name",),
    ),
    Command(
        ("set", "policy"),
        "Changes a policy.",
        (_p(NAME, group="which"), _p(GUID, group="which"), _p(NEWNAME), *_POLICY_SETTINGS, _p(GPONAME)),
        remarks="assign=yes assigns this policy in the store and unassigns the one assigned before.",
        positional=("name",),
    ),
    Command(
        ("delete", "policy"),
        "Deletes a policy and its rules (not its filter lists or filter actions).",
        (_p(NAME, group="which"), _p(ALL, group="which")),
        positional=("name",),
    ),
    Command(
        ("show", "policy"),
        "Shows policies.",
        (_p(NAME, group="which"), _p(ALL, group="which"), *_SHOW),
        positional=("name",),
    ),
    Command(
        ("add", "filterlist"), "Creates an empty filter list.", (_p(NAME, True), _p(DESCRIPTION)), positional=("name",)
    ),
    Command(
        ("set", "filterlist"),
        "Changes a filter list's name or description.",
        (_p(NAME, group="which"), _p(GUID, group="which"), _p(NEWNAME), _p(DESCRIPTION)),
        positional=("name",),
    ),
    Command(
        ("delete", "filterlist"),
        "Deletes a filter list that no rule uses.",
        (_p(NAME, group="which"), _p(ALL, group="which")),
        positional=("name",),
    ),
    Command(
        ("show", "filterlist"),
        "Shows filter lists and their filters.",
        (_p(NAME, group="which"), _p(ALL, group="which"), *_SHOW, _p(RESOLVEDNS)),
        positional=("name",),
    ),
    Command(
        ("add", "filter"),
        "Adds a filter to a filter list.",
        (_p(FILTERLIST, True), _p(SRCADDR, True), _p(DSTADDR, True), _p(DESCRIPTION), *_FILTER_MATCH),
        remarks="A DNS name is resolved once, now, into one filter per address.",
    ),
    Command(
        ("delete", "filter"),
        "Deletes every filter of the list that matches the given fields.",
        (_p(FILTERLIST, True), _p(SRCADDR, True), _p(DSTADDR, True), *_FILTER_MATCH),
        remarks="Fields not given match any value.",
    ),
    Command(("add", "filteraction"), "Creates a filter action.", (_p(NAME, True), *_FA_SETTINGS), positional=("name",)),
    Command(
        ("set", "filteraction"),
        "Changes a filter action.",
        (_p(NAME, group="which"), _p(GUID, group="which"), _p(NEWNAME), *_FA_SETTINGS),
        positional=("name",),
    ),
    Command(
        ("delete", "filteraction"),
        "Deletes a filter action that no rule uses.",
        (_p(NAME, group="which"), _p(ALL, group="which")),
        positional=("name",),
    ),
    Command(
        ("show", "filteraction"),
        "Shows filter actions.",
        (_p(NAME, group="which"), _p(ALL, group="which"), *_SHOW),
        positional=("name",),
    ),
    Command(
        ("add", "rule"),
        "Adds a rule to a policy.",
        (_p(NAME, True), _p(POLICY, True), _p(FILTERLIST, True), _p(FILTERACTION, True), *_RULE_SETTINGS),
        remarks="Without kerberos=, psk= or rootca= the rule authenticates with Kerberos.",
    ),
    Command(
        ("set", "rule"),
        "Changes a rule.",
        (
            _p(NAME, group="which"),
            _p(RULE_ID, group="which"),
            _p(POLICY, True),
            _p(NEWNAME),
            _p(FILTERLIST),
            _p(FILTERACTION),
            *_RULE_SETTINGS,
        ),
        remarks="Giving any of kerberos=, psk=, rootca= replaces all authentication methods.",
    ),
    Command(
        ("delete", "rule"),
        "Deletes a rule (never the default response rule).",
        (_p(NAME, group="which"), _p(RULE_ID, group="which"), _p(ALL, group="which"), _p(POLICY, True)),
    ),
    Command(
        ("show", "rule"),
        "Shows the rules of a policy.",
        (
            _p(NAME, group="which"),
            _p(RULE_ID, group="which"),
            _p(ALL, group="which"),
            _p(POLICY, True),
            _p(RULETYPE),
            *_SHOW,
        ),
    ),
    Command(
        ("set", "defaultrule"),
        "Changes the default response rule of a policy.",
        (_p(POLICY, True), _p(QMPFS), _p(ACTIVATE), _p(QMSECMETHODS), _p(KERBEROS), _p(PSK), _p(ROOTCA)),
        remarks="Giving any of kerberos=, psk=, rootca= replaces all authentication methods.",
    ),
    Command(("show", "all"), "Shows every policy, filter list and filter action.", (*_SHOW, _p(RESOLVEDNS))),
    Command(("delete", "all"), "Deletes every policy, filter list and filter action in the store."),
    Command(
        ("set", "store"),
        "Chooses the store the following static commands in this netsh session edit.",
        (_p(LOCATION, True), _p(DOMAIN)),
        remarks=(
            "The choice lasts for this netsh session (a script, or interactive mode). The local store's "
            "assigned policy applies when the domain assigns none; the persistent store's applies at boot "
            "and in addition to the others."
        ),
        positional=("location", "domain"),
    ),
    Command(("show", "store"), "Shows which store the static commands edit."),
    Command(
        ("exportpolicy",),
        "Writes every object of the store to a file (docs/export-format.md).",
        (_p(FILE, True),),
        remarks=(
            "A file name ending in .ldif gets the policies as Active Directory objects ([MS-GPIPSEC], under "
            "CN=IP Security,CN=System of the policy server's directory), for ldapadd or `importpolicy`. "
            "Both formats hold pre-shared keys in clear; the file is created readable by its owner only."
        ),
        positional=("file",),
    ),
    Command(
        ("importpolicy",),
        "Reads objects from an export file into the store (same ids are replaced).",
        (_p(FILE, True),),
        remarks=(
            "A .ldif file is read as Active Directory IPsec objects ([MS-GPIPSEC]; e.g. from ldapsearch of "
            "CN=IP Security,CN=System, or exportpolicy): every policy in it, with its filter lists and actions."
        ),
        positional=("file",),
    ),
    Command(
        ("restoredefaults",),
        "Re-creates the default filter lists, filter actions and policies.",
        remarks="Objects you made are not touched.",
    ),
    Command(("dump",), "Prints a netsh script that makes any store identical to this one."),
    Command(
        ("show", "gpoassignedpolicy"),
        "Shows the IPsec policy a Group Policy object assigns, and where the GPO is linked.",
        (_p(NAME),),
        remarks="Without name= every GPO of the server's registry is shown (policyagent gpo ... manages them).",
        positional=("name",),
    ),
)


def find_command(words: tuple[str, ...]) -> Command | None:
    for command in STATIC_COMMANDS:
        if command.words == words:
            return command
    return None


def reference_markdown() -> str:
    """docs/netsh-static.md, generated from the table."""
    lines = [
        "# `netsh ipsec static` reference",
        "",
        "Generated from `policyagent/model/settings.py` (`python -m policyagent.model.settings`);",
        "do not edit by hand. Parameter names may be abbreviated to any unique prefix and are",
        "case-insensitive.",
        "",
    ]
    for command in STATIC_COMMANDS:
        lines += [f"## {command.text}", "", command.summary, ""]
        if command.params:
            lines += ["| parameter | value | default | meaning |", "| --- | --- | --- | --- |"]
            for p in command.params:
                s = p.setting
                tag = f"**{s.name}**" if p.required else s.name
                if p.group:
                    tag += " (one of)"
                meaning = s.summary + (f" {s.details}" if s.details else "")
                lines.append(
                    f"| {tag} | `{s.syntax()}` | {s.default if s.default is not None else ''} | "
                    f"{meaning.replace('|', '&#124;')} |"
                )
            lines.append("")
        if command.remarks:
            lines += [command.remarks, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
