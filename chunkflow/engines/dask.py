"""The Dask distributed engine: a LocalCluster on this machine, or an existing cluster.

Fault tolerance: a task whose worker dies (SIGKILL, preemption, OOM) is rescheduled by Dask
on another worker, up to ``distributed.scheduler.allowed-failures`` deaths (default 3) before
it is declared a ``KilledWorker``; a task that *raises* unexpectedly is run again ``retries``
times on its worker, a refusal (missing or corrupt donations, any ``chunkflow.cli.USER_ERRORS``)
is not. Both are safe because every chunkflow task may run again (Invariant 2). A task that
still fails comes back as :class:`~chunkflow.engines.failures.Failed` and the others go on; in
``stream``, a second task whose dependency failed is not run (:class:`~chunkflow.engines.failures.NotRun`).

GPUs are a worker resource: stage-one tasks of a CUDA job ask for ``{"GPU": 1}``. On a real
cluster start one worker per GPU::

    CUDA_VISIBLE_DEVICES=0 dask worker tcp://SCHED:8786 --nthreads 1 --resources GPU=1
    CUDA_VISIBLE_DEVICES=1 dask worker tcp://SCHED:8786 --nthreads 1 --resources GPU=1

On a LocalCluster each worker is given ``GPU=1`` and its own device (``CUDA_VISIBLE_DEVICES``
set by a worker plugin before CUDA starts), one worker per visible GPU by default.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from distributed import Client, KilledWorker, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from chunkflow.engines.base import EngineError
from chunkflow.engines.failures import Failed, NotRun, debugging, one_line
from chunkflow.job import Job

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

CONNECT_TIMEOUT = 10
GPU_WORKER_WAIT = float(os.environ.get("CHUNKFLOW_GPU_WORKER_WAIT", "300"))


def _guarded(fn: Callable[[T], R], task: T, retries: int, after: tuple = (), *dependencies) -> R | Failed | NotRun:
    """Run ``fn(task)`` on a worker, once Dask has finished ``dependencies`` (the results of the
    tasks ``after``): not at all if one of them failed, ``retries`` more times if it raises
    unexpectedly, and a :class:`Failed` instead of raising (``CHUNKFLOW_DEBUG``: it raises)."""
    failed = [t for t, result in zip(after, dependencies) if isinstance(result, (Failed, NotRun))]
    if failed:
        return NotRun(failed)
    for attempt in range(retries + 1):
        try:
            return fn(task)
        except Exception as err:  # noqa: BLE001 - reported with the task, the others go on
            if debugging():
                raise
            outcome = Failed.of(err)
            if outcome.refusal or attempt == retries:
                return outcome
            log.warning("%s %s raised %s: %s; running it again", getattr(fn, "label", "task"), _task_name(task),
                        outcome.kind, outcome.message)
    raise AssertionError("unreachable")


class DaskEngine:
    """Runs tasks on Dask workers, as they become free, and yields results as they finish.

    Args:
        workers: LocalCluster size (default: one per core, or one per GPU for a CUDA job).
        scheduler: ``tcp://host:8786`` of a running scheduler; no LocalCluster then.
        gpu: the tasks of stage one need a GPU (the job's device is CUDA).
        retries: runs again of a task that raised unexpectedly (refusals are not run again;
            worker deaths are counted separately, by Dask).
        gpu_wait: seconds to wait for a GPU worker to join an existing cluster (workers of a
            freshly scaled SLURM or Kubernetes cluster join minutes after the scheduler is up);
            ``CHUNKFLOW_GPU_WORKER_WAIT`` sets the default, 300.
    """

    name = "dask"

    def __init__(self, workers: int | None = None, scheduler: str | None = None, gpu: bool = False,
                 retries: int = 2, gpu_wait: float = GPU_WORKER_WAIT):
        self.gpu, self.retries, self.cluster = gpu, retries, None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, ValueError, TypeError) as err:
                raise EngineError(f"cannot connect to the Dask scheduler at {scheduler!r}: {err}") from None
            if gpu:
                self._wait_for_gpu_workers(scheduler, gpu_wait)
            return
        gpus = _gpu_count() if gpu else 0
        if gpu and gpus == 0:
            raise EngineError("the job runs on CUDA but this machine has no visible GPU; plan it with --device cpu "
                              "or give --scheduler of a cluster with GPU workers")
        count = int(workers or gpus or os.cpu_count() or 1)
        if count < 1:
            raise EngineError(f"--workers {workers} must be a positive integer")
        quiet = logging.getLogger("distributed")  # Dask's start-up chatter; its warnings (a worker died) stay
        quiet.setLevel(max(quiet.level, logging.WARNING))
        try:
            self.cluster = LocalCluster(n_workers=count, processes=True, threads_per_worker=1,
                                        dashboard_address=":0", silence_logs=logging.WARNING,
                                        resources={"GPU": 1} if gpu else None,
                                        env={"DASK_LOGGING__DISTRIBUTED": "warning"})
            self.client = Client(self.cluster)
        except (RuntimeError, OSError, TimeoutError) as err:  # "Nanny failed to start", no free port, ...
            raise EngineError(f"the Dask LocalCluster could not start its {count} worker processes "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check memory "
                              "and the process limit, or try fewer --workers") from None
        if gpu:
            self.client.register_plugin(PinGPU(_visible_gpus(gpus)), name="chunkflow-pin-gpu")
        log.info("Dask LocalCluster with %d worker processes, dashboard %s", count, self.client.dashboard_link)

    def prepare(self, job: Job) -> Job:
        """On a LocalCluster each worker sees only its own GPU, as ``cuda``."""
        if self.gpu and self.cluster is not None:
            return job.with_runtime(device="cuda")
        return job

    def _submit(self, token: str, fn, task, label: str, index: int, *dependencies, gpu: bool = False,
                priority: int = 0):
        """``token`` is new for every map/stream call: Dask would hand back the cached result of a
        finished task with the same key instead of running it again. ``dependencies``: pairs
        (task, future) that must finish first."""
        after = tuple(t for t, _ in dependencies)
        return self.client.submit(
            _guarded, fn, task, self.retries, after, *(f for _, f in dependencies),
            key=f"{label}-{_task_name(task)}-{token}-{index}", pure=False,
            resources={"GPU": 1} if gpu and self.gpu else None, priority=priority)

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], gpu: bool = False) -> Iterator[tuple[T, R]]:
        label = getattr(fn, "label", "task")
        token = uuid.uuid4().hex[:12]
        futures = {self._submit(token, fn, task, label, i, gpu=gpu): task for i, task in enumerate(tasks)}
        for future, result in self._completed(futures):
            yield futures[future], result

    def stream(self, first: Callable[[T], R], second: Callable[[T], R], firsts: Iterable[T],
               dependencies: Mapping[T, Iterable[T]], gpu: bool = False) -> Iterator[tuple[int, T, R]]:
        """A task graph: ``second(b)`` depends on ``first(d)`` for each ``d`` in ``dependencies[b]``
        that is in ``firsts``; Dask runs each as soon as its inputs are done."""
        token = uuid.uuid4().hex[:12]
        stage1 = {task: self._submit(token, first, task, getattr(first, "label", "first"), i, gpu=gpu)
                  for i, task in enumerate(firsts)}
        owner = {future: (1, task) for task, future in stage1.items()}
        label = getattr(second, "label", "second")
        for i, (task, deps) in enumerate(dependencies.items()):
            inputs = [(d, stage1[d]) for d in deps if d in stage1]
            future = self._submit(token, second, task, label, i, *inputs, priority=1)
            owner[future] = (2, task)
        by_key = {future.key: task for task, future in stage1.items()}
        for future, result in self._completed(owner, by_key):
            stage, task = owner[future]
            yield stage, task, result

    def _completed(self, futures, by_key: Mapping | None = None) -> Iterator[tuple[object, object]]:
        """``(future, result)`` as they finish; a task Dask gave up on (its workers died) comes back
        as ``Failed``, or as ``NotRun`` if the task it gave up on is a dependency (``by_key``)."""
        try:
            for future in as_completed(list(futures)):
                try:
                    result = future.result()
                except KilledWorker as err:
                    if debugging():
                        raise EngineError(f"Dask gave up on {future.key}: {err}") from None
                    if by_key and err.task != future.key and err.task in by_key:
                        result = NotRun([by_key[err.task]])
                    else:
                        result = Failed("KilledWorker", f"Dask gave up on it: {one_line(err)}", refusal=False)
                except Exception as err:  # noqa: BLE001 - e.g. a result that cannot be unpickled here
                    if debugging():
                        raise
                    result = Failed.of(err)
                yield future, result
                future.release()
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:
                self.client.cancel(pending)

    def _wait_for_gpu_workers(self, scheduler: str, wait: float) -> None:
        deadline, said = time.monotonic() + wait, False
        while True:
            workers = self.client.scheduler_info().get("workers", {})
            if any(w.get("resources", {}).get("GPU") for w in workers.values()):
                return
            if time.monotonic() >= deadline:
                self.close()
                raise EngineError(f"no worker of the Dask cluster at {scheduler} declares a GPU after {wait:g} s; "
                                  f"start one worker per GPU with `dask worker {scheduler} --nthreads 1 "
                                  "--resources GPU=1`")
            if not said:
                log.info("waiting up to %g s for a worker with --resources GPU=1 to join %s", wait, scheduler)
                said = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _task_name(task) -> str:
    return "_".join(str(v) for v in task) if isinstance(task, tuple) else str(task)


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _visible_gpus(count: int) -> list[str]:
    """The devices this process may use: the parent's ``CUDA_VISIBLE_DEVICES`` (SLURM ``--gres``, a
    shared node) when set, else ``0..count-1``."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


class PinGPU(WorkerPlugin):
    """Each LocalCluster worker (named 0..n-1, kept across restarts) sees one of the GPUs this
    process may use."""

    idempotent = True

    def __init__(self, devices: list[str]):
        self.devices = list(devices)

    def setup(self, worker) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = self.devices[int(worker.name) % len(self.devices)]
