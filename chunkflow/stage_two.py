"""Stage two, ``receive_and_blend`` (one block, CPU): every expected piece fetched and verified,
summed in key order, cast, and written over the block's band.

It reads only donations and writes only the band, so running it again (or after a crash half-way)
writes the same bytes.
"""
from __future__ import annotations

import time

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import MissingDonations
from chunkflow.job import Job
from chunkflow.stages import DONATIONS, Resources, Stats, cast_output, mark_done, write_slabs
from chunkflow.storage.donation_codec import DonationError, decode_donation


def receive_and_blend(job: Job, block: Vec, res: Resources | None = None, cleanup: bool = False) -> Stats:
    """Stage two for block index ``block``: verify, sum and write every donated piece."""
    res = res or Resources(job)
    layout, stats = job.layout, Stats()
    box = layout.block_box(block)
    bands = layout.band_boxes(block)
    expected = layout.donations_to(block)
    t = time.perf_counter()
    if bands:
        blobs = res.store.get_many([DONATIONS + d.key for d in expected])
        t = stats.time("fetch", t)
        missing, corrupt, pieces = [], [], []
        for donation in expected:
            data = blobs.get(DONATIONS + donation.key)
            if data is None and res.is_masked(donation.donor):
                continue  # a block outside the mask sends nothing: its pieces are zero
            if data is None:
                missing.append(donation.key)
                continue
            try:
                _, array = decode_donation(data, donation.key, job.job_hash, job.out_channels, job.donation_dtype)
            except DonationError as err:
                corrupt.append(str(err))
                continue
            pieces.append((donation.piece, array))
            stats.donated_bytes += len(data)
        if missing or corrupt:
            raise MissingDonations(box, missing, corrupt)
        t = stats.time("verify", t)
        region = _union(bands)
        total = np.zeros((job.out_channels,) + tuple(region.shape), dtype=np.float32)
        for piece, array in pieces:
            total[(slice(None),) + piece.slices(region)] += array
        t = stats.time("blend", t)
        for band in bands:
            res.output.write(band, cast_output(total[(slice(None),) + band.slices(region)], job.output_dtype))
            stats.voxels += band.size
        t = stats.time("write", t)
        stats.donations = len(pieces)
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


def _union(boxes: list[Bbox]) -> Bbox:
    start = Vec(min(b.start[a] for b in boxes) for a in range(3))
    stop = Vec(max(b.stop[a] for b in boxes) for a in range(3))
    return Bbox(start, stop)
