"""The volume interface every stage codes against, and the URL dispatch.

A :class:`Volume` is a 4D C,Z,Y,X array placed in global voxel coordinates by its
:attr:`Volume.bbox`. Two formats implement it:

* Neuroglancer precomputed through CloudVolume (``precomputed.py``):
  ``file:///abs/path``, ``gs://bucket/path``, ``s3://bucket/path``, each optionally
  prefixed ``precomputed://``;
* zarr v3 (``zarr_volume.py``): a local path ending ``.zarr``, ``zarr://PATH`` or
  ``zarr://gs://bucket/path.zarr``.

The base class does the checks that keep Invariant 2 and 3 of the design
(aligned, whole-chunk writes only; nothing cast silently; out-of-bounds reads
either padded on request or refused) so the two back ends only move bytes.

Opening or creating a ``gs://`` volume (either format) first probes its bucket once
(``gcs_probe.py``): a missing bucket or a dead endpoint is one line within
``CHUNKFLOW_GCS_RETRY_DEADLINE`` seconds instead of cloud-files' minutes of retries.
The credentials notice cloud-files prints on stdout is kept off chunkflow's stdout.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
from typing import Iterator, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import StorageError

log = logging.getLogger(__name__)

SUPPORTED_URLS = (
    "supported volume URLs: [precomputed://]file:///abs/path, [precomputed://]gs://bucket/path, "
    "[precomputed://]s3://bucket/path, /local/path.zarr (zarr array or OME-Zarr image; path.zarr/LEVEL for "
    "one level), zarr://PATH, zarr://gs://bucket/path.zarr"
)

PAD_MODES = (None, "reflect", "constant")
MISSING = ("zeros", "count", "refuse")


def input_missing(fill_missing: bool) -> str:
    """How a job reads missing input chunks: counted zeros with ``--fill-missing``, else refused."""
    return "count" if fill_missing else "refuse"


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


def _classify(url: str) -> tuple[str, str]:
    """Return ``(format, location)`` for a volume URL, or raise StorageError."""
    if not isinstance(url, str) or not url:
        raise StorageError(f"volume URL {url!r} is not a string; {SUPPORTED_URLS}")
    from chunkflow.storage.formats import foreign_format

    refusal = foreign_format(url)  # HDF5, N5, TIFF: name the format and how to convert it
    if refusal:
        raise StorageError(refusal)
    if url.startswith("zarr://"):
        location = url[len("zarr://"):]
        if location.startswith("file://"):
            location = location[len("file://"):]
        if not location or location.startswith(("s3://", "http://", "https://")):
            raise StorageError(f"unsupported volume URL {url!r}; {SUPPORTED_URLS}")
        return "zarr", location
    if url.startswith("precomputed://"):
        location = url[len("precomputed://"):]
        if location.startswith(("file:///", "gs://", "s3://")):
            return "precomputed", location
        raise StorageError(f"unsupported volume URL {url!r}; {SUPPORTED_URLS}")
    if url.startswith(("file:///", "gs://", "s3://")):
        return "precomputed", url
    if "://" not in url and any(part.endswith(".zarr") for part in url.rstrip("/").split("/")):
        return "zarr", url  # a store, or one level inside it (image.zarr/0)
    raise StorageError(f"unsupported volume URL {url!r}; {SUPPORTED_URLS}")


def volume_location(url: str) -> str:
    """Where a volume's bytes live, one spelling per place: local paths absolute with symlinks
    resolved, no trailing slash, no format prefix (so two URLs of one volume compare equal)."""
    fmt, location = _classify(url)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" not in location:
        return os.path.realpath(os.path.abspath(location))
    return location.rstrip("/")


def same_or_nested(a: str, b: str) -> bool:
    """Whether two locations from :func:`volume_location` are one place or one holds the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def check_output_compression(url: str, compression: str, dtype: str, num_channels: int) -> None:
    """Refuse, before anything is written, an ``--output-compression`` the output's format does not
    offer for ``dtype`` and ``num_channels`` (one line naming the valid values)."""
    if volume_format(url) == "zarr":
        from chunkflow.storage.zarr_volume import check_zarr_compression

        check_zarr_compression(compression, dtype, num_channels)
    else:
        from chunkflow.storage.precomputed import check_precomputed_compression

        check_precomputed_compression(compression, dtype, num_channels)


def volume_format(url: str) -> str:
    """``"precomputed"`` or ``"zarr"`` for a supported volume URL (StorageError otherwise)."""
    return _classify(url)[0]


#: cloud-files' notice (ANSI-coloured) when it falls back to Application Default Credentials:
#: "Using default Google credentials. ..." and, without GOOGLE_APPLICATION_CREDENTIALS, a warning block
_CREDENTIALS_NOTICE = re.compile(
    r"\x1b\[[0-9;]*m(?:Using default Google credentials|\s*Warning: Environment variable "
    r"GOOGLE_APPLICATION_CREDENTIALS).*?\x1b\[m\n?",
    re.DOTALL,
)
#: redirect_stdout swaps the process-wide sys.stdout: two threads interleaving their swaps could leave
#: it pointing at a buffer for good, so opens of gs:// volumes take turns (each is a metadata read)
_STDOUT_LOCK = threading.RLock()


