"""`netsh ipsec dynamic`: the IPsec state running on one computer, read and changed on its agent's local socket.

    netsh [-r unix:STATE_DIR/agent.sock] ipsec dynamic show stats|mmsas|qmsas|mmfilter|qmfilter|config|all ...
    netsh [-r unix:STATE_DIR/agent.sock] ipsec dynamic set config property=<name> value=<value>
    netsh [-r unix:STATE_DIR/agent.sock] ipsec dynamic add|set|delete mmpolicy|qmpolicy|rule ... | delete all
    netsh [-r unix:STATE_DIR/agent.sock] ipsec dynamic show mmpolicy|qmpolicy|rule ...
    netsh -r SERVER:PORT --computer NAME ipsec dynamic <any of the above>
    netsh -r SERVER:PORT ipsec dynamic <any of the above> computer=NAME

Windows' dynamic mode configures the running SPD of one machine (windows-ipsec.md §3); here that is the
agent's `AgentLocal` API on STATE_DIR/agent.sock (protos/policyagent/v1/agent.proto). Without -r, netsh asks
this computer's agent: $POLICYAGENT_AGENT_SOCKET, else /var/lib/policyagent-agent/agent.sock. With a computer
named (--computer NAME, or computer=NAME at the end of a command), netsh asks that computer's agent through
the policy server (-r, else $POLICYAGENT_SERVER, else 127.0.0.1:50051) with the admin certificate: the server
relays the call on the agent's distribution stream (AgentRelay, relay.proto). Commands,
tags and choices are case-insensitive and may be abbreviated (`sh st` = show stats, `add mmp` = add
mmpolicy), as in static mode; parameters are parsed with the static mode's parser (clients.netsh.syntax)
from the Command tables below, which reuse the static settings wherever the two modes share a parameter.

Dynamic-mode policy (main mode policies, quick mode policies, rules) lives in the agent's memory
(GetDynamic/EditDynamic): the agent validates an edit, enforces it together with the assigned static policy
and only then keeps it; it is gone when the agent stops. netsh builds each edit with the static mode's
helpers (addresses, masks, methods, authentication) and checks it with the model's validators first, so
both modes refuse the same values with the same words. The agent's refusals print as one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO, TypeVar, cast

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from clients.netsh import addresses, helptext
from clients.netsh.client import USER_METADATA_KEY, open_admin_channel, server_target, user_name
from clients.netsh.commands import CONNECTION_TYPES, auth_methods, build_filters
from clients.netsh.errors import (
    CommandError,
    ServerRefusedCertificate,
    ServerUnreachable,
    UsageError,
)
from clients.netsh.newobjects import default_of, kerberos
from clients.netsh.render import ACTION_DISPLAY, CONNECTION_DISPLAY, Renderer, table
from clients.netsh.render import field as label_line
from clients.netsh.syntax import HELP_TOKENS, Invocation, parse_args, resolve_prefix
from policyagent.agent.cmd import DEFAULT_STATE_DIR
from policyagent.agent.daemon import SOCKET_FILE
from policyagent.agent.enforce.dynamic import describe_rule
from policyagent.model import settings as S
from policyagent.model.errors import NotFoundError, PolicyError, ValidationError, Violation
from policyagent.model.objects import SECRET_MASK
from policyagent.model.settings import Command, DnsName, Param, Setting, ValueKind, protocol_text
from policyagent.model.validate import (
    validate_auth_methods,
    validate_filter,
    validate_mm_methods,
    validate_qm_methods,
)
from policyagent.model.view import ContentsView
from policyagent.pb import GRPC_MESSAGE_OPTIONS, agent_grpc, agent_pb, pb, relay_grpc, relay_pb
from policyagent.pki.tls import ClientCertificate

SOCKET_ENV = "POLICYAGENT_AGENT_SOCKET"
DEFAULT_SOCKET = f"{DEFAULT_STATE_DIR}/{SOCKET_FILE}"
CALL_TIMEOUT_SECONDS = 15.0
# Through the server: it waits 30 s for the agent's answer, then says so (DEADLINE_EXCEEDED) itself.
RELAY_TIMEOUT_SECONDS = 40.0
# On a failed AgentRelay.Call: which side the status comes from, "server" or "agent" (policyagent/server/hub.py).
RELAY_ORIGIN_KEY = "x-policyagent-relay"
RULE = "-" * 72

R = TypeVar("R", bound=Message)
NamedPolicy = TypeVar("NamedPolicy", agent_pb.DynamicMmPolicy, agent_pb.DynamicQmPolicy)

# ------------------------------------------------------------------ the agent's socket


def is_socket(option: str) -> bool:
    """-r names an agent's unix socket (unix:PATH, a path, NAME.sock), not a policy server."""
    text = option.strip()
    return text.startswith(("unix:", "/", "./", "../")) or text.endswith(".sock")


def agent_socket(option: str | None) -> str:
    """The agent socket netsh -r names (unix:PATH or a path), else $POLICYAGENT_AGENT_SOCKET, else the default.

    A HOST:PORT is refused: dynamic mode talks to one computer's agent, not to the policy server.
    """
    if option is None or not option.strip():
        return os.environ.get(SOCKET_ENV, "").strip() or DEFAULT_SOCKET
    text = option.strip()
    if text.startswith("unix://"):
        path = text[len("unix://") :]
    elif text.startswith("unix:"):
        path = text[len("unix:") :]
    elif is_socket(text):
        path = text
    else:
        raise CommandError(no_computer(text))
    return os.path.abspath(path) if path else DEFAULT_SOCKET


def _where(path: str) -> str:
    state_dir = os.path.dirname(path) or "."
    return f"`policyagent agent --state-dir {state_dir}` serves it there while it runs"


def no_computer(server: str) -> str:
    return (
        f"ipsec dynamic through the policy server {server} needs the computer whose agent to ask: "
        f"netsh -r {server} --computer NAME ipsec dynamic ..., or computer=NAME at the end of the command "
        "(for this computer's agent: -r unix:STATE_DIR/agent.sock, or no -r)"
    )


_NO_DYNAMIC = "does not serve dynamic-mode policy (GetDynamic/EditDynamic): it is older than this netsh"


class AgentApi:
    """The agent's AgentLocal calls netsh and ipsecmon make, however they reach the agent.

    Subclasses implement `_request`; failures become one-line PolicyErrors.
    """

    def _request(self, method: str, request: Message, response: type[R], unimplemented: str = "") -> R:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def status(self) -> agent_pb.LocalStatus:
        return self._request("GetStatus", agent_pb.LocalStatusRequest(), agent_pb.LocalStatus)

    def statistics(self) -> agent_pb.IpsecStatistics:
        return self._request("GetStatistics", agent_pb.StatisticsRequest(), agent_pb.IpsecStatistics)

    def security_associations(self) -> agent_pb.SecurityAssociations:
        return self._request(
            "ListSecurityAssociations", agent_pb.SecurityAssociationsRequest(), agent_pb.SecurityAssociations
        )

    def filters(self) -> agent_pb.Filters:
        return self._request("ListFilters", agent_pb.FiltersRequest(), agent_pb.Filters)

    def config(self) -> agent_pb.AgentConfigValues:
        return self._request("GetConfig", agent_pb.ConfigRequest(), agent_pb.AgentConfigValues)

    def set_config(self, name: str, value: str) -> agent_pb.AgentConfigValues:
        return self._request(
            "SetConfig", agent_pb.SetConfigRequest(name=name, value=value), agent_pb.AgentConfigValues
        )

    def dynamic_state(self) -> agent_pb.DynamicState:
        return self._request("GetDynamic", agent_pb.DynamicRequest(), agent_pb.DynamicState, _NO_DYNAMIC)

    def edit_dynamic(self, edit: agent_pb.DynamicEdit) -> agent_pb.DynamicState:
        return self._request("EditDynamic", edit, agent_pb.DynamicState, _NO_DYNAMIC)

    def audit_events(self, since_unix_ms: int = 0, limit: int = 0) -> agent_pb.AuditEvents:
        request = agent_pb.AuditEventsRequest(since_unix_ms=since_unix_ms, limit=limit)
        return self._request("ListAuditEvents", request, agent_pb.AuditEvents)


