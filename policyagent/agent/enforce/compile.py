"""compile(): effective policy + host facts + platform → the desired strongSwan and filter state.

Pure: no I/O, no clock. The mapping follows DESIGN §5:

- every active rule's filters become `FilterEntry`s (a mirrored filter gives two), sorted most
  specific first whatever the rule order (Windows' filter weights: longer address prefixes, then a
  protocol, then ports; ties go Block > Permit > Negotiate, then rule order);
- a Negotiate rule becomes one strongSwan connection whose children carry its filters' traffic
  selectors and its filter action's security methods; a rule whose filters name no single peer (e.g.
  "My IP Address ↔ Any") is a *template*, instantiated per peer when traffic to that peer needs
  protection (`instantiate`);
- the default response rule becomes a responder-only connection (it never initiates);
- IKE, NAT-T and the traffic to the policy server are exempted from every filter.

What this host cannot enforce is reported in `Desired.problems` (the agent NACKs with them), never
silently dropped; how something was mapped differently from Windows is in `Desired.notes`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from policyagent.agent.enforce.desired import (
    BLOCK,
    NEGOTIATE,
    PERMIT,
    Connection,
    Desired,
    Exemption,
    FilterEntry,
    Secret,
    Selector,
    content_hash,
)
from policyagent.pb import dist_pb, pb

LIBIPSEC = "kernel-libipsec"
NETLINK = "kernel-netlink"
IKE_PORTS = (500, 4500)
KEYING_PORT = 4501  # the agents' Kerberos keying exchange (policyagent.agent.enforce.kerbkey)
DEFAULT_RESPONSE = "default-response"  # the responder-only connection of the default response rule
DEFAULT_QM_LIFETIME_S = 3600
DEFAULT_QM_LIFETIME_KB = 100_000
DEFAULT_MM_LIFETIME_MIN = 480

_CIPHERS = {
    pb.CIPHER_NONE: "null",
    pb.CIPHER_DES: "des",
    pb.CIPHER_3DES: "3des",
    pb.CIPHER_AES128: "aes128",
    pb.CIPHER_AES192: "aes192",
    pb.CIPHER_AES256: "aes256",
}
_INTEGRITY = {
    pb.INTEGRITY_MD5: "md5",
    pb.INTEGRITY_SHA1: "sha1",
    pb.INTEGRITY_SHA256: "sha256",
    pb.INTEGRITY_SHA384: "sha384",
    pb.INTEGRITY_SHA512: "sha512",
}
_PRF = {
    pb.INTEGRITY_MD5: "prfmd5",
    pb.INTEGRITY_SHA1: "prfsha1",
    pb.INTEGRITY_SHA256: "prfsha256",
    pb.INTEGRITY_SHA384: "prfsha384",
    pb.INTEGRITY_SHA512: "prfsha512",
}
_DH = {
    pb.DH_GROUP_MODP768: "modp768",
    pb.DH_GROUP_MODP1024: "modp1024",
    pb.DH_GROUP_MODP2048: "modp2048",
    pb.DH_GROUP_MODP3072: "modp3072",
    pb.DH_GROUP_MODP4096: "modp4096",
    pb.DH_GROUP_ECP256: "ecp256",
    pb.DH_GROUP_ECP384: "ecp384",
}
_ACTION_RANK = {BLOCK: 2, PERMIT: 1, NEGOTIATE: 0}


@dataclass(frozen=True)
class Platform:
    """What compile() needs to know about this host's IPsec data path."""

    backend: str = LIBIPSEC  # LIBIPSEC (userspace ESP-in-UDP, tunnel only) | NETLINK (kernel ESP)
    kernel_ah: bool = False
    ipcomp: bool = False


@dataclass(frozen=True)
class HostAddresses:
    """The host's own addresses and the dynamic ones Windows filters may name."""

    addresses: tuple[str, ...] = ()  # "My IP Address"
    dns_servers: tuple[str, ...] = ()
    wins_servers: tuple[str, ...] = ()
    dhcp_server: tuple[str, ...] = ()
    default_gateway: tuple[str, ...] = ()


