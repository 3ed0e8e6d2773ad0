"""A throwaway Samba Active Directory domain controller for tests, in its own network namespace.

    dc = start_samba(tmp_dir)                          # realm EXAMPLE.TEST, base DC=example,DC=test
    ou = dc.add_ou("OU=Servers," + dc.base_dn)
    dc.add_computer(ou, "agent1", "agent1.example.test")
    guid = dc.create_gpo("IPsec servers")              # "{GUID}"
    dc.link_gpo(ou, guid, enforced=True)
    conn = dc.connection()                             # ldap3, LDAPS, CA-validated, Administrator
    ... dc.url_ldaps / dc.url_ldap (the DC's address), dc.ca_file + dc.tls_name for TLS validation,
    ... dc.krb5_conf (a client krb5.conf whose KDC is the DC) ...
    dc.stop()

The DC is provisioned once per process and realm into a template directory (`samba-tool domain
provision`, about 4 s) and copied for each instance: the template is never started, so its tdb/ldb
files are at rest, and only etc/smb.conf names the directory (each instance writes its own). Every
copy therefore has the same domain SID and admin password; that is fine for tests.

`samba` runs inside a network namespace made for the instance with `lo` and one end of a veth pair;
the other end stays in the test's namespace. The pair has a private /30 in 10.78.0.0/16 (the DC is
.2, the test's side .1) and the namespace has no default route, so nothing reaches another machine.
Samba binds only to those two interfaces and runs only its ldap and kdc services (no NetBIOS, WINS,
DNS or dynamic DNS update, which would query the system resolver).

Samba generates its LDAPS certificate on first start for `tls_name` (DC1.example.test), so a client
connecting by address validates against that name (ldap3: Tls(valid_names=[tls_name])).
`samba_unavailable()` says why this machine cannot run the DC (None when it can).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from programs import find_program

# What each Debian package contributes that the fixture needs: (path, package).
_PACKAGE_FILES = (
    ("/usr/share/samba/setup/provision.ldif", "samba-ad-provision"),
    ("/usr/lib/python3/dist-packages/samba/__init__.py", "python3-samba"),
)
_DSDB_MODULE_GLOB = "/usr/lib/*/samba/ldb/samba_dsdb.so"
_NET_PREFIX = "10.78"  # a /30 per instance in 10.78.0.0/16; tests/netns.py uses 10.77.0.0/16
_NET_LOCK = Path(tempfile.gettempdir()) / "policyagent-samba-net.lock"
# Unix sockets live under the instance directory (private/ldapi, ncalrpc/...); sun_path is 108 bytes.
_MAX_DIR_LEN = 60
PROVISION_TIMEOUT_S = 120.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
UF_WORKSTATION_TRUST_ACCOUNT = 0x1000
GPLINK_DISABLED = 1
GPLINK_ENFORCED = 2

_counter = itertools.count()


def _tool(name: str) -> str | None:
    return find_program(name, ("/usr/bin", "/bin"))


def _ldap3() -> Any:
    with warnings.catch_warnings():  # ldap3 2.9.1 imports names pyasn1 has deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        import ldap3
    return ldap3


def samba_unavailable() -> str | None:
    """Why a Samba AD DC cannot run here (not root, no `ip netns`, packages missing), or None."""
    if os.geteuid() != 0:
        return "needs root (Samba runs in a network namespace it creates)"
    if _tool("ip") is None:
        return "needs ip (Debian package iproute2)"
    for prog, package in (("samba", "samba"), ("samba-tool", "samba-common-bin")):
        if _tool(prog) is None:
            return f"needs {prog} (Debian packages samba samba-ad-dc samba-ad-provision; {prog} is in {package})"
    for path, package in _PACKAGE_FILES:
        if not Path(path).exists():
            return f"needs the Debian package {package} ({path} is missing)"
    if not list(Path("/").glob(_DSDB_MODULE_GLOB.lstrip("/"))):
        return "needs the Debian package samba-dsdb-modules (samba_dsdb.so not found)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    try:
        _ldap3()
    except ImportError:
        return "python ldap3 is not installed"
    return None


def _run(argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return f"--- {path} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    """Whether `pid` is alive (a zombie left for a late-reaping init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (samba and whatever it forked)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


# ------------------------------------------------------------------ network


@dataclass
class _Net:
    netns: str
    veth: str  # the test namespace's end
    host_ip: str  # the test namespace's address
    dc_ip: str


def _used_addresses() -> set[str]:
    out = _run(["ip", "-4", "-o", "addr", "show"]).stdout
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out))


