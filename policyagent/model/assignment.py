"""Group-Policy-style assignment of IPsec policies to computers, and RSoP (pure, no I/O).

The objects mirror what Active Directory holds for Group Policy: computers (a
domain member or a workgroup machine, in an OU, in a site, in groups),
organizational units (with "block inheritance"), sites, GPOs (each assigning at
most one IPsec policy — the GPO's `ipsec` pointer object, [MS-GPIPSEC] §2.2.2)
and GPO links (a GPO linked to the local scope, a site, a domain or an OU, with
a link order, "enforced" and "link enabled").

`resolve(topology, computer)` answers which IPsec policy is in force on a
computer and why, following Group Policy processing (reference windows-ipsec.md
§5.3; Microsoft's Group Policy processing and precedence rules):

* scopes are applied local, site, domain, then OUs from parent to child
  (LSDOU); a later GPO overrides an earlier one;
* within one scope the link with order 1 has the highest precedence (it is
  applied last);
* "block inheritance" on an OU stops every non-enforced link from above it
  (site, domain, parent OUs) from reaching computers at or below it; the local
  scope is not inherited and is never blocked;
* enforced links cannot be blocked and override every non-enforced link; among
  enforced links the higher scope wins (site over domain over parent OU over
  child OU);
* disabled links and disabled GPOs are skipped;
* security filtering ("Apply Group Policy" permission): a GPO whose
  `security_filter` names groups applies only to computers in at least one of
  them (an empty filter = everyone, like Authenticated Users); a filtered-out
  GPO is skipped, enforced or not, and a lower one can win;
* IPsec policies never merge: the IPsec extension takes the highest-precedence
  GPO that assigns a policy ([MS-GPIPSEC] §3.2.5.3). A GPO without an IPsec
  assignment does not take part;
* the agent's own local-store assignment is the lowest-precedence input of the
  local scope: "the domain's assignment overrides the local one".

Every link considered becomes a `Step` (the RsopStep of distribution.proto):
applied, overridden by which GPO, blocked at which OU, disabled, or without a
policy. Planning mode ("what would apply if this computer were in OU X") is
`resolve(topology.with_computer_in(name, ou=..., site=...), name)`; for a
computer not in the registry, `with_computer_in(name, ou=..., domain=...,
groups=...)` adds a hypothetical domain member (planning an unregistered one).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from policyagent.model.errors import NotFoundError, ValidationError, Violation

Membership = Literal["domain", "workgroup"]
MEMBERSHIPS: tuple[Membership, ...] = ("domain", "workgroup")
DEFAULT_WORKGROUP = "WORKGROUP"

MAX_NAME_LEN = 255
MAX_DESCRIPTION_LEN = 1024
MAX_LINK_ORDER = 10_000

# RFC 1123 host labels, plus "_" which NetBIOS-style names use; FQDNs allowed.
_HOST_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*$")
# One RDN value in our DNs: no escapes, no special characters (see parse_dn).
_RDN_VALUE_RE = re.compile(r"^[A-Za-z0-9 _.&()'-]+$")


# ------------------------------------------------------------------ keys and names


def key_of(name: str) -> str:
    """Names of computers, sites, groups, GPOs and domains compare case-insensitively."""
    return name.strip().casefold()


def canonical_computer_name(name: str) -> str:
    """A computer's registry name: stripped and lower-case (host names are case-insensitive)."""
    return name.strip().lower()


