"""The policy server process: store, gRPC server, health, reflection, logs, signals.

`serve(config)` is what `policyagent server` runs; `PolicyServer` is the same
server without the process concerns (signals, the "listening on" line), for
tests and for embedding.

Every connection is TLS with the server's CA (policyagent/pki). The main port
(--listen) requires a client certificate: admins' for PolicyAdmin and the other
admin services, agents' for Distribution (AuthzInterceptor). It is served by the
front (policyagent/server/front.py): agents' streams in process, every other call
relayed to the grpc.aio server on a private unix socket. The enrollment port
(--enroll-listen, by default the next port) authenticates only the server, so a
machine without a certificate can enroll (Enrollment) and check health there.
Two ports because grpc's Python API cannot ask for an optional client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from grpc import aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policyagent.auth.service import EnrollmentServicer, EnrollmentSettings
from policyagent.directory.sync import DirectorySettings, DirectorySync
from policyagent.model.defaults import restore_defaults_plan
from policyagent.pb import GRPC_MESSAGE_OPTIONS, enroll_grpc
from policyagent.pki.authz import AuthzInterceptor
from policyagent.pki.identity import Peer
from policyagent.pki.server import ServerPki
from policyagent.server.admin import SERVICE_NAME, PolicyAdminServicer, add_to_server
from policyagent.server.assignment import SERVICE_NAME as ASSIGNMENT_SERVICE
from policyagent.server.assignment import AssignmentParts, add_assignment_to_server, open_assignment
from policyagent.server.directory import SERVICE_NAME as DIRECTORY_SERVICE
from policyagent.server.directory import DirectoryService, PublishingPolicyStore, add_directory_to_server
from policyagent.server.fleet import peer_address
from policyagent.server.front import Front
from policyagent.server.hub import (
    AGENT_RELAY_SERVICE,
    DISTRIBUTION_SERVICE,
    FLEET_SERVICE,
    SERVER_CONNECTION_OPTIONS,
    Caller,
    Hub,
    attach_distribution,
)
from policyagent.server.identity import SERVICE_NAME as IDENTITY_SERVICE
from policyagent.server.identity import IdentityAdminServicer, add_identity_to_server
from policyagent.store.base import PolicyStore
from policyagent.store.sqlite import SqliteStore

DEFAULT_LISTEN = "127.0.0.1:50051"
ENROLLMENT_SERVICE = "policyagent.v1.Enrollment"
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
    # The enrollment port (TLS without client certificates); None: see default_enroll_listen.
    enroll_listen: str | None = None
    # Extra names/addresses for the server's TLS certificate (besides the listen hosts, localhost,
    # 127.0.0.1, ::1): the names agents and admins use to reach it.
    tls_names: tuple[str, ...] = ()
    kerberos_keytab: Path | None = None
    kerberos_principal: str | None = None
    workgroup_secret_file: Path | None = None
    # An LDAP directory (AD / OpenLDAP) that feeds the assignment registry; None = the registry is
    # managed with `policyagent ou|computer|gpo ...` only.
    directory: DirectorySettings | None = None


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


def parse_listen(value: str) -> ListenAddress:
    """Check a --listen value: HOST:PORT, [v6]:PORT, or unix:/path.

    Raises ConfigError (before anything is bound) for a malformed value. Any host
    is allowed: every connection is TLS, and every call but enrollment and health
    needs a certificate from the server's CA.
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
    return ListenAddress(host=host, port=int(port_text))


def default_enroll_listen(listen: ListenAddress) -> str:
    """The enrollment port when none is given: the next port (any free one for port 0), or PATH.enroll."""
    if listen.unix_path:
        return f"unix:{listen.unix_path}.enroll"
    port = listen.port + 1 if listen.port else 0
    if port > 65535:
        raise ConfigError(f"cannot derive the enrollment port from port {listen.port}: give --enroll-listen")
    return f"{_bracket(listen.host)}:{port}"


