"""netsh parsing, quoting and help: pure, no server (except where a test says it needs none)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.netsh import helptext
from clients.netsh.commands import HANDLERS
from clients.netsh.errors import EXIT_USAGE, UsageError
from clients.netsh.main import main, parse_options
from clients.netsh.syntax import HelpRequest, parse_args, quote, resolve_command, split_line
from policyagent.model.errors import ValidationError
from policyagent.model.settings import STATIC_COMMANDS, Command, RootCa
from policyagent.pb import pb


def command(*words: str) -> Command:
    found = [c for c in STATIC_COMMANDS if c.words == words]
    assert found, words
    return found[0]


def parse(line: str) -> tuple[Command, dict[str, object]]:
    target, rest = resolve_command(split_line(line))
    assert isinstance(target, Command)
    inv = parse_args(target, rest)
    return target, {a.name: a.value for a in inv.args}


# ------------------------------------------------------------ tokens and quoting


def test_split_line_honours_double_quotes() -> None:
    assert split_line('add policy name="Corp Policy" description="a b"  mmpfs=yes') == [
        "add",
        "policy",
        "name=Corp Policy",
        "description=a b",
        "mmpfs=yes",
    ]
    assert split_line('name="" x') == ["name=", "x"]
    assert split_line(r'rootca="CN=\'Quoted\' CA certmap:yes"') == ["rootca=CN=\\'Quoted\\' CA certmap:yes"]


def test_split_line_unclosed_quote_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unclosed double quote"):
        split_line('add policy name="Corp')


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_quote_round_trips_any_text(value: str) -> None:
    assert split_line(f"tag={quote(value)}") == [f"tag={value}"]


def test_quote_leaves_plain_values_bare() -> None:
    assert quote("Corp") == "Corp"
    assert quote("a b") == '"a b"'
    assert quote("") == '""'
    assert quote('say "hi"\n') == '"say \\"hi\\"\\n"'


# ------------------------------------------------------------ commands and tags


def test_command_words_are_case_insensitive_and_abbreviated() -> None:
    target, _ = parse("SH PO name=x")
    assert target.words == ("show", "policy")
    target, _ = parse("a filtera name=x")
    assert target.words == ("add", "filteraction")
    # an exact word wins over the longer words it is a prefix of
    target, _ = parse("add filter filterlist=x srcaddr=me dstaddr=any")
    assert target.words == ("add", "filter")
    target, _ = parse("dump")
    assert target.words == ("dump",)


def test_ambiguous_and_unknown_commands_list_candidates() -> None:
    with pytest.raises(UsageError, match=r'ambiguous show command "filter": could be filteraction, filterlist'):
        resolve_command(["show", "filter"])
    with pytest.raises(UsageError, match=r'ambiguous command "d": could be delete, dump'):
        resolve_command(["d"])
    with pytest.raises(UsageError, match=r'unknown command "frob"; expected one of: add, delete, dump'):
        resolve_command(["frob"])
    with pytest.raises(UsageError, match=r'incomplete command "add": add what\? one of: filter, filteraction'):
        resolve_command(["add"])


def test_tags_are_case_insensitive_prefixes() -> None:
    _, values = parse("add policy NAME=Corp MMSEC=3DES-SHA1-3 mmlife=60 qmper=4 Pol=30")
    assert values["name"] == "Corp"
    methods = values["mmsecmethods"]
    assert isinstance(methods, list) and methods[0].dh_group == pb.DH_GROUP_MODP2048
    assert (values["mmlifetime"], values["qmpermm"], values["pollinginterval"]) == (60, 4, 30)


def test_ambiguous_tag_lists_candidates() -> None:
    with pytest.raises(UsageError, match=r'ambiguous tag for "set policy" "n": could be name, newname'):
        parse("set policy n=x")
    with pytest.raises(UsageError, match=r'ambiguous tag for "add filter" "d": could be description, dstaddr'):
        parse("add filter filterlist=x srcaddr=me d=any")


def test_unknown_tag_lists_the_commands_tags() -> None:
    with pytest.raises(
        UsageError, match=r'unknown tag for "add filterlist" "color"; expected one of: description, name'
    ):
        parse("add filterlist name=x color=red")


def test_positional_values_fill_positional_params() -> None:
    _, values = parse('add policy "Corp Policy" description=d')
    assert values["name"] == "Corp Policy"
    _, values = parse("exportpolicy /tmp/x.ipsec")
    assert values["file"] == "/tmp/x.ipsec"
    with pytest.raises(UsageError, match=r'unexpected value "extra" for "add policy": give it as tag=value'):
        parse("add policy Corp extra")
    with pytest.raises(UsageError, match=r'unexpected value "x"'):
        parse("add filter x")


def test_bare_all_and_name_all_select_all() -> None:
    _, values = parse("show policy all")
    assert values == {"all": True}
    _, values = parse("show policy name=all level=verbose")
    assert values == {"all": True, "level": "verbose"}
    _, values = parse("delete rule all policy=Corp")
    assert values == {"all": True, "policy": "Corp"}
    # a command without an "all" alternative takes "all" as an ordinary name
    _, values = parse("add policy all")
    assert values == {"name": "all"}


def test_missing_required_and_conflicting_alternatives() -> None:
    with pytest.raises(UsageError, match=r'"add rule" needs policy='):
        parse("add rule name=r filterlist=f filteraction=a")
    with pytest.raises(UsageError, match=r'"set policy" needs one of name=, guid='):
        parse("set policy description=x")
    with pytest.raises(UsageError, match=r'"delete policy" takes only one of name=, all; got name, all'):
        parse("delete policy name=x all")
    with pytest.raises(UsageError, match=r"name= is given more than once"):
        parse("add policy name=a name=b")
    # a show without a selection shows everything
    _, values = parse("show filterlist")
    assert values == {}


def test_values_are_parsed_by_the_setting_table() -> None:
    with pytest.raises(ValidationError, match=r"^protocol: protocol number 300 is out of range"):
        parse("add filter filterlist=x srcaddr=me dstaddr=any protocol=300")
    with pytest.raises(ValidationError, match=r"^mmlifetime: 1 is out of range"):
        parse("add policy name=x mmlifetime=1")
    with pytest.raises(ValidationError, match=r'^mmsecmethods: "3DES-SHA9-2": unknown integrity algorithm "SHA9"'):
        parse("add policy name=x mmsecmethods=3DES-SHA9-2")
    with pytest.raises(ValidationError, match=r"^psk: the pre-shared key must not be empty"):
        parse("add rule name=r policy=p filterlist=f filteraction=a psk=")
    _, values = parse('add rule name=r policy=p filterl=f filtera=a rootca="CN=Root, O=Ex certmap:yes"')
    assert values["rootca"] == RootCa("CN=Root, O=Ex", certmap=True)


def test_rootca_is_repeatable_and_order_is_kept() -> None:
    target, rest = resolve_command(
        split_line(
            'add rule name=r policy=p filterlist=f filteraction=a psk=k rootca="CN=A" kerberos=yes rootca="CN=B"'
        )
    )
    assert isinstance(target, Command)
    inv = parse_args(target, rest)
    assert [a.name for a in inv.args if a.name in ("psk", "rootca", "kerberos")] == [
        "psk",
        "rootca",
        "kerberos",
        "rootca",
    ]


# ------------------------------------------------------------ help


def test_help_tokens_anywhere() -> None:
    assert resolve_command(["?"]) == (HelpRequest(()), [])
    assert resolve_command(["add", "help"]) == (HelpRequest(("add",)), [])
    target, _ = resolve_command(["add", "policy", "name=x", "?"])
    assert isinstance(target, HelpRequest) and target.command == command("add", "policy")


@pytest.mark.parametrize("cmd", STATIC_COMMANDS, ids=lambda c: c.text)
def test_command_help_comes_from_the_table(cmd: Command) -> None:
    text = helptext.command_help(cmd)
    assert text.startswith(f"Usage: {cmd.text}")
    assert cmd.summary in text
    flat = " ".join(text.split())
    for p in cmd.params:
        assert " ".join(p.setting.summary.split()) in flat, p.name
        if p.name != "all":
            assert f"{p.name} = {p.setting.syntax()}" in text
        if p.setting.default:
            assert f"default {p.setting.default}" in text
    if cmd.remarks:
        assert " ".join(cmd.remarks.split()) in flat


def test_every_command_has_a_handler_and_appears_in_context_help() -> None:
    assert set(HANDLERS) == {c.words for c in STATIC_COMMANDS}
    text = helptext.context_help()
    for cmd in STATIC_COMMANDS:
        assert cmd.text in text and cmd.summary in text


def test_help_at_every_level_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    # Help needs no server: -r points nowhere.
    def run(*args: str) -> str:
        assert main(["-r", "127.0.0.1:1", *args]) == 0
        return capsys.readouterr().out

    assert "ipsec static" in run("?")
    assert run("ipsec", "static", "?") == helptext.context_help()
    assert run("ipsec", "static", "add", "?") == helptext.verb_help("add")
    assert run("ipsec", "static", "add", "policy", "?") == helptext.command_help(command("add", "policy"))
    assert run("ipsec", "static", "sh", "po", "help") == helptext.command_help(command("show", "policy"))
    assert run("IPSEC", "STAT", "set", "defaultrule", "/?") == helptext.command_help(command("set", "defaultrule"))


# ------------------------------------------------------------ usage errors through main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ipsec", "static", "frob"], 'netsh: unknown command "frob"; expected one of: add, delete'),
        (["ipsec", "static", "show", "filter"], 'netsh: ambiguous show command "filter"'),
        (["ipsec", "static", "add", "policy", "nme=x"], 'netsh: unknown tag for "add policy" "nme"'),
        (["ipsec", "static", "add", "policy"], 'netsh: "add policy" needs name='),
        (["--frobnicate"], 'netsh: unknown option "--frobnicate"'),
        (["-r"], "netsh: -r needs a value"),
        (["show", "policy"], 'netsh: unknown command "show"; expected one of: ipsec'),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-r", "127.0.0.1:1", *args]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message)
    assert captured.err.count("\n") == 1


def test_options() -> None:
    opts = parse_options(["-r", "h:1", "--json", "-f", "x", "--debug", "ipsec", "static"])
    assert (opts.server, opts.json, opts.script, opts.debug, opts.words) == (
        "h:1",
        True,
        "x",
        True,
        ["ipsec", "static"],
    )
    assert parse_options(["--remote=unix:/s"]).server == "unix:/s"


def test_dynamic_mode_is_refused_honestly(capsys: pytest.CaptureFixture[str]) -> None:
    # Dynamic mode talks to one computer's agent: on its unix socket, or through a policy server for a named
    # computer. A policy server address without a computer is refused, for show and add alike, before anything
    # is sent (tests/test_netsh_dynamic.py covers the commands, tests/test_relay.py the relay).
    for words in (["show", "all"], ["add", "mmpolicy", "name=x"]):
        assert main(["-r", "127.0.0.1:1", "ipsec", "dynamic", *words]) == 1
        err = capsys.readouterr().err
        assert err.startswith("netsh: ipsec dynamic through the policy server 127.0.0.1:1 needs the computer")
        assert "--computer NAME" in err and "-r unix:STATE_DIR/agent.sock" in err and err.count("\n") == 1
