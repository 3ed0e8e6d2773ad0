"""The agent's sans-I/O session: two in-memory peers (agent session, fake server) and a fake clock."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from policyagent.agent import session as s
from policyagent.pb import dist_pb, pb


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def policy(version: str, polling_minutes: int = 0) -> dist_pb.EffectivePolicy:
    return dist_pb.EffectivePolicy(
        version=version,
        computer="pc1",
        source="domain",
        policy=pb.Policy(name=f"P{version}", polling_interval_minutes=polling_minutes),
    )


@dataclass
class FakeServer:
    """The server's side of the protocol, in memory: the current policy per computer, nonces, answers."""

    current: dist_pb.EffectivePolicy = field(default_factory=lambda: policy("v1"))
    up: bool = True
    nonce_seq: int = 0
    sent: list[dist_pb.ServerMessage] = field(default_factory=list)
    acks: list[tuple[str, str]] = field(default_factory=list)
    nacks: list[tuple[str, str, str]] = field(default_factory=list)
    reports: list[dist_pb.AgentMessage] = field(default_factory=list)
    hellos: list[dist_pb.Hello] = field(default_factory=list)
    heartbeats: int = 0
    nonces: set[str] = field(default_factory=set)

    def _nonce(self) -> str:
        self.nonce_seq += 1
        nonce = f"n{self.nonce_seq}"
        self.nonces.add(nonce)
        return nonce

    def receive(self, message: dist_pb.AgentMessage) -> list[dist_pb.ServerMessage]:
        kind = message.WhichOneof("msg")
        if kind == "hello":
            self.hellos.append(message.hello)
            return [self.push(confirm=message.hello.applied_version == self.current.version)]
        if kind == "ack":
            assert message.ack.nonce in self.nonces
            self.acks.append((message.ack.version, message.ack.nonce))
        elif kind == "nack":
            self.nacks.append((message.nack.version, message.nack.nonce, message.nack.reason))
        elif kind == "heartbeat":
            self.heartbeats += 1
        return []

    def push(self, confirm: bool = False) -> dist_pb.ServerMessage:
        out = dist_pb.EffectivePolicy()
        if confirm:
            out.version, out.unchanged = self.current.version, True
        else:
            out.CopyFrom(self.current)
        out.nonce = self._nonce()
        self.sent.append(dist_pb.ServerMessage(policy=out))
        return self.sent[-1]

    def fetch(self, known: str) -> dist_pb.EffectivePolicy:
        out = dist_pb.EffectivePolicy()
        if known == self.current.version:
            out.version, out.unchanged = known, True
        else:
            out.CopyFrom(self.current)
        out.nonce = self._nonce()
        return out


class Harness:
    """Runs a Session against a FakeServer, carrying out its actions like the daemon does."""

    def __init__(self, *, reject: dict[str, str] | None = None, manual_apply: bool = False, **config: object) -> None:
        self.clock = FakeClock()
        self.wall = FakeClock()
        self.server = FakeServer()
        cfg = s.SessionConfig(computer="pc1", heartbeat_s=30, silence_s=90, backoff_base_s=1, backoff_max_s=60)
        for key, value in config.items():
            cfg = s.SessionConfig(**{**cfg.__dict__, key: value})
        self.session = s.Session(cfg, clock=self.clock, wall=self.wall, rng=random.Random(7))
        self.reject = reject or {}
        self.manual_apply = manual_apply
        self.applied: list[tuple[str, s.Origin]] = []
        self.cache: list[str] = []
        self.pending_apply: list[str] = []
        self.closed: list[str] = []
        self.connects = 0
        self.fetches = 0
        self.stream_open = False

    def feed(self, event: s.Event) -> None:
        self.run(self.session.handle(event))

    def run(self, actions: list[s.Action]) -> None:
        for action in actions:
            if isinstance(action, s.Connect):
                self.connects += 1
                if self.server.up:
                    self.stream_open = True
                    self.feed(s.Connected())
                else:
                    self.feed(s.ConnectFailed("connection refused"))
            elif isinstance(action, s.Send):
                assert self.stream_open, "sent on a closed stream"
                for reply in self.server.receive(action.message):
                    self.feed(s.Received(reply))
            elif isinstance(action, s.Report):
                self.server.reports.append(action.message)
                self.server.receive(action.message)
            elif isinstance(action, s.Apply):
                self.applied.append((action.policy.version, action.origin))
                if self.manual_apply:
                    self.pending_apply.append(action.policy.version)
                else:
                    self.feed(s.Applied(action.policy.version, self.reject.get(action.policy.version, "")))
            elif isinstance(action, s.WriteCache):
                self.cache.append(action.policy.version)
            elif isinstance(action, s.CloseStream):
                self.stream_open = False
                self.closed.append(action.reason)
            elif isinstance(action, s.Fetch):
                self.fetches += 1
                if self.server.up:
                    self.feed(s.Fetched(self.server.fetch(action.known_version)))
                else:
                    self.feed(s.FetchFailed("unavailable"))
            else:  # pragma: no cover
                raise AssertionError(action)

    def advance(self, seconds: float) -> None:
        target = self.clock.t + seconds
        while True:
            deadline = self.session.next_deadline()
            if deadline is None or deadline > target:
                break
            self.clock.t = self.wall.t = max(self.clock.t, deadline)
            self.run(self.session.handle_timers())
        self.clock.t = self.wall.t = target

    def server_push(self, version: str) -> None:
        self.server.current = policy(version)
        assert self.stream_open
        self.feed(s.Received(self.server.push()))

    def server_dies(self) -> None:
        self.server.up = False
        if self.stream_open:
            self.stream_open = False
            self.feed(s.StreamClosed("unavailable: server went away"))


