"""The client's address: the peer's, or behind a trusted proxy the address it forwarded — never
what an untrusted peer claims. Through the quickstart gateway: its benign traffic, many fresh
connections from one host, raises no alert; a spoofed X-Forwarded-For is ignored; a new host
forwarded by a trusted proxy raises exactly one `new_client` alert."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import GatewayProcess, free_port, modern_body, modern_headers, start_gateway
from tests.test_audit_alerts import trail, until
from tests.test_policy_gateway import STEP, quickstart

from bastion.config import Security
from bastion.transport.client_ip import client_address

PROXIES = Security(trusted_proxies=("10.0.0.0/8", "2001:db8:ffff::1"))


def scope(peer: tuple[str, int] | None, *headers: tuple[str, str]) -> dict[str, Any]:
    return {
        "client": peer,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }


XFF = "x-forwarded-for"


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # No trusted proxy configured: the peer, whatever the headers say.
        (("198.51.100.7", 40001), [(XFF, "1.2.3.4")], "198.51.100.7:40001"),
        # An untrusted peer's header is what the client wrote: ignored.
        (("198.51.100.7", 40001), [(XFF, "10.0.0.9")], "198.51.100.7:40001"),
        (("::1", 40001), [], "[::1]:40001"),
    ],
)
def test_without_a_trusted_proxy_the_peer_is_the_client(
    peer: tuple[str, int], headers: list[tuple[str, str]], expected: str
) -> None:
    assert client_address(scope(peer, *headers), Security()) == expected
    assert client_address(scope(peer, *headers), PROXIES) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(XFF, "203.0.113.5")], "203.0.113.5"),
        # The right-most address no trusted proxy is: what the client put left of it is a lie.
        ([(XFF, "6.6.6.6, 203.0.113.5")], "203.0.113.5"),
        ([(XFF, "6.6.6.6, 203.0.113.5, 10.1.1.1")], "203.0.113.5"),
        # Repeated header lines count as one list, in order.
        ([(XFF, "6.6.6.6"), (XFF, "203.0.113.5, 10.2.2.2")], "203.0.113.5"),
        # Every hop a trusted proxy: the first of them is the client.
        ([(XFF, "10.3.3.3, 10.2.2.2")], "10.3.3.3"),
        ([(XFF, "2001:db8::5")], "2001:db8::5"),
        # Unreadable on the way: nothing in the header is believed.
        ([(XFF, "203.0.113.5, bogus")], "10.0.0.1:5000"),
        ([(XFF, "")], "10.0.0.1:5000"),
        ([], "10.0.0.1:5000"),
        # Only the configured header is read.
        ([("forwarded", "for=203.0.113.5")], "10.0.0.1:5000"),
    ],
)
def test_a_trusted_proxy_forwards_the_client(headers: list[tuple[str, str]], expected: str) -> None:
    assert client_address(scope(("10.0.0.1", 5000), *headers), PROXIES) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="[2001:db8:cafe::17]:4711";proto=https', "2001:db8:cafe::17"),
        ("for=6.6.6.6, for=203.0.113.5:8080;by=10.0.0.1", "203.0.113.5"),
        ("For=203.0.113.5, for=10.9.9.9", "203.0.113.5"),
        ("for=unknown", "[2001:db8:ffff::1]:5000"),
        ("for=_hidden, for=203.0.113.5", "203.0.113.5"),
        ("proto=https", "[2001:db8:ffff::1]:5000"),
    ],
)
def test_the_forwarded_header(value: str, expected: str) -> None:
    security = Security(trusted_proxies=PROXIES.trusted_proxies, forwarded_header="Forwarded")
    peer = ("2001:db8:ffff::1", 5000)
    assert client_address(scope(peer, ("forwarded", value)), security) == expected


def test_an_ipv4_peer_on_a_dual_stack_socket_is_matched_as_ipv4() -> None:
    found = client_address(scope(("::ffff:10.0.0.1", 5000), (XFF, "203.0.113.5")), PROXIES)
    assert found == "203.0.113.5"


def test_no_peer_no_address() -> None:
    assert client_address(scope(None, (XFF, "203.0.113.5")), PROXIES) == ""


def test_a_bad_trusted_proxy_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="CIDR"):
        Security(trusted_proxies=("10.0.0.0/33",))


@given(st.text(st.characters(max_codepoint=255), max_size=300))
def test_any_header_gives_an_address_or_the_peer(value: str) -> None:
    for header in ("x-forwarded-for", "forwarded"):
        security = Security(trusted_proxies=("10.0.0.1",), forwarded_header=header)
        found = client_address(scope(("10.0.0.1", 1), (header, value)), security)
        # Never the raw text: a parsed address (at most 39 characters) or the peer.
        assert found == "10.0.0.1:1" or len(found) <= 39


# -- through the quickstart gateway -------------------------------------------------------------

PROXY = "127.0.0.2"  # the test plays the proxy from here; Linux routes all of 127/8 to lo


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The quickstart with its default alert rules, behind a proxy at 127.0.0.2."""
    tmp = tmp_path_factory.mktemp("client-ip")
    port = free_port()
    config = yaml.safe_load(quickstart(tmp, port))
    config.pop("audit")  # the product's defaults for every alert rule
    config["security"] = {"trusted_proxies": [PROXY]}
    gw = start_gateway(tmp, yaml.safe_dump(config), port)
    yield gw
    gw.stop()


