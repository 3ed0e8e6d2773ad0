"""Kerberos keying for IKE: two domain members prove their host identities with GSS-API and agree a per-pair PSK.

strongSwan has no Kerberos IKE authentication (Windows' "Kerberos V5" method, DESIGN §5). Instead the
agents run this small exchange over TCP (port 4501, exempt from IPsec filtering) before IKE: each side
authenticates as its host principal `host/<fqdn>@REALM` from its keytab, the initiator sends a fresh
random key under the GSS context's encryption, and both derive the IKE pre-shared key for the pair of
addresses from it. No static secret is configured anywhere; the key expires with the Kerberos ticket
and the initiator re-runs the exchange before then (rotation).

Protocol (version 1). Every message is one frame:

    magic "PK" (2) | version 1 (1) | type (1) | payload length (4, big endian) | payload

    type        direction  payload                                               limit
    1 CONTEXT   both       a GSS-API context token (Kerberos AP-REQ / AP-REP)     65536
    2 CHALLENGE A -> I     wrap(nonce_a: 32 random bytes)                         1024
    3 KEY       I -> A     wrap(nonce_a | key 32 | expires f64 | ip_i | ip_a)     1024
    4 DONE      A -> I     wrap(confirm 32 | expires f64)                         1024
    127 ERROR   both       UTF-8 one-line reason, then the sender closes          512

`wrap` is GSS_Wrap with confidentiality (RFC 4121 §4.2.6.2; the receiver rejects unencrypted tokens);
ip_i / ip_a are one length byte and the address text, as the initiator sees its own and the acceptor's
address on this TCP connection. The exchange:

    I: acquire credentials from the keytab (AS-REQ), init context for the target (TGS-REQ), connect
    I -> A  CONTEXT(AP-REQ, mutual auth + integrity + confidentiality)
    A -> I  CONTEXT(AP-REP)  CHALLENGE       (after checking the initiator is a host of our realm)
    I -> A  KEY                              (the acceptor checks the nonce echo and the addresses)
    A: PSK, on_key(PairKey)                  (install it), then
    A -> I  DONE                             (key confirmation; the initiator checks it)

    PSK      = HKDF-SHA256(ikm=key, salt=nonce_a, info="policyagent ike psk v1" 0 ip_lo 0 ip_hi)  (32 bytes)
    confirm  = HMAC-SHA256(PSK, "policyagent kerbkey confirm v1")
    expires  = min(initiator's context end, acceptor's context end) = the service ticket's end time

ip_lo/ip_hi are the pair of addresses in canonical text form, sorted, so both sides derive the same PSK.

Threat model. An attacker on the path (who can read, drop, inject and replay packets, but holds no host
key of the realm):
- cannot learn the key: it only travels wrapped (encrypted) under the GSS context's key, which only the
  two principals can derive (and the KDC, which a realm trusts anyway, as Windows does);
- cannot impersonate either side: the initiator's AP-REQ needs a ticket issued by the KDC to that
  principal (its keytab), and mutual authentication makes the acceptor prove it holds the target's key
  before the initiator sends anything secret;
- cannot replay: a recorded exchange replayed to the acceptor meets a fresh nonce_a it cannot echo
  (the KEY message must be wrapped under the new context's key), so nothing is installed; Kerberos'
  replay cache rejects the replayed AP-REQ in addition. Replayed tokens from other protocols using the
  same host/ keys (e.g. ssh) fail the same way;
- can deny service (drop or reset the TCP connection, forge ERROR frames, which are not authenticated
  and only ever end an exchange): no key is installed, IKE then fails as for an unreachable peer;
- sees the target principal name (in the clear in the AP-REQ, as in any Kerberos use) and error texts.
A domain member is trusted to key with any other member (as on Windows); it cannot learn other pairs'
keys. The acceptor binds the key to the TCP source address it observed and refuses if the initiator's
view differs (NAT between the peers, or spoofing); a member able to spoof another's address could
still obtain a key for that address, so the IKE identities should be the FQDNs of the principals
(`PairKey.peer_principal`), not bare addresses. An optional name→address map (`expected_addresses`)
logs, without enforcing, peers whose address does not match their principal.

Kerberos configuration is process-wide. MIT libkrb5 reads KRB5_CONFIG (and KRB5_KTNAME, KRB5RCACHEDIR,
…) with getenv() each time the GSS mechanism creates a krb5 context, i.e. on every acquire, init and
accept — not once at import (verified with MIT 1.20 and python-gssapi 1.12: changing KRB5_CONFIG between
two calls switched realms) — and the GSS credential store has no key for the config file. So either set
the environment once at daemon start, before any thread runs (the usual case: a domain member's
/etc/krb5.conf needs nothing), or pass `krb5_env`: `configure_krb5_env` then writes os.environ, and only
when a value differs, so steady state never writes the environment while other threads may read it.
Every Kerberos user in the process (enrollment included) shares that one configuration.

The `gssapi` package (extra `kerberos`) is imported lazily; without it every call fails with
KerbKeyError(kind="local") saying so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

DEFAULT_PORT = 4501
VERSION = 1
MAGIC = b"PK"
PSK_LABEL = b"policyagent ike psk v1"
CONFIRM_LABEL = b"policyagent kerbkey confirm v1"
KEY_BYTES = 32
NONCE_BYTES = 32
MAX_CONTEXT_ROUNDS = 4  # Kerberos needs one; anything more is not a Kerberos peer
DEFAULT_LIFETIME_S = 3600.0  # only if the mechanism reports an indefinite context lifetime

_HEADER = struct.Struct("!2sBBI")
_F64 = struct.Struct("!d")


class MsgType(enum.IntEnum):
    CONTEXT = 1
    CHALLENGE = 2
    KEY = 3
    DONE = 4
    HELLO = 5  # "who are you?" → the acceptor's host principal (unauthenticated; the exchange proves it)
    ERROR = 127


MAX_PAYLOAD: dict[MsgType, int] = {
    MsgType.CONTEXT: 65536,  # AD tickets with a PAC reach tens of KiB (Windows' MaxTokenSize is 48000)
    MsgType.CHALLENGE: 1024,
    MsgType.KEY: 1024,
    MsgType.DONE: 1024,
    MsgType.HELLO: 512,
    MsgType.ERROR: 512,
}


class KerbKeyError(RuntimeError):
    """Keying with a peer failed. The message is one line naming the peer; `kind` classifies it:

    local        this host cannot key (no gssapi, no keytab, bad principal): not the peer's fault
    kerberos     the KDC or GSS-API refused (unknown principal, stale keytab, clock skew, KDC unreachable)
    unreachable  nothing answered on the peer's keying port (connection refused, no route)
    timeout      the peer did not answer in time
    refused      the peer answered with a refusal (its reason is in the message)
    protocol     the peer broke the protocol (garbage, wrong sizes, failed key confirmation)
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(" ".join(message.split()))
        self.kind = kind


