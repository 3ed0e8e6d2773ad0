"""Per-agent distribution records and the fleet status view (issue 3 item 5).

The hub updates `AgentRecord`s in memory as agents say Hello, ACK, NACK, heartbeat
and disconnect; `FleetRegistry` persists them to its own small SQLite file in the
data directory (`fleet.sqlite3`), written behind in batches so 10,000 agents
connecting at once cost a handful of transactions, not 10,000 fsyncs. The records are
status, not policy: losing the last half second of them in a crash costs nothing but
a stale "last seen", which the agents' next Hello corrects.

`fleet_status()` is pure: records + desired versions + now → the FleetStatus message.
A record also keeps the agent's latest statistics (the StatisticsSummary of its last heartbeat);
`fleet_statistics()` turns records into Fleet.GetStatistics' answer, totals included.
"""

from __future__ import annotations

import operator
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from policyagent.pb import agent_pb, dist_pb, fleet_pb

FLEET_FILE = "fleet.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    computer TEXT PRIMARY KEY,
    desired_version TEXT NOT NULL DEFAULT '',
    applied_version TEXT NOT NULL DEFAULT '',
    last_nack_version TEXT NOT NULL DEFAULT '',
    last_nack_reason TEXT NOT NULL DEFAULT '',
    last_nack_unix_ms INTEGER NOT NULL DEFAULT 0,
    last_ack_unix_ms INTEGER NOT NULL DEFAULT 0,
    last_seen_unix_ms INTEGER NOT NULL DEFAULT 0,
    connected_since_unix_ms INTEGER NOT NULL DEFAULT 0,
    online INTEGER NOT NULL DEFAULT 0,
    running_on_cache INTEGER NOT NULL DEFAULT 0,
    cache_since_unix_ms INTEGER NOT NULL DEFAULT 0,
    capabilities BLOB NOT NULL DEFAULT x'',
    agent_version TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    revoked_unix_ms INTEGER NOT NULL DEFAULT 0,
    statistics BLOB NOT NULL DEFAULT x'',
    statistics_unix_ms INTEGER NOT NULL DEFAULT 0
)
"""
# Columns added after the first release of the table: (name, definition).
_ADDED_COLUMNS = [
    ("revoked_unix_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("statistics", "BLOB NOT NULL DEFAULT x''"),
    ("statistics_unix_ms", "INTEGER NOT NULL DEFAULT 0"),
]


@dataclass(slots=True)  # one per computer: no per-instance __dict__
class AgentRecord:
    """What the server knows about one agent (mutable: the hub updates it in place)."""

    computer: str
    desired_version: str = ""
    applied_version: str = ""
    last_nack_version: str = ""
    last_nack_reason: str = ""
    last_nack_unix_ms: int = 0
    last_ack_unix_ms: int = 0
    last_seen_unix_ms: int = 0
    connected_since_unix_ms: int = 0
    online: bool = False
    running_on_cache: bool = False
    cache_since_unix_ms: int = 0
    capabilities: bytes = b""
    agent_version: str = ""
    peer: str = ""
    revoked_unix_ms: int = 0  # its host certificate was revoked then; cleared by a Hello with a new certificate
    statistics: bytes = b""  # the latest heartbeat's StatisticsSummary, serialized ("" = none yet)
    statistics_unix_ms: int = 0  # when that heartbeat arrived


_COLUMNS = [f.name for f in fields(AgentRecord)]
_ROW = operator.attrgetter(*_COLUMNS)  # record → row tuple, in C (flush holds the GIL while it builds rows)


class FleetRegistry:
    """AgentRecords in memory, persisted write-behind to `path` (SQLite, WAL).

    All methods are called from the event loop except `flush()`, which the hub runs
    in a worker thread; the dirty set is handed over under a lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(_SCHEMA)
        have = {str(row[1]) for row in self._conn.execute("PRAGMA table_info(agents)")}
        for name, definition in _ADDED_COLUMNS:
            if name not in have:
                self._conn.execute(f"ALTER TABLE agents ADD COLUMN {name} {definition}")
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self.records: dict[str, AgentRecord] = {}
        for row in self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM agents"):
            record = AgentRecord(**dict(zip(_COLUMNS, row, strict=True)))
            record.online = bool(record.online)
            record.running_on_cache = bool(record.running_on_cache)
            # A record says online only while this server holds the agent's stream.
            if record.online:
                record.online = False
                self._dirty.add(record.computer)
            self.records[record.computer] = record

    def get(self, computer: str) -> AgentRecord:
        """The record of `computer`, created empty if the server has never heard of it."""
        record = self.records.get(computer)
        if record is None:
            record = self.records[computer] = AgentRecord(computer)
        return record

    def touch(self, computer: str) -> None:
        """Mark a record changed so the next flush writes it."""
        with self._lock:
            self._dirty.add(computer)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def flush(self) -> int:
        """Write every changed record in one transaction; returns how many (worker thread)."""
        with self._lock:
            names, self._dirty = self._dirty, set()
            records = self.records
            rows = [_ROW(records[name]) for name in names if name in records]
        if not rows:
            return 0
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany(
                f"INSERT OR REPLACE INTO agents ({', '.join(_COLUMNS)}) VALUES ({placeholders})", rows
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            with self._lock:
                self._dirty.update(names)
            raise
        return len(rows)

    def close(self) -> None:
        self.flush()
        self._conn.close()


def peer_address(peer: str) -> str:
    """The IP address of a gRPC peer string ("ipv4:10.1.2.3:4567" → "10.1.2.3", "ipv6:[2001:db8::5]:4567"
    or its URI-escaped form "ipv6:%5B2001:db8::5%5D:4567" → "2001:db8::5", a zone id dropped); "" for a
    unix socket or anything else. Only text: the caller parses it (the directory's subnet match)."""
    scheme, sep, rest = peer.partition(":")
    if not sep:
        return ""
    rest = urllib.parse.unquote(rest)
    if scheme == "ipv4":
        return rest.rpartition(":")[0] if ":" in rest else rest
    if scheme == "ipv6":
        if rest.startswith("["):
            rest = rest[1:].partition("]")[0]
        return rest.partition("%")[0]
    return ""


def agent_state(
    record: AgentRecord, desired: str, now_ms: int, stale_after_ms: int
) -> fleet_pb.AgentState.ValueType:
    """The one word for an agent; the first that holds: revoked, offline, stale, rejected, pending, in sync."""
    if record.revoked_unix_ms and not record.online:
        return fleet_pb.AGENT_STATE_REVOKED
    if not record.online:
        return fleet_pb.AGENT_STATE_OFFLINE
    if now_ms - record.last_seen_unix_ms > stale_after_ms:
        return fleet_pb.AGENT_STATE_STALE
    if desired and record.applied_version == desired:
        return fleet_pb.AGENT_STATE_IN_SYNC
    if desired and record.last_nack_version == desired:
        return fleet_pb.AGENT_STATE_REJECTED
    return fleet_pb.AGENT_STATE_PENDING


def fleet_status(
    records: Iterable[AgentRecord],
    desired: Mapping[str, str],
    now_ms: int,
    stale_after_ms: int,
) -> fleet_pb.FleetStatus:
    """The FleetStatus message for `records`, with each agent's desired version from `desired`."""
    out = fleet_pb.FleetStatus(server_time_unix_ms=now_ms)
    counts = {
        fleet_pb.AGENT_STATE_IN_SYNC: 0,
        fleet_pb.AGENT_STATE_PENDING: 0,
        fleet_pb.AGENT_STATE_REJECTED: 0,
        fleet_pb.AGENT_STATE_STALE: 0,
        fleet_pb.AGENT_STATE_OFFLINE: 0,
        fleet_pb.AGENT_STATE_REVOKED: 0,
    }
    for record in sorted(records, key=lambda r: r.computer):
        want = desired.get(record.computer, record.desired_version)
        state = agent_state(record, want, now_ms, stale_after_ms)
        counts[state] += 1
        agent = out.agents.add(
            computer=record.computer,
            state=state,
            online=record.online,
            desired_version=want,
            applied_version=record.applied_version,
            last_nack_version=record.last_nack_version,
            last_nack_reason=record.last_nack_reason,
            last_nack_unix_ms=record.last_nack_unix_ms,
            last_ack_unix_ms=record.last_ack_unix_ms,
            last_seen_unix_ms=record.last_seen_unix_ms,
            connected_since_unix_ms=record.connected_since_unix_ms,
            running_on_cache=record.running_on_cache,
            cache_since_unix_ms=record.cache_since_unix_ms,
            agent_version=record.agent_version,
            peer=record.peer,
            revoked_unix_ms=record.revoked_unix_ms,
        )
        if record.capabilities:
            agent.capabilities.ParseFromString(record.capabilities)
        if record.running_on_cache:
            out.on_cache += 1
    out.total = len(out.agents)
    out.in_sync = counts[fleet_pb.AGENT_STATE_IN_SYNC]
    out.pending = counts[fleet_pb.AGENT_STATE_PENDING]
    out.rejected = counts[fleet_pb.AGENT_STATE_REJECTED]
    out.stale = counts[fleet_pb.AGENT_STATE_STALE]
    out.offline = counts[fleet_pb.AGENT_STATE_OFFLINE]
    out.revoked = counts[fleet_pb.AGENT_STATE_REVOKED]
    return out


def capabilities_bytes(capabilities: dist_pb.Capabilities) -> bytes:
    return capabilities.SerializeToString(deterministic=True)


def _counter_tables() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(key, display name) of the main mode and quick mode counters, in the IP Security Monitor's order."""
    try:
        from policyagent.agent.enforce.monitor import MAIN_MODE_FIELDS, QUICK_MODE_FIELDS
    except ImportError:  # pragma: no cover - a server without the agent's enforcer modules
        return (), ()
    return MAIN_MODE_FIELDS, QUICK_MODE_FIELDS


def _counters(values: Mapping[str, int], table: tuple[tuple[str, str], ...]) -> list[agent_pb.Counter]:
    """Counters in the table's order (with its names), then any key the table does not know, sorted."""
    known = {key for key, _ in table}
    out = [agent_pb.Counter(key=key, name=name, value=values[key]) for key, name in table if key in values]
    out += [
        agent_pb.Counter(key=key, name=key.replace("_", " ").title(), value=values[key])
        for key in sorted(values)
        if key not in known
    ]
    return out


def ipsec_statistics(stats: dist_pb.StatisticsSummary) -> agent_pb.IpsecStatistics:
    """A heartbeat's summary as the IP Security Monitor's message (display names and order restored)."""
    main_table, quick_table = _counter_tables()
    return agent_pb.IpsecStatistics(
        main_mode=_counters(dict(stats.main_mode), main_table),
        quick_mode=_counters(dict(stats.quick_mode), quick_table),
        ipsec_active=stats.ipsec_active,
        policy_name=stats.policy_name,
        enforcer=stats.enforcer,
        since_unix_ms=stats.since_unix_ms,
        time_unix_ms=stats.time_unix_ms,
    )


def fleet_statistics(records: Iterable[AgentRecord], now_ms: int) -> fleet_pb.FleetStatistics:
    """Each record's latest statistics and the totals: every counter summed over the computers that sent some."""
    out = fleet_pb.FleetStatistics(server_time_unix_ms=now_ms)
    main: dict[str, int] = {}
    quick: dict[str, int] = {}
    for record in sorted(records, key=lambda r: r.computer):
        if not record.statistics:
            out.not_reporting.append(record.computer)
            continue
        summary = dist_pb.StatisticsSummary.FromString(record.statistics)
        entry = out.computers.add(
            computer=record.computer, online=record.online, received_unix_ms=record.statistics_unix_ms
        )
        entry.statistics.CopyFrom(ipsec_statistics(summary))
        for key, value in summary.main_mode.items():
            main[key] = main.get(key, 0) + value
        for key, value in summary.quick_mode.items():
            quick[key] = quick.get(key, 0) + value
        if summary.ipsec_active:
            out.ipsec_active += 1
    main_table, quick_table = _counter_tables()
    out.totals.CopyFrom(
        agent_pb.IpsecStatistics(
            main_mode=_counters(main, main_table),
            quick_mode=_counters(quick, quick_table),
            ipsec_active=out.ipsec_active > 0,
            time_unix_ms=now_ms,
        )
    )
    out.reporting = len(out.computers)
    return out
