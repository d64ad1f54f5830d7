"""The Dask distributed engine: a LocalCluster on this machine, or an existing cluster.

Fault tolerance: a task whose worker dies (SIGKILL, preemption, OOM) is rescheduled by Dask
on another worker, up to ``distributed.scheduler.allowed-failures`` deaths (default 3) before
it is declared a ``KilledWorker``; a task that *raises* unexpectedly is run again ``retries``
times on its worker, a refusal (missing or corrupt donations, any :class:`~chunkflow.errors.Refusal`)
is not. Both are safe because every chunkflow task may run again (Invariant 2). A task that
still fails comes back as :class:`~chunkflow.engines.failures.Failed` and the others go on; in
``stream``, a second task whose dependency failed is not run (:class:`~chunkflow.engines.failures.NotRun`).

A bounded window: at most ``max(4, 2 x the cluster's worker threads)`` tasks are submitted at a
time, topped up as results come back, so the scheduler holds a few futures per thread whatever
the number of blocks (a million-block job is not a million futures). What the scheduler keeps
per task once it is gone is dropped every ``TIDY_EVERY`` results and at the end of each call
(:func:`_tidy_scheduler`), so its memory stays flat however many tasks a job has. In ``stream`` the
dependencies are tracked here, not as Dask graph edges: stage-one tasks are submitted in
:func:`~chunkflow.engines.local.demand_order`, and a block's stage-two task once the stage-one
results of all its dependencies are back.

Two tasks per worker: LocalCluster workers have two threads, so while one block holds the model
(``Resources.device_lock``, one per process) the other reads its input or writes and donates
its output. Memory per worker: the model, and at most two tasks (a stage-one task's input chunk
and float32 output chunk, or a stage-two task's band) at once.

GPUs are a worker resource: stage-one tasks of a CUDA job ask for ``{"GPU": 1}``, and a GPU
worker declares two of them, one per task slot. On a real cluster start one worker per GPU::

    CUDA_VISIBLE_DEVICES=0 dask worker tcp://SCHED:8786 --nthreads 2 --resources GPU=2
    CUDA_VISIBLE_DEVICES=1 dask worker tcp://SCHED:8786 --nthreads 2 --resources GPU=2

Workers started the older way (``--nthreads 1 --resources GPU=1``) still work, one block at a
time. On a LocalCluster each worker is given ``GPU=2`` and its own device (``CUDA_VISIBLE_DEVICES``
set by a worker plugin before CUDA starts), one worker per visible GPU by default.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from distributed import Client, KilledWorker, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from chunkflow.errors import EngineError
from chunkflow.engines.failures import Failed, NotRun, debugging, one_line
from chunkflow.engines.local import Dependencies, demand_order
from chunkflow.job import Job

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

CONNECT_TIMEOUT = 10
GPU_WORKER_WAIT = float(os.environ.get("CHUNKFLOW_GPU_WORKER_WAIT", "300"))
THREADS_PER_WORKER = 2  # task slots of a LocalCluster worker; a GPU worker declares as many GPU units
WINDOW_PER_THREAD = 2
MIN_WINDOW = 4
WINDOW_REFRESH_S = 2.0
TIDY_EVERY = 10_000  # results between two tidy-ups of the scheduler (_tidy_scheduler)


def _guarded(fn: Callable[[T], R], task: T, retries: int) -> R | Failed:
    """Run ``fn(task)`` on a worker: ``retries`` more times if it raises unexpectedly, and a
    :class:`Failed` instead of raising (``CHUNKFLOW_DEBUG``: it raises)."""
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
    """Runs tasks on Dask workers, a bounded window at a time, and yields results as they finish.

    Args:
        workers: LocalCluster size (default: one per core, or one per GPU for a CUDA job); each
            worker has two threads.
        scheduler: ``tcp://host:8786`` of a running scheduler; no LocalCluster then.
        gpu: the tasks of stage one need a GPU (the job's device is CUDA).
        retries: runs again of a task that raised unexpectedly (refusals are not run again;
            worker deaths are counted separately, by Dask).
        gpu_wait: seconds to wait for a GPU worker to join an existing cluster (workers of a
            freshly scaled SLURM or Kubernetes cluster join minutes after the scheduler is up);
            ``CHUNKFLOW_GPU_WORKER_WAIT`` sets the default, 300.
        window: tasks in flight at most (default: ``max(4, 2 x worker threads)``, followed as
            workers join or leave).
    """

    name = "dask"

    def __init__(self, workers: int | None = None, scheduler: str | None = None, gpu: bool = False,
                 retries: int = 2, gpu_wait: float = GPU_WORKER_WAIT, window: int | None = None):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise EngineError(f"window {window!r} must be a positive integer")
        self.gpu, self.retries, self.cluster = gpu, retries, None
        self._since_tidy = 0
        self._fixed_window, self._window, self._window_at = window, MIN_WINDOW, 0.0
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
            self.cluster = LocalCluster(n_workers=count, processes=True, threads_per_worker=THREADS_PER_WORKER,
                                        dashboard_address=":0", silence_logs=logging.WARNING,
                                        resources={"GPU": THREADS_PER_WORKER} if gpu else None,
                                        env={"DASK_LOGGING__DISTRIBUTED": "warning"})
            self.client = Client(self.cluster)
        except (RuntimeError, OSError, TimeoutError) as err:  # "Nanny failed to start", no free port, ...
            raise EngineError(f"the Dask LocalCluster could not start its {count} worker processes "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check memory "
                              "and the process limit, or try fewer --workers") from None
        if gpu:
            self.client.register_plugin(PinGPU(_visible_gpus(gpus)), name="chunkflow-pin-gpu")
        log.info("Dask LocalCluster with %d worker processes of %d threads, dashboard %s", count,
                 THREADS_PER_WORKER, self.client.dashboard_link)

    def prepare(self, job: Job) -> Job:
        """On a LocalCluster each worker sees only its own GPU, as ``cuda``."""
        if self.gpu and self.cluster is not None:
            return job.with_runtime(device="cuda")
        return job

    def window(self) -> int:
        """Tasks in flight at most: ``window`` if given, else ``max(4, 2 x worker threads)`` of the
        cluster now (asked at most every few seconds)."""
        if self._fixed_window is not None:
            return self._fixed_window
        now = time.monotonic()
        if now >= self._window_at:
            threads = sum(self.client.nthreads().values())
            self._window, self._window_at = max(MIN_WINDOW, WINDOW_PER_THREAD * threads), now + WINDOW_REFRESH_S
        return self._window

    def _submit(self, token: str, fn, task, label: str, index: int, gpu: bool = False, priority: int = 0):
        """``token`` is new for every map/stream call: Dask would hand back the cached result of a
        finished task with the same key instead of running it again."""
        return self.client.submit(
            _guarded, fn, task, self.retries, key=f"{label}-{_task_name(task)}-{token}-{index}", pure=False,
            resources={"GPU": 1} if gpu and self.gpu else None, priority=priority)

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], gpu: bool = False) -> Iterator[tuple[T, R]]:
        label = getattr(fn, "label", "task")
        token = uuid.uuid4().hex[:12]
        todo = iter(enumerate(tasks))
        flight = _InFlight(self.client)

        def fill() -> None:
            while len(flight) < self.window():
                item = next(todo, None)
                if item is None:
                    return
                flight.add(self._submit(token, fn, item[1], label, item[0], gpu=gpu), item[1])

        with flight, self._tidying():
            fill()
            while flight:
                task, result = flight.next()
                fill()
                self._count_result()
                yield task, result

    def stream(self, first: Callable[[T], R], second: Callable[[T], R], firsts: Iterable[T],
               dependencies: Mapping[T, Iterable[T]], gpu: bool = False) -> Iterator[tuple[int, T, R]]:
        """``second(b)`` is submitted once ``first(d)`` has come back for each ``d`` in
        ``dependencies[b]`` that is in ``firsts`` (``NotRun`` if one failed); first tasks go in
        :func:`demand_order`. A ready second task is submitted before the next first one, up to
        half the window while first tasks remain."""
        token = uuid.uuid4().hex[:12]
        labels = {1: getattr(first, "label", "first"), 2: getattr(second, "label", "second")}
        deps = Dependencies(firsts, dependencies)
        todo = deque(demand_order(deps.firsts, dependencies))
        flight = _InFlight(self.client)
        counts = {1: 0, 2: 0}  # submitted so far (key indices)
        seconds = [0]  # second tasks in flight
        not_run: list = []

        def fill() -> None:
            window = self.window()
            while len(flight) < window and (deps.ready or todo):
                if deps.ready and (seconds[0] < max(1, window // 2) or not todo):
                    b = deps.ready.popleft()
                    if deps.blocked(b):
                        not_run.append(b)
                        continue
                    future = self._submit(token, second, b, labels[2], counts[2], priority=1)
                    flight.add(future, (2, b))
                    counts[2] += 1
                    seconds[0] += 1
                else:
                    task = todo.popleft()
                    flight.add(self._submit(token, first, task, labels[1], counts[1], gpu=gpu), (1, task))
                    counts[1] += 1

        with flight, self._tidying():
            fill()
            while flight or not_run:
                while not_run:
                    b = not_run.pop(0)
                    yield 2, b, NotRun(deps.blocked(b))
                if not flight:
                    break
                (stage, task), result = flight.next()
                if stage == 1:
                    deps.finished(task, isinstance(result, Failed))
                else:
                    seconds[0] -= 1
                fill()
                self._count_result()
                yield stage, task, result

    def _count_result(self) -> None:
        self._since_tidy += 1
        if self._since_tidy >= TIDY_EVERY:
            self.tidy()

    @contextmanager
    def _tidying(self) -> Iterator[None]:
        """Tidy the scheduler when a map/stream call has yielded every result (not when it is
        stopped early or interrupted: no round trip to a scheduler then)."""
        yield
        self.tidy()

    def tidy(self) -> None:
        """Drop what the scheduler keeps of tasks that are gone (:func:`_tidy_scheduler`); a
        scheduler that refuses it (or is gone) is left as it is."""
        self._since_tidy = 0
        try:
            self.client.run_on_scheduler(_tidy_scheduler)
        except Exception as err:  # noqa: BLE001 - bookkeeping only: the run goes on
            log.debug("could not tidy the Dask scheduler: %s", one_line(err))

    def _wait_for_gpu_workers(self, scheduler: str, wait: float) -> None:
        deadline, said = time.monotonic() + wait, False
        while True:
            workers = self.client.scheduler_info().get("workers", {})
            if any(w.get("resources", {}).get("GPU") for w in workers.values()):
                return
            if time.monotonic() >= deadline:
                self.close()
                raise EngineError(f"no worker of the Dask cluster at {scheduler} declares a GPU after {wait:g} s; "
                                  f"start one worker per GPU with `dask worker {scheduler} --nthreads 2 "
                                  "--resources GPU=2` (two blocks per GPU; `--nthreads 1 --resources GPU=1` "
                                  "also works)")
            if not said:
                log.info("waiting up to %g s for a worker with --resources GPU=2 (or GPU=1) to join %s", wait,
                         scheduler)
                said = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class _InFlight:
    """The futures of one map/stream call that have not come back yet, and what each one runs."""

    def __init__(self, client: Client):
        self.client = client
        self.owner: dict = {}
        self.done = as_completed()

    def add(self, future, what) -> None:
        self.owner[future] = what
        self.done.add(future)

    def __len__(self) -> int:
        return len(self.owner)

    def next(self) -> tuple[object, object]:
        """``(what, result)`` of the next future to finish; a task Dask gave up on (its workers
        died) comes back as ``Failed``."""
        future = next(self.done)
        what = self.owner.pop(future)
        try:
            result = future.result()
        except KilledWorker as err:
            if debugging():
                raise EngineError(f"Dask gave up on {future.key}: {err}") from None
            result = Failed("KilledWorker", f"Dask gave up on it: {one_line(err)}", refusal=False)
        except Exception as err:  # noqa: BLE001 - e.g. a result that cannot be unpickled here
            if debugging():
                raise
            result = Failed.of(err)
        finally:
            future.release()
        return what, result

    def __enter__(self) -> "_InFlight":
        return self

    def __exit__(self, *exc) -> None:
        """Cancel what has not come back (the consumer stopped early, or was interrupted)."""
        pending = [f for f in self.owner if not f.done()]
        if pending:
            self.client.cancel(pending)
        self.owner.clear()


def _tidy_scheduler(dask_scheduler=None) -> None:
    """Run on the scheduler: drop two things Dask keeps per submitted task after the task is gone,
    which would grow the scheduler's memory with the number of tasks (~0.6 KiB each; measured by
    ``benchmarks/bench_control_plane.py``):

    - ``client.submit`` adds ``{"type": "Future"}`` to its span's metadata once per call, and the
      span lives as long as the scheduler: the list is cut to its distinct entries;
    - ``dask.utils.key_split`` caches every task key it sees (up to 100,000): the cache is cleared.

    Both are bookkeeping (the dashboard's span collections, a cache); a Dask without them, or
    with other internals, is left alone."""
    try:
        from dask.utils import key_split

        key_split.cache_clear()
    except (ImportError, AttributeError):
        pass
    extensions = getattr(dask_scheduler, "extensions", None)
    spans = extensions.get("spans") if isinstance(extensions, dict) else None
    for span in list(getattr(spans, "spans", {}).values()):
        metadata = getattr(span, "_metadata", None)
        collections = metadata.get("collections") if isinstance(metadata, dict) else None
        if isinstance(collections, list) and len(collections) > 1:
            distinct: list = []
            for entry in collections:
                if entry not in distinct:
                    distinct.append(entry)
            collections[:] = distinct


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
