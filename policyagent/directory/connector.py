"""Read the Group Policy topology from an LDAP directory (Active Directory or OpenLDAP) with ldap3.

    conn = connect(DirectoryConfig("ldaps://dc1.corp.example", "DC=corp,DC=example", "simple",
                                   user="CN=svc,...", password="..."))
    topology = read_topology(conn, "DC=corp,DC=example")       # an assign_pb.Topology snapshot
    csn, dns = changes_since(conn, "DC=corp,DC=example", "")    # baseline (OpenLDAP)
    csn, dns = changes_since(conn, "DC=corp,DC=example", csn)   # the DNs changed since then

What is read (paged searches, RFC 2696, throughout — AD and the test slapd cap unpaged results at 1000):

* computers (objectClass=computer): name = sAMAccountName without the trailing "$" (else cn), lower-case;
  domain = the DNS suffix of dNSHostName (else the base DN's DC= components); ou = the parent DN when the
  parent is an OU (else "" — e.g. CN=Computers); groups from memberOf and from the groups' member lists.
* OUs (objectClass=organizationalUnit): canonical DN, block inheritance = gPOptions bit 1, description.
* sites (objectClass=site) under `sites_base` (AD: CN=Sites,CN=Configuration,...) when given, and
  (`read_subnets`) the subnet objects under `CN=Subnets,<sites_base>`: cn = the prefix ("10.1.0.0/16",
  "2001:db8:1::/48"), siteObject = the DN of its site. A computer's site is not stored on the computer:
  the sync decides it from the address its agent connects from (policyagent.directory.sync.Subnets).
* groups (objectClass=group or groupOfNames): name = sAMAccountName, else cn.
* GPOs (groupPolicyContainer under CN=Policies,CN=System,<base>): id = the GUID of cn in the project's
  "{UPPER-CASE}" form, name = displayName (else the GUID), enabled = computer settings not disabled
  (flags bit 2, 0x2), and (`read_gpos`) whether gPCMachineExtensionNames carries the IPsec client-side
  extension {E437BC1C-AA7D-11D2-A382-00C04F991E27}.
* links from the gPLink of the domain (base DN), each OU and each site.

gPLink syntax: "[LDAP://cn={GUID},cn=policies,cn=system,DC=...;F][LDAP://...;F]...", F a bit set:
1 = link disabled, 2 = enforced. Link order: the attribute lists links from the LOWEST precedence to the
HIGHEST — a newly linked GPO is prepended and gets the highest link order number, and Group Policy applies
the listed links left to right, so the LAST one listed is applied last and wins: it is link order 1 (the
model's "order 1 = highest precedence, applied last"). A gPLink that does not parse, or a link to a GPO
that is not in the directory, is skipped with a warning (logger `policyagent.directory.connector`) naming
the DN; nothing raises for bad directory data. A failed search (refused, size limit, server gone) raises
DirectoryError rather than return a partial topology.

Change detection: OpenLDAP (syncprov overlay) keeps contextCSN on the suffix and entryCSN on every entry;
`changes_since` returns the suffix's current contextCSN and the DNs whose entryCSN is newer than the given
one (adds, modifies and renames/moves — a moved entry's entryCSN changes). Deletions leave no entry behind:
notice them by comparing a re-read (or use syncrepl refreshAndPersist). With several providers contextCSN
has one value per server ID; this takes the largest, which is right for a single provider.
On Active Directory, uSNChanged plays this role (`changes_since_usn`: highestCommittedUSN of the rootDSE
of the DC you stay bound to — USNs are per DC).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
import ssl
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from policyagent.model.assignment import canonical_computer_name, canonical_dn
from policyagent.model.errors import ValidationError
from policyagent.pb import assign_pb

with warnings.catch_warnings():  # ldap3 2.9.1 imports names pyasn1 has deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.core.exceptions import LDAPInvalidDnError
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import parse_dn as ldap_parse_dn

log = logging.getLogger(__name__)

IPSEC_CSE_GUID = "{E437BC1C-AA7D-11D2-A382-00C04F991E27}"
GPLINK_DISABLED = 1
GPLINK_ENFORCED = 2
GPOPTIONS_BLOCK_INHERITANCE = 1
GPO_FLAG_USER_DISABLED = 1
GPO_FLAG_COMPUTER_DISABLED = 2

_SUCCESS = 0
_NO_SUCH_OBJECT = 32

Bind = Literal["simple", "external", "gssapi"]

_GPLINK_ENTRY = re.compile(r"\[LDAP://([^;\]]+);\s*(\d+)\s*\]", re.IGNORECASE)
_GUID_IN_DN = re.compile(r"^\s*cn\s*=\s*(\{[0-9A-Fa-f-]{36}\})", re.IGNORECASE)


class DirectoryError(Exception):
    """A search failed (access denied, size limit, server down ...): the read is incomplete."""


@dataclass(frozen=True)
class DirectoryConfig:
    """How to reach and bind to the directory.

    bind "simple": user (a DN or user@domain) and password, over ldaps:// or ldap:// with starttls
    (plain ldap:// without starttls only for tests); "external": SASL EXTERNAL (ldapi:// peer
    credentials or a TLS client certificate); "gssapi": SASL GSSAPI with the process's Kerberos
    credentials (needs the `gssapi` package; KRB5CCNAME/KRB5_CONFIG as usual). ca_file verifies the
    server certificate; tls_name is the server's name when the URL gives an address — what its
    certificate must carry, and the host of the Kerberos service principal ldap/<name>.
    """

    url: str
    base_dn: str
    bind: Bind = "simple"
    user: str = ""
    password: str = field(default="", repr=False)
    ca_file: str | None = None
    tls_name: str | None = None  # the name the server's certificate must carry (default: the URL's host)
    starttls: bool = False
    page_size: int = 500
    timeout: int = 10  # seconds


def connect(config: DirectoryConfig, *, read_only: bool = True) -> Any:
    """A bound ldap3.Connection (raises ldap3's LDAPException on failure); read_only=False to publish."""
    tls = None
    if config.ca_file is not None or config.url.lower().startswith("ldaps://") or config.starttls:
        tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=config.ca_file,
            valid_names=[config.tls_name] if config.tls_name else None,
            version=ssl.PROTOCOL_TLS_CLIENT,
        )
    server = ldap3.Server(config.url, tls=tls, connect_timeout=config.timeout, get_info=ldap3.SCHEMA)
    auto_bind = ldap3.AUTO_BIND_TLS_BEFORE_BIND if config.starttls else ldap3.AUTO_BIND_NO_TLS
    common: dict[str, Any] = {"auto_bind": auto_bind, "receive_timeout": config.timeout, "read_only": read_only}
    if config.bind == "simple":
        return ldap3.Connection(server, config.user, config.password, authentication=ldap3.SIMPLE, **common)
    if config.bind == "external":
        return ldap3.Connection(
            server, authentication=ldap3.SASL, sasl_mechanism=ldap3.EXTERNAL, sasl_credentials="", **common
        )
    if config.bind == "gssapi":
        # The service ticket is for ldap/<the server's name>: tls_name when the URL gives an address.
        host = (config.tls_name or "").lower() or None
        return ldap3.Connection(
            server, authentication=ldap3.SASL, sasl_mechanism=ldap3.KERBEROS,
            sasl_credentials=(host,) if host else None, **common,
        )
    raise ValueError(f"unknown bind {config.bind!r}: use simple, external or gssapi")


