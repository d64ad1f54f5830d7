"""The in-process engine: runs tasks in this process (tests, one-machine jobs, the stage scripts).

``LocalEngine(slots=2)`` (the default) runs up to two tasks at once, each in a thread of its own;
stage one (a task with ``for_slots``, :func:`pipelined`) up to ``2 x slots``, as a pipeline
(:mod:`chunkflow.stage_pipeline`): while one block holds the device, the next reads its input and
up to ``slots`` earlier ones normalise, write and donate their output behind it, so the model is
not kept waiting for I/O. Memory: at most ``slots`` tasks are in flight in this process (each a
stage-two block's band, or any task of another kind); stage-one tasks are bounded by the worker's
pipeline, at most ``slots`` blocks reading or on the model (input chunk, float32 output chunk) and
``slots`` writing behind (float32 output chunk); in ``stream``, besides those, at most ``slots - 1``
stage-two tasks while stage-one tasks remain. Results are yielded as tasks finish (completion order).

``LocalEngine(slots=1)`` runs tasks one after another, in order, in the calling thread. Since it
knows which task comes next, it tells a task that wants to know (one with a
``run_before(task, upcoming)`` method, like :class:`chunkflow.engines.task.StageTask`), so stage
one reads the next block's input while the current block computes. With two slots or more that
hint is not given: the second slot reads while the first computes.

A task that raises yields :class:`~chunkflow.engines.failures.Failed` and the others still run;
in ``stream``, a second task whose dependency failed is not run and yields
:class:`~chunkflow.engines.failures.NotRun` (``CHUNKFLOW_DEBUG``: the exception is raised once the
other tasks in flight have ended). A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM raised as one by
the CLI) in the calling thread asks the tasks in flight to stop (``cancel()`` of a task callable
that has one, like :class:`~chunkflow.engines.task.StageTask`: stage one stops at its next batch,
or finishes the writes it has started) and waits for their threads to end before it propagates,
so nothing of this engine writes after control returns; then ``resume()`` undoes the cancel for
later runs in this process. A second Ctrl-C while waiting leaves at once.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Callable, Hashable, Iterable, Iterator, Mapping, TypeVar

from chunkflow import interruptible
from chunkflow.errors import EngineError
from chunkflow.engines.failures import Failed, NotRun, debugging

log = logging.getLogger(__name__)

#: seconds an interrupted run waits for its running tasks before saying that it waits
STOP_QUIETLY = 2.0

T = TypeVar("T")
R = TypeVar("R")


class LocalEngine:
    """Runs tasks in this process, up to ``slots`` at a time (threads); the default for one machine."""

    name = "local"

    def __init__(self, slots: int = 2):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise EngineError(f"slots {slots!r} must be a positive integer")
        self.slots = slots

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], gpu: bool = False) -> Iterator[tuple[T, R | Failed]]:
        """``(task, result)`` for every task, as they finish (in order with one slot)."""
        if self.slots == 1:
            tasks = list(tasks)
            for i, task in enumerate(tasks):
                yield task, _call(fn, task, tasks[i + 1] if i + 1 < len(tasks) else None)
            return
        fn, threads = pipelined(fn, self.slots)
        with Slots(threads, fn) as slots:
            for task in tasks:
                finished = slots.next() if slots.full else None
                slots.start(task, _call, fn, task, None)  # before the result is handed on: no slot idles
                if finished is not None:
                    yield finished
            while slots.busy:
                yield slots.next()

    def stream(self, first: Callable[[T], R], second: Callable[[T], R], firsts: Iterable[T],
               dependencies: Mapping[T, Iterable[T]], gpu: bool = False) -> Iterator[tuple[int, T, object]]:
        """Run ``first`` over ``firsts`` and ``second(b)`` as soon as every task ``b`` depends on
        has run; yields ``(1 or 2, task, result)``. Dependencies outside ``firsts`` count as
        already satisfied; a ``b`` with a failed dependency yields ``NotRun``.

        One slot: ``firsts`` run in the order given. Two or more: in :func:`demand_order` (the
        dependencies of the first second tasks first), a ready second task goes before the next
        first one, and second tasks take at most ``slots - 1`` slots while first tasks remain."""
        if self.slots == 1:
            yield from self._stream_in_order(first, second, list(firsts), dependencies)
            return
        deps = Dependencies(firsts, dependencies)
        todo = deque(demand_order(deps.firsts, dependencies))
        running = {1: 0, 2: 0}
        first, threads = pipelined(first, self.slots)

        def fill() -> Iterator[tuple[int, T, object]]:
            """Start tasks until the slots are full; yields the NotRun of blocked second tasks."""
            while not slots.full:
                if deps.ready and running[2] < (self.slots - 1 if todo else self.slots):
                    b = deps.ready.popleft()
                    if deps.blocked(b):
                        yield 2, b, NotRun(deps.blocked(b))
                        continue
                    slots.start((2, b), _call, second, b, None)
                    running[2] += 1
                elif todo:
                    task = todo.popleft()
                    slots.start((1, task), _call, first, task, None)
                    running[1] += 1
                else:
                    return

        with Slots(threads, first, second) as slots:
            yield from fill()
            while slots.busy:
                (stage, task), result = slots.next()
                running[stage] -= 1
                if stage == 1:
                    deps.finished(task, isinstance(result, Failed))
                blocked = list(fill())  # the next tasks start before this result is handed on
                yield stage, task, result
                yield from blocked

    def _stream_in_order(self, first, second, firsts: list, dependencies) -> Iterator[tuple[int, object, object]]:
        """One slot: everything in the calling thread, a second task right after its last dependency."""
        deps = Dependencies(firsts, dependencies)
        while deps.ready:
            b = deps.ready.popleft()
            yield 2, b, _call(second, b, None)
        for i, task in enumerate(firsts):
            result = _call(first, task, firsts[i + 1] if i + 1 < len(firsts) else None)
            yield 1, task, result
            deps.finished(task, isinstance(result, Failed))
            while deps.ready:
                b = deps.ready.popleft()
                yield 2, b, NotRun(deps.blocked(b)) if deps.blocked(b) else _call(second, b, None)

    def prepare(self, job):
        return job

    def close(self) -> None:
        pass


def pipelined(fn: Callable, slots: int) -> tuple[Callable, int]:
    """``(fn, threads)`` to run ``fn`` with ``slots`` task slots: a task with ``for_slots`` (a
    stage-one :class:`~chunkflow.engines.task.StageTask`) says how many threads it wants, to
    pipeline its blocks within the bounds of ``slots``; any other runs ``slots`` at a time."""
    plan = getattr(fn, "for_slots", None)
    return plan(slots) if callable(plan) else (fn, slots)


class Dependencies:
    """Which second tasks can run, as first tasks finish (shared by the local and Dask engines).

    ``ready``: second tasks all of whose dependencies in ``firsts`` have finished, in the order
    they became ready (at the start: those with none, in the order of ``dependencies``)."""

    def __init__(self, firsts: Iterable[Hashable], dependencies: Mapping[Hashable, Iterable[Hashable]]):
        self.firsts = list(firsts)
        pending = set(self.firsts)
        self.waiting = {b: {d for d in deps if d in pending} for b, deps in dependencies.items()}
        self.dependents: dict[Hashable, list[Hashable]] = {}
        for b, deps in self.waiting.items():
            for d in deps:
                self.dependents.setdefault(d, []).append(b)
        self.failed_deps: dict[Hashable, list[Hashable]] = {}
        self.ready = deque(b for b, deps in self.waiting.items() if not deps)

    def finished(self, task: Hashable, failed: bool) -> None:
        """First task ``task`` has run (``failed``: it did not succeed)."""
        for b in self.dependents.get(task, ()):
            self.waiting[b].discard(task)
            if failed:
                self.failed_deps.setdefault(b, []).append(task)
            if not self.waiting[b]:
                self.ready.append(b)

    def blocked(self, b: Hashable) -> list[Hashable]:
        """The failed dependencies of second task ``b`` (empty: it may run)."""
        return self.failed_deps.get(b, [])


def demand_order(firsts: Iterable[T], dependencies: Mapping[T, Iterable[T]]) -> list[T]:
    """``firsts`` reordered so that second tasks become ready early: for each second task in the
    order of ``dependencies``, its dependencies not yet listed (in their order in ``firsts``);
    then the rest of ``firsts``. Over a raster block grid whose blocks depend on their
    neighbours this walks two-block-thick slabs: the first block is ready after 8 blocks
    instead of after a whole z-plane and a row (and then about one more per 4 blocks)."""
    firsts = list(firsts)
    position = {t: i for i, t in enumerate(firsts)}
    listed: set = set()
    order: list[T] = []
    for deps in dependencies.values():
        for d in sorted((d for d in deps if d in position and d not in listed), key=position.__getitem__):
            listed.add(d)
            order.append(d)
    order.extend(t for t in firsts if t not in listed)
    return order


class _Raised:
    """What a task's thread hands back when the call raised instead of returning."""

    def __init__(self, error: BaseException):
        self.error = error


