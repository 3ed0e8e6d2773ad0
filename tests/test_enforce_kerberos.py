"""Kerberos in IKE, on the wire: the stock Windows defaults (Kerberos only) between two domain members.

A real MIT KDC (tests/krb5_realm.py) listens on the test LAN; hosts a and b have keytabs for
host/a.example.test and host/b.example.test and run `policyagent agent --ike-keytab ... --ike-principal
...`. No pre-shared key is configured anywhere: before IKE, the initiating agent runs the Kerberos keying
exchange with the peer's agent (TCP 4501, mutual GSS-API authentication), both derive the same per-pair
secret and load it into their charons, and IKEv1 main mode uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from krb5_realm import REALM, realm_unavailable, start_realm
from netns import Host
from test_enforce_netns import (
    CLIENT,
    OU_A,
    OU_B,
    SECURE,
    TCP_SERVER,
    Site,
    _why,
    cli,
    tcp,
    tshark_lines,
)

pytestmark = pytest.mark.slow
_skip = _why or realm_unavailable()
if _skip:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=f"cannot run here: {_skip}")]


class KerberosSite(Site):
    realm = None

    def start_server(self) -> None:
        from conftest import start_server_process

        self.realm = start_realm(self.base / "krb5", host=self.root_ip)
        for host in (self.a, self.b):
            self.realm.add_principal(f"host/{host.name}.example.test@{REALM}")
        self.server = start_server_process(self.base / "data", listen=f"{self.root_ip}:0", log_dir=self.base)
        # The stock defaults as they ship: Kerberos only.
        for ou in (OU_A, OU_B):
            cli("ou", "add", ou, "-r", self.address)
        cli("gpo", "add", "GPO-A", "--policy", CLIENT, "-r", self.address)
        cli("gpo", "add", "GPO-B", "--policy", SECURE, "-r", self.address)
        cli("gpo", "link", "GPO-A", f"ou:{OU_A}", "-r", self.address)
        cli("gpo", "link", "GPO-B", f"ou:{OU_B}", "-r", self.address)

    def agent_args(self, host: Host) -> list[str]:
        assert self.realm is not None
        principal = f"host/{host.name}.example.test@{REALM}"
        return [
            "--ike-keytab", str(self.realm.keytab(principal)), "--ike-principal", principal,
            "--krb5-config", self.realm.env["KRB5_CONFIG"],
        ]

    def close(self) -> None:
        super().close()
        if self.realm is not None:
            self.realm.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KerberosSite]:
    s = KerberosSite(tmp_path_factory.mktemp("kerberos"))
    try:
        s.bring_up()
        s.b.popen([sys.executable, "-c", TCP_SERVER, "5001"])
        yield s
    except BaseException:
        s.dump_logs()
        raise
    finally:
        s.close()


def test_stock_kerberos_defaults_protect_traffic_between_domain_members(site: KerberosSite) -> None:
    a, b = site.a, site.b
    with b.capture("udp port 4500 or tcp port 5001 or tcp port 4501") as pcap:
        first = tcp(a, b.ip, 5001, "kerberos-keyed-payload-1")
        assert first.startswith("OK"), first
        again = tcp(a, b.ip, 5001, "kerberos-keyed-payload-2")
        assert again.startswith("OK"), again
    assert tshark_lines(pcap, "esp"), "no ESP on the wire"
    assert tshark_lines(pcap, "tcp.port == 4501"), "no Kerberos keying exchange on the wire"
    assert tshark_lines(pcap, 'frame contains "kerberos-keyed-payload"') == []
    logs = (site.base / "agent-b.log").read_text() + (site.base / "agent-a.log").read_text()
    assert "Kerberos-keyed IKE secret loaded" in logs
    # the secret itself never reaches a log
    assert "psk" not in logs.lower() or "kerberos-keyed" in logs.lower()
