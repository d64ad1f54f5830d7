"""Stage one, and what both stages share, as plain functions of (job, block). No engine in sight.

``inference_and_donate`` (stage one, one block, GPU): blended inference over the patches the
block owns, its core written to the output volume, every other piece of its chunk donated.

Stage two, ``receive_and_blend``, lives in :mod:`chunkflow.stage_two`.

Memory of a stage-one task: its input chunk in the stored dtype, the float32 output chunk, one
batch of patches in and out, the model, and bounded slabs: ``N(x)`` (``blend.SLAB_VOXELS``), and
on the write pool (``block_writes.IO_THREADS`` threads) one storage-aligned core slab of about
``WRITE_SLAB_BYTES`` or one donation piece and its encoding per thread. A worker runs ``SLOTS``
(2) tasks at once, one on the model and one reading or writing, so its peak is two tasks'.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Iterator

import numpy as np

from chunkflow.backends import Backend, load_backend, require_device
from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum, normalise, weight_map
from chunkflow.errors import Interrupted
from chunkflow.backend_blend import run_blended
from chunkflow.job import Job
from chunkflow.masking import PatchMask, block_position, load_block_map, open_mask
from chunkflow.storage import ObjectStore, Volume, open_store, open_volume
from chunkflow.storage.volumes import input_missing
from chunkflow.block_writes import DONATIONS, io_pool, write_block

log = logging.getLogger(__name__)

__all__ = ["DONATIONS", "InputPrefetcher", "Resources", "SLOTS", "Stats", "cast_output", "done_marker",
           "inference_and_donate", "inference_and_donate_many", "is_done", "mark_done", "reference", "write_slabs"]

WRITE_SLAB_BYTES = 8 << 20


@dataclass
class Stats:
    """What one task did, for progress summaries.

    ``seconds`` per phase. Stage one: ``read`` (waiting for the input; a prefetched read costs only
    what it did not overlap), ``wait`` (for the model, while another block of this worker held it),
    ``model``, ``blend`` (gathering patches into batches and adding ``w * y`` into the chunk),
    ``normalise`` (dividing by ``N``), ``write`` (the core) and ``donate``; the last two are summed
    over the write threads, so they may add up to more than the task's wall time.
    Stage two: ``fetch``, ``verify``, ``blend``, ``write``.
    """

    patches: int = 0
    voxels: int = 0
    donated_bytes: int = 0
    donations: int = 0
    filled_chunks: int = 0  # missing input chunks read as zeros (a job planned with --fill-missing)
    seconds: dict[str, float] = field(default_factory=dict)

    def time(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now

    def add(self, other: "Stats") -> None:
        self.patches += other.patches
        self.voxels += other.voxels
        self.donated_bytes += other.donated_bytes
        self.donations += other.donations
        self.filled_chunks += other.filled_chunks
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


class InputPrefetcher:
    """Reads one chunk's input in a background thread, so the next chunk's read and decode overlap
    the model's work on this one. At most one read is pending, which bounds the extra memory to
    one input chunk (in its stored dtype)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Bbox, Future] | None = None

    def submit(self, box: Bbox, read: Callable[[Bbox], np.ndarray]) -> None:
        with self._lock:
            if self._pending is not None and self._pending[0] == box:
                return
            self._drop_pending()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunkflow-prefetch")
            self._pending = (box, self._pool.submit(read, box))

    def take(self, box: Bbox, read: Callable[[Bbox], np.ndarray]) -> np.ndarray:
        """The input over ``box``: the prefetched array if one was started for it, else read now."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending[0] == box:
            return pending[1].result()  # a failed prefetch raises here, as the read itself would
        if pending is not None:
            self._wait_quietly(pending[1])
        return read(box)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._wait_quietly(self._pending[1])
            self._pending = None

    @staticmethod
    def _wait_quietly(future: Future) -> None:
        """Let a prefetch nobody wants finish (no two reads at once); its error is not ours."""
        if not future.cancel():
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - a read of a block we are not running
                log.debug("unused prefetch failed: %s", err)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]


class Resources:
    """What a worker opens once and reuses across the tasks of one job.

    It also holds the input prefetcher: :meth:`prefetch` starts reading a block's input in a
    background thread, and stage one takes it from there when it reaches that block, so the
    read and decode of the next chunk overlap the model's work on this one.
    """

    def __init__(self, job: Job, backend: Backend | None = None):
        self.job = job
        self._backend = backend
        self.prefetcher = InputPrefetcher()
        self.device_lock = threading.Lock()  # one block on the model at a time (see inference_and_donate)
        self.cancelled = threading.Event()  # set: stage-one blocks in flight stop at their next batch
        self._loading = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @cached_property
    def mask(self) -> PatchMask | None:
        """The job's mask (``--mask``), or None."""
        return open_mask(self.job, self.input.resolution)

    @cached_property
    def masked(self) -> np.ndarray | None:
        """Per block (raster order), whether the mask leaves it no patch (written by plan)."""
        return load_block_map(self.job, self.store)

    def is_masked(self, block: Vec) -> bool:
        """Whether block ``block`` has no patch inside the mask (no stage-one task, no donations)."""
        masked = self.masked
        return masked is not None and bool(masked[block_position(block, self.job.layout.grid_shape)])

    @cached_property
    def input(self) -> Volume:
        return open_volume(self.job.input, missing=input_missing(self.job.fill_missing), mip=self.job.mip)

    @cached_property
    def output(self) -> Volume:
        return open_volume(self.job.output)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.job.store)

    @property
    def backend(self) -> Backend:
        """The job's model, loaded on first use pinned to the manifest's ``model_checksum`` (a file
        changed since planning is refused, :mod:`chunkflow.backends.pin`). A backend given to the
        constructor is used as is; a callable given there (a worker's shared model cache) is asked
        for the model each time."""
        with self._loading:  # two blocks in flight must not load the model twice
            if self._backend is None:
                require_device(self.job.device)
                self._backend = load_backend(self.job.model, self.job.weights, self.job.device, self.job.precision,
                                             checksum=self.job.model_checksum)
            backend = self._backend
        return backend if isinstance(backend, Backend) or not callable(backend) else backend()

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The threads that write blocks' cores and donations (:mod:`chunkflow.block_writes`)."""
        with self._loading:
            if self._pool is None:
                self._pool = io_pool()
            return self._pool

    def __copy__(self) -> "Resources":
        """A view sharing everything, the device lock and the cancel flag included (fault hooks)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("device_lock", "cancelled", "_loading", "_pool")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.device_lock, self.cancelled, self._loading, self._pool = (threading.Lock(), threading.Event(),
                                                                       threading.Lock(), None)

    @cached_property
    def weights(self) -> np.ndarray:
        return weight_map(self.job.blend, self.job.output_patch)

    @cached_property
    def weight_sum(self) -> WeightSum:
        return WeightSum(self.weights, [ax.origins for ax in self.job.layout.axes])

    def read_input(self, box: Bbox) -> np.ndarray:
        """The input over ``box`` in its stored dtype, faces padded as the job says."""
        return self.input.read(box, pad_mode=self.job.pad_mode)

    def prefetch(self, block: Vec) -> None:
        """Start reading the input of ``block``'s chunk in the background (nothing if it has none)."""
        chunk = self.job.layout.chunk_box(block)
        if chunk is not None:
            self.prefetcher.submit(chunk.grow(self.job.context_margin), self.read_input)


