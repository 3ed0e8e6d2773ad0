"""The SQLite store backend: the default, embedded domain store.

One database file holds the objects (serialized protobuf messages, with their
names and revisions in columns), an index of which rules use which filter
lists and filter actions (so "is this in use?" is an index lookup, not a scan
of every policy), the append-only change log and a little metadata (the store
revision, whether the store has been seeded).

Durability: the database runs in WAL mode with `synchronous=FULL`, so a write
that `write()` has returned from survives a crash or power loss. Every write is
one `BEGIN IMMEDIATE … COMMIT` transaction; any failure rolls it back.

Concurrency: one writer connection behind a lock (SQLite allows one writer at a
time anyway; `BEGIN IMMEDIATE` plus the busy timeout serialises writers in other
processes), and a small pool of reader connections, so reads see the last
committed state without waiting for a writer's fsync (WAL readers never block
on the writer).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from policyagent.model.errors import AlreadyExistsError, ConflictError, PolicyError, StoreError
from policyagent.model.objects import Kind, StoreObject, describe, kind_of, name_key
from policyagent.model.view import RuleUse
from policyagent.model.writes import Mutation, plan_writes
from policyagent.pb import pb
from policyagent.store.base import ChangeRecord, PlanFn, PolicyStore, WriteResult

# PRAGMA application_id marks the file as ours ("PAGS"), so we never adopt (or
# switch to WAL, which rewrites the header) some other program's database.
APPLICATION_ID = 0x50414753
# PRAGMA user_version: the schema version. Bump it and add a step to
# _MIGRATIONS when the schema changes.
SCHEMA_VERSION = 1

# Kinds as stored. Kind.value is wording for messages and may change; these
# tokens are part of the file format and must not.
_KIND_TOKEN: dict[Kind, str] = {
    Kind.POLICY: "policy",
    Kind.FILTER_LIST: "filter_list",
    Kind.FILTER_ACTION: "filter_action",
}
_TOKEN_KIND: dict[str, Kind] = {token: kind for kind, token in _KIND_TOKEN.items()}

_SCHEMA_V1 = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value NOT NULL
) WITHOUT ROWID;

CREATE TABLE objects (
    kind             TEXT    NOT NULL CHECK (kind IN ('policy', 'filter_list', 'filter_action')),
    id               TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    name_key         TEXT    NOT NULL,
    revision         INTEGER NOT NULL CHECK (revision > 0),
    modified_unix_ms INTEGER NOT NULL,
    data             BLOB    NOT NULL,
    PRIMARY KEY (kind, id),
    UNIQUE (kind, name_key)
);

-- One row per reference from a rule to a filter list or filter action. The
-- foreign keys are a backstop behind the planner (which refuses deletes of
-- objects in use and the validator, which refuses dangling references); they
-- are deferred so a write may create a filter list and the rule using it in
-- any order.
CREATE TABLE rule_refs (
    policy_kind TEXT    NOT NULL DEFAULT 'policy' CHECK (policy_kind = 'policy'),
    policy_id   TEXT    NOT NULL,
    rule_index  INTEGER NOT NULL,
    rule_name   TEXT    NOT NULL,
    target_kind TEXT    NOT NULL CHECK (target_kind IN ('filter_list', 'filter_action')),
    target_id   TEXT    NOT NULL,
    PRIMARY KEY (policy_kind, policy_id, rule_index, target_kind),
    FOREIGN KEY (policy_kind, policy_id) REFERENCES objects (kind, id) DEFERRABLE INITIALLY DEFERRED,
    FOREIGN KEY (target_kind, target_id) REFERENCES objects (kind, id) DEFERRABLE INITIALLY DEFERRED
) WITHOUT ROWID;
CREATE INDEX rule_refs_target ON rule_refs (target_kind, target_id);

CREATE TABLE changelog (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    time_unix_ms INTEGER NOT NULL,
    principal    TEXT    NOT NULL,
    operation    TEXT    NOT NULL CHECK (operation IN ('create', 'update', 'delete', 'assign', 'unassign')),
    kind         TEXT    NOT NULL,
    object_id    TEXT    NOT NULL,
    object_name  TEXT    NOT NULL,
    revision     INTEGER NOT NULL,
    context      TEXT    NOT NULL
);
-- The change log drives pushes and is the audit trail: rows are never changed.
CREATE TRIGGER changelog_no_update BEFORE UPDATE ON changelog
BEGIN SELECT RAISE(ABORT, 'the change log is append-only'); END;
CREATE TRIGGER changelog_no_delete BEFORE DELETE ON changelog
BEGIN SELECT RAISE(ABORT, 'the change log is append-only'); END;

INSERT INTO meta (key, value) VALUES ('revision', 0), ('initialized', 0);
"""

