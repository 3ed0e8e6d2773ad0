"""Policies between the store and the directory: DirectoryAdmin Publish, Assign, Import, Export, their CLI
commands, and --directory-publish — against a real slapd (tests/slapd.py, the domain of
tests/test_directory_sync.py) and a real AD (Samba DC, tests/samba.py).

The server runs in process (PolicyServer on its own loop thread). Assign tests use a one-hour interval, so a
registry that follows at once proves the sync ran on the call, not on the timer. Everything waits with
deadlines, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, admin_channel
from dirkit import DirServer, in_sync, run_cli, wait_until
from slapd import Slapd, slapd_unavailable, start_slapd
from test_directory_sync import (
    GPO_DB,
    GPO_WEB,
    IPSEC_CSE,
    REQUEST,
    RESPOND,
    SECURE,
    SUFFIX,
    build_domain,
    settings_for,
)

from policyagent.cli import main as cli_main
from policyagent.directory import adstore
from policyagent.directory.sync import DirectorySettings
from policyagent.pb import admin_grpc, admin_pb, assign_pb, directory_grpc, directory_pb, pb

_why = slapd_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

CUSTOM = "{9D6ADE54-5F60-4172-8384-E5F607182930}"
LONG_INTERVAL_S = 3600.0


# ---------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def ldap(tmp_path: Path) -> Iterator[Slapd]:
    server = start_slapd(tmp_path / "slapd")
    build_domain(server)
    yield server
    server.stop()


@pytest.fixture
def conn(ldap: Slapd) -> Iterator[Any]:
    c = ldap.connection()
    yield c
    c.unbind()


@pytest.fixture
def dir_server(tmp_path: Path) -> Iterator[Callable[..., DirServer]]:
    started: list[DirServer] = []

    def start(settings: DirectorySettings) -> DirServer:
        server = DirServer(tmp_path / f"data-{len(started)}", settings)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.close()


def admin(server: DirServer) -> admin_grpc.PolicyAdminStub:
    return admin_grpc.PolicyAdminStub(server.channel)


def store_contents(channel: grpc.Channel) -> pb.StoreContents:
    stub = admin_grpc.PolicyAdminStub(channel)
    return stub.GetStore(admin_pb.GetStoreRequest(include_secrets=True), timeout=RPC_TIMEOUT_S).contents


def comparable(c: pb.StoreContents, policy_ids: list[str] | None = None) -> pb.StoreContents:
    """The policies (all, or those ids) and the filter lists / actions they use, each list sorted by id, without
    store bookkeeping (revisions, times, assigned)."""
    policies = [p for p in c.policies if policy_ids is None or p.id in policy_ids]
    lists = {r.filter_list_id for p in policies for r in p.rules}
    actions = {r.filter_action_id for p in policies for r in p.rules}
    out = pb.StoreContents()
    for field, objs in (
        ("policies", policies),
        ("filter_lists", [x for x in c.filter_lists if x.id in lists]),
        ("filter_actions", [x for x in c.filter_actions if x.id in actions]),
    ):
        for obj in sorted(objs, key=lambda o: o.id):
            copy = getattr(out, field).add()
            copy.CopyFrom(obj)
            copy.ClearField("revision")
            copy.ClearField("modified_unix_ms")
            if field == "policies":
                copy.ClearField("assigned")
                if copy.isakmp.ike_version == 1:
                    copy.isakmp.ike_version = 0
    return out


def copy_policy(source: pb.Policy, policy_id: str, name: str) -> pb.Policy:
    """`source` under another id and name (its rules and default response rule with ids of their own)."""
    policy = pb.Policy()
    policy.CopyFrom(source)
    policy.id, policy.name = policy_id, name
    policy.ClearField("revision")
    prefix = policy_id[1:9]
    for i, rule in enumerate(policy.rules):
        rule.id = "{" + f"{prefix}-0000-4000-8000-{i + 1:012X}" + "}"
    if policy.HasField("default_response_rule"):
        policy.default_response_rule.id = "{" + f"{prefix}-0000-4000-8000-{0xFFF:012X}" + "}"
    return policy


def put(channel: grpc.Channel, *objs: Any) -> admin_pb.ApplyResponse:
    """Create or update the objects (an update based on the stored revision, whatever `obj.revision` says)."""
    stored = store_contents(channel)
    revisions = {o.id: o.revision for o in (*stored.policies, *stored.filter_lists, *stored.filter_actions)}
    mutations = []
    for given in objs:
        obj = type(given)()
        obj.CopyFrom(given)
        obj.revision = revisions.get(obj.id, 0)
        if isinstance(obj, pb.Policy):
            mutations.append(admin_pb.Mutation(put_policy=obj))
        elif isinstance(obj, pb.FilterList):
            mutations.append(admin_pb.Mutation(put_filter_list=obj))
        else:
            mutations.append(admin_pb.Mutation(put_filter_action=obj))
    request = admin_pb.ApplyRequest(mutations=mutations, operation="test")
    return admin_grpc.PolicyAdminStub(channel).Apply(request, timeout=RPC_TIMEOUT_S)


def failed(call: Callable[[], Any], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value
    return str(caught.value.details())


def directory_dns(conn: Any) -> set[str]:
    return {e.dn.casefold() for e in adstore.read_entries(conn, SUFFIX)}


def gpc_state(conn: Any, dn: str) -> tuple[str, int]:
    """(gPCMachineExtensionNames, versionNumber) of the groupPolicyContainer at `dn`."""
    assert conn.search(dn, "(objectClass=*)", "BASE", attributes=["gPCMachineExtensionNames", "versionNumber"])
    attrs = conn.response[0]["attributes"]

    def first(value: Any) -> Any:
        return (value or [""])[0] if isinstance(value, list) else value

    return str(first(attrs.get("gPCMachineExtensionNames")) or ""), int(first(attrs["versionNumber"]))


def gpo_state(conn: Any, guid: str) -> tuple[str, int]:
    return gpc_state(conn, f"CN={guid},CN=Policies,CN=System,{SUFFIX}")


def pointer_name(conn: Any, guid: str) -> str | None:
    dn = f"CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,CN={guid},CN=Policies,CN=System,{SUFFIX}"
    if not conn.search(dn, "(objectClass=ipsecPolicy)", attributes=["ipsecName"]):
        return None
    values = conn.entries[0].entry_attributes_as_dict.get("ipsecName") or [""]
    return str(values[0])


# ---------------------------------------------------------------------------- Publish


def test_publish_every_policy_reads_back_identical(
    ldap: Slapd, conn: Any, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    server = dir_server(settings_for(ldap, tmp_path, interval_s=LONG_INTERVAL_S))
    wait_until(lambda: in_sync(server), "the first sync")
    response = server.directory.Publish(directory_pb.DirectoryPublishRequest(), timeout=RPC_TIMEOUT_S)
    store = store_contents(server.channel)
    assert sorted(response.policies) == sorted(p.id for p in store.policies)
    assert response.added and not response.modified and not response.deleted
    assert all(dn.endswith(f"CN=System,{SUFFIX}") for dn in response.added)
    assert comparable(adstore.read_policies(conn, SUFFIX, None)) == comparable(store)

    # Publishing again changes nothing; one policy by name is selected on its own.
    again = server.directory.Publish(directory_pb.DirectoryPublishRequest(), timeout=RPC_TIMEOUT_S)
    assert (list(again.added), list(again.modified), list(again.deleted)) == ([], [], [])
    one = server.directory.Publish(
        directory_pb.DirectoryPublishRequest(policies=["client (respond only)"]), timeout=RPC_TIMEOUT_S)
    assert list(one.policies) == [RESPOND]
    assert "no-such-policy" in failed(lambda: server.directory.Publish(
        directory_pb.DirectoryPublishRequest(policies=["no-such-policy"]), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.NOT_FOUND)

    # The CLI, end to end.
    code, out, err = run_cli("directory", "publish", "Secure Server (Require Security)", "-r", server.address)
    assert code == 0, err
    assert out.startswith("published 1 policy: 0 added, 0 modified, 0 deleted"), out

    # The directory down: UNAVAILABLE naming it, and the status keeps the error (no password in it).
    ldap.stop()
    text = failed(lambda: server.directory.Publish(directory_pb.DirectoryPublishRequest(), timeout=RPC_TIMEOUT_S),
                  grpc.StatusCode.UNAVAILABLE)
    assert ldap.url in text and ldap.password not in text
    assert server.status().last_error.startswith("publish: ")


def test_what_the_blobs_cannot_carry_is_refused_and_nothing_is_written(
    ldap: Slapd, conn: Any, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    server = dir_server(settings_for(ldap, tmp_path, interval_s=LONG_INTERVAL_S))
    wait_until(lambda: in_sync(server), "the first sync")
    store = store_contents(server.channel)
    secure = next(p for p in store.policies if p.id == SECURE)
    ikev2 = copy_policy(secure, CUSTOM, "IKEv2 servers")
    ikev2.isakmp.ike_version = 2
    aes_action = pb.FilterAction()
    aes_action.CopyFrom(next(a for a in store.filter_actions if a.name == "Require Security"))
    require = aes_action.id
    aes_action.id, aes_action.name = "{AE5AE5AE-1111-4000-8000-000000000001}", "Require AES"
    aes_action.methods[0].esp.encryption = pb.CIPHER_AES256
    aes = copy_policy(secure, "{AE5AE5AE-2222-4000-8000-000000000002}", "AES servers")
    for rule in aes.rules:
        if rule.filter_action_id == require:
            rule.filter_action_id = aes_action.id
    put(server.channel, ikev2, aes_action, aes)
    before = directory_dns(conn)

    text = failed(lambda: server.directory.Publish(
        directory_pb.DirectoryPublishRequest(policies=["IKEv2 servers"]), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "IKEv2 servers" in text and "isakmp" in text and "IKEv2" in text, text
    text = failed(lambda: server.directory.Publish(
        directory_pb.DirectoryPublishRequest(policies=[aes.id]), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "Require AES" in text and "AES" in text, text
    # Publishing everything refuses as a whole: nothing of the good policies is written either.
    failed(lambda: server.directory.Publish(directory_pb.DirectoryPublishRequest(), timeout=RPC_TIMEOUT_S),
           grpc.StatusCode.INVALID_ARGUMENT)
    # Assign publishes first: refused the same way, the GPO left as it was.
    version = gpo_state(conn, GPO_DB)
    text = failed(lambda: server.directory.Assign(
        directory_pb.DirectoryAssignRequest(gpo="Db IPsec", policy="IKEv2 servers"), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "IKEv2" in text
    assert directory_dns(conn) == before
    assert gpo_state(conn, GPO_DB) == version and adstore.gpo_assignment(conn, SUFFIX, GPO_DB) == REQUEST
    assert server.policy_of("db1") == REQUEST
    code, _out, err = run_cli("directory", "publish", "IKEv2 servers", "-r", server.address)
    assert code != 0 and "IKEv2" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------- Assign


def test_assign_takes_effect_at_once_and_clear(
    ldap: Slapd, conn: Any, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    server = dir_server(settings_for(ldap, tmp_path, interval_s=LONG_INTERVAL_S))
    wait_until(lambda: in_sync(server), "the first sync")
    assert server.policy_of("db1") == REQUEST
    ext, version = gpo_state(conn, GPO_DB)
    assert ext == IPSEC_CSE

    # A policy only the store has: published first, then the GPO points at it, then the registry follows.
    store = store_contents(server.channel)
    custom = copy_policy(next(p for p in store.policies if p.id == SECURE), CUSTOM, "Db servers")
    put(server.channel, custom)
    response = server.directory.Assign(
        directory_pb.DirectoryAssignRequest(gpo="Db IPsec", policy="Db servers"), timeout=RPC_TIMEOUT_S)
    assert (response.gpo.id, response.gpo.policy_id, response.gpo.policy_name) == (GPO_DB, CUSTOM, "Db servers")
    assert list(response.changed_computers) == ["db1"]
    assert any("ipsecPolicy" + CUSTOM in dn for dn in response.published.added), response.published
    assert server.policy_of("db1") == CUSTOM  # no waiting: the interval is an hour
    assert server.policy_of("web1") == SECURE
    assert adstore.gpo_assignment(conn, SUFFIX, GPO_DB) == CUSTOM
    assert pointer_name(conn, GPO_DB) == "Db servers"
    assert gpo_state(conn, GPO_DB) == (IPSEC_CSE, version + 1)
    assert comparable(adstore.read_policies(conn, SUFFIX, [CUSTOM])) == comparable(
        store_contents(server.channel), [CUSTOM])

    # Clear: the pointer object goes, the IPsec extension pair leaves gPCMachineExtensionNames.
    response = server.directory.Assign(directory_pb.DirectoryAssignRequest(gpo=GPO_DB), timeout=RPC_TIMEOUT_S)
    assert response.gpo.policy_id == "" and list(response.changed_computers) == ["db1"]
    assert server.policy_of("db1") == RESPOND  # the domain's GPO
    assert adstore.gpo_assignment(conn, SUFFIX, GPO_DB) is None and pointer_name(conn, GPO_DB) is None
    assert gpo_state(conn, GPO_DB) == ("", version + 2)

    # The CLI, end to end: assign by GPO name and policy name, then --clear.
    code, out, err = run_cli("directory", "assign", "Web IPsec", "Server (Request Security)", "-r", server.address)
    assert code == 0, err
    assert 'GPO "Web IPsec" assigns "Server (Request Security)"' in out and "web1" in out and "web2" in out, out
    assert server.policy_of("web1") == REQUEST and adstore.gpo_assignment(conn, SUFFIX, GPO_WEB) == REQUEST
    code, out, err = run_cli("directory", "assign", GPO_WEB.lower(), "--clear", "-r", server.address)
    assert code == 0 and "assigns no IPsec policy" in out, err
    assert server.policy_of("web1") == RESPOND
    code, _out, err = run_cli("directory", "assign", "Web IPsec", "-r", server.address)
    assert code != 0 and "--clear" in err

    # Refusals: a local GPO (its policy is set with `gpo set`), a GPO that does not exist.
    server.apply(assign_pb.TopologyMutation(put_gpo=assign_pb.Gpo(name="Local GPO", enabled=True)))
    assert "gpo set" in failed(lambda: server.directory.Assign(
        directory_pb.DirectoryAssignRequest(gpo="Local GPO", policy=SECURE), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.FAILED_PRECONDITION)
    failed(lambda: server.directory.Assign(
        directory_pb.DirectoryAssignRequest(gpo="No such GPO", policy=SECURE), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.NOT_FOUND)


# ---------------------------------------------------------------------------- Import


def test_import_from_the_directory_what_another_tool_published(
    ldap: Slapd, conn: Any, tmp_path: Path, dir_server: Callable[..., DirServer]
) -> None:
    server = dir_server(settings_for(ldap, tmp_path, interval_s=LONG_INTERVAL_S))
    wait_until(lambda: in_sync(server), "the first sync")
    # Another tool writes the directory: a policy the store lacks, and the store's REQUEST, changed.
    theirs = store_contents(server.channel)
    request_policy = next(p for p in theirs.policies if p.id == REQUEST)
    theirs.policies.append(copy_policy(request_policy, CUSTOM, "From AD"))
    request_policy.description = "edited in the directory"
    request_policy.polling_interval_minutes = 60
    adstore.publish(conn, SUFFIX, theirs, [CUSTOM, REQUEST])

    response = server.directory.Import(
        directory_pb.DirectoryImportRequest(policies=["from ad", REQUEST.lower()]), timeout=RPC_TIMEOUT_S)
    assert sorted(p.id for p in response.written.policies) == sorted([CUSTOM, REQUEST])
    assert all(m.preshared_key.key in ("", "********") for p in response.written.policies
               for r in p.rules for m in r.auth_methods)  # the response masks secrets
    store = store_contents(server.channel)
    assert comparable(store, [CUSTOM, REQUEST]) == comparable(adstore.read_policies(conn, SUFFIX, [CUSTOM, REQUEST]))
    assert next(p for p in store.policies if p.id == REQUEST).description == "edited in the directory"

    # Unknown names are refused, naming them; nothing written.
    revision = admin(server).GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).store_revision
    assert "Nowhere" in failed(lambda: server.directory.Import(
        directory_pb.DirectoryImportRequest(policies=["Nowhere"]), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert admin(server).GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).store_revision == revision

    # The CLI, end to end: everything the directory holds.
    code, out, err = run_cli("directory", "import", "-r", server.address)
    assert code == 0, err
    assert out.startswith("imported 2 policies") and '"From AD"' in out, out


def test_ldif_import_and_export_without_a_directory(inproc_server: Callable[..., Any], tmp_path: Path) -> None:
    server = inproc_server()
    channel = admin_channel(server.address)
    try:
        directory = directory_grpc.DirectoryAdminStub(channel)
        # Export needs a base DN when the server has no directory.
        assert "base" in failed(lambda: directory.Export(
            directory_pb.DirectoryExportRequest(), timeout=RPC_TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT)
        # Publish, Assign, Import from the directory need one.
        for call in (
            lambda: directory.Publish(directory_pb.DirectoryPublishRequest(), timeout=RPC_TIMEOUT_S),
            lambda: directory.Assign(directory_pb.DirectoryAssignRequest(gpo="x"), timeout=RPC_TIMEOUT_S),
            lambda: directory.Import(directory_pb.DirectoryImportRequest(), timeout=RPC_TIMEOUT_S),
        ):
            assert "--directory" in failed(call, grpc.StatusCode.FAILED_PRECONDITION)

        # Export → LDIF → load_ldif → contents_from_entries: the store's policies, identical (keys in clear).
        store = store_contents(channel)
        exported = directory.Export(directory_pb.DirectoryExportRequest(base_dn=SUFFIX), timeout=RPC_TIMEOUT_S)
        assert sorted(exported.policies) == sorted(p.id for p in store.policies) and exported.base_dn == SUFFIX
        entries = adstore.load_ldif(exported.ldif, "export")
        assert len(entries) == exported.entries
        assert all(e.dn.endswith(f"CN=IP Security,CN=System,{SUFFIX}") for e in entries)
        assert comparable(adstore.contents_from_entries(entries)) == comparable(store)

        # An LDIF of a policy the store lacks (written by another tool) imports without a directory.
        theirs = pb.StoreContents()
        theirs.CopyFrom(store)
        theirs.policies.append(copy_policy(next(p for p in store.policies if p.id == SECURE), CUSTOM, "From LDIF"))
        ldif = tmp_path / "theirs.ldif"
        ldif.write_text(adstore.dump_ldif(adstore.policy_entries(theirs, [CUSTOM], SUFFIX)), encoding="utf-8")
        code, out, err = run_cli("directory", "import", "--ldif", str(ldif), "From LDIF", "-r", server.address)
        assert code == 0, err
        assert 'policy "From LDIF"' in out, out
        assert comparable(store_contents(channel), [CUSTOM]) == comparable(theirs, [CUSTOM])
        # A broken LDIF names the line.
        assert "ldif:1" in failed(lambda: directory.Import(
            directory_pb.DirectoryImportRequest(ldif="no colon here\n"), timeout=RPC_TIMEOUT_S),
            grpc.StatusCode.INVALID_ARGUMENT)

        # The CLI writes the export 0600 and says the keys are in clear.
        out_file = tmp_path / "export.ldif"
        code, out, err = run_cli(
            "directory", "export", "--ldif", str(out_file), "--base", SUFFIX, "From LDIF", "-r", server.address)
        assert code == 0, err
        assert "in clear" in out and stat.S_IMODE(os.stat(out_file).st_mode) == 0o600
        back = adstore.contents_from_entries(adstore.load_ldif(out_file.read_text(encoding="utf-8")))
        assert comparable(back) == comparable(store_contents(channel), [CUSTOM])
        code, _out, err = run_cli("directory", "export", "--ldif", str(out_file), "-r", server.address)
        assert code != 0 and "base" in err
    finally:
        channel.close()


# ---------------------------------------------------------------------------- --directory-publish


def test_directory_publish_keeps_the_directory_copy_current(
    ldap: Slapd,
    conn: Any,
    tmp_path: Path,
    dir_server: Callable[..., DirServer],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = dir_server(settings_for(ldap, tmp_path, interval_s=LONG_INTERVAL_S, publish=True))
    wait_until(lambda: in_sync(server), "the first sync")
    server.directory.Publish(directory_pb.DirectoryPublishRequest(policies=[SECURE]), timeout=RPC_TIMEOUT_S)

    def directory_copy(policy_id: str) -> pb.Policy:
        return adstore.read_policies(conn, SUFFIX, [policy_id]).policies[0]

    # An edit of a published policy reaches the directory.
    store = store_contents(server.channel)
    secure = next(p for p in store.policies if p.id == SECURE)
    secure.description = "edited in the store"
    put(server.channel, secure)
    wait_until(lambda: directory_copy(SECURE).description == "edited in the store", "the directory copy")

    # An edit of a filter action a published policy uses republishes that policy's objects.
    action = next(a for a in store.filter_actions if a.id in {r.filter_action_id for r in secure.rules}
                  and a.action == pb.ACTION_TYPE_NEGOTIATE)
    action.methods[0].lifetime_seconds = 1800
    put(server.channel, action)

    def action_republished() -> bool:
        back = adstore.read_policies(conn, SUFFIX, [SECURE])
        return any(a.id == action.id and a.methods[0].lifetime_seconds == 1800 for a in back.filter_actions)

    wait_until(action_republished, "the filter action's directory copy")

    # A policy the directory does not hold stays out of it.
    respond = next(p for p in store.policies if p.id == RESPOND)
    respond.description = "not in the directory"
    put(server.channel, respond)
    secure.description = "a later edit"
    put(server.channel, secure)  # serialized after the respond edit on the directory thread
    wait_until(lambda: directory_copy(SECURE).description == "a later edit", "the later edit")
    assert not any(RESPOND[1:-1] in dn for dn in {d.upper() for d in directory_dns(conn)})

    # An edit the blobs cannot carry: the store write stands, the directory copy stays, the status says why,
    # and the log says it once, not on every write.
    monkeypatch.setattr(logging.getLogger("policyagent"), "propagate", True)  # to caplog's root handler
    caplog.set_level(logging.INFO, logger="policyagent.server.directory")
    secure.isakmp.ike_version = 2
    put(server.channel, secure)
    secure.description = "still IKEv2"
    put(server.channel, secure)

    def reported() -> directory_pb.DirectoryStatus:
        status = server.status()
        assert any(SECURE in p and "IKEv2" in p for p in status.problems), status.problems
        return status

    status = wait_until(reported, "the republish failure in the status")
    assert SECURE in status.last_error
    assert status.state == directory_pb.DIRECTORY_STATE_IN_SYNC  # the sync itself is fine
    assert directory_copy(SECURE).isakmp.ike_version == 0
    assert next(p for p in store_contents(server.channel).policies if p.id == SECURE).isakmp.ike_version == 2
    server.run(server.server.directory.republished())
    warnings = [r for r in caplog.records if r.getMessage() == "the directory's copy of a policy could not be updated"]
    assert len(warnings) == 1, warnings
    assert all(ldap.password not in r.getMessage() for r in caplog.records)
    # Fixed in the store: the problem goes.
    secure.isakmp.ike_version = 0
    secure.description = "fixed"
    put(server.channel, secure)
    wait_until(lambda: directory_copy(SECURE).description == "fixed", "the fixed policy")
    wait_until(lambda: not any(SECURE in p for p in server.status().problems), "the problem to clear")


# ---------------------------------------------------------------------------- Active Directory (Samba)


@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")  # ldap3 2.9.1's valid_names check
def test_publish_and_assign_on_an_active_directory(tmp_path: Path, dir_server: Callable[..., DirServer]) -> None:
    """Against a real AD (Samba DC): Publish every default reads back identical, Assign to a GPO the DC
    created takes effect at once (an hour's interval) with the pointer, extension names and version as
    Windows writes them, and clearing it works."""
    from samba import samba_unavailable, start_samba

    why = samba_unavailable()
    if why is not None:
        pytest.skip(why)
    dc = start_samba(tmp_path / "samba")
    try:
        web = dc.add_ou(f"OU=Web,{dc.base_dn}")
        dc.add_computer(web, "web1", f"web1.{dc.domain}")
        gpo = dc.create_gpo("Web IPsec")
        dc.link_gpo(web, gpo)
        password = tmp_path / "ad.password"
        password.write_text(dc.admin_password + "\n", encoding="utf-8")
        settings = DirectorySettings(
            url=dc.url_ldaps, base_dn=dc.base_dn, user=dc.admin_user, password_file=password,
            ca_file=dc.ca_file, tls_name=dc.tls_name, interval_s=LONG_INTERVAL_S,
        )
        server = dir_server(settings)
        wait_until(lambda: in_sync(server), "the first sync with the DC", 30)
        assert server.policy_of("web1") == ""

        published = server.directory.Publish(directory_pb.DirectoryPublishRequest(), timeout=RPC_TIMEOUT_S)
        store = store_contents(server.channel)
        assert sorted(published.policies) == sorted(p.id for p in store.policies)
        conn = dc.connection()
        try:
            ids = [p.id for p in store.policies]
            assert comparable(adstore.read_policies(conn, dc.base_dn, ids), ids) == comparable(store)

            response = server.directory.Assign(
                directory_pb.DirectoryAssignRequest(gpo="Web IPsec", policy=SECURE), timeout=RPC_TIMEOUT_S)
            assert response.gpo.policy_id == SECURE and list(response.changed_computers) == ["web1"]
            assert server.policy_of("web1") == SECURE
            assert adstore.gpo_assignment(conn, dc.base_dn, gpo) == SECURE
            ext, version = gpc_state(conn, dc.gpo_dn(gpo))
            assert IPSEC_CSE in ext and version & 0xFFFF >= 1

            response = server.directory.Assign(
                directory_pb.DirectoryAssignRequest(gpo=gpo), timeout=RPC_TIMEOUT_S)
            assert response.gpo.policy_id == "" and server.policy_of("web1") == ""
            assert adstore.gpo_assignment(conn, dc.base_dn, gpo) is None
            ext, cleared = gpc_state(conn, dc.gpo_dn(gpo))
            assert IPSEC_CSE not in ext and cleared == version + 1
        finally:
            conn.unbind()
    finally:
        dc.stop()


def test_cli_help_says_what_publish_writes_and_that_keys_are_in_clear() -> None:
    def help_of(*argv: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            cli_main([*argv, "--help"])
        return " ".join(out.getvalue().split())

    text = help_of("directory", "export")
    assert "in clear" in text and "0600" in text
    text = help_of("directory", "publish")
    assert "CN=IP Security" in text and "AES" in text and "IKEv2" in text and "in clear" in text
