"""Read-only views of a store, as the validator needs them.

The validator never talks to a database: it asks a `StoreView`. The server
passes a view over its open transaction, the CLI a `ContentsView` over what it
fetched, and both wrap it in an `OverlayView` holding the pending writes, so the
same rules run in both places.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from policyagent.model.objects import Kind, StoreObject, kind_of, name_key
from policyagent.pb import pb


@dataclass(frozen=True)
class RuleUse:
    """A rule that uses a filter list or filter action."""

    policy_id: str
    policy_name: str
    rule_index: int  # 1-based, as netsh numbers rules
    rule_name: str

    def __str__(self) -> str:
        return f'policy "{self.policy_name}"/rule {self.rule_index} ("{self.rule_name}")'


class StoreView(Protocol):
    def get(self, kind: Kind, object_id: str) -> StoreObject | None: ...

    def id_for_name(self, kind: Kind, name: str) -> str | None: ...

    def ids(self, kind: Kind) -> list[str]: ...

    def users(self, kind: Kind, object_id: str) -> list[RuleUse]: ...


def rule_uses(policy: pb.Policy, kind: Kind, object_id: str) -> Iterator[RuleUse]:
    for index, rule in enumerate(policy.rules, start=1):
        ref = rule.filter_list_id if kind is Kind.FILTER_LIST else rule.filter_action_id
        if ref == object_id:
            yield RuleUse(policy.id, policy.name, index, rule.name)


class ContentsView:
    """A StoreView over an in-memory StoreContents (what a client fetched, or a file)."""

    def __init__(self, contents: pb.StoreContents | Iterable[StoreObject] = ()) -> None:
        self._objects: dict[Kind, dict[str, StoreObject]] = {kind: {} for kind in Kind}
        self._names: dict[Kind, dict[str, str]] = {kind: {} for kind in Kind}
        items: Iterable[StoreObject]
        if isinstance(contents, pb.StoreContents):
            items = [*contents.filter_lists, *contents.filter_actions, *contents.policies]
        else:
            items = contents
        for obj in items:
            self.add(obj)

    def add(self, obj: StoreObject) -> None:
        kind = kind_of(obj)
        old = self._objects[kind].get(obj.id)
        if old is not None:
            self._names[kind].pop(name_key(old.name), None)
        self._objects[kind][obj.id] = obj
        self._names[kind][name_key(obj.name)] = obj.id

    def remove(self, kind: Kind, object_id: str) -> None:
        old = self._objects[kind].pop(object_id, None)
        if old is not None:
            self._names[kind].pop(name_key(old.name), None)

    def get(self, kind: Kind, object_id: str) -> StoreObject | None:
        return self._objects[kind].get(object_id)

    def id_for_name(self, kind: Kind, name: str) -> str | None:
        return self._names[kind].get(name_key(name))

    def ids(self, kind: Kind) -> list[str]:
        return list(self._objects[kind])

    def users(self, kind: Kind, object_id: str) -> list[RuleUse]:
        out: list[RuleUse] = []
        for policy in self._objects[Kind.POLICY].values():
            assert isinstance(policy, pb.Policy)
            out.extend(rule_uses(policy, kind, object_id))
        return out

    def objects(self, kind: Kind) -> list[StoreObject]:
        return list(self._objects[kind].values())

    def contents(self) -> pb.StoreContents:
        out = pb.StoreContents()
        for obj in self._objects[Kind.FILTER_LIST].values():
            out.filter_lists.append(obj)  # type: ignore[arg-type]
        for obj in self._objects[Kind.FILTER_ACTION].values():
            out.filter_actions.append(obj)  # type: ignore[arg-type]
        for obj in self._objects[Kind.POLICY].values():
            out.policies.append(obj)  # type: ignore[arg-type]
        return out


class OverlayView:
    """A base view with pending puts and deletes laid over it."""

    def __init__(
        self,
        base: StoreView,
        puts: Mapping[tuple[Kind, str], StoreObject],
        deletes: Iterable[tuple[Kind, str]],
    ) -> None:
        self._base = base
        self._puts = dict(puts)
        self._deleted = set(deletes)
        self._put_names: dict[Kind, dict[str, str]] = {kind: {} for kind in Kind}
        for (kind, object_id), obj in self._puts.items():
            self._put_names[kind][name_key(obj.name)] = object_id

    def get(self, kind: Kind, object_id: str) -> StoreObject | None:
        key = (kind, object_id)
        if key in self._deleted:
            return None
        if key in self._puts:
            return self._puts[key]
        return self._base.get(kind, object_id)

    def id_for_name(self, kind: Kind, name: str) -> str | None:
        # An object already stored under this name wins (unless it is being
        # deleted or renamed), so a new object reusing its name is caught.
        found = self._base.id_for_name(kind, name)
        if found is not None and (kind, found) not in self._deleted:
            pending = self._puts.get((kind, found))
            if pending is None or name_key(pending.name) == name_key(name):
                return found
        return self._put_names[kind].get(name_key(name))

    def ids(self, kind: Kind) -> list[str]:
        out = [i for i in self._base.ids(kind) if (kind, i) not in self._deleted]
        seen = set(out)
        out.extend(i for (k, i) in self._puts if k is kind and i not in seen)
        return out

    def users(self, kind: Kind, object_id: str) -> list[RuleUse]:
        out = [
            use
            for use in self._base.users(kind, object_id)
            if (Kind.POLICY, use.policy_id) not in self._deleted and (Kind.POLICY, use.policy_id) not in self._puts
        ]
        for (k, _), obj in self._puts.items():
            if k is Kind.POLICY:
                assert isinstance(obj, pb.Policy)
                out.extend(rule_uses(obj, kind, object_id))
        return out
