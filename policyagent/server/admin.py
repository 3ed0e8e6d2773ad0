"""The PolicyAdmin service: `netsh ipsec static` on the server's domain store.

The servicer is thin: it translates proto ↔ domain (admin_pb.Mutation →
model.writes.Put/Delete, ObjectKind ↔ Kind) and errors ↔ status
(policyagent.server.errors). The work is done by the plain functions below,
which call the store; store calls block, so the servicer runs each of them in
one dedicated store thread and the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from grpc import aio

from policyagent.model.defaults import restore_defaults_plan
from policyagent.model.errors import NotFoundError, ValidationError, Violation
from policyagent.model.exportfmt import export_file, import_plan
from policyagent.model.objects import SECRET_MASK, Kind, StoreObject, normalize_id
from policyagent.model.view import StoreView
from policyagent.model.writes import Delete, Mutation, Put
from policyagent.pb import admin_grpc, admin_pb, pb
from policyagent.pki.authz import peer_address, peer_of
from policyagent.server.errors import abort_with_error
from policyagent.store.base import ChangeRecord, PolicyStore, WriteResult

USER_METADATA_KEY = "x-policyagent-user"
DEFAULT_CHANGES_LIMIT = 1000
# Bounds one ListChanges response; a client pages on with after_seq.
MAX_CHANGES_LIMIT = 10000
_MAX_USER_LEN = 64

_log = logging.getLogger("policyagent.server.admin")

T = TypeVar("T")

_KIND_TO_PROTO: dict[Kind, admin_pb.ObjectKind.ValueType] = {
    Kind.POLICY: admin_pb.OBJECT_KIND_POLICY,
    Kind.FILTER_LIST: admin_pb.OBJECT_KIND_FILTER_LIST,
    Kind.FILTER_ACTION: admin_pb.OBJECT_KIND_FILTER_ACTION,
}
_PROTO_TO_KIND: dict[admin_pb.ObjectKind.ValueType, Kind] = {v: k for k, v in _KIND_TO_PROTO.items()}


# ------------------------------------------------------------ translation


def kind_to_proto(kind: Kind) -> admin_pb.ObjectKind.ValueType:
    """The admin API's ObjectKind for a model Kind."""
    return _KIND_TO_PROTO[kind]


def kind_from_proto(value: admin_pb.ObjectKind.ValueType, *, path: str = "") -> Kind:
    """The model Kind for an ObjectKind; ValidationError for UNSPECIFIED or unknown values."""
    kind = _PROTO_TO_KIND.get(value)
    if kind is None:
        raise ValidationError(
            Violation(path, "kind", "give the kind: policy, filter list or filter action")
        )
    return kind


def _canonical_id(value: str) -> str:
    # Ids are GUIDs stored in braced upper case; accept what a user types
    # ({guid}, guid, any case) and leave anything else as given so the lookup
    # simply finds nothing.
    try:
        return normalize_id(value)
    except ValueError:
        return value.strip()


def mutation_from_proto(mutation: admin_pb.Mutation, index: int) -> Mutation:
    """The model mutation for one admin_pb.Mutation (`index` is 1-based, for messages)."""
    path = f"mutation {index}"
    op = mutation.WhichOneof("op")
    if op == "put_policy":
        return Put(mutation.put_policy)
    if op == "put_filter_list":
        return Put(mutation.put_filter_list)
    if op == "put_filter_action":
        return Put(mutation.put_filter_action)
    if op == "delete":
        ref = mutation.delete
        kind = kind_from_proto(ref.kind, path=path)
        if not ref.id.strip():
            raise ValidationError(Violation(path, "id", "give the id of the object to delete"))
        return Delete(kind, _canonical_id(ref.id), ref.revision)
    raise ValidationError(Violation(path, "op", "empty mutation: give a put or a delete"))


def mask_secrets(obj: StoreObject) -> StoreObject:
    """A copy of `obj` with every pre-shared key replaced by SECRET_MASK."""
    out = type(obj)()
    out.CopyFrom(obj)  # type: ignore[arg-type]
    if isinstance(out, pb.Policy):
        methods = [m for rule in out.rules for m in rule.auth_methods]
        methods.extend(out.default_response_rule.auth_methods)
        for method in methods:
            if method.WhichOneof("method") == "preshared_key":
                method.preshared_key.key = SECRET_MASK
    return out


def contents_of(objects: Sequence[StoreObject], *, include_secrets: bool) -> pb.StoreContents:
    """StoreContents holding `objects`, masked unless include_secrets."""
    out = pb.StoreContents()
    for obj in objects:
        shown = obj if include_secrets else mask_secrets(obj)
        if isinstance(shown, pb.Policy):
            out.policies.append(shown)
        elif isinstance(shown, pb.FilterList):
            out.filter_lists.append(shown)
        else:
            out.filter_actions.append(shown)
    return out


