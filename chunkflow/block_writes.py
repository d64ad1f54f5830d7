"""Writing one stage-one block's results: its core into the output volume and every other piece of
its chunk as a donation, all at once on a small pool of threads.

Why a pool: the core is written in storage-aligned slabs and the donations are a few dozen
independent objects; encoding (compression) and the store's round trips release the GIL, so
running them side by side turns a sum of latencies into the longest one, on a directory as on GCS.

Memory bound: at most :data:`IO_THREADS` writes run at once, each holding one cast slab
(about ``stages.WRITE_SLAB_BYTES``) or one donation piece and its encoding. The block's float32
chunk itself is shared, read-only, by all of them.

The caller's task returns only after :func:`write_block` has returned, and ``write_block``
returns only after every write has finished (or raises the first failure once the others have
stopped), so a done marker written after it means every byte of the block is stored.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import numpy as np

from chunkflow.bbox import Bbox
from chunkflow.errors import ModelError
from chunkflow.geometry import Layout
from chunkflow.job import Job
from chunkflow.storage import ObjectStore, Volume
from chunkflow.storage.donation_codec import encode_donation
from chunkflow.store_layout import DONATIONS

#: writes of one block in flight at once (threads of a Resources' pool)
IO_THREADS = 4



@dataclass
class Written:
    """What :func:`write_block` stored: core voxels, donation pieces and bytes, and the seconds its
    writes took, summed over the threads (``write`` for the core, ``donate`` for donations)."""

    voxels: int = 0
    donations: int = 0
    donated_bytes: int = 0
    write_seconds: float = 0.0
    donate_seconds: float = 0.0


def write_block(job: Job, layout: Layout, block, chunk: Bbox, out: np.ndarray, output: Volume, store: ObjectStore,
                pool: ThreadPoolExecutor, slabs: list[Bbox], cast: Callable[[np.ndarray, str], np.ndarray]) -> Written:
    """Write ``slabs`` of ``out`` (float32 C,Z,Y,X over ``chunk``) to ``output`` cast to the job's
    dtype, and donate every piece ``layout.donations_from(block)`` to ``store``, in parallel on
    ``pool``. Returns once all have finished; raises the first error after the others ended."""

    def write(slab: Bbox) -> tuple[str, float, int]:
        t = time.perf_counter()
        output.write(slab, cast(out[(slice(None),) + slab.slices(chunk)], job.output_dtype))
        return "write", time.perf_counter() - t, 0

    def donate(donation) -> tuple[str, float, int]:
        t = time.perf_counter()
        piece = out[(slice(None),) + donation.piece.slices(chunk)]  # a float32 piece is gathered by the encoder
        if piece.dtype != np.dtype(job.donation_dtype):
            piece = piece.astype(job.donation_dtype)
        data = encode_donation(piece, donation.piece, donation.key, job.job_hash, compression=job.donation_compression)
        del piece
        store.put(DONATIONS + donation.key, data)
        return "donate", time.perf_counter() - t, len(data)

    donations = layout.donations_from(block)
    if job.donation_dtype == "float16":  # refuse before the first write, not after some pieces went out
        _check_float16(out, chunk, donations)
    if job.output_dtype == "float16":
        check_fits_float16_output(out, chunk, slabs)
    futures: list[Future] = []
    try:
        futures += [pool.submit(write, slab) for slab in slabs]
        futures += [pool.submit(donate, d) for d in donations]
        wait(futures)
    except BaseException:  # interrupted while waiting: nothing of this block may be written after we return
        for future in futures:
            future.cancel()
        wait(futures)
        raise
    written = Written(voxels=sum(s.size for s in slabs))
    for future in futures:
        kind, seconds, size = future.result()  # the first failure raises here, after every write ended
        if kind == "write":
            written.write_seconds += seconds
        else:
            written.donate_seconds += seconds
            written.donations += 1
            written.donated_bytes += size
    return written


#: float32 values below this (in magnitude) cast to a finite float16 (65504 is the largest; up to
#: 65520 rounds down to it)
FLOAT16_LIMIT = 65520.0


def _check_float16(out: np.ndarray, chunk: Bbox, donations) -> None:
    """Raise (as :func:`encode_donation` would) if a piece holds a value float16 cannot hold."""
    for donation in donations:
        piece = out[(slice(None),) + donation.piece.slices(chunk)]
        if piece.size and not float(np.abs(piece).max()) < FLOAT16_LIMIT:  # NaN fails the comparison too
            raise ValueError(f"donation {donation.key}: values do not fit float16 (|value| > 65504, or NaN); "
                             "plan the job with --donation-dtype float32")


def check_fits_float16_output(data: np.ndarray, box: Bbox, parts: list[Bbox]) -> None:
    """Refuse (ModelError, one line) output values a float16 output volume cannot hold, before the first
    write: cast, they would be stored as inf at exit 0. ``data`` covers ``box``; ``parts`` are the boxes
    about to be written."""
    for part in parts:
        values = data[(slice(None),) + part.slices(box)]
        if values.size and not float(np.abs(values).max()) < FLOAT16_LIMIT:  # NaN fails the comparison too
            raise ModelError(f"output values in {part.name} do not fit float16 (|value| > 65504, or NaN): nothing of "
                             "this block was written; plan the job with --dtype float32")
