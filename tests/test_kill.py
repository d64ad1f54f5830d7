"""Invariant 2 with real processes: SIGKILL workers before, during and after their writes, in both
stages, on the Dask engine and on fq:// queue workers; the job still completes (Dask reschedules,
the lease runs out) and the output equals the whole-volume reference, with every donation present
once. The kill points come from the test-only hook in ``chunkflow.engines.faults``."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from chunkflow.engines.queue import barrier, produce
from tests.test_engines_support import PY, ROOT, Killer, assert_complete_and_exact, fleet_env, run_fleet, \
    run_flags, small_job

pytestmark = pytest.mark.integration  # every test here starts real worker processes

# Two runs per engine arm every (stage, point) pair once: each run kills two stage-one and two
# stage-two tasks.
ARMS = {
    "a": "stage1:before-write,stage1:after-write,stage2:during-write,stage2:after-done",
    "b": "stage1:during-write,stage1:after-done,stage2:before-write,stage2:after-write",
}


@pytest.mark.parametrize("arm, mode", [("a", "barrier"), ("b", "streaming")])
def test_dask_survives_killed_workers(tmp_path, arm, mode):
    job = small_job(tmp_path)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    proc = subprocess.Popen([PY, "-m", "chunkflow.cli", "run", *run_flags(job), "--engine", "dask", "--workers", "2",
                             "--mode", mode, "--quiet"], env=fleet_env(pauses, ARMS[arm]), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer, deadline = Killer(pauses), time.monotonic() + 120
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "chunkflow run did not finish"
            killer.poll()
            time.sleep(0.05)
        out, err = proc.communicate()
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert set(killer.killed) == {p.replace(":", "-") for p in ARMS[arm].split(",")}
    assert_complete_and_exact(job)
    # rescheduled attempts are reported (a count, "1 retry" or "N retries"; once, under -n 2, stage two's two
    # kills were reported as "1 retry": not reproduced, named in the closing note of 2026-11-28)
    assert re.search(r"\b[1-9]\d* retr(y|ies)\b", out), out


@pytest.mark.parametrize("arm", ["a", "b"])
def test_fq_workers_survive_being_killed(tmp_path, arm):
    job = small_job(tmp_path)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env, killer = fleet_env(pauses, ARMS[arm]), Killer(pauses)
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    assert produce(job, one) == job.layout.num_blocks
    run_fleet(1, one, env, killer)
    assert barrier(job, two, poll=0.2, timeout=30) == job.layout.num_blocks
    run_fleet(2, two, env, killer)
    assert set(killer.killed) == {p.replace(":", "-") for p in ARMS[arm].split(",")}
    assert_complete_and_exact(job)
