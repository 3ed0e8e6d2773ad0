"""Codec for the five [MS-GPIPSEC] ipsecData blob types, and their mapping to the policy model.

Layouts, quirks and test vectors: /work/shared/reference/ms-gpipsec.md §2 and §4 (cited as "ref §…").

Every blob is ``type GUID (16, GUID memory order) | Data-Length (u32 LE) | payload [| 0x00 trailer]``;
:func:`_read_header` / :func:`_frame` handle that framing for all five types. Integers are little-endian,
IPv4 addresses raw network-order bytes, strings counted UTF-16LE with a NUL (ref §2.0).

Decoders parse structurally (counts and lengths), check Data-Length against the structure, and raise
:class:`GpIpsecError` (naming blob type, field and offset) on anything truncated or inconsistent; they never
return a partial result. Fields that the spec says "MUST be ignored when read" (Zero*, unused algorithm
slots, the high halves of the 8-byte algorithm ids, the NFA's Alt-Auth "Zero1") are dropped, and the
encoders write zeros (or, for Alt-Auth "Zero1", the flag count, as Windows does).

Consequences for round trips:

* Modern (Windows 10-era) blobs re-encode byte-for-byte.
* Windows 2000 filter lists (Data-Length1 = total − 21 plus a trailer) decode with ``legacy_framing=True``
  and re-encode byte-for-byte in that framing; set ``legacy_framing=False`` for the modern form.
* Windows 2000 ISAKMP / negotiation policies (garbage in unused fields) decode; they re-encode in the modern
  form (zeros there). Windows 2000 NFAs (no Alt-Auth extension) decode with ``alt_auth=None`` and re-encode
  byte-for-byte without the extension.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from policyagent.pb import pb

__all__ = [
    "ACTION_BLOCK",
    "ACTION_INBOUND_PASSTHROUGH",
    "ACTION_PERMIT",
    "ACTION_SECURE",
    "TYPE_DEFAULT_RESPONSE",
    "TYPE_STANDARD",
    "AddressData",
    "AlgorithmOffer",
    "AltAuth",
    "AuthMethodEntry",
    "BlobType",
    "FilterSpec1",
    "FilterSpec2",
    "FilterV2Section",
    "GpIpsecError",
    "IpsecFilterData",
    "IpsecIsakmpPolicyData",
    "IpsecNegotiationPolicyData",
    "IpsecNfaData",
    "IpsecPolicyData",
    "PortData",
    "SecurityMethod",
    "SecurityOffer",
    "decode_filter",
    "decode_isakmp_policy",
    "decode_negotiation_policy",
    "decode_nfa",
    "decode_policy",
    "encode_filter",
    "encode_isakmp_policy",
    "encode_negotiation_policy",
    "encode_nfa",
    "encode_policy",
    "from_model_auth_methods",
    "from_model_default_response_rule",
    "from_model_filter",
    "from_model_filter_action",
    "from_model_filter_list",
    "from_model_isakmp",
    "from_model_policy",
    "from_model_rule",
    "to_model_auth_methods",
    "to_model_default_response_rule",
    "to_model_filter",
    "to_model_filter_action",
    "to_model_filter_list",
    "to_model_isakmp",
    "to_model_polling_minutes",
    "to_model_rule",
]


class GpIpsecError(ValueError):
    """A blob is truncated or corrupt, or a model object cannot be expressed as a blob."""


class BlobType(enum.Enum):
    """The ipsecData type GUIDs (ref §2.0); the value is the blob's name used in error messages."""

    POLICY = "ipsecPolicy"
    ISAKMP_POLICY = "ipsecISAKMPPolicy"
    NFA = "ipsecNFA"
    NEGOTIATION_POLICY = "ipsecNegotiationPolicy"
    FILTER = "ipsecFilter"


TYPE_GUIDS: dict[BlobType, uuid.UUID] = {
    BlobType.POLICY: uuid.UUID("22202163-4F4C-11D1-863B-00A0248D3021"),
    BlobType.ISAKMP_POLICY: uuid.UUID("80DC20B8-2EC8-11D1-A89E-00A0248D3021"),
    BlobType.NFA: uuid.UUID("11BBAC00-498D-11D1-8639-00A0248D3021"),
    BlobType.NEGOTIATION_POLICY: uuid.UUID("80DC20B9-2EC8-11D1-A89E-00A0248D3021"),
    BlobType.FILTER: uuid.UUID("80DC20B5-2EC8-11D1-A89E-00A0248D3021"),
}
NIL_GUID = uuid.UUID(int=0)
FILTER_V2_ID = uuid.UUID("35FECD3D-AE29-4373-8A6A-C5D8FAB2FB08")
ALT_AUTH_ID1 = b"\x01" * 16
ALT_AUTH_ID2 = b"\x01" * 15 + b"\x02"
IPV6_TUNNEL_ID = b"\x01" * 15 + b"\x03"  # ref §2.3: [INF], by analogy

# iPSECNegotiationPolicyAction / iPSECNegotiationPolicyType attribute values (LDAP strings, not in the blob).
ACTION_BLOCK = uuid.UUID("3F91A819-7647-11D1-864D-D46A00000000")
ACTION_PERMIT = uuid.UUID("8A171DD2-77E3-11D1-8659-A04F00000000")
ACTION_SECURE = uuid.UUID("8A171DD3-77E3-11D1-8659-A04F00000000")
ACTION_INBOUND_PASSTHROUGH = uuid.UUID("3F91A81A-7647-11D1-864D-D46A00000000")
TYPE_STANDARD = uuid.UUID("62F49E10-6C37-11D1-864C-14A300000000")
TYPE_DEFAULT_RESPONSE = uuid.UUID("62F49E13-6C37-11D1-864C-14A300000000")

# NFA Auth-Type (ref §2.3) and Interface-Type.
AUTH_PSK = 1
AUTH_CERTIFICATE = 3
AUTH_KERBEROS = 5
INTERFACE_ALL = 0xFFFFFFFD
INTERFACE_LAN = 0xFFFFFFFE
INTERFACE_DIALUP = 0xFFFFFFFF

OAKLEY_GROUP_14 = 0x10000001
_MAX_ALGORITHM_SLOTS = 3
_SECURITY_METHOD_SIZE = 64
_SECURITY_OFFER_SIZE = 80
_HEADER_SIZE = 20
ZERO_IPV4 = ipaddress.IPv4Address(0)
_ALL_ONES = ipaddress.IPv4Address("255.255.255.255")


# ----------------------------------------------------------------------------- byte reader / writer


