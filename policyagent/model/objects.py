"""Kinds of stored objects and small helpers over the protobuf domain messages."""

from __future__ import annotations

import enum
import uuid
from typing import TypeAlias

from policyagent.pb import pb

StoreObject: TypeAlias = pb.Policy | pb.FilterList | pb.FilterAction

# What read APIs show instead of a pre-shared key.
SECRET_MASK = "********"


class Kind(enum.Enum):
    """The three kinds of top-level objects a store holds. Values are the words used in messages."""

    POLICY = "policy"
    FILTER_LIST = "filter list"
    FILTER_ACTION = "filter action"

    @property
    def message_type(self) -> type[StoreObject]:
        return _TYPES[self]


_TYPES: dict[Kind, type[StoreObject]] = {
    Kind.POLICY: pb.Policy,
    Kind.FILTER_LIST: pb.FilterList,
    Kind.FILTER_ACTION: pb.FilterAction,
}


def kind_of(obj: StoreObject) -> Kind:
    if isinstance(obj, pb.Policy):
        return Kind.POLICY
    if isinstance(obj, pb.FilterList):
        return Kind.FILTER_LIST
    return Kind.FILTER_ACTION


def new_id() -> str:
    """A new object id: a GUID in Windows' braced upper-case form."""
    return "{" + str(uuid.uuid4()).upper() + "}"


def normalize_id(value: str) -> str:
    """Canonical form of a GUID given with or without braces, any case. Raises ValueError."""
    text = value.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    return "{" + str(uuid.UUID(text)).upper() + "}"


def name_key(name: str) -> str:
    """Names are unique per kind and compared case-insensitively, as netsh does."""
    return name.strip().casefold()


def describe(obj: StoreObject) -> str:
    """`policy "Secure Server (Require Security)"`: how messages name an object."""
    return f'{kind_of(obj).value} "{obj.name}"'


def contents_objects(contents: pb.StoreContents) -> list[StoreObject]:
    out: list[StoreObject] = []
    out.extend(contents.filter_lists)
    out.extend(contents.filter_actions)
    out.extend(contents.policies)
    return out