def canonical_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class DistinguishedName:
    """A parsed OU distinguished name: OU components (child first), then the domain's DC components."""

    ous: tuple[str, ...]
    dcs: tuple[str, ...]

    def __str__(self) -> str:
        return ",".join([*(f"OU={ou}" for ou in self.ous), *(f"DC={dc}" for dc in self.dcs)])

    @property
    def domain(self) -> str:
        """The DNS name of the domain the OU is in (DC=corp,DC=example → corp.example)."""
        return ".".join(self.dcs).lower()

    @property
    def parent(self) -> DistinguishedName | None:
        """The parent OU, or None when the parent is the domain itself."""
        if len(self.ous) <= 1:
            return None
        return DistinguishedName(self.ous[1:], self.dcs)

    def ancestors(self) -> list[DistinguishedName]:
        """This OU and every OU above it, top-most first (the order Group Policy applies them)."""
        out: list[DistinguishedName] = []
        node: DistinguishedName | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def is_within(self, other: DistinguishedName) -> bool:
        """True if this OU is `other` or below it."""
        n = len(other.ous)
        return (
            len(self.ous) >= n
            and tuple(k.casefold() for k in self.ous[len(self.ous) - n :]) == tuple(k.casefold() for k in other.ous)
            and self.domain == other.domain
        )

    @property
    def key(self) -> str:
        return str(self).casefold()


def parse_dn(text: str, *, field_name: str = "ou", path: str = "") -> DistinguishedName:
    """Parse and canonicalize an OU DN such as `OU=Servers, OU=Corp, DC=corp, DC=example`.

    Accepted: one or more OU= components then one or more DC= components, attribute
    names in any case, spaces around commas and `=`. Escaped characters (`\\,`) and
    other attribute types (CN=) are refused with a message naming the field.
    """
    raw = text.strip()
    if not raw:
        raise ValidationError(
            Violation(path, field_name, "give the OU's distinguished name, e.g. OU=Servers,DC=corp,DC=example")
        )
    if "\\" in raw or '"' in raw or "+" in raw or ";" in raw:
        raise ValidationError(
            Violation(path, field_name, f'"{raw}": escaped or multi-valued DN components are not supported')
        )
    ous: list[str] = []
    dcs: list[str] = []
    for part in raw.split(","):
        attr, eq, value = part.partition("=")
        attr, value = attr.strip().upper(), value.strip()
        if not eq or not value:
            raise ValidationError(Violation(path, field_name, f'"{raw}": "{part.strip()}" is not ATTRIBUTE=VALUE'))
        if attr == "OU":
            if dcs:
                raise ValidationError(Violation(path, field_name, f'"{raw}": OU= components must come before DC='))
            if not _RDN_VALUE_RE.match(value) or len(value) > 64:
                raise ValidationError(
                    Violation(
                        path,
                        field_name,
                        f'"{raw}": OU name "{value}" has characters not allowed here '
                        "(letters, digits, space, _ . & ( ) ' - ; at most 64)",
                    )
                )
            ous.append(value)
        elif attr == "DC":
            if not re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", value):
                raise ValidationError(Violation(path, field_name, f'"{raw}": "{value}" is not a DNS label'))
            dcs.append(value.lower())
        else:
            raise ValidationError(
                Violation(path, field_name, f'"{raw}": only OU= and DC= components are allowed, not {attr}=')
            )
    if not ous:
        raise ValidationError(Violation(path, field_name, f'"{raw}": an OU DN starts with OU=...'))
    if not dcs:
        raise ValidationError(
            Violation(path, field_name, f'"{raw}": the DN must end with the domain, e.g. DC=corp,DC=example')
        )
    return DistinguishedName(tuple(ous), tuple(dcs))


def canonical_dn(text: str) -> str:
    return str(parse_dn(text))


# ------------------------------------------------------------------ scopes


class ScopeKind(enum.Enum):
    """Where a GPO is linked. Values are the prefixes of the scope's string form."""

    LOCAL = "local"
    SITE = "site"
    DOMAIN = "domain"
    OU = "ou"


# LSDOU: the order Group Policy applies scopes in.
_SCOPE_RANK = {ScopeKind.LOCAL: 0, ScopeKind.SITE: 1, ScopeKind.DOMAIN: 2, ScopeKind.OU: 3}


