"""The agent daemon: the asyncio adapter around the sans-I/O session (DESIGN §5).

`AgentDaemon` owns the I/O the `Session` asks for: the mTLS channel and the
Distribution stream (with gRPC keepalives), Fetch and Report calls, the enforcer
(run in a worker thread), the on-disk cache, and the local admin API on a unix
socket. Its loop waits for the next event or the session's next timer deadline —
nothing polls.

Which policy is enforced (issue 3, DESIGN §1.2): the primary policy is the domain's
(the cached one at start, then whatever the server sends) or, when the domain assigns
nothing (source "none"), the local store's assigned policy: the domain's assignment
overrides the local one. The persistent store's assigned policy applies at start and
then *in addition to* the primary one (Windows Server 2003): the enforcer gets
`combine.combine(persistent, primary)`. If that fails because the persistent policy
cannot apply here, the primary policy applies alone; if the primary part is at fault,
the domain version is NACKed and what is in force (persistent part included) stays.
The session ACKs/NACKs the domain's version either way.

Local admin API, `STATE_DIR/agent.sock` (0600): `AgentLocal` (status, the effective
policy) and `PolicyAdmin` on the local static store, so `netsh -r unix:STATE_DIR/agent.sock`
edits the local store; `STATE_DIR/persistent.sock` serves `PolicyAdmin` on the
persistent store.

Relayed calls (policyagent/agent/relay.py): an admin's AgentLocal call that the server passes on
the stream (`RelayCall`) is taken by the stream reader before the session (which only hears that the
server is alive) and answered with a `RelayResult` from the same `AgentLocalServicer` the socket serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from policyagent.agent import session as s
from policyagent.agent.cache import PolicyCache
from policyagent.agent.combine import combine, has_policy
from policyagent.agent.enforce import EnforceError, Enforcer, HostFacts
from policyagent.agent.forward import DEFAULT_BATCH, DEFAULT_INTERVAL_S, AuditCursor, summary
from policyagent.agent.relay import RELAY_FEATURE
from policyagent.agent.relay import dispatch as dispatch_relay
from policyagent.model.defaults import restore_defaults_plan
from policyagent.model.writes import Mutation, PlanFn
from policyagent.pb import GRPC_MESSAGE_OPTIONS, agent_grpc, agent_pb, dist_grpc, dist_pb, pb
from policyagent.server.admin import PolicyAdminServicer, mask_secrets
from policyagent.server.admin import add_to_server as add_admin_to_server
from policyagent.store.base import DelegatingPolicyStore, PolicyStore, WriteResult
from policyagent.store.sqlite import SqliteStore

_log = logging.getLogger("policyagent.agent")


def _agent_version() -> str:
    # Not `policyagent.__version__`: an editable install may import the package as a namespace.
    try:
        return importlib.metadata.version("policyagent")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


AGENT_VERSION = _agent_version()
_EOF: Any = getattr(aio, "EOF")  # noqa: B009  (not in the type stubs)
# What the session hears when the server relays a call: a message from the server, like a keepalive.
_ALIVE = dist_pb.ServerMessage(keepalive=dist_pb.KeepAlive())

SOCKET_FILE = "agent.sock"
PERSISTENT_SOCKET_FILE = "persistent.sock"
LOCAL_STORE_FILE = "local.sqlite3"
PERSISTENT_STORE_FILE = "persistent.sqlite3"
HOST_CERT = "host.crt"
HOST_KEY = "host.key"
CA_FILE = "ca.crt"
IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class AgentConfig:
    server: str  # HOST:PORT of the policy server
    state_dir: Path
    ca_file: Path | None = None  # default: STATE_DIR/ca.crt
    computer: str = ""  # informational (the certificate names the computer)
    membership: str = ""  # "domain" | "workgroup"; "" = as the server says
    heartbeat_s: float = 30.0
    silence_s: float = 90.0
    keepalive_s: float = 20.0  # gRPC HTTP/2 keepalive pings
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    poll_interval_s: float | None = None
    connect_timeout_s: float = 5.0
    rpc_timeout_s: float = 10.0
    server_name_override: str = ""  # TLS name to expect, when HOST is not in the server certificate
    enforcer: str = "record-only"  # "auto" | "strongswan" | "record-only" (the CLI defaults to auto)
    ike_keytab: Path | None = None  # Kerberos in IKE: keytab and host principal (domain members)
    ike_principal: str = ""
    krb5_config: str = ""  # KRB5_CONFIG for the keying exchange ("" = the system's)
    charon_vici: Path | None = None  # use the system's charon over this VICI socket instead of our own
    audit_forward_s: float = DEFAULT_INTERVAL_S  # new audit events go to the server this often (stream up)
    audit_batch: int = DEFAULT_BATCH  # audit events per AuditBatch


class AgentError(Exception):
    """The agent cannot start; the message says why, on one line."""


def keepalive_options(keepalive_s: float) -> list[tuple[str, Any]]:
    """Client channel options: HTTP/2 pings so a dead server or a dead path is noticed."""
    return [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(max(keepalive_s / 2, 1) * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Our own backoff decides when to reconnect; the channel should just try when asked.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


def local_effective(
    policy: pb.Policy, contents: pb.StoreContents, source: str, computer: str
) -> dist_pb.EffectivePolicy:
    """A self-contained effective policy from a local or persistent store's assigned policy."""
    out = dist_pb.EffectivePolicy(computer=computer, source=source)
    out.policy.CopyFrom(policy)
    out.policy.revision = 0
    out.policy.modified_unix_ms = 0
    lists = {fl.id: fl for fl in contents.filter_lists}
    actions = {fa.id: fa for fa in contents.filter_actions}
    used_lists = sorted({r.filter_list_id for r in policy.rules if r.filter_list_id in lists})
    used_actions = sorted({r.filter_action_id for r in policy.rules if r.filter_action_id in actions})
    out.filter_lists.extend(lists[i] for i in used_lists)
    out.filter_actions.extend(actions[i] for i in used_actions)
    out.version = f"{source}:" + hashlib.sha256(out.SerializeToString(deterministic=True)).hexdigest()
    return out


