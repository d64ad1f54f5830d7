"""Stage two, ``receive_and_blend`` (one block, CPU): every expected piece fetched and verified,
summed in key order, cast, and written over the block's band.

It reads only donations and writes only the band, so running it again (or after a crash half-way)
writes the same bytes.

How it keeps up with memory (issue 11):

* **fetch and verify in a pool, ahead of the sum.** A pool of :data:`FETCH_WORKERS` threads gets
  and decodes pieces in key order, at most :data:`AHEAD_BYTES` of them ahead of the sum (reads,
  decompression and CRC-32 release the GIL). The summing thread takes them in key order as they
  arrive, so summing overlaps the reads. The pool, like the writers', is the worker's
  (:meth:`Resources.threads <chunkflow.resources.Resources.threads>`): started once, not per task
  (starting 16 threads cost a loaded 2-core machine more than the sum itself).
* **one sum per band, no block-sized temporary.** The bands are disjoint slabs; each band has its
  own float32 sum, and each piece is added to the part of it inside each band it meets. Every
  voxel still gets the same float32 additions in the same order (pieces in key order, from zero),
  so the output is bit-identical to one sum over the whole block. Their fresh pages are faulted in
  by the pool while the first pieces are fetched, not inside the first additions.
* **no copy of an uncompressed piece.** It is added from an aligned read-only view of the fetched
  bytes (``decode_donation(copy=False)``); float16 pieces are widened inside numpy's add. Its
  checksum is libdeflate's CRC-32 (:mod:`chunkflow.storage.donation_codec`).
* **bands written in parallel**, in storage-aligned slabs, by :data:`WRITE_WORKERS` threads
  (a sharded output takes its one whole-block band in one write, as before).

Nothing is written until every expected piece has been fetched and verified: a missing or corrupt
piece stops the summing, the rest are still fetched and checked so that :class:`MissingDonations`
names them all, and nothing is written.

Memory of a stage-two task: the band sums (band voxels x channels x 4 bytes; the whole block only
with whole-block writes), at most :data:`AHEAD_BYTES` of fetched pieces (or one piece, if larger),
and while writing, up to :data:`WRITE_WORKERS` slabs of about ``WRITE_SLAB_BYTES`` cast to the
output dtype.

Phases in :class:`~chunkflow.resources.Stats` are the summing thread's wall time, so they still add
up to the task's time: ``fetch`` and ``verify`` are the time it waited for the pool (split between
the two as the pool's thread spent its time on the piece it waited for: reading, or decoding and
checking), ``blend`` the time it spent adding (with any wait for the sums' pages), ``write`` the
parallel writes.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.block_writes import check_fits_float16_output
from chunkflow.errors import MissingDonations
from chunkflow.geometry import Donation
from chunkflow.job import Job
from chunkflow.stages import DONATIONS, Resources, Stats, cast_output, mark_done, write_slabs
from chunkflow.storage import ObjectStore, Volume
from chunkflow.storage.donation_codec import DonationError, decode_donation

#: threads that get and decode pieces ahead of the sum (as many requests in flight as ``get_many`` had)
FETCH_WORKERS = 16
#: decoded bytes of pieces fetched ahead of the sum (at least one piece is, however large)
AHEAD_BYTES = 256 << 20
#: threads that write the band slabs
WRITE_WORKERS = 4
#: float32 values in a 4 KiB page: touching one of them faults the page in
PAGE_FLOATS = 1024


def receive_and_blend(job: Job, block: Vec, res: Resources | None = None, cleanup: bool = False) -> Stats:
    """Stage two for block index ``block``: verify, sum and write every donated piece."""
    res = res or Resources(job)
    layout, stats = job.layout, Stats()
    durable = res.durable  # its directories opened before this block's first write
    box = layout.block_box(block)
    bands = layout.band_boxes(block)
    expected = layout.donations_to(block)
    if bands:
        sums = _receive_and_sum(job, res, box, bands, expected, stats)
        if job.output_dtype == "float16":
            for band, total in zip(sums.bands, sums.sums):
                check_fits_float16_output(total, band, [band])
        res.check_output_still_ours()  # another job may have claimed this region since the output was opened
        t = time.perf_counter()
        pool = res.threads("band-write", WRITE_WORKERS)
        stats.voxels += _write_bands(res.output, sums, job, layout.whole_block_writes, pool)
        stats.time("write", t)
    if res.is_masked(block):  # its stage one did not run: the core, zero, is written here
        core = layout.core_box(block)
        if not core.is_empty():
            for slab in write_slabs(core, job.storage_chunk[0], job.out_channels * 4):
                res.output.write(slab, np.zeros((job.out_channels,) + tuple(slab.shape), dtype=job.output_dtype))
            stats.voxels += core.size
    mark_done(res.store, 2, box, job, stats, durable if stats.voxels else None)
    if cleanup:
        for donation in expected:
            res.store.delete(DONATIONS + donation.key)
    return stats


def _receive_and_sum(job: Job, res: Resources, box: Bbox, bands: list[Bbox], expected: list[Donation],
                     stats: Stats) -> "BandSums":
    """Every expected piece fetched, verified and summed into the bands; :class:`MissingDonations`
    (naming every missing and refused piece) if any is, after all of them were looked at."""
    missing: list[str] = []
    corrupt: list[str] = []
    pool = res.threads("receive", FETCH_WORKERS)
    received = _Received(job, res.store, expected, pool)
    sums = BandSums(bands, job.out_channels, pool)
    try:
        for donation, got in received.pieces(stats):
            if got.data_bytes is None and res.is_masked(donation.donor):
                continue  # a block outside the mask sends nothing: its pieces are zero
            if got.data_bytes is None:
                missing.append(donation.key)
            elif got.error is not None:
                corrupt.append(got.error)
            else:
                stats.donated_bytes += got.data_bytes
                stats.donations += 1
                if not (missing or corrupt):  # a failed block is never written: stop summing
                    t = time.perf_counter()
                    sums.add(donation.piece, got.array)
                    stats.time("blend", t)
            got.array = None  # the piece's memory goes back now, not when the loop moves on
    finally:
        received.close()
        sums.settle()
    if missing or corrupt:
        raise MissingDonations(box, missing, corrupt)
    return sums


class BandSums:
    """One float32 sum per band (the bands are disjoint), starting from zero.

    :meth:`add` adds a piece to the part of each band it meets; adding the pieces in key order
    gives every voxel exactly the additions one sum over the whole block would.

    Given a ``pool``, the sums' fresh pages are touched there (the kernel zeroes them on first
    touch), while the first pieces are being fetched, instead of inside the first additions;
    :meth:`add` waits for that first (:meth:`settle`).
    """

    def __init__(self, bands: list[Bbox], channels: int, pool: ThreadPoolExecutor | None = None):
        self.bands = bands
        self.sums = [np.zeros((channels,) + tuple(b.shape), dtype=np.float32) for b in bands]
        self._corners = [tuple(int(v) for v in (*b.start, *b.stop)) for b in bands]
        self._touched: Future | None = pool.submit(self._touch) if pool is not None else None

    def _touch(self) -> None:
        for total in self.sums:
            total.reshape(-1)[::PAGE_FLOATS] = 0.0  # one write per page: zero stays zero

    def settle(self) -> None:
        """Wait until the pool has touched the sums' pages (nothing of them runs on it after)."""
        if self._touched is not None:
            self._touched.result()
            self._touched = None

    def add(self, piece: Bbox, array: np.ndarray) -> None:
        """Add C,Z,Y,X ``array`` covering ``piece`` into every band it meets."""
        self.settle()
        (pz, py, px), (qz, qy, qx) = piece.start, piece.stop
        for (bz, by, bx, cz, cy, cx), total in zip(self._corners, self.sums):
            z0, y0, x0 = max(pz, bz), max(py, by), max(px, bx)
            z1, y1, x1 = min(qz, cz), min(qy, cy), min(qx, cx)
            if z0 < z1 and y0 < y1 and x0 < x1:
                into = total[:, z0 - bz:z1 - bz, y0 - by:y1 - by, x0 - bx:x1 - bx]
                np.add(into, array[:, z0 - pz:z1 - pz, y0 - py:y1 - py, x0 - px:x1 - px], out=into)


