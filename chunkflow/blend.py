"""Blending weights and the global weight sum (pure numpy, no I/O).

Every patch output ``y`` is multiplied by a weight map ``w`` and divided by the global weight
sum ``N(x) = sum over all grid patches of w(x - origin)``. ``N`` depends only on the grid, so
any worker can compute it for any region without seeing data, and after normalisation the
contributions of different workers simply add.

Weight maps (all float32, strictly positive so ``N`` never vanishes):

``constant``
    ``w = 1``: plain averaging of overlapping patches.
``gaussian``
    Exactly MONAI's ``compute_importance_map(mode="gaussian", sigma_scale=0.125)``: per axis
    ``g_i = exp(-t_i^2 / (2 sigma^2))`` with ``t_i = i - (n-1)/2`` and ``sigma = 0.125 n``;
    ``w`` is the outer product, then clamped from below at ``max(min(w), 1e-3)``.
``bump``
    The bump map of the original chunkflow: per axis ``t_i = 2(i+1)/(n+1) - 1`` (so ``|t| < 1``),
    ``b = exp(-sum_axes 1/(1 - t^2))``, then rescaled linearly so its minimum is 1 and its
    maximum 1e6 (a constant map if the patch is a single voxel).
"""
from __future__ import annotations

import bisect
import itertools
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import GeometryError
from chunkflow.weight_sum_classes import AxisClasses

BLEND_MODES = ("constant", "gaussian", "bump")


def weight_map(mode: str, patch: tuple[int, int, int]) -> np.ndarray:
    """The float32 weight map of one output patch (read-only, cached)."""
    if mode not in BLEND_MODES:
        raise GeometryError(f"blend mode {mode!r} is not one of {', '.join(BLEND_MODES)}")
    return _weight_map(mode, tuple(int(p) for p in patch))


@lru_cache(maxsize=16)
def _weight_map(mode: str, patch: tuple[int, int, int]) -> np.ndarray:
    if mode == "constant":
        w = np.ones(patch, dtype=np.float32)
    elif mode == "gaussian":
        w = _gaussian(patch)
    else:
        w = _bump(patch)
    w.setflags(write=False)
    return w


def _gaussian(patch: tuple[int, int, int]) -> np.ndarray:
    # Mirrors MONAI step by step in float32, including the order of the outer products.
    w = None
    for n in patch:
        sigma = n * 0.125
        t = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)[:n]
        g = np.exp(t ** 2 / np.float32(-2 * sigma ** 2)).astype(np.float32)
        w = g if w is None else w[..., None] * g
    assert w is not None
    floor = max(float(w.min()), 1e-3)
    return np.maximum(w, np.float32(floor)).astype(np.float32)


def _bump(patch: tuple[int, int, int]) -> np.ndarray:
    exponent = np.zeros(patch, dtype=np.float64)
    for axis, n in enumerate(patch):
        t = 2.0 * (np.arange(n) + 1) / (n + 1) - 1.0
        shape = [1, 1, 1]
        shape[axis] = n
        exponent = exponent + (1.0 / (1.0 - t ** 2)).reshape(shape)
    b = np.exp(-exponent)
    lo, hi = b.min(), b.max()
    if hi - lo <= 0:
        return np.ones(patch, dtype=np.float32)
    return (1.0 + (b - lo) / (hi - lo) * (1e6 - 1.0)).astype(np.float32)


def weight_sum(weights: np.ndarray, origins: Iterable[Vec], region: Bbox) -> np.ndarray:
    """``N(x)`` over ``region`` given the origins of every grid patch that overlaps it.

    Patches are added in the order given (grid order), so every worker, and the whole-volume
    reference, sums the same numbers in the same order at every voxel.
    """
    total = np.zeros(region.shape, dtype=np.float32)
    patch = weights.shape
    start, stop = tuple(region.start), tuple(region.stop)
    for origin in origins:
        lo = [max(o, a) for o, a in zip(origin, start)]
        hi = [min(o + p, b) for o, p, b in zip(origin, patch, stop)]
        if lo[0] >= hi[0] or lo[1] >= hi[1] or lo[2] >= hi[2]:
            continue
        total[lo[0] - start[0]:hi[0] - start[0], lo[1] - start[1]:hi[1] - start[1], lo[2] - start[2]:hi[2] - start[2]] \
            += weights[lo[0] - origin[0]:hi[0] - origin[0], lo[1] - origin[1]:hi[1] - origin[1],
                       lo[2] - origin[2]:hi[2] - origin[2]]
    return total