def _create_net() -> _Net:
    """A namespace with lo up and a veth pair to this namespace on a free /30 (no default route)."""
    n = next(_counter)
    tag = f"{os.getpid() % 100000}x{n}"
    netns, veth, peer = f"pasmb{tag}", f"smb{tag}"[:15], f"smp{tag}"[:15]
    _run(["ip", "netns", "add", netns])
    try:
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
        _run(["ip", "link", "set", peer, "netns", netns])
        _run(["ip", "-n", netns, "link", "set", peer, "name", "eth0"])
        # Picking and assigning the /30 under a lock: two pytest-xdist workers may start DCs at once.
        with _NET_LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _used_addresses()
            start = (os.getpid() * 31 + n * 7) % 16384
            for i in range(16384):
                block = (start + i) % 16384
                base = f"{_NET_PREFIX}.{block // 64}.{block % 64 * 4}"
                host_ip = f"{_NET_PREFIX}.{block // 64}.{block % 64 * 4 + 1}"
                dc_ip = f"{_NET_PREFIX}.{block // 64}.{block % 64 * 4 + 2}"
                if host_ip not in used and dc_ip not in used and base not in used:
                    break
            else:
                raise RuntimeError(f"no free /30 left in {_NET_PREFIX}.0.0/16")
            _run(["ip", "addr", "add", f"{host_ip}/30", "dev", veth])
        _run(["ip", "-n", netns, "addr", "add", f"{dc_ip}/30", "dev", "eth0"])
        _run(["ip", "link", "set", veth, "up"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
    except BaseException:
        _delete_net(netns, veth)
        raise
    return _Net(netns, veth, host_ip, dc_ip)


def _delete_net(netns: str, veth: str) -> None:
    _run(["ip", "link", "del", veth], check=False)  # removes its peer in the namespace too
    _run(["ip", "netns", "del", netns], check=False)


# ------------------------------------------------------------------ provisioning


@dataclass(frozen=True)
class _Template:
    dir: Path
    password: str


_templates: dict[tuple[str, str, str], _Template] = {}


def _remove_templates() -> None:
    for template in _templates.values():
        shutil.rmtree(template.dir.parent, ignore_errors=True)
    _templates.clear()


atexit.register(_remove_templates)

# DCs not stopped yet, stopped at exit so that a test run that forgets one leaves no daemon behind.
_live: dict[int, SambaDc] = {}


@atexit.register
def _stop_live() -> None:
    for dc in list(_live.values()):
        dc.stop()


def _provision(realm: str, workgroup: str, host_name: str) -> _Template:
    """A provisioned, never-started DC in a per-process temp dir (cached per realm/workgroup/host)."""
    key = (realm.upper(), workgroup.upper(), host_name.lower())
    if key in _templates and (_templates[key].dir / "private" / "sam.ldb").exists():
        return _templates[key]
    samba_tool = _tool("samba-tool")
    assert samba_tool is not None, samba_unavailable()
    parent = Path(tempfile.mkdtemp(prefix="samba-template-"))
    target = parent / "dc"
    # Complex enough for AD's default password policy; no characters a shell or LDAP would mangle.
    password = "Pa1-" + secrets.token_urlsafe(15)
    # Provisioning needs no network; it still runs in a namespace with only lo so that nothing it
    # might look up (its host name, DNS) leaves the machine.
    netns = f"pasmbprov{os.getpid() % 100000}x{next(_counter)}"
    _run(["ip", "netns", "add", netns])
    try:
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        proc = subprocess.run(
            [
                "ip", "netns", "exec", netns, samba_tool, "domain", "provision",
                "--use-rfc2307", f"--realm={realm.upper()}", f"--domain={workgroup.upper()}",
                "--server-role=dc", "--dns-backend=NONE", f"--adminpass={password}",
                f"--targetdir={target}", f"--host-name={host_name.lower()}", "--host-ip=127.0.0.1",
                "--option=interfaces=lo", "--option=bind interfaces only=yes", "--option=disable netbios=yes",
            ],
            capture_output=True, text=True, timeout=PROVISION_TIMEOUT_S, check=False,
        )
    finally:
        _run(["ip", "netns", "del", netns], check=False)
    if proc.returncode != 0:
        shutil.rmtree(parent, ignore_errors=True)
        raise RuntimeError(f"samba-tool domain provision failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    template = _Template(target, password)
    _templates[key] = template
    return template


def _smb_conf(d: Path, realm: str, workgroup: str, host_name: str) -> str:
    dns_domain = realm.lower()
    return f"""# written by tests/samba.py
[global]
	netbios name = {host_name.upper()}
	realm = {realm.upper()}
	workgroup = {workgroup.upper()}
	server role = active directory domain controller
	idmap_ldb:use rfc2307 = yes
	private dir = {d}/private
	lock directory = {d}
	state directory = {d}/state
	cache directory = {d}/cache
	binddns dir = {d}/bind-dns
	pid directory = {d}/run
	ncalrpc dir = {d}/ncalrpc
	winbindd socket directory = {d}/winbindd
	logging = file
	log file = {d}/log/log.%m
	log level = 1
	interfaces = lo eth0
	bind interfaces only = yes
	disable netbios = yes
	# ldap and kdc only: no smbd, NetBIOS, WINS, DNS or dynamic DNS update (which queries the
	# system resolver), no replication or KCC.
	server services = ldap, kdc
	dcerpc endpoint servers = -winreg -srvsvc
	# ldap3's GSSAPI negotiates no SASL sign/seal layer; over TLS that is still safe.
	ldap server require strong auth = allow_sasl_over_tls
	prefork children = 2
	load printers = no
	printing = bsd
	printcap name = /dev/null
	disable spoolss = yes

[sysvol]
	path = {d}/state/sysvol
	read only = No

[netlogon]
	path = {d}/state/sysvol/{dns_domain}/scripts
	read only = No
"""


def _krb5_conf(realm: str, kdc: str) -> str:
    # Multi-line realm block: a one-line `REALM = { kdc = ... }` is not understood by MIT krb5.
    # No DNS lookups or canonicalization: nothing may ask the system resolver about example.test.
    return f"""[libdefaults]
	default_realm = {realm.upper()}
	dns_lookup_kdc = false
	dns_lookup_realm = false
	dns_canonicalize_hostname = false
	rdns = false
[realms]
	{realm.upper()} = {{
		kdc = {kdc}
	}}
[domain_realm]
	.{realm.lower()} = {realm.upper()}
	{realm.lower()} = {realm.upper()}
"""


# ------------------------------------------------------------------ the DC


@dataclass
class SambaDc:
    dir: Path
    netns: str
    veth: str
    ip: str  # the DC's address, reachable from the test's namespace
    pid: int
    realm: str  # "EXAMPLE.TEST"
    admin_password: str = field(repr=False)
    host_name: str = "dc1"
    workgroup: str = "EXAMPLE"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    owns_dir: bool = False
    _conn: Any = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def domain(self) -> str:
        """The DNS domain, "example.test"."""
        return self.realm.lower()

    @property
    def base_dn(self) -> str:
        return ",".join(f"DC={part}" for part in self.domain.split("."))

    @property
    def admin_user(self) -> str:
        return f"Administrator@{self.domain}"

    @property
    def admin_dn(self) -> str:
        return f"CN=Administrator,CN=Users,{self.base_dn}"

    @property
    def tls_name(self) -> str:
        """The name in Samba's generated LDAPS certificate (its CN), to validate against."""
        return f"{self.host_name.upper()}.{self.domain}"

    @property
    def ca_file(self) -> Path:
        return self.dir / "private" / "tls" / "ca.pem"

    @property
    def krb5_conf(self) -> Path:
        """A client krb5.conf (KRB5_CONFIG) whose KDC for the realm is this DC."""
        return self.dir / "krb5-client.conf"

    @property
    def url_ldap(self) -> str:
        return f"ldap://{self.ip}:389"

    @property
    def url_ldaps(self) -> str:
        return f"ldaps://{self.ip}:636"

    @property
    def log_file(self) -> Path:
        return self.dir / "log" / "samba.out"

    def tls(self) -> Any:
        """ldap3.Tls validating the DC's certificate against `ca_file` and `tls_name`."""
        ldap3 = _ldap3()
        return ldap3.Tls(
            validate=ssl.CERT_REQUIRED, ca_certs_file=str(self.ca_file), valid_names=[self.tls_name],
            version=ssl.PROTOCOL_TLS_CLIENT,
        )

    def connection(self, *, schema: bool = True) -> Any:
        """A new writable ldap3.Connection over LDAPS (CA-validated), simple-bound as Administrator.

        schema=True reads the DC's schema (ldap3 then types values and rejects attribute names the
        schema does not define, as with policyagent's connect()); False skips that."""
        ldap3 = _ldap3()
        server = ldap3.Server(
            self.url_ldaps, use_ssl=True, tls=self.tls(), connect_timeout=10,
            get_info=ldap3.SCHEMA if schema else ldap3.NONE,
        )
        return ldap3.Connection(
            server, self.admin_user, self.admin_password, auto_bind=True, receive_timeout=30, read_only=False
        )

    def _admin(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self.connection()
        return self._conn

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            result = self._admin().result
            raise RuntimeError(f"samba {what}: {result['description']}: {result['message']}")

    def _add(self, dn: str, object_class: list[str], attributes: dict[str, Any]) -> str:
        self._check(self._admin().add(dn, object_class, attributes), f"add {dn}")
        return dn

    def add_ou(self, dn: str) -> str:
        """Add an organizationalUnit (its parent must exist). Returns dn."""
        attr, _, value = dn.split(",", 1)[0].partition("=")
        if attr.strip().lower() != "ou":
            raise ValueError(f"not an OU=... DN: {dn}")
        return self._add(dn, ["top", "organizationalUnit"], {"ou": value.strip()})

    def add_computer(self, ou_dn: str, name: str, dns_host_name: str) -> str:
        """Add a computer CN=name,ou_dn (sAMAccountName NAME$, dNSHostName, HOST/ SPNs,
        userAccountControl WORKSTATION_TRUST_ACCOUNT; Samba assigns objectSid and objectGUID). Returns its DN."""
        dn = f"CN={name},{ou_dn}"
        attributes = {
            "cn": name,
            "sAMAccountName": f"{name.upper()}$",
            "dNSHostName": dns_host_name,
            "servicePrincipalName": [f"HOST/{name.upper()}", f"HOST/{dns_host_name}"],
            "userAccountControl": UF_WORKSTATION_TRUST_ACCOUNT,
        }
        return self._add(dn, ["top", "person", "organizationalPerson", "user", "computer"], attributes)

    def gpo_dn(self, gpo_guid: str) -> str:
        return f"CN={gpo_guid},CN=Policies,CN=System,{self.base_dn}"

    def create_gpo(self, display_name: str) -> str:
        """A new groupPolicyContainer with its User and Machine containers (and an empty GPT in
        sysvol), as the GPMC creates one; computer and user settings enabled. Returns "{GUID}"."""
        guid = "{" + str(uuid.uuid4()).upper() + "}"
        dn = self.gpo_dn(guid)
        sysvol_path = f"\\\\{self.domain}\\SysVol\\{self.domain}\\Policies\\{guid}"
        self._add(
            dn,
            ["top", "container", "groupPolicyContainer"],
            {
                "cn": guid,
                "displayName": display_name,
                "gPCFileSysPath": sysvol_path,
                "flags": 0,
                "versionNumber": 0,
                "gPCFunctionalityVersion": 2,
            },
        )
        for child in ("User", "Machine"):
            self._add(f"CN={child},{dn}", ["top", "container"], {"cn": child})
        gpt = self.dir / "state" / "sysvol" / self.domain / "Policies" / guid
        for sub in ("MACHINE", "USER"):
            (gpt / sub).mkdir(parents=True, exist_ok=True)
        (gpt / "GPT.INI").write_text("[General]\r\nVersion=0\r\n")
        return guid

    def link_gpo(self, container_dn: str, gpo_guid: str, *, enforced: bool = False, disabled: bool = False) -> str:
        """Link a GPO to a domain/OU/site as the GPMC does: prepend [LDAP://cn={GUID},cn=policies,
        cn=system,<base>;F] to the container's gPLink (F: 1 = link disabled, 2 = enforced). gPLink lists
        links from the lowest precedence to the highest, so the new link gets the highest link order
        number (as in the GPMC and `samba-tool gpo setlink`). Returns the new gPLink."""
        ldap3 = _ldap3()
        conn = self._admin()
        self._check(
            conn.search(container_dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["gPLink"]),
            f"read gPLink of {container_dn}",
        )
        current = conn.response[0]["attributes"].get("gPLink") or ""
        if isinstance(current, list):
            current = current[0] if current else ""
        flags = (GPLINK_DISABLED if disabled else 0) | (GPLINK_ENFORCED if enforced else 0)
        value = f"[LDAP://cn={gpo_guid},cn=policies,cn=system,{self.base_dn};{flags}]{current}"
        self._check(
            conn.modify(container_dn, {"gPLink": [(ldap3.MODIFY_REPLACE, [value])]}), f"set gPLink of {container_dn}"
        )
        return value

    def move(self, dn: str, new_parent_dn: str) -> str:
        """Move `dn` under `new_parent_dn` (LDAP modify DN, keeping its RDN). Returns the new DN."""
        rdn = dn.split(",", 1)[0]
        self._check(self._admin().modify_dn(dn, rdn, new_superior=new_parent_dn), f"move {dn}")
        return f"{rdn},{new_parent_dn}"

    def delete(self, dn: str) -> None:
        self._check(self._admin().delete(dn), f"delete {dn}")

    def processes(self) -> list[int]:
        """The live processes of this DC (samba's process group; zombies not counted)."""
        return _group_members(self.pid) if self.pid else []

    def stop(self) -> None:
        """Stop samba (its process group, by PID), delete the namespace and veth pair, and the
        directory when start_samba made it. Safe to call again."""
        if self._stopped:
            return
        self._stopped = True
        _live.pop(id(self), None)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.unbind()
            self._conn = None
        _kill_group(self.pid, self.proc)
        _delete_net(self.netns, self.veth)
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _kill_group(pgid: int, proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM samba's process group, SIGKILL what is left after STOP_TIMEOUT_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our child: it is no zombie of ours
            if not _alive(pgid) and not _group_members(pgid):
                return
            time.sleep(0.02)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)


def _add_ldap_spns(dc: SambaDc) -> None:
    """The DC's ldap/ SPNs, for SASL GSSAPI binds: samba's dnsupdate service (disabled here, it
    queries the system resolver) normally adds them through samba_spnupdate."""
    ldap3 = _ldap3()
    fqdn, short, workgroup = dc.tls_name.lower(), dc.host_name.upper(), dc.workgroup.upper()
    spns = [f"ldap/{fqdn}", f"ldap/{short}", f"ldap/{fqdn}/{dc.domain}", f"ldap/{fqdn}/{workgroup}"]
    dn = f"CN={short},OU=Domain Controllers,{dc.base_dn}"
    dc._check(dc._admin().modify(dn, {"servicePrincipalName": [(ldap3.MODIFY_ADD, spns)]}), f"add ldap/ SPNs to {dn}")


def _wait_ready(dc: SambaDc, timeout: float) -> None:
    """Until the rootDSE answers over LDAP and LDAPS validates; raise with samba's logs otherwise."""
    ldap3 = _ldap3()
    last: Exception | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dc.proc is not None and dc.proc.poll() is not None:
            raise RuntimeError(f"samba exited with {dc.proc.returncode} during startup")
        try:
            conn = ldap3.Connection(
                ldap3.Server(dc.url_ldap, connect_timeout=1), auto_bind=True, receive_timeout=2
            )
            try:
                ok = conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["defaultNamingContext"])
            finally:
                conn.unbind()
            if ok and dc.ca_file.exists():
                dc._conn = dc.connection()
                _add_ldap_spns(dc)
                return
        except ldap3.core.exceptions.LDAPException as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"samba's rootDSE did not answer within {timeout:g} s (last error: {last})")


def start_samba(
    directory: Path,
    *,
    realm: str = "EXAMPLE.TEST",
    workgroup: str = "EXAMPLE",
    host_name: str = "dc1",
    timeout: float = START_TIMEOUT_S,
) -> SambaDc:
    """Provision (or copy this process's provisioned template of) a DC for `realm` into `directory`,
    and start `samba` in a new network namespace reachable from here at `SambaDc.ip`."""
    samba = _tool("samba")
    assert samba is not None, samba_unavailable()
    template = _provision(realm, workgroup, host_name)
    directory = directory.resolve()
    owns_dir = False
    if len(str(directory)) > _MAX_DIR_LEN:
        directory = Path(tempfile.mkdtemp(prefix="samba-"))
        owns_dir = True
    elif directory.exists() and any(directory.iterdir()):
        directory = Path(tempfile.mkdtemp(prefix="dc-", dir=directory))
    shutil.copytree(template.dir, directory, symlinks=True, dirs_exist_ok=True)
    for sub in ("run", "log", "cache", "ncalrpc", "winbindd"):
        (directory / sub).mkdir(exist_ok=True)
    conf = directory / "etc" / "smb.conf"
    conf.write_text(_smb_conf(directory, realm, workgroup, host_name))
    net = _create_net()
    (directory / "krb5-client.conf").write_text(_krb5_conf(realm, net.dc_ip))
    dc = SambaDc(
        dir=directory, netns=net.netns, veth=net.veth, ip=net.dc_ip, pid=0, realm=realm.upper(),
        admin_password=template.password, host_name=host_name.lower(), workgroup=workgroup.upper(),
        owns_dir=owns_dir,
    )
    try:
        with dc.log_file.open("wb") as out:
            # `ip netns exec` execs samba, so the PID is samba's; its own session makes the PID the
            # process group of samba and everything it forks, which stop() kills.
            dc.proc = subprocess.Popen(
                ["ip", "netns", "exec", net.netns, samba, "-s", str(conf), "--foreground", "--no-process-group",
                 "--debug-stdout"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "KRB5_CONFIG": str(dc.krb5_conf)},
            )
        dc.pid = dc.proc.pid
        _live[id(dc)] = dc
        _wait_ready(dc, timeout)
    except BaseException as exc:
        logs = "\n".join(_tail(p) for p in (dc.log_file, *sorted((directory / "log").glob("log.*"))))
        dc.stop()
        if isinstance(exc, Exception):
            raise RuntimeError(f"samba AD DC in {directory} did not start: {exc}\n{logs}") from exc
        raise
    return dc


__all__ = ["SambaDc", "samba_unavailable", "start_samba"]
