"""Where ``N(x)`` repeats: the voxels of a box that must hold the same weight sum, per axis.

``N`` at a voxel is the float32 sum, from zero and in grid order, of ``w(x - origin)`` over the
patches that cover it (:func:`chunkflow.blend.weight_sum`). Along one axis, what a coordinate ``c``
contributes to that sum is its *key*: the offsets ``c - o`` to the origins ``o`` covering it, in
origin order. Two voxels whose keys agree on all three axes add the same numbers in the same
order, so their ``N`` is the same float32 value, bit for bit, whatever the weight map.

On a regular grid the key of ``c`` repeats every stride (away from the faces, where the last
origin is snapped), so a box needs ``N`` only at its *source* coordinates, the first coordinate of
each key, roughly one stride per axis instead of the whole box: :class:`AxisClasses` finds them,
and :class:`chunkflow.blend.WeightSum` computes ``N`` over the sources alone (the *compact* sum)
and spreads or divides by it along the runs below.

A *run* is a maximal range of coordinates whose sources are consecutive coordinates too, so a
box of runs (one per axis) reads one contiguous box of the compact sum.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["AxisClasses", "Run"]


@dataclass(frozen=True)
class Run:
    """Coordinates ``[start, stop)`` of the box (relative to its start) take ``N`` from the compact
    sum's ``[compact, compact + stop - start)`` along this axis."""

    start: int
    stop: int
    compact: int


@dataclass(frozen=True)
class AxisClasses:
    """One axis of a box ``[lo, hi)``: its source coordinates and runs.

    Attributes:
        intervals: the source coordinates as disjoint sorted absolute ranges ``(a, b)``; the
            compact sum lays them out one after the other along this axis.
        runs: the box's coordinates, in order, as :class:`Run`\\ s.
        compact_index: for each coordinate of the box, its source's index in the compact sum.
        keys: the key of each source, in the compact sum's order: the compact sum is a function of
            the three axes' ``keys`` alone (and the weight map), so boxes placed alike on the grid
            (the interior blocks of a job) share it (:meth:`chunkflow.blend.WeightSum.divide`).
    """

    intervals: tuple[tuple[int, int], ...]
    runs: tuple[Run, ...]
    compact_index: np.ndarray
    keys: tuple[tuple[int, ...], ...] = ()

    @property
    def size(self) -> int:
        """Source coordinates along this axis (the compact sum's extent)."""
        return sum(b - a for a, b in self.intervals)

    @classmethod
    def of(cls, origins: Sequence[int], patch: int, lo: int, hi: int) -> "AxisClasses":
        """The classes of ``[lo, hi)`` for sorted patch ``origins`` of extent ``patch`` along this axis."""
        first: dict[tuple[int, ...], int] = {}
        source = []
        for c in range(lo, hi):
            covering = origins[bisect.bisect_right(origins, c - patch):bisect.bisect_right(origins, c)]
            source.append(first.setdefault(tuple(c - o for o in covering), c))
        sources = sorted(first.values())
        intervals: list[tuple[int, int]] = []
        for s in sources:
            if intervals and intervals[-1][1] == s:
                intervals[-1] = (intervals[-1][0], s + 1)
            else:
                intervals.append((s, s + 1))
        position = {s: i for i, s in enumerate(sources)}
        compact_index = np.fromiter((position[s] for s in source), dtype=np.intp, count=len(source))
        runs: list[Run] = []
        for i, s in enumerate(source):
            if runs and source[i - 1] + 1 == s:
                continue
            if runs:
                runs[-1] = Run(runs[-1].start, i, runs[-1].compact)
            runs.append(Run(i, len(source), position[s]))
        key_of = {c: key for key, c in first.items()}
        return cls(tuple(intervals), tuple(runs), compact_index, tuple(key_of[s] for s in sources))
