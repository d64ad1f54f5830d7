"""zarr v3 volumes: a C,Z,Y,X array with ``voxel_offset`` and ``resolution`` attributes (ZYX).

The volume's bbox is ``voxel_offset + shape[-3:]``. A 3D (Z,Y,X) array is read and
written as one channel. The storage unit used for write alignment is the shard shape
when the array is sharded, else the chunk shape: whole units only, so no two tasks
ever read-modify-write the same object.

``gs://`` locations go through gcsfs. Against an emulator (``STORAGE_EMULATOR_HOST``
set) gcsfs must be imported with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (its
experimental gRPC/HNS layer does not talk to fake-gcs-server) and uses anonymous
credentials; this module sets both when the emulator variable is present and gcsfs
is not yet imported.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.storage.volumes import StorageError, Volume

log = logging.getLogger(__name__)

_DEFAULT_RESOLUTION = (1.0, 1.0, 1.0)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _store(location: str, read_only: bool = False):
    """A zarr store for a local path or an fsspec URL (``gs://``)."""
    import zarr.storage

    if "://" in location:
        options: dict[str, Any] = {}
        if location.startswith("gs://") and os.environ.get("STORAGE_EMULATOR_HOST"):
            if "gcsfs" not in sys.modules:
                os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            options["token"] = "anon"
        return zarr.storage.FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    return zarr.storage.LocalStore(location, read_only=read_only)


class ZarrVolume(Volume):
    """A zarr v3 array viewed as a chunkflow :class:`Volume`."""

    def __init__(self, url: str, array) -> None:  # array: zarr.Array
        self._array = array
        shape = tuple(array.shape)
        if len(shape) == 3:
            channels, spatial = 1, shape
        elif len(shape) == 4:
            channels, spatial = shape[0], shape[1:]
        else:
            raise StorageError(f"zarr array at {url} has shape {shape}; expected Z,Y,X or C,Z,Y,X")
        self._three_d = len(shape) == 3
        attrs = dict(array.attrs)
        offset = Vec(attrs.get("voxel_offset", (0, 0, 0)))
        resolution = tuple(attrs.get("resolution", _DEFAULT_RESOLUTION))
        unit = array.shards if getattr(array, "shards", None) is not None else array.chunks
        super().__init__(
            url=url,
            bbox=Bbox.from_shape(offset, spatial),
            chunk_size=Vec(unit[-3:]),
            num_channels=channels,
            dtype=array.dtype,
            resolution=resolution,
        )

    @classmethod
    def open_if_exists(cls, url: str, location: str) -> "ZarrVolume | None":
        import zarr
        from zarr.errors import NodeNotFoundError

        if "://" not in location and not os.path.exists(location):
            return None  # zarr's LocalStore would create the directory while looking
        try:
            array = zarr.open_array(store=_store(location), mode="r+", zarr_format=None)
        except (NodeNotFoundError, FileNotFoundError):
            return None
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot open volume {url}: {_one_line(exc)}") from exc
        return cls(url, array)

    @classmethod
    def open(cls, url: str, location: str) -> "ZarrVolume":
        vol = cls.open_if_exists(url, location)
        if vol is None:
            raise StorageError(f"no volume at {url} (no zarr array there)")
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
        layer_type: str = "image",
    ) -> "ZarrVolume":
        import zarr
        from zarr.errors import ContainsArrayError

        try:
            array = zarr.create_array(
                store=_store(location),
                shape=(num_channels, *bbox.shape),
                chunks=(num_channels, *chunk_size),
                dtype=dtype,
                fill_value=0,
                zarr_format=3,
                attributes={
                    "voxel_offset": list(bbox.start),
                    "resolution": [float(r) for r in resolution],
                    "layer_type": layer_type,
                },
            )
        except ContainsArrayError:
            # Lost a creation race: the caller compares geometry of what is there.
            existing = cls.open(url, location)
            log.info("volume %s was created concurrently", url)
            return existing
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot create volume {url}: {_one_line(exc)}") from exc
        return cls(url, array)

    def _selection(self, bbox: Bbox) -> tuple:
        spatial = bbox.slices(self.bbox)
        return spatial if self._three_d else (slice(None), *spatial)

    def _read(self, bbox: Bbox) -> np.ndarray:
        try:
            data = np.asarray(self._array[self._selection(bbox)])
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"read of box {bbox.name} from {self.url} failed: {_one_line(exc)}") from exc
        return data[None] if self._three_d else data

    def _write(self, bbox: Bbox, data: np.ndarray) -> None:
        value = data[0] if self._three_d else data
        try:
            self._array[self._selection(bbox)] = value
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"write of box {bbox.name} to {self.url} failed: {_one_line(exc)}") from exc
        log.debug("wrote %s to %s", bbox.name, self.url)
