"""Stage entry points for fleets: ``inference_and_donate.py`` and ``receive_and_blend.py``.

Each has two commands::

    python inference_and_donate.py run JOB --blocks all --device cuda:0     blocks of a job, here
    python inference_and_donate.py worker QUEUE [--job JOB] [--wait]        lease tasks from a queue
    python receive_and_blend.py run JOB --blocks 0-128_0-128_0-16,128-256_0-128_0-16
    python receive_and_blend.py worker QUEUE

``python inference_and_donate.py JOB ...`` (no command) still means ``run``
(:func:`chunkflow.cli.stage_args._means_run`).
"""
from __future__ import annotations

import inspect
import logging
import signal
import sys
from collections.abc import Callable

import fire

from chunkflow.bbox import Bbox, Vec
from chunkflow.cli.common import setup_logging, user_errors
from chunkflow.cli.stage_args import FOREIGN_FLAGS, _means_run, check_command_line
from chunkflow.cli.stage_two_guard import require_stage_one
from chunkflow.job import Job, JobError
from chunkflow.planning import load_job
from chunkflow.units import count

log = logging.getLogger(__name__)

SCRIPTS = {1: "inference_and_donate.py", 2: "receive_and_blend.py"}


def select_blocks(job: Job, blocks) -> list[Vec] | None:
    """``all`` -> None (every block); otherwise block names ``x0-x1_y0-y1_z0-z1`` (comma or list)."""
    if blocks in (None, "all"):
        return None
    example = job.layout.block_box(Vec(0, 0, 0)).name
    if isinstance(blocks, str):
        names = [b for b in blocks.replace(";", ",").split(",") if b.strip()]
    elif isinstance(blocks, (list, tuple)):
        names = [str(b) for b in blocks]
    else:
        raise JobError(f"--blocks {blocks!r} is not 'all' or a list of block names like {example}")
    if not names:
        raise JobError(f"--blocks {blocks!r} selects no block; give 'all' or block names like {example}")
    selected = []
    for name in names:
        try:
            box = Bbox.from_name(name)
        except ValueError as err:
            raise JobError(f"--blocks {name!r}: {err}; use 'all' or names like {job.layout.block_box(Vec(0, 0, 0)).name}") from None
        selected.append(job.layout.block_index_of(box))
    return selected


RUN_ARGS = {
    "job": "the job's store (the --donations location given to `chunkflow plan`).",
    "blocks": "'all' or block names x0-x1_y0-y1_z0-z1 separated by commas.",
    "device": "cpu, cuda or cuda:N (default: the job's).",
    "batch_size": "patches per forward pass (default: the job's).",
    "force": "rerun blocks that are already done.",
    "cleanup": "delete each block's donations after it is written, and the leftover donations of blocks "
               "already done (late duplicates of their donors).",
    "quiet": "no progress bar.",
}
RUN_NOTE = """Every selected block is tried: a block that fails (e.g. its donations are missing or
corrupt) is reported in one line at the end and the exit status is non-zero (2, or 1 if
a block failed unexpectedly)."""
#: what stage two's ``run`` adds to RUN_NOTE
STAGE_TWO_NOTE = """

Stage two first checks that stage one is done for every block the selected blocks depend on;
if not, it is refused in one line (exit 2, --force or not) and nothing is written."""

#: per stage, the flags of the other stage's ``run`` and why this stage refuses them
OTHER_STAGE_FLAGS: dict[int, dict[str, str]] = {
    1: {"cleanup": "--cleanup is a stage-two flag (receive_and_blend deletes the donations it consumed)"},
    2: {name: f"--{name.replace('_', '-')} is a stage-one flag (inference_and_donate runs the network)"
        for name in ("device", "batch_size")},
}