class _Reader:
    """Bounds-checked little-endian reader; every failure is a GpIpsecError naming blob, field, offset."""

    def __init__(self, data: bytes, blob: BlobType, pos: int = 0) -> None:
        self.data = data
        self.blob = blob
        self.pos = pos

    def fail(self, field: str, message: str, offset: int | None = None) -> GpIpsecError:
        at = self.pos if offset is None else offset
        return GpIpsecError(f"{self.blob.value} blob: {field} at offset {at}: {message}")

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.remaining < n:
            raise self.fail(field, f"truncated: need {n} bytes, {max(self.remaining, 0)} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack("<I", self.take(4, field))[0])

    def guid(self, field: str) -> uuid.UUID:
        return uuid.UUID(bytes_le=self.take(16, field))

    def ipv4(self, field: str) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.take(4, field))

    def ustr(self, field: str) -> str:
        """A counted UTF-16LE string: u32 byte length (NUL included), then the text."""
        start = self.pos
        n = self.u32(field + " length")
        if n % 2:
            raise self.fail(field + " length", f"odd UTF-16 byte length {n}", start)
        raw = self.take(n, field)
        try:
            text = raw.decode("utf-16-le", errors="surrogatepass")
        except UnicodeDecodeError as exc:  # pragma: no cover - surrogatepass accepts every even-length input
            raise self.fail(field, f"invalid UTF-16: {exc}", start + 4) from exc
        return text[:-1] if text.endswith("\x00") else text


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, b: bytes) -> None:
        self.parts.append(b)

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack("<B", v))

    def u16(self, v: int) -> None:
        self.parts.append(struct.pack("<H", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack("<I", v))

    def guid(self, g: uuid.UUID) -> None:
        self.parts.append(g.bytes_le)

    def ipv4(self, a: ipaddress.IPv4Address) -> None:
        self.parts.append(a.packed)

    def ustr(self, s: str) -> None:
        b = (s + "\x00").encode("utf-16-le", errors="surrogatepass")
        self.u32(len(b))
        self.parts.append(b)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def _read_header(data: bytes, blob: BlobType) -> tuple[int, _Reader]:
    """Check the type GUID, return (Data-Length, reader positioned after it)."""
    r = _Reader(bytes(data), blob)
    got = r.guid("type GUID")
    if got != TYPE_GUIDS[blob]:
        raise r.fail("type GUID", f"expected {{{TYPE_GUIDS[blob]}}}, found {{{got}}}", 0)
    return r.u32("Data-Length"), r


def _frame(blob: BlobType, data_length: int, payload: bytes, *, trailer: bool = True) -> bytes:
    """Type GUID + Data-Length + payload (+ the uncounted 0x00 trailer)."""
    try:
        length = struct.pack("<I", data_length)
    except struct.error as exc:
        raise GpIpsecError(f"{blob.value} blob: Data-Length {data_length} out of range") from exc
    return TYPE_GUIDS[blob].bytes_le + length + payload + (b"\x00" if trailer else b"")


def _check_length(r: _Reader, field: str, found: int, expected: int) -> None:
    if found != expected:
        raise r.fail(field, f"{found} does not match the structure (expected {expected})", 16)


def _end(r: _Reader, *, trailer: bool = True) -> None:
    """The uncounted 0x00 trailer byte (every Windows-written blob has 0 there) and nothing after it."""
    if trailer:
        at = r.pos
        if r.take(1, "trailer") != b"\x00":
            raise r.fail("trailer", "not 0x00", at)
    if r.remaining:
        raise r.fail("end of blob", f"{r.remaining} unexpected trailing bytes")


# ----------------------------------------------------------------------------- ipsecPolicy (ref §2.1)


@dataclass(frozen=True)
class IpsecPolicyData:
    polling_interval: int = 10800  # seconds; 0 means 10,800


def decode_policy(data: bytes) -> IpsecPolicyData:
    dl, r = _read_header(data, BlobType.POLICY)
    _check_length(r, "Data-Length", dl, 4)
    interval = r.u32("Polling-Interval")
    _end(r)
    return IpsecPolicyData(polling_interval=interval)


def encode_policy(x: IpsecPolicyData) -> bytes:
    w = _Writer()
    _u32_field(BlobType.POLICY, "Polling-Interval", x.polling_interval)
    w.u32(x.polling_interval)
    return _frame(BlobType.POLICY, 4, w.getvalue())


def _u32_field(blob: BlobType, field: str, v: int) -> None:
    if not 0 <= v <= 0xFFFFFFFF:
        raise GpIpsecError(f"{blob.value} blob: {field} {v} does not fit in 32 bits")


# ----------------------------------------------------------------------------- ipsecISAKMPPolicy (ref §2.2)


@dataclass(frozen=True)
class SecurityMethod:
    """One 64-byte main-mode security method. Algorithm ids are the low u32 of the 8-byte fields."""

    encryption_algorithm_id: int  # 1 DES, 2/3 3DES
    hash_algorithm_id: int  # 1 MD5, 2 SHA-1
    oakley_group: int  # 1, 2, 0x10000001 (group 14)
    oakley_lifetime_secs: int = 28800
    oakley_lifetime_kb: int = 0
    qm_limit: int = 0
    random_function: int = 0  # 1..4: DES/MD5, DES/SHA, 3DES/MD5, 3DES/SHA with group 14
    pfs_identity_required: int = 0
    major_version: int = 0
    minor_version: int = 0


@dataclass(frozen=True)
class IpsecIsakmpPolicyData:
    security_methods: tuple[SecurityMethod, ...]
    isakmp_policy_instance: uuid.UUID = NIL_GUID  # modern Windows writes zeros
    master_pfs_required: int = 0
    isakmp_options: int = 0
    new_dh: tuple[int, int, int, int] = (0, 0, 0, 0)
    qm_limit: int = 0
    mm_lifetime: int = 28800  # seconds; 0 means 28,800


def _read_security_method(r: _Reader, i: int) -> SecurityMethod:
    p = f"Security-Method[{i}] "
    major = r.u8(p + "Major-Version")
    minor = r.u8(p + "Minor-Version")
    r.take(2, p + "Zero3")
    enc = r.u32(p + "Encryption-Algorithm-ID")
    r.take(4, p + "Encryption-Algorithm-ID (high)")  # Windows 2000: 0x40, ignored
    r.take(4, p + "Zero4")
    hsh = r.u32(p + "Hash-Algorithm-ID")
    r.take(4, p + "Hash-Algorithm-ID (high)")
    r.take(4, p + "Zero5")
    r.take(8, p + "Zero6")
    rnd = r.u8(p + "Random-Function")
    r.take(7, p + "Zero7")
    group = r.u32(p + "Oakley-Group")
    qm = r.u32(p + "QM-Limit")
    kb = r.u32(p + "Oakley-Lifetime-KB")
    secs = r.u32(p + "Oakley-Lifetime-Secs")
    pfs = r.u32(p + "PFS-Identity-Required")
    return SecurityMethod(
        encryption_algorithm_id=enc,
        hash_algorithm_id=hsh,
        oakley_group=group,
        oakley_lifetime_secs=secs,
        oakley_lifetime_kb=kb,
        qm_limit=qm,
        random_function=rnd,
        pfs_identity_required=pfs,
        major_version=major,
        minor_version=minor,
    )


def decode_isakmp_policy(data: bytes) -> IpsecIsakmpPolicyData:
    dl, r = _read_header(data, BlobType.ISAKMP_POLICY)
    instance = r.guid("ISAKMP-Policy-Instance")
    r.take(4, "Zero1")
    master_pfs = r.u32("Master-PFS-Required")
    options = r.u32("ISAKMP-Options")
    nd = r.take(4, "New-DH-1..4")
    qm_limit = r.u32("QM-Limit")
    mm_lifetime = r.u32("MM-Lifetime")
    r.take(20, "Zero2")
    count_at = r.pos
    count = r.u32("Security-Method-Count")
    if count * _SECURITY_METHOD_SIZE > r.remaining:
        raise r.fail("Security-Method-Count", f"{count} methods do not fit in {r.remaining} bytes", count_at)
    methods = tuple(_read_security_method(r, i) for i in range(count))
    _end(r)
    _check_length(r, "Data-Length", dl, len(r.data) - 21)
    return IpsecIsakmpPolicyData(
        security_methods=methods,
        isakmp_policy_instance=instance,
        master_pfs_required=master_pfs,
        isakmp_options=options,
        new_dh=(nd[0], nd[1], nd[2], nd[3]),
        qm_limit=qm_limit,
        mm_lifetime=mm_lifetime,
    )


def encode_isakmp_policy(x: IpsecIsakmpPolicyData) -> bytes:
    b = BlobType.ISAKMP_POLICY
    for name, v in (
        ("Master-PFS-Required", x.master_pfs_required),
        ("ISAKMP-Options", x.isakmp_options),
        ("QM-Limit", x.qm_limit),
        ("MM-Lifetime", x.mm_lifetime),
    ):
        _u32_field(b, name, v)
    if len(x.new_dh) != 4 or not all(0 <= v <= 0xFF for v in x.new_dh):
        raise GpIpsecError(f"{b.value} blob: New-DH-1..4 must be four bytes, got {x.new_dh!r}")
    w = _Writer()
    w.guid(x.isakmp_policy_instance)
    w.u32(0)
    w.u32(x.master_pfs_required)
    w.u32(x.isakmp_options)
    w.raw(bytes(x.new_dh))
    w.u32(x.qm_limit)
    w.u32(x.mm_lifetime)
    w.raw(bytes(20))
    w.u32(len(x.security_methods))
    for i, m in enumerate(x.security_methods):
        p = f"Security-Method[{i}] "
        for name, v in (
            ("Encryption-Algorithm-ID", m.encryption_algorithm_id),
            ("Hash-Algorithm-ID", m.hash_algorithm_id),
            ("Oakley-Group", m.oakley_group),
            ("QM-Limit", m.qm_limit),
            ("Oakley-Lifetime-KB", m.oakley_lifetime_kb),
            ("Oakley-Lifetime-Secs", m.oakley_lifetime_secs),
            ("PFS-Identity-Required", m.pfs_identity_required),
        ):
            _u32_field(b, p + name, v)
        for name, v in (
            ("Major-Version", m.major_version),
            ("Minor-Version", m.minor_version),
            ("Random-Function", m.random_function),
        ):
            if not 0 <= v <= 0xFF:
                raise GpIpsecError(f"{b.value} blob: {p}{name} {v} does not fit in a byte")
        w.u8(m.major_version)
        w.u8(m.minor_version)
        w.raw(bytes(2))
        w.u32(m.encryption_algorithm_id)
        w.raw(bytes(8))
        w.u32(m.hash_algorithm_id)
        w.raw(bytes(16))
        w.u8(m.random_function)
        w.raw(bytes(7))
        w.u32(m.oakley_group)
        w.u32(m.qm_limit)
        w.u32(m.oakley_lifetime_kb)
        w.u32(m.oakley_lifetime_secs)
        w.u32(m.pfs_identity_required)
    payload = w.getvalue()
    return _frame(b, len(payload), payload)


# ----------------------------------------------------------------------------- ipsecNegotiationPolicy (ref §2.4)


@dataclass(frozen=True)
class AlgorithmOffer:
    algorithm_identifier: int  # AH: 1 MD5, 2 SHA-1; ESP: 1 DES, 3 3DES (as Windows writes)
    esp_integrity_identifier: int  # 0 none, 1 MD5, 2 SHA-1
    offer_type: int  # 1 AH, 2 ESP


@dataclass(frozen=True)
class SecurityOffer:
    algorithms: tuple[AlgorithmOffer, ...]  # the Algorithm-Offer-Count significant slots (at most 3)
    lifetime_seconds: int = 0
    lifetime_kbytes: int = 0
    negotiation_options: int = 0
    pfs_qm_required: int = 0


@dataclass(frozen=True)
class IpsecNegotiationPolicyData:
    security_offers: tuple[SecurityOffer, ...] = ()


def decode_negotiation_policy(data: bytes) -> IpsecNegotiationPolicyData:
    dl, r = _read_header(data, BlobType.NEGOTIATION_POLICY)
    count_at = r.pos
    count = r.u32("Security-Offer-Count")
    if count * _SECURITY_OFFER_SIZE > r.remaining:
        raise r.fail("Security-Offer-Count", f"{count} offers do not fit in {r.remaining} bytes", count_at)
    offers = []
    for i in range(count):
        p = f"Security-Offer[{i}] "
        secs = r.u32(p + "Lifetime-Seconds")
        kb = r.u32(p + "Lifetime-KBytes")
        opts = r.u32(p + "Negotiation-Options")
        pfs = r.u32(p + "PFS-QM-Required")
        n_at = r.pos
        n = r.u32(p + "Algorithm-Offer-Count")
        if n > _MAX_ALGORITHM_SLOTS:
            raise r.fail(p + "Algorithm-Offer-Count", f"{n} exceeds the {_MAX_ALGORITHM_SLOTS} slots", n_at)
        algs = []
        for k in range(_MAX_ALGORITHM_SLOTS):
            q = f"{p}Algorithm[{k}] "
            alg = AlgorithmOffer(
                algorithm_identifier=r.u32(q + "Algorithm-Identifier"),
                esp_integrity_identifier=r.u32(q + "ESP-Integrity-Identifier"),
                offer_type=r.u32(q + "Offer-Type"),
            )
            r.take(8, q + "Zero1")
            if k < n:
                algs.append(alg)
        offers.append(SecurityOffer(tuple(algs), secs, kb, opts, pfs))
    _end(r)
    _check_length(r, "DataLength", dl, len(r.data) - 21)
    return IpsecNegotiationPolicyData(tuple(offers))


def encode_negotiation_policy(x: IpsecNegotiationPolicyData) -> bytes:
    b = BlobType.NEGOTIATION_POLICY
    w = _Writer()
    w.u32(len(x.security_offers))
    for i, o in enumerate(x.security_offers):
        p = f"Security-Offer[{i}] "
        if len(o.algorithms) > _MAX_ALGORITHM_SLOTS:
            raise GpIpsecError(f"{b.value} blob: {p}has {len(o.algorithms)} algorithms, at most 3 fit")
        for name, v in (
            ("Lifetime-Seconds", o.lifetime_seconds),
            ("Lifetime-KBytes", o.lifetime_kbytes),
            ("Negotiation-Options", o.negotiation_options),
            ("PFS-QM-Required", o.pfs_qm_required),
        ):
            _u32_field(b, p + name, v)
            w.u32(v)
        w.u32(len(o.algorithms))
        for a in o.algorithms:
            for name, v in (
                ("Algorithm-Identifier", a.algorithm_identifier),
                ("ESP-Integrity-Identifier", a.esp_integrity_identifier),
                ("Offer-Type", a.offer_type),
            ):
                _u32_field(b, p + name, v)
                w.u32(v)
            w.raw(bytes(8))
        w.raw(bytes(20 * (_MAX_ALGORITHM_SLOTS - len(o.algorithms))))
    payload = w.getvalue()
    return _frame(b, len(payload), payload)


# ----------------------------------------------------------------------------- ipsecNFA (ref §2.3)


@dataclass(frozen=True)
class AuthMethodEntry:
    auth_type: int  # 1 PSK, 3 certificate, 5 Kerberos
    data: bytes  # Auth-Method-Data as stored (PSK/CA name: UTF-16LE with NUL; Kerberos: 00 00)

    @property
    def text(self) -> str:
        """The data as a NUL-terminated UTF-16LE string (PSK, CA name)."""
        s = self.data.decode("utf-16-le", errors="replace")
        return s[:-1] if s.endswith("\x00") else s


@dataclass(frozen=True)
class AltAuth:
    """The optional Alt-Auth extension (modern Windows only): a second method list plus per-method flags."""

    methods: tuple[AuthMethodEntry, ...]
    flags: tuple[int, ...]  # per method: 1 cert-to-account mapping, 2 exclude CA name


@dataclass(frozen=True)
class IpsecNfaData:
    auth_methods: tuple[AuthMethodEntry, ...]
    interface_type: int = INTERFACE_ALL
    interface_name: str = ""
    tunnel_address: ipaddress.IPv4Address = ZERO_IPV4
    is_tunnel_specifier: int = 0
    is_active_specifier: int = 1
    tunnel_end_point_name: str = ""
    alt_auth: AltAuth | None = None  # None: Windows 2000 form, no extension
    ipv6_tunnel_mode_address: ipaddress.IPv6Address | None = None


def _read_auth_list(r: _Reader, count: int, prefix: str) -> tuple[AuthMethodEntry, ...]:
    out = []
    for i in range(count):
        t = r.u32(f"{prefix}[{i}] type")
        n = r.u32(f"{prefix}[{i}] length")
        out.append(AuthMethodEntry(t, r.take(n, f"{prefix}[{i}] data")))
    return tuple(out)


def decode_nfa(data: bytes) -> IpsecNfaData:
    dl, r = _read_header(data, BlobType.NFA)
    start = r.pos
    count = r.u32("Auth-Method-Count")
    if count * 8 > r.remaining:
        raise r.fail("Auth-Method-Count", f"{count} methods do not fit in {r.remaining} bytes", start)
    methods = _read_auth_list(r, count, "Auth-Method")
    interface_type = r.u32("Interface-Type")
    interface_name = r.ustr("Interface-Name")
    tunnel = r.ipv4("Tunnel-Address")
    is_tunnel = r.u32("Is-Tunnel-Specifier")
    is_active = r.u32("Is-Active-Specifier")
    endpoint = r.ustr("Tunnel-End-Point-Name")
    _check_length(r, "Data-Length", dl, r.pos - start)
    alt: AltAuth | None = None
    v6: ipaddress.IPv6Address | None = None
    if r.remaining > 1 and r.data[r.pos : r.pos + 16] == ALT_AUTH_ID1:
        r.pos += 16
        n_at = r.pos
        n = r.u32("Alt-Auth-Num-Methods-Count")
        if n * 8 > r.remaining:
            raise r.fail("Alt-Auth-Num-Methods-Count", f"{n} methods do not fit in {r.remaining} bytes", n_at)
        alt_methods = _read_auth_list(r, n, "Alt-Auth-Method")
        id2_at = r.pos
        if r.take(16, "Alt-Auth-Method-Id2") != ALT_AUTH_ID2:
            raise r.fail("Alt-Auth-Method-Id2", "not {01010101-0101-0101-0101-010101010102}", id2_at)
        r.take(4, "Alt-Auth Zero1")  # Windows writes the flag count; ignored on read (spec)
        flags = tuple(r.u32(f"Alt-Auth-Method-Flags[{i}]") for i in range(n))
        alt = AltAuth(alt_methods, flags)
    if r.remaining > 1 and r.data[r.pos : r.pos + 16] == IPV6_TUNNEL_ID:
        r.pos += 16
        v6 = ipaddress.IPv6Address(r.take(16, "IPv6-Tunnel-Mode-Address"))
    _end(r)
    return IpsecNfaData(
        auth_methods=methods,
        interface_type=interface_type,
        interface_name=interface_name,
        tunnel_address=tunnel,
        is_tunnel_specifier=is_tunnel,
        is_active_specifier=is_active,
        tunnel_end_point_name=endpoint,
        alt_auth=alt,
        ipv6_tunnel_mode_address=v6,
    )


def _write_auth_list(w: _Writer, methods: Sequence[AuthMethodEntry], prefix: str) -> None:
    for i, m in enumerate(methods):
        _u32_field(BlobType.NFA, f"{prefix}[{i}] type", m.auth_type)
        w.u32(m.auth_type)
        w.u32(len(m.data))
        w.raw(m.data)


def encode_nfa(x: IpsecNfaData) -> bytes:
    b = BlobType.NFA
    for name, v in (
        ("Interface-Type", x.interface_type),
        ("Is-Tunnel-Specifier", x.is_tunnel_specifier),
        ("Is-Active-Specifier", x.is_active_specifier),
    ):
        _u32_field(b, name, v)
    w = _Writer()
    w.u32(len(x.auth_methods))
    _write_auth_list(w, x.auth_methods, "Auth-Method")
    w.u32(x.interface_type)
    w.ustr(x.interface_name)
    w.ipv4(x.tunnel_address)
    w.u32(x.is_tunnel_specifier)
    w.u32(x.is_active_specifier)
    w.ustr(x.tunnel_end_point_name)
    counted = w.getvalue()
    ext = _Writer()
    if x.alt_auth is not None:
        if len(x.alt_auth.flags) != len(x.alt_auth.methods):
            raise GpIpsecError(f"{b.value} blob: Alt-Auth-Method-Flags needs one entry per Alt-Auth method")
        ext.raw(ALT_AUTH_ID1)
        ext.u32(len(x.alt_auth.methods))
        _write_auth_list(ext, x.alt_auth.methods, "Alt-Auth-Method")
        ext.raw(ALT_AUTH_ID2)
        ext.u32(len(x.alt_auth.flags))
        for i, f in enumerate(x.alt_auth.flags):
            _u32_field(b, f"Alt-Auth-Method-Flags[{i}]", f)
            ext.u32(f)
    if x.ipv6_tunnel_mode_address is not None:
        ext.raw(IPV6_TUNNEL_ID)
        ext.raw(x.ipv6_tunnel_mode_address.packed)
    return _frame(b, len(counted), counted + ext.getvalue())


# ----------------------------------------------------------------------------- ipsecFilter (ref §2.5)


@dataclass(frozen=True)
class FilterSpec1:
    """One legacy (V1) filter record."""

    filter_specification_id: uuid.UUID
    source_dns_name: str = ""
    destination_dns_name: str = ""
    filter_description: str = ""
    legacy_mirror_options: int = 1
    legacy_source_address: ipaddress.IPv4Address = ZERO_IPV4
    legacy_source_mask: ipaddress.IPv4Address = ZERO_IPV4
    legacy_destination_address: ipaddress.IPv4Address = ZERO_IPV4
    legacy_destination_mask: ipaddress.IPv4Address = ZERO_IPV4
    legacy_tunnel_address: ipaddress.IPv4Address = ZERO_IPV4
    legacy_protocol: int = 0
    legacy_source_port: int = 0
    legacy_destination_port: int = 0
    legacy_is_tunnel: int = 0
    legacy_special_filter: int = 0
    legacy_filter_options: int = 0


@dataclass(frozen=True)
class AddressData:
    """V2 Address-Data (40 bytes). Addresses kept as the raw 16 bytes (spec-only; no real blob seen)."""

    ipsec_address_type: int = 0
    ipsec_address_version: int = 1
    ip_address: bytes = bytes(16)
    ip_address_secondary: bytes = bytes(16)


@dataclass(frozen=True)
class PortData:
    port_type: int = 0  # 0 any, 1 single, 2 range
    port: int = 0
    port_range_end: int = 0


@dataclass(frozen=True)
class FilterSpec2:
    filter_specification_id: uuid.UUID
    source_dns_name: str = ""
    destination_dns_name: str = ""
    filter_description: str = ""
    mirror_flags: int = 1
    source_address_data: AddressData = AddressData()
    destination_address_data: AddressData = AddressData()
    source_port_data: PortData = PortData()
    destination_port_data: PortData = PortData()
    filter_protocol: int = 0
    filter_flags: int = 0


@dataclass(frozen=True)
class FilterV2Section:
    """The optional V2 section after the V1 records (spec-only; see ref §2.5)."""

    filter_specs: tuple[FilterSpec2, ...] = ()
    number_of_filters11: int = 0


@dataclass(frozen=True)
class IpsecFilterData:
    filter_specs: tuple[FilterSpec1, ...]
    v2: FilterV2Section | None = None
    # True: Windows 2000 / XP SP2 / 2003 framing (Data-Length1 = total − 21, trailer byte).
    # False: modern framing (Data-Length1 = size of the Filter-Spec1 records, no trailer).
    legacy_framing: bool = False


def _read_spec1(r: _Reader, i: int) -> FilterSpec1:
    p = f"Filter-Spec1[{i}] "
    src_dns = r.ustr(p + "Source-DNS-Name1")
    dst_dns = r.ustr(p + "Destination-DNS-Name1")
    desc = r.ustr(p + "Filter-Description1")
    return FilterSpec1(
        source_dns_name=src_dns,
        destination_dns_name=dst_dns,
        filter_description=desc,
        filter_specification_id=r.guid(p + "Filter-Specification-ID1"),
        legacy_mirror_options=r.u32(p + "Legacy-Mirror-Options"),
        legacy_source_address=r.ipv4(p + "Legacy-Source-Address"),
        legacy_source_mask=r.ipv4(p + "Legacy-Source-Mask"),
        legacy_destination_address=r.ipv4(p + "Legacy-Destination-Address"),
        legacy_destination_mask=r.ipv4(p + "Legacy-Destination-Mask"),
        legacy_tunnel_address=r.ipv4(p + "Legacy-Tunnel-Address"),
        legacy_protocol=r.u32(p + "Legacy-Protocol"),
        legacy_source_port=r.u16(p + "Legacy-Source-Port"),
        legacy_destination_port=r.u16(p + "Legacy-Destination-Port"),
        legacy_is_tunnel=r.u8(p + "Legacy-Is-Tunnel"),
        legacy_special_filter=r.u8(p + "Legacy-Special-Filter"),
        legacy_filter_options=r.u16(p + "Legacy-Filter-Options"),
    )


def _read_address_data(r: _Reader, field: str) -> AddressData:
    return AddressData(
        ipsec_address_type=r.u32(field + " IPsec-Address-Type"),
        ipsec_address_version=r.u32(field + " IPsec-Address-Version"),
        ip_address=r.take(16, field + " IP-Address"),
        ip_address_secondary=r.take(16, field + " IP-Address-Secondary"),
    )


def _read_port_data(r: _Reader, field: str) -> PortData:
    return PortData(r.u32(field + " type"), r.u16(field + " port"), r.u16(field + " range end"))


def _read_spec2(r: _Reader, i: int) -> FilterSpec2:
    p = f"Filter-Spec2[{i}] "
    return FilterSpec2(
        source_dns_name=r.ustr(p + "Source-DNS-Name2"),
        destination_dns_name=r.ustr(p + "Destination-DNS-Name2"),
        filter_description=r.ustr(p + "Filter-Description2"),
        filter_specification_id=r.guid(p + "Filter-Specification-ID2"),
        mirror_flags=r.u32(p + "Mirror-Flags"),
        source_address_data=_read_address_data(r, p + "Source-Address-Data"),
        destination_address_data=_read_address_data(r, p + "Destination-Address-Data"),
        source_port_data=_read_port_data(r, p + "Source-Port-Data"),
        destination_port_data=_read_port_data(r, p + "Destination-Port-Data"),
        filter_protocol=r.u32(p + "Filter-Protocol"),
        filter_flags=r.u32(p + "Filter-Flags"),
    )


def decode_filter(data: bytes) -> IpsecFilterData:
    dl, r = _read_header(data, BlobType.FILTER)
    count_at = r.pos
    count = r.u32("Number-Of-Filters1")
    if count * 70 > r.remaining:
        raise r.fail("Number-Of-Filters1", f"{count} filters do not fit in {r.remaining} bytes", count_at)
    specs_at = r.pos
    specs = tuple(_read_spec1(r, i) for i in range(count))
    specs_size = r.pos - specs_at
    v2: FilterV2Section | None = None
    if r.remaining >= 16 and r.data[r.pos : r.pos + 16] == FILTER_V2_ID.bytes_le:
        r.pos += 16
        dl2_at = r.pos
        dl2 = r.u32("Data-Length2")
        n11 = r.u32("Number-Of-Filters11")
        n2_at = r.pos
        n2 = r.u32("Number-Of-Filters2")
        if n2 * 142 > r.remaining:
            raise r.fail("Number-Of-Filters2", f"{n2} filters do not fit in {r.remaining} bytes", n2_at)
        at = r.pos
        specs2 = tuple(_read_spec2(r, i) for i in range(n2))
        if dl2 != r.pos - at:
            raise r.fail("Data-Length2", f"{dl2} does not match the records' size {r.pos - at}", dl2_at)
        v2 = FilterV2Section(specs2, n11)
    if r.remaining == 0:
        legacy = False
        _check_length(r, "Data-Length1", dl, specs_size)
    elif r.remaining == 1:
        legacy = True
        _end(r)
        _check_length(r, "Data-Length1", dl, len(r.data) - 21)
    else:
        raise r.fail("end of blob", f"{r.remaining} unexpected trailing bytes")
    return IpsecFilterData(specs, v2, legacy)


def _write_spec_strings(w: _Writer, s: FilterSpec1 | FilterSpec2) -> None:
    w.ustr(s.source_dns_name)
    w.ustr(s.destination_dns_name)
    w.ustr(s.filter_description)
    w.guid(s.filter_specification_id)


def _check_int(field: str, v: int, bits: int) -> None:
    if not 0 <= v < (1 << bits):
        raise GpIpsecError(f"ipsecFilter blob: {field} {v} does not fit in {bits} bits")


def encode_filter(x: IpsecFilterData) -> bytes:
    w = _Writer()
    for i, s in enumerate(x.filter_specs):
        p = f"Filter-Spec1[{i}] "
        for name, v, bits in (
            ("Legacy-Mirror-Options", s.legacy_mirror_options, 32),
            ("Legacy-Protocol", s.legacy_protocol, 32),
            ("Legacy-Source-Port", s.legacy_source_port, 16),
            ("Legacy-Destination-Port", s.legacy_destination_port, 16),
            ("Legacy-Is-Tunnel", s.legacy_is_tunnel, 8),
            ("Legacy-Special-Filter", s.legacy_special_filter, 8),
            ("Legacy-Filter-Options", s.legacy_filter_options, 16),
        ):
            _check_int(p + name, v, bits)
        _write_spec_strings(w, s)
        w.u32(s.legacy_mirror_options)
        for a in (
            s.legacy_source_address,
            s.legacy_source_mask,
            s.legacy_destination_address,
            s.legacy_destination_mask,
            s.legacy_tunnel_address,
        ):
            w.ipv4(a)
        w.u32(s.legacy_protocol)
        w.u16(s.legacy_source_port)
        w.u16(s.legacy_destination_port)
        w.u8(s.legacy_is_tunnel)
        w.u8(s.legacy_special_filter)
        w.u16(s.legacy_filter_options)
    specs = w.getvalue()
    tail = b""
    if x.v2 is not None:
        r2 = _Writer()
        for i, s2 in enumerate(x.v2.filter_specs):
            p = f"Filter-Spec2[{i}] "
            _write_spec_strings(r2, s2)
            _check_int(p + "Mirror-Flags", s2.mirror_flags, 32)
            r2.u32(s2.mirror_flags)
            for ad in (s2.source_address_data, s2.destination_address_data):
                if len(ad.ip_address) != 16 or len(ad.ip_address_secondary) != 16:
                    raise GpIpsecError(f"ipsecFilter blob: {p}Address-Data addresses must be 16 bytes")
                _check_int(p + "IPsec-Address-Type", ad.ipsec_address_type, 32)
                _check_int(p + "IPsec-Address-Version", ad.ipsec_address_version, 32)
                r2.u32(ad.ipsec_address_type)
                r2.u32(ad.ipsec_address_version)
                r2.raw(ad.ip_address + ad.ip_address_secondary)
            for pd in (s2.source_port_data, s2.destination_port_data):
                _check_int(p + "Port-Data type", pd.port_type, 32)
                _check_int(p + "Port-Data port", pd.port, 16)
                _check_int(p + "Port-Data range end", pd.port_range_end, 16)
                r2.u32(pd.port_type)
                r2.u16(pd.port)
                r2.u16(pd.port_range_end)
            _check_int(p + "Filter-Protocol", s2.filter_protocol, 32)
            _check_int(p + "Filter-Flags", s2.filter_flags, 32)
            r2.u32(s2.filter_protocol)
            r2.u32(s2.filter_flags)
        recs = r2.getvalue()
        _check_int("Number-Of-Filters11", x.v2.number_of_filters11, 32)
        tail = (
            FILTER_V2_ID.bytes_le
            + struct.pack("<III", len(recs), x.v2.number_of_filters11, len(x.v2.filter_specs))
            + recs
        )
    payload = struct.pack("<I", len(x.filter_specs)) + specs + tail
    if x.legacy_framing:
        return _frame(BlobType.FILTER, len(payload), payload)
    return _frame(BlobType.FILTER, len(specs), payload, trailer=False)


# ============================================================================= model mapping
#
# Filters (ref §2.5, "Address conventions observed"): any = 0/0; host = address/255.255.255.255;
# subnet = network/mask; "Me" = 0.0.0.0/255.255.255.255 [INF]; DNS/WINS/DHCP/gateway via
# Legacy-Special-Filter (0x01..0x04 source, 0x81..0x84 destination). IPv4 only in the legacy section.

_SPECIAL_KINDS: dict[int, pb.AddressKind.ValueType] = {
    1: pb.ADDRESS_KIND_DNS_SERVERS,
    2: pb.ADDRESS_KIND_WINS_SERVERS,
    3: pb.ADDRESS_KIND_DHCP_SERVER,
    4: pb.ADDRESS_KIND_DEFAULT_GATEWAY,
}
_KIND_SPECIAL = {v: k for k, v in _SPECIAL_KINDS.items()}


def _guid_str(g: uuid.UUID) -> str:
    return "{" + str(g).upper() + "}"


def _parse_guid(s: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(s)
    except ValueError as exc:
        raise GpIpsecError(f"{what}: {s!r} is not a GUID") from exc


def _to_model_address(addr: ipaddress.IPv4Address, mask: ipaddress.IPv4Address, dns: str, special: int) -> pb.Address:
    if special:
        return pb.Address(kind=_SPECIAL_KINDS[special])
    if addr == ZERO_IPV4 and mask == ZERO_IPV4:
        return pb.Address(kind=pb.ADDRESS_KIND_ANY)
    if mask == _ALL_ONES:
        if addr == ZERO_IPV4:
            return pb.Address(kind=pb.ADDRESS_KIND_ME)
        return pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=str(addr), dns_name=dns)
    return pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip=str(addr), mask=str(mask))


