"""Helpers for enforcement tests: the Windows default policies as effective policies, optionally with
their Kerberos authentication swapped for a pre-shared key."""

from __future__ import annotations

import json

from google.protobuf import json_format

from policyagent.model.defaults import defaults_dir
from policyagent.pb import dist_pb, pb

CLIENT = "Client (Respond Only)"
SERVER = "Server (Request Security)"
SECURE = "Secure Server (Require Security)"


def default_contents() -> pb.StoreContents:
    export = json.loads((defaults_dir() / "windows-defaults.json").read_text())
    return json_format.ParseDict(export["contents"], pb.StoreContents())


def with_psk(methods: list[pb.AuthMethod] | object, key: str) -> list[pb.AuthMethod]:
    return [pb.AuthMethod(preshared_key=pb.PresharedKeyAuth(key=key))]


def effective(name: str, psk: str | None = None, computer: str = "host", membership: str = "domain") -> dist_pb.EffectivePolicy:
    """The default policy `name` as the server would push it (Kerberos replaced by `psk` when given)."""
    contents = default_contents()
    policy = next(p for p in contents.policies if p.name == name)
    if psk is not None:
        for rule in policy.rules:
            del rule.auth_methods[:]
            rule.auth_methods.extend(with_psk(rule.auth_methods, psk))
        del policy.default_response_rule.auth_methods[:]
        policy.default_response_rule.auth_methods.extend(with_psk([], psk))
    used_lists = {r.filter_list_id for r in policy.rules}
    used_actions = {r.filter_action_id for r in policy.rules}
    out = dist_pb.EffectivePolicy(computer=computer, membership=membership, source="domain", version=f"v-{name}")
    out.policy.CopyFrom(policy)
    out.filter_lists.extend(fl for fl in contents.filter_lists if fl.id in used_lists)
    out.filter_actions.extend(fa for fa in contents.filter_actions if fa.id in used_actions)
    return out
