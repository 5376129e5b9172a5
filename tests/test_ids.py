"""Random ids from a page of `os.urandom`: never repeated, not across threads, not across a
fork (a child repeating its parent's next ids would give two processes the same trace and
request ids)."""

from __future__ import annotations

import os
import threading

from bastion.ids import random_hex


def test_ids_are_hex_of_the_size_asked_and_never_repeat() -> None:
    ids = [random_hex(16) for _ in range(5000)]  # more than one page of bytes
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(random_hex(8)) == 16
    assert len(random_hex(5000)) == 10000  # larger than a page: read on its own


def test_threads_never_get_the_same_bytes() -> None:
    taken: list[list[str]] = [[] for _ in range(8)]

    def take(into: list[str]) -> None:
        for _ in range(2000):
            into.append(random_hex(16))

    threads = [threading.Thread(target=take, args=(into,)) for into in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in taken for i in ids]
    assert len(set(every)) == len(every) == 16000


def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    random_hex(16)  # the parent holds a page with bytes left in it
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, random_hex(16).encode())
        os._exit(0)
    os.close(write)
    try:
        theirs = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert len(theirs) == 32
    assert theirs != random_hex(16)
