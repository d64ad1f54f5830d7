"""Stage entry points for fleets: ``inference_and_donate.py`` and ``receive_and_blend.py``.

Each runs its stage for one block, a list of blocks, or every block of a planned job::

    python inference_and_donate.py JOB --blocks all --device cuda:0
    python receive_and_blend.py JOB --blocks 0-128_0-128_0-16,128-256_0-128_0-16
"""
from __future__ import annotations

import logging

from chunkflow.bbox import Bbox, Vec
from chunkflow.cli import setup_logging, user_errors
from chunkflow.engines import LocalEngine, run_stage
from chunkflow.job import Job, JobError
from chunkflow.planning import load_job

log = logging.getLogger(__name__)


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


def stage_command(stage: int):
    @user_errors
    def command(job: str, blocks: str = "all", device: str | None = None, batch_size: int | None = None,
                force: bool = False, cleanup: bool = False, quiet: bool = False) -> None:
        """Run this stage for blocks of a planned job.

        Args:
            job: the job's store (the --donations location given to `chunkflow plan`).
            blocks: 'all' or block names x0-x1_y0-y1_z0-z1 separated by commas.
            device: cpu, cuda or cuda:N (default: the job's).
            batch_size: patches per forward pass (default: the job's).
            force: rerun blocks that are already done.
            cleanup: (stage two) delete each block's donations after it is written.
            quiet: no progress bar.
        """
        setup_logging(quiet)
        planned = load_job(job).with_runtime(device=device, batch_size=batch_size)
        summary = run_stage(planned, stage, LocalEngine(), select_blocks(planned, blocks), force=force,
                            progress=not quiet, cleanup=cleanup)
        print(f"stage {'one' if stage == 1 else 'two'}: {summary.tasks} blocks run, {summary.skipped} already done, "
              f"{summary.stats.patches} patches, {summary.seconds:.2f} s")
    command.__name__ = "inference_and_donate" if stage == 1 else "receive_and_blend"
    return command


inference_and_donate = stage_command(1)
receive_and_blend = stage_command(2)