@dataclass
class _Got:
    """What the pool made of one expected piece."""

    data_bytes: int | None  # None: the object is absent
    array: np.ndarray | None = None
    error: str | None = None  # why the piece was refused
    fetch_s: float = 0.0
    verify_s: float = 0.0


def _get_and_decode(store: ObjectStore, donation: Donation, job: Job) -> _Got:
    t = time.perf_counter()
    try:
        data = store.get(DONATIONS + donation.key)
    except KeyError:
        return _Got(None, fetch_s=time.perf_counter() - t)
    fetched = time.perf_counter()
    got = _Got(len(data), fetch_s=fetched - t)
    try:
        _, got.array = decode_donation(data, donation.key, job.job_hash, job.out_channels, job.donation_dtype,
                                       copy=False)
    except DonationError as err:
        got.error = str(err)
    got.verify_s = time.perf_counter() - fetched
    return got


class _Received:
    """Every expected piece in key order, fetched and decoded on ``pool`` at most
    :data:`AHEAD_BYTES` ahead of the consumer. :meth:`close` cancels the fetches not started and
    waits for the running ones, so nothing of the task runs on the (shared) pool after it."""

    def __init__(self, job: Job, store: ObjectStore, expected: list[Donation], pool: ThreadPoolExecutor):
        self.job, self.store, self.pool = job, store, pool
        per_voxel = job.out_channels * np.dtype(job.donation_dtype).itemsize
        self.per_voxel = per_voxel * (1 if job.donation_compression == "none" else 2)  # + compressed bytes
        self.todo = deque(expected)
        self.pending: deque[tuple[Donation, Future, int]] = deque()

    def pieces(self, stats: Stats) -> Iterator[tuple[Donation, _Got]]:
        """The pieces in key order; the consumer's waits are charged to ``fetch`` and ``verify``. A
        store error (not a missing object) raises here and fails the task, as ``get_many`` did."""
        ahead = 0
        while self.todo or self.pending:
            while self.todo and (not self.pending or
                                 ahead + self.todo[0].piece.size * self.per_voxel <= AHEAD_BYTES):
                donation = self.todo.popleft()
                size = donation.piece.size * self.per_voxel
                self.pending.append((donation, self.pool.submit(_get_and_decode, self.store, donation, self.job),
                                     size))
                ahead += size
            donation, future, size = self.pending[0]
            t = time.perf_counter()
            got = future.result()
            self.pending.popleft()
            _charge_wait(stats, time.perf_counter() - t, got)
            ahead -= size
            yield donation, got

    def close(self) -> None:
        futures = [future for _, future, _ in self.pending]
        self.pending.clear()
        self.todo.clear()
        for future in futures:
            future.cancel()
        wait(futures)


