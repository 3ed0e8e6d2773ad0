"""The PolicyAdmin connection: which server, who is asking (an admin certificate), errors as PolicyErrors.

Every connection is mTLS: the admin certificate is found as policyagent.pki.tls
describes (--cert-dir, $POLICYAGENT_ADMIN_DIR, ./policyagent-data/admin,
~/.config/policyagent/admin), only when the first call is made, so help needs none.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from clients.netsh.errors import CommandError, NoAdminCertificate, ServerRefusedCertificate, ServerUnreachable
from policyagent.agent.daemon import PERSISTENT_SOCKET_FILE, SOCKET_FILE
from policyagent.model.errors import NotFoundError, PolicyError
from policyagent.model.objects import normalize_id
from policyagent.pb import GRPC_MESSAGE_OPTIONS, admin_grpc, admin_pb, directory_grpc, directory_pb, pb
from policyagent.pki.tls import ClientCertificate, NoCertificate, find_admin_certificate, tls_options
from policyagent.server.errors import RpcFailure, error_from_rpc

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_PORT = 50051
SERVER_ENV = "POLICYAGENT_SERVER"
USER_METADATA_KEY = "x-policyagent-user"
# Generous: an import or a delete all on a big store is one transaction on the server.
CALL_TIMEOUT_SECONDS = 60.0

R = TypeVar("R", bound=Message)

_HOW_TO_START = (
    "start one with `policyagent server --data-dir DIR` (it listens on 127.0.0.1:50051), "
    f"or point netsh at yours with -r HOST:PORT or ${SERVER_ENV}"
)


def server_target(option: str | None) -> str:
    """The gRPC target: -r, else $POLICYAGENT_SERVER, else 127.0.0.1:50051.

    Accepts HOST:PORT, [v6]:PORT, unix:/path, and a bare HOST (the default port).
    """
    text = (option or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).strip()
    if text.startswith("unix:"):
        return text
    if text.startswith("["):
        return text if "]:" in text else f"{text}:{DEFAULT_PORT}"
    if text.count(":") == 1:
        return text
    if ":" in text:  # a bare IPv6 address
        return f"[{text}]:{DEFAULT_PORT}"
    return f"{text}:{DEFAULT_PORT}"


AGENT_STORE_SOCKETS = (SOCKET_FILE, PERSISTENT_SOCKET_FILE)


def is_agent_store_socket(target: str) -> bool:
    """-r unix:STATE_DIR/agent.sock or persistent.sock: an agent's local or persistent store (no TLS);
    any other unix: target is a policy server listening on a unix socket (mTLS)."""
    return target.startswith("unix:") and os.path.basename(target) in AGENT_STORE_SOCKETS


def user_name() -> str:
    """Who runs netsh, for the server's change log and relay log."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid{os.getuid()}"


def open_admin_channel(
    target: str, cert_dir: str | None, certificate: ClientCertificate | None, server_name: str = ""
) -> tuple[grpc.Channel, ClientCertificate]:
    """An mTLS channel to the policy server with an admin certificate (found as documented when not given);
    NoAdminCertificate says where it was looked for."""
    if certificate is None:
        try:
            certificate = find_admin_certificate(cert_dir)
        except NoCertificate as exc:
            raise NoAdminCertificate(str(exc)) from None
    options: list[tuple[str, str | int]] = [*GRPC_MESSAGE_OPTIONS, *tls_options(target)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, certificate.channel_credentials(), options=options), certificate