class ProtocolError(Exception):
    """The other side sent something that is not this protocol."""


class _PeerRefused(Exception):
    """The other side sent an ERROR frame."""


class _Timeout(Exception):
    pass


class _Closed(Exception):
    pass


# --------------------------------------------------------------------------------------------- pure core


def encode_frame(kind: MsgType, payload: bytes) -> bytes:
    """One frame; ValueError if `payload` exceeds the type's limit (a bug on our side)."""
    if len(payload) > MAX_PAYLOAD[kind]:
        raise ValueError(f"{kind.name} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD[kind]}")
    return _HEADER.pack(MAGIC, VERSION, int(kind), len(payload)) + payload


def decode_header(header: bytes) -> tuple[MsgType, int]:
    """(type, payload length) of a frame header; ProtocolError saying what is wrong otherwise."""
    magic, version, kind, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"not a policyagent keying message (starts with {header[:4]!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported keying protocol version {version} (this agent speaks {VERSION})")
    try:
        msg_type = MsgType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    if length > MAX_PAYLOAD[msg_type]:
        raise ProtocolError(f"{msg_type.name} message of {length} bytes exceeds the limit of {MAX_PAYLOAD[msg_type]}")
    return msg_type, length


def canonical_ip(address: str) -> str:
    """The canonical text of an address; IPv4-mapped IPv6 (dual-stack sockets) becomes IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _ip_order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def derive_psk(key: bytes, nonce: bytes, ip_a: str, ip_b: str) -> bytes:
    """The pair's IKE PSK: HKDF-SHA256(key, salt=nonce, info=label 0 ip_lo 0 ip_hi); symmetric in the IPs."""
    lo, hi = sorted((canonical_ip(ip_a), canonical_ip(ip_b)), key=_ip_order)
    info = PSK_LABEL + b"\0" + lo.encode() + b"\0" + hi.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=info).derive(key)


def key_confirmation(psk: bytes) -> bytes:
    return hmac.new(psk, CONFIRM_LABEL, hashlib.sha256).digest()


def key_id_of(psk: bytes) -> str:
    """A short one-way identifier of a PSK, the same on both sides: safe to log and compare."""
    return hashlib.sha256(b"policyagent kerbkey id\0" + psk).hexdigest()[:12]


