"""Making a block's writes durable before its done marker says the block is done.

Why: a rerun trusts done markers. On local disks the kernel keeps written data in memory for up to
~30 s; after a power loss or a kernel crash, a done marker that reached the disk before the output
chunks it vouches for leaves a block that a rerun skips and whose chunks hold zeros or the previous
run's bytes: an exit 0 with lost data. So, once a block's writes have all returned, the local
filesystems the job writes to (the output volume's, the donation store's) are flushed with one
``syncfs(2)`` each, and only then is the done marker written.

The marker itself is then written with an ``fsync`` of its own (``put(durable=True)``), so that an
engine acknowledging the task, or ``cleanup`` deleting the block's donations, come after a marker
on disk; its log entry is not flushed (a lost one is found again, :mod:`chunkflow.done_log`).
Donations and chunks are written without an ``fsync`` each (a temp file renamed, or a chunk
written over): against a killed process those writes are already all-or-nothing or rewritten by the
rerun (docs/design.md section 11); against a crash, this flush is what counts.

A failed flush (a disk that reports ``EIO`` or ``ENOSPC`` on writeback) fails every later flush of
the same :class:`Durability` too: the kernel reports a writeback error once per open file, so a
second flush could return 0 over the lost data. The worker has to be restarted. The directories are
opened when the :class:`Durability` is made, before the first write it covers, so that an error
met by the kernel's own writeback in between is still reported to them.

``syncfs`` is Linux's; elsewhere ``os.sync()`` stands in, which neither reports errors nor, on
macOS and the BSDs, waits for the disk: power-loss safety of local outputs is a Linux property.

Remote stores need nothing: a GCS or S3 write is durable when it returns.

:class:`Durability` is shared by the threads of a worker: blocks that finish together share one
flush (group commit), and a flush covers exactly the writes that returned before it started.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from chunkflow.errors import StorageError
from chunkflow.storage.volume_urls import volume_location

if TYPE_CHECKING:
    from chunkflow.storage.objects import ObjectStore

__all__ = ["Durability", "job_durability", "local_volume_directory"]

try:
    _syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
except OSError:  # no C library to load by name (Windows)
    _syncfs = None


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


def _one_per_filesystem(paths: Iterable[str]) -> list[str]:
    """The existing directories standing for ``paths``, the first one of each filesystem."""
    seen: dict[int, str] = {}
    for path in paths:
        where = _existing(path)
        seen.setdefault(os.stat(where).st_dev, where)
    return list(seen.values())


def _flush(fd: int, where: str) -> None:
    if _syncfs is None:
        os.sync()
        return
    if _syncfs(fd) != 0:
        code = ctypes.get_errno()
        reason = f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})" if code else "syncfs failed"
        raise StorageError(f"cannot make the writes under {where} durable: {reason}")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Durability:
    """Flushes the local filesystems under ``paths`` for the threads of one worker, one flush for
    every caller that arrived before it started (group commit).

    Args:
        paths: local directories the job writes to (empty: nothing to flush, as for GCS). One
            directory per filesystem is opened now and kept (see the module doc).
        flush: flushes one opened directory (``fd``, its path); default ``syncfs``. Tests pass a
            slow or failing one.
    """

    def __init__(self, paths: Sequence[str], flush: Callable[[int, str], None] = _flush):
        self.paths = list(paths)
        self.directories = _one_per_filesystem(self.paths)
        self._fds = [os.open(where, os.O_RDONLY) for where in self.directories]
        weakref.finalize(self, _close_all, list(self._fds))
        self._flush_one = flush
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out
        self._covered = 0  # every ticket up to this one is covered by a finished flush
        self._flushing = False
        self._failed: StorageError | None = None
        self.flushes = 0

    def settle(self) -> None:
        """Return once every write this process finished before the call is on disk (a flush that
        started after the call has finished). Raises the StorageError of a failed flush, then and
        in every later call."""
        if not self._fds:
            return
        with self._cond:
            self._asked += 1
            ticket = self._asked
        while True:
            flusher = False
            try:
                with self._cond:
                    while True:
                        if self._failed is not None:
                            raise StorageError(f"{self._failed} (an earlier flush failed: restart this worker)")
                        if self._covered >= ticket:
                            return
                        if not self._flushing:
                            break
                        self._cond.wait()
                    self._flushing = flusher = True
                    upto = self._asked  # every ticket so far was taken after its writes had returned
                for fd, where in zip(self._fds, self.directories):
                    self._flush_one(fd, where)
                with self._cond:
                    self._covered = max(self._covered, upto)
                    self.flushes += 1
            except StorageError as failed:
                if flusher:
                    with self._cond:
                        self._failed = failed
                raise
            finally:
                if flusher:
                    with self._cond:
                        self._flushing = False
                        self._cond.notify_all()


def job_durability(output_url: str, store: "ObjectStore") -> Durability:
    """The :class:`Durability` of a job's writes: the output volume's and the store's local
    directories (none for remote ones)."""
    return Durability([p for p in (local_volume_directory(output_url), store.local_root) if p])
