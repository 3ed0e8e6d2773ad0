"""The directory sync in the server: a thin asyncio task around policyagent.directory.sync, and the
DirectoryAdmin service (`policyagent directory status|sync|publish|assign|import|export`).

LDAP runs in its own worker thread (ldap3 blocks; one connection, one thread), registry and policy
store calls in the server's store thread; the event loop only waits. A check runs every
`interval_s`; a failure (bind, search, timeout, refused write) leaves the registry as it is — the
last known topology stays in force — and retries with jittered exponential backoff capped at the
interval. State changes (up → down, down → up) are logged once, not every retry; the fleet view and
`policyagent directory status` show the state, since when, and the last error.

Policies go the other way too: Publish / Assign write [MS-GPIPSEC] objects from the store into the directory
(on the same LDAP thread, over a second, writable connection), Import reads them into the store, Export
renders them as LDIF. With `--directory-publish`, a store write that changes policies, filter lists or
filter actions republishes the affected policies the directory already holds, in the background: a
failure is logged once and shown in the status, and never fails or delays the store write.

Sites follow the agents: a directory computer's site is the site of the subnet its agent connects from
(DirectorySync.apply places every computer at each full read). When an agent says Hello from another
address than last time, the hub calls `agent_address_changed` (event loop); the names collect in a set
that one task hands to `DirectorySync.apply_addresses` on the store thread — one registry write for a
burst of connections, only for computers whose site moved, and never a directory read.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from grpc import aio

from policyagent.directory.adstore import (
    DirectoryPolicyError,
    PublishResult,
    contents_from_entries,
    dump_ldif,
    load_ldif,
    policy_entries,
    select_policies,
)
from policyagent.directory.sync import (
    DIRECTORY_ERRORS,
    ApplyOutcome,
    ComputerChanges,
    DirectorySettings,
    DirectorySync,
    safe_error,
)
from policyagent.model.assignment import Gpo, key_of
from policyagent.model.errors import (
    NotFoundError,
    PolicyError,
    ProtectedError,
    UnavailableError,
    ValidationError,
    Violation,
)
from policyagent.model.exportfmt import export_file, import_plan
from policyagent.model.objects import Kind, normalize_id
from policyagent.pb import admin_pb, assign_pb, directory_grpc, directory_pb, pb
from policyagent.server.admin import apply_response, principal_of
from policyagent.server.assignment import gpo_to_proto
from policyagent.server.errors import abort_with_error
from policyagent.store.base import DelegatingPolicyStore, PolicyStore, WriteResult

_log = logging.getLogger("policyagent.server.directory")

T = TypeVar("T")

SERVICE_NAME: str = directory_pb.DESCRIPTOR.services_by_name["DirectoryAdmin"].full_name
BACKOFF_BASE_S = 0.5
MAX_PROBLEMS = 50
# Expected failures of a sync: the directory's (unreachable, refused, timed out) and the registry's.
_SYNC_FAILURES: tuple[type[Exception], ...] = (*DIRECTORY_ERRORS, PolicyError)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


NOT_CONFIGURED = "no directory is configured: start the server with --directory URL --directory-base DN"


# ------------------------------------------------------------ policies (blocking, store thread)


def policy_error(exc: DirectoryPolicyError) -> ValidationError:
    """INVALID_ARGUMENT for what [MS-GPIPSEC] cannot carry or a directory object that does not import; the
    library's message starts with the path (policy "NAME" {ID}/isakmp, a DN, source:line)."""
    text = " ".join(str(exc).split())
    path, sep, message = text.partition(": ")
    return ValidationError(Violation(path, "", message) if sep else Violation("", "", text))


def resolve_policies(contents: pb.StoreContents, refs: list[str]) -> list[str]:
    """Store policy ids for ids or names (case-insensitive); [] = every policy. NotFoundError names a miss."""
    wanted = [r.strip() for r in refs if r.strip()]
    if not wanted:
        return [p.id for p in contents.policies]
    by_id = {p.id: p.id for p in contents.policies}
    out: list[str] = []
    for text in wanted:
        try:
            found = by_id.get(normalize_id(text))
        except ValueError:
            found = None
        found = found or by_id.get(text)
        if found is None:
            named = [p.id for p in contents.policies if p.name.strip().casefold() == text.casefold()]
            if not named:
                raise NotFoundError(f'there is no IPsec policy "{text}" in the store')
            found = named[0]
        if found not in out:
            out.append(found)
    return out


