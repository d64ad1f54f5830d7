"""A GCS object store on google-cloud-storage (not cloud-files).

Atomicity: each ``put`` is one object upload (multipart below 8 MiB, resumable above);
GCS publishes an object only when its upload completes, so readers never see a torn
donation. ``put(..., if_absent=True)`` sends ``ifGenerationMatch=0``, which the server
enforces: the upload fails with 412 if any live object has that name.

Credentials, retries and timeouts are those of :mod:`~chunkflow.storage.gcs_client`: transient
failures are retried up to ``retry_deadline`` seconds (default 120, or
``CHUNKFLOW_GCS_RETRY_DEADLINE``). Since every object chunkflow writes is a pure function of
(job, task), retrying an unconditional upload is safe. Caveat: if an ``if_absent`` upload succeeds
but its response is lost, the retry sees 412 and ``put`` returns False although this call wrote
the object. Failures are one line (:mod:`~chunkflow.storage.gcs_errors`).

The same deadline bounds the libraries behind ``gs://`` volumes
(:func:`~chunkflow.storage.gcs_volume_retries.bound_volume_retries`, installed by the bucket probe
before CloudVolume or gcsfs sees a path), so an endpoint that dies in the middle of a run fails
every store and volume call in about ``retry_deadline`` seconds.
"""
from __future__ import annotations

from typing import Iterator

from chunkflow.errors import StorageError
from chunkflow.storage import gcs_client
from chunkflow.storage.gcs_client import DEFAULT_TIMEOUT
from chunkflow.storage.gcs_errors import attempted, gcs_error
from chunkflow.storage.names import InvalidName, validate_name, validate_prefix
from chunkflow.storage.objects import ObjectStore

__all__ = ["GCSStore"]

#: names per list request
LIST_PAGE = 1000


class GCSStore(ObjectStore):
    """Objects under ``gs://bucket/prefix``; names are relative to the prefix."""

    def __init__(
        self,
        url: str,
        credentials: str | None = None,
        project: str | None = None,
        retry_deadline: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = 32,
        check_bucket: bool = True,
    ) -> None:
        if not url.startswith("gs://"):
            raise StorageError(f"GCS store URL {url!r} must start with gs://")
        bucket, _, prefix = url[len("gs://"):].partition("/")
        if not bucket:
            raise StorageError(f"GCS store URL {url!r} names no bucket")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_name(prefix, "store prefix")
            except InvalidName as err:
                raise InvalidName(f"GCS store URL {url!r}: {err}") from None
        self.bucket_name = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"gs://{bucket}/{prefix}".rstrip("/")
        self.timeout = timeout
        deadline = gcs_client.retry_deadline(retry_deadline)
        self._retry = gcs_client.retry_policy(deadline)
        self._timeouts = gcs_client.attempt_timeouts(deadline, timeout)  # (connect, read) of one attempt
        self._client = gcs_client.make_client(self.url, credentials, project, pool_size)
        self._bucket = self._client.bucket(bucket)
        self.endpoint = gcs_client.endpoint(self._client)
        if check_bucket:
            self._check_bucket()

    # -- setup ---------------------------------------------------------------------
    def _check_bucket(self) -> None:
        """Fail early, with one line, on a missing bucket, no permission or no connection.

        Lists at most one object: that needs only ``storage.objects.list``, which every
        user of the store needs anyway (``storage.buckets.get`` may not be granted).
        """
        try:
            iterator = self._client.list_blobs(
                self.bucket_name, prefix=self.prefix, max_results=1, retry=self._retry, timeout=self._timeouts
            )
            next(iter(iterator), None)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "open") from exc

    def _error(self, exc: BaseException, action: str, name: str | None = None) -> StorageError:
        """The one-line error for ``exc`` raised by ``action`` on this store (or on its object ``name``)."""
        return gcs_error(exc, attempted(action, self.url, name), self.bucket_name, self.endpoint)

    # -- ObjectStore ---------------------------------------------------------------
    def _blob(self, name: str):
        return self._bucket.blob(self.prefix + validate_name(name))

    def put(self, name: str, data: bytes, if_absent: bool = False, durable: bool = False) -> bool:
        """An object is durable once its upload returns: ``durable`` asks nothing more of GCS."""
        from google.api_core.exceptions import PreconditionFailed

        blob = self._blob(name)
        try:
            blob.upload_from_string(
                bytes(data),
                content_type="application/octet-stream",
                if_generation_match=0 if if_absent else None,
                retry=self._retry,
                timeout=self._timeouts,
            )
        except PreconditionFailed:
            return False
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "write", name) from exc
        return True

    def get(self, name: str) -> bytes:
        return self._download(name)

    def get_head(self, name: str, nbytes: int) -> bytes:
        """One ranged GET (``Range: bytes=0-N``): a donation's header without its payload."""
        return self._download(name, int(nbytes)) if nbytes > 0 else b""

    def _download(self, name: str, nbytes: int | None = None) -> bytes:
        """The object (or its first ``nbytes``); KeyError when it does not exist."""
        from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

        blob = self._blob(name)
        ranged = {} if nbytes is None else {"start": 0, "end": nbytes - 1}
        try:
            return blob.download_as_bytes(retry=self._retry, timeout=self._timeouts, **ranged)
        except RequestRangeNotSatisfiable:
            return b""  # GCS answers 416 for a range of an empty object
        except NotFound as exc:
            if "bucket" in str(exc).lower() and "not exist" in str(exc).lower():
                raise self._error(exc, "read", name) from exc
            raise KeyError(name) from None
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "read", name) from exc

    def exists(self, name: str) -> bool:
        blob = self._blob(name)
        try:
            return blob.exists(retry=self._retry, timeout=self._timeouts)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "check", name) from exc

    def list_with_sizes(self, prefix: str = "", start_offset: str | None = None) -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        full = self.prefix + prefix
        start = {} if start_offset is None else {"start_offset": self.prefix + start_offset}
        try:
            # Paged lazily by the iterator, LIST_PAGE names a request (GCS's default and most; said
            # explicitly, as emulators default to everything at once); ``fields`` keeps pages to names
            # and sizes; ``start_offset`` (``startOffset``) skips the names before it server-side.
            blobs = self._client.list_blobs(
                self.bucket_name,
                prefix=full,
                page_size=LIST_PAGE,
                **start,
                fields="items(name,size),nextPageToken",
                retry=self._retry,
                timeout=self._timeouts,
            )
            for blob in blobs:
                yield blob.name[len(self.prefix):], int(blob.size or 0)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "list", prefix or None) from exc

    def delete(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        blob = self._blob(name)
        try:
            blob.delete(retry=self._retry, timeout=self._timeouts)
        except NotFound:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "delete", name) from exc
