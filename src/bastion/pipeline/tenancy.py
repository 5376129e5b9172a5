"""Which tenants a call's arguments name, and where the call comes from, as policy reads them.

An upstream's `tenant_arguments` say which arguments hold a tenant's objects and how their
ids read (`{tenant}-*`); every spelling an upstream might understand is tried, so the client
cannot pick the spelling the check sees. The client's address becomes Cedar's `ip` value.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from bastion.config import Settings

__all__ = ["NO_TENANT", "TenantNames", "client_ip", "spellings"]

NO_TENANT = "(unrecognized)"  # a tenant-scoped argument that is not a string


class TenantNames:
    """The tenant patterns of every upstream's tenant-scoped arguments."""

    def __init__(self, settings: Settings) -> None:
        self._patterns = {
            name: {arg: _tenant_regex(glob) for arg, glob in up.tenant_arguments.items()}
            for name, up in settings.upstreams.items()
        }

    def named(self, upstream: str, values: Mapping[str, Any]) -> list[str]:
        """The tenants the tenant-scoped arguments name (`tenant_arguments` of the upstream)."""
        patterns = self._patterns.get(upstream)
        if not patterns:
            return []
        named: set[str] = set()
        for arg, pattern in patterns.items():
            value = values.get(arg)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    for spelling in spellings(item):
                        match = pattern.fullmatch(spelling)
                        if match is not None:
                            named.add(match.group("tenant"))
                elif item is not None:
                    named.add(NO_TENANT)
        return sorted(named)


def client_ip(client: str) -> str:
    """The address of a client as the transport gives it: `host:port`, `[v6]:port`, or a
    bare address (behind a trusted proxy, the forwarded one). None of those: 0.0.0.0."""
    host = client
    if client.startswith("["):
        host = client[1 : client.find("]")]
    elif client.count(":") == 1:
        host = client.partition(":")[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "0.0.0.0"  # noqa: S104 - no client address at all (never a real peer's)


def spellings(value: str) -> set[str]:
    """The ways an upstream might read an id the client spelled: as sent; percent-decoded
    (repeatedly: `%2567` is `%67` is `g`); without surrounding white space or invisible
    format characters; with the URI's user part, empty path segments and dot segments
    removed; and each of those folded for case and compatibility forms (NFKC). The client
    chooses the spelling; it must not choose which tenant the check sees."""
    forms = {value}
    decoded = value
    for _ in range(3):
        decoded = unquote(decoded)
        forms.add(decoded)
    for form in list(forms):
        bare = "".join(ch for ch in form if unicodedata.category(ch) != "Cf").strip()
        forms.update((bare, _plain_uri(bare)))
    return forms | {unicodedata.normalize("NFKC", form).casefold() for form in forms}


def _plain_uri(value: str) -> str:
    """`scheme://user@host//a/./b/../c` as `scheme://host/a/c`, with dot segments resolved
    over the whole of it (`workspace://acme/../globex/x` is `workspace://globex/x` to an
    upstream that joins paths as strings); anything without `://` unchanged."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    kept: list[str] = []
    for segment in rest.split("/"):
        if segment == "..":
            if kept:
                kept.pop()
        elif segment not in ("", "."):
            kept.append(segment)
    if kept:
        kept[0] = kept[0].rpartition("@")[2]
    return f"{scheme}://{'/'.join(kept)}"


def _tenant_regex(glob: str) -> re.Pattern[str]:
    out = []
    for part in re.split(r"(\{tenant\}|\*)", glob):
        if part == "{tenant}":
            out.append(r"(?P<tenant>[a-z0-9]+(?:-[a-z0-9]+)*?)")
        elif part == "*":
            out.append(".*")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out), re.DOTALL)
