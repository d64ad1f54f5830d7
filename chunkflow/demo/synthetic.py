"""Synthetic, EM-like volumes with a known membrane mask.

Why this exists: chunkflow's demo, its tests and the built-in membrane U-Net need image data that
looks enough like serial-section electron microscopy of neuropil to make the pipeline's output
meaningful (a blended membrane map you can eyeball), without downloading anything. The ground
truth mask lets the training script fit the demo net and lets tests check that it really detects
membranes rather than noise.

How it is made (numpy only, no scipy):

1. **Cells** are a Voronoi tessellation of seed points placed in *physical* space (nm). Seeds are
   jittered on a regular grid, so the nearest seed of any voxel is within the 3x3x3 neighbouring grid
   cells; each seed therefore only needs to be compared against voxels in a small box around it,
   which keeps labelling fast. Distances along z are divided by ``elongation`` so cells are longer
   along z than across (like neurites cut roughly transversely), and because the grid lives in nm,
   the 40 nm z vs 8 nm xy anisotropy shows up correctly in voxel space.
2. **Membranes** are label boundaries in the xy plane: a voxel is membrane when its cell label
   differs from a neighbour along y or x (both sides are marked, so membranes are ~2 voxels wide).
3. **Intensity**: bright cytoplasm with a per-cell offset and smooth texture, dark membranes, a few
   dark ellipsoidal organelles (so "dark" alone is not "membrane"), a slight xy blur (the point
   spread of the microscope) and Gaussian noise, quantised to uint8.

Everything is a deterministic function of the arguments (``numpy.random.default_rng(seed)``).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["make_em_volume", "voronoi_labels", "membrane_from_labels"]


def voronoi_labels(
    shape: Sequence[int],
    resolution: Sequence[float],
    rng: np.random.Generator,
    cell_size_nm: float = 480.0,
    elongation: float = 2.0,
) -> np.ndarray:
    """Label every voxel with the index of its nearest seed (a Voronoi tessellation).

    Seeds lie on a jittered grid of spacing ``cell_size_nm`` in a metric where z distances are
    divided by ``elongation``. With jitter of at most half a grid cell, a voxel's nearest seed is
    always in one of the 27 grid cells around the voxel's own grid cell, so each seed is only
    compared against the voxels in a box three grid cells wide around its grid cell.
    """
    shape = tuple(int(s) for s in shape)
    res = np.asarray(resolution, dtype=np.float64)
    # metric scale per axis: position in "metric nm" = voxel index * scale
    scale = res / np.array([elongation, 1.0, 1.0])
    extent = np.asarray(shape) * scale
    ncell = np.maximum(1, np.ceil(extent / cell_size_nm).astype(int))
    spacing = extent / ncell
    # voxel coordinate (metric) along each axis, at voxel centres
    coords = [(np.arange(n) + 0.5) * s for n, s in zip(shape, scale)]
    cell_of = [np.minimum((c / sp).astype(int), nc - 1) for c, sp, nc in zip(coords, spacing, ncell)]

    best = np.full(shape, np.inf, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int32)
    label = 0
    for gz in range(ncell[0]):
        for gy in range(ncell[1]):
            for gx in range(ncell[2]):
                g = np.array([gz, gy, gx])
                seed = (g + 0.5 + rng.uniform(-0.45, 0.45, size=3)) * spacing
                label += 1
                # voxel index range covered by grid cells g-1 .. g+1 on each axis
                sl = []
                for axis in range(3):
                    idx = np.nonzero(np.abs(cell_of[axis] - g[axis]) <= 1)[0]
                    sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
                dz = ((coords[0][sl[0]] - seed[0]) ** 2).astype(np.float32)
                dy = ((coords[1][sl[1]] - seed[1]) ** 2).astype(np.float32)
                dx = ((coords[2][sl[2]] - seed[2]) ** 2).astype(np.float32)
                d = dz[:, None, None] + dy[None, :, None] + dx[None, None, :]
                view_best = best[sl[0], sl[1], sl[2]]
                closer = d < view_best
                view_best[closer] = d[closer]
                labels[sl[0], sl[1], sl[2]][closer] = label
    return labels


def membrane_from_labels(labels: np.ndarray) -> np.ndarray:
    """Mark voxels whose label differs from a y or x neighbour (both sides: ~2 voxels wide)."""
    mask = np.zeros(labels.shape, dtype=bool)
    dy = labels[:, 1:, :] != labels[:, :-1, :]
    mask[:, 1:, :] |= dy
    mask[:, :-1, :] |= dy
    dx = labels[:, :, 1:] != labels[:, :, :-1]
    mask[:, :, 1:] |= dx
    mask[:, :, :-1] |= dx
    return mask


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Separable Gaussian blur along one axis with edge replication (numpy only)."""
    if sigma <= 0:
        return a
    radius = max(1, int(round(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, radius)
    p = np.pad(a, pad, mode="edge")
    out = np.zeros_like(a, dtype=np.float32)
    n = a.shape[axis]
    for i, w in enumerate(k):
        out += w * np.take(p, np.arange(i, i + n), axis=axis)
    return out


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, factor: Sequence[int]) -> np.ndarray:
    """Smooth random texture: coarse white noise, upsampled by repetition, then blurred."""
    coarse_shape = [max(1, -(-s // f)) for s, f in zip(shape, factor)]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    up = coarse
    for axis, f in enumerate(factor):
        up = np.repeat(up, f, axis=axis)
    up = up[tuple(slice(0, s) for s in shape)]
    for axis, f in enumerate(factor):
        if f > 1:
            up = _blur_axis(up, f / 2.0, axis)
    return up / (up.std() + 1e-6)


def _add_organelles(
    image: np.ndarray, membrane: np.ndarray, rng: np.random.Generator, resolution: np.ndarray, count: int
) -> None:
    """Paint a few dark ellipsoids (mitochondria/vesicle clusters) inside cells, in place."""
    shape = np.asarray(image.shape)
    for _ in range(count):
        centre = rng.uniform(0, 1, size=3) * shape
        radii_nm = rng.uniform(60.0, 140.0, size=3)
        radii_nm[0] *= 1.5  # a little longer along z, like mitochondria along a neurite
        radii = radii_nm / resolution
        lo = np.maximum(0, np.floor(centre - radii).astype(int))
        hi = np.minimum(shape, np.ceil(centre + radii).astype(int) + 1)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        r2 = (
            ((zz + 0.5 - centre[0]) / radii[0]) ** 2
            + ((yy + 0.5 - centre[1]) / radii[1]) ** 2
            + ((xx + 0.5 - centre[2]) / radii[2]) ** 2
        )
        inside = (r2 <= 1.0) & ~membrane[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        region = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        region[inside] = 0.45 * region[inside] + 0.55 * 95.0


def make_em_volume(
    shape: Sequence[int] = (64, 256, 256),
    seed: int = 0,
    resolution: Sequence[float] = (40, 8, 8),
    cell_size_nm: float = 480.0,
    noise: float = 12.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Make an EM-like uint8 ZYX image and its boolean ZYX membrane mask.

    ``resolution`` is the voxel size in nm (ZYX); cells are laid out in physical space so an
    anisotropic resolution gives cells spanning fewer voxels in z than in y, x. ``noise`` is the
    standard deviation of the additive Gaussian noise in grey levels. Same arguments, same arrays.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive ZYX sizes, got {shape}")
    res = np.asarray(resolution, dtype=np.float64)
    if res.shape != (3,) or np.any(res <= 0):
        raise ValueError(f"resolution must be three positive ZYX sizes in nm, got {tuple(resolution)}")
    rng = np.random.default_rng(seed)

    labels = voronoi_labels(shape, res, rng, cell_size_nm=cell_size_nm)
    membrane = membrane_from_labels(labels)

    # cytoplasm: bright, a per-cell offset, smooth texture
    cell_offset = rng.normal(0.0, 12.0, size=int(labels.max()) + 1).astype(np.float32)
    image = 175.0 + cell_offset[labels]
    image += 10.0 * _smooth_noise(shape, rng, factor=(2, 8, 8))
    image += 5.0 * _smooth_noise(shape, rng, factor=(1, 2, 2))
    # membranes: dark, with some variation of contrast along their length
    contrast = 0.8 + 0.2 * _smooth_noise(shape, rng, factor=(2, 16, 16))
    image = np.where(membrane, 60.0 + 25.0 * (1.0 - contrast), image).astype(np.float32)

    volume_nm3 = float(np.prod(np.asarray(shape) * res))
    n_organelles = max(1, int(round(volume_nm3 / 5e8)))
    _add_organelles(image, membrane, rng, res, n_organelles)

    # point spread (mostly in-plane) then detector noise
    image = _blur_axis(image, 0.7, axis=1)
    image = _blur_axis(image, 0.7, axis=2)
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    logger.debug(
        "synthetic EM volume %s seed=%d: %d cells, %d organelles, membrane fraction %.3f",
        shape, seed, int(labels.max()), n_organelles, float(membrane.mean()),
    )
    return out, membrane
