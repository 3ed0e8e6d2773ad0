"""The agent's session with the policy server, sans-I/O (DESIGN §4–5, STYLE 1 and 7).

`Session` holds no sockets, tasks or clocks of its own. The daemon (agent/daemon.py)
feeds it events — the stream opened, a message arrived, the stream closed, an apply
finished, a Fetch answered — and carries out the actions it returns: open or close
the stream, send a message on it, report over the unary `Report` call, fetch, apply a
policy, write the cache. Time comes from the injected clocks; timers are deadlines
the session keeps and the daemon waits for (`next_deadline()` / `handle_timers(now)`),
as aioquic does. The jitter of the reconnect backoff comes from an injected RNG.

The protocol (xDS-like, distribution.proto): on every new stream the agent sends
Hello{applied version, running on cache}; the server answers with the effective
policy, or with `unchanged` when the agent already has it; the agent answers every
push with Ack{version, nonce} or Nack{version, nonce, reason}. While the stream is
down the agent reconnects with jittered exponential backoff and polls with Fetch at
the policy's polling interval.

The transition table `TRANSITIONS` is the whole state machine; an event a state does
not accept raises `TransitionError` naming both.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from policyagent.pb import dist_pb

DEFAULT_POLLING_MINUTES = 180  # Windows' default polling interval (DESIGN §3)


class State(enum.Enum):
    DISCONNECTED = "disconnected"  # not started
    CONNECTING = "connecting"  # opening the stream
    SYNCING = "syncing"  # stream open: Hello sent, or a push being applied
    IN_SYNC = "in sync"  # the server has this agent's answer to its latest push
    BACKOFF = "backoff"  # stream down: waiting to reconnect (and to poll)
    POLLING = "polling"  # stream down: a Fetch is in flight
    STOPPED = "stopped"


CONNECTED = frozenset({State.SYNCING, State.IN_SYNC})


class Timer(enum.Enum):
    HEARTBEAT = "heartbeat"  # send a Heartbeat on the open stream
    SILENCE = "silence"  # nothing from the server for too long: drop the stream
    RECONNECT = "reconnect"  # backoff elapsed: open a new stream
    POLL = "poll"  # polling interval elapsed while the stream is down: Fetch


class Origin(enum.Enum):
    """Where a policy being applied came from; decides how the answer travels."""

    CACHE = "cache"  # the on-disk cache at start: no answer, marks running on cache
    STREAM = "stream"  # a push: Ack/Nack on the stream (or Report if it closed meanwhile)
    FETCH = "fetch"  # the polling fallback: Ack/Nack via Report


class TransitionError(RuntimeError):
    """An event the current state cannot accept: a bug in the daemon or the session."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"agent session in state {state.value!r} cannot handle event {event.name!r}")
        self.state = state
        self.event = event


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class Event:
    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Start(Event):
    """The daemon starts; `cached` is the policy from the on-disk cache, if any."""

    cached: dist_pb.EffectivePolicy | None = None


@dataclass(frozen=True)
class Connected(Event):
    """The stream is open."""


@dataclass(frozen=True)
class ConnectFailed(Event):
    reason: str


@dataclass(frozen=True)
class Received(Event):
    message: dist_pb.ServerMessage


@dataclass(frozen=True)
class StreamClosed(Event):
    reason: str


@dataclass(frozen=True)
class TimerFired(Event):
    timer: Timer

    @property
    def name(self) -> str:
        return f"TimerFired({self.timer.value})"


@dataclass(frozen=True)
class Applied(Event):
    """The enforcer finished applying `version`; `error` is "" on success, else the NACK reason."""

    version: str
    error: str = ""


@dataclass(frozen=True)
class Fetched(Event):
    policy: dist_pb.EffectivePolicy


@dataclass(frozen=True)
class FetchFailed(Event):
    reason: str


@dataclass(frozen=True)
class Stop(Event):
    pass


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Action:
    pass


@dataclass(frozen=True)
class Connect(Action):
    """Open the stream; answer with Connected or ConnectFailed."""


@dataclass(frozen=True)
class CloseStream(Action):
    reason: str


@dataclass(frozen=True)
class Send(Action):
    """Write a message on the open stream."""

    message: dist_pb.AgentMessage


@dataclass(frozen=True)
class Report(Action):
    """Send a message with the unary Report call (the stream is down)."""

    message: dist_pb.AgentMessage


@dataclass(frozen=True)
class Fetch(Action):
    """Call Fetch(known_version); answer with Fetched or FetchFailed."""

    known_version: str


@dataclass(frozen=True)
class Apply(Action):
    """Hand the policy to the enforcer; answer with Applied(version, error)."""

    policy: dist_pb.EffectivePolicy
    origin: Origin