class AdminClient:
    """A synchronous PolicyAdmin client; every call carries the user's name for the change log."""

    def __init__(
        self,
        target: str,
        timeout: float = CALL_TIMEOUT_SECONDS,
        *,
        cert_dir: str | None = None,
        certificate: ClientCertificate | None = None,
        agent_socket: bool = False,
    ) -> None:
        self.target = target
        # An agent's local or persistent store: a unix socket only root (its owner) can open, no TLS.
        self.agent_socket = agent_socket
        self._timeout = timeout
        self._cert_dir = cert_dir
        self._certificate = certificate
        self._channel: grpc.Channel | None = None
        self._stub_: admin_grpc.PolicyAdminStub | None = None
        self._metadata = ((USER_METADATA_KEY, user_name()),)

    @property
    def _stub(self) -> admin_grpc.PolicyAdminStub:
        # Connect on first use: commands that only print help need no certificate.
        if self._stub_ is None:
            if self.agent_socket:
                self._channel = grpc.insecure_channel(self.target, options=GRPC_MESSAGE_OPTIONS)
            else:
                self._channel, self._certificate = open_admin_channel(self.target, self._cert_dir, self._certificate)
            self._stub_ = admin_grpc.PolicyAdminStub(self._channel)
        return self._stub_

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def _call(self, method: Callable[[admin_grpc.PolicyAdminStub], Callable[..., R]], request: Message) -> R:
        try:
            return method(self._stub)(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: grpc.RpcError) -> PolicyError:
        error = error_from_rpc(exc)
        if not isinstance(error, RpcFailure):
            return error
        detail = error.message.split(": ", 1)[-1]
        if self.agent_socket and error.status == grpc.StatusCode.UNAVAILABLE:
            path = self.target.removeprefix("unix:")
            state_dir = os.path.dirname(path) or "."
            return ServerUnreachable(
                f"cannot reach the agent's store at {path} ({detail}); `policyagent agent --state-dir {state_dir}` "
                "serves it while it runs"
            )
        source = self._certificate.source if self._certificate is not None else "?"
        if error.status in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return ServerRefusedCertificate(
                f"the policy server at {self.target} refused the admin certificate in {source}: {detail}"
            )
        if error.status == grpc.StatusCode.UNAVAILABLE:
            return ServerUnreachable(
                f"cannot reach the policy server at {self.target} ({detail}); {_HOW_TO_START} "
                f"(if it runs, it may not trust the admin certificate in {source}, or it is another server's)"
            )
        if error.status == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnreachable(
                f"the policy server at {self.target} did not answer within {self._timeout:g} seconds"
            )
        if error.status == grpc.StatusCode.UNIMPLEMENTED:
            return ServerUnreachable(f"{self.target} does not serve the policyagent PolicyAdmin API ({detail})")
        return error

    def _directory_call(self, name: str, request: Message) -> Any:
        """A DirectoryAdmin call on this connection (the policy server's link to its LDAP directory)."""
        if self.agent_socket:
            raise CommandError(
                "an agent's local and persistent stores have no directory: LDIF and domain commands work on the "
                "domain store (set store location=domain)"
            )
        self._stub  # noqa: B018 - connects
        assert self._channel is not None
        stub = directory_grpc.DirectoryAdminStub(self._channel)
        try:
            return getattr(stub, name)(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    def directory_status(self) -> directory_pb.DirectoryStatus:
        response = self._directory_call("GetStatus", directory_pb.DirectoryStatusRequest())
        return cast(directory_pb.DirectoryStatus, response)

    def export_ldif(self) -> directory_pb.DirectoryExportResponse:
        """Every policy of the store as [MS-GPIPSEC] directory objects, under the server's directory base DN."""
        response = self._directory_call("Export", directory_pb.DirectoryExportRequest())
        return cast(directory_pb.DirectoryExportResponse, response)

    def import_ldif(self, text: str) -> admin_pb.ApplyResponse:
        """Every policy in this LDIF text ([MS-GPIPSEC] objects) into the store; same ids are replaced."""
        response = self._directory_call("Import", directory_pb.DirectoryImportRequest(ldif=text))
        return cast(admin_pb.ApplyResponse, response)

    def find_policy(self, ref: str) -> pb.Policy:
        """The policy with this id (GUID) or, failing that, this name; NotFoundError otherwise."""
        try:
            return self._call(lambda s: s.GetPolicy, admin_pb.GetObjectRequest(id=normalize_id(ref)))
        except (ValueError, NotFoundError):
            return self._call(lambda s: s.GetPolicy, admin_pb.GetObjectRequest(name=ref.strip()))

    def get_store(self) -> pb.StoreContents:
        # Secrets are needed: writes put whole objects back, pre-shared keys included.
        response = self._call(lambda stub: stub.GetStore, admin_pb.GetStoreRequest(include_secrets=True))
        return response.contents

    def apply(self, mutations: list[admin_pb.Mutation], operation: str) -> admin_pb.ApplyResponse:
        request = admin_pb.ApplyRequest(mutations=mutations, operation=operation)
        return self._call(lambda stub: stub.Apply, request)

    def restore_defaults(self) -> admin_pb.ApplyResponse:
        return self._call(lambda stub: stub.RestoreDefaults, admin_pb.RestoreDefaultsRequest())

    def delete_all(self) -> admin_pb.ApplyResponse:
        return self._call(lambda stub: stub.DeleteAll, admin_pb.DeleteAllRequest())

    def export_policies(self) -> pb.ExportFile:
        return self._call(lambda stub: stub.ExportPolicies, admin_pb.ExportRequest())

    def import_policies(self, file: pb.ExportFile) -> admin_pb.ApplyResponse:
        return self._call(lambda stub: stub.ImportPolicies, admin_pb.ImportRequest(file=file))
