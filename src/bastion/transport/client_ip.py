"""Who the client is: the peer's address, or behind a trusted proxy, the address it forwarded.

A forwarded header is believed only from a peer listed in `security.trusted_proxies`, and
then only up to the first hop no trusted proxy vouches for: the right-most address of the
header that is not itself a trusted proxy. Anything left of it is what the client wrote and
proves nothing. A header that cannot be read leaves the peer's address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from bastion.config import Security

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAX_HOPS = 32  # addresses of a forwarded header looked at, from the right


def client_address(scope: Mapping[str, Any], security: Security) -> str:
    """The client's address for the audit trail: `host:port` of the peer (`[v6]:port`), or
    the forwarded address when the peer is a trusted proxy; "" when there is no peer."""
    peer = scope.get("client")
    if not peer:
        return ""
    host, port = str(peer[0]), peer[1]
    direct = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not security.trusted_proxies:
        return direct
    networks = _networks(security.trusted_proxies)
    if not _trusted(_ip(host), networks):
        return direct
    name = security.forwarded_header.encode("latin-1")
    values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name]
    if not values:
        return direct
    hops = _forwarded(values) if name == b"forwarded" else _x_forwarded_for(values)
    forwarded = _right_most_untrusted(hops, networks)
    return str(forwarded) if forwarded is not None else direct


def _right_most_untrusted(hops: list[str], networks: tuple[_Network, ...]) -> _Address | None:
    """Walking from the proxy towards the client: the first address no trusted proxy is;
    None when an address on the way cannot be read (the header is not to be believed)."""
    found: _Address | None = None
    for hop in reversed(hops[-_MAX_HOPS:]):
        address = _ip(hop)
        if address is None:
            return None
        found = address
        if not _trusted(address, networks):
            return address
    return found  # every hop is a trusted proxy: the first of them is the client


def _x_forwarded_for(values: Iterable[str]) -> list[str]:
    """The addresses of X-Forwarded-For lines, in order (`a, b` and repeated lines alike)."""
    return [hop.strip() for value in values for hop in value.split(",") if hop.strip()]


def _forwarded(values: Iterable[str]) -> list[str]:
    """The `for=` nodes of RFC 7239 Forwarded lines, in order, without quotes, brackets or
    ports; an element without `for=` counts as an unreadable hop."""
    nodes: list[str] = []
    for value in values:
        for element in value.split(","):
            node = ""
            for pair in element.split(";"):
                key, _, raw = pair.strip().partition("=")
                if key.lower() == "for":
                    node = _node_host(raw.strip().strip('"'))
            nodes.append(node)
    return nodes


def _node_host(node: str) -> str:
    """The address part of a Forwarded node: `[v6]:port`, `[v6]`, `v4:port` or `v4`."""
    if node.startswith("["):
        return node[1 : node.find("]")] if "]" in node else ""
    return node.partition(":")[0] if node.count(":") == 1 else node


def _ip(text: str) -> _Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def _trusted(address: _Address | None, networks: tuple[_Network, ...]) -> bool:
    return address is not None and any(address in network for network in networks)


@functools.lru_cache(maxsize=16)
def _networks(entries: tuple[str, ...]) -> tuple[_Network, ...]:
    """The trusted proxies as networks, parsed once per configuration (validated at load)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)
