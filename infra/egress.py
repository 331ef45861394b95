"""Which hosts chat-llm may send requests to (SSRF, OWASP API7): workflow `http` steps and
the deployments' `base_url`. The default refuses what no chat service should reach on a
user's say-so: link-local addresses (169.254.0.0/16, fe80::/10, where cloud metadata
services answer), the metadata hosts by name, and the unspecified address. Loopback and
private networks stay allowed (a model server on localhost or in the cluster is the
common case); `egress.deny_private` refuses them too, and `egress.allow_hosts`, when set,
is the only list of hosts that may be reached.

Pure but for name resolution, which `resolve` does (a host name is checked by every
address it resolves to, so a name cannot hide a refused address).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import msgspec

METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
     "metadata.azure.com", "169.254.169.254", "fd00:ec2::254", "100.100.100.200"}
)  # fmt: skip
"""Cloud metadata services by the names (and addresses outside link-local) they answer."""


class EgressPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    allow_hosts: list[str] = msgspec.field(default_factory=list)
    """If set, the only hosts (names or addresses, exact) that may be reached."""
    deny_private: bool = False
    """Refuse loopback and private networks too (10/8, 172.16/12, 192.168/16, 127/8, fc00::/7)."""
    allow_link_local: bool = False
    """Allow link-local addresses and the metadata hosts (never needed by chat-llm itself)."""


class EgressRefused(ValueError):
    """A URL the egress policy does not let chat-llm reach."""


def _refusal(address: str, policy: EgressPolicy) -> str | None:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_link_local and not policy.allow_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if policy.deny_private and (ip.is_loopback or ip.is_private):
        return "a loopback or private address (egress.deny_private)"
    return None


Resolver = Callable[[str], Iterable[str]]


def resolve(host: str) -> list[str]:
    """Every address `host` resolves to (an address resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, policy: EgressPolicy, resolver: Resolver | None = resolve) -> None:
    """Raise EgressRefused if the policy does not let chat-llm reach `url`. With a
    resolver, a host name is checked by each address it resolves to."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise EgressRefused(f"{url!r}: only http and https URLs may be reached")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise EgressRefused(f"{url!r} names no host")
    if policy.allow_hosts:
        if host not in {h.lower() for h in policy.allow_hosts}:
            raise EgressRefused(f"{host!r} is not in egress.allow_hosts")
        return
    if host in METADATA_HOSTS and not policy.allow_link_local:
        raise EgressRefused(f"{host!r} is a cloud metadata service (refused by default)")
    why = _refusal(host, policy)
    if why is None and resolver is not None:
        for address in resolver(host):
            why = _refusal(address, policy)
            if why is not None:
                why = f"{why}: it resolves to {address}"
                break
    if why is not None:
        raise EgressRefused(f"{host!r} is {why}; the egress policy refuses it")
