"""`netsh ipsec static set store` / `show store`: which store the static commands edit.

The agent's stores are served here the way the agent serves them (policyagent/agent/daemon.py):
its own PolicyAdminServicer over SQLite stores on STATE_DIR/agent.sock and persistent.sock, plain
gRPC on a unix socket; the domain store is a real policy server (the module's `server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ServerProcess
from grpc import aio
from slapd import Slapd, slapd_unavailable, start_slapd

from clients.netsh.main import main
from policyagent.agent.daemon import PERSISTENT_SOCKET_FILE, SOCKET_FILE
from policyagent.server.admin import PolicyAdminServicer, add_to_server
from policyagent.store.sqlite import SqliteStore


@dataclass
class AgentStores:
    state_dir: Path
    local: SqliteStore
    persistent: SqliteStore
    executor: ThreadPoolExecutor

    def names(self, store: SqliteStore) -> set[str]:
        """Filter list names, read in the stores' thread (SQLite connections stay on theirs)."""
        contents, _ = self.executor.submit(store.snapshot).result(10)
        return {fl.name for fl in contents.filter_lists}


@pytest.fixture
def agent_stores() -> Iterator[AgentStores]:
    # A short directory: a unix socket path must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="pa-store-"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="agent-stores", daemon=True)
    thread.start()
    executor = ThreadPoolExecutor(1)
    local = executor.submit(SqliteStore, base / "local.db").result(10)
    persistent = executor.submit(SqliteStore, base / "persistent.db").result(10)

    async def start() -> tuple[aio.Server, aio.Server]:
        server = aio.server()
        add_to_server(PolicyAdminServicer(local, executor), server)
        server.add_insecure_port(f"unix:{base / SOCKET_FILE}")
        other = aio.server()
        add_to_server(PolicyAdminServicer(persistent, executor), other)
        other.add_insecure_port(f"unix:{base / PERSISTENT_SOCKET_FILE}")
        await server.start()
        await other.start()
        return server, other

    servers = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield AgentStores(base, local, persistent, executor)
    finally:
        for s in servers:
            asyncio.run_coroutine_threadsafe(s.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        executor.submit(local.close).result(10)
        executor.submit(persistent.close).result(10)
        executor.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def _content(text: str) -> object:
    """A `--json` show without the store's bookkeeping (revision, modification time)."""

    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("revision", "modified_unix_ms", "modifiedUnixMs")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(text))


