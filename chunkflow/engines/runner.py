"""Run a planned job's stages over its blocks on an engine, with done markers and progress.

The runner knows the order of the stages (barrier: all of stage one, then all of stage two)
and which tasks are already done; it knows nothing of blending. An engine only has to
``map`` a picklable function over tasks and yield ``(task, result)`` pairs as they finish.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from tqdm.auto import tqdm

from chunkflow.bbox import Vec
from chunkflow.job import Job
from chunkflow.stages import Resources, Stats, inference_and_donate, is_done, receive_and_blend

log = logging.getLogger(__name__)


@dataclass
class StageSummary:
    tasks: int = 0
    skipped: int = 0
    seconds: float = 0.0
    stats: Stats = field(default_factory=Stats)


@dataclass
class RunSummary:
    job: Job
    stage1: StageSummary = field(default_factory=StageSummary)
    stage2: StageSummary = field(default_factory=StageSummary)

    def lines(self) -> list[str]:
        layout = self.job.layout
        voxels = layout.bbox.size
        total = self.stage1.seconds + self.stage2.seconds
        rate = voxels / total if total > 0 else float("nan")
        return [
            f"job {self.job.job_hash}: {layout.num_blocks} blocks, {layout.num_patches} patches in the grid, "
            f"{voxels:,} voxels",
            f"stage one: {self.stage1.tasks} tasks run, {self.stage1.skipped} already done, "
            f"{self.stage1.stats.patches} patches computed, {human_bytes(self.stage1.stats.donated_bytes)} donated "
            f"in {self.stage1.stats.donations} pieces, {self.stage1.seconds:.2f} s",
            f"stage two: {self.stage2.tasks} tasks run, {self.stage2.skipped} already done, "
            f"{self.stage2.stats.donations} pieces received, {self.stage2.seconds:.2f} s",
            f"throughput: {rate:,.0f} voxels/s over both stages",
        ]


class _StageTask:
    """A picklable callable running one stage for one block (engines may ship it to workers)."""

    def __init__(self, job: Job, stage: int, cleanup: bool = False):
        self.job, self.stage, self.cleanup = job, stage, cleanup
        self._resources: Resources | None = None

    def __getstate__(self):
        return {"job": self.job, "stage": self.stage, "cleanup": self.cleanup, "_resources": None}

    def __call__(self, block: Vec) -> Stats:
        if self._resources is None:
            self._resources = Resources(self.job)
        if self.stage == 1:
            return inference_and_donate(self.job, block, self._resources)
        return receive_and_blend(self.job, block, self._resources, cleanup=self.cleanup)


def run_stage(job: Job, stage: int, engine, blocks: Iterable[Vec] | None = None, force: bool = False,
              progress: bool = True, cleanup: bool = False) -> StageSummary:
    """Run one stage over ``blocks`` (all blocks by default), skipping finished ones unless ``force``."""
    summary = StageSummary()
    started = time.perf_counter()
    store = Resources(job).store
    todo = []
    for block in (blocks if blocks is not None else job.layout.block_indices()):
        if not force and is_done(store, stage, job.layout.block_box(block)):
            summary.skipped += 1
        else:
            todo.append(block)
    name = "inference-and-donate" if stage == 1 else "receive-and-blend"
    with tqdm(total=len(todo), desc=name, unit="block", disable=not progress, leave=True) as bar:
        for _, stats in engine.map(_StageTask(job, stage, cleanup), todo):
            summary.stats.add(stats)
            summary.tasks += 1
            bar.update(1)
    summary.seconds = time.perf_counter() - started
    return summary


def run_job(job: Job, engine, blocks: list[Vec] | None = None, force: bool = False, progress: bool = True,
            cleanup: bool = False) -> RunSummary:
    """Barrier mode: stage one over every block, then stage two over every block."""
    summary = RunSummary(job)
    summary.stage1 = run_stage(job, 1, engine, blocks, force, progress)
    summary.stage2 = run_stage(job, 2, engine, blocks, force, progress, cleanup)
    return summary


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
