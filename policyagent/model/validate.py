"""Validation of policy objects, table-driven and all-or-nothing.

`validate_object(obj, view)` returns every violation of one object against the
store as it would be after the write (`view`). Each violation names the object
path (`policy "X"/rule 2/filter action`) and the setting by its netsh name
(policyagent.model.settings), so CLI errors read like the command that caused
them. The planner (policyagent.model.writes) runs this for every object a write
touches; the CLI runs the same planner over the store it fetched before sending.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from policyagent.model import algorithms as alg
from policyagent.model import settings as S
from policyagent.model.errors import Violation
from policyagent.model.objects import SECRET_MASK, Kind, StoreObject, name_key
from policyagent.model.view import StoreView
from policyagent.pb import pb

PORT_PROTOCOLS = frozenset({6, 17})  # TCP, UDP
_SPECIFIC = frozenset({pb.ADDRESS_KIND_HOST, pb.ADDRESS_KIND_SUBNET})
_KNOWN_ADDRESS_KINDS = frozenset(pb.AddressKind.values()) - {pb.ADDRESS_KIND_UNSPECIFIED}


def quoted(kind: Kind, name: str) -> str:
    return f'{kind.value} "{name}"'


def validate_object(obj: StoreObject, view: StoreView) -> list[Violation]:
    if isinstance(obj, pb.FilterList):
        return validate_filter_list(obj, view)
    if isinstance(obj, pb.FilterAction):
        return validate_filter_action(obj, view)
    return validate_policy(obj, view)


def _check_name(obj: StoreObject, kind: Kind, path: str, view: StoreView) -> list[Violation]:
    out: list[Violation] = []
    if not obj.name.strip():
        out.append(Violation(path, "name", "must not be empty"))
        return out
    if obj.name != obj.name.strip():
        out.append(Violation(path, "name", "must not start or end with spaces"))
    if len(obj.name) > (S.NAME.maximum or 255):
        out.append(Violation(path, "name", f"is longer than {S.NAME.maximum} characters"))
    if "\x00" in obj.name:
        out.append(Violation(path, "name", "must not contain NUL characters"))
    owner = view.id_for_name(kind, obj.name)
    if owner is not None and owner != obj.id:
        out.append(Violation(path, "name", f'another {kind.value} is already named "{obj.name}"'))
    if len(obj.description) > (S.DESCRIPTION.maximum or 1024):
        out.append(Violation(path, "description", f"is longer than {S.DESCRIPTION.maximum} characters"))
    return out


# ----------------------------------------------------------------- filters


def _address_network(
    addr: pb.Address, path: str, field: str, out: list[Violation]
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """Checks one address; returns its network for HOST/SUBNET (None otherwise or if invalid)."""
    if addr.kind not in _KNOWN_ADDRESS_KINDS:
        out.append(Violation(path, field, "no address given (me, any, an address, a subnet or a server keyword)"))
        return None
    if addr.kind not in _SPECIFIC:
        if addr.ip or addr.mask:
            out.append(Violation(path, field, "me, any and server keywords take no address or mask"))
        return None
    try:
        ip = ipaddress.ip_address(addr.ip)
    except ValueError:
        out.append(Violation(path, field, f'"{addr.ip}" is not a valid IP address'))
        return None
    if addr.kind == pb.ADDRESS_KIND_HOST:
        if addr.mask and addr.mask not in ("255.255.255.255", "32", "128"):
            out.append(Violation(path, field, "a single address takes no mask other than 255.255.255.255"))
        return ipaddress.ip_network(ip)
    mask_field = "srcmask" if field == "srcaddr" else "dstmask"
    try:
        mask = S.normalize_mask(addr.mask, ip.version)
    except ValueError as exc:
        out.append(Violation(path, mask_field, str(exc)))
        return None
    try:
        return ipaddress.ip_network(f"{ip}/{S.mask_prefix(mask)}", strict=True)
    except ValueError:
        out.append(Violation(path, mask_field, f"address {ip} has bits set outside the mask {mask}"))
        return None


def validate_filter(flt: pb.Filter, path: str) -> list[Violation]:
    out: list[Violation] = []
    src = _address_network(flt.source, path, "srcaddr", out)
    dst = _address_network(flt.destination, path, "dstaddr", out)
    if src is not None and dst is not None and src.version != dst.version:
        out.append(Violation(path, "dstaddr", "source and destination must both be IPv4 or both IPv6"))
    if (
        flt.source.kind == flt.destination.kind and flt.source.kind in (pb.ADDRESS_KIND_ME, *S.SERVER_KEYWORDS.values())
    ) or (src is not None and src == dst):
        out.append(Violation(path, "dstaddr", "source and destination are the same"))
    if flt.protocol > 255:
        out.append(Violation(path, "protocol", f"protocol number {flt.protocol} is out of range (0–255)"))
    for field, port, setting in (("srcport", flt.source_port, S.SRCPORT), ("dstport", flt.destination_port, S.DSTPORT)):
        if port and flt.protocol not in PORT_PROTOCOLS:
            out.append(Violation(path, field, "ports can only be given with protocol TCP or UDP"))
        out.extend(setting.check_range(port, path))
    if len(flt.description) > (S.DESCRIPTION.maximum or 1024):
        out.append(Violation(path, "description", f"is longer than {S.DESCRIPTION.maximum} characters"))
    return out


def filter_key(flt: pb.Filter) -> tuple[object, ...]:
    """What makes two filters the same match (descriptions and ids aside)."""
    a, b = flt.source, flt.destination
    key = (a.kind, a.ip, a.mask, b.kind, b.ip, b.mask, flt.protocol, flt.source_port, flt.destination_port)
    return (flt.mirrored, *key)


def validate_filter_list(fl: pb.FilterList, view: StoreView) -> list[Violation]:
    path = quoted(Kind.FILTER_LIST, fl.name)
    out = _check_name(fl, Kind.FILTER_LIST, path, view)
    seen: dict[tuple[object, ...], int] = {}
    ids: set[str] = set()
    for index, flt in enumerate(fl.filters, start=1):
        fpath = f"{path}/filter {index}"
        out.extend(validate_filter(flt, fpath))
        if flt.id in ids:
            out.append(Violation(fpath, "", f"duplicate filter id {flt.id}"))
        ids.add(flt.id)
        key = filter_key(flt)
        if key in seen:
            out.append(Violation(fpath, "", f"is the same as filter {seen[key]}"))
        else:
            seen[key] = index
    return out


# ---------------------------------------------------------------- methods


def validate_qm_method(m: pb.QuickModeMethod, path: str) -> list[Violation]:
    out: list[Violation] = []
    field = "qmsecmethods"
    if not m.HasField("ah") and not m.HasField("esp"):
        out.append(Violation(path, field, "a security method needs AH, ESP or both"))
    if m.HasField("ah") and m.ah.integrity not in alg.AH_INTEGRITIES:
        out.append(Violation(path, field, f"unknown AH integrity algorithm {alg.integrity_name(m.ah.integrity)}"))
    if m.HasField("esp"):
        if m.esp.encryption not in alg.KNOWN_CIPHERS:
            out.append(Violation(path, field, f"unknown ESP encryption algorithm {alg.cipher_name(m.esp.encryption)}"))
        if m.esp.integrity not in alg.KNOWN_INTEGRITIES:
            out.append(Violation(path, field, f"unknown ESP integrity algorithm {alg.integrity_name(m.esp.integrity)}"))
        if m.esp.encryption == pb.CIPHER_NONE and m.esp.integrity == pb.INTEGRITY_NONE:
            out.append(Violation(path, field, "ESP with neither encryption nor integrity protects nothing"))
    for setting, value in ((S.QM_LIFETIME_KB, m.lifetime_kb), (S.QM_LIFETIME_SECONDS, m.lifetime_seconds)):
        if not setting.in_range(value):
            out.append(
                Violation(path, field, f"lifetime {value} {setting.unit} is out of range ({setting.range_text()})")
            )
    return out


def validate_qm_methods(methods: Iterable[pb.QuickModeMethod], path: str) -> list[Violation]:
    out: list[Violation] = []
    count = 0
    for index, m in enumerate(methods, start=1):
        count += 1
        out.extend(validate_qm_method(m, f"{path}/security method {index}"))
    if count == 0:
        out.append(Violation(path, "qmsecmethods", "negotiation needs at least one security method"))
    return out


def validate_mm_methods(settings: pb.IsakmpSettings, path: str) -> list[Violation]:
    out: list[Violation] = []
    if not settings.methods:
        out.append(Violation(path, "mmsecmethods", "needs at least one main mode security method"))
    for index, m in enumerate(settings.methods, start=1):
        mpath = f"{path}/main mode method {index}"
        if m.encryption not in alg.MM_CIPHERS:
            out.append(
                Violation(mpath, "mmsecmethods", f"unknown encryption algorithm {alg.cipher_name(m.encryption)}")
            )
        if m.integrity not in alg.MM_INTEGRITIES:
            out.append(
                Violation(mpath, "mmsecmethods", f"unknown integrity algorithm {alg.integrity_name(m.integrity)}")
            )
        if m.dh_group not in alg.KNOWN_DH_GROUPS:
            out.append(Violation(mpath, "mmsecmethods", f"unknown DH group {m.dh_group}"))
    out.extend(S.MMLIFETIME.check_range(settings.lifetime_minutes, path))
    out.extend(S.QMPERMM.check_range(settings.qm_per_mm, path))
    if settings.ike_version:  # 0 = unset = 1
        out.extend(S.IKEVERSION.check_range(settings.ike_version, path))
    if settings.master_key_pfs and settings.qm_per_mm != 1:
        out.append(Violation(path, "qmpermm", "must be 1 when master key PFS (mmpfs) is on"))
    return out


# ------------------------------------------------------------ filter actions


def validate_filter_action(fa: pb.FilterAction, view: StoreView) -> list[Violation]:
    path = quoted(Kind.FILTER_ACTION, fa.name)
    out = _check_name(fa, Kind.FILTER_ACTION, path, view)
    if fa.action == pb.ACTION_TYPE_NEGOTIATE:
        out.extend(validate_qm_methods(fa.methods, path))
    elif fa.action in (pb.ACTION_TYPE_PERMIT, pb.ACTION_TYPE_BLOCK):
        word = "permit" if fa.action == pb.ACTION_TYPE_PERMIT else "block"
        if fa.methods:
            out.append(Violation(path, "qmsecmethods", f"only negotiate actions have security methods, not {word}"))
        for flag, field in (
            (fa.inbound_passthrough, "inpass"),
            (fa.fallback_to_clear, "soft"),
            (fa.session_key_pfs, "qmpfs"),
        ):
            if flag:
                out.append(Violation(path, field, f"applies only to negotiate actions, not {word}"))
    else:
        out.append(Violation(path, "action", "must be permit, block or negotiate"))
    return out


# -------------------------------------------------------------- policies


def validate_auth_methods(methods: Iterable[pb.AuthMethod], path: str, required: bool) -> list[Violation]:
    out: list[Violation] = []
    seen: set[tuple[object, ...]] = set()
    count = 0
    for index, m in enumerate(methods, start=1):
        count += 1
        mpath = f"{path}/authentication method {index}"
        which = m.WhichOneof("method")
        key: tuple[object, ...]
        if which == "kerberos":
            key = ("kerberos",)
        elif which == "certificate":
            key = ("certificate", m.certificate.root_ca.casefold())
            if not m.certificate.root_ca.strip():
                out.append(Violation(mpath, "rootca", "needs the root CA's name"))
            else:
                try:
                    S.split_dn(m.certificate.root_ca)
                except ValueError as exc:
                    out.append(Violation(mpath, "rootca", f'"{m.certificate.root_ca}" is not an X.500 name: {exc}'))
        elif which == "preshared_key":
            key = ("psk", m.preshared_key.key)
            if not m.preshared_key.key:
                out.append(Violation(mpath, "psk", "the pre-shared key must not be empty"))
            elif m.preshared_key.key == SECRET_MASK:
                out.append(
                    Violation(
                        mpath,
                        "psk",
                        "is the masked placeholder, not a key: read the object with its secrets to edit it",
                    )
                )
            elif "\x00" in m.preshared_key.key:
                out.append(Violation(mpath, "psk", "the pre-shared key must not contain NUL characters"))
        else:
            out.append(Violation(mpath, "", "no method given (kerberos, psk or rootca)"))
            continue
        if key in seen:
            out.append(Violation(mpath, str(key[0]) if key[0] != "certificate" else "rootca", "is listed twice"))
        seen.add(key)
    if required and count == 0:
        out.append(Violation(path, "kerberos", "needs at least one authentication method (kerberos, psk or rootca)"))
    return out


_CONNECTION_TYPES = frozenset(pb.ConnectionType.values()) - {pb.CONNECTION_TYPE_UNSPECIFIED}


def validate_rule(rule: pb.Rule, index: int, policy: pb.Policy, view: StoreView) -> list[Violation]:
    path = f"{quoted(Kind.POLICY, policy.name)}/rule {index}"
    out: list[Violation] = []
    if not rule.name.strip():
        out.append(Violation(path, "name", "must not be empty"))
    fl = view.get(Kind.FILTER_LIST, rule.filter_list_id) if rule.filter_list_id else None
    fa = view.get(Kind.FILTER_ACTION, rule.filter_action_id) if rule.filter_action_id else None
    if not isinstance(fl, pb.FilterList):
        what = f"no filter list with id {rule.filter_list_id}" if rule.filter_list_id else "no filter list given"
        out.append(Violation(f"{path}/filter list", "filterlist", what))
    if not isinstance(fa, pb.FilterAction):
        what = (
            f"no filter action with id {rule.filter_action_id}" if rule.filter_action_id else "no filter action given"
        )
        out.append(Violation(f"{path}/filter action", "filteraction", what))
    needs_auth = isinstance(fa, pb.FilterAction) and fa.action == pb.ACTION_TYPE_NEGOTIATE
    out.extend(validate_auth_methods(rule.auth_methods, path, needs_auth))
    if rule.connection_type not in _CONNECTION_TYPES:
        out.append(Violation(path, "conntype", "must be all, lan or dialup"))
    if rule.tunnel_endpoint:
        try:
            ip = ipaddress.ip_address(rule.tunnel_endpoint)
        except ValueError:
            out.append(Violation(path, "tunnel", f'"{rule.tunnel_endpoint}" is not a valid IP address'))
        else:
            if ip.is_unspecified or ip.is_multicast:
                out.append(Violation(path, "tunnel", f"{ip} cannot be a tunnel endpoint"))
        if isinstance(fl, pb.FilterList):
            for findex, flt in enumerate(fl.filters, start=1):
                if flt.mirrored:
                    out.append(
                        Violation(
                            f"{path}/filter list",
                            "mirrored",
                            f'filter {findex} of "{fl.name}" is mirrored; tunnel rules need one-way filters '
                            "(use a second rule for the return direction)",
                        )
                    )
                    break
    return out


def validate_default_rule(rule: pb.DefaultResponseRule, policy: pb.Policy) -> list[Violation]:
    path = f"{quoted(Kind.POLICY, policy.name)}/default response rule"
    out = validate_qm_methods(rule.methods, path)
    out.extend(validate_auth_methods(rule.auth_methods, path, True))
    return out


def validate_policy(policy: pb.Policy, view: StoreView) -> list[Violation]:
    path = quoted(Kind.POLICY, policy.name)
    out = _check_name(policy, Kind.POLICY, path, view)
    out.extend(S.POLLINGINTERVAL.check_range(policy.polling_interval_minutes, path))
    out.extend(validate_mm_methods(policy.isakmp, path))
    if not policy.HasField("default_response_rule"):
        out.append(
            Violation(
                f"{path}/default response rule",
                "",
                "cannot be deleted; deactivate it instead (set defaultrule activate=no)",
            )
        )
    else:
        out.extend(validate_default_rule(policy.default_response_rule, policy))
    names: dict[str, int] = {}
    ids: set[str] = {policy.default_response_rule.id}
    for index, rule in enumerate(policy.rules, start=1):
        out.extend(validate_rule(rule, index, policy, view))
        key = name_key(rule.name)
        if key and key in names:
            out.append(Violation(f"{path}/rule {index}", "name", f'rule {names[key]} is already named "{rule.name}"'))
        names.setdefault(key, index)
        if rule.id in ids:
            out.append(Violation(f"{path}/rule {index}", "", f"duplicate rule id {rule.id}"))
        ids.add(rule.id)
    return out


Validator = Callable[[StoreObject, StoreView], list[Violation]]
