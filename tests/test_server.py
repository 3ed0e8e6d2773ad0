"""The policy server: PolicyAdmin over loopback gRPC, health, reflection, listen rules, shutdown, durability."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, InProcessServer, ServerProcess, admin_certificate, server_command
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from policyagent.model import errors as model_errors
from policyagent.model.errors import (
    ConflictError,
    NotFoundError,
    PolicyError,
    StoreError,
    ValidationError,
    Violation,
)
from policyagent.model.objects import Kind
from policyagent.pb import admin_grpc, admin_pb, pb
from policyagent.server.admin import SECRET_MASK
from policyagent.server.app import ConfigError, parse_listen
from policyagent.server.errors import CATALOG, ERROR_METADATA_KEY, RpcFailure, error_detail, error_from_rpc
from policyagent.store.base import PolicyStore
from policyagent.store.sqlite import SqliteStore

DEFAULT_POLICY_NAMES = {
    "Client (Respond Only)",
    "Server (Request Security)",
    "Secure Server (Require Security)",
}
SERVICE = "policyagent.v1.PolicyAdmin"


# ---------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def a_filter_list(name: str, ip: str = "192.0.2.10") -> pb.FilterList:
    return pb.FilterList(
        name=name,
        filters=[
            pb.Filter(
                mirrored=True,
                source=pb.Address(kind=pb.ADDRESS_KIND_ME),
                destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=ip),
            )
        ],
    )


def put(obj: pb.Policy | pb.FilterList | pb.FilterAction) -> admin_pb.Mutation:
    if isinstance(obj, pb.Policy):
        return admin_pb.Mutation(put_policy=obj)
    if isinstance(obj, pb.FilterList):
        return admin_pb.Mutation(put_filter_list=obj)
    return admin_pb.Mutation(put_filter_action=obj)


def delete(kind: admin_pb.ObjectKind.ValueType, object_id: str, revision: int = 0) -> admin_pb.Mutation:
    return admin_pb.Mutation(delete=admin_pb.ObjectRef(kind=kind, id=object_id, revision=revision))


def apply(
    stub: admin_grpc.PolicyAdminStub,
    *mutations: admin_pb.Mutation,
    user: str = "alice",
    operation: str = "test",
    dry_run: bool = False,
) -> admin_pb.ApplyResponse:
    return stub.Apply(
        admin_pb.ApplyRequest(mutations=mutations, operation=operation, dry_run=dry_run),
        metadata=(("x-policyagent-user", user),),
        timeout=RPC_TIMEOUT_S,
    )


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()  # type: ignore[attr-defined, no-any-return]


def details_of(exc: grpc.RpcError) -> str:
    return exc.details()  # type: ignore[attr-defined, no-any-return]


def psk_policy(stub: admin_grpc.PolicyAdminStub, name: str, key: str) -> pb.Policy:
    """A new policy modelled on a default one, every rule and the default rule on a pre-shared key."""
    base = stub.GetPolicy(
        admin_pb.GetObjectRequest(name="Server (Request Security)", include_secrets=True), timeout=RPC_TIMEOUT_S
    )
    policy = pb.Policy()
    policy.CopyFrom(base)
    policy.id = ""
    policy.name = name
    policy.revision = 0
    policy.modified_unix_ms = 0
    policy.assigned = False
    psk = pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=key))
    for rule in policy.rules:
        rule.id = ""
        del rule.auth_methods[:]
        rule.auth_methods.append(psk)
    policy.default_response_rule.id = ""
    del policy.default_response_rule.auth_methods[:]
    policy.default_response_rule.auth_methods.append(psk)
    return policy


def psk_keys(policy: pb.Policy) -> list[str]:
    methods = [m for rule in policy.rules for m in rule.auth_methods]
    methods.extend(policy.default_response_rule.auth_methods)
    return [m.preshared_key.key for m in methods if m.WhichOneof("method") == "preshared_key"]


# ---------------------------------------------------------------- health and reflection


def test_health_serving(server: ServerProcess) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel())
    for service in ("", SERVICE):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_policy_admin(server: ServerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT_S))
    names = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


# ---------------------------------------------------------------- reading


def test_new_store_holds_the_default_policies(start_server: Callable[..., ServerProcess]) -> None:
    stub = start_server().admin()
    response = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    assert {p.name for p in response.contents.policies} == DEFAULT_POLICY_NAMES
    assert not any(p.assigned for p in response.contents.policies)  # none assigned, as on Windows
    assert response.contents.filter_lists and response.contents.filter_actions
    assert response.store_revision > 0


def test_get_by_name_is_case_insensitive_and_by_id(server: ServerProcess) -> None:
    stub = server.admin()
    by_name = stub.GetPolicy(admin_pb.GetObjectRequest(name="secure server (REQUIRE security)"), timeout=RPC_TIMEOUT_S)
    assert by_name.name == "Secure Server (Require Security)"
    # Ids are accepted without braces and in any case.
    bare = by_name.id.strip("{}").lower()
    by_id = stub.GetPolicy(admin_pb.GetObjectRequest(id=bare), timeout=RPC_TIMEOUT_S)
    assert by_id.id == by_name.id


def test_get_missing_object_is_not_found_naming_it(server: ServerProcess) -> None:
    stub = server.admin()
    exc = rpc_error(lambda: stub.GetFilterList(admin_pb.GetObjectRequest(name="No Such List"), timeout=RPC_TIMEOUT_S))
    assert code_of(exc) == grpc.StatusCode.NOT_FOUND
    assert "No Such List" in details_of(exc)
    assert isinstance(error_from_rpc(exc), NotFoundError)
    missing_id = "{00000000-0000-0000-0000-000000000001}"
    exc = rpc_error(lambda: stub.GetFilterAction(admin_pb.GetObjectRequest(id=missing_id), timeout=RPC_TIMEOUT_S))
    assert code_of(exc) == grpc.StatusCode.NOT_FOUND
    assert missing_id in details_of(exc)


# ---------------------------------------------------------------- writing


def test_apply_create_update_delete_round_trip(server: ServerProcess) -> None:
    stub = server.admin()
    name = unique("Round Trip")
    created = apply(stub, put(a_filter_list(name)), operation="add filterlist")
    assert len(created.written.filter_lists) == 1
    stored = created.written.filter_lists[0]
    assert stored.id.startswith("{") and stored.revision > 0 and stored.filters[0].id
    assert created.store_revision == stored.revision

    fetched = stub.GetFilterList(admin_pb.GetObjectRequest(name=name.upper()), timeout=RPC_TIMEOUT_S)
    assert fetched == stored

    fetched.description = "changed"
    updated = apply(stub, put(fetched), operation="set filterlist").written.filter_lists[0]
    assert updated.description == "changed" and updated.revision > stored.revision

    response = apply(stub, delete(admin_pb.OBJECT_KIND_FILTER_LIST, updated.id, updated.revision))
    assert [(d.kind, d.id) for d in response.deleted] == [(admin_pb.OBJECT_KIND_FILTER_LIST, updated.id)]
    exc = rpc_error(lambda: stub.GetFilterList(admin_pb.GetObjectRequest(id=updated.id), timeout=RPC_TIMEOUT_S))
    assert code_of(exc) == grpc.StatusCode.NOT_FOUND

    changes = stub.ListChanges(admin_pb.ListChangesRequest(), timeout=RPC_TIMEOUT_S).changes
    mine = [c for c in changes if c.object_id == stored.id]
    assert [c.operation for c in mine] == ["create", "update", "delete"]
    assert mine[1].context == "set filterlist"
    assert all(c.kind == admin_pb.OBJECT_KIND_FILTER_LIST for c in mine)
    # The admin certificate's name (authenticated), then the user the client claims.
    assert all(c.principal == "admin:test-admin/alice" for c in mine)


def test_dry_run_writes_nothing(server: ServerProcess) -> None:
    stub = server.admin()
    before = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).store_revision
    name = unique("Dry Run")
    response = apply(stub, put(a_filter_list(name)), dry_run=True)
    assert [fl.name for fl in response.written.filter_lists] == [name]
    after = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    assert after.store_revision == before
    assert name not in {fl.name for fl in after.contents.filter_lists}


def test_validation_error_carries_violations(server: ServerProcess) -> None:
    stub = server.admin()
    name = unique("Broken")
    bad = a_filter_list(name, ip="300.1.2.3")
    bad.filters.append(
        pb.Filter(source=pb.Address(kind=pb.ADDRESS_KIND_ME), destination=pb.Address(kind=pb.ADDRESS_KIND_UNSPECIFIED))
    )
    exc = rpc_error(lambda: apply(stub, put(bad)))
    assert code_of(exc) == grpc.StatusCode.INVALID_ARGUMENT
    error = error_from_rpc(exc)
    assert isinstance(error, ValidationError)
    assert len(error.violations) >= 2
    paths = [v.path for v in error.violations]
    assert f'filter list "{name}"/filter 1' in paths
    assert f'filter list "{name}"/filter 2' in paths
    assert any("300.1.2.3" in v.message for v in error.violations)
    assert str(error) == details_of(exc)
    # Nothing was written.
    store = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    assert name not in {fl.name for fl in store.contents.filter_lists}


def test_empty_mutation_and_unspecified_kind_are_invalid(server: ServerProcess) -> None:
    stub = server.admin()
    exc = rpc_error(lambda: apply(stub, admin_pb.Mutation()))
    assert code_of(exc) == grpc.StatusCode.INVALID_ARGUMENT
    exc = rpc_error(lambda: apply(stub, delete(admin_pb.OBJECT_KIND_UNSPECIFIED, "{x}")))
    error = error_from_rpc(exc)
    assert isinstance(error, ValidationError)
    assert error.violations[0].path == "mutation 1" and error.violations[0].field == "kind"


def test_second_admin_with_stale_revision_is_aborted(server: ServerProcess) -> None:
    first, second = server.admin(), server.admin()
    name = unique("Contended")
    created = apply(first, put(a_filter_list(name))).written.filter_lists[0]

    mine = pb.FilterList()
    mine.CopyFrom(created)
    theirs = pb.FilterList()
    theirs.CopyFrom(created)
    mine.description = "first admin"
    theirs.description = "second admin"

    written = apply(first, put(mine), user="first").written.filter_lists[0]
    exc = rpc_error(lambda: apply(second, put(theirs), user="second"))
    assert code_of(exc) == grpc.StatusCode.ABORTED
    assert f'filter list "{name}"' in details_of(exc)
    assert isinstance(error_from_rpc(exc), ConflictError)

    stored = second.GetFilterList(admin_pb.GetObjectRequest(id=created.id), timeout=RPC_TIMEOUT_S)
    assert stored.description == "first admin"
    assert stored.revision == written.revision


def test_preshared_keys_are_masked_unless_asked_for(server: ServerProcess) -> None:
    stub = server.admin()
    name = unique("PSK")
    secret = "correct horse battery staple"
    response = apply(stub, put(psk_policy(stub, name, secret)))
    written = response.written.policies[0]
    assert psk_keys(written) and set(psk_keys(written)) == {SECRET_MASK}

    masked = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    assert secret not in masked.SerializeToString().decode("utf-8", "replace")
    assert set(psk_keys(next(p for p in masked.contents.policies if p.name == name))) == {SECRET_MASK}

    clear = stub.GetStore(admin_pb.GetStoreRequest(include_secrets=True), timeout=RPC_TIMEOUT_S)
    assert set(psk_keys(next(p for p in clear.contents.policies if p.name == name))) == {secret}

    one = stub.GetPolicy(admin_pb.GetObjectRequest(name=name), timeout=RPC_TIMEOUT_S)
    assert set(psk_keys(one)) == {SECRET_MASK}
    one = stub.GetPolicy(admin_pb.GetObjectRequest(name=name, include_secrets=True), timeout=RPC_TIMEOUT_S)
    assert set(psk_keys(one)) == {secret}

    # The export file is the backup: it carries the keys.
    exported = stub.ExportPolicies(admin_pb.ExportRequest(), timeout=RPC_TIMEOUT_S)
    assert set(psk_keys(next(p for p in exported.contents.policies if p.name == name))) == {secret}
    assert secret not in server.stderr()


# ---------------------------------------------------------------- whole-store operations


def test_delete_all_restore_defaults_export_import(start_server: Callable[..., ServerProcess]) -> None:
    stub = start_server().admin()
    name = unique("Mine")
    apply(stub, put(psk_policy(stub, name, "k1")))
    exported = stub.ExportPolicies(admin_pb.ExportRequest(), timeout=RPC_TIMEOUT_S)
    assert exported.format == "policyagent-ipsec-export"
    assert {p.name for p in exported.contents.policies} == DEFAULT_POLICY_NAMES | {name}

    deleted = stub.DeleteAll(admin_pb.DeleteAllRequest(), timeout=RPC_TIMEOUT_S)
    assert len(deleted.deleted) == len(exported.contents.policies) + len(exported.contents.filter_lists) + len(
        exported.contents.filter_actions
    )
    empty = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).contents
    assert not empty.policies and not empty.filter_lists and not empty.filter_actions

    restored = stub.RestoreDefaults(admin_pb.RestoreDefaultsRequest(), timeout=RPC_TIMEOUT_S)
    assert {p.name for p in restored.written.policies} == DEFAULT_POLICY_NAMES
    current = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).contents
    assert {p.name for p in current.policies} == DEFAULT_POLICY_NAMES

    imported = stub.ImportPolicies(admin_pb.ImportRequest(file=exported), timeout=RPC_TIMEOUT_S)
    assert name in {p.name for p in imported.written.policies}
    assert set(psk_keys(imported.written.policies[0])) <= {SECRET_MASK}
    mine = stub.GetPolicy(admin_pb.GetObjectRequest(name=name, include_secrets=True), timeout=RPC_TIMEOUT_S)
    assert set(psk_keys(mine)) == {"k1"}


def test_delete_all_removes_an_assigned_policy_in_one_transaction(start_server: Callable[..., ServerProcess]) -> None:
    stub = start_server().admin()
    policy = stub.GetPolicy(admin_pb.GetObjectRequest(name="Client (Respond Only)"), timeout=RPC_TIMEOUT_S)
    policy.assigned = True
    apply(stub, put(policy), operation="set policy assign=yes")
    before = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S).store_revision

    stub.DeleteAll(admin_pb.DeleteAllRequest(), timeout=RPC_TIMEOUT_S)
    after = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    assert not after.contents.policies and not after.contents.filter_lists and not after.contents.filter_actions
    changes = stub.ListChanges(admin_pb.ListChangesRequest(), timeout=RPC_TIMEOUT_S).changes
    # One transaction: every change of the delete-all carries the same store revision.
    assert len({c.revision for c in changes if c.seq and c.revision > before}) == 1


def test_list_changes_pages(server: ServerProcess) -> None:
    stub = server.admin()
    first = stub.ListChanges(admin_pb.ListChangesRequest(limit=2), timeout=RPC_TIMEOUT_S).changes
    assert [c.seq for c in first] == [1, 2]
    assert first[0].principal == "policyagent"  # the seed of the new store
    more = stub.ListChanges(admin_pb.ListChangesRequest(after_seq=2, limit=1), timeout=RPC_TIMEOUT_S).changes
    assert [c.seq for c in more] == [3]


# ---------------------------------------------------------------- errors


class _BrokenStore(SqliteStore):
    """A store whose reads fail the way a bug or a dying disk would (once `broken` is set).

    The server reads the whole store at start (effective policies), so the store
    breaks only after that.
    """

    broken = False

    def snapshot(self) -> tuple[pb.StoreContents, int]:
        if not self.broken:
            return super().snapshot()
        raise RuntimeError("secret internal detail /var/lib/x")

    def get(self, kind: Kind, object_id: str) -> pb.Policy | pb.FilterList | pb.FilterAction | None:
        if not self.broken:
            return super().get(kind, object_id)
        raise StoreError("store /var/lib/x/store.sqlite3 is corrupt (database disk image is malformed)")


def _broken_store(path: Path) -> PolicyStore:
    return _BrokenStore(path)


def test_unexpected_error_is_internal_without_detail(
    inproc_server: Callable[..., InProcessServer], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = inproc_server(_broken_store).admin()
    monkeypatch.setattr(_BrokenStore, "broken", True)
    exc = rpc_error(lambda: stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S))
    assert code_of(exc) == grpc.StatusCode.INTERNAL
    assert details_of(exc) == "internal error (see server log)"
    assert isinstance(error_from_rpc(exc), RpcFailure)
    assert "secret internal detail" in caplog.text  # the traceback is in the log only

    exc = rpc_error(lambda: stub.GetPolicy(admin_pb.GetObjectRequest(id="{x}"), timeout=RPC_TIMEOUT_S))
    assert code_of(exc) == grpc.StatusCode.UNAVAILABLE
    assert "/var/lib" not in details_of(exc)
    assert isinstance(error_from_rpc(exc), StoreError)


def test_every_error_code_has_a_catalog_entry() -> None:
    classes = [
        cls
        for cls in vars(model_errors).values()
        if isinstance(cls, type) and issubclass(cls, PolicyError) and cls is not PolicyError
    ]
    assert classes
    for cls in classes:
        assert cls.code in CATALOG, cls
        assert CATALOG[cls.code].error_class is cls


class _FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.StatusCode, details: str, metadata: tuple[tuple[str, bytes], ...]) -> None:
        self._status, self._details, self._metadata = status, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._metadata


@pytest.mark.parametrize(
    "error",
    [
        ValidationError([Violation('policy "P"/rule 2', "qmsecmethods", "bad"), Violation("", "name", "empty")]),
        model_errors.NotFoundError("no such thing"),
        model_errors.AlreadyExistsError("exists"),
        ConflictError('filter list "F" was changed by someone else'),
        model_errors.InUseError("in use"),
        model_errors.ProtectedError("protected"),
    ],
)
def test_error_round_trip_through_metadata(error: PolicyError) -> None:
    status, detail = error_detail(error)
    exc = _FakeRpcError(status, detail.message, ((ERROR_METADATA_KEY, detail.SerializeToString()),))
    back = error_from_rpc(exc)
    assert type(back) is type(error)
    assert str(back) == str(error)
    if isinstance(error, ValidationError):
        assert isinstance(back, ValidationError)
        assert back.violations == error.violations


def test_error_without_detail_is_an_rpc_failure() -> None:
    back = error_from_rpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused", ()))
    assert isinstance(back, RpcFailure)
    assert back.status == grpc.StatusCode.UNAVAILABLE
    assert "connection refused" in str(back)
    garbage = _FakeRpcError(grpc.StatusCode.ABORTED, "x", ((ERROR_METADATA_KEY, b"\xff\xff\xff"),))
    assert isinstance(error_from_rpc(garbage), RpcFailure)


# ---------------------------------------------------------------- listening


@pytest.mark.parametrize(
    "listen",
    [
        "127.0.0.1:0",
        "127.3.4.5:50051",
        "localhost:0",
        "[::1]:0",
        "unix:/run/pa.sock",
        # Every connection is TLS and every call but enrollment needs a certificate: any address will do.
        "0.0.0.0:0",
        "10.1.2.3:0",
        "[::]:0",
        "host.example:0",
        "192.0.2.1:443",
    ],
)
def test_addresses_are_accepted(listen: str) -> None:
    parse_listen(listen)


@pytest.mark.parametrize("listen", ["127.0.0.1", ":0", "127.0.0.1:99999", "::1:0", "unix:", "[::1]0"])
def test_malformed_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match="cannot listen"):
        parse_listen(listen)


def test_server_listens_on_all_addresses_with_tls_only(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(listen="0.0.0.0:0")
    port = server.address.rsplit(":", 1)[1]
    # Reached over loopback with the admin certificate (127.0.0.1 is in the server's certificate).
    with grpc.secure_channel(f"127.0.0.1:{port}", admin_certificate().channel_credentials()) as channel:
        admin_grpc.PolicyAdminStub(channel).GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    # Plain-text gRPC gets nothing: the port speaks TLS only.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        exc = rpc_error(
            lambda: admin_grpc.PolicyAdminStub(channel).GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
        )
    assert code_of(exc) == grpc.StatusCode.UNAVAILABLE


def test_unix_socket_listen(start_server: Callable[..., ServerProcess]) -> None:
    # A short directory: unix socket paths are limited to about 107 bytes.
    with tempfile.TemporaryDirectory(prefix="pa-") as sock_dir:
        path = Path(sock_dir) / "admin.sock"
        server = start_server(listen=f"unix:{path}")
        assert server.address == f"unix:{path}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        stub = server.admin()
        store = stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
        assert {p.name for p in store.contents.policies} == DEFAULT_POLICY_NAMES

        # A second server must not take the socket over from a live one.
        second = subprocess.run(
            server_command(server.data_dir.parent / "second", f"unix:{path}"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2
        assert "another server is listening there" in second.stderr
        stub.GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
        server.close()
        assert not path.exists()  # removed on a clean shutdown


def test_data_dir_is_private(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = start_server(data_dir=tmp_path / "fresh" / "data")
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    assert (server.data_dir / "store.sqlite3").is_file()


# ---------------------------------------------------------------- shutdown and durability


def test_sigterm_exits_0_promptly(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    server.admin().GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=15) == 0
    assert time.monotonic() - started < 5
    assert '"stopped"' in server.stderr()


def test_sigint_exits_0(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    server.signal(signal.SIGINT)
    assert server.wait(timeout=15) == 0


def test_logs_are_json_lines(start_server: Callable[..., ServerProcess]) -> None:
    import json

    server = start_server()
    apply(server.admin(), put(a_filter_list(unique("Logged"))), user="bob")
    server.signal(signal.SIGTERM)
    server.wait()
    records = [json.loads(line) for line in server.stderr().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    calls = [r for r in records if r.get("method") == "Apply"]
    assert calls and calls[0]["code"] == "ok" and calls[0]["principal"] == "admin:test-admin/bob"
    assert isinstance(calls[0]["duration_ms"], int | float)


@pytest.mark.slow
def test_sigkill_during_writes_keeps_every_acknowledged_write(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "durable"
    server = start_server(data_dir=data_dir)
    acknowledged: list[tuple[str, str]] = []
    lock = threading.Lock()
    enough = threading.Event()

    def writer(worker: int) -> None:
        stub = server.admin()
        for i in range(100_000):
            name = f"burst {worker}-{i}"
            try:
                response = apply(stub, put(a_filter_list(name, ip=f"198.51.100.{i % 250 + 1}")))
            except grpc.RpcError:
                return  # the server is gone; this write was never acknowledged
            with lock:
                acknowledged.append((response.written.filter_lists[0].id, name))
                if len(acknowledged) >= 60:
                    enough.set()

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(timeout=60), "the server acknowledged too few writes"
    server.signal(signal.SIGKILL)  # while the writers are still sending
    assert server.wait(timeout=15) == -signal.SIGKILL
    for thread in threads:
        thread.join(timeout=30)
    with lock:
        expected = dict(acknowledged)

    restarted = start_server(data_dir=data_dir)
    store = restarted.admin().GetStore(admin_pb.GetStoreRequest(), timeout=RPC_TIMEOUT_S)
    present = {fl.id: fl.name for fl in store.contents.filter_lists}
    missing = {i: n for i, n in expected.items() if present.get(i) != n}
    assert not missing, f"{len(missing)} acknowledged writes lost: {sorted(missing.values())[:5]}"
    # The restarted server did not seed the defaults a second time.
    assert {p.name for p in store.contents.policies} == DEFAULT_POLICY_NAMES


def test_cli_help_lists_server() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "policyagent.cli", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "server" in result.stdout


def test_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "policyagent.cli", "server", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline().startswith("listening on ")
        second = subprocess.run(
            [sys.executable, "-m", "policyagent.cli", "server", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30,
        )
        assert second.returncode != 0
        assert "another policyagent server is already using the data directory" in second.stderr
    finally:
        first.terminate()
        first.wait(10)