class Slots:
    """Runs calls in up to ``size`` threads of their own and hands back their outcomes as they end.

    Leaving the ``with`` block early (an exception, a ``KeyboardInterrupt``, the consumer of a
    generator closing it) with calls still running asks them to stop (``cancel()`` of each of
    ``tasks`` that has one) and joins their threads before the block is left; then ``resume()``."""

    def __init__(self, size: int, *tasks: Callable):
        self.size, self.tasks = size, tasks
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: dict[Hashable, threading.Thread] = {}

    @property
    def busy(self) -> int:
        """Calls started whose outcome has not been taken yet."""
        return len(self._threads)

    @property
    def full(self) -> bool:
        return self.busy >= self.size

    def start(self, key: Hashable, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` in a new thread; its outcome comes back from :meth:`next` with ``key``."""
        if key in self._threads:
            raise ValueError(f"{key!r} is already running")
        thread = threading.Thread(target=self._run, args=(key, fn, args), name=f"chunkflow-slot-{key}",
                                  daemon=True)
        self._threads[key] = thread
        thread.start()

    def _run(self, key: Hashable, fn: Callable, args: tuple) -> None:
        try:
            self._outcomes.put((key, fn(*args)))
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread, raised there
            self._outcomes.put((key, _Raised(err)))

    def next(self) -> tuple[Hashable, object]:
        """``(key, outcome)`` of the next call to end; a call that raised raises here."""
        if not self._threads:
            raise RuntimeError("no call is running")
        key, outcome = interruptible.take(self._outcomes)  # never one long wait: see chunkflow.interruptible
        interruptible.join(self._threads.pop(key))
        if isinstance(outcome, _Raised):
            raise outcome.error
        return key, outcome

    def stop(self) -> None:
        """Ask the calls still running to stop, wait for their threads, then ``resume()``."""
        hooks = list({id(t): t for t in self.tasks}.values())
        for task in hooks:
            if callable(getattr(task, "cancel", None)):
                task.cancel()
        threads = list(self._threads.values())
        for thread in threads:  # quietly while it is quick: an interrupt reports itself in one line
            interruptible.join(thread, STOP_QUIETLY)
        if any(thread.is_alive() for thread in threads):
            log.warning("waiting for %d running tasks to stop (Ctrl-C again to leave them)",
                        sum(thread.is_alive() for thread in threads))
        for thread in threads:
            interruptible.join(thread)
        self._threads.clear()
        for task in hooks:
            if callable(getattr(task, "resume", None)):
                task.resume()

    def __enter__(self) -> "Slots":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if self._threads:
            self.stop()


def _call(fn: Callable[[T], R], task: T, upcoming: T | None) -> R | Failed:
    run_before = getattr(fn, "run_before", None)
    try:
        if run_before is None or upcoming is None:
            return fn(task)
        return run_before(task, upcoming)
    except Exception as err:  # noqa: BLE001 - one task's failure is reported, the others still run
        if debugging():
            raise
        return Failed.of(err)
