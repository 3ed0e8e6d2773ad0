"""Publish and import IPsec policies in the [MS-GPIPSEC] Active Directory layout, and assign them to GPOs.

Layout (ref = /work/shared/reference/ms-gpipsec.md §1): every object lives flat in
``CN=IP Security,CN=System,<base>`` as ``CN=<class>{GUID}``; relationships are DN-valued attributes.

* model Policy          → ipsecPolicy (Polling-Interval blob) + its own ipsecISAKMPPolicy (main mode)
* model Rule            → ipsecNFA (auth methods, tunnel, connection type, active) referencing one
                          ipsecFilter and one ipsecNegotiationPolicy
* DefaultResponseRule   → an ipsecNFA with no filter, referencing its own ipsecNegotiationPolicy of type
                          "default response" (action Secure)
* model FilterList      → ipsecFilter, FilterAction → ipsecNegotiationPolicy (type standard); both shared,
                          ipsecOwnersReference = every NFA using them

Ids: a model id in the "{GUID}" form (any case) is the object's GUID and its ipsecID, unchanged. Any other
id gets a stable derived GUID (uuid5) for its RDN, and ipsecID carries the model id itself so the import maps
back losslessly — such an ipsecID is not a GUID, which Windows may not accept. The ISAKMP object and the
default-response negotiation policy have no model id: their GUIDs are derived from the policy / rule id
(or, on publish, the ones already in the directory are kept).

Three layers:

1. Pure mapping: :func:`policy_entries` (model → :class:`Entry` list) and :func:`contents_from_entries`
   (entries → model). Publishing refuses, with a :class:`DirectoryPolicyError` naming policy/rule/field,
   anything the blobs cannot carry; after mapping, the entries are read back and compared with the model, so
   nothing accepted is silently lost (see :func:`policy_entries` for the list).
2. LDIF (RFC 2849): :func:`dump_ldif`, :func:`load_ldif`.
3. LDAP on a bound ldap3 connection: :func:`read_entries`, :func:`read_policies`, :func:`publish`,
   :func:`delete_policy`, :func:`assign_gpo`, :func:`gpo_assignment`. Failed LDAP operations raise
   :class:`policyagent.directory.connector.DirectoryError` naming the DN and the server's result.

Pre-shared keys are stored in clear in the NFA blob, as Windows does ([MS-GPIPSEC] §5.1). Nothing here logs,
and :class:`Entry`'s repr shows attribute names only, never values.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import ipaddress
import logging
import re
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from google.protobuf.message import Message

from policyagent.directory import gpipsec as g
from policyagent.directory.connector import IPSEC_CSE_GUID, DirectoryError, dn_key, normalize_guid
from policyagent.pb import pb

with warnings.catch_warnings():  # ldap3 2.9.1 imports names pyasn1 has deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.core.exceptions import LDAPException

__all__ = [
    "DirectoryPolicyError",
    "Entry",
    "PublishResult",
    "assign_gpo",
    "container_dn",
    "contents_from_entries",
    "delete_policy",
    "dump_ldif",
    "gpo_assignment",
    "load_ldif",
    "object_dn",
    "object_guid",
    "policy_entries",
    "publish",
    "published_policy_ids",
    "read_entries",
    "read_policies",
    "select_policies",
]

Value = str | bytes
_T = TypeVar("_T")
log = logging.getLogger(__name__)

POLICY = "ipsecPolicy"
ISAKMP = "ipsecISAKMPPolicy"
NFA = "ipsecNFA"
NEGPOL = "ipsecNegotiationPolicy"
FILTER = "ipsecFilter"
_CLASSES = (POLICY, ISAKMP, NFA, NEGPOL, FILTER)  # also the spec's order of adds (ref §1.4)
_RANK = {c: i for i, c in enumerate(_CLASSES)}

OWNERS = "ipsecOwnersReference"
ISAKMP_REF = "ipsecISAKMPReference"
NFA_REF = "ipsecNFAReference"
FILTER_REF = "ipsecFilterReference"
NEGPOL_REF = "ipsecNegotiationPolicyReference"
NEGPOL_TYPE = "iPSECNegotiationPolicyType"
NEGPOL_ACTION = "iPSECNegotiationPolicyAction"
DATA = "ipsecData"
DATA_TYPE = "ipsecDataType"
DATA_TYPE_VALUE = "256"  # 0x100, ref §1.3

ATTRIBUTES = (
    "objectClass",
    "cn",
    "ipsecID",
    "ipsecName",
    "description",
    DATA_TYPE,
    DATA,
    NEGPOL_TYPE,
    NEGPOL_ACTION,
    OWNERS,
    ISAKMP_REF,
    NFA_REF,
    FILTER_REF,
    NEGPOL_REF,
)
_CANONICAL = {a.lower(): a for a in ATTRIBUTES}
_DN_ATTRIBUTES = frozenset(a.lower() for a in (OWNERS, ISAKMP_REF, NFA_REF, FILTER_REF, NEGPOL_REF))
# Forward references: set by a modify after the add, so every DN value names an existing object (ref §1.4;
# AD refuses DN values that point at nothing).
_FORWARD = {POLICY: (ISAKMP_REF, NFA_REF), NFA: (FILTER_REF, NEGPOL_REF)}
_MANAGED = {
    POLICY: ("ipsecID", "ipsecName", "description", DATA_TYPE, DATA, ISAKMP_REF, NFA_REF),
    ISAKMP: ("ipsecID", DATA_TYPE, DATA, OWNERS),
    NFA: ("ipsecID", "ipsecName", "description", DATA_TYPE, DATA, OWNERS, FILTER_REF, NEGPOL_REF),
    NEGPOL: ("ipsecID", "ipsecName", "description", DATA_TYPE, DATA, NEGPOL_TYPE, NEGPOL_ACTION, OWNERS),
    FILTER: ("ipsecID", "ipsecName", "description", DATA_TYPE, DATA, OWNERS),
}

# gPCMachineExtensionNames' IPsec pair: the client-side extension (the connector's) and its snap-in tool.
IPSEC_TOOL = "{DEA8AFA0-CC85-11D0-9CE2-0080C7221EBD}"

_BRACED_GUID = re.compile(r"^\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}$")
_GUID_IN_RDN = re.compile(r"\{([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})\}")
# Namespace of the derived GUIDs. Never change it: published objects are found again by these GUIDs.
_NAMESPACE = uuid.UUID("5b0f3c8e-2d4a-5e61-9a7b-3c2d1e0f4a5b")
_NO_SUCH_OBJECT = 32


class DirectoryPolicyError(ValueError):
    """A policy cannot be published as [MS-GPIPSEC] objects, or directory data cannot be imported.

    The message names the object (policy/rule path on publish, DN on import) and the field or problem.
    """


@dataclass(frozen=True)
class Entry:
    """One directory object: its DN and attributes (str values; bytes for binary ones such as ipsecData)."""

    dn: str
    attributes: Mapping[str, tuple[Value, ...]] = field(repr=False)

    def __repr__(self) -> str:  # never the values: ipsecData of an NFA may hold a pre-shared key
        return f"Entry({self.dn!r}, attributes={sorted(self.attributes)!r})"

    def get(self, name: str) -> tuple[Value, ...]:
        """The values of an attribute, its name matched case-insensitively; () if absent."""
        key = name.lower()
        for k, v in self.attributes.items():
            if k.lower() == key:
                return tuple(v)
        return ()

    def text(self, name: str) -> str:
        values = self.get(name)
        if not values:
            return ""
        v = values[0]
        return v.decode("utf-8") if isinstance(v, bytes) else v


@dataclass(frozen=True)
class PublishResult:
    """The DNs added, modified and deleted by publish / delete_policy, in the order of the operations."""

    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{len(self.added)} added, {len(self.modified)} modified, {len(self.deleted)} deleted"


# ============================================================================= names and ids


def container_dn(base_dn: str) -> str:
    return f"CN=IP Security,CN=System,{base_dn}"


def object_guid(model_id: str) -> uuid.UUID:
    """The directory GUID of a model id: the id itself when it is a "{GUID}", else uuid5 over it."""
    if _BRACED_GUID.match(model_id):
        return uuid.UUID(model_id[1:-1])
    return uuid.uuid5(_NAMESPACE, model_id)


def _guid_text(guid: uuid.UUID) -> str:
    return "{" + str(guid).upper() + "}"


def object_dn(object_class: str, guid: uuid.UUID, base_dn: str) -> str:
    return f"CN={object_class}{_guid_text(guid)},{container_dn(base_dn)}"


def _split_dn(dn: str) -> list[tuple[str, str]]:
    """(attribute, value) per RDN, split at unescaped commas, spaces around "=" and "," dropped.

    Deliberately tolerant (no DN validation): the spec's own examples have "CN= ipsecNFA…" and ", DC=".
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in dn:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch in ",;":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    out = []
    for part in parts:
        attr, _, value = part.partition("=")
        out.append((attr.strip(), value.strip()))
    return out


