"""The PolicyStore interface: what every store backend provides.

A store holds one set of policies, filter lists and filter actions (the
domain store on the server; later an agent's local and persistent stores).
Writes are all-or-nothing transactions planned by `policyagent.model.writes`:
the backend opens a write transaction, hands the planner a view of its
current state, writes exactly the plan, appends to the change log and commits
durably. tests/store_contract.py is the contract every backend must pass.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from policyagent.model.objects import Kind, StoreObject
from policyagent.model.writes import Mutation, PlanFn, PlannedDelete
from policyagent.pb import pb

__all__ = ["ChangeRecord", "DelegatingPolicyStore", "PlanFn", "PolicyStore", "WriteResult"]


@dataclass(frozen=True)
class ChangeRecord:
    """One entry of the append-only change log."""

    seq: int
    time_unix_ms: int
    principal: str
    operation: str  # create | update | delete | assign | unassign
    kind: Kind
    object_id: str
    object_name: str
    revision: int  # the object's revision after the change (the store revision of the commit)
    context: str  # what the admin asked for, e.g. "netsh: add filter"


@dataclass(frozen=True)
class WriteResult:
    written: list[StoreObject]  # as stored, with their new revisions
    deleted: list[PlannedDelete]
    store_revision: int


class PolicyStore(abc.ABC):
    """A transactional, revisioned store of IPsec policy objects."""

    @abc.abstractmethod
    def snapshot(self) -> tuple[pb.StoreContents, int]:
        """Every object (secrets included) and the store revision, read consistently."""

    @abc.abstractmethod
    def get(self, kind: Kind, object_id: str) -> StoreObject | None: ...

    @abc.abstractmethod
    def find(self, kind: Kind, name: str) -> StoreObject | None:
        """The object of this kind with this name (case-insensitive), if any."""

    @abc.abstractmethod
    def write(
        self,
        mutations: Sequence[Mutation] | PlanFn,
        *,
        principal: str,
        context: str = "",
        dry_run: bool = False,
    ) -> WriteResult:
        """Plan, validate and commit the mutations as one transaction, or raise and write nothing.

        Raises the errors of policyagent.model.errors (ValidationError, ConflictError,
        NotFoundError, AlreadyExistsError, InUseError, ProtectedError) or StoreError.
        With dry_run the plan is checked and nothing is written.
        """

    @abc.abstractmethod
    def initialize(self, seed: PlanFn, *, principal: str) -> bool:
        """Run `seed` once in the store's life (when the store is new). True if it ran now."""

    @abc.abstractmethod
    def changes(self, after_seq: int = 0, limit: int = 1000) -> list[ChangeRecord]: ...

    @abc.abstractmethod
    def revision(self) -> int:
        """The store revision: the revision given to the last committed write, 0 if none."""

    @abc.abstractmethod
    def close(self) -> None: ...


class DelegatingPolicyStore(PolicyStore):
    """A PolicyStore that forwards every call to `inner`; wrappers override what they add to."""

    def __init__(self, inner: PolicyStore) -> None:
        self.inner = inner

    def snapshot(self) -> tuple[pb.StoreContents, int]:
        return self.inner.snapshot()

    def get(self, kind: Kind, object_id: str) -> StoreObject | None:
        return self.inner.get(kind, object_id)

    def find(self, kind: Kind, name: str) -> StoreObject | None:
        return self.inner.find(kind, name)

    def write(
        self,
        mutations: Sequence[Mutation] | PlanFn,
        *,
        principal: str,
        context: str = "",
        dry_run: bool = False,
    ) -> WriteResult:
        return self.inner.write(mutations, principal=principal, context=context, dry_run=dry_run)

    def initialize(self, seed: PlanFn, *, principal: str) -> bool:
        return self.inner.initialize(seed, principal=principal)

    def changes(self, after_seq: int = 0, limit: int = 1000) -> list[ChangeRecord]:
        return self.inner.changes(after_seq, limit)

    def revision(self) -> int:
        return self.inner.revision()

    def close(self) -> None:
        self.inner.close()
