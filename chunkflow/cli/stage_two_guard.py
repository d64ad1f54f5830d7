"""Stage two's per-block command refuses, in one line and before anything is written, while stage
one is not done for the blocks it depends on (``python -m receive_and_blend run JOB``)."""
from __future__ import annotations

from chunkflow.bbox import Vec
from chunkflow.job import Job, JobError
from chunkflow.units import count

__all__ = ["PROBED", "require_stage_one"]

#: blocks whose done marker is checked one by one when the done log does not count them done
PROBED = 256


def require_stage_one(job: Job, selected: list[Vec] | None, job_text: str) -> None:
    """Refuse in one line a stage-two run of ``selected`` (None: every block) when stage one is not
    done for every block they depend on, before anything is written.

    Stage one's done blocks are read as ``chunkflow status`` reads them: the done checkpoint and the
    done log since it (one listing of each, a listing of the done markers only without a checkpoint),
    then the done markers of at most PROBED blocks the log does not count (a worker killed between its
    done marker and its log entry); the checkpoint is not written back. So the check costs the selected
    blocks plus the done log, not a listing per block."""
    from chunkflow.block_set import BlockGrid, BlockSet
    from chunkflow.done_log import DoneView
    from chunkflow.storage import open_store

    grid = BlockGrid(job.layout)
    needed = BlockSet.full(grid) if selected is None else BlockSet(grid)
    for block in selected or ():
        for dependency in job.layout.dependencies(block):
            needed.bits[grid.flat_of(dependency)] = True
    view = DoneView(open_store(job.store), 1, job, grid)
    missing = needed - view.refresh()
    if missing and len(missing) <= PROBED:
        view.probe(missing)
        missing = needed - view.done
    if missing:
        depended = f"the {count(len(needed), 'block')} of the job" if selected is None else \
            f"the {count(len(needed), 'block')} the selected blocks depend on"
        raise JobError(f"stage one is not done for {len(missing)} of {depended} (first: {missing.first(1)[0]}); "
                       f"run stage one first (python -m inference_and_donate run {job_text}; for a fleet, "
                       f"chunkflow barrier {job_text} QUEUE waits for it)")