@dataclass(frozen=True)
class Scope:
    """A link target: `local`, `site:NAME`, `domain:DNS-NAME` or `ou:DN` (its string form, as in RsopStep)."""

    kind: ScopeKind
    name: str = ""  # canonical: site as given, domain lower-case, OU DN canonical

    def __str__(self) -> str:
        return self.kind.value if self.kind is ScopeKind.LOCAL else f"{self.kind.value}:{self.name}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind.value, key_of(self.name))

    @staticmethod
    def local() -> Scope:
        return Scope(ScopeKind.LOCAL)

    @staticmethod
    def site(name: str) -> Scope:
        return Scope(ScopeKind.SITE, name.strip())

    @staticmethod
    def domain(name: str) -> Scope:
        return Scope(ScopeKind.DOMAIN, canonical_domain(name))

    @staticmethod
    def ou(dn: str | DistinguishedName) -> Scope:
        return Scope(ScopeKind.OU, str(dn if isinstance(dn, DistinguishedName) else parse_dn(dn)))

    @staticmethod
    def parse(text: str, *, field_name: str = "scope", path: str = "") -> Scope:
        """`local`, `site:NAME`, `domain:NAME` or `ou:DN` (the prefix in any case)."""
        raw = text.strip()
        head, sep, rest = raw.partition(":")
        kind = {k.value: k for k in ScopeKind}.get(head.strip().lower())
        if kind is ScopeKind.LOCAL and not rest.strip():
            return Scope.local()
        if kind is None or not sep or not rest.strip():
            raise ValidationError(
                Violation(path, field_name, f'"{raw}" is not a scope: give local, site:NAME, domain:NAME or ou:DN')
            )
        if kind is ScopeKind.SITE:
            check_name(rest.strip(), "site", field_name=field_name, path=path)
            return Scope.site(rest)
        if kind is ScopeKind.DOMAIN:
            check_domain_name(rest, field_name=field_name, path=path)
            return Scope.domain(rest)
        return Scope.ou(parse_dn(rest, field_name=field_name, path=path))


def check_name(name: str, what: str, *, field_name: str = "name", path: str = "") -> None:
    if not name.strip():
        raise ValidationError(Violation(path, field_name, f"give the {what}'s name"))
    if name != name.strip():
        raise ValidationError(Violation(path, field_name, "must not start or end with spaces"))
    if len(name) > MAX_NAME_LEN:
        raise ValidationError(Violation(path, field_name, f"is longer than {MAX_NAME_LEN} characters"))
    if any(not ch.isprintable() for ch in name):
        raise ValidationError(Violation(path, field_name, "must not contain control characters"))
    if what in ("site", "group") and ":" in name:
        raise ValidationError(Violation(path, field_name, f"a {what} name must not contain ':'"))


def check_domain_name(name: str, *, field_name: str = "domain", path: str = "") -> None:
    text = name.strip().rstrip(".")
    if not text or len(text) > 253 or not _HOST_RE.match(text) or "_" in text:
        raise ValidationError(
            Violation(path, field_name, f'"{name.strip()}" is not a DNS domain name, e.g. corp.example')
        )


# ------------------------------------------------------------------ objects


@dataclass(frozen=True)
class Computer:
    """A computer in the registry. `ou` is a canonical OU DN or "" (the domain's default container)."""

    name: str
    membership: Membership = "domain"
    domain: str = ""  # DNS domain of a domain member; workgroup name of a workgroup machine
    ou: str = ""
    site: str = ""
    groups: frozenset[str] = frozenset()
    revision: int = 0

    @property
    def directory_domain(self) -> str:
        """The domain whose domain-linked GPOs reach this computer ("" for none).

        A domain member's own domain; a workgroup machine the registry placed in an OU
        gets that OU's domain (the registry manages it there), otherwise none.
        """
        if self.membership == "domain":
            return canonical_domain(self.domain)
        return parse_dn(self.ou).domain if self.ou else ""


@dataclass(frozen=True)
class OrgUnit:
    dn: str  # canonical
    block_inheritance: bool = False
    description: str = ""
    revision: int = 0

    @property
    def parsed(self) -> DistinguishedName:
        return parse_dn(self.dn)


