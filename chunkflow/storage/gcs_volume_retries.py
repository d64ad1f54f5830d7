"""Bound the retries of the libraries behind ``gs://`` volumes by chunkflow's GCS deadline.

CloudVolume (through cloud-files) and gcsfs retry on their own, far longer than
``CHUNKFLOW_GCS_RETRY_DEADLINE``; :func:`bound_volume_retries` changes their retry settings in this
process so that an endpoint that dies in the middle of a run fails every volume call in about the
same time as a call of the donation store. The bucket probe installs it before CloudVolume or
gcsfs sees a path (:mod:`~chunkflow.storage.gcs_probe`).
"""
from __future__ import annotations

import logging
import os
import sys
import threading

from chunkflow.storage.gcs_client import retry_deadline

log = logging.getLogger(__name__)

__all__ = ["bound_volume_retries", "gcsfs_attempts"]

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
    seconds = retry_deadline(deadline)
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