def _grid_weight_sum(weights: np.ndarray, axis_origins: Sequence[Sequence[int]], region: Bbox) -> np.ndarray:
    """:func:`weight_sum` over the product of per-axis origins (z-major, the grid order), with each
    axis' overlap computed once: the same additions in the same order, without per-patch boxes."""
    total = np.zeros(region.shape, dtype=np.float32)
    cuts = []
    for a, origins in enumerate(axis_origins):
        lo, hi, n = region.start[a], region.stop[a], weights.shape[a]
        cuts.append([(slice(max(o, lo) - lo, min(o + n, hi) - lo), slice(max(o, lo) - o, min(o + n, hi) - o))
                     for o in origins if max(o, lo) < min(o + n, hi)])
    for (tz, wz), (ty, wy), (tx, wx) in itertools.product(*cuts):
        total[tz, ty, tx] += weights[wz, wy, wx]
    return total


#: the largest N(x) slab computed at once, in voxels (4 MiB of float32), but at least one z-plane
SLAB_VOXELS = 1 << 20
#: :meth:`WeightSum.divide` divides by runs only if its boxes of runs hold this many voxels on average
MIN_RUN_BOX_VOXELS = 4096
#: axis ranges whose :class:`~chunkflow.weight_sum_classes.AxisClasses` a WeightSum keeps
CLASSES_CACHED = 64
#: bytes of compact sums a WeightSum keeps (one per placement of a box on the grid, about a patch each)
COMPACTS_CACHED_BYTES = 64 << 20