def apply_response(result: WriteResult) -> admin_pb.ApplyResponse:
    """The ApplyResponse for a write: what was stored (secrets masked) and what was deleted."""
    response = admin_pb.ApplyResponse(store_revision=result.store_revision)
    response.written.CopyFrom(contents_of(result.written, include_secrets=False))
    for deleted in result.deleted:
        # revision stays 0: a deleted object has no current revision.
        response.deleted.add(kind=kind_to_proto(deleted.kind), id=deleted.object_id)
    return response


def change_to_proto(record: ChangeRecord) -> admin_pb.Change:
    return admin_pb.Change(
        seq=record.seq,
        time_unix_ms=record.time_unix_ms,
        principal=record.principal,
        operation=record.operation,
        kind=kind_to_proto(record.kind),
        object_id=record.object_id,
        object_name=record.object_name,
        revision=record.revision,
        context=record.context,
    )


# ------------------------------------------------------------ plans


def delete_all_plan(view: StoreView) -> list[Mutation]:
    """`delete all`: every policy, filter list and filter action, in one transaction.

    plan_writes refuses to delete an assigned policy, so an assigned policy is first
    put back unassigned and then deleted in the same plan. Policies go before the
    filter lists and actions so the in-use check sees no rule left that uses them.
    """
    out: list[Mutation] = []
    for policy_id in view.ids(Kind.POLICY):
        policy = view.get(Kind.POLICY, policy_id)
        if isinstance(policy, pb.Policy) and policy.assigned:
            unassigned = pb.Policy()
            unassigned.CopyFrom(policy)
            unassigned.assigned = False
            out.append(Put(unassigned))
        out.append(Delete(Kind.POLICY, policy_id))
    for kind in (Kind.FILTER_LIST, Kind.FILTER_ACTION):
        out.extend(Delete(kind, object_id) for object_id in view.ids(kind))
    return out


# ------------------------------------------------------------ operations (blocking)


def get_store(store: PolicyStore, include_secrets: bool) -> admin_pb.GetStoreResponse:
    contents, revision = store.snapshot()
    if not include_secrets:
        masked = pb.StoreContents()
        masked.filter_lists.extend(contents.filter_lists)
        masked.filter_actions.extend(contents.filter_actions)
        masked.policies.extend(mask_secrets(p) for p in contents.policies)  # type: ignore[misc]
        contents = masked
    return admin_pb.GetStoreResponse(contents=contents, store_revision=revision)


def get_object(store: PolicyStore, kind: Kind, request: admin_pb.GetObjectRequest) -> StoreObject:
    """One object by id or, if the id is empty, by name (case-insensitive)."""
    if request.id.strip():
        found = store.get(kind, _canonical_id(request.id))
        wanted = f"with id {request.id.strip()}"
    elif request.name.strip():
        found = store.find(kind, request.name)
        wanted = f'named "{request.name.strip()}"'
    else:
        raise ValidationError(Violation("", "name", f"give the id or the name of the {kind.value}"))
    if found is None:
        raise NotFoundError(f"there is no {kind.value} {wanted}")
    return found if request.include_secrets else mask_secrets(found)


def apply(
    store: PolicyStore, request: admin_pb.ApplyRequest, principal: str
) -> admin_pb.ApplyResponse:
    mutations = [mutation_from_proto(m, i) for i, m in enumerate(request.mutations, start=1)]
    result = store.write(
        mutations, principal=principal, context=request.operation, dry_run=request.dry_run
    )
    return apply_response(result)


def restore_defaults(store: PolicyStore, principal: str) -> admin_pb.ApplyResponse:
    return apply_response(
        store.write(restore_defaults_plan, principal=principal, context="restore defaults")
    )


def delete_all(store: PolicyStore, principal: str) -> admin_pb.ApplyResponse:
    return apply_response(store.write(delete_all_plan, principal=principal, context="delete all"))


def export_policies(store: PolicyStore) -> pb.ExportFile:
    contents, _ = store.snapshot()
    return export_file(contents)


def import_policies(
    store: PolicyStore, request: admin_pb.ImportRequest, principal: str
) -> admin_pb.ApplyResponse:
    if not request.HasField("file"):
        raise ValidationError(Violation("", "file", "give the export file to import"))
    plan = import_plan(request.file)
    return apply_response(store.write(plan, principal=principal, context="import"))


def list_changes(
    store: PolicyStore, request: admin_pb.ListChangesRequest
) -> admin_pb.ListChangesResponse:
    limit = min(request.limit or DEFAULT_CHANGES_LIMIT, MAX_CHANGES_LIMIT)
    records = store.changes(after_seq=request.after_seq, limit=limit)
    return admin_pb.ListChangesResponse(changes=[change_to_proto(r) for r in records])


# ------------------------------------------------------------ principal