@dataclass(frozen=True)
class LocalIdentity:
    """This host's certificate (issued at enrollment) and the root CAs it trusts for IKE.

    `trusted` holds (subject DN, PEM) pairs: the policy server's CA first (the default root CA),
    then any extra CAs the host was given. The private key is not here: the enforcer loads it."""

    cert_pem: str
    trusted: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CompileInput:
    policy: dist_pb.EffectivePolicy
    membership: str = ""  # "domain" | "workgroup" ("" = take the policy's)
    host: HostAddresses = field(default_factory=HostAddresses)
    platform: Platform = field(default_factory=Platform)
    server: tuple[str, int] | None = None  # the policy server (address, port): never cut off
    identity: LocalIdentity | None = None  # for certificate authentication
    kerberos: bool = False  # this host can run the Kerberos keying exchange (keytab, host principal)
    kdcs: tuple[tuple[str, int], ...] = ()  # the Kerberos KDCs (address, port): exempt with Kerberos keying
    dynamic: tuple[dist_pb.EffectivePolicy, ...] = ()  # dynamic-mode rules (dynamic.pseudo_policies)
    crl_check: str = "1"  # strongcrlcheck: 0 none (relaxed), 1 fail if revoked (relaxed), 2 any CRL error (strict)
    exempt_level: str = "3"  # ipsecexempt: 0/2 also exempt Kerberos and RSVP; 1/3 only IKE


class _Problems:
    def __init__(self) -> None:
        self._problems: dict[str, None] = {}  # insertion-ordered sets
        self._notes: dict[str, None] = {}
        self.tunnelled: list[str] = []  # transport rules enforced as host-to-host tunnels

    def problem(self, text: str) -> None:
        self._problems[text] = None

    def note(self, text: str) -> None:
        self._notes[text] = None

    @property
    def problems(self) -> list[str]:
        return list(self._problems)

    @property
    def notes(self) -> list[str]:
        notes = list(self._notes)
        if self.tunnelled:
            more = len(self.tunnelled) - 3
            which = ", ".join(self.tunnelled[:3]) + (f" and {more} more" if more > 0 else "")
            notes.insert(
                0,
                f"{which}: transport-mode rule(s) enforced as host-to-host tunnels (strongSwan's userspace IPsec "
                "has no transport mode; the same traffic is protected)",
            )
        return notes


