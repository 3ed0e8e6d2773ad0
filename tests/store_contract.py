"""The PolicyStore contract: what every store backend must do, as tests.

A backend's test module subclasses `StoreContract` and implements
`make_store`; pytest then runs every test here against that backend:

    class TestSqliteStore(StoreContract):
        def make_store(self, tmp_path: Path) -> PolicyStore:
            return SqliteStore(tmp_path / "store.db")

The tests only use the PolicyStore interface (policyagent/store/base.py) and
build their objects with tests/builders.py, so they also check that valid
Windows-style objects go through the planner and validator unchanged.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from builders import big_filter_list, filter_action, filter_list, kerberos, policy, policy_using, rule

from policyagent.model.errors import (
    AlreadyExistsError,
    ConflictError,
    InUseError,
    NotFoundError,
    PolicyError,
    ProtectedError,
    ValidationError,
)
from policyagent.model.objects import Kind, StoreObject, kind_of
from policyagent.model.view import StoreView
from policyagent.model.writes import Delete, Mutation, Put
from policyagent.pb import pb
from policyagent.store.base import ChangeRecord, PolicyStore, WriteResult

GUID = re.compile(r"^\{[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\}$")


def put(store: PolicyStore, *objs: StoreObject, principal: str = "alice", context: str = "test") -> WriteResult:
    """Create or update the objects in one write."""
    return store.write([Put(obj) for obj in objs], principal=principal, context=context)


def create(store: PolicyStore, obj: StoreObject) -> StoreObject:
    """Create one object; the stored version (with id and revision)."""
    result = put(store, obj)
    assert len(result.written) == 1
    return result.written[0]


def create_fl_fa(store: PolicyStore) -> tuple[pb.FilterList, pb.FilterAction]:
    fl = create(store, filter_list("All IP Traffic"))
    fa = create(store, filter_action("Require Security"))
    assert isinstance(fl, pb.FilterList) and isinstance(fa, pb.FilterAction)
    return fl, fa


def create_policy(
    store: PolicyStore, name: str = "Secure Server", *, rules: int = 1, assigned: bool = False
) -> pb.Policy:
    """A policy whose rules use a filter list and action created for it (named after the policy)."""
    fl = create(store, filter_list(f"{name} traffic"))
    fa = create(store, filter_action(f"{name} action"))
    assert isinstance(fl, pb.FilterList) and isinstance(fa, pb.FilterAction)
    p = create(store, policy_using(name, fl, fa, rules=rules, assigned=assigned))
    assert isinstance(p, pb.Policy)
    return p


def copy(obj: StoreObject) -> StoreObject:
    out = type(obj)()
    out.CopyFrom(obj)  # type: ignore[arg-type]
    return out


class StoreContract:
    """Tests every PolicyStore backend must pass. Subclass and implement `make_store`."""

    def make_store(self, tmp_path: Path) -> PolicyStore:
        """Open the backend's store kept under `tmp_path`, creating it if new.

        Called again with the same `tmp_path` (after close), it must reopen the
        same store: the persistence tests rely on that.
        """
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[PolicyStore]:
        s = self.make_store(tmp_path)
        try:
            yield s
        finally:
            s.close()

    def state(self, store: PolicyStore) -> tuple[bytes, int, list[ChangeRecord]]:
        """Everything observable about a store, comparable with ==."""
        contents, revision = store.snapshot()
        return contents.SerializeToString(deterministic=True), revision, store.changes()

    # ------------------------------------------------------------ basics

    def test_new_store_is_empty(self, store: PolicyStore) -> None:
        contents, revision = store.snapshot()
        assert revision == 0 == store.revision()
        assert contents == pb.StoreContents()
        assert store.changes() == []

    def test_create_get_find(self, store: PolicyStore) -> None:
        fl, fa = create_fl_fa(store)
        p = create(store, policy_using("Secure Server", fl, fa))
        for obj in (fl, fa, p):
            kind = kind_of(obj)
            assert store.get(kind, obj.id) == obj
            assert store.find(kind, obj.name) == obj
            assert store.find(kind, obj.name.upper()) == obj
            assert store.find(kind, obj.name.lower()) == obj
        assert store.find(Kind.POLICY, "all ip traffic") is None  # names are per kind
        assert store.get(Kind.FILTER_LIST, p.id) is None
        assert store.get(Kind.POLICY, "{00000000-0000-0000-0000-000000000000}") is None
        assert store.find(Kind.FILTER_ACTION, "nothing like this") is None

    def test_written_objects_match_what_was_asked(self, store: PolicyStore) -> None:
        asked = filter_list("Web", description="web servers")
        got = create(store, asked)
        assert isinstance(got, pb.FilterList)
        assert got.name == "Web" and got.description == "web servers"
        assert len(got.filters) == 1
        assert got.filters[0].source == asked.filters[0].source
        assert got.filters[0].destination == asked.filters[0].destination
        assert got.filters[0].mirrored
        assert asked.id == "" and asked.revision == 0  # the caller's message is not touched

    def test_ids_are_braced_guids(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Two", filters=big_filter_list("x", 2).filters))
        fa = create(store, filter_action("Negotiate"))
        assert isinstance(fl, pb.FilterList) and isinstance(fa, pb.FilterAction)
        p = create(store, policy_using("P", fl, fa, rules=3))
        assert isinstance(p, pb.Policy)
        ids = [fl.id, fa.id, p.id, p.default_response_rule.id]
        ids += [f.id for f in fl.filters] + [r.id for r in p.rules]
        assert all(GUID.match(i) for i in ids), ids
        assert len(set(ids)) == len(ids)

    def test_given_ids_are_kept(self, store: PolicyStore) -> None:
        fl = filter_list("Fixed")
        fl.id = "{7238523A-70FA-11D1-864C-14A300000000}"
        assert create(store, fl).id == fl.id
        assert store.get(Kind.FILTER_LIST, fl.id) is not None

    def test_returned_objects_are_copies(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Web"))
        fl.name = "changed"
        got = store.get(Kind.FILTER_LIST, fl.id)
        assert got is not None
        got.description = "changed too"
        again = store.get(Kind.FILTER_LIST, fl.id)
        assert again is not None and again.name == "Web" and again.description == ""

    def test_large_filter_list_round_trips(self, store: PolicyStore) -> None:
        fl = create(store, big_filter_list("Ten thousand hosts", 10_000))
        got = store.get(Kind.FILTER_LIST, fl.id)
        assert isinstance(got, pb.FilterList)
        assert got == fl and len(got.filters) == 10_000
        assert len({f.id for f in got.filters}) == 10_000

    def test_secrets_are_stored(self, store: PolicyStore) -> None:
        fl, fa = create_fl_fa(store)
        r = rule(fl.id, fa.id, name="psk rule")
        del r.auth_methods[:]
        r.auth_methods.extend([pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key="s3cret")), kerberos()])
        p = create(store, policy("PSK", rules=[r]))
        contents, _ = store.snapshot()
        assert contents.policies[0].rules[0].auth_methods[0].preshared_key.key == "s3cret"
        got = store.get(Kind.POLICY, p.id)
        assert isinstance(got, pb.Policy) and got.rules[0].auth_methods[0].preshared_key.key == "s3cret"

    # ------------------------------------------------------------ revisions

    def test_revisions(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("A"))
        assert fl.revision == 1 == store.revision()
        assert fl.modified_unix_ms > 0
        result = put(store, filter_list("B"), filter_action("C"))
        assert result.store_revision == 2 == store.revision()
        assert [o.revision for o in result.written] == [2, 2]
        fl.description = "changed"
        updated = create(store, fl)  # an update: fl carries its revision
        assert updated.revision == 3 == store.revision()
        assert updated.modified_unix_ms >= fl.modified_unix_ms
        # Objects not written keep their revision.
        b = store.find(Kind.FILTER_LIST, "B")
        assert b is not None and b.revision == 2

    def test_empty_write_changes_nothing(self, store: PolicyStore) -> None:
        create(store, filter_list("A"))
        before = self.state(store)
        result = store.write([], principal="alice")
        assert result.written == [] and result.deleted == [] and result.store_revision == 1
        assert self.state(store) == before

    def test_stale_update_is_a_conflict(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Web"))
        stale = copy(fl)
        fl.description = "first"
        current = create(store, fl)
        stale.description = "second"
        with pytest.raises(ConflictError) as err:
            put(store, stale)
        assert 'filter list "Web"' in str(err.value)
        assert store.get(Kind.FILTER_LIST, fl.id) == current
        assert store.revision() == current.revision

    def test_two_admins_first_update_wins(self, store: PolicyStore) -> None:
        p = create_policy(store, "Secure Server")
        admin1 = store.get(Kind.POLICY, p.id)
        admin2 = store.get(Kind.POLICY, p.id)
        assert isinstance(admin1, pb.Policy) and isinstance(admin2, pb.Policy)
        assert admin1.revision == admin2.revision
        admin1.description = "admin1 was here"
        admin1.polling_interval_minutes = 60
        won = create(store, admin1)
        admin2.description = "admin2 was here"
        with pytest.raises(ConflictError) as err:
            put(store, admin2, principal="admin2")
        assert 'policy "Secure Server"' in str(err.value)
        got = store.get(Kind.POLICY, p.id)
        assert isinstance(got, pb.Policy)
        assert got == won
        assert got.description == "admin1 was here" and got.polling_interval_minutes == 60
        assert all(c.principal != "admin2" for c in store.changes())

    def test_concurrent_updates_one_wins(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Contended"))
        outcomes: list[str] = []
        lock = threading.Lock()

        def admin(n: int) -> None:
            mine = copy(fl)
            mine.description = f"admin {n}"
            try:
                put(store, mine, principal=f"admin{n}")
                outcome = f"won {n}"
            except ConflictError:
                outcome = "conflict"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=admin, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(winners) == 1 and outcomes.count("conflict") == 7
        got = store.get(Kind.FILTER_LIST, fl.id)
        assert got is not None and got.description == f"admin {winners[0].split()[1]}"

    def test_concurrent_creates_all_commit(self, store: PolicyStore) -> None:
        errors: list[BaseException] = []

        def writer(t: int) -> None:
            try:
                for i in range(10):
                    create(store, filter_list(f"t{t} fl{i}"))
            except BaseException as exc:  # reported below, with the thread's error
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        contents, revision = store.snapshot()
        assert revision == 60 and len(contents.filter_lists) == 60
        assert sorted(fl.revision for fl in contents.filter_lists) == list(range(1, 61))

    # ------------------------------------------------------------ refusals

    def test_update_or_delete_missing_object(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Gone"))
        store.write([Delete(Kind.FILTER_LIST, fl.id)], principal="alice")
        before = self.state(store)
        with pytest.raises(NotFoundError):
            put(store, fl)
        with pytest.raises(NotFoundError):
            store.write([Delete(Kind.FILTER_LIST, fl.id)], principal="alice")
        assert self.state(store) == before

    def test_delete_with_stale_revision_is_a_conflict(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Web"))
        fl.description = "changed"
        create(store, fl)
        with pytest.raises(ConflictError) as err:
            store.write([Delete(Kind.FILTER_LIST, fl.id, revision=1)], principal="alice")
        assert 'filter list "Web"' in str(err.value)
        assert store.get(Kind.FILTER_LIST, fl.id) is not None

    @pytest.mark.parametrize("second_name", ["Web", "WEB", "web", " web"])
    def test_duplicate_name_refused(self, store: PolicyStore, second_name: str) -> None:
        create(store, filter_list("Web"))
        before = self.state(store)
        with pytest.raises((ValidationError, AlreadyExistsError)):
            put(store, filter_list(second_name))
        assert self.state(store) == before

    def test_duplicate_name_within_one_write_refused(self, store: PolicyStore) -> None:
        with pytest.raises((ValidationError, AlreadyExistsError)):
            put(store, filter_action("Same"), filter_action("SAME"))
        assert self.state(store) == (pb.StoreContents().SerializeToString(), 0, [])

    def test_rename_to_taken_name_refused(self, store: PolicyStore) -> None:
        create(store, filter_list("Web"))
        other = create(store, filter_list("Mail"))
        other.name = "WEB"
        with pytest.raises((ValidationError, AlreadyExistsError)):
            put(store, other)
        got = store.get(Kind.FILTER_LIST, other.id)
        assert got is not None and got.name == "Mail"

    def test_same_name_in_different_kinds_allowed(self, store: PolicyStore) -> None:
        create(store, filter_list("Web"))
        create(store, filter_action("Web"))
        assert store.find(Kind.FILTER_LIST, "web") is not None
        assert store.find(Kind.FILTER_ACTION, "web") is not None

    def test_rename_frees_the_old_name(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Old"))
        fl.name = "New"
        create(store, fl)
        assert store.find(Kind.FILTER_LIST, "old") is None
        again = create(store, filter_list("old"))
        assert store.find(Kind.FILTER_LIST, "OLD") == again
        assert store.find(Kind.FILTER_LIST, "new") is not None

    def test_swapping_two_names_in_one_write(self, store: PolicyStore) -> None:
        a = create(store, filter_list("A"))
        b = create(store, filter_list("B"))
        a.name, b.name = "B", "A"
        put(store, a, b)
        found_a, found_b = store.find(Kind.FILTER_LIST, "a"), store.find(Kind.FILTER_LIST, "b")
        assert found_a is not None and found_a.id == b.id
        assert found_b is not None and found_b.id == a.id

    def test_delete_frees_the_name_in_the_same_write(self, store: PolicyStore) -> None:
        old = create(store, filter_list("Web"))
        result = store.write([Delete(Kind.FILTER_LIST, old.id), Put(filter_list("WEB"))], principal="alice")
        new = store.find(Kind.FILTER_LIST, "web")
        assert new is not None and new.id != old.id and new.name == "WEB"
        assert [d.object_id for d in result.deleted] == [old.id]

    def test_create_with_existing_id_refused(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Web"))
        clash = filter_list("Other")
        clash.id = fl.id
        before = self.state(store)
        with pytest.raises(AlreadyExistsError):
            put(store, clash)
        assert self.state(store) == before

    def test_invalid_object_refused(self, store: PolicyStore) -> None:
        fl, fa = create_fl_fa(store)
        bad = policy_using("Bad", fl, fa)
        bad.rules[0].filter_list_id = "{00000000-0000-0000-0000-000000000001}"  # no such filter list
        before = self.state(store)
        with pytest.raises(ValidationError):
            put(store, bad)
        assert self.state(store) == before

    @pytest.mark.parametrize("kind", [Kind.FILTER_LIST, Kind.FILTER_ACTION])
    def test_delete_of_used_object_refused(self, store: PolicyStore, kind: Kind) -> None:
        fl, fa = create_fl_fa(store)
        create(store, policy_using("Secure Server", fl, fa))
        target = fl if kind is Kind.FILTER_LIST else fa
        before = self.state(store)
        with pytest.raises(InUseError) as err:
            store.write([Delete(kind, target.id)], principal="alice")
        assert f'"{target.name}" is used by policy "Secure Server"/rule 1 ("rule 1")' in str(err.value)
        assert self.state(store) == before
        # Used by several rules: the message names one and counts the others.
        create(store, policy_using("Another", fl, fa, rules=2))
        before = self.state(store)
        with pytest.raises(InUseError) as err:
            store.write([Put(filter_list("Unrelated")), Delete(kind, target.id)], principal="alice")
        assert "is used by policy " in str(err.value) and "and 2 more" in str(err.value)
        assert self.state(store) == before

    def test_delete_allowed_once_no_rule_uses_it(self, store: PolicyStore) -> None:
        fl, fa = create_fl_fa(store)
        other_fl = create(store, filter_list("Other traffic"))
        p = create(store, policy_using("Secure Server", fl, fa))
        assert isinstance(p, pb.Policy)
        p.rules[0].filter_list_id = other_fl.id  # the rule moves to another filter list
        p = create(store, p)
        store.write([Delete(Kind.FILTER_LIST, fl.id)], principal="alice")
        with pytest.raises(InUseError):
            store.write([Delete(Kind.FILTER_LIST, other_fl.id)], principal="alice")
        # Deleting the policy and the objects it uses together is fine.
        store.write(
            [Delete(Kind.POLICY, p.id), Delete(Kind.FILTER_LIST, other_fl.id), Delete(Kind.FILTER_ACTION, fa.id)],
            principal="alice",
        )
        contents, _ = store.snapshot()
        assert contents == pb.StoreContents()

    def test_deleting_assigned_policy_refused(self, store: PolicyStore) -> None:
        p = create_policy(store, "Assigned", assigned=True)
        before = self.state(store)
        with pytest.raises(ProtectedError) as err:
            store.write([Delete(Kind.POLICY, p.id)], principal="alice")
        assert 'policy "Assigned"' in str(err.value)
        assert self.state(store) == before

    def test_assigning_unassigns_the_previous_policy(self, store: PolicyStore) -> None:
        first = create_policy(store, "First", assigned=True)
        second = create_policy(store, "Second")
        seq = store.changes()[-1].seq
        second.assigned = True
        result = put(store, second, principal="bob", context="netsh: set policy assign=yes")
        revision = result.store_revision
        assert {(o.name, o.revision) for o in result.written} == {("First", revision), ("Second", revision)}
        got_first, got_second = store.get(Kind.POLICY, first.id), store.get(Kind.POLICY, second.id)
        assert isinstance(got_first, pb.Policy) and isinstance(got_second, pb.Policy)
        assert not got_first.assigned and got_second.assigned
        log = store.changes(after_seq=seq)
        assert sorted((c.operation, c.object_name) for c in log) == [("assign", "Second"), ("unassign", "First")]
        assert {c.revision for c in log} == {result.store_revision}
        assert all(c.principal == "bob" and c.context == "netsh: set policy assign=yes" for c in log)
        contents, _ = store.snapshot()
        assert [p.name for p in contents.policies if p.assigned] == ["Second"]

    def test_two_assignments_in_one_write_refused(self, store: PolicyStore) -> None:
        a = create_policy(store, "A")
        b = create_policy(store, "B")
        a.assigned = b.assigned = True
        with pytest.raises(ValidationError):
            put(store, a, b)
        contents, _ = store.snapshot()
        assert not any(p.assigned for p in contents.policies)

    # ------------------------------------------------------------ atomicity

    @pytest.mark.parametrize("failure", ["missing", "stale", "in-use", "invalid", "duplicate"])
    def test_failing_last_mutation_writes_nothing(self, store: PolicyStore, failure: str) -> None:
        fl, fa = create_fl_fa(store)
        used = create_policy(store, "Used")
        stale = copy(fl)
        fl.description = "moved on"
        create(store, fl)
        ok: list[Mutation] = [
            Put(filter_list("New list")),
            Put(filter_action("New action")),
            Delete(Kind.FILTER_ACTION, fa.id),
        ]
        last: Mutation
        if failure == "missing":
            last = Delete(Kind.POLICY, "{00000000-0000-0000-0000-000000000002}")
        elif failure == "stale":
            stale.description = "stale"
            last = Put(stale)
        elif failure == "in-use":
            last = Delete(Kind.FILTER_LIST, used.rules[0].filter_list_id)
        elif failure == "invalid":
            bad = policy("Bad", rules=[rule("{00000000-0000-0000-0000-000000000003}", fa.id)])
            last = Put(bad)
        else:
            last = Put(filter_list("new LIST"))
        before = self.state(store)
        with pytest.raises(PolicyError):
            store.write([*ok, last], principal="alice")
        assert self.state(store) == before

    def test_dry_run_writes_nothing(self, store: PolicyStore) -> None:
        fl, fa = create_fl_fa(store)
        spare = create(store, filter_list("Spare"))
        before = self.state(store)
        result = store.write(
            [Put(policy_using("Tried", fl, fa)), Delete(Kind.FILTER_LIST, spare.id)],
            principal="alice",
            dry_run=True,
        )
        # The result shows what the write would have stored...
        assert len(result.written) == 1 and result.written[0].name == "Tried"
        assert GUID.match(result.written[0].id)
        assert [d.name for d in result.deleted] == ["Spare"]
        # ...and nothing of it was stored.
        assert self.state(store) == before
        assert store.find(Kind.POLICY, "Tried") is None
        assert store.find(Kind.FILTER_LIST, "Spare") == spare

    def test_dry_run_still_refuses(self, store: PolicyStore) -> None:
        fl, fa = create_fl_fa(store)
        create(store, policy_using("P", fl, fa))
        with pytest.raises(InUseError):
            store.write([Delete(Kind.FILTER_LIST, fl.id)], principal="alice", dry_run=True)

    # ------------------------------------------------------------ plan functions

    def test_plan_fn_sees_the_store_and_writes_in_one_step(self, store: PolicyStore) -> None:
        create(store, filter_list("Web"))
        seen: list[str | None] = []

        def plan(view: StoreView) -> Sequence[Mutation]:
            found = view.id_for_name(Kind.FILTER_LIST, "WEB")
            seen.append(found)
            assert found is not None
            current = view.get(Kind.FILTER_LIST, found)
            assert isinstance(current, pb.FilterList)
            current.description = "edited in a plan"  # editing what the view returned is fine
            return [Put(current), Put(filter_action("Added by plan"))]

        result = store.write(plan, principal="restore", context="restore defaults")
        assert len(seen) == 1 and len(result.written) == 2
        got = store.find(Kind.FILTER_LIST, "web")
        assert got is not None and got.description == "edited in a plan" and got.revision == 2
        assert store.find(Kind.FILTER_ACTION, "added by plan") is not None

    def test_plan_fn_error_writes_nothing(self, store: PolicyStore) -> None:
        create(store, filter_list("Web"))
        before = self.state(store)

        def plan(view: StoreView) -> Sequence[Mutation]:
            raise NotFoundError("nothing to restore")

        with pytest.raises(NotFoundError):
            store.write(plan, principal="alice")
        assert self.state(store) == before

    # ------------------------------------------------------------ change log

    def test_change_log_records_who_what_when(self, store: PolicyStore) -> None:
        fl = create(store, filter_list("Web"))
        fl.description = "edited"
        put(store, fl, principal="bob", context="netsh: set filterlist")
        store.write([Delete(Kind.FILTER_LIST, fl.id)], principal="carol", context="netsh: delete filterlist")
        log = store.changes()
        assert [(c.operation, c.principal, c.context, c.revision) for c in log] == [
            ("create", "alice", "test", 1),
            ("update", "bob", "netsh: set filterlist", 2),
            ("delete", "carol", "netsh: delete filterlist", 3),
        ]
        assert all(c.kind is Kind.FILTER_LIST and c.object_id == fl.id and c.object_name == "Web" for c in log)
        assert all(c.time_unix_ms > 0 for c in log)
        assert log[0].time_unix_ms <= log[1].time_unix_ms <= log[2].time_unix_ms

    def test_change_log_is_ordered_and_append_only(self, store: PolicyStore) -> None:
        p = create_policy(store, "P", rules=2)
        early = store.changes()
        assert [c.operation for c in early] == ["create"] * 3
        assert [c.kind for c in early] == [Kind.FILTER_LIST, Kind.FILTER_ACTION, Kind.POLICY]
        p.description = "edited"
        put(store, p)
        put(store, filter_list("A"), filter_list("B"), filter_action("C"))
        log = store.changes()
        assert log[: len(early)] == early
        seqs = [c.seq for c in log]
        assert seqs == sorted(set(seqs)) and len(seqs) == 7
        revisions = [c.revision for c in log]
        assert revisions == sorted(revisions)
        assert store.changes(after_seq=seqs[2]) == log[3:]
        assert store.changes(after_seq=seqs[2], limit=2) == log[3:5]
        assert store.changes(after_seq=seqs[-1]) == []
        assert [c.object_name for c in log[-3:]] == ["A", "B", "C"]

    # ------------------------------------------------------------ initialize

    def test_initialize_runs_once(self, tmp_path: Path) -> None:
        calls: list[int] = []

        def seed(view: StoreView) -> Sequence[Mutation]:
            calls.append(1)
            assert view.ids(Kind.POLICY) == []
            return [Put(filter_list("Seeded")), Put(filter_action("Seeded action"))]

        store = self.make_store(tmp_path)
        try:
            assert store.initialize(seed, principal="system") is True
            assert store.initialize(seed, principal="system") is False
            assert len(calls) == 1
            log = store.changes()
            assert [c.object_name for c in log] == ["Seeded", "Seeded action"]
            assert all(c.principal == "system" and c.revision == 1 for c in log)
            # Deleting everything the seed made does not make the store new again.
            store.write([Delete(c.kind, c.object_id) for c in log], principal="alice")
            assert store.initialize(seed, principal="system") is False
        finally:
            store.close()
        store = self.make_store(tmp_path)
        try:
            assert store.initialize(seed, principal="system") is False
            assert len(calls) == 1
        finally:
            store.close()

    def test_failed_initialize_leaves_store_new(self, store: PolicyStore) -> None:
        def bad_seed(view: StoreView) -> Sequence[Mutation]:
            return [Put(filter_list("ok")), Put(filter_list("OK"))]  # duplicate names

        with pytest.raises((ValidationError, AlreadyExistsError)):
            store.initialize(bad_seed, principal="system")
        assert self.state(store) == (pb.StoreContents().SerializeToString(), 0, [])
        assert store.initialize(lambda view: [Put(filter_list("ok"))], principal="system") is True
        assert store.find(Kind.FILTER_LIST, "ok") is not None

    def test_initialize_with_nothing_to_seed_still_counts(self, store: PolicyStore) -> None:
        assert store.initialize(lambda view: [], principal="system") is True
        assert store.initialize(lambda view: [Put(filter_list("late"))], principal="system") is False
        assert store.revision() == 0

    # ------------------------------------------------------------ persistence

    def test_reopen_keeps_everything(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        try:
            store.initialize(lambda view: [Put(filter_list("Seeded"))], principal="system")
            p = create_policy(store, "Kept", rules=3, assigned=True)
            p.description = "edited"
            put(store, p)
            before = self.state(store)
        finally:
            store.close()
        store = self.make_store(tmp_path)
        try:
            assert self.state(store) == before
            got = store.find(Kind.POLICY, "kept")
            assert isinstance(got, pb.Policy) and got.assigned and got.description == "edited"
            # Using a reopened store: the users index and revisions carry on.
            with pytest.raises(InUseError):
                store.write([Delete(Kind.FILTER_LIST, got.rules[0].filter_list_id)], principal="alice")
            assert create(store, filter_list("After reopen")).revision == before[1] + 1
        finally:
            store.close()

    def test_snapshot_is_sorted_and_deterministic(self, store: PolicyStore) -> None:
        for name in ["delta", "Bravo", "alpha", "Charlie"]:
            create(store, filter_list(name))
            create(store, filter_action(f"{name} action"))
        fl = store.find(Kind.FILTER_LIST, "alpha")
        fa = store.find(Kind.FILTER_ACTION, "alpha action")
        assert isinstance(fl, pb.FilterList) and isinstance(fa, pb.FilterAction)
        for name in ["zulu", "Echo", "echo2"]:
            create(store, policy_using(name, fl, fa))
        first, revision = store.snapshot()
        assert [f.name for f in first.filter_lists] == ["alpha", "Bravo", "Charlie", "delta"]
        assert [f.name for f in first.filter_actions] == [
            "alpha action",
            "Bravo action",
            "Charlie action",
            "delta action",
        ]
        assert [p.name for p in first.policies] == ["Echo", "echo2", "zulu"]
        second, revision2 = store.snapshot()
        assert revision2 == revision == store.revision()
        assert second.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
        objects: list[StoreObject] = [*first.filter_lists, *first.filter_actions, *first.policies]
        for obj in objects:
            assert store.get(kind_of(obj), obj.id) == obj
