"""The distribution hub: one grpc.aio stream per agent, pushes on change (DESIGN §4).

Every agent holds one `Distribution.Stream`. The hub keeps one `_Connection` per
computer: a small object with an outgoing list and an `asyncio.Event`; no thread is
pinned by a stream and nothing sleep-polls. When the effective policies of some
computers change (`EffectiveSource.subscribe`), the hub marks those computers dirty;
one refresher task takes the dirty set, computes the new effective policies of the
connected ones in one batch on the store thread, and wakes exactly those streams.
Each push gets a new nonce; ACKs and NACKs are matched against the nonces issued to
that computer (xDS: an answer to a nonce never issued is ignored).

Fan-out cost (10,000 streams on one core): a push is pre-serialized bytes. The
effective-policy source hands out each computer's message in parts (`encoded()`:
its own head and RSoP, and the policy content serialized once and shared by every
computer it applies to); the hub joins them with the version and that push's nonce
(fields 1–2) into the `ServerMessage` bytes, and the Stream method's response
serializer passes bytes through. No per-agent protobuf message is built, copied or
serialized on a push. KeepAlives come from one hub-wide ticker that writes to the
streams that have been idle for a while, not from a timer per stream.

Identity comes only from the client certificate (`identify(context)`); the Hello's
`computer` field is informational. A revoked certificate's stream is closed at once
(`revoke()`).

Per agent the hub keeps an `AgentRecord` (policyagent/server/fleet.py), persisted
write-behind to its own SQLite file, and serves the admin `Fleet` service from them.
The record keeps the agent's latest statistics (its heartbeats carry a summary of the IP
Security Monitor: Fleet.GetStatistics); the audit events agents forward (`AuditBatch`, over
Report or the stream) go to an `AuditStore` (policyagent/server/audit.py, `audit.sqlite3`
next to the fleet file), written behind with the records (Fleet.ListAuditEvents).

Relay (AgentRelay.Call, relay.proto): an admin's call to one agent's local API goes on that agent's
stream as a `RelayCall` (queued like any push: the fan-out never waits for it) and the caller awaits
the `RelayResult` with the same id (a per-stream dict of futures; a closing stream fails its pending
calls with UNAVAILABLE; no answer within 30 s is DEADLINE_EXCEEDED). Only the AgentLocal methods of
`policyagent.agent.relay.RELAY_METHODS` are relayed, only to agents whose Hello says they take them.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc import aio

from policyagent.agent.relay import RELAY_FEATURE, RELAY_METHODS, not_relayed
from policyagent.model.errors import NotFoundError
from policyagent.pb import directory_pb, dist_grpc, dist_pb, fleet_grpc, fleet_pb, relay_grpc, relay_pb
from policyagent.server.audit import AUDIT_FILE, AuditStore
from policyagent.server.fleet import (
    FLEET_FILE,
    AgentRecord,
    FleetRegistry,
    capabilities_bytes,
    fleet_statistics,
    fleet_status,
    peer_address,
)

_log = logging.getLogger("policyagent.server.hub")

T = TypeVar("T")

# How many nonces per computer an ACK/NACK may answer (pushes, fetches).
_NONCES_KEPT = 16
# An agent that heartbeats every 30 s and has not been heard for this long is stale.
DEFAULT_STALE_AFTER_S = 120.0
DEFAULT_KEEPALIVE_S = 20.0
# Write-behind delay of the fleet records, and the coalescing window of Fleet.Watch.
_FLUSH_DELAY_S = 0.2
_NOT_REGISTERED = "computer {!r} is not in the server's registry of computers"
_WATCH_DELAY_S = 0.2
# Server channel options for a port that holds thousands of agent streams. Measured (bench/fanout.py,
# grpcio 1.85, mTLS): a connection costs ~90 KiB of server RSS, ~65 KiB of it TLS in gRPC core (an
# insecure port: ~27 KiB). The TLS frame protector's buffer follows grpc.tsi.max_frame_size (default
# 16 KiB); 4 KiB saves ~5 KiB per connection at ~1% more record overhead on bulk admin replies. The
# HTTP/2 knobs (BDP probe, frame size, HPACK tables, TCP read chunk sizes) measured no difference.
# Measured (bench/conn_memory.py, grpcio 1.85, mTLS): ~60 KiB per connection + ~25 KiB per stream, mostly
# fixed gRPC-core buffers no channel argument reaches (BIO pair 2x17 KiB, staging 2x8 KiB, TCP read 8 KiB).
# What does: the TLS frame protector's buffer (tsi.max_frame_size; 1 KiB is TSI's minimum) and channelz's
# per-socket node (not served here). HTTP/2 knobs, read chunk sizes, pollers and GRPC_EXPERIMENTS measured
# no difference.
SERVER_CONNECTION_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.tsi.max_frame_size", 1024),
    ("grpc.enable_channelz", 0),
]
# The cyclic GC's youngest-generation threshold while a hub runs (CPython's default: 700 allocations).
# A push to 10,000 streams allocates ~100,000 short-lived tracked objects (futures, call operations,
# task steps), most of them alive across a few collections: at 700, bench/fanout.py measured ~200
# collections and ~0.8 s of the loop's CPU per 10,000-agent push. Garbage is still freed by reference
# counting at once; only cycles wait for the (rarer) collection.
GC_GEN0_THRESHOLD = 50_000
# How long AgentRelay.Call waits for the agent's answer.
RELAY_TIMEOUT_S = 30.0
# Trailing metadata on a failed AgentRelay.Call: which side the status comes from ("server" | "agent").
RELAY_ORIGIN_KEY = "x-policyagent-relay"


class EffectiveSource(Protocol):
    """What the hub needs of the effective-policy resolver (policyagent/server/effective.py)."""

    def get(self, computer: str) -> dist_pb.EffectivePolicy: ...

    def version_of(self, computer: str) -> str: ...

    def subscribe(self, callback: Callable[[frozenset[str]], None]) -> Any: ...


# A source may also offer `encoded(computer) -> (version, parts)`: the EffectivePolicy without
# version and nonce, serialized, as byte strings whose concatenation is the message (fields 3–9);
# NotFoundError like get(). EffectivePolicies does; for a source without it the hub serializes get().
Encoded = tuple[str, tuple[bytes, ...]]


@dataclass(frozen=True)
class Caller:
    """Who is on the other end, from the client certificate."""

    name: str
    serial: int = 0

    @classmethod
    def of(cls, peer: Any) -> Caller:
        """The caller a verified certificate (`pki.authz.Peer`) stands for: the registry's names are
        canonical (lower-case); so are the hub's."""
        from policyagent.model.assignment import canonical_computer_name

        return cls(canonical_computer_name(peer.name), peer.serial)


