"""Helpers shared by the engine, queue and kill tests: small real jobs, real worker processes,
and a watcher that SIGKILLs whichever process parks at a fault-injection point
(``chunkflow.engines.faults``). No tests here."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from chunkflow.planning import plan
from chunkflow.stages import Resources, reference
from chunkflow.storage import open_store, open_volume
from tests.helpers import CONV3, make_input

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SCRIPTS = {1: str(ROOT / "inference_and_donate.py"), 2: str(ROOT / "receive_and_blend.py")}

# 16x64x64 in 8 blocks of 8x32x32, storage chunks 8x16x16 (so blocks have a core and a band)
SHAPE = (16, 64, 64)
FLAGS = {"identity": dict(input_patch="8,32,32", overlap="2,8,8", block="8,32,32"),
         "conv3": dict(input_patch="14,38,38", output_patch="8,32,32", overlap="2,8,8", block="8,32,32")}


def tasks_run(summary: str) -> int:
    """The tasks a worker's or a run's summary line says it ran (``... 1 task run`` or ``... 8 tasks run``)."""
    match = re.search(r": (\d+) tasks? run", summary)
    assert match, summary
    return int(match.group(1))


def small_job(tmp: Path, model: str = "identity", seed: int = 1):
    url, _ = make_input(tmp / "in", SHAPE, seed=seed, chunk=(8, 16, 16))
    return plan(url, f"file://{tmp / 'out'}", str(tmp / "job"), CONV3 if model == "conv3" else model,
                storage_chunk="8,16,16", **FLAGS[model])


def run_flags(job, model: str = "identity") -> list[str]:
    """``chunkflow run`` flags that re-plan exactly ``job`` (the same hash)."""
    flags = ["--input", job.input, "--output", job.output, "--donations", job.store,
             "--model", CONV3 if model == "conv3" else model]
    for name, value in FLAGS[model].items():
        flags += [f"--{name.replace('_', '-')}", value]
    return flags


def assert_complete_and_exact(job) -> None:
    """Every expected donation exists exactly once (no more keys, none missing), every block is
    done, and the output equals the whole-volume reference."""
    store = open_store(job.store)
    expected = {d.key for b in job.layout.block_indices() for d in job.layout.donations_to(b)}
    present = {name[len("donations/"):] for name in store.list("donations/")}
    assert present == expected
    for stage in (1, 2):
        assert len(list(store.list(f"done/stage{stage}/"))) == job.layout.num_blocks
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, reference(job, Resources(job)), rtol=0, atol=1e-5)


def fleet_env(pause_dir: Path | None = None, points: str = "", **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CHUNKFLOW_TEST_PAUSE_AT=points,
               CHUNKFLOW_TEST_PAUSE_DIR=str(pause_dir or ROOT), CHUNKFLOW_TEST_PAUSE_SECONDS="120", **extra)
    if not points:
        env.pop("CHUNKFLOW_TEST_PAUSE_AT")
    return env


class Killer:
    """SIGKILLs every process that parks at a pause point (each point at most once)."""

    def __init__(self, pause_dir: Path):
        self.dir = pause_dir
        self.killed: dict[str, int] = {}

    def poll(self) -> list[int]:
        pids = []
        for path in self.dir.glob("*.pid"):
            if path.stem not in self.killed:
                pid = int(path.read_text())
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.killed[path.stem] = pid
                pids.append(pid)
        return pids


def worker(stage: int, queue: str, env: dict, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([PY, SCRIPTS[stage], "worker", queue, "--lease", "2", "--poll", "0.2", "--quiet", *flags],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_fleet(stage: int, queue: str, env: dict, killer: Killer | None = None, size: int = 2,
              timeout: float = 90, flags: tuple = ()) -> list[str]:
    """Keep ``size`` workers of ``stage`` on ``queue`` until they all stop by themselves; a worker
    the killer kills is replaced (as Kubernetes restarts a pod). Returns the survivors' summaries."""
    procs = [worker(stage, queue, env, *flags) for _ in range(size)]
    outputs, deadline = [], time.monotonic() + timeout
    try:
        while procs:
            assert time.monotonic() < deadline, "the fleet did not finish in time"
            killed = set(killer.poll()) if killer else set()
            for proc in list(procs):
                if proc.pid in killed:
                    proc.wait()
                    procs.remove(proc)
                    procs.append(worker(stage, queue, env, *flags))
                elif proc.poll() is not None:
                    out, err = proc.communicate()
                    assert proc.returncode == 0, f"worker exited {proc.returncode}: {err[-2000:]}"
                    outputs.append(out)
                    procs.remove(proc)
            time.sleep(0.05)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return outputs
