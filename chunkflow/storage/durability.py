"""Making a block's writes durable before its done marker says the block is done.

Why: a rerun trusts done markers. On local disks the kernel keeps written data in memory for up to
~30 s; after a power loss or a kernel crash, a done marker that reached the disk before the output
chunks it vouches for leaves a block that a rerun skips and whose chunks hold zeros or the previous
run's bytes: an exit 0 with lost data. So, once a block's writes have all returned, the local
filesystems the job writes to (the output volume's, the donation store's) are flushed with one
``syncfs(2)`` each, and only then is the done marker written.

The marker and its log entry need no flush of their own: a marker lost in a crash only makes a
rerun compute its block again, and one that survives was written after its block's data was on
disk. Donations and chunks are written without an ``fsync`` each (a temp file renamed, or a chunk
written over): against a killed process those writes are already all-or-nothing or rewritten by the
rerun (docs/design.md section 11); against a crash, this flush is what counts.

Remote stores need nothing: a GCS or S3 write is durable when it returns.

:class:`Durability` is shared by the threads of a worker: blocks that finish together share one
flush (group commit), and a flush covers exactly the writes that returned before it started.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from typing import Callable, Iterable, Sequence

from chunkflow.errors import StorageError
from chunkflow.storage.volume_urls import volume_location

__all__ = ["Durability", "local_volume_directory", "sync_filesystems"]

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)  # Linux; elsewhere os.sync() flushes every filesystem


def local_volume_directory(url: str) -> str | None:
    """The local directory of a volume URL, or None for a remote volume (its writes are durable)."""
    location = volume_location(url)
    return None if "://" in location else location


def _existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists (a volume or store not created yet)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def sync_filesystems(paths: Iterable[str]) -> list[str]:
    """Flush every filesystem holding one of ``paths`` (one ``syncfs`` per filesystem) and wait until
    its data is on disk. Returns the paths flushed, one per filesystem. A filesystem that reports a
    failed write (``EIO``, ``ENOSPC``) raises :class:`~chunkflow.errors.StorageError`."""
    flushed: dict[int, str] = {}
    for path in paths:
        where = _existing(path)
        device = os.stat(where).st_dev
        if device in flushed:
            continue
        flushed[device] = where
        if _syncfs is None:
            os.sync()
            continue
        fd = os.open(where, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                code = ctypes.get_errno()
                reason = f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})" if code else "syncfs failed"
                raise StorageError(f"cannot make the writes under {where} durable: {reason}")
        finally:
            os.close(fd)
    return list(flushed.values())


class Durability:
    """Flushes the local filesystems under ``paths`` for the threads of one worker, one flush for
    every caller that arrived before it started (group commit).

    Args:
        paths: local directories the job writes to (empty: nothing to flush, as for GCS).
        sync: the flush (default :func:`sync_filesystems`); it is called with ``paths``.
    """

    def __init__(self, paths: Sequence[str], sync: Callable[[Sequence[str]], object] = sync_filesystems):
        self.paths = list(paths)
        self._sync = sync
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out
        self._covered = 0  # every ticket up to this one is covered by a finished flush
        self._flushing = False
        self.flushes = 0

    def settle(self) -> None:
        """Return once every write this process finished before the call is on disk (a flush that
        started after the call has finished); raise the flush's StorageError if it failed."""
        if not self.paths:
            return
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._covered < ticket:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing, upto = True, self._asked  # every ticket so far was taken after its writes
                self._cond.release()
                try:
                    self._sync(self.paths)
                finally:
                    self._cond.acquire()
                    self._flushing = False
                    self._cond.notify_all()
                self.flushes += 1
                self._covered = max(self._covered, upto)
