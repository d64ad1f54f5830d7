"""Stage one, and what both stages share, as plain functions of (job, block). No engine in sight.

``inference_and_donate`` (stage one, one block, GPU): blended inference over the patches the
block owns, its core written to the output volume, every other piece of its chunk donated.

``receive_and_blend`` (stage two, one block, CPU): every expected piece fetched and verified,
summed in key order, cast, and written over the block's band. It reads only donations and
writes only the band, so running it again (or after a crash half-way) writes the same bytes.

Memory of a stage-one task: its input chunk in the stored dtype (two while the next block's is
prefetched), the float32 output chunk, one batch of patches in and out, the model, and bounded
slabs: ``N(x)`` (``blend.SLAB_VOXELS``), the core written in storage-aligned slabs of about
``WRITE_SLAB_BYTES``, one donation piece and its encoding at a time.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Iterator

import numpy as np

from chunkflow.backends import Backend, load_backend, require_device
from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum, weight_map
from chunkflow.inference import blended_inference
from chunkflow.job import Job
from chunkflow.masking import PatchMask, block_position, load_block_map, open_mask
from chunkflow.storage import ObjectStore, Volume, open_store, open_volume
from chunkflow.storage.volumes import input_missing
from chunkflow.storage.donation_codec import encode_donation

log = logging.getLogger(__name__)

DONATIONS = "donations/"
WRITE_SLAB_BYTES = 8 << 20


@dataclass
class Stats:
    """What one task did, for progress summaries.

    ``seconds`` per phase. Stage one: ``read`` (waiting for the input; a prefetched read costs only
    what it did not overlap), ``model``, ``blend`` (gathering patches into batches and adding
    ``w * y`` into the chunk), ``normalise`` (dividing by ``N``), ``write`` (the core), ``donate``.
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
        if self._backend is None:
            require_device(self.job.device)
            self._backend = load_backend(self.job.model, self.job.weights, self.job.device, self.job.precision)
        return self._backend

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

    ``prefetch_next``: the block this worker runs next; its input is read in the background
    while this block computes (see :func:`inference_and_donate_many`).
    """
    res = res or Resources(job)
    layout, stats = job.layout, Stats()
    box = layout.block_box(block)
    chunk = layout.chunk_box(block)
    t = time.perf_counter()
    if chunk is not None:
        filled = res.input.filled_chunks
        origins = layout.own_origins(block)
        if res.mask is not None:
            origins = res.mask.keep(origins, within=chunk)
        out = _infer_region(job, res, chunk, origins, stats, progress, prefetch_next)
        stats.filled_chunks += res.input.filled_chunks - filled
        t = time.perf_counter()
        core = layout.core_box(block)
        if not core.is_empty():
            for slab in write_slabs(core, job.storage_chunk[0], job.out_channels * 4):
                res.output.write(slab, cast_output(out[(slice(None),) + slab.slices(chunk)], job.output_dtype))
            stats.voxels += core.size
        t = stats.time("write", t)
        for donation in layout.donations_from(block):
            piece = np.ascontiguousarray(out[(slice(None),) + donation.piece.slices(chunk)], dtype=job.donation_dtype)
            data = encode_donation(piece, donation.piece, donation.key, job.job_hash,
                                   compression=job.donation_compression)
            del piece
            res.store.put(DONATIONS + donation.key, data)
            stats.donated_bytes += len(data)
            stats.donations += 1
        t = stats.time("donate", t)
    elif prefetch_next is not None:
        res.prefetch(prefetch_next)
    mark_done(res.store, 1, box, job, stats)
    return stats


def write_slabs(core: Bbox, chunk_z: int, voxel_bytes: int) -> Iterator[Bbox]:
    """The core cut along z into storage-aligned slabs of about :data:`WRITE_SLAB_BYTES` (at least one
    storage chunk thick): writing it whole would copy the whole core (the writer needs contiguous
    data, the core is a strided view of the chunk), which would add a chunk to a task's peak."""
    plane = core.shape[1] * core.shape[2] * voxel_bytes
    return core.z_slabs(chunk_z * max(1, WRITE_SLAB_BYTES // (plane * chunk_z)))


def inference_and_donate_many(job: Job, blocks: Iterable[Vec], res: Resources | None = None,
                              progress=None) -> Iterator[tuple[Vec, Stats]]:
    """Stage one over ``blocks`` in order, reading each block's input while the previous one
    computes. ``blocks`` is consumed lazily (one block of lookahead). Yields ``(block, stats)``."""
    res = res or Resources(job)
    todo = iter(blocks)
    current = next(todo, None)
    while current is not None:
        upcoming = next(todo, None)
        yield current, inference_and_donate(job, current, res, progress, prefetch_next=upcoming)
        current = upcoming


def _infer_region(job: Job, res: Resources, region: Bbox, origins: list[Vec], stats: Stats, progress,
                  prefetch_next: Vec | None = None) -> np.ndarray:
    t = time.perf_counter()
    image = res.prefetcher.take(region.grow(job.context_margin), res.read_input)
    t = stats.time("read", t)
    if prefetch_next is not None:
        res.prefetch(prefetch_next)
    counted = [0]

    def predict(batch: np.ndarray) -> np.ndarray:
        counted[0] += len(batch)
        return res.backend.predict(batch)

    def submit(batch: np.ndarray):
        counted[0] += len(batch)
        return res.backend.submit(batch)

    seconds: dict[str, float] = {}
    overlapped = submit if callable(getattr(res.backend, "submit", None)) else None  # duck-typed plugins: predict
    out = blended_inference(image, region.grow(job.context_margin), origins, region, res.weight_sum, res.weights,
                            predict, Vec(job.input_patch), job.out_channels, job.batch_size, progress, seconds,
                            submit=overlapped)
    stats.patches += counted[0]
    for phase, key in (("model", "model"), ("gather", "blend"), ("accumulate", "blend"), ("normalise", "normalise")):
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
    return store.exists(done_marker(stage, block))


def mark_done(store: ObjectStore, stage: int, block: Bbox, job: Job, stats: Stats) -> None:
    record = {"job": job.job_hash, "block": block.name, "patches": stats.patches, "voxels": stats.voxels,
              "donated_bytes": stats.donated_bytes, "seconds": stats.seconds, "finished": time.time()}
    store.put(done_marker(stage, block), json.dumps(record).encode())