def to_model_filter(spec: FilterSpec1) -> pb.Filter:
    """One V1 filter record as a model Filter. Raises GpIpsecError for what the model cannot hold."""
    where = f"filter {_guid_str(spec.filter_specification_id)}"
    if spec.legacy_is_tunnel:
        raise GpIpsecError(f"{where}: tunnel filters (Legacy-Is-Tunnel=1) are not supported by the model")
    special = spec.legacy_special_filter
    src_special = special if 1 <= special <= 4 else 0
    dst_special = special - 0x80 if 0x81 <= special <= 0x84 else 0
    if special and not (src_special or dst_special):
        raise GpIpsecError(f"{where}: unknown Legacy-Special-Filter {special:#x}")
    if spec.legacy_mirror_options not in (0, 1):
        raise GpIpsecError(f"{where}: unknown Legacy-Mirror-Options {spec.legacy_mirror_options}")
    return pb.Filter(
        id=_guid_str(spec.filter_specification_id),
        description=spec.filter_description,
        mirrored=bool(spec.legacy_mirror_options),
        source=_to_model_address(
            spec.legacy_source_address, spec.legacy_source_mask, spec.source_dns_name, src_special
        ),
        destination=_to_model_address(
            spec.legacy_destination_address, spec.legacy_destination_mask, spec.destination_dns_name, dst_special
        ),
        protocol=spec.legacy_protocol,
        source_port=spec.legacy_source_port,
        destination_port=spec.legacy_destination_port,
    )