@dataclass(frozen=True)
class WriteCache(Action):
    """Store the policy as the last good one (atomic write, 0600)."""

    policy: dist_pb.EffectivePolicy


# ------------------------------------------------------------------ config and status


@dataclass(frozen=True)
class SessionConfig:
    computer: str
    capabilities: dist_pb.Capabilities = field(default_factory=dist_pb.Capabilities)
    agent_version: str = ""
    heartbeat_s: float = 30.0
    # No message at all (pushes, KeepAlives) for this long: the stream is dead.
    silence_s: float = 90.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    # None: the applied policy's polling interval (180 min when nothing is applied).
    poll_interval_s: float | None = None


@dataclass(frozen=True)
class Status:
    """What the local status API and the logs show."""

    state: State
    state_since_unix_ms: int
    last_error: str
    next_retry_unix_ms: int
    applied_version: str
    running_on_cache: bool
    cache_since_unix_ms: int
    last_nack_version: str
    last_nack_reason: str


@dataclass
class _Work:
    policy: dist_pb.EffectivePolicy
    origin: Origin
    nonce: str


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# ------------------------------------------------------------------ the session


class Session:
    """The agent side of the distribution protocol, as a state machine without I/O.

    `clock` gives seconds on a monotonic scale (timers); `wall` gives Unix seconds (the
    times the agent reports); `rng` supplies the backoff jitter.
    """

    def __init__(
        self,
        config: SessionConfig,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall
        self._rng = rng
        self.state = State.DISCONNECTED
        self._state_since = wall()
        self._timers: dict[Timer, float] = {}
        self._attempt = 0
        self._reconnect_due = False
        self.last_error = ""
        self.applied: dist_pb.EffectivePolicy | None = None
        self.running_on_cache = False
        self.cache_since_unix_ms = 0
        self.last_nack_version = ""
        self.last_nack_reason = ""
        self._applying: _Work | None = None
        self._pending: _Work | None = None

    # -------------------------------------------------------------- public API

    @property
    def applied_version(self) -> str:
        return self.applied.version if self.applied is not None else ""

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; returns what the daemon must do, in order."""
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None and isinstance(event, TimerFired):
            handler = TRANSITIONS.get((self.state, event.timer))
        if handler is None:
            raise TransitionError(self.state, event)
        return handler(self, event)

    def next_deadline(self) -> float | None:
        """When the earliest armed timer is due (on the `clock` scale), or None."""
        return min(self._timers.values(), default=None)

    def handle_timers(self, now: float | None = None) -> list[Action]:
        """Fire every timer due at `now` (default: the clock), earliest first."""
        now = self._clock() if now is None else now
        actions: list[Action] = []
        while True:
            due = sorted((deadline, timer.value, timer) for timer, deadline in self._timers.items() if deadline <= now)
            if not due:
                return actions
            timer = due[0][2]
            del self._timers[timer]
            actions += self.handle(TimerFired(timer))

    def status(self) -> Status:
        retry = self._timers.get(Timer.RECONNECT)
        next_retry = _ms(self._wall() + (retry - self._clock())) if retry is not None else 0
        return Status(
            state=self.state,
            state_since_unix_ms=_ms(self._state_since),
            last_error=self.last_error,
            next_retry_unix_ms=next_retry,
            applied_version=self.applied_version,
            running_on_cache=self.running_on_cache,
            cache_since_unix_ms=self.cache_since_unix_ms,
            last_nack_version=self.last_nack_version,
            last_nack_reason=self.last_nack_reason,
        )

    def hello(self) -> dist_pb.AgentMessage:
        return dist_pb.AgentMessage(
            hello=dist_pb.Hello(
                computer=self.config.computer,
                capabilities=self.config.capabilities,
                applied_version=self.applied_version,
                running_on_cache=self.running_on_cache,
                cache_since_unix_ms=self.cache_since_unix_ms,
                agent_version=self.config.agent_version,
            )
        )

    def heartbeat(self) -> dist_pb.AgentMessage:
        return dist_pb.AgentMessage(
            heartbeat=dist_pb.Heartbeat(
                applied_version=self.applied_version,
                running_on_cache=self.running_on_cache,
                cache_since_unix_ms=self.cache_since_unix_ms,
            )
        )

    # -------------------------------------------------------------- helpers

    def _enter(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self._state_since = self._wall()

    def _arm(self, timer: Timer, delay: float) -> None:
        self._timers[timer] = self._clock() + delay

    def _disarm(self, *timers: Timer) -> None:
        for timer in timers:
            self._timers.pop(timer, None)

    def backoff_delay(self) -> float:
        """Equal-jitter exponential backoff: half the capped step plus up to half again at random."""
        step = min(self.config.backoff_max_s, self.config.backoff_base_s * float(2 ** min(self._attempt, 30)))
        return step / 2 + self._rng.uniform(0, step / 2)

    def poll_interval(self) -> float:
        if self.config.poll_interval_s is not None:
            return self.config.poll_interval_s
        minutes = self.applied.policy.polling_interval_minutes if self.applied is not None else 0
        return 60.0 * float(minutes or DEFAULT_POLLING_MINUTES)

    def _go_down(self, reason: str) -> list[Action]:
        """The stream is gone: back off, and poll at the polling interval meanwhile."""
        self.last_error = reason
        self._disarm(Timer.HEARTBEAT, Timer.SILENCE)
        self._arm(Timer.RECONNECT, self.backoff_delay())
        self._attempt += 1
        if Timer.POLL not in self._timers:
            self._arm(Timer.POLL, self.poll_interval())
        self._enter(State.BACKOFF)
        return []

    def _answer(self, work: _Work, error: str) -> dist_pb.AgentMessage:
        version = work.policy.version
        if error:
            return dist_pb.AgentMessage(nack=dist_pb.Nack(version=version, nonce=work.nonce, reason=error))
        return dist_pb.AgentMessage(ack=dist_pb.Ack(version=version, nonce=work.nonce))

    def _deliver(self, message: dist_pb.AgentMessage) -> Action:
        # On the stream if it is open; otherwise over Report, so the server hears it anyway.
        return Send(message) if self.state in CONNECTED else Report(message)

    def _offer(self, policy: dist_pb.EffectivePolicy, origin: Origin) -> list[Action]:
        """A policy from the server (stream or fetch): answer at once if it is what we run, else apply."""
        work = _Work(policy, origin, policy.nonce)
        if self._applying is not None:
            if self._applying.policy.version == policy.version:
                self._applying.nonce, self._applying.origin = policy.nonce, origin  # answer the latest push
                self._pending = None
            else:
                self._pending = work  # only the newest waiting push matters
            return []
        if policy.unchanged or policy.version == self.applied_version:
            # Re-applying identical content is a no-op: confirm it.
            self.running_on_cache = False
            self.cache_since_unix_ms = 0
            if self.state in CONNECTED:
                self._enter(State.IN_SYNC)
            return [self._deliver(self._answer(work, ""))]
        self._applying = work
        if self.state in CONNECTED:
            self._enter(State.SYNCING)
        return [Apply(policy, origin)]

    # -------------------------------------------------------------- handlers

    def _on_start(self, event: Start) -> list[Action]:
        actions: list[Action] = []
        if event.cached is not None and event.cached.version:
            self._applying = _Work(event.cached, Origin.CACHE, "")
            actions.append(Apply(event.cached, Origin.CACHE))
        self._enter(State.CONNECTING)
        actions.append(Connect())
        return actions

    def _on_connected(self, event: Connected) -> list[Action]:
        self._enter(State.SYNCING)
        self._arm(Timer.HEARTBEAT, self.config.heartbeat_s)
        self._arm(Timer.SILENCE, self.config.silence_s)
        return [Send(self.hello())]

    def _on_connect_failed(self, event: ConnectFailed | StreamClosed) -> list[Action]:
        return self._go_down(event.reason)

    def _on_stream_closed(self, event: StreamClosed) -> list[Action]:
        return self._go_down(event.reason)

    def _on_received(self, event: Received) -> list[Action]:
        self._arm(Timer.SILENCE, self.config.silence_s)
        # The server answered on this stream: it accepts us, so the next outage starts
        # its backoff from the beginning again.
        self._attempt = 0
        self._disarm(Timer.POLL)
        self.last_error = ""
        kind = event.message.WhichOneof("msg")
        if kind == "keepalive":
            return []
        if kind != "policy":
            return self._protocol_error("an empty server message")
        policy = event.message.policy
        if not policy.version:
            return self._protocol_error("a policy without a version")
        if policy.unchanged and policy.version != self.applied_version and (
            self._applying is None or self._applying.policy.version != policy.version
        ):
            return self._protocol_error(
                f"'unchanged' for version {policy.version} while this agent has {self.applied_version or 'none'}"
            )
        return self._offer(policy, Origin.STREAM)

    def _protocol_error(self, what: str) -> list[Action]:
        reason = f"protocol error: the server sent {what}"
        return [CloseStream(reason), *self._go_down(reason)]

    def _on_heartbeat_timer(self, event: TimerFired) -> list[Action]:
        self._arm(Timer.HEARTBEAT, self.config.heartbeat_s)
        return [Send(self.heartbeat())]

    def _on_silence_timer(self, event: TimerFired) -> list[Action]:
        reason = f"no message from the server for {self.config.silence_s:g} s"
        return [CloseStream(reason), *self._go_down(reason)]

    def _on_reconnect_timer(self, event: TimerFired) -> list[Action]:
        self._enter(State.CONNECTING)
        return [Connect()]

    def _on_reconnect_while_polling(self, event: TimerFired) -> list[Action]:
        self._reconnect_due = True  # reconnect once the Fetch has answered
        return []

    def _on_poll_timer(self, event: TimerFired) -> list[Action]:
        self._enter(State.POLLING)
        return [Fetch(self.applied_version)]

    def _after_poll(self) -> list[Action]:
        self._arm(Timer.POLL, self.poll_interval())
        if self._reconnect_due:
            self._reconnect_due = False
            self._enter(State.CONNECTING)
            return [Connect()]
        self._enter(State.BACKOFF)
        return []

    def _on_fetched(self, event: Fetched) -> list[Action]:
        actions = self._after_poll()  # leaves POLLING first, so answers go over Report
        if event.policy.unchanged and event.policy.version == self.applied_version:
            # The server confirms what we run; report it so the fleet view sees us.
            self.running_on_cache = False
            self.cache_since_unix_ms = 0
            return [Report(self.heartbeat()), *actions]
        return [*self._offer(event.policy, Origin.FETCH), *actions]

    def _on_fetch_failed(self, event: FetchFailed) -> list[Action]:
        self.last_error = event.reason
        return self._after_poll()

    def _on_applied(self, event: Applied) -> list[Action]:
        work = self._applying
        if work is None or work.policy.version != event.version:
            expected = work.policy.version if work is not None else "nothing"
            raise RuntimeError(
                f"agent session in state {self.state.value!r}: apply result for version "
                f"{event.version!r}, but it was applying {expected}"
            )
        self._applying = None
        actions: list[Action] = []
        if event.error:
            self.last_nack_version, self.last_nack_reason = work.policy.version, event.error
        else:
            self.applied = work.policy
            if work.origin is Origin.CACHE:
                self.running_on_cache = True
                self.cache_since_unix_ms = _ms(self._wall())
            else:
                self.running_on_cache = False
                self.cache_since_unix_ms = 0
                actions.append(WriteCache(work.policy))
        if work.origin is not Origin.CACHE:
            actions.append(self._deliver(self._answer(work, event.error)))
        if self.state is State.SYNCING and work.origin is not Origin.CACHE:
            self._enter(State.IN_SYNC)
        pending, self._pending = self._pending, None
        if pending is not None:
            actions += self._offer(pending.policy, pending.origin)
        return actions

    def _on_applied_when_stopped(self, event: Applied) -> list[Action]:
        return []  # the daemon is shutting down; nothing to answer

    def _on_stop(self, event: Stop) -> list[Action]:
        was_connected = self.state in CONNECTED or self.state is State.CONNECTING
        self._timers.clear()
        self._enter(State.STOPPED)
        return [CloseStream("agent stopping")] if was_connected else []


# Handlers take their own event type; the table guarantees the match.
Handler = Callable[[Session, Any], list[Action]]

# The state machine as data: (state, event type or timer) → handler. Anything missing is
# an impossible transition and raises TransitionError.
TRANSITIONS: dict[tuple[State, type[Event] | Timer], Handler] = {
    (State.DISCONNECTED, Start): Session._on_start,
    (State.CONNECTING, Connected): Session._on_connected,
    (State.CONNECTING, ConnectFailed): Session._on_connect_failed,
    (State.CONNECTING, StreamClosed): Session._on_stream_closed,
    (State.SYNCING, Received): Session._on_received,
    (State.IN_SYNC, Received): Session._on_received,
    (State.SYNCING, StreamClosed): Session._on_stream_closed,
    (State.IN_SYNC, StreamClosed): Session._on_stream_closed,
    (State.SYNCING, Timer.HEARTBEAT): Session._on_heartbeat_timer,
    (State.IN_SYNC, Timer.HEARTBEAT): Session._on_heartbeat_timer,
    (State.SYNCING, Timer.SILENCE): Session._on_silence_timer,
    (State.IN_SYNC, Timer.SILENCE): Session._on_silence_timer,
    (State.BACKOFF, Timer.RECONNECT): Session._on_reconnect_timer,
    (State.BACKOFF, Timer.POLL): Session._on_poll_timer,
    (State.POLLING, Timer.RECONNECT): Session._on_reconnect_while_polling,
    (State.POLLING, Fetched): Session._on_fetched,
    (State.POLLING, FetchFailed): Session._on_fetch_failed,
    **{(state, Applied): Session._on_applied for state in State if state is not State.STOPPED},
    (State.STOPPED, Applied): Session._on_applied_when_stopped,
    **{(state, Stop): Session._on_stop for state in State if state is not State.STOPPED},
}
