"""`policyagent ou|site|group|computer|gpo|rsop`: manage the assignment registry, read RSoP.

    policyagent ou add DN [--block-inheritance] | set DN --block-inheritance yes|no | delete DN | list
    policyagent site add NAME | delete NAME | list          (group: the same)
    policyagent computer add NAME (--domain DNS | --workgroup [NAME]) [--ou DN] [--site S] [--group G ...]
    policyagent computer move NAME [--ou DN | --no-ou] [--site S | --no-site]
    policyagent computer delete NAME | list [--ou DN] [--site S] | show NAME
    policyagent gpo add NAME [--policy P] [--disabled] [--filter-group G ...]
    policyagent gpo set NAME [--policy P | --no-policy] [--enable | --disable] [--filter-group G ... | --no-filter]
    policyagent gpo delete NAME | list | link NAME SCOPE [--order N] [--enforced] [--disabled] | unlink NAME SCOPE
    policyagent rsop COMPUTER [--planning-ou DN] [--planning-site NAME] [--planning-group G ...] [--json]
    policyagent rsop UNREGISTERED --planning-ou DN [--planning-site S] [--planning-domain D] [--planning-group G ...]

SCOPE is local, site:NAME, domain:DNS-NAME or ou:DN. Every command talks to the
server over mTLS with an admin certificate (as netsh does: -r/--server, --cert-dir).
Field checks (DN syntax, names, scopes) run here before anything is sent; the
server runs them again with the references.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TextIO, TypeAlias

from policyagent.model.assignment import DEFAULT_WORKGROUP, Computer, Scope, canonical_dn, validate_computer
from policyagent.model.errors import ValidationError

if TYPE_CHECKING:
    from clients.assignment.client import AssignmentClient
    from policyagent.pb import assign_pb

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _client(args: argparse.Namespace) -> AssignmentClient:
    from clients.assignment.client import AssignmentClient
    from clients.netsh.client import server_target

    return AssignmentClient(server_target(args.server), cert_dir=args.cert_dir)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-r", "--server", metavar="HOST:PORT", help="the policy server (default: $POLICYAGENT_SERVER)")
    parser.add_argument("--cert-dir", help="admin certificate directory (admin.crt, admin.key, ca.crt)")


def _command(
    sub: Subparsers, name: str, help_text: str, handler: Callable[[AssignmentClient, argparse.Namespace, TextIO], None]
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    _connection_options(parser)

    def run(args: argparse.Namespace) -> int:
        client = _client(args)
        try:
            handler(client, args, sys.stdout)
        finally:
            client.close()
        return 0

    parser.set_defaults(handler=run)
    return parser


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "y", "true", "1", "on"):
        return True
    if value in ("no", "n", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f'"{text}": give yes or no')


def _scope(text: str) -> str:
    # Checked here, before anything is sent; argparse reports the message.
    try:
        return str(Scope.parse(text))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.violations[0].message) from None


def _dn(text: str) -> str:
    try:
        return canonical_dn(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.violations[0].message) from None


def _apply(client: AssignmentClient, out: TextIO, operation: str, *mutations: assign_pb.TopologyMutation) -> None:
    response = client.apply_topology(list(mutations), operation)
    changed = list(response.changed_computers)
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        out.write(f"ok; effective policy changed on {len(changed)} computer(s): {shown}\n")
    else:
        out.write("ok\n")


def _table(out: TextIO, rows: Sequence[tuple[str, ...]]) -> None:
    if len(rows) == 1:
        out.write("(none)\n")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _pb() -> Any:
    from policyagent.pb import assign_pb

    return assign_pb


# ------------------------------------------------------------------ ou, site, group


def _add_ou(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("ou", help="organizational units of the registry")
    sub = parser.add_subparsers(dest="ou_command", metavar="SUBCOMMAND", required=True)

    def add(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        ou = p.OrganizationalUnit(dn=args.dn, block_inheritance=args.block_inheritance, description=args.description)
        _apply(client, out, "ou add", p.TopologyMutation(put_ou=ou))

    cmd = _command(sub, "add", "add an OU (its parent OU must exist)", add)
    cmd.add_argument("dn", type=_dn, help="e.g. OU=Web,OU=Servers,DC=corp,DC=example")
    cmd.add_argument("--block-inheritance", action="store_true", help="stop non-enforced links from above")
    cmd.add_argument("--description", default="")

    def set_(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        current = next((o for o in client.topology().ous if o.dn.casefold() == args.dn.casefold()), None)
        if current is None:
            from policyagent.model.errors import NotFoundError

            raise NotFoundError(f'there is no OU "{args.dn}" in the registry')
        if args.block_inheritance is not None:
            current.block_inheritance = args.block_inheritance
        if args.description is not None:
            current.description = args.description
        _apply(client, out, "ou set", _pb().TopologyMutation(put_ou=current))

    cmd = _command(sub, "set", "change an OU (block inheritance, description)", set_)
    cmd.add_argument("dn", type=_dn)
    cmd.add_argument("--block-inheritance", type=_bool, metavar="yes|no")
    cmd.add_argument("--description")

    def delete(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        _apply(
            client, out, "ou delete", p.TopologyMutation(delete=p.TopologyDelete(kind=p.TOPOLOGY_KIND_OU, key=args.dn))
        )

    cmd = _command(sub, "delete", "delete an empty OU (and the GPO links to it)", delete)
    cmd.add_argument("dn", type=_dn)

    def list_(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        topo = client.topology()
        members: dict[str, int] = {}
        for c in topo.computers:
            if c.ou:
                members[c.ou.casefold()] = members.get(c.ou.casefold(), 0) + 1
        rows: list[tuple[str, ...]] = [("OU", "BLOCK INHERITANCE", "COMPUTERS", "DESCRIPTION")]
        for o in sorted(topo.ous, key=lambda o: list(reversed(o.dn.casefold().split(",")))):
            rows.append(
                (o.dn, "yes" if o.block_inheritance else "no", str(members.get(o.dn.casefold(), 0)), o.description)
            )
        _table(out, rows)

    _command(sub, "list", "list the OUs", list_)


def _add_named(subparsers: Subparsers, what: str) -> None:
    parser = subparsers.add_parser(what, help=f"{what}s of the registry")
    sub = parser.add_subparsers(dest=f"{what}_command", metavar="SUBCOMMAND", required=True)
    field = "put_site" if what == "site" else "put_group"

    def add(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        obj = (p.Site if what == "site" else p.Group)(name=args.name, description=args.description)
        _apply(client, out, f"{what} add", p.TopologyMutation(**{field: obj}))

    cmd = _command(sub, "add", f"add a {what}", add)
    cmd.add_argument("name")
    cmd.add_argument("--description", default="")

    def delete(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        kind = p.TOPOLOGY_KIND_SITE if what == "site" else p.TOPOLOGY_KIND_GROUP
        _apply(client, out, f"{what} delete", p.TopologyMutation(delete=p.TopologyDelete(kind=kind, key=args.name)))

    cmd = _command(sub, "delete", f"delete a {what} that has no computers", delete)
    cmd.add_argument("name")

    def list_(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        topo = client.topology()
        items: list[Any] = list(topo.sites if what == "site" else topo.groups)
        count: dict[str, int] = {}
        for c in topo.computers:
            for key in [c.site] if what == "site" else list(c.groups):
                if key:
                    count[key.casefold()] = count.get(key.casefold(), 0) + 1
        rows: list[tuple[str, ...]] = [(what.upper(), "COMPUTERS", "DESCRIPTION")]
        rows += [
            (i.name, str(count.get(i.name.casefold(), 0)), i.description)
            for i in sorted(items, key=lambda i: i.name.casefold())
        ]
        _table(out, rows)

    _command(sub, "list", f"list the {what}s", list_)


# ------------------------------------------------------------------ computers


def _find_computer(topo: assign_pb.Topology, name: str) -> assign_pb.Computer:
    found = next((c for c in topo.computers if c.name.casefold() == name.strip().casefold()), None)
    if found is None:
        from policyagent.model.errors import NotFoundError

        raise NotFoundError(f'there is no computer "{name.strip()}" in the registry')
    return found


def _add_computer(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("computer", help="computers of the registry")
    sub = parser.add_subparsers(dest="computer_command", metavar="SUBCOMMAND", required=True)

    def add(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        membership: Literal["domain", "workgroup"] = "workgroup" if args.workgroup is not None else "domain"
        domain = (args.workgroup or DEFAULT_WORKGROUP) if membership == "workgroup" else (args.domain or "")
        groups = frozenset(args.group or ())
        validate_computer(Computer(args.name, membership, domain, args.ou or "", args.site or "", groups))
        p = _pb()
        computer = p.Computer(
            name=args.name,
            membership=membership,
            domain=domain,
            ou=args.ou or "",
            site=args.site or "",
            groups=sorted(groups),
        )
        _apply(client, out, "computer add", p.TopologyMutation(put_computer=computer))

    cmd = _command(sub, "add", "register a computer", add)
    cmd.add_argument("name")
    member = cmd.add_mutually_exclusive_group(required=True)
    member.add_argument("--domain", metavar="DNS-NAME", help="a member of this domain")
    member.add_argument("--workgroup", nargs="?", const=DEFAULT_WORKGROUP, metavar="NAME", help="a workgroup machine")
    cmd.add_argument("--ou", type=_dn, metavar="DN")
    cmd.add_argument("--site")
    cmd.add_argument("--group", action="append", metavar="NAME", help="repeatable")

    def move(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        current = _find_computer(client.topology(), args.name)
        if args.no_ou:
            current.ou = ""
        elif args.ou is not None:
            current.ou = args.ou
        if args.no_site:
            current.site = ""
        elif args.site is not None:
            current.site = args.site
        if args.group is not None:
            del current.groups[:]
            current.groups.extend(sorted(set(args.group)))
        _apply(client, out, "computer move", _pb().TopologyMutation(put_computer=current))

    cmd = _command(sub, "move", "move a computer to another OU and/or site (or change its groups)", move)
    cmd.add_argument("name")
    where = cmd.add_mutually_exclusive_group()
    where.add_argument("--ou", type=_dn, metavar="DN")
    where.add_argument("--no-ou", action="store_true", help="take it out of any OU")
    site = cmd.add_mutually_exclusive_group()
    site.add_argument("--site")
    site.add_argument("--no-site", action="store_true")
    cmd.add_argument("--group", action="append", metavar="NAME", help="replace its groups (repeatable)")

    def delete(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        mutation = p.TopologyMutation(delete=p.TopologyDelete(kind=p.TOPOLOGY_KIND_COMPUTER, key=args.name))
        _apply(client, out, "computer delete", mutation)

    cmd = _command(sub, "delete", "remove a computer from the registry", delete)
    cmd.add_argument("name")

    def list_(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        rows: list[tuple[str, ...]] = [("COMPUTER", "MEMBERSHIP", "DOMAIN", "SITE", "OU")]
        for c in sorted(client.topology().computers, key=lambda c: c.name):
            if args.ou and c.ou.casefold() != args.ou.casefold():
                continue
            if args.site and c.site.casefold() != args.site.casefold():
                continue
            rows.append((c.name, c.membership, c.domain, c.site or "-", c.ou or "-"))
        _table(out, rows)

    cmd = _command(sub, "list", "list computers", list_)
    cmd.add_argument("--ou", type=_dn, metavar="DN", help="only those directly in this OU")
    cmd.add_argument("--site", help="only those in this site")

    def show(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        c = _find_computer(client.topology(), args.name)
        out.write(
            f"Computer:    {c.name}\nMembership:  {c.membership} ({c.domain})\nOU:          {c.ou or '-'}\n"
            f"Site:        {c.site or '-'}\nGroups:      {', '.join(c.groups) or '-'}\nRevision:    {c.revision}\n"
        )
        rsop = client.rsop(c.name)
        policy = f'"{rsop.policy_name}" {rsop.policy_id}' if rsop.policy_id else "none"
        out.write(f"IPsec policy in force: {policy}  (policyagent rsop {c.name} for the reasons)\n")

    cmd = _command(sub, "show", "show one computer and the IPsec policy in force", show)
    cmd.add_argument("name")


# ------------------------------------------------------------------ GPOs


def _find_gpo(topo: assign_pb.Topology, ref: str) -> assign_pb.Gpo:
    text = ref.strip()
    braced = "{" + text.strip("{}") + "}"
    found = next((g for g in topo.gpos if g.id.casefold() == braced.casefold()), None)
    found = found or next((g for g in topo.gpos if g.name.casefold() == text.casefold()), None)
    if found is None:
        from policyagent.model.errors import NotFoundError

        raise NotFoundError(f'there is no GPO "{text}"')
    return found


def _add_gpo(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("gpo", help="Group Policy objects and their links")
    sub = parser.add_subparsers(dest="gpo_command", metavar="SUBCOMMAND", required=True)

    def add(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        # The policy is looked up first so that the GPO and its assignment are one write:
        # a wrong policy name must not leave a GPO behind that assigns nothing.
        policy_id = client.find_policy(args.policy).id if args.policy else ""
        gpo = p.Gpo(
            name=args.name,
            enabled=not args.disabled,
            description=args.description,
            policy_id=policy_id,
            security_filter=args.filter_group or [],
        )
        _apply(client, out, "gpo add", p.TopologyMutation(put_gpo=gpo))

    cmd = _command(sub, "add", "create a GPO (optionally assigning an IPsec policy)", add)
    cmd.add_argument("name")
    cmd.add_argument("--policy", metavar="NAME|ID", help="the IPsec policy it assigns")
    cmd.add_argument("--disabled", action="store_true", help="create it disabled")
    cmd.add_argument("--description", default="")
    cmd.add_argument(
        "--filter-group",
        action="append",
        metavar="GROUP",
        help="security filtering: apply only to computers in this group (repeatable; default: every computer)",
    )

    def set_(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        gpo = _find_gpo(client.topology(), args.name)
        if args.policy is not None or args.no_policy:
            gpo = client.set_gpo_policy(gpo.id, "" if args.no_policy else args.policy, gpo.revision)
        filtering = args.filter_group is not None or args.no_filter
        if args.enable or args.disable or args.new_name is not None or args.description is not None or filtering:
            if filtering:
                del gpo.security_filter[:]
                gpo.security_filter.extend(args.filter_group or [])
            if args.enable or args.disable:
                gpo.enabled = bool(args.enable)
            if args.new_name is not None:
                gpo.name = args.new_name
            if args.description is not None:
                gpo.description = args.description
            gpo.policy_name = ""
            _apply(client, out, "gpo set", _pb().TopologyMutation(put_gpo=gpo))
        else:
            out.write("ok\n")

    cmd = _command(sub, "set", "change a GPO: its IPsec policy, enabled, name", set_)
    cmd.add_argument("name", help="name or id")
    policy = cmd.add_mutually_exclusive_group()
    policy.add_argument("--policy", metavar="NAME|ID")
    policy.add_argument("--no-policy", action="store_true", help="assign no IPsec policy")
    state = cmd.add_mutually_exclusive_group()
    state.add_argument("--enable", action="store_true")
    state.add_argument("--disable", action="store_true")
    cmd.add_argument("--new-name")
    cmd.add_argument("--description")
    filters = cmd.add_mutually_exclusive_group()
    filters.add_argument(
        "--filter-group",
        action="append",
        metavar="GROUP",
        help="replace the security filter: apply only to computers in these groups (repeatable)",
    )
    filters.add_argument("--no-filter", action="store_true", help="no security filter: apply to every computer")

    def delete(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        mutation = p.TopologyMutation(delete=p.TopologyDelete(kind=p.TOPOLOGY_KIND_GPO, key=args.name))
        _apply(client, out, "gpo delete", mutation)

    cmd = _command(sub, "delete", "delete a GPO and its links", delete)
    cmd.add_argument("name", help="name or id")

    def list_(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        topo = client.topology()
        names = {g.id: g.name for g in topo.gpos}
        rows: list[tuple[str, ...]] = [("GPO", "ENABLED", "IPSEC POLICY", "SECURITY FILTER", "ID")]
        for g in sorted(topo.gpos, key=lambda g: g.name.casefold()):
            rows.append(
                (
                    g.name,
                    "yes" if g.enabled else "no",
                    g.policy_name or g.policy_id or "-",
                    ", ".join(g.security_filter) or "(everyone)",
                    g.id,
                )
            )
        _table(out, rows)
        out.write("\n")
        rows = [("SCOPE", "ORDER", "GPO", "ENFORCED", "LINK ENABLED")]
        for lk in topo.links:
            rows.append(
                (
                    lk.scope,
                    str(lk.order),
                    names.get(lk.gpo, lk.gpo),
                    "yes" if lk.enforced else "no",
                    "yes" if lk.enabled else "no",
                )
            )
        _table(out, rows)

    _command(sub, "list", "list GPOs and links", list_)

    def link(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        topo = client.topology()
        gpo = _find_gpo(topo, args.name)
        scope = Scope.parse(args.scope)
        current = next((lk for lk in topo.links if lk.gpo == gpo.id and Scope.parse(lk.scope).key == scope.key), None)
        p = _pb()
        new = p.GpoLink(gpo=gpo.id, scope=str(scope), order=args.order or 0, enforced=False, enabled=True)
        if current is not None:
            new.CopyFrom(current)
            new.order = args.order or 0  # 0 keeps its place
        if args.enforced is not None:
            new.enforced = args.enforced
        if args.enabled is not None:
            new.enabled = args.enabled
        _apply(client, out, "gpo link", p.TopologyMutation(put_link=new))

    cmd = _command(sub, "link", "link a GPO to a scope, or change its link (order, enforced, enabled)", link)
    cmd.add_argument("name", help="GPO name or id")
    cmd.add_argument("scope", type=_scope, help="local, site:NAME, domain:DNS-NAME or ou:DN")
    cmd.add_argument("--order", type=int, help="link order in the scope, 1 = highest precedence (default: last)")
    cmd.add_argument("--enforced", dest="enforced", action="store_true", default=None)
    cmd.add_argument("--not-enforced", dest="enforced", action="store_false")
    cmd.add_argument("--disabled", dest="enabled", action="store_false", default=None, help="link disabled")
    cmd.add_argument("--enabled", dest="enabled", action="store_true")

    def unlink(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        p = _pb()
        key = f"{args.name}@{args.scope}"
        _apply(
            client, out, "gpo unlink", p.TopologyMutation(delete=p.TopologyDelete(kind=p.TOPOLOGY_KIND_LINK, key=key))
        )

    cmd = _command(sub, "unlink", "remove a GPO's link to a scope", unlink)
    cmd.add_argument("name", help="GPO name or id")
    cmd.add_argument("scope", type=_scope)


# ------------------------------------------------------------------ rsop


def render_rsop(rsop: assign_pb.Rsop, out: TextIO) -> None:
    """A gpresult-like report: where the computer is, the policy in force, then every GPO considered."""
    title = "RSoP planning" if rsop.planning else "Resultant set of policy"
    out.write(f"{title} for computer {rsop.computer}\n")
    if rsop.unregistered:
        out.write(
            "  PLANNING RESULT FOR AN UNREGISTERED COMPUTER: it is not in the registry; this is what would\n"
            "  apply to a hypothetical computer with the planned domain, OU, site and groups.\n"
        )
    out.write("\n")
    out.write(f"  Membership:   {rsop.membership} ({rsop.domain})\n")
    out.write(f"  Site:         {rsop.site or '-'}{'  (planned)' if rsop.planning else ''}\n")
    out.write(f"  OU:           {rsop.ou or '-'}{'  (planned)' if rsop.planning else ''}\n")
    out.write(f"  Groups:       {', '.join(rsop.groups) or '-'}\n\n")
    winner = next((s for s in rsop.steps if s.outcome == "applied"), None)
    if winner is None:
        out.write("  IPsec policy in force: none (no GPO that reaches this computer assigns one)\n")
    else:
        out.write(f'  IPsec policy in force: "{rsop.policy_name}" {rsop.policy_id}\n')
        how = f"link order {winner.link_order}" + (", enforced" if winner.enforced else "")
        out.write(f'    from GPO "{winner.gpo_name}" linked at {winner.scope} ({how})\n')
    if rsop.version:
        out.write(f"  Effective policy version: {rsop.version}\n")
    out.write("\n  GPOs considered, highest precedence first:\n")
    if not rsop.steps:
        out.write("    (no GPO is linked where this computer is)\n")
    for index, step in enumerate(rsop.steps, start=1):
        flags = f"link order {step.link_order}" + (", enforced" if step.enforced else "")
        policy = f'"{step.policy_name}"' if step.policy_name else (step.policy_id or "no IPsec policy")
        out.write(f'    {index}. "{step.gpo_name}" at {step.scope} ({flags})\n')
        out.write(f"       assigns {policy}: {step.outcome}\n")


def _add_rsop(subparsers: Subparsers) -> None:
    def run(client: AssignmentClient, args: argparse.Namespace, out: TextIO) -> None:
        planning_ou = "" if args.planning_no_ou else args.planning_ou
        rsop = client.rsop(
            args.computer, planning_ou, args.planning_site, args.planning_domain, args.planning_group or None
        )
        if args.json:
            from google.protobuf import json_format

            out.write(json.dumps(json_format.MessageToDict(rsop), indent=2) + "\n")
        else:
            render_rsop(rsop, out)

    cmd = _command(
        subparsers,
        "rsop",
        "the IPsec policy in force on a computer and why (gpresult-like); planning mode with --planning-*",
        run,
    )
    cmd.add_argument("computer")
    where = cmd.add_mutually_exclusive_group()
    where.add_argument("--planning-ou", type=_dn, metavar="DN", help="as if the computer were in this OU")
    where.add_argument("--planning-no-ou", action="store_true", help="as if it were in no OU")
    cmd.add_argument("--planning-site", metavar="NAME", help='as if it were in this site ("" = none)')
    cmd.add_argument(
        "--planning-domain",
        metavar="DNS-NAME",
        help="for a computer not in the registry: plan it as a member of this domain (default: the OU's)",
    )
    cmd.add_argument(
        "--planning-group", action="append", metavar="GROUP", help="as if it were in these groups (repeatable)"
    )
    cmd.add_argument("--json", action="store_true")


def add_subcommands(subparsers: Subparsers) -> None:
    """Register ou, site, group, computer, gpo and rsop on the `policyagent` parser."""
    _add_ou(subparsers)
    _add_named(subparsers, "site")
    _add_named(subparsers, "group")
    _add_computer(subparsers)
    _add_gpo(subparsers)
    _add_rsop(subparsers)