@dataclass(frozen=True)
class Site:
    name: str
    description: str = ""
    revision: int = 0


@dataclass(frozen=True)
class Group:
    name: str
    description: str = ""
    revision: int = 0


@dataclass(frozen=True)
class Gpo:
    """A Group Policy object. `policy_id` is the IPsec policy it assigns ("" = none).

    `security_filter`: the groups the GPO applies to (Group Policy's "Apply Group
    Policy" permission); empty = every computer (Authenticated Users).
    """

    id: str
    name: str
    enabled: bool = True
    policy_id: str = ""
    description: str = ""
    revision: int = 0
    security_filter: tuple[str, ...] = ()

    def applies_to(self, computer: Computer) -> bool:
        """True if the security filter lets this GPO apply to `computer` (group names compare case-insensitively)."""
        if not self.security_filter:
            return True
        mine = {key_of(g) for g in computer.groups}
        return any(key_of(g) in mine for g in self.security_filter)


def canonical_filter(groups: Iterable[str]) -> tuple[str, ...]:
    """A security filter without duplicates (case-insensitive), sorted: how it is stored and compared."""
    seen: dict[str, str] = {}
    for group in groups:
        seen.setdefault(key_of(group), group.strip())
    return tuple(sorted(seen.values(), key=key_of))


@dataclass(frozen=True)
class GpoLink:
    """A GPO linked to a scope. `order` 1 is the highest precedence within the scope."""

    gpo_id: str
    scope: Scope
    order: int = 1
    enforced: bool = False
    enabled: bool = True
    revision: int = 0

    @property
    def key(self) -> tuple[str, tuple[str, str]]:
        return (self.gpo_id, self.scope.key)


@dataclass(frozen=True)
class LocalPolicy:
    """The agent's local-store assignment: the lowest-precedence input of the local scope."""

    policy_id: str
    policy_name: str = ""


# ------------------------------------------------------------------ field validation


def validate_computer(computer: Computer, path: str = "") -> None:
    """Field-level checks (no references); raises ValidationError naming the field."""
    path = path or f'computer "{computer.name}"'
    name = computer.name.strip()
    if not name:
        raise ValidationError(Violation(path, "name", "give the computer's name"))
    if len(name) > 253 or not _HOST_RE.match(name):
        raise ValidationError(
            Violation(path, "name", f'"{name}" is not a host name (letters, digits, - and _, dot-separated labels)')
        )
    if computer.membership not in MEMBERSHIPS:
        raise ValidationError(Violation(path, "membership", f'"{computer.membership}": give domain or workgroup'))
    if computer.membership == "domain":
        if not computer.domain.strip():
            raise ValidationError(Violation(path, "domain", "a domain member needs its domain's DNS name"))
        check_domain_name(computer.domain, path=path)
    else:
        check_name(computer.domain or DEFAULT_WORKGROUP, "workgroup", field_name="domain", path=path)
    if computer.ou:
        dn = parse_dn(computer.ou, path=path)
        if computer.membership == "domain" and dn.domain != canonical_domain(computer.domain):
            raise ValidationError(
                Violation(
                    path,
                    "ou",
                    f'OU "{dn}" is in domain {dn.domain}, '
                    f"the computer is a member of {canonical_domain(computer.domain)}",
                )
            )
    if computer.site:
        check_name(computer.site, "site", field_name="site", path=path)
    for group in computer.groups:
        check_name(group, "group", field_name="groups", path=path)


def validate_gpo(gpo: Gpo, path: str = "") -> None:
    path = path or f'GPO "{gpo.name}"'
    check_name(gpo.name, "GPO", path=path)
    if len(gpo.description) > MAX_DESCRIPTION_LEN:
        raise ValidationError(Violation(path, "description", f"is longer than {MAX_DESCRIPTION_LEN} characters"))
    for group in gpo.security_filter:
        check_name(group.strip(), "group", field_name="security_filter", path=path)


