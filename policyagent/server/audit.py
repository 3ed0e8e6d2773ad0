"""Audit events 541-547 the agents forward, kept by the server (issue 4 item 7).

Agents send `AuditBatch`es (distribution.proto); the hub hands each to `AuditStore.add()`,
which only queues it: `flush()` (the hub's flush thread, with the fleet records) writes the
queue in one transaction to its own SQLite file in the data directory (`audit.sqlite3`).
Durability is the fleet records': a crash loses at most the last fraction of a second of
forwarded events. Duplicates are dropped on (computer, time, id, digest of the fields and
message), so an agent that resends a batch (its confirmation was lost) changes nothing. The
table is bounded: the oldest events beyond the newest `keep` (100,000) go.

`query()` (same thread: it flushes the queue first, so a query sees every event received)
answers Fleet.ListAuditEvents: by computers, ids and time, the newest `limit` matching,
returned oldest first.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from policyagent.agent.forward import event_digest
from policyagent.pb import agent_pb, dist_pb

AUDIT_FILE = "audit.sqlite3"
DEFAULT_KEEP = 100_000
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000
_FIELDS_MAX = 64  # fields per event kept
_TEXT_MAX = 2000  # characters per field value or message kept

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY,
    computer TEXT NOT NULL COLLATE NOCASE,
    time_unix_ms INTEGER NOT NULL,
    id INTEGER NOT NULL,
    digest TEXT NOT NULL,
    fields TEXT NOT NULL,
    message TEXT NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    UNIQUE (computer, time_unix_ms, id, digest)
);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time_unix_ms);
"""


@dataclass(frozen=True)
class AddResult:
    queued: int
    dropped: int  # the queue was full (the flusher is failing): the oldest queued went


class AuditStore:
    """Forwarded audit events: queued on the event loop, written and queried in one worker thread."""

    def __init__(self, path: Path, *, keep: int = DEFAULT_KEEP, max_queued: int = DEFAULT_KEEP) -> None:
        self.path = path
        self.keep = keep
        self.max_queued = max_queued  # events waiting for a flush (only reached if flushes keep failing)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._count = int(self._conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])
        self._lock = threading.Lock()
        self._queue: list[tuple[str, int, int, str, str, str, int]] = []
        self.received = 0  # events received since the server started (duplicates included)
        self.duplicates = 0  # of those, already stored

    # ------------------------------------------------------------------ the event loop

    def add(self, computer: str, events: Iterable[dist_pb.AuditRecord], received_unix_ms: int) -> AddResult:
        """Queue `computer`'s events for the next flush (cheap: no I/O)."""
        rows = []
        for event in events:
            fields = {k[:_TEXT_MAX]: v[:_TEXT_MAX] for k, v in sorted(event.fields.items())[:_FIELDS_MAX]}
            message = event.message[:_TEXT_MAX]
            digest = event_digest(event.id, event.time_unix_ms, fields, message)
            rows.append(
                (
                    computer,
                    event.time_unix_ms,
                    event.id,
                    digest,
                    json.dumps(fields, ensure_ascii=False, sort_keys=True),
                    message,
                    received_unix_ms,
                )
            )
        dropped = 0
        with self._lock:
            self._queue.extend(rows)
            self.received += len(rows)
            if len(self._queue) > self.max_queued:
                dropped = len(self._queue) - self.max_queued
                del self._queue[:dropped]
        return AddResult(len(rows), dropped)

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    # ------------------------------------------------------------------ the worker thread

    def flush(self) -> int:
        """Write the queued events in one transaction, drop duplicates and the oldest beyond `keep`;
        returns how many were new."""
        with self._lock:
            rows, self._queue = self._queue, []
        if not rows:
            return 0
        self._conn.execute("BEGIN")
        try:
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO audit_events (computer, time_unix_ms, id, digest, fields, message,"
                " received_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            inserted = self._conn.total_changes - before
            count = self._count + inserted
            if count > self.keep:
                cursor = self._conn.execute(
                    "DELETE FROM audit_events WHERE seq <= "
                    "(SELECT seq FROM audit_events ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (self.keep,),
                )
                count -= max(cursor.rowcount, 0)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            with self._lock:
                self._queue[:0] = rows
            raise
        self._count = count
        with self._lock:
            self.duplicates += len(rows) - inserted
        return inserted

    def query(
        self,
        computers: Iterable[str] = (),
        ids: Iterable[int] = (),
        since_unix_ms: int = 0,
        until_unix_ms: int = 0,
        limit: int = 0,
    ) -> tuple[list[agent_pb.AuditEvent], bool]:
        """The newest `limit` events matching (oldest first) and whether more matched."""
        self.flush()
        limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
        where: list[str] = ["time_unix_ms >= ?"]
        args: list[int | str] = [since_unix_ms]
        if until_unix_ms:
            where.append("time_unix_ms < ?")
            args.append(until_unix_ms)
        names = sorted({c.strip() for c in computers if c.strip()})
        if names:
            where.append(f"computer IN ({', '.join('?' for _ in names)})")
            args += names
        wanted = sorted({int(i) for i in ids})
        if wanted:
            where.append(f"id IN ({', '.join('?' for _ in wanted)})")
            args += wanted
        rows = self._conn.execute(
            "SELECT computer, time_unix_ms, id, fields, message FROM audit_events WHERE "
            + " AND ".join(where)
            + " ORDER BY time_unix_ms DESC, seq DESC LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        truncated = len(rows) > limit
        out = [
            agent_pb.AuditEvent(
                computer=computer, time_unix_ms=time_ms, id=event_id, fields=json.loads(fields), message=message
            )
            for computer, time_ms, event_id, fields, message in reversed(rows[:limit])
        ]
        return out, truncated

    def count(self) -> int:
        return self._count

    def close(self) -> None:
        self.flush()
        self._conn.close()


__all__ = ["AUDIT_FILE", "AuditStore"]