def assigned_of(store: PolicyStore, source: str, computer: str) -> dist_pb.EffectivePolicy | None:
    contents, _ = store.snapshot()
    for policy in contents.policies:
        if policy.assigned:
            return local_effective(policy, contents, source, computer)
    return None


class NotifyingStore(DelegatingPolicyStore):
    """A PolicyStore that calls `on_write()` after every committed write (the agent re-chooses)."""

    def __init__(self, inner: PolicyStore, on_write: Callable[[], None]) -> None:
        super().__init__(inner)
        self._on_write = on_write

    def write(
        self, mutations: Sequence[Mutation] | PlanFn, *, principal: str, context: str = "", dry_run: bool = False
    ) -> WriteResult:
        result = self.inner.write(mutations, principal=principal, context=context, dry_run=dry_run)
        if not dry_run:
            self._on_write()
        return result


def load_credentials(config: AgentConfig) -> grpc.ChannelCredentials:
    """The agent's mTLS credentials: its host certificate and key, and the CA it trusts."""
    cert, key = config.state_dir / HOST_CERT, config.state_dir / HOST_KEY
    ca = config.ca_file or config.state_dir / CA_FILE
    missing = [str(p) for p in (cert, key, ca) if not p.is_file()]
    if missing:
        raise AgentError(
            f"no host certificate: {', '.join(missing)} missing; enroll first "
            "(--enroll-token, --enroll-workgroup-secret-file or --enroll-kerberos)"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )


