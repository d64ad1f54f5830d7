"""One stage of one block as an engine task: done-marker skip, running/failed markers, attempts.

Every engine (local, Dask, queue workers) runs blocks through :func:`run_task`, so they all keep
the same markers in the job's store (small JSON objects beside ``manifest.json``)::

    done/stage{n}/{block}     the block is final for this stage (written by chunkflow.stages)
    running/stage{n}/{block}  an attempt started: host, pid, start time, attempt number; removed
                              when the attempt ends, so one that outlives its done marker (or has
                              no done marker and an old heartbeat) belongs to a dead worker
    failed/stage{n}/{block}   the last attempt raised: the error; removed by a later success

The attempt number comes from the markers a previous attempt left behind, which is how a
retry after a killed worker is counted without asking the engine; queue workers give a task up
after ``max_attempts`` (:mod:`chunkflow.engines.attempts`).

A stage-two task with ``cleanup`` whose block is already done removes the block's donations
that are still there (:func:`sweep_leftovers`): a late duplicate of a donor's stage one (a
``--force`` rerun, a queue retry) writes them again after the block was blended and cleaned up.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from chunkflow.backends import Backend, load_backend, verify_model
from chunkflow.bbox import Bbox, Vec
from chunkflow.engines import faults
from chunkflow.engines.attempts import Heartbeat, exhausted, failed_record, last_attempt
from chunkflow.engines.failures import STAGE_NAMES
from chunkflow.errors import Interrupted
from chunkflow.job import Job
from chunkflow.stage_pipeline import stage_one_threads
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import DONATIONS, Resources, Stats, inference_and_donate, is_done
from chunkflow.storage import ObjectStore
from chunkflow.store_layout import marker_name

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """What one task did; ``skipped`` when its done marker already existed; ``swept``: leftover
    donations of the (done) block it removed."""

    stage: int
    block: str
    stats: Stats = field(default_factory=Stats)
    attempt: int = 1
    skipped: bool = False
    swept: int = 0


def marker(kind: str, stage: int, block: Bbox) -> str:
    """``running/stage1/{block}`` and the like; ``done`` markers are :func:`chunkflow.stages.done_marker`."""
    return marker_name(kind, stage, block.name)


_RESOURCES: dict[tuple, Resources] = {}
_BACKENDS: dict[tuple, tuple[Backend, set[str]]] = {}  # model key -> (loaded model, jobs it was verified for)
_CACHES = threading.RLock()  # a worker runs two stage-one tasks at once: both must find the same entries


def worker_resources(job: Job) -> Resources:
    """The Resources of ``job`` in this process, opened once; the model is loaded on first use
    and shared by every job with the same model, so a worker switching jobs keeps it loaded."""
    key = (job.job_hash, job.store, job.device, job.batch_size)
    with _CACHES:
        res = _RESOURCES.get(key)
        if res is None:
            if len(_RESOURCES) >= 4:
                _RESOURCES.pop(next(iter(_RESOURCES)))
            res = _RESOURCES[key] = Resources(job, _SharedBackend(job))
        return res


class _SharedBackend:
    """Hands a job's stage one the process's one loaded model (``Resources.backend`` calls it):
    a one-entry cache, so a new model replaces the old one, which frees its GPU memory.

    The model is loaded pinned to the job's ``model_checksum`` (the files verified, then loaded from
    the verified bytes). Another job asking for the same model gets the loaded one only after the
    files have been verified again for that job, so a model file replaced between two jobs is
    refused, not served from the cache. The lock makes a worker's task slots load or verify once.
    """

    def __init__(self, job: Job):
        self._job = job

    def __call__(self) -> Backend:
        job = self._job
        key = (job.model, job.weights, job.model_checksum, job.device, job.precision)
        with _CACHES:
            entry = _BACKENDS.get(key)
            if entry is None:
                _BACKENDS.clear()
                loaded = load_backend(job.model, job.weights, job.device, job.precision, checksum=job.model_checksum)
                entry = _BACKENDS[key] = (loaded, {job.job_hash})
            elif job.job_hash not in entry[1]:
                verify_model(job.model, job.weights, job.model_checksum)
                entry[1].add(job.job_hash)
            return entry[0]


def run_task(job: Job, stage: int, block: Vec, force: bool = False, cleanup: bool = False,
             res: Resources | None = None, prefetch_next: Vec | None = None, max_attempts: int | None = None,
             heartbeat: Heartbeat | None = None, slots: int = 0) -> TaskResult:
    """Run stage ``stage`` for ``block`` unless it is done (or ``force``), keeping the markers.
    ``prefetch_next`` (stage one): the block this process runs next, whose input is read while
    this one computes. ``max_attempts`` (queue workers): the failed marker of the attempt that
    reaches it says the task is given up, and a block whose attempts are used up already is not
    run (AttemptsExhausted). ``heartbeat``: refreshes the running marker while the attempt runs.
    ``slots`` (stage one): the task slots of this worker, which bound its pipeline
    (:meth:`chunkflow.resources.Resources.gates`; 0: the default). A failure in any step of the block,
    its writes behind the model included, is this attempt's failure: no done marker, a failed marker."""
    res = res or worker_resources(job)
    store = res.store
    box = job.layout.block_box(block)
    if not force and (is_done(store, stage, box) or (stage == 1 and res.is_masked(block))):
        swept = sweep_leftovers(job, block, store) if stage == 2 and cleanup else 0
        return TaskResult(stage, box.name, skipped=True, swept=swept)
    last, failed = last_attempt(store, stage, box.name)
    if max_attempts is not None and last >= max_attempts:
        raise exhausted(store, stage, box.name, last, failed, max_attempts, _fields(job, box))
    attempt = last + 1
    running = marker("running", stage, box)
    record = _fields(job, box, attempt=attempt, host=socket.gethostname(), pid=os.getpid(), started=time.time())
    if heartbeat is not None:
        record.update(lease=heartbeat.lease, heartbeat=record["started"])
    store.put(running, json.dumps(record).encode())
    if heartbeat is not None:
        heartbeat.attach(store, running, record)
    view = faults.watched(res, stage)
    try:
        if stage == 1:
            stats = inference_and_donate(job, block, view, prefetch_next=prefetch_next, slots=slots)
        else:
            stats = receive_and_blend(job, block, view, cleanup=cleanup)
    except Interrupted:  # stopped with the run (another slot failed, Ctrl-C): not a failed attempt
        if heartbeat is not None:
            heartbeat.detach()
        _quietly_delete(store, running)
        raise
    except Exception as err:
        if heartbeat is not None:
            heartbeat.detach()
        try:  # the task's own error is the one to report, even if the store is gone as well
            store.put(marker("failed", stage, box),
                      json.dumps(_fields(job, box, **failed_record(err, attempt, max_attempts))).encode())
            store.delete(running)
        except Exception as marking:  # noqa: BLE001
            log.debug("could not record the failure of %s stage %d: %s", box.name, stage, marking)
        raise
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): no failed attempt, the engine hands the task back
        if heartbeat is not None:
            heartbeat.detach()
        _quietly_delete(store, running)
        raise
    finally:
        if heartbeat is not None:
            heartbeat.detach()
    store.delete(marker("failed", stage, box))
    store.delete(running)
    if attempt > 1:
        log.info("%s %s done on attempt %d", STAGE_NAMES[stage], box.name, attempt)
    return TaskResult(stage, box.name, stats, attempt)


