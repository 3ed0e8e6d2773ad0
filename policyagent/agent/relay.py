"""Relayed calls: an admin's AgentLocal call that reaches this agent through the policy server.

The server (AgentRelay.Call, policyagent/server/hub.py) sends a `RelayCall` on the agent's
distribution stream: a method name and its serialized request. The agent runs the method of its
own `AgentLocalServicer` in process, as if the call had come over its unix socket, and answers
with a `RelayResult`: the serialized response, or the gRPC status code and details the servicer
aborted with. Only the methods in `RELAY_METHODS` are relayed (the server checks too); any other
is refused with PERMISSION_DENIED.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import aio

from policyagent.pb import agent_pb, dist_pb

_log = logging.getLogger("policyagent.agent.relay")

# AgentLocal methods an admin may call through the server, with their request messages.
# GetEffectivePolicy is not among them: it can return the pre-shared keys in clear.
RELAY_METHODS: dict[str, type[Message]] = {
    "GetStatus": agent_pb.LocalStatusRequest,
    "GetStatistics": agent_pb.StatisticsRequest,
    "ListAuditEvents": agent_pb.AuditEventsRequest,
    "ListSecurityAssociations": agent_pb.SecurityAssociationsRequest,
    "ListFilters": agent_pb.FiltersRequest,
    "GetConfig": agent_pb.ConfigRequest,
    "SetConfig": agent_pb.SetConfigRequest,
    "GetDynamic": agent_pb.DynamicRequest,
    "EditDynamic": agent_pb.DynamicEdit,
}

# The stream extension an agent announces in its Hello (Hello.protocol_features) when it answers RelayCall.
RELAY_FEATURE = "relay"

NOT_RELAYED = "{!r} is not an AgentLocal method the server may relay (relayed: {})"


def not_relayed(method: str) -> str:
    return NOT_RELAYED.format(method, ", ".join(RELAY_METHODS))


class RelayAbort(Exception):
    """Raised by `RelayContext.abort`: the servicer refused the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RelayContext:
    """The part of a grpc.aio ServicerContext AgentLocalServicer's methods use: abort() and peer()."""

    def __init__(self, admin: str = "") -> None:
        self.admin = admin

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        raise RelayAbort(code, details)

    def peer(self) -> str:
        return "relay:policy-server"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float | None:
        return None


def _code_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def _failure(call: dist_pb.RelayCall, code: grpc.StatusCode, details: str) -> dist_pb.RelayResult:
    return dist_pb.RelayResult(id=call.id, code=_code_number(code), details=details)


async def dispatch(servicer: Any, call: dist_pb.RelayCall) -> dist_pb.RelayResult:
    """Run one relayed call on `servicer` (an AgentLocalServicer); never raises (but CancelledError)."""
    request_type = RELAY_METHODS.get(call.method)
    if request_type is None:
        return _failure(call, grpc.StatusCode.PERMISSION_DENIED, not_relayed(call.method))
    try:
        request = request_type.FromString(call.request)
    except DecodeError:
        return _failure(call, grpc.StatusCode.INVALID_ARGUMENT, f"the request for {call.method} is not a valid message")
    _log.info("relayed call", extra={"method": call.method, "admin": call.admin})
    context = cast(aio.ServicerContext[Any, Any], RelayContext(call.admin))
    try:
        response: Message = await getattr(servicer, call.method)(request, context)
    except RelayAbort as exc:
        return _failure(call, exc.code, exc.details)
    except Exception as exc:  # a bug must still answer, not leave the admin waiting for the timeout
        _log.exception("relayed call failed", extra={"method": call.method})
        return _failure(call, grpc.StatusCode.INTERNAL, f"internal error in the agent: {type(exc).__name__}")
    return dist_pb.RelayResult(id=call.id, response=response.SerializeToString())


__all__ = ["RELAY_FEATURE", "RELAY_METHODS", "RelayAbort", "RelayContext", "dispatch", "not_relayed"]
