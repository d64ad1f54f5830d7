"""Neuroglancer precomputed volumes through CloudVolume (mip 0, raw encoding).

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

import logging
from typing import Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.storage.volumes import StorageError, Volume

log = logging.getLogger(__name__)

_CV_OPTIONS = dict(mip=0, fill_missing=True, non_aligned_writes=False, progress=False, parallel=1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class PrecomputedVolume(Volume):
    """A precomputed layer at mip 0. ``location`` is the CloudVolume cloudpath."""

    def __init__(self, url: str, cv) -> None:  # cv: cloudvolume.CloudVolume
        self._cv = cv
        scale = cv.info["scales"][0]
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
    def _cloudvolume(location: str, **kwargs):
        from cloudvolume import CloudVolume

        # The explicit format stops CloudVolume from probing for a zarr when the info
        # file is missing (a probe that retries for ~20 s on GCS emulators).
        # Local files are written uncompressed (gzip would cost ~10x the write time);
        # cloud objects keep CloudVolume's gzip default, which browsers decode natively.
        compress = False if location.startswith("file://") else None
        return CloudVolume("precomputed://" + location, compress=compress, **_CV_OPTIONS, **kwargs)

    @classmethod
    def open_if_exists(cls, url: str, location: str) -> "PrecomputedVolume | None":
        from cloudvolume.exceptions import InfoUnavailableError

        try:
            cv = cls._cloudvolume(location)
        except InfoUnavailableError:
            return None
        except Exception as exc:  # noqa: BLE001 - cloud-files raises many kinds; report one line
            raise StorageError(f"cannot open volume {url}: {_one_line(exc)}") from exc
        return cls(url, cv)

    @classmethod
    def open(cls, url: str, location: str) -> "PrecomputedVolume":
        vol = cls.open_if_exists(url, location)
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
            cv = cls._cloudvolume(location, info=info)
            cv.commit_info()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot create volume {url}: {_one_line(exc)}") from exc
        return cls(url, cv)

    @staticmethod
    def _slices_xyz(bbox: Bbox) -> tuple[slice, slice, slice]:
        (z0, y0, x0), (z1, y1, x1) = bbox.start, bbox.stop
        return slice(x0, x1), slice(y0, y1), slice(z0, z1)

    def _read(self, bbox: Bbox) -> np.ndarray:
        try:
            cutout = self._cv[self._slices_xyz(bbox)]
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"read of box {bbox.name} from {self.url} failed: {_one_line(exc)}") from exc
        # X,Y,Z,C -> C,Z,Y,X; make it C-contiguous so callers get ordinary arrays.
        return np.ascontiguousarray(np.asarray(cutout).transpose(3, 2, 1, 0))

    def _write(self, bbox: Bbox, data: np.ndarray) -> None:
        xyzc = np.ascontiguousarray(data).transpose(3, 2, 1, 0)  # Fortran-ordered view, no copy
        try:
            self._cv[self._slices_xyz(bbox)] = xyzc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"write of box {bbox.name} to {self.url} failed: {_one_line(exc)}") from exc
        log.debug("wrote %s to %s", bbox.name, self.url)
