"""Builders of valid policy objects for tests.

Each returns a fresh protobuf message that passes policyagent.model.validate
(with the filter lists and filter actions its rules name present in the store),
with settings a Windows administrator would recognise: 3DES/SHA1 methods,
MODP-1024 main mode, Kerberos authentication, the default lifetimes.
Keyword arguments change what a test cares about; everything else stays valid.
"""

from __future__ import annotations

from collections.abc import Iterable

from policyagent.model.objects import StoreObject
from policyagent.pb import pb


def me_any_filter(*, protocol: int = 0, destination_port: int = 0, mirrored: bool = True) -> pb.Filter:
    """My address → any address, mirrored (optionally one protocol/port)."""
    return pb.Filter(
        mirrored=mirrored,
        source=pb.Address(kind=pb.ADDRESS_KIND_ME),
        destination=pb.Address(kind=pb.ADDRESS_KIND_ANY),
        protocol=protocol,
        destination_port=destination_port,
    )


def host_filter(index: int, *, mirrored: bool = True) -> pb.Filter:
    """Me → one IPv4 host; `index` picks a distinct host (up to 16 million), so filters never repeat."""
    ip = f"10.{(index >> 16) & 0xFF}.{(index >> 8) & 0xFF}.{index & 0xFF}"
    return pb.Filter(
        mirrored=mirrored,
        source=pb.Address(kind=pb.ADDRESS_KIND_ME),
        destination=pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=ip),
    )


def filter_list(
    name: str = "All IP Traffic",
    *,
    filters: Iterable[pb.Filter] | None = None,
    description: str = "",
) -> pb.FilterList:
    """A filter list; by default one mirrored me → any filter."""
    return pb.FilterList(
        name=name,
        description=description,
        filters=list(filters) if filters is not None else [me_any_filter()],
    )


def big_filter_list(name: str, count: int) -> pb.FilterList:
    """A filter list of `count` distinct me → host filters."""
    return filter_list(name, filters=(host_filter(i) for i in range(count)))


def qm_method() -> pb.QuickModeMethod:
    """ESP 3DES/SHA1 with the default lifetimes (100,000 KB / 3600 s)."""
    return pb.QuickModeMethod(
        esp=pb.EspTransform(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1),
        lifetime_kb=100000,
        lifetime_seconds=3600,
    )


def filter_action(
    name: str = "Require Security",
    *,
    action: pb.ActionType.ValueType = pb.ACTION_TYPE_NEGOTIATE,
    description: str = "",
) -> pb.FilterAction:
    """A filter action; negotiate (with one quick-mode method) unless told otherwise."""
    fa = pb.FilterAction(name=name, description=description, action=action)
    if action == pb.ACTION_TYPE_NEGOTIATE:
        fa.methods.append(qm_method())
    return fa


def kerberos() -> pb.AuthMethod:
    return pb.AuthMethod(kerberos=pb.KerberosAuth())


def isakmp() -> pb.IsakmpSettings:
    """One main-mode method 3DES/SHA1/MODP-1024, master key lifetime 480 minutes."""
    return pb.IsakmpSettings(
        methods=[
            pb.MainModeMethod(encryption=pb.CIPHER_3DES, integrity=pb.INTEGRITY_SHA1, dh_group=pb.DH_GROUP_MODP1024)
        ],
        lifetime_minutes=480,
    )


def default_response_rule(*, active: bool = True) -> pb.DefaultResponseRule:
    return pb.DefaultResponseRule(active=active, methods=[qm_method()], auth_methods=[kerberos()])


def rule(
    filter_list_id: str,
    filter_action_id: str,
    *,
    name: str = "rule",
    active: bool = True,
) -> pb.Rule:
    """A transport-mode rule for all connection types, authenticated by Kerberos."""
    return pb.Rule(
        name=name,
        filter_list_id=filter_list_id,
        filter_action_id=filter_action_id,
        auth_methods=[kerberos()],
        connection_type=pb.CONNECTION_TYPE_ALL,
        active=active,
    )


def policy(
    name: str = "Secure Server",
    *,
    rules: Iterable[pb.Rule] = (),
    assigned: bool = False,
    description: str = "",
) -> pb.Policy:
    """A policy with the given rules, a default response rule and ISAKMP settings; polled every 180 min."""
    return pb.Policy(
        name=name,
        description=description,
        polling_interval_minutes=180,
        isakmp=isakmp(),
        rules=list(rules),
        default_response_rule=default_response_rule(),
        assigned=assigned,
    )


def policy_using(
    name: str,
    fl: StoreObject,
    fa: StoreObject,
    *,
    rules: int = 1,
    assigned: bool = False,
) -> pb.Policy:
    """A policy whose `rules` rules ("rule 1", "rule 2", …) all use the stored filter list `fl` and action `fa`."""
    return policy(
        name,
        rules=[rule(fl.id, fa.id, name=f"rule {i}") for i in range(1, rules + 1)],
        assigned=assigned,
    )
