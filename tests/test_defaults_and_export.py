"""The Windows defaults as data, restore-defaults, and the export file format."""

from __future__ import annotations

import json

import pytest

from policyagent.model import exportfmt
from policyagent.model import settings as S
from policyagent.model.defaults import default_contents, default_ids, restore_defaults_plan
from policyagent.model.errors import ValidationError
from policyagent.model.objects import Kind
from policyagent.model.view import ContentsView
from policyagent.model.writes import Delete, Put, plan_writes
from policyagent.pb import pb


def apply(view: ContentsView, mutations: list[Put | Delete]) -> None:
    """Writes a plan into an in-memory view the way a store does (revision bump)."""
    plan = plan_writes(view, mutations)
    for planned in plan.puts:
        planned.obj.revision += 1
        view.add(planned.obj)
    for deleted in plan.deletes:
        view.remove(deleted.kind, deleted.object_id)


def by_name(contents: pb.StoreContents) -> dict[str, object]:
    return {o.name: o for o in [*contents.policies, *contents.filter_lists, *contents.filter_actions]}


def test_defaults_have_the_windows_names_and_rules() -> None:
    contents = default_contents()
    assert [p.name for p in contents.policies] == [
        "Client (Respond Only)",
        "Server (Request Security)",
        "Secure Server (Require Security)",
    ]
    assert {f.name for f in contents.filter_lists} == {"All IP Traffic", "All ICMP Traffic"}
    assert {a.name for a in contents.filter_actions} == {"Permit", "Request Security (Optional)", "Require Security"}
    names = {fl.id: fl.name for fl in contents.filter_lists} | {fa.id: fa.name for fa in contents.filter_actions}
    rules = {p.name: [(names[r.filter_list_id], names[r.filter_action_id]) for r in p.rules] for p in contents.policies}
    assert rules == {
        "Client (Respond Only)": [],
        "Server (Request Security)": [("All IP Traffic", "Request Security (Optional)"), ("All ICMP Traffic", "Permit")],
        "Secure Server (Require Security)": [("All IP Traffic", "Require Security"), ("All ICMP Traffic", "Permit")],
    }
    for p in contents.policies:
        assert not p.assigned
        assert p.default_response_rule.active
        assert p.polling_interval_minutes == 180
        assert p.isakmp.lifetime_minutes == 480
        assert [a.WhichOneof("method") for a in p.default_response_rule.auth_methods] == ["kerberos"]
        for r in p.rules:
            assert [a.WhichOneof("method") for a in r.auth_methods] == ["kerberos"]
    actions = {a.name: a for a in contents.filter_actions}
    assert actions["Request Security (Optional)"].inbound_passthrough
    assert actions["Request Security (Optional)"].fallback_to_clear
    assert actions["Require Security"].inbound_passthrough
    assert not actions["Require Security"].fallback_to_clear
    assert actions["Permit"].action == pb.ACTION_TYPE_PERMIT
    assert S.format_qmsecmethods(list(actions["Require Security"].methods)) == (
        "ESP[3DES,SHA1]:100000k/3600s ESP[3DES,MD5]:100000k/3600s ESP[DES,SHA1]:100000k/3600s ESP[DES,MD5]:100000k/3600s"
    )
    lists = {f.name: f for f in contents.filter_lists}
    (icmp,) = lists["All ICMP Traffic"].filters
    assert (icmp.source.kind, icmp.destination.kind, icmp.protocol, icmp.mirrored) == (
        pb.ADDRESS_KIND_ME,
        pb.ADDRESS_KIND_ANY,
        1,
        True,
    )


def test_defaults_pass_the_validator() -> None:
    view = ContentsView()
    plan = plan_writes(view, restore_defaults_plan(view))
    assert len(plan.puts) == 8


def test_restore_defaults_recreates_only_defaults() -> None:
    view = ContentsView()
    apply(view, list(restore_defaults_plan(view)))
    mine = pb.FilterList(name="Mine", filters=[pb.Filter(source=pb.Address(kind=pb.ADDRESS_KIND_ME), destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip="192.0.2.7"), mirrored=True)])
    apply(view, [Put(mine)])
    secure = next(p for p in view.objects(Kind.POLICY) if p.name.startswith("Secure"))
    changed = pb.Policy()
    changed.CopyFrom(secure)
    changed.description = "edited"
    changed.assigned = True
    apply(view, [Put(changed)])
    client = next(p for p in view.objects(Kind.POLICY) if p.name.startswith("Client"))
    apply(view, [Delete(Kind.POLICY, client.id)])

    apply(view, list(restore_defaults_plan(view)))
    names = {o.name for k in Kind for o in view.objects(k)}
    assert "Mine" in names and "Client (Respond Only)" in names
    restored = view.get(Kind.POLICY, secure.id)
    assert isinstance(restored, pb.Policy)
    assert restored.description != "edited"
    assert restored.assigned  # restoring content keeps the store's assignment
    assert default_ids() <= {o.id for k in Kind for o in view.objects(k)}


def test_export_round_trip_is_exact() -> None:
    contents = default_contents()
    contents.policies[0].rules.add(name="x", filter_list_id=contents.filter_lists[0].id)
    contents.policies[0].rules[0].auth_methods.add(preshared_key=pb.PresharedKeyAuth(key="s3cret"))
    contents.policies[1].revision = 17
    text = exportfmt.dumps(exportfmt.export_file(contents))
    again = exportfmt.loads(text)
    assert again.contents == exportfmt.canonical_contents(contents)
    assert exportfmt.dumps(again) == text
    assert '"key": "s3cret"' in text  # a full backup carries secrets, like Windows' .ipsec files
    assert '"revision"' not in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "is not JSON"),
        ("[]", "not a JSON object"),
        ('{"format": "other"}', "is not a policyagent export file"),
        ('{"format": "policyagent-ipsec-export", "version": 9}', "has format version 9"),
        ('{"format": "policyagent-ipsec-export", "version": 1, "contents": {"policies": [{"nme": 1}]}}', "is malformed"),
    ],
)
def test_bad_export_files_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        exportfmt.loads(text, source="backup.json")
    assert info.value.violations[0].path == "backup.json"


def test_import_replaces_same_ids_and_keeps_others() -> None:
    view = ContentsView()
    apply(view, list(restore_defaults_plan(view)))
    contents = default_contents()
    contents.filter_actions[0].description = "from file"
    file = exportfmt.export_file(contents)
    apply(view, exportfmt.import_mutations(view, file))
    fa = view.get(Kind.FILTER_ACTION, contents.filter_actions[0].id)
    assert fa is not None and fa.description == "from file"


def test_import_with_name_clash_is_refused() -> None:
    view = ContentsView()
    apply(view, list(restore_defaults_plan(view)))
    clash = pb.StoreContents(filter_actions=[pb.FilterAction(id="{44444444-4444-4444-4444-444444444444}", name="permit", action=pb.ACTION_TYPE_PERMIT)])
    with pytest.raises(ValidationError, match='already named "permit"'):
        plan_writes(view, exportfmt.import_mutations(view, exportfmt.export_file(clash)))


def test_defaults_file_is_valid_json_in_the_export_format() -> None:
    from policyagent.model.defaults import DEFAULTS_FILE, defaults_dir

    data = json.loads((defaults_dir() / DEFAULTS_FILE).read_text())
    assert data["format"] == exportfmt.FORMAT