def validate_link(link: GpoLink, path: str = "") -> None:
    path = path or f"link {link.gpo_id} at {link.scope}"
    if not 0 <= link.order <= MAX_LINK_ORDER:
        raise ValidationError(Violation(path, "order", f"must be from 1 to {MAX_LINK_ORDER} (0 = last)"))
    if link.enforced and link.scope.kind is ScopeKind.LOCAL:
        raise ValidationError(Violation(path, "enforced", "a local link cannot be enforced (nothing is above it)"))


# ------------------------------------------------------------------ topology


class TopologyView(Protocol):
    """What the resolver reads. `Topology` implements it, and so does EffectivePolicies' live index."""

    def computer(self, name: str) -> Computer | None: ...

    def org_unit(self, dn: str) -> OrgUnit | None: ...

    def site(self, name: str) -> Site | None: ...

    def gpo(self, gpo_id: str) -> Gpo | None: ...

    def links_at(self, scope: Scope) -> list[GpoLink]:
        """The links of one scope, by link order."""
        ...


class KeyedLookups:
    """The TopologyView lookups over dicts keyed as the registry keys them (names by key_of, DNs casefolded).

    Shared by the immutable `Topology` and the server's mutable live index; each adds `links_at`.
    """

    computers: Mapping[str, Computer]
    ous: Mapping[str, OrgUnit]
    sites: Mapping[str, Site]
    groups: Mapping[str, Group]
    gpos: Mapping[str, Gpo]

    def computer(self, name: str) -> Computer | None:
        return self.computers.get(key_of(name))

    def org_unit(self, dn: str) -> OrgUnit | None:
        return self.ous.get(dn.casefold())

    def site(self, name: str) -> Site | None:
        return self.sites.get(key_of(name))

    def gpo(self, gpo_id: str) -> Gpo | None:
        return self.gpos.get(gpo_id)

    def group(self, name: str) -> Group | None:
        return self.groups.get(key_of(name))


@dataclass(frozen=True)
class Topology(KeyedLookups):
    """An immutable snapshot of the registry: what `resolve` runs over in tests and planning."""

    computers: Mapping[str, Computer] = field(default_factory=dict)  # by key_of(name)
    ous: Mapping[str, OrgUnit] = field(default_factory=dict)  # by DN key
    sites: Mapping[str, Site] = field(default_factory=dict)
    groups: Mapping[str, Group] = field(default_factory=dict)
    gpos: Mapping[str, Gpo] = field(default_factory=dict)  # by id
    links: tuple[GpoLink, ...] = ()

    @staticmethod
    def build(
        computers: Iterable[Computer] = (),
        ous: Iterable[OrgUnit] = (),
        sites: Iterable[Site] = (),
        groups: Iterable[Group] = (),
        gpos: Iterable[Gpo] = (),
        links: Iterable[GpoLink] = (),
    ) -> Topology:
        return Topology(
            computers={key_of(c.name): c for c in computers},
            ous={o.dn.casefold(): o for o in ous},
            sites={key_of(s.name): s for s in sites},
            groups={key_of(g.name): g for g in groups},
            gpos={g.id: g for g in gpos},
            links=tuple(links),
        )

    def links_at(self, scope: Scope) -> list[GpoLink]:
        return sorted((lk for lk in self.links if lk.scope.key == scope.key), key=lambda lk: lk.order)

    def with_computer_in(
        self,
        name: str,
        *,
        ou: str | None = None,
        site: str | None = None,
        domain: str | None = None,
        groups: Iterable[str] | None = None,
    ) -> Topology:
        """Planning mode: this topology with computer `name` moved to `ou` and/or `site`.

        None keeps the current value; "" takes the computer out of any OU / site. The
        OU, site and groups must exist. A computer not in the topology is planned as a
        hypothetical domain member (give `ou` or `domain`; see planned_computer).
        """
        moved = planned_computer(self, name, ou=ou, site=site, domain=domain, groups=groups, group_exists=self.group)
        computers = dict(self.computers)
        computers[key_of(name)] = moved
        return dataclasses.replace(self, computers=computers)


