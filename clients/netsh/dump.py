"""`dump`: a netsh script that makes any store identical to the dumped one.

The script empties the target store (`delete all`), re-creates the defaults
(`restoredefaults`: the default objects come back with their fixed ids), brings
each default object the source still has to the source's content with `set`
commands, deletes the defaults the source no longer has, adds every other
object, and assigns the assigned policy. It names objects only by name and
carries no ids, revisions or times, so two stores with the same content dump to
the same text, and dump → run the script on a new store → dump again gives the
same text. Objects come in a fixed order: kind, then case-insensitive name.

Steps, in the order that keeps every intermediate store valid:
  1. delete the default policies the source lacks;
  2. free the default filter lists and actions from default policies whose rules changed
     (`delete rule all`), so that
  3. the default filter lists and actions the source lacks can be deleted;
  4. bring the remaining default filter lists and actions to the source's content
     (renames first, through temporary names when names are swapped);
  5. add the source's other filter lists (with their filters) and filter actions;
  6. bring the default policies to the source's content and re-add their changed rules;
  7. add the source's other policies with their rules and default response rules;
  8. assign the assigned policy.
Filter DNS names are informational (a name is resolved once, when the filter is
made) and are not part of a dump: the script re-creates filters by address.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from clients.netsh.newobjects import new_policy
from clients.netsh.syntax import quote
from policyagent.model import defaults
from policyagent.model.objects import StoreObject, contents_objects, name_key
from policyagent.model.settings import SERVER_KEYWORDS, format_mmsecmethods, format_qmsecmethods, protocol_text
from policyagent.pb import pb

T = TypeVar("T", bound=StoreObject)
Params = list[tuple[str, str]]

PREFIX = "ipsec static"
HEADER = """\
# netsh ipsec static dump
# Run it with `netsh -f FILE` against any policy server: it deletes everything in that server's
# store and makes the store identical to the one dumped.
# This is a full backup: it contains the pre-shared keys in clear text. Keep it secret.
"""
_KEYWORD_NAMES = {kind: word for word, kind in SERVER_KEYWORDS.items()}
_ACTION_WORDS = {pb.ACTION_TYPE_PERMIT: "permit", pb.ACTION_TYPE_BLOCK: "block", pb.ACTION_TYPE_NEGOTIATE: "negotiate"}
_CONNTYPE_WORDS = {
    pb.CONNECTION_TYPE_ALL: "all",
    pb.CONNECTION_TYPE_LAN: "lan",
    pb.CONNECTION_TYPE_REMOTE_ACCESS: "dialup",
}
# A name no object is expected to have, for renames that swap names among the defaults.
_TEMP_PREFIX = "netsh-dump-rename: "


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def command(words: str, params: Sequence[tuple[str, str]] = ()) -> str:
    parts = [PREFIX, words, *(f"{tag}={quote(value)}" for tag, value in params)]
    return " ".join(parts)


def _sorted(objs: Iterable[T]) -> list[T]:
    # Names are unique per kind case-insensitively, so this order needs no ids.
    return sorted(objs, key=lambda o: (name_key(o.name), o.name))


# ------------------------------------------------------------ parameters


def address_param(addr: pb.Address) -> str:
    if addr.kind == pb.ADDRESS_KIND_ME:
        return "me"
    if addr.kind == pb.ADDRESS_KIND_ANY:
        return "any"
    if addr.kind in _KEYWORD_NAMES:
        return _KEYWORD_NAMES[addr.kind]
    return addr.ip


def _all_ones(addr: pb.Address) -> str:
    return "128" if ":" in addr.ip else "255.255.255.255"


def filter_params(flt: pb.Filter, *, for_delete: bool) -> Params:
    """add filter parameters; for delete filter, every match field is spelled out so only this filter matches."""
    out: Params = []
    for tags, addr in ((("srcaddr", "srcmask"), flt.source), (("dstaddr", "dstmask"), flt.destination)):
        out.append((tags[0], address_param(addr)))
        if addr.kind == pb.ADDRESS_KIND_SUBNET:
            out.append((tags[1], addr.mask))
        elif addr.kind == pb.ADDRESS_KIND_HOST and for_delete:
            out.append((tags[1], _all_ones(addr)))
    if flt.description and not for_delete:
        out.append(("description", flt.description))
    if flt.protocol or for_delete:
        out.append(("protocol", protocol_text(flt.protocol)))
    if flt.source_port or for_delete:
        out.append(("srcport", str(flt.source_port)))
    if flt.destination_port or for_delete:
        out.append(("dstport", str(flt.destination_port)))
    out.append(("mirrored", yes_no(flt.mirrored)))
    return out


def rootca_param(cert: pb.CertificateAuth) -> str:
    # settings.py reads \' as a quote inside the CA name.
    name = cert.root_ca.replace('"', "\\'")
    return f"{name} certmap:{yes_no(cert.cert_to_account_mapping)} excludecaname:{yes_no(cert.exclude_ca_name)}"


def auth_params(methods: Sequence[pb.AuthMethod]) -> Params:
    out: Params = []
    for m in methods:
        which = m.WhichOneof("method")
        if which == "kerberos":
            out.append(("kerberos", "yes"))
        elif which == "preshared_key":
            out.append(("psk", m.preshared_key.key))
        elif which == "certificate":
            out.append(("rootca", rootca_param(m.certificate)))
    # kerberos=no alone gives an empty list (a permit or block rule needs no authentication).
    return out or [("kerberos", "no")]


def filter_action_params(fa: pb.FilterAction) -> Params:
    out: Params = [("description", fa.description), ("action", _ACTION_WORDS[fa.action])]
    if fa.action == pb.ACTION_TYPE_NEGOTIATE:
        out += [
            ("qmpfs", yes_no(fa.session_key_pfs)),
            ("inpass", yes_no(fa.inbound_passthrough)),
            ("soft", yes_no(fa.fallback_to_clear)),
            ("qmsecmethods", format_qmsecmethods(list(fa.methods))),
        ]
    return out


def policy_params(policy: pb.Policy) -> Params:
    isakmp = policy.isakmp
    # ikeversion is a policyagent extension: written only when it is not Windows' IKEv1.
    version: Params = [("ikeversion", "2")] if isakmp.ike_version == 2 else []
    return [
        ("description", policy.description),
        ("mmpfs", yes_no(isakmp.master_key_pfs)),
        ("qmpermm", str(isakmp.qm_per_mm)),
        ("mmlifetime", str(isakmp.lifetime_minutes)),
        *version,
        ("activatedefaultrule", yes_no(policy.default_response_rule.active)),
        ("pollinginterval", str(policy.polling_interval_minutes)),
        ("mmsecmethods", format_mmsecmethods(list(isakmp.methods))),
    ]


def default_rule_params(rule: pb.DefaultResponseRule) -> Params:
    return [
        ("activate", yes_no(rule.active)),
        ("qmpfs", yes_no(rule.session_key_pfs)),
        ("qmsecmethods", format_qmsecmethods(list(rule.methods))),
        *auth_params(rule.auth_methods),
    ]


def _drop_empty_description(params: Params) -> Params:
    # `add` starts with an empty description; `set` must spell it out to clear one.
    return [(tag, value) for tag, value in params if tag != "description" or value]


# ------------------------------------------------------------ comparing content


def _without_ids(msg: T) -> T:
    out = type(msg)()
    out.CopyFrom(msg)  # type: ignore[arg-type]
    out.ClearField("revision")
    out.ClearField("modified_unix_ms")
    out.ClearField("id")
    if isinstance(out, pb.FilterList):
        for flt in out.filters:
            flt.ClearField("id")
    elif isinstance(out, pb.Policy):
        out.ClearField("assigned")
        for rule in out.rules:
            rule.ClearField("id")
        out.default_response_rule.ClearField("id")
    return out


def _same_filters(a: pb.FilterList, b: pb.FilterList) -> bool:
    return list(_without_ids(a).filters) == list(_without_ids(b).filters)


def _same_rules(a: pb.Policy, b: pb.Policy) -> bool:
    return list(_without_ids(a).rules) == list(_without_ids(b).rules)


def _same_default_rule(a: pb.DefaultResponseRule, b: pb.DefaultResponseRule) -> bool:
    x, y = pb.DefaultResponseRule(), pb.DefaultResponseRule()
    x.CopyFrom(a)
    y.CopyFrom(b)
    x.ClearField("id")
    y.ClearField("id")
    return x == y


# ------------------------------------------------------------ the script


class _Dumper:
    def __init__(self, contents: pb.StoreContents) -> None:
        self.lines: list[str] = []
        self.pending = ""
        self.source = contents
        self.defaults = defaults.default_contents()
        self.default_ids = {o.id for o in contents_objects(self.defaults)}
        # id -> name in the source, to name a rule's filter list and filter action
        self.names = {o.id: o.name for o in contents_objects(contents)}

    def section(self, text: str) -> None:
        """Start a section; its comment is written only if a command follows."""
        self.pending = text

    def emit(self, words: str, params: Sequence[tuple[str, str]] = ()) -> None:
        if self.pending:
            self.lines += ["", f"# {self.pending}"]
            self.pending = ""
        self.lines.append(command(words, params))

    def split(self, source: Sequence[T], default: Sequence[T]) -> tuple[list[tuple[T, T]], list[T], list[T]]:
        """(source object, its default) pairs for defaults still present; defaults gone; user objects."""
        by_id = {o.id: o for o in source}
        present = [(by_id[d.id], d) for d in _sorted(default) if d.id in by_id]
        gone = [d for d in _sorted(default) if d.id not in by_id]
        own = _sorted(o for o in source if o.id not in self.default_ids)
        return present, gone, own

    def renames(self, kind_word: str, pairs: Sequence[tuple[T, T]]) -> dict[str, str]:
        """Rename defaults whose name changed; returns default id -> the name it has afterwards."""
        current = {d.id: d.name for _, d in pairs}
        renamed = [(s, d) for s, d in pairs if s.name != d.name]
        taken = {name_key(d.name) for _, d in pairs}
        if any(name_key(s.name) in taken and name_key(s.name) != name_key(d.name) for s, d in renamed):
            # A rename onto another default's name: move every renamed one aside first.
            for _, d in renamed:
                temp = _TEMP_PREFIX + d.name
                self.emit(f"set {kind_word}", [("name", current[d.id]), ("newname", temp)])
                current[d.id] = temp
        for s, d in renamed:
            self.emit(f"set {kind_word}", [("name", current[d.id]), ("newname", s.name)])
            current[d.id] = s.name
        return current

    def rule_params(self, policy: pb.Policy, rule: pb.Rule) -> Params:
        out: Params = [
            ("name", rule.name),
            ("policy", policy.name),
            ("filterlist", self.names.get(rule.filter_list_id, rule.filter_list_id)),
            ("filteraction", self.names.get(rule.filter_action_id, rule.filter_action_id)),
        ]
        if rule.description:
            out.append(("description", rule.description))
        if rule.tunnel_endpoint:
            out.append(("tunnel", rule.tunnel_endpoint))
        out += [
            ("conntype", _CONNTYPE_WORDS[rule.connection_type]),
            ("activate", yes_no(rule.active)),
            *auth_params(rule.auth_methods),
        ]
        return out

    def add_rules(self, policy: pb.Policy) -> None:
        for rule in policy.rules:
            self.emit("add rule", self.rule_params(policy, rule))

    def run(self) -> str:
        src, dfl = self.source, self.defaults
        pol_present, pol_gone, pol_own = self.split(src.policies, dfl.policies)
        fl_present, fl_gone, fl_own = self.split(src.filter_lists, dfl.filter_lists)
        fa_present, fa_gone, fa_own = self.split(src.filter_actions, dfl.filter_actions)

        self.lines.append(HEADER.rstrip("\n"))
        self.section("Start from an empty store holding only the default objects.")
        self.emit("delete all")
        self.emit("restoredefaults")

        changed_rules = [(s, d) for s, d in pol_present if not _same_rules(s, d)]
        self.section("Default objects this store does not have, and default rules it changed.")
        for d in pol_gone:
            self.emit("delete policy", [("name", d.name)])
        for _, d in changed_rules:
            self.emit("delete rule all", [("policy", d.name)])
        for gone_fl in fl_gone:
            self.emit("delete filterlist", [("name", gone_fl.name)])
        for gone_fa in fa_gone:
            self.emit("delete filteraction", [("name", gone_fa.name)])

        self.section("Default filter lists and filter actions, as this store has them.")
        names = self.renames("filterlist", fl_present)
        for src_fl, dfl_fl in fl_present:
            if src_fl.description != dfl_fl.description:
                self.emit("set filterlist", [("name", names[dfl_fl.id]), ("description", src_fl.description)])
            if not _same_filters(src_fl, dfl_fl):
                for flt in dfl_fl.filters:
                    self.emit("delete filter", [("filterlist", src_fl.name), *filter_params(flt, for_delete=True)])
                for flt in src_fl.filters:
                    self.emit("add filter", [("filterlist", src_fl.name), *filter_params(flt, for_delete=False)])
        names = self.renames("filteraction", fa_present)
        for src_fa, dfl_fa in fa_present:
            if filter_action_params(src_fa) != filter_action_params(dfl_fa):
                self.emit("set filteraction", [("name", names[dfl_fa.id]), *filter_action_params(src_fa)])

        self.section("Filter lists and filter actions.")
        for fl in fl_own:
            params: Params = [("name", fl.name)]
            if fl.description:
                params.append(("description", fl.description))
            self.emit("add filterlist", params)
            for flt in fl.filters:
                self.emit("add filter", [("filterlist", fl.name), *filter_params(flt, for_delete=False)])
        for fa in fa_own:
            self.emit("add filteraction", [("name", fa.name), *_drop_empty_description(filter_action_params(fa))])

        self.section("Default policies, as this store has them.")
        self.renames("policy", pol_present)
        for s, d in pol_present:
            if policy_params(s) != policy_params(d):
                self.emit("set policy", [("name", s.name), *policy_params(s)])
            if not _same_rules(s, d):
                self.add_rules(s)
            if not _same_default_rule(s.default_response_rule, d.default_response_rule):
                self.emit("set defaultrule", [("policy", s.name), *default_rule_params(s.default_response_rule)])

        self.section("Policies.")
        for p in pol_own:
            # add policy creates a default response rule: say only how this one differs.
            self.emit("add policy", [("name", p.name), *_drop_empty_description(policy_params(p))])
            self.add_rules(p)
            created = new_policy(p.name).default_response_rule
            created.active = p.default_response_rule.active
            if not _same_default_rule(p.default_response_rule, created):
                self.emit("set defaultrule", [("policy", p.name), *default_rule_params(p.default_response_rule)])

        assigned = [p for p in _sorted(src.policies) if p.assigned]
        if assigned:
            self.section("The assigned policy.")
            for p in assigned:
                self.emit("set policy", [("name", p.name), ("assign", "yes")])
        return "\n".join(self.lines) + "\n"


def dump_script(contents: pb.StoreContents) -> str:
    """The netsh script that makes a store's content equal to `contents` (see the module docstring)."""
    return _Dumper(contents).run()
