"""chunkflow as a library: the functions behind ``import chunkflow`` (docs/api.md).

In memory: :func:`sliding_window` (:mod:`chunkflow.in_memory`). On volumes: :func:`plan` a job,
:func:`open_job` it again anywhere, :func:`run` both stages on an engine, or run one block's
stage with :func:`inference_and_donate` / :func:`receive_and_blend` (through the engines' own
task path, so the done, running and failed markers are kept the same way), and compute the
whole-volume :func:`reference`. The CLI calls the same functions underneath.

Heavy modules (storage, backends, engines) are imported when a function is called, so
``import chunkflow`` stays fast and imports neither torch nor dask nor cloudvolume.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.errors import GeometryError, UsageError
from chunkflow.in_memory import sliding_window
from chunkflow.job import Job
from chunkflow.job_params import JobParameters, takes_job_parameters

if TYPE_CHECKING:
    from chunkflow.engines.runner import RunSummary
    from chunkflow.engines.task import TaskResult

__all__ = ["inference_and_donate", "open_job", "plan", "receive_and_blend", "reference", "run", "sliding_window"]

Block = Union[str, Bbox, Sequence[int]]
JobLike = Union[Job, str, os.PathLike]


@takes_job_parameters()
def plan(params: JobParameters, device_here: bool = True, force: bool = False) -> Job:
    """Validate a job, create its output volume and write its manifest (``chunkflow plan``).

    Nothing is written unless every check passes. Planning the same parameters into the same
    ``donations`` store again returns the existing job; other parameters there are refused.
    Sizes are Z,Y,X: three ints, ``"16,64,64"`` or one int for a cube; locations may be
    ``pathlib.Path``. Every parameter but ``device_here`` and ``force`` is a field of
    :class:`chunkflow.job_params.JobParameters`, with the help of ``chunkflow plan --help``.

    Args:
        device_here: also load the model on ``device`` here to check it (False when planning
            on a machine without the workers' device).
        force: reset a job whose done markers no longer stand for its output (deleted, replaced,
            or written over by another job): its done state is forgotten and every block is
            computed again (otherwise such a job is refused).

    Returns:
        The planned :class:`chunkflow.job.Job` (``job.layout`` holds its grid and blocks).

    Raises:
        chunkflow.errors.Refusal: any parameter, volume, store or model that cannot be used
            (one line; nothing written).
    """
    from chunkflow.planning import plan_job

    _flag("force", force)
    return plan_job(params, device_here, force=force)


def open_job(store: str | os.PathLike) -> Job:
    """The job planned in ``store`` (its ``donations`` location), verified against its hash.

    Raises:
        chunkflow.errors.JobError: no job there, or a manifest edited after planning.
    """
    from chunkflow.planning import load_job

    return load_job(_store_url(store))


def run(
    job: JobLike,
    engine: str = "local",
    mode: str = "barrier",
    workers: int | None = None,
    scheduler: str | None = None,
    force: bool = False,
    progress: bool = False,
    cleanup: bool = False,
    device: str | None = None,
    batch_size: int | None = None,
) -> RunSummary:
    """Run both stages of a planned job over every block (``chunkflow run`` after ``plan``).

    Args:
        job: a :class:`Job`, or its store's location.
        engine: ``local`` (this process) or ``dask`` (a LocalCluster, or ``scheduler``).
        mode: ``barrier`` (all of stage one, then all of stage two) or ``streaming`` (stage two
            of a block as soon as its donors' stage one is done).
        workers: Dask workers to start (dask engine only).
        scheduler: an existing Dask scheduler, ``tcp://host:8786`` (dask engine only).
        force: recompute blocks whose done markers exist (otherwise they are skipped).
        progress: show progress bars.
        cleanup: delete each block's donations once it is blended.
        device: run the model here instead of on the job's device (runtime only).
        batch_size: patches per model call instead of the job's (runtime only).

    Returns:
        The run's :class:`chunkflow.engines.RunSummary` (``lines()`` prints it as the CLI does).

    Raises:
        chunkflow.errors.Refusal: a bad engine, mode or worker setting, or a task refused for
            its data (missing donations, NaN output, ...): the first failure, once every task
            that could run has run. Other exceptions are bugs.
    """
    from chunkflow.engines.runner import run_with

    _flag("force", force), _flag("progress", progress), _flag("cleanup", cleanup)
    job = _job(job, device, batch_size)
    return run_with(job, engine=engine, mode=mode, workers=workers, scheduler=scheduler, force=force,
                    progress=progress, cleanup=cleanup, check=True)


def inference_and_donate(job: JobLike, block: Block, force: bool = False, device: str | None = None,
                         batch_size: int | None = None) -> TaskResult:
    """Stage one of one block: infer its patches, write its core, donate the rest.

    Runs through the engines' task path (:func:`chunkflow.engines.task.run_task`): a block
    whose ``done/stage1`` marker exists is skipped unless ``force``, and the running and failed
    markers are kept as every engine keeps them.

    Args:
        job: a :class:`Job`, or its store's location.
        block: the block's name ``x0-x1_y0-y1_z0-z1`` (e.g. ``0-1152_0-1152_0-112``), its
            :class:`Bbox`, or its Z,Y,X index in the block grid (``job.layout.grid_shape``).
        force: run it even if it is done.
        device: run the model here instead of on the job's device.
        batch_size: patches per model call instead of the job's.

    Returns:
        The task's :class:`chunkflow.engines.TaskResult` (``skipped``, ``stats``, ``attempt``).

    Raises:
        chunkflow.errors.GeometryError: ``block`` is not a block of this job.
        chunkflow.errors.Refusal: the block's input or model output is refused.
    """
    return _task(job, 1, block, force, False, device, batch_size)


def receive_and_blend(job: JobLike, block: Block, force: bool = False, cleanup: bool = False) -> TaskResult:
    """Stage two of one block: fetch and verify its donations, sum them, write its band.

    Runs through the engines' task path like :func:`inference_and_donate`; stage one of every
    block it depends on (``job.layout.dependencies(index)``) must be done first.

    Args:
        job: a :class:`Job`, or its store's location.
        block: the block's name, :class:`Bbox` or Z,Y,X grid index.
        force: run it even if it is done.
        cleanup: delete the block's donations afterwards (it can then not be rerun).

    Returns:
        The task's :class:`chunkflow.engines.TaskResult`.

    Raises:
        chunkflow.errors.GeometryError: ``block`` is not a block of this job.
        chunkflow.errors.MissingDonations: a donation is missing or refused; nothing was written.
    """
    return _task(job, 2, block, force, cleanup, None, None)


def reference(job: JobLike, progress: bool = False, device: str | None = None,
              batch_size: int | None = None) -> np.ndarray:
    """Whole-volume blended inference of the job's region in this process (what the stages equal).

    Args:
        job: a :class:`Job`, or its store's location.
        progress: show a tqdm bar of patches.
        device: run the model here instead of on the job's device.
        batch_size: patches per model call instead of the job's.

    Returns:
        float32 ``C_out,Z,Y,X`` over ``job.layout.bbox``, before the cast to the output dtype.
    """
    from chunkflow.stages import Resources, reference as _reference

    _flag("progress", progress)
    job = _job(job, device, batch_size)
    if not progress:
        return _reference(job, Resources(job))
    from tqdm.auto import tqdm

    with tqdm(total=job.layout.num_patches, desc="reference", unit="patch") as bar:
        return _reference(job, Resources(job), bar.update)


def block_index(job: Job, block: Block) -> Vec:
    """The Z,Y,X grid index of ``block`` (a name, a :class:`Bbox` or an index) in ``job``."""
    layout = job.layout
    if isinstance(block, str):
        return layout.block_index_of(Bbox.from_name(block))
    if isinstance(block, Bbox):
        return layout.block_index_of(block)
    if isinstance(block, (tuple, list)) and len(block) == 3 and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in block):
        index = Vec(block)
        if all(0 <= i < n for i, n in zip(index, layout.grid_shape)):
            return index
        raise GeometryError(f"block index {zyx_text(index)} is outside this job's grid of {zyx_text(layout.grid_shape)} "
                            "blocks (z,y,x)")
    raise GeometryError(f"block {block!r} is neither a block name x0-x1_y0-y1_z0-z1 nor a z,y,x block index")


def _task(job: JobLike, stage: int, block: Block, force: bool, cleanup: bool, device: str | None,
          batch_size: int | None) -> TaskResult:
    from chunkflow.engines.task import run_task

    _flag("force", force), _flag("cleanup", cleanup)
    job = _job(job, device, batch_size)
    return run_task(job, stage, block_index(job, block), force=force, cleanup=cleanup)


def _job(job: JobLike, device: str | None, batch_size: int | None) -> Job:
    if isinstance(job, str) or hasattr(job, "__fspath__"):
        job = open_job(job)
    elif not isinstance(job, Job):
        raise UsageError(f"job {type(job).__name__} is neither a chunkflow Job nor a job store location")
    if device is not None or batch_size is not None:
        if device is not None:
            from chunkflow.backends import check_device

            check_device(device)
        job = job.with_runtime(device=device, batch_size=batch_size)
    return job


def _store_url(store: object) -> str:
    if hasattr(store, "__fspath__"):
        return str(store)
    if not isinstance(store, str) or not store:
        raise UsageError(f"job store {store!r} is not a location such as /path/to/job or gs://bucket/job")
    return store


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name} {value!r} must be True or False")