def error_code_of(exc: BaseException) -> str:
    """The catalog code of an exception for log lines, "internal" for anything unexpected."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else "internal"


def principal_of(context: aio.ServicerContext[Any, Any]) -> str:
    """Who is calling, for the change log: "admin:<certificate name>/<user>".

    The certificate name is authenticated (mTLS, checked by the AuthzInterceptor);
    the user is what the client says it runs as, for the record.
    """
    user = ""
    for key, value in context.invocation_metadata() or ():
        if key == USER_METADATA_KEY and isinstance(value, str):
            user = value
            break
    # The name lands in the change log and the log lines: keep it short and printable.
    user = "".join(ch for ch in user.strip() if ch.isprintable() and ch not in "@ ")
    user = user[:_MAX_USER_LEN] or "?"
    peer = peer_of(context)
    if peer is None:  # only reachable without the AuthzInterceptor (it refuses such calls)
        return f"unauthenticated:{user}@{peer_address(context)}"
    return f"{peer.role}:{peer.name}/{user}"


async def run_logged(
    context: aio.ServicerContext[Any, Any],
    method: str,
    executor: Executor,
    log: logging.Logger,
    work: Callable[..., T],
    *args: Any,
) -> T:
    """Run `work(*args)` in the store thread; errors become statuses; one log line per call.

    Shared by the admin servicers: store calls block, so they run on the store's own
    thread, in order, and the event loop never waits on disk.
    """
    started = time.monotonic()
    principal = principal_of(context)
    try:
        result = await asyncio.get_running_loop().run_in_executor(executor, work, *args)
    except Exception as exc:
        # Expected refusals (validation, conflict, ...) are routine: info, not error.
        log.info(
            "rpc failed",
            extra={
                "method": method,
                "principal": principal,
                "code": error_code_of(exc),
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        await abort_with_error(context, exc)
    log.info(
        "rpc ok",
        extra={
            "method": method,
            "principal": principal,
            "code": "ok",
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        },
    )
    return result


# ------------------------------------------------------------ servicer


class PolicyAdminServicer(admin_grpc.PolicyAdminServicer):
    """grpc.aio servicer for policyagent.v1.PolicyAdmin over one PolicyStore.

    `executor` must be the store's own thread (one worker): every store call runs
    there, in order, off the event loop.
    """

    def __init__(self, store: PolicyStore, executor: Executor) -> None:
        self._store = store
        self._executor = executor

    async def _call(
        self,
        context: aio.ServicerContext[Any, Any],
        method: str,
        work: Callable[..., T],
        *args: Any,
    ) -> T:
        return await run_logged(context, method, self._executor, _log, work, *args)

    async def GetStore(
        self, request: admin_pb.GetStoreRequest, context: aio.ServicerContext[Any, Any]
    ) -> admin_pb.GetStoreResponse:
        return await self._call(
            context, "GetStore", get_store, self._store, request.include_secrets
        )

    async def GetPolicy(
        self, request: admin_pb.GetObjectRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.Policy:
        obj = await self._call(context, "GetPolicy", get_object, self._store, Kind.POLICY, request)
        assert isinstance(obj, pb.Policy)
        return obj

    async def GetFilterList(
        self, request: admin_pb.GetObjectRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.FilterList:
        obj = await self._call(
            context, "GetFilterList", get_object, self._store, Kind.FILTER_LIST, request
        )
        assert isinstance(obj, pb.FilterList)
        return obj

    async def GetFilterAction(
        self, request: admin_pb.GetObjectRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.FilterAction:
        obj = await self._call(
            context, "GetFilterAction", get_object, self._store, Kind.FILTER_ACTION, request
        )
        assert isinstance(obj, pb.FilterAction)
        return obj

    async def Apply(
        self, request: admin_pb.ApplyRequest, context: aio.ServicerContext[Any, Any]
    ) -> admin_pb.ApplyResponse:
        return await self._call(
            context, "Apply", apply, self._store, request, principal_of(context)
        )

    async def RestoreDefaults(
        self, request: admin_pb.RestoreDefaultsRequest, context: aio.ServicerContext[Any, Any]
    ) -> admin_pb.ApplyResponse:
        return await self._call(
            context, "RestoreDefaults", restore_defaults, self._store, principal_of(context)
        )

    async def DeleteAll(
        self, request: admin_pb.DeleteAllRequest, context: aio.ServicerContext[Any, Any]
    ) -> admin_pb.ApplyResponse:
        return await self._call(
            context, "DeleteAll", delete_all, self._store, principal_of(context)
        )

    async def ExportPolicies(
        self, request: admin_pb.ExportRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ExportFile:
        return await self._call(context, "ExportPolicies", export_policies, self._store)

    async def ImportPolicies(
        self, request: admin_pb.ImportRequest, context: aio.ServicerContext[Any, Any]
    ) -> admin_pb.ApplyResponse:
        return await self._call(
            context, "ImportPolicies", import_policies, self._store, request, principal_of(context)
        )

    async def ListChanges(
        self, request: admin_pb.ListChangesRequest, context: aio.ServicerContext[Any, Any]
    ) -> admin_pb.ListChangesResponse:
        return await self._call(context, "ListChanges", list_changes, self._store, request)


def add_to_server(servicer: PolicyAdminServicer, server: aio.Server) -> None:
    """Register the servicer on a grpc.aio server."""
    admin_grpc.add_PolicyAdminServicer_to_server(servicer, server)


# The service name health checking and reflection announce.
SERVICE_NAME: str = admin_pb.DESCRIPTOR.services_by_name["PolicyAdmin"].full_name
