"""Open and create volumes by URL: the one place that knows every format.

Why its own module: the factories import the formats (``precomputed.py``, ``zarr_volume.py``),
which import the interface (``volumes.py``), so the factories sit above both. The formats'
libraries (CloudVolume, zarr) are imported only when a volume of that format is opened.

Opening or creating a ``gs://`` volume (either format) first probes its bucket once
(``gcs_probe.py``): a missing bucket or a dead endpoint is one line within
``CHUNKFLOW_GCS_RETRY_DEADLINE`` seconds instead of cloud-files' minutes of retries.
The credentials notice cloud-files prints on stdout is kept off chunkflow's stdout.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
from typing import Iterator

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import StorageError
from chunkflow.storage.volume_urls import classify, volume_format
from chunkflow.storage.volumes import MISSING, Volume

__all__ = ["check_output_compression", "create_volume", "open_volume"]

log = logging.getLogger(__name__)


def check_output_compression(url: str, compression: str, dtype: str, num_channels: int) -> None:
    """Refuse, before anything is written, an ``--output-compression`` the output's format does not
    offer for ``dtype`` and ``num_channels`` (one line naming the valid values)."""
    if volume_format(url) == "zarr":
        from chunkflow.storage.zarr_volume import check_zarr_compression

        check_zarr_compression(compression, dtype, num_channels)
    else:
        from chunkflow.storage.precomputed_codecs import check_precomputed_compression

        check_precomputed_compression(compression, dtype, num_channels)


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
    fmt, location = classify(url)
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
    fmt, location = classify(url)
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