def _from_model_address(a: pb.Address, where: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, str, int]:
    """(address, mask, dns name, special code 1..4 or 0)."""
    try:
        if a.kind == pb.ADDRESS_KIND_ANY:
            return ZERO_IPV4, ZERO_IPV4, "", 0
        if a.kind == pb.ADDRESS_KIND_ME:
            return ZERO_IPV4, _ALL_ONES, "", 0
        if a.kind == pb.ADDRESS_KIND_HOST:
            return ipaddress.IPv4Address(a.ip), _ALL_ONES, a.dns_name, 0
        if a.kind == pb.ADDRESS_KIND_SUBNET:
            net = ipaddress.IPv4Network(f"{a.ip}/{a.mask}", strict=False)
            return ipaddress.IPv4Address(a.ip), net.netmask, "", 0
    except ValueError as exc:
        raise GpIpsecError(
            f"{where}: {a.ip!r}/{a.mask!r} is not an IPv4 address (the legacy section is IPv4 only)"
        ) from exc
    if a.kind in _KIND_SPECIAL:
        return ZERO_IPV4, ZERO_IPV4, "", _KIND_SPECIAL[a.kind]
    raise GpIpsecError(f"{where}: address kind {a.kind} cannot be stored")


def from_model_filter(f: pb.Filter) -> FilterSpec1:
    where = f"filter {f.id or '(no id)'}"
    src, smask, sdns, sspec = _from_model_address(f.source, where + " source")
    dst, dmask, ddns, dspec = _from_model_address(f.destination, where + " destination")
    if sspec and dspec:
        raise GpIpsecError(f"{where}: only one side can be a special server (one Legacy-Special-Filter byte)")
    if f.protocol > 0xFFFFFFFF or f.source_port > 0xFFFF or f.destination_port > 0xFFFF:
        raise GpIpsecError(f"{where}: protocol or port out of range")
    return FilterSpec1(
        filter_specification_id=_parse_guid(f.id, where) if f.id else uuid.uuid4(),
        source_dns_name=sdns,
        destination_dns_name=ddns,
        filter_description=f.description,
        legacy_mirror_options=int(f.mirrored),
        legacy_source_address=src,
        legacy_source_mask=smask,
        legacy_destination_address=dst,
        legacy_destination_mask=dmask,
        legacy_protocol=f.protocol,
        legacy_source_port=f.source_port,
        legacy_destination_port=f.destination_port,
        legacy_special_filter=sspec or (dspec | 0x80 if dspec else 0),
    )