# ------------------------------------------------------------------ helpers


def _paged(
    conn: Any, base: str, search_filter: str, attributes: list[str], *, page_size: int = 500, scope: str = "SUBTREE"
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(dn, attributes) of every entry found, page by page; a missing base yields nothing."""
    ldap_scope = {"SUBTREE": ldap3.SUBTREE, "LEVEL": ldap3.LEVEL, "BASE": ldap3.BASE}[scope]
    try:
        for item in conn.extend.standard.paged_search(
            base, search_filter, search_scope=ldap_scope, attributes=attributes, paged_size=page_size, generator=True
        ):
            if item.get("type") == "searchResEntry":
                yield item["dn"], item.get("attributes", {})
    except ldap3.core.exceptions.LDAPNoSuchObjectResult:
        return
    except ldap3.core.exceptions.LDAPOperationResult as exc:
        raise DirectoryError(f"search {search_filter} under {base}: {exc}") from exc
    # Without raise_exceptions ldap3 just stops: a partial read must not pass for the whole directory.
    result = conn.result or {}
    if result.get("result") not in (None, _SUCCESS, _NO_SUCH_OBJECT):
        raise DirectoryError(
            f"search {search_filter} under {base}: {result.get('description')} {result.get('message', '')}".rstrip()
        )


def _values(attrs: Mapping[str, Any], name: str) -> list[str]:
    value = attrs.get(name)
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in items if v is not None]


def _first(attrs: Mapping[str, Any], name: str) -> str:
    values = _values(attrs, name)
    return values[0] if values else ""


def _int(attrs: Mapping[str, Any], name: str) -> int:
    text = _first(attrs, name).strip()
    try:
        return int(text) if text else 0
    except ValueError:
        return 0


# A DN without escapes, quotes, multi-valued RDNs or hex values: split it directly. ldap3's full parser
# costs about 40 µs a DN, a third of a 10,000-computer read (bench/directory.py).
_PLAIN_DN = re.compile(r'^[^\\"+#;<>=,]+=[^\\"+#;<>=,]+(?:,[^\\"+#;<>=,]+=[^\\"+#;<>=,]+)*$')


def _rdns(dn: str) -> list[tuple[str, str]]:
    if _PLAIN_DN.match(dn):
        return [(a.strip(), v.strip()) for a, _eq, v in (part.partition("=") for part in dn.split(","))]
    return [(attr, value) for attr, value, _sep in ldap_parse_dn(dn)]


def _group_name_from_dn(dn: str) -> str:
    """A group's name when only its DN is known: its first RDN's value (the DN itself if unparsable)."""
    try:
        return _rdns(dn)[0][1]
    except (LDAPInvalidDnError, IndexError):
        return dn


def _parent(dn: str) -> str:
    try:
        return ",".join(f"{a}={v}" for a, v in _rdns(dn)[1:])
    except LDAPInvalidDnError:
        return ""


def dn_key(dn: str) -> str:
    """A DN compared as the directory compares it: attribute names and values case-insensitive, no spaces."""
    try:
        return ",".join(f"{a.strip().lower()}={v.strip().lower()}" for a, v in _rdns(dn))
    except LDAPInvalidDnError:  # an unparsable DN only fails to match
        return dn.strip().lower()


def domain_of(base_dn: str) -> str:
    """The DNS name of the DC= components of a DN (DC=corp,DC=example → corp.example)."""
    return ".".join(v.lower() for a, v in _rdns(base_dn) if a.lower() == "dc")


def normalize_guid(text: str) -> str:
    """A GPO GUID in the project's form: braces, upper case."""
    return "{" + str(uuid.UUID(text.strip().strip("{}"))).upper() + "}"


@dataclass(frozen=True)
class ParsedLink:
    gpo_id: str  # "{GUID}"
    gpo_dn: str
    order: int  # 1 = highest precedence (the last listed)
    enforced: bool
    enabled: bool


def parse_gplink(value: str) -> list[ParsedLink]:
    """Parse a gPLink value; raises ValueError when it is not a sequence of [LDAP://DN;FLAGS]."""
    text = value.strip()
    entries: list[tuple[str, str, int]] = []
    pos = 0
    for match in _GPLINK_ENTRY.finditer(text):
        if text[pos : match.start()].strip():
            raise ValueError(f"unexpected text {text[pos:match.start()]!r}")
        pos = match.end()
        dn, flags = match.group(1).strip(), int(match.group(2))
        guid = _GUID_IN_DN.match(dn)
        if guid is None:
            raise ValueError(f"{dn!r} does not name a GPO as cn={{GUID}}")
        try:
            entries.append((normalize_guid(guid.group(1)), dn, flags))
        except ValueError:
            raise ValueError(f"{guid.group(1)!r} is not a GUID") from None
    if text[pos:].strip():
        raise ValueError(f"unexpected text {text[pos:]!r}")
    n = len(entries)
    return [
        ParsedLink(gid, dn, n - i, bool(flags & GPLINK_ENFORCED), not flags & GPLINK_DISABLED)
        for i, (gid, dn, flags) in enumerate(entries)
    ]


def _links_of(dn: str, attrs: Mapping[str, Any], scope: str, gpo_ids: set[str]) -> list[assign_pb.GpoLink]:
    raw = _first(attrs, "gPLink")
    if not raw.strip():
        return []
    try:
        parsed = parse_gplink(raw)
    except ValueError as exc:
        log.warning("skipping the gPLink of %s: %s (value %r)", dn, exc, raw)
        return []
    out: list[assign_pb.GpoLink] = []
    for link in parsed:
        if link.gpo_id not in gpo_ids:
            log.warning("skipping a link of %s to %s: no such GPO in the directory", dn, link.gpo_id)
            continue
        out.append(
            assign_pb.GpoLink(
                gpo=link.gpo_id, scope=scope, order=link.order, enforced=link.enforced, enabled=link.enabled
            )
        )
    return out


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class DirectoryGpo:
    dn: str
    id: str
    name: str
    enabled: bool
    ipsec: bool  # gPCMachineExtensionNames carries the IPsec client-side extension
    flags: int


def read_gpos(conn: Any, base_dn: str, *, page_size: int = 500) -> list[DirectoryGpo]:
    """The groupPolicyContainers under CN=Policies,CN=System,<base_dn>, sorted by id."""
    out: dict[str, DirectoryGpo] = {}
    for dn, attrs in _paged(
        conn,
        f"CN=Policies,CN=System,{base_dn}",
        "(objectClass=groupPolicyContainer)",
        ["cn", "displayName", "gPCMachineExtensionNames", "flags"],
        page_size=page_size,
    ):
        try:
            gid = normalize_guid(_first(attrs, "cn"))
        except ValueError:
            log.warning("skipping the GPO %s: its cn is not a GUID", dn)
            continue
        flags = _int(attrs, "flags")
        extensions = " ".join(_values(attrs, "gPCMachineExtensionNames")).upper()
        out[gid] = DirectoryGpo(
            dn=dn,
            id=gid,
            name=_first(attrs, "displayName").strip() or gid,
            enabled=not flags & GPO_FLAG_COMPUTER_DISABLED,
            ipsec=IPSEC_CSE_GUID in extensions,
            flags=flags,
        )
    return [out[k] for k in sorted(out)]


_POLICY_REF = re.compile(r"^\s*cn\s*=\s*ipsecPolicy\s*(\{[0-9A-Fa-f-]{36}\})\s*,", re.IGNORECASE)
# CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,CN={GPO-GUID},CN=Policies,...: the GPO's RDN is the 5th.
_POINTER_PATH = ("ipsec", "windows", "microsoft", "machine")


def policy_id_of_reference(dn: str) -> str:
    """The "{GUID}" of `CN=ipsecPolicy{GUID},CN=IP Security,...` (upper case), "" if it names no policy."""
    found = _POLICY_REF.match(dn)
    if found is None:
        return ""
    try:
        return normalize_guid(found.group(1))
    except ValueError:
        return ""


def read_gpo_policies(conn: Any, base_dn: str, *, page_size: int = 500) -> dict[str, str]:
    """GPO id → the id of the IPsec policy it assigns ([MS-GPIPSEC] §2.2.2), from the pointer objects.

    Each GPO that assigns a policy holds `CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,CN={GPO},CN=Policies,
    CN=System,<base>` (objectClass ipsecPolicy) whose ipsecOwnersReference is the policy's DN,
    `CN=ipsecPolicy{GUID},CN=IP Security,CN=System,<base>`; its GUID is the policy id in the store's
    "{UPPER-CASE}" form. One subtree search finds every pointer; a pointer elsewhere, or one whose
    reference names no ipsecPolicy, is skipped with a warning.
    """
    out: dict[str, str] = {}
    for dn, attrs in _paged(
        conn,
        f"CN=Policies,CN=System,{base_dn}",
        "(objectClass=ipsecPolicy)",
        ["ipsecOwnersReference"],
        page_size=page_size,
    ):
        try:
            rdns = _rdns(dn)
        except LDAPInvalidDnError:
            continue
        if len(rdns) < 5 or tuple(v.strip().lower() for _a, v in rdns[:4]) != _POINTER_PATH:
            log.warning("skipping the ipsecPolicy %s: not a GPO's IPsec pointer object", dn)
            continue
        try:
            gpo_id = normalize_guid(rdns[4][1])
        except ValueError:
            log.warning("skipping the IPsec pointer %s: its GPO's cn is not a GUID", dn)
            continue
        refs = [policy_id_of_reference(v) for v in _values(attrs, "ipsecOwnersReference")]
        policy_id = next((r for r in refs if r), "")
        if not policy_id:
            if refs:
                log.warning("skipping the IPsec pointer %s: its ipsecOwnersReference names no ipsecPolicy", dn)
            continue
        out[gpo_id] = policy_id
    return out


def read_topology(
    conn: Any, base_dn: str, *, sites_base: str | None = None, page_size: int = 500
) -> assign_pb.Topology:
    """A snapshot of the directory's topology as an assign_pb.Topology (revision 0, sorted)."""
    domain = domain_of(base_dn)
    topology = assign_pb.Topology()

    gpos = read_gpos(conn, base_dn, page_size=page_size)
    gpo_ids = {g.id for g in gpos}
    assigned = read_gpo_policies(conn, base_dn, page_size=page_size)
    topology.gpos.extend(
        assign_pb.Gpo(id=g.id, name=g.name, enabled=g.enabled, policy_id=assigned.get(g.id, "")) for g in gpos
    )

    links: list[assign_pb.GpoLink] = []
    for dn, attrs in _paged(conn, base_dn, "(objectClass=*)", ["gPLink"], page_size=page_size, scope="BASE"):
        links += _links_of(dn, attrs, f"domain:{domain}", gpo_ids)

    ou_dns: dict[str, str] = {}  # DN key → canonical OU DN
    ous: list[assign_pb.OrganizationalUnit] = []
    for dn, attrs in _paged(
        conn, base_dn, "(objectClass=organizationalUnit)", ["gPLink", "gPOptions", "description"], page_size=page_size
    ):
        if dn_key(dn) == dn_key(base_dn):
            continue  # an O=/OU= suffix is the domain, not an OU
        try:
            canonical = canonical_dn(dn)
        except ValidationError as exc:
            log.warning("skipping the OU %s: %s", dn, exc)
            continue
        ou_dns[dn_key(dn)] = canonical
        ous.append(
            assign_pb.OrganizationalUnit(
                dn=canonical,
                block_inheritance=bool(_int(attrs, "gPOptions") & GPOPTIONS_BLOCK_INHERITANCE),
                description=_first(attrs, "description"),
            )
        )
        links += _links_of(dn, attrs, f"ou:{canonical}", gpo_ids)
    topology.ous.extend(sorted(ous, key=lambda o: o.dn.casefold()))

    if sites_base:
        sites: list[assign_pb.Site] = []
        for dn, attrs in _paged(conn, sites_base, "(objectClass=site)", ["cn", "gPLink", "description"],
                                page_size=page_size):
            name = _first(attrs, "cn")
            if not name:
                continue
            sites.append(assign_pb.Site(name=name, description=_first(attrs, "description")))
            links += _links_of(dn, attrs, f"site:{name}", gpo_ids)
        topology.sites.extend(sorted(sites, key=lambda s: s.name.casefold()))

    group_names: dict[str, str] = {}  # DN key → group name
    members: dict[str, set[str]] = {}  # member DN key → group names
    groups: dict[str, assign_pb.Group] = {}
    for dn, attrs in _paged(
        conn,
        base_dn,
        "(|(objectClass=group)(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))",
        ["cn", "sAMAccountName", "description", "member", "uniqueMember"],
        page_size=page_size,
    ):
        name = _first(attrs, "sAMAccountName") or _first(attrs, "cn")
        if not name:
            continue
        group_names[dn_key(dn)] = name
        groups.setdefault(name.casefold(), assign_pb.Group(name=name, description=_first(attrs, "description")))
        for member in _values(attrs, "member") + _values(attrs, "uniqueMember"):
            members.setdefault(dn_key(member), set()).add(name)
    topology.groups.extend(groups[k] for k in sorted(groups))

    computers: dict[str, assign_pb.Computer] = {}
    for dn, attrs in _paged(
        conn, base_dn, "(objectClass=computer)", ["cn", "sAMAccountName", "dNSHostName", "memberOf"],
        page_size=page_size,
    ):
        name = canonical_computer_name((_first(attrs, "sAMAccountName") or _first(attrs, "cn")).removesuffix("$"))
        if not name:
            log.warning("skipping the computer %s: no sAMAccountName or cn", dn)
            continue
        host = _first(attrs, "dNSHostName").strip().rstrip(".").lower()
        member_of = set(members.get(dn_key(dn), set()))
        for group_dn in _values(attrs, "memberOf"):
            known = group_names.get(dn_key(group_dn))
            member_of.add(known if known is not None else _group_name_from_dn(group_dn))
        if name in computers:
            log.warning("skipping the computer %s: the name %s is already taken", dn, name)
            continue
        computers[name] = assign_pb.Computer(
            name=name,
            membership="domain",
            # The account's place decides the domain (and so the domain-linked GPOs), not the DNS
            # suffix: AD allows a disjoint namespace (dNSHostName outside the domain's DNS name).
            domain=domain or (host.split(".", 1)[1] if "." in host else ""),
            ou=ou_dns.get(dn_key(_parent(dn)), ""),
            groups=sorted(member_of, key=str.casefold),
        )
    topology.computers.extend(computers[k] for k in sorted(computers))

    topology.links.extend(sorted(links, key=lambda lk: (lk.scope.casefold(), lk.order)))
    return topology


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_subnet(text: str) -> Network:
    """The network a subnet object's cn names: ADDRESS/LENGTH, IPv4 or IPv6, no host bits set (as AD
    itself refuses them). ValueError saying what is wrong otherwise."""
    value = text.strip()
    if "/" not in value:
        raise ValueError(f"{value!r} is not a prefix (ADDRESS/LENGTH)")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a subnet prefix: {exc}") from None


def read_subnets(conn: Any, sites_base: str, *, page_size: int = 500) -> dict[str, str]:
    """Subnet prefix (ipaddress' canonical text) → the name of its site (the cn of the siteObject DN), from the
    subnet objects under `CN=Subnets,<sites_base>` (paged; none when that container is missing).

    A cn that is no prefix, a siteObject that is no DN, or a second object with the same prefix (taken in DN
    order) is skipped with a warning naming the DN; a subnet with no siteObject decides no site and is left out.
    """
    found = sorted(
        _paged(conn, f"CN=Subnets,{sites_base}", "(objectClass=subnet)", ["cn", "siteObject"], page_size=page_size),
        key=lambda item: dn_key(item[0]),
    )
    out: dict[str, str] = {}
    for dn, attrs in found:
        try:
            network = parse_subnet(_first(attrs, "cn"))
        except ValueError as exc:
            log.warning("skipping the subnet %s: %s", dn, exc)
            continue
        site_dn = _first(attrs, "siteObject").strip()
        if not site_dn:
            continue
        try:
            site = _rdns(site_dn)[0][1].strip()
        except (LDAPInvalidDnError, IndexError):
            site = ""
        if not site:
            log.warning("skipping the subnet %s: its siteObject %r is not a site's DN", dn, site_dn)
            continue
        key = str(network)
        if key in out:
            log.warning("skipping the subnet %s: another subnet object already has the prefix %s", dn, key)
            continue
        out[key] = site
    return out


# ------------------------------------------------------------------ change detection


def context_csn(conn: Any, base_dn: str) -> str:
    """The suffix's contextCSN (the largest, with several providers); "" without syncprov."""
    if not conn.search(base_dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["contextCSN"]):
        return ""
    values = [str(v) for v in _values(conn.response[0].get("attributes", {}), "contextCSN")]
    return max(values) if values else ""


def changes_since(conn: Any, base_dn: str, csn: str, *, page_size: int = 500) -> tuple[str, list[str]]:
    """OpenLDAP: (the current contextCSN, the DNs of entries added/modified/moved after `csn`, sorted).

    csn "" = a baseline: the current contextCSN and no DNs. Pass the returned CSN next time. Entries
    changed while this runs may be reported twice (harmless), never missed: the CSN is read first.
    """
    new_csn = context_csn(conn, base_dn)
    if not csn:
        return new_csn, []
    value = escape_filter_chars(csn)
    dns = [
        dn
        for dn, _attrs in _paged(
            conn, base_dn, f"(&(entryCSN>={value})(!(entryCSN={value})))", ["1.1"], page_size=page_size
        )
    ]
    return new_csn or csn, sorted(dns, key=str.casefold)


ChangeMarkerKind = Literal["contextCSN", "highestCommittedUSN", "none"]


def change_marker(conn: Any, base_dn: str) -> tuple[ChangeMarkerKind, str]:
    """The cheapest "did anything change?" value this server offers, and its kind.

    Active Directory: the rootDSE's highestCommittedUSN (per DC). OpenLDAP with syncprov: the
    suffix's contextCSN. Neither: ("none", "") — the caller re-reads every time. Raises
    DirectoryError when the server does not answer the base search.
    """
    # "*" / "+" rather than the names: ldap3 checks requested names against the schema it read, and
    # neither rootDSE attributes (AD's highestCommittedUSN) nor contextCSN need to be in it.
    every = [ldap3.ALL_ATTRIBUTES, ldap3.ALL_OPERATIONAL_ATTRIBUTES]
    if not conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=every):
        result = conn.result or {}
        raise DirectoryError(f"reading the rootDSE: {result.get('description')} {result.get('message', '')}".rstrip())
    usn = _first(conn.response[0].get("attributes", {}), "highestCommittedUSN").strip()
    if usn:
        return "highestCommittedUSN", usn
    if not conn.search(base_dn, "(objectClass=*)", search_scope=ldap3.BASE,
                       attributes=[ldap3.ALL_OPERATIONAL_ATTRIBUTES]):
        result = conn.result or {}
        raise DirectoryError(
            f"reading {base_dn}: {result.get('description')} {result.get('message', '')}".rstrip()
        )
    values = [str(v) for v in _values(conn.response[0].get("attributes", {}), "contextCSN")]
    if values:
        return "contextCSN", max(values)
    return "none", ""