class AgentDaemon:
    """One agent: session + channel + enforcer + cache + local API."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        enforcer: Enforcer | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.state_dir = config.state_dir
        if enforcer is None:
            from policyagent.agent.enforce.choose import choose

            enforcer = choose(config)
        self.enforcer: Enforcer = enforcer
        self._credentials = credentials
        self.cache = PolicyCache(config.state_dir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[s.Event] = asyncio.Queue()
        self._session: s.Session | None = None
        self._rng = rng or random.Random()
        self._channel: aio.Channel | None = None
        self._call: Any = None
        self._stream_tasks: list[asyncio.Task[None]] = []
        self._outbox: asyncio.Queue[dist_pb.AgentMessage | None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None
        self._local_server: aio.Server | None = None
        self._persistent_server: aio.Server | None = None
        self._store_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-store")
        self._enforce_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-enforce")
        self.local_store: PolicyStore | None = None
        self.persistent_store: PolicyStore | None = None
        # What the enforcer holds now, which may differ from the session's domain policy (local store).
        self.enforced: dist_pb.EffectivePolicy | None = None
        self.enforced_source = "none"  # the parts in force, e.g. "persistent+domain", "local", "none"
        self.persistent_error = ""  # why the persistent store's policy is not in force, if it cannot apply
        self._domain: dist_pb.EffectivePolicy | None = None
        # One enforcement at a time: a server push and a local/persistent-store write that
        # interleave must each see the other's result, never an older view of the stores.
        self._enforcing = asyncio.Lock()
        self.computer = config.computer
        from policyagent.agent.enforce.dynconfig import DynamicConfig

        self.dynconfig = DynamicConfig(config.state_dir)  # netsh ipsec dynamic set config
        # Audit events forwarded to the server (agent/forward.py): how far the server has them.
        self.audit_cursor = AuditCursor.load(config.state_dir, config.audit_batch)
        self._forward_wake = asyncio.Event()
        self._stats_outbox: object = None  # the stream that has had its first statistics
        from policyagent.agent.enforce.dynamic import DynamicStore

        self.dynamic = DynamicStore()  # dynamic-mode policy: in memory, gone when the agent stops
        # The local API: served on STATE_DIR/agent.sock, and called in process for relayed calls.
        self.local_api = AgentLocalServicer(self)

    # ------------------------------------------------------------------ lifecycle

    @property
    def session(self) -> s.Session:
        assert self._session is not None, "agent not started"
        return self._session

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._credentials is None:
            self._credentials = load_credentials(self.config)
        loop = self._loop
        self.local_store = NotifyingStore(
            await loop.run_in_executor(self._store_executor, self._open_store, LOCAL_STORE_FILE), self._store_changed
        )
        self.persistent_store = NotifyingStore(
            await loop.run_in_executor(self._store_executor, self._open_store, PERSISTENT_STORE_FILE),
            self._store_changed,
        )
        await self._start_local_api()
        await loop.run_in_executor(self._enforce_executor, self.enforcer.start)
        await loop.run_in_executor(self._enforce_executor, self.enforcer.configure, dict(self.dynconfig.values))
        caps = self.enforcer.capabilities()
        self._session = s.Session(
            s.SessionConfig(
                computer=self.computer,
                capabilities=caps,
                agent_version=AGENT_VERSION,
                heartbeat_s=self.config.heartbeat_s,
                silence_s=self.config.silence_s,
                backoff_base_s=self.config.backoff_base_s,
                backoff_max_s=self.config.backoff_max_s,
                poll_interval_s=self.config.poll_interval_s,
            ),
            clock=loop.time,
            wall=time.time,
            rng=self._rng,
        )
        _log.warning("enforcer: %s", self.enforcer.describe(), extra={"enforcer": self.enforcer.name})
        # The persistent store applies at boot, before the cache or the domain (and then with them).
        error = await self._enforce_combined(None, "none")
        if error:
            _log.error("persistent policy not applied", extra={"reason": error})
        cached = self.cache.load()
        if cached is not None:
            _log.info(
                "cached policy found",
                extra={"version": cached.policy.version, "saved_unix_ms": cached.saved_unix_ms},
            )
        self._main = asyncio.create_task(self._run(cached.policy if cached is not None else None), name="agent-main")
        self._spawn(self._forward_audit_loop())

    def _open_store(self, name: str) -> PolicyStore:
        store = SqliteStore(self.state_dir / name)
        # A new local store holds the Windows defaults, as a fresh Windows install does.
        if name == LOCAL_STORE_FILE:
            store.initialize(seed=restore_defaults_plan, principal="policyagent-agent")
        return store

    async def stop(self) -> None:
        if self._session is not None and self._session.state is not s.State.STOPPED:
            self._execute(self._session.handle(s.Stop()))
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        await self._close_stream()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in (self._local_server, self._persistent_server):
            if server is not None:
                await server.stop(0)
        loop = asyncio.get_running_loop()
        for store in (self.local_store, self.persistent_store):
            if store is not None:
                await loop.run_in_executor(self._store_executor, store.close)
        try:
            await loop.run_in_executor(self._enforce_executor, self.enforcer.close)
        except Exception:
            _log.exception("stopping the enforcer failed")
        self._store_executor.shutdown(wait=True)
        self._enforce_executor.shutdown(wait=True)

    async def wait(self) -> None:
        if self._main is not None:
            await self._main

    # ------------------------------------------------------------------ the loop

    async def _run(self, cached: dist_pb.EffectivePolicy | None) -> None:
        loop = asyncio.get_running_loop()
        self._execute(self.session.handle(s.Start(cached=cached)))
        while True:
            deadline = self.session.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    event = await self._events.get()
            except TimeoutError:
                self._execute(self.session.handle_timers(loop.time()))
                continue
            on_cache = self.session.running_on_cache
            self._execute(self.session.handle(event))
            if self.session.running_on_cache and not on_cache:
                # The logs say it too (docs/operations.md): "running on cached policy since T; ...".
                status = self.status()
                _log.warning("%s", status.summary, extra={"version": status.applied_version})

    def post(self, event: s.Event) -> None:
        self._events.put_nowait(event)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _execute(self, actions: list[s.Action]) -> None:
        for action in actions:
            if isinstance(action, s.Connect):
                self._spawn(self._connect())
            elif isinstance(action, s.Send):
                if self._outbox is not None:
                    self._send(action.message, self._outbox)
            elif isinstance(action, s.Report):
                self._spawn(self._report(action.message))
            elif isinstance(action, s.Fetch):
                self._spawn(self._fetch(action.known_version))
            elif isinstance(action, s.Apply):
                self._spawn(self._apply(action.policy, action.origin))
            elif isinstance(action, s.WriteCache):
                try:
                    self.cache.save(action.policy)
                except OSError as exc:
                    _log.error("cannot write the policy cache", extra={"error": exc.strerror})
            elif isinstance(action, s.CloseStream):
                _log.info("closing the stream", extra={"reason": action.reason})
                self._spawn(self._close_stream())
            else:  # pragma: no cover - the session's action set is closed
                raise AssertionError(f"unknown action {action!r}")

    def _send(self, message: dist_pb.AgentMessage, outbox: asyncio.Queue[dist_pb.AgentMessage | None]) -> None:
        kind = message.WhichOneof("msg")
        if kind == "heartbeat":
            self._spawn(self._send_heartbeat(message, outbox))  # statistics ride on heartbeats
            return
        if kind == "hello" and RELAY_FEATURE not in message.hello.protocol_features:
            message.hello.protocol_features.append(RELAY_FEATURE)  # this agent answers RelayCall
        outbox.put_nowait(message)
        if kind == "hello":
            self._forward_wake.set()  # the audit events recorded while the stream was down, at once
        elif kind == "ack" or (kind == "nack" and self._stats_outbox is not outbox):
            # Right after connecting (the answer to the server's first push) and whenever a policy takes
            # effect: the statistics at once, with the policy in force, not a heartbeat interval later.
            self._stats_outbox = outbox
            self._spawn(self._send_heartbeat(self.session.heartbeat(), outbox))

    # ------------------------------------------------------------------ forwarding (statistics, audit)

    def _statistics_summary(self) -> dist_pb.StatisticsSummary:
        enforced = self.enforced
        return summary(self.enforcer.statistics(), enforced.policy.name if enforced is not None else "")

    async def _send_heartbeat(
        self, message: dist_pb.AgentMessage, outbox: asyncio.Queue[dist_pb.AgentMessage | None]
    ) -> None:
        try:
            # Not the enforce thread: an apply in progress must not delay the heartbeat.
            stats = await asyncio.get_running_loop().run_in_executor(None, self._statistics_summary)
            message.heartbeat.statistics.CopyFrom(stats)
        except Exception as exc:  # the heartbeat goes anyway, without statistics
            _log.info("statistics unavailable for the heartbeat", extra={"error": f"{type(exc).__name__}: {exc}"})
        if self._outbox is outbox:  # still the same stream
            outbox.put_nowait(message)

    async def _forward_audit_loop(self) -> None:
        """Every audit_forward_s (and at once after connecting): new audit events to the server."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.audit_forward_s):
                    await self._forward_wake.wait()
            self._forward_wake.clear()
            try:
                await self._forward_audit()
            except Exception:  # never let forwarding die; the cursor says where to resume
                _log.exception("forwarding audit events failed")

    async def _forward_audit(self) -> None:
        """Send batches while the stream is up, until the enforcer has nothing new; each batch goes with
        Report, whose answer confirms it (then the cursor moves), over the stream's connection."""
        loop = asyncio.get_running_loop()
        cursor = self.audit_cursor
        while self._session is not None and self._session.state in s.CONNECTED and self._channel is not None:
            batch = await loop.run_in_executor(None, cursor.next_batch, self.enforcer)
            if not batch:
                return
            channel = self._channel
            if channel is None:  # the stream went down meanwhile: after the reconnect
                return
            try:
                await dist_grpc.DistributionStub(channel).Report(
                    dist_pb.AgentMessage(audit_batch=dist_pb.AuditBatch(events=batch)),
                    timeout=self.config.rpc_timeout_s,
                )
            except (grpc.RpcError, aio.UsageError) as exc:  # UsageError: the channel closed under the call
                _log.info("audit events not forwarded; retrying later", extra={"reason": _rpc_reason(exc)})
                return
            await loop.run_in_executor(None, cursor.commit, batch)
            if len(batch) < cursor.batch:
                return

    # ------------------------------------------------------------------ server I/O

    def _new_channel(self) -> aio.Channel:
        assert self._credentials is not None
        options: list[tuple[str, Any]] = [*keepalive_options(self.config.keepalive_s), *GRPC_MESSAGE_OPTIONS]
        if self.config.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.config.server_name_override))
        return aio.secure_channel(self.config.server, self._credentials, options=options)

    async def _connect(self) -> None:
        await self._close_stream()
        channel = self._new_channel()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await channel.channel_ready()
        except (TimeoutError, grpc.RpcError) as exc:
            await channel.close(None)
            reason = "timed out connecting" if isinstance(exc, TimeoutError) else _rpc_reason(exc)
            self.post(s.ConnectFailed(f"cannot reach {self.config.server}: {reason}"))
            return
        self._channel = channel
        stub = dist_grpc.DistributionStub(channel)
        outbox: asyncio.Queue[dist_pb.AgentMessage | None] = asyncio.Queue()
        self._outbox = outbox
        call = stub.Stream()  # type: ignore[call-arg]  # grpc.aio: no iterator = read()/write() style
        self._call = call
        self._stream_tasks = [
            asyncio.create_task(self._writer(call, outbox), name="agent-stream-writer"),
            asyncio.create_task(self._reader(call), name="agent-stream-reader"),
        ]
        _log.info("connected", extra={"server": self.config.server})
        self.post(s.Connected())

    async def _writer(self, call: Any, outbox: asyncio.Queue[dist_pb.AgentMessage | None]) -> None:
        try:
            while True:
                message = await outbox.get()
                if message is None:
                    await call.done_writing()
                    return
                await call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the reader reports why the stream ended

    async def _reader(self, call: Any) -> None:
        reason = "the server closed the stream"
        try:
            while True:
                message = await call.read()
                if message is _EOF:
                    break
                if message.WhichOneof("msg") == "relay":
                    # Not the session's business (policy versions), except that the server is alive.
                    self._spawn(self._relay(message.relay, self._outbox))
                    if self._call is call and self.session.state in s.CONNECTED:
                        self.post(s.Received(_ALIVE))
                    continue
                self.post(s.Received(message))
        except grpc.RpcError as exc:
            reason = _rpc_reason(exc)
        except asyncio.CancelledError:
            return
        if self._call is call:
            _log.warning("stream closed", extra={"reason": reason})
            self._call = None
            self._outbox = None
            self.post(s.StreamClosed(reason))

    async def _relay(
        self, call: dist_pb.RelayCall, outbox: asyncio.Queue[dist_pb.AgentMessage | None] | None
    ) -> None:
        """Answer a relayed AgentLocal call on the stream it came on (dropped if that stream is gone)."""
        result = await dispatch_relay(self.local_api, call)
        if outbox is not None and self._outbox is outbox:
            outbox.put_nowait(dist_pb.AgentMessage(relay_result=result))

    async def _close_stream(self) -> None:
        call, self._call = self._call, None
        tasks, self._stream_tasks = self._stream_tasks, []
        channel, self._channel = self._channel, None
        self._outbox = None
        if call is not None:
            call.cancel()
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)
        if channel is not None:
            await channel.close(None)

    async def _unary_channel(self) -> tuple[aio.Channel, bool]:
        if self._channel is not None:
            return self._channel, False
        return self._new_channel(), True

    async def _report(self, message: dist_pb.AgentMessage) -> None:
        channel, owned = await self._unary_channel()
        try:
            await dist_grpc.DistributionStub(channel).Report(message, timeout=self.config.rpc_timeout_s)
        except grpc.RpcError as exc:
            _log.info("report failed", extra={"reason": _rpc_reason(exc)})
        finally:
            if owned:
                await channel.close(None)

    async def _fetch(self, known_version: str) -> None:
        channel, owned = await self._unary_channel()
        try:
            policy = await dist_grpc.DistributionStub(channel).Fetch(
                dist_pb.FetchRequest(known_version=known_version), timeout=self.config.rpc_timeout_s
            )
        except grpc.RpcError as exc:
            self.post(s.FetchFailed(_rpc_reason(exc)))
            return
        finally:
            if owned:
                await channel.close(None)
        self.post(s.Fetched(policy))

    # ------------------------------------------------------------------ enforcement

    def _facts(self, policy: dist_pb.EffectivePolicy) -> HostFacts:
        return HostFacts(membership=self.config.membership or policy.membership, computer=self.computer)

    async def _enforce(self, policy: dist_pb.EffectivePolicy, source: str) -> str:
        """Apply `policy` with the enforcer; returns "" or the reason it failed."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._enforce_executor, self.enforcer.apply, policy, self._facts(policy))
        except EnforceError as exc:
            return str(exc)
        except Exception as exc:  # a bug in the enforcer must still produce a NACK, not silence
            _log.exception("enforcer failed")
            return f"internal error in the {self.enforcer.name} enforcer: {type(exc).__name__}"
        self.enforced, self.enforced_source = policy, source
        _log.warning(
            "policy applied (%s)",
            self.enforcer.describe(),
            extra={"version": policy.version, "source": source, "policy": policy.policy.name},
        )
        return ""

    async def _enforce_combined(
        self, primary: dist_pb.EffectivePolicy | None, source: str, *, unless_same: bool = False
    ) -> str:
        """Enforce the persistent store's policy plus `primary`; returns "" or why `primary` cannot apply.

        If the combination fails because the persistent policy itself cannot apply on this host, the
        primary policy is applied alone (and `persistent_error` says why); otherwise what is in force stays.
        """
        assert self.persistent_store is not None
        loop = asyncio.get_running_loop()
        persistent = await loop.run_in_executor(
            self._store_executor, assigned_of, self.persistent_store, "persistent", self.computer
        )
        if persistent is None:
            self.persistent_error = ""
            if primary is None:
                if self.enforced_source != "persistent":
                    return ""
                primary = dist_pb.EffectivePolicy(computer=self.computer, source="none")  # unassigned
            if unless_same and self.enforced is not None and primary.version == self.enforced.version:
                return ""
            return await self._enforce(primary, source)
        combined = combine(persistent, primary)
        if unless_same and self.enforced is not None and combined.version == self.enforced.version:
            return ""
        error = await self._enforce(combined, combined.source)
        if not error:
            self.persistent_error = ""
            return ""
        if primary is None:
            self.persistent_error = error
            return error
        problems = await loop.run_in_executor(
            self._enforce_executor, self.enforcer.check, persistent, self._facts(combined)
        )
        if not problems:
            return error  # the primary part (or the combination) is at fault: what is in force stays
        self.persistent_error = "; ".join(problems)
        _log.error("persistent policy not applied", extra={"reason": self.persistent_error})
        return await self._enforce(primary, source)

    async def _choose(self, domain: dist_pb.EffectivePolicy) -> tuple[dist_pb.EffectivePolicy, str]:
        """The primary policy for this domain policy: it, or the local store's when the domain assigns none."""
        if has_policy(domain):
            return domain, "domain"
        assert self.local_store is not None
        local = await asyncio.get_running_loop().run_in_executor(
            self._store_executor, assigned_of, self.local_store, "local", self.computer
        )
        if local is not None:
            local.membership = domain.membership
            return local, "local"
        return domain, "none"

    async def _apply(self, policy: dist_pb.EffectivePolicy, origin: s.Origin) -> None:
        async with self._enforcing:
            chosen, source = await self._choose(policy)
            error = await self._enforce_combined(chosen, source)
            if not error:
                self._domain = policy
        if error and origin is s.Origin.CACHE:
            _log.error("cached policy not applied", extra={"reason": error})
        self.post(s.Applied(policy.version, error))

    def _store_changed(self) -> None:
        # Called in the store thread after a local- or persistent-store write: re-choose on the loop.
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: self._spawn(self._rechoose()))

    async def _rechoose(self) -> None:
        async with self._enforcing:
            domain = self._domain  # the last good domain policy, as of now
            if domain is None:  # no good domain policy yet: only the persistent part can change
                error = await self._enforce_combined(None, "none", unless_same=True)
            else:
                chosen, source = await self._choose(domain)
                error = await self._enforce_combined(chosen, source, unless_same=True)
        if error:
            _log.error("local or persistent policy not applied", extra={"reason": error})

    # ------------------------------------------------------------------ status

    def config_values(self) -> agent_pb.AgentConfigValues:
        from policyagent.agent.enforce.dynconfig import PROPERTIES

        out = agent_pb.AgentConfigValues()
        for prop in PROPERTIES:
            out.values.add(
                name=prop.name,
                value=self.dynconfig.values[prop.name],
                pending=self.dynconfig.pending.get(prop.name, ""),
                description=prop.description,
                applies_at_once=prop.at_once,
            )
        return out

    async def edit_dynamic(self, request: agent_pb.DynamicEdit) -> agent_pb.DynamicState:
        """Validate, enforce, then keep a dynamic-mode edit; DynamicError/EnforceError say why not."""
        from policyagent.agent.enforce.dynamic import pseudo_policies

        async with self._enforcing:
            new = self.dynamic.edit(request)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._enforce_executor, self.enforcer.set_dynamic, tuple(pseudo_policies(new)))
            self.dynamic.commit(new)
        _log.info("dynamic mode: %s", request.WhichOneof("op"), extra={"rules": len(new.rules)})
        return new

    async def set_config(self, name: str, value: str) -> None:
        """`set config NAME VALUE`: stored; applied now if Windows applies it at once, else at the next start."""
        if self.dynconfig.set(name, value):
            loop = asyncio.get_running_loop()
            async with self._enforcing:
                await loop.run_in_executor(self._enforce_executor, self.enforcer.configure, dict(self.dynconfig.values))
        _log.info("set config %s=%s", name, value)

    def status(self) -> agent_pb.LocalStatus:
        st = self.session.status() if self._session is not None else None
        out = agent_pb.LocalStatus(
            computer=self.computer,
            server=self.config.server,
            enforcer=self.enforcer.describe(),
            enforces=self.enforcer.enforces,
            capabilities=self.enforcer.capabilities(),
            applied_source=self.enforced_source,
            policy_name=self.enforced.policy.name if self.enforced is not None else "",
        )
        if st is None:
            out.connection = "starting"
            return out
        out.connection = st.state.value
        out.connection_since_unix_ms = st.state_since_unix_ms
        out.last_error = st.last_error
        out.next_retry_unix_ms = st.next_retry_unix_ms
        out.applied_version = st.applied_version
        out.running_on_cache = st.running_on_cache
        out.cache_since_unix_ms = st.cache_since_unix_ms
        out.last_nack_version = st.last_nack_version
        out.last_nack_reason = st.last_nack_reason
        out.summary = summary_line(out)
        if self.persistent_error:
            out.summary += f"; persistent policy not applied: {self.persistent_error}"
        return out

    # ------------------------------------------------------------------ local API

    async def _start_local_api(self) -> None:
        local, persistent = self.local_store, self.persistent_store
        assert local is not None and persistent is not None

        def register_local(server: aio.Server) -> None:
            agent_grpc.add_AgentLocalServicer_to_server(self.local_api, server)
            add_admin_to_server(PolicyAdminServicer(local, self._store_executor), server)

        def register_persistent(server: aio.Server) -> None:
            add_admin_to_server(PolicyAdminServicer(persistent, self._store_executor), server)

        self._local_server = await _serve_unix(self.state_dir / SOCKET_FILE, register_local)
        self._persistent_server = await _serve_unix(self.state_dir / PERSISTENT_SOCKET_FILE, register_persistent)


