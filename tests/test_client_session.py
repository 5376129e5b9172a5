"""One legacy client session as a replica holds it (pipeline/client_session.py): the requests
it keeps awaiting the client's answer stay bounded, and past the bound the oldest goes."""

from __future__ import annotations

from bastion.pipeline.client_session import MAX_PENDING_SERVER_REQUESTS, ClientSession
from bastion.types import Principal


def _session() -> ClientSession:
    return ClientSession(
        id="s",
        principal=Principal(tenant="acme", agent="agent-1"),
        route="default",
        protocol_version="2025-06-18",
        hello={},
        keep_events=4,
    )


async def test_past_the_cap_the_oldest_of_the_gateways_own_questions_is_dropped() -> None:
    """Before the fix `popitem` dropped the newest question (the one just being asked next
    to go unanswered) and kept the oldest for ever; now the oldest is cancelled."""
    session = _session()
    asked = [session.ask() for _ in range(MAX_PENDING_SERVER_REQUESTS + 1)]
    assert len(session.asks) == MAX_PENDING_SERVER_REQUESTS
    (first_id, first), (second_id, _) = asked[0], asked[1]
    assert first.cancelled() and first_id not in session.asks
    assert second_id in session.asks and asked[-1][0] in session.asks


async def test_past_the_cap_the_oldest_server_request_is_dropped() -> None:
    session = _session()
    ids = [
        session.map_server_request("up", {"jsonrpc": "2.0", "id": n, "method": "ping"})["id"]
        for n in range(MAX_PENDING_SERVER_REQUESTS + 2)
    ]
    assert len(session.server_requests) == MAX_PENDING_SERVER_REQUESTS
    assert await session.take_request(str(ids[0])) is None
    assert await session.take_request(str(ids[1])) is None
    assert await session.take_request(str(ids[-1])) == ("up", MAX_PENDING_SERVER_REQUESTS + 1)
