"""The in-process engine: runs tasks one after another in this process (tests, small jobs).

Since it knows which task comes next, it tells a task that wants to know (one with a
``run_before(task, upcoming)`` method, like :class:`chunkflow.engines.task.StageTask`), so
stage one reads the next block's input while the current block computes.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class LocalEngine:
    """Runs each task in this process, in order; the default for small volumes and tests."""

    name = "local"

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], gpu: bool = False) -> Iterator[tuple[T, R]]:
        tasks = list(tasks)
        for i, task in enumerate(tasks):
            yield task, _call(fn, task, tasks[i + 1] if i + 1 < len(tasks) else None)

    def stream(self, first: Callable[[T], R], second: Callable[[T], R], firsts: Iterable[T],
               dependencies: Mapping[T, Iterable[T]], gpu: bool = False) -> Iterator[tuple[int, T, R]]:
        """Run ``first`` over ``firsts`` in order and ``second(b)`` as soon as every task ``b``
        depends on has run; yields ``(1 or 2, task, result)``. Dependencies outside ``firsts``
        count as already satisfied."""
        firsts = list(firsts)
        pending = set(firsts)
        waiting = {b: {d for d in deps if d in pending} for b, deps in dependencies.items()}
        dependents: dict[T, list[T]] = {}
        for b, deps in waiting.items():
            for d in deps:
                dependents.setdefault(d, []).append(b)
        for b in [b for b, deps in waiting.items() if not deps]:
            yield 2, b, second(b)
        for i, task in enumerate(firsts):
            yield 1, task, _call(first, task, firsts[i + 1] if i + 1 < len(firsts) else None)
            for b in dependents.get(task, ()):
                waiting[b].discard(task)
                if not waiting[b]:
                    yield 2, b, second(b)

    def prepare(self, job):
        return job

    def close(self) -> None:
        pass


def _call(fn: Callable[[T], R], task: T, upcoming: T | None) -> R:
    run_before = getattr(fn, "run_before", None)
    if run_before is None or upcoming is None:
        return fn(task)
    return run_before(task, upcoming)