def summary_line(status: agent_pb.LocalStatus) -> str:
    """One line for humans and logs."""
    parts = []
    if status.running_on_cache:
        parts.append(f"running on cached policy since {_iso(status.cache_since_unix_ms)}")
    elif status.applied_version:
        parts.append(f"applied version {status.applied_version[:12]}")
    else:
        parts.append("no policy applied")
    in_force = status.applied_source.split("+")
    if "local" in in_force:
        parts.append("the local store's policy is in force (the domain assigns none)")
    if "persistent" in in_force:
        others = [p for p in in_force if p != "persistent"]
        extra = f" in addition to the {others[0]} policy" if others else ""
        parts.append(f"the persistent store's policy is in force{extra}")
    parts.append(f"server {status.server}: {status.connection}")
    if status.last_error and status.connection in ("backoff", "polling", "connecting"):
        parts.append(status.last_error)
    if status.last_nack_reason:
        parts.append(f"rejected {status.last_nack_version[:12]}: {status.last_nack_reason}")
    parts.append(status.enforcer)
    return "; ".join(parts)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _rpc_reason(exc: BaseException) -> str:
    if isinstance(exc, aio.AioRpcError):
        return f"{exc.code().name}: {exc.details() or ''}".strip()
    if isinstance(exc, grpc.RpcError):
        return str(exc)
    return type(exc).__name__


