"""A hostile upstream's SSE stream: bounded memory per event, linear work per byte, and the
event-stream rules kept (LF, CRLF and CR line endings, data joining, ids, comments).

`HttpClient.read_events` is driven in process with a fake response whose chunks the test
chooses, so the limits are checked on exactly the bytes an attacker would send.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any, cast

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.config import HttpUpstream
from bastion.errors import UpstreamError
from bastion.sse import Decoder
from bastion.types import JSON
from bastion.upstream.http import MAX_EVENT_BYTES, HttpClient
from bastion.wire import Response

MiB = 1024 * 1024
LIMIT_MESSAGE = "upstream 'hostile' sent an event over 16 MiB"


class Chunks:
    """A response body sent as the given chunks, counting how many bytes were taken."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.taken = 0

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            self.taken += len(chunk)
            yield chunk


def client() -> HttpClient:
    settings = HttpUpstream(transport="http", url="http://127.0.0.1:9/mcp")
    return HttpClient("hostile", settings)


async def read_all(body: Chunks, decoder: Decoder | None = None) -> list[JSON]:
    events = client().read_events(cast(Response, body), decoder)
    return [message async for message in events]


def note(n: int, **params: Any) -> JSON:
    return {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"n": n, **params}}


def cut(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


# --- memory: the current event's data is bounded -------------------------------------------


def flood(lines: int, chunk: int) -> Iterator[bytes]:
    """`lines` data lines of 1 MiB each and no blank line: an event that never ends."""
    line = b"data: " + b"a" * MiB + b"\n"
    for _ in range(lines):
        yield from cut(line, chunk)


@pytest.mark.parametrize("chunk", [MiB + 7, 64 * 1024], ids=["line-per-chunk", "64KiB-chunks"])
async def test_an_event_of_many_data_lines_is_refused_at_the_limit(chunk: int) -> None:
    """The attack: 40 data lines of 1 MiB with no closing blank line (the review sent 600 and
    the gateway held 700 MB). No single line is long, so only the event's running size can
    stop it: the read ends with the limit named, having taken not much more than 16 MiB."""
    body = Chunks(flood(40, chunk))
    tracemalloc.start()
    try:
        with pytest.raises(UpstreamError) as caught:
            await read_all(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value) == LIMIT_MESSAGE
    assert caught.value.code == "upstream.error"
    assert MAX_EVENT_BYTES < body.taken <= MAX_EVENT_BYTES + 2 * MiB
    assert peak < MAX_EVENT_BYTES + 8 * MiB


async def test_comments_and_ids_between_data_lines_do_not_reset_the_count() -> None:
    """Only a blank line ends an event; other fields between the data lines change nothing."""

    def mixed() -> Iterator[bytes]:
        for line in flood(40, MiB + 7):
            yield line
            yield b": still here\nid: 7\nevent: message\r\n"

    with pytest.raises(UpstreamError, match="over 16 MiB"):
        await read_all(Chunks(mixed()))


async def test_one_unended_line_over_the_limit_is_refused() -> None:
    body = Chunks(cut(b"data: " + b"a" * (MAX_EVENT_BYTES + MiB), 256 * 1024))
    with pytest.raises(UpstreamError) as caught:
        await read_all(body)
    assert str(caught.value) == LIMIT_MESSAGE
    assert body.taken <= MAX_EVENT_BYTES + 256 * 1024


def padded_event(n: int, lines: int) -> bytes:
    """A message whose data is `lines` lines of about 1 MiB (a JSON array across lines)."""
    head = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"n":%d,"pad":[' % n
    pad = b'data: "' + b"b" * MiB + b'",\n'
    return head + b"\n" + pad * lines + b'data: ""]}}\n\n'


async def test_many_events_each_under_the_limit_all_pass() -> None:
    """The count is per event: three events of 10 MiB (30 MiB in all) are each delivered."""
    body = Chunks(padded_event(n, 10) for n in range(3))
    messages = await read_all(body)
    assert [m["params"]["n"] for m in messages] == [0, 1, 2]
    assert len(messages[2]["params"]["pad"]) == 11
    assert body.taken > MAX_EVENT_BYTES


# --- time: every byte is searched a bounded number of times --------------------------------

_SEARCHES = {"find", "rfind", "index", "rindex", "split", "rsplit", "splitlines", "partition"}
_SEARCHES |= {"rpartition", "count"}


class SearchMeter:
    """Sums the length of every bytes/bytearray searched for a line break while active: the
    work a line splitter does, independent of how fast this machine is."""

    def __init__(self) -> None:
        self.searched = 0
        self.calls = 0

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "c_call" or getattr(arg, "__name__", None) not in _SEARCHES:
            return
        haystack = getattr(arg, "__self__", None)
        if isinstance(haystack, bytes | bytearray):
            self.searched += len(haystack)
            self.calls += 1

    def __enter__(self) -> SearchMeter:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


async def test_a_long_line_in_small_chunks_is_searched_in_linear_work() -> None:
    """The attack: one 7 MiB line sent 1 KiB at a time (the review saw /healthz take 4.5 s).
    Re-splitting the whole buffer for every chunk searches ~25 GB in all; searching only each
    new chunk searches each byte about once."""
    message = note(1, pad="c" * (7 * MiB))
    stream = b"data: " + orjson.dumps(message) + b"\n\n"
    body = Chunks(cut(stream, 1024))
    with SearchMeter() as meter:
        messages = await read_all(body)
    assert messages == [message]
    assert meter.calls >= len(stream) // 1024  # the meter saw the splitter at work
    assert meter.searched <= 2 * len(stream)


# --- the event-stream rules are kept ------------------------------------------------------


def stream_with(eol: bytes) -> bytes:
    lines = [
        b": a comment, ignored",
        b"retry: 1500",
        b"id: first",
        b'data: {"jsonrpc":"2.0",',
        b'data: "method":"notifications/progress","params":{"n":1}}',
        b"",
        b"event: other",
        b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"n":99}}',
        b"",
        b"id: second",
        b"data",
        b"",
        b"data:" + orjson.dumps(note(2)),
        b"",
        b"id: third",
        b"data: " + orjson.dumps(note(3)),
    ]
    return eol.join(lines) + eol + eol


EXPECTED = [note(1), note(2), note(3)]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
async def test_line_endings_and_fields(eol: bytes) -> None:
    """Data lines join with a newline, `event:` other than message is skipped, a blank line
    dispatches, the last id is kept across events, comments are ignored."""
    decoder = Decoder()
    assert await read_all(Chunks(iter([stream_with(eol)])), decoder) == EXPECTED
    assert decoder.last_id == "third"
    assert decoder.retry == 1500


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
async def test_byte_at_a_time(eol: bytes) -> None:
    """A CRLF cut between its CR and its LF is still one line ending."""
    data = stream_with(eol)
    assert await read_all(Chunks(data[i : i + 1] for i in range(len(data)))) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
async def test_any_chunking_decodes_the_same(eol: bytes, cuts: list[int]) -> None:
    data = stream_with(eol)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert await read_all(Chunks(iter(chunks))) == EXPECTED


async def test_an_unfinished_last_event_is_not_dispatched() -> None:
    """A stream that ends without the blank line drops the partial event (SSE rules)."""
    data = b"data: " + orjson.dumps(note(1)) + b"\n\ndata: " + orjson.dumps(note(2)) + b"\n"
    assert await read_all(Chunks(iter([data]))) == [note(1)]
