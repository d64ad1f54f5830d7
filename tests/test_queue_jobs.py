"""Queue workers serve one job (issue 14): a worker bound to a job (``--job``, or the job of its
first task) hands other jobs' tasks back in one line and never runs them; two jobs sharing one
queue, each with its own workers, both finish exactly."""
from __future__ import annotations

import subprocess

import pytest

from chunkflow.engines.queue import barrier, open_queue, produce
from chunkflow.storage import open_store
from tests.test_engines_support import assert_complete_and_exact, fleet_env, small_job, worker

pytestmark = pytest.mark.integration  # every test here starts real worker processes

HANDED_BACK = "handing back tasks of job"


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return out, err


def _done(job, stage: int) -> int:
    return len(list(open_store(job.store).list(f"done/stage{stage}/")))


def test_a_worker_of_one_job_hands_back_another_jobs_task_in_one_line(tmp_path):
    mine, other = small_job(tmp_path / "a"), small_job(tmp_path / "b", seed=2)
    queue = f"fq://{tmp_path / 'q'}"
    produce(other, queue)  # the queue holds only the other job's tasks
    _, err = _finish(worker(1, queue, fleet_env(), "--job", mine.store))
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and HANDED_BACK in lines[0], err
    assert other.job_hash in lines[0] and mine.job_hash in lines[0]
    assert open_queue(queue).enqueued == other.layout.num_blocks  # every task handed back, none deleted
    assert _done(other, 1) == 0 and _done(mine, 1) == 0
    assert not list(open_store(other.store).list("running/")) and not list(open_store(other.store).list("failed/"))


def test_a_worker_without_job_binds_to_the_job_of_its_first_task(tmp_path):
    first, second = small_job(tmp_path / "a"), small_job(tmp_path / "b", seed=2)
    queue = f"fq://{tmp_path / 'q'}"
    produce(first, queue)
    produce(second, queue)
    _finish(worker(1, queue, fleet_env(), "--slots", "2"))
    done = sorted([_done(first, 1), _done(second, 1)])
    assert done == [0, first.layout.num_blocks], done  # one job complete, the other untouched
    assert open_queue(queue).enqueued == first.layout.num_blocks


def test_two_jobs_in_one_queue_each_with_its_own_workers_finish_exactly(tmp_path):
    jobs = [small_job(tmp_path / "a"), small_job(tmp_path / "b", seed=2)]
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    env = fleet_env()
    for job in jobs:
        produce(job, one)
    procs = [worker(1, one, env, "--job", job.store) for job in jobs]
    errors = [_finish(proc)[1] for proc in procs]
    assert all(err.count(HANDED_BACK) <= 1 for err in errors)  # one line per other job, at most
    for job in jobs:
        assert _done(job, 1) == job.layout.num_blocks
        barrier(job, two, poll=0.2, timeout=60)
    procs = [worker(2, two, env, "--job", job.store) for job in jobs]
    for proc in procs:
        _finish(proc)
    for job in jobs:
        assert_complete_and_exact(job)
    assert open_queue(one).enqueued == 0 and open_queue(two).enqueued == 0
