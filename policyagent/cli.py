"""`policyagent`: the command line of the server (and later the agent and admin tools).

Each subcommand registers a parser and a handler `(args) -> exit code`. Library
code raises; only `main()` turns an error into one line on stderr and exit code
2, with the traceback only under --debug.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from policyagent.model.errors import PolicyError

EXIT_OK = 0
EXIT_ERROR = 2
LOG_LEVELS = ("debug", "info", "warning", "error")

Handler = Callable[[argparse.Namespace], int]


def _run_server(args: argparse.Namespace) -> int:
    # Imported here so that `policyagent --help` and other subcommands do not pay for grpc.
    from policyagent.server.app import ServerConfig, configure_logging, serve

    configure_logging(args.log_level)
    directory = None
    if args.directory_publish and not args.directory:
        raise ValueError("--directory-publish needs --directory")
    if args.directory or args.directory_base:
        from policyagent.directory.sync import DirectorySettings

        if not (args.directory and args.directory_base):
            raise ValueError("--directory and --directory-base go together")
        directory = DirectorySettings(
            url=args.directory,
            base_dn=args.directory_base,
            bind=args.directory_bind,
            user=args.directory_user or "",
            password_file=Path(args.directory_password_file) if args.directory_password_file else None,
            ca_file=Path(args.directory_ca) if args.directory_ca else None,
            tls_name=args.directory_tls_name,
            starttls=args.directory_starttls,
            sites_base=args.directory_sites_base,
            interval_s=args.directory_interval,
            publish=args.directory_publish,
        )
    config = ServerConfig(
        data_dir=Path(args.data_dir),
        listen=args.listen,
        grace_seconds=args.grace,
        enroll_listen=args.enroll_listen,
        tls_names=tuple(args.tls_name or ()),
        kerberos_keytab=Path(args.kerberos_keytab) if args.kerberos_keytab else None,
        kerberos_principal=args.kerberos_principal,
        workgroup_secret_file=Path(args.workgroup_secret_file) if args.workgroup_secret_file else None,
        directory=directory,
    )
    asyncio.run(serve(config))
    return EXIT_OK


def _add_server(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from policyagent.server.app import DEFAULT_DATA_DIR, DEFAULT_LISTEN

    parser = subparsers.add_parser(
        "server",
        help="run the policy server",
        description=(
            "Run the policy server: the domain policy store, the CA and the gRPC APIs. Every "
            "connection is TLS; --listen needs a client certificate (admin or agent), "
            "--enroll-listen serves enrollment to machines without one."
        ),
    )
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="directory for the store (created 0700; default: %(default)s)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT|unix:PATH",
        help="address for admins and agents, mTLS (port 0 = any free port) or unix socket (default: %(default)s)",
    )
    parser.add_argument(
        "--enroll-listen",
        metavar="HOST:PORT|unix:PATH",
        help="address for enrollment, TLS without client certificates (default: the --listen port + 1)",
    )
    parser.add_argument(
        "--tls-name",
        action="append",
        metavar="NAME|IP",
        help="a name or address clients use to reach the server, put in its certificate (repeatable)",
    )
    parser.add_argument(
        "--kerberos-keytab",
        metavar="FILE",
        help="keytab of the server's service principal: enables Kerberos enrollment",
    )
    parser.add_argument(
        "--kerberos-principal",
        metavar="NAME",
        help="the service principal to accept tokens for, e.g. policyagent/server.example.com@EXAMPLE.COM "
        "(default: any principal in the keytab)",
    )
    parser.add_argument(
        "--workgroup-secret-file",
        metavar="FILE",
        help="file holding the workgroup's enrollment secret: enables workgroup enrollment",
    )
    _add_directory_options(parser)
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: %(default)s")
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long in-flight calls may finish on shutdown (default: %(default)s)",
    )
    parser.set_defaults(handler=_run_server)


def _add_directory_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "directory",
        "Feed the assignment registry (computers, OUs, sites, groups, GPOs, links) from Active Directory or "
        "OpenLDAP, and keep it in sync. The directory's objects cannot be edited locally; when the directory "
        "is unreachable the last known topology stays in force (policyagent directory status).",
    )
    group.add_argument("--directory", metavar="URL", help="ldaps://dc1.corp.example, ldap://HOST (with "
                       "--directory-starttls), or ldapi://%%2Frun%%2Fslapd%%2Fldapi")
    group.add_argument("--directory-base", metavar="DN", help="the domain's base DN, e.g. DC=corp,DC=example")
    group.add_argument(
        "--directory-bind",
        choices=("simple", "external", "gssapi"),
        default="simple",
        help="simple (user + password file), external (SASL EXTERNAL: ldapi peer credentials or a TLS client "
        "certificate) or gssapi (SASL GSSAPI with the process's Kerberos credentials) (default: %(default)s)",
    )
    group.add_argument("--directory-user", metavar="DN|USER@DOMAIN", help="the account of a simple bind")
    group.add_argument(
        "--directory-password-file",
        metavar="FILE",
        help="file whose first line is the simple bind's password (never on the command line)",
    )
    group.add_argument("--directory-ca", metavar="FILE", help="CA certificate(s) to verify the directory's TLS")
    group.add_argument(
        "--directory-tls-name",
        metavar="NAME",
        help="the name the directory's certificate must carry when the URL names it otherwise (an address)",
    )
    group.add_argument("--directory-starttls", action="store_true", help="StartTLS on an ldap:// URL")
    group.add_argument(
        "--directory-sites-base",
        metavar="DN",
        help=(
            "where sites and their subnets live, e.g. CN=Sites,CN=Configuration,DC=corp,DC=example; a computer's "
            "site is the one whose subnet holds the address its agent connects from (default: no sites)"
        ),
    )
    group.add_argument(
        "--directory-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how often to check the directory's change marker; a change is read and applied at once, and "
        "every 10th check reads everything (default: %(default)s)",
    )
    group.add_argument(
        "--directory-publish",
        action="store_true",
        help="keep the directory's copies of policies current: after a store write that changes policies, "
        "filter lists or filter actions, republish the affected policies the directory already holds "
        "(in the background; a failure shows in `policyagent directory status`, the store write stands). "
        "Needs write access to CN=IP Security,CN=System (default: off)",
    )


def _add_agent_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from policyagent.agent.cmd import add_agent, add_agent_status
    from policyagent.server.auditcmd import add_audit
    from policyagent.server.directorycmd import add_directory
    from policyagent.server.fleetcmd import add_fleet

    add_agent(subparsers)
    add_agent_status(subparsers)
    add_fleet(subparsers)
    add_directory(subparsers)
    add_audit(subparsers)


def _add_identity_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from policyagent.pki.commands import SUBCOMMANDS

    for add in SUBCOMMANDS:
        add(subparsers)


def _add_assignment_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from clients.assignment.cli import add_subcommands

    add_subcommands(subparsers)  # ou, site, group, computer, gpo, rsop


# Later subcommands (agent, rsop, admin-cert) add themselves here.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_server,
    _add_identity_commands,
    _add_agent_commands,
    _add_assignment_commands,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="policyagent", description="Windows-style IPsec policy management."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `policyagent` console script. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        message = _one_line(exc)
        # What a user can cause (bad input, refused config, a file or port problem) is
        # reported as is; anything else is a bug, said so.
        if not isinstance(exc, PolicyError | OSError | ValueError):
            message = f"internal error: {type(exc).__name__}: {message}"
            if not args.debug:
                message += " (run with --debug for the traceback)"
        print(f"policyagent {args.command}: {message}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
