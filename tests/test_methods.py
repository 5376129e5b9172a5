"""The method table: every MCP method the gateway knows, named in one place, with properties
that agree with what the gateway does."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import GatewayProcess, legacy_session, modern_body, modern_headers

from bastion import methods
from bastion.methods import KNOWN_METHODS, METHODS, Routing, Sender
from bastion.observe.metrics import Metrics, method_label
from bastion.policy.schema import LIST_ACTIONS, METHOD_ACTIONS, STUB
from bastion.types import Era

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"

# Modules that still spell MCP method names out, pending their switch to bastion.methods.
# Empty it as they switch: the test below fails for an entry that no longer needs to be here.
LITERALS_PENDING_SWITCH: frozenset[str] = frozenset()

# The requests MCP defines for a client to send a server, as the specification lists them.
CLIENT_REQUESTS = {
    "initialize",
    "ping",
    "server/discover",
    "logging/setLevel",
    "subscriptions/listen",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
}
# Removed in 2026-07-28 (stateless: no handshake, no session-bound subscriptions).
REMOVED_IN_MODERN = {
    "initialize",
    "ping",
    "logging/setLevel",
    "resources/subscribe",
    "resources/unsubscribe",
}


# -- the table -------------------------------------------------------------------------------


def test_the_table_names_every_request_the_gateway_serves() -> None:
    assert KNOWN_METHODS == CLIENT_REQUESTS
    assert all(METHODS[name].sender is Sender.CLIENT for name in KNOWN_METHODS)
    assert {m.name for m in METHODS.values() if m.notification} == {
        name for name in METHODS if name.startswith(methods.NOTIFICATION_PREFIX)
    }
    assert all(METHODS[n].routing is None for n in METHODS if n not in KNOWN_METHODS)


def test_table_keys_are_the_method_names() -> None:
    assert all(name == method.name for name, method in METHODS.items())


def test_lists_name_their_result_and_item_members() -> None:
    lists = methods.routed(Routing.LISTED)
    assert lists == {"tools/list", "prompts/list", "resources/list", "resources/templates/list"}
    assert {name: methods.list_keys(name) for name in lists} == {
        "tools/list": ("tools", "name"),
        "prompts/list": ("prompts", "name"),
        "resources/list": ("resources", "uri"),
        "resources/templates/list": ("resourceTemplates", "uriTemplate"),
    }
    with pytest.raises(KeyError):
        methods.list_keys("tools/call")


def test_routing_by_name_says_what_the_name_names() -> None:
    assert {n: METHODS[n].names for n in methods.routed(Routing.BY_NAME)} == {
        "tools/call": "tool",
        "prompts/get": "prompt",
    }
    assert methods.routed(Routing.BY_URI) == {
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
    }
    assert methods.routed(Routing.BY_REF) == {"completion/complete"}


def test_eras_remove_exactly_the_session_methods_from_2026() -> None:
    removed = {n for n in KNOWN_METHODS if not methods.served(n, Era.MODERN)}
    assert removed == REMOVED_IN_MODERN
    assert all(methods.served(n, Era.LEGACY) for n in KNOWN_METHODS)
    assert not methods.served("notifications/initialized", Era.LEGACY)
    assert not methods.served("tools/cal", Era.MODERN)


def test_actions_are_the_policy_schema_actions() -> None:
    declared = {
        action
        for names in re.findall(r"\baction ([\w, ]+?)(?: in\b| appliesTo\b|;)", STUB)
        for action in names.split(", ")
    }
    assert {"read_resource", "subscribe_resource", "list_tools", "call_tool"} <= declared
    assert set(METHOD_ACTIONS.values()) <= declared
    assert {METHOD_ACTIONS[n] for n in methods.routed(Routing.LISTED)} == LIST_ACTIONS
    assert "tools/call" not in METHOD_ACTIONS  # each tool has its own action
    assert "resources/unsubscribe" not in METHOD_ACTIONS  # giving up access is not decided


def test_metrics_label_known_methods_only() -> None:
    assert all(method_label(name) == name for name in KNOWN_METHODS)
    assert method_label("tools/cal") == "other"
    assert method_label("notifications/initialized") == "other"


def test_a_flood_of_invented_methods_keeps_the_metrics_bounded() -> None:
    # The labelled children are cached for speed; a client names the method, so the cache
    # must be keyed by the label, or every invented method would stay in memory for good.
    metrics = Metrics()
    for n in range(500):
        metrics.answered("/mcp", f"x/{n}", "ok", 0.001, 0.002)
    metrics.answered("/mcp", "tools/call", "ok", 0.001, 0.002)
    series = {
        sample.labels["method"]
        for family in metrics.registry.collect()
        if family.name == "bastion_requests"
        for sample in family.samples
        if sample.name == "bastion_requests_total"
    }
    assert series == {"other", "tools/call"}
    assert len(metrics._answers) == 2  # noqa: SLF001 - the cache is what could grow


# -- no literals elsewhere -----------------------------------------------------------------


def _literals(path: Path) -> list[tuple[int, str]]:
    """Where a module spells out an MCP method name as a whole string constant."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in METHODS
    ]