def planned_computer(
    view: TopologyView,
    name: str,
    *,
    ou: str | None = None,
    site: str | None = None,
    domain: str | None = None,
    groups: Iterable[str] | None = None,
    group_exists: Callable[[str], object | None] | None = None,
) -> Computer:
    """Computer `name` as it would be in `ou` and/or `site` (None keeps, "" clears); both must exist.

    `groups` (None keeps) replaces its groups; each must exist when `group_exists` is given.
    A computer not in the registry is planned as a hypothetical domain member of `domain`
    (default: the OU's domain): give `ou` or `domain`, else NotFoundError. `domain` is only
    for such a computer (a registered one keeps its membership).
    """
    current = view.computer(name)
    if current is None:
        has_ou = ou is not None and bool(ou.strip())
        if not has_ou and not (domain and domain.strip()):
            raise NotFoundError(
                f'there is no computer "{name.strip()}" in the registry '
                "(to plan a computer that is not registered, give a planning OU or domain)"
            )
        planned_domain = domain.strip() if domain and domain.strip() else parse_dn(ou or "").domain
        current = Computer(canonical_computer_name(name), "domain", canonical_domain(planned_domain))
        validate_computer(current)
    elif domain is not None and canonical_domain(domain) != canonical_domain(current.domain):
        raise ValidationError(
            Violation(
                f'computer "{current.name}"',
                "planning_domain",
                "a registered computer keeps its domain in planning mode (the planning domain is for an "
                "unregistered computer)",
            )
        )
    new_ou, new_site, new_groups = current.ou, current.site, current.groups
    if groups is not None:
        names: list[str] = []
        for group in groups:
            check_name(group.strip(), "group", field_name="groups", path=f'computer "{current.name}"')
            found_group = group_exists(group) if group_exists is not None else None
            if group_exists is not None and found_group is None:
                raise NotFoundError(f'there is no group "{group.strip()}" in the registry')
            names.append(found_group.name if isinstance(found_group, Group) else group.strip())
        new_groups = frozenset(canonical_filter(names))
    if ou is not None:
        new_ou = canonical_dn(ou) if ou.strip() else ""
        if new_ou and view.org_unit(new_ou) is None:
            raise NotFoundError(f'there is no OU "{new_ou}" in the registry')
    if site is not None:
        new_site = ""
        if site.strip():
            found = view.site(site)
            if found is None:
                raise NotFoundError(f'there is no site "{site.strip()}" in the registry')
            new_site = found.name
    moved = dataclasses.replace(current, ou=new_ou, site=new_site, groups=new_groups)
    validate_computer(moved)
    return moved


class ComputerOverlay:
    """A TopologyView with one computer replaced (planning mode over a live view)."""

    def __init__(self, base: TopologyView, computer: Computer) -> None:
        self._base = base
        self._computer = computer

    def computer(self, name: str) -> Computer | None:
        if key_of(name) == key_of(self._computer.name):
            return self._computer
        return self._base.computer(name)

    def org_unit(self, dn: str) -> OrgUnit | None:
        return self._base.org_unit(dn)

    def site(self, name: str) -> Site | None:
        return self._base.site(name)

    def gpo(self, gpo_id: str) -> Gpo | None:
        return self._base.gpo(gpo_id)

    def links_at(self, scope: Scope) -> list[GpoLink]:
        return self._base.links_at(scope)


# ------------------------------------------------------------------ resolution


class Outcome(enum.Enum):
    APPLIED = "applied"
    OVERRIDDEN = "overridden"
    BLOCKED = "blocked"
    LINK_DISABLED = "link disabled"
    GPO_DISABLED = "GPO disabled"
    FILTERED = "filtered out"
    NO_POLICY = "no IPsec policy"
    MISSING_POLICY = "missing policy"
    MISSING_GPO = "missing GPO"


