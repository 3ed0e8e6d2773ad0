"""IP Security Monitor for the agent's charon: Windows-style statistics and audit events 541-547.

The strongSwan `counters` plugin counts IKEv2 exchanges only (reference/strongswan-libipsec.md §7), so the
agent keeps the IKEv1 main mode / quick mode statistics itself (reference/windows-ipsec.md §4), from:

- VICI events on a session of our own: `ike-updown`, `child-updown`, `ike-rekey`, `child-rekey` and `log`
  (charon's VICI logger forwards messages of level 0-1 only: never key material);
- `list-sas`, which under kernel-libipsec carries real per-CHILD_SA `bytes-in/out` (inner IP bytes);
- the enforcer, which reports acquires (`acquire_started()` / `acquire_finished(ok)`) and soft
  associations (`soft_association(peer)`).

Counters belong to this Monitor: they start at zero with it (a restarted agent starts afresh, as Windows
does at service start) and survive rekeys and charon restarts. Byte counters never go backwards: the
bytes of a CHILD_SA that goes away (deleted, rekeyed and deleted, or lost with its charon) are added to a
retained total, taking the highest count seen from the `child-updown`/`child-rekey` events, the
"closing CHILD_SA ... (N bytes)" log line, or a `list-sas` poll.

Log texts keyed on (strongSwan 5.9.8 with kernel-libipsec; "verified" = produced by a real run between
two namespaces, see tests/test_monitor.py; the others are from the 5.9.8 source):

  authentication (544 certificate trust, 545 other):
    "no issuer certificate found for "<subject>""            verified, untrusted CA -> 544
    "  issuer is "<issuer DN>""                              verified (follows the line above)
    "no trusted RSA public key found for '<id>'"             verified, untrusted CA -> 544
    "constraint check failed: peer not authenticated by CA '<DN>'"     verified -> 544
    "could not decrypt payloads" then "ID_PROT request with message ID 0 processing failed"
                                                             verified, PSK mismatch (responder) -> 545
      (preceded by "invalid <PAYLOAD>_V1 payload length, decryption failed?", payload varies)
    "no shared key found for '<me>'[...] - '<peer>'[...]"    verified, no PSK for the peer -> 545
    "IDir '<got>' does not match to '<expected>'"            verified, peer identity mismatch -> 545
    "calculated HASH does not match HASH payload"            source only (IKEv1 PSK hash check) -> 545
    "received HASH payload does not match", "integrity check failed"   source only (hash of an
                                                             encrypted message): treated like a failed
                                                             decryption
  negotiation (547, Failure Point Me/Peer; 546 where proposals are logged):
    "giving up after <N> retransmits", "establishing IKE_SA failed, peer not responding"  verified, Peer
    "received <NOTIFY> error notify"                         verified for NO_PROPOSAL_CHOSEN (main and
                                                             quick mode), AUTHENTICATION_FAILED,
                                                             INVALID_ID_INFORMATION, INVALID_KE_PAYLOAD: Peer
    "received proposals: ...", "configured proposals: ...", "no proposal found"        verified, Me + 546
    "no matching proposal found, sending NO_PROPOSAL_CHOSEN"                          verified, Me + 546
    "no matching CHILD_SA config found for <ts>"             verified, Me (traffic selectors)
    "unable to install inbound and outbound IPsec SA (SAD) in kernel"   seen in the feasibility runs, Me
  invalid packets: "<EXCHANGE> request|response with message ID <n> processing failed"   verified
  SA bookkeeping: "closing CHILD_SA <name>{<uniqueid>} with SPIs <spi>_i (<n> bytes) <spi>_o (<n> bytes) ..."
                                                             verified (also for rekeyed SAs, which get no
                                                             child-updown event); "closing expired CHILD_SA"
  libipsec ESP (group ESP, no IKE_SA):
    "ESP decryption or ICV verification failed"              verified (garbage with a valid SPI)
                                                             -> Packets Not Authenticated
    "ESP decryption failed: invalid length", "parsing ESP payload failed: ..."   verified (first)
                                                             -> Packets Not Decrypted
    "ESP sequence number verification failed: ..."           verified (replayed sequence numbers)
                                                             -> Packets With Replay Detection
  Bad SPI packets: libipsec logs "inbound ESP packet does not belong to an installed SA" at level 2,
  which VICI never forwards (verified: nothing arrives), so Bad SPI Packets stays 0 on this backend.
  Authenticated bytes (AH) are counted from AH CHILD_SAs: always 0 under kernel-libipsec (ESP only).

Audit events are written as JSON lines to STATE_DIR/audit/audit.jsonl (0600 in a 0700 directory,
rotated at 10 MiB keeping one older file audit.jsonl.1), kept in memory (the last 10,000) for `events()`,
and handed to subscribers. Their fields are built from parsed values (names, addresses, identities, DNs,
SPIs, algorithm names), never from raw log text, and never hold key material.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vici.protocol import Message, Packet

from policyagent.agent.enforce.charon import Charon, ExternalCharon, ViciSession

_log = logging.getLogger("policyagent.agent.enforce.monitor")

# --- statistics: (key, Windows display name), in Windows display order (reference §4.1 / §4.2) -----------

MAIN_MODE_FIELDS: tuple[tuple[str, str], ...] = (
    ("active_acquire", "Active Acquire"),
    ("acquire_failures", "Acquire Failures"),
    ("authentication_failures", "Authentication Failures"),
    ("negotiation_failures", "Negotiation Failures"),
    ("total_acquire", "Total Acquire"),
    ("key_additions", "Key Additions"),
    ("key_updates", "Key Updates"),
    ("isadb_list_size", "ISADB List Size"),
    ("connection_list_size", "Connection List Size"),
    ("ike_main_modes", "IKE Main Mode"),
    ("ike_quick_modes", "IKE Quick Mode"),
    ("soft_associations", "Soft Associations"),
    ("invalid_packets_received", "Invalid Packets Received"),
)

QUICK_MODE_FIELDS: tuple[tuple[str, str], ...] = (
    ("active_security_associations", "Active Security Associations"),
    ("key_additions", "Key Additions"),
    ("key_deletions", "Key Deletions"),
    ("rekeys", "Rekeys"),
    ("active_tunnels", "Active Tunnels"),
    ("bad_spi_packets", "Bad SPI Packets"),
    ("packets_not_decrypted", "Packets Not Decrypted"),
    ("packets_not_authenticated", "Packets Not Authenticated"),
    ("packets_with_replay_detection", "Packets With Replay Detection"),
    ("confidential_bytes_sent", "Confidential Bytes Sent"),
    ("confidential_bytes_received", "Confidential Bytes Received"),
    ("authenticated_bytes_sent", "Authenticated Bytes Sent"),
    ("authenticated_bytes_received", "Authenticated Bytes Received"),
    ("transport_bytes_sent", "Transport Bytes Sent"),
    ("transport_bytes_received", "Transport Bytes Received"),
    ("bytes_sent_in_tunnels", "Bytes Sent In Tunnels"),
    ("bytes_received_in_tunnels", "Bytes Received In Tunnels"),
)

_BYTE_KEYS = tuple(key for key, _ in QUICK_MODE_FIELDS if "bytes" in key)
_GAUGES_MM = ("isadb_list_size", "connection_list_size")
_GAUGES_QM = ("active_security_associations", "active_tunnels")

# --- audit events (reference §6.2) ----------------------------------------------------------------------

AUDIT_SA_ESTABLISHED = 541
AUDIT_QM_SA_ENDED = 542
AUDIT_MM_SA_ENDED = 543
AUDIT_AUTH_FAILED_CERT_TRUST = 544
AUDIT_AUTH_FAILED = 545
AUDIT_ATTRIBUTE_FAILED = 546
AUDIT_NEGOTIATION_FAILED = 547
AUDIT_IDS = frozenset(range(541, 548))

MODE_MAIN = "Key Exchange Mode (Main Mode)"
MODE_QUICK = "Data Protection Mode (Quick Mode)"
POINT_ME = "Me"
POINT_PEER = "Peer"

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.jsonl"
AUDIT_MAX_BYTES = 10 * 1024 * 1024
AUDIT_KEEP = 10_000
_FIELD_MAX = 400  # characters per audit field value

EVENTS = ("ike-updown", "child-updown", "ike-rekey", "child-rekey", "log")  # "log" last: it is chatty
_ACTIVE_CHILD_STATES = frozenset({"INSTALLED", "UPDATING", "REKEYING"})
_RECV_TIMEOUT_S = 0.5
_NEG_KEEP = 1024  # negotiation records (per IKE_SA) kept for late log lines
_FOLDED_KEEP = 8192  # CHILD_SA ids already accounted as gone, per charon instance


@dataclass(frozen=True)
class AuditEvent:
    """One audit event: Windows event id (541-547), when (Unix ms), its insertion fields, our message."""

    id: int
    time_unix_ms: int
    fields: dict[str, str]
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time_unix_ms": self.time_unix_ms, "fields": dict(self.fields), "message": self.message}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEvent:
        return cls(
            id=int(data["id"]),
            time_unix_ms=int(data["time_unix_ms"]),
            fields={str(k): str(v) for k, v in dict(data.get("fields", {})).items()},
            message=str(data.get("message", "")),
        )


Subscriber = Callable[[AuditEvent], None]


class AuditLog:
    """Audit events: appended to a JSON-lines file (0600, rotated with one older file) and kept in memory."""

    def __init__(self, directory: Path, *, keep: int = AUDIT_KEEP, max_bytes: int = AUDIT_MAX_BYTES) -> None:
        self.directory = directory
        self.path = directory / AUDIT_FILE
        self.max_bytes = max_bytes
        self._memory: collections.deque[AuditEvent] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    @property
    def rotated_path(self) -> Path:
        return self.path.with_name(AUDIT_FILE + ".1")

    def append(self, event: AuditEvent) -> None:
        line = (json.dumps(event.to_json(), sort_keys=True, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self._memory.append(event)
            try:
                self._write(line)
            except OSError as e:  # a full disk must not stop monitoring; the event stays in memory
                _log.error("cannot write audit event %d to %s: %s", event.id, self.path, e)

    def _write(self, line: bytes) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_bytes:
            os.replace(self.path, self.rotated_path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def events(self, since_unix_ms: int = 0, ids: set[int] | None = None, limit: int = 1000) -> list[AuditEvent]:
        """Events at or after `since_unix_ms` (oldest first), only `ids` if given, at most `limit`."""
        with self._lock:
            out: list[AuditEvent] = []
            for ev in self._memory:
                if ev.time_unix_ms < since_unix_ms or (ids is not None and ev.id not in ids):
                    continue
                out.append(ev)
                if len(out) >= limit:
                    break
            return out


# --- internal records ----------------------------------------------------------------------------------


@dataclass
class _Child:
    """A CHILD_SA of the current charon instance (quick mode SA pair)."""

    uid: int
    name: str
    ike_name: str
    ike_uid: int
    protocol: str = "ESP"
    mode: str = "TUNNEL"
    state: str = ""
    encap: bool = False
    spi_in: str = ""
    spi_out: str = ""
    local_ts: tuple[str, ...] = ()
    remote_ts: tuple[str, ...] = ()
    local_host: str = ""
    remote_host: str = ""
    remote_id: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    base_in: int = 0  # bytes it already had when this Monitor first saw it (not ours to count)
    base_out: int = 0
    counted: bool = False  # its quick mode has been counted (541 written)
    created: float = 0.0  # monotonic time this record was created

    def contributions(self) -> dict[str, int]:
        sent, received = max(0, self.bytes_out - self.base_out), max(0, self.bytes_in - self.base_in)
        out = dict.fromkeys(_BYTE_KEYS, 0)
        if self.protocol == "ESP":
            out["confidential_bytes_sent"], out["confidential_bytes_received"] = sent, received
        elif self.protocol == "AH":
            out["authenticated_bytes_sent"], out["authenticated_bytes_received"] = sent, received
        if self.mode == "TRANSPORT":
            out["transport_bytes_sent"], out["transport_bytes_received"] = sent, received
        elif self.mode == "TUNNEL":
            out["bytes_sent_in_tunnels"], out["bytes_received_in_tunnels"] = sent, received
        return out


@dataclass
class _Ike:
    """An IKE_SA (main mode SA) of the current charon instance that came up."""

    uid: int
    name: str
    local_host: str = ""
    remote_host: str = ""
    local_id: str = ""
    remote_id: str = ""
    counted: bool = False  # its main mode has been counted (541 written)
    created: float = 0.0


@dataclass
class _Neg:
    """What charon's log said about one IKE_SA's negotiation (kept a while: log lines arrive late)."""

    name: str = ""
    local: str = ""
    peer: str = ""
    peer_id: str = ""
    peer_cert: str = ""
    issuer: str = ""
    initiator: bool | None = None
    established: bool = False
    decrypt_failed: bool = False
    trust_problem: str = ""
    signature_failed: bool = False
    auth_reported: bool = False
    mm_reported: bool = False
    retransmits: str = ""
    received_proposals: str = ""
    configured_proposals: str = ""


# --- small helpers ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """VICI message (bytes, lists, OrderedDicts) → str / list / dict."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _FIELD_MAX else text[: _FIELD_MAX - 1] + "…"


