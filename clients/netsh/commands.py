"""The `netsh ipsec static` commands.

Every write is read-modify-write: fetch the store (secrets included, since whole
objects are put back), build the new objects carrying the revisions they were
read at, run the model's planner over the fetched store — the validator the
server runs — and only then send the mutations. A concurrent change makes the
server answer ABORTED, which arrives here as the server's ConflictError.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar, cast

from google.protobuf import json_format

from clients.netsh import addresses, dump, render
from clients.netsh.client import AdminClient, server_target
from clients.netsh.errors import CommandError
from clients.netsh.newobjects import default_of, kerberos, new_policy
from clients.netsh.syntax import Invocation
from policyagent.agent.daemon import PERSISTENT_SOCKET_FILE, SOCKET_FILE
from policyagent.model import exportfmt
from policyagent.model import settings as S
from policyagent.model.errors import NotFoundError, ProtectedError
from policyagent.model.objects import SECRET_MASK, Kind, StoreObject, name_key, normalize_id
from policyagent.model.view import ContentsView
from policyagent.model.writes import Delete, Mutation, Put, plan_writes
from policyagent.pb import admin_pb, directory_pb, pb

T = TypeVar("T", bound=StoreObject)

# How users may name the default response rule; it is not a rule they can delete or rename.
DEFAULT_RULE_NAMES = frozenset({"<dynamic>", "default response", "default response rule"})

_KIND_PROTO: dict[Kind, admin_pb.ObjectKind.ValueType] = {
    Kind.POLICY: admin_pb.OBJECT_KIND_POLICY,
    Kind.FILTER_LIST: admin_pb.OBJECT_KIND_FILTER_LIST,
    Kind.FILTER_ACTION: admin_pb.OBJECT_KIND_FILTER_ACTION,
}
_ACTIONS: dict[str, pb.ActionType.ValueType] = {
    "permit": pb.ACTION_TYPE_PERMIT,
    "block": pb.ACTION_TYPE_BLOCK,
    "negotiate": pb.ACTION_TYPE_NEGOTIATE,
}
CONNECTION_TYPES: dict[str, pb.ConnectionType.ValueType] = {
    "all": pb.CONNECTION_TYPE_ALL,
    "lan": pb.CONNECTION_TYPE_LAN,
    "dialup": pb.CONNECTION_TYPE_REMOTE_ACCESS,
}


@dataclass
class Context:
    """What a command runs with: the server connection, where output goes, output options."""

    client: AdminClient
    json: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    # `set store location=domain` returns to this: the policy server -r names (and its certificates).
    server: str = ""
    cert_dir: str | None = None
    # `set store location=local|persistent`: the agent's state directory (where its sockets are).
    agent_dir: str = ""

    @property
    def location(self) -> str:
        """The store the static commands edit: "local", "persistent" or "domain"."""
        if not self.client.agent_socket:
            return "domain"
        return "persistent" if os.path.basename(self.client.target) == PERSISTENT_SOCKET_FILE else "local"

    def store_label(self) -> str:
        if self.location == "domain":
            return f"Domain Store (policy server {self.client.target})"
        where = self.client.target.removeprefix("unix:")
        return f"{self.location.capitalize()} Store (agent {where})"

    def use(self, client: AdminClient) -> None:
        """Switch stores: later commands talk to `client` (the previous connection is closed)."""
        self.client.close()
        self.client = client

    def fetch(self) -> ContentsView:
        return ContentsView(self.client.get_store())

    def say(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")


# ------------------------------------------------------------ helpers


def copy(obj: T) -> T:
    out = type(obj)()
    out.CopyFrom(obj)  # type: ignore[arg-type]
    return out


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _bool(value: object) -> bool:
    assert isinstance(value, bool)
    return value


def _str(value: object) -> str:
    assert isinstance(value, str)
    return value


def _qm(value: object) -> list[pb.QuickModeMethod]:
    assert isinstance(value, list)
    return cast(list[pb.QuickModeMethod], value)


def _mm(value: object) -> list[pb.MainModeMethod]:
    assert isinstance(value, list)
    return cast(list[pb.MainModeMethod], value)


def lookup(view: ContentsView, kind: Kind, name: str) -> StoreObject:
    object_id = view.id_for_name(kind, name)
    found = view.get(kind, object_id) if object_id else None
    if found is None:
        raise NotFoundError(f'there is no {kind.value} named "{name}"')
    return found


def lookup_policy(view: ContentsView, name: str) -> pb.Policy:
    found = lookup(view, Kind.POLICY, name)
    assert isinstance(found, pb.Policy)
    return found


def _by_name(objs: Iterable[T]) -> list[T]:
    return sorted(objs, key=lambda o: (name_key(o.name), o.id))


def select(view: ContentsView, kind: Kind, inv: Invocation) -> list[StoreObject]:
    """The objects name=, guid= or all (a show without any of them: all) pick, by name."""
    if inv.has("name"):
        return [lookup(view, kind, _str(inv.get("name")))]
    if inv.has("guid"):
        raw = _str(inv.get("guid"))
        try:
            object_id = normalize_id(raw)
        except ValueError:
            raise S.GUID.fail(f'"{raw}" is not a GUID') from None
        found = view.get(kind, object_id)
        if found is None:
            raise NotFoundError(f"there is no {kind.value} with id {object_id}")
        return [found]
    return _by_name(view.objects(kind))


def select_one(view: ContentsView, kind: Kind, inv: Invocation) -> StoreObject:
    found = select(view, kind, inv)
    assert len(found) == 1
    return found[0]


def to_proto(mutation: Mutation) -> admin_pb.Mutation:
    if isinstance(mutation, Delete):
        ref = admin_pb.ObjectRef(kind=_KIND_PROTO[mutation.kind], id=mutation.object_id, revision=mutation.revision)
        return admin_pb.Mutation(delete=ref)
    obj = mutation.obj
    if isinstance(obj, pb.Policy):
        return admin_pb.Mutation(put_policy=obj)
    if isinstance(obj, pb.FilterList):
        return admin_pb.Mutation(put_filter_list=obj)
    return admin_pb.Mutation(put_filter_action=obj)


def write(ctx: Context, view: ContentsView, mutations: Sequence[Mutation], inv: Invocation) -> None:
    """Check the mutations with the model's planner over the fetched store, then send them."""
    if not mutations:
        return
    plan_writes(view, mutations)
    ctx.client.apply([to_proto(m) for m in mutations], operation=f"netsh {inv.command.text}")