@dataclass(frozen=True)
class KeyMessage:
    """The KEY payload (before wrapping)."""

    nonce: bytes
    key: bytes = field(repr=False)
    expires_unix: float
    initiator_ip: str
    acceptor_ip: str

    def pack(self) -> bytes:
        i, a = self.initiator_ip.encode(), self.acceptor_ip.encode()
        return self.nonce + self.key + _F64.pack(self.expires_unix) + bytes([len(i)]) + i + bytes([len(a)]) + a

    @classmethod
    def unpack(cls, data: bytes) -> KeyMessage:
        fixed = NONCE_BYTES + KEY_BYTES + _F64.size
        try:
            nonce, key = data[:NONCE_BYTES], data[NONCE_BYTES : NONCE_BYTES + KEY_BYTES]
            (expires,) = _F64.unpack(data[NONCE_BYTES + KEY_BYTES : fixed])
            n = data[fixed]
            ip_i = data[fixed + 1 : fixed + 1 + n].decode("ascii")
            m = data[fixed + 1 + n]
            ip_a = data[fixed + 2 + n : fixed + 2 + n + m].decode("ascii")
            if fixed + 2 + n + m != len(data) or len(ip_i) != n or len(ip_a) != m:
                raise ValueError("length mismatch")
            return cls(nonce, key, expires, canonical_ip(ip_i), canonical_ip(ip_a))
        except (IndexError, ValueError, struct.error) as exc:
            raise ProtocolError(f"malformed KEY message ({exc})") from None


@dataclass(frozen=True)
class PairKey:
    """The IKE PSK of this host and `peer_ip`, agreed with `peer_principal`. `psk` is never shown or logged."""

    peer_ip: str
    peer_principal: str
    psk: bytes = field(repr=False)
    expires_unix: float
    key_id: str = field(init=False)
    local_ip: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id_of(self.psk))

    def expired(self, now: float) -> bool:
        return now >= self.expires_unix

    def renew_at(self, margin_s: float = 300.0) -> float:
        """When the initiator should re-run negotiate_key: `margin_s` before expiry."""
        return self.expires_unix - margin_s

    def preferred_over(self, other: PairKey) -> bool:
        """The deterministic choice when two keys for one pair exist (both peers initiated at once):
        the later expiry wins, then the larger key_id. Both sides hold the same (expires, key_id) for a key,
        so both keep the same one."""
        return (self.expires_unix, self.key_id) > (other.expires_unix, other.key_id)


class PairKeyTable:
    """The current key per (local_ip, peer_ip), fed by negotiate_key results and KeyingService.on_key.

    Thread-safe (on_key runs on the service thread). `offer` keeps a key only if it is preferred over
    the one held (PairKey.preferred_over), so simultaneous negotiations in both directions converge on
    the same key on both hosts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str], PairKey] = {}

    def offer(self, key: PairKey) -> bool:
        """True if `key` is now the pair's key (the caller then loads it into charon)."""
        slot = (key.local_ip, key.peer_ip)
        with self._lock:
            held = self._keys.get(slot)
            if held is not None and not key.preferred_over(held):
                return False
            self._keys[slot] = key
            return True

    def get(self, local_ip: str, peer_ip: str) -> PairKey | None:
        with self._lock:
            return self._keys.get((canonical_ip(local_ip), canonical_ip(peer_ip)))

    def due(self, now: float, margin_s: float = 300.0) -> list[PairKey]:
        """Keys whose renewal time has come (expired ones included)."""
        with self._lock:
            return [k for k in self._keys.values() if now >= k.renew_at(margin_s)]

    def valid(self, now: float) -> list[PairKey]:
        """The keys not yet expired (expired ones are dropped)."""
        self.drop_expired(now)
        with self._lock:
            return list(self._keys.values())

    def drop_expired(self, now: float) -> list[PairKey]:
        with self._lock:
            gone = [k for k in self._keys.values() if k.expired(now)]
            for k in gone:
                del self._keys[(k.local_ip, k.peer_ip)]
            return gone


@dataclass(frozen=True)
class HostPrincipalName:
    service: str
    instance: str
    realm: str


def split_principal(principal: str) -> HostPrincipalName | None:
    """host/INSTANCE@REALM → its parts; None for anything else (users, other services, no realm)."""
    name, at, realm = principal.rpartition("@")
    service, slash, instance = name.partition("/")
    if not at or not realm or not slash or not instance or "/" in instance:
        return None
    return HostPrincipalName(service, instance, realm)


def initiator_refusal(initiator: str, own_realm: str) -> str | None:
    """Why an authenticated initiator may not key with us (None: it may): a host principal of our realm."""
    parts = split_principal(initiator)
    if parts is None or parts.service.lower() != "host":
        return f"initiator {initiator} is not a computer's host principal (host/NAME@REALM)"
    if parts.realm != own_realm:
        return f"initiator {initiator} is not a member of realm {own_realm}"
    return None