def test_fresh_agent_connects_applies_acks_and_caches() -> None:
    h = Harness()
    h.feed(s.Start())
    assert h.session.state is s.State.IN_SYNC
    assert h.server.hellos[0].applied_version == ""
    assert h.applied == [("v1", s.Origin.STREAM)]
    assert h.server.acks == [("v1", "n1")]
    assert h.cache == ["v1"]
    assert h.session.applied_version == "v1"


def test_push_applies_new_version_with_its_nonce() -> None:
    h = Harness()
    h.feed(s.Start())
    h.server_push("v2")
    assert h.server.acks[-1] == ("v2", "n2")
    assert h.cache == ["v1", "v2"]
    assert h.session.state is s.State.IN_SYNC


def test_same_version_pushed_again_is_acked_without_reapplying() -> None:
    h = Harness()
    h.feed(s.Start())
    h.feed(s.Received(h.server.push()))
    assert [v for v, _ in h.applied] == ["v1"]
    assert h.server.acks[-1] == ("v1", "n2")


def test_rejected_policy_is_nacked_with_reason_and_old_version_kept() -> None:
    h = Harness(reject={"v2": "Kerberos needs domain membership; this computer is a workgroup member"})
    h.feed(s.Start())
    h.server_push("v2")
    assert h.server.nacks == [("v2", "n2", "Kerberos needs domain membership; this computer is a workgroup member")]
    assert h.session.applied_version == "v1"
    assert h.cache == ["v1"]
    st = h.session.status()
    assert (st.last_nack_version, st.state) == ("v2", s.State.IN_SYNC)
    assert "workgroup" in st.last_nack_reason


def test_heartbeats_on_the_open_stream() -> None:
    h = Harness()
    h.feed(s.Start())
    h.advance(95)
    assert h.server.heartbeats == 3


def test_silent_server_is_dropped_and_reconnected() -> None:
    h = Harness(silence_s=50, heartbeat_s=1000)
    h.feed(s.Start())
    h.advance(51)
    assert "no message from the server" in h.closed[0]
    # The server is still up: the backoff (first step ≤ 1 s) reconnects and re-syncs.
    assert h.session.state is s.State.IN_SYNC
    assert h.connects == 2
    assert h.server.hellos[-1].applied_version == "v1"
    assert h.server.sent[-1].policy.unchanged


def test_keepalive_resets_the_silence_timer() -> None:
    h = Harness(silence_s=50, heartbeat_s=1000)
    h.feed(s.Start())
    for _ in range(5):
        h.advance(40)
        h.feed(s.Received(dist_pb.ServerMessage(keepalive=dist_pb.KeepAlive(server_time_unix_ms=1))))
    assert h.closed == []
    assert h.connects == 1


