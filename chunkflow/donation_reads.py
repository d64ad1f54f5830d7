"""Reading donations for ``chunkflow inspect``: one piece checked, many read concurrently, or a sample.

:func:`check_piece` is the one judgement of a donation's bytes (the decoder stage two uses);
:func:`read_pieces` fetches pieces (whole, or the first :data:`HEAD_BYTES`) with a bounded
thread pool and a bounded queue, so memory stays at one piece per thread whatever the number
of pieces; :class:`Reservoir` draws a uniform random sample of N keys from a listing of any
length in one pass, holding only the N keys.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from chunkflow.job import Job
from chunkflow.stages import DONATIONS
from chunkflow.storage import ObjectStore
from chunkflow.storage.donation_codec import DonationError, decode_donation, header_end, read_header

__all__ = ["HEAD_BYTES", "UNCHECKED", "PieceCheck", "Reservoir", "check_piece", "read_piece", "read_pieces"]

log = logging.getLogger(__name__)

HEAD_BYTES = 4096
UNCHECKED = "-"
#: ``(job, checksum, error, raw bytes, job hash in its header)``
PieceCheck = tuple[str, str, "str | None", int, "str | None"]


def check_piece(data: bytes, key: str, job: Job | None, full: bool = True) -> PieceCheck:
    """``(job, checksum, error, raw bytes, job hash in its header)`` of a donation's bytes.

    ``full`` decodes and checks the checksum (``data`` must be the whole object);
    otherwise only the header is read. Without a ``job`` the piece's own hash is used.
    """
    try:
        header = read_header(data, key)
        if header.key != key:
            return UNCHECKED, "bad", f"donation {key} is mislabelled: its header names key {header.key}", 0, None
        expected_hash = job.job_hash if job is not None else header.job_hash
        if header.job_hash != expected_hash:
            return ("foreign", UNCHECKED, f"donation {key} belongs to job {header.job_hash}, not {expected_hash}", 0,
                    header.job_hash)
        if full:
            decode_donation(data, key, expected_hash, *((job.out_channels, job.donation_dtype) if job else ()))
        return "ok", "ok" if full else UNCHECKED, None, header.nbytes_raw, header.job_hash
    except DonationError as err:
        return UNCHECKED, "bad", str(err), 0, None


def read_piece(store: ObjectStore, key: str, job: Job | None, full: bool) -> PieceCheck:
    """Fetch one piece (whole, or its head) and :func:`check_piece` it.

    Storage errors (permission, network) propagate: they are not a property of the piece.
    """
    name = DONATIONS + key
    try:
        data = store.get(name) if full else store.get_head(name, HEAD_BYTES)
        end = header_end(data)
        if not full and end is not None and end > len(data):
            data = store.get_head(name, end)
    except KeyError:
        return UNCHECKED, UNCHECKED, f"donation {key} vanished while inspecting", 0, None
    return check_piece(data, key, job, full)


def read_pieces(store: ObjectStore, items: Iterable[tuple[int, str]], job: Job | None, full: bool, workers: int,
                record: Callable[[int, str, PieceCheck], None], progress: Callable[[int], None] | None = None) -> int:
    """Read and check every ``(block, key)`` of ``items`` with ``workers`` threads; ``record(block, key,
    check)`` is called in this thread, in the order of ``items``. At most ``4 x workers`` reads are in
    flight (``items`` is consumed lazily). Returns how many pieces were read."""
    done = 0
    workers = max(1, int(workers))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cf-inspect") as pool:
        pending: deque = deque()
        try:
            for block, key in items:
                pending.append((block, key, pool.submit(read_piece, store, key, job, full)))
                if len(pending) >= 4 * workers:
                    block, key, future = pending.popleft()
                    record(block, key, future.result())
                    done += 1
                    if progress is not None:
                        progress(1)
            while pending:
                block, key, future = pending.popleft()
                record(block, key, future.result())
                done += 1
                if progress is not None:
                    progress(1)
        finally:
            for _, _, future in pending:
                future.cancel()
    log.debug("read %d donations (%s)", done, "whole" if full else "headers")
    return done


class Reservoir:
    """A uniform random sample of ``size`` items from a stream seen once, in batches (Algorithm R,
    vectorised per batch): holds ``size`` items, whatever the length of the stream."""

    def __init__(self, size: int, seed: int | None = None):
        self.size = int(size)
        self.seen = 0
        self.items: list = []
        self._rng = np.random.default_rng(seed)

    def offer(self, batch: list) -> None:
        """Consider every item of ``batch`` (in order)."""
        if not batch:
            return
        start = 0
        room = self.size - len(self.items)
        if room > 0:
            self.items.extend(batch[:room])
            start = min(room, len(batch))
            self.seen += start
        rest = len(batch) - start
        if rest <= 0:
            return
        # item number t (0-based) replaces slot j ~ U[0, t] when j < size
        slots = self._rng.integers(0, np.arange(self.seen + 1, self.seen + rest + 1))
        for i in np.flatnonzero(slots < self.size):
            self.items[int(slots[i])] = batch[start + int(i)]
        self.seen += rest
