"""Open an object store by URL: a local directory or a GCS bucket.

Why its own module: the factory knows every kind of store, so it sits above them; the stores
themselves (:mod:`~chunkflow.storage.objects`, :mod:`~chunkflow.storage.gcs`) import only the
interface. google-cloud-storage is imported only when a ``gs://`` store is opened.
"""
from __future__ import annotations

from chunkflow.errors import StorageError
from chunkflow.storage.objects import DirectoryStore, ObjectStore
from chunkflow.storage.volume_urls import suggest_file_url

__all__ = ["open_store"]


def open_store(url: str, **kwargs) -> ObjectStore:
    """Open a store: a local directory (path or ``file:///path``) or ``gs://bucket/prefix``.

    Keyword arguments go to :class:`~chunkflow.storage.gcs.GCSStore` (``credentials``,
    ``project``, ``retry_deadline``, ``timeout``).
    """
    if not isinstance(url, str) or not url:
        raise StorageError(f"store URL {url!r} is not a string")
    if url.startswith("gs://"):
        from chunkflow.storage.gcs import GCSStore

        return GCSStore(url, **kwargs)
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/"):
            meant = suggest_file_url(url)
            hint = f" (did you mean {meant}?)" if meant else ""
            raise StorageError(f"store URL {url!r} must be file:///absolute/path{hint}")
        return DirectoryStore(path)
    if "://" in url:
        raise StorageError(f"unsupported store URL {url!r}; use a directory path, file:///path or gs://bucket/prefix")
    return DirectoryStore(url)