@dataclass(frozen=True)
class Step:
    """One link considered for a computer, in precedence order (the first step has the highest)."""

    gpo_id: str
    gpo_name: str
    scope: str  # "local", "site:NAME", "domain:NAME", "ou:DN"
    link_order: int
    enforced: bool
    policy_id: str
    policy_name: str
    outcome: Outcome
    reason: str  # the outcome in words, as RsopStep.outcome carries it


@dataclass(frozen=True)
class Resolution:
    """The IPsec policy in force on a computer ("" policy_id = none) and every step that led there."""

    computer: str
    policy_id: str
    source: str  # "domain" (from a GPO) | "local" (the agent's local store) | "none"
    steps: tuple[Step, ...]

    @property
    def winner(self) -> Step | None:
        for step in self.steps:
            if step.outcome is Outcome.APPLIED:
                return step
        return None

    def policy_ids(self) -> frozenset[str]:
        """Every policy this resolution mentions (its RSoP shows their names)."""
        return frozenset(s.policy_id for s in self.steps if s.policy_id)


@dataclass(frozen=True)
class _Candidate:
    link: GpoLink
    gpo: Gpo | None
    blocked_at: str  # "" or the OU scope whose block inheritance stops this link


LOCAL_STORE_NAME = "local store"


def scopes_of(topology: TopologyView, computer: Computer) -> list[Scope]:
    """The scopes that apply to a computer, in LSDOU order (local first)."""
    scopes = [Scope.local()]
    if computer.site:
        scopes.append(Scope.site(computer.site))
    domain = computer.directory_domain
    if domain:
        scopes.append(Scope.domain(domain))
    if computer.ou:
        scopes.extend(Scope.ou(dn) for dn in parse_dn(computer.ou).ancestors())
    return scopes