def affected_policies(contents: pb.StoreContents, result: WriteResult) -> list[str]:
    """The policies a store write changed: written ones, and those whose rules use a written filter list or
    filter action (the shared ipsecFilter / ipsecNegotiationPolicy objects are written by publishing a policy
    that uses them)."""
    policies = {o.id for o in result.written if isinstance(o, pb.Policy)}
    lists = {o.id for o in result.written if isinstance(o, pb.FilterList)}
    actions = {o.id for o in result.written if isinstance(o, pb.FilterAction)}
    return [
        p.id
        for p in contents.policies
        if p.id in policies or any(r.filter_list_id in lists or r.filter_action_id in actions for r in p.rules)
    ]


def export_ldif(store: PolicyStore, refs: list[str], base_dn: str) -> directory_pb.DirectoryExportResponse:
    """The [MS-GPIPSEC] objects of the policies as LDIF (pre-shared keys in clear)."""
    if not base_dn.strip():
        raise ValidationError(Violation("", "base_dn", "give the base DN (the server has no --directory)"))
    contents, _revision = store.snapshot()  # secrets included: the NFA blob carries pre-shared keys
    ids = resolve_policies(contents, refs)
    try:
        entries = policy_entries(contents, ids, base_dn.strip())
    except DirectoryPolicyError as exc:
        raise policy_error(exc) from None
    return directory_pb.DirectoryExportResponse(
        ldif=dump_ldif(entries), policies=ids, base_dn=base_dn.strip(), entries=len(entries)
    )


def import_contents(store: PolicyStore, contents: pb.StoreContents, principal: str, source: str) -> WriteResult:
    """Import into the store, all or nothing, same ids replaced (ImportPolicies' plan)."""
    if not contents.policies and not contents.filter_lists and not contents.filter_actions:
        raise NotFoundError(f"{source} holds no IPsec policy objects")
    return store.write(import_plan(export_file(contents)), principal=principal, context=f"import from {source}")


def import_ldif(store: PolicyStore, text: str, refs: list[str], principal: str) -> WriteResult:
    """Import the policies `refs` names (ids or names; [] = all) from LDIF text (content records)."""
    try:
        entries = load_ldif(text, "ldif")
        ids = select_policies(entries, refs) if refs else None
        contents = contents_from_entries(entries, ids)
    except DirectoryPolicyError as exc:
        raise policy_error(exc) from None
    return import_contents(store, contents, principal, "LDIF")


def publish_response(ids: list[str], result: PublishResult) -> directory_pb.DirectoryPublishResponse:
    return directory_pb.DirectoryPublishResponse(
        policies=ids, added=list(result.added), modified=list(result.modified), deleted=list(result.deleted)
    )


class PublishingPolicyStore(DelegatingPolicyStore):
    """The policy store PolicyAdmin writes through with --directory-publish: after each committed write,
    `written(result)` (in the store thread; it must not raise and must not block on the directory)."""

    def __init__(self, inner: PolicyStore, written: Callable[[WriteResult], None]) -> None:
        super().__init__(inner)
        self._written = written

    def write(self, mutations: Any, *, principal: str, context: str = "", dry_run: bool = False) -> WriteResult:
        result = self.inner.write(mutations, principal=principal, context=context, dry_run=dry_run)
        if not dry_run:
            self._written(result)
        return result


def not_configured_status() -> directory_pb.DirectoryStatus:
    return directory_pb.DirectoryStatus(
        state=directory_pb.DIRECTORY_STATE_NOT_CONFIGURED, server_time_unix_ms=_now_ms()
    )


class Backoff:
    """Exponential from BACKOFF_BASE_S, capped at `cap`, each delay jittered down to half (no thundering herd
    of servers hitting a DC that just came back)."""

    def __init__(self, cap: float, rng: random.Random | None = None) -> None:
        self.cap = cap
        self._n = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._n = 0

    def next(self) -> float:
        delay = min(self.cap, BACKOFF_BASE_S * (2**self._n))
        self._n = min(self._n + 1, 30)
        return float(delay * self._rng.uniform(0.5, 1.0))


