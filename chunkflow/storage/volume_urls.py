"""Volume URLs: which format a URL names, where its bytes live, and what is supported.

Two formats are supported:

* Neuroglancer precomputed through CloudVolume (``precomputed.py``):
  ``file:///abs/path``, ``gs://bucket/path``, ``s3://bucket/path``, each optionally
  prefixed ``precomputed://``;
* zarr v3 (``zarr_volume.py``): a local path ending ``.zarr``, ``zarr://PATH`` or
  ``zarr://gs://bucket/path.zarr``.

Foreign formats (HDF5, N5, TIFF) are refused naming how to convert them (``formats.py``). Only
the URL is read here: nothing is opened and no format's library is imported.
"""
from __future__ import annotations

import os

from chunkflow.errors import StorageError
from chunkflow.storage.formats import foreign_format

__all__ = ["SUPPORTED_URLS", "classify", "same_or_nested", "volume_format", "volume_location"]

SUPPORTED_URLS = (
    "supported volume URLs: [precomputed://]file:///abs/path, [precomputed://]gs://bucket/path, "
    "[precomputed://]s3://bucket/path, /local/path.zarr (zarr array or OME-Zarr image; path.zarr/LEVEL for "
    "one level), zarr://PATH, zarr://gs://bucket/path.zarr"
)


def classify(url: str) -> tuple[str, str]:
    """Return ``(format, location)`` for a volume URL, or raise StorageError."""
    if not isinstance(url, str) or not url:
        raise StorageError(f"volume URL {url!r} is not a string; {SUPPORTED_URLS}")
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
    fmt, location = classify(url)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" not in location:
        return os.path.realpath(os.path.abspath(location))
    return location.rstrip("/")


def same_or_nested(a: str, b: str) -> bool:
    """Whether two locations from :func:`volume_location` are one place or one holds the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def volume_format(url: str) -> str:
    """``"precomputed"`` or ``"zarr"`` for a supported volume URL (StorageError otherwise)."""
    return classify(url)[0]