def _script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "script.netsh"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_set_store_switches_between_the_agents_stores_and_the_domain(
    server: ServerProcess, agent_stores: AgentStores, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POLICYAGENT_AGENT_SOCKET", str(agent_stores.state_dir / SOCKET_FILE))
    script = _script(
        tmp_path,
        "show store\n"
        "add filterlist name=\"Domain list\"\n"
        "set store location=local\n"
        "show store\n"
        "add filterlist name=\"Local list\"\n"
        "set store persistent\n"
        "add filterlist name=\"Boot list\"\n"
        "show filterlist name=\"Boot list\"\n"
        "set store location=domain\n"
        "show store\n",
    )
    capsys.readouterr()
    code = main(["-r", server.address, "-f", script, "ipsec", "static"])
    out, err = capsys.readouterr()
    assert code == 0, err
    stores = [line for line in out.splitlines() if line.startswith("Store: ")]
    assert stores == [
        f"Store: Domain Store (policy server {server.address})",
        f"Store: Local Store (agent {agent_stores.state_dir / SOCKET_FILE})",
        f"Store: Domain Store (policy server {server.address})",
    ]
    assert f"Persistent Store (agent {agent_stores.state_dir / PERSISTENT_SOCKET_FILE})" in out
    assert agent_stores.names(agent_stores.local) == {"Local list"}
    assert agent_stores.names(agent_stores.persistent) == {"Boot list"}


def test_r_naming_an_agent_store_socket_talks_to_it_without_tls(
    agent_stores: AgentStores, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"unix:{agent_stores.state_dir / PERSISTENT_SOCKET_FILE}"
    assert main(["-r", target, "ipsec", "static", "add", "filterlist", "name=Mgmt"]) == 0, capsys.readouterr().err
    assert agent_stores.names(agent_stores.persistent) == {"Mgmt"}
    capsys.readouterr()
    assert main(["-r", target, "ipsec", "static", "show", "store"]) == 0
    assert "Persistent Store" in capsys.readouterr().out


def test_set_store_errors_name_the_problem(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICYAGENT_AGENT_SOCKET", str(tmp_path / "nowhere" / SOCKET_FILE))
    capsys.readouterr()
    assert main(["-r", server.address, "ipsec", "static", "set", "store", "location=local", "domain=x.test"]) == 1
    assert "domain=x.test goes with location=domain" in capsys.readouterr().err
    assert main(["-r", server.address, "ipsec", "static", "set", "store", "location=galaxy"]) != 0
    assert "location" in capsys.readouterr().err
    # No agent running: the next command says where the agent's store was looked for.
    script = _script(tmp_path, "set store location=local\nshow filterlist all\n")
    assert main(["-r", server.address, "-f", script, "ipsec", "static"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the agent's store at {tmp_path / 'nowhere' / SOCKET_FILE}" in err
    assert "policyagent agent --state-dir" in err


@contextlib.contextmanager
def server_with_directory(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> Iterator[tuple[ServerProcess, Slapd]]:
    """A policy server whose --directory is a throwaway slapd (DC=example,DC=test); skips without slapd."""
    why = slapd_unavailable()
    if why is not None:
        pytest.skip(why)
    ldap = start_slapd(tmp_path / "slapd")
    try:
        password = tmp_path / "directory.password"
        password.write_text(ldap.password + "\n", encoding="utf-8")
        password.chmod(0o600)
        server = start_server(
            tmp_path / "data",
            extra=["--directory", ldap.url, "--directory-base", ldap.suffix, "--directory-user", ldap.bind_dn,
                   "--directory-password-file", str(password)],
        )
        yield server, ldap
    finally:
        ldap.stop()


def test_set_store_domain_checks_the_servers_directory_domain(
    start_server: Callable[..., ServerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without --directory the server has no directory domain to compare with.
    plain = start_server(tmp_path / "plain")
    capsys.readouterr()
    assert main(["-r", plain.address, "ipsec", "static", "set", "store", "domain", "example.test"]) == 1
    err = capsys.readouterr().err
    assert f"the policy server at {plain.address} serves no directory domain" in err and "example.test" in err

    with server_with_directory(start_server, tmp_path) as (server, _ldap):
        script = _script(tmp_path, "set store location=domain domain=EXAMPLE.test\nshow store\n")
        assert main(["-r", server.address, "-f", script, "ipsec", "static"]) == 0, capsys.readouterr().err
        assert f"Store: Domain Store (policy server {server.address})" in capsys.readouterr().out
        assert main(["-r", server.address, "ipsec", "static", "set", "store", "domain", "domain=corp.example"]) == 1
        assert "serves the domain example.test, not corp.example" in capsys.readouterr().err


def test_exportpolicy_and_importpolicy_with_an_ldif_file(
    start_server: Callable[..., ServerProcess], server: ServerProcess, agent_stores: AgentStores, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """file=*.ldif: the store's policies as [MS-GPIPSEC] directory objects, and back."""
    from policyagent.directory import adstore

    capsys.readouterr()
    # Without a directory the server has no base DN for the objects: one line saying what to do.
    assert main(["-r", server.address, "ipsec", "static", "exportpolicy", f"file={tmp_path / 'x.ldif'}"]) == 1
    assert "base" in capsys.readouterr().err.lower()
    # An agent's store has no directory at all.
    target = f"unix:{agent_stores.state_dir / SOCKET_FILE}"
    assert main(["-r", target, "ipsec", "static", "exportpolicy", f"file={tmp_path / 'x.ldif'}"]) == 1
    assert "set store location=domain" in capsys.readouterr().err

    with server_with_directory(start_server, tmp_path) as (with_directory, ldap):
        path = tmp_path / "domain.ldif"
        static = ["-r", with_directory.address, "ipsec", "static"]
        assert main([*static, "exportpolicy", f"file={path}"]) == 0, capsys.readouterr().err
        assert path.stat().st_mode & 0o777 == 0o600
        entries = adstore.load_ldif(path.read_text(encoding="utf-8"), str(path))
        assert all(e.dn.endswith(f"CN=IP Security,CN=System,{ldap.suffix}") for e in entries)
        names = {p.name for p in adstore.contents_from_entries(entries).policies}
        assert names == {"Client (Respond Only)", "Server (Request Security)", "Secure Server (Require Security)"}

        # Gone from the store, back from the LDIF file, identical.
        show = ["-r", with_directory.address, "--json", "ipsec", "static", "show", "policy", "name=Client (Respond Only)"]
        capsys.readouterr()
        assert main(show) == 0
        before = _content(capsys.readouterr().out)
        assert main([*static, "delete", "policy", "name=Client (Respond Only)"]) == 0, capsys.readouterr().err
        assert main([*static, "importpolicy", f"file={path}"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(show) == 0
        assert _content(capsys.readouterr().out) == before
