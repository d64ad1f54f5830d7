"""Queue workers: lease a task, run it, delete it once done (see :mod:`chunkflow.engines.queue`).

A task that raises does not end the worker: its failed marker records the error and the attempt
number (:mod:`chunkflow.engines.attempts`, counted from the markers, so across workers), the task
is handed back to the queue to become visible again after a short delay, and the worker goes on
with the next one. The attempt that reaches ``max_attempts`` gives the task up: it is deleted from
the queue, its failed marker says so (``chunkflow status``, ``chunkflow barrier`` report it) and the
worker reports it when it ends (exit status 2, or 1 if the last error was a bug). Refusals and
bugs are treated alike here: a refusal of a fleet's store is often transient.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from taskqueue import QueueEmptyError

from chunkflow.backends.pin import ModelChanged
from chunkflow.engines.attempts import Heartbeat, failed_record, failure_line, gave_up, read_record
from chunkflow.store_layout import marker_name
from chunkflow.engines.failures import debugging, one_line
from chunkflow.engines.lease import LeaseKeeper, lease_ahead
from chunkflow.engines.queue import (DEFAULT_LEASE, JobBinding, TaskSpec, block_index, check_number, open_queue,
                                     other_stage, quietly, task_spec, whole)
from chunkflow.engines.task import STAGE_NAMES, TaskResult, run_task, worker_resources
from chunkflow.errors import Interrupted, JobError, QueueError
from chunkflow.job import Job
from chunkflow.planning import load_job
from chunkflow.stage_pipeline import stage_one_threads
from chunkflow.engines.worker_summary import WorkerSummary

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
RETRY_DELAY = 5.0  # seconds a failed task stays invisible after its first attempt; doubles, at most the lease


def retry_delay(attempt: int, lease: float) -> int:
    """Seconds a task that failed its ``attempt`` stays invisible before another attempt."""
    return int(min(lease, RETRY_DELAY * 2 ** max(0, attempt - 1)))


#: stage-one tasks a worker runs at once by default: one on the model, one reading or writing
STAGE_ONE_SLOTS = 2
#: seconds an interrupted worker waits for its other slots to stop before handing their tasks back
STOP_WAIT = 10.0


@dataclass
class _Fleet:
    """What the lease loops of one worker process share (one loop per slot)."""

    queue: object
    queue_url: str
    stage: int
    binding: JobBinding
    lease: float
    poll: float
    wait: bool
    force: bool
    cleanup: bool
    max_tasks: int | None
    device: str | None
    batch_size: int | None
    lookahead: bool
    max_attempts: int
    slots: int = 1  # task slots of this worker (stage one: they bound its pipeline, resources.Resources.gates)
    jobs: dict[str, Job] = field(default_factory=dict)
    runtime: dict[str, Job] = field(default_factory=dict)
    tries: dict[tuple[int, str], int] = field(default_factory=dict)  # failed attempts per (stage, block) seen here
    stop: threading.Event = field(default_factory=threading.Event)
    claimed: int = 0  # tasks taken up (or being leased) by every loop, against max_tasks
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: dict[int, "Attempt"] = field(default_factory=dict)  # attempts under way, by id() of their task
    said_stage_over: bool = False  # a slot met stage-two tasks and stopped (logged once)

    def claim(self) -> bool:
        """Count one more task taken up (or about to be leased) against ``max_tasks``; False when
        the worker is done or stopping."""
        with self.lock:
            if self.stop.is_set() or (self.max_tasks is not None and self.claimed >= self.max_tasks):
                return False
            self.claimed += 1
            return True

    def unclaim(self) -> None:
        with self.lock:
            self.claimed -= 1

    def cancel_running(self) -> None:
        """Stop the stage-one blocks in flight in this process at their next batch (nothing more written)."""
        self.stop.set()
        for job in list(self.runtime.values()):
            worker_resources(job).cancelled.set()

    def resume(self) -> None:
        for job in list(self.runtime.values()):
            worker_resources(job).cancelled.clear()


def work(queue_url: str, stage: int, job_store: str | None = None, lease: float = DEFAULT_LEASE,
         wait: bool = False, poll: float = 2.0, force: bool = False, max_tasks: int | None = None,
         device: str | None = None, batch_size: int | None = None, cleanup: bool = False,
         lookahead: bool = True, max_attempts: int = DEFAULT_MAX_ATTEMPTS, slots: int | None = None,
         **kwargs) -> WorkerSummary:
    """Lease and run ``stage`` tasks until the queue is empty (or forever with ``wait``).

    "Empty" counts leased tasks too: a worker that finds nothing to lease while others hold
    leases keeps polling, so it picks up the task of a worker that died. A worker serves one job:
    ``job_store``'s, or else the job of the first task of its stage that it leases
    (:class:`~chunkflow.engines.queue.JobBinding`). A task of another job is handed back at once
    (one warning line per job); a worker without ``wait`` that meets only other jobs' tasks stops
    once its own job's stage is complete (every block done or given up). A task of the other stage
    ends a worker without ``wait`` (see :func:`~chunkflow.engines.queue.other_stage`); with ``wait`` it is handed back
    for the other stage's workers and this one keeps polling. ``cleanup`` (stage two): delete a
    block's donations once it is written, and the leftovers of a block already done.

    A task that raises is handed back (visible again after :func:`retry_delay`) and the worker
    goes on; the ``max_attempts``-th attempt of a task gives it up (deleted from the queue, its
    failed marker kept). A task of a changed manifest still ends the worker (QueueError, the task
    handed back).

    ``slots``: tasks run at once, each leased, renewed and deleted on its own (default
    :data:`STAGE_ONE_SLOTS` for stage one, 1 for stage two). Stage one pipelines its blocks
    (:mod:`chunkflow.stage_pipeline`): ``slots`` >= 2 runs ``2 x slots`` lease loops, of which at
    most ``slots`` blocks read or hold the model (one at a time) and at most ``slots`` write behind
    it, so a slot takes its next task as soon as its block has left the model; memory is ``slots``
    input chunks and ``2 x slots`` float32 output chunks. A leased task waiting for its place keeps
    its lease renewed. ``lookahead`` (one stage-one slot only): lease the next task before running this
    one, so its input is read while this one computes
    (:func:`~chunkflow.engines.lease.lease_ahead`); at most ``max_tasks`` leases in all.
    """
    if stage not in (1, 2):
        raise QueueError(f"stage {stage!r} is not 1 or 2")
    if cleanup and stage != 2:
        raise QueueError("--cleanup deletes the donations stage two consumed: give it to `receive_and_blend "
                         "worker`, not to inference_and_donate")
    check_number("lease", lease, "a number of seconds, at least 1", lambda v: v >= 1)
    check_number("poll", poll, "a number of seconds above 0", lambda v: v > 0)
    check_number("max-attempts", max_attempts, "a whole number, at least 1", whole)
    slots = (STAGE_ONE_SLOTS if stage == 1 else 1) if slots is None else slots
    check_number("slots", slots, "a whole number, at least 1", whole)
    if max_tasks is not None:
        check_number("max-tasks", max_tasks, "a whole number, at least 1", whole)
    if batch_size is not None:
        check_number("batch-size", batch_size, "a whole number, at least 1", whole)
    fleet = _Fleet(open_queue(queue_url, **kwargs), queue_url, stage, JobBinding(load_job(job_store) if job_store else None),
                   lease, poll, wait, force, cleanup, max_tasks, device, batch_size,
                   lookahead and stage == 1 and slots == 1, max_attempts, slots)
    started = time.perf_counter()
    loops = stage_one_threads(slots) if stage == 1 else slots
    summary = _lease_loop(fleet) if loops == 1 else _run_slots(fleet, loops)
    summary.seconds = time.perf_counter() - started
    return summary


def _run_slots(fleet: _Fleet, slots: int) -> WorkerSummary:
    """``slots`` lease loops on threads (stage one: two per task slot, bounded by the worker's
    pipeline); their summaries added up. The first error of a loop (or an interrupt of this thread)
    stops the others: their blocks in flight stop at the next batch, or before their first write,
    and are handed back; it is raised once every loop has ended."""
    summaries = [WorkerSummary(fleet.stage) for _ in range(slots)]
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        try:
            _lease_loop(fleet, summaries[i])
        except BaseException as err:  # noqa: BLE001 - raised in the calling thread below
            errors.append(err)
            fleet.cancel_running()

    threads = [threading.Thread(target=loop, args=(i,), name=f"chunkflow-slot-{i}", daemon=True)
               for i in range(slots)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # a short join keeps Ctrl-C and SIGTERM deliverable to this thread
    except BaseException:
        fleet.cancel_running()
        deadline = time.monotonic() + STOP_WAIT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for attempt in list(fleet.running.values()):  # stuck in a read or write: hand it back, do not wait
            attempt.abandon()
        fleet.resume()
        raise
    fleet.resume()
    if errors:
        raise errors[0]
    total = summaries[0]
    for other in summaries[1:]:
        total.add(other)
    return total


def _lease_loop(fleet: _Fleet, summary: WorkerSummary | None = None) -> WorkerSummary:
    """Lease and run tasks one after another (one slot of :func:`work`)."""
    queue, queue_url, stage = fleet.queue, fleet.queue_url, fleet.stage
    summary = summary or WorkerSummary(stage)
    empty, handed_back = 0, False
    ahead = None  # the task leased ahead of the current one: the next one this loop takes up
    try:
        while ahead is not None or fleet.claim():
            if ahead is not None:
                task, ahead = ahead, None
            else:
                try:
                    task = queue.lease(seconds=int(fleet.lease), num_tasks=1, wait_sec=0)
                except QueueEmptyError:
                    fleet.unclaim()
                    # SQS counts are approximate: believe "empty" only twice in a row, a poll apart
                    empty = empty + 1 if queue.is_empty() else 0
                    if not fleet.wait and empty >= 2:
                        break
                    time.sleep(fleet.poll)
                    continue
                except ValueError as err:  # a task file caught half-written by its producer: it comes back later
                    fleet.unclaim()
                    log.warning("unreadable task in %s (%s); retrying", queue_url, one_line(err))
                    time.sleep(fleet.poll)
                    continue
            spec = task_spec(task, queue_url)
            try:
                job = fleet.binding.claim(spec, fleet.jobs, bind=spec.stage == stage)
                block = block_index(job, spec.block) if job is not None and spec.stage == stage else None
            except (QueueError, JobError) as err:
                quietly(queue.cancel, task)
                raise QueueError(f"{spec.label} from {queue_url}: {err}") from None
            if job is None:  # a task of another job
                fleet.unclaim()
                fleet.binding.hand_back(queue, task, spec)
                if not fleet.wait and fleet.binding.nothing_left(stage, fleet.lease, fleet.poll):
                    break
                continue
            if spec.stage != stage:
                fleet.unclaim()
                try:
                    action = other_stage(queue, task, spec, stage, job, fleet.wait)
                except (QueueError, JobError) as err:
                    raise QueueError(f"{spec.label} from {queue_url}: {err}") from None
                if action == "stop":
                    with fleet.lock:  # said once per worker, not once per task slot
                        said, fleet.said_stage_over = fleet.said_stage_over, True
                    if not said:
                        log.info("%s holds stage-two tasks: stage one is over", spec.label)
                    break
                if action == "handed back":
                    if not handed_back:
                        log.info("%s holds %s tasks; handing them back to their workers and waiting (--wait)",
                                 queue_url, STAGE_NAMES[spec.stage])
                        handed_back = True
                    time.sleep(fleet.poll)
                continue
            empty = 0
            if job.job_hash not in fleet.runtime:
                fleet.runtime[job.job_hash] = job.with_runtime(device=fleet.device, batch_size=fleet.batch_size)
            job = fleet.runtime[job.job_hash]
            upcoming = None
            if fleet.lookahead and fleet.claim():
                ahead, upcoming = lease_ahead(queue, fleet.lease,
                                              partial(_prefetchable, spec, fleet.binding, fleet.jobs, queue_url))
                if ahead is None:
                    fleet.unclaim()
            attempt = Attempt(queue, task, job, spec, block, fleet.lease, fleet.max_attempts, fleet.tries,
                              fleet.slots)
            fleet.running[id(task)] = attempt
            try:
                result = attempt.run(fleet.force, fleet.cleanup, ahead, upcoming)
            finally:
                fleet.running.pop(id(task), None)
            if result is None:
                attempt.count(summary)
                continue
            summary.swept += result.swept
            if result.skipped:
                summary.skipped += 1
            else:
                summary.tasks += 1
                summary.retries += result.attempt - 1
                summary.stats.add(result.stats)
    except BaseException:
        if ahead is not None:  # not run: hand it back at once (the current task is handled by Attempt)
            quietly(queue.cancel, ahead)
        raise
    return summary


class Attempt:
    """One attempt at a leased task: run it with its lease (and that of the task leased ahead)
    renewed and its running marker's heartbeat refreshed; delete it once done; hand it back or
    give it up when it raises."""

    def __init__(self, queue, task, job: Job, spec: TaskSpec, block, lease: float, max_attempts: int,
                 tries: dict[tuple[int, str], int], slots: int = 0):
        self.queue, self.task, self.job, self.spec, self.block = queue, task, job, spec, block
        self.lease, self.max_attempts, self.tries, self.slots = lease, max_attempts, tries, slots
        self.failure: dict | None = None  # the failed marker's record, once the attempt raised

    def run(self, force: bool, cleanup: bool, ahead=None, upcoming=None) -> TaskResult | None:
        """The task's result, or None when it raised (handed back or given up)."""
        heartbeat = Heartbeat(self.lease)
        keeper = LeaseKeeper(self.queue, self.task, self.lease, also=() if ahead is None else (ahead,),
                             on_renew=heartbeat.beat)
        keeper.start()
        t, started = time.perf_counter(), time.time()
        try:
            result = run_task(self.job, self.spec.stage, self.block, force=force, cleanup=cleanup,
                              prefetch_next=upcoming, max_attempts=self.max_attempts, heartbeat=heartbeat,
                              slots=self.slots)
        except BaseException as err:
            keeper.stop()
            if not isinstance(err, Exception) or isinstance(err, (Interrupted, ModelChanged)) or debugging():
                # SIGTERM, Ctrl-C, a block stopped because another slot of this worker was, or a model file
                # changed since planning (no task of the job can run): hand it back now
                quietly(self.queue.cancel, self.task)
                raise
            self._failed(err, started)
            return None
        keeper.stop()
        self.queue.delete(self.task, tally=True)
        if not result.skipped:
            log.info("%s done in %.1f s%s", self.spec.label, time.perf_counter() - t,
                     f" (attempt {result.attempt})" if result.attempt > 1 else "")
        return result

    def abandon(self) -> None:
        """Hand the task back and remove its running marker while its thread is still stuck in a read
        or a write (the worker is stopping and will not wait for it). It writes no done marker before
        every write has ended, so at worst a later attempt computes the block again."""
        quietly(self.queue.cancel, self.task)
        store = worker_resources(self.job).store
        quietly(store.delete, marker_name("running", self.spec.stage, self.spec.block))

    def _failed(self, err: Exception, started: float) -> None:
        """Give the task up if this was its last attempt, else hand it back after a delay."""
        self.failure = record = self._record(err, started)
        if gave_up(record):
            self.queue.delete(self.task)
            log.error("%s %s", STAGE_NAMES[self.spec.stage], failure_line(self.spec.block, record))
            return
        attempt = int(record.get("attempt", 1))
        delay = retry_delay(attempt, self.lease)
        quietly(self.queue.renew, self.task, delay)
        log.warning("%s failed on attempt %d of %d, back in the queue in %d s: %s", self.spec.label, attempt,
                    self.max_attempts, delay, one_line(err))

    def _record(self, err: Exception, started: float) -> dict:
        """The failed marker this attempt left (run_task writes it). Where it left none (it failed
        before its markers, or the store refused them) the attempt still counts: one more than the
        markers say, and at least the tries this worker saw; a last attempt then writes the marker
        itself if the store lets it."""
        key = (self.spec.stage, self.spec.block)
        self.tries[key] = self.tries.get(key, 0) + 1
        store, name = worker_resources(self.job).store, marker_name("failed", self.spec.stage, self.spec.block)
        try:
            record = read_record(store, name)
        except Exception:  # noqa: BLE001 (a store that refuses reads now: count this worker's tries)
            record = None
        if record is not None and (gave_up(record) or record.get("finished", 0) >= started):
            return record
        attempt = max(self.tries[key], int((record or {}).get("attempt", 0)) + 1)
        own = {"job": self.job.job_hash, "block": self.spec.block,
               **failed_record(err, attempt, self.max_attempts)}
        if gave_up(own):
            quietly(store.put, name, json.dumps(own).encode())
        return own

    def count(self, summary: WorkerSummary) -> None:
        if gave_up(self.failure):
            summary.given_up.append(f"{STAGE_NAMES[self.spec.stage]} {failure_line(self.spec.block, self.failure)}")
            summary.given_up_refusals &= bool(self.failure.get("refusal", True))
        else:
            summary.failed += 1


def _prefetchable(current: TaskSpec, binding: JobBinding, jobs: dict[str, Job], queue_url: str, task):
    """The block of ``task`` (leased ahead) to prefetch while ``current`` runs: a stage-one task of
    the same job; else None, and the worker loop takes it up after the current task as if it had
    leased it then (hands it back, refuses it, stops)."""
    spec = task_spec(task, queue_url)
    if spec.stage != current.stage or (spec.store, spec.job) != (current.store, current.job):
        return None
    job = binding.claim(spec, jobs, bind=False)
    return None if job is None else block_index(job, spec.block)
