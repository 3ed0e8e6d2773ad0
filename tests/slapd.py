"""A throwaway OpenLDAP slapd that looks enough like Active Directory for tests.

    ldap = start_slapd(tmp_dir)                    # suffix DC=example,DC=test
    ou = ldap.add_ou("OU=Servers," + ldap.suffix)
    ldap.add_computer(ou, "agent1", "agent1.example.test")
    conn = ldap.connection()                       # ldap3, bound as the rootdn
    ... ldap.url (ldap://127.0.0.1:PORT), ldap.ldapi_url (SASL EXTERNAL as this process's uid) ...
    ldap.stop()

Everything lives in the directory: a slapd.conf, a back_mdb database, the ldapi socket. Schemas:
core, cosine, inetorgperson, nis, tests/ldap/ipsec.schema (ipsec* classes, groupPolicyContainer,
gPLink, securityPrincipal ... with matching rules) and a copy of the stock msuser.schema (AD's
user/computer) without the attributes ipsec.schema redefines. The syncprov overlay is loaded when
the module exists, so contextCSN / persistent search are available for change detection.
Like AD, a non-paged search returns at most 1000 entries (sizeLimitExceeded); paged searches
(RFC 2696) have no total limit. The rootdn has no limits. `slapd_unavailable()` says why this
machine cannot run slapd (None when it can).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from programs import find_program

SCHEMA_FILE = Path(__file__).parent / "ldap" / "ipsec.schema"
_SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/local/etc/openldap/schema")
_MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib64/openldap", "/usr/lib/openldap", "/usr/libexec/openldap")
_STOCK_SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
# AD's well-known trust-account flag (userAccountControl WORKSTATION_TRUST_ACCOUNT)
UF_WORKSTATION_TRUST_ACCOUNT = 0x1000
# sun_path is 108 bytes; leave room for the NUL
_MAX_SOCKET_PATH = 100


def _tool(name: str) -> str | None:
    return find_program(name, ("/usr/libexec",))


def _schema_dir() -> Path | None:
    for d in _SCHEMA_DIRS:
        if all((Path(d) / f"{s}.schema").is_file() for s in (*_STOCK_SCHEMAS, "msuser")):
            return Path(d)
    return None


def _module_dir() -> Path | None:
    for d in _MODULE_DIRS:
        if (Path(d) / "back_mdb.la").exists() or (Path(d) / "back_mdb.so").exists():
            return Path(d)
    return None


def slapd_unavailable() -> str | None:
    """Why slapd cannot run here (missing programs, schemas or python ldap3), or None."""
    if _tool("slapd") is None:
        return "OpenLDAP slapd is not installed (Debian: slapd ldap-utils)"
    if _schema_dir() is None:
        return f"OpenLDAP schemas ({', '.join(_STOCK_SCHEMAS)}, msuser) not found in {', '.join(_SCHEMA_DIRS)}"
    if _module_dir() is None:
        return f"OpenLDAP back_mdb module not found in {', '.join(_MODULE_DIRS)}"
    try:
        _ldap3()
    except ImportError:
        return "python ldap3 is not installed"
    return None


def _ldap3() -> Any:
    with warnings.catch_warnings():  # ldap3 2.9.1 imports names pyasn1 has deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        import ldap3
    return ldap3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ssha(password: str) -> str:
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _rdn(dn: str) -> tuple[str, str]:
    """The first RDN of `dn` as (attribute, value); no escaped commas or multi-valued RDNs."""
    first = dn.split(",", 1)[0]
    attr, _, value = first.partition("=")
    return attr.strip(), value.strip()


def _sid(domain: tuple[int, int, int], rid: int) -> bytes:
    """Binary SID S-1-5-21-a-b-c-rid (revision 1, 5 sub-authorities, NT authority)."""
    return struct.pack("<BB", 1, 5) + (5).to_bytes(6, "big") + struct.pack("<5I", 21, *domain, rid)


def _redefined_attributes() -> set[str]:
    text = SCHEMA_FILE.read_text()
    return {m.lower() for m in re.findall(r"^attributetype\s*\(\s*\S+\s+NAME\s+'([^']+)'", text, re.M)}


def _msuser_without(stock: Path, names: set[str]) -> str:
    """msuser.schema minus the attributetype statements whose NAME is in `names` (lower case)."""
    blocks: list[list[str]] = []
    for line in stock.read_text().splitlines():
        if blocks and line[:1] in (" ", "\t"):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    kept = []
    for block in blocks:
        if block[0].startswith("attributetype"):
            found = re.search(r"NAME\s+\(?\s*'([^']+)'", "\n".join(block))
            if found and found.group(1).lower() in names:
                continue
        kept.append("\n".join(block))
    return "\n".join(kept) + "\n"


@dataclass
class Slapd:
    dir: Path
    port: int
    pid: int
    suffix: str
    bind_dn: str
    password: str
    ldapi_path: Path
    syncprov: bool
    _conn: Any = field(default=None, repr=False)
    _next_rid: int = field(default=1000, repr=False)
    _domain_sid: tuple[int, int, int] = field(
        default_factory=lambda: (secrets.randbits(31), secrets.randbits(31), secrets.randbits(31)), repr=False
    )

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldapi_url(self) -> str:
        return "ldapi://" + urllib.parse.quote(str(self.ldapi_path), safe="")

    def connection(self) -> Any:
        """A new ldap3.Connection to `url`, bound (simple bind) as the rootdn."""
        ldap3 = _ldap3()
        return ldap3.Connection(ldap3.Server(self.url), self.bind_dn, self.password, auto_bind=True)

    def _admin(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self.connection()
        return self._conn

    def _add(self, dn: str, object_class: list[str], attributes: dict[str, Any]) -> str:
        conn = self._admin()
        if not conn.add(dn, object_class, attributes):
            raise RuntimeError(f"slapd add {dn}: {conn.result['description']}: {conn.result['message']}")
        return dn

    def add_ou(self, dn: str) -> str:
        """Add an organizationalUnit (which can carry gPLink/gPOptions); its parent must exist. Returns dn."""
        attr, value = _rdn(dn)
        if attr.lower() != "ou":
            raise ValueError(f"not an OU=... DN: {dn}")
        return self._add(dn, ["organizationalUnit", "gPLinkAux"], {"ou": value})

    def add_computer(self, ou_dn: str, name: str, dns_host_name: str) -> str:
        """Add an AD-like computer CN=name,ou_dn (sAMAccountName NAME$, dNSHostName, HOST/ SPNs, objectSid,
        objectGUID, userAccountControl WORKSTATION_TRUST_ACCOUNT). Returns its DN."""
        rid = self._next_rid
        self._next_rid += 1
        dn = f"CN={name},{ou_dn}"
        attributes = {
            "cn": name,
            "sn": name,  # person's MUST (computer < user < organizationalPerson)
            "sAMAccountName": f"{name.upper()}$",
            "dNSHostName": dns_host_name,
            "servicePrincipalName": [f"HOST/{name.upper()}", f"HOST/{dns_host_name}"],
            "objectSid": _sid(self._domain_sid, rid),
            "objectGUID": uuid.uuid4().bytes_le,
            "userAccountControl": UF_WORKSTATION_TRUST_ACCOUNT,
            # mstop's MUSTs
            "instanceType": 4,
            "objectCategory": f"CN=Computer,CN=Schema,CN=Configuration,{self.suffix}",
            "nTSecurityDescriptor": b"\x01\x00\x04\x80" + bytes(16),  # empty self-relative SD
        }
        return self._add(dn, ["computer", "securityPrincipal"], attributes)

    def restart(self) -> None:
        """Start slapd again (after stop()) on the same database, port and ldapi socket."""
        if _running(self.pid):
            raise RuntimeError("slapd is still running: stop() it first")
        self.ldapi_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid = _launch(self.dir, self.port, self.ldapi_url)
        _wait_ready(self)

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.unbind()
            self._conn = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(self.pid):
            time.sleep(0.01)
        if _running(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.ldapi_path.parent != self.dir:
            shutil.rmtree(self.ldapi_path.parent, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie left for a non-reaping init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _launch(directory: Path, port: int, ldapi_url: str) -> int:
    """Run slapd on directory/slapd.conf (127.0.0.1:port and the ldapi socket); its pid once it wrote it."""
    slapd = _tool("slapd")
    assert slapd is not None, slapd_unavailable()
    pid_file = directory / "slapd.pid"
    pid_file.unlink(missing_ok=True)
    # slapd daemonizes; its parent returns once the child has initialised (or failed to).
    proc = subprocess.run(
        [slapd, "-f", str(directory / "slapd.conf"), "-h", f"ldap://127.0.0.1:{port}/ {ldapi_url}"],
        capture_output=True, text=True, timeout=30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"slapd failed to start ({proc.returncode}): {proc.stderr.strip()}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text().strip()):
        time.sleep(0.005)
    return int(pid_file.read_text().strip())


def _wait_ready(server: Slapd) -> None:
    """Wait until a rootdn bind works; keep that connection as the admin connection."""
    ldap3 = _ldap3()
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = server.connection()
            break
        except ldap3.core.exceptions.LDAPException:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.01)
    server._conn = conn


def start_slapd(directory: Path, suffix: str = "DC=example,DC=test") -> Slapd:
    """Write a slapd.conf and an empty back_mdb database in `directory`, start slapd on a free
    127.0.0.1 port plus an ldapi socket, and add the suffix entry (a `domain` with gPLinkAux)."""
    slapd, schema_dir, module_dir = _tool("slapd"), _schema_dir(), _module_dir()
    assert slapd is not None and schema_dir is not None and module_dir is not None, slapd_unavailable()
    _ldap3()  # fails early without ldap3
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "db"
    db.mkdir(exist_ok=True)
    sock = directory / "ldapi"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        sock = Path(tempfile.mkdtemp(prefix="slapd")) / "ldapi"
    (directory / "msuser.schema").write_text(_msuser_without(schema_dir / "msuser.schema", _redefined_attributes()))
    port = _free_port()
    password = secrets.token_urlsafe(18)
    bind_dn = f"CN=admin,{suffix}"
    syncprov = (module_dir / "syncprov.la").exists() or (module_dir / "syncprov.so").exists()
    includes = [schema_dir / f"{s}.schema" for s in _STOCK_SCHEMAS] + [SCHEMA_FILE, directory / "msuser.schema"]
    peer = f"gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth"
    conf = "".join(f'include "{p}"\n' for p in includes)
    conf += f"""modulepath {module_dir}