# policy_kind is named so the primary key index is used (it leads the key).
_DELETE_RULE_REFS = "DELETE FROM rule_refs WHERE policy_kind = 'policy' AND policy_id = ?"

# user_version → SQL that upgrades the schema from that version to the next.
_MIGRATIONS: dict[int, str] = {}

# SQLite primary result codes (sqlite3.h) that we turn into specific messages.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

# Idle reader connections kept open; more are opened on demand under load.
_MAX_IDLE_READERS = 4


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SecretSealer(Protocol):
    """Encrypts pre-shared keys at rest (policyagent.pki.secretbox.SecretBox is the one the server uses)."""

    key_id: str

    def seal(self, plaintext: str, context: str) -> str: ...

    def open(self, value: str, context: str) -> str: ...


# Sealed values start with this (policyagent.pki.secretbox.SEALED_PREFIX).
_SEALED_PREFIX = "enc:v1:"
# meta key naming the key that sealed this store's pre-shared keys (absent: stored in clear).
_META_SECRETS_KEY = "secrets_key_id"


def _psk_methods(policy: pb.Policy) -> Iterator[pb.PresharedKeyAuth]:
    for methods in [*(rule.auth_methods for rule in policy.rules), policy.default_response_rule.auth_methods]:
        for method in methods:
            if method.WhichOneof("method") == "preshared_key":
                yield method.preshared_key


def _psk_context(policy: pb.Policy) -> str:
    # Binds a sealed key to its policy: it cannot be copied into another one.
    return f"policyagent psk {policy.id}"


def _parse(kind: Kind, data: bytes, box: SecretSealer | None = None) -> StoreObject:
    obj = kind.message_type()
    obj.ParseFromString(data)
    if isinstance(obj, pb.Policy):
        _open_secrets(obj, box)
    return obj


def _open_secrets(policy: pb.Policy, box: SecretSealer | None) -> None:
    """Decrypt the policy's sealed pre-shared keys in place; never hand out ciphertext as a key."""
    for psk in _psk_methods(policy):
        if psk.key.startswith(_SEALED_PREFIX):
            if box is None:
                raise StoreError("the store's pre-shared keys are encrypted; open it with the server's secrets key")
            try:
                psk.key = box.open(psk.key, _psk_context(policy))
            except ValueError as exc:
                raise StoreError(f"cannot decrypt a pre-shared key of policy {policy.name!r}: {exc}") from exc


def _serialize(obj: StoreObject, box: SecretSealer | None) -> bytes:
    """The bytes stored for `obj`: pre-shared keys sealed when the store has a box."""
    if box is not None and isinstance(obj, pb.Policy) and any(True for _ in _psk_methods(obj)):
        sealed = pb.Policy()
        sealed.CopyFrom(obj)
        for psk in _psk_methods(sealed):
            psk.key = box.seal(psk.key, _psk_context(sealed))
        return sealed.SerializeToString(deterministic=True)
    return obj.SerializeToString(deterministic=True)