def agent_status_error(
    code: grpc.StatusCode | None, detail: str, who: str, unimplemented: str = ""
) -> Exception | None:
    """The one-line error for a status the agent itself answered with (None: not one of the agent's own)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CommandError(detail or "the agent refused the request as invalid")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        # The agent cannot do it on this host ("cannot be enforced here: ..."): nothing was changed.
        return CommandError(detail or f"{who} cannot do this on its host")
    if code == grpc.StatusCode.UNAVAILABLE and "cannot read" in detail:
        return CommandError(f"{who}: {detail}")  # the agent answered: its backend could not
    if code == grpc.StatusCode.UNIMPLEMENTED and unimplemented:
        return CommandError(f"{who} {unimplemented}")
    return None


class AgentClient(AgentApi):
    """A synchronous AgentLocal client on a unix socket; failures become one-line PolicyErrors."""

    def __init__(self, path: str, timeout: float = CALL_TIMEOUT_SECONDS) -> None:
        self.path = path
        self._timeout = timeout
        self._channel: grpc.Channel | None = None
        self._stub_: agent_grpc.AgentLocalStub | None = None

    @property
    def _stub(self) -> agent_grpc.AgentLocalStub:
        if self._stub_ is None:
            self._channel = grpc.insecure_channel(f"unix:{self.path}", options=GRPC_MESSAGE_OPTIONS)
            self._stub_ = agent_grpc.AgentLocalStub(self._channel)
        return self._stub_

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel, self._stub_ = None, None

    def _request(self, method: str, request: Message, response: type[R], unimplemented: str = "") -> R:
        try:
            answer: R = getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc, unimplemented) from None
        return answer

    def _translate(self, exc: grpc.RpcError, unimplemented: str = "") -> Exception:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        detail = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
        path = self.path
        known = agent_status_error(code, detail, f"the agent at {path}", unimplemented)
        if known is not None:
            return known
        if code == grpc.StatusCode.UNAVAILABLE:
            if not os.path.exists(path):
                return ServerUnreachable(
                    f"no agent socket at {path}; {_where(path)} (or use -r unix:PATH, ${SOCKET_ENV})"
                )
            if not os.access(path, os.R_OK | os.W_OK):
                return ServerUnreachable(
                    f"permission denied on the agent socket {path} (it is 0600): run as the agent's user"
                )
            return ServerUnreachable(f"no agent answers on {path} ({detail or 'unavailable'}); {_where(path)}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnreachable(f"the agent at {path} did not answer within {self._timeout:g} seconds")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ServerUnreachable(f"{path} does not serve the agent's AgentLocal API: is it an agent's agent.sock?")
        name = code.name if code is not None else "UNKNOWN"
        return CommandError(f"the agent at {path} failed: {name}: {detail}".rstrip(": "))


class RelayClient(AgentApi):
    """AgentLocal calls to one computer's agent through the policy server (AgentRelay.Call), with the admin
    certificate netsh uses for static mode (clients.netsh.client); failures become one-line PolicyErrors."""

    def __init__(
        self,
        target: str,
        computer: str,
        *,
        cert_dir: str | None = None,
        certificate: ClientCertificate | None = None,
        server_name: str = "",
        timeout: float = RELAY_TIMEOUT_SECONDS,
    ) -> None:
        self.target = target
        self.computer = computer
        self._cert_dir = cert_dir
        self._certificate = certificate
        self._server_name = server_name
        self._timeout = timeout
        self._channel: grpc.Channel | None = None
        self._stub_: relay_grpc.AgentRelayStub | None = None
        self._metadata = ((USER_METADATA_KEY, user_name()),)

    @property
    def _stub(self) -> relay_grpc.AgentRelayStub:
        if self._stub_ is None:
            self._channel, self._certificate = open_admin_channel(
                self.target, self._cert_dir, self._certificate, self._server_name
            )
            self._stub_ = relay_grpc.AgentRelayStub(self._channel)
        return self._stub_

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel, self._stub_ = None, None

    def _request(self, method: str, request: Message, response: type[R], unimplemented: str = "") -> R:
        relayed = relay_pb.RelayRequest(computer=self.computer, method=method, request=request.SerializeToString())
        try:
            answer = self._stub.Call(relayed, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._translate(exc, unimplemented) from None
        return response.FromString(answer.response)

    def _translate(self, exc: grpc.RpcError, unimplemented: str = "") -> Exception:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        detail = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
        trailing: Sequence[tuple[str, str | bytes]] = (
            exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
        ) or ()
        origin = next((str(value) for key, value in trailing if key == RELAY_ORIGIN_KEY), "")
        who = f"the agent of {self.computer}"
        if origin == "agent":
            known = agent_status_error(code, detail, who, unimplemented)
            if known is not None:
                return known
            name = code.name if code is not None else "UNKNOWN"
            return CommandError(f"{who} failed: {name}: {detail}".rstrip(": "))
        if origin == "server":  # the server could not relay it: unknown computer, agent offline, no answer
            return CommandError(detail or f"the policy server at {self.target} could not ask {who}")
        source = self._certificate.source if self._certificate is not None else "?"
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return ServerRefusedCertificate(
                f"the policy server at {self.target} refused the admin certificate in {source}: {detail}"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnreachable(
                f"cannot reach the policy server at {self.target} ({detail}) to ask {who}; start it, or point "
                "netsh at yours with -r HOST:PORT"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnreachable(
                f"the policy server at {self.target} did not answer within {self._timeout:g} seconds"
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ServerUnreachable(
                f"{self.target} does not relay calls to agents (AgentRelay): it is not a policy server, or an "
                "older one"
            )
        name = code.name if code is not None else "UNKNOWN"
        return CommandError(f"asking {who} through {self.target} failed: {name}: {detail}".rstrip(": "))


def split_computer(tokens: Sequence[str]) -> tuple[list[str], str]:
    """A dynamic command's tokens without a `computer=NAME` tag, and that NAME ("" if none)."""
    rest: list[str] = []
    computer = ""
    for token in tokens:
        tag, eq, value = token.partition("=")
        if eq and tag.strip().lower() == "computer":
            if computer:
                raise UsageError("computer= is given more than once")
            computer = value.strip()
            if not computer:
                raise UsageError("computer= needs the computer's name")
            continue
        rest.append(token)
    return rest, computer


