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
    keys: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        """Source coordinates along this axis (the compact sum's extent)."""
        return sum(b - a for a, b in self.intervals)

    @classmethod
    def of(cls, origins: Sequence[int], patch: int, lo: int, hi: int) -> "AxisClasses":
        """The classes of ``[lo, hi)`` for sorted patch ``origins`` of extent ``patch`` along this axis
        (the covering origins found in numpy: a search per coordinate cost a millisecond a block)."""
        if hi <= lo:
            return cls((), (), np.empty(0, dtype=np.intp), ())
        o = np.asarray(origins, dtype=np.int64)
        coords = np.arange(lo, hi, dtype=np.int64)
        first = np.searchsorted(o, coords - patch, side="right")  # covering origins: o[first:stop]
        count = np.searchsorted(o, coords, side="right") - first
        width = max(1, int(count.max(initial=0)))
        index = np.minimum(first[:, None] + np.arange(width)[None, :], max(0, len(o) - 1))
        offsets = (coords[:, None] - o[index]).tolist() if len(o) else [[]] * len(coords)
        seen: dict[tuple[int, ...], int] = {}  # each key at its first coordinate (inserted in order)
        keyed = enumerate(zip(offsets, count.tolist()))
        source = np.fromiter((seen.setdefault(tuple(row[:k]), c) for c, (row, k) in keyed), dtype=np.intp,
                             count=len(coords))
        sources = np.fromiter(seen.values(), dtype=np.intp, count=len(seen))  # sorted: first sightings
        compact_index = np.searchsorted(sources, source).astype(np.intp)
        cuts = [0] + (np.flatnonzero(np.diff(sources) != 1) + 1).tolist() + [len(sources)]
        intervals = tuple((lo + int(sources[a]), lo + int(sources[b - 1]) + 1) for a, b in zip(cuts, cuts[1:]))
        starts = [0] + (np.flatnonzero(np.diff(source) != 1) + 1).tolist() + [len(source)]
        runs = tuple(Run(a, b, int(compact_index[a])) for a, b in zip(starts, starts[1:]))
        return cls(intervals, runs, compact_index, tuple(seen))
