"""`netsh`: options, contexts, scripts (-f), the interactive reader, and errors as exit codes.

    netsh [-r HOST:PORT | -r unix:PATH] [--cert-dir DIR] [-f SCRIPT] [--debug] [--json] [ipsec static <command> ...]
    netsh [-r unix:STATE_DIR/agent.sock] [--json] ipsec dynamic <command> ...
    netsh [-r HOST:PORT] [--cert-dir DIR] --computer NAME [--json] ipsec dynamic <command> ...

A line (from the command line, a script or standard input) is interpreted in a
context, as Windows netsh does: at the root it must start with `ipsec static` or
`ipsec dynamic`; after `pushd ipsec static` (or typing `ipsec static` interactively)
it is a static command. Dynamic commands go to one computer's agent
(clients.netsh.dynamic): on its local socket, or with --computer NAME (or computer=NAME at the end of
the command) through the policy server. Errors print one line on stderr and give exit code 1 (the
command failed) or 2 (the command line is malformed); --debug adds the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from clients.netsh import dynamic, helptext
from clients.netsh.client import AdminClient, is_agent_store_socket, server_target
from clients.netsh.commands import Context, run
from clients.netsh.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError
from clients.netsh.syntax import HELP_TOKENS, HelpRequest, parse_args, resolve_command, resolve_prefix, split_line
from policyagent.model.errors import PolicyError

STATIC = ("ipsec", "static")
DYNAMIC = ("ipsec", "dynamic")
# Context words below the root and below "ipsec". Dynamic mode lives on each agent.
_CONTEXTS: dict[tuple[str, ...], tuple[str, ...]] = {(): ("ipsec",), ("ipsec",): ("dynamic", "static")}
_EXIT_WORDS = frozenset({"exit", "quit", "bye"})


@dataclass
class Options:
    server: str | None = None
    cert_dir: str | None = None
    script: str | None = None
    computer: str = ""
    debug: bool = False
    json: bool = False
    words: list[str] = field(default_factory=list)


def parse_options(argv: Sequence[str]) -> Options:
    """Leading options up to the first context or command word."""
    opts = Options()
    args = list(argv)
    while args and args[0].startswith("-") and args[0].lower() not in HELP_TOKENS:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if name in ("-r", "--remote", "-f", "--file", "--cert-dir", "--computer"):
            if eq:
                value = inline
            elif args:
                value = args.pop(0)
            else:
                raise UsageError(f"{name} needs a value")
            if name in ("-r", "--remote"):
                opts.server = value
            elif name == "--cert-dir":
                opts.cert_dir = value
            elif name == "--computer":
                opts.computer = value.strip()
                if not opts.computer:
                    raise UsageError("--computer needs the computer's name")
            else:
                opts.script = value
        elif arg == "--debug":
            opts.debug = True
        elif arg == "--json":
            opts.json = True
        elif arg == "--":
            break
        else:
            raise UsageError(
                f'unknown option "{arg}"; options: -r SERVER, --cert-dir DIR, --computer NAME, -f SCRIPT, --debug, '
                "--json"
            )
    opts.words = args
    return opts


class StopReading(Exception):
    """`exit`, `quit` or `bye`: stop reading commands."""


class Shell:
    """Runs netsh lines against one server connection, tracking the current context."""

    def __init__(
        self, ctx: Context, out: TextIO, *, debug: bool = False, dynamic_ctx: dynamic.DynamicContext | None = None
    ) -> None:
        self.ctx = ctx
        self.dynamic = dynamic_ctx or dynamic.DynamicContext(json=ctx.json, out=out)
        self.out = out
        self.debug = debug
        self.context: tuple[str, ...] = ()
        self.stack: list[tuple[str, ...]] = []

    def _walk(self, start: tuple[str, ...], tokens: list[str]) -> tuple[tuple[str, ...], list[str]]:
        """Descend through context words; returns the context reached and the tokens after it."""
        context = start
        while tokens and context in _CONTEXTS and tokens[0].lower() not in HELP_TOKENS:
            word = resolve_prefix(tokens[0], _CONTEXTS[context], "command" if not context else "context")
            context = (*context, word)
            tokens = tokens[1:]
        return context, tokens

    def locate(self, tokens: list[str]) -> tuple[tuple[str, ...], list[str]]:
        """The context a line addresses and the rest of its tokens.

        A line may repeat the full path (`ipsec static add ...`, even `netsh ipsec static ...`)
        from any context; otherwise it is relative to the current one.
        """
        if tokens and tokens[0].lower() == "netsh":
            tokens = tokens[1:]
        if self.context and tokens and tokens[0].lower() == "ipsec":
            return self._walk((), tokens)
        return self._walk(self.context, tokens)

    def execute(self, tokens: list[str]) -> tuple[str, ...] | None:
        """Run one line. Returns the context the line names when it has no command (else None)."""
        if tokens and tokens[0].lower() in _EXIT_WORDS:
            raise StopReading
        if tokens and tokens[0].lower() == "pushd":
            context, rest = self._walk((), tokens[1:])
            if rest:
                raise UsageError(f'pushd takes a context, like "pushd ipsec static"; got "{" ".join(rest)}"')
            self.stack.append(self.context)
            self.context = context
            return None
        if tokens and tokens[0].lower() == "popd":
            self.context = self.stack.pop() if self.stack else ()
            return None
        if tokens and tokens[0] == "..":
            self.context = self.context[:-1]
            return None
        context, rest = self.locate(tokens)
        if context == DYNAMIC:
            if not rest:
                return context
            dynamic.execute(self.dynamic, rest)
            return None
        if context != STATIC:
            if rest and rest[0].lower() in HELP_TOKENS:
                self.out.write(helptext.ROOT_HELP if not context else dynamic.IPSEC_HELP)
                return None
            if rest:
                raise UsageError(f'unknown command "{rest[0]}"; commands start with "ipsec static" or "ipsec dynamic"')
            return context
        if not rest:
            return context
        if self.dynamic.computer:
            raise UsageError(
                "--computer names the agent for ipsec dynamic; ipsec static edits the policy server's store "
                "(-r HOST:PORT)"
            )
        target, params = resolve_command(rest)
        if isinstance(target, HelpRequest):
            self.out.write(_help(target))
            return None
        run(self.ctx, parse_args(target, params))
        return None

    def run_lines(self, lines: Iterable[str], source: str, err: TextIO, *, prompt: bool, keep_going: bool) -> int:
        """Run lines until the end, `exit`, or the first error (unless keep_going, the interactive case)."""
        status = EXIT_OK
        number = 0
        iterator = iter(lines)
        while True:
            if prompt:
                self.out.write(" ".join(["netsh", *self.context]) + ">")
                self.out.flush()
            try:
                line = next(iterator)
            except StopIteration:
                break
            number += 1
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                tokens = split_line(text)
                context = self.execute(tokens)
                if context is not None:
                    self.context = context
            except StopReading:
                break
            except (UsageError, PolicyError, OSError) as exc:
                status = _report(exc, err, f"{source}:{number}: ", self.debug)
                if not keep_going:
                    return status
            except Exception as exc:
                # A bug, not a refused command: report it with its line and stop, even interactively.
                return _report(exc, err, f"{source}:{number}: ", self.debug)
        return status if not keep_going else EXIT_OK


def _help(request: HelpRequest) -> str:
    if request.command is not None:
        return helptext.command_help(request.command)
    if request.words:
        return helptext.verb_help(request.words[0])
    return helptext.context_help()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _report(exc: BaseException, err: TextIO, prefix: str, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=err)
    if isinstance(exc, UsageError):
        code = EXIT_USAGE
        message = str(exc)
    elif isinstance(exc, PolicyError):
        code = EXIT_ERROR
        message = exc.message
    elif isinstance(exc, OSError):
        code = EXIT_ERROR
        where = f": {exc.filename}" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}"
    else:
        code = EXIT_ERROR
        message = f"internal error: {type(exc).__name__}: {exc}"
        if not debug:
            message += " (run with --debug for the traceback)"
    err.write(f"{prefix}{_one_line(message)}\n")
    err.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `netsh` console script. Returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    out, err = sys.stdout, sys.stderr
    debug = "--debug" in args[: args.index("--") if "--" in args else len(args)]
    try:
        opts = parse_options(args)
    except UsageError as exc:
        return _report(exc, err, "netsh: ", debug)
    target = server_target(opts.server)
    on_agent = is_agent_store_socket(target)
    client = AdminClient(target, cert_dir=opts.cert_dir, agent_socket=on_agent)
    agent = dynamic.DynamicContext(
        opts.server, json=opts.json, out=out, computer=opts.computer, cert_dir=opts.cert_dir
    )
    ctx = Context(
        client,
        json=opts.json,
        out=out,
        server="" if on_agent else (opts.server or ""),
        cert_dir=opts.cert_dir,
        agent_dir=os.path.dirname(target.removeprefix("unix:") if on_agent else dynamic.agent_socket(None)),
    )
    shell = Shell(ctx, out, debug=opts.debug, dynamic_ctx=agent)
    try:
        if opts.script is not None:
            # Words after -f name the context the script starts in (`netsh -f FILE ipsec static`).
            context = shell.execute(opts.words) if opts.words else None
            # utf-8-sig: a script saved by a Windows editor may start with a byte order mark.
            with open(opts.script, encoding="utf-8-sig") as f:
                lines = f.readlines()
            shell.context = context or shell.context
            return shell.run_lines(lines, opts.script, err, prompt=False, keep_going=False)
        context = shell.execute(opts.words)
        if context is not None:
            # `netsh` or `netsh ipsec static` alone: read commands from standard input, as
            # Windows netsh does (with a prompt on a terminal; `netsh ?` shows the usage).
            shell.context = context
            tty = sys.stdin.isatty()
            return shell.run_lines(sys.stdin, "<stdin>", err, prompt=tty, keep_going=tty)
        return EXIT_OK
    except StopReading:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _report(exc, err, "netsh: ", opts.debug)
    finally:
        ctx.client.close()
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