def usn_changed_dns(conn: Any, base_dn: str, usn: int, *, page_size: int = 500) -> list[str]:
    """Active Directory: the DNs under `base_dn` with uSNChanged > usn, sorted (deletions are not seen)."""
    found = _paged(conn, base_dn, f"(uSNChanged>={usn + 1})", ["1.1"], page_size=page_size)
    return sorted((dn for dn, _a in found), key=str.casefold)


def changes_since_usn(conn: Any, base_dn: str, usn: int, *, page_size: int = 500) -> tuple[int, list[str]]:
    """Active Directory: (highestCommittedUSN of the DC, DNs with uSNChanged > usn). usn 0 = a baseline.

    USNs are per domain controller: stay on one DC (or start over with a baseline on another one).
    """
    # By "*"/"+", not by name: ldap3 refuses names its schema lacks, and rootDSE attributes are not in it.
    every = [ldap3.ALL_ATTRIBUTES, ldap3.ALL_OPERATIONAL_ATTRIBUTES]
    if not conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=every):
        result = conn.result or {}
        raise DirectoryError(f"reading the rootDSE: {result.get('description')} {result.get('message', '')}".rstrip())
    highest = _int(conn.response[0].get("attributes", {}), "highestCommittedUSN")
    if usn <= 0:
        return highest, []
    dns = [dn for dn, _a in _paged(conn, base_dn, f"(uSNChanged>={usn + 1})", ["1.1"], page_size=page_size)]
    return max(highest, usn), sorted(dns, key=str.casefold)