def resolve(
    topology: TopologyView,
    computer: Computer | str,
    *,
    policy_names: Mapping[str, str] | None = None,
    local_policy: LocalPolicy | None = None,
) -> Resolution:
    """The IPsec policy in force on `computer` and the chain of reasons (module docstring).

    `policy_names` (id → name), when given, names policies in the steps and marks a
    GPO whose policy is not in it as assigning a missing policy (skipped, as Windows
    would fail to read it). `local_policy` is the agent's local-store assignment.
    """
    if isinstance(computer, str):
        found = topology.computer(computer)
        if found is None:
            raise NotFoundError(f'there is no computer "{computer}" in the registry')
        computer = found
    scopes = scopes_of(topology, computer)

    # Which OU blocks inheritance for links from above it: the deepest blocking OU
    # in the chain decides (everything above it is cut off).
    blocking: list[tuple[int, Scope]] = []  # (index in scopes, scope) of OUs with block inheritance
    for index, scope in enumerate(scopes):
        if scope.kind is ScopeKind.OU:
            ou = topology.org_unit(scope.name)
            if ou is not None and ou.block_inheritance:
                blocking.append((index, scope))

    def blocked_at(scope_index: int) -> str:
        if scopes[scope_index].kind is ScopeKind.LOCAL:
            return ""
        for index, scope in reversed(blocking):
            if index > scope_index:
                return str(scope)
        return ""

    normal: list[_Candidate] = []  # application order: first applied first
    enforced: list[tuple[int, list[_Candidate]]] = []
    for index, scope in enumerate(scopes):
        links = topology.links_at(scope)
        # Within a scope, higher link order numbers are applied first, order 1 last.
        ordered = sorted(links, key=lambda lk: (-lk.order, lk.gpo_id))
        here_enforced: list[_Candidate] = []
        for link in ordered:
            cand = _Candidate(link, topology.gpo(link.gpo_id), "" if link.enforced else blocked_at(index))
            (here_enforced if link.enforced and scope.kind is not ScopeKind.LOCAL else normal).append(cand)
        if here_enforced:
            enforced.append((index, here_enforced))
    # Enforced links are applied after all others, the lowest scope first, so the
    # highest scope's enforced link (applied last) wins.
    application: list[_Candidate] = list(normal)
    for _, cands in sorted(enforced, key=lambda item: -item[0]):
        application.extend(cands)
    precedence = list(reversed(application))

    steps: list[Step] = []
    winner: tuple[str, str, str] | None = None  # (gpo name, scope, policy id)

    def name_of(policy_id: str) -> str:
        if not policy_id or policy_names is None:
            return ""
        return policy_names.get(policy_id, "")

    for cand in precedence:
        link, gpo = cand.link, cand.gpo
        base = {
            "gpo_id": link.gpo_id,
            "gpo_name": gpo.name if gpo else "",
            "scope": str(link.scope),
            "link_order": link.order,
            "enforced": link.enforced,
            "policy_id": gpo.policy_id if gpo else "",
            "policy_name": name_of(gpo.policy_id) if gpo else "",
        }
        if gpo is None:
            steps.append(Step(**base, outcome=Outcome.MISSING_GPO, reason="GPO missing"))  # type: ignore[arg-type]
            continue
        if not link.enabled:
            outcome, reason = Outcome.LINK_DISABLED, "link disabled"
        elif not gpo.enabled:
            outcome, reason = Outcome.GPO_DISABLED, "GPO disabled"
        elif cand.blocked_at:
            outcome, reason = Outcome.BLOCKED, f"blocked by inheritance at {cand.blocked_at}"
        elif not gpo.applies_to(computer):
            groups = ", ".join(f'"{g}"' for g in gpo.security_filter)
            outcome, reason = (
                Outcome.FILTERED,
                f"skipped by security filtering: the computer is in none of the groups {groups}",
            )
        elif not gpo.policy_id:
            outcome, reason = Outcome.NO_POLICY, "no IPsec policy assigned"
        elif policy_names is not None and gpo.policy_id not in policy_names:
            outcome, reason = Outcome.MISSING_POLICY, f"assigns policy {gpo.policy_id}, which does not exist"
        elif winner is not None:
            outcome, reason = Outcome.OVERRIDDEN, f'overridden by GPO "{winner[0]}" ({winner[1]})'
        else:
            outcome, reason = Outcome.APPLIED, "applied"
            winner = (gpo.name, str(link.scope), gpo.policy_id)
        steps.append(Step(**base, outcome=outcome, reason=reason))  # type: ignore[arg-type]

    source = "domain" if winner is not None else "none"
    policy_id = winner[2] if winner is not None else ""
    if local_policy is not None and local_policy.policy_id:
        if winner is None:
            outcome, reason = Outcome.APPLIED, "applied"
            source, policy_id = "local", local_policy.policy_id
        else:
            outcome, reason = Outcome.OVERRIDDEN, f'overridden by GPO "{winner[0]}" ({winner[1]})'
        steps.append(
            Step(
                gpo_id="",
                gpo_name=LOCAL_STORE_NAME,
                scope=str(Scope.local()),
                link_order=0,
                enforced=False,
                policy_id=local_policy.policy_id,
                policy_name=local_policy.policy_name or name_of(local_policy.policy_id),
                outcome=outcome,
                reason=reason,
            )
        )
    return Resolution(computer.name, policy_id, source, tuple(steps))


def describe_resolution(resolution: Resolution) -> Iterator[str]:
    """gpresult-like lines: the policy in force, then each step in precedence order."""
    winner = resolution.winner
    if winner is None:
        yield f"{resolution.computer}: no IPsec policy in force"
    else:
        name = f'"{winner.policy_name}" ' if winner.policy_name else ""
        yield f"{resolution.computer}: IPsec policy {name}{winner.policy_id} from {winner.gpo_name} ({winner.scope})"
    for index, step in enumerate(resolution.steps, start=1):
        yield f"  {index}. {step.gpo_name or step.gpo_id} at {step.scope}: {step.reason}"
