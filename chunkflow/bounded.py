"""The ``n`` smallest items of a stream that comes in any order, in bounded memory.

``chunkflow inspect`` keeps examples of what it finds (malformed names, stray keys, refused
pieces) while it streams listings in no particular order (a directory read with ``os.scandir``).
Keeping the *first* ``n`` would make the report depend on that order; keeping the ``n`` smallest
makes it the same whatever the order, and the same as the first ``n`` of a sorted listing.
"""
from __future__ import annotations

from typing import Any, Generic, TypeVar

__all__ = ["Smallest"]

T = TypeVar("T")


class Smallest(Generic[T]):
    """The ``limit`` smallest items added, and how many were added (:attr:`count`).

    Holds at most ``2 x limit`` items: when the buffer fills it is sorted and cut to ``limit``, and
    from then on an item above the largest kept is dropped at once.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit {limit} must be at least 1")
        self.limit = int(limit)
        self.count = 0
        self._items: list[T] = []
        self._bound: Any = None  # the largest item kept after the last cut (None: no cut yet)

    def add(self, item: T) -> None:
        self.count += 1
        if self._bound is not None and not item < self._bound:
            return
        self._items.append(item)
        if len(self._items) >= 2 * self.limit:
            self._cut()

    def _cut(self) -> None:
        self._items.sort()
        del self._items[self.limit:]
        if len(self._items) == self.limit:
            self._bound = self._items[-1]

    def items(self) -> list[T]:
        """The kept items, smallest first."""
        self._cut()
        return list(self._items)

    def __len__(self) -> int:
        return min(len(self._items), self.limit)
