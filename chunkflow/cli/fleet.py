"""``chunkflow produce``, ``chunkflow barrier`` and ``chunkflow status``: driving a fleet.

See docs/fleet.md. Workers are ``python inference_and_donate.py worker QUEUE`` and
``python receive_and_blend.py worker QUEUE``.
"""
from __future__ import annotations

import json as jsonlib

from chunkflow.cli.stages import select_blocks, setup_logging, user_errors
from chunkflow.engines.base import EngineError
from chunkflow.planning import load_job


def _queue_module():
    try:
        from chunkflow.engines import queue
    except ImportError:
        raise EngineError("task queues need python-task-queue: pip install 'chunkflow[queue]'") from None
    return queue


@user_errors
def produce(job: str, queue: str, stage: int = 1, blocks: str = "all", force: bool = False,
            quiet: bool = False) -> None:
    """Insert the stage-one tasks of a planned job into a queue (blocks already done are skipped).

    Args:
        job: the job's store (the --donations location given to `chunkflow plan`).
        queue: fq:///shared/dir or sqs://NAME (region AWS_DEFAULT_REGION, endpoint AWS_ENDPOINT_URL_SQS).
        stage: 1, or 2 once stage one is complete (`chunkflow barrier` waits for that, then produces 2).
        blocks: 'all' or block names x0-x1_y0-y1_z0-z1 separated by commas.
        force: also produce tasks of blocks that are done (give the workers --force too: a task does not carry it).
        quiet: less output.
    """
    setup_logging(quiet)
    planned = load_job(job)
    count = _queue_module().produce(planned, queue, stage=stage, blocks=select_blocks(planned, blocks),
                                    force=force, progress=not quiet)
    print(f"{count} stage-{'one' if stage == 1 else 'two'} tasks of job {planned.job_hash} in {queue}")


@user_errors
def barrier(job: str, queue: str, poll: float = 5.0, timeout: float | None = None, force: bool = False,
            quiet: bool = False) -> None:
    """Wait until stage one of every block is done, then produce the stage-two tasks into QUEUE.

    Done means the block's done marker exists: an empty stage-one queue is not enough (its last
    tasks may still be leased by workers, or be about to come back from a dead one). Failed
    blocks are reported while it waits (one line each when first seen, one more when the workers
    give the block up); once every block not done is given up, it exits 2 naming them.

    Args:
        job: the job's store.
        queue: where the stage-two tasks go (may be the stage-one queue, or another one).
        poll: seconds between checks.
        timeout: give up (exit 2, naming the failed blocks) after this many seconds; default: no limit.
        force: also produce tasks of blocks whose stage two is done.
        quiet: less output.
    """
    setup_logging(quiet)
    planned = load_job(job)
    count = _queue_module().barrier(planned, queue, poll=poll, timeout=timeout, force=force, progress=not quiet)
    print(f"stage one complete; {count} stage-two tasks of job {planned.job_hash} in {queue}")


@user_errors
def status(job: str, queue: str | None = None, json: bool = False) -> None:
    """Per stage: blocks total, done, running, failed, and an ETA; with --queue, the queue's counters.

    Also one line per failed block (which attempt, the error, whether the workers gave it up) and
    the running blocks whose worker stopped renewing its lease: "stale (worker probably dead)".

    Args:
        job: the job's store.
        queue: also report this queue's counters (enqueued, leased; inserted and completed for fq://).
        json: print one JSON object instead of a table.
    """
    from chunkflow.status import format_status, job_status

    if queue:
        _queue_module()
    report = job_status(load_job(job), queue)
    if json:
        print(jsonlib.dumps(report, sort_keys=True))
    else:
        print("\n".join(format_status(report)))
