"""Stage entry points for fleets: ``inference_and_donate.py`` and ``receive_and_blend.py``.

Each has two commands::

    python inference_and_donate.py run JOB --blocks all --device cuda:0     blocks of a job, here
    python inference_and_donate.py worker QUEUE [--job JOB] [--wait]        lease tasks from a queue
    python receive_and_blend.py run JOB --blocks 0-128_0-128_0-16,128-256_0-128_0-16
    python receive_and_blend.py worker QUEUE

``python inference_and_donate.py JOB ...`` (no command) still means ``run``.
"""
from __future__ import annotations

import functools
import logging
import signal
import sys

import fire

from chunkflow.bbox import Bbox, Vec
from chunkflow.job import Job, JobError
from chunkflow.planning import load_job

log = logging.getLogger(__name__)

SCRIPTS = {1: "inference_and_donate.py", 2: "receive_and_blend.py"}


def user_errors(fn):
    """``chunkflow.cli.user_errors``, looked up when called (chunkflow.cli imports this module's users)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from chunkflow.cli import user_errors as wrap

        return wrap(fn)(*args, **kwargs)
    return wrapper


def setup_logging(quiet: bool = False) -> None:
    from chunkflow.cli import setup_logging as setup

    setup(quiet)


def select_blocks(job: Job, blocks) -> list[Vec] | None:
    """``all`` -> None (every block); otherwise block names ``x0-x1_y0-y1_z0-z1`` (comma or list)."""
    if blocks in (None, "all"):
        return None
    if isinstance(blocks, str):
        names = [b for b in blocks.replace(";", ",").split(",") if b]
    else:
        names = [str(b) for b in blocks]
    selected = []
    for name in names:
        try:
            box = Bbox.from_name(name)
        except ValueError as err:
            raise JobError(f"--blocks {name!r}: {err}; use 'all' or names like {job.layout.block_box(Vec(0, 0, 0)).name}") from None
        selected.append(job.layout.block_index_of(box))
    return selected


def run_command(stage: int):
    @user_errors
    def run(job: str, blocks: str = "all", device: str | None = None, batch_size: int | None = None,
            force: bool = False, cleanup: bool = False, quiet: bool = False) -> None:
        """Run this stage for blocks of a planned job, in this process.

        Args:
            job: the job's store (the --donations location given to `chunkflow plan`).
            blocks: 'all' or block names x0-x1_y0-y1_z0-z1 separated by commas.
            device: cpu, cuda or cuda:N (default: the job's).
            batch_size: patches per forward pass (default: the job's).
            force: rerun blocks that are already done.
            cleanup: (stage two) delete each block's donations after it is written.
            quiet: no progress bar.
        """
        from chunkflow.engines import LocalEngine, run_stage

        setup_logging(quiet)
        planned = load_job(job).with_runtime(device=device, batch_size=batch_size)
        summary = run_stage(planned, stage, LocalEngine(), select_blocks(planned, blocks), force=force,
                            progress=not quiet, cleanup=cleanup)
        print(f"stage {'one' if stage == 1 else 'two'}: {summary.tasks} blocks run, {summary.skipped} already done, "
              f"{summary.stats.patches} patches, {summary.seconds:.2f} s")
    return run


def worker_command(stage: int):
    @user_errors
    def worker(queue: str, job: str | None = None, lease: int = 120, wait: bool = False, poll: float = 2.0,
               force: bool = False, max_tasks: int | None = None, device: str | None = None,
               batch_size: int | None = None, quiet: bool = False) -> None:
        """Lease this stage's tasks from QUEUE and run them until the queue is empty.

        A task that was leased by a worker that died comes back when its lease runs out; this
        worker waits for it while others hold leases. Exits 2 on a task of another job.

        Args:
            queue: fq:///shared/dir or sqs://NAME (region AWS_DEFAULT_REGION, endpoint AWS_ENDPOINT_URL_SQS).
            job: serve only this job (its store); tasks of any other job are refused.
            lease: seconds a task stays invisible to others; renewed every lease/3 s while it runs,
                so it only bounds how soon a dead worker's task comes back.
            wait: keep polling when the queue is empty (a long-lived fleet worker).
            poll: seconds between polls of an empty queue.
            force: rerun tasks whose block is already done.
            max_tasks: stop after this many tasks.
            device: cpu, cuda or cuda:N (default: the job's; one worker per GPU).
            batch_size: patches per forward pass (default: the job's).
            quiet: log warnings only.
        """
        from chunkflow.engines.queue import work

        setup_logging(quiet)
        signal.signal(signal.SIGTERM, _terminate)
        summary = work(queue, stage, job_store=job, lease=lease, wait=wait, poll=poll, force=force,
                       max_tasks=max_tasks, device=device, batch_size=batch_size)
        print(summary.line())
    return worker


def _terminate(signum, frame) -> None:
    """SIGTERM (Kubernetes, SLURM preemption): unwind, so the leased task is handed back at once."""
    sys.exit(128 + signum)


def main(stage: int, argv: list[str] | None = None) -> None:
    """Fire entry point of a stage script; a first argument that is no command means ``run``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command(stage), "worker": worker_command(stage)}
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv.insert(0, "run")
    fire.Fire(commands, command=argv, name=SCRIPTS[stage])


inference_and_donate = run_command(1)
receive_and_blend = run_command(2)