def delete_of(obj: StoreObject, kind: Kind) -> Delete:
    # The revision we read: a concurrent change makes the server refuse instead of deleting it.
    return Delete(kind, obj.id, obj.revision)


def auth_methods(inv: Invocation) -> list[pb.AuthMethod] | None:
    """kerberos=, psk= and rootca= in the order given; None when none of them was given."""
    methods: list[pb.AuthMethod] = []
    given = False
    for arg in inv.args:
        if arg.name == "kerberos":
            given = True
            if arg.value is True:
                methods.append(kerberos())
        elif arg.name == "psk":
            given = True
            methods.append(pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=_str(arg.value))))
        elif arg.name == "rootca":
            given = True
            ca = arg.value
            assert isinstance(ca, S.RootCa)
            methods.append(
                pb.AuthMethod(
                    certificate=pb.CertificateAuth(
                        root_ca=ca.root_ca, cert_to_account_mapping=ca.certmap, exclude_ca_name=ca.exclude_ca_name
                    )
                )
            )
    return methods if given else None


def mask_secrets(contents: pb.StoreContents) -> pb.StoreContents:
    """A copy with every pre-shared key replaced by ********: netsh never displays one."""
    out = pb.StoreContents()
    out.CopyFrom(contents)
    for policy in out.policies:
        methods = [m for rule in policy.rules for m in rule.auth_methods]
        methods.extend(policy.default_response_rule.auth_methods)
        for method in methods:
            if method.WhichOneof("method") == "preshared_key":
                method.preshared_key.key = SECRET_MASK
    return out