def test_reconnect_backoff_is_exponential_jittered_and_capped() -> None:
    h = Harness(backoff_base_s=1, backoff_max_s=16)
    h.server.up = False
    h.feed(s.Start())
    delays = []
    for _ in range(8):
        assert h.session.state is s.State.BACKOFF
        deadline = h.session._timers[s.Timer.RECONNECT]
        delays.append(deadline - h.clock.t)
        h.clock.t = h.wall.t = deadline
        h.run(h.session.handle_timers())
    steps = [min(16, 2**i) for i in range(8)]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step
    assert len(set(delays)) == len(delays)  # jittered
    assert h.connects == 9


def test_backoff_jitter_comes_from_the_injected_rng() -> None:
    a, b = Harness(), Harness()
    for h in (a, b):
        h.server.up = False
        h.feed(s.Start())
    assert a.session._timers == b.session._timers


def test_backoff_resets_after_the_server_answers() -> None:
    h = Harness(backoff_base_s=1, backoff_max_s=64)
    h.server.up = False
    h.feed(s.Start())
    h.advance(40)  # several failed attempts
    assert h.session._attempt >= 3
    h.server.up = True
    h.advance(64)
    assert h.session.state is s.State.IN_SYNC
    assert h.session._attempt == 0


def test_cached_policy_applied_at_start_and_reported_as_running_on_cache() -> None:
    h = Harness()
    h.server.up = False
    h.wall.t = 5000.0
    h.feed(s.Start(cached=policy("v1")))
    assert h.applied == [("v1", s.Origin.CACHE)]
    assert h.cache == []  # the cache is not rewritten with itself
    st = h.session.status()
    assert st.running_on_cache and st.cache_since_unix_ms == 5_000_000
    assert st.state is s.State.BACKOFF
    # Server back with the same version: Hello says running on cache, the server confirms, cache flag clears.
    h.server.up = True
    h.advance(2)
    assert h.server.hellos[-1].running_on_cache
    assert h.server.hellos[-1].applied_version == "v1"
    assert h.server.sent[-1].policy.unchanged
    assert h.server.acks[-1][0] == "v1"
    assert not h.session.status().running_on_cache
    assert [v for v, _ in h.applied] == ["v1"]


def test_cached_policy_then_server_has_newer_version() -> None:
    h = Harness()
    h.server.current = policy("v9")
    h.feed(s.Start(cached=policy("v1")))
    assert [v for v, _ in h.applied] == ["v1", "v9"]
    assert h.server.acks[-1][0] == "v9"
    assert h.session.applied_version == "v9"
    assert not h.session.running_on_cache


def test_server_down_agent_keeps_policy_and_polls_at_policy_interval() -> None:
    h = Harness(backoff_max_s=600)
    h.server.current = policy("v1", polling_minutes=10)
    h.feed(s.Start())
    h.server_dies()
    assert h.session.applied_version == "v1"  # nothing is torn down
    h.advance(599)
    assert h.fetches == 0
    h.advance(2)
    assert h.fetches == 1
    h.advance(600)
    assert h.fetches == 2
    assert h.session.state is s.State.BACKOFF


def test_poll_fetches_new_policy_and_reports_the_answer() -> None:
    h = Harness(poll_interval_s=60, backoff_max_s=10_000, backoff_base_s=10_000)
    h.feed(s.Start())
    h.stream_open = False
    h.feed(s.StreamClosed("stream reset"))
    h.server.current = policy("v2")
    h.advance(61)
    assert h.fetches == 1
    assert [v for v, _ in h.applied] == ["v1", "v2"]
    reported = h.server.reports[-1]
    assert reported.WhichOneof("msg") == "ack" and reported.ack.version == "v2"
    assert h.session.state is s.State.BACKOFF
    # An unchanged poll is reported as a heartbeat.
    h.advance(60)
    assert h.server.reports[-1].WhichOneof("msg") == "heartbeat"


def test_reconnect_due_during_poll_connects_after_fetch() -> None:
    h = Harness(poll_interval_s=5, backoff_base_s=100, backoff_max_s=100)
    h.server.up = False
    h.feed(s.Start())
    h.advance(5)  # poll fires first
    assert h.fetches == 1
    # Simulate a slow fetch: enter POLLING by hand and fire the reconnect timer meanwhile.
    h.session._timers.clear()
    h.session.state = s.State.POLLING
    assert h.session.handle(s.TimerFired(s.Timer.RECONNECT)) == []
    h.server.up = True
    h.feed(s.Fetched(h.server.fetch("")))
    assert h.connects >= 2
    assert h.session.state is s.State.IN_SYNC