def run_command(stage: int) -> Callable[..., None]:
    """The ``run`` command of a stage script: stage one takes --device/--batch-size, stage two
    --cleanup; a flag of the other stage is refused in one line by :func:`check_command_line`."""
    if stage == 1:
        def run(job: str, blocks: str = "all", device: str | None = None, batch_size: int | None = None,
                force: bool = False, quiet: bool = False) -> None:
            _run_blocks(1, job, blocks, device=device, batch_size=batch_size, force=force, quiet=quiet)
    else:
        def run(job: str, blocks: str = "all", force: bool = False, cleanup: bool = False,
                quiet: bool = False) -> None:
            _run_blocks(2, job, blocks, force=force, cleanup=cleanup, quiet=quiet)
    names = inspect.signature(run).parameters
    run.__doc__ = (f"Run stage {'one' if stage == 1 else 'two'} for blocks of a planned job, in this process.\n\n"
                   "Args:\n" + "".join(f"    {n}: {RUN_ARGS[n]}\n" for n in names) + "\n" + RUN_NOTE
                   + (STAGE_TWO_NOTE if stage == 2 else ""))
    command = user_errors(run)
    FOREIGN_FLAGS[command] = OTHER_STAGE_FLAGS[stage]
    return command


def _run_blocks(stage: int, job: str, blocks: str, device: str | None = None, batch_size: int | None = None,
                force: bool = False, cleanup: bool = False, quiet: bool = False) -> None:
    from chunkflow.engines import LocalEngine, run_stage
    from chunkflow.engines.failures import exit_status

    setup_logging(quiet)
    planned = load_job(job).with_runtime(device=device, batch_size=batch_size)
    selected = select_blocks(planned, blocks)
    if stage == 1:
        from chunkflow.backends import require_device, verify_model

        require_device(planned.device)  # before any block's markers are written
        verify_model(planned.model, planned.weights, planned.model_checksum)  # and the model is the planned one
    else:
        require_stage_one(planned, selected, job)  # before any block's markers are written, --force or not
    summary = run_stage(planned, stage, LocalEngine(), selected, force=force,
                        progress=not quiet, cleanup=cleanup, check=False)
    work = count(summary.stats.patches, "patch", "patches") if stage == 1 else \
        f"{count(summary.stats.donations, 'piece')} received"
    print(f"stage {'one' if stage == 1 else 'two'}: {count(summary.tasks, 'block')} run, {summary.skipped} already "
          f"done, {work}, {summary.seconds:.2f} s{summary.counts()}")
    if summary.swept:
        print(f"cleanup: {count(summary.swept, 'leftover donation')} of finished blocks removed")
    if summary.stats.filled_chunks:
        print(f"input: {count(summary.stats.filled_chunks, 'missing chunk')} read as zeros (--fill-missing)")
    report_failures([f.line() for f in summary.failures], exit_status(summary.failures))


def report_failures(lines: list[str], status: int) -> None:
    """Every failed task in one line on stderr, then exit with ``status`` (2: refusals only, 1: a
    task failed unexpectedly); nothing when no task failed."""
    for line in lines:
        print(f"chunkflow: error: {line}", file=sys.stderr)
    if status:
        sys.exit(status)