@dataclass
class DynamicContext:
    """What a dynamic command runs with: the -r option and the computer (resolved when first needed), output
    options. With a computer (--computer, or `computer=NAME` on the line), calls go through the policy server."""

    option: str | None = None
    json: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    computer: str = ""  # --computer NAME
    cert_dir: str | None = None  # the admin certificate directory, for the policy server
    line_computer: str = ""  # computer=NAME on the command line being run
    _client: AgentClient | None = None
    _relays: dict[str, RelayClient] = field(default_factory=dict)

    @property
    def client(self) -> AgentApi:
        computer = self.line_computer or self.computer
        if computer:
            key = computer.lower()
            relay = self._relays.get(key)
            if relay is None:
                relay = self._relays[key] = RelayClient(server_target(self.option), computer, cert_dir=self.cert_dir)
            return relay
        if self.option is not None and self.option.strip() and not is_socket(self.option):
            raise CommandError(no_computer(server_target(self.option)))
        if self._client is None:
            self._client = AgentClient(agent_socket(self.option))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for relay in self._relays.values():
            relay.close()

    def say(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")

    def print_json(self, message: Message) -> None:
        # As the static commands print theirs: every field, defaults included, proto field names.
        self.say(json.dumps(message_dict(message), indent=2))


def message_dict(message: Message) -> dict[str, object]:
    """An API message as JSON-able data, as --json prints it (every field, proto field names)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# ------------------------------------------------------------------ commands

_SA_ADDRESS = "an IP address or a DNS name (any = no restriction)"
STATS_TYPE = Setting(
    "type", ValueKind.CHOICE, "Which statistics: all, ike (main mode) or ipsec (quick mode).",
    choices=("all", "ike", "ipsec"), default="all",
)
FILTER_TYPE = Setting(
    "type", ValueKind.CHOICE, "generic: the filters as configured; specific: expanded per host address.",
    choices=("generic", "specific"), default="generic",
)
SA_SRCADDR = Setting("srcaddr", ValueKind.ADDRESS, "Only SAs whose source (this computer's side) is this address.",
                     details=_SA_ADDRESS + ".")
SA_DSTADDR = Setting("dstaddr", ValueKind.ADDRESS, "Only SAs whose destination (the peer's side) is this address.",
                     details=_SA_ADDRESS + ".")
SA_PROTOCOL = Setting("protocol", ValueKind.PROTOCOL, "Only SAs that carry this protocol (ANY, ICMP, TCP, UDP, RAW, "
                      "a number); an SA for any protocol carries all.", default="ANY")
F_SRCADDR = Setting("srcaddr", ValueKind.ADDRESS, "Only filters that match traffic from this address.",
                    details=_SA_ADDRESS + "; a filter for any address matches.")
F_DSTADDR = Setting("dstaddr", ValueKind.ADDRESS, "Only filters that match traffic to this address.",
                    details=_SA_ADDRESS + "; a filter for any address matches.")
F_PROTOCOL = Setting("protocol", ValueKind.PROTOCOL, "Only filters that match this protocol (a filter for ANY "
                     "protocol matches).", default="ANY")
F_SRCPORT = Setting("srcport", ValueKind.PORT, "Only filters that match this source port (0 = any).",
                    minimum=0, maximum=65_535, default="0")
F_DSTPORT = Setting("dstport", ValueKind.PORT, "Only filters that match this destination port (0 = any).",
                    minimum=0, maximum=65_535, default="0")
FILTER_NAME = Setting("name", ValueKind.NAME, "A filter's name (its key), its main/quick mode policy, or part of "
                      "the rule it comes from (e.g. \"All IP Traffic\").")
PROPERTY = Setting("property", ValueKind.NAME, "The property: ikelogging, strongcrlcheck, ipsecexempt, "
                   "ipsecdiagnostics, ipsecloginterval or bootmode.")
VALUE = Setting("value", ValueKind.TEXT, "Its new value.")


def _p(setting: Setting, required: bool = False, group: str = "") -> Param:
    return Param(setting, required, group)


_SELECT_FILTER = (_p(FILTER_NAME, group="which"), _p(S.ALL, group="which"), _p(FILTER_TYPE))
_FILTER_ADDRESSES = (_p(F_SRCADDR), _p(F_DSTADDR), _p(S.SRCMASK), _p(S.DSTMASK))
_SPECIFIC = (
    "Windows expands each generic filter into specific filters, one per host address pair; this agent's "
    "filters match the configured addresses directly, so the specific filters are the generic filters, listed "
    "the same way (most specific first)."
)

SHOW_STATS = Command(
    ("show", "stats"), "Shows the IKE main mode and IPsec quick mode statistics (IP Security Monitor).",
    (_p(STATS_TYPE),), positional=("type",),
    remarks="Counters start at 0 when the agent starts, as Windows' do when the IPsec services start.",
)
SHOW_MMSAS = Command(
    ("show", "mmsas"), "Shows the main mode (IKE) security associations.",
    (_p(S.ALL), _p(SA_SRCADDR), _p(SA_DSTADDR), _p(S.FORMAT), _p(S.RESOLVEDNS)),
    remarks="Source is this computer's side of the SA, destination the peer's.",
)
SHOW_QMSAS = Command(
    ("show", "qmsas"), "Shows the quick mode (IPsec) security associations.",
    (_p(S.ALL), _p(SA_SRCADDR), _p(SA_DSTADDR), _p(SA_PROTOCOL), _p(S.FORMAT), _p(S.RESOLVEDNS)),
    remarks="Source is this computer's side of the SA, destination the peer's.",
)
SHOW_MMFILTER = Command(
    ("show", "mmfilter"), "Shows the main mode filters: the filters that negotiate, with their main mode policy.",
    (*_SELECT_FILTER, *_FILTER_ADDRESSES, _p(S.RESOLVEDNS)), positional=("name",), remarks=_SPECIFIC,
)
SHOW_QMFILTER = Command(
    ("show", "qmfilter"), "Shows the quick mode filters: every filter in force with its action and quick mode policy.",
    (*_SELECT_FILTER, *_FILTER_ADDRESSES, _p(F_PROTOCOL), _p(F_SRCPORT), _p(F_DSTPORT), _p(S.RESOLVEDNS)),
    positional=("name",), remarks=_SPECIFIC,
)
# Dynamic-mode policy (windows-ipsec.md §3.3): the parameters Windows gives these commands, each the static
# mode's setting where the two share one (addresses, masks, methods, authentication), so both parse alike.
MM_NAME = Setting("name", ValueKind.NAME, "Name of the main mode policy.", maximum=255)
QM_NAME = Setting("name", ValueKind.NAME, "Name of the quick mode policy.", maximum=255)
SOFTSAEXPIRATIONTIME = Setting(
    "softsaexpirationtime", ValueKind.INT, "Lifetime of a soft SA (traffic let through in clear after a peer "
    "did not answer IKE).", minimum=1, maximum=2_147_483_647, default="300", unit="seconds",
)
PFSGROUP = Setting(
    "pfsgroup", ValueKind.CHOICE, "Session key perfect forward secrecy and its Diffie-Hellman group.",
    choices=("grp1", "grp2", "grp3", "grpmm", "nopfs"), default="nopfs",
    details="GRP1 = 768-bit, GRP2 = 1024-bit, GRP3 = 2048-bit, GRPMM = the main mode's group, NOPFS = no PFS.",
)
MMPOLICY = Setting("mmpolicy", ValueKind.NAME, "The main mode policy the rule negotiates with (add mmpolicy).")
QMPOLICY = Setting(
    "qmpolicy", ValueKind.NAME, "The quick mode policy of the rule (add qmpolicy); required when an action is "
    "negotiate.",
)
_ACTIONS = ("permit", "block", "negotiate")
ACTIONINBOUND = Setting("actioninbound", ValueKind.CHOICE, "What the rule does with the traffic it matches "
                        "coming in.", choices=_ACTIONS, default="negotiate")
ACTIONOUTBOUND = Setting("actionoutbound", ValueKind.CHOICE, "What the rule does with the traffic it matches "
                         "going out.", choices=_ACTIONS, default="negotiate")
TUNNELDSTADDRESS = Setting(
    "tunneldstaddress", ValueKind.TUNNEL, "Tunnel endpoint: the far end's IP address (or a DNS name, resolved "
    "now); omit for a transport rule.",
)
R_SRCADDR = Setting("srcaddr", ValueKind.ADDRESS, "Only rules with this source address.",
                    details="me, any, an IP address, a DNS name (the rules made from it), or dns|wins|dhcp|gateway.")
R_DSTADDR = Setting("dstaddr", ValueKind.ADDRESS, "Only rules with this destination address.",
                    details=R_SRCADDR.details)
R_PROTOCOL = Setting("protocol", ValueKind.PROTOCOL, "Only rules for this protocol (ANY, ICMP, TCP, UDP, RAW, a "
                     "number).")
R_SRCPORT = Setting("srcport", ValueKind.PORT, "Only rules for this source port (0 = any).", minimum=0,
                    maximum=65_535)
R_DSTPORT = Setting("dstport", ValueKind.PORT, "Only rules for this destination port (0 = any).", minimum=0,
                    maximum=65_535)

_MEMORY = (
    "Dynamic-mode policy lives in the agent's memory: it is enforced at once, together with the assigned "
    "(static) policy, and is gone when the agent stops, as Windows forgets it when its IPsec services stop."
)
_MM_SETTINGS = (_p(S.QMPERMM), _p(S.MMLIFETIME), _p(SOFTSAEXPIRATIONTIME), _p(S.MMSECMETHODS))
_QM_SETTINGS = (_p(S.SOFT), _p(PFSGROUP), _p(S.QMSECMETHODS))
_RULE_ADDRESSES = (_p(S.SRCADDR, True), _p(S.DSTADDR, True))
_RULE_AUTH = (_p(S.KERBEROS), _p(S.PSK), _p(S.ROOTCA))
_IDENTIFY = (
    "srcaddr, dstaddr, srcmask, dstmask, protocol, srcport, dstport, mirrored, conntype and tunneldstaddress "
    "identify the rule; one not given stands for its default (as add rule), so give the values the rule was "
    "added with. A DNS name stands for the rules made from each of its addresses."
)
_SOFT_SA = " softsaexpirationtime is kept and shown, but this agent's enforcement does not use it."
_PFS_NOTE = (
    " With PFS, this agent derives the session keys in the group of the main mode policy's first method "
    "(as GRPMM), whichever of GRP1, GRP2 and GRP3 is given."
)

ADD_MMPOLICY = Command(
    ("add", "mmpolicy"), "Adds a main mode (IKE) policy to the agent's dynamic-mode policy.",
    (_p(MM_NAME, True), *_MM_SETTINGS), positional=("name",), remarks=_MEMORY + _SOFT_SA,
)
SET_MMPOLICY = Command(
    ("set", "mmpolicy"), "Changes a dynamic-mode main mode policy.",
    (_p(MM_NAME, True), *_MM_SETTINGS), positional=("name",),
    remarks="name= says which policy; the parameters given change, the others keep their values. The rules "
    "that use it are enforced anew at once.",
)
DELETE_MMPOLICY = Command(
    ("delete", "mmpolicy"), "Deletes a dynamic-mode main mode policy that no rule uses.",
    (_p(MM_NAME, group="which"), _p(S.ALL, group="which")), positional=("name",),
    remarks="all deletes every main mode policy that no rule uses and names the ones rules still use.",
)
ADD_QMPOLICY = Command(
    ("add", "qmpolicy"), "Adds a quick mode (IPsec) policy to the agent's dynamic-mode policy.",
    (_p(QM_NAME, True), *_QM_SETTINGS), positional=("name",), remarks=_MEMORY + _PFS_NOTE,
)
SET_QMPOLICY = Command(
    ("set", "qmpolicy"), "Changes a dynamic-mode quick mode policy.",
    (_p(QM_NAME, True), *_QM_SETTINGS), positional=("name",),
    remarks="name= says which policy; the parameters given change, the others keep their values. The rules "
    "that use it are enforced anew at once.",
)
DELETE_QMPOLICY = Command(
    ("delete", "qmpolicy"), "Deletes a dynamic-mode quick mode policy that no rule uses.",
    (_p(QM_NAME, group="which"), _p(S.ALL, group="which")), positional=("name",),
    remarks="all deletes every quick mode policy that no rule uses and names the ones rules still use.",
)
ADD_RULE = Command(
    ("add", "rule"), "Adds a dynamic-mode rule: a filter, what it does each way, and how it negotiates.",
    (
        *_RULE_ADDRESSES, _p(MMPOLICY, True), _p(QMPOLICY), _p(S.PROTOCOL), _p(S.SRCPORT), _p(S.DSTPORT),
        _p(S.MIRRORED), _p(S.CONNTYPE), _p(ACTIONINBOUND), _p(ACTIONOUTBOUND), _p(S.SRCMASK), _p(S.DSTMASK),
        _p(TUNNELDSTADDRESS), *_RULE_AUTH,
    ),
    remarks="Without kerberos=, psk= or rootca= the rule authenticates with Kerberos, as a static rule does. "
    "A tunnel rule (tunneldstaddress=) is not mirrored unless mirrored= says so (and the agent refuses a "
    "mirrored one). A DNS name is resolved once, now, into one rule per address. " + _MEMORY,
)
SET_RULE = Command(
    ("set", "rule"), "Changes the policies, actions or authentication of a dynamic-mode rule.",
    (
        *_RULE_ADDRESSES, _p(S.PROTOCOL), _p(S.SRCPORT), _p(S.DSTPORT), _p(S.MIRRORED), _p(S.CONNTYPE),
        _p(S.SRCMASK), _p(S.DSTMASK), _p(TUNNELDSTADDRESS), _p(MMPOLICY), _p(QMPOLICY), _p(ACTIONINBOUND),
        _p(ACTIONOUTBOUND), *_RULE_AUTH,
    ),
    remarks=_IDENTIFY + " mmpolicy, qmpolicy, actioninbound, actionoutbound and the authentication methods "
    "can be changed; giving any of kerberos=, psk=, rootca= replaces all authentication methods.",
)
DELETE_RULE = Command(
    ("delete", "rule"), "Deletes a dynamic-mode rule.",
    (
        *_RULE_ADDRESSES, _p(S.PROTOCOL), _p(S.SRCPORT), _p(S.DSTPORT), _p(S.MIRRORED), _p(S.CONNTYPE),
        _p(S.SRCMASK), _p(S.DSTMASK), _p(TUNNELDSTADDRESS),
    ),
    remarks=_IDENTIFY,
)
DELETE_ALL = Command(
    ("delete", "all"), "Deletes every dynamic-mode rule, quick mode policy and main mode policy.",
    remarks="The assigned (static) policy stays in force; change it with netsh ipsec static.",
)
SHOW_MMPOLICY = Command(
    ("show", "mmpolicy"), "Shows the dynamic-mode main mode policies.",
    (_p(MM_NAME, group="which"), _p(S.ALL, group="which")), positional=("name",),
    remarks="The main mode settings of the assigned (static) policy in force are shown by show mmfilter, with "
    "the filters that use them.",
)
SHOW_QMPOLICY = Command(
    ("show", "qmpolicy"), "Shows the dynamic-mode quick mode policies.",
    (_p(QM_NAME, group="which"), _p(S.ALL, group="which")), positional=("name",),
    remarks="The quick mode settings of the assigned (static) policy in force are shown by show qmfilter, with "
    "the filters that use them.",
)
SHOW_RULE = Command(
    ("show", "rule"), "Shows the dynamic-mode rules.",
    (
        _p(S.RULETYPE), _p(R_SRCADDR), _p(R_DSTADDR), _p(S.SRCMASK), _p(S.DSTMASK), _p(R_PROTOCOL), _p(R_SRCPORT),
        _p(R_DSTPORT), _p(S.RESOLVEDNS),
    ),
    remarks="Without parameters every rule is shown; each parameter given keeps the rules that have that value "
    "(a mask not given matches any). The filters in force, static and dynamic, are shown by show qmfilter.",
)
SHOW_CONFIG = Command(("show", "config"), "Shows the IPsec configuration properties (set config).")
SET_CONFIG = Command(
    ("set", "config"), "Sets an IPsec configuration property.",
    (_p(PROPERTY, required=True), _p(VALUE, required=True)), positional=("property", "value"),
    remarks="ikelogging and strongcrlcheck apply at once; the others take effect when the agent restarts, as "
    "Windows applies them when its IPsec services restart. `set config ikelogging 1` is the same as "
    "`set config property=ikelogging value=1`.",
)
SHOW_ALL = Command(
    ("show", "all"), "Shows the configuration, dynamic-mode policy, filters, SAs and statistics.",
    (_p(S.RESOLVEDNS),),
)
NOT_YET = (Command(("dump",), "Not available yet."),)
DYNAMIC_COMMANDS: tuple[Command, ...] = (
    SHOW_STATS, SHOW_MMSAS, SHOW_QMSAS, SHOW_MMFILTER, SHOW_QMFILTER, SHOW_MMPOLICY, SHOW_QMPOLICY, SHOW_RULE,
    ADD_MMPOLICY, SET_MMPOLICY, DELETE_MMPOLICY, ADD_QMPOLICY, SET_QMPOLICY, DELETE_QMPOLICY,
    ADD_RULE, SET_RULE, DELETE_RULE, DELETE_ALL, SHOW_CONFIG, SET_CONFIG, SHOW_ALL, *NOT_YET,
)

IPSEC_HELP = helptext.IPSEC_HELP


def not_available(command: Command) -> CommandError:
    return CommandError(
        f'"ipsec dynamic {command.text}" is not available yet: the agent answers with pre-shared keys masked, '
        "so a script could not re-create its rules; show mmpolicy, show qmpolicy and show rule list the "
        "dynamic-mode policy"
    )


def context_help() -> str:
    available = [c for c in DYNAMIC_COMMANDS if c not in NOT_YET]
    width = max(len(c.text) for c in DYNAMIC_COMMANDS) + 2
    lines = ['Commands in the "ipsec dynamic" context:', ""]
    lines += [f"  {c.text.ljust(width)}{c.summary}" for c in sorted(available, key=lambda c: c.words)]
    lines += ["", "Not available yet: " + ", ".join(c.text for c in NOT_YET) + "."]
    lines += [
        "",
        "netsh asks the agent on -r unix:STATE_DIR/agent.sock, else $POLICYAGENT_AGENT_SOCKET, else "
        f"{DEFAULT_SOCKET}.",
        "Another computer's agent, through the policy server (admin certificate): netsh -r SERVER:PORT "
        "--computer NAME ipsec dynamic ..., or computer=NAME at the end of a command.",
        "add, set and delete change the agent's dynamic-mode policy: enforced at once together with the "
        "assigned policy, kept in the agent's memory until it stops.",
        "Commands and tags may be shortened to any unique prefix (sh st = show stats, add mmp = add mmpolicy).",
        'Type a command followed by "?" for its parameters: add rule ?',
    ]
    return "\n".join(lines) + "\n"


def _verb_help(verb: str) -> str:
    commands = sorted((c for c in DYNAMIC_COMMANDS if c.words[0] == verb), key=lambda c: c.words)
    width = max(len(c.text) for c in commands) + 2
    return "\n".join([f'"{verb}" commands:', "", *(f"  {c.text.ljust(width)}{c.summary}" for c in commands)]) + "\n"


def resolve(tokens: Sequence[str]) -> tuple[Command | str, list[str]]:
    """The dynamic command the leading tokens name and its parameter tokens; help text instead when asked."""
    if not tokens or tokens[0].lower() in HELP_TOKENS:
        return context_help(), []
    verb = resolve_prefix(tokens[0], {c.words[0] for c in DYNAMIC_COMMANDS}, "command")
    group = [c for c in DYNAMIC_COMMANDS if c.words[0] == verb]
    if len(group) == 1 and len(group[0].words) == 1:
        command, rest = group[0], list(tokens[1:])
    else:
        nouns = [c.words[1] for c in group]
        if len(tokens) < 2:
            raise UsageError(f'incomplete command "{verb}": {verb} what? one of: {", ".join(sorted(nouns))}')
        if tokens[1].lower() in HELP_TOKENS:
            return _verb_help(verb), []
        noun = resolve_prefix(tokens[1], nouns, f"{verb} command")
        command = next(c for c in group if c.words[1] == noun)
        rest = list(tokens[2:])
    if any(t.lower() in HELP_TOKENS for t in rest):
        return ("Not available yet.\n" if command in NOT_YET else helptext.command_help(command)), []
    return command, rest


def execute(ctx: DynamicContext, tokens: Sequence[str]) -> None:
    """Run one `ipsec dynamic` command line (the tokens after `ipsec dynamic`)."""
    target, params = resolve(tokens)
    if isinstance(target, str):
        ctx.out.write(target)
        return
    if target in NOT_YET:
        raise not_available(target)
    params, computer = split_computer(params)
    ctx.line_computer = computer
    try:
        HANDLERS[target.words](ctx, parse_args(target, params))
    finally:
        ctx.line_computer = ""


# ------------------------------------------------------------------ values and matching


def _str(inv: Invocation, name: str, default: str = "") -> str:
    value = inv.get(name, default)
    return value if isinstance(value, str) else default


def _int(inv: Invocation, name: str) -> int:
    value = inv.get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _flag(inv: Invocation, name: str) -> bool:
    return inv.get(name) is True


def when(ms: int) -> str:
    """A time as Windows shows it, local time; "-" for none."""
    if ms <= 0:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def now_text() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _resolve(name: str, setting: Setting) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise setting.fail(f'cannot resolve "{name}": {exc}') from None
    return sorted({str(info[4][0]).split("%", 1)[0] for info in infos})


def networks(inv: Invocation, addr: Setting, mask: Setting | None = None) -> list[Network] | None:
    """The networks srcaddr=/dstaddr= (with its mask) stand for; None = no restriction."""
    value = inv.get(addr.name)
    mask_raw = inv.raw(mask.name) if mask is not None else None
    if value is None:
        if mask is not None and mask_raw is not None:
            raise mask.fail(f"{mask.name}= needs {addr.name}=")
        return None
    if isinstance(value, DnsName):
        ips = _resolve(value.name, addr)
    else:
        assert isinstance(value, pb.Address)
        if value.kind == pb.ADDRESS_KIND_ANY:
            return None
        if value.kind != pb.ADDRESS_KIND_HOST:
            raise addr.fail("give an IP address, a DNS name or any (me and server keywords are not supported here)")
        ips = [value.ip]
    out: list[Network] = []
    for ip in ips:
        suffix = f"/{mask_raw.strip()}" if mask_raw is not None else ""
        try:
            out.append(ipaddress.ip_network(f"{ip}{suffix}", strict=False))
        except ValueError as exc:
            assert mask is not None
            raise mask.fail(f'"{mask_raw}" is not a mask for {ip}: {exc}') from None
    return out


def _network(text: str) -> Network | None:
    """A CIDR or address, or a strongSwan traffic selector ("10.0.0.0/24[tcp/80]"); None if unreadable."""
    try:
        return ipaddress.ip_network(text.split("[", 1)[0].strip(), strict=False)
    except ValueError:
        return None


def overlaps(cidrs: Iterable[str], wanted: list[Network] | None, *, empty_is_any: bool) -> bool:
    if wanted is None:
        return True
    nets = [n for n in (_network(c) for c in cidrs) if n is not None]
    if not nets:
        return empty_is_any
    return any(n.version == w.version and n.overlaps(w) for n in nets for w in wanted)


def ts_protocol(ts: str) -> int:
    """The protocol of a strongSwan traffic selector ("10.0.0.1/32[tcp/80]" → 6); 0 = any."""
    if "[" not in ts:
        return 0
    name = ts.split("[", 1)[1].rstrip("]").split("/", 1)[0].strip().lower()
    if not name:
        return 0
    if name.isdigit():
        return int(name)
    try:
        return S.PROTOCOL_NAMES.get(name) or socket.getprotobyname(name)
    except OSError:
        return -1


@functools.lru_cache(maxsize=512)
def _reverse(ip: str) -> str:
    try:
        return socket.gethostbyaddr(ip)[0]
    except OSError:
        return ""


def show_address(text: str, resolvedns: bool) -> str:
    """An address or CIDR as shown; with resolvedns=yes a host address gets its DNS name."""
    if not resolvedns:
        return text
    net = _network(text)
    if net is None or net.num_addresses != 1:
        return text
    name = _reverse(str(net.network_address))
    return f"{text} ({name})" if name else f"{text} (<not resolved>)"


def cidrs_text(cidrs: Sequence[str], resolvedns: bool) -> list[str]:
    return [show_address(c, resolvedns) for c in cidrs] or ["<Any IP Address>"]


_CIPHER_NAMES = {"des": "DES", "3des": "3DES", "aes128": "AES128", "aes192": "AES192", "aes256": "AES256",
                 "null": "None"}
_HASH_NAMES = {"md5": "MD5", "sha1": "SHA1", "sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}
_GROUP_NAMES = {"modp768": "1", "modp1024": "2", "modp2048": "3", "modp3072": "15", "modp4096": "16",
                "ecp256": "19", "ecp384": "20"}
AUTH_NAMES = {"psk": "Preshared key", "pubkey": "Certificate", "kerberos": "Kerberos"}


def ike_method(proposal: str) -> str:
    """"3des-sha1-modp1024" as netsh writes main mode methods: "3DES-SHA1-2 (3des-sha1-modp1024)"."""
    parts = proposal.lower().split("-")
    if len(parts) == 3 and parts[0] in _CIPHER_NAMES and parts[1] in _HASH_NAMES and parts[2] in _GROUP_NAMES:
        return f"{_CIPHER_NAMES[parts[0]]}-{_HASH_NAMES[parts[1]]}-{_GROUP_NAMES[parts[2]]}  ({proposal})"
    return proposal


def esp_method(proposal: str) -> str:
    """"3des-sha1" as netsh writes quick mode methods: "ESP[3DES,SHA1] (3des-sha1)"; PFS group if any."""
    parts = proposal.lower().split("-")
    pfs = ""
    if parts and parts[-1] in _GROUP_NAMES:
        pfs = f" PFS group {_GROUP_NAMES[parts.pop()]}"
    if len(parts) == 2 and parts[0] in _CIPHER_NAMES and parts[1] in _HASH_NAMES:
        return f"ESP[{_CIPHER_NAMES[parts[0]]},{_HASH_NAMES[parts[1]]}]{pfs}  ({proposal})"
    if len(parts) == 1 and parts[0] in _CIPHER_NAMES:
        return f"ESP[{_CIPHER_NAMES[parts[0]]},None]{pfs}  ({proposal})"
    return proposal


def auth_text(auth: str) -> str:
    return AUTH_NAMES.get(auth, auth or "-")


def yes_no(value: bool) -> str:
    return "YES" if value else "NO"


def port_text(port: int) -> str:
    return str(port) if port else "ANY"


# ------------------------------------------------------------------ show stats


def stats_text(stats: agent_pb.IpsecStatistics, kind: str = "all") -> str:
    """The two blocks of `show stats` (windows-ipsec.md §3.5), counters in the order the agent gives."""
    blocks: list[tuple[str, Sequence[agent_pb.Counter]]] = []
    if kind in ("all", "ike"):
        blocks.append(("IKE Main Mode Statistics", stats.main_mode))
    if kind in ("all", "ipsec"):
        blocks.append(("IPSec Quick Mode Statistics", stats.quick_mode))
    lines: list[str] = []
    for title, counters in blocks:
        if lines:
            lines.append("")
        lines += [title, "-" * len(title)]
        lines += [f"{c.name.ljust(31)}: {c.value}" for c in counters]
        if not counters:
            lines.append("(no counters)")
    if not stats.ipsec_active:
        why = f" ({stats.enforcer})" if stats.enforcer else ""
        lines += ["", f"IPsec is not active on this computer{why}: nothing is negotiated, so nothing is counted."]
    return "\n".join(lines) + "\n"


def show_stats(ctx: DynamicContext, inv: Invocation) -> None:
    stats = ctx.client.statistics()
    kind = _str(inv, "type", "all")
    if ctx.json:
        out = agent_pb.IpsecStatistics()
        out.CopyFrom(stats)
        if kind == "ike":
            out.ClearField("quick_mode")
        elif kind == "ipsec":
            out.ClearField("main_mode")
        ctx.print_json(out)
        return
    ctx.say(stats_text(stats, kind))


# ------------------------------------------------------------------ show mmsas / qmsas


def select_mmsas(sas: agent_pb.SecurityAssociations, inv: Invocation) -> list[agent_pb.MainModeSA]:
    src, dst = networks(inv, SA_SRCADDR), networks(inv, SA_DSTADDR)
    return [
        sa
        for sa in sas.main_mode
        if overlaps([sa.local_address], src, empty_is_any=False)
        and overlaps([sa.remote_address], dst, empty_is_any=False)
    ]


def select_qmsas(sas: agent_pb.SecurityAssociations, inv: Invocation) -> list[agent_pb.QuickModeSA]:
    src, dst = networks(inv, SA_SRCADDR), networks(inv, SA_DSTADDR)
    protocol = _int(inv, "protocol")
    out = []
    for sa in sas.quick_mode:
        if not overlaps([sa.local_address, *sa.local_ts], src, empty_is_any=False):
            continue
        if not overlaps([sa.remote_address, *sa.remote_ts], dst, empty_is_any=False):
            continue
        protocols = {ts_protocol(t) for t in [*sa.local_ts, *sa.remote_ts]} or {0}
        if protocol and not ({0, protocol} & protocols):
            continue
        out.append(sa)
    return out


def _auth_by_connection(ctx: DynamicContext, sas: Sequence[agent_pb.MainModeSA]) -> dict[str, str]:
    """The authentication of each connection from the policies in force, for SAs that do not carry it."""
    if all(sa.auth for sa in sas):
        return {}
    try:
        policies = ctx.client.filters().policies
    except CommandError:
        return {}
    return {p.name: p.auth for p in policies}


def mmsa_lines(sa: agent_pb.MainModeSA, auth: str, resolvedns: bool) -> list[str]:
    version = {1: "IKEv1 (main mode)", 2: "IKEv2"}.get(sa.ike_version, str(sa.ike_version or "-"))
    return [
        *label_line("Connection", sa.connection),
        *label_line("State", sa.state),
        *label_line("Source (Me)", show_address(sa.local_address, resolvedns)),
        *label_line("Destination (Peer)", show_address(sa.remote_address, resolvedns)),
        *label_line("Source ID", sa.local_id or "-"),
        *label_line("Destination ID", sa.remote_id or "-"),
        *label_line("Authentication Mode", auth_text(auth)),
        *label_line("Encryption", sa.encryption or "-"),
        *label_line("Integrity", sa.integrity or "-"),
        *label_line("Diffie-Hellman Group", sa.dh_group or "-"),
        *label_line("Cookie Pair", f"{sa.initiator_cookie or '-'}:{sa.responder_cookie or '-'}"),
        *label_line("Initiated By", "Me" if sa.initiator else "Peer"),
        *label_line("Key Exchange", version),
        *label_line("Established", when(sa.established_unix_ms)),
        *label_line("Reauthentication In", f"{sa.reauth_in_s} seconds" if sa.reauth_in_s else "-"),
    ]


def mmsas_text(
    sas: Sequence[agent_pb.MainModeSA], auths: dict[str, str], *, table_format: bool, resolvedns: bool
) -> str:
    def auth(sa: agent_pb.MainModeSA) -> str:
        return sa.auth or auths.get(sa.connection.split("@", 1)[0], "")

    title = f"Main Mode SAs at {now_text()}"
    lines = [title, RULE]
    if not sas:
        lines.append("No main mode SAs.")
    elif table_format:
        rows = [
            [show_address(sa.local_address, resolvedns), show_address(sa.remote_address, resolvedns),
             auth_text(auth(sa)), sa.encryption, sa.integrity, sa.dh_group, sa.state]
            for sa in sas
        ]
        lines += table(["Source", "Destination", "Auth", "Encryption", "Integrity", "DH Group", "State"], rows, True)
    else:
        for n, sa in enumerate(sas):
            if n:
                lines.append("")
            lines += mmsa_lines(sa, auth(sa), resolvedns)
    lines += ["", f"Number of Main Mode SAs: {len(sas)}"]
    return "\n".join(lines) + "\n"


def mode_text(sa: agent_pb.QuickModeSA) -> str:
    """"TUNNEL-in-UDP" (ESP in UDP 4500) as "Tunnel in UDP 4500 (ESP-in-UDP encapsulation)"."""
    base = sa.mode.upper().split("-", 1)[0].title() or "-"
    if sa.encapsulated:
        return f"{base} in UDP 4500 (ESP-in-UDP encapsulation)"
    return base


def qmsa_lines(sa: agent_pb.QuickModeSA, resolvedns: bool) -> list[str]:
    tunnel = sa.mode.upper().startswith("TUNNEL")
    protocols = {ts_protocol(t) for t in [*sa.local_ts, *sa.remote_ts]} - {0}
    protocol = ", ".join(protocol_text(p) for p in sorted(protocols)) if protocols else "ANY"
    offer = " / ".join(x for x in (sa.encryption, sa.integrity) if x) or "-"
    lines = [
        "Tunnel Filter" if tunnel else "Transport Filter",
        *label_line("Source Address", cidrs_text(list(sa.local_ts), resolvedns)),
        *label_line("Destination Address", cidrs_text(list(sa.remote_ts), resolvedns)),
        *label_line("Protocol", protocol),
    ]
    if tunnel:
        lines += label_line("Tunnel Source", show_address(sa.local_address, resolvedns))
        lines += label_line("Tunnel Destination", show_address(sa.remote_address, resolvedns))
    else:
        lines += label_line("Source (Me)", show_address(sa.local_address, resolvedns))
        lines += label_line("Destination (Peer)", show_address(sa.remote_address, resolvedns))
    lines += [
        *label_line("Connection", f"{sa.connection} / {sa.child}" if sa.child else sa.connection),
        *label_line("State", sa.state),
        *label_line("Mode", mode_text(sa)),
        *label_line("Security Protocol", sa.protocol or "-"),
        *label_line("Offer Used", offer),
        *label_line("PFS Group", sa.pfs_group or "none"),
        *label_line("Inbound SPI", sa.spi_in or "-"),
        *label_line("Outbound SPI", sa.spi_out or "-"),
        *label_line("Bytes Received", f"{sa.bytes_in} ({sa.packets_in} packets)"),
        *label_line("Bytes Sent", f"{sa.bytes_out} ({sa.packets_out} packets)"),
        *label_line("Installed", when(sa.installed_unix_ms)),
        *label_line("Rekey In", f"{sa.rekey_in_s} seconds" if sa.rekey_in_s else "-"),
        *label_line("Expires In", f"{sa.expires_in_s} seconds" if sa.expires_in_s else "-"),
    ]
    return lines


def qmsas_text(sas: Sequence[agent_pb.QuickModeSA], *, table_format: bool, resolvedns: bool) -> str:
    lines = [f"Quick Mode SAs at {now_text()}", RULE]
    if not sas:
        lines.append("No quick mode SAs.")
    elif table_format:
        rows = [
            [
                ", ".join(cidrs_text(list(sa.local_ts), resolvedns)),
                ", ".join(cidrs_text(list(sa.remote_ts), resolvedns)),
                sa.protocol, sa.mode, sa.spi_in, sa.spi_out, str(sa.bytes_in), str(sa.bytes_out),
            ]
            for sa in sas
        ]
        headers = ["Source", "Destination", "Protocol", "Mode", "SPI In", "SPI Out", "Bytes In", "Bytes Out"]
        lines += table(headers, rows, True)
    else:
        for n, sa in enumerate(sas):
            if n:
                lines.append("")
            lines += qmsa_lines(sa, resolvedns)
    lines += ["", f"Number of Quick Mode SAs: {len(sas)}"]
    return "\n".join(lines) + "\n"


def show_mmsas(ctx: DynamicContext, inv: Invocation) -> None:
    chosen = select_mmsas(ctx.client.security_associations(), inv)
    if ctx.json:
        ctx.print_json(agent_pb.SecurityAssociations(main_mode=chosen))
        return
    ctx.say(
        mmsas_text(
            chosen, _auth_by_connection(ctx, chosen),
            table_format=_str(inv, "format", "list") == "table", resolvedns=_flag(inv, "resolvedns"),
        )
    )


def show_qmsas(ctx: DynamicContext, inv: Invocation) -> None:
    chosen = select_qmsas(ctx.client.security_associations(), inv)
    if ctx.json:
        ctx.print_json(agent_pb.SecurityAssociations(quick_mode=chosen))
        return
    table_format = _str(inv, "format", "list") == "table"
    ctx.say(qmsas_text(chosen, table_format=table_format, resolvedns=_flag(inv, "resolvedns")))


# ------------------------------------------------------------------ show mmfilter / qmfilter


def select_filters(filters: agent_pb.Filters, inv: Invocation, *, main_mode: bool) -> list[agent_pb.FilterInForce]:
    """The filters the command names, in the agent's order (most specific first)."""
    chosen = [f for f in filters.filters if f.verdict == "negotiate" or not main_mode]
    if inv.has("name"):
        wanted = _str(inv, "name")
        low = wanted.casefold()
        exact = [f for f in chosen if wanted in (f.key, f.connection)]
        chosen = exact or [f for f in chosen if low in f.label.casefold()]
        if not chosen:
            kind = "main mode" if main_mode else "quick mode"
            raise NotFoundError(f'there is no {kind} filter named "{wanted}"')
    src = networks(inv, F_SRCADDR, S.SRCMASK)
    dst = networks(inv, F_DSTADDR, S.DSTMASK)
    protocol, sport, dport = _int(inv, "protocol"), _int(inv, "srcport"), _int(inv, "dstport")
    return [
        f
        for f in chosen
        if overlaps(f.source, src, empty_is_any=True)
        and overlaps(f.destination, dst, empty_is_any=True)
        and (not protocol or f.protocol in (0, protocol))
        and (not sport or f.source_port in (0, sport))
        and (not dport or f.destination_port in (0, dport))
    ]


def _policy_role(p: agent_pb.NegotiationPolicy) -> str:
    role = "initiates and responds" if p.initiates else "responds only (default response rule)"
    return role + ("; one instance per peer, made when traffic needs it" if p.per_peer else "")


def _methods(values: Sequence[str], fmt: Callable[[str], str]) -> list[str]:
    return [fmt(v) for v in values] or ["-"]


def _filter_head(f: agent_pb.FilterInForce, resolvedns: bool) -> list[str]:
    return [
        *label_line("Filter Name", f.key or "-"),
        *label_line("From", f.label or "-"),
        *label_line("Source Address", cidrs_text(list(f.source), resolvedns)),
        *label_line("Destination Address", cidrs_text(list(f.destination), resolvedns)),
    ]


def _heading(title: str, kind: str) -> list[str]:
    lines = [f"{title}: {kind.title()}", RULE]
    if kind == "specific":
        lines += [_SPECIFIC, ""]
    return lines


def mmfilter_text(
    filters: Sequence[agent_pb.FilterInForce],
    policies: Sequence[agent_pb.NegotiationPolicy],
    *,
    kind: str = "generic",
    resolvedns: bool = False,
    responders: bool = True,
) -> str:
    by_name = {p.name: p for p in policies}
    lines = _heading("Main Mode Filters", kind)
    for n, f in enumerate(filters):
        if n:
            lines.append("")
        policy = by_name.get(f.connection)
        lines += _filter_head(f, resolvedns)
        lines += label_line("Weight", str(f.weight))
        lines += label_line("Main Mode Policy", f.connection or "-")
        if policy is not None:
            lines += label_line("Role", _policy_role(policy))
            lines += label_line("Authentication Methods", auth_text(policy.auth))
            lines += label_line("Security Methods", _methods(policy.ike_proposals, ike_method))
    if not filters:
        lines.append("No main mode filters.")
    lines += ["", f"{len(filters)} {kind.title()} Filter(s)"]
    if responders:
        for p in policies:
            if not p.initiates:
                methods = ", ".join(ike_method(x).split("  ", 1)[0] for x in p.ike_proposals)
                lines.append(
                    f"Main mode policy {p.name} answers peers that negotiate ({p.label or 'responder only'}; "
                    f"{auth_text(p.auth)}; {methods or '-'})"
                )
    return "\n".join(lines) + "\n"


def qmfilter_text(
    filters: Sequence[agent_pb.FilterInForce],
    whole: agent_pb.Filters,
    *,
    kind: str = "generic",
    resolvedns: bool = False,
) -> str:
    by_name = {p.name: p for p in whole.policies}
    lines = _heading("Quick Mode Filters", kind)
    for n, f in enumerate(filters):
        if n:
            lines.append("")
        lines += _filter_head(f, resolvedns)
        lines += [
            *label_line("Protocol", protocol_text(f.protocol)),
            *label_line("Source Port", port_text(f.source_port)),
            *label_line("Destination Port", port_text(f.destination_port)),
            *label_line("Action", {"permit": "PERMIT", "block": "BLOCK"}.get(f.verdict, "NEGOTIATE SECURITY")),
        ]
        if f.verdict == "negotiate":
            policy = by_name.get(f.connection)
            lines += [
                *label_line("Inbound Pass-through", yes_no(f.inbound_passthrough)),
                *label_line("Fallback To Clear", yes_no(f.fallback_to_clear)),
                *label_line("Quick Mode Policy", f.connection or "-"),
            ]
            if policy is not None:
                lines += label_line("Security Methods", _methods(policy.esp_proposals, esp_method))
        lines += label_line("Weight", str(f.weight))
        lines += label_line("Packets Matched", f"{f.packets} ({f.bytes} bytes)")
    if not filters:
        lines.append("No quick mode filters.")
    lines += ["", f"{len(filters)} {kind.title()} Filter(s)"]
    if whole.exemptions:
        lines += ["", "Exempted from filtering (default exemptions):", *(f"  {e}" for e in whole.exemptions)]
    if whole.notes:
        lines += ["", "Notes:", *(f"  {n}" for n in whole.notes)]
    return "\n".join(lines) + "\n"


def show_mmfilter(ctx: DynamicContext, inv: Invocation) -> None:
    whole = ctx.client.filters()
    chosen = select_filters(whole, inv, main_mode=True)
    if ctx.json:
        used = {f.connection for f in chosen}
        policies = [p for p in whole.policies if p.name in used or (not p.initiates and not inv.has("name"))]
        ctx.print_json(agent_pb.Filters(filters=chosen, policies=policies))
        return
    ctx.say(
        mmfilter_text(
            chosen, whole.policies, kind=_str(inv, "type", "generic"), resolvedns=_flag(inv, "resolvedns"),
            responders=not inv.has("name"),
        )
    )


def show_qmfilter(ctx: DynamicContext, inv: Invocation) -> None:
    whole = ctx.client.filters()
    chosen = select_filters(whole, inv, main_mode=False)
    if ctx.json:
        used = {f.connection for f in chosen}
        policies = [p for p in whole.policies if p.name in used]
        out = agent_pb.Filters(filters=chosen, policies=policies, exemptions=whole.exemptions, notes=whole.notes)
        ctx.print_json(out)
        return
    ctx.say(qmfilter_text(chosen, whole, kind=_str(inv, "type", "generic"), resolvedns=_flag(inv, "resolvedns")))


# ------------------------------------------------------------------ dynamic-mode policy: add, set, delete, show

_ACTION_TYPES: dict[str, pb.ActionType.ValueType] = {
    "permit": pb.ACTION_TYPE_PERMIT,
    "block": pb.ACTION_TYPE_BLOCK,
    "negotiate": pb.ACTION_TYPE_NEGOTIATE,
}
_PFS_CODES = {"grp1": "1", "grp2": "2", "grp3": "3", "grpmm": "mm", "nopfs": ""}
_PFS_DISPLAY = {"": "NOPFS (no PFS)", "1": "GRP1 (768-bit)", "2": "GRP2 (1024-bit)", "3": "GRP3 (2048-bit)",
                "mm": "GRPMM (the main mode group)"}
_SETTABLE = ("mmpolicy", "qmpolicy", "actioninbound", "actionoutbound", "kerberos", "psk", "rootca")


def _check(violations: list[Violation]) -> None:
    """Refuse with the model's validators' findings, as static mode checks before it writes."""
    if violations:
        raise ValidationError(violations)


def _named(items: Iterable[NamedPolicy], name: str) -> NamedPolicy | None:
    """The policy called `name`, compared as the agent compares names (case-insensitively)."""
    return next((p for p in items if p.name.casefold() == name.casefold()), None)


def _spelled(items: Iterable[NamedPolicy], name: str) -> str:
    """`name` as the agent spells the policy (rules name theirs exactly); as given if there is none."""
    found = _named(items, name)
    return found.name if found is not None else name


def _used_by(state: agent_pb.DynamicState, name: str, main_mode: bool) -> int:
    return sum(1 for r in state.rules if (r.mm_policy if main_mode else r.qm_policy) == name)


def _mm_policy(inv: Invocation, policy: agent_pb.DynamicMmPolicy) -> agent_pb.DynamicMmPolicy:
    """`policy` with the settings given applied, checked like a static policy's main mode settings."""
    if inv.has("qmpermm"):
        policy.qm_per_mm = _int(inv, "qmpermm")
    if inv.has("mmlifetime"):
        policy.mm_lifetime_minutes = _int(inv, "mmlifetime")
    if inv.has("softsaexpirationtime"):
        policy.soft_sa_expiration_s = _int(inv, "softsaexpirationtime")
    if inv.has("mmsecmethods"):
        del policy.methods[:]
        policy.methods.extend(cast(list[pb.MainModeMethod], inv.get("mmsecmethods")))
    path = f'mmpolicy "{policy.name}"'
    isakmp = pb.IsakmpSettings(
        methods=policy.methods, lifetime_minutes=policy.mm_lifetime_minutes, qm_per_mm=policy.qm_per_mm
    )
    _check(validate_mm_methods(isakmp, path) + SOFTSAEXPIRATIONTIME.check_range(policy.soft_sa_expiration_s, path))
    return policy


def _qm_policy(inv: Invocation, policy: agent_pb.DynamicQmPolicy) -> agent_pb.DynamicQmPolicy:
    if inv.has("soft"):
        policy.soft = _flag(inv, "soft")
    if inv.has("pfsgroup"):
        policy.pfs_group = _PFS_CODES[_str(inv, "pfsgroup")]
    if inv.has("qmsecmethods"):
        del policy.methods[:]
        policy.methods.extend(cast(list[pb.QuickModeMethod], inv.get("qmsecmethods")))
    _check(validate_qm_methods(policy.methods, f'qmpolicy "{policy.name}"'))
    return policy


def add_mmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    policy = agent_pb.DynamicMmPolicy(
        name=_str(inv, "name"),
        qm_per_mm=cast(int, default_of(S.QMPERMM)),
        mm_lifetime_minutes=cast(int, default_of(S.MMLIFETIME)),
        soft_sa_expiration_s=cast(int, default_of(SOFTSAEXPIRATIONTIME)),
        methods=cast(list[pb.MainModeMethod], default_of(S.MMSECMETHODS)),
    )
    ctx.client.edit_dynamic(agent_pb.DynamicEdit(add_mm_policy=_mm_policy(inv, policy)))


def set_mmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    # The agent replaces the whole policy: start from what it has, change what was given.
    name = _str(inv, "name")
    found = _named(ctx.client.dynamic_state().mm_policies, name)
    if found is None:
        raise NotFoundError(f'there is no main mode policy "{name}" (show mmpolicy lists them)')
    policy = agent_pb.DynamicMmPolicy()
    policy.CopyFrom(found)
    policy.mm_lifetime_minutes = policy.mm_lifetime_minutes or cast(int, default_of(S.MMLIFETIME))  # 0 = default
    policy.soft_sa_expiration_s = policy.soft_sa_expiration_s or cast(int, default_of(SOFTSAEXPIRATIONTIME))
    ctx.client.edit_dynamic(agent_pb.DynamicEdit(set_mm_policy=_mm_policy(inv, policy)))


def add_qmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    policy = agent_pb.DynamicQmPolicy(
        name=_str(inv, "name"),
        soft=cast(bool, default_of(S.SOFT)),
        pfs_group=_PFS_CODES[cast(str, default_of(PFSGROUP))],
        methods=cast(list[pb.QuickModeMethod], default_of(S.QMSECMETHODS)),
    )
    ctx.client.edit_dynamic(agent_pb.DynamicEdit(add_qm_policy=_qm_policy(inv, policy)))


def set_qmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    name = _str(inv, "name")
    found = _named(ctx.client.dynamic_state().qm_policies, name)
    if found is None:
        raise NotFoundError(f'there is no quick mode policy "{name}" (show qmpolicy lists them)')
    policy = agent_pb.DynamicQmPolicy()
    policy.CopyFrom(found)
    ctx.client.edit_dynamic(agent_pb.DynamicEdit(set_qm_policy=_qm_policy(inv, policy)))


def _delete_policy(ctx: DynamicContext, inv: Invocation, main_mode: bool) -> None:
    name = "all" if _flag(inv, "all") else _str(inv, "name")
    edit = agent_pb.DynamicEdit(delete_mm_policy=name) if main_mode else agent_pb.DynamicEdit(delete_qm_policy=name)
    state = ctx.client.edit_dynamic(edit)
    if name == "all":
        kept = [p.name for p in (state.mm_policies if main_mode else state.qm_policies)]
        if kept:
            kind = "main mode" if main_mode else "quick mode"
            ctx.say(f"Kept the {kind} policies that rules use: {', '.join(kept)}.")


def delete_mmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    _delete_policy(ctx, inv, main_mode=True)


def delete_qmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    _delete_policy(ctx, inv, main_mode=False)


def delete_all(ctx: DynamicContext, inv: Invocation) -> None:
    ctx.client.edit_dynamic(agent_pb.DynamicEdit(delete_all=True))


# -- rules


def _tunnel_endpoint(inv: Invocation) -> str:
    value = inv.get("tunneldstaddress")
    if isinstance(value, DnsName):
        return addresses.resolve(value.name, TUNNELDSTADDRESS)[0]  # IPv4 first, as static rules' tunnel=
    return value if isinstance(value, str) else ""


def rule_identities(inv: Invocation) -> list[agent_pb.DynamicRule]:
    """The rules' identifying fields as given, omitted ones at their defaults: one rule, or one per address
    pair when a DNS name was given. Built and checked as static mode builds and checks filters."""
    tunnel = _tunnel_endpoint(inv)
    # A tunnel filter is one-way (the agent refuses a mirrored one): mirrored defaults to no there.
    mirrored = _flag(inv, "mirrored") if inv.has("mirrored") else not tunnel and cast(bool, default_of(S.MIRRORED))
    conntype = CONNECTION_TYPES[_str(inv, "conntype", cast(str, default_of(S.CONNTYPE)))]
    out = []
    for flt in build_filters(inv):
        flt.mirrored = mirrored
        rule = agent_pb.DynamicRule(
            source=flt.source, destination=flt.destination, protocol=flt.protocol, source_port=flt.source_port,
            destination_port=flt.destination_port, mirrored=mirrored, connection_type=conntype,
            tunnel_endpoint=tunnel,
        )
        _check(validate_filter(flt, describe_rule(rule)))
        out.append(rule)
    return out


_SPECIFIC_KINDS = (pb.ADDRESS_KIND_HOST, pb.ADDRESS_KIND_SUBNET)


def _address_key(a: pb.Address) -> tuple[int, str, str]:
    ip, mask = a.ip, a.mask
    with contextlib.suppress(ValueError):
        parsed = ipaddress.ip_address(ip)
        ip = str(parsed)
        if a.kind == pb.ADDRESS_KIND_SUBNET:
            mask = S.normalize_mask(mask, parsed.version)
    return (a.kind, ip if a.kind in _SPECIFIC_KINDS else "", mask if a.kind == pb.ADDRESS_KIND_SUBNET else "")


def identity(rule: agent_pb.DynamicRule) -> tuple[object, ...]:
    """What identifies a dynamic rule, with addresses compared by value (not by the DNS name they came from)."""
    return (
        _address_key(rule.source), _address_key(rule.destination), rule.protocol, rule.source_port,
        rule.destination_port, rule.mirrored, rule.connection_type or pb.CONNECTION_TYPE_ALL, rule.tunnel_endpoint,
    )


def _stored_rules(state: agent_pb.DynamicState, inv: Invocation) -> list[agent_pb.DynamicRule]:
    """The agent's rules the identifying fields name, as the agent keys them (settable fields cleared)."""
    wanted = rule_identities(inv)
    found = []
    for want in wanted:
        for stored in state.rules:
            if identity(stored) == identity(want):
                key = agent_pb.DynamicRule()
                key.CopyFrom(stored)
                for name in ("mm_policy", "qm_policy", "action_inbound", "action_outbound", "auth_methods"):
                    key.ClearField(name)
                found.append(key)
                break
    if not found:
        raise NotFoundError(f"{describe_rule(wanted[0])}: no dynamic rule has these filters (show rule lists them)")
    return found


def _apply_rule_settings(rule: agent_pb.DynamicRule, inv: Invocation, state: agent_pb.DynamicState) -> None:
    if inv.has("mmpolicy"):
        rule.mm_policy = _spelled(state.mm_policies, _str(inv, "mmpolicy"))
    if inv.has("qmpolicy"):
        rule.qm_policy = _spelled(state.qm_policies, _str(inv, "qmpolicy"))
    if inv.has("actioninbound"):
        rule.action_inbound = _ACTION_TYPES[_str(inv, "actioninbound")]
    if inv.has("actionoutbound"):
        rule.action_outbound = _ACTION_TYPES[_str(inv, "actionoutbound")]
    methods = auth_methods(inv)
    if methods is not None:
        _check(validate_auth_methods(methods, describe_rule(rule), required=False))
        del rule.auth_methods[:]
        rule.auth_methods.extend(methods)


def _dns_names(rules: Sequence[agent_pb.DynamicRule]) -> list[str]:
    return sorted({a.dns_name for r in rules for a in (r.source, r.destination) if a.dns_name})


def add_rule(ctx: DynamicContext, inv: Invocation) -> None:
    state = ctx.client.dynamic_state()
    rules = rule_identities(inv)
    for rule in rules:
        rule.action_inbound = _ACTION_TYPES[cast(str, default_of(ACTIONINBOUND))]
        rule.action_outbound = _ACTION_TYPES[cast(str, default_of(ACTIONOUTBOUND))]
        rule.auth_methods.append(kerberos())  # Windows' default: Kerberos V5 (replaced by any method given)
        _apply_rule_settings(rule, inv, state)
    added: list[agent_pb.DynamicRule] = []
    try:
        for rule in rules:
            ctx.client.edit_dynamic(agent_pb.DynamicEdit(add_rule=rule))
            added.append(rule)
    except PolicyError:
        for rule in added:  # all or nothing: take back the rules of a DNS name added before the refusal
            with contextlib.suppress(PolicyError):
                ctx.client.edit_dynamic(agent_pb.DynamicEdit(delete_rule=rule))
        raise
    names = _dns_names(rules)
    if names:
        ctx.say(f"Resolved {', '.join(names)}: added {len(rules)} dynamic rule(s).")


def set_rule(ctx: DynamicContext, inv: Invocation) -> None:
    if not any(inv.has(name) for name in _SETTABLE):
        raise UsageError('"set rule" needs something to change: ' + ", ".join(f"{n}=" for n in _SETTABLE))
    if auth_methods(inv) == []:
        # The agent reads an empty list as "keep the methods": say so rather than change nothing.
        raise CommandError(
            "kerberos=no alone would leave the rule no authentication method; give the methods it should have "
            "(kerberos=yes, psk=, rootca=)"
        )
    state = ctx.client.dynamic_state()
    for rule in _stored_rules(state, inv):
        _apply_rule_settings(rule, inv, state)  # only what was given: the agent keeps the rest
        ctx.client.edit_dynamic(agent_pb.DynamicEdit(set_rule=rule))


def delete_rule(ctx: DynamicContext, inv: Invocation) -> None:
    doomed = _stored_rules(ctx.client.dynamic_state(), inv)
    for rule in doomed:
        ctx.client.edit_dynamic(agent_pb.DynamicEdit(delete_rule=rule))
    if len(doomed) > 1:
        ctx.say(f"Deleted {len(doomed)} dynamic rules.")


# -- show


def _renderer(resolvedns: bool = False) -> Renderer:
    # The static renderer's address, mask and authentication formats; dynamic rules need no store to look in.
    return Renderer(ContentsView(), store="", verbose=False, table=False, wide=True, resolvedns=resolvedns,
                    mask=SECRET_MASK)


def _select_named(items: Sequence[NamedPolicy], inv: Invocation, kind: str) -> list[NamedPolicy]:
    if not inv.has("name"):
        return list(items)
    found = _named(items, _str(inv, "name"))
    if found is None:
        raise NotFoundError(f'there is no {kind} policy "{_str(inv, "name")}" (show {kind[0]}mpolicy lists them)')
    return [found]


def _used_text(count: int) -> str:
    return f"{count} rule(s)" if count else "no rule"


def mmpolicies_text(policies: Sequence[agent_pb.DynamicMmPolicy], state: agent_pb.DynamicState) -> str:
    lines = ["Main Mode Policies", RULE]
    for n, p in enumerate(policies):
        if n:
            lines.append("")
        sessions = f"{p.qm_per_mm}" if p.qm_per_mm else "unlimited"
        lines += [
            *label_line("Policy Name", p.name),
            *label_line("Soft SA Expiration Time", f"{p.soft_sa_expiration_s or 300} seconds"),
            *label_line("Main Mode Life Time", f"{p.mm_lifetime_minutes or 480} minutes"),
            *label_line("Quick Modes Per Main Mode", sessions),
            *label_line("Security Methods", [S.format_mmsecmethods([m]) for m in p.methods] or ["NONE"]),
            *label_line("Used By", _used_text(_used_by(state, p.name, True))),
        ]
    if not policies:
        lines.append("No dynamic-mode main mode policies (add mmpolicy adds one).")
    lines += ["", f"Number of Main Mode Policies: {len(policies)}"]
    return "\n".join(lines) + "\n"


def qmpolicies_text(policies: Sequence[agent_pb.DynamicQmPolicy], state: agent_pb.DynamicState) -> str:
    lines = ["Quick Mode Policies", RULE]
    for n, p in enumerate(policies):
        if n:
            lines.append("")
        lines += [
            *label_line("Policy Name", p.name),
            *label_line("Fall Back to Clear (soft)", yes_no(p.soft)),
            *label_line("PFS Group", _PFS_DISPLAY.get(p.pfs_group, p.pfs_group)),
            *label_line("Security Methods", [S.format_qmsecmethod(m) for m in p.methods] or ["NONE"]),
            *label_line("Used By", _used_text(_used_by(state, p.name, False))),
        ]
    if not policies:
        lines.append("No dynamic-mode quick mode policies (add qmpolicy adds one).")
    lines += ["", f"Number of Quick Mode Policies: {len(policies)}"]
    return "\n".join(lines) + "\n"


def rule_lines(rule: agent_pb.DynamicRule, number: int, r: Renderer) -> list[str]:
    lines = [f"{'Tunnel' if rule.tunnel_endpoint else 'Transport'} Rule {number}"]
    for side, addr in (("Source", rule.source), ("Destination", rule.destination)):
        lines += label_line(f"{side} Address", r.address(addr))
        mask = r.mask_of(addr)
        if mask:
            lines += label_line(f"{side} Mask", mask)
        name = r.dns_name(addr)
        if name:
            lines += label_line(f"{side} DNS Name", name)
    if rule.tunnel_endpoint:
        lines += label_line("Tunnel Destination Address", rule.tunnel_endpoint)
    lines += [
        *label_line("Protocol", protocol_text(rule.protocol)),
        *label_line("Source Port", port_text(rule.source_port)),
        *label_line("Destination Port", port_text(rule.destination_port)),
        *label_line("Mirrored", yes_no(rule.mirrored)),
        *label_line("Connection Type", CONNECTION_DISPLAY.get(rule.connection_type or pb.CONNECTION_TYPE_ALL, "?")),
        *label_line("Main Mode Policy", rule.mm_policy or "-"),
        *label_line("Quick Mode Policy", rule.qm_policy or "None"),
        *label_line("Inbound Action", ACTION_DISPLAY.get(rule.action_inbound, "?")),
        *label_line("Outbound Action", ACTION_DISPLAY.get(rule.action_outbound, "?")),
        *label_line("Authentication Methods", r.auth_lines(rule.auth_methods)),
    ]
    return lines


def rules_text(numbered: Sequence[tuple[int, agent_pb.DynamicRule]], *, resolvedns: bool = False) -> str:
    r = _renderer(resolvedns)
    lines = ["Dynamic Rules", RULE]
    for n, (number, rule) in enumerate(numbered):
        if n:
            lines.append("")
        lines += rule_lines(rule, number, r)
    if not numbered:
        lines.append("No dynamic-mode rules (add rule adds one).")
    lines += ["", f"Number of Dynamic Rules: {len(numbered)}"]
    return "\n".join(lines) + "\n"


def select_rules(state: agent_pb.DynamicState, inv: Invocation) -> list[tuple[int, agent_pb.DynamicRule]]:
    """The rules show rule picks, numbered by their place in the agent's list (1 = first added)."""
    src, dst = inv.get("srcaddr"), inv.get("dstaddr")
    if src is None and inv.has("srcmask"):
        raise S.SRCMASK.fail("srcmask= needs srcaddr=")
    if dst is None and inv.has("dstmask"):
        raise S.DSTMASK.fail("dstmask= needs dstaddr=")
    kind = _str(inv, "type")
    out = []
    for number, rule in enumerate(state.rules, start=1):
        checks = (
            not kind or (kind == "tunnel") == bool(rule.tunnel_endpoint),
            src is None or addresses.address_matches(rule.source, cast(addresses.Endpoint, src),
                                                     inv.raw("srcmask"), S.SRCMASK),
            dst is None or addresses.address_matches(rule.destination, cast(addresses.Endpoint, dst),
                                                     inv.raw("dstmask"), S.DSTMASK),
            not inv.has("protocol") or rule.protocol == _int(inv, "protocol"),
            not inv.has("srcport") or rule.source_port == _int(inv, "srcport"),
            not inv.has("dstport") or rule.destination_port == _int(inv, "dstport"),
        )
        if all(checks):
            out.append((number, rule))
    return out


def show_mmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    state = ctx.client.dynamic_state()
    chosen = _select_named(list(state.mm_policies), inv, "main mode")
    if ctx.json:
        ctx.print_json(agent_pb.DynamicState(mm_policies=chosen))
        return
    ctx.say(mmpolicies_text(chosen, state))


def show_qmpolicy(ctx: DynamicContext, inv: Invocation) -> None:
    state = ctx.client.dynamic_state()
    chosen = _select_named(list(state.qm_policies), inv, "quick mode")
    if ctx.json:
        ctx.print_json(agent_pb.DynamicState(qm_policies=chosen))
        return
    ctx.say(qmpolicies_text(chosen, state))


def show_rule(ctx: DynamicContext, inv: Invocation) -> None:
    chosen = select_rules(ctx.client.dynamic_state(), inv)
    if ctx.json:
        ctx.print_json(agent_pb.DynamicState(rules=[rule for _, rule in chosen]))
        return
    ctx.say(rules_text(chosen, resolvedns=_flag(inv, "resolvedns")))


def dynamic_text(state: agent_pb.DynamicState, *, resolvedns: bool = False) -> str:
    """The whole dynamic-mode policy: main mode policies, quick mode policies, rules."""
    return "\n".join([
        mmpolicies_text(list(state.mm_policies), state),
        qmpolicies_text(list(state.qm_policies), state),
        rules_text(list(enumerate(state.rules, start=1)), resolvedns=resolvedns),
    ])


# ------------------------------------------------------------------ config


def config_text(values: agent_pb.AgentConfigValues) -> str:
    title = "IPsec configuration parameters"
    lines = [title, "-" * len(title)]
    width = max([len(v.name) for v in values.values] + [16])
    for v in values.values:
        text = v.value
        if v.pending:
            text += f"  (set to {v.pending}: takes effect when the agent restarts)"
        lines.append(f"{v.name.ljust(width)} : {text}")
    if not values.values:
        lines.append("(no properties)")
    return "\n".join(lines) + "\n"


def show_config(ctx: DynamicContext, inv: Invocation) -> None:
    values = ctx.client.config()
    if ctx.json:
        ctx.print_json(values)
        return
    ctx.say(config_text(values))


def set_config(ctx: DynamicContext, inv: Invocation) -> None:
    given, value = _str(inv, "property"), _str(inv, "value")
    try:
        known = [v.name for v in ctx.client.config().values]
    except CommandError:
        known = []
    # Property names may be abbreviated like tags; an unknown one goes to the agent, which lists the known ones.
    name = given.strip().lower()
    matches = [k for k in known if k.startswith(name)] if name not in known else [name]
    if len(matches) > 1:
        raise UsageError(f'ambiguous config property "{given}": could be {", ".join(sorted(matches))}')
    if matches:
        name = matches[0]
    values = ctx.client.set_config(name, value)
    if ctx.json:
        ctx.print_json(values)
        return
    now = next((v for v in values.values if v.name == name), None)
    if now is None:
        ctx.say(f"{name} set to {value}.")
    elif now.pending:
        ctx.say(
            f"{now.name} set to {now.pending}: it will take effect when the agent restarts "
            f"(in force until then: {now.value})."
        )
    elif now.applies_at_once:
        ctx.say(f"{now.name} set to {now.value}: in effect now.")
    else:
        ctx.say(f"{now.name} is {now.value}, the value in force: nothing waits for a restart.")


# ------------------------------------------------------------------ show all


def show_all(ctx: DynamicContext, inv: Invocation) -> None:
    client = ctx.client
    config, state, whole = client.config(), client.dynamic_state(), client.filters()
    sas, stats = client.security_associations(), client.statistics()
    resolvedns = _flag(inv, "resolvedns")
    if ctx.json:
        document = {
            "config": message_dict(config),
            "dynamic": message_dict(state),
            "filters": message_dict(whole),
            "security_associations": message_dict(sas),
            "statistics": message_dict(stats),
        }
        ctx.say(json.dumps(document, indent=2))
        return
    negotiate = [f for f in whole.filters if f.verdict == "negotiate"]
    auths = {p.name: p.auth for p in whole.policies}
    parts = [
        config_text(config),
        dynamic_text(state, resolvedns=resolvedns),
        mmfilter_text(negotiate, whole.policies, resolvedns=resolvedns),
        qmfilter_text(list(whole.filters), whole, resolvedns=resolvedns),
        mmsas_text(list(sas.main_mode), auths, table_format=False, resolvedns=resolvedns),
        qmsas_text(list(sas.quick_mode), table_format=False, resolvedns=resolvedns),
        stats_text(stats),
    ]
    ctx.say("\n".join(parts))


Handler = Callable[[DynamicContext, Invocation], None]

HANDLERS: dict[tuple[str, ...], Handler] = {
    ("show", "stats"): show_stats,
    ("show", "mmsas"): show_mmsas,
    ("show", "qmsas"): show_qmsas,
    ("show", "mmfilter"): show_mmfilter,
    ("show", "qmfilter"): show_qmfilter,
    ("show", "mmpolicy"): show_mmpolicy,
    ("show", "qmpolicy"): show_qmpolicy,
    ("show", "rule"): show_rule,
    ("add", "mmpolicy"): add_mmpolicy,
    ("set", "mmpolicy"): set_mmpolicy,
    ("delete", "mmpolicy"): delete_mmpolicy,
    ("add", "qmpolicy"): add_qmpolicy,
    ("set", "qmpolicy"): set_qmpolicy,
    ("delete", "qmpolicy"): delete_qmpolicy,
    ("add", "rule"): add_rule,
    ("set", "rule"): set_rule,
    ("delete", "rule"): delete_rule,
    ("delete", "all"): delete_all,
    ("show", "config"): show_config,
    ("set", "config"): set_config,
    ("show", "all"): show_all,
}
assert {c.words for c in DYNAMIC_COMMANDS if c not in NOT_YET} == set(HANDLERS)

__all__ = [
    "DEFAULT_SOCKET",
    "DYNAMIC_COMMANDS",
    "IPSEC_HELP",
    "SOCKET_ENV",
    "AgentApi",
    "AgentClient",
    "DynamicContext",
    "RelayClient",
    "agent_socket",
    "dynamic_text",
    "execute",
    "identity",
    "message_dict",
    "rule_identities",
    "split_computer",
    "stats_text",
    "when",
]