def done_marker(stage: int, block: Bbox) -> str:
    return f"done/stage{stage}/{block.name}"


def inference_and_donate(job: Job, block: Vec, res: Resources | None = None, progress=None, *,
                         prefetch_next: Vec | None = None) -> Stats:
    """Stage one for block index ``block``: infer its chunk, write its core, donate the rest.

    Three phases, so that two blocks can share one worker (:func:`inference_and_donate_many`, the
    engines' task slots) and the model never waits for storage: the input is read (or taken from
    the prefetcher); the patches are gathered, run and accumulated while holding
    ``res.device_lock``; then, with the lock released for the next block, the chunk is normalised
    and its core and donations are written in parallel (:func:`chunkflow.block_writes.write_block`).
    The done marker is written last, after every write of the block has finished.

    ``prefetch_next``: the block this worker runs next; its input is read in the background
    while this block computes.
    """
    res = res or Resources(job)
    layout, stats = job.layout, Stats()
    box = layout.block_box(block)
    chunk = layout.chunk_box(block)
    if chunk is not None:
        filled = res.input.filled_chunks
        origins = layout.own_origins(block)
        if res.mask is not None:
            origins = res.mask.keep(origins, within=chunk)
        out = _infer_region(job, res, chunk, origins, stats, progress, prefetch_next)
        stats.filled_chunks += res.input.filled_chunks - filled
        _check_cancelled(res, box)
        core = layout.core_box(block)
        slabs = [] if core.is_empty() else list(write_slabs(core, job.storage_chunk[0], job.out_channels * 4))
        written = write_block(job, layout, block, chunk, out, res.output, res.store, res.pool, slabs, cast_output)
        del out
        stats.voxels += written.voxels
        stats.donations += written.donations
        stats.donated_bytes += written.donated_bytes
        stats.seconds["write"] = stats.seconds.get("write", 0.0) + written.write_seconds
        stats.seconds["donate"] = stats.seconds.get("donate", 0.0) + written.donate_seconds
    elif prefetch_next is not None:
        res.prefetch(prefetch_next)
    mark_done(res.store, 1, box, job, stats)
    return stats