@contextlib.contextmanager
def _gcs_access(url: str, location: str, action: str) -> Iterator[None]:
    """Around opening or creating a volume: probe a ``gs://`` bucket first, and keep
    cloud-files' credentials notice off stdout (it goes to the debug log, one line)."""
    if not location.startswith("gs://"):
        yield
        return
    from chunkflow.storage.gcs_probe import probe_bucket

    probe_bucket(url, location, action)
    captured = io.StringIO()
    try:
        with _STDOUT_LOCK, contextlib.redirect_stdout(captured):
            yield
    finally:
        text = captured.getvalue()
        for notice in _CREDENTIALS_NOTICE.findall(text):
            line = re.sub(r"\x1b\[[0-9;]*m", "", notice).strip().splitlines()[0].strip()
            log.debug("cloud-files (%s): %s", url, line)
        rest = _CREDENTIALS_NOTICE.sub("", text)
        if rest:  # anything else printed meanwhile (another thread) is not ours to drop
            sys.stdout.write(rest)


def open_volume(url: str, missing: str = "zeros", mip: int = 0) -> Volume:
    """Open an existing volume; :class:`StorageError` ``no volume at URL`` if there is none.

    ``missing``: how precomputed chunks that do not exist are read: ``"zeros"``, ``"count"``
    (zeros, counted in ``filled_chunks``: a job's input planned with ``--fill-missing``) or
    ``"refuse"`` (:class:`~chunkflow.errors.MissingInput` naming the chunk: a job's input by
    default). A zarr array defines a missing chunk as its fill value, so zarr reads are the same
    whatever ``missing`` says.

    ``mip``: the resolution level: precomputed ``scales[mip]``, OME-Zarr ``datasets[mip]``; a
    level that does not exist is refused, naming the levels there are.
    """
    if missing not in MISSING:
        raise ValueError(f"missing={missing!r} is not one of {MISSING}")
    fmt, location = _classify(url)
    with _gcs_access(url, location, "open"):
        if fmt == "zarr":
            from chunkflow.storage.zarr_volume import ZarrVolume

            return ZarrVolume.open(url, location, mip=mip)
        from chunkflow.storage.precomputed import PrecomputedVolume

        return PrecomputedVolume.open(url, location, missing, mip=mip)


def create_volume(
    url: str,
    bbox: Bbox,
    chunk_size: Vec,
    num_channels: int,
    dtype: str,
    resolution: tuple[float, float, float] = (40.0, 8.0, 8.0),
    layer_type: str = "image",
    compression: str = "default",
    shard: Vec | None = None,
) -> Volume:
    """Create a volume, or return the existing one if its geometry is identical.

    ``bbox``, ``chunk_size``, ``resolution`` and ``shard`` (the shard shape of a sharded volume,
    ``storage/sharding.py``) are ZYX. An existing volume with a different bbox, chunk size, shards,
    channel count, dtype or resolution is an error: a job must never write into storage laid out
    for another.
    """
    fmt, location = _classify(url)
    bbox = Bbox(bbox.start, bbox.stop)
    chunk_size = Vec(chunk_size)
    if bbox.is_empty():
        raise StorageError(f"cannot create volume {url} with empty bbox {bbox.name}")
    if any(c <= 0 for c in chunk_size):
        raise StorageError(f"cannot create volume {url}: chunk size {tuple(chunk_size)} must be positive")
    if int(num_channels) < 1:
        raise StorageError(f"cannot create volume {url}: num_channels must be >= 1, got {num_channels}")
    wanted = {
        "bbox": bbox.name,
        "chunk_size": tuple(chunk_size),
        "num_channels": int(num_channels),
        "dtype": str(np.dtype(dtype)),
        "resolution": tuple(float(r) for r in resolution),
        "shards": tuple(Vec(shard)) if shard is not None else None,
    }
    if fmt == "zarr":
        from chunkflow.storage.zarr_volume import ZarrVolume as impl
    else:
        from chunkflow.storage.precomputed import PrecomputedVolume as impl  # type: ignore[assignment]

    with _gcs_access(url, location, "create"):
        vol = impl.open_if_exists(url, location)
        if vol is None:
            log.info("creating volume %s bbox=%s chunk=%s", url, bbox.name, tuple(chunk_size))
            # create() may lose a race to a concurrent creator and return its volume instead,
            # so the geometry is compared in every case.
            vol = impl.create(url, location, bbox, chunk_size, int(num_channels), np.dtype(dtype),
                              tuple(float(r) for r in resolution), layer_type, compression=compression,
                              **({"shard": Vec(shard)} if shard is not None else {}))
    have = vol.geometry()
    if have != wanted:
        diff = ", ".join(f"{k} {have[k]} != {wanted[k]}" for k in wanted if have[k] != wanted[k])
        raise StorageError(f"volume {url} already exists with a different geometry: {diff}")
    return vol