class RelayError(Exception):
    """A relayed call failed: the gRPC status to answer with, and whether the server or the agent said so."""

    def __init__(self, code: grpc.StatusCode, details: str, origin: str = "server") -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.origin = origin


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode with this number (UNKNOWN for a number gRPC does not define)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


# identify(context) → Caller, aborting the call (UNAUTHENTICATED / PERMISSION_DENIED) if it is not an agent.
Identify = Callable[[aio.ServicerContext[Any, Any]], Awaitable[Caller]]
# authorize_admin(context): aborts the call unless the caller holds an admin certificate.
AuthorizeAdmin = Callable[[aio.ServicerContext[Any, Any]], Awaitable[None]]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def new_nonce() -> str:
    return secrets.token_hex(8)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def policy_frame(version: str, nonce: str, parts: tuple[bytes, ...]) -> bytes:
    """`ServerMessage{policy: EffectivePolicy{version, nonce, <parts>}}` serialized, by concatenation.

    `parts` are the EffectivePolicy's other fields (3–9) as serialized bytes; fields 1 and 2
    go first, so the result is byte-identical to serializing the message.
    """
    v, n = version.encode(), nonce.encode()
    inner = [b"\n", _varint(len(v)), v, b"\x12", _varint(len(n)), n, *parts]
    return b"".join((b"\n", _varint(sum(len(p) for p in inner)), *inner))


