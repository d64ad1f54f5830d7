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
import time
from dataclasses import dataclass, field
from functools import partial

from taskqueue import QueueEmptyError

from chunkflow.engines.attempts import Heartbeat, failed_record, failure_line, gave_up, marker_name, read_record
from chunkflow.engines.failures import debugging, one_line
from chunkflow.engines.lease import LeaseKeeper, lease_ahead
from chunkflow.engines.queue import (DEFAULT_LEASE, TaskSpec, block_index, check_number, open_queue, quietly,
                                     resolve_job, task_spec, whole)
from chunkflow.engines.task import STAGE_NAMES, TaskResult, run_task, worker_resources
from chunkflow.errors import JobError, QueueError
from chunkflow.job import Job
from chunkflow.planning import load_job
from chunkflow.stages import Resources, Stats

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
RETRY_DELAY = 5.0  # seconds a failed task stays invisible after its first attempt; doubles, at most the lease


@dataclass
class WorkerSummary:
    stage: int
    tasks: int = 0
    skipped: int = 0
    retries: int = 0
    seconds: float = 0.0
    stats: Stats = field(default_factory=Stats)
    swept: int = 0  # leftover donations of finished blocks removed (--cleanup)
    failed: int = 0  # attempts that raised and were handed back for another attempt
    given_up: list[str] = field(default_factory=list)  # one line per task this worker gave up
    given_up_refusals: bool = True  # every task given up ended in a refusal (exit 2, else 1)

    @property
    def handled(self) -> int:
        return self.tasks + self.skipped + self.failed + len(self.given_up)

    def line(self) -> str:
        swept = f", {self.swept} leftover donations of finished blocks removed" if self.swept else ""
        failed = f", {self.failed} failed attempts handed back" if self.failed else ""
        given_up = f", {len(self.given_up)} tasks given up" if self.given_up else ""
        return (f"{STAGE_NAMES[self.stage]} worker: {self.tasks} tasks run, {self.skipped} skipped (already done), "
                f"{self.retries} retries (of tasks that failed or whose worker died), {self.stats.patches} patches, "
                f"{self.seconds:.1f} s{swept}{failed}{given_up}")

    def exit_status(self) -> int:
        """0 unless this worker gave a task up: then 2 (refusals) or 1 (a bug)."""
        if not self.given_up:
            return 0
        return 2 if self.given_up_refusals else 1


def retry_delay(attempt: int, lease: float) -> int:
    """Seconds a task that failed its ``attempt`` stays invisible before another attempt."""
    return int(min(lease, RETRY_DELAY * 2 ** max(0, attempt - 1)))


def work(queue_url: str, stage: int, job_store: str | None = None, lease: float = DEFAULT_LEASE,
         wait: bool = False, poll: float = 2.0, force: bool = False, max_tasks: int | None = None,
         device: str | None = None, batch_size: int | None = None, cleanup: bool = False,
         lookahead: bool = True, max_attempts: int = DEFAULT_MAX_ATTEMPTS, **kwargs) -> WorkerSummary:
    """Lease and run ``stage`` tasks until the queue is empty (or forever with ``wait``).

    "Empty" counts leased tasks too: a worker that finds nothing to lease while others hold
    leases keeps polling, so it picks up the task of a worker that died. With ``job_store``
    the worker serves that job only and refuses tasks of any other. A task of the other stage
    ends a worker without ``wait`` (see :func:`_other_stage`); with ``wait`` it is handed back
    for the other stage's workers and this one keeps polling. ``cleanup`` (stage two): delete a
    block's donations once it is written, and the leftovers of a block already done.

    A task that raises is handed back (visible again after :func:`retry_delay`) and the worker
    goes on; the ``max_attempts``-th attempt of a task gives it up (deleted from the queue, its
    failed marker kept). A task of another job or of a changed manifest still ends the worker
    (QueueError, the task handed back).

    ``lookahead`` (stage one): lease the next task before running this one, so its input is read
    while this one computes (:func:`~chunkflow.engines.lease.lease_ahead`); at most ``max_tasks``
    leases in all.
    """
    if stage not in (1, 2):
        raise QueueError(f"stage {stage!r} is not 1 or 2")
    if cleanup and stage != 2:
        raise QueueError("--cleanup deletes the donations stage two consumed: give it to `receive_and_blend "
                         "worker`, not to inference_and_donate")
    check_number("lease", lease, "a number of seconds, at least 1", lambda v: v >= 1)
    check_number("poll", poll, "a number of seconds above 0", lambda v: v > 0)
    check_number("max-attempts", max_attempts, "a whole number, at least 1", whole)
    if max_tasks is not None:
        check_number("max-tasks", max_tasks, "a whole number, at least 1", whole)
    if batch_size is not None:
        check_number("batch-size", batch_size, "a whole number, at least 1", whole)
    queue = open_queue(queue_url, **kwargs)
    expected = load_job(job_store) if job_store else None
    jobs: dict[str, Job] = {}
    runtime: dict[str, Job] = {}
    tries: dict[tuple[int, str], int] = {}  # failed attempts per (stage, block) this worker saw
    summary, started, empty, handed_back = WorkerSummary(stage), time.perf_counter(), 0, False
    ahead = None  # the task leased ahead of the current one: the next one this loop takes up
    try:
        while max_tasks is None or summary.handled < max_tasks:
            if ahead is not None:
                task, ahead = ahead, None
            else:
                try:
                    task = queue.lease(seconds=int(lease), num_tasks=1, wait_sec=0)
                except QueueEmptyError:
                    # SQS counts are approximate: believe "empty" only twice in a row, a poll apart
                    empty = empty + 1 if queue.is_empty() else 0
                    if not wait and empty >= 2:
                        break
                    time.sleep(poll)
                    continue
                except ValueError as err:  # a task file caught half-written by its producer: it comes back later
                    log.warning("unreadable task in %s (%s); retrying", queue_url, one_line(err))
                    time.sleep(poll)
                    continue
            spec = task_spec(task, queue_url)
            if spec.stage != stage:
                try:
                    action = _other_stage(queue, task, spec, stage, jobs, expected, wait)
                except (QueueError, JobError) as err:
                    raise QueueError(f"{spec.label} from {queue_url}: {err}") from None
                if action == "stop":
                    break
                if action == "handed back":
                    if not handed_back:
                        log.info("%s holds %s tasks; handing them back to their workers and waiting (--wait)",
                                 queue_url, STAGE_NAMES[spec.stage])
                        handed_back = True
                    time.sleep(poll)
                continue
            empty = 0
            try:
                job = resolve_job(spec, expected, jobs)
                block = block_index(job, spec.block)
            except (QueueError, JobError) as err:
                queue.cancel(task)
                raise QueueError(f"{spec.label} from {queue_url}: {err}") from None
            if job.job_hash not in runtime:
                runtime[job.job_hash] = job.with_runtime(device=device, batch_size=batch_size)
            job = runtime[job.job_hash]
            upcoming = None
            if lookahead and stage == 1 and (max_tasks is None or summary.handled + 2 <= max_tasks):
                ahead, upcoming = lease_ahead(queue, lease, partial(_prefetchable, spec, expected, jobs, queue_url))
            attempt = Attempt(queue, task, job, spec, block, lease, max_attempts, tries)
            result = attempt.run(force, cleanup, ahead, upcoming)
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
    summary.seconds = time.perf_counter() - started
    return summary


