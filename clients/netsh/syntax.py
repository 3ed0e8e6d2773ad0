"""The netsh command line: tokens, quoting, command and tag resolution.

netsh syntax (Windows Server 2003, windows-ipsec.md §3.2): command words, then
`tag=value` tokens. Command words and tags are case-insensitive and may be
shortened to any unique prefix (`sh po`, `mmsec=`); a value without a tag fills
the command's positional parameters in order; a bare `all` selects the `all`
alternative. Which tags exist, their kinds and their parsers all come from the
setting table (policyagent.model.settings) — nothing here describes a parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from clients.netsh.errors import UsageError
from policyagent.model.settings import STATIC_COMMANDS, Command, Param, ValueKind

# Tokens that ask for help wherever a command word or a parameter could stand.
HELP_TOKENS = frozenset({"?", "/?", "-?", "help", "-h", "--help"})

# Escapes understood inside double quotes, so a dump can carry any text on one line.
# Other backslash sequences stay as typed: rootca= uses \' for a quote (settings.py).
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")


def split_line(line: str) -> list[str]:
    """Split a script or interactive line into tokens, honouring double quotes.

    Quotes group characters (spaces included) and are removed: `name="A B"` is one
    token `name=A B`. Inside quotes, \\" \\\\ \\n \\r \\t and \\xHH are escapes.
    """
    tokens: list[str] = []
    current: list[str] = []
    in_token = quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if quoted:
            if ch == '"':
                quoted = False
            elif ch == "\\" and i + 1 < len(line) and line[i + 1] in _ESCAPES:
                current.append(_ESCAPES[line[i + 1]])
                i += 1
            elif ch == "\\" and line[i + 1 : i + 2] == "x" and _HEX2.fullmatch(line[i + 2 : i + 4]):
                current.append(chr(int(line[i + 2 : i + 4], 16)))
                i += 3
            else:
                current.append(ch)
        elif ch == '"':
            quoted = in_token = True
        elif ch.isspace():
            if in_token:
                tokens.append("".join(current))
                current, in_token = [], False
        else:
            current.append(ch)
            in_token = True
        i += 1
    if quoted:
        raise UsageError("unclosed double quote")
    if in_token:
        tokens.append("".join(current))
    return tokens


def _needs_quotes(value: str) -> bool:
    return not value or any(ch.isspace() or ch in '"\\' or not ch.isprintable() for ch in value)


def quote(value: str) -> str:
    """The value as split_line reads it back: bare when safe, else double-quoted with escapes."""
    if not _needs_quotes(value):
        return value
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable() and ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def resolve_prefix(token: str, candidates: Iterable[str], what: str) -> str:
    """The candidate `token` names: an exact match (any case) or the one candidate it is a prefix of.

    Raises UsageError naming the token and listing the candidates when none or several match.
    """
    names = sorted(set(candidates))
    low = token.lower()
    if low in names:
        return low
    matches = [n for n in names if n.startswith(low)] if low else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f'ambiguous {what} "{token}": could be {", ".join(matches)}')
    raise UsageError(f'unknown {what} "{token}"; expected one of: {", ".join(names)}')


# ------------------------------------------------------------ commands


def first_words() -> list[str]:
    return sorted({c.words[0] for c in STATIC_COMMANDS})


def commands_starting(word: str) -> list[Command]:
    return [c for c in STATIC_COMMANDS if c.words[0] == word]


@dataclass(frozen=True)
class HelpRequest:
    """Help was asked for: for the whole context (words == ()), a verb (`add`) or one command."""

    words: tuple[str, ...]
    command: Command | None = None


def resolve_command(tokens: Sequence[str]) -> tuple[Command | HelpRequest, list[str]]:
    """The static command the leading tokens name, and the tokens left over (its parameters).

    Returns a HelpRequest when a help token appears among the command words or the
    parameters. Raises UsageError for unknown, ambiguous or incomplete command words.
    """
    if not tokens or tokens[0].lower() in HELP_TOKENS:
        return HelpRequest(()), []
    verb = resolve_prefix(tokens[0], first_words(), "command")
    group = commands_starting(verb)
    if len(group) == 1 and len(group[0].words) == 1:
        command, rest = group[0], list(tokens[1:])
    else:
        objects = sorted(c.words[1] for c in group)
        if len(tokens) < 2 or tokens[1].lower() in HELP_TOKENS:
            if len(tokens) >= 2:
                return HelpRequest((verb,)), []
            raise UsageError(f'incomplete command "{verb}": {verb} what? one of: {", ".join(objects)}')
        noun = resolve_prefix(tokens[1], objects, f"{verb} command")
        command = next(c for c in group if c.words[1] == noun)
        rest = list(tokens[2:])
    if any(t.lower() in HELP_TOKENS for t in rest):
        return HelpRequest(command.words, command), []
    return command, rest


# ------------------------------------------------------------ parameters


@dataclass(frozen=True)
class Arg:
    """One parameter as given: its setting's name, the raw text, and the parsed value.

    Masks are parsed later (`value` is the raw text): whether "64" is a valid prefix
    length depends on the address family of srcaddr/dstaddr.
    """

    name: str
    raw: str
    value: object


@dataclass
class Invocation:
    """A resolved static command with its arguments, in the order given."""

    command: Command
    args: list[Arg] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return any(a.name == name for a in self.args)

    def get(self, name: str, default: object = None) -> object:
        for a in self.args:
            if a.name == name:
                return a.value
        return default

    def raw(self, name: str) -> str | None:
        for a in self.args:
            if a.name == name:
                return a.raw
        return None


def _group_with_all(command: Command, param: Param) -> bool:
    return bool(param.group) and any(p.group == param.group and p.name == "all" for p in command.params)


def parse_args(command: Command, tokens: Sequence[str]) -> Invocation:
    """Parse `tag=value` and positional tokens for `command` with the setting table.

    Raises UsageError for unknown/ambiguous tags, repeated tags, stray values, missing
    required parameters and alternatives given together; a value the setting refuses
    raises that setting's ValidationError.
    """
    inv = Invocation(command)
    names = [p.name for p in command.params]
    positional = list(command.positional)
    seen: set[str] = set()
    for token in tokens:
        tag, eq, raw = token.partition("=")
        if eq:
            if not names:
                raise UsageError(f'"{command.text}" takes no parameters, got "{token}"')
            name = resolve_prefix(tag, names, f'tag for "{command.text}"')
        elif token.lower() == "all" and "all" in names:
            name, raw = "all", "yes"
        else:
            positional = [p for p in positional if p not in seen]
            if not positional:
                tags = ", ".join(f"{n}=" for n in names) or "none"
                raise UsageError(f'unexpected value "{token}" for "{command.text}": give it as tag=value ({tags})')
            name, raw = positional[0], token
        param = command.param(name)
        assert param is not None
        if name in seen and not param.setting.repeatable:
            raise UsageError(f'{name}= is given more than once in "{command.text}"')
        seen.add(name)
        if name != "all" and raw.strip().lower() == "all" and _group_with_all(command, param):
            # netsh spells the "all" alternative name=all as well as a bare all.
            inv.args.append(Arg("all", raw, True))
            seen.add("all")
            continue
        if name == "all":
            flag = param.setting.parse(raw)
            if flag is not True:
                continue  # all=no: as if not given
            inv.args.append(Arg(name, raw, True))
            continue
        value: object = raw if param.setting.kind is ValueKind.MASK else param.setting.parse(raw)
        inv.args.append(Arg(name, raw, value))
    _check_presence(inv)
    return inv


def _check_presence(inv: Invocation) -> None:
    command = inv.command
    given = {a.name for a in inv.args}
    for p in command.params:
        if p.required and p.name not in given:
            raise UsageError(f'"{command.text}" needs {p.name}= ({p.setting.summary.rstrip(".")})')
    groups: dict[str, list[str]] = {}
    for p in command.params:
        if p.group:
            groups.setdefault(p.group, []).append(p.name)
    for members in groups.values():
        chosen = [m for m in members if m in given]
        spelled = ", ".join(m if m == "all" else f"{m}=" for m in members)
        if len(chosen) > 1:
            raise UsageError(f'"{command.text}" takes only one of {spelled}; got {", ".join(chosen)}')
        # A show without a selection shows everything; other commands must say which object.
        if not chosen and command.words[0] != "show":
            raise UsageError(f'"{command.text}" needs one of {spelled}')