def _sa_entries(message: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (IKE_SA name, IKE_SA data) pairs of an event or list-sa message (skipping "up")."""
    for key, value in message.items():
        if key != "up" and isinstance(value, dict):
            yield key, value


def _alg(encr: str, size: str, integ: str) -> str:
    parts = [f"{encr}-{size}" if encr and size else encr, integ]
    return "/".join(p for p in parts if p)


_NOTIFY_REASONS = {
    "NO_PROPOSAL_CHOSEN": "the peer accepted none of our proposals",
    "AUTHENTICATION_FAILED": "the peer could not authenticate this host",
    "INVALID_ID_INFORMATION": "the peer rejected our identity or traffic selectors",
    "INVALID_KE_PAYLOAD": "the peer rejected our key exchange (it may have no key for us)",
    "PAYLOAD_MALFORMED": "the peer could not parse our message (keys may differ)",
    "INVALID_HASH_INFORMATION": "the peer could not verify our message (keys may differ)",
}

_RE = {
    "initiating": re.compile(r"^initiating (?:(?:Main|Aggressive) Mode )?IKE_SA (\S+)\[(\d+)\] to (\S+)$"),
    "responding": re.compile(r"^(\S+) is initiating an? (?:(?:Main|Aggressive) Mode )?IKE_SA$"),
    "packet": re.compile(r"^(received|sending) packet: from (\S+)\[\d+\] to (\S+)\[\d+\]"),
    "looking": re.compile(r"^looking for .* peer configs matching (\S+)\.\.\.(\S+)\[(.*)\]$"),
    "established": re.compile(r"^IKE_SA (\S+)\[(\d+)\] established between (\S+)\[(.*)\]\.\.\.(\S+)\[(.*)\]$"),
    "ee_cert": re.compile(r'^received end entity cert "(.*)"$'),
    "no_issuer": re.compile(r'^no issuer certificate found for "(.*)"$'),
    "issuer_is": re.compile(r'^issuer is "(.*)"$'),
    "no_trusted": re.compile(r"^no trusted (\S+) public key found for '(.*)'$"),
    "constraint": re.compile(r"^constraint check failed: (.*)$"),
    "revoked": re.compile(r"^certificate was revoked on (.*)$"),
    "sig_failed": re.compile(r"^signature validation failed"),
    "id_mismatch": re.compile(r"^IDir '(.*)' does not match to '(.*)'$"),
    "no_key": re.compile(r"^no shared key found for '([^']*)'(?:\[[^\]]*\])? - '([^']*)'"),
    "hash_mismatch": re.compile(r"^calculated HASH does not match HASH payload$"),
    "decrypt": re.compile(
        r"^(?:could not decrypt payloads|received HASH payload does not match|integrity check failed)$"
    ),
    "processing_failed": re.compile(r"^(\S+) (request|response) with message ID \d+ processing failed$"),
    "giving_up": re.compile(r"^giving up after (\d+) retransmits$"),
    "not_responding": re.compile(r"^establishing IKE_SA failed, peer not responding$"),
    "notify": re.compile(r"^received ([A-Z][A-Z0-9_]+) error notify$"),
    "received_props": re.compile(r"^received proposals: (.*)$"),
    "configured_props": re.compile(r"^configured proposals: (.*)$"),
    "no_proposal": re.compile(r"^no proposal found$"),
    "no_qm_proposal": re.compile(r"^no matching proposal found, sending NO_PROPOSAL_CHOSEN$"),
    "no_child_cfg": re.compile(r"^no matching CHILD_SA config found for (.*)$"),
    "install_failed": re.compile(r"^unable to install inbound and outbound IPsec SA \(SAD\) in kernel$"),
    "closing": re.compile(
        r"^closing (expired )?CHILD_SA (\S+)\{(\d+)\} with SPIs ([0-9a-f]+)_i(?: \((\d+) bytes\))? "
        r"([0-9a-f]+)_o(?: \((\d+) bytes\))?"
    ),
    "esp_auth": re.compile(r"^ESP decryption or ICV verification failed"),
    "esp_decrypt": re.compile(r"^(?:ESP decryption failed|parsing ESP payload failed)"),
    "esp_replay": re.compile(r"^ESP sequence number verification failed"),
}


@dataclass(frozen=True)
class _Instance:
    """Identity of a charon instance. VICI's start time is derived from "now - uptime" and wanders by a
    second between calls, so it is compared with a tolerance, and only when the pid is unknown."""

    pid: int | None
    started: float | None

    def same(self, other: _Instance | None) -> bool:
        if other is None:
            return False
        if self.pid is not None and other.pid is not None:
            return self.pid == other.pid
        if self.started is None or other.started is None:
            return False
        return abs(self.started - other.started) <= 2.5


class _EventStream:
    """A VICI session registered for events. Unlike vici.Session.listen(), it keeps event packets that
    arrive while later registrations are still being confirmed, and it unregisters nothing on close."""

    def __init__(self, session: ViciSession, names: Iterable[str]) -> None:
        self.session = session
        self._pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        for name in names:
            session.transport.send(Packet.register_event(name))
            while True:
                packet = Packet.parse(session.transport.receive())
                if packet.response_type == Packet.EVENT:
                    self._pending.append(self._decode(packet))
                    continue
                if packet.response_type != Packet.EVENT_CONFIRM:
                    raise OSError(f"charon refused VICI event registration {name!r}")
                break

    @staticmethod
    def _decode(packet: Any) -> tuple[str, dict[str, Any]]:
        name = packet.event_type.decode() if isinstance(packet.event_type, bytes) else str(packet.event_type)
        return name, _dict(_plain(Message.deserialize(packet.payload)))

    def next(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The next event, or None after `timeout` seconds without one. OSError when charon went away."""
        if self._pending:
            return self._pending.popleft()
        while True:
            try:
                raw = self.session.transport.receive(timeout)
            except TimeoutError:
                return None
            packet = Packet.parse(raw)
            if packet.response_type == Packet.EVENT:
                return self._decode(packet)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.session.close()


# --- the monitor -----------------------------------------------------------------------------------------


class Monitor:
    """The IP Security Monitor of one agent: statistics and audit events from its own charon."""

    def __init__(
        self,
        charon: Charon | ExternalCharon,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = 10.0,
        subscribers: Iterable[Subscriber] = (),
    ) -> None:
        self.charon = charon
        self.state_dir = state_dir
        self.audit = AuditLog(state_dir / AUDIT_DIR)
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._subscribers: list[Subscriber] = list(subscribers)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: _EventStream | None = None
        self._connected = threading.Event()
        self._mm: dict[str, int] = {key: 0 for key, _ in MAIN_MODE_FIELDS if key not in _GAUGES_MM}
        self._qm: dict[str, int] = {key: 0 for key, _ in QUICK_MODE_FIELDS if key not in _GAUGES_QM}
        self._retained: dict[str, int] = dict.fromkeys(_BYTE_KEYS, 0)
        # state of the charon instance currently attached to (reset when charon is replaced)
        self._instance: _Instance | None = None
        self._epoch = 0
        self._first_attach = True
        self._children: dict[int, _Child] = {}
        self._ikes: dict[int, _Ike] = {}
        self._folded: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._negs: collections.OrderedDict[tuple[int, int], _Neg] = collections.OrderedDict()
        self._last_poll = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open a VICI session (now, if charon answers, so no event after start() is missed) and start the
        listener thread, which reconnects whenever charon is restarted."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self.audit.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.audit.directory, 0o700)
        with contextlib.suppress(Exception):
            self._connect()
        self._thread = threading.Thread(target=self._run, name="ipsec-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        self._connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the listener is registered with a charon (tests, start-up ordering)."""
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------ what the enforcer reports

    def acquire_started(self) -> None:
        """A packet needed an SA that did not exist and the enforcer asked charon to negotiate one."""
        with self._lock:
            self._mm["total_acquire"] += 1
            self._mm["active_acquire"] += 1

    def acquire_finished(self, ok: bool) -> None:
        """The negotiation started by acquire_started() ended (ok: an SA came up)."""
        with self._lock:
            self._mm["active_acquire"] = max(0, self._mm["active_acquire"] - 1)
            if not ok:
                self._mm["acquire_failures"] += 1

    def soft_association(self, peer: str) -> None:
        """The enforcer let clear traffic with `peer` pass because IKE got no answer (fallback to clear)."""
        with self._lock:
            self._mm["soft_associations"] += 1
        _log.info("soft association with %s", peer)

    # ------------------------------------------------------------------ audit events

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(event)` for every new audit event (from the listener thread; keep it quick)."""
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    def events(self, since_unix_ms: int = 0, ids: set[int] | None = None, limit: int = 1000) -> list[AuditEvent]:
        """Audit events kept in memory (the last 10,000): at or after `since_unix_ms`, oldest first."""
        return self.audit.events(since_unix_ms, ids, limit)

    # ------------------------------------------------------------------ statistics

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{"main_mode": {key: n}, "quick_mode": {key: n}} with the keys of MAIN_MODE_FIELDS and
        QUICK_MODE_FIELDS, from a fresh `list-sas` poll merged with the retained totals. When charon does
        not answer, the current-SA gauges are 0 and the totals are the last known."""
        polled = self._poll()
        with self._lock:
            mm = dict(self._mm)
            qm = dict(self._qm)
            totals = dict(self._retained)
            for child in self._children.values():
                for key, n in child.contributions().items():
                    totals[key] += n
        qm.update(totals)
        gauges = self._gauges(polled)
        mm.update({k: gauges[k] for k in _GAUGES_MM})
        qm.update({k: gauges[k] for k in _GAUGES_QM})
        return {
            "main_mode": {key: int(mm.get(key, 0)) for key, _ in MAIN_MODE_FIELDS},
            "quick_mode": {key: int(qm.get(key, 0)) for key, _ in QUICK_MODE_FIELDS},
        }

    @staticmethod
    def windows_view(snapshot: dict[str, dict[str, int]]) -> dict[str, list[tuple[str, int]]]:
        """The snapshot with Windows display names, in display order (for `show stats`-like output)."""
        return {
            "IKE Main Mode Statistics": [(name, snapshot["main_mode"][key]) for key, name in MAIN_MODE_FIELDS],
            "IPSec Quick Mode Statistics": [(name, snapshot["quick_mode"][key]) for key, name in QUICK_MODE_FIELDS],
        }

    @staticmethod
    def _gauges(polled: list[dict[str, Any]] | None) -> dict[str, int]:
        out = dict.fromkeys((*_GAUGES_MM, *_GAUGES_QM), 0)
        for entry in polled or []:
            for _, ike in _sa_entries(entry):
                out["isadb_list_size"] += 1
                for child in _dict(ike.get("child-sas")).values():
                    child = _dict(child)
                    out["connection_list_size"] += 1
                    if str(child.get("state", "")) in _ACTIVE_CHILD_STATES:
                        out["active_security_associations"] += 1
                        if str(child.get("mode", "")) == "TUNNEL":
                            out["active_tunnels"] += 1
        return out

    # ------------------------------------------------------------------ VICI plumbing

    def _instance_key(self, session: ViciSession) -> _Instance:
        """Which charon this is (a restarted charon numbers its SAs from 1 again): the pid of the daemon our
        Charon started, and the start time VICI `stats` reports."""
        stats = _dict(_plain(session.stats()))
        since = str(_dict(stats.get("uptime")).get("since", ""))
        started: float | None
        try:
            started = time.mktime(time.strptime(since, "%b %d %H:%M:%S %Y"))
        except (ValueError, OverflowError):
            started = None
        return _Instance(self.charon.pid, started)

    def _connect(self) -> None:
        session = self.charon.session(timeout=5)
        try:
            key = self._instance_key(session)
            stream = _EventStream(session, EVENTS)
        except BaseException:
            session.close()
            raise
        self._stream = stream
        self._attach(key)
        self._connected.set()

    def _run(self) -> None:
        delay = 0.05
        while not self._stopping.is_set():
            stream = self._stream
            if stream is None:
                try:
                    self._connect()
                except Exception as e:  # charon down or restarting: try again shortly
                    _log.debug("monitor cannot reach charon yet: %s", e)
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                delay = 0.05
                continue
            try:
                event = stream.next(_RECV_TIMEOUT_S)
            except Exception as e:  # OSError when charon went away, or a garbled packet
                if not self._stopping.is_set():
                    _log.info("lost charon's VICI event stream (%s); reconnecting", e)
                stream.close()
                self._stream = None
                self._connected.clear()
                self._detached()
                continue
            if event is not None:
                try:
                    self._dispatch(*event)
                except Exception:  # a surprise in one event must not end monitoring
                    _log.exception("could not process VICI event %s", event[0])
            if time.monotonic() - self._last_poll >= self.poll_interval_s:
                self._poll()

    def _list_sas(self) -> tuple[_Instance, list[dict[str, Any]]] | None:
        """(instance key, list-sas entries), None when charon does not answer."""
        try:
            with self.charon.session(timeout=5) as session:
                key = self._instance_key(session)
                entries = [_dict(_plain(entry)) for entry in session.list_sas()]
        except Exception as e:
            _log.debug("list-sas failed: %s", e)
            return None
        return key, entries

    def _poll(self) -> list[dict[str, Any]] | None:
        started = time.monotonic()
        self._last_poll = started
        result = self._list_sas()
        if result is None:
            return None
        key, entries = result
        out: list[AuditEvent] = []
        with self._lock:
            if key.same(self._instance):  # else the listener has not attached to this charon yet
                self._apply_poll(entries, started, out)
        self._emit(out)
        return entries

    # ------------------------------------------------------------------ charon instances

    def _attach(self, key: _Instance) -> None:
        """Attached to a charon (first time or after a reconnect): a different instance means the SAs of
        the old one are gone (their bytes are kept); then take stock of what this one holds."""
        out: list[AuditEvent] = []
        with self._lock:
            if not key.same(self._instance):
                self._end_instance("the IKE daemon was restarted", out)
                self._instance = key
                self._epoch += 1
        self._emit(out)
        started = time.monotonic()
        result = self._list_sas()
        out = []
        with self._lock:
            if result is not None and result[0].same(self._instance):
                self._apply_poll(result[1], started, out, initial=self._first_attach)
            self._first_attach = False
        self._emit(out)

    def _detached(self) -> None:
        """The event stream broke. If charon is gone, so are its SAs."""
        if self.charon.alive():
            return  # a reconnect to the same instance will find them again
        out: list[AuditEvent] = []
        with self._lock:
            self._end_instance("the IKE daemon stopped", out)
            self._instance = None
        self._emit(out)

    def _end_instance(self, why: str, out: list[AuditEvent]) -> None:
        for uid in list(self._children):
            self._child_gone(uid, None, None, why, out)
        for uid in list(self._ikes):
            self._ike_gone(uid, why, out)
        self._children.clear()
        self._ikes.clear()
        self._folded.clear()

    # ------------------------------------------------------------------ SA bookkeeping (lock held)

    def _apply_poll(self, entries: list[dict[str, Any]], started: float, out: list[AuditEvent], *,
                    initial: bool = False) -> None:
        seen_children: set[int] = set()
        seen_ikes: set[int] = set()
        for entry in entries:
            for ike_name, ike in _sa_entries(entry):
                ike_uid = _int(ike.get("uniqueid"), -1)
                seen_ikes.add(ike_uid)
                if ike_uid >= 0 and ike_uid not in self._ikes and str(ike.get("state", "")) == "ESTABLISHED":
                    self._ikes[ike_uid] = self._ike_record(ike_uid, ike_name, ike)  # counted when ike-updown comes
                for child in _dict(ike.get("child-sas")).values():
                    child = _dict(child)
                    uid = _int(child.get("uniqueid"), -1)
                    seen_children.add(uid)
                    self._child_update(ike_name, ike, child, initial=initial)
        for uid, child_rec in list(self._children.items()):
            if uid not in seen_children and child_rec.created < started:
                self._child_gone(uid, None, None, "it is no longer listed by the IKE daemon", out)
        for uid, ike_rec in list(self._ikes.items()):
            if uid not in seen_ikes and ike_rec.created < started:
                self._ike_gone(uid, "it is no longer listed by the IKE daemon", out)

    @staticmethod
    def _ike_record(uid: int, name: str, ike: dict[str, Any]) -> _Ike:
        return _Ike(
            uid=uid, name=name, local_host=str(ike.get("local-host", "")), remote_host=str(ike.get("remote-host", "")),
            local_id=str(ike.get("local-id", "")), remote_id=str(ike.get("remote-id", "")), created=time.monotonic(),
        )

    def _child_update(self, ike_name: str, ike: dict[str, Any], child: dict[str, Any], *,
                      initial: bool = False) -> _Child | None:
        """Create or refresh the record of a CHILD_SA (never one already accounted as gone)."""
        uid = _int(child.get("uniqueid"), -1)
        if uid < 0 or uid in self._folded:
            return None
        rec = self._children.get(uid)
        bytes_in, bytes_out = _int(child.get("bytes-in")), _int(child.get("bytes-out"))
        if rec is None:
            rec = _Child(uid=uid, name=str(child.get("name", "")), ike_name=ike_name, ike_uid=_int(ike.get("uniqueid")),
                         created=time.monotonic())
            if initial:  # there before this Monitor: its earlier bytes are not ours (nor its quick mode: no
                rec.base_in, rec.base_out = bytes_in, bytes_out  # child-updown will come for it)
            self._children[uid] = rec
        rec.ike_name, rec.ike_uid = ike_name, _int(ike.get("uniqueid"), rec.ike_uid)
        rec.name = str(child.get("name", rec.name)) or rec.name
        rec.protocol = str(child.get("protocol", rec.protocol)) or rec.protocol
        rec.mode = str(child.get("mode", rec.mode)) or rec.mode
        rec.state = str(child.get("state", rec.state))
        rec.encap = str(child.get("encap", "")) == "yes" or rec.encap
        rec.spi_in = str(child.get("spi-in", rec.spi_in))
        rec.spi_out = str(child.get("spi-out", rec.spi_out))
        if child.get("local-ts"):
            rec.local_ts = tuple(str(t) for t in child.get("local-ts", []))
        if child.get("remote-ts"):
            rec.remote_ts = tuple(str(t) for t in child.get("remote-ts", []))
        rec.local_host = str(ike.get("local-host", rec.local_host))
        rec.remote_host = str(ike.get("remote-host", rec.remote_host))
        rec.remote_id = str(ike.get("remote-id", rec.remote_id))
        rec.bytes_in, rec.bytes_out = max(rec.bytes_in, bytes_in), max(rec.bytes_out, bytes_out)
        return rec

    def _child_up(self, ike_name: str, ike: dict[str, Any], child: dict[str, Any], rekey: bool,
                  out: list[AuditEvent]) -> None:
        rec = self._child_update(ike_name, ike, child)
        if rec is None or rec.counted:
            return
        rec.counted = True
        self._mm["ike_quick_modes"] += 1
        self._mm["key_additions"] += 1  # outbound SA added
        self._mm["key_updates"] += 1  # inbound SA added
        self._qm["key_additions"] += 1
        if rekey:
            self._qm["rekeys"] += 1
        alg = _alg(str(child.get("encr-alg", "")), str(child.get("encr-keysize", "")), str(child.get("integ-alg", "")))
        params = [f"{rec.protocol} {alg}"]
        if child.get("dh-group"):
            params.append(f"PFS {child.get('dh-group')}")
        params.append(f"inbound SPI {rec.spi_in}, outbound SPI {rec.spi_out}")
        params.append(f"{rec.mode.lower()} mode" + (", UDP-encapsulated" if rec.encap else ""))
        params.append(f"rekey in {_int(child.get('rekey-time'))} s, lifetime {_int(child.get('life-time'))} s")
        peer = rec.remote_host or "?"
        neg = self._negs.get((self._epoch, rec.ike_uid))
        cert = neg.peer_cert if neg is not None else ""
        out.append(self._event(
            AUDIT_SA_ESTABLISHED,
            {"Mode": MODE_QUICK, "Peer Identity": self._identity(rec.remote_id, rec.remote_host, cert),
             "Filter": self._qm_filter(rec), "Parameters": "; ".join(params)},
            f"Quick mode security association {'rekeyed' if rekey else 'established'} with {peer} "
            f"({rec.ike_name}/{rec.name}).",
        ))

    def _child_gone(self, uid: int, bytes_in: int | None, bytes_out: int | None, why: str,
                    out: list[AuditEvent], name: str = "", spis: tuple[str, str] = ("", "")) -> None:
        if uid in self._folded:
            return
        self._folded[uid] = None
        while len(self._folded) > _FOLDED_KEEP:
            self._folded.popitem(last=False)
        rec = self._children.pop(uid, None)
        if rec is None:  # never seen (came and went between polls without events reaching us)
            rec = _Child(uid=uid, name=name, ike_name="", ike_uid=-1, spi_in=spis[0], spi_out=spis[1])
        if bytes_in is not None:
            rec.bytes_in = max(rec.bytes_in, bytes_in)
        if bytes_out is not None:
            rec.bytes_out = max(rec.bytes_out, bytes_out)
        for key, n in rec.contributions().items():
            self._retained[key] += n
        self._qm["key_deletions"] += 1
        out.append(self._event(
            AUDIT_QM_SA_ENDED,
            {"Filter": self._qm_filter(rec), "Inbound SPI": rec.spi_in or "?", "Outbound SPI": rec.spi_out or "?"},
            f"Quick mode security association {rec.name or '?'}{{{uid}}} with {rec.remote_host or '?'} ended: {why}.",
        ))

    def _ike_up(self, name: str, ike: dict[str, Any], out: list[AuditEvent]) -> None:
        uid = _int(ike.get("uniqueid"), -1)
        if uid < 0 or (uid in self._ikes and self._ikes[uid].counted):
            return
        rec = self._ike_record(uid, name, ike)
        rec.counted = True
        self._ikes[uid] = rec
        self._mm["ike_main_modes"] += 1
        neg = self._neg(uid)
        neg.established = True
        neg.name = name
        alg = _alg(str(ike.get("encr-alg", "")), str(ike.get("encr-keysize", "")), str(ike.get("integ-alg", "")))
        params = [
            "/".join(p for p in (alg, str(ike.get("prf-alg", "")), str(ike.get("dh-group", ""))) if p),
            f"cookies {ike.get('initiator-spi', '?')}/{ike.get('responder-spi', '?')}",
            f"{'initiator' if str(ike.get('initiator', '')) == 'yes' else 'responder'}",
        ]
        if ike.get("rekey-time"):
            params.append(f"rekey in {_int(ike.get('rekey-time'))} s")
        if ike.get("reauth-time"):
            params.append(f"reauthentication in {_int(ike.get('reauth-time'))} s")
        identity = self._identity(rec.remote_id, rec.remote_host, neg.peer_cert)
        out.append(self._event(
            AUDIT_SA_ESTABLISHED,
            {"Mode": MODE_MAIN, "Peer Identity": identity, "Filter": self._mm_filter(name, rec.local_host,
                                                                                     rec.remote_host),
             "Parameters": "; ".join(params)},
            f"Main mode security association established with {rec.remote_host or '?'} ({name}).",
        ))

    def _ike_gone(self, uid: int, why: str, out: list[AuditEvent]) -> None:
        rec = self._ikes.pop(uid, None)
        if rec is None:
            return  # never came up: its failure (if any) was reported from the log
        out.append(self._event(
            AUDIT_MM_SA_ENDED,
            {"Filter": self._mm_filter(rec.name, rec.local_host, rec.remote_host)},
            f"Main mode security association {rec.name}[{uid}] with {rec.remote_host or '?'} ended: {why}.",
        ))

    # ------------------------------------------------------------------ event dispatch

    def _dispatch(self, name: str, data: dict[str, Any]) -> None:
        out: list[AuditEvent] = []
        with self._lock:
            if name == "log":
                self._on_log(data, out)
            elif name == "ike-updown":
                up = str(data.get("up", "")) == "yes"
                for ike_name, ike in _sa_entries(data):
                    if up:
                        self._ike_up(ike_name, ike, out)
                    else:
                        self._ike_gone(_int(ike.get("uniqueid"), -1), "it was deleted", out)
            elif name == "ike-rekey":
                for ike_name, pair in _sa_entries(data):
                    old, new = _dict(pair.get("old")), _dict(pair.get("new"))
                    if new:
                        self._ike_up(ike_name, new, out)
                    if old:
                        self._ike_gone(_int(old.get("uniqueid"), -1), "it was rekeyed", out)
            elif name == "child-updown":
                up = str(data.get("up", "")) == "yes"
                for ike_name, ike in _sa_entries(data):
                    for child in _dict(ike.get("child-sas")).values():
                        child = _dict(child)
                        if up:
                            self._child_up(ike_name, ike, child, False, out)
                        else:
                            self._child_update(ike_name, ike, child)  # details for 542 if new to us
                            self._child_gone(_int(child.get("uniqueid"), -1), _int(child.get("bytes-in")),
                                             _int(child.get("bytes-out")), "it was deleted", out)
            elif name == "child-rekey":
                for ike_name, ike in _sa_entries(data):
                    for pair in _dict(ike.get("child-sas")).values():
                        pair = _dict(pair)
                        old, new = _dict(pair.get("old")), _dict(pair.get("new"))
                        if old:
                            self._child_update(ike_name, ike, old)  # stays until deleted; keep its bytes
                        if new:
                            self._child_up(ike_name, ike, new, True, out)
        self._emit(out)

    def _neg(self, uid: int) -> _Neg:
        key = (self._epoch, uid)
        neg = self._negs.get(key)
        if neg is None:
            neg = self._negs[key] = _Neg()
            while len(self._negs) > _NEG_KEEP:
                self._negs.popitem(last=False)
        else:
            self._negs.move_to_end(key)
        return neg

    def _on_log(self, data: dict[str, Any], out: list[AuditEvent]) -> None:
        msg = str(data.get("msg", "")).split("\n", 1)[0].strip()
        if not msg:
            return
        group = str(data.get("group", ""))
        if group == "ESP":
            if _RE["esp_auth"].match(msg):
                self._qm["packets_not_authenticated"] += 1
            elif _RE["esp_decrypt"].match(msg):
                self._qm["packets_not_decrypted"] += 1
            elif _RE["esp_replay"].match(msg):
                self._qm["packets_with_replay_detection"] += 1
            return
        if m := _RE["closing"].match(msg):
            self._child_gone(
                int(m[3]), _int(m[5]) if m[5] else None, _int(m[7]) if m[7] else None,
                "it expired" if m[1] else "it was deleted", out, name=m[2], spis=(m[4], m[6]),
            )
            return
        if _RE["processing_failed"].match(msg):
            self._mm["invalid_packets_received"] += 1
        uid = _int(data.get("ikesa-uniqueid"), -1)
        if uid < 0:
            return
        neg = self._neg(uid)
        ike_name = str(data.get("ikesa-name", ""))
        if ike_name and ike_name != "(unnamed)":
            neg.name = ike_name
        self._on_ike_log(neg, msg, out)

    def _on_ike_log(self, neg: _Neg, msg: str, out: list[AuditEvent]) -> None:
        if m := _RE["packet"].match(msg):
            local, peer = (m[3], m[2]) if m[1] == "received" else (m[2], m[3])
            neg.local, neg.peer = neg.local or local, neg.peer or peer
        elif m := _RE["initiating"].match(msg):
            neg.initiator, neg.name, neg.peer = True, m[1], m[3]
        elif m := _RE["responding"].match(msg):
            neg.initiator, neg.peer = False, m[1]
        elif m := _RE["looking"].match(msg):
            neg.local, neg.peer, neg.peer_id = m[1], m[2], m[3]
        elif m := _RE["established"].match(msg):
            neg.established, neg.name = True, m[1]
            neg.local, neg.peer, neg.peer_id = m[3], m[5], m[6]
        elif m := _RE["ee_cert"].match(msg):
            neg.peer_cert = m[1]
        elif m := _RE["no_issuer"].match(msg):
            neg.trust_problem = f'no trusted issuer for certificate "{m[1]}"'
        elif (m := _RE["issuer_is"].match(msg)) and neg.trust_problem and not neg.issuer:
            neg.issuer = m[1]
            neg.trust_problem += f' (issuer "{m[1]}")'
        elif m := _RE["revoked"].match(msg):
            neg.trust_problem = "the peer's certificate was revoked"
        elif _RE["sig_failed"].match(msg):
            neg.signature_failed = True
        elif m := _RE["no_trusted"].match(msg):
            neg.peer_id = neg.peer_id or m[2]
            if neg.signature_failed and not neg.trust_problem:
                self._auth_failure(neg, False, f"the {m[1]} signature of {m[2]} did not verify", out)
            else:
                self._auth_failure(neg, True, neg.trust_problem or f"no trusted {m[1]} public key for {m[2]}", out)
        elif m := _RE["constraint"].match(msg):
            self._auth_failure(neg, True, f"constraint check failed: {m[1]}", out)
        elif m := _RE["id_mismatch"].match(msg):
            neg.peer_id = m[1]
            self._auth_failure(neg, False, f"the peer identified itself as '{m[1]}', expected '{m[2]}'", out)
        elif m := _RE["no_key"].match(msg):
            neg.peer_id = neg.peer_id or m[2]
            self._auth_failure(neg, False, f"no pre-shared key for '{m[1]}' - '{m[2]}'", out)
        elif _RE["hash_mismatch"].match(msg):
            self._auth_failure(neg, False, "the peer's hash did not verify (pre-shared key mismatch)", out)
        elif _RE["decrypt"].match(msg):
            neg.decrypt_failed = True
        elif m := _RE["processing_failed"].match(msg):
            if neg.decrypt_failed and m[1] in ("ID_PROT", "AGGRESSIVE") and not neg.established:
                self._auth_failure(neg, False, "the peer's main mode messages could not be decrypted "
                                   "(pre-shared key mismatch)", out)
        elif m := _RE["giving_up"].match(msg):
            neg.retransmits = m[1]
        elif _RE["not_responding"].match(msg):
            reason = "no response from the peer"
            if neg.decrypt_failed:
                reason = "no valid response from the peer: its messages could not be decrypted (pre-shared key " \
                         "mismatch?)"
            extra = f"gave up after {neg.retransmits} retransmits" if neg.retransmits else "no answer"
            self._mm_failure(neg, POINT_PEER, reason, extra, out)
        elif m := _RE["notify"].match(msg):
            notify = m[1]
            reason = _NOTIFY_REASONS.get(notify, f"the peer reported {notify}")
            if neg.established:
                self._qm_failure(neg, POINT_PEER, reason, f"notify {notify}", out)
            else:
                self._mm_failure(neg, POINT_PEER, reason, f"notify {notify}", out)
        elif m := _RE["received_props"].match(msg):
            neg.received_proposals = m[1]
        elif m := _RE["configured_props"].match(msg):
            neg.configured_proposals = m[1]
        elif _RE["no_proposal"].match(msg):
            self._proposal_failure(neg, MODE_MAIN, "IKE proposal", out)
            self._mm_failure(neg, POINT_ME, "none of the peer's proposals is acceptable", "no proposal chosen", out)
        elif _RE["no_qm_proposal"].match(msg):
            self._proposal_failure(neg, MODE_QUICK, "IPsec proposal", out)
            self._qm_failure(neg, POINT_ME, "none of the peer's proposals is acceptable", "no proposal chosen", out)
        elif m := _RE["no_child_cfg"].match(msg):
            self._qm_failure(neg, POINT_ME, "no matching traffic selectors (filter) for the peer's request",
                             f"requested {m[1]}", out)
        elif _RE["install_failed"].match(msg):
            self._qm_failure(neg, POINT_ME, "the IPsec SAs could not be installed", "SAD install failed", out)

    # ------------------------------------------------------------------ failures (lock held)

    def _neg_identity(self, neg: _Neg) -> str:
        return self._identity(neg.peer_id, neg.peer, neg.peer_cert, neg.issuer)

    def _neg_filter(self, neg: _Neg) -> str:
        return self._mm_filter(neg.name, neg.local, neg.peer)

    def _auth_failure(self, neg: _Neg, cert_trust: bool, reason: str, out: list[AuditEvent]) -> None:
        if neg.auth_reported:
            return
        neg.auth_reported = neg.mm_reported = True
        self._mm["authentication_failures"] += 1
        self._mm["negotiation_failures"] += 1
        peer = neg.peer or "?"
        if cert_trust:
            message = f"Authentication of {peer} failed: certificate trust could not be established ({reason})."
        else:
            message = f"Authentication of {peer} failed ({reason})."
        out.append(self._event(
            AUDIT_AUTH_FAILED_CERT_TRUST if cert_trust else AUDIT_AUTH_FAILED,
            {"Peer Identity": self._neg_identity(neg), "Filter": self._neg_filter(neg)},
            message,
        ))

    def _mm_failure(self, neg: _Neg, point: str, reason: str, extra: str, out: list[AuditEvent]) -> None:
        if neg.mm_reported:
            return
        neg.mm_reported = True
        self._mm["negotiation_failures"] += 1
        out.append(self._failure_event(neg, MODE_MAIN, point, reason, extra))

    def _qm_failure(self, neg: _Neg, point: str, reason: str, extra: str, out: list[AuditEvent]) -> None:
        self._mm["negotiation_failures"] += 1
        out.append(self._failure_event(neg, MODE_QUICK, point, reason, extra))

    def _failure_event(self, neg: _Neg, mode: str, point: str, reason: str, extra: str) -> AuditEvent:
        what = "Main mode" if mode == MODE_MAIN else "Quick mode"
        return self._event(
            AUDIT_NEGOTIATION_FAILED,
            {"Mode": mode, "Filter": self._neg_filter(neg), "Peer Identity": self._neg_identity(neg),
             "Failure Point": point, "Failure Reason": reason, "Extra Status": extra},
            f"{what} negotiation with {neg.peer or '?'} failed ({'here' if point == POINT_ME else 'at the peer'}): "
            f"{reason}.",
        )

    def _proposal_failure(self, neg: _Neg, mode: str, attribute: str, out: list[AuditEvent]) -> None:
        received, configured = neg.received_proposals, neg.configured_proposals
        neg.received_proposals = neg.configured_proposals = ""
        if not received and not configured:
            return
        out.append(self._event(
            AUDIT_ATTRIBUTE_FAILED,
            {"Mode": mode, "Filter": self._neg_filter(neg), "Attribute": attribute,
             "Expected value": configured or "?", "Received value": received or "?"},
            f"{attribute.capitalize()} mismatch with {neg.peer or '?'}: none of the received proposals is configured.",
        ))

    # ------------------------------------------------------------------ formatting

    @staticmethod
    def _identity(identity: str, address: str, cert: str = "", issuer: str = "") -> str:
        parts = []
        if identity and identity != "%any":
            parts.append(f"ID {identity}")
        if cert:
            parts.append(f'certificate "{cert}"' + (f' issued by "{issuer}"' if issuer else ""))
        if address:
            parts.append(f"address {address}")
        return "; ".join(parts) or "unknown"

    @staticmethod
    def _mm_filter(name: str, local: str, peer: str) -> str:
        conn = name if name and name != "(unnamed)" else "(no connection selected yet)"
        return f"{conn}: {local or '?'} <-> {peer or '?'}"

    @staticmethod
    def _qm_filter(rec: _Child) -> str:
        local = ",".join(rec.local_ts) or rec.local_host or "?"
        remote = ",".join(rec.remote_ts) or rec.remote_host or "?"
        conn = f"{rec.ike_name}/{rec.name}" if rec.ike_name else rec.name or "?"
        return f"{conn}: {local} === {remote} ({rec.mode.lower()} mode, {rec.protocol})"

    def _event(self, event_id: int, fields: dict[str, str], message: str) -> AuditEvent:
        return AuditEvent(
            id=event_id,
            time_unix_ms=int(self._clock() * 1000),
            fields={k: _clip(v) for k, v in fields.items()},
            message=_clip(message),
        )

    def _emit(self, events: list[AuditEvent]) -> None:
        """Record and hand out audit events (never called with the lock held)."""
        if not events:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for event in events:
            self.audit.append(event)
            _log.info("audit %d: %s", event.id, event.message)
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:
                    _log.exception("audit subscriber failed")


def load_audit_file(path: Path) -> list[AuditEvent]:
    """Read an audit JSON-lines file (skipping a torn last line)."""
    out: list[AuditEvent] = []
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out.append(AuditEvent.from_json(json.loads(line)))
    return out


__all__ = [
    "AUDIT_ATTRIBUTE_FAILED",
    "AUDIT_AUTH_FAILED",
    "AUDIT_AUTH_FAILED_CERT_TRUST",
    "AUDIT_IDS",
    "AUDIT_MM_SA_ENDED",
    "AUDIT_NEGOTIATION_FAILED",
    "AUDIT_QM_SA_ENDED",
    "AUDIT_SA_ESTABLISHED",
    "MAIN_MODE_FIELDS",
    "MODE_MAIN",
    "MODE_QUICK",
    "QUICK_MODE_FIELDS",
    "AuditEvent",
    "AuditLog",
    "Monitor",
    "load_audit_file",
]
