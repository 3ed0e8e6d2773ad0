"""netsh against fresh stores: the acceptance tests, dump and export round trips, scripts, races.

Each test that needs a store of its own starts a server with a new data dir
(`start_server`); the refusal tests share one module server holding a rich store,
since a refused command must leave it as it was.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ServerProcess, start_server_process

from clients.netsh import commands
from clients.netsh.client import AdminClient
from clients.netsh.main import main

DEFAULT_POLICIES = ("Client (Respond Only)", "Secure Server (Require Security)", "Server (Request Security)")

# A store with a bit of everything: user objects, changed and renamed defaults (two default
# filter lists swap names), deleted defaults with a user object taking a deleted default's
# name, an assigned policy, PSK/certificate/Kerberos rules, a tunnel rule, many filters,
# IPv6, server keywords, quotes and a line break in descriptions, DH group "3".
RICH_STORE = r"""
# comment lines and blank lines are skipped

ipsec static add filterlist name="Web Servers" description="the web farm"
ipsec static add filter filterlist="Web Servers" srcaddr=me dstaddr=192.0.2.10 protocol=TCP dstport=443 description=https
ipsec static add filter filterlist="Web Servers" srcaddr=me dstaddr=192.0.2.0 dstmask=255.255.255.0 protocol=tcp dstport=80
ipsec static add filter filterlist="Web Servers" srcaddr=me dstaddr=2001:db8::1 protocol=udp srcport=500 dstport=4500
ipsec static add filter filterlist="Web Servers" srcaddr=dns dstaddr=any protocol=udp dstport=53 mirrored=no
ipsec static add filter filterlist="Web Servers" srcaddr=me dstaddr=2001:db8:1:: dstmask=48 protocol=50
netsh ipsec static add filterlist name=Tunnel
pushd ipsec static
add filter filterlist=Tunnel srcaddr=10.1.0.0 srcmask=16 dstaddr=10.2.0.0 dstmask=255.255.0.0 mirrored=no
add filteraction name=Strong qmsec="ESP[AES256,SHA256]:50000k/1800s AH[SHA1]+ESP[3DES,SHA1]" qmpfs=yes
add filteraction name=Drop action=block description="with \"quotes\" and a\nline break"
popd
ipsec static add policy name="Corp Policy" description="line1\nline2" mmsecmethods="3DES-SHA1-3 AES256-SHA256-14" mmpfs=yes mmlifetime=240 pollinginterval=60
ipsec static add rule name=web policy="Corp Policy" filterlist="Web Servers" filteraction=Strong psk="s3cret key" kerberos=yes rootca="CN=Corp Root, O=Example certmap:yes excludecaname:yes"
ipsec static add rule name=tunnel policy="Corp Policy" filterlist=Tunnel filteraction=Strong tunnel=198.51.100.7 conntype=lan rootca="CN=Other"
ipsec static add rule name=icmp policy="Corp Policy" filterlist="All ICMP Traffic" filteraction=Permit kerberos=no activate=no
ipsec static set defaultrule policy="Corp Policy" qmpfs=yes qmsecmethods="ESP[3DES,SHA1]" psk=other activate=no
ipsec static add policy name=Second activatedefaultrule=no
ipsec static set filteraction name=Permit description=changed
ipsec static set filterlist name="All ICMP Traffic" newname=swap
ipsec static set filterlist name="All IP Traffic" newname="All ICMP Traffic"
ipsec static set filterlist name=swap newname="All IP Traffic"
ipsec static add filter filterlist="All IP Traffic" srcaddr=me dstaddr=203.0.113.5 protocol=icmp
ipsec static set policy name="Server (Request Security)" mmlifetime=600 newname="Server Renamed"
ipsec static delete rule name="All ICMP Traffic" policy="Server Renamed"
ipsec static set defaultrule policy="Server Renamed" kerberos=no psk=abc
ipsec static delete policy name="Client (Respond Only)"
ipsec static delete policy name="Secure Server (Require Security)"
ipsec static delete filteraction name="Require Security"
ipsec static add filteraction name="Require Security" action=block
ipsec static set policy name="Corp Policy" assign=yes
"""
MANY_FILTERS = "\n".join(
    f"ipsec static add filter filterlist=Many srcaddr=me dstaddr=10.20.{i // 250}.{i % 250 + 1}" for i in range(60)
)
RICH_SCRIPT = RICH_STORE + "ipsec static add filterlist Many\n" + MANY_FILTERS + "\n"


@dataclass
class Run:
    code: int
    out: str
    err: str


class Netsh:
    """Runs netsh in-process against one server, capturing its output."""

    def __init__(self, address: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.address = address
        self.capsys = capsys

    def __call__(self, *args: str) -> Run:
        self.capsys.readouterr()
        code = main(["-r", self.address, *args])
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)

    def static(self, *words: str) -> Run:
        return self("ipsec", "static", *words)

    def dump(self) -> str:
        result = self.static("dump")
        assert result.code == 0, result.err
        return result.out

    def script(self, path: Path) -> Run:
        return self("-f", str(path))


def ok(result: Run) -> Run:
    assert result.code == 0, result.err
    return result


@pytest.fixture
def fresh(
    start_server: Callable[..., ServerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[[], Netsh]]:
    """Factory: a Netsh on a new server with a new store (defaults only)."""
    count = 0

    def make() -> Netsh:
        nonlocal count
        count += 1
        return Netsh(start_server(data_dir=tmp_path / f"store-{count}").address, capsys)

    yield make


def write_script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------ acceptance


def test_show_policy_all_verbose_lists_the_three_defaults(fresh: Callable[[], Netsh]) -> None:
    netsh = fresh()
    out = ok(netsh.static("show", "policy", "name=all", "level=verbose")).out
    names = re.findall(r"^Policy Name +: (.*)$", out, re.MULTILINE)
    assert names == sorted(DEFAULT_POLICIES, key=str.casefold)
    blocks = dict(zip(names, re.split(r"^Policy Name +: ", out, flags=re.MULTILINE)[1:], strict=True))

    def rules(block: str) -> list[tuple[str, str, str]]:
        lists = re.findall(r"^Filter List +: (.*)$", block, re.MULTILINE)
        actions = re.findall(r"^Filter Action +: (.*)$", block, re.MULTILINE)
        auths = re.findall(r"^Authentication Methods +: (.*)$", block, re.MULTILINE)
        return list(zip(lists, actions, auths, strict=True))

    kerberos = "1. Kerberos"
    dynamic = ("<Dynamic>", "Default Response", kerberos)
    assert rules(blocks["Client (Respond Only)"]) == [dynamic]
    assert rules(blocks["Server (Request Security)"]) == [
        ("All IP Traffic", "Request Security (Optional)", kerberos),
        ("All ICMP Traffic", "Permit", kerberos),
        dynamic,
    ]
    assert rules(blocks["Secure Server (Require Security)"]) == [
        ("All IP Traffic", "Require Security", kerberos),
        ("All ICMP Traffic", "Permit", kerberos),
        dynamic,
    ]
    # verbose expands the filters and the security methods
    assert "Source IP Address" in blocks["Server (Request Security)"]
    assert "ESP[3DES,SHA1]:100000k/3600s" in blocks["Server (Request Security)"]
    assert re.findall(r"^Assigned +: (.*)$", out, re.MULTILINE) == ["NO", "NO", "NO"]


def test_dump_of_a_new_store_runs_back_to_the_same_dump(fresh: Callable[[], Netsh], tmp_path: Path) -> None:
    a, b = fresh(), fresh()
    text = a.dump()
    assert "GUID" not in text and "{" not in text
    ok(b.script(write_script(tmp_path, "dump.netsh", text)))
    assert b.dump() == text


def test_dump_round_trip_of_a_rich_store(fresh: Callable[[], Netsh], tmp_path: Path) -> None:
    source, target, busy = fresh(), fresh(), fresh()
    ok(source.script(write_script(tmp_path, "rich.netsh", RICH_SCRIPT)))
    text = source.dump()
    # Nothing store-specific, secrets in full, DH group "3", the full backup warning.
    assert not re.search(r"\{[0-9A-F-]{36}\}", text)
    assert 'psk="s3cret key"' in text and "3DES-SHA1-3 AES256-SHA256-3" in text
    assert "pre-shared keys in clear text" in text
    script = write_script(tmp_path, "dump.netsh", text)
    ok(target.script(script))
    assert target.dump() == text
    # Against a store that already holds other things (and an assigned policy) too.
    ok(busy.static("add", "policy", "Leftover", "assign=yes"))
    ok(busy.static("add", "filterlist", "Web Servers", "description=not the one"))
    ok(busy.static("set", "filteraction", "Permit", "action=block"))
    ok(busy.script(script))
    assert busy.dump() == text
    # The stores' contents agree too, not just their dumps (ids of non-default objects aside).
    assert _comparable(source) == _comparable(target) == _comparable(busy)


def _comparable(netsh: Netsh) -> str:
    data = json.loads(ok(netsh("--json", "ipsec", "static", "show", "all")).out)
    names = {o["id"]: o["name"] for kind in ("filter_lists", "filter_actions") for o in data[kind]}

    def scrub(value: object) -> object:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key in ("id", "revision", "modified_unix_ms", "dns_name"):
                    continue
                if key in ("filter_list_id", "filter_action_id"):
                    item = names[item]
                out[key] = scrub(item)
            return out
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return json.dumps({k: sorted((scrub(o) for o in v), key=lambda o: o["name"]) for k, v in data.items()})


def test_export_then_import_into_a_new_store_exports_the_same(fresh: Callable[[], Netsh], tmp_path: Path) -> None:
    source, target = fresh(), fresh()
    ok(source.script(write_script(tmp_path, "rich.netsh", RICH_SCRIPT)))
    first, second = tmp_path / "first.ipsec", tmp_path / "second.ipsec"
    ok(source.static("exportpolicy", f"file={first}"))
    # The new store starts with the defaults; emptying it first makes it hold exactly the file.
    ok(target.static("delete", "all"))
    ok(target.static("importpolicy", f"file={first}"))
    ok(target.static("exportpolicy", str(second)))

    def without_time(path: Path) -> dict[str, object]:
        data: dict[str, object] = json.loads(path.read_text())
        assert data.pop("exported_at")
        return data

    assert without_time(first) == without_time(second)
    assert "s3cret key" in second.read_text()
    assert target.dump() == source.dump()


def test_delete_all_and_restoredefaults(fresh: Callable[[], Netsh]) -> None:
    netsh = fresh()
    pristine = netsh.dump()
    ok(netsh.static("add", "policy", "Mine", "assign=yes"))
    ok(netsh.static("set", "filteraction", "Permit", "description=changed"))
    ok(netsh.static("delete", "all"))
    assert "No policies in the store." in ok(netsh.static("show", "all")).out
    ok(netsh.static("restoredefaults"))
    assert netsh.dump() == pristine


# ------------------------------------------------------------ refusals leave the store unchanged


@pytest.fixture(scope="module")
def rich_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("rich")
    server = start_server_process(base / "data", log_dir=base)
    script = base / "rich.netsh"
    script.write_text(RICH_SCRIPT, encoding="utf-8")
    assert main(["-r", server.address, "-f", str(script)]) == 0
    yield server
    server.close()


REFUSALS: list[tuple[str, str]] = [
    ("add filter filterlist=Tunnel srcaddr=300.1.1.1 dstaddr=any", 'srcaddr: "300.1.1.1" is not a valid IPv4'),
    ("add filter filterlist=Tunnel srcaddr=me dstaddr=10.0.0.0 dstmask=255.0.255.0", "is not contiguous"),
    ("add filter filterlist=Tunnel srcaddr=me dstaddr=any protocol=icmp dstport=80", "ports can only be given"),
    ("add filter filterlist=Tunnel srcaddr=me dstaddr=any protocol=300", "protocol number 300 is out of range"),
    (
        "add filter filterlist=Tunnel srcaddr=10.1.0.0 srcmask=16 dstaddr=10.2.0.0 dstmask=16 mirrored=no",
        "is the same as",
    ),
    ("add filter filterlist=Nowhere srcaddr=me dstaddr=any", 'there is no filter list named "Nowhere"'),
    ("add policy name=x mmlifetime=3000", "mmlifetime: 3000 is out of range"),
    ("add policy name=x pollinginterval=0", "pollinginterval: 0 is out of range"),
    ('add filteraction name=x qmsecmethods="ESP[3DES,SHA1]:100k/3600s"', "lifetime 100 KB is out of range"),
    ('add filteraction name=x qmsecmethods="ESP[3DES,SHA1]:100000k/10s"', "lifetime 10 seconds is out of range"),
    ("add policy name=x mmsecmethods=3DES-SHA9-2", 'unknown integrity algorithm "SHA9"'),
    ("add policy name=x mmsecmethods=3DES-SHA1-5", 'unknown DH group "5"'),
    ('add filteraction name=x qmsecmethods="ESP[RC4,SHA1]"', 'unknown encryption algorithm "RC4"'),
    ("add filteraction name=x action=permit qmpfs=yes", "qmpfs: applies only to negotiate actions"),
    ('add rule name=x policy="Corp Policy" filterlist=Tunnel filteraction=Strong psk=', "psk: the pre-shared key must"),
    ('add rule name=x policy="Corp Policy" filterlist=Tunnel filteraction=Strong rootca="not a dn"', "is not an X.500"),
    ('add rule name=x policy="Corp Policy" filterlist=Nope filteraction=Strong', 'no filter list named "Nope"'),
    ('add rule name=x policy="Corp Policy" filterlist=Tunnel filteraction=Nope', 'no filter action named "Nope"'),
    ("add rule name=x policy=Nope filterlist=Tunnel filteraction=Strong", 'there is no policy named "Nope"'),
    ('add rule name=WEB policy="Corp Policy" filterlist=Tunnel filteraction=Strong', 'rule 1 is already named "WEB"'),
    ('add rule name=x policy="Corp Policy" filterlist="Web Servers" filteraction=Strong tunnel=192.0.2.1', "mirrored"),
    ('add policy name="corp policy"', 'another policy is already named "corp policy"'),
    ('set filterlist name=Tunnel newname="web servers"', 'another filter list is already named "web servers"'),
    ('delete filterlist name="Web Servers"', 'filter list "Web Servers" is used by policy "Corp Policy"/rule 1'),
    ("delete filteraction name=all", 'filter action "Permit" is used by policy'),
    ('delete policy name="Corp Policy"', "is assigned; unassign it before deleting it"),
    ("delete policy all", "is assigned; unassign it before deleting it"),
    ('delete rule name="<Dynamic>" policy="Corp Policy"', "the default response rule is not a rule you can delete"),
    ('delete rule id=4 policy="Corp Policy"', "set defaultrule"),
    ('set rule id=7 policy="Corp Policy" activate=yes', 'policy "Corp Policy" has no rule 7'),
    ('set rule name=web policy="Corp Policy" rootca="CN=A" rootca="CN=a"', "rootca: is listed twice"),
    ('set policy name="Corp Policy" qmpermm=5', "qmpermm: must be 1 when master key PFS"),
    ('set policy name="Corp Policy" gponame=Sales', "gponame: assigning a policy to a Group Policy object"),
    ('set defaultrule policy="Corp Policy" kerberos=no', "needs at least one authentication method"),
    ("delete filter filterlist=Tunnel srcaddr=me dstaddr=any", 'no filter in filter list "Tunnel" matches'),
    ("importpolicy file=/nonexistent/x.ipsec", "No such file or directory"),
    ("add policy name=x colour=red", 'unknown tag for "add policy" "colour"'),
    ("frobnicate", 'unknown command "frobnicate"'),
]


@pytest.mark.parametrize(("line", "message"), REFUSALS, ids=[line for line, _ in REFUSALS])
def test_refused_commands_leave_the_store_unchanged(
    rich_server: ServerProcess, capsys: pytest.CaptureFixture[str], line: str, message: str, tmp_path: Path
) -> None:
    netsh = Netsh(rich_server.address, capsys)
    before = netsh.dump()
    result = netsh.script(write_script(tmp_path, "one.netsh", f"ipsec static {line}\n"))
    assert result.code in (1, 2), result
    assert message in result.err
    assert result.err.startswith(f"{tmp_path / 'one.netsh'}:1: ") and result.err.count("\n") == 1
    assert netsh.dump() == before


def test_server_side_refusals_leave_the_store_unchanged(
    rich_server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same refusals with the client's own check switched off: the server's planner refuses.
    netsh = Netsh(rich_server.address, capsys)
    before = netsh.dump()
    monkeypatch.setattr(commands, "plan_writes", lambda view, mutations: None)
    for line, message in REFUSALS:
        result = netsh.static(*shlex.split(line))
        assert result.code in (1, 2) and message.split('"')[0] in result.err, (line, result)
    assert netsh.dump() == before


# ------------------------------------------------------------ scripts and the interactive reader


def test_batch_stops_at_the_first_error_and_names_the_line(fresh: Callable[[], Netsh], tmp_path: Path) -> None:
    netsh = fresh()
    script = write_script(
        tmp_path,
        "batch.netsh",
        "# setup\n"
        "ipsec static add filterlist name=First\n"
        "\n"
        "ipsec static add filter filterlist=First srcaddr=me dstaddr=any protocol=icmp dstport=1\n"
        "ipsec static add filterlist name=Never\n",
    )
    result = netsh.script(script)
    assert result.code == 1
    assert (
        result.err == f'{script}:4: filter list "First"/filter 1: dstport: ports can only be given with '
        "protocol TCP or UDP\n"
    )
    names = {
        fl["name"]
        for fl in json.loads(ok(netsh("--json", "ipsec", "static", "show", "filterlist")).out)["filter_lists"]
    }
    assert "First" in names and "Never" not in names
    usage = write_script(tmp_path, "usage.netsh", "ipsec static show policy\nipsec static sho polic nam=x bogus=1\n")
    result = netsh.script(usage)
    assert result.code == 2 and result.err.startswith(f'{usage}:2: unknown tag for "show policy" "bogus"')
    missing = netsh.script(tmp_path / "missing.netsh")
    assert missing.code == 1 and "No such file or directory" in missing.err


def test_script_in_a_context_and_interactive_reader(
    fresh: Callable[[], Netsh], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netsh = fresh()
    script = write_script(tmp_path, "ctx.netsh", "add filterlist name=Ctx\n  # indented comment\nexit\nadd bogus\n")
    ok(netsh("-f", str(script), "ipsec", "static"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("add filterlist name=FromStdin\nshow filterlist name=FromStdin\n"))
    result = ok(netsh.static())
    assert re.search(r"^FilterList Name +: FromStdin$", result.out, re.MULTILINE)
    monkeypatch.setattr(sys, "stdin", io.StringIO("ipsec static\nsh filterl Ctx\nfrob\nadd filterlist Later\n"))
    result = netsh()
    assert result.code == 2 and result.err.startswith("<stdin>:3: unknown command") and "Ctx" in result.out


# ------------------------------------------------------------ concurrent admins


def test_two_users_racing_on_one_object_second_gets_the_conflict(
    fresh: Callable[[], Netsh], monkeypatch: pytest.MonkeyPatch
) -> None:
    netsh = fresh()
    original = AdminClient.get_store
    raced = False

    def racing(self: AdminClient) -> object:
        # User A has read the store; user B changes the same policy before A writes.
        nonlocal raced
        contents = original(self)
        if not raced:
            raced = True
            assert (
                main(
                    [
                        "-r",
                        netsh.address,
                        "ipsec",
                        "static",
                        "set",
                        "policy",
                        "Client (Respond Only)",
                        "description=by B",
                    ]
                )
                == 0
            )
        return contents

    monkeypatch.setattr(AdminClient, "get_store", racing)
    result = netsh.static("set", "policy", "name=Client (Respond Only)", "description=by A")
    assert result.code == 1
    assert result.err.startswith('netsh: policy "Client (Respond Only)" was changed by someone else')
    assert "nothing was written" in result.err
    monkeypatch.undo()
    data = json.loads(ok(netsh("--json", "ipsec", "static", "show", "policy", "Client (Respond Only)")).out)
    assert data["policies"][0]["description"] == "by B"


# ------------------------------------------------------------ the console script


def _console_script() -> str:
    found = shutil.which("netsh", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the netsh console script is not installed in this environment (pip install -e .)")
    return found


def test_console_script_runs_commands(fresh: Callable[[], Netsh], tmp_path: Path) -> None:
    netsh = fresh()
    exe = _console_script()
    env = {**os.environ, "POLICYAGENT_SERVER": netsh.address}
    shown = subprocess.run(
        [exe, "ipsec", "static", "sh", "po", "name=all", "level=verbose"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    for name in DEFAULT_POLICIES:
        assert re.search(rf"^Policy Name +: {re.escape(name)}$", shown.stdout, re.MULTILINE)
    piped = subprocess.run(
        [exe, "ipsec", "static"],
        input="add policy Piped\nset policy Piped assign=yes\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    dumped = subprocess.run(
        [exe, "ipsec", "static", "dump"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert "ipsec static set policy name=Piped assign=yes" in dumped.stdout


def test_console_script_errors_and_exit_codes(tmp_path: Path) -> None:
    exe = _console_script()
    env = {**os.environ, "POLICYAGENT_SERVER": f"unix:{tmp_path / 'no-server.sock'}"}
    down = subprocess.run(
        [exe, "ipsec", "static", "show", "all"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert down.returncode == 1
    assert down.stderr.startswith(f"netsh: cannot reach the policy server at unix:{tmp_path / 'no-server.sock'}")
    assert "policyagent server" in down.stderr and down.stderr.count("\n") == 1 and "Traceback" not in down.stderr
    usage = subprocess.run(
        [exe, "ipsec", "static", "show", "filter"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert usage.returncode == 2 and usage.stderr.startswith('netsh: ambiguous show command "filter"')