def print_json(ctx: Context, message: pb.StoreContents) -> None:
    # Every field, defaults included, so scripts need not know proto3's omitted defaults.
    text = json_format.MessageToJson(
        mask_secrets(message), preserving_proto_field_name=True, indent=2, always_print_fields_with_no_presence=True
    )
    ctx.say(text)


def renderer(ctx: Context, view: ContentsView, inv: Invocation) -> render.Renderer:
    level = inv.get("level", default_of(S.LEVEL))
    fmt = inv.get("format", default_of(S.FORMAT))
    return render.Renderer(
        view,
        store=ctx.store_label(),
        verbose=level == "verbose",
        table=fmt == "table",
        wide=_bool(inv.get("wide", default_of(S.WIDE))),
        resolvedns=_bool(inv.get("resolvedns", default_of(S.RESOLVEDNS))),
        mask=SECRET_MASK,
    )


# ------------------------------------------------------------ policies


def _apply_policy_settings(policy: pb.Policy, inv: Invocation) -> None:
    if inv.has("newname"):
        policy.name = _str(inv.get("newname"))
    if inv.has("description"):
        policy.description = _str(inv.get("description"))
    if inv.has("pollinginterval"):
        policy.polling_interval_minutes = _int(inv.get("pollinginterval"))
    if inv.has("mmsecmethods"):
        del policy.isakmp.methods[:]
        policy.isakmp.methods.extend(_mm(inv.get("mmsecmethods")))
    if inv.has("mmlifetime"):
        policy.isakmp.lifetime_minutes = _int(inv.get("mmlifetime"))
    if inv.has("qmpermm"):
        policy.isakmp.qm_per_mm = _int(inv.get("qmpermm"))
    if inv.has("ikeversion"):
        policy.isakmp.ike_version = _int(inv.get("ikeversion"))
    if inv.has("mmpfs"):
        policy.isakmp.master_key_pfs = _bool(inv.get("mmpfs"))
        if policy.isakmp.master_key_pfs:
            policy.isakmp.qm_per_mm = 1  # master key PFS means a new main mode for every quick mode
    if inv.has("activatedefaultrule"):
        policy.default_response_rule.active = _bool(inv.get("activatedefaultrule"))
    if inv.has("assign"):
        policy.assigned = _bool(inv.get("assign"))