class _TransactionView:
    """A StoreView over a connection inside its open transaction (what the planner sees)."""

    def __init__(self, conn: sqlite3.Connection, box: SecretSealer | None = None) -> None:
        self._conn = conn
        self._box = box

    # Every get() parses a fresh message: a PlanFn may edit what it reads and
    # hand it back as a Put, which must not change what the planner compares it with.
    def get(self, kind: Kind, object_id: str) -> StoreObject | None:
        row = self._conn.execute(
            "SELECT data FROM objects WHERE kind = ? AND id = ?", (_KIND_TOKEN[kind], object_id)
        ).fetchone()
        return None if row is None else _parse(kind, row[0], self._box)

    def id_for_name(self, kind: Kind, name: str) -> str | None:
        row = self._conn.execute(
            "SELECT id FROM objects WHERE kind = ? AND name_key = ?", (_KIND_TOKEN[kind], name_key(name))
        ).fetchone()
        return None if row is None else str(row[0])

    def ids(self, kind: Kind) -> list[str]:
        rows = self._conn.execute(
            "SELECT id FROM objects WHERE kind = ? ORDER BY name_key, id", (_KIND_TOKEN[kind],)
        ).fetchall()
        return [str(row[0]) for row in rows]

    def users(self, kind: Kind, object_id: str) -> list[RuleUse]:
        if kind is Kind.POLICY:
            return []
        rows = self._conn.execute(
            "SELECT r.policy_id, p.name, r.rule_index, r.rule_name"
            " FROM rule_refs AS r JOIN objects AS p ON p.kind = 'policy' AND p.id = r.policy_id"
            " WHERE r.target_kind = ? AND r.target_id = ?"
            " ORDER BY p.name_key, r.policy_id, r.rule_index",
            (_KIND_TOKEN[kind], object_id),
        ).fetchall()
        return [RuleUse(str(pid), str(pname), int(index), str(rname)) for pid, pname, index, rname in rows]


