"""The volume interface every stage codes against.

A :class:`Volume` is a 4D C,Z,Y,X array placed in global voxel coordinates by its
:attr:`Volume.bbox`. Two formats implement it: Neuroglancer precomputed (``precomputed.py``)
and zarr v3 (``zarr_volume.py``); which URL names which is ``volume_urls.py``, and
``volume_factory.py`` opens and creates them.

The base class does the checks that keep Invariant 2 and 3 of the design
(aligned, whole-chunk writes only; nothing cast silently; out-of-bounds reads
either padded on request or refused) so the two back ends only move bytes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import StorageError

__all__ = ["MISSING", "PAD_MODES", "Volume", "input_missing"]

PAD_MODES = (None, "reflect", "constant")
MISSING = ("zeros", "count", "refuse")


def input_missing(fill_missing: bool) -> str:
    """How a job reads missing input chunks: counted zeros with ``--fill-missing``, else refused."""
    return "count" if fill_missing else "refuse"


#: where a volume's metadata keeps the jobs' claims on its regions (:mod:`chunkflow.output_claims`): a key of
#: a precomputed info file (a list of claims, each with its mip), an attribute of a zarr array
CLAIMS_KEY = "chunkflow_jobs"


class Volume:
    """A C,Z,Y,X array in global voxel coordinates. Subclasses implement ``_read``/``_write``."""

    url: str
    bbox: Bbox
    chunk_size: Vec
    num_channels: int
    dtype: np.dtype
    resolution: tuple[float, float, float]
    #: stored in shards of several chunks (precomputed sharding, zarr shards): chunk-aligned writes are not enough
    sharded: bool = False
    #: the box of chunks one shard holds (ZYX, from the volume's start), the unit of every write of a
    #: sharded volume; None for a sharded volume whose shards are not boxes (it cannot be written)
    shard_size: Vec | None = None
    #: False where the format held no voxel size and ``resolution`` is a default (a plain zarr array
    #: without a ``resolution`` attribute): fine for an input, not for a mask laid over one by nm
    resolution_known: bool = True
    #: chunks that did not exist and were read as zeros because the volume was opened with fill_missing
    filled_chunks: int = 0

    def __init__(
        self,
        url: str,
        bbox: Bbox,
        chunk_size: Vec,
        num_channels: int,
        dtype: np.dtype | str,
        resolution: Sequence[float],
    ) -> None:
        self.url = url
        self.bbox = Bbox(bbox.start, bbox.stop)
        self.chunk_size = Vec(chunk_size)
        self.num_channels = int(num_channels)
        self.dtype = np.dtype(dtype)
        self.resolution = tuple(float(r) for r in resolution)  # type: ignore[assignment]

    def claims(self, fresh: bool = False) -> list:
        """The jobs' claims on regions of this level (:mod:`chunkflow.output_claims`), from the
        volume's own metadata; [] where it holds none. ``fresh``: read the metadata again (another
        job may have claimed a region since the volume was opened)."""
        return []

    def add_claim(self, claim: dict) -> None:
        """Append ``claim`` to the claims in the volume's own metadata (:mod:`chunkflow.output_claims`)."""
        raise StorageError(f"{self.url}: this kind of volume keeps no claims")

    # -- back-end hooks -------------------------------------------------------------
    def _read(self, bbox: Bbox) -> np.ndarray:  # pragma: no cover - abstract
        """Return C,Z,Y,X data of ``bbox``, which lies inside ``self.bbox``."""
        raise NotImplementedError

    def _write(self, bbox: Bbox, data: np.ndarray) -> None:  # pragma: no cover - abstract
        """Store validated, chunk-aligned C,Z,Y,X ``data`` at ``bbox``."""
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------
    def read(self, bbox: Bbox, pad_mode: str | None = None) -> np.ndarray:
        """Read ``bbox`` as a C,Z,Y,X array of ``self.dtype``.

        Where ``bbox`` reaches beyond the volume, ``pad_mode`` decides: ``"reflect"``
        (``numpy.pad`` reflect, mirrored about the edge voxel), ``"constant"`` (zeros),
        or ``None``: refuse with a :class:`StorageError`.
        """
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if bbox.is_empty():
            raise StorageError(f"cannot read empty box {bbox.name} from {self.url}")
        if self.bbox.contains(bbox):
            return self._read(bbox)
        if pad_mode is None:
            raise StorageError(
                f"box {bbox.name} reaches outside volume {self.url} (bbox {self.bbox.name}); "
                "pass pad_mode='reflect' or 'constant' to pad"
            )
        inside = bbox.intersect(self.bbox)
        if inside.is_empty():
            if pad_mode == "constant":
                return np.zeros((self.num_channels, *bbox.shape), dtype=self.dtype)
            raise StorageError(
                f"box {bbox.name} lies entirely outside volume {self.url} (bbox {self.bbox.name}); "
                "nothing to reflect"
            )
        data = self._read(inside)
        before = inside.start - bbox.start
        after = bbox.stop - inside.stop
        widths = [(0, 0)] + [(int(b), int(a)) for b, a in zip(before, after)]
        if pad_mode == "constant":
            return np.pad(data, widths, mode="constant", constant_values=0)
        return np.pad(data, widths, mode="reflect")

    def write(self, bbox: Bbox, data: np.ndarray) -> None:
        """Write C,Z,Y,X ``data`` at ``bbox``: whole storage chunks only, nothing cast.

        ``bbox`` must lie inside the volume, start on the chunk grid (relative to
        ``self.bbox.start``) and stop on it or at the volume's far face. Anything else
        is refused before a byte is written, so two tasks can never share a chunk. A sharded
        volume takes whole shards only (:attr:`shard_size`).
        """
        self.check_write(bbox, data)
        self._write(bbox, data)

    def check_write(self, bbox: Bbox, data: np.ndarray) -> None:
        """Raise :class:`StorageError` unless ``write(bbox, data)`` is allowed."""
        where = f"write of box {bbox.name} to {self.url}"
        if not isinstance(data, np.ndarray):
            raise StorageError(f"{where}: data is {type(data).__name__}, not a numpy array")
        if data.dtype != self.dtype:
            raise StorageError(f"{where}: data dtype {data.dtype} is not the volume dtype {self.dtype}")
        expected = (self.num_channels, *bbox.shape)
        if bbox.is_empty() or data.shape != expected:
            raise StorageError(f"{where}: data shape {tuple(data.shape)} is not C,Z,Y,X {expected}")
        if not self.bbox.contains(bbox):
            raise StorageError(f"{where}: box is not inside the volume bbox {self.bbox.name}")
        if self.sharded:
            unit, what, size = self.shard_size, "shard", "shard"
        else:
            unit, what, size = self.chunk_size, "storage chunk", "chunk"
        if unit is None:
            raise StorageError(f"{where}: the volume is sharded so that a shard is not one box of chunks")
        rel_start = bbox.start - self.bbox.start
        rel_stop = bbox.stop - self.bbox.start
        for axis in range(3):
            c = unit[axis]
            if rel_start[axis] % c or (rel_stop[axis] % c and bbox.stop[axis] != self.bbox.stop[axis]):
                raise StorageError(
                    f"{where}: box is not aligned to the {what} grid "
                    f"({size} size {tuple(unit)} ZYX from {tuple(self.bbox.start)})"
                )

    def has_data(self) -> bool:
        """Whether any data was ever written (formats that can tell cheaply; others say True)."""
        return True

    def geometry(self) -> dict:
        """The parameters that :func:`create_volume` compares against an existing volume."""
        return {
            "bbox": self.bbox.name,
            "chunk_size": tuple(self.chunk_size),
            "num_channels": self.num_channels,
            "dtype": str(self.dtype),
            "resolution": tuple(float(r) for r in self.resolution),
            "shards": (tuple(self.shard_size) if self.shard_size is not None else "not boxes") if self.sharded else None,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, bbox={self.bbox.name}, chunk_size={tuple(self.chunk_size)}, "
            f"channels={self.num_channels}, dtype={self.dtype}, resolution={self.resolution})"
        )