ARGUMENTS: dict[str, dict[str, Any]] = {
    "workspace__list_projects": {},
    "workspace__search_tasks": {"query": "launch"},
    "echo__echo": {"text": "hi"},
}


def call(
    gw: GatewayProcess, bearer: str, tool: str, source: str = "127.0.0.1", **extra: str
) -> None:
    """One tools/call on a fresh connection (a new source port each time)."""
    headers = {**modern_headers("tools/call", tool), "Authorization": f"Bearer {bearer}", **extra}
    arguments = ARGUMENTS[tool]
    body = modern_body("tools/call", {"name": tool, "arguments": arguments})
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=STEP) as client:
        response = client.post(gw.url("/mcp"), headers=headers, json=body)
    assert response.status_code == 200, response.text
    assert "result" in response.json(), response.text


def test_quickstart_traffic_raises_no_alert_and_a_proxied_new_host_one(
    proxied: GatewayProcess,
) -> None:
    tools = list(ARGUMENTS)
    bearers = {agent: proxied.token(agent) for agent in ("acme-reader", "globex-reader")}
    for n in range(30):  # past new_client's and first_use's 20 calls of history
        for bearer in bearers.values():
            # A client on this host may write any X-Forwarded-For: it is not the proxy.
            call(proxied, bearer, tools[n % 3], **{"X-Forwarded-For": f"203.0.113.{n}"})
    calls = until(
        lambda: (found := trail(proxied, "--phase", "decision")) and len(found) >= 60 and found,
        "the decisions of 60 calls",
    )
    assert {r["client"].rpartition(":")[0] for r in calls} == {"127.0.0.1"}
    assert len({r["client"] for r in calls}) > 1  # fresh connections: many ports, one host
    assert trail(proxied, "--phase", "alert") == []

    # Through the proxy, a host acme-reader never called from: one alert, however many calls.
    for _ in range(3):
        call(
            proxied,
            bearers["acme-reader"],
            tools[0],
            PROXY,
            **{"X-Forwarded-For": "6.6.6.6, 198.51.100.9"},
        )
    alerts = until(lambda: trail(proxied, "--phase", "alert"), "the new_client alert")
    assert [(a["detail"]["rule"], a["detail"]["client"]) for a in alerts] == [
        ("new_client", "198.51.100.9")
    ]
    forwarded = trail(proxied, "--phase", "decision", "--agent", "acme-reader", "--limit", "3")
    assert {r["client"] for r in forwarded} == {"198.51.100.9"}
    assert json.dumps(alerts).count("6.6.6.6") == 0  # the client's own claim is not believed
