"""Stage one, and what both stages share, as plain functions of (job, block). No engine in sight.

``inference_and_donate`` (stage one, one block, GPU): blended inference over the patches the
block owns, its core written to the output volume, every other piece of its chunk donated.

Stage two, ``receive_and_blend``, lives in :mod:`chunkflow.stage_two`.

Memory of a stage-one task: its input chunk in the stored dtype, the float32 output chunk, one
batch of patches in and out, the model, and bounded slabs: ``N(x)`` (``blend.SLAB_VOXELS``), and
on the write pool (``block_writes.IO_THREADS`` threads) one storage-aligned core slab of about
``WRITE_SLAB_BYTES`` or one donation piece and its encoding per thread. A worker with ``SLOTS``
(2) task slots pipelines its blocks (:mod:`chunkflow.stage_pipeline`): at most two blocks reading, on
the model (one at a time) or waiting for a place to write (input chunk until the model is done with
it, float32 output chunk from the model on) and at most two writing behind (float32 output chunk),
so its peak is two input chunks, four float32 output chunks and the write pool's slabs.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Iterable, Iterator

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import normalise
from chunkflow.errors import Interrupted
from chunkflow.interruptible import wait_any
from chunkflow.backend_blend import run_blended
from chunkflow.job import Job
from chunkflow import store_layout
from chunkflow.storage import ObjectStore
from chunkflow.storage.durability import Durability
from chunkflow.block_writes import write_block
from chunkflow.store_layout import DONATIONS
from chunkflow.resources import SLOTS, Resources, Stats
from chunkflow.stage_pipeline import InputPrefetcher, stage_one_threads

log = logging.getLogger(__name__)

__all__ = ["DONATIONS", "InputPrefetcher", "Resources", "SLOTS", "Stats", "cast_output", "done_marker",
           "inference_and_donate", "inference_and_donate_many", "is_done", "mark_done", "reference", "write_slabs"]

WRITE_SLAB_BYTES = 8 << 20


def done_marker(stage: int, block: Bbox) -> str:
    return store_layout.done_marker(stage, block.name)


def inference_and_donate(job: Job, block: Vec, res: Resources | None = None, progress=None, *,
                         prefetch_next: Vec | None = None, slots: int = 0) -> Stats:
    """Stage one for block index ``block``: infer its chunk, write its core, donate the rest.

    Three steps, so that the blocks of one worker form a pipeline (:func:`inference_and_donate_many`,
    the engines' task slots; :mod:`chunkflow.stage_pipeline`) and the model never waits for storage:

    1. *read*: the input is read (or taken from the prefetcher);
    2. *device*: the patches are gathered, run and accumulated, the device taken from the first
       submit to the last (``res.turns``, one block at a time; batch by batch for a backend with
       ``independent_batches``);
    3. *write-behind*: the chunk is normalised and its core and donations are written in parallel
       (:func:`chunkflow.block_writes.write_block`); the done marker is written last, after every
       write of the block has finished.

    Steps 1-2 hold one of the worker's ``slots`` compute places and step 3 one of its ``slots``
    write-behind places (``res.gates(slots)``, default :data:`SLOTS`), so a slot takes its next
    block as soon as this one has left the device. Everything runs in the calling thread: an error
    in any step is this call's error, and nothing of the block is written after it has returned.

    ``prefetch_next``: the block this worker runs next; its input is read in the background
    while this block computes.
    """
    res = res or Resources(job)
    layout, stats = job.layout, Stats()
    box = layout.block_box(block)
    chunk = layout.chunk_box(block)
    if chunk is not None:
        durable = res.durable  # its directories opened before this block's first write
        with res.gates(slots).enter(res.cancelled, box.name) as place:
            filled = res.input.filled_chunks
            origins = layout.own_origins(block)
            if res.mask is not None:
                origins = res.mask.keep(origins, within=chunk)
            out = _infer_region(job, res, chunk, origins, stats, progress, prefetch_next)
            stats.filled_chunks += res.input.filled_chunks - filled
            stats.seconds["wait_write"] = place.leave_device(res.cancelled)
            _write_behind(job, res, block, chunk, out, stats)
            del out
            mark_done(res.store, 1, box, job, stats, durable)
        return stats
    if prefetch_next is not None:
        res.prefetch(prefetch_next)
    mark_done(res.store, 1, box, job, stats)
    return stats


def _write_behind(job: Job, res: Resources, block: Vec, chunk: Bbox, out: np.ndarray, stats: Stats) -> None:
    """Normalise ``out`` (the sum of ``w * y`` over ``chunk``) and write the block's core and donations.

    The whole chunk is divided at once, in this thread: dividing each write's part on the write pool
    instead was measured to cost about a fifth more CPU (thin band pieces make short rows)."""
    t = time.perf_counter()
    normalise(out, chunk, res.weight_sum)
    stats.time("normalise", t)
    layout = job.layout
    _check_cancelled(res, layout.block_box(block))
    res.check_output_still_ours()  # another job may have claimed this region since the output was opened
    core = layout.core_box(block)
    slabs = [] if core.is_empty() else list(write_slabs(core, job.storage_chunk[0], job.out_channels * 4))
    written = write_block(job, layout, block, chunk, out, res.output, res.store, res.pool, slabs, cast_output)
    stats.voxels += written.voxels
    stats.donations += written.donations
    stats.donated_bytes += written.donated_bytes
    stats.seconds["write"] = stats.seconds.get("write", 0.0) + written.write_seconds
    stats.seconds["donate"] = stats.seconds.get("donate", 0.0) + written.donate_seconds


def _check_cancelled(res: Resources, box: Bbox) -> None:
    if res.cancelled.is_set():
        raise Interrupted(f"stage one of {box.name} stopped before writing (the run was interrupted)")


def write_slabs(core: Bbox, chunk_z: int, voxel_bytes: int) -> Iterator[Bbox]:
    """The core cut along z into storage-aligned slabs of about :data:`WRITE_SLAB_BYTES` (at least one
    storage chunk thick): writing it whole would copy the whole core (the writer needs contiguous
    data, the core is a strided view of the chunk), which would add a chunk to a task's peak."""
    plane = core.shape[1] * core.shape[2] * voxel_bytes
    return core.z_slabs(chunk_z * max(1, WRITE_SLAB_BYTES // (plane * chunk_z)))


#: blocks :func:`inference_and_donate_many` keeps between the oldest one not yet yielded and the
#: newest one started, per thread (the rest finished; their Stats wait to be yielded in order)
LOOKAHEAD = 4


def inference_and_donate_many(job: Job, blocks: Iterable[Vec], res: Resources | None = None,
                              progress=None, slots: int = SLOTS) -> Iterator[tuple[Vec, Stats]]:
    """Stage one over ``blocks``, yielding ``(block, stats)`` in order as each block is done.

    With ``slots`` >= 2, blocks run as a pipeline on ``2 x slots`` threads sharing ``res``
    (:func:`~chunkflow.stage_pipeline.stage_one_threads`): one block on the model, the next
    reading its input, and up to ``slots`` earlier ones normalising and writing behind, so that
    neither reads nor writes keep the model waiting. Memory (``res.gates(slots)``): at most
    ``slots`` blocks reading, on the model or waiting to write (input chunk until the model is done
    with it, float32 output chunk from the model on) and at most ``slots`` writing behind (float32
    output chunk), plus the write pool's slabs: ``slots`` input and ``2 x slots`` output chunks.
    ``slots=1`` runs one block at a time, reading the next block's input in the background
    instead. ``blocks`` is consumed lazily.

    If a block fails, or the caller stops (KeyboardInterrupt), the others in flight stop at their
    next batch or before their first write (nothing more of them is written) and the error is
    raised once they have ended.
    """
    res = res or Resources(job)
    todo = iter(blocks)
    if slots <= 1:
        current = next(todo, None)
        while current is not None:
            upcoming = next(todo, None)
            yield current, inference_and_donate(job, current, res, progress, prefetch_next=upcoming, slots=1)
            current = upcoming
        return
    threads = stage_one_threads(slots)
    pending: deque[tuple[Vec, Future]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chunkflow-block") as blocks_pool:
        try:
            while True:
                running = sum(not f.done() for _, f in pending)
                while running < threads and len(pending) < LOOKAHEAD * threads and \
                        (block := next(todo, None)) is not None:
                    pending.append((block, blocks_pool.submit(inference_and_donate, job, block, res, progress,
                                                              slots=slots)))
                    running += 1
                if not pending:
                    return
                if not pending[0][1].done():
                    wait_any([f for _, f in pending if not f.done()])  # short waits: Ctrl-C gets through
                while pending and pending[0][1].done():
                    block, future = pending.popleft()
                    yield block, future.result()
        except BaseException:
            res.cancelled.set()
            wait([future for _, future in pending])
            res.cancelled.clear()
            raise


def _infer_region(job: Job, res: Resources, region: Bbox, origins: list[Vec], stats: Stats, progress,
                  prefetch_next: Vec | None = None) -> np.ndarray:
    """The plain sum of ``w * y`` over ``region`` (float32; divide it by ``N`` with
    :func:`chunkflow.blend.normalise`): the input read first, then the model's part, the device
    taken from the first submit to the last (``res.turns``; around each submit for a backend with
    ``independent_batches``)."""
    t = time.perf_counter()
    backend = res.backend  # loaded (once) before the input is read, so a bad model costs no read
    with res.reading:  # one read at a time: the first block of a run is not slowed by the second's
        image = res.prefetcher.take(region.grow(job.context_margin), res.read_input)
    stats.time("read", t)
    if prefetch_next is not None:
        res.prefetch(prefetch_next)

    def step(done: int) -> None:
        if res.cancelled.is_set():
            raise Interrupted(f"stage one of {region.name} stopped (the run was interrupted)")
        if progress is not None:
            progress(done)

    seconds: dict[str, float] = {}
    with res.turns.turn(per_batch=getattr(backend, "independent_batches", False)) as turn:
        out, patches = run_blended(image, region.grow(job.context_margin), origins, region, res.weight_sum,
                                   res.blend_map, backend, Vec(job.input_patch), job.out_channels, job.batch_size,
                                   step, seconds, normalise=False, turn=turn)
    del image
    stats.patches += patches
    stats.seconds["wait"] = stats.seconds.get("wait", 0.0) + turn.waited
    for phase, key in (("model", "model"), ("gather", "blend"), ("accumulate", "blend")):
        stats.seconds[key] = stats.seconds.get(key, 0.0) + seconds.get(phase, 0.0)
    return out


def reference(job: Job, res: Resources | None = None, progress=None) -> np.ndarray:
    """Whole-volume blended inference in one process: what the two stages must reproduce."""
    res = res or Resources(job)
    region = job.layout.bbox
    origins = list(job.layout.all_origins())
    if res.mask is not None:
        origins = res.mask.keep(origins, within=region)
    out = _infer_region(job, res, region, origins, Stats(), progress)
    normalise(out, region, res.weight_sum)
    return out


def cast_output(data: np.ndarray, dtype: str) -> np.ndarray:
    """float32 and float16 are cast; uint8 maps [0, 1] to 0..255 (clipped, rounded)."""
    if dtype == "uint8":
        return np.rint(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8)
    return data.astype(dtype, copy=False)


def is_done(store: ObjectStore, stage: int, block: Bbox) -> bool:
    """Whether the block's done marker exists; if so its log entry is written again (idempotent), for
    a worker killed between the two writes of :func:`mark_done` leaves a done block no poller of
    the log hears of until a retry finds it done here (:mod:`chunkflow.done_log`)."""
    from chunkflow.done_log import announce

    if not store.exists(done_marker(stage, block)):
        return False
    announce(store, stage, block.name)
    return True


def mark_done(store: ObjectStore, stage: int, block: Bbox, job: Job, stats: Stats,
              durable: Durability | None = None) -> None:
    """Write the block's done marker (the authority), then its entry in the done log, which is how
    ``status`` and ``barrier`` learn of it without listing every marker (:mod:`chunkflow.done_log`).

    ``durable``: settled first, so that every write of the block is on disk before a marker can be
    (:mod:`chunkflow.storage.durability`); given by every caller whose block wrote anything."""
    from chunkflow.done_log import announce

    if durable is not None:
        durable.settle()
    record = {"job": job.job_hash, "block": block.name, "patches": stats.patches, "voxels": stats.voxels,
              "donated_bytes": stats.donated_bytes, "seconds": stats.seconds, "finished": time.time()}
    store.put(done_marker(stage, block), json.dumps(record).encode(), durable=True)  # before a queue ack or cleanup
    announce(store, stage, block.name)