def _host_cidr(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def _cidrs(address: pb.Address, host: HostAddresses, what: str, out: _Problems) -> tuple[tuple[str, ...], int] | None:
    """(CIDRs, specificity 0..32) for one filter address; () = any; None = matches nothing here."""
    kind = address.kind
    if kind in (pb.ADDRESS_KIND_ANY, pb.ADDRESS_KIND_UNSPECIFIED):
        return (), 0
    if kind == pb.ADDRESS_KIND_HOST:
        return (_host_cidr(address.ip),), 32
    if kind == pb.ADDRESS_KIND_SUBNET:
        net = ipaddress.ip_network(f"{address.ip}/{address.mask}", strict=False)
        return (str(net),), round(net.prefixlen * 32 / net.max_prefixlen)
    dynamic = {
        pb.ADDRESS_KIND_ME: (host.addresses, "My IP Address"),
        pb.ADDRESS_KIND_DNS_SERVERS: (host.dns_servers, "DNS servers"),
        pb.ADDRESS_KIND_WINS_SERVERS: (host.wins_servers, "WINS servers"),
        pb.ADDRESS_KIND_DHCP_SERVER: (host.dhcp_server, "DHCP server"),
        pb.ADDRESS_KIND_DEFAULT_GATEWAY: (host.default_gateway, "default gateway"),
    }
    found, name = dynamic[kind]
    if not found:
        out.note(f"{what}: this host has no {name}; the filter matches nothing here")
        return None
    return tuple(_host_cidr(ip) for ip in found), 32


def _short(guid: str, length: int = 8) -> str:
    """A name part from an id: its letters and digits, lower case (stable whatever the rule's position)."""
    return "".join(ch for ch in guid if ch.isalnum())[:length].lower() or "x"


def _label(policy: pb.Policy, index: int, rule: pb.Rule) -> str:
    return f'policy "{policy.name}"/rule {index}' + (f' "{rule.name}"' if rule.name else "")


def _esp_proposal(method: pb.QuickModeMethod, pfs: str) -> str | None:
    esp = method.esp
    if not method.HasField("esp"):
        return None
    parts = []
    cipher = _CIPHERS.get(esp.encryption, "null") if esp.encryption != pb.CIPHER_UNSPECIFIED else "null"
    parts.append(cipher)
    if esp.integrity not in (pb.INTEGRITY_NONE, pb.INTEGRITY_UNSPECIFIED):
        parts.append(_INTEGRITY[esp.integrity])
    elif cipher == "null":
        return None  # ESP with neither encryption nor integrity protects nothing
    if pfs:
        parts.append(pfs)
    return "-".join(parts)


def _ike_proposals(policy: pb.Policy) -> list[str]:
    out = []
    for m in policy.isakmp.methods:
        cipher = _CIPHERS.get(m.encryption)
        integ = _INTEGRITY.get(m.integrity)
        group = _DH.get(m.dh_group)
        if cipher and cipher != "null" and integ and group:
            out.append(f"{cipher}-{integ}-{group}")
    return out or ["aes128-sha256-modp2048", "3des-sha1-modp1024"]


def _qm_lifetimes(methods: Sequence[pb.QuickModeMethod]) -> dict[str, str]:
    """Windows: rekey at whichever of the KB / seconds limits comes first; strongSwan: life = hard limit."""
    seconds = min((m.lifetime_seconds for m in methods if m.lifetime_seconds), default=DEFAULT_QM_LIFETIME_S)
    kbytes = min((m.lifetime_kb for m in methods if m.lifetime_kb), default=DEFAULT_QM_LIFETIME_KB)
    return {
        "rekey_time": f"{max(1, seconds * 9 // 10)}s",
        "life_time": f"{seconds}s",
        "rekey_bytes": str(kbytes * 1024 * 9 // 10),
        "life_bytes": str(kbytes * 1024),
    }


def _esp_proposals(
    methods: Sequence[pb.QuickModeMethod], pfs: bool, policy: pb.Policy, platform: Platform, what: str, out: _Problems
) -> list[str]:
    group = ""
    if pfs:
        first = policy.isakmp.methods[0].dh_group if policy.isakmp.methods else pb.DH_GROUP_MODP2048
        group = _DH.get(first, "modp2048")
    proposals: list[str] = []
    dropped_ah = []
    for n, method in enumerate(methods, start=1):
        if method.HasField("ah") and method.ah.integrity not in (pb.INTEGRITY_NONE, pb.INTEGRITY_UNSPECIFIED):
            if not platform.kernel_ah:
                dropped_ah.append(n)
                continue
            if method.HasField("esp"):
                dropped_ah.append(n)  # AH+ESP bundles: strongSwan negotiates one protocol per CHILD_SA
                continue
        proposal = _esp_proposal(method, group)
        if proposal and proposal not in proposals:
            proposals.append(proposal)
    if not methods:
        tail = f"-{group}" if group else ""
        proposals = [f"aes128-sha256{tail}", f"3des-sha1{tail}"]
    if dropped_ah and not proposals:
        out.problem(
            f"{what}: its security methods use AH, which this host cannot enforce "
            f"({'no kernel AH' if not platform.kernel_ah else 'AH+ESP bundles are not supported'}; "
            "strongSwan's userspace IPsec carries ESP only)"
        )
    elif dropped_ah:
        listed = ", ".join(map(str, dropped_ah))
        out.note(f"{what}: security method(s) {listed} use AH and are not offered on this host")
    return proposals


def dn_key(dn: str) -> tuple[tuple[str, str], ...]:
    """A DN compared the way admins write it: attribute order, case and spacing do not matter."""
    parts = []
    for rdn in dn.replace(";", ",").split(","):
        if "=" in rdn:
            kind, _, value = rdn.partition("=")
            parts.append((kind.strip().upper(), value.strip().lower()))
    return tuple(sorted(parts))


def _trusted_ca(root_ca: str, identity: LocalIdentity) -> str | None:
    """The PEM of the rule's root CA among the host's trusted CAs ("" = the policy server's CA)."""
    if not identity.trusted:
        return None
    if not root_ca.strip():
        return identity.trusted[0][1]
    wanted = dn_key(root_ca)
    name = root_ca.strip().lower()
    keys = [(dn_key(subject), pem) for subject, pem in identity.trusted]
    for key, pem in keys:  # the exact DN first
        if wanted and wanted == key:
            return pem
    for key, pem in keys:  # then a DN that names part of the CA's ("CN=X" for "CN=X,O=Y")
        if wanted and set(wanted) <= set(key):
            return pem
    for key, pem in keys:  # a bare CA name: the CA's common name
        if not wanted and any(kind == "CN" and value == name for kind, value in key):
            return pem
    return None


@dataclass(frozen=True)
class _Auth:
    kind: str  # "psk" | "pubkey"
    psk: str = field(default="", repr=False)
    ca_pem: str = ""


def _auth(
    methods: Sequence[pb.AuthMethod],
    workgroup: bool,
    identity: LocalIdentity | None,
    what: str,
    out: _Problems,
    kerberos: bool = False,
) -> _Auth | None:
    """The first authentication method this host can use, in the rule's order of preference."""
    skipped: list[str] = []
    chosen: _Auth | None = None
    for method in methods:
        kind = method.WhichOneof("method")
        if kind == "preshared_key":
            chosen = _Auth("psk", psk=method.preshared_key.key)
        elif kind == "certificate":
            ca = method.certificate.root_ca
            if identity is None:
                skipped.append("certificates (this host has no certificate)")
                continue
            pem = _trusted_ca(ca, identity)
            if pem is None:
                skipped.append(f'certificates (root CA "{ca}" is not among the CAs this host trusts)')
                continue
            if method.certificate.cert_to_account_mapping:
                out.note(f"{what}: certificate-to-account mapping is not applied; the certificate chain is checked")
            chosen = _Auth("pubkey", ca_pem=pem)
        elif kind == "kerberos":
            if workgroup:
                skipped.append("Kerberos (needs domain membership; this computer is a workgroup member)")
            elif not kerberos:
                skipped.append(
                    "Kerberos (this agent has no keytab for its host principal: see --ike-keytab/--ike-principal)"
                )
            else:
                chosen = _Auth("kerberos")
        if chosen is not None:
            if skipped:
                out.note(f"{what}: authenticates with {chosen.kind}; not usable here: {', '.join(skipped)}")
            return chosen
    if not methods:
        out.problem(f"{what}: has no authentication method")
    else:
        out.problem(f"{what}: no usable authentication method: {'; '.join(skipped)}")
    return None


def _ts(cidrs: tuple[str, ...], proto: int, port: int, family_any: str) -> list[str]:
    nets = list(cidrs) or [family_any]
    if not proto:
        return nets
    suffix = f"[{proto}/{port}]" if port else f"[{proto}]"
    return [n + suffix for n in nets]


@dataclass
class _Compiler:
    inp: CompileInput
    out: _Problems = field(default_factory=_Problems)
    entries: list[tuple[tuple[int, int, int], FilterEntry]] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)

    @cached_property
    def me(self) -> set[str]:
        """This host's addresses as host CIDRs, the form selectors carry them in."""
        return {_host_cidr(a) for a in self.inp.host.addresses}

    @property
    def libipsec(self) -> bool:
        return self.inp.platform.backend == LIBIPSEC

    def run(self) -> Desired:
        policy = self.inp.policy
        membership = self.inp.membership or policy.membership
        workgroup = membership == "workgroup"
        exemptions = [Exemption(reason="IKE", proto=17, port=p) for p in IKE_PORTS]
        if self.inp.server is not None:
            host, port = self.inp.server
            exemptions.append(Exemption(reason="policy server", proto=6, port=port, addr=_host_cidr(host)))
        if not policy.HasField("policy"):
            return Desired(exemptions=tuple(exemptions))
        p = policy.policy
        lists = {fl.id: fl for fl in policy.filter_lists}
        actions = {fa.id: fa for fa in policy.filter_actions}
        for index, rule in enumerate(p.rules, start=1):
            if not rule.active:
                continue
            what = _label(p, index, rule)
            fl = lists.get(rule.filter_list_id)
            fa = actions.get(rule.filter_action_id)
            if fl is None or fa is None:
                missing = "filter list" if fl is None else "filter action"
                self.out.problem(f"{what}: its {missing} is missing from the effective policy")
                continue
            if rule.tunnel_endpoint:
                self.rule(p, index, rule, fl, fa, workgroup, what)  # tunnel rules share a connection per gateway
            else:
                self.cached_rule(p, index, rule, fl, fa, workgroup, what)
        if p.default_response_rule.active:
            self.default_response(p, workgroup)
        self.check_secrets()
        if self.inp.exempt_level in ("0", "2"):  # Windows 2000/XP default exemptions: Kerberos and RSVP too
            exemptions.append(Exemption(reason="Kerberos (ipsecexempt)", proto=6, port=88))
            exemptions.append(Exemption(reason="Kerberos (ipsecexempt)", proto=17, port=88))
            exemptions.append(Exemption(reason="RSVP (ipsecexempt)", proto=46))
        if any(c.kerberos for c in self.connections):
            exemptions.append(Exemption(reason="Kerberos keying", proto=6, port=KEYING_PORT))
            for addr, port in self.inp.kdcs or (("", 88),):
                where = _host_cidr(addr) if addr else ""
                exemptions.append(Exemption(reason="Kerberos (KDC)", proto=6, port=port, addr=where))
                exemptions.append(Exemption(reason="Kerberos (KDC)", proto=17, port=port, addr=where))
        ordered = [e for _, e in sorted(self.entries, key=lambda item: item[0])]
        entries = tuple(replace(e, index=i) for i, e in enumerate(ordered))
        self.check_server(entries)
        return Desired(
            entries=entries,
            exemptions=tuple(exemptions),
            connections=tuple(self.connections),
            secrets=tuple(self.secrets),
            problems=tuple(self.out.problems),
            notes=tuple(self.out.notes),
        )

    def cached_rule(
        self,
        p: pb.Policy,
        index: int,
        rule: pb.Rule,
        fl: pb.FilterList,
        fa: pb.FilterAction,
        workgroup: bool,
        what: str,
    ) -> None:
        """rule(), remembered: a re-apply after a one-rule edit compiles only that rule again (and reuses
        the other rules' Connection objects, digests included). The output is exactly rule()'s."""
        key = (
            index,
            workgroup,
            rule.SerializeToString(deterministic=True),
            fl.SerializeToString(deterministic=True),
            fa.SerializeToString(deterministic=True),
        )
        context = _context_key(self.inp, p)
        cache = _RULE_CACHE.get(context)
        if cache is None:
            _RULE_CACHE.clear()  # one context (host, platform, policy settings) at a time
            cache = _RULE_CACHE[context] = {}
        hit = cache.get(key)
        if hit is None:
            sub = _Compiler(self.inp)
            sub.rule(p, index, rule, fl, fa, workgroup, what)
            hit = (
                tuple(sub.entries),
                tuple(sub.connections),
                tuple(sub.secrets),
                tuple(sub.out.problems),
                tuple(sub.out._notes),
                tuple(sub.out.tunnelled),
            )
            if len(cache) < _RULE_CACHE_MAX:
                cache[key] = hit
        entries, connections, secrets, problems, notes, tunnelled = hit
        self.entries.extend(entries)
        self.connections.extend(connections)
        self.secrets.extend(secrets)
        for text in problems:
            self.out.problem(text)
        for text in notes:
            self.out.note(text)
        self.out.tunnelled.extend(tunnelled)

    # -- filters -------------------------------------------------------------------------------
    def rule(
        self,
        p: pb.Policy,
        index: int,
        rule: pb.Rule,
        fl: pb.FilterList,
        fa: pb.FilterAction,
        workgroup: bool,
        what: str,
    ) -> None:
        if rule.connection_type in (pb.CONNECTION_TYPE_LAN, pb.CONNECTION_TYPE_REMOTE_ACCESS):
            kind = "local area network" if rule.connection_type == pb.CONNECTION_TYPE_LAN else "remote access"
            self.out.note(
                f"{what}: connection type {kind} is enforced on all network connections (Linux has no Windows "
                "connection classes; the rule's filters decide which traffic it covers)"
            )
        verdict = {pb.ACTION_TYPE_PERMIT: PERMIT, pb.ACTION_TYPE_BLOCK: BLOCK}.get(fa.action, NEGOTIATE)
        conn_name = f"rule-{_short(rule.id, 40)}" if verdict == NEGOTIATE else ""
        if conn_name and rule.tunnel_endpoint and _host_cidr(rule.tunnel_endpoint) not in self.me:
            # IKEv1: one main mode per peer, and a responder looks for the quick mode's traffic selectors only
            # among the children of the connection it chose for that main mode: every tunnel rule to one
            # gateway is a child of one connection named after the gateway.
            conn_name = _tunnel_name(rule.tunnel_endpoint)
        selectors: list[tuple[Selector, int, str, str]] = []  # selector, weight, id, label
        for fnum, flt in enumerate(fl.filters, start=1):
            flabel = f"{what}/filter {fnum}"
            src = _cidrs(flt.source, self.inp.host, flabel, self.out)
            dst = _cidrs(flt.destination, self.inp.host, flabel, self.out)
            if src is None or dst is None:
                continue
            ports_apply = flt.protocol in (6, 17)
            sport = flt.source_port if ports_apply else 0
            dport = flt.destination_port if ports_apply else 0
            weight_bits = (1 if flt.protocol else 0) * 4 + (2 if sport else 0) + (2 if dport else 0)
            weight = (src[1] + dst[1]) * 16 + weight_bits
            fwd = Selector(src=src[0], dst=dst[0], proto=flt.protocol, sport=sport, dport=dport)
            selectors.append((fwd, weight, f"{rule.id}/{flt.id or fnum}", flabel))
            if flt.mirrored:
                back = Selector(src=dst[0], dst=src[0], proto=flt.protocol, sport=dport, dport=sport)
                if back != fwd:
                    selectors.append((back, weight, f"{rule.id}/{flt.id or fnum}/mirror", flabel + " (mirror)"))
        if not selectors:
            return
        for order, (sel, weight, eid, label) in enumerate(selectors):
            entry = FilterEntry(
                index=0,
                id=eid,
                label=label,
                selector=sel,
                verdict=verdict,
                weight=weight,
                inbound_passthrough=verdict == NEGOTIATE and fa.inbound_passthrough,
                fallback_to_clear=verdict == NEGOTIATE and fa.fallback_to_clear,
                connection=conn_name,
            )
            key = (-weight, -_ACTION_RANK[verdict], index * 10_000 + order)
            self.entries.append((key, entry))
        if verdict == NEGOTIATE:
            self.negotiate(p, index, rule, fa, selectors, conn_name, workgroup, what)

    # -- keying ---------------------------------------------------------------------------------
    def negotiate(
        self,
        p: pb.Policy,
        index: int,
        rule: pb.Rule,
        fa: pb.FilterAction,
        selectors: list[tuple[Selector, int, str, str]],
        name: str,
        workgroup: bool,
        what: str,
    ) -> None:
        esp = _esp_proposals(list(fa.methods), fa.session_key_pfs, p, self.inp.platform, what, self.out)
        auth = _auth(list(rule.auth_methods), workgroup, self.inp.identity, what, self.out, self.inp.kerberos)
        if not esp or auth is None:
            return
        me = self.me
        tunnel = rule.tunnel_endpoint
        if tunnel and _host_cidr(tunnel) in me:
            # The inbound rule of a tunnel (its endpoint is this host): the SA the peer's outbound rule (or
            # ours) negotiates carries this traffic; its filter entries make sure it arrives protected.
            return
        peers: set[str] = set()
        children: dict[str, Any] = {}
        template = False
        for n, (sel, _w, sel_id, label) in enumerate(selectors, start=1):
            if tunnel:
                # Tunnel rules name the networks (Windows needs one rule per direction and no mirroring):
                # the filter as written is the outbound direction, local network → remote network.
                outbound = not sel_id.endswith("/mirror")
            else:
                outbound = bool(sel.src) and all(c in me for c in sel.src)
            if not outbound:
                continue  # the inbound half of a mirrored filter: the outbound half's SA covers it
            if self.libipsec and (sel.proto or sel.sport or sel.dport):
                self.out.problem(
                    f"{label}: negotiating security for one protocol or port needs kernel ESP; with strongSwan's "
                    "userspace IPsec all traffic to the peer enters the tunnel, so other traffic would be dropped"
                )
                continue
            if tunnel:
                remote_ts = _ts(sel.dst, sel.proto, sel.dport, "0.0.0.0/0")
            elif len(sel.dst) == 1 and sel.dst[0].endswith(("/32", "/128")):
                peers.add(sel.dst[0].split("/")[0])
                remote_ts = _ts(sel.dst, sel.proto, sel.dport, "0.0.0.0/0")
            else:
                template = True
                remote_ts = ["%peer%"]  # filled in per peer by instantiate()
            child_base = f"rule-{_short(rule.id, 40)}" if tunnel else name
            children[f"{child_base}-{n}"] = {
                "mode": "tunnel" if (tunnel or self.libipsec) else "transport",
                "local_ts": _ts(sel.src, sel.proto, sel.sport, "0.0.0.0/0"),
                "remote_ts": remote_ts,
                "esp_proposals": esp,
                "start_action": "none",
                "dpd_action": "clear",
                **_qm_lifetimes(list(fa.methods)),
            }
        if not children:
            return
        if not tunnel and self.libipsec:
            self.out.tunnelled.append(what)
        if len(peers) > 1 and not template:
            template = True  # several single peers: one instance per peer
        remote = [tunnel] if tunnel else (sorted(peers) if len(peers) == 1 and not template else ["%any"])
        body = self.ike_body(p, remote, auth, name)
        if tunnel:
            merged = self._merge_tunnel(name, body, children, auth, what)
            if merged is not None:
                return
        body["children"] = children
        self.connections.append(
            Connection(
                name=name, body=body, initiates=True, template=template, label=what, kerberos=auth.kind == "kerberos"
            )
        )
        self.secret_for(name, auth, remote)

    def _merge_tunnel(
        self, name: str, body: dict[str, Any], children: dict[str, Any], auth: _Auth, what: str
    ) -> Connection | None:
        """Add `children` to the gateway's connection `name` when an earlier tunnel rule made it (returned);
        None when this is the gateway's first rule."""
        for i, conn in enumerate(self.connections):
            if conn.name != name:
                continue
            theirs = {k: v for k, v in conn.body.items() if k != "children"}
            if theirs != body or (auth.kind == "kerberos") != conn.kerberos:
                self.out.problem(
                    f"{what}: its main mode settings or authentication differ from another tunnel rule's to "
                    f"{body['remote_addrs'][0]}; IKEv1 negotiates one main mode per peer"
                )
                return conn
            merged = replace(conn, body={**conn.body, "children": {**conn.body["children"], **children}})
            self.connections[i] = merged
            return merged
        return None

    def ike_body(self, p: pb.Policy, remote: list[str], auth: _Auth, name: str) -> dict[str, Any]:
        minutes = p.isakmp.lifetime_minutes or DEFAULT_MM_LIFETIME_MIN
        body: dict[str, Any] = {
            # IKEv1 unless the policy asks for IKEv2; the default response rule answers either ("0").
            "version": "0" if name == DEFAULT_RESPONSE else ("2" if p.isakmp.ike_version == 2 else "1"),
            "aggressive": "no",
            "local_addrs": list(self.inp.host.addresses) or ["%any"],
            "remote_addrs": remote,
            "proposals": _ike_proposals(p),
            # IKEv1 re-authenticates to renew the master key; IKEv2 rekeys in place (reauth_time 0 = never)
            "reauth_time": f"{minutes * 60}s" if p.isakmp.ike_version != 2 else "0s",
            "rekey_time": f"{minutes * 60}s",
            "over_time": f"{max(60, minutes * 6)}s",
            # Dead peer detection: a peer that lost its SAs (e.g. its charon restarted) is noticed within
            # about a minute and the stale SAs are closed, so the next packet negotiates afresh.
            "dpd_delay": "30s",
            "local-1": {"auth": "psk" if auth.kind == "kerberos" else auth.kind},
            "remote-1": {"auth": "psk" if auth.kind == "kerberos" else auth.kind},
        }
        if self.libipsec:
            body["encap"] = "yes"
        if auth.kind == "pubkey" and self.inp.identity is not None:
            # The local identity defaults to the certificate's subject; the peer must chain to the rule's CA.
            body["local-1"]["certs"] = [self.inp.identity.cert_pem]
            body["remote-1"]["id"] = "%any"
            body["remote-1"]["cacerts"] = [auth.ca_pem]
            body["remote-1"]["revocation"] = "strict" if self.inp.crl_check == "2" else "relaxed"
        if auth.kind in ("psk", "kerberos"):
            # IKEv1 main mode picks the key by address before identities are exchanged: identify by address.
            body["local-1"]["id"] = "%any" if len(self.inp.host.addresses) != 1 else self.inp.host.addresses[0]
            body["remote-1"]["id"] = "%any"
        return body

    def secret_for(self, name: str, auth: _Auth, remote: list[str]) -> None:
        if auth.kind != "psk":
            return
        owners: tuple[str, ...] = ()
        if remote != ["%any"]:
            owners = tuple(sorted({*self.inp.host.addresses, *remote}))
        self.secrets.append(Secret(name=f"psk-{name}", owners=owners, data=auth.psk))

    def default_response(self, p: pb.Policy, workgroup: bool) -> None:
        drr = p.default_response_rule
        what = f'policy "{p.name}"/default response rule'
        esp = _esp_proposals(list(drr.methods), drr.session_key_pfs, p, self.inp.platform, what, self.out)
        auth = _auth(list(drr.auth_methods), workgroup, self.inp.identity, what, self.out, self.inp.kerberos)
        if not esp or auth is None:
            return
        name = DEFAULT_RESPONSE
        body = self.ike_body(p, ["%any"], auth, name)
        body["children"] = {
            name: {
                "mode": "tunnel" if self.libipsec else "transport",
                "local_ts": ["dynamic"],
                "remote_ts": ["dynamic"],
                "esp_proposals": esp,
                "start_action": "none",
                "dpd_action": "clear",
                **_qm_lifetimes(list(drr.methods)),
            }
        }
        self.connections.append(
            Connection(name=name, body=body, initiates=False, label=what, kerberos=auth.kind == "kerberos")
        )
        self.secret_for(name, auth, ["%any"])

    def check_secrets(self) -> None:
        wildcard = {s.data for s in self.secrets if not s.owners}
        if len(wildcard) > 1:
            self.out.problem(
                "rules that negotiate with any peer use different pre-shared keys; IKEv1 main mode chooses the key "
                "by the peer's address before identities are exchanged, so only one key can serve any peer"
            )
        seen: set[str] = set()
        unique: list[Secret] = []
        for s in self.secrets:  # one wildcard secret is enough; identical keys are merged
            key = f"{s.owners}|{s.data}"
            if key not in seen:
                seen.add(key)
                unique.append(s)
        self.secrets = unique

    def check_server(self, entries: Iterable[FilterEntry]) -> None:
        if self.inp.server is None:
            return
        server = ipaddress.ip_address(self.inp.server[0])
        for e in entries:
            if e.verdict == PERMIT:
                continue
            dst = e.selector.dst
            if (not dst or any(server in ipaddress.ip_network(c) for c in dst)) and e.selector.proto in (0, 6):
                self.out.note(
                    f"{e.label}: traffic to the policy server {self.inp.server[0]}:{self.inp.server[1]} is exempted "
                    "(the rule would cut this agent off from its policy server)"
                )
                return


def _tunnel_name(endpoint: str) -> str:
    """The connection of every tunnel rule to `endpoint` (a name VICI and nft comments accept)."""
    return "tunnel-" + "".join(ch if ch.isalnum() else "-" for ch in str(ipaddress.ip_address(endpoint)))


_RULE_CACHE: dict[str, dict[tuple[object, ...], tuple[Any, ...]]] = {}
_RULE_CACHE_MAX = 50_000


def _context_key(inp: CompileInput, p: pb.Policy) -> str:
    """Everything besides the rule itself that rule() reads."""
    policy_part = pb.Policy(name=p.name, isakmp=p.isakmp).SerializeToString(deterministic=True)
    return content_hash(
        [
            policy_part.hex(),
            repr(inp.host),
            repr(inp.platform),
            repr(inp.server),
            repr(inp.identity),
            inp.kerberos,
            inp.crl_check,
            inp.exempt_level,
            list(inp.kdcs),
        ]
    )


def compile_policy(inp: CompileInput) -> Desired:
    """The desired state for `inp` (see the module docstring), dynamic-mode rules included."""
    static = _Compiler(inp).run()
    if not inp.dynamic:
        return static
    membership = inp.membership or inp.policy.membership
    parts = [_Compiler(replace(inp, policy=d, dynamic=(), membership=membership)).run() for d in inp.dynamic]
    return _merge([*parts, static])  # on equal weight a dynamic filter comes before a static one


def _merge(parts: Sequence[Desired]) -> Desired:
    """Several compiled policies as one host state: filters re-ordered most specific first."""
    ranked = [
        ((-e.weight, -_ACTION_RANK[e.verdict], order, e.index), e)
        for order, part in enumerate(parts)
        for e in part.entries
    ]
    entries = tuple(replace(e, index=i) for i, (_, e) in enumerate(sorted(ranked, key=lambda item: item[0])))
    out = _Problems()
    for part in parts:
        for text in part.problems:
            out.problem(text)
        for text in part.notes:
            out.note(text)
    secrets: dict[tuple[tuple[str, ...], str], Secret] = {}
    for part in parts:
        for secret in part.secrets:
            secrets.setdefault((secret.owners, secret.data), secret)
    if len({data for owners, data in secrets if not owners}) > 1:
        out.problem(
            "dynamic and static rules that negotiate with any peer use different pre-shared keys; IKEv1 main "
            "mode chooses the key by address, so only one key can serve any peer"
        )
    return Desired(
        entries=entries,
        exemptions=tuple(dict.fromkeys(x for part in parts for x in part.exemptions)),
        connections=tuple(c for part in parts for c in part.connections),
        secrets=tuple(secrets.values()),
        problems=tuple(out.problems),
        notes=tuple(out.notes),
    )


def instantiate(conn: Connection, peer: str, local: str) -> Connection:
    """A template's per-peer instance: remote address = `peer`, traffic selectors narrowed to the pair."""
    body = dict(conn.body)
    body["remote_addrs"] = [peer]
    body["local_addrs"] = [local]
    peer_net = ipaddress.ip_network(_host_cidr(peer))
    children: dict[str, Any] = {}
    for child_name, child in conn.body.get("children", {}).items():
        child = dict(child)
        if child.get("remote_ts") == ["%peer%"]:
            child["remote_ts"] = [_host_cidr(peer)]
        else:
            nets = [ts for ts in child["remote_ts"] if peer_net.subnet_of(ipaddress.ip_network(ts.split("[")[0]))]  # type: ignore[arg-type]
            if not nets:
                continue
            child["remote_ts"] = [_host_cidr(peer)]
        child["local_ts"] = [_host_cidr(local)]
        children[child_name] = child
    body["children"] = children
    if body.get("local-1", {}).get("id") == "%any":
        body["local-1"] = {**body["local-1"], "id": local}
    return Connection(name=f"{conn.name}@{peer}", body=body, initiates=True, label=conn.label, kerberos=conn.kerberos)


__all__ = [
    "LIBIPSEC",
    "NETLINK",
    "CompileInput",
    "HostAddresses",
    "LocalIdentity",
    "Platform",
    "compile_policy",
    "dn_key",
    "instantiate",
]
