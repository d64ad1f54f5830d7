"""Fail fast, in one line, before a ``gs://`` volume is handed to CloudVolume or gcsfs.

cloud-files retries every GCS call 7 times (its own back-off, up to 60 s a wait) on top
of the Google client's retries, so a dead endpoint made ``chunkflow plan`` silent for
10+ minutes; gcsfs gives up after ~30 s with a multi-line trace; and a missing bucket
read as "no volume at ...". So before either library sees the path, its bucket is
probed once with google-cloud-storage, exactly as the donation store opens its bucket
(:class:`~chunkflow.storage.gcs.GCSStore`): the same client and retry deadline
``CHUNKFLOW_GCS_RETRY_DEADLINE`` (:mod:`~chunkflow.storage.gcs_client`), the same one-line
messages (:mod:`~chunkflow.storage.gcs_errors`)::

    bucket NAME does not exist (open gs://NAME/path)
    connection refused: GCS endpoint HOST:PORT (open gs://NAME/path)

The probe lists at most one object. It only refuses what would fail anyway: a missing
bucket, an endpoint that cannot be reached, a token that cannot be had. A 401/403 is no
verdict (the volume's library may hold other credentials, e.g. CloudVolume's
``~/.cloudvolume/secrets``, or the caller may read objects without listing them), so the
open goes on. Without any Google credentials the probe runs anonymously for the same
reason. A bucket that answered once is not probed again in this process.

Every probe first bounds the retries of cloud-files and google-cloud-storage in this process
by the same deadline (:func:`~chunkflow.storage.gcs_volume_retries.bound_volume_retries`), so
that a volume whose endpoint dies after it was opened fails each read or write in bounded time too.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from chunkflow.errors import StorageError
from chunkflow.storage import gcs_client
from chunkflow.storage.gcs_errors import attempted, gcs_error
from chunkflow.storage.gcs_volume_retries import bound_volume_retries
from chunkflow.storage.volume_urls import volume_format

__all__ = ["probe_bucket"]

log = logging.getLogger(__name__)

#: seconds a probe waits for its bucket's answer before it says that it is still waiting
PATIENCE_S = 5.0
_ANSWERED: set[tuple[str, str]] = set()  # (endpoint, bucket) that answered a probe
_LOCK = threading.Lock()
#: connections in the probe's pool (it makes one call)
_POOL_SIZE = 2


def _probe_client(volume_url: str, bucket: str) -> Any:
    """The donation store's client for ``bucket``; an anonymous one where there are no usable
    Google credentials here: CloudVolume may have its own secrets file and gcsfs falls back to
    anonymous access, so the probe goes on anonymously and lets them decide."""
    try:
        return gcs_client.make_client(f"gs://{bucket}", None, None, _POOL_SIZE)
    except StorageError as exc:
        log.debug("probing %s anonymously: %s", volume_url, exc)
        return gcs_client.anonymous_client()


def probe_bucket(url: str, location: str, action: str = "open") -> None:
    """Raise a one-line :class:`StorageError` if the bucket of ``location`` (``gs://b/p``) is
    missing or its endpoint unreachable; ``url`` is the volume URL named in the message."""
    from google.api_core import exceptions as gexc

    bound_volume_retries(gcsfs=volume_format(url) == "zarr")
    bucket = location[len("gs://"):].partition("/")[0]
    if not bucket:
        raise StorageError(f"volume URL {url!r} names no bucket")
    key = (os.environ.get("STORAGE_EMULATOR_HOST", ""), bucket)
    with _LOCK:
        if key in _ANSWERED:
            return
    deadline = gcs_client.retry_deadline()
    client = _probe_client(url, bucket)
    waiting = threading.Timer(PATIENCE_S, log.warning, args=(
        "no answer yet from the GCS endpoint %s for bucket %s after %.0f s; retrying for up to %.0f s "
        "(CHUNKFLOW_GCS_RETRY_DEADLINE)", gcs_client.endpoint(client), bucket, PATIENCE_S, deadline))
    waiting.daemon = True
    waiting.start()  # an unreachable endpoint is retried for the whole deadline: say so, not silence
    try:
        pages = client.list_blobs(bucket, max_results=1, fields="items(name)", retry=gcs_client.retry_policy(deadline),
                                  timeout=gcs_client.attempt_timeouts(deadline))
        next(iter(pages), None)
    except Exception as exc:  # noqa: BLE001
        cause = exc.cause if isinstance(exc, gexc.RetryError) and exc.cause is not None else exc
        if not isinstance(cause, (gexc.Forbidden, gexc.Unauthorized)):
            raise gcs_error(exc, attempted(action, url), bucket, gcs_client.endpoint(client)) from exc
        log.debug("probe of %s: %s; leaving the verdict to the volume's library", url, cause)
    finally:
        waiting.cancel()
    with _LOCK:
        _ANSWERED.add(key)
