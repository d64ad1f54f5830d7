"""Task-queue fleets (python-task-queue): produce tasks, lease them from workers, barrier.

A task names a block of a job and nothing else (the job's store URL, its hash, the stage
and the block name; never arrays)::

    chunkflow produce JOB QUEUE                       stage-one tasks of every block not done
    python inference_and_donate.py worker QUEUE       lease, run, delete; until the queue is empty
    chunkflow barrier JOB QUEUE2                      wait for every stage-one done marker, then
                                                      produce the stage-two tasks into QUEUE2
    python receive_and_blend.py worker QUEUE2

Queues: ``fq:///shared/dir`` (a directory on a filesystem every worker mounts) or
``sqs://NAME`` (AWS SQS; region from ``AWS_DEFAULT_REGION``, endpoint from
``AWS_ENDPOINT_URL_SQS``, credentials from the usual ``AWS_*`` variables).

Leases: a worker leases a task for ``lease`` seconds and a background thread renews the
lease every ``lease / 3`` seconds while the task runs, so ``lease`` only bounds how long a
*dead* worker's task stays invisible, never how long a chunk may take. A task is deleted
only after its done marker is written; a worker killed at any instant leaves its task to
reappear when the lease runs out, and running it again is safe (Invariant 2). A stage-one
worker also holds the lease of the task it runs next, leased ahead so that its input is read
while the current task computes (:func:`work`, ``lookahead``); it is handed back, never deleted
unrun, if the worker stops first.

A task that raises is handed back for another attempt and the worker goes on; after
``max_attempts`` the task is given up (the workers: :mod:`chunkflow.engines.queue_worker`).
:func:`barrier` reports failed stage-one blocks while it waits and gives up, naming them, once
every block not done has been given up.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Container, Sequence

from taskqueue import TaskQueue, queueable

from chunkflow.bbox import Bbox, Vec
from chunkflow.block_set import BlockGrid, BlockSet
from chunkflow.done_log import SWEEP_AFTER_S, DoneView, done_set
from chunkflow.engines.attempts import FailedWatch, reset_given_up
from chunkflow.engines.failures import one_line
from chunkflow.engines.queue_insert import BlockTasks, insert_tasks
from chunkflow.engines.task import STAGE_NAMES, run_task
from chunkflow.errors import QueueError
from chunkflow.job import Job
from chunkflow.planning import load_job
from chunkflow.stages import Resources
from chunkflow.store_layout import done_marker

log = logging.getLogger(__name__)

DEFAULT_LEASE = 120
PROTOCOLS = ("fq://", "sqs://")
#: seconds a task of another job that a worker handed back stays invisible (so its next lease finds another)
HAND_BACK_SECONDS = 2
#: a worker that has leased only other jobs' tasks stops after its lease or this many hand-backs,
#: whichever is longer: two workers of two jobs hide each other's tasks for HAND_BACK_SECONDS at a time
#: (with ``--lease 2`` both once stopped with a task of their job still queued)
FOREIGN_HAND_BACKS = 5
#: seconds between the checkpoints (``summary/stage1``) a waiting barrier writes
SAVE_EVERY_S = 60.0


@dataclass(frozen=True)
class TaskSpec:
    store: str
    job: str
    stage: int
    block: str

    @property
    def label(self) -> str:
        return f"{STAGE_NAMES.get(self.stage, f'stage {self.stage}')} {self.block}"


@queueable
def chunkflow_block(store: str, job: str, stage: int, block: str) -> None:
    """One chunkflow task as python-task-queue stores it; plain ``TaskQueue.poll()`` can run it
    too (without lease renewal: give it a lease longer than any chunk)."""
    spec = TaskSpec(store, job, int(stage), block)
    planned = resolve_job(spec, None, {})
    run_task(planned, spec.stage, block_index(planned, block))


def open_queue(url: str, progress: bool = False, create: bool = False, **kwargs) -> TaskQueue:
    """A ``TaskQueue`` for ``fq://DIR`` or ``sqs://NAME``; QueueError (one line) if it cannot be used.

    An ``fq://`` directory must be absolute; it is created only with ``create`` (``produce`` and
    ``barrier``): workers and ``status`` refuse one that does not hold a queue, instead of making
    an empty queue out of a typo and finding nothing to do. ``kwargs`` go to boto3 for SQS
    (``region_name``, ``endpoint_url``).
    """
    if not isinstance(url, str) or not url.startswith(PROTOCOLS):
        raise QueueError(f"queue {url!r} is not fq:///shared/directory or sqs://NAME")
    if url.startswith("fq://"):
        _check_fq(url, create)
    if url.startswith("sqs://"):
        kwargs.setdefault("region_name", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # task-queue prints its retries
            queue = TaskQueue(url, progress=progress, **kwargs)
            queue.is_empty()  # reach it now: a bad queue fails here, not after work was planned
    except BaseException as err:  # noqa: BLE001 (task-queue raises BaseException subclasses)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise QueueError(f"cannot use queue {url}: {type(err).__name__}: {one_line(err)}") from None
    return queue


def _check_fq(url: str, create: bool) -> None:
    path = url[len("fq://"):]
    if not path or not os.path.isabs(os.path.expanduser(path)):
        raise QueueError(f"queue {url!r}: an fq:// queue is an absolute directory on a shared filesystem, "
                         "e.g. fq:///shared/queue (three slashes)")
    if not create and not os.path.isdir(os.path.join(os.path.expanduser(path), "queue")):
        raise QueueError(f"no queue at {url} ({path} has no queue/ folder): `chunkflow produce` or "
                         "`chunkflow barrier` creates an fq:// queue; check the path")


def check_number(flag: str, value: object, what: str, ok: Callable[[float], bool]) -> None:
    """Fire passes what it cannot parse as a string: refuse it (and bools, NaN) in one line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise QueueError(f"--{flag} {value!r} must be {what}")


