"""New objects as netsh creates them, with the setting table's defaults.

Shared by the commands (add policy) and the dump, which must know what `add policy`
creates to tell whether a default response rule needs a `set defaultrule`.
"""

from __future__ import annotations

from typing import cast

from policyagent.model import defaults
from policyagent.model import settings as S
from policyagent.pb import pb


def default_of(setting: S.Setting) -> object:
    """A setting's default as a typed value, parsed from the table like any argument."""
    assert setting.default is not None, f"{setting.name} has no default"
    return setting.parse(setting.default)


def kerberos() -> pb.AuthMethod:
    return pb.AuthMethod(kerberos=pb.KerberosAuth())


def default_response_methods() -> list[pb.QuickModeMethod]:
    """The security methods of the defaults' default response rules (ESP 3DES/DES × SHA1/MD5, AH SHA1/MD5)."""
    for policy in defaults.default_contents().policies:
        if policy.HasField("default_response_rule") and policy.default_response_rule.methods:
            return list(policy.default_response_rule.methods)
    raise RuntimeError("the default policies carry no default response rule methods")


def new_policy(name: str) -> pb.Policy:
    """A policy with the table's defaults and a default response rule like the defaults' ones."""
    policy = pb.Policy(name=name, polling_interval_minutes=cast(int, default_of(S.POLLINGINTERVAL)))
    policy.isakmp.methods.extend(cast(list[pb.MainModeMethod], default_of(S.MMSECMETHODS)))
    policy.isakmp.lifetime_minutes = cast(int, default_of(S.MMLIFETIME))
    policy.isakmp.qm_per_mm = cast(int, default_of(S.QMPERMM))
    policy.isakmp.master_key_pfs = cast(bool, default_of(S.MMPFS))
    rule = policy.default_response_rule
    rule.active = cast(bool, default_of(S.ACTIVATEDEFAULTRULE))
    rule.methods.extend(default_response_methods())
    rule.auth_methods.append(kerberos())
    policy.assigned = cast(bool, default_of(S.ASSIGN))
    return policy