def _charge_wait(stats: Stats, waited: float, got: _Got) -> None:
    """Split a wait for the pool between ``fetch`` and ``verify`` as the pool's thread spent its time
    on that piece (reading, or decoding and checking)."""
    spent = got.fetch_s + got.verify_s
    share = got.fetch_s / spent if spent > 0 else 1.0
    stats.seconds["fetch"] = stats.seconds.get("fetch", 0.0) + waited * share
    stats.seconds["verify"] = stats.seconds.get("verify", 0.0) + waited * (1.0 - share)


def _write_bands(output: Volume, sums: BandSums, job: Job, whole: bool, pool: ThreadPoolExecutor) -> int:
    """Cast and write every band, in storage-aligned z slabs on ``pool`` (a band of a
    whole-block-writes layout in one write: a shard takes one writer). Returns voxels written, once
    every write has ended (the first failure raises then)."""
    jobs = []
    for band, total in zip(sums.bands, sums.sums):
        slabs = [band] if whole else list(write_slabs(band, job.storage_chunk[0], job.out_channels * 4))
        jobs.extend((slab, total[(slice(None),) + slab.slices(band)]) for slab in slabs)

    def write(slab: Bbox, data: np.ndarray) -> None:
        output.write(slab, cast_output(data, job.output_dtype))

    if len(jobs) == 1:
        write(*jobs[0])
    else:
        futures = [pool.submit(write, slab, data) for slab, data in jobs]
        try:
            wait(futures)
        except BaseException:  # interrupted: no slab of this block may be written after we return
            for future in futures:
                future.cancel()
            wait(futures)
            raise
        for future in futures:
            future.result()
    return sum(band.size for band in sums.bands)