def to_model_filter_list(
    data: IpsecFilterData, *, id: str = "", name: str = "", description: str = ""
) -> pb.FilterList:
    """The filter list; id/name/description come from the LDAP attributes (ipsecID, ipsecName, description)."""
    if data.v2 is not None and data.v2.filter_specs:
        raise GpIpsecError("ipsecFilter: the V2 filter section is not mapped to the model yet")
    return pb.FilterList(
        id=id, name=name, description=description, filters=[to_model_filter(s) for s in data.filter_specs]
    )


def from_model_filter_list(fl: pb.FilterList) -> IpsecFilterData:
    """Modern framing, V1 records only (ipsecName/description/ipsecID go in LDAP attributes)."""
    return IpsecFilterData(tuple(from_model_filter(f) for f in fl.filters))


# Filter actions (ref §2.4). ESP cipher ids as Windows writes them (DES = 1, 3DES = 3; 2 = DES per the spec
# only); ESP integrity 0 none, 1 MD5, 2 SHA-1; AH 1 MD5, 2 SHA-1. PFS-QM-Required 1 = PFS [INF].

_ESP_CIPHERS = {1: pb.CIPHER_DES, 2: pb.CIPHER_DES, 3: pb.CIPHER_3DES}
_CIPHER_ESP = {pb.CIPHER_DES: 1, pb.CIPHER_3DES: 3}
_INTEGRITY = {0: pb.INTEGRITY_NONE, 1: pb.INTEGRITY_MD5, 2: pb.INTEGRITY_SHA1}
_INTEGRITY_ID = {pb.INTEGRITY_NONE: 0, pb.INTEGRITY_MD5: 1, pb.INTEGRITY_SHA1: 2}
_AH = {1: pb.INTEGRITY_MD5, 2: pb.INTEGRITY_SHA1}
_AH_ID = {v: k for k, v in _AH.items()}
_OFFER_AH = 1
_OFFER_ESP = 2


