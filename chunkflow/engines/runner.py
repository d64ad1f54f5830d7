"""Run a planned job's stages over its blocks on an engine, with done markers and progress.

The runner knows the order of the stages and which tasks are already done; it knows
nothing of blending. Two orders:

- ``barrier``: stage one over every block, then stage two over every block;
- ``streaming``: stage two of a block runs as soon as stage one of the blocks it depends on
  (``Layout.dependencies``: its donors and itself) is done, so blocks become final while
  inference still runs elsewhere.

A block whose done marker exists is skipped unless ``force`` (so a rerun resumes); with
``cleanup``, stage two removes the leftover donations of such blocks (late duplicates of a donor).

A task that fails does not stop the others: its block, stage and one-line error are collected
in the summary (``failures``; see :mod:`chunkflow.engines.failures`). In barrier order stage two
does not start if any stage-one task failed; in streaming order a block's stage two is not run if
stage one of a block it depends on failed. With ``check`` (the default of the functions here) the
first failure is raised once everything that could run has run; ``chunkflow run`` and the stage
scripts pass ``check=False`` and report every failure in one line each.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

from tqdm.auto import tqdm

from chunkflow.units import count, human_bytes
from chunkflow.bbox import Vec
from chunkflow.block_set import BlockSet
from chunkflow.done_log import done_set
from chunkflow.engines.base import EngineError, MODES, check_options, make_engine
from chunkflow.errors import Interrupted
from chunkflow.engines.failures import Failed, NotRun, TaskFailure, debugging, exit_status
from chunkflow.engines.task import STAGE_NAMES, StageTask, TaskResult, sweep_leftovers
from chunkflow.job import Job
from chunkflow.masking import masked_names
from chunkflow.stages import Resources, Stats
from chunkflow.storage import ObjectStore
from chunkflow.store_layout import DONE, marker_prefix

log = logging.getLogger(__name__)


@dataclass
class StageSummary:
    tasks: int = 0
    skipped: int = 0
    retries: int = 0
    seconds: float = 0.0
    stats: Stats = field(default_factory=Stats)
    finished_at: list[float] = field(default_factory=list)
    failures: list[TaskFailure] = field(default_factory=list)
    swept: int = 0  # leftover donations of finished blocks removed (stage two with cleanup)
    masked: int = 0  # of the skipped stage-one blocks, those outside the mask (never a task), not done before

    def skip(self, job: Job, stage: int, finished: list) -> None:
        """Count ``finished`` as skipped, telling stage one's blocks outside the mask apart."""
        self.skipped += len(finished)
        if stage == 1 and job.mask:
            res = Resources(job)
            self.masked += sum(res.is_masked(b) for b in finished)

    def add(self, result: TaskResult) -> None:
        self.swept += result.swept
        if result.skipped:
            self.skipped += 1
            return
        self.tasks += 1
        self.retries += result.attempt - 1
        self.stats.add(result.stats)
        self.finished_at.append(time.perf_counter())

    def record(self, job: Job, stage: int, block: Vec, result) -> None:
        """A task's outcome: its result, or a failure (``Failed``, ``NotRun``) kept for the report."""
        if isinstance(result, (Failed, NotRun)):
            names = [job.layout.block_box(Vec(d)).name for d in result.blocked_by] if isinstance(result, NotRun) \
                else None
            failure = TaskFailure.of(stage, job.layout.block_box(Vec(block)).name, result, names)
            if failure.detail and not failure.refusal:
                log.debug("%s", failure.detail)
            self.failures.append(failure)
        else:
            self.add(result)

    @property
    def not_run(self) -> int:
        return sum(1 for f in self.failures if f.blocked_by)

    def counts(self) -> str:
        """``, N failed, M not run`` (what is not zero), for the summary lines."""
        failed = len(self.failures) - self.not_run
        return (f", {failed} failed" if failed else "") + (f", {self.not_run} not run" if self.not_run else "")


