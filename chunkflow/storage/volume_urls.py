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

__all__ = ["SUPPORTED_URLS", "absolute_url", "classify", "same_or_nested", "suggest_file_url", "volume_format", "volume_location"]

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
            raise _unsupported(url)
        return "zarr", location
    if url.startswith("precomputed://"):
        location = url[len("precomputed://"):]
        if location.startswith(("file:///", "gs://", "s3://")):
            return "precomputed", location
        raise _unsupported(url)
    if url.startswith(("file:///", "gs://", "s3://")):
        return "precomputed", url
    if "://" not in url and any(part.endswith(".zarr") for part in url.rstrip("/").split("/")):
        return "zarr", url  # a store, or one level inside it (image.zarr/0)
    raise _unsupported(url)


def absolute_url(url: str) -> str:
    """``url`` with a relative local zarr path made absolute (``~`` expanded), in the same spelling
    otherwise, so that a job's manifest names the same volume from any working directory: a worker
    started elsewhere must not open another ``em.zarr``. Precomputed local URLs (``file:///``) are
    absolute already; remote URLs pass unchanged. StorageError for an unsupported URL."""
    fmt, location = classify(url)
    if fmt != "zarr" or "://" in location or os.path.isabs(location):
        return url
    absolute = os.path.abspath(os.path.expanduser(location))
    return f"zarr://{absolute}" if url.startswith("zarr://") else absolute


def _unsupported(url: str) -> StorageError:
    """The one-line refusal of ``url``, with the URL it most likely meant when that is plain."""
    meant = suggest_file_url(url)
    hint = f" (did you mean {meant}?)" if meant else ""
    return StorageError(f"unsupported volume URL {url!r}{hint}; {SUPPORTED_URLS}")


def suggest_file_url(url: str) -> str | None:
    """The ``file:///`` URL a refused local location most likely means, or None when none is plain.

    ``/abs/path`` and ``relative/path`` (made absolute) lack the scheme; ``file://tmp/x`` has two
    slashes, so ``tmp`` is read as a host; ``file://em`` is a relative path (made absolute);
    ``file://localhost/x`` names this machine. A
    ``precomputed://`` prefix is kept.
    """
    if url.startswith("precomputed://"):
        inner = suggest_file_url(url[len("precomputed://"):])
        return f"precomputed://{inner}" if inner else None
    if url.startswith("file://"):
        host, _, path = url[len("file://"):].partition("/")
        if host and not path and host != "localhost":  # file://em: a relative path given the scheme
            return "file:///" + os.path.abspath(host).lstrip("/")
        if not host or not path:
            return None
        return f"file:///{path}" if host == "localhost" else f"file:///{host}/{path}"
    if not url or "://" in url or ":" in url.split("/")[0]:
        return None  # another scheme, or something like gs:/bucket: no plain guess
    return "file:///" + os.path.abspath(url).lstrip("/")


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
