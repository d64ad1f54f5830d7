"""What every engine offers, and how to pick one by name.

An engine hands stage tasks to workers and knows nothing of blending::

    engine.map(fn, tasks, gpu=False)        -> iterator of (task, result), in completion order
    engine.stream(first, second, firsts, dependencies, gpu=False)
                                            -> iterator of (1 or 2, task, result): second(b) runs
                                               once first(d) ran for every d in dependencies[b]
    engine.prepare(job) -> job              runtime settings the engine imposes (e.g. device)
    engine.close()

A task that raises does not end the others: its result is a ``Failed``, and in streaming
order a second task whose dependency failed is not run and yields ``NotRun``
(:mod:`chunkflow.engines.failures`; ``CHUNKFLOW_DEBUG`` re-raises instead).

``fn``, ``first`` and ``second`` are picklable callables of one task (a block index). The
queue engine is different in kind (independent worker processes that lease tasks), so it
is driven by ``chunkflow produce``, the workers and ``chunkflow barrier`` instead of ``run``.
"""
from __future__ import annotations

import importlib
from typing import Protocol

from chunkflow.errors import EngineError

ENGINES = ("local", "dask")
MODES = ("barrier", "streaming")


class Engine(Protocol):
    name: str

    def map(self, fn, tasks, gpu: bool = False): ...

    def stream(self, first, second, firsts, dependencies, gpu: bool = False): ...

    def prepare(self, job): ...

    def close(self) -> None: ...


def check_options(engine: str, mode: str, workers: int | None = None, scheduler: str | None = None) -> None:
    """Refuse a bad combination before anything is planned or started."""
    if engine == "queue":
        raise EngineError("the queue engine runs as separate workers: `chunkflow produce JOB QUEUE`, then "
                          "`python inference_and_donate.py worker QUEUE` (see docs/fleet.md)")
    if engine not in ENGINES:
        raise EngineError(f"engine {engine!r} is not one of {', '.join(ENGINES)} (queues: `chunkflow produce`)")
    if mode not in MODES:
        raise EngineError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise EngineError(f"--workers {workers!r} must be a positive integer")
    if engine == "local" and (workers not in (None, 1) or scheduler):
        raise EngineError("--workers and --scheduler need --engine dask")
    if scheduler is not None and (not isinstance(scheduler, str) or "://" not in scheduler):
        raise EngineError(f"--scheduler {scheduler!r} is not a scheduler address such as tcp://host:8786")
    if engine == "dask":
        try:
            importlib.import_module("distributed")
        except ImportError:
            raise EngineError("--engine dask needs dask[distributed]: pip install 'chunkflow[dask]'") from None
    if scheduler is not None and workers is not None:
        raise EngineError(f"--workers {workers} sizes the LocalCluster chunkflow starts; with --scheduler the "
                          "cluster's own workers run the tasks: leave out --workers (or --scheduler)")


def make_engine(engine: str = "local", workers: int | None = None, scheduler: str | None = None,
                gpu: bool = False) -> Engine:
    """An engine by name: ``local`` (this process) or ``dask`` (LocalCluster, or ``scheduler``)."""
    check_options(engine, "barrier", workers, scheduler)
    if engine == "local":
        from chunkflow.engines.local import LocalEngine

        return LocalEngine()
    try:
        from chunkflow.engines.dask import DaskEngine
    except ImportError:
        raise EngineError("the dask engine needs dask[distributed]: pip install 'chunkflow[dask]'") from None
    return DaskEngine(workers=workers, scheduler=scheduler, gpu=gpu)
