"""Waits that let Ctrl-C and SIGTERM through: short waits in a loop instead of one long one.

CPython runs a Python-level signal handler (Ctrl-C's ``KeyboardInterrupt``, the CLI's SIGTERM
handler) in the main thread only, between two bytecodes. A wait without a timeout
(``SimpleQueue.get()``, ``Thread.join()``, ``Event.wait()``, ``concurrent.futures.wait``) runs the
handlers only if the signal interrupts that very wait. A signal that the main thread received just
before it blocked (for instance while it waited for the GIL on its way into the wait: the
interpreter goes on into the call without running the handler), or that another thread received,
stays pending until the wait ends by itself: if what it waits for only ends once the interrupt has
been handled (tasks that run until cancelled), never. Each short wait here returns to the
interpreter at least every :data:`POLL` seconds, where pending handlers run.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Collection, TypeVar

#: seconds at most between two returns to the interpreter while waiting
POLL = 0.1

T = TypeVar("T")


def take(items: queue.SimpleQueue[T] | queue.Queue[T]) -> T:
    """The next item of ``items``, waiting as long as it takes."""
    while True:
        try:
            return items.get(timeout=POLL)
        except queue.Empty:
            continue


def join(thread: threading.Thread, timeout: float | None = None) -> bool:
    """Wait for ``thread`` to end (at most ``timeout`` seconds); whether it has ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive():
        left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
        if left <= 0:
            return False
        thread.join(left)
    return True


def wait_any(futures: Collection[Future]) -> None:
    """Wait until one of ``futures`` is done (at once if one is, or if there are none)."""
    while futures and not wait(futures, timeout=POLL, return_when=FIRST_COMPLETED).done:
        continue


def forever() -> None:
    """Wait until interrupted."""
    while True:
        time.sleep(POLL)