def _to_model_qm(o: SecurityOffer, where: str) -> pb.QuickModeMethod:
    m = pb.QuickModeMethod(lifetime_kb=o.lifetime_kbytes, lifetime_seconds=o.lifetime_seconds)
    for a in o.algorithms:
        if a.offer_type == _OFFER_AH and a.algorithm_identifier in _AH and not m.HasField("ah"):
            m.ah.integrity = _AH[a.algorithm_identifier]
        elif (
            a.offer_type == _OFFER_ESP
            and a.algorithm_identifier in _ESP_CIPHERS
            and a.esp_integrity_identifier in _INTEGRITY
            and not m.HasField("esp")
        ):
            m.esp.encryption = _ESP_CIPHERS[a.algorithm_identifier]
            m.esp.integrity = _INTEGRITY[a.esp_integrity_identifier]
        else:
            raise GpIpsecError(f"{where}: algorithm offer {a} cannot be mapped")
    if not (m.HasField("ah") or m.HasField("esp")):  # pragma: no cover - callers handle the soft offer
        raise GpIpsecError(f"{where}: security offer without algorithms")
    return m


def _split_soft_offer(offers: Sequence[SecurityOffer], where: str) -> tuple[Sequence[SecurityOffer], bool]:
    """(the real offers, fallback_to_clear): a last offer with no algorithms is the "soft" offer.

    [MS-GPIPSEC] does not describe "allow fallback to unsecured communication" (netsh soft=yes); ref §2.4
    leaves it [OPEN] with this structural hypothesis, which is also how the Windows SPD represents a soft SA
    (a security method with an algorithm count of 0, offered last). [INF] — verify against a Windows DC.
    """
    for i, o in enumerate(offers):
        if not o.algorithms and i != len(offers) - 1:
            raise GpIpsecError(f"{where} Security-Offer[{i}]: an offer without algorithms must be the last one")
    if offers and not offers[-1].algorithms:
        return offers[:-1], True
    return offers, False


def to_model_filter_action(
    data: IpsecNegotiationPolicyData, action: uuid.UUID, *, id: str = "", name: str = "", description: str = ""
) -> pb.FilterAction:
    """``action`` is the iPSECNegotiationPolicyAction attribute."""
    fa = pb.FilterAction(id=id, name=name, description=description)
    if action == ACTION_BLOCK:
        fa.action = pb.ACTION_TYPE_BLOCK
    elif action == ACTION_PERMIT:
        fa.action = pb.ACTION_TYPE_PERMIT
    elif action in (ACTION_SECURE, ACTION_INBOUND_PASSTHROUGH):
        fa.action = pb.ACTION_TYPE_NEGOTIATE
        fa.inbound_passthrough = action == ACTION_INBOUND_PASSTHROUGH
    else:
        raise GpIpsecError(f"ipsecNegotiationPolicy: unknown action {_guid_str(action)}")
    if fa.action == pb.ACTION_TYPE_NEGOTIATE:
        offers, fa.fallback_to_clear = _split_soft_offer(data.security_offers, "ipsecNegotiationPolicy")
        for i, o in enumerate(offers):
            fa.methods.append(_to_model_qm(o, f"ipsecNegotiationPolicy Security-Offer[{i}]"))
        fa.session_key_pfs = any(o.pfs_qm_required == 1 for o in offers)
    elif data.security_offers:
        raise GpIpsecError("ipsecNegotiationPolicy: a block/permit action carries security offers")
    return fa


def from_model_filter_action(fa: pb.FilterAction) -> tuple[IpsecNegotiationPolicyData, uuid.UUID]:
    """The blob and the iPSECNegotiationPolicyAction GUID (the type is TYPE_STANDARD)."""
    where = f"filter action {fa.id or '(no id)'}"
    if fa.action in (pb.ACTION_TYPE_BLOCK, pb.ACTION_TYPE_PERMIT):
        # Block/permit carry nothing but the action GUID: any negotiation setting would be lost.
        for name, set_ in (
            ("methods", bool(fa.methods)),
            ("inbound_passthrough", fa.inbound_passthrough),
            ("fallback_to_clear", fa.fallback_to_clear),
            ("session_key_pfs", fa.session_key_pfs),
        ):
            if set_:
                raise GpIpsecError(f"{where}: {name} cannot be stored with a block or permit action")
        return IpsecNegotiationPolicyData(), ACTION_BLOCK if fa.action == pb.ACTION_TYPE_BLOCK else ACTION_PERMIT
    if fa.action != pb.ACTION_TYPE_NEGOTIATE:
        raise GpIpsecError(f"{where}: action {fa.action} cannot be stored")
    offers = _offers_from_model(fa.methods, fa.session_key_pfs, where)
    if fa.fallback_to_clear:
        offers.append(SecurityOffer(()))  # the "soft" offer, see _split_soft_offer
    action = ACTION_INBOUND_PASSTHROUGH if fa.inbound_passthrough else ACTION_SECURE
    return IpsecNegotiationPolicyData(tuple(offers)), action