def whole(v: object) -> bool:
    return isinstance(v, int) and v >= 1


def produce(job: Job, queue_url: str, stage: int = 1, blocks: list | None = None, force: bool = False,
            progress: bool = False, queue=None, **kwargs) -> int:
    """Insert the tasks of ``stage`` for ``blocks`` (all) not done yet (unless ``force``); returns the count."""
    check_number("stage", stage, "1 or 2", lambda v: isinstance(v, int) and v in (1, 2))
    Resources(job).check_standing()  # before any block is skipped as done
    store = Resources(job).store
    layout = job.layout
    if stage == 2:
        missing = layout.num_blocks - len(done_set(store, 1, job, confirm=True))
        if missing:
            raise QueueError(f"stage one of job {job.job_hash} is not complete ({missing} of {layout.num_blocks} "
                             "blocks not done); `chunkflow barrier` waits for it and then produces stage two")
    queue = queue or open_queue(queue_url, progress=progress, create=True, **kwargs)
    done = None if force else done_set(store, stage, job)
    if blocks is not None:
        names = [layout.block_box(b).name for b in blocks]
        todo: Sequence[str] = [name for name in names if done is None or name not in done]
        chosen: Container[str] = set(todo)
        total = len(names)
    else:  # every block not done: names made a chunk at a time from the bitmap, not a string per block
        pending = BlockSet.full(BlockGrid(layout)) if done is None else ~done
        todo, chosen, total = pending.names(), pending, layout.num_blocks
    tasks = BlockTasks(chunkflow_block, job.store, job.job_hash, stage, todo)
    fresh = reset_given_up(store, stage, chosen)
    if fresh:
        log.info("%d %s blocks given up before are enqueued again with fresh attempts: %s", len(fresh),
                 STAGE_NAMES[stage], ", ".join(fresh[:10]) + (", ..." if len(fresh) > 10 else ""))
    if tasks:
        try:
            insert_tasks(queue, tasks, queue_url, progress=progress)
        except Exception as err:  # noqa: BLE001
            raise QueueError(f"cannot insert into {queue_url}: {one_line(err)}") from None
    log.info("%d %s tasks of job %s into %s (%d already done)", len(tasks), STAGE_NAMES[stage], job.job_hash,
             queue_url, total - len(tasks))
    return len(tasks)


