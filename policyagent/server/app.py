"""The policy server process: store, gRPC server, health, reflection, logs, signals.

`serve(config)` is what `policyagent server` runs; `PolicyServer` is the same
server without the process concerns (signals, the "listening on" line), for
tests and for embedding.

Until authentication (mTLS) exists, anyone who can connect is an administrator,
so the server only listens on loopback addresses or a unix socket (made 0600).
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from grpc import aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policyagent.model.defaults import restore_defaults_plan
from policyagent.pb import GRPC_MESSAGE_OPTIONS
from policyagent.server.admin import SERVICE_NAME, PolicyAdminServicer, add_to_server
from policyagent.store.base import PolicyStore
from policyagent.store.sqlite import SqliteStore

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./policyagent-data"
STORE_FILE = "store.sqlite3"
SEED_PRINCIPAL = "policyagent"

_log = logging.getLogger("policyagent.server")


class ConfigError(ValueError):
    """The server cannot start with this configuration; the message says why, on one line."""


@dataclass(frozen=True)
class ServerConfig:
    """What `policyagent server` is told on its command line."""

    data_dir: Path
    listen: str = DEFAULT_LISTEN
    # Seconds in-flight calls get to finish on shutdown before they are cancelled.
    grace_seconds: float = 5.0


# ------------------------------------------------------------ listen address


@dataclass(frozen=True)
class ListenAddress:
    """A checked --listen value: host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def grpc_target(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"{_bracket(self.host)}:{self.port}"

    def bound(self, port: int) -> str:
        """How the address is announced once bound on `port`."""
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"{_bracket(self.host)}:{port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_NO_AUTH = (
    "authentication (mTLS) is not implemented yet, so the server only listens on "
    "loopback (127.0.0.0/8, ::1, localhost) or a unix socket (unix:/path)"
)


