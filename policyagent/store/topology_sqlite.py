"""The SQLite TopologyStore: <data-dir>/topology.sqlite3, next to (not inside) the policy store.

Kept in its own file so the registry's schema evolves apart from the policy
store's (and the directory issue can later replace it by an LDAP-fed cache).
Same durability as the policy store: WAL, synchronous=FULL, one BEGIN IMMEDIATE
transaction per write, the file created 0600 and marked with its own
application_id. Each mutation is checked against the registry as the earlier
mutations of the same write left it (the transaction sees its own writes);
any error rolls the whole write back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from policyagent.model.assignment import (
    DEFAULT_WORKGROUP,
    Computer,
    Gpo,
    GpoLink,
    Group,
    OrgUnit,
    Scope,
    ScopeKind,
    Site,
    Topology,
    canonical_computer_name,
    canonical_domain,
    canonical_filter,
    check_domain_name,
    check_name,
    key_of,
    parse_dn,
    validate_computer,
    validate_gpo,
    validate_link,
)
from policyagent.model.errors import (
    AlreadyExistsError,
    ConflictError,
    InUseError,
    NotFoundError,
    PolicyError,
    StoreError,
    ValidationError,
    Violation,
)
from policyagent.model.objects import new_id, normalize_id
from policyagent.store.topology import (
    COMPUTER,
    GPO,
    GROUP,
    LINK,
    OU,
    SITE,
    DeleteObject,
    ObjectChange,
    PutObject,
    TopologyChangeRecord,
    TopologyMutation,
    TopologyObject,
    TopologyStore,
    TopologyWriteResult,
    UpsertComputer,
    key_text,
    kind_of,
    link_key,
)

APPLICATION_ID = 0x50414754  # "PAGT"
SCHEMA_VERSION = 2
TOPOLOGY_FILE = "topology.sqlite3"

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID;
CREATE TABLE ous (
    key TEXT PRIMARY KEY, dn TEXT NOT NULL, parent_key TEXT NOT NULL, domain TEXT NOT NULL,
    block_inheritance INTEGER NOT NULL, description TEXT NOT NULL, revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX ous_parent ON ous (parent_key);
CREATE INDEX ous_domain ON ous (domain);
CREATE TABLE sites (key TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL,
    revision INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE groups (key TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL,
    revision INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE computers (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, membership TEXT NOT NULL CHECK (membership IN ('domain', 'workgroup')),
    domain TEXT NOT NULL, ou_key TEXT NOT NULL, ou TEXT NOT NULL, site_key TEXT NOT NULL, site TEXT NOT NULL,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX computers_ou ON computers (ou_key);
CREATE INDEX computers_site ON computers (site_key);
CREATE INDEX computers_domain ON computers (domain);
CREATE TABLE computer_groups (computer_key TEXT NOT NULL, group_key TEXT NOT NULL,
    PRIMARY KEY (computer_key, group_key)) WITHOUT ROWID;
CREATE INDEX computer_groups_group ON computer_groups (group_key);
CREATE TABLE gpos (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, name_key TEXT NOT NULL UNIQUE, enabled INTEGER NOT NULL,
    policy_id TEXT NOT NULL, description TEXT NOT NULL, revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE links (
    gpo_id TEXT NOT NULL, scope_kind TEXT NOT NULL, scope_key TEXT NOT NULL, scope_name TEXT NOT NULL,
    link_order INTEGER NOT NULL, enforced INTEGER NOT NULL, enabled INTEGER NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (gpo_id, scope_kind, scope_key)
) WITHOUT ROWID;
CREATE INDEX links_scope ON links (scope_kind, scope_key);
CREATE TABLE changelog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time_unix_ms INTEGER NOT NULL, principal TEXT NOT NULL,
    operation TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, revision INTEGER NOT NULL,
    context TEXT NOT NULL
);
CREATE TRIGGER changelog_no_update BEFORE UPDATE ON changelog
BEGIN SELECT RAISE(ABORT, 'the change log is append-only'); END;
CREATE TRIGGER changelog_no_delete BEFORE DELETE ON changelog
BEGIN SELECT RAISE(ABORT, 'the change log is append-only'); END;
INSERT INTO meta (key, value) VALUES ('revision', 0);
"""