def barrier(job: Job, queue_url: str, poll: float = 5.0, timeout: float | None = None, force: bool = False,
            progress: bool = False, **kwargs) -> int:
    """Wait until every stage-one done marker exists, then produce stage two; returns its task count.

    The done markers are the authority, not the stage-one queue: an empty queue may still
    have leased tasks in flight, and a queue may hold stray duplicates of finished tasks.
    Each poll reads only what changed (:class:`chunkflow.done_log.DoneView`: the done log since
    the last poll); once it counts every block, :func:`produce` lists every done marker before
    it enqueues stage two (LostDoneMarkers, one line, if one is missing). A poll after
    ``SWEEP_AFTER_S`` seconds in which no block finished lists every marker once (a block whose
    log entry its killed worker never wrote). While it waits it logs each failed stage-one block
    (a warning line when first seen, another when it is given up); QueueError (naming them) once
    every block not done is given up, or after ``timeout`` seconds (None: no limit).
    """
    check_number("poll", poll, "a number of seconds above 0", lambda v: v > 0)
    if timeout is not None:
        check_number("timeout", timeout, "a number of seconds, at least 0", lambda v: v >= 0)
    queue = open_queue(queue_url, progress=progress, create=True, **kwargs)
    store = Resources(job).store
    view = DoneView(store, 1, job)
    total = view.grid.size
    watch, started, last = FailedWatch(store, 1), time.monotonic(), -1
    moved, saved = started, -math.inf
    try:
        while True:
            done = view.refresh()
            now = time.monotonic()
            if len(done) != last:
                log.info("barrier: stage one done for %d of %d blocks", len(done), total)
                last, moved = len(done), now
            elif now - moved >= SWEEP_AFTER_S:  # no block finished for a while: list every done marker once
                lost = view.rebuild()
                if lost:
                    raise view.lost_error(lost)
                done, moved = view.done, now
                if len(done) != last:
                    log.info("barrier: stage one done for %d of %d blocks (every done marker listed)", len(done),
                             total)
                    last = len(done)
            if len(done) == total:
                break
            pending = ~done
            for line in watch.update(pending):
                log.warning("barrier: stage one failed for %s", line)
            if watch.covers(pending):
                raise QueueError(f"stage one of job {job.job_hash} cannot complete: {len(pending)} of {total} "
                                 f"blocks were given up: {watch.describe(pending)}; fix the cause, then `chunkflow "
                                 f"produce {job.store} QUEUE` enqueues them again with fresh attempts")
            if timeout is not None and now - started > timeout:
                failed = sorted(b for b in watch.seen if b in pending)
                named = f"; failed: {', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}" if failed else ""
                raise QueueError(f"stage one of job {job.job_hash} is not complete after {timeout:g} s: "
                                 f"{len(pending)} of {total} blocks not done{named} (see `chunkflow status`)")
            if now - saved >= SAVE_EVERY_S:  # the checkpoint: at the first poll, then now and then
                view.save()
                saved = now
            time.sleep(poll)
    finally:
        view.save()  # what this barrier read is the next poller's start, whatever ended it
    return produce(job, queue_url, stage=2, force=force, progress=progress, queue=queue)


def resolve_job(spec: TaskSpec, expected: Job | None, jobs: dict[str, Job]) -> Job:
    """The job a task belongs to, refusing a task of another job or of a manifest changed since."""
    if expected is not None and spec.job != expected.job_hash:
        raise QueueError(f"the task belongs to job {spec.job} ({spec.store}) but this worker serves job "
                         f"{expected.job_hash} ({expected.store}); give the worker that job's queue")
    job = jobs.get(spec.store)
    if job is None:
        job = jobs[spec.store] = expected if expected is not None and expected.store == spec.store else \
            load_job(spec.store)
    if job.job_hash != spec.job:
        raise QueueError(f"the task was produced for job {spec.job} but {spec.store} now holds job "
                         f"{job.job_hash}: the manifest changed after the tasks were produced")
    return job


