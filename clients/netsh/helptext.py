"""Help text, generated from the setting table so it never drifts from parsing and validation."""

from __future__ import annotations

import textwrap

from clients.netsh.syntax import commands_starting
from policyagent.model.settings import STATIC_COMMANDS, Command, Param

WIDTH = 100

ROOT_HELP = """\
Usage: netsh [-r HOST:PORT | -r unix:PATH] [--cert-dir DIR] [-f SCRIPT] [--debug] [--json]
             [ipsec static <command> ...]
       netsh [-r unix:STATE_DIR/agent.sock] [--json] ipsec dynamic <command> ...
       netsh [-r HOST:PORT] [--cert-dir DIR] --computer NAME [--json] ipsec dynamic <command> ...

Options:
  -r SERVER   static: the policy server (default: $POLICYAGENT_SERVER, else 127.0.0.1:50051), or
              unix:PATH for an agent's local store. dynamic: the agent's socket, unix:STATE_DIR/agent.sock
              (default: $POLICYAGENT_AGENT_SOCKET, else /var/lib/policyagent-agent/agent.sock); with
              --computer, the policy server that relays to that computer's agent.
  --cert-dir  The directory of the admin certificate netsh presents to the policy server.
  --computer  dynamic: ask this computer's agent through the policy server (admin certificate); also
              computer=NAME at the end of a dynamic command.
  -f SCRIPT   Run the commands in SCRIPT, one per line (# starts a comment); stop at the first error.
  --json      show commands print the objects as JSON (pre-shared keys masked).
  --debug     Show the traceback of an error.

Contexts:
  ipsec static    Static mode: policies, filter lists and filter actions in the server's store.
  ipsec dynamic   Dynamic mode: one computer's running IPsec, on its agent: statistics, security
                  associations, filters in force, configuration, and dynamic-mode policies and rules
                  (kept in the agent's memory until it stops).

Without a command, netsh reads commands from standard input.
Type "netsh ipsec static ?" or "netsh ipsec dynamic ?" for the commands, "netsh ipsec static add policy ?"
for one command.
"""

IPSEC_HELP = """\
Contexts in "ipsec":
  dynamic   Dynamic mode: the IPsec running on one computer, on its agent's socket: statistics,
            security associations, filters in force, configuration, and main mode policies, quick mode
            policies and rules added to it (enforced at once with the assigned policy, kept in the
            agent's memory until it stops).
  static    Static mode: policies, filter lists and filter actions in the server's store.
"""


def _command_lines(commands: list[Command]) -> list[str]:
    width = max(len(c.text) for c in commands) + 2
    return [f"  {c.text.ljust(width)}{c.summary}" for c in commands]


def context_help() -> str:
    """`netsh ipsec static ?`: every command with its summary."""
    lines = ['Commands in the "ipsec static" context:', ""]
    lines += _command_lines(sorted(STATIC_COMMANDS, key=lambda c: c.words))
    lines += [
        "",
        "Commands and tags may be shortened to any unique prefix (sh po = show policy).",
        'Type a command followed by "?" for its parameters: add policy ?',
    ]
    return "\n".join(lines) + "\n"


def verb_help(verb: str) -> str:
    """`netsh ipsec static add ?`: the commands starting with that word."""
    commands = sorted(commands_starting(verb), key=lambda c: c.words)
    lines = [f'"{verb}" commands:', "", *_command_lines(commands)]
    return "\n".join(lines) + "\n"


def command_help(command: Command) -> str:
    """`netsh ipsec static add policy ?`: usage, parameters, remarks — all from the table."""

    # Each parameter as written: name=<syntax>, [name=]<syntax> when it may be positional.
    def bare(p: Param) -> str:
        if p.name == "all":
            return "all"
        tag = f"[{p.name}=]" if p.name in command.positional else f"{p.name}="
        return f"{tag}{p.setting.syntax()}"

    parts: list[str] = []
    seen_groups: set[str] = set()
    for p in command.params:
        if not p.group:
            parts.append(bare(p) if p.required else f"[{bare(p)}]")
        elif p.group not in seen_groups:
            # Alternatives together: {name=<name> | guid=<name>}; optional for show (it shows all).
            seen_groups.add(p.group)
            text = " | ".join(bare(q) for q in command.params if q.group == p.group)
            parts.append(f"[{text}]" if command.words[0] == "show" else f"{{{text}}}")
    head = f"Usage: {command.text} "
    if parts:
        # No line break inside one parameter ("<integer 5–2 880 minutes>").
        usage = textwrap.fill(
            " ".join(part.replace(" ", "\u00a0") for part in parts),
            width=WIDTH,
            initial_indent=head,
            subsequent_indent=" " * len(head),
            break_on_hyphens=False,
            break_long_words=False,
        ).replace("\u00a0", " ")
    else:
        usage = head
    lines = [usage.rstrip(), "", command.summary]
    if command.params:
        lines += ["", "Parameters:"]
        for p in command.params:
            s = p.setting
            notes = []
            if p.required:
                notes.append("required")
            if p.group:
                notes.append("one of " + ", ".join(q.name for q in command.params if q.group == p.group))
            if s.default is not None and s.default != "":
                notes.append(f"default {s.default}")
            if s.repeatable:
                notes.append("may be repeated")
            header = f"  {p.name} = {s.syntax()}" if p.name != "all" else "  all"
            if notes:
                header += f"   ({'; '.join(notes)})"
            lines.append(header)
            text = s.summary + (f" {s.details}" if s.details else "")
            lines += textwrap.wrap(text, width=WIDTH, initial_indent="      ", subsequent_indent="      ")
    if command.positional:
        lines += ["", "Values given without a tag fill " + ", ".join(f"{n}=" for n in command.positional) + "."]
    if command.remarks:
        lines += ["", "Remarks:"]
        lines += textwrap.wrap(command.remarks, width=WIDTH, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines) + "\n"