def _check_cancelled(res: Resources, box: Bbox) -> None:
    if res.cancelled.is_set():
        raise Interrupted(f"stage one of {box.name} stopped before writing (the run was interrupted)")


def write_slabs(core: Bbox, chunk_z: int, voxel_bytes: int) -> Iterator[Bbox]:
    """The core cut along z into storage-aligned slabs of about :data:`WRITE_SLAB_BYTES` (at least one
    storage chunk thick): writing it whole would copy the whole core (the writer needs contiguous
    data, the core is a strided view of the chunk), which would add a chunk to a task's peak."""
    plane = core.shape[1] * core.shape[2] * voxel_bytes
    return core.z_slabs(chunk_z * max(1, WRITE_SLAB_BYTES // (plane * chunk_z)))


#: stage-one blocks one worker runs at once by default: one on the model, one reading or writing
SLOTS = 2


def inference_and_donate_many(job: Job, blocks: Iterable[Vec], res: Resources | None = None,
                              progress=None, slots: int = SLOTS) -> Iterator[tuple[Vec, Stats]]:
    """Stage one over ``blocks``, yielding ``(block, stats)`` in order as each block is done.

    ``slots`` blocks are in flight at once (threads sharing ``res``): while one holds the model,
    the next reads its input and the previous normalises and writes its output, so neither reads
    nor writes keep the model waiting. Memory: ``slots`` blocks (input chunk and float32 output
    chunk each) plus the write pool's slabs. ``slots=1`` runs one block at a time, reading the
    next block's input in the background instead. ``blocks`` is consumed lazily.

    If a block fails, or the caller stops (KeyboardInterrupt), the others in flight stop at their
    next batch (nothing of them is written) and the error is raised once they have ended.
    """
    res = res or Resources(job)
    todo = iter(blocks)
    if slots <= 1:
        current = next(todo, None)
        while current is not None:
            upcoming = next(todo, None)
            yield current, inference_and_donate(job, current, res, progress, prefetch_next=upcoming)
            current = upcoming
        return
    pending: deque[tuple[Vec, Future]] = deque()
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="chunkflow-block") as blocks_pool:
        try:
            while True:
                while len(pending) < slots and (block := next(todo, None)) is not None:
                    pending.append((block, blocks_pool.submit(inference_and_donate, job, block, res, progress)))
                if not pending:
                    return
                block, future = pending.popleft()
                yield block, future.result()
        except BaseException:
            res.cancelled.set()
            for _, future in pending:
                wait([future])
            res.cancelled.clear()
            raise


def _infer_region(job: Job, res: Resources, region: Bbox, origins: list[Vec], stats: Stats, progress,
                  prefetch_next: Vec | None = None) -> np.ndarray:
    """The blended output over ``region`` (float32, normalised): the input read first, then the
    model's part under ``res.device_lock``, then the division by ``N`` with the lock released."""
    t = time.perf_counter()
    backend = res.backend  # loaded (once) before the input is read, so a bad model costs no read
    image = res.prefetcher.take(region.grow(job.context_margin), res.read_input)
    t = stats.time("read", t)
    if prefetch_next is not None:
        res.prefetch(prefetch_next)

    def step(done: int) -> None:
        if res.cancelled.is_set():
            raise Interrupted(f"stage one of {region.name} stopped (the run was interrupted)")
        if progress is not None:
            progress(done)

    seconds: dict[str, float] = {}
    with res.device_lock:
        t = stats.time("wait", t)
        out, patches = run_blended(image, region.grow(job.context_margin), origins, region, res.weight_sum,
                                   res.weights, backend, Vec(job.input_patch), job.out_channels, job.batch_size,
                                   step, seconds, normalise=False)
    del image
    t = time.perf_counter()
    normalise(out, region, res.weight_sum)
    stats.time("normalise", t)
    stats.patches += patches
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
    return _infer_region(job, res, region, origins, Stats(), progress)


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


def mark_done(store: ObjectStore, stage: int, block: Bbox, job: Job, stats: Stats) -> None:
    """Write the block's done marker (the authority), then its entry in the done log, which is how
    ``status`` and ``barrier`` learn of it without listing every marker (:mod:`chunkflow.done_log`)."""
    from chunkflow.done_log import announce

    record = {"job": job.job_hash, "block": block.name, "patches": stats.patches, "voxels": stats.voxels,
              "donated_bytes": stats.donated_bytes, "seconds": stats.seconds, "finished": time.time()}
    store.put(done_marker(stage, block), json.dumps(record).encode())
    announce(store, stage, block.name)
