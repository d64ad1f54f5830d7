"""Neuroglancer precomputed volumes through CloudVolume (any mip level; raw, gzip, png, jpeg or fpzip chunks).

A chunk that the info file's bounds promise but the layer does not hold (a hole, a layer whose
data was never written, a sub-box copied with the full bounds) is read according to ``missing``:
``"zeros"`` (CloudVolume's ``fill_missing``, for reading outputs), ``"count"`` (zeros, counted in
:attr:`PrecomputedVolume.filled_chunks`: a job's input planned with ``--fill-missing``) or
``"refuse"`` (:class:`~chunkflow.errors.MissingInput` naming the chunk: a job's input by default).

Local (``file://``) unsharded raw layers, uncompressed or gzip, are read and written without
CloudVolume, chunk file by chunk file, with the same bytes (``precomputed_files.py``): CloudVolume
costs several times the CPU per voxel there. Everything else goes through CloudVolume.

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
import os
import threading
from typing import Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import MissingInput, StorageError, one_line
from chunkflow.storage.local_io import read_json_file
from chunkflow.storage.precomputed_codecs import (CODECS, COMPRESSION_KEY, JPEG_QUALITY, PNG_LEVEL,
                                                    check_precomputed_compression, layer_compression, write_compress)
from chunkflow.storage.precomputed_files import ChunkFiles
from chunkflow.storage.sharding import precomputed_shard_size, precomputed_sharding_spec, write_precomputed_shards
from chunkflow.storage.volumes import CLAIMS_KEY, Volume

log = logging.getLogger(__name__)

_CV_OPTIONS = dict(non_aligned_writes=False, progress=False, parallel=1)


class PrecomputedVolume(Volume):
    """A precomputed layer at one mip level. ``location`` is the CloudVolume cloudpath."""

    def __init__(self, url: str, cv, missing: str = "zeros") -> None:  # cv: cloudvolume.CloudVolume
        self._cv = cv
        self._location = cv.cloudpath
        self.missing = missing
        self.filled_chunks = 0
        self._filling_cv = None
        self._lock = threading.Lock()
        self.mip = int(cv.mip)
        scale = cv.info["scales"][self.mip]
        #: sharded layers store many chunks per file: a partial write would replace the whole file
        self.sharded = bool(scale.get("sharding"))
        offset_xyz = scale["voxel_offset"]
        size_xyz = scale["size"]
        start = Vec(offset_xyz[2], offset_xyz[1], offset_xyz[0])
        stop = start + Vec(size_xyz[2], size_xyz[1], size_xyz[0])
        cx, cy, cz = scale["chunk_sizes"][0]
        if self.sharded:
            self.shard_size = precomputed_shard_size(scale["sharding"], stop - start, Vec(cz, cy, cx))
        rx, ry, rz = scale["resolution"]
        super().__init__(
            url=url,
            bbox=Bbox(start, stop),
            chunk_size=Vec(cz, cy, cx),
            num_channels=int(cv.info["num_channels"]),
            dtype=np.dtype(cv.info["data_type"]),
            resolution=(float(rz), float(ry), float(rx)),
        )
        #: local raw chunk files, read and written without CloudVolume (``precomputed_files.py``); None: CloudVolume
        self._files = None
        #: the layer's directory on a local disk (the one cloud-files reads and writes for CloudVolume), or None
        self._local_dir: str | None = None
        if self._location.startswith("file://"):
            from cloudfiles.paths import extract

            self._local_dir = extract(cv.meta.cloudpath).path
            self._files = ChunkFiles.for_scale(self._local_dir, scale, self.bbox, self.num_channels, self.dtype)

    @staticmethod
    def _cloudvolume(location: str, fill_missing: bool = False, mip: int = 0, **kwargs):
        from cloudvolume import CloudVolume

        # The explicit format stops CloudVolume from probing for a zarr when the info
        # file is missing (a probe that retries for ~20 s on GCS emulators).
        # Local files are written uncompressed (gzip would cost ~10x the write time);
        # cloud objects keep CloudVolume's gzip default, which browsers decode natively.
        compress = False if location.startswith("file://") else None
        return CloudVolume("precomputed://" + location, compress=compress, fill_missing=fill_missing, mip=mip,
                           **_CV_OPTIONS, **kwargs)

    @classmethod
    def open_if_exists(cls, url: str, location: str, missing: str = "zeros", mip: int = 0) -> "PrecomputedVolume | None":
        from cloudvolume.exceptions import InfoUnavailableError

        if isinstance(mip, bool) or not isinstance(mip, int) or mip < 0:
            raise StorageError(f"--mip {mip!r} is not a resolution level (0, 1, 2, ...)")
        try:
            cv = cls._cloudvolume(location, fill_missing=missing == "zeros")
        except InfoUnavailableError:
            return None
        except Exception as exc:  # noqa: BLE001 - cloud-files raises many kinds; report one line
            raise StorageError(f"cannot open volume {url}: {one_line(exc, first_only=True, typed=True)}") from exc
        scales = cv.info["scales"]
        if mip >= len(scales):
            levels = ", ".join(f"{i} ({'x'.join(f'{r:g}' for r in s['resolution'][::-1])} nm)"
                               for i, s in enumerate(scales))  # z,y,x, as every size in chunkflow
            raise StorageError(f"--mip {mip}: {url} has no such level; its levels are {levels}")
        cv.mip = mip
        return cls(url, cv, missing)

    @classmethod
    def open(cls, url: str, location: str, missing: str = "zeros", mip: int = 0) -> "PrecomputedVolume":
        vol = cls.open_if_exists(url, location, missing, mip)
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
        compression: str = "default",
        shard: Vec | None = None,
    ) -> "PrecomputedVolume":
        """A new layer; with ``shard`` (ZYX, from :func:`~chunkflow.storage.sharding.choose_precomputed_shard`)
        a sharded one, each chunk gzip-compressed inside its shard where ``compression`` asks for gzip
        objects (``gzip``; ``default`` on gs:// and s3://)."""
        from cloudvolume import CloudVolume

        check_precomputed_compression(compression, dtype, num_channels)
        codec = CODECS[compression]
        rz, ry, rx = resolution
        try:
            info = CloudVolume.create_new_info(
                num_channels=num_channels,
                layer_type=layer_type,
                data_type=str(dtype),
                encoding=codec.encoding,
                resolution=[rx, ry, rz],
                voxel_offset=list(bbox.start.xyz()),
                volume_size=list(bbox.shape.xyz()),
                chunk_size=list(chunk_size.xyz()),
            )
            info[COMPRESSION_KEY] = compression
            if codec.encoding == "jpeg":
                info["scales"][0]["jpeg_quality"] = JPEG_QUALITY
            if codec.encoding == "png":
                info["scales"][0]["png_level"] = PNG_LEVEL
            if shard is not None:
                gzip = codec.gzip if codec.gzip is not None else not location.startswith("file://")
                info["scales"][0]["sharding"] = precomputed_sharding_spec(shard, chunk_size, bbox.shape,
                                                                          "gzip" if gzip else "raw")
            cv = cls._cloudvolume(location, info=info, fill_missing=True)
            cv.commit_info()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot create volume {url}: {one_line(exc, first_only=True, typed=True)}") from exc
        return cls(url, cv)

    def claims(self, fresh: bool = False) -> list:
        info = self._fresh_info() if fresh else self._cv.info  # fetched, not swapped under the writers
        return [c for c in info.get(CLAIMS_KEY, []) if isinstance(c, dict) and c.get("mip", 0) == self.mip]

    def _fresh_info(self) -> dict:
        """The info file as it is now: read straight from disk for a local layer (CloudVolume's fetch
        costs about a millisecond of its threads, paid before every block's writes); fetched by
        CloudVolume elsewhere, or where the plain ``info`` file is not there (a compressed one)."""
        try:
            info = None
            if self._local_dir is not None:
                try:
                    info = read_json_file(os.path.join(self._local_dir, "info"))
                except FileNotFoundError:
                    pass
            if info is None:
                info = self._cv.meta.fetch_info()
        except Exception as exc:  # noqa: BLE001 - a store gone or a file garbled: the block fails, in one line
            raise StorageError(f"cannot read the info file of {self.url} again (to check its jobs' claims): "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc
        if not isinstance(info, dict):
            raise StorageError(f"the info file of {self.url} is not a JSON object any more")
        return info

    def add_claim(self, claim: dict) -> None:
        """Re-read the info file, append ``claim`` (with this level's mip) and write it back."""
        with self._lock:
            try:
                self._cv.refresh_info()
                self._cv.info[CLAIMS_KEY] = list(self._cv.info.get(CLAIMS_KEY, [])) + [{**claim, "mip": self.mip}]
                self._cv.commit_info()
            except Exception as exc:  # noqa: BLE001 - cloud-files raises many kinds; report one line
                raise StorageError(f"cannot record this job in {self.url}'s info file: "
                                   f"{one_line(exc, first_only=True, typed=True)}") from exc

    @property
    def compression(self) -> str:
        """The layer's output compression (:func:`layer_compression`), for comparing with a job's."""
        return layer_compression(self._cv.info)

    @staticmethod
    def _slices_xyz(bbox: Bbox) -> tuple[slice, slice, slice]:
        (z0, y0, x0), (z1, y1, x1) = bbox.start, bbox.stop
        return slice(x0, x1), slice(y0, y1), slice(z0, z1)

    def has_data(self) -> bool:
        """Whether the layer holds at least one chunk at this mip level (one listing request)."""
        from cloudfiles import CloudFiles

        try:
            listing = CloudFiles(self._cv.cloudpath).list(prefix=self._cv.meta.key(self.mip) + "/")
            return next(iter(itertools.islice(listing, 1)), None) is not None
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list the chunks of {self.url}: "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc

    def _missing(self, chunk: str, bbox: Bbox) -> MissingInput:
        return MissingInput(
            f"chunk {chunk.strip() or '?'} of {self.url} is missing (box {bbox.name} needs it; the "
            f"layer's info promises {self.bbox.name}); plan with --fill-missing if missing chunks are "
            "meant to be zeros")

    def _read(self, bbox: Bbox) -> np.ndarray:
        from cloudvolume.exceptions import EmptyVolumeException

        if self._files is not None:
            direct = self._read_files(bbox)
            if direct is not None:
                return direct
        try:
            cutout = self._cv[self._slices_xyz(bbox)]
        except EmptyVolumeException as exc:
            if self.missing == "refuse":
                raise self._missing(str(exc), bbox) from None
            cutout = self._read_filling(bbox)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"read of box {bbox.name} from {self.url} failed: "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc
        # X,Y,Z,C -> C,Z,Y,X; make it C-contiguous so callers get ordinary arrays.
        return np.ascontiguousarray(np.asarray(cutout).transpose(3, 2, 1, 0))

    def _read_files(self, bbox: Bbox) -> np.ndarray | None:
        """``bbox`` from the chunk files, missing chunks as ``missing`` says; None: read it through CloudVolume."""
        assert self._files is not None
        try:
            got = self._files.read(bbox)
        except Exception as exc:  # noqa: BLE001 - OSError, a bad gzip stream, a chunk of the wrong size
            raise StorageError(f"read of box {bbox.name} from {self.url} failed: "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc
        if got is None:
            return None
        if got.missing:
            if self.missing == "refuse":
                raise self._missing(got.missing[0], bbox)
            if self.missing == "count":
                with self._lock:
                    self.filled_chunks += got.absent
            log.debug("%s: %d missing chunks in %s read as zeros", self.url, len(got.missing), bbox.name)
        return got.data

    def _read_filling(self, bbox: Bbox):
        """Read with missing chunks as zeros (counting them if the volume was opened to count)."""
        slices = self._slices_xyz(bbox)
        missing = sum(1 for present in self._cv.exists(slices).values() if not present) \
            if self.missing == "count" else 0
        with self._lock:
            self.filled_chunks += missing
            if self._filling_cv is None:
                self._filling_cv = self._cloudvolume(self._location, fill_missing=True, mip=self.mip)
        log.debug("%s: %d missing chunks in %s read as zeros", self.url, missing, bbox.name)
        return self._filling_cv[slices]

    def _write(self, bbox: Bbox, data: np.ndarray) -> None:
        self._cv.compress = write_compress(self._cv.info, self._location)  # what the info records
        try:
            if self.sharded:  # check_write let through whole shards only
                write_precomputed_shards(self._cv, self._location, self.bbox, self.shard_size, bbox, data)
                return
            if self._files is not None and self._cv.compress in (False, "gzip"):
                self._files.write(bbox, data, gzip=self._cv.compress == "gzip")
            else:
                xyzc = np.ascontiguousarray(data).transpose(3, 2, 1, 0)  # Fortran-ordered view, no copy
                self._cv[self._slices_xyz(bbox)] = xyzc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"write of box {bbox.name} to {self.url} failed: "
                               f"{one_line(exc, first_only=True, typed=True)}") from exc
        log.debug("wrote %s to %s", bbox.name, self.url)
