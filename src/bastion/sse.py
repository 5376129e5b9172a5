"""Server-Sent Events: encode events for clients, decode upstream streams incrementally."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KEEPALIVE", "Decoder", "Event", "encode", "encode_priming"]


@dataclass(slots=True)
class Event:
    """One decoded SSE event."""

    data: str
    id: str | None = None
    event: str = "message"
    retry: int | None = None


def encode(data: bytes, event_id: str | None = None) -> bytes:
    """One `message` event; JSON from orjson never contains a newline, so one data line."""
    if event_id is None:
        return b"event: message\ndata: " + data + b"\n\n"
    return b"event: message\nid: " + event_id.encode() + b"\ndata: " + data + b"\n\n"


def encode_priming(event_id: str, retry_ms: int | None = None) -> bytes:
    """An event with an id and empty data, so a client can resume from here (2025-11-25)."""
    retry = f"retry: {retry_ms}\n".encode() if retry_ms is not None else b""
    return b"id: " + event_id.encode() + b"\n" + retry + b"data: \n\n"


KEEPALIVE = b": keep-alive\n\n"


class Decoder:
    """Incremental SSE parser: feed lines, get events (WHATWG event-stream rules)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None
        self._event = ""
        self._retry: int | None = None
        self._last_retry: int | None = None

    @property
    def last_id(self) -> str | None:
        """The last event id seen (kept across events, as the SSE standard says)."""
        return self._id

    @property
    def retry(self) -> int | None:
        """The last reconnection delay the server asked for, in milliseconds."""
        return self._last_retry

    def feed_line(self, raw: bytes) -> Event | None:
        """Take one line (with or without its line ending); return an event when one ends."""
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "retry" and value.isdigit():
            self._retry = self._last_retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data = "\n".join(self._data)
        event = Event(data=data, id=self._id, event=self._event or "message", retry=self._retry)
        self._data = []
        self._event = ""
        self._retry = None
        return event if data else None