WORKER_DOC = """Lease this stage's tasks from QUEUE and run them until the queue is empty.

A task that was leased by a worker that died comes back when its lease runs out; this
worker waits for it while others hold leases. A task that fails is handed back for another
attempt and the worker goes on; after --max-attempts it is given up (deleted from the
queue, its failed marker kept), and this worker exits 2 at the end (1 if the last error of
a task given up was a bug), one line per task given up.

A worker serves one job: --job's, or else the job of the first task of its stage that it
leases (it binds itself to that job). A task of another job is handed back to the queue at
once, with one warning line per job; without --wait, a worker that then finds only other
jobs' tasks stops once its own job's stage is complete. Exits 2 at once on a task whose
job's manifest changed after the tasks were produced.
"""
WORKER_ARGS = {
    "queue": "fq:///shared/dir or sqs://NAME (region AWS_DEFAULT_REGION, endpoint AWS_ENDPOINT_URL_SQS).",
    "job": "serve only this job (its store); default: the job of the first task leased. Tasks of any other job "
           "are handed back (docs/security.md).",
    "lease": "seconds a task stays invisible to others; renewed every lease/3 s while it runs, so it only bounds "
             "how soon a dead worker's task comes back.",
    "wait": "keep polling when the queue is empty (a long-lived fleet worker).",
    "poll": "seconds between polls of an empty queue.",
    "force": "rerun tasks whose block is already done.",
    "cleanup": "delete each block's donations after it is written, and the leftover donations of a block "
               "already done when its task is leased again.",
    "max_tasks": "stop after this many tasks (attempts that failed included).",
    "device": "cpu, cuda or cuda:N (default: the job's; one worker per GPU).",
    "batch_size": "patches per forward pass (default: the job's).",
    "max_attempts": "attempts of a task (counted across workers, killed ones included) before it is given up.",
    "slots": "task slots of this worker (default 2 for stage one, whose blocks it pipelines: up to 2 per slot at "
             "once, one reading or on the model, one writing behind it; 1 runs one block at a time, reading the "
             "next ahead, for the least memory; default 1 for stage two).",
    "quiet": "log warnings only.",
}


def worker_command(stage: int):
    """The ``worker`` command of a stage script: stage one takes --device/--batch-size, stage two
    --cleanup; a flag of the other stage is refused in one line by :func:`check_command_line`."""
    if stage == 1:
        def worker(queue: str, job: str | None = None, lease: int = 120, wait: bool = False, poll: float = 2.0,
                   force: bool = False, max_tasks: int | None = None, device: str | None = None,
                   batch_size: int | None = None, max_attempts: int = 3, slots: int | None = None,
                   quiet: bool = False) -> None:
            _work(1, queue, job, lease, wait, poll, force, False, max_tasks, device, batch_size, max_attempts,
                  slots, quiet)
    else:
        def worker(queue: str, job: str | None = None, lease: int = 120, wait: bool = False, poll: float = 2.0,
                   force: bool = False, cleanup: bool = False, max_tasks: int | None = None, max_attempts: int = 3,
                   slots: int | None = None, quiet: bool = False) -> None:
            _work(2, queue, job, lease, wait, poll, force, cleanup, max_tasks, None, None, max_attempts, slots,
                  quiet)
    names = inspect.signature(worker).parameters
    worker.__doc__ = WORKER_DOC + "\nArgs:\n" + "".join(f"    {n}: {WORKER_ARGS[n]}\n" for n in names)
    command = user_errors(worker)
    FOREIGN_FLAGS[command] = OTHER_STAGE_FLAGS[stage]
    return command


def _work(stage: int, queue: str, job: str | None, lease: int, wait: bool, poll: float, force: bool, cleanup: bool,
          max_tasks: int | None, device: str | None, batch_size: int | None, max_attempts: int, slots: int | None,
          quiet: bool) -> None:
    from chunkflow.engines.queue_worker import work

    setup_logging(quiet)
    signal.signal(signal.SIGTERM, _terminate)
    summary = work(queue, stage, job_store=job, lease=lease, wait=wait, poll=poll, force=force, max_tasks=max_tasks,
                   device=device, batch_size=batch_size, cleanup=cleanup, max_attempts=max_attempts, slots=slots)
    print(summary.line())
    report_failures(summary.given_up, summary.exit_status())


def _terminate(signum, frame) -> None:
    """SIGTERM (Kubernetes, SLURM preemption): unwind, so the leased task is handed back at once."""
    sys.exit(128 + signum)


def main(stage: int, argv: list[str] | None = None) -> None:
    """Fire entry point of a stage script; a first argument that is no command means ``run``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command(stage), "worker": worker_command(stage)}
    if _means_run(argv, list(commands)):
        argv.insert(0, "run")
    fire.Fire(commands, command=check_command_line(commands, argv, SCRIPTS[stage]), name=SCRIPTS[stage])


inference_and_donate = run_command(1)
receive_and_blend = run_command(2)