def _offers_from_model(methods: Sequence[pb.QuickModeMethod], pfs: bool, where: str) -> list[SecurityOffer]:
    if not methods and pfs:
        raise GpIpsecError(f"{where}: session_key_pfs needs at least one security method to be stored in")
    offers = []
    for i, m in enumerate(methods):
        algs = []
        if m.HasField("ah"):
            if m.ah.integrity not in _AH_ID:
                raise GpIpsecError(f"{where} method {i}: AH integrity {m.ah.integrity} has no Windows encoding")
            algs.append(AlgorithmOffer(_AH_ID[m.ah.integrity], 0, _OFFER_AH))
        if m.HasField("esp"):
            if m.esp.encryption not in _CIPHER_ESP or m.esp.integrity not in _INTEGRITY_ID:
                raise GpIpsecError(
                    f"{where} method {i}: ESP {m.esp.encryption}/{m.esp.integrity} has no Windows encoding"
                )
            algs.append(AlgorithmOffer(_CIPHER_ESP[m.esp.encryption], _INTEGRITY_ID[m.esp.integrity], _OFFER_ESP))
        if not algs:
            raise GpIpsecError(f"{where} method {i}: neither AH nor ESP")
        offers.append(SecurityOffer(tuple(algs), m.lifetime_seconds, m.lifetime_kb, 0, int(pfs)))
    return offers


# ISAKMP (ref §2.2). Encryption 1 DES, 2/3 3DES (Windows writes 3); hash 1 MD5, 2 SHA-1; Oakley group 1, 2,
# 0x10000001 = MODP-2048 (IKE group 14; netsh's "3", see policyagent.model.algorithms). Random-Function /
# New-DH 1..4 = DES-MD5, DES-SHA1, 3DES-MD5, 3DES-SHA1 with group 14.

_MM_CIPHERS = {1: pb.CIPHER_DES, 2: pb.CIPHER_3DES, 3: pb.CIPHER_3DES}
_MM_CIPHER_ID = {pb.CIPHER_DES: 1, pb.CIPHER_3DES: 3}
_MM_HASH = {1: pb.INTEGRITY_MD5, 2: pb.INTEGRITY_SHA1}
_MM_HASH_ID = {v: k for k, v in _MM_HASH.items()}
_GROUPS = {1: pb.DH_GROUP_MODP768, 2: pb.DH_GROUP_MODP1024, OAKLEY_GROUP_14: pb.DH_GROUP_MODP2048}
_GROUP_ID = {v: k for k, v in _GROUPS.items()}
_NEW_DH = {
    1: (pb.CIPHER_DES, pb.INTEGRITY_MD5),
    2: (pb.CIPHER_DES, pb.INTEGRITY_SHA1),
    3: (pb.CIPHER_3DES, pb.INTEGRITY_MD5),
    4: (pb.CIPHER_3DES, pb.INTEGRITY_SHA1),
}
_DEFAULT_MM_LIFETIME = 28800


def to_model_isakmp(data: IpsecIsakmpPolicyData) -> pb.IsakmpSettings:
    s = pb.IsakmpSettings(qm_per_mm=data.qm_limit, master_key_pfs=bool(data.master_pfs_required))
    s.lifetime_minutes = (data.mm_lifetime or _DEFAULT_MM_LIFETIME) // 60
    for k, v in enumerate(data.new_dh):
        if v == 0:
            break
        if v not in _NEW_DH:
            raise GpIpsecError(f"ipsecISAKMPPolicy: New-DH-{k + 1} value {v} is unknown")
        enc, integ = _NEW_DH[v]
        s.methods.add(encryption=enc, integrity=integ, dh_group=pb.DH_GROUP_MODP2048)
    for i, m in enumerate(data.security_methods):
        where = f"ipsecISAKMPPolicy Security-Method[{i}]"
        if m.random_function:
            if m.random_function not in _NEW_DH:
                raise GpIpsecError(f"{where}: Random-Function {m.random_function} is unknown")
            enc, integ = _NEW_DH[m.random_function]
            s.methods.add(encryption=enc, integrity=integ, dh_group=pb.DH_GROUP_MODP2048)
            continue
        if (
            m.encryption_algorithm_id not in _MM_CIPHERS
            or m.hash_algorithm_id not in _MM_HASH
            or m.oakley_group not in _GROUPS
        ):
            raise GpIpsecError(
                f"{where}: {m.encryption_algorithm_id}/{m.hash_algorithm_id}/group {m.oakley_group:#x} cannot be mapped"
            )
        s.methods.add(
            encryption=_MM_CIPHERS[m.encryption_algorithm_id],
            integrity=_MM_HASH[m.hash_algorithm_id],
            dh_group=_GROUPS[m.oakley_group],
        )
    return s


def from_model_isakmp(s: pb.IsakmpSettings, *, instance: uuid.UUID | None = None) -> IpsecIsakmpPolicyData:
    """Every method goes into the Security-Method list (group 14 as Oakley-Group 0x10000001, not New-DH).

    ``instance`` is the ISAKMP-Policy-Instance; modern Windows writes zeros (the default here).
    """
    if s.ike_version == 2:
        raise GpIpsecError("IKEv2 settings cannot be stored in ipsecISAKMPPolicy")
    if s.ike_version not in (0, 1):
        raise GpIpsecError(f"IKE version {s.ike_version} cannot be stored in ipsecISAKMPPolicy (IKEv1 only)")
    if s.lifetime_minutes == 0:
        raise GpIpsecError("main mode lifetime 0 cannot be stored (Windows reads MM-Lifetime 0 as 480 minutes)")
    lifetime = s.lifetime_minutes * 60 if s.lifetime_minutes else _DEFAULT_MM_LIFETIME
    methods = []
    for i, m in enumerate(s.methods):
        if m.encryption not in _MM_CIPHER_ID or m.integrity not in _MM_HASH_ID or m.dh_group not in _GROUP_ID:
            raise GpIpsecError(
                f"main-mode method {i} ({m.encryption}/{m.integrity}/{m.dh_group}) has no ipsecISAKMPPolicy encoding"
            )
        methods.append(
            SecurityMethod(
                _MM_CIPHER_ID[m.encryption],
                _MM_HASH_ID[m.integrity],
                _GROUP_ID[m.dh_group],
                oakley_lifetime_secs=lifetime,
                qm_limit=s.qm_per_mm,
            )
        )
    return IpsecIsakmpPolicyData(
        security_methods=tuple(methods),
        isakmp_policy_instance=instance or NIL_GUID,
        master_pfs_required=int(s.master_key_pfs),
        qm_limit=s.qm_per_mm,
        mm_lifetime=lifetime,
    )


# Rules (ref §2.3). Auth-Method-Data: PSK and CA name as UTF-16LE with a NUL, Kerberos 00 00. The modern
# Alt-Auth extension repeats the list (Kerberos with length 0 as observed; PSK / CA name repeated [OPEN])
# and carries the per-method certificate flags, read here as bits: 1 cert-to-account mapping, 2 exclude the
# CA name [INF]. Interface-Type 0xFFFFFFFD/E/F = all / LAN / remote access.

_CONNECTION_INTERFACE = {
    pb.CONNECTION_TYPE_ALL: INTERFACE_ALL,
    pb.CONNECTION_TYPE_LAN: INTERFACE_LAN,
    pb.CONNECTION_TYPE_REMOTE_ACCESS: INTERFACE_DIALUP,
}
_INTERFACE_CONNECTION = {v: k for k, v in _CONNECTION_INTERFACE.items()}
CERT_FLAG_ACCOUNT_MAPPING = 1
CERT_FLAG_EXCLUDE_CA_NAME = 2
_KERBEROS_DATA = b"\x00\x00"


def _utf16z(text: str) -> bytes:
    return (text + "\x00").encode("utf-16-le", errors="surrogatepass")


