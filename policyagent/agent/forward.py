"""What the agent forwards to the server besides its policy answers (issue 4 items 7-8).

- Statistics: `summary(stats)` turns the enforcer's `IpsecStatistics` into the compact
  `StatisticsSummary` every heartbeat carries (counters as key → value).
- Audit events 541-547: `AuditCursor` remembers, in STATE_DIR/audit-forward.json, how far the
  server has confirmed the enforcer's events, so neither a reconnect nor a restart resends
  what the server already has, and events recorded while the server was unreachable go out
  after the reconnect. `next_batch()` reads the enforcer's events from the cursor on (at most
  `batch` at a time, oldest first); `commit()` moves the cursor once the server confirmed them.

The enforcer's `audit_events(since)` is inclusive ("at or after"), so the cursor holds the time
of the last confirmed event plus the digests of the confirmed events at exactly that time:
events of the same millisecond are neither lost nor resent. The daemon (agent/daemon.py) drives
both, calling these blocking methods in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from policyagent.pb import agent_pb, dist_pb

_log = logging.getLogger("policyagent.agent.forward")

CURSOR_FILE = "audit-forward.json"
DEFAULT_BATCH = 500  # events per AuditBatch
DEFAULT_INTERVAL_S = 5.0  # how often new events are looked for while the stream is up


class AuditSource(Protocol):
    def audit_events(self, since_unix_ms: int, ids: set[int] | None, limit: int) -> list[agent_pb.AuditEvent]: ...


def summary(stats: agent_pb.IpsecStatistics, policy_name: str = "") -> dist_pb.StatisticsSummary:
    """The heartbeat's compact form of the IP Security Monitor (`policy_name` if the enforcer gives none)."""
    return dist_pb.StatisticsSummary(
        main_mode={c.key: c.value for c in stats.main_mode},
        quick_mode={c.key: c.value for c in stats.quick_mode},
        ipsec_active=stats.ipsec_active,
        policy_name=stats.policy_name or policy_name,
        enforcer=stats.enforcer,
        since_unix_ms=stats.since_unix_ms,
        time_unix_ms=stats.time_unix_ms,
    )


def event_digest(event_id: int, time_unix_ms: int, fields: Mapping[str, str], message: str) -> str:
    """What identifies one audit event (the server dedupes on computer + the same digest)."""
    canonical = json.dumps(
        {"id": int(event_id), "t": int(time_unix_ms), "f": dict(fields), "m": message},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _digest(event: agent_pb.AuditEvent | dist_pb.AuditRecord) -> str:
    return event_digest(event.id, event.time_unix_ms, event.fields, event.message)


@dataclass
class AuditCursor:
    """How far the server has the enforcer's audit events; persisted in STATE_DIR/audit-forward.json."""

    state_dir: Path
    batch: int = DEFAULT_BATCH
    since_unix_ms: int = 0
    # Digests of the confirmed events whose time is exactly since_unix_ms.
    at_since: set[str] = field(default_factory=set)
    sent: int = 0  # events confirmed by the server since this agent started
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def path(self) -> Path:
        return self.state_dir / CURSOR_FILE

    @classmethod
    def load(cls, state_dir: Path, batch: int = DEFAULT_BATCH) -> AuditCursor:
        cursor = cls(state_dir, batch)
        try:
            data = json.loads(cursor.path.read_text())
            cursor.since_unix_ms = int(data.get("since_unix_ms", 0))
            cursor.at_since = {str(d) for d in data.get("at_since", [])}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # A damaged cursor costs a resend (which the server drops), never a lost event.
            _log.warning("audit forwarding cursor unreadable; starting over", extra={"error": str(exc)})
        return cursor

    def next_batch(self, source: AuditSource) -> list[dist_pb.AuditRecord]:
        """The enforcer's events the server does not have yet, oldest first, at most `batch` (blocking)."""
        with self._lock:
            since, seen = self.since_unix_ms, set(self.at_since)
        while True:
            # Room for the events of `since` already sent, which come back first (the bound is inclusive).
            events = source.audit_events(since, None, self.batch + len(seen))
            fresh = [e for e in events if not (e.time_unix_ms == since and _digest(e) in seen)]
            if fresh or len(events) < self.batch + len(seen):
                break
            # A full page of one millisecond, all sent: nothing newer fits in a page from `since` (pathological).
            since, seen = since + 1, set()
        return [
            dist_pb.AuditRecord(id=e.id, time_unix_ms=e.time_unix_ms, fields=dict(e.fields), message=e.message)
            for e in fresh[: self.batch]
        ]

    def commit(self, records: list[dist_pb.AuditRecord]) -> None:
        """The server confirmed `records` (a batch from next_batch): move the cursor past them and persist it."""
        if not records:
            return
        with self._lock:
            for record in records:
                if record.time_unix_ms > self.since_unix_ms:
                    self.since_unix_ms, self.at_since = record.time_unix_ms, set()
                if record.time_unix_ms == self.since_unix_ms:
                    self.at_since.add(_digest(record))
            self.sent += len(records)
            data = {"since_unix_ms": self.since_unix_ms, "at_since": sorted(self.at_since)}
        self._save(data)

    def _save(self, data: dict[str, object]) -> None:
        tmp = self.path.with_name(CURSOR_FILE + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            _log.error("cannot write the audit forwarding cursor", extra={"error": exc.strerror})
            with contextlib.suppress(OSError):
                tmp.unlink()


__all__ = ["CURSOR_FILE", "AuditCursor", "AuditSource", "event_digest", "summary"]
