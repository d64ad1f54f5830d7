"""Fail fast, in one line, before a ``gs://`` volume is handed to CloudVolume or gcsfs.

cloud-files retries every GCS call 7 times (its own back-off, up to 60 s a wait) on top
of the Google client's retries, so a dead endpoint made ``chunkflow plan`` silent for
10+ minutes; gcsfs gives up after ~30 s with a multi-line trace; and a missing bucket
read as "no volume at ...". So before either library sees the path, its bucket is
probed once with google-cloud-storage, exactly as the donation store opens its bucket
(:class:`~chunkflow.storage.gcs.GCSStore`: same client, same retry deadline
``CHUNKFLOW_GCS_RETRY_DEADLINE``, same one-line messages)::

    bucket NAME does not exist (open gs://NAME/path)
    connection refused: GCS endpoint HOST:PORT (open gs://NAME/path)

The probe lists at most one object. It only refuses what would fail anyway: a missing
bucket, an endpoint that cannot be reached, a token that cannot be had. A 401/403 is no
verdict (the volume's library may hold other credentials, e.g. CloudVolume's
``~/.cloudvolume/secrets``, or the caller may read objects without listing them), so the
open goes on. Without any Google credentials the probe runs anonymously for the same
reason. A bucket that answered once is not probed again in this process.

Every probe first bounds the retries of cloud-files and google-cloud-storage in this process
by the same deadline (:func:`~chunkflow.storage.gcs.bound_volume_retries`), so that a volume
whose endpoint dies after it was opened fails each read or write in bounded time too.
"""
from __future__ import annotations

import logging
import os
import threading

from chunkflow.errors import StorageError
from chunkflow.storage.gcs import EMULATOR_PROJECT, GCSStore, bound_volume_retries

log = logging.getLogger(__name__)

_ANSWERED: set[tuple[str, str]] = set()  # (endpoint, bucket) that answered a probe
_LOCK = threading.Lock()


class _ProbeStore(GCSStore):
    """A GCSStore used only for its client, its retry and its error mapping.

    ``url`` is the volume's URL, so every message names what the user gave.
    """

    def __init__(self, volume_url: str, bucket: str) -> None:
        self._volume_url = volume_url
        super().__init__(f"gs://{bucket}", check_bucket=False, pool_size=2)
        self.url = volume_url

    def _make_client(self, credentials, project, pool_size):
        try:
            return super()._make_client(credentials, project, pool_size)
        except StorageError as exc:
            # No usable Google credentials here: CloudVolume may have its own secrets file and
            # gcsfs falls back to anonymous access, so probe anonymously and let them decide.
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            log.debug("probing %s anonymously: %s", self._volume_url, exc)
            return storage.Client(project=project or EMULATOR_PROJECT, credentials=AnonymousCredentials())


def probe_bucket(url: str, location: str, action: str = "open") -> None:
    """Raise a one-line :class:`StorageError` if the bucket of ``location`` (``gs://b/p``) is
    missing or its endpoint unreachable; ``url`` is the volume URL named in the message."""
    from google.api_core import exceptions as gexc

    from chunkflow.storage.volumes import volume_format

    bound_volume_retries(gcsfs=volume_format(url) == "zarr")
    bucket = location[len("gs://"):].partition("/")[0]
    if not bucket:
        raise StorageError(f"volume URL {url!r} names no bucket")
    key = (os.environ.get("STORAGE_EMULATOR_HOST", ""), bucket)
    with _LOCK:
        if key in _ANSWERED:
            return
    store = _ProbeStore(url, bucket)
    try:
        pages = store._client.list_blobs(bucket, max_results=1, fields="items(name)", retry=store._retry,
                                         timeout=store._timeouts)
        next(iter(pages), None)
    except Exception as exc:  # noqa: BLE001
        cause = exc.cause if isinstance(exc, gexc.RetryError) and exc.cause is not None else exc
        if not isinstance(cause, (gexc.Forbidden, gexc.Unauthorized)):
            raise store._error(exc, action) from exc
        log.debug("probe of %s: %s; leaving the verdict to the volume's library", url, cause)
    with _LOCK:
        _ANSWERED.add(key)
