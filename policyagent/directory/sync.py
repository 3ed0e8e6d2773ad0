"""Keep the assignment registry in line with an LDAP directory (issue 5): the logic, without asyncio.

The server's thin asyncio task (policyagent/server/directory.py) drives a `DirectorySync` through
these steps, LDAP calls in their own worker thread and registry/policy-store calls in the store
thread:

    marker, read = sync.read_directory(full)          # LDAP thread; read None = nothing changed
    if read is a ComputerChanges (an incremental read):
        outcome = sync.apply_changes(read)            # store thread: diff the changed computers, one write
    else (a full read, a FullRead: topology and subnets):
        missing = sync.missing_policies(read)         # store thread: GPO policies the store lacks
        fetched = sync.fetch_policies(missing)        # LDAP thread: [MS-GPIPSEC] read of those
        outcome = sync.apply(read, fetched)           # store thread: import, diff, one write, persist

**Owned snapshot.** What the last applied read gave the registry (plus deleted objects kept because
local objects still use them) is "what the directory owns". It is persisted in the data directory
(`directory-owned.json`, compact JSON in assign_pb.Topology's JSON mapping, written atomically, 0600)
so that a server restarted while the directory is down still knows it: nothing is deleted or re-added
until the directory answers again. It is written once per applied change, before the registry write,
holding what is owned before and after (so a crash cannot leave directory objects nobody owns); a
second time only when the write gave up owned objects. An unchanged read does not write it.

**Diff** (`plan_sync`, pure): the directory's objects are compared with the registry as it is now —
not with the previous read — so drift is repaired too (reconcile, don't replay). Only objects that
differ become upserts; owned objects the directory no longer has become deletes; objects created
locally (`policyagent ou|computer|...`) are never touched, except on a key clash: the directory wins
(its object replaces the local one and is owned from then on). The registry recomputes effective
policies only for what the write changed, so an unchanged directory costs nothing.

**Change markers** (`connector.change_marker`): OpenLDAP's contextCSN, AD's highestCommittedUSN.
Unchanged → no read. Moved → the entries changed since the applied marker are listed (OpenLDAP:
`changes_since`, entryCSN newer; AD: `usn_changed_dns`, uSNChanged newer; adds, modifies and moves —
never deletions). AD: none listed = writes elsewhere on the DC, nothing to read. Every
`full_every`-th check reads everything anyway (deletions, and what an incremental read cannot see).

**Incremental reads** (`_incremental`, then `plan_computers`, pure). When every listed entry is a
computer object (a moved one shows up under its new DN) or a group the owned snapshot has with the same
name and description (a membership change: its members and the computers that had it are re-read),
only those computers are re-read (`connector.read_computers`: name, domain, groups from memberOf and
from the groups listing them, the parent DN) and the directory is taken to be the owned snapshot with
them replaced. The OU is the parent when the snapshot owns that OU, "" when the parent is no OU; an
OU the snapshot does not know means more changed. A name the snapshot does not own counts as an add
when the object was created after the applied marker (AD uSNCreated, OpenLDAP createTimestamp), or
else when every owned computer is still in the directory (one listing of computer names: otherwise it
is a rename); no name may be carried by two objects. The diff then looks at those computers only (one
registry lookup each, no snapshot of 10,000 computers). Everything else falls back to a full read: an
OU, GPO, IPsec pointer, gPLink holder or any other object changed; a group renamed or new; the marker
moved with no entry listed (OpenLDAP: a deletion); more than MAX_INCREMENTAL entries; a rename; a name
clash; an entry gone again before it was read. A deletion in the same interval as an incremental
change is seen at the next full read, as on AD. The last full read's problems stay in the status,
but for the computers re-read. `reads` / `last_read_kind` (DirectoryStatus.last_read_kind) say which
path ran.

**Sites** (`Subnets`, `with_sites`, `apply_addresses`): a computer's site is the site of the longest subnet
prefix containing the address its agent connects from (AD's subnet objects, read with the topology by
`connector.read_subnets`; no address or no match = no site). The address comes from an injected
`address_of(name)` (the server: the hub's fleet records), asked on the store thread. A full read places every
computer, an incremental one the re-read computers (the last full read's subnets); `apply_addresses` re-places
computers whose agents connected from a new address without reading the directory. Only computers whose
site changed are written.

**Policies** go through the same LDAP thread (`publish`, `assign`, `read_for_import`, `republish`: the
[MS-GPIPSEC] library policyagent.directory.adstore), writes over a second, writable connection so that the
sync's own connection stays read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from google.protobuf import json_format

from policyagent.directory.connector import (
    Bind,
    ChangeMarkerKind,
    ComputerRead,
    DirectoryConfig,
    DirectoryError,
    change_marker,
    changes_since,
    computer_names,
    connect,
    dn_key,
    dn_within,
    domain_of,
    find_computers,
    parse_subnet,
    read_computers,
    read_group,
    read_subnets,
    read_topology,
    usn_changed_dns,
)
from policyagent.model.assignment import (
    Computer,
    Gpo,
    GpoLink,
    Group,
    OrgUnit,
    Scope,
    ScopeKind,
    Site,
    Topology,
    canonical_dn,
    canonical_domain,
    check_name,
    key_of,
    parse_dn,
    validate_computer,
    validate_gpo,
    validate_link,
)
from policyagent.model.errors import PolicyError, ProtectedError, ValidationError
from policyagent.model.exportfmt import export_file, import_plan
from policyagent.model.objects import Kind, normalize_id
from policyagent.pb import assign_pb, pb
from policyagent.store.base import PolicyStore
from policyagent.store.topology import (
    COMPUTER,
    GPO,
    GROUP,
    LINK,
    OU,
    SITE,
    DeleteObject,
    PutObject,
    TopologyMutation,
    TopologyObject,
    UpsertComputer,
    link_key,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldap3.core.exceptions import LDAPException

_log = logging.getLogger("policyagent.directory.sync")

OWNED_FILE = "directory-owned.json"
OWNED_FORMAT = "policyagent-directory-owned"
OWNED_VERSION = 1
PRINCIPAL = "directory"
DEFAULT_INTERVAL_S = 15.0
DEFAULT_FULL_EVERY = 10
MAX_DESCRIPTION = 1024
# More changed entries than this and a full read is cheaper than reading them one by one (a base search
# and a group search each, against about a second for 10,000 computers).
MAX_INCREMENTAL = 200

ReadKind = Literal["full", "incremental"]

# What a failed directory call can raise: our own DirectoryError, ldap3's errors (socket, bind,
# timeout, result codes), OS-level errors, and the import library's DirectoryPolicyError (a ValueError
# subclass or not: see fetch_policies, which catches it per policy).
DIRECTORY_ERRORS: tuple[type[Exception], ...] = (DirectoryError, LDAPException, OSError, TimeoutError)

OwnedKey = tuple[str, str]  # (kind, registry key)
T = TypeVar("T")


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class DirectorySettings:
    """What `policyagent server --directory ...` is told. The password stays in its file until connect."""

    url: str
    base_dn: str
    bind: Bind = "simple"
    user: str = ""
    password_file: Path | None = None
    ca_file: Path | None = None
    tls_name: str | None = None
    starttls: bool = False
    sites_base: str | None = None
    interval_s: float = DEFAULT_INTERVAL_S
    full_every: int = DEFAULT_FULL_EVERY  # every N-th check re-reads everything (AD deletions)
    timeout_s: int = 10
    # --directory-publish: republish policies already in the directory when the store changes them.
    publish: bool = False

    def check(self) -> None:
        """Refuse an unusable configuration with one line naming the flag (ValueError)."""
        if not self.url.strip():
            raise ValueError("--directory: give the directory's URL (ldaps://, ldap:// or ldapi://)")
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if scheme not in ("ldap", "ldaps", "ldapi"):
            raise ValueError(f"--directory {self.url}: the URL must start with ldaps://, ldap:// or ldapi://")
        if not self.base_dn.strip():
            raise ValueError("--directory-base: give the base DN of the domain, e.g. DC=corp,DC=example")
        if self.bind not in ("simple", "external", "gssapi"):
            raise ValueError(f"--directory-bind {self.bind}: use simple, external or gssapi")
        if self.bind == "simple" and self.user and self.password_file is None:
            raise ValueError("--directory-user needs --directory-password-file (passwords never on the command line)")
        if self.starttls and scheme != "ldap":
            raise ValueError("--directory-starttls goes with an ldap:// URL")
        if self.interval_s <= 0:
            raise ValueError("--directory-interval must be more than 0 seconds")
        if self.full_every < 1:
            raise ValueError("the full re-read period must be at least 1 interval")
        if self.password_file is not None:
            read_password(self.password_file)
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"--directory-ca {self.ca_file}: no such file")

    def connector_config(self) -> DirectoryConfig:
        password = read_password(self.password_file) if self.password_file is not None else ""
        return DirectoryConfig(
            url=self.url,
            base_dn=self.base_dn,
            bind=self.bind,
            user=self.user,
            password=password,
            ca_file=str(self.ca_file) if self.ca_file is not None else None,
            tls_name=self.tls_name,
            starttls=self.starttls,
            timeout=self.timeout_s,
        )


def read_password(path: Path) -> str:
    """The bind password: the file's first line (ValueError naming the file, never its content)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--directory-password-file {path}: {exc.strerror or exc}") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ValueError(f"--directory-password-file {path} is empty")
    return password


