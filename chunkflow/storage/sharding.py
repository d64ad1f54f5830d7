"""Sharded outputs: which shards a layout allows, and writing precomputed shards whole.

A *shard* is one storage object holding many chunks: a zarr v3 shard (``sharding_indexed``), or a
Neuroglancer precomputed shard file (``neuroglancer_uint64_sharded_v1``). Writing part of a shard
replaces the whole object, so chunkflow gives every shard exactly one writer: blocks are a multiple
of the shard and aligned to the shard grid, and stage two writes each block whole
(``Layout.whole_block_writes``; docs/design.md, "Sharded outputs").

Precomputed shards are boxes only with the ``identity`` hash: a chunk's key is its *compressed
Morton code* (the bits of its x, y and z grid indices interleaved, an axis dropping out once its
bits are used up) and its shard number is ``(key >> (preshift_bits + minishard_bits)) &
(2**shard_bits - 1)``. With ``k = preshift_bits + minishard_bits`` and enough shard bits to cover
the rest of the key, a shard is the power-of-two box of chunks that the low ``k`` bits select. With
fewer shard bits, or a ``murmurhash3_x86_128`` hash, one shard file usually holds chunks from all
over the volume (:func:`precomputed_shard_size` returns None) and chunkflow cannot give it one writer.
"""
from __future__ import annotations

import logging
import math
import os
import uuid
from typing import TYPE_CHECKING, Iterator

import numpy as np

from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.errors import JobError, StorageError

if TYPE_CHECKING:
    from chunkflow.job import Job
    from chunkflow.storage.volumes import Volume

log = logging.getLogger(__name__)

SHARDED_FORMAT = "neuroglancer_uint64_sharded_v1"
#: at most 2**9 minishards (an 8 KiB shard index, CloudVolume's recommendation)
MAX_MINISHARD_BITS = 9


def _axis_bits(grid_xyz: tuple[int, int, int]) -> list[int]:
    return [math.ceil(math.log2(g)) if g > 1 else 0 for g in grid_xyz]


