"""Supervise the agent's own strongSwan IKE daemon (`charon-systemd`) and talk to it over VICI.

One `Charon` per agent. It owns a run directory holding everything of this daemon instance:

    run_dir/strongswan.conf   written by us (STRONGSWAN_CONF), never the host's /etc/strongswan.conf
    run_dir/charon.vici       the VICI socket
    run_dir/charon.pid        the daemon's pid, so a restarted agent can end a charon it left behind
    run_dir/charon.log        the daemon's log (level 1: never key material)
    run_dir/charon.stdout     its stdout/stderr (startup errors land here)

`charon-systemd` rather than `/usr/lib/ipsec/charon`: it writes no pid file of its own and runs fine
without systemd, so several instances (one per network namespace, as in the tests) coexist, each with
its own STRONGSWAN_CONF and VICI socket. It takes no command-line options (not even --version); the
version comes from VICI `version`.

Backends (see reference/strongswan-libipsec.md): "kernel-netlink" when the kernel has ESP, else the
userspace "kernel-libipsec" (tunnel mode, ESP-in-UDP only). Host-to-host SAs under libipsec need
`allow_peer_ts` and the fwmark trio: charon's own IKE/ESP-in-UDP sockets mark their packets 0x42 so they
bypass routing table 220, which sends everything else to the peer into the TUN device.

Plugins that would open sockets or files under /var/run shared with a system strongSwan (stroke,
error-notify, lookip), or act on the host outside IKE (ha, led, farp, dhcp, resolve, forecast, connmark,
tpm), are not loaded; nor is pkcs11, which has no module configured.

VICI sessions are not thread-safe: every thread opens its own with `session()` (and closes it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

import vici
from vici.exception import CommandException, SessionException

from policyagent.agent.enforce.caps import BACKEND_LIBIPSEC, BACKEND_NETLINK, find_program
from policyagent.agent.files import atomic_write

CONF_NAME = "strongswan.conf"
VICI_NAME = "charon.vici"
PID_NAME = "charon.pid"
LOG_NAME = "charon.log"
STDOUT_NAME = "charon.stdout"
DAEMON = "charon-systemd"

# libipsec host-to-host: charon's sockets carry this mark; kernel-netlink's rule sends unmarked traffic
# (everything but IKE and ESP-in-UDP) through table 220, where the route into the TUN device lives.
FWMARK = "0x42"

STOP_GRACE_S = 5.0
STDOUT_KEEP_BYTES = 1 << 20
_POLL_S = 0.02
_TAIL_LINES = 15

# Log levels (strongswan.conf LOGGER CONFIGURATION): 2 = detailed control flow, 3 = raw hex dumps of
# packets, 4 = also key material. ike/cfg/enc at 3+ can dump keys and PSKs, so no file gets more than 2.
MAIN_LOG_LEVELS: dict[str, int] = {"default": 1, "ike": 1, "cfg": 1, "enc": 0}
TRACE_LOG_LEVELS: dict[str, int] = {"default": 1, "ike": 2, "cfg": 2, "knl": 2, "chd": 2, "net": 1, "enc": 0}
MAX_LOG_LEVEL = 2

# Plugins listed in /etc/strongswan.d/charon/ that this daemon must not load (see module docstring).
DISABLED_PLUGINS = (
    "stroke",
    "error-notify",
    "lookip",
    "ha",
    "led",
    "farp",
    "dhcp",
    "resolve",
    "forecast",
    "connmark",
    "tpm",
    "bypass-lan",
    "pkcs11",  # Debian's template names no module: it only logs "PKCS11 module '<name>' lacks library path"
)


class CharonError(Exception):
    """charon could not be started, stopped or reconfigured; the message says why (with its log tail)."""


class ViciSession(vici.Session):  # type: ignore[misc]  # the vici package has no type hints
    """A VICI session on its own socket; close it (or use it as a context manager). Not thread-safe."""

    def __init__(self, path: Path, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        super().__init__(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ViciSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _fmt_float(v: float) -> str:
    return f"{v:g}" if v != int(v) else f"{int(v)}.0"


def _levels(levels: dict[str, int]) -> str:
    for group, level in levels.items():
        if level > MAX_LOG_LEVEL:  # a programming error, never configuration: refuse loudly
            raise ValueError(f"log level {level} for {group} could log key material")
    return "\n".join(f"      {group} = {level}" for group, level in levels.items())


def render_conf(
    run_dir: Path,
    backend: str,
    retransmit: tuple[int, float, float],
    trace_path: Path | None = None,
) -> str:
    """The instance's strongswan.conf (section charon-systemd; it falls back to charon for unset keys)."""
    if backend == BACKEND_LIBIPSEC:
        kernel = (
            "    kernel-libipsec {\n      load = yes\n      allow_peer_ts = yes\n    }\n"
            f"    kernel-netlink {{\n      fwmark = !{FWMARK}\n    }}\n"
            f"    socket-default {{\n      fwmark = {FWMARK}\n    }}\n"
        )
    elif backend == BACKEND_NETLINK:
        kernel = "    kernel-libipsec {\n      load = no\n    }\n"
    else:
        raise CharonError(f"unknown IPsec backend {backend!r} (expected {BACKEND_NETLINK} or {BACKEND_LIBIPSEC})")
    disabled = "".join(f"    {name} {{\n      load = no\n    }}\n" for name in DISABLED_PLUGINS)
    tries, timeout, base = retransmit

    def filelog(name: str, path: Path, levels: dict[str, int]) -> str:
        return (
            f"    {name} {{\n      path = {path}\n      time_format = %F %T\n      time_add_ms = yes\n"
            f"      ike_name = yes\n      flush_line = yes\n      append = yes\n{_levels(levels)}\n    }}\n"
        )

    logs = filelog("main", run_dir / LOG_NAME, MAIN_LOG_LEVELS)
    if trace_path is not None:
        logs += filelog("trace", trace_path, TRACE_LOG_LEVELS)
    return (
        "# Written by policyagent for its own charon-systemd; rewritten at every start. Do not edit.\n"
        "charon-systemd {\n"
        "  load_modular = yes\n"
        "  install_virtual_ip = no\n"
        f"  retransmit_tries = {int(tries)}\n"
        f"  retransmit_timeout = {_fmt_float(timeout)}\n"
        f"  retransmit_base = {_fmt_float(base)}\n"
        "  plugins {\n"
        "    include /etc/strongswan.d/charon/*.conf\n"
        f"    vici {{\n      load = yes\n      socket = unix://{run_dir / VICI_NAME}\n    }}\n"
        f"{kernel}{disabled}"
        "  }\n"
        "  filelog {\n"
        f"{logs}"
        "  }\n"
        "}\n"
    )