def safe_error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """One line describing a directory failure, with any secret blanked out."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, LDAPException) and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:500]


# ------------------------------------------------------------------ conversions


def _scope_key(scope: Scope) -> str:
    kind, key = scope.key
    return f"{kind}:{key}"


def owned_key(obj: TopologyObject) -> OwnedKey:
    """(kind, key) as the registry keys the object (names case-insensitive, DNs casefolded)."""
    if isinstance(obj, Computer):
        return (COMPUTER, key_of(obj.name))
    if isinstance(obj, OrgUnit):
        return (OU, obj.dn.casefold())
    if isinstance(obj, Site):
        return (SITE, key_of(obj.name))
    if isinstance(obj, Group):
        return (GROUP, key_of(obj.name))
    if isinstance(obj, Gpo):
        return (GPO, obj.id)
    return (LINK, f"{obj.gpo_id}@{_scope_key(obj.scope)}")


def objects_of(topology: Topology) -> list[TopologyObject]:
    out: list[TopologyObject] = [*topology.ous.values(), *topology.sites.values(), *topology.groups.values()]
    out += [*topology.gpos.values(), *topology.computers.values(), *topology.links]
    return out


def keys_of(topology: Topology) -> frozenset[OwnedKey]:
    return frozenset(owned_key(o) for o in objects_of(topology))


def topology_from_proto(message: assign_pb.Topology) -> tuple[Topology, list[str]]:
    """The model's Topology of a directory snapshot; objects that do not parse are left out (problems)."""
    problems: list[str] = []
    ous: list[OrgUnit] = []
    for o in message.ous:
        try:
            ous.append(OrgUnit(str(parse_dn(o.dn)), o.block_inheritance, o.description[:MAX_DESCRIPTION]))
        except ValidationError as exc:
            problems.append(f'skipped OU "{o.dn}": {exc}')
    links: list[GpoLink] = []
    for lk in message.links:
        try:
            links.append(GpoLink(lk.gpo, Scope.parse(lk.scope), lk.order, lk.enforced, lk.enabled))
        except ValidationError as exc:
            problems.append(f"skipped the link of GPO {lk.gpo} at {lk.scope}: {exc}")
    computers = [
        Computer(c.name, "domain" if c.membership != "workgroup" else "workgroup", c.domain, c.ou, c.site,
                 frozenset(c.groups))
        for c in message.computers
    ]
    gpos = []
    for g in message.gpos:
        try:
            gpos.append(Gpo(normalize_id(g.id), g.name, g.enabled, g.policy_id, g.description[:MAX_DESCRIPTION]))
        except ValueError:
            problems.append(f'skipped GPO "{g.name}": its id {g.id} is not a GUID')
    topology = Topology.build(
        computers,
        ous,
        [Site(s.name, s.description[:MAX_DESCRIPTION]) for s in message.sites],
        [Group(g.name, g.description[:MAX_DESCRIPTION]) for g in message.groups],
        gpos,
        links,
    )
    return topology, problems


_Obj = TypeVar("_Obj", OrgUnit, Site, Group, Gpo, Computer, GpoLink)


def _same(a: TopologyObject, b: TopologyObject) -> bool:
    return dataclasses.replace(a, revision=0) == dataclasses.replace(b, revision=0)


def same_topology(a: Topology, b: Topology) -> bool:
    """The same objects (links in any order)."""
    return (a.computers, a.ous, a.sites, a.groups, a.gpos) == (b.computers, b.ous, b.sites, b.groups, b.gpos) and (
        a.links == b.links or set(a.links) == set(b.links)
    )


def _same_computer(a: Computer, b: Computer) -> bool:
    """Equal but for the revision, group names compared case-insensitively (the diff's hot loop: no copies)."""
    return (
        (a.name, a.membership, a.domain, a.ou, a.site) == (b.name, b.membership, b.domain, b.ou, b.site)
        and (a.groups == b.groups or {key_of(g) for g in a.groups} == {key_of(g) for g in b.groups})
    )


def created_after(kind: ChangeMarkerKind, marker: str, created: str) -> bool:
    """Whether an object created at `created` (connector.ComputerRead.created) is younger than `marker`, so
    it cannot be a computer the read at that marker saw (renamed since). AD: uSNCreated above the
    marker's USN (one DC). OpenLDAP: createTimestamp (whole seconds) after the second of the marker's
    CSN — the same second proves nothing."""
    if not created or not marker:
        return False
    if kind == "highestCommittedUSN":
        try:
            return int(created) > int(marker)
        except ValueError:
            return False
    if kind == "contextCSN":
        second = marker[:14]
        return len(created) == 14 and len(second) == 14 and second.isdigit() and created > second
    return False


# ------------------------------------------------------------------ sites from subnets (pure)


