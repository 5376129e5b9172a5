"""Random ids for the request path, read from the kernel's CSPRNG a page at a time.

Every call needs a few: its request id, a trace id and a span id (and one per upstream call).
`os.urandom` per id is a system call each time; these are the same bytes, taken from a 4 KiB
page of `os.urandom` output, so one system call serves about a hundred calls. The bytes are as
unpredictable as `secrets.token_hex`'s and no byte is handed out twice: the page is taken
under a lock, and a forked child starts with a page of its own (it would otherwise repeat its
parent's next ids).
"""

from __future__ import annotations

import os
import threading

__all__ = ["random_hex"]

_PAGE = 4096


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._page = b""
        self._at = 0

    def take(self, size: int) -> bytes:
        if size > _PAGE:
            return os.urandom(size)
        with self._lock:
            end = self._at + size
            if end > len(self._page):
                self._page, self._at, end = os.urandom(_PAGE), 0, size
            taken = self._page[self._at : end]
            self._at = end
        return taken

    def forget(self) -> None:
        self._page, self._at = b"", 0
        self._lock = threading.Lock()


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.forget)


def random_hex(size: int) -> str:
    """`size` random bytes from the kernel's CSPRNG, in lower-case hex (as
    `secrets.token_hex(size)`), without a system call per id."""
    return _pool.take(size).hex()
