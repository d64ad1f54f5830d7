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
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial

from taskqueue import QueueEmptyError, TaskQueue, queueable

from chunkflow.bbox import Bbox
from chunkflow.engines.base import EngineError
from chunkflow.engines.failures import one_line
from chunkflow.engines.lease import LeaseKeeper as _LeaseKeeper, lease_ahead
from chunkflow.engines.runner import done_blocks
from chunkflow.engines.task import STAGE_NAMES, TaskResult, run_task
from chunkflow.job import Job, JobError
from chunkflow.planning import load_job
from chunkflow.stages import Resources, Stats

log = logging.getLogger(__name__)

DEFAULT_LEASE = 120
PROTOCOLS = ("fq://", "sqs://")


class QueueError(EngineError):
    """A queue that cannot be used, or a task this worker must not run; one line."""


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
    run_task(planned, spec.stage, _block_index(planned, block))


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


def _check_number(flag: str, value, what: str, ok) -> None:
    """Fire passes what it cannot parse as a string: refuse it (and bools, NaN) in one line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise QueueError(f"--{flag} {value!r} must be {what}")


def _whole(v) -> bool:
    return isinstance(v, int) and v >= 1


def produce(job: Job, queue_url: str, stage: int = 1, blocks: list | None = None, force: bool = False,
            progress: bool = False, queue=None, **kwargs) -> int:
    """Insert the tasks of ``stage`` for ``blocks`` (all) not done yet (unless ``force``); returns the count."""
    _check_number("stage", stage, "1 or 2", lambda v: isinstance(v, int) and v in (1, 2))
    store = Resources(job).store
    layout = job.layout
    if stage == 2:
        missing = layout.num_blocks - len(done_blocks(store, 1) & _all_names(job))
        if missing:
            raise QueueError(f"stage one of job {job.job_hash} is not complete ({missing} of {layout.num_blocks} "
                             "blocks not done); `chunkflow barrier` waits for it and then produces stage two")
    queue = queue or open_queue(queue_url, progress=progress, create=True, **kwargs)
    done = set() if force else done_blocks(store, stage)
    names = [layout.block_box(b).name for b in (blocks if blocks is not None else layout.block_indices())]
    tasks = [partial(chunkflow_block, store=job.store, job=job.job_hash, stage=stage, block=name)
             for name in names if name not in done]
    if tasks:
        try:
            queue.insert(tasks, total=len(tasks))
        except Exception as err:  # noqa: BLE001
            raise QueueError(f"cannot insert into {queue_url}: {one_line(err)}") from None
    log.info("%d %s tasks of job %s into %s (%d already done)", len(tasks), STAGE_NAMES[stage], job.job_hash,
             queue_url, len(names) - len(tasks))
    return len(tasks)


def barrier(job: Job, queue_url: str, poll: float = 5.0, timeout: float | None = None, force: bool = False,
            progress: bool = False, **kwargs) -> int:
    """Wait until every stage-one done marker exists, then produce stage two; returns its task count.

    The done markers are the authority, not the stage-one queue: an empty queue may still
    have leased tasks in flight, and a queue may hold stray duplicates of finished tasks.
    """
    _check_number("poll", poll, "a number of seconds above 0", lambda v: v > 0)
    if timeout is not None:
        _check_number("timeout", timeout, "a number of seconds, at least 0", lambda v: v >= 0)
    queue = open_queue(queue_url, progress=progress, create=True, **kwargs)
    store, names = Resources(job).store, _all_names(job)
    started, last = time.monotonic(), -1
    while True:
        done = len(done_blocks(store, 1) & names)
        if done != last:
            log.info("barrier: stage one done for %d of %d blocks", done, len(names))
            last = done
        if done == len(names):
            break
        if timeout is not None and time.monotonic() - started > timeout:
            raise QueueError(f"stage one of job {job.job_hash} is not complete after {timeout:g} s: "
                             f"{len(names) - done} of {len(names)} blocks not done (see `chunkflow status`)")
        time.sleep(poll)
    return produce(job, queue_url, stage=2, force=force, progress=progress, queue=queue)


@dataclass
class WorkerSummary:
    stage: int
    tasks: int = 0
    skipped: int = 0
    retries: int = 0
    seconds: float = 0.0
    stats: Stats = field(default_factory=Stats)
    swept: int = 0  # leftover donations of finished blocks removed (--cleanup)

    def line(self) -> str:
        swept = f", {self.swept} leftover donations of finished blocks removed" if self.swept else ""
        return (f"{STAGE_NAMES[self.stage]} worker: {self.tasks} tasks run, {self.skipped} skipped (already done), "
                f"{self.retries} retries of tasks a dead worker left, {self.stats.patches} patches, "
                f"{self.seconds:.1f} s{swept}")


def work(queue_url: str, stage: int, job_store: str | None = None, lease: float = DEFAULT_LEASE,
         wait: bool = False, poll: float = 2.0, force: bool = False, max_tasks: int | None = None,
         device: str | None = None, batch_size: int | None = None, cleanup: bool = False,
         lookahead: bool = True, **kwargs) -> WorkerSummary:
    """Lease and run ``stage`` tasks until the queue is empty (or forever with ``wait``).

    "Empty" counts leased tasks too: a worker that finds nothing to lease while others hold
    leases keeps polling, so it picks up the task of a worker that died. With ``job_store``
    the worker serves that job only and refuses tasks of any other. A task of the other stage
    ends a worker without ``wait`` (see :func:`_other_stage`); with ``wait`` it is handed back
    for the other stage's workers and this one keeps polling. ``cleanup`` (stage two): delete a
    block's donations once it is written, and the leftovers of a block already done.

    ``lookahead`` (stage one): lease the next task before running this one, so its input is read
    while this one computes (:func:`~chunkflow.engines.lease.lease_ahead`); at most ``max_tasks``
    leases in all.
    """
    if stage not in (1, 2):
        raise QueueError(f"stage {stage!r} is not 1 or 2")
    if cleanup and stage != 2:
        raise QueueError("--cleanup deletes the donations stage two consumed: give it to `receive_and_blend "
                         "worker`, not to inference_and_donate")
    _check_number("lease", lease, "a number of seconds, at least 1", lambda v: v >= 1)
    _check_number("poll", poll, "a number of seconds above 0", lambda v: v > 0)
    if max_tasks is not None:
        _check_number("max-tasks", max_tasks, "a whole number, at least 1", _whole)
    if batch_size is not None:
        _check_number("batch-size", batch_size, "a whole number, at least 1", _whole)
    queue = open_queue(queue_url, **kwargs)
    expected = load_job(job_store) if job_store else None
    jobs: dict[str, Job] = {}
    runtime: dict[str, Job] = {}
    summary, started, empty, handed_back = WorkerSummary(stage), time.perf_counter(), 0, False
    ahead = None  # the task leased ahead of the current one: the next one this loop takes up
    try:
        while max_tasks is None or summary.tasks + summary.skipped < max_tasks:
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
            spec = _spec(task, queue_url)
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
            except (QueueError, JobError) as err:
                queue.cancel(task)
                raise QueueError(f"{spec.label} from {queue_url}: {err}") from None
            if job.job_hash not in runtime:
                runtime[job.job_hash] = job.with_runtime(device=device, batch_size=batch_size)
            job = runtime[job.job_hash]
            upcoming = None
            if lookahead and stage == 1 and (max_tasks is None or summary.tasks + summary.skipped + 2 <= max_tasks):
                ahead, upcoming = lease_ahead(queue, lease, partial(_prefetchable, spec, expected, jobs, queue_url))
            result = _run_leased(queue, task, job, spec, lease, force, cleanup, ahead, upcoming)
            summary.swept += result.swept
            if result.skipped:
                summary.skipped += 1
            else:
                summary.tasks += 1
                summary.retries += result.attempt - 1
                summary.stats.add(result.stats)
    except BaseException:
        if ahead is not None:  # not run: hand it back at once (the current task is handled by _run_leased)
            _quietly(queue.cancel, ahead)
        raise
    summary.seconds = time.perf_counter() - started
    return summary


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


def _prefetchable(current: TaskSpec, expected: Job | None, jobs: dict[str, Job], queue_url: str, task):
    """The block of ``task`` (leased ahead) to prefetch while ``current`` runs: a stage-one task of
    the same job that :func:`resolve_job` accepts; else None, and the worker loop takes it up
    after the current task as if it had leased it then (hands it back, refuses it, stops)."""
    spec = _spec(task, queue_url)
    if spec.stage != current.stage or (spec.store, spec.job) != (current.store, current.job):
        return None
    return _block_index(resolve_job(spec, expected, jobs), spec.block)


def _run_leased(queue, task, job: Job, spec: TaskSpec, lease: float, force: bool,
                cleanup: bool = False, ahead=None, upcoming=None) -> TaskResult:
    """Run a leased task, delete it once done; ``ahead``: a task leased ahead whose lease is kept
    too, ``upcoming`` its block, whose input is read while this one computes."""
    keeper = _LeaseKeeper(queue, task, lease, also=() if ahead is None else (ahead,))
    keeper.start()
    t = time.perf_counter()
    try:
        result = run_task(job, spec.stage, _block_index(job, spec.block), force=force, cleanup=cleanup,
                          prefetch_next=upcoming)
    except BaseException as err:
        keeper.stop()
        if not isinstance(err, Exception):  # interrupted (SIGTERM, Ctrl-C): hand the task back now
            _quietly(queue.cancel, task)
        else:  # a failing task is not deleted: it comes back when its lease runs out
            log.error("%s failed: %s", spec.label, one_line(err))
        raise
    keeper.stop()
    queue.delete(task, tally=True)
    if not result.skipped:
        log.info("%s done in %.1f s%s", spec.label, time.perf_counter() - t,
                 f" (attempt {result.attempt})" if result.attempt > 1 else "")
    return result


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
        _quietly(queue.cancel, task)
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


def _spec(task, queue_url: str) -> TaskSpec:
    try:
        kw = task.kwargs
        return TaskSpec(str(kw["store"]), str(kw["job"]), int(kw["stage"]), str(kw["block"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise QueueError(f"{queue_url} holds a task that is not a chunkflow task: {str(task)[:200]}") from None


def _block_index(job: Job, name: str):
    try:
        return job.layout.block_index_of(Bbox.from_name(name))
    except ValueError as err:
        raise QueueError(f"task block {name!r}: {err}") from None


def _all_names(job: Job) -> set[str]:
    return {job.layout.block_box(b).name for b in job.layout.block_indices()}


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001
        log.warning("%s", one_line(err))
