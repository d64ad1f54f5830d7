"""Reading and writing the chunk files of a local, unsharded, raw-encoded precomputed layer directly.

Why: CloudVolume spends ~10 ns of CPU per voxel read and ~20 per voxel written on such a layer
(bounding-box objects, chunk names, cloud-files' transfer records, a thread scheduler, one
``open`` per chunk), where the bytes themselves cost ~1.5 and ~4 (``benchmarks/bench_volume_io.py``,
docs/benchmarks.md section 11). This module moves the same bytes with numpy and ``open``, the
way CloudVolume 12 and cloud-files 6 lay them out, and nothing else:

- a chunk is the file ``<layer>/<scale key>/<x0>-<x1>_<y0>-<y1>_<z0>-<z1>``, its stop clamped to
  the scale's bounds, holding the chunk's voxels as X,Y,Z,C Fortran order, which is C,Z,Y,X
  C order: the bytes of ``np.ascontiguousarray(data[:, z0:z1, y0:y1, x0:x1])``;
- a gzip-compressed chunk is ``NAME.gz``, compressed and decompressed by cloud-files' own
  ``compression`` functions, so its bytes are the ones CloudVolume writes;
- a read tries ``NAME`` then ``NAME.gz``; a chunk with neither is missing; an empty file reads as
  missing too (CloudVolume's rule), but only a chunk with no file is *counted* as missing
  (as ``CloudVolume.exists`` counts it).

Anything else (a chunk stored with another of cloud-files' suffixes, ``.br``, ``.zstd``, ...)
is not read here: :meth:`ChunkFiles.read` returns None and the caller reads through CloudVolume.
Where a chunk has both ``NAME`` and ``NAME.gz``, ``NAME`` is read (cloud-files' first choice,
which it may reorder after it met a ``.gz``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import StorageError
from chunkflow.storage.local_io import read_file

__all__ = ["ChunkFiles", "ChunkRead"]

#: the suffixes cloud-files tries after ``""`` and ``".gz"`` (``cloudfiles.interfaces.EXT_TEST_SEQUENCE``)
_OTHER_SUFFIXES = (".br", ".zstd", ".xz", ".bz2")


@dataclass(frozen=True)
class ChunkRead:
    """A read's voxels (C,Z,Y,X, C-contiguous; missing chunks as zeros), the ``key/name`` of each
    missing chunk in grid order, and how many of those have no file at all (the others are empty)."""

    data: np.ndarray
    missing: list[str]
    absent: int


@dataclass(frozen=True)
class ChunkFiles:
    """The chunk files of one scale of a layer: ``directory`` (``<layer>/<scale key>``), ``key``
    (the scale key, for names in messages), the scale's box (ZYX), chunk size, channels and dtype."""

    directory: str
    key: str
    bbox: Bbox
    chunk_size: Vec
    num_channels: int
    dtype: np.dtype

    @classmethod
    def for_scale(cls, layer_path: str, scale: dict, bbox: Bbox, num_channels: int,
                  dtype: np.dtype) -> "ChunkFiles | None":
        """The chunk files of ``scale`` (an info file's scale) of the layer at local ``layer_path``;
        None where this module does not read that scale (sharded, or not raw-encoded)."""
        if scale.get("sharding") or scale.get("encoding", "raw") != "raw":
            return None
        cx, cy, cz = (int(v) for v in scale["chunk_sizes"][0])
        key = str(scale["key"])
        return cls(os.path.join(layer_path, key), key, Bbox(bbox.start, bbox.stop), Vec(cz, cy, cx),
                   int(num_channels), np.dtype(dtype))

    # -- the grid -------------------------------------------------------------------------------
    def _chunks(self, bbox: Bbox) -> Iterator[tuple[str, tuple[int, int, int], tuple[int, int, int]]]:
        """``(file name, start, stop)`` (ZYX) of every chunk ``bbox`` touches, z slowest (plain ints:
        this runs once per chunk)."""
        origin, end, size = self.bbox.start, self.bbox.stop, self.chunk_size
        ranges = []
        for axis in range(3):
            first = origin[axis] + (bbox.start[axis] - origin[axis]) // size[axis] * size[axis]
            ranges.append([(g, min(g + size[axis], end[axis])) for g in range(first, bbox.stop[axis], size[axis])])
        for z0, z1 in ranges[0]:
            for y0, y1 in ranges[1]:
                for x0, x1 in ranges[2]:
                    yield f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}", (z0, y0, x0), (z1, y1, x1)

    # -- reads ----------------------------------------------------------------------------------
    def _load(self, name: str) -> bytes | None:
        """The decompressed bytes of chunk ``name``; None if it has neither ``NAME`` nor ``NAME.gz``."""
        path = os.path.join(self.directory, name)
        try:
            return read_file(path)
        except FileNotFoundError:
            pass
        try:
            with open(path + ".gz", "rb") as f:
                content = f.read()
        except FileNotFoundError:
            return None
        from cloudfiles import compression

        return compression.decompress(content, "gzip", path + ".gz")

    def _elsewhere(self, name: str) -> bool:
        """Whether chunk ``name`` is stored under a suffix this module does not read."""
        path = os.path.join(self.directory, name)
        return any(os.path.exists(path + suffix) for suffix in _OTHER_SUFFIXES)

    def read(self, bbox: Bbox) -> ChunkRead | None:
        """The voxels of ``bbox`` (inside :attr:`bbox`); None if a chunk it needs is stored in a way
        this module does not read (the caller then reads through CloudVolume). A chunk file whose
        size is not the chunk's is a :class:`StorageError` naming it."""
        out = np.empty((self.num_channels, *bbox.shape), dtype=self.dtype)
        missing: list[str] = []
        absent = 0
        start, stop = tuple(bbox.start), tuple(bbox.stop)
        for name, c0, c1 in self._chunks(bbox):
            content = self._load(name)
            lo = [max(a, b) for a, b in zip(c0, start)]
            hi = [min(a, b) for a, b in zip(c1, stop)]
            into = (slice(None),) + tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, start))
            if not content:
                if content is None and self._elsewhere(name):
                    return None
                missing.append(f"{self.key}/{name}")
                absent += content is None
                out[into] = 0
                continue
            shape = tuple(b - a for a, b in zip(c0, c1))
            expected = self.num_channels * shape[0] * shape[1] * shape[2] * self.dtype.itemsize
            if len(content) != expected:
                raise StorageError(f"chunk {self.key}/{name} holds {len(content)} bytes, not the {expected} of "
                                   f"{self.num_channels} channel(s) of {shape} {self.dtype} voxels")
            voxels = np.frombuffer(content, dtype=self.dtype).reshape(self.num_channels, *shape)
            out[into] = voxels[(slice(None),) + tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, c0))]
        return ChunkRead(out, missing, absent)

    # -- writes ---------------------------------------------------------------------------------
    def write(self, bbox: Bbox, data: np.ndarray, gzip: bool) -> None:
        """Write every chunk of ``bbox`` (aligned to the grid: ``Volume.check_write`` saw to it) from
        C,Z,Y,X ``data``, as ``NAME`` or, with ``gzip``, ``NAME.gz`` (cloud-files' gzip, level 9)."""
        compress = None
        if gzip:
            from cloudfiles import compression

            compress = compression.compress
        origin = tuple(bbox.start)
        for name, c0, c1 in self._chunks(bbox):
            within = tuple(slice(a - o, b - o) for a, b, o in zip(c0, c1, origin))
            piece = np.ascontiguousarray(data[(slice(None),) + within])
            content = memoryview(piece).cast("B")
            path = os.path.join(self.directory, name)
            if compress is not None:
                content, path = compress(content, "gzip"), path + ".gz"
            _overwrite(path, content, self.directory)


def _overwrite(path: str, content: bytes | memoryview, directory: str) -> None:
    """Make the file ``path`` hold exactly ``content``: written over the old bytes in place, then cut
    to its length. Not ``open(path, "wb")``: on ext4 truncating a file that holds data frees its
    blocks and starts their writeback at close, which made rewriting a chunk 4x the CPU of
    writing over it (``benchmarks/bench_accelerator.py``, docs/benchmarks.md section 11). Neither is
    atomic; rewriting a chunk with the same bytes (a rerun) never shows a reader anything else."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    except FileNotFoundError:  # a new layer has no scale directory yet
        os.makedirs(directory, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        view = memoryview(content).cast("B")
        size = view.nbytes
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