async def _serve_unix(path: Path, register: Callable[[aio.Server], None]) -> aio.Server:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = aio.server(options=[*GRPC_MESSAGE_OPTIONS])
    register(server)
    old_umask = os.umask(0o177)  # the socket is born 0600
    try:
        server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    await server.start()
    return server


def mask_dynamic(state: agent_pb.DynamicState) -> agent_pb.DynamicState:
    """Dynamic state as read APIs show it: pre-shared keys masked."""
    out = agent_pb.DynamicState()
    out.CopyFrom(state)
    for rule in out.rules:
        for method in rule.auth_methods:
            if method.HasField("preshared_key"):
                method.preshared_key.key = "********"
    return out


class AgentLocalServicer(agent_grpc.AgentLocalServicer):
    def __init__(self, daemon: AgentDaemon) -> None:
        self._daemon = daemon

    async def GetStatus(
        self, request: agent_pb.LocalStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.LocalStatus:
        return self._daemon.status()

    async def GetEffectivePolicy(
        self, request: agent_pb.LocalPolicyRequest, context: aio.ServicerContext[Any, Any]
    ) -> dist_pb.EffectivePolicy:
        enforced = self._daemon.enforced
        if enforced is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no policy is applied on this computer")
            raise AssertionError("unreachable")
        out = dist_pb.EffectivePolicy()
        out.CopyFrom(enforced)
        if not request.include_secrets and out.HasField("policy"):
            masked = mask_secrets(out.policy)
            assert isinstance(masked, pb.Policy)
            out.policy.CopyFrom(masked)
        return out

    async def GetStatistics(
        self, request: agent_pb.StatisticsRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.IpsecStatistics:
        loop = asyncio.get_running_loop()
        stats = await loop.run_in_executor(None, self._daemon.enforcer.statistics)
        if not stats.policy_name and self._daemon.enforced is not None:
            stats.policy_name = self._daemon.enforced.policy.name
        return stats

    async def ListSecurityAssociations(
        self, request: agent_pb.SecurityAssociationsRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.SecurityAssociations:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self._daemon.enforcer.security_associations)
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the security associations: {exc}")
            raise AssertionError("unreachable") from None

    async def ListFilters(
        self, request: agent_pb.FiltersRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.Filters:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._daemon.enforcer.filters_in_force)

    async def GetConfig(
        self, request: agent_pb.ConfigRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.AgentConfigValues:
        return self._daemon.config_values()

    async def SetConfig(
        self, request: agent_pb.SetConfigRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.AgentConfigValues:
        from policyagent.agent.enforce.dynconfig import ConfigError

        try:
            await self._daemon.set_config(request.name, request.value)
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._daemon.config_values()

    async def GetDynamic(
        self, request: agent_pb.DynamicRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.DynamicState:
        return mask_dynamic(self._daemon.dynamic.state)

    async def EditDynamic(
        self, request: agent_pb.DynamicEdit, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.DynamicState:
        from policyagent.agent.enforce.dynamic import DynamicError

        try:
            state = await self._daemon.edit_dynamic(request)
        except DynamicError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from None
        except EnforceError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot be enforced here: {exc}")
            raise AssertionError("unreachable") from None
        return mask_dynamic(state)

    async def ListAuditEvents(
        self, request: agent_pb.AuditEventsRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb.AuditEvents:
        ids = set(request.ids) or None
        events = self._daemon.enforcer.audit_events(request.since_unix_ms, ids, request.limit or 1000)
        for event in events:
            event.computer = self._daemon.computer
        return agent_pb.AuditEvents(events=events)


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Run the agent until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    daemon = AgentDaemon(config)
    await daemon.start()
    print(f"agent socket {config.state_dir / SOCKET_FILE}", flush=True)
    try:
        main = asyncio.ensure_future(daemon.wait())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if main in done:
            main.result()  # a crash of the loop is an error of the process
    finally:
        await daemon.stop()