def add_policy(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policy = new_policy(_str(inv.get("name")))
    _apply_policy_settings(policy, inv)
    write(ctx, view, [Put(policy)], inv)


def set_policy(ctx: Context, inv: Invocation) -> None:
    if inv.has("gponame"):
        raise CommandError(
            "gponame: assigning a policy to a Group Policy object needs the directory and distribution "
            "features, which are not available yet; assign=yes assigns it in this store"
        )
    view = ctx.fetch()
    policy = copy(cast(pb.Policy, select_one(view, Kind.POLICY, inv)))
    _apply_policy_settings(policy, inv)
    write(ctx, view, [Put(policy)], inv)


def delete_policy(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    write(ctx, view, [delete_of(p, Kind.POLICY) for p in select(view, Kind.POLICY, inv)], inv)


def show_policy(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policies = [cast(pb.Policy, p) for p in select(view, Kind.POLICY, inv)]
    if ctx.json:
        print_json(ctx, pb.StoreContents(policies=policies))
        return
    ctx.say(renderer(ctx, view, inv).policies(policies))


# ------------------------------------------------------------ filter lists and filters


def add_filterlist(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    fl = pb.FilterList(name=_str(inv.get("name")), description=_str(inv.get("description", "")))
    write(ctx, view, [Put(fl)], inv)


def set_filterlist(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    fl = copy(select_one(view, Kind.FILTER_LIST, inv))
    if inv.has("newname"):
        fl.name = _str(inv.get("newname"))
    if inv.has("description"):
        fl.description = _str(inv.get("description"))
    write(ctx, view, [Put(fl)], inv)


def delete_filterlist(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    write(ctx, view, [delete_of(o, Kind.FILTER_LIST) for o in select(view, Kind.FILTER_LIST, inv)], inv)


def show_filterlist(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    lists = [cast(pb.FilterList, o) for o in select(view, Kind.FILTER_LIST, inv)]
    if ctx.json:
        print_json(ctx, pb.StoreContents(filter_lists=lists))
        return
    ctx.say(renderer(ctx, view, inv).filter_lists(lists))


def _filter_list(view: ContentsView, inv: Invocation) -> pb.FilterList:
    found = lookup(view, Kind.FILTER_LIST, _str(inv.get("filterlist")))
    assert isinstance(found, pb.FilterList)
    return copy(found)


def build_filters(inv: Invocation) -> list[pb.Filter]:
    """The filters `add filter` makes: one, or one per address pair when a DNS name was given."""
    sources = addresses.build_endpoints(
        cast(addresses.Endpoint, inv.get("srcaddr")), inv.raw("srcmask"), S.SRCADDR, S.SRCMASK
    )
    destinations = addresses.build_endpoints(
        cast(addresses.Endpoint, inv.get("dstaddr")), inv.raw("dstmask"), S.DSTADDR, S.DSTMASK
    )
    pairs = [(s, d) for s in sources for d in destinations]
    if len(pairs) > 1 or any(a.dns_name for pair in pairs for a in pair):
        # A DNS name's addresses pair only with the other side's family; two literal
        # addresses of different families are left to the validator to refuse.
        pairs = [(s, d) for s, d in pairs if addresses.same_family(s, d)]
    if not pairs:
        # Only a DNS name can get here: its addresses are all of the other family.
        raise S.DSTADDR.fail("source and destination have no address of the same IP version (IPv4 or IPv6)")
    out = []
    for source, destination in pairs:
        out.append(
            pb.Filter(
                description=_str(inv.get("description", "")),
                mirrored=_bool(inv.get("mirrored", default_of(S.MIRRORED))),
                source=source,
                destination=destination,
                protocol=_int(inv.get("protocol", default_of(S.PROTOCOL))),
                source_port=_int(inv.get("srcport", default_of(S.SRCPORT))),
                destination_port=_int(inv.get("dstport", default_of(S.DSTPORT))),
            )
        )
    return out


def add_filter(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    fl = _filter_list(view, inv)
    filters = build_filters(inv)
    fl.filters.extend(filters)
    write(ctx, view, [Put(fl)], inv)
    names = {a.dns_name for f in filters for a in (f.source, f.destination) if a.dns_name}
    if names:
        ctx.say(f'Resolved {", ".join(sorted(names))}: added {len(filters)} filter(s) to filter list "{fl.name}".')


def _filter_matches(flt: pb.Filter, inv: Invocation) -> bool:
    checks = (
        addresses.address_matches(
            flt.source, cast(addresses.Endpoint, inv.get("srcaddr")), inv.raw("srcmask"), S.SRCMASK
        ),
        addresses.address_matches(
            flt.destination, cast(addresses.Endpoint, inv.get("dstaddr")), inv.raw("dstmask"), S.DSTMASK
        ),
        not inv.has("protocol") or flt.protocol == inv.get("protocol"),
        not inv.has("srcport") or flt.source_port == inv.get("srcport"),
        not inv.has("dstport") or flt.destination_port == inv.get("dstport"),
        not inv.has("mirrored") or flt.mirrored == inv.get("mirrored"),
    )
    return all(checks)


def delete_filter(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    fl = _filter_list(view, inv)
    keep = [f for f in fl.filters if not _filter_matches(f, inv)]
    removed = len(fl.filters) - len(keep)
    if not removed:
        raise NotFoundError(f'no filter in filter list "{fl.name}" matches')
    del fl.filters[:]
    fl.filters.extend(keep)
    write(ctx, view, [Put(fl)], inv)
    ctx.say(f'Deleted {removed} filter(s) from filter list "{fl.name}".')


# ------------------------------------------------------------ filter actions


def _apply_filteraction_settings(fa: pb.FilterAction, inv: Invocation, *, creating: bool) -> None:
    if inv.has("newname"):
        fa.name = _str(inv.get("newname"))
    if inv.has("description"):
        fa.description = _str(inv.get("description"))
    if creating or inv.has("action"):
        new = _ACTIONS[_str(inv.get("action", default_of(S.ACTION)))]
        if new != fa.action:
            # Methods and negotiation flags belong to negotiate: a permit or block action
            # drops them, and a new negotiate action starts from the table's methods.
            del fa.methods[:]
            fa.inbound_passthrough = fa.fallback_to_clear = fa.session_key_pfs = False
            if new == pb.ACTION_TYPE_NEGOTIATE:
                fa.methods.extend(_qm(default_of(S.QMSECMETHODS)))
            fa.action = new
    if inv.has("qmsecmethods"):
        del fa.methods[:]
        fa.methods.extend(_qm(inv.get("qmsecmethods")))
    if inv.has("qmpfs"):
        fa.session_key_pfs = _bool(inv.get("qmpfs"))
    if inv.has("inpass"):
        fa.inbound_passthrough = _bool(inv.get("inpass"))
    if inv.has("soft"):
        fa.fallback_to_clear = _bool(inv.get("soft"))


def add_filteraction(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    fa = pb.FilterAction(name=_str(inv.get("name")))
    _apply_filteraction_settings(fa, inv, creating=True)
    write(ctx, view, [Put(fa)], inv)


def set_filteraction(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    fa = copy(cast(pb.FilterAction, select_one(view, Kind.FILTER_ACTION, inv)))
    _apply_filteraction_settings(fa, inv, creating=False)
    write(ctx, view, [Put(fa)], inv)


def delete_filteraction(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    write(ctx, view, [delete_of(o, Kind.FILTER_ACTION) for o in select(view, Kind.FILTER_ACTION, inv)], inv)


def show_filteraction(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    actions = [cast(pb.FilterAction, o) for o in select(view, Kind.FILTER_ACTION, inv)]
    if ctx.json:
        print_json(ctx, pb.StoreContents(filter_actions=actions))
        return
    ctx.say(renderer(ctx, view, inv).filter_actions(actions))


# ------------------------------------------------------------ rules


def _tunnel(value: object) -> str:
    if isinstance(value, S.DnsName):
        resolved = addresses.resolve(value.name, S.TUNNEL)
        return resolved[0]  # IPv4 first: Windows tunnel endpoints are IPv4 (windows-ipsec.md §2.5)
    return _str(value)


def _apply_rule_settings(view: ContentsView, rule: pb.Rule, inv: Invocation) -> None:
    if inv.has("newname"):
        rule.name = _str(inv.get("newname"))
    if inv.has("description"):
        rule.description = _str(inv.get("description"))
    if inv.has("filterlist"):
        rule.filter_list_id = lookup(view, Kind.FILTER_LIST, _str(inv.get("filterlist"))).id
    if inv.has("filteraction"):
        rule.filter_action_id = lookup(view, Kind.FILTER_ACTION, _str(inv.get("filteraction"))).id
    if inv.has("tunnel"):
        rule.tunnel_endpoint = _tunnel(inv.get("tunnel"))
    if inv.has("conntype"):
        rule.connection_type = CONNECTION_TYPES[_str(inv.get("conntype"))]
    if inv.has("activate"):
        rule.active = _bool(inv.get("activate"))
    methods = auth_methods(inv)
    if methods is not None:
        # Any of kerberos=, psk=, rootca= replaces the whole list (set rule remarks).
        del rule.auth_methods[:]
        rule.auth_methods.extend(methods)


def add_rule(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policy = copy(lookup_policy(view, _str(inv.get("policy"))))
    rule = pb.Rule(
        name=_str(inv.get("name")),
        connection_type=CONNECTION_TYPES[_str(default_of(S.CONNTYPE))],
        active=_bool(default_of(S.ACTIVATE)),
    )
    _apply_rule_settings(view, rule, inv)
    if auth_methods(inv) is None:
        rule.auth_methods.append(kerberos())  # Windows' default: Kerberos V5
    policy.rules.append(rule)
    write(ctx, view, [Put(policy)], inv)


def _is_default_rule_name(policy: pb.Policy, name: str) -> bool:
    return name_key(name) in DEFAULT_RULE_NAMES and not any(name_key(r.name) == name_key(name) for r in policy.rules)


def _default_rule_refusal(policy: pb.Policy, verb: str) -> ProtectedError:
    return ProtectedError(
        f'policy "{policy.name}": the default response rule is not a rule you can {verb}; '
        f'use set defaultrule policy="{policy.name}" (activate=no turns it off)'
    )


def find_rules(policy: pb.Policy, inv: Invocation, verb: str) -> list[int]:
    """Indexes (0-based) into policy.rules of the rules name=, id= or all pick."""
    if inv.has("id"):
        number = _int(inv.get("id"))
        if number == len(policy.rules) + 1 and policy.HasField("default_response_rule"):
            raise _default_rule_refusal(policy, verb)
        if number > len(policy.rules):
            raise NotFoundError(f'policy "{policy.name}" has no rule {number} (it has {len(policy.rules)})')
        return [number - 1]
    if inv.has("name"):
        name = _str(inv.get("name"))
        if _is_default_rule_name(policy, name):
            raise _default_rule_refusal(policy, verb)
        for index, rule in enumerate(policy.rules):
            if name_key(rule.name) == name_key(name):
                return [index]
        raise NotFoundError(f'policy "{policy.name}" has no rule named "{name}"')
    return list(range(len(policy.rules)))


def set_rule(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policy = copy(lookup_policy(view, _str(inv.get("policy"))))
    (index,) = find_rules(policy, inv, "change with set rule")
    _apply_rule_settings(view, policy.rules[index], inv)
    write(ctx, view, [Put(policy)], inv)


def delete_rule(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policy = copy(lookup_policy(view, _str(inv.get("policy"))))
    doomed = set(find_rules(policy, inv, "delete"))
    if not doomed:
        return
    keep = [r for i, r in enumerate(policy.rules) if i not in doomed]
    del policy.rules[:]
    policy.rules.extend(keep)
    write(ctx, view, [Put(policy)], inv)


def show_rule(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policy = lookup_policy(view, _str(inv.get("policy")))
    picked: list[int | None]
    names_default = inv.has("name") and _is_default_rule_name(policy, _str(inv.get("name")))
    numbers_default = inv.has("id") and _int(inv.get("id")) == len(policy.rules) + 1
    if names_default or numbers_default:
        picked = [None]
    else:
        picked = list(find_rules(policy, inv, "show"))
        if not inv.has("name") and not inv.has("id"):
            picked.append(None)  # all rules: the default response rule comes last, as netsh numbers it
    kind = inv.get("type")
    if kind == "tunnel":
        picked = [i for i in picked if i is not None and policy.rules[i].tunnel_endpoint]
    elif kind == "transport":
        picked = [i for i in picked if i is None or not policy.rules[i].tunnel_endpoint]
    if ctx.json:
        shown = copy(policy)
        del shown.rules[:]
        shown.rules.extend(policy.rules[i] for i in picked if i is not None)
        if None not in picked:
            shown.ClearField("default_response_rule")
        print_json(ctx, pb.StoreContents(policies=[shown]))
        return
    ctx.say(renderer(ctx, view, inv).rules(policy, picked))


def set_defaultrule(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policy = copy(lookup_policy(view, _str(inv.get("policy"))))
    rule = policy.default_response_rule
    if inv.has("activate"):
        rule.active = _bool(inv.get("activate"))
    if inv.has("qmpfs"):
        rule.session_key_pfs = _bool(inv.get("qmpfs"))
    if inv.has("qmsecmethods"):
        del rule.methods[:]
        rule.methods.extend(_qm(inv.get("qmsecmethods")))
    methods = auth_methods(inv)
    if methods is not None:
        del rule.auth_methods[:]
        rule.auth_methods.extend(methods)
    write(ctx, view, [Put(policy)], inv)


# ------------------------------------------------------------ the whole store


def show_all(ctx: Context, inv: Invocation) -> None:
    view = ctx.fetch()
    policies = [cast(pb.Policy, p) for p in _by_name(view.objects(Kind.POLICY))]
    lists = [cast(pb.FilterList, p) for p in _by_name(view.objects(Kind.FILTER_LIST))]
    actions = [cast(pb.FilterAction, p) for p in _by_name(view.objects(Kind.FILTER_ACTION))]
    if ctx.json:
        print_json(ctx, pb.StoreContents(policies=policies, filter_lists=lists, filter_actions=actions))
        return
    r = renderer(ctx, view, inv)
    ctx.say("\n".join([r.policies(policies), r.filter_lists(lists), r.filter_actions(actions)]))


def delete_all(ctx: Context, inv: Invocation) -> None:
    ctx.client.delete_all()


def restoredefaults(ctx: Context, inv: Invocation) -> None:
    ctx.client.restore_defaults()


def set_store(ctx: Context, inv: Invocation) -> None:
    """`set store location=local|persistent|domain [domain=NAME]` for the rest of this netsh session."""
    location = _str(inv.get("location"))
    domain = _str(inv.get("domain")).strip() if inv.has("domain") else ""
    if location != "domain":
        if domain:
            raise CommandError(f"domain={domain} goes with location=domain, not location={location}")
        name = SOCKET_FILE if location == "local" else PERSISTENT_SOCKET_FILE
        ctx.use(AdminClient(f"unix:{os.path.join(ctx.agent_dir, name)}", agent_socket=True))
        return
    client = AdminClient(server_target(ctx.server or None), cert_dir=ctx.cert_dir)
    if domain:
        served = served_domain(client)
        if served.casefold().rstrip(".") != domain.casefold().rstrip("."):
            client.close()
            where = f"the domain {served}" if served else "no directory domain (it has no --directory)"
            raise CommandError(f"the policy server at {client.target} serves {where}, not {domain}")
    ctx.use(client)


def served_domain(client: AdminClient) -> str:
    """The DNS domain of the policy server's directory (its base DN's DC= parts), "" without --directory."""
    from policyagent.directory.connector import domain_of  # ldap3: only when domain= is given

    status = client.directory_status()
    if status.state in (directory_pb.DIRECTORY_STATE_NOT_CONFIGURED, directory_pb.DIRECTORY_STATE_UNSPECIFIED):
        return ""
    return domain_of(status.base_dn)


def show_store(ctx: Context, inv: Invocation) -> None:
    if ctx.json:
        ctx.say(json.dumps({"location": ctx.location, "target": ctx.client.target}))
        return
    ctx.say(f"Store: {ctx.store_label()}")


def _is_ldif(path: Path) -> bool:
    return path.suffix.lower() == ".ldif"


def exportpolicy(ctx: Context, inv: Invocation) -> None:
    path = Path(_str(inv.get("file")))
    if _is_ldif(path):
        # [MS-GPIPSEC] objects for CN=IP Security,CN=System of the server's directory (docs/export-format.md).
        text = ctx.client.export_ldif().ldif
    else:
        text = exportfmt.dumps(ctx.client.export_policies())
    # The file holds pre-shared keys in clear: only the owner may read it, even if it existed.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
            f.write(text)
    finally:
        os.close(fd)


def importpolicy(ctx: Context, inv: Invocation) -> None:
    path = Path(_str(inv.get("file")))
    text = path.read_text(encoding="utf-8")
    if _is_ldif(path):
        ctx.client.import_ldif(text)
        return
    ctx.client.import_policies(exportfmt.loads(text, source=str(path)))


def dump_store(ctx: Context, inv: Invocation) -> None:
    ctx.out.write(dump.dump_script(ctx.client.get_store()))


def show_gpoassignedpolicy(ctx: Context, inv: Invocation) -> None:
    """The IPsec policy each GPO assigns (Windows Server 2003's `show gpoassignedpolicy`), and its links."""
    from clients.assignment.client import AssignmentClient

    topology = AssignmentClient.sharing(ctx.client).topology()
    gpos = sorted(topology.gpos, key=lambda g: name_key(g.name))
    if inv.has("name"):
        wanted = name_key(_str(inv.get("name")))
        gpos = [g for g in gpos if name_key(g.name) == wanted or g.id.casefold() == wanted]
        if not gpos:
            raise NotFoundError(f'there is no Group Policy object named "{_str(inv.get("name"))}"')
    if ctx.json:
        ctx.say(json_format.MessageToJson(type(topology)(gpos=gpos, links=topology.links)))
        return
    if not gpos:
        ctx.say("No Group Policy objects in the registry (policyagent gpo add NAME --policy POLICY).")
        return
    for gpo in gpos:
        links = []
        for lk in topology.links:
            if lk.gpo == gpo.id:
                flags = (", enforced" if lk.enforced else "") + ("" if lk.enabled else ", link disabled")
                links.append(f"{lk.scope} (order {lk.order}{flags})")
        ctx.say(
            f"GPO Name               : {gpo.name}\n"
            f"GPO Id                 : {gpo.id}\n"
            f"GPO Enabled            : {'Yes' if gpo.enabled else 'No'}\n"
            f"Assigned Policy Name   : {gpo.policy_name or 'None'}\n"
            f"Assigned Policy Id     : {gpo.policy_id or 'None'}\n"
            f"Linked To              : {'; '.join(links) or 'not linked'}\n"
        )


Handler = Callable[[Context, Invocation], None]

HANDLERS: dict[tuple[str, ...], Handler] = {
    ("add", "policy"): add_policy,
    ("set", "policy"): set_policy,
    ("delete", "policy"): delete_policy,
    ("show", "policy"): show_policy,
    ("add", "filterlist"): add_filterlist,
    ("set", "filterlist"): set_filterlist,
    ("delete", "filterlist"): delete_filterlist,
    ("show", "filterlist"): show_filterlist,
    ("add", "filter"): add_filter,
    ("delete", "filter"): delete_filter,
    ("add", "filteraction"): add_filteraction,
    ("set", "filteraction"): set_filteraction,
    ("delete", "filteraction"): delete_filteraction,
    ("show", "filteraction"): show_filteraction,
    ("add", "rule"): add_rule,
    ("set", "rule"): set_rule,
    ("delete", "rule"): delete_rule,
    ("show", "rule"): show_rule,
    ("set", "defaultrule"): set_defaultrule,
    ("show", "all"): show_all,
    ("delete", "all"): delete_all,
    ("set", "store"): set_store,
    ("show", "store"): show_store,
    ("exportpolicy",): exportpolicy,
    ("importpolicy",): importpolicy,
    ("restoredefaults",): restoredefaults,
    ("dump",): dump_store,
    ("show", "gpoassignedpolicy"): show_gpoassignedpolicy,
}


def run(ctx: Context, inv: Invocation) -> None:
    HANDLERS[inv.command.words](ctx, inv)