def test_no_module_spells_out_method_names() -> None:
    found: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        if module == "methods.py":
            continue
        literals = _literals(path)
        if literals and module not in LITERALS_PENDING_SWITCH:
            found[module] = literals
    assert found == {}, "use the constants of bastion.methods instead"


def test_allow_list_holds_only_modules_with_literals() -> None:
    done = {m for m in LITERALS_PENDING_SWITCH if not _literals(SRC / m)}
    assert done == set(), "these switched to bastion.methods: remove them from the allow-list"


def test_the_scan_finds_a_literal(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""tools/call is named here in prose."""\nX = {"method": "tools/call"}\n')
    assert _literals(module) == [(2, "tools/call")]


# -- the gateway agrees with the table -------------------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15.0) as client:
        yield client


def _error(response: httpx.Response) -> dict[str, Any] | None:
    """The JSON-RPC error of a JSON answer; None for an SSE stream or a result."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return None
    body = json.loads(response.read())
    error = body.get("error")
    return dict(error) if isinstance(error, dict) else None


def _refused_as_unknown(error: dict[str, Any] | None) -> bool:
    return error is not None and error["code"] == -32601


@pytest.mark.parametrize("name", sorted(KNOWN_METHODS))
def test_a_2026_client_may_send_exactly_the_methods_of_its_era(
    gateway: GatewayProcess, http: httpx.Client, name: str
) -> None:
    # Streamed so that subscriptions/listen, whose stream stays open, is judged by its start.
    with http.stream(
        "POST", gateway.url(), json=modern_body(name), headers=modern_headers(name)
    ) as response:
        error = _error(response)
    if methods.served(name, Era.MODERN):
        assert not _refused_as_unknown(error), error
    else:
        assert response.status_code == 404
        assert error is not None and error["code"] == -32601
        assert "does not exist in 2026-07-28" in error["message"]


@pytest.mark.parametrize("name", sorted(KNOWN_METHODS - {"initialize", "subscriptions/listen"}))
def test_a_legacy_session_may_send_every_method_of_its_era(
    gateway: GatewayProcess, http: httpx.Client, name: str
) -> None:
    session = legacy_session(http, gateway.url())
    body = {"jsonrpc": "2.0", "id": 5, "method": name, "params": {}}
    with http.stream("POST", gateway.url(), json=body, headers=session) as response:
        error = _error(response)
    assert not _refused_as_unknown(error), error


def test_an_unknown_method_is_refused_in_both_eras(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    modern = http.post(
        gateway.url(), json=modern_body("tools/cal"), headers=modern_headers("tools/cal")
    )
    assert modern.status_code == 404 and modern.json()["error"]["code"] == -32601
    session = legacy_session(http, gateway.url())
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/cal", "params": {}}
    legacy = http.post(gateway.url(), json=body, headers=session)
    assert legacy.json()["error"]["code"] == -32601
