"""The in-process engine: runs tasks one after another in this process (tests, small jobs)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class LocalEngine:
    """Runs each task in this process, in order; the default for small volumes and tests."""

    name = "local"

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[tuple[T, R]]:
        for task in tasks:
            yield task, fn(task)

    def close(self) -> None:
        pass