moduleload back_mdb
{"moduleload syncprov" if syncprov else ""}
pidfile {directory}/slapd.pid
argsfile {directory}/slapd.args
# like AD's MaxPageSize: at most 1000 entries without paging, no total limit with it
sizelimit size.soft=1000 size.hard=1000 size.prtotal=unlimited

database mdb
maxsize 1073741824
suffix "{suffix}"
rootdn "{bind_dn}"
rootpw {_ssha(password)}
directory {db}
dbnosync
index objectClass eq
index cn,sAMAccountName,dNSHostName eq,sub
index entryCSN,entryUUID eq
access to * by dn.exact="{peer}" manage by * read
"""
    if syncprov:
        conf += "overlay syncprov\nsyncprov-checkpoint 100 10\n"
    (directory / "slapd.conf").write_text(conf)
    ldapi_url = "ldapi://" + urllib.parse.quote(str(sock), safe="")
    pid = _launch(directory, port, ldapi_url)
    server = Slapd(directory, port, pid, suffix, bind_dn, password, sock, syncprov)
    _wait_ready(server)
    attr, value = _rdn(suffix)
    classes = {"dc": ["domain", "gPLinkAux"], "o": ["organization", "gPLinkAux"], "ou": ["organizationalUnit", "gPLinkAux"]}
    if attr.lower() not in classes:
        server.stop()
        raise ValueError(f"suffix must start with DC=, O= or OU=: {suffix}")
    server._add(suffix, classes[attr.lower()], {attr.lower(): value})
    return server
