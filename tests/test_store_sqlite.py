"""The store contract against SqliteStore, and what is particular to the SQLite file."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest
from builders import big_filter_list, filter_action, filter_list, policy_using
from store_contract import StoreContract, create

from policyagent.model.errors import InUseError, StoreError
from policyagent.model.objects import Kind
from policyagent.model.writes import Delete, Put
from policyagent.pb import pb
from policyagent.store.base import PolicyStore
from policyagent.store.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteStore


class TestSqliteStore(StoreContract):
    def make_store(self, tmp_path: Path) -> PolicyStore:
        return SqliteStore(tmp_path / "store.db")


def open_raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_creates_directory_and_private_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.db"
    with SqliteStore(path) as store:
        create(store, filter_list("Web"))
        assert path.is_file()
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if name.exists():
                assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name


def test_durable_settings(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path):
        conn = open_raw(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.close()


def test_writer_runs_with_synchronous_full_and_foreign_keys(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "store.db") as store:
        writer = store._writer  # the settings are per connection: look at the one that writes
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert writer.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_users_are_answered_from_an_index(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path):
        conn = open_raw(path)
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT policy_id FROM rule_refs WHERE target_kind = ? AND target_id = ?",
            ("filter_list", "x"),
        ).fetchall()
        conn.close()
        assert any("rule_refs_target" in str(row) for row in plan), plan


def test_change_log_cannot_be_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path) as store:
        create(store, filter_list("Web"))
    conn = open_raw(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE changelog SET principal = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM changelog")
    conn.close()


def test_foreign_keys_back_up_the_planner(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path) as store:
        fl = create(store, filter_list("Web"))
        fa = create(store, filter_action("Secure"))
        create(store, policy_using("P", fl, fa))
    conn = open_raw(path)
    conn.execute("PRAGMA foreign_keys = ON")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("DELETE FROM objects WHERE kind = 'filter_list'")
    conn.close()


def test_foreign_keys_catch_what_the_validator_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import policyagent.model.writes

    with SqliteStore(tmp_path / "store.db") as store:
        fl = create(store, filter_list("Web"))
        fa = create(store, filter_action("Secure"))
        # A validator bug lets a rule name a filter list that does not exist.
        monkeypatch.setattr(policyagent.model.writes, "validate_object", lambda obj, view: [])
        dangling = policy_using("P", fl, fa)
        dangling.rules[0].filter_list_id = "{00000000-0000-0000-0000-00000000000F}"
        with pytest.raises(StoreError, match="integrity"):
            store.write([Put(filter_list("Other")), Put(dangling)], principal="alice")
        assert store.revision() == 2 and store.find(Kind.FILTER_LIST, "other") is None
        create(store, filter_list("Other"))  # the writer connection is fine afterwards


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not a database, just some text that is long enough " * 100)
    with pytest.raises(StoreError, match=re.escape(str(path))):
        SqliteStore(path)


def test_someone_elses_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = open_raw(path)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StoreError, match="not a policyagent store"):
        SqliteStore(path)
    conn = open_raw(path)
    # Left as it was: not switched to WAL, not given our schema.
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_schema")] == ["t"]
    conn.close()


def test_store_from_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    SqliteStore(path).close()
    conn = open_raw(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)


def test_corrupt_store(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path) as store:
        for i in range(20):
            create(store, big_filter_list(f"list {i}", 50))
    # Scribble over every page after the first (the header stays readable).
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(page, len(data), page):
        data[offset : offset + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=re.escape(str(path))), SqliteStore(path) as store:
        store.snapshot()


def test_locked_beyond_timeout(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path, busy_timeout_s=0.2) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            with pytest.raises(StoreError, match=re.escape(str(path)) + ".*locked"):
                create(store, filter_list("Web"))
            assert store.revision() == 0  # reads go on while a writer holds the lock
        finally:
            other.execute("ROLLBACK")
            other.close()
        create(store, filter_list("Web"))


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.revision()
    with pytest.raises(StoreError, match="closed"):
        create(store, filter_list("Web"))


def test_plan_fn_must_not_write(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "store.db") as store:

        def plan(view: object) -> list[Put]:
            store.write([Put(filter_list("inner"))], principal="x")
            return []

        with pytest.raises(StoreError, match="inside a write"):
            store.write(plan, principal="x")
        assert store.revision() == 0
        create(store, filter_list("still works"))


def test_two_stores_on_one_file(tmp_path: Path) -> None:
    """Two store objects (as two processes would) see each other's commits and conflicts."""
    path = tmp_path / "store.db"
    with SqliteStore(path) as a, SqliteStore(path) as b:
        fl = create(a, filter_list("Shared"))
        fa = create(a, filter_action("Shared action"))
        create(b, policy_using("P", fl, fa))
        with pytest.raises(InUseError):
            a.write([Delete(Kind.FILTER_LIST, fl.id)], principal="alice")
        assert a.revision() == b.revision() == 3
        assert a.snapshot() == b.snapshot()


def test_defaults_seed_through_the_store(tmp_path: Path) -> None:
    from policyagent.model.defaults import default_objects, restore_defaults_plan

    with SqliteStore(tmp_path / "store.db") as store:
        assert store.initialize(restore_defaults_plan, principal="system")
        contents, revision = store.snapshot()
        assert revision == 1
        count = len(contents.policies) + len(contents.filter_lists) + len(contents.filter_actions)
        assert count == len(default_objects())
        # Restoring again is an update of each default object, in one write.
        result = store.write(restore_defaults_plan, principal="admin", context="restore defaults")
        assert result.store_revision == 2 and len(result.written) == count
        assert all(isinstance(o, pb.Policy | pb.FilterList | pb.FilterAction) for o in result.written)