def _grid_xyz(shape: Vec, chunk: Vec) -> tuple[int, int, int]:
    return tuple(-(-int(s) // int(c)) for s, c in zip(shape.xyz(), chunk.xyz()))  # type: ignore[return-value]


def precomputed_shard_size(spec: dict, shape: Vec, chunk: Vec) -> Vec | None:
    """The box (ZYX voxels, from the volume's start) of chunks each shard file holds, or None where a
    shard file holds chunks that are not one box. A layer stored in one shard gets a box covering
    the whole volume.

    With the identity hash a shard fixes the key bits ``[k, k + shard_bits)`` and leaves the others
    free; its chunks form one box exactly when every axis's free bits are its lowest ones. Hashed
    keys are one box only when every chunk hashes alike (no shard bits, or every bit preshifted)."""
    grid = _grid_xyz(shape, chunk)
    full = _axis_bits(grid)
    order = []  # the axis (x=0, y=1, z=2) of each bit of a compressed Morton code, lowest first
    for level in range(max(full, default=0)):
        order.extend(d for d in range(3) if level < full[d])
    p, m = int(spec.get("preshift_bits", 0)), int(spec.get("minishard_bits", 0))
    shard_bits = int(spec.get("shard_bits", 0))
    if spec.get("hash") == "identity":
        free = [j < p + m or j >= p + m + shard_bits for j in range(len(order))]
    elif shard_bits == 0 or p >= len(order):
        free = [True] * len(order)
    else:
        return None
    bits = [0, 0, 0]
    for d in range(3):
        flags = [f for j, f in enumerate(free) if order[j] == d]
        bits[d] = flags.count(True)
        if flags != sorted(flags, reverse=True):  # a fixed bit below a free one: boxes with gaps
            return None
    return Vec(chunk[0] << bits[2], chunk[1] << bits[1], chunk[2] << bits[0])


def precomputed_sharding_spec(shard: Vec, chunk: Vec, shape: Vec, data_encoding: str) -> dict:
    """The ``sharding`` of a new layer whose shards are ``shard`` (ZYX voxels), a box that
    :func:`choose_precomputed_shard` made."""
    grid = _grid_xyz(shape, chunk)
    k = sum(int(s // c).bit_length() - 1 for s, c in zip(shard, chunk))
    if precomputed_shard_size({"hash": "identity", "preshift_bits": k, "shard_bits": 64}, shape, chunk) != shard:
        raise StorageError(f"shard {zyx_text(shard)} is not a box of compressed Morton codes of chunks {zyx_text(chunk)}")
    minishard = min(MAX_MINISHARD_BITS, (k + 1) // 2)
    return {"@type": SHARDED_FORMAT, "hash": "identity", "preshift_bits": k - minishard, "minishard_bits": minishard,
            "shard_bits": max(0, sum(_axis_bits(grid)) - k), "minishard_index_encoding": "gzip",
            "data_encoding": data_encoding}


def choose_precomputed_shard(block: Vec, chunk: Vec, region: Bbox, patch: Vec) -> Vec:
    """The largest precomputed shard (ZYX voxels) that tiles ``block`` over a new layer covering
    ``region``: the first bits of the compressed Morton code, as long as each doubling still divides
    the block (or the block spans the region along that axis). Refuses, naming a block that fits, a
    block that is not a power-of-two number of chunks along an axis it does not span."""
    shape = region.shape
    spans = [block[a] >= shape[a] for a in range(3)]
    if not all(spans[a] or _power_of_two(block[a] // chunk[a]) for a in range(3)):
        better = Vec(block[a] if spans[a] else _nearest_power_of_two(block[a], chunk[a], patch[a]) for a in range(3))
        raise JobError(f"--sharded: block {zyx_text(block)} is not a power-of-two number of output chunks "
                       f"{zyx_text(chunk)} along every axis (precomputed shards are power-of-two boxes of chunks that "
                       f"must tile the block); use e.g. --block {zyx_text(better)}")
    limit = _axis_bits(_grid_xyz(shape, chunk))
    bits, level = [0, 0, 0], 0

    def box() -> Vec:
        return Vec(chunk[0] << bits[2], chunk[1] << bits[1], chunk[2] << bits[0])
    while bits != limit:
        for d in range(3):  # x, y, z: the order of the Morton code's bits (a: the same axis in ZYX)
            a = 2 - d
            if level < limit[d]:
                if not spans[a] and block[a] % (chunk[a] << (bits[d] + 1)):
                    return box()
                bits[d] += 1
        level += 1
    return box()


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _nearest_power_of_two(block: int, chunk: int, patch: int) -> int:
    n = max(1, round(math.log2(max(1, block / chunk))))
    size = chunk << n
    while size < patch:
        size *= 2
    return size


def output_shard(job: "Job") -> Vec | None:
    """The shard shape (ZYX) of the sharded output ``plan`` creates for ``job`` (None: unsharded):
    zarr shards are the block (clipped to the region), precomputed shards the largest Morton box
    tiling the block. A deterministic function of the job, so it refuses before anything is written."""
    if not job.sharded:
        return None
    from chunkflow.storage.volume_urls import volume_format

    region, block, chunk = job.bbox, Vec(job.block), Vec(job.storage_chunk)
    if volume_format(job.output) == "zarr":
        return Vec(min(b, -(-s // c) * c) for b, s, c in zip(block, region.shape, chunk))
    return choose_precomputed_shard(block, chunk, region, Vec(job.output_patch))


def check_shards_tile(region: Bbox, volume: "Volume", block: Vec, output: str) -> None:
    """Refuse (one line, naming a block or region that fits) an existing sharded ``volume`` whose
    shards would not each lie inside one block of a job over ``region``."""
    from chunkflow.region import aligned_region, is_aligned

    shard = volume.shard_size
    if shard is None:
        fits = f"use --block {zyx_text(volume.bbox.shape)} (one block for the whole output)" \
            if region == volume.bbox else "give a new output (plan creates one with --sharded)"
        raise JobError(f"output {output} is sharded so that one shard file holds chunks that are not one box (hash "
                       f"or shard bits), so no block can own a shard; {fits}")
    if not is_aligned(region, volume.bbox, shard):
        raise JobError(f"region {region.name} is not aligned to the shards ({zyx_text(shard)} z,y,x from "
                       f"{zyx_text(volume.bbox.start)}) of the sharded output {output}; use --bbox "
                       f"{aligned_region(region, volume.bbox, shard).name}")
    bad = [a for a in range(3) if block[a] % shard[a] and block[a] < region.shape[a]]
    if bad:
        better = Vec(max(shard[a], round(block[a] / shard[a]) * shard[a]) if a in bad else block[a] for a in range(3))
        raise JobError(f"output {output} is sharded in shards of {zyx_text(shard)} (z,y,x), which blocks of "
                       f"{zyx_text(block)} do not tile (each shard needs one writer); use e.g. --block {zyx_text(better)}")


def shard_boxes(box: Bbox, volume: Bbox, shard: Vec) -> Iterator[Bbox]:
    """The shards (clipped to ``volume``) that make up a shard-aligned ``box``, in ZYX raster order."""
    ranges = [range(box.start[a], box.stop[a], shard[a]) for a in range(3)]
    for z in ranges[0]:
        for y in ranges[1]:
            for x in ranges[2]:
                start = Vec(z, y, x)
                yield Bbox(start, Vec(min(s + n, e) for s, n, e in zip(start, shard, volume.stop)))


def write_precomputed_shards(cv, location: str, volume: Bbox, shard: Vec, box: Bbox, data: np.ndarray) -> None:
    """Write C,Z,Y,X ``data`` over the shard-aligned ``box``, one whole shard file at a time
    (CloudVolume's ``make_shard``). A local file is written to a temporary name and renamed, a
    cloud object in one upload: a reader, or a writer killed half-way, never leaves half a shard."""
    from cloudvolume.lib import Bbox as CVBbox

    key = cv.meta.key(cv.mip)
    for part in shard_boxes(box, volume, shard):
        xyzc = data[(slice(None),) + part.slices(box)].transpose(3, 2, 1, 0)
        name, blob = cv.image.make_shard(xyzc, CVBbox(part.start.xyz(), part.stop.xyz()), cv.mip)
        _put_whole(location, f"{key}/{name}", blob)
        log.debug("wrote shard %s (%s) of %s", name, part.name, location)


def _put_whole(location: str, name: str, blob: bytes) -> None:
    if location.startswith("file://"):
        path = os.path.join(location[len("file://"):], name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        return
    from cloudfiles import CloudFiles

    CloudFiles(location).put(name, blob, compress=None)  # no Content-Encoding: readers fetch byte ranges