class WeightSum:
    """``N(x)`` of one patch grid, for any box, without a chunk-sized buffer.

    Args:
        weights: the output patch weight map.
        axis_origins: the sorted patch origins along z, y and x (the grid is their product).

    Values are exactly those of :func:`weight_sum` over the grid patches that overlap the box:
    each voxel sums the same numbers in the same (grid) order, wherever the box is cut. A
    constant map is separable, ``N = c_z(z) c_y(y) c_x(x)`` with ``c_a`` the number of patches
    covering the coordinate; a product of small integers is exact in float32, so that fast path
    is bit-identical too. The gaussian map (clamped) and the bump map (rescaled) are not
    separable; their ``N`` costs one add per covering patch per voxel, like the accumulation.
    """

    def __init__(self, weights: np.ndarray, axis_origins: Sequence[Sequence[int]]):
        self.weights = weights
        self.patch = Vec(weights.shape)
        self.origins = tuple(tuple(int(o) for o in axis) for axis in axis_origins)
        self.separable = bool(np.all(weights == 1))
        self._classes: dict[tuple[int, int, int], AxisClasses] = {}
        self._compacts: dict[tuple, np.ndarray] = {}  # by the three axes' source keys (AxisClasses.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_classes": {}, "_compacts": {}}  # caches stay with the process

    def covering(self, axis: int, lo: int, hi: int) -> Sequence[int]:
        """Origins along ``axis`` of the patches whose output overlaps ``[lo, hi)``."""
        origins = self.origins[axis]
        first = bisect.bisect_right(origins, lo - self.patch[axis])
        return origins[first:bisect.bisect_left(origins, hi)]

    def over(self, region: Bbox) -> np.ndarray:
        """float32 ``N`` over ``region`` (Z, Y, X): computed at the region's source coordinates only
        (:mod:`chunkflow.weight_sum_classes`) and spread to the others, the same values bit for bit."""
        if self.separable:
            counts = []
            for a in range(3):
                coords = np.arange(region.start[a], region.stop[a])
                origins = np.asarray(self.origins[a])
                covered = (np.searchsorted(origins, coords, side="right")
                           - np.searchsorted(origins, coords - self.patch[a], side="right"))
                counts.append(covered.astype(np.float32))
            return counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
        classes = self.classes(region)
        compact = self._compact(classes)
        for axis, c in enumerate(classes):
            compact = compact.take(c.compact_index, axis=axis)
        return compact

    def divide(self, acc: np.ndarray, region: Bbox) -> None:
        """``acc /= N`` in place over ``region`` (``acc`` is C, Z, Y, X), without a region-sized ``N``:
        in z-slabs whose compact sum holds at most :data:`SLAB_VOXELS`, each box of runs divided by
        its box of the compact sum (slab by slab through :meth:`over` where the runs are too short to
        be worth a numpy call each)."""
        if self.separable:
            self._divide_by_slabs(acc, region)
            return
        _, along_y, along_x = self.classes(region)
        for slab in region.z_slabs(max(1, SLAB_VOXELS // (along_y.size * along_x.size))):
            self._divide_by_runs(acc[(slice(None),) + slab.slices(region)], slab)

    def _divide_by_runs(self, acc: np.ndarray, region: Bbox) -> None:
        classes = self.classes(region)
        boxes = len(classes[0].runs) * len(classes[1].runs) * len(classes[2].runs)
        if boxes * MIN_RUN_BOX_VOXELS > region.size:
            self._divide_by_slabs(acc, region)
            return
        compact = self._compact(classes)
        for rz, ry, rx in itertools.product(*(c.runs for c in classes)):
            acc[:, rz.start:rz.stop, ry.start:ry.stop, rx.start:rx.stop] /= compact[
                rz.compact:rz.compact + rz.stop - rz.start, ry.compact:ry.compact + ry.stop - ry.start,
                rx.compact:rx.compact + rx.stop - rx.start]

    def _divide_by_slabs(self, acc: np.ndarray, region: Bbox) -> None:
        for slab in self.slabs(region):
            acc[(slice(None),) + slab.slices(region)] /= self.over(slab)

    def classes(self, region: Bbox) -> tuple[AxisClasses, AxisClasses, AxisClasses]:
        """The source coordinates and runs of ``region`` along z, y and x (cached per axis range)."""
        found = []
        for a in range(3):
            key = (a, region.start[a], region.stop[a])
            classes = self._classes.get(key)  # shared by a worker's threads: no look-then-read
            if classes is None:
                classes = AxisClasses.of(self.origins[a], self.patch[a], key[1], key[2])
                if len(self._classes) >= CLASSES_CACHED:
                    self._classes.clear()
                self._classes[key] = classes
            found.append(classes)
        return found[0], found[1], found[2]

    def _compact(self, classes: Sequence[AxisClasses]) -> np.ndarray:
        """``N`` at the source coordinates only (read-only), computed once for the boxes whose sources
        have the same keys (the interior blocks of a job): up to :data:`COMPACTS_CACHED_BYTES` kept."""
        key = (classes[0].keys, classes[1].keys, classes[2].keys)
        compact = self._compacts.get(key)  # shared by a worker's threads: no look-then-read
        if compact is None:
            compact = self._compute_compact(classes)
            compact.setflags(write=False)
            if sum(c.nbytes for c in list(self._compacts.values())) + compact.nbytes > COMPACTS_CACHED_BYTES:
                self._compacts.clear()
            if compact.nbytes <= COMPACTS_CACHED_BYTES:
                self._compacts[key] = compact
        return compact

    def _compute_compact(self, classes: Sequence[AxisClasses]) -> np.ndarray:
        """``N`` at the source coordinates only: one box per combination of source intervals."""
        compact = np.empty(tuple(c.size for c in classes), dtype=np.float32)
        laid_out = [list(zip(c.intervals, np.cumsum([0] + [b - a for a, b in c.intervals]))) for c in classes]
        for (iz, cz), (iy, cy), (ix, cx) in itertools.product(*laid_out):
            box = Bbox(Vec((iz[0], iy[0], ix[0])), Vec((iz[1], iy[1], ix[1])))
            ranges = [self.covering(a, box.start[a], box.stop[a]) for a in range(3)]
            compact[cz:cz + box.shape[0], cy:cy + box.shape[1], cx:cx + box.shape[2]] = \
                _grid_weight_sum(self.weights, ranges, box)
        return compact

    def slabs(self, region: Bbox, max_voxels: int | None = None) -> Iterable[Bbox]:
        """``region`` cut along z into slabs of at most ``max_voxels`` (default :data:`SLAB_VOXELS`;
        at least one plane each)."""
        plane = max(1, region.shape[1] * region.shape[2])
        return region.z_slabs(max(1, (max_voxels or SLAB_VOXELS) // plane))


def normalise(acc: np.ndarray, region: Bbox, normaliser: np.ndarray | WeightSum) -> None:
    """Divide ``acc`` (C, Z, Y, X over ``region``) by ``N`` in place, slab by slab for a WeightSum."""
    if isinstance(normaliser, np.ndarray):
        acc /= normaliser
        return
    normaliser.divide(acc, region)
