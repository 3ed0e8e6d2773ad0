"""What `netsh ipsec dynamic show mmsas|qmsas|mmfilter|qmfilter` and the IP Security Monitor read:
charon's `list-sas` answer and the desired filter state, turned into the agent API's messages. Pure."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from policyagent.agent.enforce.desired import Desired, Exemption
from policyagent.pb import agent_pb


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _n(value: Any) -> int:
    try:
        return int(_s(value) or 0)
    except ValueError:
        return 0


def _list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [_s(v) for v in value]
    return [_s(value)] if value else []


def _alg(sa: Mapping[str, Any]) -> str:
    """"AES_CBC-128" from encr-alg and encr-keysize."""
    size = sa.get("encr-keysize")
    return _s(sa.get("encr-alg")) + (f"-{_s(size)}" if size else "")


def security_associations(
    list_sas: Iterable[Mapping[str, Any]], now: float | None = None
) -> agent_pb.SecurityAssociations:
    """VICI `list-sas` (one {name: ike} mapping per IKE_SA) → main mode and quick mode SAs."""
    now = time.time() if now is None else now
    out = agent_pb.SecurityAssociations()
    for item in list_sas:
        for name, ike in item.items():
            established = _n(ike.get("established"))
            out.main_mode.add(
                connection=_s(name),
                state=_s(ike.get("state")),
                local_address=_s(ike.get("local-host")),
                remote_address=_s(ike.get("remote-host")),
                local_id=_s(ike.get("local-id")),
                remote_id=_s(ike.get("remote-id")),
                encryption=_alg(ike),
                integrity=_s(ike.get("integ-alg")),
                dh_group=_s(ike.get("dh-group")),
                initiator_cookie=_s(ike.get("initiator-spi")),
                responder_cookie=_s(ike.get("responder-spi")),
                initiator=_s(ike.get("initiator")) == "yes",
                established_unix_ms=int((now - established) * 1000) if ike.get("established") else 0,
                reauth_in_s=_n(ike.get("reauth-time")),
                ike_version=_n(ike.get("version")),
            )
            for child in (ike.get("child-sas") or {}).values():
                mode = _s(child.get("mode"))
                encap = _s(child.get("encap")) == "yes"
                installed = _n(child.get("install-time"))
                out.quick_mode.add(
                    connection=_s(name),
                    child=_s(child.get("name")),
                    state=_s(child.get("state")),
                    mode=mode + ("-in-UDP" if encap and mode == "TUNNEL" else ""),
                    protocol=_s(child.get("protocol")),
                    encapsulated=encap,
                    local_address=_s(ike.get("local-host")),
                    remote_address=_s(ike.get("remote-host")),
                    local_ts=_list(child.get("local-ts")),
                    remote_ts=_list(child.get("remote-ts")),
                    encryption=_alg(child),
                    integrity=_s(child.get("integ-alg")),
                    pfs_group=_s(child.get("dh-group")),
                    spi_in=_s(child.get("spi-in")),
                    spi_out=_s(child.get("spi-out")),
                    bytes_in=_n(child.get("bytes-in")),
                    bytes_out=_n(child.get("bytes-out")),
                    packets_in=_n(child.get("packets-in")),
                    packets_out=_n(child.get("packets-out")),
                    installed_unix_ms=int((now - installed) * 1000) if child.get("install-time") else 0,
                    rekey_in_s=_n(child.get("rekey-time")),
                    expires_in_s=_n(child.get("life-time")),
                )
    return out


def _exemption_text(e: Exemption) -> str:
    proto = {0: "any", 6: "tcp", 17: "udp"}.get(e.proto, str(e.proto))
    where = f" with {e.addr}" if e.addr else ""
    port = f" port {e.port}" if e.port else ""
    return f"{e.reason}: {proto}{port}{where}"


def filters(desired: Desired, keys: Mapping[int, str], counters: Mapping[str, tuple[int, int]]) -> agent_pb.Filters:
    """The filters in force (most specific first) with their packet counters, and the negotiation policies.

    `keys` maps an entry's index to its key in the filter table; `counters` maps keys to (packets, bytes)."""
    out = agent_pb.Filters()
    for e in desired.entries:
        key = keys.get(e.index, "")
        packets, nbytes = counters.get(key, (0, 0))
        out.filters.add(
            key=key,
            label=e.label,
            verdict=e.verdict,
            source=list(e.selector.src),
            destination=list(e.selector.dst),
            protocol=e.selector.proto,
            source_port=e.selector.sport,
            destination_port=e.selector.dport,
            weight=e.weight,
            inbound_passthrough=e.inbound_passthrough,
            fallback_to_clear=e.fallback_to_clear,
            connection=e.connection,
            packets=packets,
            bytes=nbytes,
        )
    for c in desired.connections:
        children = c.body.get("children", {})
        esp: list[str] = []
        for child in children.values():
            esp += [p for p in child.get("esp_proposals", []) if p not in esp]
        out.policies.add(
            name=c.name,
            label=c.label,
            ike_proposals=list(c.body.get("proposals", [])),
            esp_proposals=esp,
            auth=str(c.body.get("local-1", {}).get("auth", "")),
            initiates=c.initiates,
            per_peer=c.template,
        )
    out.exemptions.extend(_exemption_text(e) for e in desired.exemptions)
    out.notes.extend(desired.notes)
    return out


__all__ = ["filters", "security_associations"]
