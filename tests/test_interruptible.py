"""Waits that let a Ctrl-C through even when the main thread did not receive the signal itself.

The kernel may hand a process's SIGINT to any of its threads; CPython then runs the Python
handler in the main thread, but only once that thread is back in the interpreter. Here the
signal is sent to a helper thread while the main thread waits: a plain ``get()``/``join()``/
``wait()`` stays blocked (the test's watchdog then ends the wait, and the test fails instead of
hanging), the waits of :mod:`chunkflow.interruptible` raise ``KeyboardInterrupt`` within a poll."""
from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from types import CodeType
from typing import Callable

import pytest

from chunkflow import interruptible

#: seconds the watchdog lets a wait ignore a pending Ctrl-C before it ends the wait itself
#: (a safety net for a broken wait, never reached by a working one: not a synchronisation)
WATCHDOG = 30.0


@pytest.fixture()
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt (earlier tests may have left another SIGINT handler behind)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def waits_in(code: CodeType) -> bool:
    """Whether the main thread is (somewhere) inside a call of ``code``."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class CtrlCElsewhere:
    """A thread that waits until the main thread is inside ``code``, then receives a SIGINT
    itself (so the main thread's wait is not interrupted by it); if :meth:`handled` is not called
    within :data:`WATCHDOG` seconds, it calls ``release()`` to end the main thread's wait and
    sets ``released`` (the interrupt was not honoured while the wait lasted)."""

    def __init__(self, code: CodeType, release: Callable[[], None]):
        self.code, self.release = code, release
        self.released, self._handled = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctrl-c-elsewhere", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + WATCHDOG
        while not waits_in(self.code) and time.monotonic() < deadline:
            time.sleep(0.001)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        if not self._handled.wait(WATCHDOG):
            self.released.set()
            self.release()

    def handled(self) -> None:
        self._handled.set()
        self._thread.join()


def _queue() -> tuple[Callable[[], object], Callable[[], None]]:
    items: queue.SimpleQueue = queue.SimpleQueue()
    return lambda: interruptible.take(items), lambda: items.put("released by the watchdog")


def _thread() -> tuple[Callable[[], object], Callable[[], None]]:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    return lambda: interruptible.join(thread), stop.set


def _futures() -> tuple[Callable[[], object], Callable[[], None]]:
    future: Future = Future()
    return lambda: interruptible.wait_any([future]), lambda: future.set_result("released by the watchdog")


def _forever() -> tuple[Callable[[], object], Callable[[], None]]:
    main = threading.main_thread().ident
    return interruptible.forever, lambda: signal.pthread_kill(main, signal.SIGINT)  # one that wakes the wait


@pytest.mark.parametrize("make, code", [(_queue, interruptible.take.__code__),
                                        (_thread, interruptible.join.__code__),
                                        (_futures, interruptible.wait_any.__code__),
                                        (_forever, interruptible.forever.__code__)],
                         ids=["take", "join", "wait_any", "forever"])
def test_a_ctrl_c_received_by_another_thread_ends_the_wait(ctrl_c, make, code):
    wait, release = make()
    helper = CtrlCElsewhere(code, release)
    try:
        with pytest.raises(KeyboardInterrupt):
            wait()
    finally:
        helper.handled()
    assert not helper.released.is_set(), "the wait went on until the watchdog ended it"


def test_join_gives_up_after_its_timeout():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    assert interruptible.join(thread, 0.05) is False
    stop.set()
    assert interruptible.join(thread) is True and not thread.is_alive()