def from_model_auth_methods(
    methods: Sequence[pb.AuthMethod], where: str
) -> tuple[tuple[AuthMethodEntry, ...], AltAuth]:
    """The Auth-Method list and the Alt-Auth extension for a rule's authentication methods.

    Error messages never include a pre-shared key.
    """
    primary: list[AuthMethodEntry] = []
    alternate: list[AuthMethodEntry] = []
    flags: list[int] = []
    for i, m in enumerate(methods):
        which = m.WhichOneof("method")
        if which == "kerberos":
            primary.append(AuthMethodEntry(AUTH_KERBEROS, _KERBEROS_DATA))
            alternate.append(AuthMethodEntry(AUTH_KERBEROS, b""))
            flags.append(0)
        elif which == "preshared_key":
            if not m.preshared_key.key or "\x00" in m.preshared_key.key:
                raise GpIpsecError(f"{where} authentication method {i + 1}: the pre-shared key is empty or has a NUL")
            data = _utf16z(m.preshared_key.key)
            primary.append(AuthMethodEntry(AUTH_PSK, data))
            alternate.append(AuthMethodEntry(AUTH_PSK, data))
            flags.append(0)
        elif which == "certificate":
            c = m.certificate
            if not c.root_ca or "\x00" in c.root_ca:
                raise GpIpsecError(f"{where} authentication method {i + 1}: the root CA name is empty or has a NUL")
            data = _utf16z(c.root_ca)
            primary.append(AuthMethodEntry(AUTH_CERTIFICATE, data))
            alternate.append(AuthMethodEntry(AUTH_CERTIFICATE, data))
            flags.append(
                (CERT_FLAG_ACCOUNT_MAPPING if c.cert_to_account_mapping else 0)
                | (CERT_FLAG_EXCLUDE_CA_NAME if c.exclude_ca_name else 0)
            )
        else:
            raise GpIpsecError(f"{where} authentication method {i + 1}: no method given")
    return tuple(primary), AltAuth(tuple(alternate), tuple(flags))


def to_model_auth_methods(nfa: IpsecNfaData, where: str = "ipsecNFA") -> list[pb.AuthMethod]:
    flags: tuple[int, ...] = ()
    if nfa.alt_auth is not None and len(nfa.alt_auth.flags) == len(nfa.auth_methods):
        flags = nfa.alt_auth.flags
    out = []
    for i, e in enumerate(nfa.auth_methods):
        if e.auth_type == AUTH_KERBEROS:
            out.append(pb.AuthMethod(kerberos=pb.KerberosAuth()))
        elif e.auth_type == AUTH_PSK:
            out.append(pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=_utf16_text(e.data, where, i))))
        elif e.auth_type == AUTH_CERTIFICATE:
            f = flags[i] if flags else 0
            out.append(
                pb.AuthMethod(
                    certificate=pb.CertificateAuth(
                        root_ca=_utf16_text(e.data, where, i),
                        cert_to_account_mapping=bool(f & CERT_FLAG_ACCOUNT_MAPPING),
                        exclude_ca_name=bool(f & CERT_FLAG_EXCLUDE_CA_NAME),
                    )
                )
            )
        else:
            raise GpIpsecError(f"{where}: Auth-Method[{i}] has the unknown Auth-Type {e.auth_type}")
    return out


def _utf16_text(data: bytes, where: str, i: int) -> str:
    if len(data) % 2:
        raise GpIpsecError(f"{where}: Auth-Method[{i}] data has an odd UTF-16 length {len(data)}")
    text = data.decode("utf-16-le", errors="surrogatepass")
    return text[:-1] if text.endswith("\x00") else text


def _tunnel_fields(endpoint: str, where: str) -> tuple[ipaddress.IPv4Address, int, ipaddress.IPv6Address | None]:
    """(Tunnel-Address, Is-Tunnel-Specifier, IPv6-Tunnel-Mode-Address) for a rule's tunnel endpoint."""
    if not endpoint:
        return ZERO_IPV4, 0, None
    try:
        ip = ipaddress.ip_address(endpoint)
    except ValueError:
        raise GpIpsecError(f"{where}: tunnel endpoint {endpoint!r} is not an IP address") from None
    if ip.is_unspecified:
        raise GpIpsecError(f"{where}: tunnel endpoint {endpoint} cannot be stored (it reads back as no tunnel)")
    if isinstance(ip, ipaddress.IPv4Address):
        return ip, 1, None
    return ZERO_IPV4, 1, ip  # the IPv6 extension supersedes Tunnel-Address (ref §2.3)


def _tunnel_endpoint(nfa: IpsecNfaData, where: str) -> str:
    if nfa.tunnel_end_point_name:
        raise GpIpsecError(f"{where}: Tunnel-End-Point-Name (a DNS-named tunnel endpoint) is not supported")
    if not nfa.is_tunnel_specifier:
        return ""
    if nfa.ipv6_tunnel_mode_address is not None:
        return str(nfa.ipv6_tunnel_mode_address)
    if nfa.tunnel_address == ZERO_IPV4:
        raise GpIpsecError(f"{where}: Is-Tunnel-Specifier is set without a tunnel address")
    return str(nfa.tunnel_address)


def from_model_rule(rule: pb.Rule, where: str = "rule") -> IpsecNfaData:
    """The NFA blob of a rule (filter list, filter action, name: LDAP attributes and references)."""
    if rule.connection_type not in _CONNECTION_INTERFACE:
        raise GpIpsecError(f"{where}: connection type {rule.connection_type} cannot be stored (all, lan or dialup)")
    auth, alt = from_model_auth_methods(rule.auth_methods, where)
    tunnel, is_tunnel, v6 = _tunnel_fields(rule.tunnel_endpoint, where)
    return IpsecNfaData(
        auth_methods=auth,
        interface_type=_CONNECTION_INTERFACE[rule.connection_type],
        tunnel_address=tunnel,
        is_tunnel_specifier=is_tunnel,
        is_active_specifier=int(rule.active),
        alt_auth=alt,
        ipv6_tunnel_mode_address=v6,
    )


def to_model_rule(
    nfa: IpsecNfaData,
    *,
    id: str = "",
    name: str = "",
    description: str = "",
    filter_list_id: str = "",
    filter_action_id: str = "",
    where: str = "ipsecNFA",
) -> pb.Rule:
    if nfa.interface_type not in _INTERFACE_CONNECTION:
        raise GpIpsecError(f"{where}: unknown Interface-Type {nfa.interface_type:#x}")
    return pb.Rule(
        id=id,
        name=name,
        description=description,
        filter_list_id=filter_list_id,
        filter_action_id=filter_action_id,
        auth_methods=to_model_auth_methods(nfa, where),
        tunnel_endpoint=_tunnel_endpoint(nfa, where),
        connection_type=_INTERFACE_CONNECTION[nfa.interface_type],
        active=bool(nfa.is_active_specifier),
    )


def from_model_default_response_rule(
    drr: pb.DefaultResponseRule, where: str = "default response rule"
) -> tuple[IpsecNfaData, IpsecNegotiationPolicyData]:
    """The NFA (all connections, no tunnel, no filter) and its negotiation policy, whose
    iPSECNegotiationPolicyType is TYPE_DEFAULT_RESPONSE and action ACTION_SECURE."""
    auth, alt = from_model_auth_methods(drr.auth_methods, where)
    nfa = IpsecNfaData(auth_methods=auth, is_active_specifier=int(drr.active), alt_auth=alt)
    return nfa, IpsecNegotiationPolicyData(tuple(_offers_from_model(drr.methods, drr.session_key_pfs, where)))


def to_model_default_response_rule(
    nfa: IpsecNfaData, negpol: IpsecNegotiationPolicyData, action: uuid.UUID, *, id: str = "", where: str = "ipsecNFA"
) -> pb.DefaultResponseRule:
    if action != ACTION_SECURE:
        raise GpIpsecError(f"{where}: a default response action must be Secure, not {_guid_str(action)}")
    if nfa.is_tunnel_specifier or nfa.tunnel_end_point_name:
        raise GpIpsecError(f"{where}: a default response rule cannot be a tunnel rule")
    fa = to_model_filter_action(negpol, action)
    if fa.fallback_to_clear:
        raise GpIpsecError(f"{where}: a default response rule cannot fall back to clear")
    return pb.DefaultResponseRule(
        id=id,
        active=bool(nfa.is_active_specifier),
        methods=fa.methods,
        session_key_pfs=fa.session_key_pfs,
        auth_methods=to_model_auth_methods(nfa, where),
    )


# Policies (ref §2.1): Polling-Interval in seconds, 0 = 10,800; the model keeps minutes.

_DEFAULT_POLLING_SECONDS = 10800


def from_model_policy(policy: pb.Policy) -> IpsecPolicyData:
    """The ipsecPolicy blob (name, description, ISAKMP and rules live elsewhere)."""
    if policy.polling_interval_minutes == 0:
        raise GpIpsecError(f"policy {policy.id}: polling interval 0 cannot be stored (Windows reads 0 as 180 minutes)")
    seconds = policy.polling_interval_minutes * 60
    _u32_field(BlobType.POLICY, "Polling-Interval", seconds)
    return IpsecPolicyData(polling_interval=seconds)


def to_model_polling_minutes(data: IpsecPolicyData) -> int:
    """Polling-Interval in whole minutes (rounded up), 0 read as 10,800 s."""
    seconds = data.polling_interval or _DEFAULT_POLLING_SECONDS
    return -(-seconds // 60)