# ------------------------------------------------------------------ reading changed entries (incremental sync)

_GROUP_FILTER = "(|(objectClass=group)(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"
_GROUP_CLASSES = frozenset({"group", "groupofnames", "groupofuniquenames"})
_COMPUTER_ATTRIBUTES = ["objectClass", "cn", "sAMAccountName", "dNSHostName", "memberOf"]


@dataclass(frozen=True)
class ComputerRead:
    """One computer object read by DN, mapped as read_topology maps it; `parent` decides its OU."""

    dn: str
    parent: str  # the parent's DN as the directory spells it
    name: str  # lower case, from sAMAccountName (without "$"), else cn
    domain: str
    groups: tuple[str, ...]  # sorted case-insensitively
    # When the object was created, as read_computers' `created` attribute says: uSNCreated (AD) as
    # digits, createTimestamp as YYYYMMDDHHMMSS (UTC); "" when not asked for or not there.
    created: str = ""


@dataclass(frozen=True)
class GroupRead:
    dn: str
    name: str  # sAMAccountName, else cn
    description: str
    members: tuple[str, ...]  # member and uniqueMember DNs


def _entry(conn: Any, dn: str, attributes: list[str]) -> Mapping[str, Any] | None:
    """The attributes of the entry `dn` (a base search), None when there is no such entry."""
    for _dn, attrs in _paged(conn, dn, "(objectClass=*)", attributes, scope="BASE"):
        return attrs
    return None


