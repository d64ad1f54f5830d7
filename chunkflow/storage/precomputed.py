"""Neuroglancer precomputed volumes through CloudVolume (mip 0, raw encoding).

A chunk that the info file's bounds promise but the layer does not hold (a hole, a layer whose
data was never written, a sub-box copied with the full bounds) is read according to ``missing``:
``"zeros"`` (CloudVolume's ``fill_missing``, for reading outputs), ``"count"`` (zeros, counted in
:attr:`PrecomputedVolume.filled_chunks`: a job's input planned with ``--fill-missing``) or
``"refuse"`` (:class:`~chunkflow.errors.MissingInput` naming the chunk: a job's input by default).

CloudVolume arrays are X,Y,Z,C (Fortran order); chunkflow's are C,Z,Y,X (C order).
``arr.transpose(3, 2, 1, 0)`` maps one onto the other without a copy: a C-contiguous
C,Z,Y,X array viewed as X,Y,Z,C is exactly the Fortran-contiguous layout CloudVolume
encodes, and vice versa, so reads and writes move each voxel once.

``gs://`` goes through cloud-files, which builds a ``google.cloud.storage.Client``;
that client honours ``STORAGE_EMULATOR_HOST`` (anonymous credentials), so the same
code runs against fake-gcs-server. cloud-files prints a credentials warning on stdout
once per bucket when no ``~/.cloudvolume/secrets/google-secret.json`` exists.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import MissingInput
from chunkflow.storage.volumes import StorageError, Volume

log = logging.getLogger(__name__)

_CV_OPTIONS = dict(mip=0, non_aligned_writes=False, progress=False, parallel=1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class PrecomputedVolume(Volume):
    """A precomputed layer at mip 0. ``location`` is the CloudVolume cloudpath."""

    def __init__(self, url: str, cv, missing: str = "zeros") -> None:  # cv: cloudvolume.CloudVolume
        self._cv = cv
        self._location = cv.cloudpath
        self.missing = missing
        self.filled_chunks = 0
        self._filling_cv = None
        self._lock = threading.Lock()
        scale = cv.info["scales"][0]
        #: sharded layers store many chunks per file: a partial write would replace the whole file
        self.sharded = bool(scale.get("sharding"))
        offset_xyz = scale["voxel_offset"]
        size_xyz = scale["size"]
        start = Vec(offset_xyz[2], offset_xyz[1], offset_xyz[0])
        stop = start + Vec(size_xyz[2], size_xyz[1], size_xyz[0])
        cx, cy, cz = scale["chunk_sizes"][0]
        rx, ry, rz = scale["resolution"]
        super().__init__(
            url=url,
            bbox=Bbox(start, stop),
            chunk_size=Vec(cz, cy, cx),
            num_channels=int(cv.info["num_channels"]),
            dtype=np.dtype(cv.info["data_type"]),
            resolution=(float(rz), float(ry), float(rx)),
        )

    @staticmethod
    def _cloudvolume(location: str, fill_missing: bool = False, **kwargs):
        from cloudvolume import CloudVolume

        # The explicit format stops CloudVolume from probing for a zarr when the info
        # file is missing (a probe that retries for ~20 s on GCS emulators).
        # Local files are written uncompressed (gzip would cost ~10x the write time);
        # cloud objects keep CloudVolume's gzip default, which browsers decode natively.
        compress = False if location.startswith("file://") else None
        return CloudVolume("precomputed://" + location, compress=compress, fill_missing=fill_missing, **_CV_OPTIONS,
                           **kwargs)

    @classmethod
    def open_if_exists(cls, url: str, location: str, missing: str = "zeros") -> "PrecomputedVolume | None":
        from cloudvolume.exceptions import InfoUnavailableError

        try:
            cv = cls._cloudvolume(location, fill_missing=missing == "zeros")
        except InfoUnavailableError:
            return None
        except Exception as exc:  # noqa: BLE001 - cloud-files raises many kinds; report one line
            raise StorageError(f"cannot open volume {url}: {_one_line(exc)}") from exc
        return cls(url, cv, missing)

    @classmethod
    def open(cls, url: str, location: str, missing: str = "zeros") -> "PrecomputedVolume":
        vol = cls.open_if_exists(url, location, missing)
        if vol is None:
            raise StorageError(f"no volume at {url} (no precomputed info file)")
        return vol

    @classmethod
    def create(
        cls,
        url: str,
        location: str,
        bbox: Bbox,
        chunk_size: Vec,
        num_channels: int,
        dtype: np.dtype,
        resolution: Sequence[float],
        layer_type: str,
    ) -> "PrecomputedVolume":
        from cloudvolume import CloudVolume

        rz, ry, rx = resolution
        try:
            info = CloudVolume.create_new_info(
                num_channels=num_channels,
                layer_type=layer_type,
                data_type=str(dtype),
                encoding="raw",
                resolution=[rx, ry, rz],
                voxel_offset=list(bbox.start.xyz()),
                volume_size=list(bbox.shape.xyz()),
                chunk_size=list(chunk_size.xyz()),
            )
            cv = cls._cloudvolume(location, info=info, fill_missing=True)
            cv.commit_info()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot create volume {url}: {_one_line(exc)}") from exc
        return cls(url, cv)

    @staticmethod
    def _slices_xyz(bbox: Bbox) -> tuple[slice, slice, slice]:
        (z0, y0, x0), (z1, y1, x1) = bbox.start, bbox.stop
        return slice(x0, x1), slice(y0, y1), slice(z0, z1)

    def has_data(self) -> bool:
        """Whether the layer holds at least one chunk at mip 0 (one listing request)."""
        from cloudfiles import CloudFiles

        try:
            listing = CloudFiles(self._cv.cloudpath).list(prefix=self._cv.meta.key(0) + "/")
            return next(iter(itertools.islice(listing, 1)), None) is not None
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list the chunks of {self.url}: {_one_line(exc)}") from exc

    def _read(self, bbox: Bbox) -> np.ndarray:
        from cloudvolume.exceptions import EmptyVolumeException

        try:
            cutout = self._cv[self._slices_xyz(bbox)]
        except EmptyVolumeException as exc:
            if self.missing == "refuse":
                raise MissingInput(
                    f"chunk {str(exc).strip() or '?'} of {self.url} is missing (box {bbox.name} needs it; the "
                    f"layer's info promises {self.bbox.name}); plan with --fill-missing if missing chunks are "
                    "meant to be zeros") from None
            cutout = self._read_filling(bbox)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"read of box {bbox.name} from {self.url} failed: {_one_line(exc)}") from exc
        # X,Y,Z,C -> C,Z,Y,X; make it C-contiguous so callers get ordinary arrays.
        return np.ascontiguousarray(np.asarray(cutout).transpose(3, 2, 1, 0))

    def _read_filling(self, bbox: Bbox):
        """Read with missing chunks as zeros (counting them if the volume was opened to count)."""
        slices = self._slices_xyz(bbox)
        missing = sum(1 for present in self._cv.exists(slices).values() if not present) \
            if self.missing == "count" else 0
        with self._lock:
            self.filled_chunks += missing
            if self._filling_cv is None:
                self._filling_cv = self._cloudvolume(self._location, fill_missing=True)
        log.debug("%s: %d missing chunks in %s read as zeros", self.url, missing, bbox.name)
        return self._filling_cv[slices]

    def _write(self, bbox: Bbox, data: np.ndarray) -> None:
        xyzc = np.ascontiguousarray(data).transpose(3, 2, 1, 0)  # Fortran-ordered view, no copy
        try:
            self._cv[self._slices_xyz(bbox)] = xyzc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"write of box {bbox.name} to {self.url} failed: {_one_line(exc)}") from exc
        log.debug("wrote %s to %s", bbox.name, self.url)