def serialize_server_message(message: bytes | dist_pb.ServerMessage) -> bytes:
    """The Stream method's response serializer: pre-serialized pushes pass through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass(eq=False, slots=True)  # one per stream: no per-instance __dict__
class _Connection:
    computer: str
    serial: int
    peer: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    outgoing: list[bytes] = field(default_factory=list)  # serialized ServerMessages
    last_write: float = field(default_factory=time.monotonic)
    ready: bool = False  # Hello received and answered
    sent_version: str = ""
    generation: int = -1  # of the newest effective policy queued (older computations lose)
    close_code: grpc.StatusCode | None = None
    close_reason: str = ""
    closed: bool = False
    relay: bool = False  # the agent's Hello says it answers RelayCall
    # Relayed calls waiting for the agent's RelayResult: id → future (the result, or why it failed).
    pending: dict[int, asyncio.Future[dist_pb.RelayResult | RelayError]] = field(default_factory=dict)

    def send(self, message: bytes) -> None:
        self.outgoing.append(message)
        self.wake.set()

    def close(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        if not self.closed:
            self.closed, self.close_reason, self.close_code = True, reason, code
            self.wake.set()


class Hub:
    """Owns the agent streams, the fleet records and the push fan-out."""

    def __init__(
        self,
        effective: EffectiveSource,
        registry: FleetRegistry,
        *,
        store_executor: Executor | None = None,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        audit: AuditStore | None = None,
    ) -> None:
        self._effective = effective
        self.registry = registry
        # Forwarded audit events: by default in audit.sqlite3 next to the fleet records.
        self.audit = audit if audit is not None else AuditStore(registry.path.parent / AUDIT_FILE)
        # Where batches of effective-policy reads run (None: the loop's default executor).
        self._store_executor = store_executor
        self._flush_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policyagent-fleet")
        self.keepalive_s = keepalive_s
        self.stale_after_s = stale_after_s
        self._conns: dict[str, _Connection] = {}
        self._nonces: dict[str, list[str]] = {}  # computer → its last _NONCES_KEPT nonces (a list: < a deque)
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._flush_event = asyncio.Event()
        self._watchers: set[asyncio.Event] = set()
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Any = None
        self.relay_timeout_s = RELAY_TIMEOUT_S
        self._relay_ids = itertools.count(1)
        # The directory sync's state for FleetStatus.directory (None: no directory, "not configured").
        self.directory_status: Callable[[], directory_pb.DirectoryStatus] | None = None
        # Told (computer, IP address) when an agent's Hello comes from another address than its record's last
        # one (the directory's sites follow the address); not on a reconnect from the same address.
        self.address_listener: Callable[[str, str], None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        gen0, gen1, gen2 = gc.get_threshold()
        if 0 < gen0 < GC_GEN0_THRESHOLD:  # process-wide; only ever raised, and not where GC is off
            gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
        self._tasks = [
            asyncio.create_task(self._refresher(), name="hub-refresher"),
            asyncio.create_task(self._flusher(), name="hub-flusher"),
            asyncio.create_task(self._keepalives(), name="hub-keepalives"),
        ]
        self._unsubscribe = self._effective.subscribe(self.on_effective_changed)

    async def stop(self) -> None:
        if callable(self._unsubscribe):
            self._unsubscribe()
        for conn in list(self._conns.values()):
            conn.close("server shutting down", grpc.StatusCode.UNAVAILABLE)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for record in self.registry.records.values():
            if record.online:
                record.online = False
                self.registry.touch(record.computer)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._flush_executor, self.registry.close)
        await loop.run_in_executor(self._flush_executor, self.audit.close)
        self._flush_executor.shutdown(wait=True)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        # EffectivePolicies is in memory and thread-safe: batches run off the event loop.
        return await asyncio.get_running_loop().run_in_executor(self._store_executor, fn, *args)

    # ---------------------------------------------------------------- change notification

    def on_effective_changed(self, computers: frozenset[str]) -> None:
        """EffectiveSource callback: these computers' effective policies changed. Any thread."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._mark_dirty(computers)
        else:
            loop.call_soon_threadsafe(self._mark_dirty, computers)

    def _mark_dirty(self, computers: Iterable[str]) -> None:
        self._dirty.update(computers)
        self._dirty_event.set()
        self._status_touched()

    async def _refresher(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            dirty, self._dirty = self._dirty, set()
            targets = [c for c in dirty if c in self._conns and self._conns[c].ready]
            if not targets:
                continue
            generation = self._next_generation()
            try:
                policies = await self._blocking(self._get_many, targets)
            except Exception:
                _log.exception("effective policy computation failed", extra={"computers": len(targets)})
                continue
            for computer, encoded in policies.items():
                conn = self._conns.get(computer)
                if conn is None or not conn.ready:
                    continue
                if encoded is None:
                    conn.close(_NOT_REGISTERED.format(computer), grpc.StatusCode.FAILED_PRECONDITION)
                else:
                    self._push(conn, encoded, generation, confirm=False)

    def _encoded(self, computer: str) -> Encoded:
        """The computer's version and serialized effective policy; NotFoundError if unregistered."""
        encoded = getattr(self._effective, "encoded", None)
        if encoded is not None:
            result: Encoded = encoded(computer)
            return result
        message = self._effective.get(computer)
        version, message.version, message.nonce = message.version, "", ""
        return version, (message.SerializeToString(deterministic=True),)

    def _get_many(self, computers: list[str]) -> dict[str, Encoded | None]:
        out: dict[str, Encoded | None] = {}
        for computer in computers:
            try:
                out[computer] = self._encoded(computer)
            except NotFoundError:
                out[computer] = None  # deleted from the registry
        return out

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _issue_nonce(self, computer: str) -> str:
        nonce = new_nonce()
        kept = self._nonces.get(computer)
        if kept is None:
            self._nonces[computer] = [nonce]
        else:
            kept.append(nonce)
            if len(kept) > _NONCES_KEPT:
                del kept[0]
        return nonce

    def _push(self, conn: _Connection, encoded: Encoded, generation: int, *, confirm: bool) -> None:
        """Queue the policy on the stream unless it is older than, or the same as, what was sent."""
        if generation < conn.generation:
            return
        conn.generation = generation
        version, parts = encoded
        # In memory only: the record is written with its next change (the ACK, a NACK, the disconnect),
        # so a rollout writes each record once, not twice. Fleet status takes the desired version from
        # the effective policies, and _mark_dirty has already told the watchers.
        self.registry.get(conn.computer).desired_version = version
        if version == conn.sent_version and not confirm:
            return
        nonce = self._issue_nonce(conn.computer)
        if confirm:
            out = dist_pb.ServerMessage(
                policy=dist_pb.EffectivePolicy(version=version, nonce=nonce, unchanged=True)
            ).SerializeToString()
        else:
            out = policy_frame(version, nonce, parts)
        conn.sent_version = version
        conn.send(out)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("push", extra={"computer": conn.computer, "version": version, "confirm": confirm})

    # ---------------------------------------------------------------- streams

    async def serve_stream(
        self,
        caller: Caller,
        requests: AsyncIterator[dist_pb.AgentMessage],
        context: aio.ServicerContext[Any, Any],
    ) -> None:
        """Run one agent's stream until it ends, the agent is revoked or the server stops."""
        conn = _Connection(caller.name, caller.serial, context.peer() or "")
        old = self._conns.get(caller.name)
        if old is not None:
            old.close("replaced by a newer stream from the same computer", grpc.StatusCode.ABORTED)
        self._conns[caller.name] = conn
        reader = asyncio.create_task(self._read(conn, requests), name=f"hub-read-{caller.name}")
        try:
            while True:
                if not conn.outgoing and not conn.closed:
                    await conn.wake.wait()  # a push, a keepalive (_keepalives) or the close
                conn.wake.clear()
                batch, conn.outgoing = conn.outgoing, []
                for message in batch:
                    await context.write(message)  # bytes: serialize_server_message passes them through
                conn.last_write = time.monotonic()
                if conn.closed:
                    break
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._fail_pending(conn)
            if self._conns.get(caller.name) is conn:
                del self._conns[caller.name]
                record = self.registry.get(caller.name)
                record.online = False
                record.last_seen_unix_ms = _now_ms()
                self.registry.touch(caller.name)
                self._status_touched()
            _log.info("agent stream closed", extra={"computer": caller.name, "reason": conn.close_reason})
        if conn.close_code is not None:
            await context.abort(conn.close_code, conn.close_reason)

    async def _read(self, conn: _Connection, requests: AsyncIterator[dist_pb.AgentMessage]) -> None:
        try:
            first = True
            async for message in requests:
                kind = message.WhichOneof("msg")
                if first:
                    first = False
                    if kind != "hello":
                        conn.close("the first message on the stream must be a Hello", grpc.StatusCode.INVALID_ARGUMENT)
                        return
                    await self._on_hello(conn, message.hello)
                    continue
                if kind == "relay_result":
                    self._relay_answered(conn, message.relay_result)
                    continue
                self.record_message(conn.computer, message, conn)
            conn.close("agent closed the stream")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport broke under the agent: it reconnects
            conn.close(f"stream error: {type(exc).__name__}")

    async def _on_hello(self, conn: _Connection, hello: dist_pb.Hello) -> None:
        if hello.computer and hello.computer.lower() != conn.computer.lower():
            _log.warning(
                "hello names another computer; the certificate wins",
                extra={"computer": conn.computer, "claimed": hello.computer},
            )
        now = _now_ms()
        record = self.registry.get(conn.computer)
        record.online = True
        record.connected_since_unix_ms = now
        previous, record.peer = record.peer, conn.peer
        self._record_hello(record, hello, now)
        generation = self._next_generation()
        try:
            encoded = self._encoded(conn.computer)  # in memory: cheap enough for the loop
        except NotFoundError:
            conn.close(_NOT_REGISTERED.format(conn.computer), grpc.StatusCode.FAILED_PRECONDITION)
            return
        if conn.closed:
            return
        conn.relay = RELAY_FEATURE in hello.protocol_features
        conn.ready = True
        self._push(conn, encoded, generation, confirm=encoded[0] == hello.applied_version)
        if self.address_listener is not None and (address := peer_address(conn.peer)) != peer_address(previous):
            try:
                self.address_listener(conn.computer, address)
            except Exception:  # the agent's stream must not fail for it; the next full read places it
                _log.exception("address listener failed", extra={"computer": conn.computer})
        _log.info(
            "agent connected",
            extra={
                "computer": conn.computer,
                "applied": hello.applied_version,
                "desired": encoded[0],
                "running_on_cache": hello.running_on_cache,
            },
        )

    def _record_hello(self, record: AgentRecord, hello: dist_pb.Hello, now: int) -> None:
        # Only a valid (unrevoked) certificate gets this far: a re-enrolled agent is no longer revoked.
        record.revoked_unix_ms = 0
        record.last_seen_unix_ms = now
        record.applied_version = hello.applied_version
        record.running_on_cache = hello.running_on_cache
        record.cache_since_unix_ms = hello.cache_since_unix_ms if hello.running_on_cache else 0
        record.capabilities = capabilities_bytes(hello.capabilities)
        record.agent_version = hello.agent_version
        self.registry.touch(record.computer)
        self._status_touched()

    def record_message(self, computer: str, message: dist_pb.AgentMessage, conn: _Connection | None = None) -> None:
        """Record an Ack, Nack, Heartbeat (or, over Report, a Hello) from `computer`."""
        now = _now_ms()
        record = self.registry.get(computer)
        record.last_seen_unix_ms = now
        kind = message.WhichOneof("msg")
        if kind == "ack":
            if self._known_nonce(computer, message.ack.nonce):
                record.applied_version = message.ack.version
                record.last_ack_unix_ms = now
                record.running_on_cache = False
                record.cache_since_unix_ms = 0
                # Debug, not info: a rollout to 10,000 agents is 10,000 ACKs; the fleet records keep them.
                if _log.isEnabledFor(logging.DEBUG):
                    _log.debug("ack", extra={"computer": computer, "version": message.ack.version})
        elif kind == "nack":
            if self._known_nonce(computer, message.nack.nonce):
                record.last_nack_version = message.nack.version
                record.last_nack_reason = message.nack.reason[:1000]
                record.last_nack_unix_ms = now
                _log.warning(
                    "nack",
                    extra={"computer": computer, "version": message.nack.version, "reason": record.last_nack_reason},
                )
        elif kind == "heartbeat":
            record.applied_version = message.heartbeat.applied_version
            record.running_on_cache = message.heartbeat.running_on_cache
            record.cache_since_unix_ms = message.heartbeat.cache_since_unix_ms if record.running_on_cache else 0
            if message.heartbeat.HasField("statistics"):
                record.statistics = message.heartbeat.statistics.SerializeToString(deterministic=True)
                record.statistics_unix_ms = now
        elif kind == "audit_batch":
            added = self.audit.add(computer, message.audit_batch.events, now)
            if added.dropped:
                _log.error("audit events dropped: the audit store is not written", extra={"dropped": added.dropped})
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("audit events", extra={"computer": computer, "events": added.queued})
        elif kind == "hello":
            self._record_hello(record, message.hello, now)
        self.registry.touch(computer)
        self._status_touched()

    def _known_nonce(self, computer: str, nonce: str) -> bool:
        known = nonce in self._nonces.get(computer, ())
        if not known:
            _log.info("answer to an unknown nonce ignored", extra={"computer": computer})
        return known

    # ---------------------------------------------------------------- relayed calls

    async def relay(self, computer: str, method: str, request: bytes, *, admin: str = "") -> bytes:
        """Call AgentLocal `method` on `computer`'s agent over its stream; its serialized response.

        RelayError: NOT_FOUND (no such computer), UNAVAILABLE (not connected, or disconnected before it
        answered), FAILED_PRECONDITION (the agent does not take relayed calls), DEADLINE_EXCEEDED, or the
        agent's own status (origin "agent").
        """
        name = computer.strip().lower()
        conn = self._conns.get(name)
        if conn is None or not conn.ready or conn.closed:
            if not self._registered(name):
                raise RelayError(grpc.StatusCode.NOT_FOUND, f"no computer {name!r} is known to the policy server")
            record = self.registry.records.get(name)
            seen = f" (last seen {_iso(record.last_seen_unix_ms)})" if record and record.last_seen_unix_ms else ""
            raise RelayError(
                grpc.StatusCode.UNAVAILABLE, f"the agent of {name!r} is not connected to the policy server{seen}"
            )
        if not conn.relay:
            version = self.registry.get(name).agent_version or "unknown"
            raise RelayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the agent of {name!r} (version {version}) does not take relayed calls: it is older than the "
                "policy server; upgrade it",
            )
        call_id = next(self._relay_ids)
        future: asyncio.Future[dist_pb.RelayResult | RelayError] = asyncio.get_running_loop().create_future()
        conn.pending[call_id] = future
        conn.send(
            dist_pb.ServerMessage(
                relay=dist_pb.RelayCall(id=call_id, method=method, request=request, admin=admin)
            ).SerializeToString()
        )
        try:
            async with asyncio.timeout(self.relay_timeout_s):
                outcome = await future
        except TimeoutError:
            raise RelayError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the agent of {name!r} did not answer {method} within {self.relay_timeout_s:g} s",
            ) from None
        finally:
            conn.pending.pop(call_id, None)
        if isinstance(outcome, RelayError):
            raise outcome
        if outcome.code:
            raise RelayError(status_code(outcome.code), outcome.details, origin="agent")
        return outcome.response

    def _registered(self, name: str) -> bool:
        """A computer the server knows: it has a fleet record, or an effective policy (the registry)."""
        if name in self.registry.records:
            return True
        try:
            self._effective.version_of(name)  # in memory: cheap enough for the loop
        except Exception:
            return False
        return True

    @staticmethod
    def _relay_answered(conn: _Connection, result: dist_pb.RelayResult) -> None:
        future = conn.pending.get(result.id)
        if future is not None and not future.done():
            future.set_result(result)

    @staticmethod
    def _fail_pending(conn: _Connection) -> None:
        reason = conn.close_reason or "the stream ended"
        for future in conn.pending.values():
            if not future.done():
                future.set_result(
                    RelayError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the agent of {conn.computer!r} disconnected before it answered ({reason})",
                    )
                )
        conn.pending.clear()

    # ---------------------------------------------------------------- unary calls

    async def fetch(self, caller: Caller, known_version: str) -> dist_pb.EffectivePolicy:
        """The polling fallback: the current effective policy, or `unchanged` if known_version is it."""
        try:
            policy = self._effective.get(caller.name)
        except NotFoundError as exc:
            raise NotFoundError(_NOT_REGISTERED.format(caller.name)) from exc
        record = self.registry.get(caller.name)
        record.last_seen_unix_ms = _now_ms()
        record.desired_version = policy.version
        self.registry.touch(caller.name)
        self._status_touched()
        nonce = self._issue_nonce(caller.name)
        if known_version and known_version == policy.version:
            return dist_pb.EffectivePolicy(version=policy.version, nonce=nonce, unchanged=True)
        out = dist_pb.EffectivePolicy()
        out.CopyFrom(policy)
        out.nonce = nonce
        return out

    # ---------------------------------------------------------------- revocation

    def revoke(self, *, name: str = "", serial: int = 0) -> bool:
        """Close the stream of the agent with this certificate serial (or computer name) at once.

        The fleet view shows the computer as revoked (`name`, when given, names its record).
        """
        if name:
            record = self.registry.get(name)
            record.revoked_unix_ms = _now_ms()
            self.registry.touch(name)
            self._status_touched()
        hit = False
        for conn in list(self._conns.values()):
            if (serial and conn.serial == serial) or (name and not serial and conn.computer == name):
                conn.close("the agent's certificate has been revoked", grpc.StatusCode.PERMISSION_DENIED)
                hit = True
        return hit

    def connected(self) -> list[str]:
        return sorted(c for c, conn in self._conns.items() if conn.ready)

    async def _keepalives(self) -> None:
        """Every keepalive_s/4, a KeepAlive on each stream idle for 3/4 keepalive_s: no stream waits longer
        than keepalive_s for a message, and no per-stream timer exists."""
        period = max(self.keepalive_s / 4, 0.01)
        while True:
            await asyncio.sleep(period)
            due = time.monotonic() - 3 * period
            message = b""
            for conn in list(self._conns.values()):
                if conn.last_write <= due and not conn.outgoing and not conn.closed:
                    if not message:
                        message = dist_pb.ServerMessage(
                            keepalive=dist_pb.KeepAlive(server_time_unix_ms=_now_ms())
                        ).SerializeToString()
                    conn.send(message)

    # ---------------------------------------------------------------- fleet status

    def _status_touched(self) -> None:
        self._flush_event.set()
        for event in self._watchers:
            event.set()

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._flush_event.wait()
            await asyncio.sleep(_FLUSH_DELAY_S)  # coalesce a burst into one transaction
            self._flush_event.clear()
            try:
                await loop.run_in_executor(self._flush_executor, self.registry.flush)
            except Exception:
                _log.exception("writing the fleet records failed")
            if self.audit.pending:
                try:
                    await loop.run_in_executor(self._flush_executor, self.audit.flush)
                except Exception:
                    _log.exception("writing the audit events failed")

    async def status(self, computers: Iterable[str] = ()) -> fleet_pb.FleetStatus:
        wanted = {c for c in computers}
        records = [r for r in self.registry.records.values() if not wanted or r.computer in wanted]
        names = [r.computer for r in records]
        desired = await self._blocking(self._versions_of, names)
        out = fleet_status(records, desired, _now_ms(), int(self.stale_after_s * 1000))
        if self.directory_status is not None:
            out.directory.CopyFrom(self.directory_status())
        else:
            out.directory.state = directory_pb.DIRECTORY_STATE_NOT_CONFIGURED
        return out

    def touch_status(self) -> None:
        """Something the fleet status shows besides the agents changed (the directory's state): wake watchers.

        Event loop only."""
        for event in self._watchers:
            event.set()

    async def audit_events(self, request: fleet_pb.FleetAuditRequest) -> fleet_pb.FleetAuditEvents:
        """Fleet.ListAuditEvents: the forwarded audit events matching, from the audit store (flush thread)."""
        events, truncated = await asyncio.get_running_loop().run_in_executor(
            self._flush_executor,
            functools.partial(
                self.audit.query,
                request.computers,
                request.ids,
                request.since_unix_ms,
                request.until_unix_ms,
                request.limit,
            ),
        )
        return fleet_pb.FleetAuditEvents(server_time_unix_ms=_now_ms(), events=events, truncated=truncated)

    def statistics(self, computers: Iterable[str] = ()) -> fleet_pb.FleetStatistics:
        """Fleet.GetStatistics: every agent's latest statistics (or those named) and the fleet's totals."""
        wanted = {c.strip().lower() for c in computers if c.strip()}
        records = [r for r in self.registry.records.values() if not wanted or r.computer.lower() in wanted]
        out = fleet_statistics(records, _now_ms())
        known = {r.computer.lower() for r in records}
        out.not_reporting.extend(sorted(c for c in wanted if c not in known))
        return out

    def _versions_of(self, names: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in names:
            try:
                out[name] = self._effective.version_of(name)
            except Exception:  # unknown to the resolver (deleted computer): keep what was last pushed
                continue
        return out

    async def watch(self, computers: Iterable[str] = ()) -> AsyncIterator[fleet_pb.FleetStatus]:
        wanted = list(computers)
        changed = asyncio.Event()
        changed.set()  # the first snapshot at once
        self._watchers.add(changed)
        try:
            while True:
                await changed.wait()
                changed.clear()
                yield await self.status(wanted)
                await asyncio.sleep(_WATCH_DELAY_S)  # coalesce: at most a few snapshots a second
        finally:
            self._watchers.discard(changed)


# -------------------------------------------------------------------- servicers


class DistributionServicer(dist_grpc.DistributionServicer):
    """Thin: identity from the certificate, then the hub."""

    def __init__(self, hub: Hub, identify: Identify) -> None:
        self._hub = hub
        self._identify = identify

    async def Stream(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[dist_pb.AgentMessage],
        context: aio.ServicerContext[dist_pb.AgentMessage, dist_pb.ServerMessage],
    ) -> None:
        caller = await self._identify(context)
        await self._hub.serve_stream(caller, request_iterator, context)

    async def Fetch(
        self, request: dist_pb.FetchRequest, context: aio.ServicerContext[Any, Any]
    ) -> dist_pb.EffectivePolicy:
        caller = await self._identify(context)
        try:
            return await self._hub.fetch(caller, request.known_version)
        except NotFoundError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            raise  # unreachable: abort raises

    async def Report(
        self, request: dist_pb.AgentMessage, context: aio.ServicerContext[Any, Any]
    ) -> dist_pb.ReportResponse:
        caller = await self._identify(context)
        self._hub.record_message(caller.name, request)
        return dist_pb.ReportResponse()


class FleetServicer(fleet_grpc.FleetServicer):
    """Admin only: where every agent stands."""

    def __init__(self, hub: Hub, authorize_admin: AuthorizeAdmin) -> None:
        self._hub = hub
        self._authorize = authorize_admin

    async def Status(
        self, request: fleet_pb.FleetStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> fleet_pb.FleetStatus:
        await self._authorize(context)
        return await self._hub.status(request.computers)

    async def Watch(
        self, request: fleet_pb.FleetStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fleet_pb.FleetStatus]:
        await self._authorize(context)
        async for snapshot in self._hub.watch(request.computers):
            yield snapshot

    async def ListAuditEvents(
        self, request: fleet_pb.FleetAuditRequest, context: aio.ServicerContext[Any, Any]
    ) -> fleet_pb.FleetAuditEvents:
        await self._authorize(context)
        return await self._hub.audit_events(request)

    async def GetStatistics(
        self, request: fleet_pb.FleetStatisticsRequest, context: aio.ServicerContext[Any, Any]
    ) -> fleet_pb.FleetStatistics:
        await self._authorize(context)
        return self._hub.statistics(request.computers)


class RelayServicer(relay_grpc.AgentRelayServicer):
    """Admin only: one agent's local API through its stream (relay.proto). Logs who called what, never
    the payload (EditDynamic may carry a pre-shared key)."""

    def __init__(self, hub: Hub, authorize_admin: AuthorizeAdmin) -> None:
        self._hub = hub
        self._authorize = authorize_admin

    async def Call(
        self, request: relay_pb.RelayRequest, context: aio.ServicerContext[Any, Any]
    ) -> relay_pb.RelayResponse:
        from policyagent.pki.authz import peer_of

        await self._authorize(context)
        peer = peer_of(context)
        admin = peer.name if peer is not None else ""
        computer = request.computer.strip().lower()
        method = request.method[:100]
        outcome = "OK"
        started = time.monotonic()
        try:
            if request.method not in RELAY_METHODS:
                raise RelayError(grpc.StatusCode.PERMISSION_DENIED, not_relayed(method))
            if not computer:
                raise RelayError(grpc.StatusCode.INVALID_ARGUMENT, "name the computer whose agent to call")
            response = await self._hub.relay(computer, request.method, request.request, admin=admin)
        except RelayError as exc:
            outcome = exc.code.name if exc.origin == "server" else f"agent: {exc.code.name}"
            await context.abort(exc.code, exc.details, trailing_metadata=((RELAY_ORIGIN_KEY, exc.origin),))
            raise AssertionError("unreachable") from None
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        finally:
            _log.info(
                "relayed call",
                extra={
                    "admin": admin,
                    "computer": computer,
                    "method": method,
                    "outcome": outcome,
                    "ms": round((time.monotonic() - started) * 1000),
                },
            )
        return relay_pb.RelayResponse(response=response)


def _add_distribution(servicer: DistributionServicer, server: aio.Server) -> None:
    """dist_grpc.add_DistributionServicer_to_server, with Stream's responses allowed to be pre-serialized bytes."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.Stream,
            request_deserializer=dist_pb.AgentMessage.FromString,
            response_serializer=serialize_server_message,
        ),
        "Fetch": grpc.unary_unary_rpc_method_handler(
            servicer.Fetch,
            request_deserializer=dist_pb.FetchRequest.FromString,
            response_serializer=dist_pb.EffectivePolicy.SerializeToString,
        ),
        "Report": grpc.unary_unary_rpc_method_handler(
            servicer.Report,
            request_deserializer=dist_pb.AgentMessage.FromString,
            response_serializer=dist_pb.ReportResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(DISTRIBUTION_SERVICE, handlers),))
    server.add_registered_method_handlers(DISTRIBUTION_SERVICE, handlers)  # type: ignore[attr-defined]


def add_to_server(hub: Hub, server: aio.Server, identify: Identify, authorize_admin: AuthorizeAdmin) -> None:
    _add_distribution(DistributionServicer(hub, identify), server)
    fleet_grpc.add_FleetServicer_to_server(FleetServicer(hub, authorize_admin), server)
    relay_grpc.add_AgentRelayServicer_to_server(RelayServicer(hub, authorize_admin), server)


async def identify_by_certificate(context: aio.ServicerContext[Any, Any]) -> Caller:
    """The calling agent from its host certificate (policyagent.pki.authz); aborts the call otherwise."""
    from policyagent.pki.authz import require_agent

    return Caller.of(await require_agent(context))


async def require_admin_certificate(context: aio.ServicerContext[Any, Any]) -> None:
    from policyagent.pki.authz import require_admin

    await require_admin(context)


def attach_distribution(
    server: aio.Server,
    *,
    effective: EffectiveSource,
    data_dir: Path,
    revocations: Any,
    store_executor: Executor | None = None,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
) -> Hub:
    """What the server process does: a Hub on `data_dir`/fleet.sqlite3, Distribution, Fleet and AgentRelay
    on `server` (identity from certificates), and revoked agents' streams closed at once.

    Call `await hub.start()` once the loop runs and `await hub.stop()` before the server stops.
    """
    hub = Hub(effective, FleetRegistry(data_dir / FLEET_FILE), store_executor=store_executor, keepalive_s=keepalive_s)
    add_to_server(hub, server, identify_by_certificate, require_admin_certificate)

    def on_revoked(peer: Any) -> None:
        if getattr(peer, "role", "") == "agent":
            caller = Caller.of(peer)
            hub.revoke(name=caller.name, serial=caller.serial)

    revocations.subscribe(on_revoked)
    return hub


DISTRIBUTION_SERVICE: str = dist_pb.DESCRIPTOR.services_by_name["Distribution"].full_name
FLEET_SERVICE: str = fleet_pb.DESCRIPTOR.services_by_name["Fleet"].full_name
AGENT_RELAY_SERVICE: str = relay_pb.DESCRIPTOR.services_by_name["AgentRelay"].full_name

__all__ = [
    "AGENT_RELAY_SERVICE",
    "DISTRIBUTION_SERVICE",
    "FLEET_SERVICE",
    "RELAY_ORIGIN_KEY",
    "SERVER_CONNECTION_OPTIONS",
    "Caller",
    "DistributionServicer",
    "EffectiveSource",
    "FleetServicer",
    "Hub",
    "RelayError",
    "RelayServicer",
    "add_to_server",
    "attach_distribution",
    "identify_by_certificate",
]
