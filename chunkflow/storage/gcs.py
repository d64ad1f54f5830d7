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
``CHUNKFLOW_GCS_RETRY_DEADLINE``; a small value makes a wrong endpoint fail fast). One
attempt waits at most ``min(10 s, deadline)`` for a connection and ``timeout`` (60 s) for an
answer. Since every object chunkflow writes is a pure function of (job, task), retrying an
unconditional upload is safe. Caveat: if an ``if_absent`` upload succeeds but its response is lost, the
retry sees 412 and ``put`` returns False although this call wrote the object.

The same deadline bounds the libraries behind ``gs://`` volumes (:func:`bound_volume_retries`,
installed by the bucket probe before CloudVolume or gcsfs sees a path), so an endpoint that dies
in the middle of a run fails every store and volume call in about ``retry_deadline`` seconds.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Iterator
from urllib.parse import urlparse

from chunkflow.errors import StorageError
from chunkflow.storage.objects import InvalidName, ObjectStore, validate_name, validate_prefix

log = logging.getLogger(__name__)

EMULATOR_PROJECT = "chunkflow-test"
#: seconds one attempt may wait for a connection (at most the retry deadline, at least 1 s): an
#: endpoint that drops packets must not hold every attempt for the whole read timeout
CONNECT_TIMEOUT = 10.0


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


def retry_deadline() -> float:
    """Seconds a GCS call is retried: ``CHUNKFLOW_GCS_RETRY_DEADLINE``, default 120."""
    return _retry_deadline(None)


_BOUND_LOCK = threading.Lock()
_bound: dict[str, float] = {}  # library -> the deadline its retries are bound by in this process
_cloudfiles_stops: dict[str, object] = {}  # cloud-files method -> its own stop condition
_GCSFS_METHODS = ("_request", "_get_file_request", "_get_file_concurrent")
_GCSFS_RETRIES = 6  # gcsfs' own number of attempts


def bound_volume_retries(deadline: float | None = None, gcsfs: bool = False) -> float:
    """Bound, in this process, the retries of the libraries behind ``gs://`` volumes by the
    store's deadline (``deadline`` or :func:`retry_deadline`); returns the deadline in force.

    Without it a GCS endpoint that goes away in the middle of a run held a precomputed read or
    write for about 15 minutes (and a process could not exit while a prefetch thread waited):
    cloud-files makes up to 7 attempts (waits up to 60 s) around each call, and each attempt is
    google-cloud-storage's default retry, which gives up after 120 s. Here

    - google-cloud-storage's default retry object, which cloud-files gets because it passes no
      ``retry=``, gives up after ``deadline`` seconds;
    - cloud-files' loop (``GoogleCloudStorageInterface``) keeps its 7 attempts but stops before
      a wait that would end more than ``deadline`` seconds after its first attempt;
    - with ``gcsfs`` (zarr volumes): gcsfs' loop (6 attempts, waits of 2**k + rand(0, 1) s)
      keeps only the attempts whose waits fit in ``deadline`` (6 for the default 120 s).

    So a call fails in about ``deadline`` seconds plus one attempt's socket timeout (60 s for
    an endpoint that drops packets: cloud-files and gcsfs set their own; one that refuses
    connections fails at once). This changes library globals of this process; chunkflow's own
    store passes its retry explicitly and is unaffected.
    """
    seconds = _retry_deadline(deadline)
    with _BOUND_LOCK:
        if _bound.get("google") != seconds:
            from google.cloud.storage import retry as gcs_retry

            if hasattr(gcs_retry.DEFAULT_RETRY, "_timeout"):
                gcs_retry.DEFAULT_RETRY._timeout = seconds
            else:  # pragma: no cover - a google-api-core that renamed it
                log.debug("google-cloud-storage's DEFAULT_RETRY has no _timeout; its 120 s deadline stays")
            _bound_cloudfiles(seconds)
            _bound["google"] = seconds
        if gcsfs and _bound.get("gcsfs") != seconds:
            _bound_gcsfs(seconds)
            _bound["gcsfs"] = seconds
    return seconds


def _bound_cloudfiles(seconds: float) -> None:
    try:
        import tenacity
        from cloudfiles.interfaces import GoogleCloudStorageInterface
    except ImportError:
        return
    stop_by = getattr(tenacity, "stop_before_delay", tenacity.stop_after_delay)
    for name, attr in vars(GoogleCloudStorageInterface).items():
        retrying = getattr(attr, "retry", None)
        if isinstance(retrying, tenacity.BaseRetrying):  # a @retry-decorated method
            own = _cloudfiles_stops.setdefault(name, retrying.stop)
            retrying.stop = own | stop_by(seconds)


def gcsfs_attempts(seconds: float) -> int:
    """gcsfs attempts whose waits before them (at most 2**(k-1) + 1 s each) add up to ``seconds``."""
    attempts, waited = 1, 0.0
    while attempts < _GCSFS_RETRIES:
        waited += min(2.0 ** (attempts - 1) + 1.0, 32.0)
        if waited > seconds:
            break
        attempts += 1
    return attempts


def _bound_gcsfs(seconds: float) -> None:
    if "gcsfs" not in sys.modules and os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # as zarr_volume does
    try:
        from gcsfs.core import GCSFileSystem
        from gcsfs.retry import retry_request
    except ImportError:
        return
    attempts = gcsfs_attempts(seconds)
    for name in _GCSFS_METHODS:
        method = GCSFileSystem.__dict__.get(name)
        original = getattr(method, "__wrapped__", None)
        if original is None:  # pragma: no cover - a gcsfs that no longer wraps it
            log.debug("gcsfs' %s has no retry wrapper; its own attempts stay", name)
            continue
        setattr(GCSFileSystem, name, retry_request(retries=attempts)(original))


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
            try:
                validate_name(prefix, "store prefix")
            except InvalidName as err:
                raise InvalidName(f"GCS store URL {url!r}: {err}") from None
        self.bucket_name = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"gs://{bucket}/{prefix}".rstrip("/")
        self.timeout = timeout
        deadline = _retry_deadline(retry_deadline)
        self._retry = DEFAULT_RETRY.with_timeout(deadline)
        self._timeouts = (max(1.0, min(CONNECT_TIMEOUT, deadline)), timeout)  # (connect, read) of one attempt
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
                self.bucket_name, prefix=self.prefix, max_results=1, retry=self._retry, timeout=self._timeouts
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