class StageTask:
    """A picklable callable running one stage for one block (what engines ship to workers).

    ``slots``: the task slots of the engine running it (0: the default), which bound stage one's
    pipeline in each worker; see :meth:`for_slots`."""

    def __init__(self, job: Job, stage: int, force: bool = False, cleanup: bool = False, slots: int = 0):
        self.job, self.stage, self.force, self.cleanup, self.slots = job, stage, force, cleanup, slots

    def for_slots(self, slots: int) -> tuple["StageTask", int]:
        """``(task, threads)`` for an engine with ``slots`` task slots in one process: stage one runs
        up to ``2 x slots`` tasks at once (``slots`` >= 2), its pipeline bounded by ``slots``
        (:func:`chunkflow.stage_pipeline.stage_one_threads`); other stages ``slots`` tasks."""
        if self.stage != 1:
            return self, slots
        return StageTask(self.job, self.stage, self.force, self.cleanup, slots), stage_one_threads(slots)

    @property
    def label(self) -> str:
        return STAGE_NAMES[self.stage]

    def __call__(self, block: Vec) -> TaskResult:
        return run_task(self.job, self.stage, Vec(block), self.force, self.cleanup, slots=self.slots)

    def cancel(self) -> None:
        """Ask this process's stage-one tasks of the job that are still running to stop at their next
        batch, writing nothing more (engines call it when the run is interrupted)."""
        worker_resources(self.job).cancelled.set()

    def resume(self) -> None:
        """Undo :meth:`cancel` once the cancelled tasks have ended (a later run in this process)."""
        worker_resources(self.job).cancelled.clear()

    def run_before(self, block: Vec, upcoming: Vec) -> TaskResult:
        """Run ``block`` knowing that this process runs ``upcoming`` next (engines that know it
        call this): stage one starts reading the upcoming block's input once its own is read."""
        ahead = Vec(upcoming) if self.stage == 1 else None
        return run_task(self.job, self.stage, Vec(block), self.force, self.cleanup, prefetch_next=ahead,
                        slots=self.slots)


def sweep_leftovers(job: Job, block: Vec, store: ObjectStore) -> int:
    """Delete the donations to ``block`` (a block whose stage two is done) that are still in
    ``store``: one listing of its ``donations/{block}%`` prefix, then a delete per expected key
    found (anything else under the prefix is left to ``inspect``). Returns how many."""
    prefix = f"{DONATIONS}{job.layout.block_box(block).name}%"
    present = set(store.list(prefix))
    leftovers = [DONATIONS + d.key for d in job.layout.donations_to(block) if DONATIONS + d.key in present]
    for name in leftovers:
        store.delete(name)
    if leftovers:
        log.info("removed %d leftover donations of finished block %s", len(leftovers), prefix[len(DONATIONS):-1])
    return len(leftovers)


def _fields(job: Job, box: Bbox, **values) -> dict:
    return {"job": job.job_hash, "block": box.name, **values}


def _quietly_delete(store: ObjectStore, name: str) -> None:
    try:
        store.delete(name)
    except Exception as err:  # noqa: BLE001 (never hide the interrupt being raised)
        log.warning("could not remove %s: %s", name, err)
