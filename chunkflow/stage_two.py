"""Stage two, ``receive_and_blend`` (one block, CPU): every expected piece fetched and verified,
summed in key order, cast, and written over the block's band.

It reads only donations and writes only the band, so running it again (or after a crash half-way)
writes the same bytes.

How it keeps up with memory (issue 11):

* **fetch and verify in a pool, ahead of the sum.** A pool of :data:`FETCH_WORKERS` threads gets
  and decodes pieces in key order, at most :data:`AHEAD_BYTES` of them ahead of the sum (reads,
  decompression and CRC-32 release the GIL). The summing thread takes them in key order as they
  arrive, so summing overlaps the reads.
* **one sum per band, no block-sized temporary.** The bands are disjoint slabs; each band has its
  own float32 sum, and each piece is added to the part of it inside each band it meets. Every
  voxel still gets the same float32 additions in the same order (pieces in key order, from zero),
  so the output is bit-identical to one sum over the whole block. Their fresh pages are faulted in
  by the pool while the first pieces are fetched, not inside the first additions.
* **no copy of an uncompressed piece.** It is added from an aligned read-only view of the fetched
  bytes (``decode_donation(copy=False)``); float16 pieces are widened inside numpy's add.
* **bands written in parallel**, in storage-aligned slabs, by :data:`WRITE_WORKERS` threads
  (a sharded output takes its one whole-block band in one write, as before).

Nothing is written until every expected piece has been fetched and verified: a missing or corrupt
piece stops the summing, the rest are still fetched and checked so that :class:`MissingDonations`
names them all, and nothing is written.

Memory of a stage-two task: the band sums (band voxels x channels x 4 bytes; the whole block only
with whole-block writes), at most :data:`AHEAD_BYTES` of fetched pieces (or one piece, if larger),
and while writing, up to :data:`WRITE_WORKERS` slabs of about ``WRITE_SLAB_BYTES`` cast to the
output dtype.

Phases in :class:`~chunkflow.stages.Stats` are the summing thread's wall time, so they still add
up to the task's time: ``fetch`` and ``verify`` are the time it waited for the pool (split between
the two as the pool's thread spent its time on the piece it waited for: reading, or decoding and
checking), ``blend`` the time it spent adding (with any wait for the sums' pages), ``write`` the
parallel writes.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from chunkflow.bbox import Bbox, Vec
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
    box = layout.block_box(block)
    bands = layout.band_boxes(block)
    expected = layout.donations_to(block)
    if bands:
        sums = _receive_and_sum(job, res, box, bands, expected, stats)
        t = time.perf_counter()
        stats.voxels += _write_bands(res.output, sums, job, whole=layout.whole_block_writes)
        stats.time("write", t)
    if res.is_masked(block):  # its stage one did not run: the core, zero, is written here
        core = layout.core_box(block)
        if not core.is_empty():
            for slab in write_slabs(core, job.storage_chunk[0], job.out_channels * 4):
                res.output.write(slab, np.zeros((job.out_channels,) + tuple(slab.shape), dtype=job.output_dtype))
            stats.voxels += core.size
    mark_done(res.store, 2, box, job, stats)
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
    pool = ThreadPoolExecutor(max_workers=FETCH_WORKERS, thread_name_prefix="cf-receive")
    try:
        sums = BandSums(bands, job.out_channels, pool)
        for donation, got in _received(job, res.store, expected, stats, pool):
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
        pool.shutdown(wait=True, cancel_futures=True)
    if missing or corrupt:
        raise MissingDonations(box, missing, corrupt)
    return sums


class BandSums:
    """One float32 sum per band (the bands are disjoint), starting from zero.

    :meth:`add` adds a piece to the part of each band it meets; adding the pieces in key order
    gives every voxel exactly the additions one sum over the whole block would.

    Given a ``pool``, the sums' fresh pages are touched there (the kernel zeroes them on first
    touch), while the first pieces are being fetched, instead of inside the first additions;
    :meth:`add` waits for that first.
    """

    def __init__(self, bands: list[Bbox], channels: int, pool: ThreadPoolExecutor | None = None):
        self.bands = bands
        self.sums = [np.zeros((channels,) + tuple(b.shape), dtype=np.float32) for b in bands]
        self._corners = [(tuple(b.start), tuple(b.stop)) for b in bands]
        self._touched: Future | None = pool.submit(self._touch) if pool is not None else None

    def _touch(self) -> None:
        for total in self.sums:
            total.reshape(-1)[::PAGE_FLOATS] = 0.0  # one write per page: zero stays zero

    def add(self, piece: Bbox, array: np.ndarray) -> None:
        """Add C,Z,Y,X ``array`` covering ``piece`` into every band it meets."""
        if self._touched is not None:
            self._touched.result()
            self._touched = None
        p0, p1 = tuple(piece.start), tuple(piece.stop)
        for (b0, b1), total in zip(self._corners, self.sums):
            lo = [max(a, b) for a, b in zip(p0, b0)]
            hi = [min(a, b) for a, b in zip(p1, b1)]
            if all(l < h for l, h in zip(lo, hi)):
                into = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, b0))
                take = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, p0))
                total[(slice(None),) + into] += array[(slice(None),) + take]


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


def _received(job: Job, store: ObjectStore, expected: list[Donation], stats: Stats,
              pool: ThreadPoolExecutor) -> Iterator[tuple[Donation, _Got]]:
    """Every expected piece in key order, fetched and decoded by ``pool`` at most
    :data:`AHEAD_BYTES` ahead of the consumer; the consumer's waits are charged to ``fetch`` and
    ``verify``. The caller shuts the pool down (pieces not taken yet are cancelled then)."""
    per_voxel = job.out_channels * np.dtype(job.donation_dtype).itemsize
    per_voxel *= 1 if job.donation_compression == "none" else 2  # compressed bytes beside the decoded piece
    pending: deque[tuple[Donation, Future, int]] = deque()
    todo = deque(expected)
    ahead = 0
    while todo or pending:
        while todo and (not pending or ahead + todo[0].piece.size * per_voxel <= AHEAD_BYTES):
            donation = todo.popleft()
            size = donation.piece.size * per_voxel
            pending.append((donation, pool.submit(_get_and_decode, store, donation, job), size))
            ahead += size
        donation, future, size = pending.popleft()
        t = time.perf_counter()
        got = future.result()  # a store error (not a missing object) fails the task, as get_many would
        waited = time.perf_counter() - t
        share = got.fetch_s / (got.fetch_s + got.verify_s) if got.fetch_s + got.verify_s > 0 else 1.0
        stats.seconds["fetch"] = stats.seconds.get("fetch", 0.0) + waited * share
        stats.seconds["verify"] = stats.seconds.get("verify", 0.0) + waited * (1.0 - share)
        ahead -= size
        yield donation, got


def _write_bands(output: Volume, sums: BandSums, job: Job, whole: bool) -> int:
    """Cast and write every band, in storage-aligned z slabs by :data:`WRITE_WORKERS` threads (a band
    of a whole-block-writes layout in one write: a shard takes one writer). Returns voxels written."""
    jobs = []
    for band, total in zip(sums.bands, sums.sums):
        slabs = [band] if whole else list(write_slabs(band, job.storage_chunk[0], job.out_channels * 4))
        jobs.extend((slab, total[(slice(None),) + slab.slices(band)]) for slab in slabs)

    def write(item: tuple[Bbox, np.ndarray]) -> None:
        slab, data = item
        output.write(slab, cast_output(data, job.output_dtype))

    if len(jobs) == 1:
        write(jobs[0])
    else:
        with ThreadPoolExecutor(max_workers=min(WRITE_WORKERS, len(jobs)), thread_name_prefix="cf-write") as pool:
            for _ in pool.map(write, jobs):
                pass
    return sum(band.size for band in sums.bands)