@dataclass(frozen=True)
class Subnets:
    """The directory's subnets as a longest-prefix-match table: a computer's site is the site of the longest
    subnet prefix its address falls in, none when none matches — as Active Directory decides it (subnet
    objects, [MS-ADTS]; DsGetSiteName / DsAddressToSiteNames): the site is not stored on the computer.

    `prefixes` maps a prefix ("10.1.0.0/16", "2001:db8::/32") to a site name; entries that are no prefix
    (see connector.parse_subnet) or name no site are left out (`skipped` names them). An IPv4-mapped IPv6
    address (a dual-stack listener's view of an IPv4 client) matches as the IPv4 address it carries.
    A lookup costs one dict probe per distinct prefix length, not a pass over the subnets.
    """

    prefixes: Mapping[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = field(default=(), init=False, compare=False)
    # version → ((prefix length, netmask, network int → site), ...), longest first
    _tables: Mapping[int, tuple[tuple[int, int, Mapping[int, str]], ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        kept: dict[str, str] = {}
        skipped: list[str] = []
        by_length: dict[tuple[int, int], dict[int, str]] = {}
        for text, site in self.prefixes.items():
            try:
                network = parse_subnet(text)
            except ValueError as exc:
                skipped.append(str(exc))
                continue
            if not site.strip():
                skipped.append(f"{text!r} names no site")
                continue
            networks = by_length.setdefault((network.version, network.prefixlen), {})
            networks.setdefault(int(network.network_address), site.strip())
            kept.setdefault(str(network), site.strip())
        tables: dict[int, tuple[tuple[int, int, Mapping[int, str]], ...]] = {}
        for version, bits in ((4, 32), (6, 128)):
            lengths = sorted((length for v, length in by_length if v == version), reverse=True)
            tables[version] = tuple(
                (length, ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1), by_length[(version, length)])
                for length in lengths
            )
        object.__setattr__(self, "prefixes", kept)
        object.__setattr__(self, "skipped", tuple(skipped))
        object.__setattr__(self, "_tables", tables)

    def __bool__(self) -> bool:
        return bool(self.prefixes)

    def site_of(self, address: str) -> str:
        """The site of the longest prefix `address` (an IP address as text) is in; "" for none or no address."""
        if not address or not self.prefixes:
            return ""
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return ""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        for _length, mask, networks in self._tables.get(ip.version, ()):
            site = networks.get(value & mask)
            if site is not None:
                return site
        return ""


AddressOf = Callable[[str], str]  # computer name → the IP address its agent last connected from ("" unknown)


def placed(computer: Computer, subnets: Subnets, address_of: AddressOf) -> Computer:
    """The computer with the site its agent's address is in (no subnets: no site; address_of is not asked)."""
    site = subnets.site_of(address_of(computer.name)) if subnets else ""
    return computer if site == computer.site else dataclasses.replace(computer, site=site)


def with_sites(directory: Topology, subnets: Subnets, address_of: AddressOf) -> Topology:
    """A directory read with each computer's site decided by its address (plan_sync then writes only the
    computers whose site differs from the registry's)."""
    if not subnets and not any(c.site for c in directory.computers.values()):
        return directory
    return dataclasses.replace(
        directory, computers={k: placed(c, subnets, address_of) for k, c in directory.computers.items()}
    )


# ------------------------------------------------------------------ the plan (pure)


@dataclass(frozen=True)
class SyncPlan:
    """The registry write that brings the registry in line with a directory read."""

    mutations: tuple[TopologyMutation, ...]
    owned: Topology  # what the directory owns once the write commits (the read, plus kept objects)
    problems: tuple[str, ...]


_Named = TypeVar("_Named", Site, Group)


def _named(objects: Mapping[str, _Named], kind: str, problems: list[str]) -> dict[str, _Named]:
    """The sites or groups whose names the registry accepts; the others skipped with a problem."""
    out: dict[str, _Named] = {}
    for key, obj in objects.items():
        try:
            check_name(obj.name, kind, path=f'{kind} "{obj.name}"')
        except ValidationError as exc:
            problems.append(f"skipped {exc}")
            continue
        out[key] = obj
    return out


def _sanitize(directory: Topology, registry: Topology, owned: frozenset[OwnedKey]) -> tuple[Topology, list[str]]:
    """The directory's objects the registry can take, references resolved; the rest named in problems."""
    problems: list[str] = []
    ous: dict[str, OrgUnit] = {}
    for key in sorted(directory.ous, key=lambda k: len(directory.ous[k].parsed.ous)):  # parents first
        ou = directory.ous[key]
        parent = ou.parsed.parent
        if parent is not None and parent.key not in ous and registry.org_unit(str(parent)) is None:
            problems.append(f'skipped OU "{ou.dn}": its parent OU is not in the directory read')
            continue
        ous[key] = ou
    sites = _named(directory.sites, "site", problems)
    groups = _named(directory.groups, "group", problems)
    gpos: dict[str, Gpo] = {}
    taken = {key_of(g.name): g.id for g in registry.gpos.values() if (GPO, g.id) not in owned}
    for gpo_id in sorted(directory.gpos):
        gpo = directory.gpos[gpo_id]
        holder = taken.get(key_of(gpo.name))
        if holder is not None and holder != gpo_id:
            # GPO names are unique in the registry; a local GPO (or another directory GPO) has this one.
            renamed = f"{gpo.name} ({gpo_id})"
            problems.append(f'GPO {gpo_id} "{gpo.name}": the name is taken in the registry; named "{renamed}"')
            gpo = dataclasses.replace(gpo, name=renamed)
        try:
            validate_gpo(gpo)
        except ValidationError as exc:
            problems.append(f"skipped {exc}")
            continue
        taken[key_of(gpo.name)] = gpo_id
        gpos[gpo_id] = gpo
    computers: dict[str, Computer] = {}
    for key, computer in directory.computers.items():
        fixed = computer
        if fixed.ou and fixed.ou.casefold() not in ous:
            fixed = dataclasses.replace(fixed, ou="")
        if fixed.site and key_of(fixed.site) not in sites:
            fixed = dataclasses.replace(fixed, site="")
        if any(key_of(g) not in groups for g in fixed.groups):
            fixed = dataclasses.replace(fixed, groups=frozenset(g for g in fixed.groups if key_of(g) in groups))
        try:
            validate_computer(fixed)
        except ValidationError as exc:
            problems.append(f"skipped {exc}")
            continue
        computers[key] = fixed
    domains = {o.parsed.domain for o in [*ous.values(), *registry.ous.values()]}
    domains |= {canonical_domain(c.domain) for c in [*computers.values(), *registry.computers.values()]
                if c.membership == "domain"}
    by_scope: dict[str, list[GpoLink]] = {}
    for link in directory.links:
        where = f"the link of GPO {link.gpo_id} at {link.scope}"
        if link.gpo_id not in gpos:
            continue  # its GPO was skipped (said so above)
        if link.scope.kind is ScopeKind.OU and link.scope.name.casefold() not in ous:
            problems.append(f"skipped {where}: the OU is not in the directory read")
            continue
        if link.scope.kind is ScopeKind.SITE and key_of(link.scope.name) not in sites:
            problems.append(f"skipped {where}: the site is not in the directory read")
            continue
        if link.scope.kind is ScopeKind.DOMAIN and canonical_domain(link.scope.name) not in domains:
            continue  # an empty domain: the registry cannot hold the link (and it reaches nobody)
        try:
            validate_link(link)
        except ValidationError as exc:
            problems.append(f"skipped {exc}")
            continue
        by_scope.setdefault(_scope_key(link.scope), []).append(link)
    links: list[GpoLink] = []
    for scope_links in by_scope.values():  # 1..n in each scope, as the registry keeps them
        for number, link in enumerate(sorted(scope_links, key=lambda lk: (lk.order, lk.gpo_id)), start=1):
            links.append(dataclasses.replace(link, order=number))
    clean = Topology.build(computers.values(), ous.values(), sites.values(), groups.values(), gpos.values(), links)
    return clean, problems


def plan_sync(directory: Topology, owned: frozenset[OwnedKey], registry: Topology) -> SyncPlan:
    """The mutations that make the registry hold `directory` (and drop what the directory no longer has).

    Order inside the one transaction, so every reference exists when it is written: link deletes,
    GPO deletes; OU (parents first), site, group and GPO upserts; computer upserts; link upserts (each
    scope 1..n); computer deletes; OU deletes (children first), site and group deletes. An owned OU,
    site or group that local objects still use (a local computer in the OU, a local GPO filtering on
    the group) is kept, stays owned and is retried on the next read.
    """
    clean, problems = _sanitize(directory, registry, owned)
    wanted = keys_of(clean)
    gone = {key for key in owned if key not in wanted}

    def present(key: OwnedKey) -> bool:
        kind, k = key
        if kind == COMPUTER:
            return k in registry.computers
        if kind == OU:
            return k in registry.ous
        if kind == SITE:
            return k in registry.sites
        if kind == GROUP:
            return k in registry.groups
        return k in registry.gpos

    stored_links = {owned_key(lk) for lk in registry.links}
    gone = {key for key in gone if (key in stored_links if key[0] == LINK else present(key))}
    deleting_gpos = {k for kind, k in gone if kind == GPO}
    deleting_ous = {k for kind, k in gone if kind == OU}

    mutations: list[TopologyMutation] = []
    # 1. links the directory dropped (not those going with their GPO)
    for link in registry.links:
        if owned_key(link) in gone and link.gpo_id not in deleting_gpos:
            mutations.append(DeleteObject(LINK, link_key(link.gpo_id, link.scope)))
    # 2. GPOs (their links go with them; first, so a new GPO may take a deleted one's name)
    for gpo_id in sorted(deleting_gpos):
        mutations.append(DeleteObject(GPO, gpo_id))
    def put_changed(
        objects: Iterable[_Obj], current: Callable[[_Obj], _Obj | None], same: Callable[[_Obj, _Obj], bool] = _same
    ) -> None:
        """An upsert for each object the registry lacks or holds differently (in the order given)."""
        for obj in objects:
            stored = current(obj)
            if stored is None or not same(stored, obj):
                mutations.append(PutObject(obj, upsert=True))

    # 3. OUs parents first, sites, groups, GPOs
    put_changed(sorted(clean.ous.values(), key=lambda o: (len(o.parsed.ous), o.dn.casefold())),
                lambda ou: registry.org_unit(ou.dn))
    put_changed(clean.sites.values(), lambda site: registry.site(site.name))
    put_changed(clean.groups.values(), lambda group: registry.group(group.name))
    put_changed(clean.gpos.values(), lambda gpo: registry.gpo(gpo.id))
    # 4. computers
    put_changed(clean.computers.values(), lambda computer: registry.computer(computer.name), _same_computer)
    # 5. links, each scope in order (a put at order k shifts the others: ascending keeps them in place)
    links_by_key = {owned_key(lk): lk for lk in registry.links}
    put_changed(sorted(clean.links, key=lambda lk: (_scope_key(lk.scope), lk.order)),
                lambda link: links_by_key.get(owned_key(link)))
    # 6. computers the directory dropped
    for kind, key in sorted(gone):
        if kind == COMPUTER:
            mutations.append(DeleteObject(COMPUTER, registry.computers[key].name))
    # 7. OUs children first, unless local objects still use them; then sites and groups
    remaining = {k: c for k, c in registry.computers.items() if (COMPUTER, k) not in gone}
    remaining.update(clean.computers)
    kept: list[TopologyObject] = []
    kept_ous: set[str] = set()
    for key in sorted(deleting_ous, key=lambda k: -len(registry.ous[k].parsed.ous)):
        ou = registry.ous[key]
        users = sorted(c.name for c in remaining.values() if c.ou.casefold() == key)
        children = sorted(
            o.dn
            for k, o in registry.ous.items()
            if (parent := o.parsed.parent) is not None
            and parent.key == key
            and (k not in deleting_ous or k in kept_ous)
        )
        if users or children:
            kept.append(ou)
            kept_ous.add(key)
            what = ", ".join([*(f"computer {u}" for u in users), *(f'OU "{d}"' for d in children)][:5])
            problems.append(f'OU "{ou.dn}" is gone from the directory but still holds {what}: kept')
            continue
        mutations.append(DeleteObject(OU, ou.dn))
    for kind, key in sorted(gone):
        if kind == SITE:
            site = registry.sites[key]
            users = sorted(c.name for c in remaining.values() if key_of(c.site) == key)
            if users:
                kept.append(site)
                problems.append(f'site "{site.name}" is gone from the directory but computer {users[0]} is in it: kept')
                continue
            mutations.append(DeleteObject(SITE, site.name))
        elif kind == GROUP:
            group = registry.groups[key]
            users = sorted(c.name for c in remaining.values() if any(key_of(g) == key for g in c.groups))
            filters = sorted(g.name for g in registry.gpos.values()
                             if g.id not in deleting_gpos and key in {key_of(f) for f in g.security_filter})
            if users or filters:
                kept.append(group)
                who = f"computer {users[0]}" if users else f'GPO "{filters[0]}"'
                problems.append(f'group "{group.name}" is gone from the directory but {who} uses it: kept')
                continue
            mutations.append(DeleteObject(GROUP, group.name))
    owned_after = Topology.build(
        clean.computers.values(),
        [*clean.ous.values(), *(o for o in kept if isinstance(o, OrgUnit))],
        [*clean.sites.values(), *(s for s in kept if isinstance(s, Site))],
        [*clean.groups.values(), *(g for g in kept if isinstance(g, Group))],
        clean.gpos.values(),
        clean.links,
    )
    return SyncPlan(tuple(mutations), owned_after, tuple(problems))


def plan_computers(
    changed: Iterable[Computer], owned: Topology, registry: Callable[[str], Computer | None]
) -> tuple[SyncPlan, frozenset[OwnedKey]]:
    """The diff of an incremental read: the directory is `owned` with the `changed` computers replaced.

    Only the changed keys are compared (`registry(name)` is the registry's computer of that name, None
    if it has none), so a move costs one lookup, not a pass over every computer. Each computer is
    sanitized as plan_sync does (an OU, site or group the directory does not own is dropped; a computer
    the model refuses is skipped, named in the problems, and deleted if the directory owned it). The
    caller makes sure nothing but these computers changed (read_directory falls back to a full read
    otherwise). Returns the plan and the owned keys it gives up (computers that became invalid).
    """
    problems: list[str] = []
    computers = dict(owned.computers)
    puts: list[TopologyMutation] = []
    deletes: list[TopologyMutation] = []
    given_up: set[OwnedKey] = set()
    for computer in changed:
        key = key_of(computer.name)
        fixed = computer
        if fixed.ou and fixed.ou.casefold() not in owned.ous:
            fixed = dataclasses.replace(fixed, ou="")
        if fixed.site and key_of(fixed.site) not in owned.sites:
            fixed = dataclasses.replace(fixed, site="")
        if any(key_of(g) not in owned.groups for g in fixed.groups):
            fixed = dataclasses.replace(fixed, groups=frozenset(g for g in fixed.groups if key_of(g) in owned.groups))
        current = registry(fixed.name)
        try:
            validate_computer(fixed)
        except ValidationError as exc:
            problems.append(f"skipped {exc}")
            if computers.pop(key, None) is not None:
                given_up.add((COMPUTER, key))
                if current is not None:
                    deletes.append(DeleteObject(COMPUTER, current.name))
            continue
        computers[key] = fixed
        if current is None or not _same_computer(current, fixed):
            puts.append(PutObject(fixed, upsert=True))
    plan = SyncPlan((*puts, *deletes), dataclasses.replace(owned, computers=computers), tuple(problems))
    return plan, frozenset(given_up)


# ------------------------------------------------------------------ refusing local edits of owned objects


_KIND_WORDS = {GPO: "GPO", OU: "OU"}


def refusal(kind: str, name: str, url: str) -> ProtectedError:
    return ProtectedError(
        f'{_KIND_WORDS.get(kind, kind)} "{name}" comes from the directory ({url}): change it there; '
        "a local change would be overwritten by the next directory sync"
    )


def check_local_write(
    mutations: Iterable[TopologyMutation], owned: frozenset[OwnedKey], registry: Callable[[], Topology], url: str
) -> None:
    """Raise ProtectedError if a local write would change an object the directory owns.

    Local objects may refer to owned ones (a local computer in a directory OU, a local GPO linked at a
    directory OU): only the owned objects themselves are off limits. `registry()` is called only when
    a GPO named by name has to be resolved.
    """
    snapshot: list[Topology] = []

    def gpo(ref: str) -> tuple[str, str]:
        """(id, how to show it) of a GPO named by id or name; the registry is read only for a name."""
        try:
            return normalize_id(ref), ref
        except ValueError:
            pass
        if not snapshot:
            snapshot.append(registry())
        found = next((g for g in snapshot[0].gpos.values() if key_of(g.name) == key_of(ref)), None)
        return (found.id, found.name) if found is not None else (ref, ref)

    def gpo_id(ref: str) -> str:
        return gpo(ref)[0]

    for mutation in mutations:
        if isinstance(mutation, UpsertComputer):
            if (COMPUTER, key_of(mutation.name)) in owned:
                raise refusal(COMPUTER, mutation.name.strip().lower(), url)
            continue
        if isinstance(mutation, PutObject):
            obj = mutation.obj
            if isinstance(obj, Gpo):
                key = (GPO, gpo_id(obj.id)) if obj.id else (GPO, "")
                shown = obj.name
            elif isinstance(obj, GpoLink):
                gid, name = gpo(obj.gpo_id)
                key = (LINK, f"{gid}@{_scope_key(obj.scope)}")
                shown = f"{name}@{obj.scope}"
            else:
                key = owned_key(obj)
                shown = obj.dn if isinstance(obj, OrgUnit) else obj.name.strip()
                if isinstance(obj, Computer):
                    shown = shown.lower()
            if key in owned:
                raise refusal(LINK if isinstance(obj, GpoLink) else key[0], shown, url)
            continue
        kind, ref = mutation.kind, mutation.key.strip()
        if kind in (COMPUTER, SITE, GROUP):
            key = (kind, key_of(ref))
            ref = ref.lower() if kind == COMPUTER else ref
        elif kind == OU:
            try:
                ref = str(parse_dn(ref))
            except ValidationError:
                continue  # the store says why
            key = (OU, ref.casefold())
        elif kind == GPO:
            gid, ref = gpo(ref)
            key = (GPO, gid)
        else:
            gpo_ref, _sep, scope_text = ref.partition("@")
            try:
                scope = Scope.parse(scope_text)
            except ValidationError:
                continue
            gid, name = gpo(gpo_ref)
            key = (LINK, f"{gid}@{_scope_key(scope)}")
            ref = f"{name}@{scope}"
        if key in owned:
            raise refusal(kind, ref, url)


# ------------------------------------------------------------------ persistence


@dataclass(frozen=True)
class OwnedState:
    """The persisted owned snapshot and when the registry last matched the directory."""

    topology: Topology = field(default_factory=Topology)
    url: str = ""
    base_dn: str = ""
    last_sync_unix_ms: int = 0
    last_change_unix_ms: int = 0


def load_owned(path: Path) -> OwnedState:
    """The owned snapshot from `path` (an empty one if there is none). ValueError if it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return OwnedState()
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"the directory's owned snapshot {path} is unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != OWNED_FORMAT or data.get("version") != OWNED_VERSION:
        raise ValueError(f"{path} is not a policyagent directory snapshot (format {OWNED_FORMAT} v{OWNED_VERSION})")
    message = assign_pb.Topology()
    try:
        json_format.ParseDict(data.get("topology", {}), message)
    except json_format.ParseError as exc:
        raise ValueError(f"the directory's owned snapshot {path} is malformed: {exc}") from None
    topology, _problems = topology_from_proto(message)
    return OwnedState(
        topology,
        str(data.get("url", "")),
        str(data.get("base_dn", "")),
        int(data.get("last_sync_unix_ms", 0)),
        int(data.get("last_change_unix_ms", 0)),
    )


def _topology_dict(topology: Topology) -> dict[str, Any]:
    """The snapshot's topology as plain dicts in assign_pb.Topology's JSON mapping (proto field names,
    sorted), so load_owned's json_format.ParseDict reads it. Built directly:
    json_format over 10,000 computers cost a few hundred ms per applied change."""
    return {
        "computers": [
            {"name": c.name, "membership": c.membership, "domain": c.domain, "ou": c.ou, "site": c.site,
             "groups": sorted(c.groups, key=key_of)}
            for c in sorted(topology.computers.values(), key=lambda c: key_of(c.name))
        ],
        "ous": [
            {"dn": o.dn, "block_inheritance": o.block_inheritance, "description": o.description}
            for o in sorted(topology.ous.values(), key=lambda o: o.dn.casefold())
        ],
        "sites": [{"name": s.name, "description": s.description}
                  for s in sorted(topology.sites.values(), key=lambda s: key_of(s.name))],
        "groups": [{"name": g.name, "description": g.description}
                   for g in sorted(topology.groups.values(), key=lambda g: key_of(g.name))],
        "gpos": [
            {"id": g.id, "name": g.name, "enabled": g.enabled, "policy_id": g.policy_id, "description": g.description}
            for g in sorted(topology.gpos.values(), key=lambda g: g.id)
        ],
        "links": [
            {"gpo": lk.gpo_id, "scope": str(lk.scope), "order": lk.order, "enforced": lk.enforced,
             "enabled": lk.enabled}
            for lk in sorted(topology.links, key=lambda lk: (_scope_key(lk.scope), lk.order, lk.gpo_id))
        ],
    }


def save_owned(path: Path, state: OwnedState) -> None:
    """Write the owned snapshot atomically (temp file, fsync, rename), 0600; compact JSON."""
    data = {
        "format": OWNED_FORMAT,
        "version": OWNED_VERSION,
        "url": state.url,
        "base_dn": state.base_dn,
        "last_sync_unix_ms": state.last_sync_unix_ms,
        "last_change_unix_ms": state.last_change_unix_ms,
        "topology": _topology_dict(state.topology),
    }
    fd, tmp = tempfile.mkstemp(prefix=".directory-owned.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(data, separators=(",", ":")))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------ importing GPO policies


def read_directory_policies(conn: Any, base_dn: str, policy_ids: list[str]) -> pb.StoreContents:
    """The IPsec policies `policy_ids` as stored in the directory ([MS-GPIPSEC] layout), with what they use.

    The one place the sync calls the [MS-GPIPSEC] library (policyagent.directory.adstore); raises its
    DirectoryPolicyError (or ImportError while that library is not installed).
    """
    from policyagent.directory import adstore

    contents: pb.StoreContents = adstore.read_policies(conn, base_dn, policy_ids)
    return contents


@dataclass(frozen=True)
class Fetched:
    """Policies read from the directory for import: id → contents, or id → why it could not be read."""

    contents: Mapping[str, pb.StoreContents] = field(default_factory=dict)
    errors: Mapping[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ the sync


@dataclass(frozen=True)
class FullRead:
    """A full read: the topology (connector.read_topology) and the subnets (connector.read_subnets: prefix →
    site name; empty without a sites base)."""

    topology: assign_pb.Topology
    subnets: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ComputerChanges:
    """An incremental read: the computers the directory changed, mapped as a full read maps them (OU decided
    against the owned snapshot); everything else is as the owned snapshot has it."""

    computers: tuple[Computer, ...]
    entries: int  # changed directory entries behind them


@dataclass(frozen=True)
class ApplyOutcome:
    mutations: int
    changed_computers: frozenset[str]
    problems: tuple[str, ...]
    owned: Topology


class DirectorySync:
    """The directory side (one ldap3 connection, used from one worker thread) and the registry side
    (called in the server's store thread) of the sync. Holds no asyncio state."""

    def __init__(
        self,
        settings: DirectorySettings,
        data_dir: Path,
        topology_store: Any,  # ObservedTopologyStore: write_and_report, snapshot
        policy_store: PolicyStore,
        *,
        read_policies: Callable[[Any, str, list[str]], pb.StoreContents] = read_directory_policies,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        address_of: AddressOf = lambda _name: "",
    ) -> None:
        self.settings = settings
        self.path = data_dir / OWNED_FILE
        self._topology_store = topology_store
        self._policy_store = policy_store
        self._read_policies = read_policies
        self._clock_ms = clock_ms
        self._conn: Any = None
        self._writer: Any = None  # a second, writable connection, opened for the first publish
        self._password = ""
        self.marker_kind: ChangeMarkerKind = "none"
        self.marker = ""  # the last marker whose read was applied ("" = read next time)
        self._checks = 0
        self.state = OwnedState(url=settings.url, base_dn=settings.base_dn)
        self.owned: frozenset[OwnedKey] = frozenset()
        # How the reads that reached apply were made (status, tests, bench): "full" or "incremental".
        self.reads: dict[ReadKind, int] = {"full": 0, "incremental": 0}
        self.last_read_kind: ReadKind | Literal[""] = ""
        self.problems: tuple[str, ...] = ()  # of the last apply (an incremental one keeps the full read's)
        # Where a computer's agent last connected from (store thread; the server asks its fleet records), and
        # the subnets of the last full read applied by this process (None: none yet — sites are left alone).
        self._address_of = address_of
        self.subnets: Subnets | None = None

    @property
    def policy_store(self) -> PolicyStore:
        return self._policy_store

    @property
    def topology_store(self) -> Any:
        return self._topology_store

    # ------------------------------------------------------------ owned snapshot (store thread)

    def load(self) -> OwnedState:
        state = load_owned(self.path)
        if state.url and (state.url, state.base_dn.casefold()) != (self.settings.url, self.settings.base_dn.casefold()):
            _log.warning(
                "the owned snapshot is from another directory; the first read replaces it",
                extra={"snapshot_url": state.url, "snapshot_base": state.base_dn},
            )
        self.state = dataclasses.replace(state, url=self.settings.url, base_dn=self.settings.base_dn)
        self.owned = keys_of(state.topology)
        return self.state

    def save(self) -> None:
        save_owned(self.path, self.state)

    # ------------------------------------------------------------ directory side (LDAP thread)

    def _connection(self) -> Any:
        if self._conn is None:
            config = self.settings.connector_config()
            self._password = config.password
            self._conn = connect(config, read_only=True)
            # A new connection may reach another DC (AD's USNs are per DC) or a restored server: the
            # old marker proves nothing, so the first check reads everything (an unchanged read writes nothing).
            self.marker = ""
        return self._conn

    def disconnect(self) -> None:
        for attribute in ("_conn", "_writer"):
            conn = getattr(self, attribute)
            setattr(self, attribute, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.unbind()

    def _write_connection(self) -> Any:
        # Kept apart from the sync's read-only connection, so a bug in the sync can never write.
        if self._writer is None:
            config = self.settings.connector_config()
            self._password = config.password
            self._writer = connect(config, read_only=False)
        return self._writer

    def _writing(self, fn: Callable[[Any], T]) -> T:
        try:
            return fn(self._write_connection())
        except DIRECTORY_ERRORS:
            self.disconnect()  # the next call reconnects
            raise

    def secrets(self) -> tuple[str, ...]:
        return (self._password,) if self._password else ()

    def read_directory(self, full: bool = False) -> tuple[str, FullRead | ComputerChanges | None]:
        """(the current change marker, what changed since the applied marker): a full read (the topology and,
        with a sites base, the subnets), the changed computers (ComputerChanges: an incremental read, see
        _incremental), or None when nothing changed.

        Raises DirectoryError / ldap3 errors / OSError; the connection is dropped first, so the
        next call reconnects.
        """
        try:
            conn = self._connection()
            self.marker_kind, marker = change_marker(conn, self.settings.base_dn)
            self._checks += 1
            due = full or not self.marker or self.marker_kind == "none" or self._checks % self.settings.full_every == 0
            if not due and marker == self.marker:
                return marker, None
            if not due:
                changed = self._changed_dns(conn)
                if changed == [] and self.marker_kind == "highestCommittedUSN":
                    return marker, None  # writes elsewhere on the DC (AD hides deletions: the periodic full read)
                if changed:  # [] on OpenLDAP: the marker moved and no entry shows it, so something was deleted
                    changes = self._incremental(conn, changed)
                    if changes is not None:
                        self._read("incremental")
                        return marker, changes
            sites_base = self.settings.sites_base
            topology = read_topology(conn, self.settings.base_dn, sites_base=sites_base)
            subnets = read_subnets(conn, sites_base) if sites_base else {}
            self._read("full")
            return marker, FullRead(topology, subnets)
        except BaseException:
            self.disconnect()
            raise

    def _read(self, kind: ReadKind) -> None:
        self.reads[kind] += 1
        self.last_read_kind = kind

    def _changed_dns(self, conn: Any) -> list[str] | None:
        """The DNs under the base changed since the applied marker (adds, modifies, moves; never deletions);
        None when the marker cannot say."""
        if self.marker_kind == "contextCSN":
            return changes_since(conn, self.settings.base_dn, self.marker)[1]
        if self.marker_kind == "highestCommittedUSN":
            try:
                old = int(self.marker)
            except ValueError:
                return None
            return usn_changed_dns(conn, self.settings.base_dn, old) if old > 0 else None
        return None

    def _incremental(self, conn: Any, changed: list[str]) -> ComputerChanges | None:
        """The changed computers, re-read one by one, when they are all that changed; None = read everything.

        Taken only when every changed DN is a computer object (a moved one shows up under its new DN), or
        a group whose name and description the owned snapshot already has (a membership change: its
        members and the computers that had it are re-read). A computer's OU is its parent when that is an
        OU the snapshot owns, "" when the parent is no OU (CN=Computers); an OU the snapshot does not know
        means it changed too. A name the snapshot does not own is an add when the object was created after
        the applied marker (created_after), or else when every owned computer is still in the directory
        (one listing of names; if one is missing, something was renamed or deleted); no name may be carried
        by two computer objects. Anything else — OUs, GPOs, pointer objects, gPLinks, other objects, a deletion,
        more than MAX_INCREMENTAL entries, a domain the snapshot has nothing in — falls back to a full read.
        """
        owned = self.state.topology
        base = self.settings.base_dn
        if (not owned.computers and not owned.ous) or len(changed) > MAX_INCREMENTAL:
            return None
        reads: dict[str, ComputerRead] = {}  # by DN key, in the order read
        created = {"highestCommittedUSN": "uSNCreated", "contextCSN": "createTimestamp"}.get(self.marker_kind, "")
        first = read_computers(conn, base, changed, created=created)
        first_keys = {dn_key(dn) for dn in first}
        direct: set[str] = set()  # changed computer entries (the others were re-read for a group)
        for dn, read in first.items():
            if read is not None:
                reads[dn_key(dn)] = read
                direct.add(dn_key(dn))
                continue
            group = read_group(conn, dn)
            if group is None:
                return None  # not a computer or a group, or gone again
            known = owned.group(group.name)
            if known is None or (known.name, known.description) != (group.name, group.description[:MAX_DESCRIPTION]):
                return None  # a new or renamed group, or another description: a full read maps it
            members = [m for m in group.members
                       if dn_key(m) not in reads and dn_key(m) not in first_keys and dn_within(m, base)]
            if len(reads) + len(members) > MAX_INCREMENTAL:
                return None
            for member_dn, member in read_computers(conn, base, members, created=created).items():
                if member is not None:  # members that are not computers (users, groups) are not read
                    reads[dn_key(member_dn)] = member
            key = key_of(group.name)
            names = {r.name for r in reads.values()}
            holders = [c.name for c in owned.computers.values()
                       if c.name not in names and any(key_of(g) == key for g in c.groups)]
            if len(reads) + len(holders) > MAX_INCREMENTAL:
                return None
            for name in holders:  # left the group: re-read it where it is now
                dns = find_computers(conn, base, name)
                if len(dns) != 1:
                    return None  # renamed or deleted meanwhile, or a name clash
                holder = read_computers(conn, base, dns, created=created)[dns[0]]
                if holder is None:
                    return None
                reads[dn_key(dns[0])] = holder
        if len({r.name for r in reads.values()}) != len(reads):
            return None  # two objects with one name: read_topology decides which one counts
        domain = domain_of(base)
        if not any(canonical_domain(c.domain) == domain for c in owned.computers.values()) and domain not in {
            o.parsed.domain for o in owned.ous.values()
        }:
            return None  # the domain's links wait for something in the domain: a full read decides
        counts: dict[str, int] | None = None
        computers: list[Computer] = []
        for key, read in reads.items():
            if key_of(read.name) in owned.computers or created_after(self.marker_kind, self.marker, read.created):
                # An owned name changed (a move, a group) or a new object: no other object may carry the name.
                if key in direct and len(find_computers(conn, base, read.name)) != 1:
                    return None
            else:
                # An object older than the applied read under a name it did not own: an add only if every
                # owned computer is still there (else a rename); one listing of names (~0.6 s at 10,000).
                if counts is None:
                    counts = computer_names(conn, base)
                if counts.get(read.name, 0) != 1 or any(counts.get(name, 0) < 1 for name in owned.computers):
                    return None
            ou = self._ou_of(read.parent, owned)
            if ou is None:
                return None
            computers.append(Computer(read.name, "domain", read.domain, ou, "", frozenset(read.groups)))
        return ComputerChanges(tuple(computers), len(changed))

    def _ou_of(self, parent: str, owned: Topology) -> str | None:
        """The OU a computer whose parent is `parent` is in: "" for a parent that is no OU; None for an OU
        the owned snapshot does not have (new, or skipped by the last read: a full read decides)."""
        try:
            dn = canonical_dn(parent)
        except ValidationError:
            return ""  # CN=Computers and the like (read_topology maps no OU here either)
        if dn_key(parent) == dn_key(self.settings.base_dn):
            return ""  # an O=/OU= suffix is the domain, not an OU (as read_topology has it)
        known = owned.ous.get(dn.casefold())
        return known.dn if known is not None else None

    def fetch_policies(self, policy_ids: list[str]) -> Fetched:
        """Read each missing policy from the directory on its own, so one bad policy spoils only its GPOs."""
        contents: dict[str, pb.StoreContents] = {}
        errors: dict[str, str] = {}
        for policy_id in policy_ids:
            try:
                contents[policy_id] = self._read_policies(self._connection(), self.settings.base_dn, [policy_id])
            except ImportError:
                errors[policy_id] = "importing policies from the directory is not available in this build"
            except (DirectoryError, LDAPException, OSError, TimeoutError):
                self.disconnect()  # the directory failed, not the policy: the whole sync is retried
                raise
            except Exception as exc:  # the library's DirectoryPolicyError: bad or missing objects
                errors[policy_id] = safe_error(exc, self.secrets())
        return Fetched(contents, errors)

    # ------------------------------------------------------------ policies (LDAP thread)
    # [MS-GPIPSEC] objects under CN=IP Security,CN=System,<base> (policyagent.directory.adstore). These raise
    # the library's DirectoryPolicyError (a policy the blobs cannot carry, corrupt directory data: nothing
    # written) or the directory's errors (DIRECTORY_ERRORS).

    def publish(self, contents: pb.StoreContents, policy_ids: list[str] | None) -> Any:
        """adstore.publish of the policies (None = all of `contents`); its PublishResult."""
        from policyagent.directory import adstore

        return self._writing(lambda conn: adstore.publish(conn, self.settings.base_dn, contents, policy_ids))

    def assign(self, gpo_id: str, contents: pb.StoreContents | None, policy_id: str) -> Any:
        """Publish the policy (so the GPO's pointer never names a missing object), then point the GPO at it;
        policy_id "" clears the GPO's assignment. The PublishResult (empty when clearing)."""
        from policyagent.directory import adstore

        def work(conn: Any) -> Any:
            if not policy_id or contents is None:
                adstore.assign_gpo(conn, self.settings.base_dn, gpo_id, None)
                return adstore.PublishResult()
            result = adstore.publish(conn, self.settings.base_dn, contents, [policy_id])
            policy = next(p for p in contents.policies if p.id == policy_id)
            adstore.assign_gpo(conn, self.settings.base_dn, gpo_id, policy)
            return result

        return self._writing(work)

    def read_for_import(self, refs: list[str]) -> pb.StoreContents:
        """The policies `refs` name (ids or names as in the directory; [] = all) with what they use."""
        from policyagent.directory import adstore

        try:
            entries = adstore.read_entries(self._connection(), self.settings.base_dn)
        except DIRECTORY_ERRORS:
            self.disconnect()
            raise
        ids = adstore.select_policies(entries, refs) if refs else None
        contents: pb.StoreContents = adstore.contents_from_entries(entries, ids)
        return contents

    def republish(self, contents: pb.StoreContents, policy_ids: list[str]) -> dict[str, Exception | Any]:
        """Publish each of `policy_ids` that the directory already holds, one at a time (one policy the blobs
        cannot carry spoils only itself): id → PublishResult or the exception. Policies not in the directory
        are left out. A directory failure ends the round (the rest would fail too) and is raised."""
        from policyagent.directory import adstore

        present = self._writing(lambda conn: adstore.published_policy_ids(conn, self.settings.base_dn, policy_ids))
        out: dict[str, Exception | Any] = {}
        for policy_id in present:
            try:
                out[policy_id] = self.publish(contents, [policy_id])
            except adstore.DirectoryPolicyError as exc:
                out[policy_id] = exc
        return out

    # ------------------------------------------------------------ registry side (store thread)

    def missing_policies(self, read: FullRead) -> list[str]:
        """Policy ids the directory's GPOs assign that the policy store does not hold."""
        wanted = sorted({g.policy_id for g in read.topology.gpos if g.policy_id})
        return [p for p in wanted if self._policy_store.get(Kind.POLICY, p) is None]

    def _import(self, policy_id: str, contents: pb.StoreContents, gpo_names: str) -> str:
        """Import one policy (all or nothing); "" on success, else why not."""
        if not any(p.id.upper() == policy_id.upper() for p in contents.policies):
            return f"the directory's answer does not hold policy {policy_id}"
        try:
            self._policy_store.write(
                import_plan(export_file(contents)),
                principal=PRINCIPAL,
                context=f"import IPsec policy {policy_id} from the directory (GPO {gpo_names})",
            )
        except PolicyError as exc:
            return str(exc)
        return ""

    def apply(self, read: FullRead, fetched: Fetched | None = None) -> ApplyOutcome:
        """Import missing policies, place each computer in the site its agent's address is in, diff the read
        against the registry, write once, persist the owned snapshot."""
        fetched = fetched or Fetched()
        directory, problems = topology_from_proto(read.topology)
        subnets = Subnets(read.subnets)
        problems += [f"skipped the subnet {why}" for why in subnets.skipped]
        directory = with_sites(directory, subnets, self._address_of)
        if not directory.computers and not directory.ous and not directory.gpos and (
            self.state.topology.computers or self.state.topology.ous or self.state.topology.gpos
        ):
            # An empty answer for a non-empty domain is far likelier a bind without read rights (or a
            # wrong base) than a domain emptied at once: refuse to delete everything.
            raise DirectoryError(
                f"the directory returned no computers, OUs or GPOs under {self.settings.base_dn}; "
                f"not deleting the {len(self.state.topology.computers)} computer(s) it owns "
                "(check the base DN and the bind's read rights)"
            )
        gpo_policies: dict[str, str] = {}
        failed: dict[str, str] = {}
        for policy_id in sorted({g.policy_id for g in directory.gpos.values() if g.policy_id}):
            users = ", ".join(f'"{g.name}"' for g in directory.gpos.values() if g.policy_id == policy_id)
            if self._policy_store.get(Kind.POLICY, policy_id) is not None:
                continue
            reason = fetched.errors.get(policy_id, "")
            if not reason and policy_id in fetched.contents:
                reason = self._import(policy_id, fetched.contents[policy_id], users)
                if not reason:
                    _log.info("imported an IPsec policy from the directory", extra={"policy": policy_id, "gpos": users})
                    continue
            failed[policy_id] = reason or "it was not read from the directory"
        for gpo in directory.gpos.values():
            if gpo.policy_id in failed:
                problems.append(
                    f'GPO "{gpo.name}": its IPsec policy {gpo.policy_id} could not be imported, so it assigns none: '
                    f"{failed[gpo.policy_id]}"
                )
                gpo_policies[gpo.id] = ""
        if gpo_policies:
            directory = dataclasses.replace(
                directory,
                gpos={k: dataclasses.replace(g, policy_id=gpo_policies.get(k, g.policy_id))
                      for k, g in directory.gpos.items()},
            )
        registry, _revision = self._topology_store.snapshot()
        plan = plan_sync(directory, self.owned, registry)
        outcome = self._commit(plan, keys_of(plan.owned), (*problems, *plan.problems))
        self.subnets = subnets
        return outcome

    def _placed(self, computer: Computer) -> Computer:
        """The computer in the site its agent's address is in, by the last full read's subnets; before the
        first one, in the site the owned snapshot has it in."""
        if self.subnets is None:
            known = self.state.topology.computer(computer.name)
            site = known.site if known is not None else ""
            return computer if site == computer.site else dataclasses.replace(computer, site=site)
        return placed(computer, self.subnets, self._address_of)

    def apply_changes(self, changes: ComputerChanges) -> ApplyOutcome:
        """Apply an incremental read (store thread): diff only the changed computers against the registry,
        write once, persist the owned snapshot. The last full read's problems stay, but for these computers."""
        computers = [self._placed(c) for c in changes.computers]
        plan, given_up = plan_computers(computers, self.state.topology, self._topology_store.get_computer)
        names = [f'computer "{c.name.strip()}"' for c in changes.computers]
        kept = tuple(p for p in self.problems if not any(n in p for n in names))
        new_keys = frozenset((COMPUTER, key_of(c.name)) for c in changes.computers) - given_up
        owned = (self.owned - given_up) | new_keys
        return self._commit(plan, owned, (*kept, *plan.problems))

    def apply_addresses(self, names: Iterable[str]) -> ApplyOutcome | None:
        """Agents of these computers connected from a new address (store thread): re-decide the site of each
        one the directory owns from the address it has now, and write those whose site moved (one write,
        principal "directory"). None when no site moved, or before this process applied a full read (no
        subnets known yet: that read places every computer). Reads nothing from the directory."""
        subnets = self.subnets
        if subnets is None:
            return None
        owned = self.state.topology
        moved: list[Computer] = []
        for name in sorted(set(names)):
            current = owned.computer(name)
            if current is not None and (new := placed(current, subnets, self._address_of)) is not current:
                moved.append(new)
        if not moved:
            return None
        plan, given_up = plan_computers(moved, owned, self._topology_store.get_computer)
        problems = tuple(dict.fromkeys((*self.problems, *plan.problems)))
        return self._commit(plan, self.owned - given_up, problems,
                            context="the site of the address its agent connects from")

    def _commit(
        self, plan: SyncPlan, owned: frozenset[OwnedKey], problems: tuple[str, ...], *, context: str = ""
    ) -> ApplyOutcome:
        """Write the plan's mutations and persist what the directory owns now (`owned`: plan.owned's keys).

        The snapshot is written once per applied change, before the registry write, holding what is owned
        before and after (a crash after the write must not leave directory objects in the registry that
        nobody owns); only when the write gives up owned objects is it written again after, without them.
        An unchanged read writes nothing (last_sync_unix_ms is saved at the next write or at shutdown).
        With a `context` (not a directory read: a site that moved with its agent's address, apply_addresses)
        the sync and change times stay as they are.
        """
        read = not context
        now = self._clock_ms() if read else self.state.last_sync_unix_ms
        changed: frozenset[str] = frozenset()
        after = dataclasses.replace(
            self.state,
            topology=plan.owned,
            last_sync_unix_ms=now,
            last_change_unix_ms=now if plan.mutations and read else self.state.last_change_unix_ms,
        )
        shrinks = not self.owned <= owned
        if plan.mutations:
            previous = self.state
            union = _union(previous.topology, plan.owned) if shrinks else plan.owned
            self.state, self.owned = dataclasses.replace(after, topology=union), self.owned | owned
            self.save()
            try:
                _result, changed = self._topology_store.write_and_report(
                    list(plan.mutations), principal=PRINCIPAL,
                    context=context or f"directory sync from {self.settings.url}",
                )
            except BaseException:
                self.state = dataclasses.replace(self.state, last_sync_unix_ms=previous.last_sync_unix_ms,
                                                 last_change_unix_ms=previous.last_change_unix_ms)
                raise
            self.state, self.owned = after, owned
            if shrinks:
                self.save()
        else:
            moved = not same_topology(plan.owned, self.state.topology)
            self.state, self.owned = after, owned
            if moved:
                self.save()
        self.problems = problems
        return ApplyOutcome(len(plan.mutations), changed, problems, plan.owned)

    def checked(self, now_ms: int) -> None:
        """The directory answered and nothing changed: the registry matches it as of now."""
        self.state = dataclasses.replace(self.state, last_sync_unix_ms=now_ms)

    def check_local_write(self, mutations: Iterable[TopologyMutation]) -> None:
        """ProtectedError if a local registry write touches an object the directory owns (store thread)."""
        owned = self.owned
        if not owned:
            return
        check_local_write(mutations, owned, lambda: self._topology_store.snapshot()[0], self.settings.url)

    def owns_computer(self, name: str) -> bool:
        return (COMPUTER, key_of(name)) in self.owned

    def owns_gpo(self, gpo_id: str) -> bool:
        return (GPO, gpo_id) in self.owned


def _union(a: Topology, b: Topology) -> Topology:
    links = {owned_key(lk): lk for lk in a.links}
    links.update({owned_key(lk): lk for lk in b.links})
    return Topology(
        computers={**a.computers, **b.computers},
        ous={**a.ous, **b.ous},
        sites={**a.sites, **b.sites},
        groups={**a.groups, **b.groups},
        gpos={**a.gpos, **b.gpos},
        links=tuple(links.values()),
    )


__all__ = [
    "DIRECTORY_ERRORS",
    "OWNED_FILE",
    "ApplyOutcome",
    "ComputerChanges",
    "DirectorySettings",
    "DirectorySync",
    "Fetched",
    "FullRead",
    "OwnedState",
    "Subnets",
    "SyncPlan",
    "check_local_write",
    "created_after",
    "load_owned",
    "plan_computers",
    "plan_sync",
    "read_password",
    "safe_error",
    "same_topology",
    "save_owned",
    "with_sites",
]
