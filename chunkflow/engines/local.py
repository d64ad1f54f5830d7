"""The in-process engine: runs tasks one after another in this process (tests, small jobs).

Since it knows which task comes next, it tells a task that wants to know (one with a
``run_before(task, upcoming)`` method, like :class:`chunkflow.engines.task.StageTask`), so
stage one reads the next block's input while the current block computes.

A task that raises yields :class:`~chunkflow.engines.failures.Failed` and the others still run;
in ``stream``, a second task whose dependency failed is not run and yields
:class:`~chunkflow.engines.failures.NotRun` (``CHUNKFLOW_DEBUG``: the exception is raised).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from chunkflow.engines.failures import Failed, NotRun, debugging

T = TypeVar("T")
R = TypeVar("R")


class LocalEngine:
    """Runs each task in this process, in order; the default for small volumes and tests."""

    name = "local"

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], gpu: bool = False) -> Iterator[tuple[T, R | Failed]]:
        tasks = list(tasks)
        for i, task in enumerate(tasks):
            yield task, _call(fn, task, tasks[i + 1] if i + 1 < len(tasks) else None)

    def stream(self, first: Callable[[T], R], second: Callable[[T], R], firsts: Iterable[T],
               dependencies: Mapping[T, Iterable[T]], gpu: bool = False) -> Iterator[tuple[int, T, object]]:
        """Run ``first`` over ``firsts`` in order and ``second(b)`` as soon as every task ``b``
        depends on has run; yields ``(1 or 2, task, result)``. Dependencies outside ``firsts``
        count as already satisfied; a ``b`` with a failed dependency yields ``NotRun``."""
        firsts = list(firsts)
        pending = set(firsts)
        waiting = {b: {d for d in deps if d in pending} for b, deps in dependencies.items()}
        failed_deps: dict[T, list[T]] = {}
        dependents: dict[T, list[T]] = {}
        for b, deps in waiting.items():
            for d in deps:
                dependents.setdefault(d, []).append(b)
        for b in [b for b, deps in waiting.items() if not deps]:
            yield 2, b, _call(second, b, None)
        for i, task in enumerate(firsts):
            result = _call(first, task, firsts[i + 1] if i + 1 < len(firsts) else None)
            yield 1, task, result
            for b in dependents.get(task, ()):
                waiting[b].discard(task)
                if isinstance(result, Failed):
                    failed_deps.setdefault(b, []).append(task)
                if not waiting[b]:
                    yield 2, b, NotRun(failed_deps[b]) if b in failed_deps else _call(second, b, None)

    def prepare(self, job):
        return job

    def close(self) -> None:
        pass


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