def test_push_while_applying_keeps_only_newest() -> None:
    h = Harness(manual_apply=True)
    h.feed(s.Start())
    assert h.pending_apply == ["v1"]
    h.server_push("v2")
    h.server_push("v3")
    assert h.session.state is s.State.SYNCING
    h.feed(s.Applied("v1"))
    assert h.server.acks[-1][0] == "v1"
    assert h.pending_apply[-1] == "v3"  # v2 was superseded, never applied
    h.feed(s.Applied("v3"))
    assert [a[0] for a in h.server.acks] == ["v1", "v3"]
    assert h.session.state is s.State.IN_SYNC


def test_repush_of_version_being_applied_answers_latest_nonce() -> None:
    h = Harness(manual_apply=True)
    h.feed(s.Start())
    h.feed(s.Received(h.server.push()))  # same v1, new nonce n2
    h.feed(s.Applied("v1"))
    assert h.server.acks == [("v1", "n2")]


def test_apply_finishing_after_stream_closed_is_reported() -> None:
    h = Harness(manual_apply=True)
    h.feed(s.Start())
    h.server_dies()
    h.feed(s.Applied("v1"))
    assert h.server.reports[-1].ack.version == "v1"


def test_unchanged_for_a_version_agent_does_not_have_is_a_protocol_error() -> None:
    h = Harness()
    h.feed(s.Start())
    bad = dist_pb.ServerMessage(policy=dist_pb.EffectivePolicy(version="v7", nonce="x", unchanged=True))
    h.feed(s.Received(bad))
    assert "protocol error" in h.closed[-1]
    assert h.session.state is s.State.BACKOFF


def test_policy_without_version_is_a_protocol_error() -> None:
    h = Harness()
    h.feed(s.Start())
    h.feed(s.Received(dist_pb.ServerMessage(policy=dist_pb.EffectivePolicy(nonce="x"))))
    assert "without a version" in h.closed[-1]


def test_stop_closes_stream_and_clears_timers() -> None:
    h = Harness()
    h.feed(s.Start())
    h.feed(s.Stop())
    assert h.closed == ["agent stopping"]
    assert h.session.next_deadline() is None
    assert h.session.state is s.State.STOPPED


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (s.State.DISCONNECTED, s.Connected()),
        (s.State.BACKOFF, s.Received(dist_pb.ServerMessage())),
        (s.State.IN_SYNC, s.Start()),
        (s.State.STOPPED, s.Connected()),
        (s.State.POLLING, s.TimerFired(s.Timer.HEARTBEAT)),
        (s.State.CONNECTING, s.Fetched(dist_pb.EffectivePolicy())),
    ],
)
def test_impossible_transition_names_state_and_event(state: s.State, event: s.Event) -> None:
    h = Harness()
    h.session.state = state
    with pytest.raises(s.TransitionError) as info:
        h.session.handle(event)
    assert repr(state.value) in str(info.value)
    assert event.name in str(info.value)


def test_every_state_event_pair_is_either_in_the_table_or_refused() -> None:
    events: list[s.Event] = [
        s.Start(),
        s.Connected(),
        s.ConnectFailed("x"),
        s.Received(dist_pb.ServerMessage(keepalive=dist_pb.KeepAlive())),
        s.StreamClosed("x"),
        *[s.TimerFired(t) for t in s.Timer],
        s.Fetched(dist_pb.EffectivePolicy(version="v1", unchanged=True)),
        s.FetchFailed("x"),
        s.Stop(),
    ]
    for state in s.State:
        for event in events:
            h = Harness()
            h.session.state = state
            key = event.timer if isinstance(event, s.TimerFired) else type(event)
            if (state, key) in s.TRANSITIONS:
                h.session.handle(event)
            else:
                with pytest.raises(s.TransitionError):
                    h.session.handle(event)


def test_apply_result_for_the_wrong_version_is_refused() -> None:
    h = Harness(manual_apply=True)
    h.feed(s.Start())
    with pytest.raises(RuntimeError, match="applying v1"):
        h.session.handle(s.Applied("v2"))


def test_status_reports_next_retry_and_last_error() -> None:
    h = Harness()
    h.server.up = False
    h.wall.t = 100.0
    h.feed(s.Start())
    st = h.session.status()
    assert st.last_error == "connection refused"
    assert 100_000 < st.next_retry_unix_ms <= 101_000
