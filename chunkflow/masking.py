"""Masks (``--mask LAYER``): patches whose output box is empty in the mask are not computed.

A masked patch counts as predicting zeros: it is left out of the sum while its weight stays in
the normalisation ``N(x)`` (which is a function of the grid alone). So the output is exactly
the whole-volume reference of a model that outputs zero on those patches, with no seams.

The mask may be any level of a precomputed or zarr layer, typically a low-resolution tissue
mask. A patch's output box is mapped onto the mask through physical coordinates (voxel index
times voxel size, at the input's ``--mip`` and at the mask's ``--mask-mip``), rounded outward,
and the patch is kept if any mask voxel there is non-zero. Mask voxels outside the mask's own
bounds count as zero (outside the tissue).

A block none of whose own patches is kept gets no stage-one task and sends no donations: plan
records such blocks in the job store (``mask/blocks.bin``, one bit per block in raster order),
and stage two takes the pieces those blocks would have sent as zeros.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import JobError

if TYPE_CHECKING:
    from chunkflow.block_set import BlockGrid, BlockSet

log = logging.getLogger(__name__)

BLOCK_MAP = "mask/blocks.bin"
#: sha256 of the mask under the region as planned (:func:`mask_digest`): a mask changed in place and
#: planned again is refused, not mixed with the planned block map
MASK_DIGEST = "mask/digest.sha256"
#: read the mask over the whole region at once below this many bytes, else block by block
WHOLE_READ_BYTES = 256 << 20


class PatchMask:
    """Decides which patches to compute, from a mask volume.

    Args:
        mask: the opened mask volume (any dtype; non-zero = compute).
        input_resolution: voxel size (ZYX, nm) of the job's input at its mip level.
        patch: the output patch size (ZYX).
    """

    def __init__(self, mask, input_resolution: Sequence[float], patch: Vec) -> None:
        self.mask = mask
        self.patch = Vec(patch)
        self.ratio = tuple(float(i) / float(m) for i, m in zip(input_resolution, mask.resolution))

    def mask_box(self, box: Bbox) -> Bbox:
        """The mask voxels under ``box`` (input voxels), rounded outward."""
        start = Vec(math.floor(s * r + 1e-9) for s, r in zip(box.start, self.ratio))
        stop = Vec(math.ceil(s * r - 1e-9) for s, r in zip(box.stop, self.ratio))
        return Bbox(start, Vec(max(a + 1, b) for a, b in zip(start, stop)))

    def read(self, box: Bbox) -> tuple[np.ndarray, Bbox]:
        """Whether each mask voxel under ``box`` is non-zero (channels or-ed), and the mask box read."""
        where = self.mask_box(box)
        data = self.mask.read(where, pad_mode="constant")
        return np.any(data != 0, axis=0), where

    def keep(self, origins: Iterable[Vec], within: Bbox | None = None,
             region: tuple[np.ndarray, Bbox] | None = None) -> list[Vec]:
        """The origins whose output patch touches a non-zero mask voxel. ``within``: a box holding
        every patch (the mask is read over it once); or ``region``: a mask already read."""
        origins = list(origins)
        if not origins:
            return []
        if region is None:
            if within is None:
                within = Bbox(Vec(min(o[a] for o in origins) for a in range(3)),
                              Vec(max(o[a] for o in origins) for a in range(3)) + self.patch)
            region = self.read(within)
        data, where = region
        kept = []
        for origin in origins:
            sub = self.mask_box(Bbox(origin, origin + self.patch))
            if data[sub.slices(where)].any():
                kept.append(origin)
        return kept


def open_mask(job, input_resolution: Sequence[float]) -> PatchMask | None:
    """The job's :class:`PatchMask`, or None for a job without a mask."""
    if not job.mask:
        return None
    from chunkflow.storage import open_volume

    return PatchMask(open_volume(job.mask, missing="zeros", mip=job.mask_mip), input_resolution,
                     Vec(job.output_patch))


def masked_blocks(job, mask: PatchMask) -> tuple[np.ndarray, int]:
    """For every block in raster order, whether none of its own patches is kept; and how many
    patches are kept in all. Reads the mask over the whole region at once when it is small,
    else block by block."""
    layout = job.layout
    grid = tuple(layout.grid_shape)
    masked = np.zeros(int(np.prod(grid)), dtype=bool)
    whole = mask.mask_box(layout.bbox)
    region = mask.read(layout.bbox) if whole.size * mask.mask.dtype.itemsize <= WHOLE_READ_BYTES else None
    kept_patches = 0
    for i, block in enumerate(layout.block_indices()):
        own = layout.own_origins(block)
        chunk = layout.chunk_box(block)
        kept = mask.keep(own, region=region) if region is not None else \
            mask.keep(own, within=chunk) if chunk is not None else []
        kept_patches += len(kept)
        masked[i] = not kept
    return masked, kept_patches


def mask_digest(job, mask: PatchMask) -> str | None:
    """sha256 of where the mask is non-zero under the job's region (one read, no per-patch work), or
    None where that read would exceed :data:`WHOLE_READ_BYTES` (such a mask is not re-verified)."""
    box = mask.mask_box(job.layout.bbox)
    if box.size * mask.mask.dtype.itemsize > WHOLE_READ_BYTES:
        return None
    data, where = mask.read(job.layout.bbox)
    return hashlib.sha256(where.name.encode() + np.packbits(data).tobytes()).hexdigest()


def encode_block_map(masked: np.ndarray) -> bytes:
    return np.packbits(masked.astype(np.uint8)).tobytes()


def decode_block_map(data: bytes, num_blocks: int, where: str) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(bits) < num_blocks or len(bits) - num_blocks >= 8:
        raise JobError(f"{where} holds {len(bits)} bits for {num_blocks} blocks: not this job's block map; "
                       "rerun `chunkflow plan` with the same flags")
    return bits[:num_blocks].astype(bool)


def load_block_map(job, store) -> np.ndarray | None:
    """The job's block map from its store (None for a job without a mask); refused if missing."""
    if not job.mask:
        return None
    where = f"{store.url}/{BLOCK_MAP}"
    try:
        data = store.get(BLOCK_MAP)
    except KeyError:
        raise JobError(f"job {job.job_hash} has a mask but {where} is missing; rerun `chunkflow plan` with the same "
                       "flags") from None
    return decode_block_map(data, job.layout.num_blocks, where)


def masked_set(job, store, grid: "BlockGrid | None" = None) -> "BlockSet | None":
    """The blocks the mask leaves no patch, as a :class:`~chunkflow.block_set.BlockSet` read
    straight from the block map (same raster order); None for a job without a mask."""
    from chunkflow.block_set import BlockGrid, BlockSet

    masked = load_block_map(job, store)
    if masked is None:
        return None
    return BlockSet(grid if grid is not None else BlockGrid(job.layout), np.ascontiguousarray(masked, dtype=bool))


def masked_names(job, store) -> set[str]:
    """Names of the blocks the mask leaves no patch."""
    masked = masked_set(job, store)
    return set() if masked is None else set(masked)


def block_position(block: Vec, grid: Sequence[int]) -> int:
    """The raster (ZYX) position of block index ``block`` in the block map."""
    return int(np.ravel_multi_index(tuple(int(b) for b in block), tuple(int(g) for g in grid)))
