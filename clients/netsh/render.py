"""`show` output: Windows-like "Label : value" lists, or aligned tables.

level=terse (normal is the same) gives each object's own settings and, for a
policy, one block per rule naming its filter list and filter action; verbose
also expands those: the filters of each filter list and the security methods of
each filter action. Pre-shared keys are always masked.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Sequence

from policyagent.model import algorithms as alg
from policyagent.model.objects import Kind
from policyagent.model.settings import SERVER_KEYWORDS, format_mmsecmethods, format_qmsecmethod, protocol_text
from policyagent.model.view import ContentsView
from policyagent.pb import pb

LABEL_WIDTH = 28
NARROW_CELL = 24  # wide=no truncates table cells to this many characters

ADDRESS_DISPLAY: dict[int, str] = {
    pb.ADDRESS_KIND_ME: "<My IP Address>",
    pb.ADDRESS_KIND_ANY: "<Any IP Address>",
    pb.ADDRESS_KIND_DNS_SERVERS: "<DNS Servers>",
    pb.ADDRESS_KIND_WINS_SERVERS: "<WINS Servers>",
    pb.ADDRESS_KIND_DHCP_SERVER: "<DHCP Server>",
    pb.ADDRESS_KIND_DEFAULT_GATEWAY: "<Default Gateway>",
}
assert len(SERVER_KEYWORDS) + 2 == len(ADDRESS_DISPLAY)
CONNECTION_DISPLAY: dict[int, str] = {
    pb.CONNECTION_TYPE_ALL: "ALL",
    pb.CONNECTION_TYPE_LAN: "LAN",
    pb.CONNECTION_TYPE_REMOTE_ACCESS: "DIALUP",
}
ACTION_DISPLAY: dict[int, str] = {
    pb.ACTION_TYPE_PERMIT: "PERMIT",
    pb.ACTION_TYPE_BLOCK: "BLOCK",
    pb.ACTION_TYPE_NEGOTIATE: "NEGOTIATE SECURITY",
}
DEFAULT_RULE_NAME = "Default Response Rule"
DYNAMIC_LIST = "<Dynamic>"
DEFAULT_RESPONSE_ACTION = "Default Response"


def yes_no(value: bool) -> str:
    return "YES" if value else "NO"


def modified(ms: int) -> str:
    if not ms:
        return "unknown"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def port_text(port: int) -> str:
    return str(port) if port else "ANY"


def field(label: str, value: str | Sequence[str], indent: int = 0) -> list[str]:
    """`Label      : value`; a list value continues on aligned lines."""
    values = [value] if isinstance(value, str) else list(value) or [""]
    head = " " * indent + label.ljust(max(LABEL_WIDTH - indent, len(label))) + " : "
    lines = [(head + values[0]).rstrip()]
    lines += [" " * len(head) + v for v in values[1:]]
    return lines


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], wide: bool, indent: int = 0) -> list[str]:
    def cell(text: str) -> str:
        text = " ".join(text.split())
        if not wide and len(text) > NARROW_CELL:
            return text[: NARROW_CELL - 3] + "..."
        return text

    cells = [[cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    pad = " " * indent

    def line(values: Sequence[str]) -> str:
        return (pad + "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True))).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]


class Renderer:
    """Formats objects of one fetched store (the view resolves a rule's filter list and action)."""

    def __init__(
        self,
        view: ContentsView,
        *,
        store: str,
        verbose: bool,
        table: bool,
        wide: bool,
        resolvedns: bool,
        mask: str,
    ) -> None:
        self.view = view
        self.store = store
        self.verbose = verbose
        self.table = table
        self.wide = wide
        self.resolvedns = resolvedns
        self.mask = mask

    # -------------------------------------------------------- values

    def _filter_list(self, object_id: str) -> pb.FilterList | None:
        found = self.view.get(Kind.FILTER_LIST, object_id)
        return found if isinstance(found, pb.FilterList) else None

    def _filter_action(self, object_id: str) -> pb.FilterAction | None:
        found = self.view.get(Kind.FILTER_ACTION, object_id)
        return found if isinstance(found, pb.FilterAction) else None

    def auth_text(self, method: pb.AuthMethod) -> str:
        which = method.WhichOneof("method")
        if which == "kerberos":
            return "Kerberos"
        if which == "preshared_key":
            return f"Preshared Key: {self.mask}"
        if which == "certificate":
            c = method.certificate
            return (
                f'Root CA: "{c.root_ca}" (certmap: {yes_no(c.cert_to_account_mapping)}, '
                f"excludecaname: {yes_no(c.exclude_ca_name)})"
            )
        return "<none>"

    def auth_lines(self, methods: Sequence[pb.AuthMethod]) -> list[str]:
        if not methods:
            return ["NONE"]
        return [f"{i}. {self.auth_text(m)}" for i, m in enumerate(methods, start=1)]

    def address(self, addr: pb.Address) -> str:
        return ADDRESS_DISPLAY.get(addr.kind, addr.ip)

    def mask_of(self, addr: pb.Address) -> str:
        if addr.kind == pb.ADDRESS_KIND_SUBNET:
            return addr.mask
        if addr.kind == pb.ADDRESS_KIND_HOST:
            return "128" if ":" in addr.ip else "255.255.255.255"
        if addr.kind == pb.ADDRESS_KIND_ANY:
            return "0.0.0.0"
        return ""

    def dns_name(self, addr: pb.Address) -> str:
        if addr.dns_name:
            return addr.dns_name
        if self.resolvedns and addr.kind == pb.ADDRESS_KIND_HOST:
            try:
                return socket.gethostbyaddr(addr.ip)[0]
            except OSError:
                return "<not resolved>"
        return ""

    def qm_methods(self, methods: Sequence[pb.QuickModeMethod], indent: int) -> list[str]:
        rows = []
        for m in methods:
            ah = alg.integrity_name(m.ah.integrity) if m.HasField("ah") else "NONE"
            esp_i = alg.integrity_name(m.esp.integrity) if m.HasField("esp") else "NONE"
            esp_c = alg.cipher_name(m.esp.encryption) if m.HasField("esp") else "NONE"
            rows.append([ah, esp_i, esp_c, str(m.lifetime_kb), str(m.lifetime_seconds), format_qmsecmethod(m)])
        headers = ["AH", "ESP Integrity", "ESP Encryption", "Lifetime (KB)", "Lifetime (secs)", "netsh"]
        return table(headers, rows, True, indent) if rows else [" " * indent + "NONE"]

    def mm_methods(self, methods: Sequence[pb.MainModeMethod], indent: int) -> list[str]:
        rows = [
            [
                alg.cipher_name(m.encryption),
                alg.integrity_name(m.integrity),
                f"{alg.dh_netsh(m.dh_group)} = {alg.dh_display(m.dh_group)}, IKE group {int(m.dh_group)}",
            ]
            for m in methods
        ]
        return table(["Encryption", "Integrity", "DH Group"], rows, True, indent)

    # -------------------------------------------------------- policies

    def policy_block(self, policy: pb.Policy) -> list[str]:
        isakmp = policy.isakmp
        lines = [
            *field("Policy Name", policy.name),
            *field("Description", policy.description),
            *field("Store", self.store),
            *field("Last Modified", modified(policy.modified_unix_ms)),
            *field("GUID", policy.id),
            *field("Master PFS", yes_no(isakmp.master_key_pfs)),
            *field("IKE Version", "IKEv2" if isakmp.ike_version == 2 else "IKEv1 (main mode + quick mode)"),
            *field("Polling Interval", f"{policy.polling_interval_minutes} minutes"),
            *field(
                "Main Mode Life Time", f"{isakmp.lifetime_minutes} minutes / {isakmp.qm_per_mm} Quick Mode sessions"
            ),
        ]
        if self.verbose:
            lines += ["Main Mode Security Methods", *self.mm_methods(isakmp.methods, 2)]
        else:
            lines += field("Main Mode Security Methods", format_mmsecmethods(list(isakmp.methods)))
        lines += field("Assigned", yes_no(policy.assigned))
        lines += field("No. of Rules", str(len(policy.rules) + int(policy.HasField("default_response_rule"))))
        lines += ["", "Rule Details", "------------"]
        for index in [*range(len(policy.rules)), None]:
            lines += ["", *self.rule_block(policy, index)]
        return lines

    def rule_block(self, policy: pb.Policy, index: int | None) -> list[str]:
        """One rule; index None is the default response rule, numbered after the others."""
        if index is None:
            return self.default_rule_block(policy)
        rule = policy.rules[index]
        fl = self._filter_list(rule.filter_list_id)
        fa = self._filter_action(rule.filter_action_id)
        lines = [
            *field("Rule ID", f"{index + 1}, GUID = {rule.id}"),
            *field("Rule Name", rule.name),
            *field("Description", rule.description),
            *field("Filter List", fl.name if fl else f"<missing {rule.filter_list_id}>"),
        ]
        if self.verbose and fl is not None:
            lines += self.filter_list_details(fl, indent=2)
        lines += field("Filter Action", fa.name if fa else f"<missing {rule.filter_action_id}>")
        if self.verbose and fa is not None:
            lines += self.filter_action_details(fa, indent=2)
        lines += [
            *field("Authentication Methods", self.auth_lines(rule.auth_methods)),
            *field("Tunnel Setting", rule.tunnel_endpoint or "None"),
            *field("Connection Type", CONNECTION_DISPLAY.get(rule.connection_type, "?")),
            *field("Active", yes_no(rule.active)),
        ]
        return lines

    def default_rule_block(self, policy: pb.Policy) -> list[str]:
        rule = policy.default_response_rule
        lines = [
            *field("Rule ID", f"{len(policy.rules) + 1}, GUID = {rule.id}"),
            *field("Rule Name", DEFAULT_RULE_NAME),
            *field("Filter List", DYNAMIC_LIST),
            *field("Filter Action", DEFAULT_RESPONSE_ACTION),
        ]
        if self.verbose:
            lines += [
                *field("Action", ACTION_DISPLAY[pb.ACTION_TYPE_NEGOTIATE], 2),
                *field("QMPFS", yes_no(rule.session_key_pfs), 2),
                "  Security Methods",
                *self.qm_methods(rule.methods, 4),
            ]
        lines += [
            *field("Authentication Methods", self.auth_lines(rule.auth_methods)),
            *field("Tunnel Setting", "None"),
            *field("Connection Type", CONNECTION_DISPLAY[pb.CONNECTION_TYPE_ALL]),
            *field("Active", yes_no(rule.active)),
        ]
        return lines

    def rule_rows(self, policy: pb.Policy, picked: Sequence[int | None]) -> list[list[str]]:
        rows = []
        for index in picked:
            if index is None:
                d = policy.default_response_rule
                rows.append(
                    [
                        str(len(policy.rules) + 1),
                        DEFAULT_RULE_NAME,
                        DYNAMIC_LIST,
                        DEFAULT_RESPONSE_ACTION,
                        ", ".join(self.auth_text(m) for m in d.auth_methods),
                        "None",
                        "ALL",
                        yes_no(d.active),
                    ]
                )
                continue
            rule = policy.rules[index]
            fl = self._filter_list(rule.filter_list_id)
            fa = self._filter_action(rule.filter_action_id)
            rows.append(
                [
                    str(index + 1),
                    rule.name,
                    fl.name if fl else "?",
                    fa.name if fa else "?",
                    ", ".join(self.auth_text(m) for m in rule.auth_methods) or "NONE",
                    rule.tunnel_endpoint or "None",
                    CONNECTION_DISPLAY.get(rule.connection_type, "?"),
                    yes_no(rule.active),
                ]
            )
        return rows

    RULE_HEADERS = ("ID", "Rule Name", "Filter List", "Filter Action", "Authentication", "Tunnel", "Conn.", "Active")

    def policies(self, policies: Sequence[pb.Policy]) -> str:
        if not policies:
            return "No policies in the store.\n"
        if self.table:
            rows = [[p.name, yes_no(p.assigned), str(len(p.rules) + 1), modified(p.modified_unix_ms)] for p in policies]
            lines = table(["Policy Name", "Assigned", "Rules", "Last Modified"], rows, self.wide)
            if self.verbose:
                for p in policies:
                    all_rules: list[int | None] = [*range(len(p.rules)), None]
                    lines += ["", f'Rules of policy "{p.name}"', ""]
                    lines += table(self.RULE_HEADERS, self.rule_rows(p, all_rules), self.wide)
            return "\n".join(lines) + "\n"
        blocks = ["\n".join(self.policy_block(p)) for p in policies]
        return "\n\n".join(blocks) + "\n"

    def rules(self, policy: pb.Policy, picked: Sequence[int | None]) -> str:
        if not picked:
            return f'No matching rules in policy "{policy.name}".\n'
        if self.table:
            return "\n".join(table(self.RULE_HEADERS, self.rule_rows(policy, picked), self.wide)) + "\n"
        head = field("Policy Name", policy.name)
        blocks = ["\n".join(self.rule_block(policy, i)) for i in picked]
        return "\n".join(head) + "\n\n" + "\n\n".join(blocks) + "\n"

    # -------------------------------------------------------- filter lists

    def filter_lines(self, flt: pb.Filter, indent: int) -> list[str]:
        lines = [
            *field("Description", flt.description, indent),
            *field("Mirrored", yes_no(flt.mirrored), indent),
        ]
        for side, addr in (("Source", flt.source), ("Destination", flt.destination)):
            lines += field(f"{side} IP Address", self.address(addr), indent)
            mask = self.mask_of(addr)
            if mask:
                lines += field(f"{side} Mask", mask, indent)
            name = self.dns_name(addr)
            if name:
                lines += field(f"{side} DNS Name", name, indent)
        lines += [
            *field("Protocol", protocol_text(flt.protocol), indent),
            *field("Source Port", port_text(flt.source_port), indent),
            *field("Destination Port", port_text(flt.destination_port), indent),
        ]
        return lines

    def filter_list_details(self, fl: pb.FilterList, indent: int) -> list[str]:
        lines = [*field("Description", fl.description, indent), *field("No. of Filters", str(len(fl.filters)), indent)]
        for number, flt in enumerate(fl.filters, start=1):
            lines += [" " * indent + f"Filter {number}", *self.filter_lines(flt, indent + 2)]
        return lines

    def filter_rows(self, fl: pb.FilterList) -> list[list[str]]:
        return [
            [
                self.address(f.source) + (f" ({f.source.dns_name})" if f.source.dns_name else ""),
                self.mask_of(f.source),
                self.address(f.destination) + (f" ({f.destination.dns_name})" if f.destination.dns_name else ""),
                self.mask_of(f.destination),
                protocol_text(f.protocol),
                port_text(f.source_port),
                port_text(f.destination_port),
                yes_no(f.mirrored),
            ]
            for f in fl.filters
        ]

    FILTER_HEADERS = ("Source", "Src Mask", "Destination", "Dst Mask", "Protocol", "Src Port", "Dst Port", "Mirrored")

    def filter_lists(self, lists: Sequence[pb.FilterList]) -> str:
        if not lists:
            return "No filter lists in the store.\n"
        if self.table:
            rows = [[fl.name, str(len(fl.filters)), modified(fl.modified_unix_ms)] for fl in lists]
            lines = table(["Filter List Name", "Filters", "Last Modified"], rows, self.wide)
            if self.verbose:
                for fl in lists:
                    lines += ["", f'Filters of filter list "{fl.name}"', ""]
                    lines += table(self.FILTER_HEADERS, self.filter_rows(fl), self.wide)
            return "\n".join(lines) + "\n"
        blocks = []
        for fl in lists:
            lines = [
                *field("FilterList Name", fl.name),
                *field("Description", fl.description),
                *field("Store", self.store),
                *field("Last Modified", modified(fl.modified_unix_ms)),
                *field("GUID", fl.id),
                *field("No. of Filters", str(len(fl.filters))),
            ]
            if self.verbose:
                for number, flt in enumerate(fl.filters, start=1):
                    lines += ["", f"Filter {number}", *self.filter_lines(flt, 2)]
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks) + "\n"

    # -------------------------------------------------------- filter actions

    def filter_action_details(self, fa: pb.FilterAction, indent: int, *, description: bool = True) -> list[str]:
        lines = field("Description", fa.description, indent) if description else []
        lines += field("Action", ACTION_DISPLAY.get(fa.action, "?"), indent)
        if fa.action == pb.ACTION_TYPE_NEGOTIATE:
            lines += [
                *field("QMPFS", yes_no(fa.session_key_pfs), indent),
                *field("Inbound Pass-through", yes_no(fa.inbound_passthrough), indent),
                *field("Fall Back to Clear (soft)", yes_no(fa.fallback_to_clear), indent),
            ]
            if self.verbose:
                lines += [" " * indent + "Security Methods", *self.qm_methods(fa.methods, indent + 2)]
            else:
                lines += field("No. of Security Methods", str(len(fa.methods)), indent)
        return lines

    def _methods_cell(self, fa: pb.FilterAction) -> str:
        if fa.action != pb.ACTION_TYPE_NEGOTIATE:
            return ""
        return " ".join(format_qmsecmethod(m) for m in fa.methods) if self.verbose else str(len(fa.methods))

    def filter_actions(self, actions: Sequence[pb.FilterAction]) -> str:
        if not actions:
            return "No filter actions in the store.\n"
        if self.table:
            rows = [
                [
                    fa.name,
                    ACTION_DISPLAY.get(fa.action, "?"),
                    yes_no(fa.inbound_passthrough),
                    yes_no(fa.fallback_to_clear),
                    yes_no(fa.session_key_pfs),
                    self._methods_cell(fa),
                ]
                for fa in actions
            ]
            headers = ["Filter Action Name", "Action", "Inpass", "Soft", "QMPFS", "Security Methods"]
            return "\n".join(table(headers, rows, self.wide)) + "\n"
        blocks = []
        for fa in actions:
            lines = [
                *field("FilterAction Name", fa.name),
                *field("Description", fa.description),
                *field("Store", self.store),
                *field("Last Modified", modified(fa.modified_unix_ms)),
                *field("GUID", fa.id),
                *self.filter_action_details(fa, 0, description=False),
            ]
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks) + "\n"