class JobBinding:
    """The one job a queue worker serves: the job given with ``--job``, or else the job of the first
    task of its own stage that it leases (a worker never mixes jobs; docs/security.md says why).

    Shared by a worker's task slots; :meth:`claim` binds and checks under one lock, so two slots
    leasing tasks of two jobs at once end up serving the same one.
    """

    def __init__(self, job: Job | None = None):
        self.job = job
        self._lock = threading.Lock()
        self._told: set[str] = set()
        self._foreign_since: float | None = None  # since when this worker has leased only other jobs' tasks
        self._checked = 0.0  # when :meth:`nothing_left` last looked at the job's done blocks
        self._views: dict[int, DoneView] = {}  # per stage: the done blocks, read since the last look
        self._view_lock = threading.Lock()

    def claim(self, spec: TaskSpec, jobs: dict[str, Job], bind: bool) -> Job | None:
        """The job of ``spec`` if this worker serves it (binding to it first when unbound and ``bind``),
        None for a task of another job. QueueError or JobError for a task whose job's manifest changed."""
        with self._lock:
            if self.job is None:
                job = resolve_job(spec, None, jobs)
                if bind:
                    self.job = job
                    log.info("this worker serves job %s (%s), the job of its first task; it hands back tasks of "
                             "other jobs", job.job_hash, job.store)
                return job
            if spec.job != self.job.job_hash:
                if self._foreign_since is None:
                    self._foreign_since = time.monotonic()
                return None
            self._foreign_since = None
            return resolve_job(spec, self.job, jobs)

    def hand_back(self, queue, task, spec: TaskSpec) -> None:
        """Give a task of another job back to the queue (invisible for :data:`HAND_BACK_SECONDS`, so
        this worker's next lease finds another task); one warning line per other job."""
        quietly(queue.renew, task, HAND_BACK_SECONDS)
        with self._lock:
            first = spec.job not in self._told
            self._told.add(spec.job)
        if first and self.job is not None:
            log.warning("handing back tasks of job %s (%s): this worker serves job %s (%s) only; give that job "
                        "workers of its own (worker QUEUE --job STORE)", spec.job, spec.store, self.job.job_hash,
                        self.job.store)

    def nothing_left(self, stage: int, lease: float, poll: float) -> bool:
        """Whether a worker without ``--wait``, handing back other jobs' tasks, should stop: its job's
        ``stage`` is complete (every block done or given up; looked at most once per ``poll``), or it
        has leased only other jobs' tasks for ``lease`` seconds (a dead worker's task of its job would
        have come back by then, so this queue holds nothing more for it), and for at least
        :data:`FOREIGN_HAND_BACKS` hand-backs (a task of its job hidden by another job's worker comes
        back after each)."""
        now = time.monotonic()
        patience = max(lease, FOREIGN_HAND_BACKS * HAND_BACK_SECONDS)
        if self._foreign_since is not None and now - self._foreign_since > patience:
            log.info("no task of job %s in %.0f s, only other jobs' tasks: stopping", self.job.job_hash, patience)
            return True
        if now - self._checked < poll:
            return False
        self._checked = now
        if self._finished(stage):
            log.info("job %s is complete for %s; the queue holds other jobs' tasks: stopping", self.job.job_hash,
                     STAGE_NAMES[stage])
            return True
        return False

    def _finished(self, stage: int) -> bool:
        """Every block of ``stage`` done or given up, by this worker's :class:`DoneView` (the checkpoint,
        then the done log since its last look: the cost of what changed, not of the job's size)."""
        with self._view_lock:
            view = self._views.get(stage)
            if view is None:
                view = self._views[stage] = DoneView(Resources(self.job).store, stage, self.job)
            pending = ~view.refresh()
        if not pending:
            return True
        watch = FailedWatch(view.store, stage)
        watch.update(pending)
        return watch.covers(pending)


def other_stage(queue, task, spec: TaskSpec, stage: int, job: Job, wait: bool = False) -> str:
    """A task of the other stage (of ``job``), leased by a worker of ``stage``; what the worker does next.

    "deleted": a stray duplicate of a finished stage-one task, deleted; keep working.
    "handed back" (``wait``): the task is left for the other stage's workers; keep polling.
    "stop": a stage-one worker meets stage two, so stage one is over (the task is handed back).
    Raises QueueError, the task handed back, for a stage-two worker meeting a stage-one task that
    is not done.
    """
    if spec.stage == 1 and Resources(job).store.exists(done_marker(1, spec.block)):
        queue.delete(task)  # a stray duplicate of a finished stage-one task
        return "deleted"
    queue.cancel(task)
    if wait:
        return "handed back"
    if spec.stage == 2:
        return "stop"
    raise QueueError("a stage-one task that is not done: receive_and_blend workers take stage-two tasks, which "
                     "`chunkflow barrier` produces once stage one is complete (or give this worker --wait to "
                     "leave stage-one tasks to inference_and_donate workers)")


def task_spec(task, queue_url: str) -> TaskSpec:
    try:
        kw = task.kwargs
        return TaskSpec(str(kw["store"]), str(kw["job"]), int(kw["stage"]), str(kw["block"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise QueueError(f"{queue_url} holds a task that is not a chunkflow task: {str(task)[:200]}") from None


def block_index(job: Job, name: str) -> Vec:
    try:
        return job.layout.block_index_of(Bbox.from_name(name))
    except ValueError as err:
        raise QueueError(f"task block {name!r}: {err}") from None


def quietly(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001
        log.warning("%s", one_line(err))

