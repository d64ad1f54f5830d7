"""The Dask engine's GPU plumbing without a GPU: a real scheduler, real `dask worker` processes,
one of which declares ``--resources GPU=1``. Stage-one tasks of a CUDA job must land only on GPU
workers; an engine attached to a cluster whose GPU workers have not joined yet waits for them;
one that never gets one ends in one line."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from distributed import LocalCluster, get_worker

from chunkflow.engines.base import EngineError
from chunkflow.engines.dask import DaskEngine, PinGPU, _visible_gpus
from tests.test_engines_support import PY, ROOT


def worker_name(task: int) -> str:
    return str(get_worker().name)


@pytest.fixture()
def scheduler():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0")
    workers: list[subprocess.Popen] = []

    def start_gpu_worker(name: str = "gpu0") -> None:
        workers.append(subprocess.Popen(
            [PY, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "1",
             "--resources", "GPU=1", "--name", name, "--no-dashboard"],
            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    yield cluster.scheduler_address, start_gpu_worker
    for proc in workers:
        proc.kill()
        proc.wait()
    cluster.close()


@pytest.mark.integration  # a Dask cluster and `dask worker` processes
def test_gpu_tasks_run_only_on_gpu_workers_that_join_late(scheduler):
    address, start_gpu_worker = scheduler
    threading.Timer(1.0, start_gpu_worker).start()  # joins while the engine is already waiting
    engine = DaskEngine(scheduler=address, gpu=True, gpu_wait=60)
    try:
        on_gpu = {name for _, name in engine.map(worker_name, range(12), gpu=True)}
        anywhere = {name for _, name in engine.map(worker_name, range(12), gpu=False)}
    finally:
        engine.close()
    assert on_gpu == {"gpu0"}
    assert anywhere <= {"gpu0", "0"} and anywhere  # CPU tasks may use any worker


@pytest.mark.integration  # a Dask cluster
def test_no_gpu_worker_ends_in_one_line(scheduler):
    address, _ = scheduler
    started = time.monotonic()
    with pytest.raises(EngineError, match="declares a GPU after 0.5 s.*--resources GPU=1"):
        DaskEngine(scheduler=address, gpu=True, gpu_wait=0.5)
    assert time.monotonic() - started >= 0.5


def test_local_cluster_workers_pin_the_gpus_this_process_may_use(monkeypatch):
    """Under SLURM --gres the parent sees e.g. GPUs 2,3: workers must not be pinned to 0 and 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    devices = _visible_gpus(2)
    assert devices == ["2", "3"]

    class Worker:
        def __init__(self, name):
            self.name = name

    for name, want in ((0, "2"), (1, "3"), (2, "2")):
        PinGPU(devices).setup(Worker(name))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == want
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_gpus(3) == ["0", "1", "2"]