def _tls_hosts(config: ServerConfig, *listens: ListenAddress) -> list[str]:
    """Names and addresses for the server certificate's SANs (localhost and loopback are always added)."""
    hosts = [a.host for a in listens if a.host] + list(config.tls_names)
    if any(h in ("0.0.0.0", "::", "") for h in (a.host for a in listens if not a.unix_path)):
        # Listening everywhere: the machine's own names are how clients will reach it.
        hosts += [socket.gethostname(), socket.getfqdn()]
    return hosts


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
        self._enroll_listen = parse_listen(config.enroll_listen or default_enroll_listen(self._listen))
        self._store_factory = store_factory
        self._pki: ServerPki | None = None
        self._enroll_address = ""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policyagent-store")
        self._store: PolicyStore | None = None
        self._server: aio.Server | None = None
        self._front: Front | None = None
        self._backend_dir = ""
        self._health: Any = None
        self._address = ""
        self._stopped = False
        self._lock_fd: int | None = None
        # The registry, the effective policies and the observed stores (policyagent/server/assignment.py).
        self.assignment: AssignmentParts | None = None
        # The distribution hub (agents' streams, fleet records); None before start().
        self.hub: Hub | None = None
        # The directory sync (policyagent/server/directory.py); None without --directory.
        self.directory: DirectoryService | None = None

    @property
    def address(self) -> str:
        """The bound address, HOST:PORT or unix:/path (empty until started)."""
        return self._address

    @property
    def topology_store(self) -> Any:
        """The registry (an ObservedTopologyStore: `upsert_computer(...)`); None before start()."""
        return self.assignment.topology_store if self.assignment is not None else None

    @property
    def effective(self) -> Any:
        """EffectivePolicies (subscribe / get / version_of) for the distribution hub; None before start()."""
        return self.assignment.effective if self.assignment is not None else None

    @property
    def enroll_address(self) -> str:
        """The bound enrollment address (TLS without client certificates; empty until started)."""
        return self._enroll_address

    @property
    def pki(self) -> ServerPki:
        """The CA, identity database and revocation list (`pki.revocations.subscribe(...)`); after start()."""
        if self._pki is None:
            raise RuntimeError("the server has not started")
        return self._pki

    async def reload_revocations(self) -> list[Peer]:
        """Pick up revocations made on the data directory by `policyagent ... revoke` (SIGHUP does this).

        Subscribers of `pki.revocations` are told about each newly revoked certificate.
        """
        pki = self.pki
        peers: list[Peer] = await self._in_store_thread(pki.reload_revocations)
        pki.revocations.revoked(peers)
        if peers:
            _log.info("revocations loaded", extra={"revoked": [f"{p.role}:{p.name}" for p in peers]})
        return peers

    async def _in_store_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> str:
        """Open the store, bind and serve. Returns the bound address."""
        if self._config.directory is not None:
            try:
                self._config.directory.check()
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        data_dir = prepare_data_dir(self._config.data_dir)
        store_path = data_dir / STORE_FILE
        self._lock_fd = lock_data_dir(data_dir)
        try:
            settings = EnrollmentSettings.from_files(
                kerberos_keytab=self._config.kerberos_keytab,
                kerberos_principal=self._config.kerberos_principal,
                workgroup_secret_file=self._config.workgroup_secret_file,
            )
            hosts = _tls_hosts(self._config, self._listen, self._enroll_listen)
            self._pki = pki = await self._in_store_thread(ServerPki.open, data_dir, hosts)
            factory = self._store_factory or functools.partial(SqliteStore, secret_box=pki.secret_box)
            self._store = await self._in_store_thread(factory, store_path)
            assert self._store is not None
            seeded = await self._in_store_thread(self._seed, self._store)
            _log.info("store open", extra={"path": str(store_path), "seeded": seeded})
            self.assignment = await self._in_store_thread(open_assignment, data_dir, self._store)
            self._store = self.assignment.policy_store  # its writes now update the effective policies

            # No SO_REUSEPORT: a second server on the same port must fail to bind,
            # not silently share the admins' connections with this one.
            server = aio.server(
                interceptors=[AuthzInterceptor(pki.revocations)],
                options=[("grpc.so_reuseport", 0), *GRPC_MESSAGE_OPTIONS, *SERVER_CONNECTION_OPTIONS],
            )
            if self._config.directory is not None:
                sync = DirectorySync(
                    self._config.directory, data_dir, self.assignment.topology_store, self.assignment.policy_store,
                    address_of=self._agent_address,
                )
                self.directory = DirectoryService(self._config.directory, sync, self._executor)
                # Before serving: the directory's objects in the registry are protected from the start,
                # even while the directory is down.
                await self.directory.load()
            admin_store: PolicyStore = self._store
            if self.directory is not None and self.directory.settings.publish:
                # --directory-publish: admins' policy writes republish what the directory already holds.
                admin_store = PublishingPolicyStore(self._store, self.directory.policies_written)
            add_to_server(PolicyAdminServicer(admin_store, self._executor), server)
            add_assignment_to_server(
                self.assignment, server, self._executor, self.directory.sync if self.directory is not None else None
            )
            add_directory_to_server(self.directory, server, self.assignment.policy_store, self._executor)
            # Join tokens, revocation and the certificate list for remote admins (same thread as the store).
            add_identity_to_server(
                IdentityAdminServicer(pki.identity, self._executor, self.reload_revocations), server
            )
            # Distribution (agents' streams), Fleet (admin status) and AgentRelay (admins' calls to one
            # agent's local API, over its stream): policyagent/server/hub.py.
            self.hub = attach_distribution(
                server, effective=self.assignment.effective, data_dir=data_dir, revocations=pki.revocations
            )
            enroll_grpc.add_EnrollmentServicer_to_server(
                EnrollmentServicer(pki, settings, self._in_store_thread, self._topology_upsert), server
            )
            # The grpc.aio flavour of the health servicer: its set() is a coroutine.
            self._health = health_async.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            reflection.enable_server_reflection(
                [
                    SERVICE_NAME,
                    ASSIGNMENT_SERVICE,
                    IDENTITY_SERVICE,
                    DIRECTORY_SERVICE,
                    ENROLLMENT_SERVICE,
                    DISTRIBUTION_SERVICE,
                    FLEET_SERVICE,
                    AGENT_RELAY_SERVICE,
                    health.SERVICE_NAME,
                    reflection.SERVICE_NAME,
                ],
                server,
            )
            self._server = server
            # The main port is the front (policyagent/server/front.py): it serves the agents' streams
            # itself and relays every other call to this grpc.aio server on a private unix socket.
            self._backend_dir = tempfile.mkdtemp(prefix="policyagent-server-")
            backend = f"unix:{self._backend_dir}/grpc.sock"
            if server.add_insecure_port(backend) == 0:
                raise ConfigError(f"cannot listen on the private socket {backend}")
            enroll_port = self._bind(server, self._enroll_listen, pki.server_credentials(client_certificates=False))
            await server.start()
            await self.hub.start()
            hub = self.hub
            self._front = Front(
                pki.main_port_ssl_context(),
                backend=backend,
                serve_stream=lambda peer, requests, context: hub.serve_stream(Caller.of(peer), requests, context),
                revocations=pki.revocations,
            )
            port = await self._start_front(self._front, self._listen)
            if self.directory is not None:
                self.directory.set_status_listener(hub.touch_status)
                hub.directory_status = self.directory.status
                hub.address_listener = self.directory.agent_address_changed
                await self.directory.start()
            for service in ("", SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            if self._front is not None:
                await self._front.stop(0)
            if self._server is not None:
                await self._server.stop(0)
            await self._close()
            raise
        self._address = self._listen.bound(port)
        self._enroll_address = self._enroll_listen.bound(enroll_port)
        _log.info("listening", extra={"address": self._address, "enrollment": self._enroll_address})
        return self._address

    def _agent_address(self, computer: str) -> str:
        """The IP address `computer`'s agent last connected from ("" unknown): the directory's sites follow it.
        Called on the store thread: one dict lookup in the hub's fleet records (atomic under the GIL)."""
        hub = self.hub
        record = hub.registry.records.get(computer) if hub is not None else None
        return peer_address(record.peer) if record is not None else ""

    def _topology_upsert(self) -> Callable[[str, Any, str], None] | None:
        """The topology registry's computer upsert, when the server has a registry (enrollment calls it)."""
        topology = getattr(self, "topology_store", None)
        upsert = getattr(topology, "upsert_computer", None)
        if upsert is None:
            return None

        directory = self.directory

        def record(name: str, membership: Any, domain: str) -> None:
            if directory is not None and directory.sync.owns_computer(name):
                # The directory says where this computer is (OU, groups, domain): enrolling changes none of it.
                _log.info("enrolled computer comes from the directory; registry left as is", extra={"computer": name})
                return
            upsert(name, membership, domain, principal="enrollment")

        return record

    @staticmethod
    def _seed(store: PolicyStore) -> bool:
        # A new store holds the default policies, as a fresh Windows install does.
        return store.initialize(seed=restore_defaults_plan, principal=SEED_PRINCIPAL)

    async def _start_front(self, front: Front, listen: ListenAddress) -> int:
        with _owner_only_socket(listen):
            try:
                return await front.start(listen.host, listen.port, listen.unix_path)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {listen.bound(listen.port)}: {exc.strerror or exc}") from exc

    def _bind(self, server: aio.Server, listen: ListenAddress, credentials: Any) -> int:
        shown = listen.bound(listen.port)
        with _owner_only_socket(listen):
            try:
                port = server.add_secure_port(listen.grpc_target, credentials)
            except RuntimeError as exc:  # newer grpcio raises instead of returning 0
                # grpc core has already logged why (in use, no such directory) on stderr;
                # its exception text only points at GRPC_VERBOSITY.
                raise ConfigError(
                    f"cannot listen on {shown}: bind failed (address in use, or the socket's directory missing?)"
                ) from exc
        if port == 0 and not listen.unix_path:
            raise ConfigError(f"cannot listen on {shown}: the address is not available")
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (health NOT_SERVING first), wait up to `grace` seconds, close the store."""
        if self._stopped:
            return
        self._stopped = True
        _log.info("stopping")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.directory is not None:
            await self.directory.stop()
        if self.hub is not None:
            await self.hub.stop()  # ends the agents' streams, persists the fleet records
        grace_s = self._config.grace_seconds if grace is None else grace
        if self._front is not None:
            await self._front.stop(grace_s)
        if self._server is not None:
            await self._server.stop(grace_s)
        await self._close()
        _log.info("stopped")

    async def _close(self) -> None:
        store, self._store = self._store, None
        pki, self._pki = self._pki, None
        lock_fd, self._lock_fd = self._lock_fd, None
        assignment, self.assignment = self.assignment, None
        try:
            if assignment is not None:
                await self._in_store_thread(assignment.topology_store.close)
            if store is not None:
                await self._in_store_thread(store.close)
            if pki is not None:
                await self._in_store_thread(pki.close)
        finally:
            self._executor.shutdown(wait=True)
            if lock_fd is not None:
                os.close(lock_fd)
            backend_dir, self._backend_dir = self._backend_dir, ""
            if backend_dir:
                shutil.rmtree(backend_dir, ignore_errors=True)


@contextlib.contextmanager
def _owner_only_socket(listen: ListenAddress) -> Iterator[None]:
    """Around binding `listen`: for a unix socket, refuse a path a live server holds, and make the
    socket 0600 from birth (bind creates it under the umask: no other local user can connect even for
    an instant; defence in depth on top of mTLS). Nothing else creates files while the server starts,
    so changing the process umask is safe. TCP addresses pass through."""
    path = listen.unix_path
    if not path:
        yield
        return
    _check_unix_path_free(path)
    old_umask = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)  # whatever umask the socket got


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
    # The line on stdout a supervisor or a test reads to find the bound address.
    print(f"listening on {address}", flush=True)


def _announce_enrollment(address: str) -> None:
    # Always the second line on stdout.
    print(f"enrollment on {address}", flush=True)


async def serve(
    config: ServerConfig,
    announce: Callable[[str], None] = _announce,
    announce_enrollment: Callable[[str], None] = _announce_enrollment,
) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down cleanly.

    Raises ConfigError (listen address refused, data dir unusable), StoreError or
    OSError; returns normally after a signal-initiated shutdown.
    """
    server = PolicyServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[Any]] = set()

    def reload() -> None:
        # SIGHUP: `policyagent admin-cert revoke` / `computer revoke` changed the identity database.
        task = loop.create_task(server.reload_revocations())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        address = await server.start()  # cleans up after itself if it fails
        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            announce(address)
            announce_enrollment(server.enroll_address)
            # Only a signal ends the server: nothing else stops a grpc.aio server from
            # inside (and cancelling its wait_for_termination() breaks a later stop()).
            await stop.wait()
            _log.info("shutdown requested")
        finally:
            await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