class Attempt:
    """One attempt at a leased task: run it with its lease (and that of the task leased ahead)
    renewed and its running marker's heartbeat refreshed; delete it once done; hand it back or
    give it up when it raises."""

    def __init__(self, queue, task, job: Job, spec: TaskSpec, block, lease: float, max_attempts: int,
                 tries: dict[tuple[int, str], int]):
        self.queue, self.task, self.job, self.spec, self.block = queue, task, job, spec, block
        self.lease, self.max_attempts, self.tries = lease, max_attempts, tries
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
                              prefetch_next=upcoming, max_attempts=self.max_attempts, heartbeat=heartbeat)
        except BaseException as err:
            keeper.stop()
            if not isinstance(err, Exception) or debugging():  # SIGTERM, Ctrl-C: hand the task back now
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


def _prefetchable(current: TaskSpec, expected: Job | None, jobs: dict[str, Job], queue_url: str, task):
    """The block of ``task`` (leased ahead) to prefetch while ``current`` runs: a stage-one task of
    the same job that :func:`resolve_job` accepts; else None, and the worker loop takes it up
    after the current task as if it had leased it then (hands it back, refuses it, stops)."""
    spec = task_spec(task, queue_url)
    if spec.stage != current.stage or (spec.store, spec.job) != (current.store, current.job):
        return None
    return block_index(resolve_job(spec, expected, jobs), spec.block)


def _other_stage(queue, task, spec: TaskSpec, stage: int, jobs: dict[str, Job], expected: Job | None = None,
                 wait: bool = False) -> str:
    """A task of the other stage, leased by a worker of ``stage``; returns what the worker does next.

    "deleted": a stray duplicate of a finished stage-one task, deleted; keep working.
    "handed back" (``wait``): the task is left for the other stage's workers; keep polling.
    "stop": a stage-one worker meets stage two, so stage one is over (the task is handed back).
    Raises QueueError or JobError, the task handed back, for a task of another job than
    ``expected`` (or of a changed manifest), or a stage-two worker meeting a stage-one task
    that is not done.
    """
    try:
        job = resolve_job(spec, expected, jobs)
    except (QueueError, JobError):
        quietly(queue.cancel, task)
        raise
    if spec.stage == 1 and Resources(job).store.exists(f"done/stage1/{spec.block}"):
        queue.delete(task)  # a stray duplicate of a finished stage-one task
        return "deleted"
    queue.cancel(task)
    if wait:
        return "handed back"
    if spec.stage == 2:
        log.info("%s holds stage-two tasks: stage one is over", spec.label)
        return "stop"
    raise QueueError("a stage-one task that is not done: receive_and_blend workers take stage-two tasks, which "
                     "`chunkflow barrier` produces once stage one is complete (or give this worker --wait to "
                     "leave stage-one tasks to inference_and_donate workers)")