def parse_listen(value: str) -> ListenAddress:
    """Check a --listen value: HOST:PORT on loopback, [::1]:PORT, or unix:/path.

    Raises ConfigError (before anything is bound) for a malformed value or a
    non-loopback host.
    """
    text = value.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):  # unix:///abs/path, the URI form gRPC also accepts
            path = path[2:]
        if not path:
            raise ConfigError(f"cannot listen on {value!r}: give a socket path, e.g. unix:/run/pa.sock")
        return ListenAddress(unix_path=str(Path(path).absolute()))
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"cannot listen on {value!r}: write an IPv6 address as [::1]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"cannot listen on {value!r}: give HOST:PORT or unix:/path")
        if ":" in host:
            raise ConfigError(f"cannot listen on {value!r}: write an IPv6 address as [::1]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"cannot listen on {value!r}: the port must be a number from 0 to 65535")
    if not _is_loopback(host):
        raise ConfigError(f"refusing to listen on {value}: {_NO_AUTH}")
    return ListenAddress(host=host, port=int(port_text))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name could resolve anywhere


# ------------------------------------------------------------ logging


# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extra fields.

    Callers pass ids, names, codes and durations as fields; never secrets or whole objects.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send policyagent's logs to `stream` (stderr) as JSON lines at `level`."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("policyagent")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


# ------------------------------------------------------------ data dir


def prepare_data_dir(path: Path) -> Path:
    """Create the data directory 0700 (it holds pre-shared keys); warn if an existing one is open."""
    path = path.absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the data directory {path} exists and is not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the data directory {path}: {exc.strerror}") from exc
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        _log.warning(
            "data directory is readable by others; it holds pre-shared keys",
            extra={"path": str(path), "mode": oct(mode)},
        )
    return path


LOCK_FILE = "server.lock"


def lock_data_dir(path: Path) -> int:
    """Take the data directory's lock for this process's lifetime; returns the fd to close.

    Two servers on one store would each believe their view is the store's: refuse the second.
    """
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"another policyagent server is already using the data directory {path}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


# ------------------------------------------------------------ server


class PolicyServer:
    """The policy server: one store, one grpc.aio server with PolicyAdmin, health and reflection.

    `start()` opens the store (seeding the defaults into a new one), binds and starts
    serving; `stop()` turns health to NOT_SERVING, stops accepting, gives in-flight calls
    the grace period and closes the store. The store lives on one dedicated thread: every
    store call, including opening and closing it, runs there.
    """

    def __init__(
        self,
        config: ServerConfig,
        store_factory: Callable[[Path], PolicyStore] | None = None,
    ) -> None:
        self._config = config
        self._listen = parse_listen(config.listen)
        self._store_factory: Callable[[Path], PolicyStore] = store_factory or SqliteStore
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policyagent-store")
        self._store: PolicyStore | None = None
        self._server: aio.Server | None = None
        self._health: Any = None
        self._address = ""
        self._stopped = False
        self._lock_fd: int | None = None

    @property
    def address(self) -> str:
        """The bound address, HOST:PORT or unix:/path (empty until started)."""
        return self._address

    async def _in_store_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> str:
        """Open the store, bind and serve. Returns the bound address."""
        data_dir = prepare_data_dir(self._config.data_dir)
        store_path = data_dir / STORE_FILE
        self._lock_fd = lock_data_dir(data_dir)
        try:
            self._store = await self._in_store_thread(self._store_factory, store_path)
            assert self._store is not None
            seeded = await self._in_store_thread(self._seed, self._store)
            _log.info("store open", extra={"path": str(store_path), "seeded": seeded})

            # No SO_REUSEPORT: a second server on the same port must fail to bind,
            # not silently share the admins' connections with this one.
            server = aio.server(options=[("grpc.so_reuseport", 0), *GRPC_MESSAGE_OPTIONS])
            add_to_server(PolicyAdminServicer(self._store, self._executor), server)
            # The grpc.aio flavour of the health servicer: its set() is a coroutine.
            self._health = health_async.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            reflection.enable_server_reflection(
                [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
            )
            self._server = server
            port = self._bind(server)
            await server.start()
            for service in ("", SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            if self._server is not None:
                await self._server.stop(0)
            await self._close()
            raise
        self._address = self._listen.bound(port)
        _log.info("listening", extra={"address": self._address})
        return self._address

    @staticmethod
    def _seed(store: PolicyStore) -> bool:
        # A new store holds the default policies, as a fresh Windows install does.
        return store.initialize(seed=restore_defaults_plan, principal=SEED_PRINCIPAL)

    def _bind(self, server: aio.Server) -> int:
        target = self._listen.grpc_target
        if self._listen.unix_path:
            _check_unix_path_free(self._listen.unix_path)
        # No authentication yet: a unix socket must be born 0600 (bind creates it under
        # the umask), so no other local user can connect even for an instant. Nothing
        # else creates files while the server starts, so the process-wide umask is safe.
        old_umask = os.umask(0o177) if self._listen.unix_path else None
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as exc:  # newer grpcio raises instead of returning 0
            # grpc core has already logged why (in use, no such directory) on stderr;
            # its exception text only points at GRPC_VERBOSITY.
            raise ConfigError(
                f"cannot listen on {self._config.listen}: bind failed "
                "(address in use, or the socket's directory missing?)"
            ) from exc
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if port == 0 and not self._listen.unix_path:
            raise ConfigError(f"cannot listen on {self._config.listen}: the address is not available")
        if self._listen.unix_path:
            os.chmod(self._listen.unix_path, 0o600)  # whatever umask the socket got
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (health NOT_SERVING first), wait up to `grace` seconds, close the store."""
        if self._stopped:
            return
        self._stopped = True
        _log.info("stopping")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self._config.grace_seconds if grace is None else grace)
        await self._close()
        _log.info("stopped")

    async def _close(self) -> None:
        store, self._store = self._store, None
        lock_fd, self._lock_fd = self._lock_fd, None
        try:
            if store is not None:
                await self._in_store_thread(store.close)
        finally:
            self._executor.shutdown(wait=True)
            if lock_fd is not None:
                os.close(lock_fd)


def _check_unix_path_free(path: str) -> None:
    """Refuse a unix socket path another live server holds (gRPC would silently unlink it)."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise ConfigError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # stale socket of a server that died: gRPC replaces it
    raise ConfigError(f"cannot listen on unix:{path}: another server is listening there")


def _announce(address: str) -> None:
    # The one line on stdout a supervisor or a test reads to find the bound address.
    print(f"listening on {address}", flush=True)


async def serve(config: ServerConfig, announce: Callable[[str], None] = _announce) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down cleanly.

    Raises ConfigError (listen address refused, data dir unusable), StoreError or
    OSError; returns normally after a signal-initiated shutdown.
    """
    server = PolicyServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        address = await server.start()  # cleans up after itself if it fails
        try:
            announce(address)
            # Only a signal ends the server: nothing else stops a grpc.aio server from
            # inside (and cancelling its wait_for_termination() breaks a later stop()).
            await stop.wait()
            _log.info("shutdown requested")
        finally:
            await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