# Explanations of MIT krb5 minor status codes (krb5.h, error table base -1765328384).
_KRB5_HINTS: dict[int, str] = {
    -1765328378: "the KDC does not know this client principal (not a member of the realm)",  # C_PRINCIPAL_UNKNOWN
    -1765328377: "the KDC does not know the target principal (wrong target, or the peer is not a domain member)",
    -1765328366: "the client principal is disabled in the realm",  # CLIENT_REVOKED
    -1765328360: "the keytab's keys do not match the KDC (stale keytab: re-join the domain)",  # PREAUTH_FAILED
    -1765328353: "keys do not match (stale keytab, or a ticket for another principal)",  # BAD_INTEGRITY
    -1765328352: "the ticket has expired",  # TKT_EXPIRED
    -1765328351: "the ticket is not yet valid (clock skew)",  # TKT_NYV
    -1765328350: "replayed authenticator",  # REPEAT
    -1765328349: "the ticket is for another principal than this host's",  # NOT_US
    -1765328347: "clock skew too great between the hosts (synchronize their clocks)",  # AP_ERR_SKEW
    -1765328236: "clock skew too great with the KDC (synchronize the clocks)",  # KDCREP_SKEW
    -1765328340: "the keytab has no key of the ticket's version (stale keytab)",  # BADKEYVER
    -1765328339: "the keytab has no key for the ticket",  # NOKEY
    -1765328240: "the ticket is for another principal than this host's",  # WRONG_PRINC
    -1765328230: "the realm is not configured here (krb5.conf)",  # REALM_UNKNOWN
    -1765328228: "the KDC is unreachable",  # KDC_UNREACH
    -1765328164: "no KDC is configured for the realm (krb5.conf / KRB5_CONFIG)",  # REALM_CANT_RESOLVE
    -1765328203: "the keytab has no key for this principal",  # KT_NOTFOUND
    -1765328202: "the keytab has no key for this principal",  # KT_END
    -1765328189: "the keytab or ticket cache file does not exist",  # FCC_NOFILE
}


def explain_gss_error(exc: Any) -> str:
    """One line for a gssapi GSSError: a hint from the krb5 minor code (if known) and the library's text."""
    text = " ".join(str(exc).split())
    minor = text.split("Minor (", 1)
    if len(minor) == 2 and "): " in minor[1]:
        text = minor[1].split("): ", 1)[1] or text
    code = int(getattr(exc, "min_code", 0) or 0)
    if code >= 2**31:
        code -= 2**32
    hint = _KRB5_HINTS.get(code)
    return f"{hint} ({text})" if hint else text


def _one_line(text: str, limit: int = 400) -> str:
    clean = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(clean.split())[:limit]


# -------------------------------------------------------------------------------------- krb5 environment

_ENV_LOCK = threading.Lock()


def configure_krb5_env(env: Mapping[str, str] | None) -> None:
    """Make libkrb5 use `env` (e.g. KRB5_CONFIG): sets os.environ, process-wide, only where a value differs.

    See the module docstring: libkrb5 reads these variables on every GSS call, so they take effect at the
    next call; all Kerberos users in the process share them."""
    if not env:
        return
    with _ENV_LOCK:
        for name, value in env.items():
            if os.environ.get(name) != value:
                log.debug("setting %s=%s for Kerberos", name, value)
                os.environ[name] = value


def _gssapi() -> Any:
    try:
        import gssapi
    except ImportError:
        raise KerbKeyError(
            "Kerberos keying needs the python package gssapi (install policyagent with the 'kerberos' extra)",
            "local",
        ) from None
    return gssapi


_LIBKRB5: list[Any] = []


def _destroy_ccache(name: str) -> None:
    """Destroy a MEMORY ticket cache: MIT keeps those until destroyed, so one per negotiation would leak.
    Best effort through libkrb5 (already loaded by gssapi); a failure costs only a few KiB."""
    try:
        if not _LIBKRB5:
            try:
                lib = ctypes.CDLL("libkrb5.so.3")
            except OSError:
                lib = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so")
            lib.krb5_init_context.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            lib.krb5_cc_resolve.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
            lib.krb5_cc_destroy.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.krb5_free_context.argtypes = [ctypes.c_void_p]
            _LIBKRB5.append(lib)
        lib = _LIBKRB5[0]
        ctx = ctypes.c_void_p()
        if lib.krb5_init_context(ctypes.byref(ctx)) != 0:
            return
        try:
            cache = ctypes.c_void_p()
            if lib.krb5_cc_resolve(ctx, name.encode(), ctypes.byref(cache)) == 0:
                lib.krb5_cc_destroy(ctx, cache)
        finally:
            lib.krb5_free_context(ctx)
    except (OSError, AttributeError) as exc:
        log.debug("cannot destroy ticket cache %s: %s", name, exc)


# -------------------------------------------------------------------------------------------------- I/O