def _proc_state(pid: int) -> str:
    """The process state letter from /proc (R, S, Z, ...), "" when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def _is_our_charon(pid: int, conf: Path) -> bool:
    """Is `pid` a charon-systemd started with our STRONGSWAN_CONF (a leftover of this run_dir)?"""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    if os.path.basename(argv0.decode(errors="replace")) != DAEMON:
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return True  # a charon-systemd whose environment we may not read: trust our pid file
    return f"STRONGSWAN_CONF={conf}".encode() in environ


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Charon:
    """One charon-systemd for the agent: start, stop, restart, watch, VICI sessions, IKE trace on/off.

    The agent already runs in its host's network namespace and spawns charon there. `netns` (tests only)
    runs the daemon in another named namespace through `ip netns exec`; the agent never needs it.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        backend: str,
        charon_path: str | None = None,
        retransmit: tuple[int, float, float] = (2, 1.0, 1.0),
        netns: str | None = None,
    ) -> None:
        """`retransmit` = (retransmit_tries, retransmit_timeout, retransmit_base). Small by default: Windows
        falls back to clear after about 3 s, so IKE must give up on a silent peer about as fast
        (charon's defaults 5/4.0/1.8 give up only after 165 s)."""
        if backend not in (BACKEND_NETLINK, BACKEND_LIBIPSEC):
            raise CharonError(f"unknown IPsec backend {backend!r} (expected {BACKEND_NETLINK} or {BACKEND_LIBIPSEC})")
        self.run_dir = run_dir
        self.backend = backend
        self.charon_path = charon_path or find_program(DAEMON)
        self.retransmit = retransmit
        self.netns = netns
        self._trace: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._stopped: set[int] = set()  # pids we stopped on purpose (their exit is no crash)
        self._on_exit: Callable[[int], None] | None = None
        self._watched: set[int] = set()  # pids a watcher thread waits on

    # --- paths ---------------------------------------------------------------------------------------
    @property
    def vici_path(self) -> Path:
        return self.run_dir / VICI_NAME

    @property
    def conf_path(self) -> Path:
        return self.run_dir / CONF_NAME

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME

    @property
    def pid_path(self) -> Path:
        return self.run_dir / PID_NAME

    @property
    def stdout_path(self) -> Path:
        return self.run_dir / STDOUT_NAME

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def ike_trace(self) -> Path | None:
        return self._trace

    # --- lifecycle -----------------------------------------------------------------------------------
    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def start(self, timeout: float = 10) -> None:
        """Write strongswan.conf, start charon-systemd, and return once VICI answers `version`.

        A charon left running by an earlier agent on the same run_dir (pid file) is stopped first, and
        a stale socket removed. Raises CharonError (with the daemon's last output) if it exits or does
        not answer within `timeout` seconds."""
        with self._lock:
            if self.alive():
                return
            if not self.charon_path:
                raise CharonError("charon-systemd not found (Debian package charon-systemd)")
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._end_leftover()
            self.vici_path.unlink(missing_ok=True)
            self._write_conf()
            argv = [self.charon_path]
            if self.netns:
                argv = [find_program("ip") or "ip", "netns", "exec", self.netns, *argv]
            env = {**os.environ, "STRONGSWAN_CONF": str(self.conf_path)}
            with contextlib.suppress(OSError):
                if self.stdout_path.stat().st_size > STDOUT_KEEP_BYTES:  # keep one older generation
                    self.stdout_path.replace(self.stdout_path.with_name(STDOUT_NAME + ".1"))
            out: IO[bytes]
            with self.stdout_path.open("ab") as out:
                out.write(f"--- {time.strftime('%F %T')} starting {' '.join(argv)}\n".encode())
                out.flush()
                proc = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
                )
            self._proc = proc
            atomic_write(self.pid_path, f"{proc.pid}\n".encode(), mode=0o644)
            self._wait_ready(proc, timeout)
            if self._on_exit is not None:
                self._start_watcher(proc)

    def stop(self) -> None:
        """SIGTERM (charon then removes its SAs, policies, routes and TUN device), SIGKILL after 5 s."""
        with self._lock:
            proc = self._proc
            if proc is not None:
                self._stopped.add(proc.pid)
                self._terminate(proc)
                if proc.pid not in self._watched:
                    self._stopped.discard(proc.pid)
                self._proc = None
                if self._pid_file_names(proc.pid):  # else another Charon took over this run_dir
                    self.vici_path.unlink(missing_ok=True)
                    self.pid_path.unlink(missing_ok=True)

    def restart(self, timeout: float = 10) -> None:
        with self._lock:
            self.stop()
            self.start(timeout)

    def watch(self, on_exit: Callable[[int], None]) -> None:
        """Call `on_exit(returncode)` from a daemon thread whenever charon dies without stop() (also after
        restart(): the watch carries over). The agent then restarts it and re-applies its policy."""
        with self._lock:
            self._on_exit = on_exit
            if self._proc is not None and self._proc.poll() is None:
                self._start_watcher(self._proc)

    # --- VICI ----------------------------------------------------------------------------------------
    def session(self, timeout: float = 10) -> ViciSession:
        """A new VICI session on its own socket (timeout in seconds per read). Sessions are not
        thread-safe: each thread uses its own. Close it, or use `with charon.session() as s:`."""
        try:
            return ViciSession(self.vici_path, timeout)
        except OSError as e:
            raise CharonError(f"cannot connect to charon's VICI socket {self.vici_path}: {e}") from e

    def version(self) -> dict[str, str]:
        """VICI `version`: daemon, version, sysname, release, machine."""
        with self.session() as s:
            answer = s.version()
        return {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in answer.items()}

    def set_ike_trace(self, path: Path | None) -> None:
        """Turn the IKE trace file on (path) or off (None) at once, without restarting charon: rewrite
        strongswan.conf and have charon reload its settings (VICI `reload-settings`, which also reloads
        its loggers). The trace logs IKE at level 2 at most, never key material."""
        with self._lock:
            self._trace = path
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._write_conf()
            if not self.alive():
                return  # taken at the next start
            try:
                with self.session() as s:
                    s.reload_settings()
            except (OSError, CommandException, SessionException) as e:
                raise CharonError(f"charon did not reload its settings: {e}") from e

    # --- internals -----------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        conf = render_conf(self.run_dir, self.backend, self.retransmit, self._trace)
        atomic_write(self.conf_path, conf.encode(), mode=0o644)

    def _failure(self, what: str) -> CharonError:
        parts = [what]
        for path in (self.stdout_path, self.log_path):
            tail = _tail(path)
            if tail:
                parts.append(f"--- {path.name} (last lines):\n{tail}")
        return CharonError("\n".join(parts))

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            rc = proc.poll()
            if rc is not None:
                self._proc = None
                self.pid_path.unlink(missing_ok=True)
                raise self._failure(f"charon-systemd exited with status {rc} while starting")
            if self.vici_path.exists():
                try:
                    with ViciSession(self.vici_path, max(0.5, deadline - time.monotonic())) as s:
                        s.version()
                    return
                except (OSError, SessionException) as e:
                    last = str(e)
            if time.monotonic() >= deadline:
                self._terminate(proc)
                self._proc = None
                self.pid_path.unlink(missing_ok=True)
                detail = f" (last VICI error: {last})" if last else ""
                raise self._failure(f"charon-systemd did not answer on {self.vici_path} within {timeout:g} s{detail}")
            time.sleep(_POLL_S)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()

    def _pid_file_names(self, pid: int) -> bool:
        try:
            return int(self.pid_path.read_text().strip()) == pid
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return False

    def _end_leftover(self) -> None:
        """Stop a charon an earlier agent (same run_dir) left running, if the pid file names one."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        if pid > 0 and _proc_state(pid) not in ("", "Z") and _is_our_charon(pid, self.conf_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while _proc_state(pid) not in ("", "Z") and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            if _proc_state(pid) not in ("", "Z"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while _proc_state(pid) not in ("", "Z") and time.monotonic() < deadline + STOP_GRACE_S:
                    time.sleep(_POLL_S)
        self.pid_path.unlink(missing_ok=True)

    def _start_watcher(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.pid in self._watched:
            return
        self._watched.add(proc.pid)

        def wait() -> None:
            rc = proc.wait()
            with self._lock:
                expected = proc.pid in self._stopped
                self._stopped.discard(proc.pid)
                self._watched.discard(proc.pid)
                callback = self._on_exit
            if not expected and callback is not None:
                callback(rc)

        threading.Thread(target=wait, name=f"charon-watch-{proc.pid}", daemon=True).start()


__all__ = ["DISABLED_PLUGINS", "Charon", "CharonError", "ViciSession", "render_conf"]


class ExternalCharon:
    """The system's charon, used over its VICI socket when the agent is told to (`--charon-vici PATH`).

    The agent does not start, stop or configure it: `start()` waits until the socket answers, `stop()`
    leaves it running (the agent still unloads nothing it did not load: its connections and secrets go
    when that charon restarts), `watch()` polls the socket and reports when it stops answering, and
    `restart()` waits for it to come back. The system's strongswan.conf must suit this host (on hosts
    without kernel ESP: kernel-libipsec with `allow_peer_ts` and the fwmark settings), and IKE logging is
    configured there, not through `set config ikelogging`."""

    POLL_S = 2.0

    def __init__(self, vici_path: Path, run_dir: Path) -> None:
        self._vici_path = vici_path
        self.run_dir = run_dir  # the agent's own files (an IKE trace cannot go here: see set_ike_trace)
        self._on_exit: Callable[[int], None] | None = None
        self._watching = False
        self._lock = threading.Lock()

    @property
    def vici_path(self) -> Path:
        return self._vici_path

    @property
    def pid(self) -> int | None:
        return None  # not ours

    @property
    def ike_trace(self) -> Path | None:
        return None

    def alive(self) -> bool:
        try:
            with self.session(timeout=2) as s:
                s.version()
            return True
        except (CharonError, OSError, SessionException):
            return False

    def start(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive():
                return
            time.sleep(0.1)
        raise CharonError(f"the system's charon does not answer on {self._vici_path} (is strongSwan running?)")

    def stop(self) -> None:
        with self._lock:
            self._watching = False  # the system's charon keeps running

    def restart(self, timeout: float = 30) -> None:
        self.start(timeout)

    def watch(self, on_exit: Callable[[int], None]) -> None:
        with self._lock:
            self._on_exit = on_exit
            if self._watching:
                return
            self._watching = True
        threading.Thread(target=self._poll, name="charon-watch-external", daemon=True).start()

    def _poll(self) -> None:
        while True:
            time.sleep(self.POLL_S)
            with self._lock:
                if not self._watching:
                    return
                callback = self._on_exit
            if not self.alive() and callback is not None:
                callback(-1)  # the caller waits for it (restart()) and re-applies

    def session(self, timeout: float = 10) -> ViciSession:
        try:
            return ViciSession(self._vici_path, timeout)
        except OSError as e:
            raise CharonError(f"cannot connect to the system charon's VICI socket {self._vici_path}: {e}") from e

    def version(self) -> dict[str, str]:
        with self.session() as s:
            answer = s.version()
        return {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in answer.items()}

    def set_ike_trace(self, path: Path | None) -> None:
        raise CharonError(
            "IKE logging of the system's charon is configured in its strongswan.conf (charon.filelog), "
            "not by this agent"
        )