@dataclass
class RunSummary:
    job: Job
    stage1: StageSummary = field(default_factory=StageSummary)
    stage2: StageSummary = field(default_factory=StageSummary)
    mode: str = "barrier"
    engine: str = "local"
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    stage2_held: bool = False  # barrier order: stage two not started because stage one failed

    @property
    def failures(self) -> list[TaskFailure]:
        return self.stage1.failures + self.stage2.failures

    @property
    def exit_status(self) -> int:
        """0, or 2 if every failure is a refusal (missing donations and the like), 1 otherwise."""
        return exit_status(self.failures)

    def failure_lines(self) -> list[str]:
        """One line per failed or not-run task, and one if stage two was not started."""
        lines = [f.line() for f in self.failures]
        if self.stage2_held:
            failed = count(len(self.stage1.failures), "block")
            lines.append(f"{STAGE_NAMES[2]} not started: stage one failed for {failed}; "
                         "run again once they are fixed (finished blocks are skipped)")
        return lines

    @property
    def final_times(self) -> list[float]:
        """Seconds from the start of the run at which each block run by stage two became final."""
        return sorted(t - self.started for t in self.stage2.finished_at)

    def lines(self) -> list[str]:
        layout = self.job.layout
        voxels = layout.bbox.size
        total = self.seconds or self.stage1.seconds + self.stage2.seconds
        # the output voxels this run wrote (cores in stage one, bands in stage two): blocks skipped
        # as done on a resumed run do not count
        written = self.stage1.stats.voxels + self.stage2.stats.voxels
        if self.stage1.tasks + self.stage2.tasks == 0:
            rate = "n/a (no task ran)"
        elif total > 0:
            rate = f"{written / total:,.0f} voxels/s ({written:,} output voxels written)"
        else:
            rate = "n/a"
        finals = self.final_times
        first = f", first block final after {finals[0]:.2f} s" if finals else ""
        one, two = self.stage1, self.stage2
        patches = count(layout.num_patches, "patch", "patches")
        lines = [
            f"job {self.job.job_hash}: {count(layout.num_blocks, 'block')}, {patches} in the grid, {voxels:,} voxels "
            f"({self.engine} engine, {self.mode})",
            f"stage one: {count(one.tasks, 'task')} run, {one.skipped - one.masked} already done"
            f"{f', {one.masked} outside the mask (no task)' if one.masked else ''}, {_retries(one)}, "
            f"{count(one.stats.patches, 'patch', 'patches')} computed, {human_bytes(one.stats.donated_bytes)} "
            f"donated in {count(one.stats.donations, 'piece')}, {one.seconds:.2f} s{one.counts()}",
            f"stage two: not started, stage one failed for {count(len(one.failures), 'block')}" if self.stage2_held else
            f"stage two: {count(two.tasks, 'task')} run, {two.skipped} already done, {_retries(two)}, "
            f"{count(two.stats.donations, 'piece')} received, {two.seconds:.2f} s{two.counts()}",
            f"throughput: {rate}, {total:.2f} s in all{first}",
        ]
        if one.stats.filled_chunks:
            lines.append(f"input: {count(one.stats.filled_chunks, 'missing chunk')} read as zeros (--fill-missing)")
        if two.swept:
            lines.append(f"cleanup: {count(two.swept, 'leftover donation')} of finished blocks removed")
        for name, stage in (("one", self.stage1), ("two", self.stage2)):
            if stage.stats.seconds:
                phases = sorted(stage.stats.seconds.items(), key=lambda kv: -kv[1])
                lines.append(f"stage {name} task seconds by phase (summed over workers): "
                             + ", ".join(f"{k} {v:.2f}" for k, v in phases))
        return lines


def _retries(stage: StageSummary) -> str:
    return count(stage.retries, "retry", "retries")


def done_blocks(store: ObjectStore, stage: int, job: Job | None = None) -> set[str]:
    """Names of the blocks whose done marker for ``stage`` exists (one listing of every marker, not
    one request per block); with ``job``, stage one also counts the blocks its mask leaves no patch
    (they have no stage-one task). Polls use :func:`chunkflow.done_log.done_set` instead: a bitmap,
    at the cost of what changed since the last poll."""
    prefix = marker_prefix(DONE, stage)
    done = {name[len(prefix):] for name in store.list(prefix)}
    if job is not None and stage == 1:
        done |= masked_names(job, store)
    return done


def _is_in(done: BlockSet | None, block: Vec) -> bool:
    """Whether block index ``block`` is in ``done`` (None: nothing is, as with ``force``)."""
    if done is None:
        return False
    shape = done.grid.shape
    if not all(0 <= int(b) < n for b, n in zip(block, shape)):
        return False
    return bool(done.bits[done.grid.flat_of(block)])


def _prepare(job: Job, engine) -> Job:
    prepare = getattr(engine, "prepare", None)
    return prepare(job) if prepare is not None else job


def _gpu(job: Job) -> bool:
    return job.device.startswith("cuda")


def run_stage(job: Job, stage: int, engine, blocks: Iterable[Vec] | None = None, force: bool = False,
              progress: bool = True, cleanup: bool = False, check: bool = True) -> StageSummary:
    """Run one stage over ``blocks`` (all blocks by default), skipping finished ones unless ``force``.

    Every block is tried; failures are collected in the summary (``check``: the first is raised
    at the end)."""
    job = _prepare(job, engine)
    summary = StageSummary()
    started = time.perf_counter()
    Resources(job).check_standing()  # before any block is skipped as done
    done = None if force else done_set(Resources(job).store, stage, job)
    todo, finished = [], []
    for block in (blocks if blocks is not None else job.layout.block_indices()):
        (finished if _is_in(done, block) else todo).append(block)
    if stage == 2 and cleanup:
        _sweep(job, finished, summary)
    else:
        summary.skip(job, stage, finished)
    try:
        with tqdm(total=len(todo), desc=STAGE_NAMES[stage], unit="block", disable=not progress, leave=True) as bar:
            for block, result in engine.map(StageTask(job, stage, force, cleanup), todo,
                                            gpu=stage == 1 and _gpu(job)):
                summary.record(job, stage, block, result)
                bar.update(1)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM raised as Terminated by the CLI
        raise Interrupted.of(interrupt, f"{STAGE_NAMES[stage]}: {summary.tasks} blocks done") from None
    summary.seconds = time.perf_counter() - started
    if check:
        _check(summary.failures)
    return summary