class _Channel:
    """Frames over one TCP connection, every operation bounded by the exchange's deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.step = "connecting"

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Timeout(self.step)
        return left

    def send(self, kind: MsgType, payload: bytes) -> None:
        self.sock.settimeout(self._remaining())
        try:
            self.sock.sendall(encode_frame(kind, payload))
        except TimeoutError:
            raise _Timeout(self.step) from None
        except OSError as exc:
            raise _Closed(f"{exc.strerror or exc}") from None

    def send_error(self, reason: str) -> None:
        """Best effort: tell the other side why, then the caller closes."""
        data = _one_line(reason).encode()[: MAX_PAYLOAD[MsgType.ERROR]]
        with contextlib.suppress(OSError, _Timeout, _Closed):
            self.sock.settimeout(max(0.05, min(1.0, self.deadline - time.monotonic())))
            self.sock.sendall(encode_frame(MsgType.ERROR, data))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self.sock.settimeout(self._remaining())
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise _Timeout(self.step) from None
            except OSError as exc:
                raise _Closed(f"{exc.strerror or exc}") from None
            if not chunk:
                raise _Closed("the connection was closed")
            buf += chunk
        return bytes(buf)

    def recv(self, expect: MsgType) -> bytes:
        kind, payload = self.recv_any()
        if kind is not expect:
            raise ProtocolError(f"expected {expect.name}, got {kind.name}")
        return payload

    def recv_any(self) -> tuple[MsgType, bytes]:
        kind, length = decode_header(self._recv_exact(_HEADER.size))
        payload = self._recv_exact(length)
        if kind is MsgType.ERROR:
            raise _PeerRefused(_one_line(payload.decode("utf-8", "replace")) or "no reason given")
        return kind, payload


def discover_principal(peer_ip: str, port: int = DEFAULT_PORT, *, timeout: float = 5.0) -> str:
    """Ask the keying service at `peer_ip` which host principal it runs as.

    The answer is not authenticated; it only names the target for the Kerberos exchange that follows,
    which proves the peer holds that principal's key (as Windows' Kerberos IKE authentication proves a
    peer is a domain computer, whatever its address)."""
    peer = canonical_ip(peer_ip)
    try:
        sock = socket.create_connection((peer, port), timeout=timeout)
    except OSError as exc:
        raise KerbKeyError(
            f"Kerberos keying with {peer}: cannot connect to port {port}: {exc.strerror or exc} "
            "(keying service not running?)",
            "unreachable",
        ) from None
    channel = _Channel(sock, time.monotonic() + timeout)
    try:
        with sock:
            channel.step = "asking the peer's name"
            channel.send(MsgType.HELLO, b"")
            principal = channel.recv(MsgType.HELLO).decode("utf-8", "replace")
    except (_PeerRefused, _Timeout, _Closed, ProtocolError, ValueError) as exc:
        raise KerbKeyError(f"Kerberos keying with {peer}: {channel.step} failed: {exc}", "protocol") from None
    if split_principal(principal) is None:
        raise KerbKeyError(f"Kerberos keying with {peer}: the peer names no host principal ({principal!r})", "refused")
    return principal


def _step(context: Any, token: bytes | None) -> tuple[bytes | None, bool]:
    """One GSS step: (token to send, complete). python-gssapi defers a failed step's error to the next
    property access (so that an error token could be sent); reading `complete` here raises it now: we
    send our own ERROR frame with the reason instead."""
    out = context.step(token)
    return (bytes(out) if out else None), bool(context.complete)


def _unwrap(context: Any, token: bytes, what: str) -> bytes:
    result = context.unwrap(token)
    if not result.encrypted:
        raise ProtocolError(f"the {what} message was not encrypted")
    return bytes(result.message)


def _context_end(context: Any) -> float:
    try:
        lifetime = int(context.lifetime)
    except Exception:  # an inquiry failure only loses the exact end time
        lifetime = 0
    if lifetime <= 0 or lifetime >= 0xFFFFFFFF:
        return time.time() + DEFAULT_LIFETIME_S
    return time.time() + lifetime


def _check_flags(context: Any, gss: Any) -> None:
    flags = gss.RequirementFlag
    wanted = {flags.mutual_authentication, flags.integrity, flags.confidentiality}
    missing = [f.name for f in wanted if f not in context.actual_flags]
    if missing:
        raise ProtocolError(f"the GSS-API context lacks {', '.join(sorted(missing))}")


# ------------------------------------------------------------------------------------------- initiator


def negotiate_key(
    peer_ip: str,
    port: int = DEFAULT_PORT,
    *,
    local_principal: str,
    keytab: Path,
    target_principal: str,
    krb5_env: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    source_ip: str | None = None,
) -> PairKey:
    """Key the pair (this host, `peer_ip`) with the peer's keying service; KerbKeyError says why not.

    `local_principal` (host/<our fqdn>@REALM) authenticates from `keytab` (no kinit: a private in-memory
    ticket cache per call, so every call gets a fresh ticket and a later expiry). `target_principal` is
    the peer's host/<fqdn>@REALM. `timeout` bounds the exchange with the peer (the KDC requests before
    it are bounded by libkrb5's own timeouts). `source_ip` binds the connection's source address: the key
    is bound to the addresses of this TCP connection, which must be the IKE addresses.
    """
    peer = canonical_ip(peer_ip)
    label = f"Kerberos keying with {peer} ({target_principal})"

    def fail(reason: str, kind: str) -> KerbKeyError:
        return KerbKeyError(f"{label}: {reason}", kind)

    gss = _gssapi()
    configure_krb5_env(krb5_env)
    if not keytab.is_file():
        raise fail(f"this computer has no keytab at {keytab} (not a domain member?)", "local")
    ccache = f"MEMORY:policyagent-kerbkey-{secrets.token_hex(8)}"
    try:
        try:
            name = gss.Name(local_principal, gss.NameType.kerberos_principal)
            creds = gss.Credentials(name=name, usage="initiate", store={"client_keytab": str(keytab), "ccache": ccache})
        except gss.exceptions.GSSError as exc:
            raise fail(
                f"cannot get Kerberos credentials as {local_principal}: {explain_gss_error(exc)}", "kerberos"
            ) from None
        flags = (
            gss.RequirementFlag.mutual_authentication
            | gss.RequirementFlag.integrity
            | gss.RequirementFlag.confidentiality
        )
        try:
            target = gss.Name(target_principal, gss.NameType.kerberos_principal)
            context = gss.SecurityContext(name=target, creds=creds, usage="initiate", flags=flags)
            token, complete = _step(context, None)
        except gss.exceptions.GSSError as exc:
            raise fail(f"cannot get a ticket for {target_principal}: {explain_gss_error(exc)}", "kerberos") from None
        return _initiate(gss, context, token, complete, peer, port, timeout, source_ip, fail)
    finally:
        _destroy_ccache(ccache)


def _initiate(
    gss: Any,
    context: Any,
    token: bytes | None,
    complete: bool,
    peer: str,
    port: int,
    timeout: float,
    source_ip: str | None,
    fail: Callable[[str, str], KerbKeyError],
) -> PairKey:
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection(
            (peer, port), timeout=timeout, source_address=(source_ip, 0) if source_ip else None
        )
    except TimeoutError:
        raise fail(f"no answer on port {port} within {timeout:g}s", "timeout") from None
    except OSError as exc:
        raise fail(
            f"cannot connect to port {port}: {exc.strerror or exc} (keying service not running?)", "unreachable"
        ) from None
    channel = _Channel(sock, deadline)
    try:
        with sock:
            local = canonical_ip(sock.getsockname()[0])
            rounds = 0
            while True:
                if token:
                    channel.step = "sending the Kerberos ticket"
                    channel.send(MsgType.CONTEXT, token)
                if complete:
                    break
                rounds += 1
                if rounds > MAX_CONTEXT_ROUNDS:
                    raise ProtocolError("the GSS-API exchange does not finish")
                channel.step = "waiting for the peer's Kerberos reply"
                token, complete = _step(context, channel.recv(MsgType.CONTEXT))
            _check_flags(context, gss)
            peer_principal = str(context.target_name)
            my_end = _context_end(context)
            channel.step = "waiting for the peer's challenge"
            nonce = _unwrap(context, channel.recv(MsgType.CHALLENGE), "CHALLENGE")
            if len(nonce) != NONCE_BYTES:
                raise ProtocolError(f"the challenge has {len(nonce)} bytes, not {NONCE_BYTES}")
            key = secrets.token_bytes(KEY_BYTES)
            message = KeyMessage(nonce, key, my_end, local, peer)
            channel.step = "sending the key"
            channel.send(MsgType.KEY, bytes(context.wrap(message.pack(), True).message))
            channel.step = "waiting for the peer's key confirmation"
            done = _unwrap(context, channel.recv(MsgType.DONE), "DONE")
            if len(done) != 32 + _F64.size:
                raise ProtocolError("malformed DONE message")
            psk = derive_psk(key, nonce, local, peer)
            if not hmac.compare_digest(done[:32], key_confirmation(psk)):
                raise ProtocolError("key confirmation failed")
            (expires,) = _F64.unpack(done[32:])
            if not expires <= my_end:
                raise ProtocolError("the peer's key expiry is later than the ticket's")
            pair = PairKey(peer, peer_principal, psk, expires, local_ip=local)
            log.info(
                "keyed with %s (%s) as %s: key %s until %s",
                peer,
                peer_principal,
                local,
                pair.key_id,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires)),
            )
            return pair
    except _PeerRefused as exc:
        raise fail(f"refused by the peer: {exc}", "refused") from None
    except _Timeout as exc:
        raise fail(f"timed out after {timeout:g}s {exc}", "timeout") from None
    except _Closed as exc:
        raise fail(f"the peer closed the connection while {channel.step} ({exc})", "protocol") from None
    except ProtocolError as exc:
        channel.send_error(str(exc))
        raise fail(f"protocol error while {channel.step}: {exc}", "protocol") from None
    except gss.exceptions.GSSError as exc:
        channel.send_error(f"GSS-API failure: {explain_gss_error(exc)}")
        raise fail(f"Kerberos failed while {channel.step}: {explain_gss_error(exc)}", "kerberos") from None


# -------------------------------------------------------------------------------------------- acceptor


class KeyingService:
    """The acceptor: a thread serving one keying exchange at a time on `bind` (default port 4501).

    Every completed exchange calls `on_key` (on the service thread; keep it short) with the new PairKey
    before the initiator is told it succeeded; if on_key raises, the initiator is refused. Initiators
    must be host principals of our realm, and `allowed(peer_ip, principal)` if given. `expected_addresses`
    (fqdn → addresses, e.g. from the fleet registry; never DNS here) only logs mismatches. Each connection
    gets `conn_timeout` seconds in total, so a stalled or slow client never blocks the service.
    """

    def __init__(
        self,
        *,
        bind: tuple[str, int],
        keytab: Path,
        principal: str,
        on_key: Callable[[PairKey], None],
        krb5_env: dict[str, str] | None = None,
        allowed: Callable[[str, str], bool] | None = None,
        conn_timeout: float = 10.0,
        expected_addresses: Callable[[str], Collection[str]] | None = None,
    ) -> None:
        parts = split_principal(principal)
        if parts is None:
            raise KerbKeyError(f"keying service: {principal!r} is not a service principal (host/NAME@REALM)", "local")
        self.bind = bind
        self.keytab = keytab
        self.principal = principal
        self.realm = parts.realm
        self.on_key = on_key
        self.krb5_env = krb5_env
        self.allowed = allowed
        self.conn_timeout = conn_timeout
        self.expected_addresses = expected_addresses
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._current: socket.socket | None = None
        self._lock = threading.Lock()
        self.served = 0  # connections handled (for tests and statistics)
        self.keys_issued = 0

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the keying service is not started")
        return int(self._listener.getsockname()[1])

    def _credentials(self, gss: Any) -> Any:
        name = gss.Name(self.principal, gss.NameType.kerberos_principal)
        return gss.Credentials(name=name, usage="accept", store={"keytab": str(self.keytab)})

    def start(self) -> None:
        """Check the keytab, bind, and serve on a daemon thread; KerbKeyError(kind="local") if we cannot."""
        gss = _gssapi()
        configure_krb5_env(self.krb5_env)
        if not self.keytab.is_file():
            raise KerbKeyError(f"keying service: no keytab at {self.keytab} (not a domain member?)", "local")
        try:
            self._credentials(gss)
        except gss.exceptions.GSSError as exc:
            raise KerbKeyError(
                f"keying service: cannot use {self.keytab} for {self.principal}: {explain_gss_error(exc)}", "local"
            ) from None
        family = socket.AF_INET6 if ":" in self.bind[0] else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self.bind)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            raise KerbKeyError(
                f"keying service: cannot listen on {self.bind[0]}:{self.bind[1]}: {exc}", "local"
            ) from None
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, args=(gss,), name="kerbkey-acceptor", daemon=True)
        self._thread.start()
        log.info("Kerberos keying service for %s on %s:%d", self.principal, self.bind[0], self.port)

    def stop(self) -> None:
        """Stop accepting, abort the exchange in progress, and wait for the thread."""
        self._stopping.set()
        with self._lock:
            sockets = [s for s in (self._listener, self._current) if s is not None]
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()/recv()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> KeyingService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, gss: Any) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.warning("keying service: accept failed; retrying", exc_info=True)
                self._stopping.wait(0.1)
                continue
            with self._lock:
                self._current = conn
            try:
                with conn:
                    self._handle(gss, conn, canonical_ip(addr[0]))
            except Exception:
                log.exception("keying service: unexpected failure with %s", addr[0])
            finally:
                with self._lock:
                    self._current = None
                self.served += 1

    def _refusal(self, peer_ip: str, initiator: str) -> str | None:
        reason = initiator_refusal(initiator, self.realm)
        if reason is None and self.allowed is not None and not self.allowed(peer_ip, initiator):
            reason = f"initiator {initiator} from {peer_ip} is not allowed to key with {self.principal}"
        return reason

    def _check_address(self, peer_ip: str, initiator: str) -> None:
        parts = split_principal(initiator)
        if self.expected_addresses is None or parts is None:
            return
        try:
            known = {canonical_ip(a) for a in self.expected_addresses(parts.instance)}
        except Exception:  # advisory only: never let a lookup break keying
            log.debug("keying service: address lookup for %s failed", parts.instance, exc_info=True)
            return
        if known and peer_ip not in known:
            log.warning(
                "keying service: %s keyed from %s, but %s is known at %s (not enforced)",
                initiator,
                peer_ip,
                parts.instance,
                ", ".join(sorted(known)),
            )

    def _handle(self, gss: Any, conn: socket.socket, peer_ip: str) -> None:
        channel = _Channel(conn, time.monotonic() + self.conn_timeout)
        initiator = "?"

        def refuse(reason: str, level: int = logging.WARNING) -> None:
            log.log(level, "keying service: refused %s (%s): %s", peer_ip, initiator, reason)
            channel.send_error(reason)

        try:
            configure_krb5_env(self.krb5_env)
            local_ip = canonical_ip(conn.getsockname()[0])
            try:
                creds = self._credentials(gss)  # per connection: picks up a rewritten keytab
            except gss.exceptions.GSSError as exc:
                refuse(f"the peer cannot use its keytab: {explain_gss_error(exc)}", logging.ERROR)
                return
            context = gss.SecurityContext(creds=creds, usage="accept")
            rounds, complete = 0, False
            while not complete:
                rounds += 1
                if rounds > MAX_CONTEXT_ROUNDS:
                    raise ProtocolError("the GSS-API exchange does not finish")
                channel.step = "waiting for the Kerberos ticket"
                kind, received = channel.recv_any()
                if kind is MsgType.HELLO and rounds == 1:
                    channel.send(MsgType.HELLO, self.principal.encode())
                    return
                if kind is not MsgType.CONTEXT:
                    raise ProtocolError(f"expected CONTEXT, got {kind.name}")
                try:
                    token, complete = _step(context, received)
                except gss.exceptions.GSSError as exc:
                    refuse(f"Kerberos refused the initiator's ticket: {explain_gss_error(exc)}")
                    return
                if token:
                    channel.step = "sending the Kerberos reply"
                    channel.send(MsgType.CONTEXT, token)
            initiator = str(context.initiator_name)
            _check_flags(context, gss)
            reason = self._refusal(peer_ip, initiator)
            if reason:
                refuse(reason)
                return
            self._check_address(peer_ip, initiator)
            nonce = secrets.token_bytes(NONCE_BYTES)
            channel.step = "sending the challenge"
            channel.send(MsgType.CHALLENGE, bytes(context.wrap(nonce, True).message))
            channel.step = "waiting for the key"
            message = KeyMessage.unpack(_unwrap(context, channel.recv(MsgType.KEY), "KEY"))
            if not hmac.compare_digest(message.nonce, nonce):
                raise ProtocolError("the KEY message does not answer this exchange's challenge")
            if len(message.key) != KEY_BYTES:
                raise ProtocolError("the key has the wrong size")
            if (message.initiator_ip, message.acceptor_ip) != (peer_ip, local_ip):
                refuse(
                    f"address mismatch: the initiator sees {message.initiator_ip} -> {message.acceptor_ip}, "
                    f"the acceptor sees {peer_ip} -> {local_ip} (NAT or a proxy between the peers?)"
                )
                return
            expires = min(message.expires_unix, _context_end(context))
            psk = derive_psk(message.key, nonce, peer_ip, local_ip)
            pair = PairKey(peer_ip, initiator, psk, expires, local_ip=local_ip)
            try:
                self.on_key(pair)
            except Exception:
                log.exception("keying service: installing key %s for %s failed", pair.key_id, peer_ip)
                refuse("the peer could not install the key", logging.ERROR)
                return
            channel.step = "sending the key confirmation"
            channel.send(MsgType.DONE, bytes(context.wrap(key_confirmation(psk) + _F64.pack(expires), True).message))
            self.keys_issued += 1
            log.info(
                "keying service: keyed with %s (%s): key %s until %s",
                peer_ip,
                initiator,
                pair.key_id,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires)),
            )
        except _Timeout as exc:
            refuse(f"timed out after {self.conn_timeout:g}s {exc}")
        except _PeerRefused as exc:
            log.warning("keying service: %s (%s) gave up: %s", peer_ip, initiator, exc)
        except _Closed as exc:
            log.log(
                logging.DEBUG if self._stopping.is_set() else logging.WARNING,
                "keying service: %s (%s) closed the connection while %s (%s)", peer_ip, initiator, channel.step, exc
            )
        except ProtocolError as exc:
            refuse(f"protocol error while {channel.step}: {exc}")
        except gss.exceptions.GSSError as exc:
            refuse(f"GSS-API failure while {channel.step}: {explain_gss_error(exc)}")
