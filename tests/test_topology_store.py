"""The SQLite topology store: validation naming the field, revisions, link order, cascades, change log."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyagent.model.assignment import Computer, Gpo, GpoLink, Group, OrgUnit, Scope, Site
from policyagent.model.errors import (
    AlreadyExistsError,
    ConflictError,
    InUseError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from policyagent.store.topology import COMPUTER, GPO, GROUP, LINK, OU, SITE, DeleteObject, PutObject, link_key
from policyagent.store.topology_sqlite import _SCHEMA_V1, APPLICATION_ID, SqliteTopologyStore, _split_sql

CORP = "OU=Corp,DC=corp,DC=example"
SERVERS = "OU=Servers,OU=Corp,DC=corp,DC=example"
POLICY = "{11111111-1111-1111-1111-111111111111}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteTopologyStore]:
    with SqliteTopologyStore(tmp_path / "topology.sqlite3", policy_exists=lambda p: p == POLICY) as s:
        yield s


def put(store: SqliteTopologyStore, *objs: object, upsert: bool = False) -> None:
    store.write([PutObject(o, upsert=upsert) for o in objs], principal="test")  # type: ignore[arg-type]


def base(store: SqliteTopologyStore) -> None:
    put(store, OrgUnit(CORP), OrgUnit(SERVERS), Site("HQ"), Group("Web servers"))


def violation_field(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return exc.value.violations[0].field


def test_file_is_private_wal_and_durable(store: SqliteTopologyStore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE x (y)")
    conn.close()
    with pytest.raises(StoreError, match="not a policyagent topology store"):
        SqliteTopologyStore(path)


@pytest.mark.parametrize(
    ("objs", "field", "message"),
    [
        ([OrgUnit("OU=Child,OU=Missing,DC=corp,DC=example")], "dn", "parent OU"),
        ([OrgUnit("CN=Users,DC=corp,DC=example")], "ou", "only OU= and DC="),
        ([Computer("h1", "domain", "corp.example", ou="OU=Nope,DC=corp,DC=example")], "ou", "no OU"),
        ([Computer("h1", "domain", "corp.example", site="Mars")], "site", "no site"),
        ([Computer("h1", "domain", "corp.example", groups=frozenset({"Nope"}))], "groups", "no group"),
        ([Computer("h1", "domain", "other.example", ou=CORP)], "ou", "in domain corp.example"),
        ([Gpo("", "G", policy_id="{22222222-2222-2222-2222-222222222222}")], "policy", "no IPsec policy"),
        ([Gpo("", "G", policy_id="nonsense")], "policy", "not a policy id"),
        ([Gpo("", "G"), Gpo("", "g")], "name", "already named"),
        ([GpoLink("Missing GPO", Scope.domain("corp.example"))], "gpo", "no GPO"),
        ([Gpo("", "G"), GpoLink("G", Scope.site("Mars"))], "scope", "no site"),
        ([Gpo("", "G"), GpoLink("G", Scope.ou("OU=Nope,DC=corp,DC=example"))], "scope", "no OU"),
        ([Gpo("", "G"), GpoLink("G", Scope.domain("nowhere.example"))], "scope", "no OU or computer"),
        ([Gpo("", "G"), GpoLink("G", Scope.local(), enforced=True)], "enforced", "cannot be enforced"),
        ([Gpo("", "G", security_filter=("Nope",))], "security_filter", 'no group "Nope"'),
        ([Gpo("", "G", security_filter=("a:b",))], "security_filter", "must not contain ':'"),
    ],
)
def test_validation_names_the_field(store: SqliteTopologyStore, objs: list[object], field: str, message: str) -> None:
    base(store)
    revision = store.revision()
    with pytest.raises(ValidationError) as info:
        put(store, *objs)
    assert violation_field(info) == field
    assert message in str(info.value)
    assert store.revision() == revision  # nothing written


def test_create_update_conflict_and_upsert(store: SqliteTopologyStore) -> None:
    base(store)
    put(store, Computer("Host1", "domain", "Corp.Example.", ou=CORP, site="hq"))
    stored = store.get_computer("HOST1")
    assert stored == Computer("host1", "domain", "corp.example", CORP, "HQ", frozenset(), stored.revision if stored else 0)
    assert stored is not None
    with pytest.raises(AlreadyExistsError):
        put(store, Computer("host1", "domain", "corp.example"))
    put(store, Computer("host1", "domain", "corp.example", ou=SERVERS, revision=stored.revision))
    with pytest.raises(ConflictError, match="changed by someone else"):
        put(store, Computer("host1", "domain", "corp.example", revision=stored.revision))
    put(store, Computer("host1", "domain", "corp.example"), upsert=True)
    moved = store.get_computer("host1")
    assert moved is not None and moved.ou == "" and moved.site == ""


def test_upsert_computer_for_enrollment_keeps_what_is_not_given(store: SqliteTopologyStore) -> None:
    base(store)
    put(store, Computer("h1", "domain", "corp.example", ou=CORP, site="HQ", groups=frozenset({"Web servers"})))
    again = store.upsert_computer("H1", "domain", "corp.example")
    assert (again.ou, again.site, again.groups) == (CORP, "HQ", frozenset({"Web servers"}))
    revision = store.revision()
    store.upsert_computer("h1", "domain", "corp.example")  # unchanged: no write
    assert store.revision() == revision
    moved = store.upsert_computer("h1", "domain", "corp.example", ou=SERVERS, site="")
    assert (moved.ou, moved.site) == (SERVERS, "")
    wg = store.upsert_computer("kiosk7", "workgroup", "")
    assert (wg.membership, wg.domain) == ("workgroup", "WORKGROUP")
    with pytest.raises(ValidationError):
        store.upsert_computer("bad name", "domain", "corp.example")


def test_link_order_stays_contiguous(store: SqliteTopologyStore) -> None:
    base(store)
    put(store, Gpo("", "A"), Gpo("", "B"), Gpo("", "C"))
    put(store, GpoLink("A", Scope.ou(CORP)), GpoLink("B", Scope.ou(CORP), order=0), GpoLink("C", Scope.ou(CORP), order=0))

    def orders() -> list[tuple[str, int]]:
        topo, _ = store.snapshot()
        names = {g.id: g.name for g in topo.gpos.values()}
        return [(names[lk.gpo_id], lk.order) for lk in topo.links_at(Scope.ou(CORP))]

    assert orders() == [("A", 1), ("B", 2), ("C", 3)]
    put(store, GpoLink("C", Scope.ou(CORP), order=1), upsert=True)
    assert orders() == [("C", 1), ("A", 2), ("B", 3)]
    store.write([DeleteObject(LINK, link_key("A", Scope.ou(CORP)))], principal="t")
    assert orders() == [("C", 1), ("B", 2)]


def test_deletes_cascade_links_and_refuse_in_use(store: SqliteTopologyStore) -> None:
    base(store)
    put(store, Gpo("", "G"), Computer("h1", "domain", "corp.example", ou=SERVERS, site="HQ"))
    put(store, GpoLink("G", Scope.ou(SERVERS)), GpoLink("G", Scope.site("HQ")))
    with pytest.raises(InUseError, match="1 OU"):
        store.write([DeleteObject(OU, CORP)], principal="t")
    with pytest.raises(InUseError, match="computer"):
        store.write([DeleteObject(SITE, "HQ")], principal="t")
    result = store.write([DeleteObject(COMPUTER, "h1"), DeleteObject(OU, SERVERS)], principal="t")
    kinds = sorted(c.kind for c in result.changes)
    assert kinds == ["computer", "link", "ou"]
    result = store.write([DeleteObject(GPO, "g")], principal="t")
    assert sorted(c.kind for c in result.changes) == ["gpo", "link"]
    topo, _ = store.snapshot()
    assert not topo.links and not topo.gpos
    with pytest.raises(NotFoundError):
        store.write([DeleteObject(GPO, "g")], principal="t")


def test_failed_write_leaves_nothing(store: SqliteTopologyStore) -> None:
    base(store)
    before = store.snapshot()
    with pytest.raises(ValidationError):
        put(store, Site("Branch"), Computer("h1", "domain", "corp.example", site="Mars"))
    assert store.snapshot() == before


def test_change_log_and_revisions(store: SqliteTopologyStore) -> None:
    base(store)
    put(store, Gpo("", "G", policy_id=POLICY.lower()))
    topo, revision = store.snapshot()
    gpo = next(iter(topo.gpos.values()))
    assert gpo.policy_id == POLICY and gpo.revision == revision
    log = store.changes()
    assert [(c.operation, c.kind) for c in log][-1] == ("create", "gpo")
    assert log[-1].principal == "test" and log[-1].revision == revision
    assert [c.seq for c in store.changes(after_seq=log[-2].seq)] == [log[-1].seq]


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    with SqliteTopologyStore(path) as store:
        base(store)
        put(store, Computer("h1", "workgroup", "HOME", ou=CORP))
        expected = store.snapshot()
    with SqliteTopologyStore(path) as store:
        assert store.snapshot() == expected


def test_gpo_security_filter_is_stored_canonical_and_protects_its_groups(store: SqliteTopologyStore) -> None:
    base(store)
    put(store, Group("DB servers"))
    put(store, Gpo("", "G", security_filter=("web SERVERS", "DB servers", "Web servers")))
    topo, _ = store.snapshot()
    gpo = next(iter(topo.gpos.values()))
    assert gpo.security_filter == ("DB servers", "Web servers")  # registry spelling, deduplicated, sorted
    # A group named in a filter cannot be deleted (filters are not edited behind the admin's back).
    with pytest.raises(InUseError, match='security filter of GPO "G"'):
        store.write([DeleteObject(GROUP, "web servers")], principal="t")
    # Clearing the filter frees it.
    put(store, Gpo(gpo.id, "G", security_filter=(), revision=gpo.revision))
    store.write([DeleteObject(GROUP, "Web servers")], principal="t")
    topo, _ = store.snapshot()
    assert next(iter(topo.gpos.values())).security_filter == ()
    assert [g.name for g in topo.groups.values()] == ["DB servers"]


def test_v1_file_is_migrated_with_the_filter_column(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    for statement in _split_sql(_SCHEMA_V1):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO gpos (id, name, name_key, enabled, policy_id, description, revision)"
        " VALUES ('{00000000-0000-0000-0000-000000000001}', 'Old', 'old', 1, '', '', 1)"
    )
    conn.close()
    with SqliteTopologyStore(path) as store:
        topo, _ = store.snapshot()
        old = topo.gpos["{00000000-0000-0000-0000-000000000001}"]
        assert old.security_filter == ()
        put(store, Group("Web servers"))
        put(store, Gpo(old.id, "Old", security_filter=("Web servers",), revision=old.revision))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()
    with SqliteTopologyStore(path) as store:  # reopening a migrated file changes nothing
        topo, _ = store.snapshot()
        assert topo.gpos[old.id].security_filter == ("Web servers",)
