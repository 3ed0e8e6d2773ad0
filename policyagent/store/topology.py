"""The TopologyStore interface: the server's registry of computers, OUs, sites, groups, GPOs and links.

Enrollment registers a computer with exactly this call (a create or an update,
never an error for "already exists"; it keeps the computer's groups):

    topology_store.upsert_computer(
        name: str,                          # host name; stored lower-case
        membership: Literal["domain", "workgroup"],
        domain: str,                        # DNS domain (domain) / workgroup name ("" = WORKGROUP)
        ou: str | None = None,              # OU DN; None keeps the current OU ("" = none)
        site: str | None = None,            # site name; None keeps the current site ("" = none)
        *,
        principal: str = "enrollment",      # who, for the change log
    ) -> Computer                           # as stored, with its revision

It raises ValidationError (bad name, domain, OU DN; OU in another domain than a
domain member's), NotFoundError (OU or site not in the registry) or StoreError.
In the server, call it on `PolicyServer.topology_store` (an observed store: the
distribution hub hears about the new computer) from the server's store thread
(`PolicyServer.run_in_store_thread`), as every store write runs there.

Without a directory the registry is filled by admins (`policyagent ou|site|computer|gpo`);
the directory issue will fill it from LDAP. Objects carry revisions (the store
revision of their last write, as in the policy store): a put with revision 0
creates (ALREADY_EXISTS if present) unless it is an upsert, a put with a
revision updates and fails with ABORTED (ConflictError) if the stored revision
differs. Every write is one all-or-nothing transaction, logged in an
append-only change log. tests/test_topology_store.py is the contract.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from policyagent.model.assignment import (
    Computer,
    Gpo,
    GpoLink,
    Group,
    Membership,
    OrgUnit,
    Scope,
    Site,
    Topology,
)

TopologyObject: TypeAlias = Computer | OrgUnit | Site | Group | Gpo | GpoLink

# Kinds as words (messages, change log).
COMPUTER = "computer"
OU = "ou"
SITE = "site"
GROUP = "group"
GPO = "gpo"
LINK = "link"
KINDS = (COMPUTER, OU, SITE, GROUP, GPO, LINK)


def kind_of(obj: TopologyObject) -> str:
    if isinstance(obj, Computer):
        return COMPUTER
    if isinstance(obj, OrgUnit):
        return OU
    if isinstance(obj, Site):
        return SITE
    if isinstance(obj, Group):
        return GROUP
    if isinstance(obj, Gpo):
        return GPO
    return LINK


def link_key(gpo_id: str, scope: Scope) -> str:
    """How a link is named in deletes and the change log: `{GPO-GUID}@ou:OU=...`."""
    return f"{gpo_id}@{scope}"


def key_text(obj: TopologyObject) -> str:
    """The object's key as text: name, DN, GPO id, or link_key."""
    if isinstance(obj, GpoLink):
        return link_key(obj.gpo_id, obj.scope)
    if isinstance(obj, OrgUnit):
        return obj.dn
    if isinstance(obj, Gpo):
        return obj.id
    return obj.name


@dataclass(frozen=True)
class PutObject:
    """Create or update. `upsert`: create or replace whatever is stored, ignoring revisions.

    A link put with order 0 goes last in its scope; order k moves it to k and shifts the
    scope's other links down, so a scope's link orders stay 1..n.
    """

    obj: TopologyObject
    upsert: bool = False


@dataclass(frozen=True)
class DeleteObject:
    """Delete by kind and key (computer/site/group name, OU DN, GPO id or name, link_key).

    Deleting a GPO deletes its links; deleting an OU or site deletes the links to it.
    An OU with child OUs or computers, a site with computers and a group with members
    or named in a GPO's security filter are refused (InUseError; filters are never
    edited behind the admin's back). revision 0: whatever is stored.
    """

    kind: str
    key: str
    revision: int = 0


@dataclass(frozen=True)
class UpsertComputer:
    """Register or update a computer inside the transaction (enrollment); None keeps ou / site / groups."""

    name: str
    membership: Membership
    domain: str
    ou: str | None = None
    site: str | None = None


TopologyMutation: TypeAlias = PutObject | DeleteObject | UpsertComputer


@dataclass(frozen=True)
class ObjectChange:
    """One object a write changed: before (None if created) and after (None if deleted)."""

    kind: str
    before: TopologyObject | None
    after: TopologyObject | None


@dataclass(frozen=True)
class TopologyWriteResult:
    changes: tuple[ObjectChange, ...]
    revision: int  # the store revision after the write

    @property
    def written(self) -> list[TopologyObject]:
        return [c.after for c in self.changes if c.after is not None]


@dataclass(frozen=True)
class TopologyChangeRecord:
    """One entry of the append-only change log."""

    seq: int
    time_unix_ms: int
    principal: str
    operation: str  # create | update | delete
    kind: str
    key: str
    revision: int
    context: str


class TopologyStore(abc.ABC):
    """A transactional, revisioned registry of the assignment topology."""

    @abc.abstractmethod
    def snapshot(self) -> tuple[Topology, int]:
        """Everything, read consistently, and the store revision."""

    @abc.abstractmethod
    def write(self, mutations: Sequence[TopologyMutation], *, principal: str, context: str = "") -> TopologyWriteResult:
        """Apply the mutations in order as one transaction, or raise and write nothing.

        Each mutation is checked against the registry as the earlier ones left it.
        Raises ValidationError, NotFoundError, AlreadyExistsError, ConflictError,
        InUseError or StoreError. An empty result (nothing changed) does not bump
        the revision.
        """

    def upsert_computer(
        self,
        name: str,
        membership: Membership,
        domain: str,
        ou: str | None = None,
        site: str | None = None,
        *,
        principal: str = "enrollment",
    ) -> Computer:
        """Register or update a computer (enrollment). See the module docstring."""
        self.write([UpsertComputer(name, membership, domain, ou, site)], principal=principal, context="enroll computer")
        found = self.get_computer(name)
        assert found is not None
        return found

    @abc.abstractmethod
    def get_computer(self, name: str) -> Computer | None:
        """One computer by name (case-insensitive)."""

    @abc.abstractmethod
    def changes(self, after_seq: int = 0, limit: int = 1000) -> list[TopologyChangeRecord]: ...

    @abc.abstractmethod
    def revision(self) -> int: ...

    @abc.abstractmethod
    def close(self) -> None: ...
