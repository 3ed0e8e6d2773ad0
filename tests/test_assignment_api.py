"""AssignmentAdmin over loopback mTLS gRPC, and the `policyagent ou|site|computer|gpo|rsop` commands."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, InProcessServer, admin_channel

from clients.netsh.main import main as netsh_main
from policyagent.cli import main
from policyagent.pb import admin_grpc, admin_pb, assign_grpc, assign_pb

CORP = "OU=Corp,DC=corp,DC=example"
WEB = "OU=Web,OU=Corp,DC=corp,DC=example"
SECURE = "Secure Server (Require Security)"
REQUEST = "Server (Request Security)"


def run(server: InProcessServer, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "-r", server.address])
    out, err = capsys.readouterr()
    return code, out, err


def ok(server: InProcessServer, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(server, capsys, *argv)
    assert code == 0, err
    return out


def test_cli_registry_gpos_links_and_rsop(
    inproc_server: Callable[..., InProcessServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = inproc_server()
    changes: list[frozenset[str]] = []
    server.server.effective.subscribe(changes.append)

    ok(server, capsys, "ou", "add", CORP)
    ok(server, capsys, "ou", "add", "ou=Web, ou=Corp, dc=corp, dc=example")
    ok(server, capsys, "site", "add", "HQ")
    ok(server, capsys, "computer", "add", "web1", "--domain", "corp.example", "--ou", WEB, "--site", "HQ")
    ok(server, capsys, "computer", "add", "web2", "--domain", "corp.example", "--ou", WEB)
    ok(server, capsys, "computer", "add", "kiosk", "--workgroup")
    assert "web1" in ok(server, capsys, "computer", "list", "--ou", WEB)

    # A wrong policy name refuses the whole command: no GPO is left behind that assigns nothing.
    code, _, err = run(server, capsys, "gpo", "add", "Broken", "--policy", "No Such Policy")
    assert code != 0 and "No Such Policy" in err
    assert "Broken" not in ok(server, capsys, "gpo", "list")
    ok(server, capsys, "gpo", "add", "Default Domain", "--policy", REQUEST)
    assert REQUEST in ok(server, capsys, "gpo", "list")
    out = ok(server, capsys, "gpo", "link", "Default Domain", "domain:corp.example")
    assert "changed on 2 computer(s): web1, web2" in out
    ok(server, capsys, "gpo", "add", "Web servers", "--policy", SECURE)
    assert "changed on 2" in ok(server, capsys, "gpo", "link", "Web servers", f"ou:{WEB}")

    report = ok(server, capsys, "rsop", "web1")
    assert f'IPsec policy in force: "{SECURE}"' in report
    assert f'from GPO "Web servers" linked at ou:{WEB} (link order 1)' in report
    assert 'overridden by GPO "Web servers"' in report

    # Enforced domain link wins; planning mode moves nothing.
    ok(server, capsys, "gpo", "link", "Default Domain", "domain:corp.example", "--enforced")
    assert f'in force: "{REQUEST}"' in ok(server, capsys, "rsop", "web1")
    ok(server, capsys, "gpo", "link", "Default Domain", "domain:corp.example", "--not-enforced")
    ok(server, capsys, "ou", "set", WEB, "--block-inheritance", "yes")
    planned = ok(server, capsys, "rsop", "web1", "--planning-ou", CORP)
    assert "RSoP planning" in planned and f'in force: "{REQUEST}"' in planned
    assert f'in force: "{SECURE}"' in ok(server, capsys, "rsop", "web1")
    assert "no GPO that reaches this computer" in ok(server, capsys, "rsop", "kiosk")

    assert netsh_main(["-r", server.address, "ipsec", "static", "show", "gpoassignedpolicy", "name=web servers"]) == 0
    shown = capsys.readouterr().out
    assert f"Assigned Policy Name   : {SECURE}" in shown and f"ou:{WEB} (order 1)" in shown
    assert netsh_main(["-r", server.address, "ipsec", "static", "show", "gpoassignedpolicy"]) == 0
    assert "Default Domain" in capsys.readouterr().out

    show = ok(server, capsys, "computer", "show", "WEB1")
    assert "OU:          " + WEB in show and SECURE in show
    listing = ok(server, capsys, "gpo", "list")
    assert "Web servers" in listing and f"ou:{WEB}" in listing

    # The effective policy the hub pushes agrees with the RSoP.
    effective = server.server.effective.get("web1")
    assert effective.policy.name == SECURE and effective.source == "domain"
    assert any("web1" in c for c in changes)

    # Errors are one line naming the field; nothing half-done.
    code, _, err = run(server, capsys, "computer", "add", "web3", "--domain", "corp.example", "--site", "Mars")
    assert code == 2 and 'site: there is no site "Mars"' in err
    code, _, err = run(server, capsys, "gpo", "unlink", "Web servers", "site:HQ")
    assert code == 2 and "does not exist" in err
    code, _, err = run(server, capsys, "ou", "delete", CORP)
    assert code == 2 and "holds 1 OU(s)" in err

    ok(server, capsys, "gpo", "unlink", "Web servers", f"ou:{WEB}")
    assert f'in force: "{REQUEST}"' not in ok(server, capsys, "rsop", "web1")  # blocked at Web now
    ok(server, capsys, "computer", "move", "web1", "--no-ou")
    assert f'in force: "{REQUEST}"' in ok(server, capsys, "rsop", "web1")


def test_api_validation_and_assigned_policy_delete(inproc_server: Callable[..., InProcessServer]) -> None:
    server = inproc_server()
    channel = admin_channel(server.address)
    stub = assign_grpc.AssignmentAdminStub(channel)
    admin = admin_grpc.PolicyAdminStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Apply(
                assign_pb.TopologyApplyRequest(
                    mutations=[
                        assign_pb.TopologyMutation(
                            put_gpo=assign_pb.Gpo(name="G", policy_id="{00000000-0000-0000-0000-000000000001}")
                        )
                    ]
                ),
                timeout=RPC_TIMEOUT_S,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no IPsec policy" in (info.value.details() or "")

        policy = admin.GetPolicy(admin_pb.GetObjectRequest(name=SECURE), timeout=RPC_TIMEOUT_S)
        stub.Apply(
            assign_pb.TopologyApplyRequest(mutations=[assign_pb.TopologyMutation(put_gpo=assign_pb.Gpo(name="G"))]),
            timeout=RPC_TIMEOUT_S,
        )
        gpo = stub.SetGpoPolicy(assign_pb.SetGpoPolicyRequest(gpo="g", policy=SECURE), timeout=RPC_TIMEOUT_S)
        assert (gpo.policy_id, gpo.policy_name) == (policy.id, SECURE)
        delete = admin_pb.Mutation(delete=admin_pb.ObjectRef(kind=admin_pb.OBJECT_KIND_POLICY, id=policy.id))
        with pytest.raises(grpc.RpcError) as info:
            admin.Apply(admin_pb.ApplyRequest(mutations=[delete]), timeout=RPC_TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert 'assigned by GPO "G"' in (info.value.details() or "")
        changes = stub.ListTopologyChanges(assign_pb.ListTopologyChangesRequest(), timeout=RPC_TIMEOUT_S).changes
        assert [(c.operation, c.kind) for c in changes] == [("create", "gpo"), ("update", "gpo")]
        with pytest.raises(grpc.RpcError) as info:
            stub.GetRsop(assign_pb.RsopRequest(computer="nobody"), timeout=RPC_TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()


def test_cli_security_filtering_and_planning_an_unregistered_computer(
    inproc_server: Callable[..., InProcessServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = inproc_server()
    ok(server, capsys, "ou", "add", CORP)
    ok(server, capsys, "ou", "add", WEB)
    ok(server, capsys, "site", "add", "HQ")
    ok(server, capsys, "group", "add", "Web servers")
    ok(server, capsys, "group", "add", "DB servers")
    ok(server, capsys, "computer", "add", "web1", "--domain", "corp.example", "--ou", WEB, "--group", "Web servers")
    ok(server, capsys, "computer", "add", "web2", "--domain", "corp.example", "--ou", WEB)
    ok(server, capsys, "gpo", "add", "Default Domain", "--policy", REQUEST)
    ok(server, capsys, "gpo", "link", "Default Domain", "domain:corp.example")

    # A filter naming an unknown group is refused, naming the field.
    code, _, err = run(server, capsys, "gpo", "add", "Web", "--policy", SECURE, "--filter-group", "Nope")
    assert code == 2 and 'security_filter: there is no group "Nope"' in err
    ok(server, capsys, "gpo", "add", "Web", "--policy", SECURE, "--filter-group", "web servers")
    # Both change: web1 gets the GPO, web2's RSoP gains the "filtered" step.
    assert "changed on 2 computer(s): web1, web2" in ok(server, capsys, "gpo", "link", "Web", f"ou:{WEB}")
    assert "Web servers" in ok(server, capsys, "gpo", "list")
    assert f'in force: "{SECURE}"' in ok(server, capsys, "rsop", "web1")
    report = ok(server, capsys, "rsop", "web2")
    assert f'in force: "{REQUEST}"' in report
    assert 'skipped by security filtering: the computer is in none of the groups "Web servers"' in report

    # The group is in use by the filter; --filter-group replaces it, --no-filter clears it.
    out = ok(server, capsys, "gpo", "set", "Web", "--filter-group", "DB servers", "--filter-group", "Web servers")
    assert "changed on 1 computer(s): web2" in out  # web1 still applies it; web2's step names both groups
    assert "changed on 2 computer(s)" in ok(server, capsys, "gpo", "set", "Web", "--filter-group", "DB servers")
    code, _, err = run(server, capsys, "group", "delete", "DB servers")  # no members, but in the filter
    assert code != 0 and 'security filter of GPO "Web"' in err
    assert "changed on 2 computer(s)" in ok(server, capsys, "gpo", "set", "Web", "--no-filter")
    assert f'in force: "{SECURE}"' in ok(server, capsys, "rsop", "web2")
    ok(server, capsys, "gpo", "set", "Web", "--filter-group", "Web servers")

    # Planning a computer that is not in the registry.
    code, _, err = run(server, capsys, "rsop", "new1")
    assert code != 0 and "planning OU or domain" in err
    planned = ok(server, capsys, "rsop", "new1", "--planning-ou", WEB, "--planning-group", "Web servers")
    assert "PLANNING RESULT FOR AN UNREGISTERED COMPUTER" in planned
    assert f'in force: "{SECURE}"' in planned and "Groups:       Web servers" in planned
    assert "Membership:   domain (corp.example)" in planned
    planned = ok(server, capsys, "rsop", "new1", "--planning-domain", "corp.example", "--planning-site", "HQ")
    assert "UNREGISTERED" in planned and f'in force: "{REQUEST}"' in planned
    code, _, err = run(server, capsys, "rsop", "new1", "--planning-ou", WEB, "--planning-group", "Nope")
    assert code != 0 and 'no group "Nope"' in err
    # A registered computer's planning report does not say so.
    assert "UNREGISTERED" not in ok(server, capsys, "rsop", "web2", "--planning-group", "Web servers")
    assert "new1" not in ok(server, capsys, "computer", "list")
    as_json = ok(server, capsys, "rsop", "new1", "--planning-ou", WEB, "--json")
    assert '"unregistered": true' in as_json and '"planning": true' in as_json
