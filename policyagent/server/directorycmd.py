"""`policyagent directory status|sync|publish|assign|import|export`: the server's link to its LDAP directory
(admin certificate; DirectoryAdmin in protos/policyagent/v1/directory.proto)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from policyagent.pb import directory_pb
from policyagent.server.fleetcmd import channel, connection_options

_STATE_WORDS = {
    directory_pb.DIRECTORY_STATE_NOT_CONFIGURED: "not configured",
    directory_pb.DIRECTORY_STATE_CONNECTING: "connecting",
    directory_pb.DIRECTORY_STATE_IN_SYNC: "in sync",
    directory_pb.DIRECTORY_STATE_DOWN: "down",
}


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "never"


def summary_line(status: directory_pb.DirectoryStatus) -> str:
    """One line for `fleet status` and the top of `directory status`."""
    if status.state in (directory_pb.DIRECTORY_STATE_NOT_CONFIGURED, directory_pb.DIRECTORY_STATE_UNSPECIFIED):
        return "Directory: not configured"
    head = f"Directory: {status.url}"
    last_sync = _iso(status.last_sync_unix_ms)
    if status.state == directory_pb.DIRECTORY_STATE_DOWN:
        return (
            f"{head} down since {_iso(status.down_since_unix_ms)} (last sync {last_sync}; "
            f"the last known topology stays in force): {status.last_error}"
        )
    if status.state == directory_pb.DIRECTORY_STATE_CONNECTING:
        return f"{head} connecting (last sync {last_sync})"
    change = "never"
    if status.last_change_unix_ms:
        change = _iso(status.last_change_unix_ms)
        if status.last_changed_computers:
            change += f", {status.last_changed_computers} computer(s) changed"
    problems = f"; {len(status.problems)} problem(s)" if status.problems else ""
    return f"{head} in sync (last check {last_sync}, last change {change}{problems})"


def render(status: directory_pb.DirectoryStatus, out: TextIO) -> None:
    print(summary_line(status), file=out)
    if status.state in (directory_pb.DIRECTORY_STATE_NOT_CONFIGURED, directory_pb.DIRECTORY_STATE_UNSPECIFIED):
        return
    kind = f" ({status.last_read_kind} read)" if status.last_read_kind else ""
    rows = [
        ("State", _STATE_WORDS.get(status.state, "?")),
        ("Base DN", status.base_dn),
        ("Bind", status.bind),
        ("Change marker", status.change_marker or "-"),
        ("Interval", f"{status.interval_seconds:g} s"),
        ("Last sync", _iso(status.last_sync_unix_ms)),
        ("Last full read", _iso(status.last_read_unix_ms)),
        ("Last change", _iso(status.last_change_unix_ms)),
        ("Last read took", f"{status.last_sync_duration_ms} ms{kind}"),
        (
            "Owned",
            f"{status.computers} computer(s), {status.ous} OU(s), {status.sites} site(s), {status.groups} group(s), "
            f"{status.gpos} GPO(s), {status.links} link(s)",
        ),
    ]
    if status.state == directory_pb.DIRECTORY_STATE_DOWN:
        rows.append(("Down since", _iso(status.down_since_unix_ms)))
    if status.last_error:
        rows.append(("Last error", f"{status.last_error} ({_iso(status.last_error_unix_ms)})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}", file=out)
    for problem in status.problems:
        print(f"  problem: {problem}", file=out)


def add_directory(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "directory", help="the LDAP directory: the assignment registry it feeds, IPsec policies in it"
    )
    sub = parser.add_subparsers(dest="directory_command", metavar="SUBCOMMAND", required=True)
    status = sub.add_parser(
        "status",
        help="in sync or down (since when, why), what the directory owns, the last change",
        description="Where the server's directory sync stands (`policyagent server --directory ...`).",
    )
    connection_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_directory_status)
    sync = sub.add_parser(
        "sync",
        help="read the whole directory now and apply it to the registry",
        description="Read everything now (not waiting for the next check) and print the result.",
    )
    connection_options(sync)
    sync.add_argument("--json", action="store_true", help="machine-readable output")
    sync.set_defaults(handler=run_directory_sync)

    publish = sub.add_parser(
        "publish",
        help="write store policies into the directory ([MS-GPIPSEC] objects under CN=IP Security,CN=System)",
        description=(
            "Write the policies (ids or names; none = every policy) with the filter lists and filter actions they "
            "use from the server's store into CN=IP Security,CN=System,<base>, as Windows lays them out, "
            "bringing objects already there in line. What the objects cannot carry (IKEv2, AES or ESP without "
            "encryption, IPv6 filters, ...) is refused before anything is written. Pre-shared keys are stored in "
            "clear in the directory, as Windows does: restrict read access to CN=IP Security."
        ),
    )
    publish.add_argument("policies", nargs="*", metavar="POLICY", help="id or name of a store policy")
    connection_options(publish)
    publish.add_argument("--json", action="store_true", help="machine-readable output")
    publish.set_defaults(handler=run_directory_publish)

    assign = sub.add_parser(
        "assign",
        help="assign a policy to a directory GPO (published first), or clear it with --clear",
        description=(
            "Point a GPO that comes from the directory at a store policy (publishing the policy first, so the "
            "GPO never names a missing object), or clear its IPsec policy (--clear); then read the directory at "
            "once, so the registry and the agents follow without waiting for the interval."
        ),
    )
    assign.add_argument("gpo", metavar="GPO", help="name or GUID of a directory GPO")
    assign.add_argument("policy", nargs="?", default="", metavar="POLICY", help="id or name of a store policy")
    assign.add_argument("--clear", action="store_true", help="remove the GPO's IPsec policy")
    connection_options(assign)
    assign.add_argument("--json", action="store_true", help="machine-readable output")
    assign.set_defaults(handler=run_directory_assign)

    imp = sub.add_parser(
        "import",
        help="import policies from the directory (or an LDIF file) into the store",
        description=(
            "Import the policies (ids or names as found there; none = all) with what they use from the "
            "directory, or from an LDIF file of [MS-GPIPSEC] objects (--ldif; then the server needs no "
            "directory), into the server's store: all or nothing, objects with the same ids replaced."
        ),
    )
    imp.add_argument("policies", nargs="*", metavar="POLICY", help="id or name of a policy in the directory/file")
    imp.add_argument("--ldif", metavar="FILE", help="read from this LDIF file instead of the directory")
    connection_options(imp)
    imp.add_argument("--json", action="store_true", help="machine-readable output")
    imp.set_defaults(handler=run_directory_import)

    exp = sub.add_parser(
        "export",
        help="write store policies as an LDIF file of [MS-GPIPSEC] objects (pre-shared keys in clear)",
        description=(
            "Write the [MS-GPIPSEC] directory objects of the policies (ids or names; none = every policy) and "
            "of the filter lists and filter actions they use to an LDIF file (RFC 2849). The file holds "
            "pre-shared keys in clear, like exportpolicy's: it is written with mode 0600; keep it secret."
        ),
    )
    exp.add_argument("policies", nargs="*", metavar="POLICY", help="id or name of a store policy")
    exp.add_argument("--ldif", metavar="FILE", required=True, help="the LDIF file to write (0600)")
    exp.add_argument("--base", metavar="DN", default="",
                     help="the domain's base DN for the objects' DNs (default: the server's --directory-base)")
    connection_options(exp)
    exp.set_defaults(handler=run_directory_export)


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid{os.getuid()}"


def _call(args: argparse.Namespace, what: str, method: str, request: Any) -> Any:
    import grpc

    from policyagent.pb import directory_grpc
    from policyagent.server.errors import error_from_rpc

    with channel(args) as chan:
        try:
            metadata = (("x-policyagent-user", _user()),)  # the change log's "who" (server/admin.py)
            return getattr(directory_grpc.DirectoryAdminStub(chan), method)(request, timeout=120, metadata=metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None


def run_directory_status(args: argparse.Namespace) -> int:
    status = _call(args, "directory status", "GetStatus", directory_pb.DirectoryStatusRequest())
    if args.json:
        print(json.dumps(json_format.MessageToDict(status), indent=2))
    else:
        render(status, sys.stdout)
    return 0


def run_directory_sync(args: argparse.Namespace) -> int:
    response = _call(args, "directory sync", "Sync", directory_pb.DirectorySyncRequest())
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    if response.mutations:
        names = list(response.changed_computers)
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        print(f"synced: {response.mutations} registry change(s); effective policy changed on "
              f"{len(names)} computer(s){': ' + shown if names else ''}")
    else:
        print("synced: the registry already matches the directory")
    render(response.status, sys.stdout)
    return 0


def _dns(label: str, dns: Any) -> None:
    for dn in dns:
        print(f"  {label} {dn}")


def run_directory_publish(args: argparse.Namespace) -> int:
    response = _call(args, "directory publish", "Publish", directory_pb.DirectoryPublishRequest(policies=args.policies))
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    print(f"published {len(response.policies)} polic{'y' if len(response.policies) == 1 else 'ies'}: "
          f"{len(response.added)} added, {len(response.modified)} modified, {len(response.deleted)} deleted")
    _dns("added", response.added)
    _dns("modified", response.modified)
    _dns("deleted", response.deleted)
    return 0


def run_directory_assign(args: argparse.Namespace) -> int:
    if args.clear == bool(args.policy):
        raise ValueError("give either a POLICY or --clear")
    request = directory_pb.DirectoryAssignRequest(gpo=args.gpo, policy="" if args.clear else args.policy)
    response = _call(args, "directory assign", "Assign", request)
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    gpo = response.gpo
    name = gpo.name or gpo.id
    if gpo.policy_id:
        print(f'GPO "{name}" assigns "{gpo.policy_name or gpo.policy_id}" {gpo.policy_id}')
    else:
        print(f'GPO "{name}" assigns no IPsec policy')
    published = response.published
    if published.policies:
        print(f"  published: {len(published.added)} added, {len(published.modified)} modified, "
              f"{len(published.deleted)} deleted")
    names = list(response.changed_computers)
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    print(f"  effective policy changed on {len(names)} computer(s){': ' + shown if names else ''}")
    return 0


def run_directory_import(args: argparse.Namespace) -> int:
    request = directory_pb.DirectoryImportRequest(policies=args.policies)
    if args.ldif:
        request.ldif = Path(args.ldif).read_text(encoding="utf-8")
    response = _call(args, "directory import", "Import", request)
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    written = response.written
    print(f"imported {len(written.policies)} polic{'y' if len(written.policies) == 1 else 'ies'}, "
          f"{len(written.filter_lists)} filter list(s), {len(written.filter_actions)} filter action(s)"
          f" (store revision {response.store_revision})")
    for policy in written.policies:
        print(f'  policy "{policy.name}" {policy.id}')
    return 0


def run_directory_export(args: argparse.Namespace) -> int:
    request = directory_pb.DirectoryExportRequest(policies=args.policies, base_dn=args.base)
    response = _call(args, "directory export", "Export", request)
    # The file holds pre-shared keys in clear: only the owner may read it, even if it existed.
    fd = os.open(args.ldif, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as out:
            out.write(response.ldif)
    finally:
        os.close(fd)
    print(f"exported {len(response.policies)} polic{'y' if len(response.policies) == 1 else 'ies'} "
          f"({response.entries} entries under CN=IP Security,CN=System,{response.base_dn}) to {args.ldif}; "
          "it holds pre-shared keys in clear")
    return 0