def _rdn_value(dn: str) -> str:
    return _split_dn(dn.strip())[0][1]


def _rdn_guid(dn: str) -> uuid.UUID | None:
    m = _GUID_IN_RDN.search(_rdn_value(dn))
    return uuid.UUID(m.group(1)) if m else None


def _hidden_guid(kind: str, model_id: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{kind}:{model_id}")


def _ipsec_class(entry: Entry) -> str | None:
    """The [MS-GPIPSEC] class of an entry that is a policy object (CN=<class>{GUID}), else None."""
    classes = {str(c).lower() for c in entry.get("objectClass")}
    for c in _CLASSES:
        if c.lower() in classes and _rdn_value(entry.dn).lower().startswith(c.lower() + "{"):
            return c
    return None


# ============================================================================= model → entries


def _where_policy(p: pb.Policy) -> str:
    return f'policy "{p.name}" {p.id}'


def _encode(where: str, fn: Callable[[], bytes]) -> bytes:
    try:
        return fn()
    except g.GpIpsecError as exc:
        raise DirectoryPolicyError(f"{where}: {exc}") from exc


def _attrs(*pairs: tuple[str, Value | Sequence[Value] | None]) -> dict[str, tuple[Value, ...]]:
    """An attribute dict without the empty values (LDAP has no empty strings; absent = empty)."""
    out: dict[str, tuple[Value, ...]] = {}
    for name, value in pairs:
        values: tuple[Value, ...]
        if value is None:
            values = ()
        elif isinstance(value, str | bytes):
            values = (value,) if value else ()
        else:
            values = tuple(v for v in value if v)
        if values:
            out[name] = values
    return out


def _object(
    object_class: str,
    dn: str,
    ipsec_id: str,
    blob: bytes,
    *references: tuple[str, Value | Sequence[Value] | None],
    name: str = "",
    description: str = "",
) -> Entry:
    """One ipsec* object: the attributes every class has (ref §1.3), then its references."""
    return Entry(
        dn,
        _attrs(
            ("objectClass", object_class),
            ("cn", _rdn_value(dn)),
            ("ipsecID", ipsec_id),
            ("ipsecName", name),
            ("description", description),
            (DATA_TYPE, DATA_TYPE_VALUE),
            (DATA, blob),
            *references,
        ),
    )


class _Builder:
    def __init__(self, contents: pb.StoreContents, base_dn: str, hidden: Mapping[tuple[str, str], uuid.UUID]):
        self.base = base_dn
        self.hidden = hidden
        self.lists = _index(contents.filter_lists, "filter list")
        self.actions = _index(contents.filter_actions, "filter action")
        self.claimed: dict[str, str] = {}
        self.policies: list[Entry] = []
        self.isakmps: list[Entry] = []
        self.nfas: list[Entry] = []
        self.drr_negpols: list[Entry] = []
        self.list_owners: dict[str, list[str]] = {}
        self.action_owners: dict[str, list[str]] = {}

    def claim(self, object_class: str, guid: uuid.UUID, what: str) -> str:
        dn = object_dn(object_class, guid, self.base)
        other = self.claimed.setdefault(dn_key(dn), what)
        if other != what:
            raise DirectoryPolicyError(f"{what}: would be stored as {dn}, like {other} (duplicate id)")
        return dn

    def policy(self, p: pb.Policy) -> None:
        where = _where_policy(p)
        _require_id(p.id, where)
        pdn = self.claim(POLICY, object_guid(p.id), where)
        policy_blob = _encode(where, lambda: g.encode_policy(g.from_model_policy(p)))
        isakmp_blob = _encode(f"{where}/isakmp", lambda: g.encode_isakmp_policy(g.from_model_isakmp(p.isakmp)))
        ik_guid = self.hidden.get(("isakmp", p.id)) or _hidden_guid("isakmp", p.id)
        ik_dn = self.claim(ISAKMP, ik_guid, f"{where}/isakmp")
        nfa_dns: list[str] = []
        for index, rule in enumerate(p.rules, start=1):
            nfa_dns.append(self.rule(rule, f'{where}/rule {index} "{rule.name}"', pdn))
        if p.HasField("default_response_rule"):
            nfa_dns.append(self.default_rule(p.default_response_rule, f"{where}/default response rule", pdn))
        self.isakmps.append(_object(ISAKMP, ik_dn, _guid_text(ik_guid), isakmp_blob, (OWNERS, pdn)))
        self.policies.append(
            _object(
                POLICY, pdn, p.id, policy_blob, (ISAKMP_REF, ik_dn), (NFA_REF, nfa_dns),
                name=p.name, description=p.description,
            )
        )

    def rule(self, rule: pb.Rule, where: str, pdn: str) -> str:
        _require_id(rule.id, where)
        fl = self.lists.get(rule.filter_list_id)
        if fl is None:
            raise DirectoryPolicyError(f"{where}: filter list {rule.filter_list_id or '(none)'} is not in the contents")
        fa = self.actions.get(rule.filter_action_id)
        if fa is None:
            raise DirectoryPolicyError(
                f"{where}: filter action {rule.filter_action_id or '(none)'} is not in the contents"
            )
        ndn = self.claim(NFA, object_guid(rule.id), where)
        blob = _encode(where, lambda: g.encode_nfa(g.from_model_rule(rule, "rule")))
        self.list_owners.setdefault(fl.id, []).append(ndn)
        self.action_owners.setdefault(fa.id, []).append(ndn)
        self.nfas.append(
            _object(
                NFA, ndn, rule.id, blob,
                (OWNERS, pdn),
                (FILTER_REF, object_dn(FILTER, object_guid(fl.id), self.base)),
                (NEGPOL_REF, object_dn(NEGPOL, object_guid(fa.id), self.base)),
                name=rule.name, description=rule.description,
            )
        )
        return ndn

    def default_rule(self, drr: pb.DefaultResponseRule, where: str, pdn: str) -> str:
        _require_id(drr.id, where)
        ndn = self.claim(NFA, object_guid(drr.id), where)
        try:
            nfa, negpol = g.from_model_default_response_rule(drr, "default response rule")
        except g.GpIpsecError as exc:
            raise DirectoryPolicyError(f"{where}: {exc}") from exc
        nfa_blob = _encode(where, lambda: g.encode_nfa(nfa))
        negpol_blob = _encode(where, lambda: g.encode_negotiation_policy(negpol))
        np_guid = self.hidden.get(("default-response", drr.id)) or _hidden_guid("default-response", drr.id)
        np_dn = self.claim(NEGPOL, np_guid, f"{where}/negotiation policy")
        self.drr_negpols.append(
            _object(
                NEGPOL, np_dn, _guid_text(np_guid), negpol_blob,
                (NEGPOL_TYPE, _guid_text(g.TYPE_DEFAULT_RESPONSE)),
                (NEGPOL_ACTION, _guid_text(g.ACTION_SECURE)),
                (OWNERS, ndn),
            )
        )
        self.nfas.append(_object(NFA, ndn, drr.id, nfa_blob, (OWNERS, pdn), (NEGPOL_REF, np_dn)))
        return ndn

    def shared(self, contents: pb.StoreContents) -> tuple[list[Entry], list[Entry]]:
        negpols: list[Entry] = []
        for fa in contents.filter_actions:
            if fa.id not in self.action_owners:
                continue
            where = f'filter action "{fa.name}" {fa.id}'
            dn = self.claim(NEGPOL, object_guid(fa.id), where)
            try:
                data, action = g.from_model_filter_action(fa)
                blob = g.encode_negotiation_policy(data)
            except g.GpIpsecError as exc:
                raise DirectoryPolicyError(f"{where}: {exc}") from exc
            negpols.append(
                _object(
                    NEGPOL, dn, fa.id, blob,
                    (NEGPOL_TYPE, _guid_text(g.TYPE_STANDARD)),
                    (NEGPOL_ACTION, _guid_text(action)),
                    (OWNERS, self.action_owners[fa.id]),
                    name=fa.name, description=fa.description,
                )
            )
        filters: list[Entry] = []
        for fl in contents.filter_lists:
            if fl.id not in self.list_owners:
                continue
            where = f'filter list "{fl.name}" {fl.id}'
            dn = self.claim(FILTER, object_guid(fl.id), where)
            for index, flt in enumerate(fl.filters, start=1):
                if not flt.id:
                    raise DirectoryPolicyError(f"{where}/filter {index}: has no id (Filter-Specification-ID)")
            try:
                blob = g.encode_filter(g.from_model_filter_list(fl))
            except g.GpIpsecError as exc:
                raise DirectoryPolicyError(f"{where}: {exc}") from exc
            filters.append(
                _object(
                    FILTER, dn, fl.id, blob, (OWNERS, self.list_owners[fl.id]), name=fl.name, description=fl.description
                )
            )
        return negpols, filters


def _require_id(model_id: str, where: str) -> None:
    if not model_id:
        raise DirectoryPolicyError(f"{where}: has no id")


def _index(objs: Iterable[Any], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for obj in objs:
        if obj.id in out:
            raise DirectoryPolicyError(f'{what} "{obj.name}": id {obj.id} appears twice in the contents')
        out[obj.id] = obj
    return out


def _selected(contents: pb.StoreContents, policy_ids: Iterable[str] | None) -> list[pb.Policy]:
    by_id = _index(contents.policies, "policy")
    if policy_ids is None:
        return list(contents.policies)
    wanted = list(dict.fromkeys(policy_ids))
    missing = [pid for pid in wanted if pid not in by_id]
    if missing:
        raise DirectoryPolicyError(f"policy {', '.join(missing)}: not in the contents")
    keep = set(wanted)
    return [p for p in contents.policies if p.id in keep]


def _build(
    contents: pb.StoreContents,
    policy_ids: Iterable[str] | None,
    base_dn: str,
    hidden: Mapping[tuple[str, str], uuid.UUID],
) -> list[Entry]:
    selected = _selected(contents, policy_ids)
    b = _Builder(contents, base_dn, hidden)
    for p in selected:
        b.policy(p)
    negpols, filters = b.shared(contents)
    entries = [*b.policies, *b.isakmps, *b.nfas, *negpols, *b.drr_negpols, *filters]
    _verify_round_trip(contents, selected, entries)
    return entries


def policy_entries(contents: pb.StoreContents, policy_ids: Iterable[str] | None, base_dn: str) -> list[Entry]:
    """The directory objects of the given policies (None = all) and of the filter lists / actions they use.

    Order: policies, ISAKMP policies, NFAs, negotiation policies, filters (the spec's order of adds).
    Raises DirectoryPolicyError, before anything is produced, for what [MS-GPIPSEC] cannot carry:

    * isakmp.ike_version 2 (IKEv1 only); main-mode ciphers other than DES/3DES, hashes other than MD5/SHA-1,
      DH groups other than 1, 2, 14; lifetime 0; polling interval 0;
    * quick-mode ESP ciphers other than DES/3DES (AES, ESP without encryption), integrity other than
      none/MD5/SHA-1; session-key PFS without a method; block/permit actions with negotiation settings;
    * IPv6 filter addresses (the V1 filter record is IPv4 only; the V2 section is not mapped), a filter with
      special servers on both sides, filters without a GUID id, HOST 0.0.0.0 or a /32 SUBNET (which read
      back as "me" / a host);
    * connection type unspecified, a tunnel endpoint that is not an IP address;
    * rules naming filter lists / actions missing from the contents; duplicate ids;
    * anything else that would not read back identically (checked by reading the entries back).

    Equivalent spellings are accepted and read back canonically: ike_version 1 as 0, a subnet mask given as a
    prefix length as the dotted mask, a host's mask as "".
    """
    return _build(contents, policy_ids, base_dn, {})


# ----------------------------------------------------------------------------- the round-trip check


def _canonical_mask(mask: str) -> str:
    try:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{mask}").netmask)
    except ValueError:
        return mask


def _normalized(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    if isinstance(out, pb.Policy):
        out.assigned = False
        if out.isakmp.ike_version == 1:
            out.isakmp.ike_version = 0
    if isinstance(out, pb.FilterList):
        for flt in out.filters:
            for a in (flt.source, flt.destination):
                if a.kind == pb.ADDRESS_KIND_HOST:
                    a.mask = ""
                elif a.kind == pb.ADDRESS_KIND_SUBNET:
                    a.mask = _canonical_mask(a.mask)
    if isinstance(out, pb.Policy | pb.FilterList | pb.FilterAction):
        out.revision = 0
        out.modified_unix_ms = 0
    return out


def _difference(a: Message, b: Message, path: str) -> str | None:
    """The first field (as a path) where a and b differ, with both values (never a pre-shared key)."""
    for fd in a.DESCRIPTOR.fields:
        name = f"{path}.{fd.name}" if path else fd.name
        va, vb = getattr(a, fd.name), getattr(b, fd.name)
        if fd.is_repeated:
            if len(va) != len(vb):
                return f"{name}: {len(va)} entries would read back as {len(vb)}"
            for i, (x, y) in enumerate(zip(va, vb, strict=True)):
                if fd.message_type is not None:
                    found = _difference(x, y, f"{name}[{i}]")
                    if found:
                        return found
                elif x != y:
                    return f"{name}[{i}]: {x!r} would read back as {y!r}"
        elif fd.message_type is not None:
            if a.HasField(fd.name) != b.HasField(fd.name):
                return f"{name}: {'set' if a.HasField(fd.name) else 'unset'} would read back otherwise"
            found = _difference(va, vb, name)
            if found:
                return found
        elif va != vb:
            if "preshared_key" in name:
                return f"{name}: the pre-shared key would not read back unchanged"
            return f"{name}: {va!r} would read back as {vb!r}"
    return None


def _verify_round_trip(contents: pb.StoreContents, selected: Sequence[pb.Policy], entries: Sequence[Entry]) -> None:
    back = _Importer(entries).contents(None)
    pairs: list[tuple[str, Message, Message | None]] = []
    got_p = {p.id: p for p in back.policies}
    got_l = {x.id: x for x in back.filter_lists}
    got_a = {x.id: x for x in back.filter_actions}
    for p in selected:
        pairs.append((_where_policy(p), p, got_p.get(p.id)))
    used_l = {r.filter_list_id for p in selected for r in p.rules}
    used_a = {r.filter_action_id for p in selected for r in p.rules}
    pairs += [(f'filter list "{x.name}" {x.id}', x, got_l.get(x.id)) for x in contents.filter_lists if x.id in used_l]
    pairs += [
        (f'filter action "{x.name}" {x.id}', x, got_a.get(x.id)) for x in contents.filter_actions if x.id in used_a
    ]
    for where, want, got in pairs:
        if got is None:  # pragma: no cover - the builder writes every object it was given
            raise DirectoryPolicyError(f"{where}: would not be found again in the directory")
        found = _difference(_normalized(want), _normalized(got), "")
        if found:
            raise DirectoryPolicyError(f"{where}: cannot be stored in [MS-GPIPSEC] objects without loss: {found}")


# ============================================================================= entries → model


class _Importer:
    def __init__(self, entries: Iterable[Entry]):
        self.objects: dict[str, tuple[str, Entry]] = {}
        self.order: list[str] = []
        for e in entries:
            cls = _ipsec_class(e)
            if cls is None:
                continue  # the container, GPO pointers, anything foreign
            key = dn_key(e.dn)
            if key in self.objects:
                raise DirectoryPolicyError(f"{e.dn}: appears twice")
            self.objects[key] = (cls, e)
            self.order.append(key)

    def of_class(self, cls: str) -> list[Entry]:
        return [self.objects[k][1] for k in self.order if self.objects[k][0] == cls]

    def target(self, source: Entry, attribute: str, cls: str) -> Entry:
        values = source.get(attribute)
        if len(values) != 1:
            raise DirectoryPolicyError(f"{source.dn}: {attribute} must name exactly one {cls} ({len(values)} found)")
        return self.resolve(source, attribute, str(values[0]), cls)

    def resolve(self, source: Entry, attribute: str, dn: str, cls: str) -> Entry:
        found = self.objects.get(dn_key(dn))
        if found is None or found[0] != cls:
            raise DirectoryPolicyError(f"{source.dn}: {attribute} {dn} is not an existing {cls}")
        return found[1]

    def contents(self, policy_ids: Iterable[str] | None) -> pb.StoreContents:
        out = pb.StoreContents()
        policies = self.of_class(POLICY)
        seen: dict[str, str] = {}
        for e in policies:
            pid = _model_id(e)
            if pid in seen:
                raise DirectoryPolicyError(f"{e.dn}: has the id {pid} of {seen[pid]}")
            seen[pid] = e.dn
        if policy_ids is not None:
            wanted = list(dict.fromkeys(policy_ids))
            missing = [pid for pid in wanted if pid not in seen]
            if missing:
                raise DirectoryPolicyError(f"policy {', '.join(missing)}: not found in the directory")
            keep = set(wanted)
            policies = [e for e in policies if _model_id(e) in keep]
        used_filters: set[str] = set()
        used_negpols: set[str] = set()
        for e in policies:
            out.policies.append(self.policy(e, used_filters, used_negpols))
        for e in self.of_class(FILTER):
            if policy_ids is None or dn_key(e.dn) in used_filters:
                out.filter_lists.append(self.filter_list(e))
        for e in self.of_class(NEGPOL):
            if _negpol_type(e) != g.TYPE_STANDARD:
                continue
            if policy_ids is None or dn_key(e.dn) in used_negpols:
                out.filter_actions.append(self.filter_action(e))
        for what, items in (("filter list", out.filter_lists), ("filter action", out.filter_actions)):
            ids: set[str] = set()
            for item in items:
                if item.id in ids:
                    raise DirectoryPolicyError(f"{what} {item.id}: more than one directory object has this id")
                ids.add(item.id)
        return out

    def policy(self, e: Entry, used_filters: set[str], used_negpols: set[str]) -> pb.Policy:
        _check_data_type(e)
        data = _decode(e, g.decode_policy)
        p = pb.Policy(
            id=_model_id(e),
            name=e.text("ipsecName"),
            description=e.text("description"),
            polling_interval_minutes=g.to_model_polling_minutes(data),
        )
        ik = self.target(e, ISAKMP_REF, ISAKMP)
        _check_data_type(ik)
        p.isakmp.CopyFrom(_mapped(ik, g.to_model_isakmp, _decode(ik, g.decode_isakmp_policy)))
        for value in e.get(NFA_REF):
            nfa_entry = self.resolve(e, NFA_REF, str(value), NFA)
            _check_data_type(nfa_entry)
            nfa = _decode(nfa_entry, g.decode_nfa)
            negpol_entry = self.target(nfa_entry, NEGPOL_REF, NEGPOL)
            _check_data_type(negpol_entry)
            filters = nfa_entry.get(FILTER_REF)
            kind = _negpol_type(negpol_entry)
            if kind == g.TYPE_DEFAULT_RESPONSE:
                if filters:
                    raise DirectoryPolicyError(f"{nfa_entry.dn}: a default response rule has {FILTER_REF}")
                if p.HasField("default_response_rule"):
                    raise DirectoryPolicyError(f"{e.dn}: has more than one default response rule")
                negpol = _decode(negpol_entry, g.decode_negotiation_policy)
                action = _action(negpol_entry)
                p.default_response_rule.CopyFrom(
                    _mapped(nfa_entry, g.to_model_default_response_rule, nfa, negpol, action, id=_model_id(nfa_entry))
                )
                continue
            if len(filters) != 1:
                raise DirectoryPolicyError(
                    f"{nfa_entry.dn}: {FILTER_REF} must name exactly one ipsecFilter ({len(filters)} found)"
                )
            filter_entry = self.resolve(nfa_entry, FILTER_REF, str(filters[0]), FILTER)
            used_filters.add(dn_key(filter_entry.dn))
            used_negpols.add(dn_key(negpol_entry.dn))
            p.rules.append(
                _mapped(
                    nfa_entry,
                    g.to_model_rule,
                    nfa,
                    id=_model_id(nfa_entry),
                    name=nfa_entry.text("ipsecName"),
                    description=nfa_entry.text("description"),
                    filter_list_id=_model_id(filter_entry),
                    filter_action_id=_model_id(negpol_entry),
                )
            )
        return p

    def filter_list(self, e: Entry) -> pb.FilterList:
        _check_data_type(e)
        data = _decode(e, g.decode_filter)
        name, description = e.text("ipsecName"), e.text("description")
        return _mapped(e, g.to_model_filter_list, data, id=_model_id(e), name=name, description=description)

    def filter_action(self, e: Entry) -> pb.FilterAction:
        _check_data_type(e)
        data = _decode(e, g.decode_negotiation_policy)
        action = _action(e)
        return _mapped(
            e,
            g.to_model_filter_action,
            data,
            action,
            id=_model_id(e),
            name=e.text("ipsecName"),
            description=e.text("description"),
        )


def _mapped(e: Entry, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """fn(*args, **kwargs), its GpIpsecError as a DirectoryPolicyError naming the DN."""
    try:
        return fn(*args, **kwargs)
    except g.GpIpsecError as exc:
        raise DirectoryPolicyError(f"{e.dn}: {exc}") from exc


def _model_id(e: Entry) -> str:
    text = e.text("ipsecID").strip()
    if text:
        return text
    guid = _rdn_guid(e.dn)
    if guid is None:
        raise DirectoryPolicyError(f"{e.dn}: no ipsecID and no GUID in the RDN")
    return _guid_text(guid)


# The default objects Windows 2000 put in every domain carry 598 (0x256: "256" read as hex), and so do the
# copies of them that Samba's provision creates (source4/setup/provision.ldif); their blobs are the usual ones.
_KNOWN_DATA_TYPES = frozenset({DATA_TYPE_VALUE, "598"})


def _check_data_type(e: Entry) -> None:
    """Readers tolerate other ipsecDataType values (the blob's own GUID and lengths are what is checked)."""
    value = e.text(DATA_TYPE).strip()
    if value and value not in _KNOWN_DATA_TYPES:
        log.warning("%s: %s is %s, not %s; reading its blob anyway", e.dn, DATA_TYPE, value, DATA_TYPE_VALUE)


def _decode(e: Entry, decoder: Callable[[bytes], Any]) -> Any:
    values = e.get(DATA)
    if not values:
        raise DirectoryPolicyError(f"{e.dn}: {DATA} is missing")
    raw = values[0]
    if not isinstance(raw, bytes):
        raise DirectoryPolicyError(f"{e.dn}: {DATA} is text, not binary")
    try:
        return decoder(raw)
    except g.GpIpsecError as exc:
        raise DirectoryPolicyError(f"{e.dn}: {DATA}: {exc}") from exc


def _guid_attr(e: Entry, name: str) -> uuid.UUID | None:
    text = e.text(name).strip()
    if not text:
        return None
    try:
        return uuid.UUID(text.strip("{}"))
    except ValueError:
        raise DirectoryPolicyError(f"{e.dn}: {name} {text!r} is not a GUID") from None


def _negpol_type(e: Entry) -> uuid.UUID:
    kind = _guid_attr(e, NEGPOL_TYPE) or g.TYPE_STANDARD
    if kind not in (g.TYPE_STANDARD, g.TYPE_DEFAULT_RESPONSE):
        raise DirectoryPolicyError(f"{e.dn}: unknown {NEGPOL_TYPE} {_guid_text(kind)}")
    return kind


def _action(e: Entry) -> uuid.UUID:
    action = _guid_attr(e, NEGPOL_ACTION)
    if action is None:
        raise DirectoryPolicyError(f"{e.dn}: {NEGPOL_ACTION} is missing")
    return action


def contents_from_entries(entries: Iterable[Entry], policy_ids: Iterable[str] | None = None) -> pb.StoreContents:
    """Every policy, filter list and (standard) filter action in the entries, in the entries' order — or, with
    `policy_ids`, those policies and the filter lists / actions their rules use (a missing id is an error).

    References are resolved by DN (case- and space-insensitively). Objects that belong to nothing (an NFA
    outside every policy, ref §1.7) and entries that are not CN=<class>{GUID} policy objects are ignored;
    unreferenced filter lists and filter actions are imported. Windows 2000 blobs are read. Any corrupt blob,
    dangling reference or unmappable value raises DirectoryPolicyError naming the DN; nothing is returned then.
    Revisions, modification times and ``assigned`` are left 0/false.
    """
    return _Importer(entries).contents(None if policy_ids is None else list(policy_ids))


# ============================================================================= LDIF (RFC 2849)

_LDIF_WIDTH = 76
_BINARY_ATTRIBUTES = frozenset({"ipsecdata", "objectguid", "objectsid", "ntsecuritydescriptor", "usercertificate"})
_ATTR_NAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)$")


def _safe(text: str) -> bool:
    """RFC 2849 SAFE-STRING, and no trailing space (which readers may strip)."""
    if not text:
        return True
    if text[0] in " :<" or text[-1] == " ":
        return False
    return all(0 < ord(c) < 128 and c not in "\r\n" for c in text)


def _ldif_line(name: str, value: Value) -> str:
    if isinstance(value, bytes):
        return f"{name}:: {base64.b64encode(value).decode('ascii')}"
    if _safe(value):
        return f"{name}: {value}" if value else f"{name}:"
    return f"{name}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"


def _fold(line: str) -> list[str]:
    if len(line) <= _LDIF_WIDTH:
        return [line]
    parts = [line[:_LDIF_WIDTH]]
    parts += [" " + line[i : i + _LDIF_WIDTH - 1] for i in range(_LDIF_WIDTH, len(line), _LDIF_WIDTH - 1)]
    return parts


def dump_ldif(entries: Iterable[Entry]) -> str:
    """RFC 2849 content records: binary values and unsafe strings base64 ("::"), lines folded at 76.

    The output holds ipsecData as is — including pre-shared keys in clear: treat it as a secret.
    """
    lines = ["version: 1"]
    for e in entries:
        lines.append("")
        lines += _fold(_ldif_line("dn", e.dn))
        for name, values in e.attributes.items():
            for v in values:
                lines += _fold(_ldif_line(name, v))
    return "\n".join(lines) + "\n"


def load_ldif(text: str, source: str = "") -> list[Entry]:
    """Parse RFC 2849 content records (comments, folding, base64, "dn::"); change records are refused.

    Binary attributes (ipsecData, objectGUID, objectSid, ...; or the ";binary" option) become bytes, other
    values str. Errors raise DirectoryPolicyError naming source:line.
    """
    where = source or "<ldif>"

    def fail(line_no: int, message: str) -> DirectoryPolicyError:
        return DirectoryPolicyError(f"{where}:{line_no}: {message}")

    # Unfold: a line starting with one space continues the previous one (comments included).
    logical: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.startswith(" "):
            if not logical or logical[-1][1] == "":
                raise fail(number, "continuation line without a line to continue")
            start, prev = logical[-1]
            logical[-1] = (start, prev + raw[1:])
        else:
            logical.append((number, raw.rstrip("\r")))
    records: list[list[tuple[int, str]]] = [[]]
    for number, line in logical:
        if line == "":
            if records[-1]:
                records.append([])
        elif not line.startswith("#"):
            records[-1].append((number, line))
    entries: list[Entry] = []
    seen: set[str] = set()
    for index, record in enumerate(r for r in records if r):
        if index == 0 and record[0][1].lower().startswith("version:"):
            number, line = record[0]
            if line.split(":", 1)[1].strip() != "1":
                raise fail(number, f"unsupported LDIF {line!r} (only version 1)")
            record = record[1:]
            if not record:
                continue
        number, line = record[0]
        name, value = _ldif_value(line, number, fail)
        if name.lower() != "dn":
            raise fail(number, f"a record must start with dn:, not {name}:")
        dn = value.decode("utf-8", errors="strict") if isinstance(value, bytes) else value
        if not dn.strip():
            raise fail(number, "empty dn")
        if dn_key(dn) in seen:
            raise fail(number, f"dn {dn} appears twice")
        seen.add(dn_key(dn))
        attributes: dict[str, list[Value]] = {}
        names: dict[str, str] = {}
        for number, line in record[1:]:
            if line == "-":
                raise fail(number, "change records are not supported (content records only)")
            name, value = _ldif_value(line, number, fail)
            if name.lower() == "changetype":
                raise fail(number, "change records are not supported (content records only)")
            if name.lower() == "dn":
                raise fail(number, "dn: in the middle of a record (missing blank line?)")
            base, _, options = name.partition(";")
            binary = base.lower() in _BINARY_ATTRIBUTES or options.lower() == "binary"
            if options and options.lower() != "binary":
                raise fail(number, f"attribute options are not supported: {name}")
            if binary and isinstance(value, str):
                value = value.encode("utf-8")
            elif not binary and isinstance(value, bytes):
                with contextlib.suppress(UnicodeDecodeError):  # else binary data we do not know: keep the bytes
                    value = value.decode("utf-8")
            canonical = names.setdefault(base.lower(), base)
            attributes.setdefault(canonical, []).append(value)
        entries.append(Entry(dn, {k: tuple(v) for k, v in attributes.items()}))
    return entries


def _ldif_value(line: str, number: int, fail: Callable[[int, str], DirectoryPolicyError]) -> tuple[str, Value]:
    name, colon, rest = line.partition(":")
    if not colon:
        raise fail(number, f"expected 'attribute: value', got {line[:40]!r}")
    base = name.partition(";")[0]
    if not _ATTR_NAME.match(base) or (";" in name and not name.partition(";")[2]):
        raise fail(number, f"invalid attribute name {name!r}")
    if rest.startswith(":"):
        try:
            return name, base64.b64decode(rest[1:].strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise fail(number, f"invalid base64 value of {name}: {exc}") from None
    if rest.startswith("<"):
        raise fail(number, f"URL values ({name}:<) are not supported")
    return name, rest.lstrip(" ")


# ============================================================================= LDAP


def _ldap_failure(conn: Any, operation: str, dn: str, exc: Exception | None = None) -> DirectoryError:
    if exc is not None:
        return DirectoryError(f"{operation} {dn}: {exc}")
    result = getattr(conn, "result", None) or {}
    text = f"{result.get('description', 'failed')} {result.get('message', '')}".strip()
    return DirectoryError(f"{operation} {dn}: {text}")


def _search(
    conn: Any, base: str, search_filter: str, scope: str, attributes: list[str]
) -> list[tuple[str, dict[str, list[bytes]]]]:
    """(dn, raw attributes) of every entry, paged (RFC 2696); a missing base gives []."""
    ldap_scope = {"BASE": ldap3.BASE, "LEVEL": ldap3.LEVEL}[scope]
    out: list[tuple[str, dict[str, list[bytes]]]] = []
    try:
        for item in conn.extend.standard.paged_search(
            base, search_filter, search_scope=ldap_scope, attributes=attributes, paged_size=500, generator=True
        ):
            if item.get("type") == "searchResEntry":
                out.append((item["dn"], dict(item.get("raw_attributes", {}))))
    except ldap3.core.exceptions.LDAPNoSuchObjectResult:
        return []
    except LDAPException as exc:
        raise _ldap_failure(conn, "search", base, exc) from exc
    result = conn.result or {}
    if result.get("result") == _NO_SUCH_OBJECT:
        return []
    if result.get("result") not in (None, 0):
        raise _ldap_failure(conn, "search", base)
    return out


def _read(conn: Any, dn: str, attributes: list[str]) -> dict[str, list[bytes]] | None:
    found = _search(conn, dn, "(objectClass=*)", "BASE", attributes)
    return found[0][1] if found else None


def _raw_values(raw: Mapping[str, list[bytes]], name: str) -> list[bytes]:
    for k, v in raw.items():
        if k.lower() == name.lower():
            return list(v)
    return []


def _to_entry(dn: str, raw: Mapping[str, list[bytes]]) -> Entry:
    attributes: dict[str, tuple[Value, ...]] = {}
    for name, values in raw.items():
        canonical = _CANONICAL.get(name.lower(), name)
        if not values:
            continue
        if canonical.lower() in _BINARY_ATTRIBUTES:
            attributes[canonical] = tuple(bytes(v) for v in values)
            continue
        try:
            attributes[canonical] = tuple(bytes(v).decode("utf-8") for v in values)
        except UnicodeDecodeError:
            raise DirectoryPolicyError(f"{dn}: {canonical} is not valid UTF-8") from None
    return Entry(dn, attributes)


_IPSEC_FILTER = "(|" + "".join(f"(objectClass={c})" for c in _CLASSES) + ")"


def read_entries(conn: Any, base_dn: str) -> list[Entry]:
    """Every ipsec* object directly under CN=IP Security,CN=System,<base_dn> (paged), ipsecData as bytes.
    A missing container gives []."""
    found = _search(conn, container_dn(base_dn), _IPSEC_FILTER, "LEVEL", list(ATTRIBUTES))
    return [_to_entry(dn, raw) for dn, raw in found]


def _sorted_contents(contents: pb.StoreContents) -> pb.StoreContents:
    out = pb.StoreContents()

    def key(o: Any) -> tuple[str, str]:
        return (o.name.strip().casefold(), o.id)

    out.policies.extend(sorted(contents.policies, key=key))
    out.filter_lists.extend(sorted(contents.filter_lists, key=key))
    out.filter_actions.extend(sorted(contents.filter_actions, key=key))
    return out


def read_policies(conn: Any, base_dn: str, policy_ids: Iterable[str] | None = None) -> pb.StoreContents:
    """The policies (None = all, with every filter list and filter action; else the given ones and the filter
    lists / actions their rules use), sorted by name then id. A requested id that is missing, or any
    object that cannot be imported, raises DirectoryPolicyError."""
    return _sorted_contents(_Importer(read_entries(conn, base_dn)).contents(policy_ids))


def _guid_form(text: str) -> str | None:
    """"{GUID}" upper case for a GUID typed with or without braces, any case; else None."""
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        stripped = stripped[1:-1]
    try:
        return _guid_text(uuid.UUID(stripped))
    except ValueError:
        return None


def select_policies(entries: Sequence[Entry], refs: Iterable[str]) -> list[str]:
    """The model ids of the ipsecPolicy objects the refs name: an id (a GUID in any case or braces, or the
    ipsecID as is) or a name (ipsecName, case-insensitive). Nothing is decoded, so a corrupt object elsewhere
    does not stop the selection. DirectoryPolicyError names a ref that matches nothing or more than one."""
    policies = [e for e in entries if _ipsec_class(e) == POLICY]
    by_id: dict[str, str] = {}
    for e in policies:
        pid = _model_id(e)
        by_id[pid] = pid
        by_id.setdefault(_guid_form(pid) or pid, pid)
    out: list[str] = []
    for ref in refs:
        text = ref.strip()
        found = by_id.get(text) or by_id.get(_guid_form(text) or text)
        if found is None:
            key = text.casefold()
            named = sorted({_model_id(e) for e in policies if e.text("ipsecName").strip().casefold() == key})
            if len(named) > 1:
                raise DirectoryPolicyError(f'policy "{text}": {len(named)} policies have this name; give the id')
            if not named:
                raise DirectoryPolicyError(f'policy "{text}": not found in the directory')
            found = named[0]
        if found not in out:
            out.append(found)
    return out


def published_policy_ids(conn: Any, base_dn: str, policy_ids: Iterable[str]) -> list[str]:
    """Those of `policy_ids` whose ipsecPolicy object exists where publish puts it (one base search each)."""
    return [pid for pid in policy_ids if _read(conn, object_dn(POLICY, object_guid(pid), base_dn), ["1.1"]) is not None]


# ----------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class _Op:
    kind: Literal["add", "modify", "delete"]
    dn: str
    attributes: Mapping[str, tuple[Value, ...]] = field(default_factory=dict, repr=False)


def _same(name: str, a: tuple[Value, ...], b: tuple[Value, ...]) -> bool:
    lower = name.lower()
    if lower in _DN_ATTRIBUTES:
        ka, kb = [dn_key(str(v)) for v in a], [dn_key(str(v)) for v in b]
        return ka == kb if lower == NFA_REF.lower() else sorted(ka) == sorted(kb)  # NFA order = rule order
    if lower == DATA_TYPE.lower():
        return [str(v).strip() for v in a] == [str(v).strip() for v in b]
    return a == b


def _merge_dns(kept: Iterable[Value], added: Iterable[Value]) -> tuple[str, ...]:
    out: dict[str, str] = {}
    for v in (*kept, *added):
        out.setdefault(dn_key(str(v)), str(v))
    return tuple(out.values())


def _plan_publish(existing: Sequence[Entry], wanted: Sequence[Entry]) -> list[_Op]:
    """The LDAP operations that turn `existing` into `wanted` for the published policies (pure)."""
    have = {dn_key(e.dn): e for e in existing if _ipsec_class(e)}
    cls_of = {dn_key(e.dn): c for e in existing if (c := _ipsec_class(e))}
    want = {dn_key(e.dn): e for e in wanted}
    want_cls = {dn_key(e.dn): _ipsec_class(e) or "" for e in wanted}
    for k, e in want.items():
        if k in cls_of and cls_of[k] != want_cls[k]:  # pragma: no cover - RDNs carry the class
            raise DirectoryPolicyError(f"{e.dn}: exists as a {cls_of[k]}")
    published = {k for k, c in want_cls.items() if c == POLICY}
    wanted_nfas = {k for k, c in want_cls.items() if c == NFA}
    # NFAs of the published policies that are gone: delete, unless a policy left alone still uses them.
    other_refs = {
        dn_key(str(v))
        for k, e in have.items()
        if cls_of[k] == POLICY and k not in published
        for v in e.get(NFA_REF)
    }
    removed: list[str] = []
    for k in [k for k in want if k in published]:
        for v in have[k].get(NFA_REF) if k in have else ():
            nk = dn_key(str(v))
            if nk not in wanted_nfas and cls_of.get(nk) == NFA and nk not in other_refs and nk not in removed:
                removed.append(nk)
    managed_nfas = wanted_nfas | set(removed)

    final: dict[str, dict[str, tuple[Value, ...]]] = {}
    for k, e in want.items():
        attrs = dict(e.attributes)
        cls = want_cls[k]
        if k in have and cls in (ISAKMP, NEGPOL, FILTER):
            managed = published if cls == ISAKMP else managed_nfas
            kept = [v for v in have[k].get(OWNERS) if dn_key(str(v)) not in managed]
            owners = _merge_dns(kept, attrs.get(OWNERS, ()))
            if owners:
                attrs[OWNERS] = owners
        final[k] = attrs

    adds: list[_Op] = []
    modifies: dict[str, dict[str, tuple[Value, ...]]] = {}
    for k, e in sorted(want.items(), key=lambda kv: _RANK[want_cls[kv[0]]]):
        cls = want_cls[k]
        attrs = final[k]
        if k not in have:
            forward = _FORWARD.get(cls, ())
            adds.append(_Op("add", e.dn, {n: v for n, v in attrs.items() if n not in forward}))
            later = {n: attrs[n] for n in forward if n in attrs}
            if later:
                modifies[k] = later
            continue
        changes = {}
        hidden = cls == ISAKMP or (cls == NEGPOL and _negpol_type_or_none(e) == g.TYPE_DEFAULT_RESPONSE)
        for name in _MANAGED[cls]:
            if hidden and name in ("ipsecName", "description"):
                continue  # a policy's own ISAKMP / default-response object: keep what Windows named it
            new, old = attrs.get(name, ()), have[k].get(name)
            if not _same(name, new, old):
                changes[name] = new
        if changes:
            modifies[k] = changes

    # Shared objects not published but owned by a managed NFA / policy: drop those owners (ref §1.4 steps 2-3).
    orphans: list[str] = []
    for k, e in have.items():
        cls = cls_of[k]
        if k in want or cls not in (ISAKMP, NEGPOL, FILTER):
            continue
        managed = published if cls == ISAKMP else managed_nfas
        current = e.get(OWNERS)
        remaining = tuple(v for v in current if dn_key(str(v)) not in managed)
        if len(remaining) == len(current):
            continue
        hidden = cls == ISAKMP or (cls == NEGPOL and _negpol_type_or_none(e) == g.TYPE_DEFAULT_RESPONSE)
        if hidden and not remaining:
            orphans.append(k)  # a policy's own ISAKMP / default-response negotiation policy, now unused
        else:
            modifies[k] = {OWNERS: remaining}
    still_referenced = {
        dn_key(str(v))
        for k, e in have.items()
        if k not in removed and k not in want
        for name in (ISAKMP_REF, NEGPOL_REF)
        for v in e.get(name)
    } | {dn_key(str(v)) for e in want.values() for name in (ISAKMP_REF, NEGPOL_REF) for v in e.get(name)}
    orphans = [k for k in orphans if k not in still_referenced]

    # Clients only compare the ipsecPolicy's whenChanged (ref §5 item 6): rewrite the policy's ipsecData
    # whenever anything it uses changed. [INF]
    dirty = set(modifies) | {dn_key(op.dn) for op in adds} | set(removed) | set(orphans)
    for pk in published:
        if pk not in have or DATA in modifies.get(pk, {}):
            continue
        related = {pk} | {dn_key(str(v)) for v in final[pk].get(ISAKMP_REF, ()) + final[pk].get(NFA_REF, ())}
        for nk in list(related):
            if nk in want:
                related |= {dn_key(str(v)) for n in (FILTER_REF, NEGPOL_REF) for v in want[nk].get(n)}
        related |= {nk for nk in removed if any(dn_key(str(v)) == pk for v in have[nk].get(OWNERS))}
        if related & dirty:
            modifies.setdefault(pk, {})[DATA] = final[pk][DATA]

    def rank(k: str) -> tuple[int, int]:
        cls = want_cls.get(k) or cls_of.get(k, POLICY)
        return (1 if cls == POLICY else 0, _RANK[cls])

    ops = list(adds)
    # Children first, the policies last: they stop referencing removed NFAs just before those are deleted.
    ops += [_Op("modify", (want.get(k) or have[k]).dn, modifies[k]) for k in sorted(modifies, key=rank)]
    ops += [_Op("delete", have[k].dn) for k in removed]
    ops += [_Op("delete", have[k].dn) for k in orphans]
    return ops


def _negpol_type_or_none(e: Entry) -> uuid.UUID | None:
    try:
        return _negpol_type(e)
    except DirectoryPolicyError:
        return None


def _execute(conn: Any, ops: Sequence[_Op], what: str) -> PublishResult:
    added: list[str] = []
    modified: list[str] = []
    deleted: list[str] = []
    for done, op in enumerate(ops):
        try:
            if op.kind == "add":
                attrs = {n: list(v) for n, v in op.attributes.items() if n != "objectClass"}
                ok = conn.add(op.dn, [str(c) for c in op.attributes.get("objectClass", ())], attrs)
            elif op.kind == "modify":
                ok = conn.modify(op.dn, {n: [(ldap3.MODIFY_REPLACE, list(v))] for n, v in op.attributes.items()})
            else:
                ok = conn.delete(op.dn)
            exc: Exception | None = None
        except LDAPException as caught:
            ok, exc = False, caught
        if not ok:
            failure = _ldap_failure(conn, f"{what}: {op.kind}", op.dn, exc)
            raise DirectoryError(
                f"{failure} ({done} of {len(ops)} changes were made; run it again to finish)"
            ) from exc
        if op.kind == "add":
            added.append(op.dn)
        elif op.kind == "delete":
            deleted.append(op.dn)
        elif op.dn not in added and op.dn not in modified:
            modified.append(op.dn)
    return PublishResult(tuple(added), tuple(modified), tuple(deleted))


def _ensure_container(conn: Any, base_dn: str) -> list[str]:
    created = []
    for dn, cn in ((f"CN=System,{base_dn}", "System"), (container_dn(base_dn), "IP Security")):
        if _read(conn, dn, ["1.1"]) is None:
            _ldap(conn, "add", dn, functools.partial(conn.add, dn, ["container"], {"cn": cn}))
            created.append(dn)
    return created


def _reuse(existing: Sequence[Entry], policies: Sequence[pb.Policy], base_dn: str) -> dict[tuple[str, str], uuid.UUID]:
    """GUIDs of the ISAKMP / default-response objects already used by the policies in the directory (e.g. the
    built-in ones of a Windows domain), so that republishing keeps them instead of creating new ones."""
    imp = _Importer(existing)
    out: dict[tuple[str, str], uuid.UUID] = {}
    for p in policies:
        pdn = object_dn(POLICY, object_guid(p.id), base_dn)
        found = imp.objects.get(dn_key(pdn))
        if found is not None and found[0] == POLICY:
            refs = found[1].get(ISAKMP_REF)
            target = imp.objects.get(dn_key(str(refs[0]))) if len(refs) == 1 else None
            if target is not None and target[0] == ISAKMP and _only_owner(target[1], pdn):
                guid = _rdn_guid(target[1].dn)
                if guid is not None:
                    out[("isakmp", p.id)] = guid
        if not p.HasField("default_response_rule"):
            continue
        ndn = object_dn(NFA, object_guid(p.default_response_rule.id), base_dn)
        nfa = imp.objects.get(dn_key(ndn))
        if nfa is None or nfa[0] != NFA:
            continue
        refs = nfa[1].get(NEGPOL_REF)
        target = imp.objects.get(dn_key(str(refs[0]))) if len(refs) == 1 else None
        if (
            target is not None
            and target[0] == NEGPOL
            and _negpol_type_or_none(target[1]) == g.TYPE_DEFAULT_RESPONSE
            and _only_owner(target[1], ndn)
        ):
            guid = _rdn_guid(target[1].dn)
            if guid is not None:
                out[("default-response", p.default_response_rule.id)] = guid
    return out


def _only_owner(e: Entry, owner_dn: str) -> bool:
    return all(dn_key(str(v)) == dn_key(owner_dn) for v in e.get(OWNERS))


def publish(conn: Any, base_dn: str, contents: pb.StoreContents, policy_ids: Iterable[str] | None) -> PublishResult:
    """Make the directory hold the given policies (None = all) exactly as in `contents` (reconcile).

    Missing objects are added in the spec's order (policy, ISAKMP, NFA, negotiation policy, filter; forward
    references set by a modify afterwards); existing ones are modified with REPLACE where they differ; NFAs a
    republished policy no longer has are deleted per ref §1.4 (references removed first). Filter lists and
    filter actions are shared, first-class objects (as in Windows): their ipsecOwnersReference is updated, but
    they are never deleted. Objects that belong to no published policy are never touched, except to drop a
    removed NFA from their owners. The container is created if missing.

    Everything is mapped and checked (DirectoryPolicyError) before the first write. LDAP has no transactions:
    if a write fails, DirectoryError says how many changes were made; publishing again converges.
    """
    ids = None if policy_ids is None else list(policy_ids)
    _build(contents, ids, base_dn, {})  # refuse before touching the directory
    created = _ensure_container(conn, base_dn)
    existing = read_entries(conn, base_dn)
    selected = _selected(contents, ids)
    wanted = _build(contents, ids, base_dn, _reuse(existing, selected, base_dn))
    result = _execute(conn, _plan_publish(existing, wanted), "publish")
    return PublishResult(tuple(created) + result.added, result.modified, result.deleted)


def _plan_delete(existing: Sequence[Entry], policy: Entry) -> list[_Op]:
    """ref §1.4 "Deleting a policy" (pure)."""
    have = {dn_key(e.dn): e for e in existing if _ipsec_class(e)}
    pk = dn_key(policy.dn)
    nfas = [k for k in dict.fromkeys(dn_key(str(v)) for v in policy.get(NFA_REF)) if k in have]
    nfas = [k for k in nfas if _ipsec_class(have[k]) == NFA]
    gone = set(nfas)
    ops: list[_Op] = []
    if policy.get(NFA_REF):
        ops.append(_Op("modify", policy.dn, {NFA_REF: ()}))
    # (1) each NFA out of every policy's ipsecNFAReference and out of its negotiation policy's and filters'
    # ipsecOwnersReference, then the NFA itself
    dead_negpols: list[Entry] = []
    for k, e in have.items():
        cls = _ipsec_class(e)
        name = NFA_REF if cls == POLICY else OWNERS if cls in (NEGPOL, FILTER) else None
        if k == pk or name is None:
            continue
        values = e.get(name)
        kept = tuple(v for v in values if dn_key(str(v)) not in gone)
        if len(kept) == len(values):
            continue
        if not kept and cls == NEGPOL and _negpol_type_or_none(e) == g.TYPE_DEFAULT_RESPONSE:
            dead_negpols.append(e)  # a default-response negotiation policy only these NFAs used
        else:
            ops.append(_Op("modify", e.dn, {name: kept}))
    ops += [_Op("delete", have[k].dn) for k in nfas]
    still_used = {dn_key(str(v)) for k, e in have.items() if k not in gone for v in e.get(NEGPOL_REF)}
    ops += [_Op("delete", e.dn) for e in dead_negpols if dn_key(e.dn) not in still_used]
    # (2) the policy out of its ISAKMP's owners, (3) the policy, then its ISAKMP object if nothing uses it
    isakmps = [have[k] for k in (dn_key(str(v)) for v in policy.get(ISAKMP_REF)) if k in have]
    isakmps = [e for e in isakmps if _ipsec_class(e) == ISAKMP]
    other_refs = {dn_key(str(v)) for k, e in have.items() if k != pk for v in e.get(ISAKMP_REF)}
    unused: list[Entry] = []
    for ik in isakmps:
        kept = tuple(v for v in ik.get(OWNERS) if dn_key(str(v)) != pk)
        if not kept and dn_key(ik.dn) not in other_refs:
            unused.append(ik)
        elif len(kept) != len(ik.get(OWNERS)):
            ops.append(_Op("modify", ik.dn, {OWNERS: kept}))
    ops.append(_Op("delete", policy.dn))
    ops += [_Op("delete", ik.dn) for ik in unused]
    return ops


def delete_policy(conn: Any, base_dn: str, policy_id: str) -> PublishResult:
    """Delete a policy per ref §1.4: its NFAs (after removing them from every reference), its default-response
    negotiation policy and ISAKMP object when nothing else uses them, then the policy. Filter lists and filter
    actions stay. GPO pointers to it are left alone, as Windows does (<30>): clear them with assign_gpo."""
    existing = read_entries(conn, base_dn)
    pdn_key = dn_key(object_dn(POLICY, object_guid(policy_id), base_dn))
    policy = next(
        (e for e in existing if _ipsec_class(e) == POLICY and (dn_key(e.dn) == pdn_key or _model_id(e) == policy_id)),
        None,
    )
    if policy is None:
        raise DirectoryPolicyError(f"policy {policy_id}: not found under {container_dn(base_dn)}")
    return _execute(conn, _plan_delete(existing, policy), "delete policy")


# ----------------------------------------------------------------------------- GPO assignment

_EXTENSION_GROUP = re.compile(r"\[((?:\{[0-9A-Fa-f-]{36}\})+)\]")
_GUID_TOKEN = re.compile(r"\{[0-9A-Fa-f-]{36}\}")


def _parse_extensions(value: str, dn: str) -> list[list[str]]:
    """gPCMachineExtensionNames: [{CSE}{tool}...][{CSE}{tool}...]... ([MS-GPOL] §2.2.4)."""
    groups: list[list[str]] = []
    pos = 0
    text = value.strip()
    for m in _EXTENSION_GROUP.finditer(text):
        if text[pos : m.start()].strip():
            break
        groups.append(_GUID_TOKEN.findall(m.group(1)))
        pos = m.end()
    if text[pos:].strip():
        raise DirectoryPolicyError(f"{dn}: gPCMachineExtensionNames {value!r} does not parse; not changed")
    return groups


def _with_ipsec_extension(groups: list[list[str]], present: bool) -> list[list[str]]:
    out = [list(grp) for grp in groups]
    mine = next((grp for grp in out if grp[0].upper() == IPSEC_CSE_GUID), None)
    if present:
        if mine is None:
            out.append([IPSEC_CSE_GUID, IPSEC_TOOL])
        elif IPSEC_TOOL not in (t.upper() for t in mine[1:]):
            mine[1:] = sorted([*mine[1:], IPSEC_TOOL], key=str.upper)
    elif mine is not None:
        mine[1:] = [t for t in mine[1:] if t.upper() != IPSEC_TOOL]
        if len(mine) == 1:
            out.remove(mine)
    return sorted(out, key=lambda grp: grp[0].upper())  # processing stops at the first CSE out of order


def _bump_machine_version(raw: bytes | None) -> int:
    """versionNumber with the machine (low 16 bits) part incremented, the user part kept ([MS-GPOL])."""
    try:
        value = int(raw.decode().strip()) if raw else 0
    except ValueError:
        value = 0
    value &= 0xFFFFFFFF
    user, machine = value >> 16, value & 0xFFFF
    machine = machine % 0xFFFF + 1  # 1 … 0xFFFF; never 0 ("no computer settings")
    new = (user << 16) | machine
    return new - (1 << 32) if new >= 1 << 31 else new  # AD's Integer is 32-bit signed


def _gpo_dn(base_dn: str, gpo_guid: str) -> tuple[str, str]:
    try:
        gpo = normalize_guid(gpo_guid)
    except ValueError:
        raise DirectoryPolicyError(f"GPO {gpo_guid!r}: not a GUID") from None
    return gpo, f"CN={gpo},CN=Policies,CN=System,{base_dn}"


def _pointer_dn(gpo_dn: str) -> str:
    return f"CN=IPSEC,CN=Windows,CN=Microsoft,CN=Machine,{gpo_dn}"


def _ldap(conn: Any, operation: str, dn: str, call: Callable[[], Any]) -> None:
    try:
        ok = call()
    except LDAPException as exc:
        raise _ldap_failure(conn, operation, dn, exc) from exc
    if not ok:
        raise _ldap_failure(conn, operation, dn)


def assign_gpo(conn: Any, base_dn: str, gpo_guid: str, policy: pb.Policy | None) -> None:
    """Assign a published policy to a GPO (ref §1.1, §1.4 "Assign"), or clear the assignment (None).

    Creates CN=Machine / CN=Microsoft / CN=Windows under the GPO when absent, adds or replaces the
    CN=IPSEC pointer (objectClass ipsecPolicy; ipsecOwnersReference, ipsecName / description only when set),
    keeps gPCMachineExtensionNames sorted with the IPsec CSE pair in it (removed when clearing) and bumps the
    machine part of versionNumber. The GPO's GPT.INI in SYSVOL is not updated (no SYSVOL access here).
    """
    gpo, gpo_dn = _gpo_dn(base_dn, gpo_guid)
    gpc = _read(conn, gpo_dn, ["gPCMachineExtensionNames", "versionNumber"])
    if gpc is None:
        raise DirectoryPolicyError(f"GPO {gpo}: no groupPolicyContainer {gpo_dn}")
    pointer = _pointer_dn(gpo_dn)
    current = _read(conn, pointer, ["ipsecOwnersReference", "ipsecName", "description"])
    if policy is not None:
        pdn = object_dn(POLICY, object_guid(policy.id), base_dn)
        if _read(conn, pdn, ["1.1"]) is None:
            raise DirectoryPolicyError(f'{_where_policy(policy)}: is not published ({pdn} does not exist)')
        machine = f"CN=Machine,{gpo_dn}"
        for dn, cn in ((machine, "Machine"), (f"CN=Microsoft,{machine}", "Microsoft"),
                       (f"CN=Windows,CN=Microsoft,{machine}", "Windows")):
            if _read(conn, dn, ["1.1"]) is None:
                _ldap(conn, "add", dn, functools.partial(conn.add, dn, ["container"], {"cn": cn}))
        if current is None:
            _ldap(conn, "add", pointer, lambda: bool(conn.add(pointer, [POLICY], {"cn": "IPSEC"})))
        changes: dict[str, list[tuple[Any, list[str]]]] = {OWNERS: [(ldap3.MODIFY_REPLACE, [pdn])]}
        for name, value in (("ipsecName", policy.name), ("description", policy.description)):
            if value or (current is not None and _raw_values(current, name)):
                changes[name] = [(ldap3.MODIFY_REPLACE, [value] if value else [])]
        _ldap(conn, "modify", pointer, lambda: bool(conn.modify(pointer, changes)))
    elif current is not None:
        _ldap(conn, "delete", pointer, lambda: bool(conn.delete(pointer)))
    ext_values = _raw_values(gpc, "gPCMachineExtensionNames")
    ext_text = ext_values[0].decode("utf-8") if ext_values else ""
    groups = _with_ipsec_extension(_parse_extensions(ext_text, gpo_dn), policy is not None)
    new_text = "".join("[" + "".join(grp) + "]" for grp in groups)
    version_values = _raw_values(gpc, "versionNumber")
    version = _bump_machine_version(version_values[0] if version_values else None)
    gpo_changes: dict[str, list[tuple[Any, list[Any]]]] = {"versionNumber": [(ldap3.MODIFY_REPLACE, [str(version)])]}
    if new_text != ext_text:
        gpo_changes["gPCMachineExtensionNames"] = [(ldap3.MODIFY_REPLACE, [new_text] if new_text else [])]
    _ldap(conn, "modify", gpo_dn, lambda: bool(conn.modify(gpo_dn, gpo_changes)))


def gpo_assignment(conn: Any, base_dn: str, gpo_guid: str) -> str | None:
    """The "{GUID}" (upper case) of the policy a GPO's IPsec pointer names, or None without a pointer."""
    _gpo, gpo_dn = _gpo_dn(base_dn, gpo_guid)
    pointer = _pointer_dn(gpo_dn)
    current = _read(conn, pointer, ["ipsecOwnersReference"])
    if current is None:
        return None
    owners = _raw_values(current, "ipsecOwnersReference")
    if not owners:
        return None
    target = owners[0].decode("utf-8")
    guid = _rdn_guid(target)
    if guid is None or not _rdn_value(target).lower().startswith(POLICY.lower()):
        raise DirectoryPolicyError(f"{pointer}: ipsecOwnersReference {target} does not name an ipsecPolicy{{GUID}}")
    return _guid_text(guid)
