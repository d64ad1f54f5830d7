"""A GCS object store on google-cloud-storage (not cloud-files).

Atomicity: each ``put`` is one object upload (multipart below 8 MiB, resumable above);
GCS publishes an object only when its upload completes, so readers never see a torn
donation. ``put(..., if_absent=True)`` sends ``ifGenerationMatch=0``, which the server
enforces: the upload fails with 412 if any live object has that name.

Credentials, first match wins: an explicit ``credentials=`` service-account JSON path;
anonymous credentials when ``STORAGE_EMULATOR_HOST`` is set (the client then talks to
that endpoint, e.g. fake-gcs-server); otherwise Application Default Credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, gcloud ADC, the metadata server).

Transient failures (429, 5xx, connection resets and refusals) are retried with the
library's exponential back-off up to ``retry_deadline`` seconds (default 120, or
``CHUNKFLOW_GCS_RETRY_DEADLINE``; a small value makes a wrong endpoint fail fast). Since every object
chunkflow writes is a pure function of (job, task), retrying an unconditional upload
is safe. Caveat: if an ``if_absent`` upload succeeds but its response is lost, the
retry sees 412 and ``put`` returns False although this call wrote the object.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Iterator
from urllib.parse import urlparse

from chunkflow.storage.objects import ObjectStore, validate_name, validate_prefix
from chunkflow.storage.volumes import StorageError

log = logging.getLogger(__name__)

EMULATOR_PROJECT = "chunkflow-test"


def _endpoint_host(endpoint: str) -> str:
    parsed = urlparse(endpoint)
    return parsed.netloc or endpoint


def _retry_deadline(value: float | None) -> float:
    if value is not None:
        return float(value)
    text = os.environ.get("CHUNKFLOW_GCS_RETRY_DEADLINE", "120")
    try:
        return float(text)
    except ValueError:
        raise StorageError(f"CHUNKFLOW_GCS_RETRY_DEADLINE={text!r} is not a number of seconds") from None


def _api_message(exc: BaseException) -> str:
    """``403 <the server's message>`` for an API error, whatever the transport wrapped around it
    (uploads embed the whole JSON error body in the exception text)."""
    found = re.search(r'"message":\s*"((?:[^"\\]|\\.)*)"', str(exc))
    code = getattr(exc, "code", None)
    if found and code:
        return f"{int(code)} {found.group(1)}"
    return re.sub(r"^(\d{3}) [A-Z]+ \S+: ", r"\1 ", _first_line(exc))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class GCSStore(ObjectStore):
    """Objects under ``gs://bucket/prefix``; names are relative to the prefix."""

    def __init__(
        self,
        url: str,
        credentials: str | None = None,
        project: str | None = None,
        retry_deadline: float | None = None,
        timeout: float = 60.0,
        pool_size: int = 32,
        check_bucket: bool = True,
    ) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        if not url.startswith("gs://"):
            raise StorageError(f"GCS store URL {url!r} must start with gs://")
        bucket, _, prefix = url[len("gs://"):].partition("/")
        if not bucket:
            raise StorageError(f"GCS store URL {url!r} names no bucket")
        prefix = prefix.strip("/")
        if prefix:
            validate_name(prefix, "store prefix")
        self.bucket_name = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"gs://{bucket}/{prefix}".rstrip("/")
        self.timeout = timeout
        self._retry = DEFAULT_RETRY.with_timeout(_retry_deadline(retry_deadline))
        self._client = self._make_client(credentials, project, pool_size)
        self._bucket = self._client.bucket(bucket)
        self.endpoint = self._client._connection.API_BASE_URL
        if check_bucket:
            self._check_bucket()

    # -- setup ---------------------------------------------------------------------
    def _make_client(self, credentials: str | None, project: str | None, pool_size: int):
        from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
        from google.cloud import storage

        try:
            if credentials:
                from google.oauth2 import service_account

                creds = service_account.Credentials.from_service_account_file(credentials)
                client = storage.Client(project=project or creds.project_id, credentials=creds)
            elif os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=project or EMULATOR_PROJECT, credentials=AnonymousCredentials())
            else:
                client = storage.Client(project=project)
        except (OSError, ValueError, GoogleAuthError) as exc:
            if credentials:
                raise StorageError(f"cannot load Google credentials {credentials!r}: {_first_line(exc)}") from exc
            if not isinstance(exc, DefaultCredentialsError):
                raise StorageError(f"cannot create a GCS client for {self.url}: {_first_line(exc)}") from exc
            if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
                raise StorageError(f"GOOGLE_APPLICATION_CREDENTIALS for {self.url}: {_first_line(exc)}") from exc
            raise StorageError(
                f"no Google credentials for {self.url}: set GOOGLE_APPLICATION_CREDENTIALS=KEY.json (every "
                "command and worker), run `gcloud auth application-default login`, or give inspect --credentials KEY.json"
            ) from exc
        self._widen_pool(client, pool_size)
        return client

    @staticmethod
    def _widen_pool(client, pool_size: int) -> None:
        """Let ``get_many``'s threads share connections instead of discarding them."""
        try:
            import requests.adapters

            adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
            session = client._http
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        except Exception:  # noqa: BLE001 - an optimisation only
            log.debug("could not widen the GCS connection pool", exc_info=True)

    def _check_bucket(self) -> None:
        """Fail early, with one line, on a missing bucket, no permission or no connection.

        Lists at most one object: that needs only ``storage.objects.list``, which every
        user of the store needs anyway (``storage.buckets.get`` may not be granted).
        """
        try:
            iterator = self._client.list_blobs(
                self.bucket_name, prefix=self.prefix, max_results=1, retry=self._retry, timeout=self.timeout
            )
            next(iter(iterator), None)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "open") from exc

    # -- error mapping -------------------------------------------------------------
    def _error(self, exc: BaseException, action: str, name: str | None = None) -> StorageError:
        import requests
        from google.api_core import exceptions as gexc
        from google.auth.exceptions import RefreshError, TransportError

        what = f"{action} {self.url}/{name}" if name else f"{action} {self.url}"
        cause: BaseException = exc
        if isinstance(exc, gexc.RetryError) and exc.cause is not None:
            cause = exc.cause
        host = _endpoint_host(self.endpoint)
        if isinstance(cause, gexc.NotFound):
            return StorageError(f"bucket {self.bucket_name} does not exist ({what})")
        if isinstance(cause, (gexc.Forbidden, gexc.Unauthorized)):
            return StorageError(f"permission denied: {what}: {_api_message(cause)}")
        if isinstance(cause, RefreshError):
            return StorageError(f"credentials refused by the token endpoint ({what}): {_first_line(cause)}")
        if isinstance(cause, TransportError) and not isinstance(cause, requests.exceptions.RequestException):
            # google.auth's own transport: the access-token request, not the GCS endpoint
            return StorageError(f"cannot get an access token ({what}): {_first_line(cause)}")
        if isinstance(cause, requests.exceptions.Timeout):  # a ConnectionError subclass too
            return StorageError(f"timed out: {what} at {host}")
        if isinstance(cause, (requests.exceptions.ConnectionError, ConnectionError, TransportError)):
            reason = "connection refused" if "refused" in str(cause).lower() else "cannot connect"
            return StorageError(f"{reason}: GCS endpoint {host} ({what})")
        if isinstance(exc, gexc.RetryError) and "timeout" in str(exc).lower():
            return StorageError(f"timed out retrying: {what} at {host}: {_first_line(cause)}")
        if isinstance(exc, gexc.RetryError):
            return StorageError(f"gave up retrying: {what}: {_first_line(cause)}")
        return StorageError(f"failed: {what}: {type(cause).__name__}: {_api_message(cause)}")

    # -- ObjectStore ---------------------------------------------------------------
    def _blob(self, name: str):
        return self._bucket.blob(self.prefix + validate_name(name))

    def put(self, name: str, data: bytes, if_absent: bool = False) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        blob = self._blob(name)
        try:
            blob.upload_from_string(
                bytes(data),
                content_type="application/octet-stream",
                if_generation_match=0 if if_absent else None,
                retry=self._retry,
                timeout=self.timeout,
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
            return blob.download_as_bytes(retry=self._retry, timeout=self.timeout, **ranged)
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
            return blob.exists(retry=self._retry, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "check", name) from exc

    def list_with_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        full = self.prefix + prefix
        try:
            # Paged lazily by the iterator; ``fields`` keeps pages to names and sizes.
            blobs = self._client.list_blobs(
                self.bucket_name,
                prefix=full,
                fields="items(name,size),nextPageToken",
                retry=self._retry,
                timeout=self.timeout,
            )
            for blob in blobs:
                yield blob.name[len(self.prefix):], int(blob.size or 0)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "list", prefix or None) from exc

    def delete(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        blob = self._blob(name)
        try:
            blob.delete(retry=self._retry, timeout=self.timeout)
        except NotFound:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "delete", name) from exc