# v2: GPO security filtering. The filter is a JSON list of group names (registry spelling);
# "[]" = everyone. Files written by v1 get the column on open (see _migrate).
_GPO_FILTER_COLUMN = "ALTER TABLE gpos ADD COLUMN security_filter TEXT NOT NULL DEFAULT '[]'"


def _decode_filter(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    value = json.loads(text)
    return tuple(str(g) for g in value) if isinstance(value, list) else ()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _split_sql(script: str) -> list[str]:
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and not line.strip():
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return statements


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _quoted(kind: str, key: str) -> str:
    return f'{"GPO" if kind == GPO else kind} "{key}"'


# ------------------------------------------------------------------ row readers


class _Reader:
    """Reads of one connection (inside a transaction when writing)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def computer(self, key: str) -> Computer | None:
        row = self.conn.execute(
            "SELECT name, membership, domain, ou, site, revision FROM computers WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        groups = self.conn.execute(
            "SELECT g.name FROM computer_groups AS cg JOIN groups AS g ON g.key = cg.group_key"
            " WHERE cg.computer_key = ?",
            (key,),
        ).fetchall()
        name, membership, domain, ou, site, revision = row
        return Computer(name, membership, domain, ou, site, frozenset(str(g[0]) for g in groups), int(revision))

    def org_unit(self, key: str) -> OrgUnit | None:
        row = self.conn.execute(
            "SELECT dn, block_inheritance, description, revision FROM ous WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else OrgUnit(str(row[0]), bool(row[1]), str(row[2]), int(row[3]))

    def site(self, key: str) -> Site | None:
        row = self.conn.execute("SELECT name, description, revision FROM sites WHERE key = ?", (key,)).fetchone()
        return None if row is None else Site(str(row[0]), str(row[1]), int(row[2]))

    def group(self, key: str) -> Group | None:
        row = self.conn.execute("SELECT name, description, revision FROM groups WHERE key = ?", (key,)).fetchone()
        return None if row is None else Group(str(row[0]), str(row[1]), int(row[2]))

    def gpo(self, gpo_id: str) -> Gpo | None:
        row = self.conn.execute(
            "SELECT id, name, enabled, policy_id, description, revision, security_filter FROM gpos WHERE id = ?",
            (gpo_id,),
        ).fetchone()
        if row is None:
            return None
        return Gpo(
            str(row[0]),
            str(row[1]),
            bool(row[2]),
            str(row[3]),
            str(row[4]),
            int(row[5]),
            security_filter=_decode_filter(str(row[6])),
        )

    def gpos_filtering_on(self, group_key: str) -> list[str]:
        """Names of the GPOs whose security filter names the group."""
        rows = self.conn.execute("SELECT name, security_filter FROM gpos WHERE security_filter != '[]'").fetchall()
        return sorted(
            (str(r[0]) for r in rows if any(key_of(g) == group_key for g in _decode_filter(str(r[1])))),
            key=key_of,
        )

    def gpo_by_name(self, name: str) -> Gpo | None:
        row = self.conn.execute("SELECT id FROM gpos WHERE name_key = ?", (key_of(name),)).fetchone()
        return None if row is None else self.gpo(str(row[0]))

    def link(self, gpo_id: str, scope: Scope) -> GpoLink | None:
        kind, skey = scope.key
        row = self.conn.execute(
            "SELECT link_order, enforced, enabled, revision FROM links"
            " WHERE gpo_id = ? AND scope_kind = ? AND scope_key = ?",
            (gpo_id, kind, skey),
        ).fetchone()
        if row is None:
            return None
        return GpoLink(gpo_id, scope, int(row[0]), bool(row[1]), bool(row[2]), int(row[3]))

    def links_at(self, scope: Scope) -> list[GpoLink]:
        kind, skey = scope.key
        rows = self.conn.execute(
            "SELECT gpo_id, link_order, enforced, enabled, revision FROM links"
            " WHERE scope_kind = ? AND scope_key = ? ORDER BY link_order, gpo_id",
            (kind, skey),
        ).fetchall()
        return [GpoLink(str(r[0]), scope, int(r[1]), bool(r[2]), bool(r[3]), int(r[4])) for r in rows]

    def links_of_gpo(self, gpo_id: str) -> list[GpoLink]:
        rows = self.conn.execute(
            "SELECT scope_kind, scope_name, link_order, enforced, enabled, revision FROM links WHERE gpo_id = ?",
            (gpo_id,),
        ).fetchall()
        return [
            GpoLink(gpo_id, _scope(str(r[0]), str(r[1])), int(r[2]), bool(r[3]), bool(r[4]), int(r[5])) for r in rows
        ]

    def count(self, sql: str, *params: object) -> int:
        return int(self.conn.execute(sql, params).fetchone()[0])

    def topology(self) -> Topology:
        computers = [
            self.computer(str(r[0])) for r in self.conn.execute("SELECT key FROM computers ORDER BY key").fetchall()
        ]
        ous = [self.org_unit(str(r[0])) for r in self.conn.execute("SELECT key FROM ous ORDER BY key").fetchall()]
        sites = [self.site(str(r[0])) for r in self.conn.execute("SELECT key FROM sites ORDER BY key").fetchall()]
        groups = [self.group(str(r[0])) for r in self.conn.execute("SELECT key FROM groups ORDER BY key").fetchall()]
        gpos = [self.gpo(str(r[0])) for r in self.conn.execute("SELECT id FROM gpos ORDER BY name_key").fetchall()]
        links = [
            GpoLink(str(r[0]), _scope(str(r[1]), str(r[2])), int(r[3]), bool(r[4]), bool(r[5]), int(r[6]))
            for r in self.conn.execute(
                "SELECT gpo_id, scope_kind, scope_name, link_order, enforced, enabled, revision FROM links"
                " ORDER BY scope_kind, scope_key, link_order"
            ).fetchall()
        ]
        return Topology.build(
            [c for c in computers if c],
            [o for o in ous if o],
            [s for s in sites if s],
            [g for g in groups if g],
            [g for g in gpos if g],
            links,
        )


def _scope(kind: str, name: str) -> Scope:
    return Scope(ScopeKind(kind), name)


# ------------------------------------------------------------------ the store


class SqliteTopologyStore(TopologyStore):
    """A TopologyStore in one SQLite file (WAL, durable commits, 0600).

    `policy_exists(policy_id) -> bool`, when given, is asked whether a GPO's IPsec
    policy exists when the GPO is written (the policy store is another file).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        policy_exists: Callable[[str], bool] | None = None,
        busy_timeout_s: float = 5.0,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self._path = Path(path)
        self._policy_exists = policy_exists
        self._busy_timeout_s = busy_timeout_s
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._closed = False
        with self._errors():
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self._conn = sqlite3.connect(
                self._path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            try:
                self._open_schema()
            except BaseException:
                self._conn.close()
                raise

    @property
    def path(self) -> Path:
        return self._path

    def set_policy_exists(self, policy_exists: Callable[[str], bool]) -> None:
        self._policy_exists = policy_exists

    def _open_schema(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA synchronous = FULL")
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = int(conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0])
        if (app_id, version) == (0, 0) and tables:
            raise StoreError(f"{self._path} is an SQLite database but not a policyagent topology store")
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{self._path} is an SQLite database but not a policyagent topology store")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self._path} was written by a newer policyagent (schema {version})")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StoreError(f"topology store {self._path}: cannot switch to WAL mode")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) == 0:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                for statement in _split_sql(_SCHEMA_V1):
                    conn.execute(statement)
                conn.execute("PRAGMA user_version = 1")
            self._migrate(conn)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Bring a v1 file to the current schema (inside the open transaction): add what is missing."""
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(gpos)").fetchall()}
        if "security_filter" not in columns:
            conn.execute(_GPO_FILTER_COLUMN)
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except PolicyError:
            raise
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in (5, 6):
                raise StoreError(f"topology store {self._path} is locked by another writer; try again") from exc
            raise StoreError(f"topology store {self._path}: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"topology store {self._path} is closed")

    # ------------------------------------------------------------ reads

    def snapshot(self) -> tuple[Topology, int]:
        with self._errors(), self._lock:
            self._check_open()
            self._conn.execute("BEGIN")
            try:
                topology = _Reader(self._conn).topology()
                revision = self._revision()
            finally:
                _rollback(self._conn)
        return topology, revision

    def get_computer(self, name: str) -> Computer | None:
        with self._errors(), self._lock:
            self._check_open()
            return _Reader(self._conn).computer(key_of(name))

    def revision(self) -> int:
        with self._errors(), self._lock:
            self._check_open()
            return self._revision()

    def _revision(self) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])

    def changes(self, after_seq: int = 0, limit: int = 1000) -> list[TopologyChangeRecord]:
        with self._errors(), self._lock:
            self._check_open()
            rows = self._conn.execute(
                "SELECT seq, time_unix_ms, principal, operation, kind, key, revision, context FROM changelog"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            TopologyChangeRecord(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), int(r[6]), str(r[7]))
            for r in rows
        ]

    # ------------------------------------------------------------ writes

    def write(self, mutations: Sequence[TopologyMutation], *, principal: str, context: str = "") -> TopologyWriteResult:
        with self._errors(), self._lock:
            self._check_open()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                revision = self._revision() + 1
                writer = _Writer(conn, revision, self._policy_exists)
                for index, mutation in enumerate(mutations, start=1):
                    writer.apply(mutation, index)
                changes = writer.changes()
                if not changes:
                    conn.execute("ROLLBACK")
                    return TopologyWriteResult((), revision - 1)
                now = self._clock_ms()
                conn.executemany(
                    "INSERT INTO changelog (time_unix_ms, principal, operation, kind, key, revision, context)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            now,
                            principal,
                            "create" if c.before is None else "delete" if c.after is None else "update",
                            c.kind,
                            key_text(c.after if c.after is not None else c.before),  # type: ignore[arg-type]
                            revision,
                            context,
                        )
                        for c in changes
                    ],
                )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        return TopologyWriteResult(tuple(changes), revision)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()

    def __enter__(self) -> SqliteTopologyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Writer:
    """Applies mutations inside one transaction, recording each object's before and after."""

    def __init__(self, conn: sqlite3.Connection, revision: int, policy_exists: Callable[[str], bool] | None) -> None:
        self.conn = conn
        self.read = _Reader(conn)
        self.revision = revision
        self.policy_exists = policy_exists
        self._changes: dict[tuple[str, str], ObjectChange] = {}

    def changes(self) -> list[ObjectChange]:
        return [c for c in self._changes.values() if c.before != c.after]

    def _record(self, kind: str, key: str, before: TopologyObject | None, after: TopologyObject | None) -> None:
        first = self._changes.get((kind, key))
        self._changes[(kind, key)] = ObjectChange(kind, first.before if first else before, after)

    # ------------------------------------------------------------ dispatch

    def apply(self, mutation: TopologyMutation, index: int) -> None:
        if isinstance(mutation, UpsertComputer):
            self._upsert_computer(mutation)
        elif isinstance(mutation, PutObject):
            obj = mutation.obj
            if isinstance(obj, Computer):
                self._put_computer(obj, mutation.upsert)
            elif isinstance(obj, OrgUnit):
                self._put_ou(obj, mutation.upsert)
            elif isinstance(obj, Site):
                self._put_named(SITE, obj, mutation.upsert)
            elif isinstance(obj, Group):
                self._put_named(GROUP, obj, mutation.upsert)
            elif isinstance(obj, Gpo):
                self._put_gpo(obj, mutation.upsert)
            else:
                self._put_link(obj, mutation.upsert)
        else:
            self._delete(mutation, index)

    def _check_revision(
        self, kind: str, key: str, current: TopologyObject | None, obj_revision: int, upsert: bool
    ) -> None:
        if upsert:
            return
        if obj_revision == 0 and current is not None:
            raise AlreadyExistsError(f"{_quoted(kind, key)} already exists")
        if obj_revision != 0 and current is None:
            raise NotFoundError(f"{_quoted(kind, key)} does not exist")
        if current is not None and current.revision != obj_revision:
            raise ConflictError(
                f"{_quoted(kind, key)} was changed by someone else (stored revision {current.revision}, "
                f"yours {obj_revision}); nothing was written: read it again and retry"
            )

    # ------------------------------------------------------------ computers

    def _upsert_computer(self, m: UpsertComputer) -> None:
        name = canonical_computer_name(m.name)
        current = self.read.computer(key_of(name))
        domain = m.domain.strip() or (DEFAULT_WORKGROUP if m.membership == "workgroup" else "")
        computer = Computer(
            name,
            m.membership,
            domain,
            ou=current.ou if m.ou is None and current else (m.ou or ""),
            site=current.site if m.site is None and current else (m.site or ""),
            groups=current.groups if current else frozenset(),
        )
        self._put_computer(computer, upsert=True)

    def _put_computer(self, obj: Computer, upsert: bool) -> None:
        path = f'computer "{obj.name.strip()}"'
        validate_computer(obj, path)
        name = canonical_computer_name(obj.name)
        key = key_of(name)
        membership = obj.membership
        domain = canonical_domain(obj.domain) if membership == "domain" else (obj.domain.strip() or DEFAULT_WORKGROUP)
        ou = ""
        if obj.ou:
            ou = str(parse_dn(obj.ou, path=path))
            if self.read.org_unit(ou.casefold()) is None:
                raise ValidationError(Violation(path, "ou", f'there is no OU "{ou}" in the registry'))
        site = ""
        if obj.site:
            found_site = self.read.site(key_of(obj.site))
            if found_site is None:
                raise ValidationError(Violation(path, "site", f'there is no site "{obj.site.strip()}" in the registry'))
            site = found_site.name
        groups: set[str] = set()
        for group in obj.groups:
            found_group = self.read.group(key_of(group))
            if found_group is None:
                raise ValidationError(Violation(path, "groups", f'there is no group "{group.strip()}" in the registry'))
            groups.add(found_group.name)
        current = self.read.computer(key)
        self._check_revision(COMPUTER, name, current, obj.revision, upsert)
        new = Computer(name, membership, domain, ou, site, frozenset(groups), self.revision)
        if current is not None and dataclass_equal(current, new):
            return  # unchanged
        self.conn.execute(
            "INSERT OR REPLACE INTO computers (key, name, membership, domain, ou_key, ou, site_key, site, revision)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, name, membership, domain, ou.casefold(), ou, key_of(site), site, self.revision),
        )
        self.conn.execute("DELETE FROM computer_groups WHERE computer_key = ?", (key,))
        self.conn.executemany(
            "INSERT INTO computer_groups (computer_key, group_key) VALUES (?, ?)", [(key, key_of(g)) for g in groups]
        )
        self._record(COMPUTER, key, current, new)

    # ------------------------------------------------------------ OUs, sites, groups

    def _put_ou(self, obj: OrgUnit, upsert: bool) -> None:
        dn = parse_dn(obj.dn)
        path = f'OU "{dn}"'
        if len(obj.description) > 1024:
            raise ValidationError(Violation(path, "description", "is longer than 1024 characters"))
        parent = dn.parent
        if parent is not None and self.read.org_unit(parent.key) is None:
            raise ValidationError(
                Violation(path, "dn", f'the parent OU "{parent}" is not in the registry; add it first')
            )
        current = self.read.org_unit(dn.key)
        self._check_revision(OU, str(dn), current, obj.revision, upsert)
        new = OrgUnit(str(dn), obj.block_inheritance, obj.description, self.revision)
        if current is not None and dataclass_equal(current, new):
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO ous (key, dn, parent_key, domain, block_inheritance, description, revision)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                dn.key,
                str(dn),
                parent.key if parent else "",
                dn.domain,
                int(obj.block_inheritance),
                obj.description,
                self.revision,
            ),
        )
        self._record(OU, dn.key, current, new)

    def _put_named(self, kind: str, obj: Site | Group, upsert: bool) -> None:
        what = "site" if kind == SITE else "group"
        check_name(obj.name, what, path=f'{what} "{obj.name.strip()}"')
        key = key_of(obj.name)
        table = "sites" if kind == SITE else "groups"
        current: Site | Group | None = self.read.site(key) if kind == SITE else self.read.group(key)
        self._check_revision(kind, obj.name, current, obj.revision, upsert)
        new = type(obj)(obj.name, obj.description, self.revision)
        if current is not None and dataclass_equal(current, new):
            return
        self.conn.execute(
            f"INSERT OR REPLACE INTO {table} (key, name, description, revision) VALUES (?, ?, ?, ?)",
            (key, obj.name, obj.description, self.revision),
        )
        self._record(kind, key, current, new)
        if current is not None and current.name != obj.name and kind == SITE:
            # Renamed (same key, other case): computers and links show the new spelling.
            self.conn.execute("UPDATE computers SET site = ? WHERE site_key = ?", (obj.name, key))

    # ------------------------------------------------------------ GPOs and links

    def _put_gpo(self, obj: Gpo, upsert: bool) -> None:
        path = f'GPO "{obj.name.strip()}"'
        validate_gpo(obj, path)
        gpo_id = obj.id
        if gpo_id:
            try:
                gpo_id = normalize_id(gpo_id)
            except ValueError:
                raise ValidationError(Violation(path, "id", f'"{obj.id}" is not a GUID')) from None
        elif obj.revision == 0:
            gpo_id = new_id()
        else:
            raise ValidationError(Violation(path, "id", "give the id of the GPO to update"))
        policy_id = ""
        if obj.policy_id:
            try:
                policy_id = normalize_id(obj.policy_id)
            except ValueError:
                raise ValidationError(Violation(path, "policy", f'"{obj.policy_id}" is not a policy id')) from None
            if self.policy_exists is not None and not self.policy_exists(policy_id):
                raise ValidationError(Violation(path, "policy", f"there is no IPsec policy with id {policy_id}"))
        security_filter: list[str] = []
        for group in obj.security_filter:
            found_group = self.read.group(key_of(group))
            if found_group is None:
                raise ValidationError(
                    Violation(path, "security_filter", f'there is no group "{group.strip()}" in the registry')
                )
            security_filter.append(found_group.name)
        owner = self.read.gpo_by_name(obj.name)
        if owner is not None and owner.id != gpo_id:
            raise ValidationError(Violation(path, "name", f'another GPO is already named "{owner.name}"'))
        current = self.read.gpo(gpo_id)
        self._check_revision(GPO, obj.name, current, obj.revision, upsert)
        new = Gpo(
            gpo_id,
            obj.name,
            obj.enabled,
            policy_id,
            obj.description,
            self.revision,
            security_filter=canonical_filter(security_filter),
        )
        if current is not None and dataclass_equal(current, new):
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO gpos (id, name, name_key, enabled, policy_id, description, revision,"
            " security_filter) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                gpo_id,
                obj.name,
                key_of(obj.name),
                int(obj.enabled),
                policy_id,
                obj.description,
                self.revision,
                json.dumps(list(new.security_filter)),
            ),
        )
        self._record(GPO, gpo_id, current, new)

    def _canonical_scope(self, scope: Scope, path: str) -> Scope:
        """The scope with its canonical spelling; ValidationError (field "scope") if its target is unknown."""
        if scope.kind is ScopeKind.LOCAL:
            return Scope.local()
        if scope.kind is ScopeKind.SITE:
            site = self.read.site(key_of(scope.name))
            if site is None:
                raise ValidationError(Violation(path, "scope", f'there is no site "{scope.name}" in the registry'))
            return Scope.site(site.name)
        if scope.kind is ScopeKind.DOMAIN:
            check_domain_name(scope.name, field_name="scope", path=path)
            domain = canonical_domain(scope.name)
            known = self.read.count(
                "SELECT (SELECT count(*) FROM ous WHERE domain = ?) + (SELECT count(*) FROM computers"
                " WHERE membership = 'domain' AND domain = ?)",
                domain,
                domain,
            )
            if not known:
                workgroup = self.read.count(
                    "SELECT count(*) FROM computers WHERE membership = 'workgroup' AND upper(domain) = upper(?)",
                    scope.name.strip(),
                )
                hint = (
                    f' ("{scope.name.strip()}" is a workgroup: workgroup machines get GPOs only through an OU'
                    " of the registry or their site)"
                    if workgroup
                    else ""
                )
                raise ValidationError(
                    Violation(path, "scope", f"no OU or computer in the registry is in domain {domain}{hint}")
                )
            return Scope.domain(domain)
        dn = parse_dn(scope.name, field_name="scope", path=path)
        if self.read.org_unit(dn.key) is None:
            raise ValidationError(Violation(path, "scope", f'there is no OU "{dn}" in the registry'))
        return Scope.ou(dn)

    def _put_link(self, obj: GpoLink, upsert: bool) -> None:
        gpo = self._gpo_for_link(obj.gpo_id, f"link at {obj.scope}")
        path = f'link of GPO "{gpo.name}" at {obj.scope}'
        validate_link(obj, path)
        scope = self._canonical_scope(obj.scope, path)
        current = self.read.link(gpo.id, scope)
        self._check_revision(LINK, link_key(gpo.id, scope), current, obj.revision, upsert)
        others = [lk for lk in self.read.links_at(scope) if lk.gpo_id != gpo.id]
        position = len(others) if obj.order == 0 else min(obj.order, len(others) + 1) - 1
        if obj.order == 0 and current is not None:
            position = min(current.order, len(others) + 1) - 1  # keep its place
        ordered = [*others[:position], None, *others[position:]]
        for number, link in enumerate(ordered, start=1):
            if link is None:
                new = GpoLink(gpo.id, scope, number, obj.enforced, obj.enabled, self.revision)
                if current is not None and dataclass_equal(current, new):
                    continue
                self._write_link(new)
                self._record(LINK, link_key(gpo.id, scope), current, new)
            elif link.order != number:
                moved = GpoLink(link.gpo_id, scope, number, link.enforced, link.enabled, self.revision)
                self._write_link(moved)
                self._record(LINK, link_key(link.gpo_id, scope), link, moved)

    def _write_link(self, link: GpoLink) -> None:
        kind, skey = link.scope.key
        self.conn.execute(
            "INSERT OR REPLACE INTO links (gpo_id, scope_kind, scope_key, scope_name, link_order, enforced, enabled,"
            " revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                link.gpo_id,
                kind,
                skey,
                link.scope.name,
                link.order,
                int(link.enforced),
                int(link.enabled),
                link.revision,
            ),
        )

    def _remove_link(self, link: GpoLink) -> None:
        kind, skey = link.scope.key
        self.conn.execute(
            "DELETE FROM links WHERE gpo_id = ? AND scope_kind = ? AND scope_key = ?", (link.gpo_id, kind, skey)
        )
        self._record(LINK, link_key(link.gpo_id, link.scope), link, None)
        # Keep the scope's link orders 1..n.
        for number, other in enumerate(self.read.links_at(link.scope), start=1):
            if other.order != number:
                moved = GpoLink(other.gpo_id, other.scope, number, other.enforced, other.enabled, self.revision)
                self._write_link(moved)
                self._record(LINK, link_key(other.gpo_id, other.scope), other, moved)

    def _gpo_for_link(self, ref: str, path: str) -> Gpo:
        gpo = self._find_gpo(ref)
        if gpo is None:
            raise ValidationError(Violation(path, "gpo", f'there is no GPO "{ref}"'))
        return gpo

    def _find_gpo(self, ref: str) -> Gpo | None:
        try:
            found = self.read.gpo(normalize_id(ref))
        except ValueError:
            found = None
        return found if found is not None else self.read.gpo_by_name(ref)

    # ------------------------------------------------------------ deletes

    def _delete(self, m: DeleteObject, index: int) -> None:
        def check(kind: str, key: str, current: TopologyObject | None) -> TopologyObject:
            if current is None:
                raise NotFoundError(f"{_quoted(kind, key)} does not exist")
            if m.revision and current.revision != m.revision:
                raise ConflictError(
                    f"{_quoted(kind, key)} was changed by someone else (stored revision {current.revision}, "
                    f"yours {m.revision}); nothing was deleted: read it again and retry"
                )
            return current

        if m.kind == COMPUTER:
            key = key_of(m.key)
            computer = check(COMPUTER, m.key.strip(), self.read.computer(key))
            self.conn.execute("DELETE FROM computers WHERE key = ?", (key,))
            self.conn.execute("DELETE FROM computer_groups WHERE computer_key = ?", (key,))
            self._record(COMPUTER, key, computer, None)
        elif m.kind == OU:
            dn = parse_dn(m.key)
            ou = check(OU, str(dn), self.read.org_unit(dn.key))
            children = self.read.count("SELECT count(*) FROM ous WHERE parent_key = ?", dn.key)
            members = self.read.count("SELECT count(*) FROM computers WHERE ou_key = ?", dn.key)
            if children or members:
                raise InUseError(
                    f'OU "{dn}" holds {children} OU(s) and {members} computer(s); move or delete them first'
                )
            for link in self.read.links_at(Scope.ou(dn)):
                self._remove_link(link)
            self.conn.execute("DELETE FROM ous WHERE key = ?", (dn.key,))
            self._record(OU, dn.key, ou, None)
        elif m.kind == SITE:
            key = key_of(m.key)
            site = check(SITE, m.key.strip(), self.read.site(key))
            members = self.read.count("SELECT count(*) FROM computers WHERE site_key = ?", key)
            if members:
                raise InUseError(f'site "{m.key.strip()}" has {members} computer(s); move them first')
            for link in self.read.links_at(Scope.site(m.key)):
                self._remove_link(link)
            self.conn.execute("DELETE FROM sites WHERE key = ?", (key,))
            self._record(SITE, key, site, None)
        elif m.kind == GROUP:
            key = key_of(m.key)
            group = check(GROUP, m.key.strip(), self.read.group(key))
            members = self.read.count("SELECT count(*) FROM computer_groups WHERE group_key = ?", key)
            if members:
                raise InUseError(f'group "{m.key.strip()}" has {members} member(s); remove them first')
            filtering = self.read.gpos_filtering_on(key)
            if filtering:
                more = f" and {len(filtering) - 1} more" if len(filtering) > 1 else ""
                raise InUseError(
                    f'group "{m.key.strip()}" is in the security filter of GPO "{filtering[0]}"{more}; '
                    "change the filter first (policyagent gpo set NAME --filter-group G ... | --no-filter)"
                )
            self.conn.execute("DELETE FROM groups WHERE key = ?", (key,))
            self._record(GROUP, key, group, None)
        elif m.kind == GPO:
            gpo = check(GPO, m.key.strip(), self._find_gpo(m.key))
            assert isinstance(gpo, Gpo)
            for link in self.read.links_of_gpo(gpo.id):
                self._remove_link(link)
            self.conn.execute("DELETE FROM gpos WHERE id = ?", (gpo.id,))
            self._record(GPO, gpo.id, gpo, None)
        elif m.kind == LINK:
            ref, sep, scope_text = m.key.partition("@")
            if not sep:
                raise ValidationError(Violation(f"mutation {index}", "key", "a link is named GPO@SCOPE"))
            found = self._find_gpo(ref)
            if found is None:
                raise NotFoundError(f'there is no GPO "{ref}"')
            scope = Scope.parse(scope_text)
            found_link = check(LINK, f"{found.name}@{scope}", self.read.link(found.id, scope))
            assert isinstance(found_link, GpoLink)
            self._remove_link(found_link)
        else:
            raise ValidationError(Violation(f"mutation {index}", "kind", f'unknown kind "{m.kind}"'))


def dataclass_equal(current: TopologyObject, new: TopologyObject) -> bool:
    """Equal apart from the revision."""
    return dataclasses.replace(current, revision=0) == dataclasses.replace(new, revision=0)


__all__ = ["TOPOLOGY_FILE", "SqliteTopologyStore", "kind_of"]
