"""Filter addresses from netsh arguments: masks, DNS names resolved once, and filter matching.

Windows resolves a DNS name given for a filter address once, when the filter is
created, into one filter per address (windows-ipsec.md §2.2); the name is kept
on the address for display only.
"""

from __future__ import annotations

import ipaddress
import socket

from policyagent.model.settings import DnsName, Setting, normalize_mask
from policyagent.pb import pb

Endpoint = pb.Address | DnsName

ALL_ONES = {4: "255.255.255.255", 6: "128"}


def parse_mask(setting: Setting, raw: str, version: int) -> str:
    """A mask for an address of this IP version, in canonical form; the setting's error otherwise."""
    if version == 4:
        value = setting.parse(raw)
        assert isinstance(value, str)
        return value
    # The table's parser reads masks as IPv4; an IPv6 subnet takes a prefix length up to 128.
    try:
        return normalize_mask(raw.strip(), 6)
    except ValueError as exc:
        raise setting.fail(str(exc)) from None


def resolve(name: str, setting: Setting) -> list[str]:
    """Every address `name` resolves to now (IPv4 first, then IPv6, each in numeric order)."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        raise setting.fail(f'cannot resolve "{name}": {reason}') from None
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone index
        found.add(ipaddress.ip_address(text))
    if not found:
        raise setting.fail(f'"{name}" resolves to no address')
    return [str(ip) for ip in sorted(found, key=lambda ip: (ip.version, int(ip)))]


def build_endpoints(value: Endpoint, mask_raw: str | None, addr: Setting, mask: Setting) -> list[pb.Address]:
    """The stored address(es) for srcaddr/dstaddr plus its optional mask.

    A mask that is not all-ones makes the address a subnet; a DNS name becomes one
    host address per resolved address.
    """
    if isinstance(value, DnsName):
        if mask_raw is not None and mask_raw.strip() not in ALL_ONES.values():
            raise mask.fail(f"a DNS name stands for single addresses; give {addr.name}= an address to use a mask")
        return [pb.Address(kind=pb.ADDRESS_KIND_HOST, ip=ip, dns_name=value.name) for ip in resolve(value.name, addr)]
    if value.kind != pb.ADDRESS_KIND_HOST:
        if mask_raw is not None and mask_raw.strip() not in ALL_ONES.values():
            raise mask.fail("a mask applies only to an IP address, not to me, any or a server keyword")
        return [value]
    if mask_raw is None:
        return [value]
    version = ipaddress.ip_address(value.ip).version
    canonical = parse_mask(mask, mask_raw, version)
    if canonical == ALL_ONES[version]:
        return [value]
    return [pb.Address(kind=pb.ADDRESS_KIND_SUBNET, ip=value.ip, mask=canonical)]


def same_family(a: pb.Address, b: pb.Address) -> bool:
    if not a.ip or not b.ip:
        return True
    return ipaddress.ip_address(a.ip).version == ipaddress.ip_address(b.ip).version


def address_matches(stored: pb.Address, given: Endpoint, mask_raw: str | None, mask: Setting) -> bool:
    """Whether a stored filter address is what `delete filter` named; an omitted mask matches any."""
    if isinstance(given, DnsName):
        return stored.dns_name.rstrip(".").casefold() == given.name.casefold()
    if given.kind != pb.ADDRESS_KIND_HOST:
        return stored.kind == given.kind
    if stored.kind not in (pb.ADDRESS_KIND_HOST, pb.ADDRESS_KIND_SUBNET):
        return False
    ip = ipaddress.ip_address(given.ip)
    if ipaddress.ip_address(stored.ip) != ip:
        return False
    if mask_raw is None:
        return True
    canonical = parse_mask(mask, mask_raw, ip.version)
    if canonical == ALL_ONES[ip.version]:
        return stored.kind == pb.ADDRESS_KIND_HOST
    return stored.kind == pb.ADDRESS_KIND_SUBNET and normalize_mask(stored.mask, ip.version) == canonical
