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

from functools import lru_cache
from typing import Iterable

import numpy as np

from chunkflow.bbox import Bbox, Vec

BLEND_MODES = ("constant", "gaussian", "bump")


def weight_map(mode: str, patch: tuple[int, int, int]) -> np.ndarray:
    """The float32 weight map of one output patch (read-only, cached)."""
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode {mode!r} is not one of {', '.join(BLEND_MODES)}")
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
    patch = Vec(weights.shape)
    for origin in origins:
        box = Bbox(origin, origin + patch)
        overlap = box.intersect(region)
        if overlap.is_empty():
            continue
        total[overlap.slices(region)] += weights[overlap.slices(box)]
    return total