def _classes(attrs: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(v.strip().lower() for v in _values(attrs, "objectClass"))


def _computer_name(attrs: Mapping[str, Any]) -> str:
    return canonical_computer_name((_first(attrs, "sAMAccountName") or _first(attrs, "cn")).removesuffix("$"))


def dn_within(dn: str, base_dn: str) -> bool:
    """True if `dn` is `base_dn` or below it."""
    key, base = dn_key(dn), dn_key(base_dn)
    return key == base or key.endswith("," + base)


def _created(attrs: Mapping[str, Any], name: str) -> str:
    value = attrs.get(name)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if value is None:
        return ""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
        return value.strftime("%Y%m%d%H%M%S")
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return "".join(ch for ch in text.split(".", 1)[0] if ch.isdigit())


def read_computers(
    conn: Any, base_dn: str, dns: list[str], *, domain: str = "", created: str = ""
) -> dict[str, ComputerRead | None]:
    """DN → the computer object there, read as read_topology reads it (name, domain, groups from memberOf
    and from the groups whose member/uniqueMember lists it), or None when the entry is not a computer,
    has no name, or does not exist (any more). One base search per DN plus one group search per computer.

    `domain` defaults to the base DN's (as read_topology). `created` names an attribute that says when
    the object was created (uSNCreated on AD, createTimestamp on OpenLDAP: ComputerRead.created). Group
    names: a group found by the member search gives its sAMAccountName/cn; a memberOf DN under the base
    that is a group gives its name; any other memberOf value its first RDN's value — read_topology's
    mapping, entry by entry.
    """
    domain = domain or domain_of(base_dn)
    attributes = [*_COMPUTER_ATTRIBUTES, created] if created else _COMPUTER_ATTRIBUTES
    out: dict[str, ComputerRead | None] = {}
    for dn in dns:
        attrs = _entry(conn, dn, attributes)
        if attrs is None or "computer" not in _classes(attrs):
            out[dn] = None
            continue
        name = _computer_name(attrs)
        if not name:
            out[dn] = None
            continue
        value = escape_filter_chars(dn)
        group_names: dict[str, str] = {}  # DN key → name
        for group_dn, group in _paged(
            conn, base_dn, f"(&{_GROUP_FILTER}(|(member={value})(uniqueMember={value})))", ["cn", "sAMAccountName"]
        ):
            group_name = _first(group, "sAMAccountName") or _first(group, "cn")
            if group_name:
                group_names[dn_key(group_dn)] = group_name
        member_of = set(group_names.values())
        for group_dn in _values(attrs, "memberOf"):
            known = group_names.get(dn_key(group_dn))
            if known is None and dn_within(group_dn, base_dn):
                entry = _entry(conn, group_dn, ["objectClass", "cn", "sAMAccountName"])
                if entry is not None and _classes(entry) & _GROUP_CLASSES:
                    known = _first(entry, "sAMAccountName") or _first(entry, "cn") or None
            member_of.add(known if known is not None else _group_name_from_dn(group_dn))
        host = _first(attrs, "dNSHostName").strip().rstrip(".").lower()
        out[dn] = ComputerRead(
            dn=dn,
            parent=_parent(dn),
            name=name,
            domain=domain or (host.split(".", 1)[1] if "." in host else ""),
            groups=tuple(sorted(member_of, key=str.casefold)),
            created=_created(attrs, created) if created else "",
        )
    return out


def read_group(conn: Any, dn: str) -> GroupRead | None:
    """The group at `dn` (objectClass group, groupOfNames or groupOfUniqueNames) with its member DNs; None
    when the entry is not a group or does not exist."""
    attrs = _entry(conn, dn, ["objectClass", "cn", "sAMAccountName", "description", "member", "uniqueMember"])
    if attrs is None or not _classes(attrs) & _GROUP_CLASSES:
        return None
    name = _first(attrs, "sAMAccountName") or _first(attrs, "cn")
    if not name:
        return None
    members = tuple(_values(attrs, "member") + _values(attrs, "uniqueMember"))
    return GroupRead(dn, name, _first(attrs, "description"), members)


def find_computers(conn: Any, base_dn: str, name: str) -> list[str]:
    """The DNs of the computer objects under `base_dn` that read_topology would name `name` (sorted)."""
    wanted = canonical_computer_name(name)
    value = escape_filter_chars(wanted)
    found = _paged(
        conn, base_dn, f"(&(objectClass=computer)(|(sAMAccountName={value}$)(sAMAccountName={value})(cn={value})))",
        ["cn", "sAMAccountName"],
    )
    return sorted((dn for dn, attrs in found if _computer_name(attrs) == wanted), key=str.casefold)


def computer_names(conn: Any, base_dn: str, *, page_size: int = 500) -> dict[str, int]:
    """Name → how many computer objects under `base_dn` carry it (names as read_topology derives them)."""
    counts: dict[str, int] = {}
    for _dn, attrs in _paged(conn, base_dn, "(objectClass=computer)", ["cn", "sAMAccountName"], page_size=page_size):
        name = _computer_name(attrs)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts
