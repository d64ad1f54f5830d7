"""GCS failures as one-line :class:`~chunkflow.errors.StorageError` messages.

Whatever google-cloud-storage, google-auth or requests raised (after the retries gave up), the
user sees one line naming what was attempted and why it failed::

    bucket NAME does not exist (open gs://NAME/path)
    permission denied: write gs://NAME/path/key: 403 <the server's message>
    connection refused: GCS endpoint HOST:PORT (open gs://NAME/path)
    timed out: read gs://NAME/path/key at HOST:PORT

Used by the donation store (:mod:`~chunkflow.storage.gcs`) and the bucket probe of ``gs://``
volumes (:mod:`~chunkflow.storage.gcs_probe`), so both word a failure alike.
"""
from __future__ import annotations

import re
from urllib.parse import urlparse

from chunkflow.errors import StorageError, one_line

__all__ = ["api_message", "attempted", "gcs_error"]


def api_message(exc: BaseException) -> str:
    """``403 <the server's message>`` for an API error, whatever the transport wrapped around it
    (uploads embed the whole JSON error body in the exception text)."""
    found = re.search(r'"message":\s*"((?:[^"\\]|\\.)*)"', str(exc))
    code = getattr(exc, "code", None)
    if found and code:
        return f"{int(code)} {found.group(1)}"
    return re.sub(r"^(\d{3}) [A-Z]+ \S+: ", r"\1 ", one_line(exc, first_only=True))


def endpoint_host(endpoint: str) -> str:
    """``HOST:PORT`` of an endpoint URL (the URL itself when it has no network location)."""
    parsed = urlparse(endpoint)
    return parsed.netloc or endpoint


def attempted(action: str, url: str, name: str | None = None) -> str:
    """What a message says was attempted: ``ACTION URL`` or ``ACTION URL/NAME``."""
    return f"{action} {url}/{name}" if name else f"{action} {url}"


def gcs_error(exc: BaseException, what: str, bucket: str, endpoint: str) -> StorageError:
    """The one-line error for ``exc``, raised while doing ``what`` (see :func:`attempted`) on
    ``bucket`` at ``endpoint`` (the client's API base URL)."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import RefreshError, TransportError

    cause: BaseException = exc
    if isinstance(exc, gexc.RetryError) and exc.cause is not None:
        cause = exc.cause
    host = endpoint_host(endpoint)
    if isinstance(cause, gexc.NotFound):
        return StorageError(f"bucket {bucket} does not exist ({what})")
    if isinstance(cause, (gexc.Forbidden, gexc.Unauthorized)):
        return StorageError(f"permission denied: {what}: {api_message(cause)}")
    if isinstance(cause, RefreshError):
        return StorageError(f"credentials refused by the token endpoint ({what}): {one_line(cause, first_only=True)}")
    if isinstance(cause, TransportError) and not isinstance(cause, requests.exceptions.RequestException):
        # google.auth's own transport: the access-token request, not the GCS endpoint
        return StorageError(f"cannot get an access token ({what}): {one_line(cause, first_only=True)}")
    if isinstance(cause, requests.exceptions.Timeout):  # a ConnectionError subclass too
        return StorageError(f"timed out: {what} at {host}")
    if isinstance(cause, (requests.exceptions.ConnectionError, ConnectionError, TransportError)):
        reason = "connection refused" if "refused" in str(cause).lower() else "cannot connect"
        return StorageError(f"{reason}: GCS endpoint {host} ({what})")
    if isinstance(exc, gexc.RetryError) and "timeout" in str(exc).lower():
        return StorageError(f"timed out retrying: {what} at {host}: {one_line(cause, first_only=True)}")
    if isinstance(exc, gexc.RetryError):
        return StorageError(f"gave up retrying: {what}: {one_line(cause, first_only=True)}")
    return StorageError(f"failed: {what}: {type(cause).__name__}: {api_message(cause)}")
