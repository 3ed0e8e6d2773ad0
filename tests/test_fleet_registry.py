"""The fleet view's states and its records file (pure functions and the small SQLite registry)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from policyagent.pb import fleet_pb
from policyagent.server.fleet import AgentRecord, FleetRegistry, agent_state, fleet_status
from policyagent.server.fleetcmd import progress_line

NOW = 1_000_000_000
STALE = 120_000


@pytest.mark.parametrize(
    ("record", "desired", "state"),
    [
        (AgentRecord("a", online=True, last_seen_unix_ms=NOW, applied_version="v2"), "v2", fleet_pb.AGENT_STATE_IN_SYNC),
        (AgentRecord("a", online=True, last_seen_unix_ms=NOW, applied_version="v1"), "v2", fleet_pb.AGENT_STATE_PENDING),
        (
            AgentRecord("a", online=True, last_seen_unix_ms=NOW, applied_version="v1", last_nack_version="v2"),
            "v2",
            fleet_pb.AGENT_STATE_REJECTED,
        ),
        (AgentRecord("a", online=True, last_seen_unix_ms=NOW - STALE - 1, applied_version="v2"), "v2", fleet_pb.AGENT_STATE_STALE),
        (AgentRecord("a", online=False, applied_version="v2"), "v2", fleet_pb.AGENT_STATE_OFFLINE),
        (AgentRecord("a", online=False, applied_version="v2", revoked_unix_ms=NOW), "v2", fleet_pb.AGENT_STATE_REVOKED),
        # Online again with a new certificate: the revocation mark no longer describes it.
        (AgentRecord("a", online=True, last_seen_unix_ms=NOW, applied_version="v2", revoked_unix_ms=NOW), "v2", fleet_pb.AGENT_STATE_IN_SYNC),
    ],
)
def test_agent_state(record: AgentRecord, desired: str, state: int) -> None:
    assert agent_state(record, desired, NOW, STALE) == state


def test_fleet_status_counts_revoked_agents_and_the_progress_line_says_so() -> None:
    records = [
        AgentRecord("a", online=True, last_seen_unix_ms=NOW, applied_version="v2"),
        AgentRecord("b", online=False, revoked_unix_ms=NOW - 5),
    ]
    status = fleet_status(records, {"a": "v2", "b": "v2"}, NOW, STALE)
    assert (status.total, status.in_sync, status.revoked, status.offline) == (2, 1, 1, 0)
    assert status.agents[1].revoked_unix_ms == NOW - 5
    assert progress_line(status) == (
        "rollout: 1 of 2 on the desired version (0 pending, 0 rejected, 0 stale, 0 offline, 1 revoked)"
    )


def test_registry_persists_the_revocation_mark(tmp_path: Path) -> None:
    registry = FleetRegistry(tmp_path / "fleet.sqlite3")
    registry.get("a").revoked_unix_ms = 42
    registry.touch("a")
    registry.close()
    again = FleetRegistry(tmp_path / "fleet.sqlite3")
    assert again.get("a").revoked_unix_ms == 42
    again.close()


def test_registry_adds_new_columns_to_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE agents (computer TEXT PRIMARY KEY, desired_version TEXT NOT NULL DEFAULT '',"
        " applied_version TEXT NOT NULL DEFAULT '', last_nack_version TEXT NOT NULL DEFAULT '',"
        " last_nack_reason TEXT NOT NULL DEFAULT '', last_nack_unix_ms INTEGER NOT NULL DEFAULT 0,"
        " last_ack_unix_ms INTEGER NOT NULL DEFAULT 0, last_seen_unix_ms INTEGER NOT NULL DEFAULT 0,"
        " connected_since_unix_ms INTEGER NOT NULL DEFAULT 0, online INTEGER NOT NULL DEFAULT 0,"
        " running_on_cache INTEGER NOT NULL DEFAULT 0, cache_since_unix_ms INTEGER NOT NULL DEFAULT 0,"
        " capabilities BLOB NOT NULL DEFAULT x'', agent_version TEXT NOT NULL DEFAULT '',"
        " peer TEXT NOT NULL DEFAULT '')"
    )
    conn.execute("INSERT INTO agents (computer, applied_version) VALUES ('old', 'v1')")
    conn.commit()
    conn.close()
    registry = FleetRegistry(path)
    record = registry.get("old")
    assert (record.applied_version, record.revoked_unix_ms) == ("v1", 0)
    registry.close()