def _sweep(job: Job, blocks: list[Vec], summary: StageSummary, threads: int = 16) -> None:
    """Blocks whose stage two is done, skipped: remove their leftover donations (a few at a time)."""
    store = Resources(job).store

    def sweep(block: Vec):
        try:
            return TaskResult(2, job.layout.block_box(block).name, skipped=True,
                              swept=sweep_leftovers(job, block, store))
        except Exception as err:  # noqa: BLE001 - reported with the block, like a failed task
            if debugging():
                raise
            return Failed.of(err)

    if not blocks:
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(blocks)), thread_name_prefix="cf-sweep") as pool:
        for block, result in zip(blocks, pool.map(sweep, blocks)):
            summary.record(job, 2, block, result)


def _check(failures: list[TaskFailure]) -> None:
    """Raise the first failure (the original exception where it is at hand)."""
    for failure in failures:
        if not failure.blocked_by:
            raise failure.exception()


def run_job(job: Job, engine, blocks: list[Vec] | None = None, force: bool = False, progress: bool = True,
            cleanup: bool = False, mode: str = "barrier", check: bool = True) -> RunSummary:
    """Both stages over ``blocks`` (all by default) in ``mode`` (barrier or streaming).

    Failures are collected in the summary; with ``check`` the first one is raised at the end."""
    if mode not in MODES:
        raise EngineError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    summary = RunSummary(job, mode=mode, engine=getattr(engine, "name", type(engine).__name__))
    if mode == "barrier":
        summary.stage1 = run_stage(job, 1, engine, blocks, force, progress, check=False)
        if summary.stage1.failures:
            summary.stage2_held = True
        else:
            summary.stage2 = run_stage(job, 2, engine, blocks, force, progress, cleanup, check=False)
    else:
        _stream(_prepare(job, engine), engine, summary, blocks, force, progress, cleanup)
    summary.seconds = time.perf_counter() - summary.started
    if check:
        _check(summary.failures)
    return summary


def _stream(job: Job, engine, summary: RunSummary, blocks, force: bool, progress: bool, cleanup: bool) -> None:
    layout = job.layout
    Resources(job).check_standing()  # before any block is skipped as done
    store = Resources(job).store
    blocks = list(blocks if blocks is not None else layout.block_indices())
    done1 = None if force else done_set(store, 1, job)
    done2 = None if force else done_set(store, 2, job, grid=done1.grid if done1 is not None else None)
    firsts = [b for b in blocks if not _is_in(done1, b)]
    seconds = [b for b in blocks if not _is_in(done2, b)]
    summary.stage1.skip(job, 1, [b for b in blocks if _is_in(done1, b)])
    finished = [b for b in blocks if _is_in(done2, b)]
    if cleanup:
        _sweep(job, finished, summary.stage2)
    else:
        summary.stage2.skipped = len(finished)
    scheduled = set(firsts)
    dependencies = {}
    for b in seconds:
        deps = layout.dependencies(b)
        missing = [d for d in deps if d not in scheduled and not _is_in(done1, d)]
        if missing:
            raise EngineError(f"stage two of {layout.block_box(b).name} needs stage one of "
                              f"{', '.join(layout.block_box(d).name for d in missing)}, which is neither done nor "
                              "selected")
        dependencies[b] = deps
    bars = {s: tqdm(total=n, desc=STAGE_NAMES[s], unit="block", position=s - 1, disable=not progress, leave=True)
            for s, n in ((1, len(firsts)), (2, len(seconds)))}
    stage_summary = {1: summary.stage1, 2: summary.stage2}
    try:
        for stage, block, result in engine.stream(StageTask(job, 1, force), StageTask(job, 2, force, cleanup),
                                                  firsts, dependencies, gpu=_gpu(job)):
            stage_summary[stage].record(job, stage, block, result)
            stage_summary[stage].seconds = time.perf_counter() - summary.started
            bars[stage].update(1)
    except KeyboardInterrupt as interrupt:
        raise Interrupted.of(interrupt, f"{STAGE_NAMES[1]}: {summary.stage1.tasks} blocks done, {STAGE_NAMES[2]}: "
                                        f"{summary.stage2.tasks} blocks done") from None
    finally:
        for bar in bars.values():
            bar.close()


def run_with(job: Job, engine: str = "local", mode: str = "barrier", workers: int | None = None,
             scheduler: str | None = None, force: bool = False, progress: bool = True,
             cleanup: bool = False, check: bool = True) -> RunSummary:
    """Start the engine by name, run the job, stop the engine (what ``chunkflow run`` does)."""
    check_options(engine, mode, workers, scheduler)
    running = make_engine(engine, workers=workers, scheduler=scheduler, gpu=_gpu(job))
    try:
        return run_job(job, running, force=force, progress=progress, cleanup=cleanup, mode=mode, check=check)
    finally:
        running.close()

