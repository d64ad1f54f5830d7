"""google-cloud-storage clients, and the retry and timeouts every chunkflow call to GCS passes.

Credentials, first match wins: an explicit ``credentials=`` service-account JSON path;
anonymous credentials when ``STORAGE_EMULATOR_HOST`` is set (the client then talks to that
endpoint, e.g. fake-gcs-server); otherwise Application Default Credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, gcloud ADC, the metadata server).

Transient failures (429, 5xx, connection resets and refusals) are retried with the library's
exponential back-off up to a deadline (:func:`retry_deadline`: default 120 s, or
``CHUNKFLOW_GCS_RETRY_DEADLINE``; a small value makes a wrong endpoint fail fast). One attempt
waits at most ``min(10 s, deadline)`` for a connection and ``timeout`` (60 s) for an answer.

Used by the donation store (:class:`~chunkflow.storage.gcs.GCSStore`) and the bucket probe of
``gs://`` volumes (:mod:`~chunkflow.storage.gcs_probe`), so both talk to GCS alike.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from chunkflow.errors import StorageError, one_line

log = logging.getLogger(__name__)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "EMULATOR_PROJECT",
    "anonymous_client",
    "attempt_timeouts",
    "endpoint",
    "make_client",
    "retry_deadline",
    "retry_policy",
]

EMULATOR_PROJECT = "chunkflow-test"
#: seconds one attempt may wait for a connection (at most the retry deadline, at least 1 s): an
#: endpoint that drops packets must not hold every attempt for the whole read timeout
CONNECT_TIMEOUT = 10.0
#: seconds one attempt may wait for an answer
DEFAULT_TIMEOUT = 60.0


def retry_deadline(value: float | None = None) -> float:
    """Seconds a GCS call is retried: ``value`` if given, else ``CHUNKFLOW_GCS_RETRY_DEADLINE``
    (default 120); a variable that is not a number is a :class:`StorageError`."""
    if value is not None:
        return float(value)
    text = os.environ.get("CHUNKFLOW_GCS_RETRY_DEADLINE", "120")
    try:
        return float(text)
    except ValueError:
        raise StorageError(f"CHUNKFLOW_GCS_RETRY_DEADLINE={text!r} is not a number of seconds") from None


def retry_policy(deadline: float) -> Any:
    """google-cloud-storage's default retry (transient errors, exponential back-off), given up
    after ``deadline`` seconds."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(deadline)


def attempt_timeouts(deadline: float, timeout: float = DEFAULT_TIMEOUT) -> tuple[float, float]:
    """``(connect, read)`` seconds of one attempt: the connect wait is bounded by the deadline."""
    return (max(1.0, min(CONNECT_TIMEOUT, deadline)), timeout)


def make_client(url: str, credentials: str | None, project: str | None, pool_size: int) -> Any:
    """A ``google.cloud.storage.Client`` (see the module docstring for which credentials) whose
    connection pool holds ``pool_size`` connections; :class:`StorageError` naming ``url`` when
    no client can be had."""
    from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
    from google.cloud import storage

    try:
        if credentials:
            from google.oauth2 import service_account

            creds = service_account.Credentials.from_service_account_file(credentials)
            client = storage.Client(project=project or creds.project_id, credentials=creds)
        elif os.environ.get("STORAGE_EMULATOR_HOST"):
            client = anonymous_client(project)
        else:
            client = storage.Client(project=project)
    except (OSError, ValueError, GoogleAuthError) as exc:
        if credentials:
            raise StorageError(f"cannot load Google credentials {credentials!r}: "
                               f"{one_line(exc, first_only=True)}") from exc
        if not isinstance(exc, DefaultCredentialsError):
            raise StorageError(f"cannot create a GCS client for {url}: {one_line(exc, first_only=True)}") from exc
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            raise StorageError(f"GOOGLE_APPLICATION_CREDENTIALS for {url}: {one_line(exc, first_only=True)}") from exc
        raise StorageError(
            f"no Google credentials for {url}: set GOOGLE_APPLICATION_CREDENTIALS=KEY.json (every "
            "command and worker), run `gcloud auth application-default login`, or give inspect --credentials KEY.json"
        ) from exc
    _widen_pool(client, pool_size)
    return client


def anonymous_client(project: str | None = None) -> Any:
    """A client with anonymous credentials (an emulator, or a public bucket)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project=project or EMULATOR_PROJECT, credentials=AnonymousCredentials())


def endpoint(client: Any) -> str:
    """The API base URL a client talks to (the emulator's when ``STORAGE_EMULATOR_HOST`` is set)."""
    return client._connection.API_BASE_URL


def _widen_pool(client: Any, pool_size: int) -> None:
    """Let concurrent threads share connections instead of discarding them."""
    try:
        import requests.adapters

        adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
        session = client._http
        session.mount("https://", adapter)
        session.mount("http://", adapter)
    except Exception:  # noqa: BLE001 - an optimisation only
        log.debug("could not widen the GCS connection pool", exc_info=True)
