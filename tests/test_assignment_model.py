"""Group Policy precedence for IPsec policy assignment (policyagent.model.assignment), table-driven."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from policyagent.model.assignment import (
    Computer,
    Gpo,
    GpoLink,
    Group,
    LocalPolicy,
    OrgUnit,
    Outcome,
    Scope,
    Site,
    Topology,
    parse_dn,
    resolve,
    validate_computer,
)
from policyagent.model.errors import NotFoundError, ValidationError

CORP = "OU=Corp,DC=corp,DC=example"
SERVERS = "OU=Servers,OU=Corp,DC=corp,DC=example"
WEB = "OU=Web,OU=Servers,OU=Corp,DC=corp,DC=example"
DOMAIN = "corp.example"


def gid(n: int) -> str:
    return f"{{00000000-0000-0000-0000-{n:012d}}}"


def pid(name: str) -> str:
    return "P-" + name


@dataclass(frozen=True)
class L:
    """A link in a table row: GPO name (its policy is P-<name>, "-" = no policy), scope, options."""

    gpo: str
    scope: str
    order: int = 1
    enforced: bool = False
    enabled: bool = True


@dataclass(frozen=True)
class Case:
    name: str
    links: tuple[L, ...]
    expect: str | None  # the GPO whose policy wins, None = no policy
    block: tuple[str, ...] = ()  # OUs with block inheritance
    disabled_gpos: tuple[str, ...] = ()
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    ou: str = WEB
    site: str = "HQ"
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # GPO → security filter groups
    groups: tuple[str, ...] = ()  # the computer's groups


def topology_for(case: Case) -> Topology:
    names = sorted({lk.gpo for lk in case.links})
    gpos = {
        n: Gpo(
            gid(i + 1),
            n,
            enabled=n not in case.disabled_gpos,
            policy_id="" if n.startswith("-") else pid(n),
            security_filter=case.filters.get(n, ()),
        )
        for i, n in enumerate(names)
    }
    links = [
        GpoLink(gpos[lk.gpo].id, Scope.parse(lk.scope), lk.order, lk.enforced, lk.enabled) for lk in case.links
    ]
    ous = [OrgUnit(dn, block_inheritance=dn in case.block) for dn in (CORP, SERVERS, WEB)]
    computer = Computer("host1", "domain", DOMAIN, ou=case.ou, site=case.site, groups=frozenset(case.groups))
    groups = [Group("Web servers"), Group("DB servers"), Group("Kiosks")]
    return Topology.build([computer], ous, [Site("HQ"), Site("Branch")], groups, gpos.values(), links)


CASES = [
    Case("nothing linked", (), None),
    Case("one domain link", (L("D", f"domain:{DOMAIN}"),), "D"),
    Case("site < domain", (L("S", "site:HQ"), L("D", f"domain:{DOMAIN}")), "D"),
    Case("local < site", (L("Lo", "local"), L("S", "site:HQ")), "S"),
    Case("domain < OU", (L("D", f"domain:{DOMAIN}"), L("O", f"ou:{CORP}")), "O"),
    Case("parent OU < child OU", (L("Corp", f"ou:{CORP}"), L("Web", f"ou:{WEB}"), L("Srv", f"ou:{SERVERS}")), "Web"),
    Case(
        "link order 1 wins within a scope",
        (L("Second", f"ou:{WEB}", order=2), L("First", f"ou:{WEB}", order=1)),
        "First",
        outcomes={"Second": Outcome.OVERRIDDEN},
    ),
    Case(
        "block inheritance stops domain and parent OUs",
        (L("D", f"domain:{DOMAIN}"), L("Corp", f"ou:{CORP}")),
        None,
        block=(SERVERS,),
        outcomes={"D": Outcome.BLOCKED, "Corp": Outcome.BLOCKED},
    ),
    Case(
        "block inheritance keeps the blocking OU's own links",
        (L("D", f"domain:{DOMAIN}"), L("Srv", f"ou:{SERVERS}")),
        "Srv",
        block=(SERVERS,),
        outcomes={"D": Outcome.BLOCKED},
    ),
    Case("block inheritance does not stop local", (L("Lo", "local"), L("S", "site:HQ")), "Lo", block=(WEB,)),
    Case(
        "enforced beats block inheritance",
        (L("D", f"domain:{DOMAIN}", enforced=True), L("Web", f"ou:{WEB}")),
        "D",
        block=(WEB,),
        outcomes={"Web": Outcome.OVERRIDDEN},
    ),
    Case(
        "enforced beats a lower non-enforced link",
        (L("D", f"domain:{DOMAIN}", enforced=True), L("Web", f"ou:{WEB}")),
        "D",
    ),
    Case(
        "among enforced links the higher scope wins",
        (L("D", f"domain:{DOMAIN}", enforced=True), L("Web", f"ou:{WEB}", enforced=True)),
        "D",
        outcomes={"Web": Outcome.OVERRIDDEN},
    ),
    Case(
        "enforced site beats enforced domain",
        (L("D", f"domain:{DOMAIN}", enforced=True), L("S", "site:HQ", enforced=True)),
        "S",
    ),
    Case(
        "enforced: link order 1 wins within the scope",
        (L("A", f"ou:{CORP}", order=2, enforced=True), L("B", f"ou:{CORP}", order=1, enforced=True)),
        "B",
    ),
    Case(
        "disabled link skipped",
        (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}", enabled=False)),
        "D",
        outcomes={"Web": Outcome.LINK_DISABLED},
    ),
    Case(
        "disabled GPO skipped",
        (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}")),
        "D",
        disabled_gpos=("Web",),
        outcomes={"Web": Outcome.GPO_DISABLED},
    ),
    Case(
        "disabled enforced link does not win",
        (L("D", f"domain:{DOMAIN}", enforced=True, enabled=False), L("Web", f"ou:{WEB}")),
        "Web",
    ),
    Case(
        "a GPO without an IPsec policy does not take part",
        (L("D", f"domain:{DOMAIN}"), L("-none", f"ou:{WEB}")),
        "D",
        outcomes={"-none": Outcome.NO_POLICY},
    ),
    Case("other site's links do not apply", (L("B", "site:Branch"),), None),
    Case(
        "security filter: a filtered-out GPO lets a lower one win",
        (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}")),
        "D",
        filters={"Web": ("Web servers",)},
        groups=("Kiosks",),
        outcomes={"Web": Outcome.FILTERED},
    ),
    Case(
        "security filter: a member gets the GPO (group names case-insensitive)",
        (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}")),
        "Web",
        filters={"Web": ("Web servers",)},
        groups=("web SERVERS",),
        outcomes={"D": Outcome.OVERRIDDEN},
    ),
    Case(
        "security filter: one of several groups is enough",
        (L("Web", f"ou:{WEB}"),),
        "Web",
        filters={"Web": ("DB servers", "Web servers")},
        groups=("Web servers",),
    ),
    Case(
        "security filter: an enforced but filtered-out GPO does not apply",
        (L("D", f"domain:{DOMAIN}", enforced=True), L("Web", f"ou:{WEB}")),
        "Web",
        filters={"D": ("DB servers",)},
        outcomes={"D": Outcome.FILTERED},
    ),
    Case(
        "security filter: empty filter applies to everyone",
        (L("D", f"domain:{DOMAIN}"),),
        "D",
        filters={"D": ()},
    ),
    Case(
        "security filter: a blocked GPO is reported blocked, not filtered",
        (L("D", f"domain:{DOMAIN}"),),
        None,
        block=(WEB,),
        filters={"D": ("DB servers",)},
        outcomes={"D": Outcome.BLOCKED},
    ),
    Case("no OU: only site and domain", (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}")), "D", ou=""),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_precedence(case: Case) -> None:
    topology = topology_for(case)
    result = resolve(topology, "host1")
    assert result.policy_id == (pid(case.expect) if case.expect else "")
    assert result.source == ("domain" if case.expect else "none")
    by_name = {s.gpo_name: s for s in result.steps}
    # Every link that reaches the computer is explained, and only those.
    chain = {f"ou:{a}" for a in parse_dn(case.ou).ancestors()} if case.ou else set()
    reaching = {"local", f"site:{case.site}", f"domain:{DOMAIN}", *chain}
    assert set(by_name) == {lk.gpo for lk in case.links if str(Scope.parse(lk.scope)) in reaching}
    applied = [s for s in result.steps if s.outcome is Outcome.APPLIED]
    assert len(applied) == (1 if case.expect else 0)  # exactly one IPsec policy in force
    if case.expect:
        assert applied[0].gpo_name == case.expect
        assert result.steps[0].outcome is not Outcome.OVERRIDDEN
    for gpo, outcome in case.outcomes.items():
        assert by_name[gpo].outcome is outcome, by_name[gpo]


def test_steps_explain_what_was_overridden_and_blocked() -> None:
    case = Case(
        "explain",
        (L("D", f"domain:{DOMAIN}"), L("Corp", f"ou:{CORP}"), L("Web", f"ou:{WEB}"), L("Srv", f"ou:{SERVERS}")),
        "Web",
        block=(SERVERS,),
    )
    result = resolve(topology_for(case), "host1", policy_names={pid(n): n + " policy" for n in ("D", "Corp", "Web", "Srv")})
    reasons = [(s.gpo_name, s.scope, s.reason) for s in result.steps]
    assert reasons == [
        ("Web", f"ou:{WEB}", "applied"),
        ("Srv", f"ou:{SERVERS}", 'overridden by GPO "Web" (ou:' + WEB + ")"),
        ("Corp", f"ou:{CORP}", f"blocked by inheritance at ou:{SERVERS}"),
        ("D", f"domain:{DOMAIN}", f"blocked by inheritance at ou:{SERVERS}"),
    ]
    assert result.steps[0].policy_name == "Web policy"


def test_missing_policy_is_skipped_when_names_are_known() -> None:
    case = Case("missing", (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}")), "Web")
    result = resolve(topology_for(case), "host1", policy_names={pid("D"): "D"})
    assert result.policy_id == pid("D")
    assert result.steps[0].outcome is Outcome.MISSING_POLICY


def test_domain_assignment_overrides_local_store() -> None:
    local = LocalPolicy("P-local", "Local policy")
    empty = resolve(topology_for(Case("x", (), None)), "host1", local_policy=local)
    assert (empty.policy_id, empty.source) == ("P-local", "local")
    assigned = resolve(topology_for(Case("x", (L("D", f"domain:{DOMAIN}"),), "D")), "host1", local_policy=local)
    assert (assigned.policy_id, assigned.source) == (pid("D"), "domain")
    assert assigned.steps[-1].gpo_name == "local store"
    assert assigned.steps[-1].outcome is Outcome.OVERRIDDEN


def test_planning_mode_moves_the_computer() -> None:
    case = Case("plan", (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}"), L("B", "site:Branch")), "Web")
    topology = topology_for(case)
    assert resolve(topology.with_computer_in("host1", ou=CORP), "host1").policy_id == pid("D")
    branch = topology.with_computer_in("host1", ou="", site="Branch")
    assert resolve(branch, "host1").policy_id == pid("D")
    assert resolve(topology, "host1").policy_id == pid("Web")  # the original is untouched
    with pytest.raises(NotFoundError, match="no OU"):
        topology.with_computer_in("host1", ou="OU=Nope,DC=corp,DC=example")
    with pytest.raises(NotFoundError, match="no site"):
        topology.with_computer_in("host1", site="Mars")


def test_workgroup_machine_in_a_registry_ou_gets_that_domain() -> None:
    gpo = Gpo(gid(1), "D", policy_id="P-D")
    topology = Topology.build(
        [Computer("wg1", "workgroup", "WORKGROUP", ou=CORP), Computer("wg2", "workgroup", "WORKGROUP")],
        [OrgUnit(CORP)],
        gpos=[gpo],
        links=[GpoLink(gpo.id, Scope.domain(DOMAIN))],
    )
    assert resolve(topology, "wg1").policy_id == "P-D"
    assert resolve(topology, "wg2").policy_id == ""


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "ou"),
        ("CN=Computers,DC=corp,DC=example", "ou"),
        ("OU=Servers", "ou"),
        ("DC=corp,OU=Servers", "ou"),
        ("OU=Se\\,rvers,DC=corp", "ou"),
        ("OU=Servers,DC=-bad", "ou"),
    ],
)
def test_bad_dns_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_dn(text)
    assert info.value.violations[0].field == field


def test_dn_canonical_form() -> None:
    dn = parse_dn(" ou=Web , OU=Servers,dc=Corp,DC=Example ")
    assert str(dn) == "OU=Web,OU=Servers,DC=corp,DC=example"
    assert dn.domain == "corp.example"
    assert [str(a) for a in dn.ancestors()] == ["OU=Servers,DC=corp,DC=example", "OU=Web,OU=Servers,DC=corp,DC=example"]


@pytest.mark.parametrize(
    ("computer", "field"),
    [
        (Computer("", "domain", DOMAIN), "name"),
        (Computer("bad name", "domain", DOMAIN), "name"),
        (Computer("h", "domain", ""), "domain"),
        (Computer("h", "domain", "not a domain"), "domain"),
        (Computer("h", "member", DOMAIN), "membership"),  # type: ignore[arg-type]
        (Computer("h", "domain", "other.example", ou=CORP), "ou"),
    ],
)
def test_computer_validation_names_the_field(computer: Computer, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_computer(computer)
    assert info.value.violations[0].field == field


def test_scope_parse() -> None:
    assert str(Scope.parse("LOCAL")) == "local"
    assert str(Scope.parse("Domain:Corp.Example")) == "domain:corp.example"
    assert str(Scope.parse("ou:ou=a,dc=x")) == "ou:OU=a,DC=x"
    with pytest.raises(ValidationError, match="not a scope"):
        Scope.parse("forest:x")


def test_security_filtering_step_names_the_groups() -> None:
    case = Case(
        "filter",
        (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}")),
        "D",
        filters={"Web": ("Web servers", "DB servers")},
    )
    result = resolve(topology_for(case), "host1")
    step = result.steps[0]
    assert (step.gpo_name, step.outcome) == ("Web", Outcome.FILTERED)
    assert step.reason == 'skipped by security filtering: the computer is in none of the groups "Web servers", "DB servers"'
    assert result.steps[1].reason == "applied"


def test_planning_an_unregistered_computer() -> None:
    case = Case(
        "plan-new",
        (L("D", f"domain:{DOMAIN}"), L("Web", f"ou:{WEB}"), L("S", "site:Branch")),
        "Web",
        filters={"Web": ("Web servers",)},
    )
    topology = topology_for(case)
    # Not registered, no OU or domain: refused, as before.
    with pytest.raises(NotFoundError, match="planning OU or domain"):
        topology.with_computer_in("new1")
    # A hypothetical domain member of the OU's domain, in the planned groups.
    planned = topology.with_computer_in("NEW1", ou=WEB, site="Branch", groups=["web servers"])
    computer = planned.computer("new1")
    assert computer is not None
    assert (computer.membership, computer.domain, computer.ou, computer.site) == ("domain", DOMAIN, WEB, "Branch")
    assert computer.groups == frozenset({"Web servers"})  # the registry's spelling
    assert resolve(planned, "new1").policy_id == pid("Web")
    # Without the group the filtered GPO is skipped; the domain one wins.
    assert resolve(topology.with_computer_in("new1", ou=WEB), "new1").policy_id == pid("D")
    # By domain only: site and domain links.
    by_domain = topology.with_computer_in("new2", domain=DOMAIN, site="HQ")
    assert resolve(by_domain, "new2").policy_id == pid("D")
    assert topology.computer("new1") is None  # the original is untouched
    with pytest.raises(NotFoundError, match='no group "Nope"'):
        topology.with_computer_in("new1", ou=WEB, groups=["Nope"])
    with pytest.raises(ValidationError) as info:
        topology.with_computer_in("new1", ou=WEB, domain="other.example")
    assert info.value.violations[0].field == "ou"
    with pytest.raises(ValidationError) as info:
        topology.with_computer_in("host1", domain="other.example")  # registered: keeps its domain
    assert info.value.violations[0].field == "planning_domain"
