"""What a worker opens once per job and shares between its tasks (:class:`Resources`), and what a
task measures (:class:`Stats`): the volumes, the job store, the model, the blend's weight map and
``N``, the device and its turns, the pipeline's places and the worker's thread pools."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from chunkflow import block_writes
from chunkflow.backends import Backend, load_backend, require_device
from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum, weight_map
from chunkflow.done_reset import reset_pending
from chunkflow.job import Job, JobError
from chunkflow.masking import PatchMask, block_position, load_block_map, open_mask
from chunkflow.output_claims import check_output_is_ours, read_record
from chunkflow.storage import ObjectStore, StorageError, Volume, open_store, open_volume
from chunkflow.storage.durability import Durability, job_durability
from chunkflow.storage.volumes import input_missing
from chunkflow.stage_pipeline import DeviceTurns, InputPrefetcher, StageGates

log = logging.getLogger(__name__)

__all__ = ["Resources", "SLOTS", "Stats"]

#: stage-one task slots of one worker by default: two blocks reading or on the model, two writing
#: behind (:mod:`chunkflow.stage_pipeline`)
SLOTS = 2


@dataclass
class Stats:
    """What one task did, for progress summaries.

    ``seconds`` per phase. Stage one: ``read`` (waiting for the input; a prefetched read costs only
    what it did not overlap), ``wait`` (for the model, while another block of this worker held it),
    ``model``, ``blend`` (gathering patches into batches and adding ``w * y`` into the chunk),
    ``wait_write`` (off the model, for a place to write behind it), ``normalise`` (dividing by ``N``),
    ``write`` (the core) and ``donate``; the last two are summed over the write threads, so they
    may add up to more than the task's wall time.
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
        self.turns = DeviceTurns(self.device_lock)  # how blocks hand the device over (stage_pipeline)
        self.reading = threading.Lock()  # stage-one blocks read their input one at a time
        self.cancelled = threading.Event()  # set: stage-one blocks in flight stop at their next batch
        self._loading = threading.Lock()
        self._pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
        self._gates: dict[int, StageGates] = {}

    def gates(self, slots: int = 0) -> StageGates:
        """The bounds of this worker's stage-one pipeline for ``slots`` task slots (default
        :data:`SLOTS`): at most ``slots`` blocks reading or on the device, at most ``slots`` writing
        behind (:class:`chunkflow.stage_pipeline.StageGates`)."""
        slots = slots or SLOTS
        with self._loading:
            gates = self._gates.get(slots)
            if gates is None:
                gates = self._gates[slots] = StageGates(slots)
            return gates

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
        volume = open_volume(self.job.input, missing=input_missing(self.job.fill_missing), mip=self.job.mip)
        _check_still_planned("input", volume, self.job, self.job.in_channels, None)
        return volume

    @cached_property
    def output(self) -> Volume:
        volume = open_volume(self.job.output)
        _check_still_planned("output", volume, self.job, self.job.out_channels, self.job.output_dtype)
        if self.job.store and reset_pending(self.store):
            raise JobError(f"a reset of this job's done state in {self.store.url} was cut off; plan the job again "
                           "(`chunkflow run`, or `chunkflow plan`) to finish it before its workers run")
        check_output_is_ours(volume, self.job, self.output_claim)
        return volume

    @property
    def output_claim(self) -> dict | None:
        """The claim the job's store says it made in its output when it was planned (None: jobs planned
        before 2026-11-29 made none); read each time: a plan --force of the job makes a new one."""
        return read_record(self.store) if self.job.store else None

    def check_standing(self) -> None:
        """Refuse (one line) a job whose done markers cannot be trusted, before any block is skipped as
        done: a reset of its done state was cut off, or it claimed its output and that output is gone,
        replaced or another job's now (opening the output checks it, :attr:`output`)."""
        if self.job.store and (self.output_claim is not None or reset_pending(self.store)):
            self.output  # noqa: B018 - opened for its checks

    def check_output_still_ours(self) -> None:
        """Before a block's writes: read the output's claims again and refuse (JobError) if another job
        claimed this job's region since this worker opened the output (its writes would go over that
        job's result) or the output lost this job's claim."""
        if self.job.store:
            check_output_is_ours(self.output, self.job, self.output_claim, fresh=True)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.job.store)

    @cached_property
    def durable(self) -> Durability:
        """Flushes the local filesystems of the output volume and the store before a block's done
        marker, one flush for the blocks of this worker that finish together
        (:mod:`chunkflow.storage.durability`); nothing to flush for remote ones."""
        return job_durability(self.job.output, self.store)

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
        return self.threads("write", block_writes.IO_THREADS)

    def threads(self, name: str, workers: int) -> ThreadPoolExecutor:
        """This worker's pool ``name`` of ``workers`` threads, started once and shared by its tasks of
        the job (stage one's writes, stage two's fetches and band writes), not once per task."""
        with self._loading:
            pool = self._pools.get((name, workers))
            if pool is None:
                pool = self._pools[(name, workers)] = ThreadPoolExecutor(workers, f"chunkflow-{name}")
            return pool

    def __copy__(self) -> "Resources":
        """A view sharing everything, the device lock and the cancel flag included (fault hooks)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("device_lock", "turns", "reading", "cancelled", "_loading", "_pools", "_gates", "durable")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.device_lock, self.cancelled, self._loading, self._pools = (threading.Lock(), threading.Event(),
                                                                        threading.Lock(), {})
        self.turns, self.reading, self._gates = DeviceTurns(self.device_lock), threading.Lock(), {}

    @cached_property
    def blend_map(self) -> np.ndarray:
        """The blend's weight map ``w`` over one output patch (not the model's weights file)."""
        return weight_map(self.job.blend, self.job.output_patch)

    @cached_property
    def weight_sum(self) -> WeightSum:
        return WeightSum(self.blend_map, [ax.origins for ax in self.job.layout.axes])

    def read_input(self, box: Bbox) -> np.ndarray:
        """The input over ``box`` in its stored dtype, faces padded as the job says."""
        return self.input.read(box, pad_mode=self.job.pad_mode)

    def prefetch(self, block: Vec) -> None:
        """Start reading the input of ``block``'s chunk in the background (nothing if it has none)."""
        chunk = self.job.layout.chunk_box(block)
        if chunk is not None:
            self.prefetcher.submit(chunk.grow(self.job.context_margin), self.read_input)


def _check_still_planned(what: str, volume: Volume, job: Job, channels: int, dtype: str | None) -> None:
    """Refuse (StorageError, one line) a volume that no longer fits the job it was planned for: one
    re-created smaller between ``plan`` and the workers was read past its new bounds (an adversarial
    review, 2026-11-29), and another volume put at the output's path would take the job's writes."""
    region = job.layout.bbox
    if not volume.bbox.contains(region) or volume.num_channels != channels or \
            (dtype is not None and str(volume.dtype) != dtype):
        found = f"{volume.bbox.name}, {volume.num_channels} channels of {volume.dtype}"
        wanted = f"{region.name}, {channels} channels" + (f" of {dtype}" if dtype else "")
        raise StorageError(f"the {what} {volume.url} holds {found}, but the job was planned for {wanted} (was it "
                           "replaced after plan?); plan the job again against it")