class SqliteStore(PolicyStore):
    """A PolicyStore in one SQLite database file (WAL mode, durable commits, 0600)."""

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 5.0,
        clock_ms: Callable[[], int] = _now_ms,
        secret_box: SecretSealer | None = None,
    ) -> None:
        """Open the store at `path`, creating the file (mode 0600) and its directory if needed.

        With `secret_box`, pre-shared keys are sealed before they are written and
        opened after they are read (a store written in clear is sealed on first
        open with a box); a store sealed with a key cannot be opened without that key.

        `busy_timeout_s` is how long a call waits for another process's write
        lock before raising StoreError; `clock_ms` gives modification and change
        log times (injectable for tests). Raises StoreError if the file is not a
        policyagent store, is from a newer version, is corrupt or stays locked.
        """
        self._path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._clock_ms = clock_ms
        self._write_lock = threading.Lock()
        self._writer_thread: int | None = None
        self._pool_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._closed = False
        self._box = secret_box
        with self._errors():
            self._create_file()
            self._writer = self._connect(reader=False)
            try:
                self._open_schema(self._writer)
                self._check_secrets_key(self._writer)
            except BaseException:
                self._writer.close()
                raise

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # ------------------------------------------------------------ opening

    def _create_file(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Created here rather than by SQLite so it is never readable by
            # others, not even for a moment: it holds pre-shared keys. SQLite
            # gives the -wal and -shm files the same mode as the database.
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        os.close(fd)

    def _connect(self, *, reader: bool) -> sqlite3.Connection:
        # isolation_level=None: the sqlite3 module opens no transactions behind
        # our back; we issue BEGIN/COMMIT ourselves. check_same_thread=False:
        # connections are handed between threads, always under a lock.
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            if reader:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_schema(self, conn: sqlite3.Connection) -> None:
        # Look before changing anything: switching to WAL rewrites the header,
        # which must not happen to somebody else's database.
        self._check_identity(conn)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StoreError(f"store {self._path}: cannot switch to WAL mode (journal mode is {mode})")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Again under the write lock: another process may have created the
            # schema between our first look and now.
            version = self._check_identity(conn)
            if version == 0:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                for statement in _split_sql(_SCHEMA_V1):
                    conn.execute(statement)
                version = SCHEMA_VERSION
            while version < SCHEMA_VERSION:
                for statement in _split_sql(_MIGRATIONS[version]):
                    conn.execute(statement)
                version += 1
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _check_secrets_key(self, conn: sqlite3.Connection) -> None:
        """Check the store's secrets key against ours; seal a clear store's keys on first open with a box."""
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_META_SECRETS_KEY,)).fetchone()
        sealed_by = None if row is None else str(row[0])
        box = self._box
        if box is None:
            if sealed_by is not None:
                raise StoreError(
                    f"store {self._path} keeps its pre-shared keys encrypted (key {sealed_by}); "
                    "open it with the server's secrets key (<data-dir>/pki/secrets.key)"
                )
            return
        if sealed_by == box.key_id:
            return
        if sealed_by is not None:
            raise StoreError(
                f"store {self._path} was encrypted with secrets key {sealed_by}, not this server's {box.key_id}"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute("SELECT id, data FROM objects WHERE kind = 'policy'").fetchall()
            for object_id, data in rows:
                policy = pb.Policy()
                policy.ParseFromString(data)
                conn.execute(
                    "UPDATE objects SET data = ? WHERE kind = 'policy' AND id = ?", (_serialize(policy, box), object_id)
                )
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_META_SECRETS_KEY, box.key_id))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _check_identity(self, conn: sqlite3.Connection) -> int:
        """The schema version of the file (0 if empty and new); raises StoreError if it is not ours."""
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if app_id == 0 and version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if tables == 0:
                return 0
            raise StoreError(f"{self._path} is an SQLite database but not a policyagent store")
        if app_id != APPLICATION_ID:
            raise StoreError(f"{self._path} is an SQLite database but not a policyagent store")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self._path} has schema version {version}, written by a newer policyagent; "
                f"this version understands up to {SCHEMA_VERSION}"
            )
        if version < 1 or (version < SCHEMA_VERSION and version not in _MIGRATIONS):
            raise StoreError(f"store {self._path} has unknown schema version {version}")
        return version

    # ------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn sqlite3 errors into StoreError naming the file; let the model's errors through."""
        try:
            yield
        except PolicyError:
            raise
        except sqlite3.Error as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: sqlite3.Error) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return StoreError(
                f"store {self._path} is locked by another writer "
                f"(waited {self._busy_timeout_s:g} s); try again later"
            )
        if code == _SQLITE_NOTADB:
            return StoreError(f"{self._path} is not a policyagent store (not an SQLite database, or encrypted)")
        if isinstance(exc, sqlite3.IntegrityError):
            # Only reachable if the planner or validator let something through
            # (e.g. a rule naming a missing filter list): a bug, but the file is safe.
            return StoreError(
                f"store {self._path}: the write would break the store's integrity ({exc}); nothing was written"
            )
        if code == _SQLITE_CORRUPT:
            return StoreError(f"store {self._path} is corrupt ({exc}); restore it from a backup")
        return StoreError(f"store {self._path}: {exc}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self._path} is closed")

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            self._check_open()
            conn = self._idle_readers.pop() if self._idle_readers else None
        if conn is None:
            conn = self._connect(reader=True)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                _rollback(conn)
            with self._pool_lock:
                keep = not self._closed and len(self._idle_readers) < _MAX_IDLE_READERS
                if keep:
                    self._idle_readers.append(conn)
            if not keep:
                conn.close()

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """The writer connection inside BEGIN IMMEDIATE; rolled back if the block raises.

        The block commits (or, for a dry run, rolls back) itself.
        """
        if self._writer_thread == threading.get_ident():
            # A PlanFn that writes to the store it is planning for would wait
            # for itself forever.
            raise StoreError(f"store {self._path}: write() called from inside a write (a PlanFn must not write)")
        with self._write_lock:
            self._check_open()
            self._writer_thread = threading.get_ident()
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    _rollback(conn)
                    raise
                if conn.in_transaction:  # the block forgot to finish: never leave it open
                    _rollback(conn)
            finally:
                self._writer_thread = None

    # ------------------------------------------------------------ reads

    def snapshot(self) -> tuple[pb.StoreContents, int]:
        """Every object (secrets included) and the store revision, from one read transaction.

        Objects are ordered by name (ignoring case), then id, within each kind.
        """
        contents = pb.StoreContents()
        with self._errors(), self._reader() as conn:
            conn.execute("BEGIN")
            rows = conn.execute("SELECT kind, data FROM objects ORDER BY kind, name_key, id").fetchall()
            revision = _meta_int(conn, "revision")
            conn.execute("COMMIT")
        for token, data in rows:
            kind = _TOKEN_KIND[token]
            if kind is Kind.POLICY:
                policy = contents.policies.add()
                policy.ParseFromString(data)
                _open_secrets(policy, self._box)
            elif kind is Kind.FILTER_LIST:
                contents.filter_lists.add().ParseFromString(data)
            else:
                contents.filter_actions.add().ParseFromString(data)
        return contents, revision

    def get(self, kind: Kind, object_id: str) -> StoreObject | None:
        """The object of this kind with this id, if any (a copy: editing it changes nothing)."""
        with self._errors(), self._reader() as conn:
            return _TransactionView(conn, self._box).get(kind, object_id)

    def find(self, kind: Kind, name: str) -> StoreObject | None:
        """The object of this kind with this name (case-insensitive), if any."""
        with self._errors(), self._reader() as conn:
            row = conn.execute(
                "SELECT data FROM objects WHERE kind = ? AND name_key = ?", (_KIND_TOKEN[kind], name_key(name))
            ).fetchone()
        return None if row is None else _parse(kind, row[0], self._box)

    def changes(self, after_seq: int = 0, limit: int = 1000) -> list[ChangeRecord]:
        """Change log entries with seq > after_seq, oldest first, at most `limit`."""
        with self._errors(), self._reader() as conn:
            rows = conn.execute(
                "SELECT seq, time_unix_ms, principal, operation, kind, object_id, object_name, revision, context"
                " FROM changelog WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            ChangeRecord(
                seq=int(seq),
                time_unix_ms=int(when),
                principal=str(principal),
                operation=str(operation),
                kind=_TOKEN_KIND[token],
                object_id=str(object_id),
                object_name=str(object_name),
                revision=int(revision),
                context=str(context),
            )
            for seq, when, principal, operation, token, object_id, object_name, revision, context in rows
        ]

    def revision(self) -> int:
        """The store revision: the revision given to the last committed write, 0 if none."""
        with self._errors(), self._reader() as conn:
            return _meta_int(conn, "revision")

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity check and the foreign key check find wrong; empty when healthy.

        Reads the whole file: for `policyagent` health commands and tests, not every open.
        """
        with self._errors(), self._reader() as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
            problems = [str(row[0]) for row in rows if str(row[0]) != "ok"]
            for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchall():
                problems.append(f"{table} row {rowid} refers to a missing row of {parent}")
        return problems

    # ------------------------------------------------------------ writes

    def write(
        self,
        mutations: Sequence[Mutation] | PlanFn,
        *,
        principal: str,
        context: str = "",
        dry_run: bool = False,
    ) -> WriteResult:
        """Plan, validate and commit the mutations as one transaction, or raise and write nothing.

        Every object written gets the new store revision (the old one + 1) and
        the current time; the change log gets one entry per object written or
        deleted. A write whose plan is empty changes nothing, not even the store
        revision. With dry_run everything is done except the commit, and the
        result shows what the write would have stored.
        """
        with self._errors(), self._write_transaction() as conn:
            result = self._apply(conn, mutations, principal=principal, context=context)
            conn.execute("ROLLBACK" if dry_run else "COMMIT")
            return result

    def initialize(self, seed: PlanFn, *, principal: str) -> bool:
        """Run `seed` once in the store's life, in the same transaction that records it ran.

        True if it ran now; False if it had run before (in this or an earlier process).
        """
        with self._errors(), self._write_transaction() as conn:
            if _meta_int(conn, "initialized"):
                conn.execute("ROLLBACK")
                return False
            self._apply(conn, seed, principal=principal, context="initialize store")
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'initialized'")
            conn.execute("COMMIT")
            return True

    def _apply(
        self,
        conn: sqlite3.Connection,
        mutations: Sequence[Mutation] | PlanFn,
        *,
        principal: str,
        context: str,
    ) -> WriteResult:
        """Plan and write inside the open transaction; the caller commits or rolls back."""
        view = _TransactionView(conn, self._box)
        requested = mutations(view) if callable(mutations) else mutations
        plan = plan_writes(view, list(requested))
        old_revision = _meta_int(conn, "revision")
        if plan.empty:
            return WriteResult([], [], old_revision)
        revision = old_revision + 1
        now = self._clock_ms()

        # Deletes first, so the names they free can be taken in this write.
        for deleted in plan.deletes:
            token = _KIND_TOKEN[deleted.kind]
            if deleted.kind is Kind.POLICY:
                conn.execute(_DELETE_RULE_REFS, (deleted.object_id,))
            conn.execute("DELETE FROM objects WHERE kind = ? AND id = ?", (token, deleted.object_id))

        # SQLite checks UNIQUE(kind, name_key) after each statement, not at
        # commit, so renamed objects first give up their old names: a swap of
        # two names is valid (the validator checked the state after the write)
        # but would otherwise collide half-way.
        for planned in plan.puts:
            if planned.obj.revision:
                obj = planned.obj
                conn.execute(
                    "UPDATE objects SET name_key = ? WHERE kind = ? AND id = ? AND name_key <> ?",
                    ("\x00" + obj.id, _KIND_TOKEN[kind_of(obj)], obj.id, name_key(obj.name)),
                )

        written: list[StoreObject] = []
        log: list[tuple[object, ...]] = []
        for planned in plan.puts:
            obj = planned.obj  # the planner's own copy: ours to finish
            kind = kind_of(obj)
            token = _KIND_TOKEN[kind]
            old = obj.revision
            obj.revision = revision
            obj.modified_unix_ms = now
            row = (obj.name, name_key(obj.name), revision, now, _serialize(obj, self._box))
            if old == 0:
                sql = (
                    "INSERT INTO objects (name, name_key, revision, modified_unix_ms, data, kind, id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)"
                )
                params: tuple[object, ...] = (*row, token, obj.id)
            else:
                sql = (
                    "UPDATE objects SET name = ?, name_key = ?, revision = ?, modified_unix_ms = ?, data = ?"
                    " WHERE kind = ? AND id = ? AND revision = ?"
                )
                params = (*row, token, obj.id, old)
            try:
                cursor = conn.execute(sql, params)
            except sqlite3.IntegrityError as exc:
                # The planner (ids) and the validator (names) should have
                # refused this; the constraints are the last line of defence.
                raise AlreadyExistsError(f"{describe(obj)}: another {kind.value} has its id or name") from exc
            if cursor.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; checked all the same
                raise ConflictError(f"{describe(obj)} was changed by someone else; read it again and retry")
            if isinstance(obj, pb.Policy):
                if old:
                    conn.execute(_DELETE_RULE_REFS, (obj.id,))
                conn.executemany(
                    "INSERT INTO rule_refs (policy_id, rule_index, rule_name, target_kind, target_id)"
                    " VALUES (?, ?, ?, ?, ?)",
                    _rule_refs(obj),
                )
            written.append(obj)
            log.append((now, principal, planned.operation, token, obj.id, obj.name, revision, context))
        for deleted in plan.deletes:
            token = _KIND_TOKEN[deleted.kind]
            log.append((now, principal, "delete", token, deleted.object_id, deleted.name, revision, context))
        conn.executemany(
            "INSERT INTO changelog"
            " (time_unix_ms, principal, operation, kind, object_id, object_name, revision, context)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            log,
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
        return WriteResult(written, list(plan.deletes), revision)

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Close every connection; later calls raise StoreError. Closing twice is harmless."""
        with self._write_lock:
            with self._pool_lock:
                if self._closed:
                    return
                self._closed = True
                idle, self._idle_readers = self._idle_readers, []
            for conn in idle:
                conn.close()
            # Readers in use are closed as they are handed back (see _reader).
            self._writer.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _rule_refs(policy: pb.Policy) -> Iterator[tuple[str, int, str, str, str]]:
    for index, rule in enumerate(policy.rules, start=1):
        if rule.filter_list_id:
            yield (policy.id, index, rule.name, "filter_list", rule.filter_list_id)
        if rule.filter_action_id:
            yield (policy.id, index, rule.name, "filter_action", rule.filter_action_id)


def _meta_int(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise StoreError(f"store metadata is missing {key!r}")
    return int(row[0])


def _rollback(conn: sqlite3.Connection) -> None:
    # ROLLBACK fails if SQLite already rolled back on its own (e.g. after an
    # I/O error); the transaction is gone either way, and the original error
    # is the one to report.
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _split_sql(script: str) -> list[str]:
    """Statements of a schema script, for executing one by one inside our transaction.

    (executescript() would COMMIT first.) Trigger bodies contain semicolons, so
    statements are collected until sqlite3.complete_statement says they end.
    """
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending!r}")
    return statements
