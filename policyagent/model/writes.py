"""Planning a write: from requested mutations to checked puts and deletes.

`plan_writes` is pure. Given a view of the store (inside the caller's
transaction) and the requested mutations, it checks revisions, fills in ids,
adds side effects (assigning one policy unassigns the others), validates every
object that would change against the store as it would be afterwards, and
refuses deletes of objects still in use. It raises, and then nothing may be
written; otherwise the caller writes exactly the returned plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from policyagent.model.errors import (
    AlreadyExistsError,
    ConflictError,
    InUseError,
    NotFoundError,
    ProtectedError,
    ValidationError,
    Violation,
)
from policyagent.model.objects import Kind, StoreObject, describe, kind_of, new_id
from policyagent.model.validate import validate_object
from policyagent.model.view import OverlayView, StoreView
from policyagent.pb import pb


@dataclass(frozen=True)
class Put:
    """Create (obj.revision == 0) or update (obj.revision == the stored revision) an object."""

    obj: StoreObject


@dataclass(frozen=True)
class Delete:
    kind: Kind
    object_id: str
    revision: int = 0  # 0: whatever is stored


Mutation = Put | Delete

# A function run inside a store's write transaction that returns the mutations to
# apply, given a view of the store at that moment ("restore defaults", "import").
PlanFn = Callable[[StoreView], Sequence[Mutation]]


@dataclass(frozen=True)
class PlannedPut:
    obj: StoreObject  # complete, validated; revision still the old one (0 for new)
    operation: str  # create | update | assign | unassign


@dataclass(frozen=True)
class PlannedDelete:
    kind: Kind
    object_id: str
    name: str


@dataclass
class Plan:
    puts: list[PlannedPut] = field(default_factory=list)
    deletes: list[PlannedDelete] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes


def fill_ids(obj: StoreObject) -> None:
    """Give every nested object that has no id yet (filters, rules, the default rule) a GUID."""
    if not obj.id:
        obj.id = new_id()
    if isinstance(obj, pb.FilterList):
        for flt in obj.filters:
            if not flt.id:
                flt.id = new_id()
    elif isinstance(obj, pb.Policy):
        for rule in obj.rules:
            if not rule.id:
                rule.id = new_id()
        if obj.HasField("default_response_rule") and not obj.default_response_rule.id:
            obj.default_response_rule.id = new_id()


def plan_writes(view: StoreView, mutations: Sequence[Mutation], *, validate: bool = True) -> Plan:
    puts: dict[tuple[Kind, str], PlannedPut] = {}
    deletes: dict[tuple[Kind, str], PlannedDelete] = {}
    for mutation in mutations:
        if isinstance(mutation, Put):
            obj = type(mutation.obj)()
            obj.CopyFrom(mutation.obj)  # type: ignore[arg-type]
            kind = kind_of(obj)
            if obj.revision == 0:
                if obj.id and (view.get(kind, obj.id) is not None or (kind, obj.id) in puts):
                    raise AlreadyExistsError(f"{describe(obj)}: an object with id {obj.id} exists")
                fill_ids(obj)
                op = "create"
            else:
                current = view.get(kind, obj.id) if obj.id else None
                if current is None:
                    raise NotFoundError(f"{describe(obj)} does not exist (id {obj.id or 'missing'})")
                if current.revision != obj.revision:
                    raise ConflictError(
                        f"{describe(current)} was changed by someone else "
                        f"(stored revision {current.revision}, yours {obj.revision}); "
                        "nothing was written: read it again and retry"
                    )
                fill_ids(obj)
                op = "update"
                if isinstance(obj, pb.Policy) and isinstance(current, pb.Policy) and obj.assigned != current.assigned:
                    op = "assign" if obj.assigned else "unassign"
            puts[(kind, obj.id)] = PlannedPut(obj, op)
        else:
            current = view.get(mutation.kind, mutation.object_id)
            if current is None:
                raise NotFoundError(f"{mutation.kind.value} {mutation.object_id} does not exist")
            if mutation.revision and current.revision != mutation.revision:
                raise ConflictError(
                    f"{describe(current)} was changed by someone else "
                    f"(stored revision {current.revision}, yours {mutation.revision}); "
                    "nothing was deleted: read it again and retry"
                )
            key = (mutation.kind, mutation.object_id)
            # An earlier put in this same write may have unassigned it (delete all does).
            latest = puts[key].obj if key in puts else current
            if isinstance(latest, pb.Policy) and latest.assigned:
                raise ProtectedError(f"{describe(current)} is assigned; unassign it before deleting it")
            deletes[key] = PlannedDelete(mutation.kind, mutation.object_id, current.name)
            puts.pop(key, None)

    # Only one policy is assigned per store: assigning one unassigns the others.
    newly_assigned = [
        p.obj.id for (k, _), p in puts.items() if k is Kind.POLICY and isinstance(p.obj, pb.Policy) and p.obj.assigned
    ]
    if len(newly_assigned) > 1:
        raise ValidationError(Violation("", "assign", "only one policy can be assigned in a store"))
    if newly_assigned:
        for policy_id in view.ids(Kind.POLICY):
            key = (Kind.POLICY, policy_id)
            if policy_id == newly_assigned[0] or key in deletes:
                continue
            other = puts[key].obj if key in puts else view.get(Kind.POLICY, policy_id)
            if isinstance(other, pb.Policy) and other.assigned:
                copy = pb.Policy()
                copy.CopyFrom(other)
                copy.assigned = False
                puts[key] = PlannedPut(copy, "unassign")

    overlay = OverlayView(view, {k: p.obj for k, p in puts.items()}, deletes)
    for (kind, object_id), planned in deletes.items():
        if kind is Kind.POLICY:
            continue
        uses = overlay.users(kind, object_id)
        if uses:
            more = f" and {len(uses) - 1} more" if len(uses) > 1 else ""
            raise InUseError(
                f'{kind.value} "{planned.name}" is used by {uses[0]}{more}; change or delete those rules first'
            )
    if validate:
        violations: list[Violation] = []
        for planned_put in puts.values():
            violations.extend(validate_object(planned_put.obj, overlay))
        if violations:
            raise ValidationError(violations)
    return Plan(list(puts.values()), list(deletes.values()))