class DirectoryService:
    """Runs the sync every interval and on demand; keeps the state the status reports."""

    def __init__(
        self,
        settings: DirectorySettings,
        sync: DirectorySync,
        store_executor: Executor,
        *,
        on_status_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.sync = sync
        self._store = store_executor
        self._ldap = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policyagent-ldap")
        self._on_status_change = on_status_change
        self._backoff = Backoff(settings.interval_s)
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self.state: directory_pb.DirectoryState.ValueType = directory_pb.DIRECTORY_STATE_CONNECTING
        self.down_since_ms = 0
        self.last_error = ""
        self.last_error_ms = 0
        self.last_read_ms = 0
        self.last_duration_ms = 0
        self.last_changed_computers = 0
        self.problems: tuple[str, ...] = ()
        # --directory-publish: policy id → why its directory copy could not be brought up to date.
        self.publish_failures: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._republishing: set[asyncio.Task[None]] = set()
        # Computers whose agents connected from a new address, waiting for the store thread (agent_address_changed).
        self._moved: set[str] = set()
        self._moved_event = asyncio.Event()
        self._placer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Read the owned snapshot (before serving: the registry's directory objects are protected at once)."""
        await self._in_store(self.sync.load)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="directory-sync")
        self._placer = asyncio.create_task(self._place_moved(), name="directory-sites")

    async def stop(self) -> None:
        tasks = [*self._republishing, *(t for t in (self._task, self._placer) if t is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Not awaited: a search in flight may take up to the LDAP timeout; the thread unbinds after it.
        self._ldap.submit(self.sync.disconnect)
        self._ldap.shutdown(wait=False)
        try:
            await self._in_store(self.sync.save)  # keeps "last sync" across the restart
        except OSError:
            _log.exception("saving the directory's owned snapshot failed")

    def set_status_listener(self, listener: Callable[[], None]) -> None:
        """Called (on the event loop) when the state changes or a sync changed the registry."""
        self._on_status_change = listener

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store, fn, *args)

    async def _in_ldap(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._ldap, fn, *args)

    async def _run(self) -> None:
        delay = 0.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self.sync_now(full=False)
            except UnavailableError:
                delay = self._backoff.next()
            else:
                self._backoff.reset()
                delay = self.settings.interval_s

    # ------------------------------------------------------------ sites from the agents' addresses

    def agent_address_changed(self, computer: str, address: str) -> None:
        """Hub callback (event loop): `computer`'s agent connected from another address than last time.
        Its site is re-decided on the store thread, together with the others of the same burst; a computer
        the directory does not own, or one before the first full read, is left to the next full read."""
        if self.sync.subnets is None or key_of(computer) not in self.sync.state.topology.computers:
            return
        self._moved.add(computer)
        self._moved_event.set()

    async def _place_moved(self) -> None:
        while True:
            await self._moved_event.wait()
            self._moved_event.clear()
            names, self._moved = self._moved, set()
            try:
                outcome = await self._in_store(self.sync.apply_addresses, names)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next full read places them anyway
                _log.warning(
                    "could not move computers to the site of their agents' addresses",
                    extra={"computers": len(names), "error": " ".join(str(exc).split())[:500]},
                    exc_info=not isinstance(exc, PolicyError),
                )
                continue
            if outcome is not None and outcome.mutations:
                _log.info(
                    "computers moved to the site of their agents' addresses",
                    extra={"mutations": outcome.mutations, "changed_computers": len(outcome.changed_computers)},
                )
                self._on_status_change()

    # ------------------------------------------------------------ one sync

    async def sync_now(self, *, full: bool = True) -> directory_pb.DirectorySyncResponse:
        """Check (full=False) or read everything (full=True) and apply; UnavailableError if it failed."""
        assert self._lock is not None, "start() first"
        async with self._lock:
            return await self._sync_locked(full)

    async def _sync_locked(self, full: bool) -> directory_pb.DirectorySyncResponse:
        started = time.monotonic()
        try:
            marker, read = await self._in_ldap(self.sync.read_directory, full)
            outcome: ApplyOutcome | None = None
            if isinstance(read, ComputerChanges):
                outcome = await self._in_store(self.sync.apply_changes, read)
            elif read is not None:
                missing = await self._in_store(self.sync.missing_policies, read)
                fetched = await self._in_ldap(self.sync.fetch_policies, missing) if missing else None
                outcome = await self._in_store(self.sync.apply, read, fetched)
        except _SYNC_FAILURES as exc:
            message = safe_error(exc, self.sync.secrets())
            if isinstance(exc, PolicyError):
                message = f"the registry refused the directory's topology: {message}"
            self._failed(message)
            raise UnavailableError(f"directory {self.settings.url}: {message}") from None
        except Exception as exc:
            _log.exception("directory sync failed unexpectedly")
            self._failed(f"internal error: {type(exc).__name__} (see server log)")
            raise UnavailableError(f"directory {self.settings.url}: internal error (see server log)") from None
        self.sync.marker = marker
        if outcome is None:
            self.sync.checked(_now_ms())
        response = directory_pb.DirectorySyncResponse()
        if outcome is not None:
            if not isinstance(read, ComputerChanges):
                self.last_read_ms = _now_ms()  # the last full read
            self.last_duration_ms = round((time.monotonic() - started) * 1000)
            self.problems = outcome.problems[:MAX_PROBLEMS]
            if outcome.mutations:
                self.last_changed_computers = len(outcome.changed_computers)
                _log.info(
                    "directory change applied",
                    extra={
                        "url": self.settings.url,
                        "read": self.sync.last_read_kind,
                        "mutations": outcome.mutations,
                        "changed_computers": len(outcome.changed_computers),
                        "duration_ms": self.last_duration_ms,
                        "problems": len(outcome.problems),
                    },
                )
                self._on_status_change()
            response.mutations = outcome.mutations
            response.changed_computers.extend(sorted(outcome.changed_computers))
        self._succeeded()
        response.status.CopyFrom(self.status())
        return response

    def _failed(self, message: str) -> None:
        now = _now_ms()
        self.last_error, self.last_error_ms = message, now
        if self.state != directory_pb.DIRECTORY_STATE_DOWN:
            self.state = directory_pb.DIRECTORY_STATE_DOWN
            self.down_since_ms = now
            _log.warning(
                "directory down: keeping the last known topology",
                extra={"url": self.settings.url, "error": message},
            )
            self._on_status_change()

    def _succeeded(self) -> None:
        if self.state != directory_pb.DIRECTORY_STATE_IN_SYNC:
            if self.state == directory_pb.DIRECTORY_STATE_DOWN:
                _log.info(
                    "directory back",
                    extra={"url": self.settings.url, "down_ms": _now_ms() - self.down_since_ms},
                )
            else:
                _log.info("directory in sync", extra={"url": self.settings.url, "marker": self.sync.marker_kind})
            self.state = directory_pb.DIRECTORY_STATE_IN_SYNC
            self.down_since_ms = 0
            self._on_status_change()

    # ------------------------------------------------------------ policies

    async def _in_directory(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """fn on the LDAP thread; the library's refusals become INVALID_ARGUMENT, directory failures
        UNAVAILABLE (recorded as the last error; the sync's state is the sync's business)."""
        try:
            return await self._in_ldap(fn, *args)
        except DirectoryPolicyError as exc:
            raise policy_error(exc) from None
        except DIRECTORY_ERRORS as exc:
            message = f"{what}: {safe_error(exc, self.sync.secrets())}"
            self.last_error, self.last_error_ms = message, _now_ms()
            raise UnavailableError(f"directory {self.settings.url}: {message}") from None

    def _contents(self, refs: list[str]) -> tuple[pb.StoreContents, list[str]]:
        contents, _revision = self.sync.policy_store.snapshot()  # secrets included: the NFA blob carries PSKs
        return contents, resolve_policies(contents, refs)

    async def publish(self, refs: list[str]) -> directory_pb.DirectoryPublishResponse:
        contents, ids = await self._in_store(self._contents, refs)
        if not ids:
            raise NotFoundError("the store holds no IPsec policy to publish")
        result: PublishResult = await self._in_directory("publish", self.sync.publish, contents, ids)
        _log.info("policies published to the directory", extra={"policies": ids, "changes": str(result)})
        return publish_response(ids, result)

    def _assign_target(self, gpo_ref: str, policy_ref: str) -> tuple[str, pb.StoreContents | None, str]:
        """(the GPO's id, the store contents, the policy id or "") for Assign (store thread)."""
        topology, _revision = self.sync.topology_store.snapshot()
        text = gpo_ref.strip()
        if not text:
            raise ValidationError(Violation("", "gpo", "give the GPO's name or id"))
        try:
            gpo_id: str | None = normalize_id(text)
        except ValueError:
            gpo_id = None
        gpo: Gpo | None = topology.gpo(gpo_id) if gpo_id else None
        if gpo is None:
            gpo = next((g for g in topology.gpos.values() if g.name.casefold() == text.casefold()), None)
        if gpo is None and gpo_id is None:
            raise NotFoundError(f'there is no GPO "{text}" in the registry (give a directory GPO\'s GUID)')
        if gpo is not None:
            if not self.sync.owns_gpo(gpo.id):
                raise ProtectedError(
                    f'GPO "{gpo.name}" is a local GPO, not the directory\'s: set its policy with '
                    "policyagent gpo set NAME --policy POLICY"
                )
            gpo_id = gpo.id
        assert gpo_id is not None
        if not policy_ref.strip():
            return gpo_id, None, ""
        contents, ids = self._contents([policy_ref])
        return gpo_id, contents, ids[0]

    def _gpo_now(self, gpo_id: str) -> assign_pb.Gpo:
        gpo = self.sync.topology_store.snapshot()[0].gpo(gpo_id)
        if gpo is None:
            return assign_pb.Gpo(id=gpo_id)  # not (yet) in the registry: the sync skipped it (see problems)

        def name_of(policy_id: str) -> str:
            policy = self.sync.policy_store.get(Kind.POLICY, policy_id)
            return policy.name if policy is not None else ""

        return gpo_to_proto(gpo, name_of)

    async def assign(self, gpo_ref: str, policy_ref: str) -> directory_pb.DirectoryAssignResponse:
        """Publish the policy, point the GPO at it (or clear it), then read the directory at once."""
        assert self._lock is not None, "start() first"
        async with self._lock:
            gpo_id, contents, policy_id = await self._in_store(self._assign_target, gpo_ref, policy_ref)
            result: PublishResult = await self._in_directory(
                "assign", self.sync.assign, gpo_id, contents, policy_id
            )
            _log.info(
                "GPO assignment written to the directory",
                extra={"gpo": gpo_id, "policy": policy_id or "(none)", "changes": str(result)},
            )
            try:
                synced = await self._sync_locked(True)
            except UnavailableError as exc:
                raise UnavailableError(
                    f"the GPO's assignment was written to the directory, but reading it back failed ({exc}); "
                    "the registry follows at the next successful check"
                ) from None
        response = directory_pb.DirectoryAssignResponse(changed_computers=synced.changed_computers)
        response.gpo.CopyFrom(await self._in_store(self._gpo_now, gpo_id))
        if policy_id:
            response.published.CopyFrom(publish_response([policy_id], result))
        return response

    async def import_policies(self, refs: list[str], principal: str) -> admin_pb.ApplyResponse:
        contents: pb.StoreContents = await self._in_directory("import", self.sync.read_for_import, refs)
        result = await self._in_store(
            import_contents, self.sync.policy_store, contents, principal, f"the directory {self.settings.url}"
        )
        return apply_response(result)

    # ------------------------------------------------------------ --directory-publish

    def policies_written(self, result: WriteResult) -> None:
        """A store write committed (store thread): republish the policies it changed that the directory holds,
        in the background. Never raises: the store write has happened and stands."""
        try:
            if not any(isinstance(o, pb.Policy | pb.FilterList | pb.FilterAction) for o in result.written):
                return
            contents, _revision = self.sync.policy_store.snapshot()
            ids = affected_policies(contents, result)
            if ids and self._loop is not None:
                self._loop.call_soon_threadsafe(self._start_republish, contents, ids)
        except Exception:
            _log.exception("could not schedule republishing to the directory")

    def _start_republish(self, contents: pb.StoreContents, ids: list[str]) -> None:
        task = asyncio.create_task(self._republish(contents, ids), name="directory-republish")
        self._republishing.add(task)
        task.add_done_callback(self._republishing.discard)

    async def _republish(self, contents: pb.StoreContents, ids: list[str]) -> None:
        try:
            outcomes = await self._in_ldap(self.sync.republish, contents, ids)
        except DIRECTORY_ERRORS as exc:
            message = safe_error(exc, self.sync.secrets())
            self.last_error, self.last_error_ms = f"republish: {message}", _now_ms()
            for policy_id in ids:
                self._publish_failed(policy_id, f"the directory failed: {message}")
            return
        except Exception:
            _log.exception("republishing to the directory failed unexpectedly")
            for policy_id in ids:
                self._publish_failed(policy_id, "internal error (see server log)")
            return
        for policy_id in ids:
            outcome = outcomes.get(policy_id)  # None: the directory does not hold it, nothing to keep current
            if isinstance(outcome, Exception):
                self._publish_failed(policy_id, " ".join(str(outcome).split()))
                continue
            if self.publish_failures.pop(policy_id, None) is not None:
                _log.info("the directory's copy of a policy is current again", extra={"policy": policy_id})
                self._on_status_change()
            if outcome is not None:
                _log.info("policy republished to the directory", extra={"policy": policy_id, "changes": str(outcome)})

    def _publish_failed(self, policy_id: str, reason: str) -> None:
        if self.publish_failures.get(policy_id) == reason:
            return  # logged already
        self.publish_failures[policy_id] = reason
        self.last_error, self.last_error_ms = f"republish {policy_id}: {reason}", _now_ms()
        _log.warning(
            "the directory's copy of a policy could not be updated",
            extra={"url": self.settings.url, "policy": policy_id, "error": reason},
        )
        self._on_status_change()

    async def republished(self) -> None:
        """Wait for the republishing in flight (tests; shutdown cancels instead)."""
        while self._republishing:
            await asyncio.gather(*list(self._republishing), return_exceptions=True)

    # ------------------------------------------------------------ status

    def status(self) -> directory_pb.DirectoryStatus:
        owned = self.sync.state.topology
        settings = self.settings
        return directory_pb.DirectoryStatus(
            state=self.state,
            url=settings.url,
            base_dn=settings.base_dn,
            bind=settings.bind,
            change_marker=self.sync.marker_kind if self.state != directory_pb.DIRECTORY_STATE_CONNECTING else "",
            interval_seconds=settings.interval_s,
            server_time_unix_ms=_now_ms(),
            last_sync_unix_ms=self.sync.state.last_sync_unix_ms,
            last_read_unix_ms=self.last_read_ms,
            last_change_unix_ms=self.sync.state.last_change_unix_ms,
            last_changed_computers=self.last_changed_computers,
            last_sync_duration_ms=self.last_duration_ms,
            last_read_kind=self.sync.last_read_kind,
            down_since_unix_ms=self.down_since_ms if self.state == directory_pb.DIRECTORY_STATE_DOWN else 0,
            last_error=self.last_error,
            last_error_unix_ms=self.last_error_ms,
            computers=len(owned.computers),
            ous=len(owned.ous),
            sites=len(owned.sites),
            groups=len(owned.groups),
            gpos=len(owned.gpos),
            links=len(owned.links),
            problems=[
                *self.problems,
                *(f"policy {pid}: its copy in the directory is out of date: {why}"
                  for pid, why in sorted(self.publish_failures.items())),
            ][:MAX_PROBLEMS],
        )


class DirectoryAdminServicer(directory_grpc.DirectoryAdminServicer):
    """Admin only (AuthzInterceptor: every service not listed as public or agent-only).

    Import from LDIF and Export work without a directory: they need only the policy store (`store`, whose
    calls run on `store_executor`, the server's store thread). `written` is told about an LDIF import's
    store write (--directory-publish).
    """

    def __init__(
        self,
        service: DirectoryService | None,
        store: PolicyStore | None = None,
        store_executor: Executor | None = None,
        written: Callable[[WriteResult], None] | None = None,
    ) -> None:
        self._service = service
        self._store = store
        self._executor = store_executor
        self._written = written

    def _configured(self) -> DirectoryService:
        if self._service is None:
            raise ProtectedError(NOT_CONFIGURED)
        return self._service

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        if self._store is None or self._executor is None:
            raise ProtectedError("this server has no policy store for the directory service")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._store, *args)

    async def _rpc(
        self, context: aio.ServicerContext[Any, Any], method: str, call: Callable[[], Awaitable[T]], **fields: Any
    ) -> T:
        """One log line per call (never a policy's content), errors through the catalog."""
        started = time.monotonic()
        principal = principal_of(context)
        try:
            result = await call()
        except Exception as exc:
            code = exc.code if isinstance(exc, PolicyError) else "internal"
            _log.info("rpc failed", extra={"method": method, "principal": principal, "code": code, **fields})
            await abort_with_error(context, exc)
        _log.info(
            "rpc ok",
            extra={
                "method": method,
                "principal": principal,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                **fields,
            },
        )
        return result

    async def GetStatus(
        self, request: directory_pb.DirectoryStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> directory_pb.DirectoryStatus:
        if self._service is None:
            return not_configured_status()
        return self._service.status()

    async def Sync(
        self, request: directory_pb.DirectorySyncRequest, context: aio.ServicerContext[Any, Any]
    ) -> directory_pb.DirectorySyncResponse:
        return await self._rpc(context, "Sync", lambda: self._configured().sync_now(full=True))

    async def Publish(
        self, request: directory_pb.DirectoryPublishRequest, context: aio.ServicerContext[Any, Any]
    ) -> directory_pb.DirectoryPublishResponse:
        refs = [r for r in request.policies if r.strip()]
        return await self._rpc(context, "Publish", lambda: self._configured().publish(refs), policies=refs)

    async def Assign(
        self, request: directory_pb.DirectoryAssignRequest, context: aio.ServicerContext[Any, Any]
    ) -> directory_pb.DirectoryAssignResponse:
        return await self._rpc(
            context,
            "Assign",
            lambda: self._configured().assign(request.gpo, request.policy),
            gpo=request.gpo,
            policy=request.policy,
        )

    async def Import(
        self, request: directory_pb.DirectoryImportRequest, context: aio.ServicerContext[Any, Any]
    ) -> admin_pb.ApplyResponse:
        refs = [r for r in request.policies if r.strip()]
        principal = principal_of(context)

        async def work() -> admin_pb.ApplyResponse:
            if request.ldif:
                response = await self._in_store(self._import_ldif, request.ldif, refs, principal)
                return response
            return await self._configured().import_policies(refs, principal)

        return await self._rpc(context, "Import", work, policies=refs, ldif=bool(request.ldif))

    def _import_ldif(self, store: PolicyStore, text: str, refs: list[str], principal: str) -> admin_pb.ApplyResponse:
        result = import_ldif(store, text, refs, principal)
        if self._written is not None:
            self._written(result)  # --directory-publish: an LDIF import is a store write like any other
        return apply_response(result)

    async def Export(
        self, request: directory_pb.DirectoryExportRequest, context: aio.ServicerContext[Any, Any]
    ) -> directory_pb.DirectoryExportResponse:
        refs = [r for r in request.policies if r.strip()]
        base = request.base_dn.strip() or (self._service.settings.base_dn if self._service is not None else "")
        return await self._rpc(context, "Export", lambda: self._in_store(export_ldif, refs, base), policies=refs)


def add_directory_to_server(
    service: DirectoryService | None,
    server: aio.Server,
    store: PolicyStore | None = None,
    store_executor: Executor | None = None,
) -> None:
    """Register DirectoryAdmin. `store` is the policy store the directory imports into and exports from."""
    written = service.policies_written if service is not None and service.settings.publish else None
    directory_grpc.add_DirectoryAdminServicer_to_server(
        DirectoryAdminServicer(service, store, store_executor, written), server
    )
