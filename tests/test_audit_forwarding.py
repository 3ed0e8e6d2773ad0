"""Audit events and statistics from the agents to the server (issue 4 items 7-8): forwarding, the cursor
that survives restarts, the server's audit store, Fleet.ListAuditEvents / GetStatistics, and the
`policyagent audit` / `policyagent fleet stats` commands. In process: hub + agent daemons from distkit,
with a fake enforcer whose statistics() and audit_events() the test controls."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from distkit import FakeEffective, HubServer, Pki, agent_config, simple_policy, state_credentials, until
from grpc import aio

from policyagent.agent.daemon import AgentDaemon
from policyagent.agent.enforce.monitor import MAIN_MODE_FIELDS, QUICK_MODE_FIELDS
from policyagent.agent.enforce.recordonly import RecordOnlyEnforcer
from policyagent.agent.forward import CURSOR_FILE, AuditCursor, summary
from policyagent.agent.session import Send
from policyagent.cli import main as cli_main
from policyagent.pb import agent_pb, dist_pb, fleet_grpc, fleet_pb
from policyagent.pki.authz import required_role
from policyagent.server.audit import AuditStore
from policyagent.server.auditcmd import parse_time
from policyagent.server.fleet import AgentRecord, FleetRegistry, fleet_statistics
from policyagent.server.hub import FLEET_SERVICE


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


def _now_ms() -> int:
    return int(time.time() * 1000)


def event(event_id: int, time_ms: int, peer: str = "10.0.0.2", **fields: str) -> agent_pb.AuditEvent:
    return agent_pb.AuditEvent(
        id=event_id,
        time_unix_ms=time_ms,
        fields={"Peer Identity": peer, "Filter": f"10.0.0.1 - {peer}", **fields},
        message=f"event {event_id} with {peer}",
    )


class FakeMonitorEnforcer(RecordOnlyEnforcer):
    """Record-only, plus an IP Security Monitor the test drives: `events` (shared across "restarts", as
    the audit file would be) and `counters`."""

    def __init__(self, state_dir: Path, events: list[agent_pb.AuditEvent], counters: dict[str, int]) -> None:
        super().__init__(state_dir)
        self.events = events
        self.counters = counters
        self.since_calls: list[int] = []

    def statistics(self) -> agent_pb.IpsecStatistics:
        out = agent_pb.IpsecStatistics(ipsec_active=True, enforcer="fake", since_unix_ms=1, time_unix_ms=_now_ms())
        for key, name in MAIN_MODE_FIELDS:
            out.main_mode.add(key=key, name=name, value=self.counters.get(key, 0))
        for key, name in QUICK_MODE_FIELDS:
            out.quick_mode.add(key=key, name=name, value=self.counters.get(key, 0))
        return out

    def audit_events(self, since_unix_ms: int, ids: set[int] | None, limit: int) -> list[agent_pb.AuditEvent]:
        self.since_calls.append(since_unix_ms)
        found = [
            e
            for e in sorted(list(self.events), key=lambda e: e.time_unix_ms)
            if e.time_unix_ms >= since_unix_ms and (ids is None or e.id in ids)
        ]
        return [agent_pb.AuditEvent.FromString(e.SerializeToString()) for e in found[:limit]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path)


def _admin_channel(address: str, cert_dir: Path) -> aio.Channel:
    return aio.secure_channel(address, state_credentials(cert_dir, "admin.crt", "admin.key"))


def _agent(pki: Pki, name: str, address: str, events: list[agent_pb.AuditEvent], counters: dict[str, int]) -> AgentDaemon:
    state = pki.dir / "agents" / name
    if not (state / "host.crt").exists():
        state, _ = pki.agent_dir(name)
    enforcer = FakeMonitorEnforcer(state, events, counters)
    return AgentDaemon(agent_config(state, address, audit_forward_s=0.1, audit_batch=2), enforcer=enforcer)


def _fake(agent: AgentDaemon) -> FakeMonitorEnforcer:
    assert isinstance(agent.enforcer, FakeMonitorEnforcer)
    return agent.enforcer


def test_events_are_forwarded_queryable_not_resent_after_restart_and_sent_after_reconnect(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1", "pc2"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        channel = _admin_channel(address, pki.admin_cert_dir())
        fleet = fleet_grpc.FleetStub(channel)
        t0 = _now_ms() - 60_000
        # Recorded before the agents start (batches of 2: several Reports); two share a millisecond.
        pc1_events = [event(541, t0), event(545, t0 + 1000, "10.0.0.3"), event(547, t0 + 1000, "10.0.0.4"), event(543, t0 + 2000)]
        pc2_events = [event(544, t0 + 500, "10.0.0.9")]
        pc1 = _agent(pki, "pc1", address, pc1_events, {})
        pc2 = _agent(pki, "pc2", address, pc2_events, {})
        await pc1.start()
        await pc2.start()
        agents = [pc1, pc2]
        try:
            assert hub.hub is not None
            await until(lambda: hub.hub.audit.received == 5, what="5 events forwarded")

            async def query(**kw: object) -> fleet_pb.FleetAuditEvents:
                return await fleet.ListAuditEvents(fleet_pb.FleetAuditRequest(**kw))  # type: ignore[arg-type]

            everything = await query()
            assert [(e.computer, e.id) for e in everything.events] == [
                ("pc1", 541), ("pc2", 544), ("pc1", 545), ("pc1", 547), ("pc1", 543)
            ]
            assert everything.events[0].fields["Peer Identity"] == "10.0.0.2" and not everything.truncated
            assert [e.id for e in (await query(computers=["pc1"], ids=[545, 547])).events] == [545, 547]
            assert [e.id for e in (await query(computers=["PC2"])).events] == [544]
            window = await query(since_unix_ms=t0 + 500, until_unix_ms=t0 + 2000)
            assert [e.id for e in window.events] == [544, 545, 547]
            newest = await query(limit=2)
            assert [e.id for e in newest.events] == [547, 543] and newest.truncated
            # The cursor is on disk: the last millisecond and what was sent at it.
            cursor = json.loads((pc1.state_dir / CURSOR_FILE).read_text())
            assert cursor["since_unix_ms"] == t0 + 2000 and len(cursor["at_since"]) == 1

            # A new event while connected goes within the forwarding interval.
            pc1_events.append(event(545, t0 + 3000, "10.0.0.5"))
            await until(lambda: hub.hub.audit.received == 6, what="new event forwarded")
            # ... and confirmed: the agent moves its cursor when Report answers (were it stopped before that,
            # it would send the event again after the restart, and the server would drop the duplicate).
            await until(lambda: pc1.audit_cursor.since_unix_ms == t0 + 3000, what="cursor moved")

            # Restart pc1: nothing already confirmed is sent again (the enforcer still has it all).
            await pc1.stop()
            pc1 = agents[0] = _agent(pki, "pc1", address, pc1_events, {})
            await pc1.start()
            await until(lambda: len(_fake(pc1).since_calls) >= 3, what="the restarted agent looked for events")
            assert _fake(pc1).since_calls[0] == t0 + 3000  # from the persisted cursor, not from 0
            assert hub.hub.audit.received == 6 and hub.hub.audit.duplicates == 0

            # Server down: events recorded meanwhile go out after the reconnect (the store survives too).
            await hub.stop()
            await until(lambda: pc1.session.state.value in ("backoff", "connecting"), what="pc1 notices")
            pc1_events.append(event(542, t0 + 4000))
            pc2_events.append(event(546, t0 + 4500, "10.0.0.9", Attribute="Encryption"))
            await hub.start(port=int(address.rsplit(":", 1)[1]))
            await until(lambda: hub.hub.audit.received == 2, what="events sent after the reconnect")
            after = await query(since_unix_ms=t0 + 3500)
            assert [(e.computer, e.id) for e in after.events] == [("pc1", 542), ("pc2", 546)]
            assert len((await query()).events) == 8 and hub.hub.audit.duplicates == 0
        finally:
            for agent in agents:
                await agent.stop()
            await hub.stop()
            await channel.close()

    run(main)


def test_statistics_per_computer_and_fleet_totals(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1", "pc2", "pc3"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        channel = _admin_channel(address, pki.admin_cert_dir())
        fleet = fleet_grpc.FleetStub(channel)
        pc1 = _agent(pki, "pc1", address, [], {"authentication_failures": 2, "ike_main_modes": 5, "active_security_associations": 3})
        pc2 = _agent(pki, "pc2", address, [], {"authentication_failures": 1, "confidential_bytes_sent": 1000})
        # pc3: the record-only enforcer (no IPsec, no counters).
        pc3 = AgentDaemon(agent_config(pki.agent_dir("pc3")[0], address))
        agents = [pc1, pc2, pc3]
        for agent in agents:
            await agent.start()
        try:
            assert hub.hub is not None
            registry = hub.hub.registry
            # Sent right after connecting, not a heartbeat interval (5 s here) later.
            await until(lambda: all(registry.get(n).statistics for n in ("pc1", "pc2", "pc3")), timeout=4, what="stats")
            stats = await fleet.GetStatistics(fleet_pb.FleetStatisticsRequest())
            assert [c.computer for c in stats.computers] == ["pc1", "pc2", "pc3"]
            assert (stats.reporting, stats.ipsec_active) == (3, 2)
            one = stats.computers[0].statistics
            assert [c.name for c in one.main_mode] == [name for _, name in MAIN_MODE_FIELDS]  # Windows order and names
            assert {c.key: c.value for c in one.main_mode}["authentication_failures"] == 2
            assert one.ipsec_active and one.policy_name == "Base" and stats.computers[0].online
            assert not stats.computers[2].statistics.ipsec_active and not stats.computers[2].statistics.main_mode
            totals_mm = {c.key: c.value for c in stats.totals.main_mode}
            totals_qm = {c.key: c.value for c in stats.totals.quick_mode}
            assert (totals_mm["authentication_failures"], totals_mm["ike_main_modes"]) == (3, 5)
            assert (totals_qm["active_security_associations"], totals_qm["confidential_bytes_sent"]) == (3, 1000)
            assert stats.totals.ipsec_active
            # Heartbeats carry the latest: a change shows at the next one.
            _fake(pc2).counters["authentication_failures"] = 7
            pc2._execute([Send(pc2.session.heartbeat())])  # what the heartbeat timer does, now
            await until(
                lambda: dist_pb.StatisticsSummary.FromString(registry.get("pc2").statistics).main_mode[
                    "authentication_failures"
                ]
                == 7,
                what="updated statistics",
            )
            only = await fleet.GetStatistics(fleet_pb.FleetStatisticsRequest(computers=["pc2", "nosuch"]))
            assert [c.computer for c in only.computers] == ["pc2"] and list(only.not_reporting) == ["nosuch"]
            assert {c.key: c.value for c in only.totals.main_mode}["authentication_failures"] == 7
        finally:
            for agent in agents:
                await agent.stop()
            await hub.stop()
            await channel.close()
        # The latest statistics are kept in the fleet records.
        again = FleetRegistry(tmp_path / "fleet.sqlite3")
        assert dist_pb.StatisticsSummary.FromString(again.get("pc1").statistics).main_mode["ike_main_modes"] == 5
        again.close()

    run(main)


def test_agent_certificate_cannot_call_the_new_fleet_rpcs(tmp_path: Path, pki: Pki) -> None:
    assert required_role(FLEET_SERVICE) == "admin"  # the server's AuthzInterceptor: admin certificate

    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        state, _ = pki.agent_dir("pc1")
        try:
            async with aio.secure_channel(address, state_credentials(state)) as channel:
                stub = fleet_grpc.FleetStub(channel)
                for call in (
                    stub.ListAuditEvents(fleet_pb.FleetAuditRequest()),
                    stub.GetStatistics(fleet_pb.FleetStatisticsRequest()),
                ):
                    with pytest.raises(aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await hub.stop()

    run(main)


def test_cli_audit_and_fleet_stats(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        eff = FakeEffective()
        eff.set(["pc1"], simple_policy("Base"))
        hub = HubServer(tmp_path, eff, pki)
        address = await hub.start()
        certs = str(pki.admin_cert_dir())
        now = _now_ms()
        events = [
            event(541, now - 3_600_000, "10.0.0.7"),  # an hour ago
            event(545, now - 120_000, "10.0.0.3", **{"Failure Reason": "pre-shared key mismatch"}),
            event(547, now - 60_000, "10.0.0.4", **{"Failure Point": "Peer", "Failure Reason": "no proposal chosen"}),
        ]
        agent = _agent(pki, "pc1", address, events, {"authentication_failures": 4, "ike_main_modes": 9})
        await agent.start()
        try:
            assert hub.hub is not None
            await until(lambda: hub.hub.audit.received == 3 and hub.hub.registry.get("pc1").statistics, what="forwarded")

            def cli(*words: str) -> str:
                capsys.readouterr()
                assert cli_main([*words, "-r", address, "--cert-dir", certs]) == 0
                return capsys.readouterr().out

            table = await asyncio.to_thread(cli, "audit", "--computer", "pc1", "--since", "-10m")
            lines = table.splitlines()
            assert lines[0].split() == ["TIME", "COMPUTER", "ID", "EVENT", "DETAILS"]
            assert len(lines) == 3  # the 541 of an hour ago is older than 10 minutes
            assert " pc1 " in lines[1] and " 545 " in lines[1] and "auth-failed" in lines[1]
            assert "Peer Identity: 10.0.0.3; Failure Reason: pre-shared key mismatch; Filter: 10.0.0.1 - 10.0.0.3" in lines[1]
            assert "negotiation-failed" in lines[2] and "Failure Point: Peer" in lines[2]
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  pc1 ", lines[1]), lines[1]
            only = await asyncio.to_thread(cli, "audit", "--id", "541")
            assert "sa-established" in only and "545" not in only
            as_json = json.loads(await asyncio.to_thread(cli, "audit", "--id", "545,547", "--json"))
            assert [e["id"] for e in as_json["events"]] == [545, 547]
            assert as_json["events"][0]["fields"]["Failure Reason"] == "pre-shared key mismatch"
            assert "no audit events" in await asyncio.to_thread(cli, "audit", "--computer", "nosuch")

            stats = await asyncio.to_thread(cli, "fleet", "stats")
            assert "fleet: 1 computer(s) reporting, 1 with IPsec active" in stats
            assert "IKE Main Mode Statistics (fleet total)" in stats
            assert any(line.split() == ["Authentication", "Failures", "4"] for line in stats.splitlines())
            row = next(line for line in stats.splitlines() if line.startswith("pc1 "))
            assert row.split()[:9] == ["pc1", "active", "9", "0", "0", "4", "0", "0", "0"]
            assert "Base" in row
            data = json.loads(await asyncio.to_thread(cli, "fleet", "stats", "--json"))
            assert data["reporting"] == 1 and data["computers"][0]["computer"] == "pc1"

            # ipsecmon's fleet view shows the same aggregation
            from clients.ipsecmon.main import main as ipsecmon_main

            def mon(*words: str) -> str:
                capsys.readouterr()
                assert ipsecmon_main([*words, "-r", address, "--cert-dir", certs, "--once"]) == 0
                return capsys.readouterr().out

            fleet_view = await asyncio.to_thread(mon)
            assert fleet_view.startswith(f"IP Security Monitor (fleet, {address})")
            assert "fleet: 1 computer(s) reporting" in fleet_view and "\npc1 " in fleet_view
            assert json.loads(await asyncio.to_thread(mon, "--json"))["reporting"] == 1
        finally:
            await agent.stop()
            await hub.stop()

    run(main)


# ---------------------------------------------------------------- units


def test_audit_store_dedupes_bounds_and_survives_reopen(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite3", keep=5)
    records = [dist_pb.AuditRecord(id=541, time_unix_ms=t, fields={"Filter": "f"}, message="m") for t in range(4)]
    store.add("pc1", records, 1)
    store.add("pc1", records[:2], 2)  # a resend
    store.add("pc2", records[:1], 3)  # the same event on another computer is another event
    assert store.flush() == 5 and store.duplicates == 2
    # Same computer, time and id, other fields: not a duplicate.
    store.add("pc1", [dist_pb.AuditRecord(id=541, time_unix_ms=0, fields={"Filter": "g"}, message="m")], 4)
    assert store.flush() == 1 and store.count() == 5  # the oldest went
    store.close()
    again = AuditStore(tmp_path / "audit.sqlite3", keep=5)
    events, truncated = again.query(computers=["pc1"])
    assert [(e.time_unix_ms, e.fields["Filter"]) for e in events] == [(0, "g"), (1, "f"), (2, "f"), (3, "f")]
    assert not truncated and all(e.computer == "pc1" for e in events)
    again.close()


def test_cursor_handles_events_of_one_millisecond_across_batches(tmp_path: Path) -> None:
    events = [event(541, 100, f"10.0.0.{i}") for i in range(5)] + [event(542, 101)]

    class Source:
        def audit_events(self, since_unix_ms: int, ids: set[int] | None, limit: int) -> list[agent_pb.AuditEvent]:
            return [e for e in events if e.time_unix_ms >= since_unix_ms][:limit]

    cursor = AuditCursor.load(tmp_path, batch=2)
    sent = []
    while batch := cursor.next_batch(Source()):
        sent += [(r.time_unix_ms, r.fields["Peer Identity"]) for r in batch]
        cursor.commit(batch)
    assert len(sent) == 6 and len(set(sent)) == 6
    assert AuditCursor.load(tmp_path, batch=2).next_batch(Source()) == []  # persisted


def test_fleet_statistics_sums_every_counter() -> None:
    a = dist_pb.StatisticsSummary(main_mode={"authentication_failures": 2}, quick_mode={"rekeys": 1}, ipsec_active=True)
    b = dist_pb.StatisticsSummary(main_mode={"authentication_failures": 3, "custom_counter": 1})
    records = [
        AgentRecord("b", statistics=b.SerializeToString()),
        AgentRecord("a", statistics=a.SerializeToString(), online=True),
        AgentRecord("c"),
    ]
    out = fleet_statistics(records, 1000)
    assert [c.computer for c in out.computers] == ["a", "b"] and list(out.not_reporting) == ["c"]
    totals = {c.key: (c.name, c.value) for c in out.totals.main_mode}
    assert totals["authentication_failures"] == ("Authentication Failures", 5)
    assert totals["custom_counter"] == ("Custom Counter", 1)  # unknown keys keep a readable name
    assert {c.key: c.value for c in out.totals.quick_mode}["rekeys"] == 1
    assert (out.reporting, out.ipsec_active) == (2, 1)


def test_summary_and_parse_time() -> None:
    stats = agent_pb.IpsecStatistics(ipsec_active=True, enforcer="e")
    stats.main_mode.add(key="ike_main_modes", name="IKE Main Mode", value=3)
    out = summary(stats, "Fallback")
    assert dict(out.main_mode) == {"ike_main_modes": 3} and out.policy_name == "Fallback"
    assert parse_time("-10m", now=1000.0) == 400_000
    assert parse_time("2h", now=10_000.0) == 2_800_000
    assert parse_time("2024-05-01T10:00:00Z") == 1_714_557_600_000
    assert parse_time("2024-05-01T10:00:00+02:00") == 1_714_550_400_000
