"""Stage-one queue workers keep the model busy: with two slots (the default) one task reads or
writes while the other computes; with one slot the worker leases the next task ahead and reads its
input in the background. The reads, the --max-tasks bound, and that every leased task is handed
back when the worker stops."""
from __future__ import annotations

import subprocess
import time

import pytest

from chunkflow.engines.queue import open_queue, produce
from chunkflow.storage import open_store
from tests.test_engines_support import PY, ROOT, SCRIPTS, assert_complete_and_exact, fleet_env, small_job
from tests.test_queue import _stage_one_done

# ---- stage-one workers lease the next task ahead and read its input in the background ----------

def _record_reads(job) -> list[str]:
    """Names of the threads that read ``job``'s input in this process's worker Resources (the
    ones ``work`` uses), until the test ends."""
    import threading

    from chunkflow.engines.task import worker_resources

    res, threads = worker_resources(job), []
    plain = res.read_input

    def read(box):
        threads.append(threading.current_thread().name)
        return plain(box)

    res.read_input = read
    return threads


def _count_leases(monkeypatch) -> list[int]:
    from taskqueue import TaskQueue

    leases, plain = [], TaskQueue.lease

    def lease(self, *args, **kwargs):
        task = plain(self, *args, **kwargs)
        leases.append(1)
        return task

    monkeypatch.setattr(TaskQueue, "lease", lease)
    return leases


def _prefetched(threads: list[str]) -> int:
    return sum(name.startswith("chunkflow-prefetch") for name in threads)


def test_stage_one_worker_reads_each_next_input_in_the_background(tmp_path):
    from chunkflow.engines.queue_worker import work

    job = small_job(tmp_path)
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    produce(job, one)
    threads = _record_reads(job)
    summary = work(one, 1, lease=30, poll=0.1, slots=1)
    with_input = sum(job.layout.chunk_box(b) is not None for b in job.layout.block_indices())
    assert summary.tasks == job.layout.num_blocks == 8 and len(threads) == with_input
    assert _prefetched(threads) == with_input - 1  # every input but the first, while the previous block ran
    assert open_queue(one).enqueued == 0
    produce(job, two, stage=2)
    assert work(two, 2, poll=0.1).tasks == 8
    assert_complete_and_exact(job)


def test_stage_one_worker_without_lookahead_reads_inputs_when_tasks_start(tmp_path, monkeypatch):
    from chunkflow.engines.queue_worker import work

    job = small_job(tmp_path)
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one)
    threads, leases = _record_reads(job), _count_leases(monkeypatch)
    assert work(one, 1, lease=30, poll=0.1, lookahead=False, slots=1).tasks == 8
    assert len(threads) == 8 and _prefetched(threads) == 0 and len(leases) == 8


def test_max_tasks_leases_no_more_than_it_runs(tmp_path, monkeypatch):
    """--max-tasks 3: three leases, three tasks run (two of them prefetched), five left unleased."""
    from chunkflow.engines.queue_worker import work

    job = small_job(tmp_path)
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one)
    threads, leases = _record_reads(job), _count_leases(monkeypatch)
    summary = work(one, 1, lease=30, poll=0.1, max_tasks=3, slots=1)
    assert summary.tasks == 3 and len(leases) == 3
    assert len(threads) == 3 and _prefetched(threads) == 2
    queue = open_queue(one)
    assert queue.enqueued == 5 and queue.leased == 0
    assert len(list(open_store(job.store).list("done/stage1/"))) == 3


@pytest.mark.parametrize("error", [SystemExit(143), KeyboardInterrupt()])
def test_a_task_leased_ahead_is_handed_back_when_the_worker_stops(tmp_path, monkeypatch, error):
    """SIGTERM (SystemExit) or Ctrl-C hands back both the current task and the one leased ahead. (A
    task that raises does not stop the worker: tests/test_queue_healing.py.)"""
    import chunkflow.engines.queue_worker as queue_module

    job = small_job(tmp_path)
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one)
    leases = _count_leases(monkeypatch)

    def failing(*args, **kwargs):
        assert kwargs.get("prefetch_next") is not None  # the task after it was leased and is prefetched
        raise error

    monkeypatch.setattr(queue_module, "run_task", failing)
    with pytest.raises(type(error)):
        queue_module.work(one, 1, lease=30, poll=0.1, slots=1)
    queue = open_queue(one)
    assert len(leases) == 2 and queue.enqueued == 8 and queue.leased == 0
    assert not list(open_store(job.store).list("done/stage1/"))


def test_a_stage_two_task_leased_ahead_is_handed_back_and_stops_the_worker(tmp_path, monkeypatch, capsys):
    """The task leased ahead is taken up after the current one as if it had been leased then: a
    stage-two task ends a stage-one worker, handed back, and the current task is still done."""
    from taskqueue import TaskQueue

    from chunkflow.engines.queue_worker import work

    job = small_job(tmp_path)
    _stage_one_done(job, capsys)
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one, blocks=[next(iter(job.layout.block_indices()))], force=True)
    plain, leases = TaskQueue.lease, []

    def lease(self, *args, **kwargs):
        task = plain(self, *args, **kwargs)
        leases.append(task.kwargs["stage"])
        if len(leases) == 1:
            produce(job, one, stage=2)  # only stage-two tasks are left to lease ahead
        return task

    monkeypatch.setattr(TaskQueue, "lease", lease)
    summary = work(one, 1, lease=30, poll=0.1, force=True, slots=1)
    assert leases == [1, 2] and summary.tasks == 1
    queue = open_queue(one)
    assert queue.enqueued == job.layout.num_blocks and queue.leased == 0


@pytest.mark.integration  # a queue worker process
def test_sigterm_hands_back_the_current_task_and_the_one_leased_ahead(tmp_path):
    """A real worker process (two slots), terminated while one slot is stuck in a write (as
    Kubernetes or SLURM preemption does): it exits at once, every lease comes back at once, not
    after the lease runs out, and nothing was deleted unrun."""
    import signal

    job = small_job(tmp_path)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one)
    proc = subprocess.Popen([PY, SCRIPTS[1], "worker", one, "--lease", "600", "--poll", "0.2", "--quiet"], cwd=ROOT,
                            env=fleet_env(pauses, "stage1:before-write"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # leases that outlive the test unless handed back
    try:
        deadline = time.monotonic() + 60
        while not (pauses / "stage1-before-write.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        # at most two tasks per slot: one reading or on the model, one writing behind (stage_pipeline)
        assert 2 <= open_queue(one).leased <= 4
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    queue, store = open_queue(one), open_store(job.store)
    done = len(list(store.list("done/stage1/")))  # the other slot goes on with other blocks meanwhile
    assert proc.returncode == 143 and queue.enqueued == 8 - done and queue.leased == 0 and done < 8
    assert not list(store.list("running/stage1/"))  # an interrupted attempt is not a failed one


# ---- two slots (the default): two tasks in flight, each leased and deleted on its own ----------

def test_two_slots_run_every_task_once_and_exactly(tmp_path):
    from chunkflow.engines.queue_worker import work

    job = small_job(tmp_path)
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    produce(job, one)
    threads = _record_reads(job)
    summary = work(one, 1, lease=30, poll=0.1)
    assert summary.tasks == job.layout.num_blocks == 8 and summary.stats.patches == job.layout.num_patches
    # every input is read on a slot's thread (that two slots overlap is shown in tests/test_stages.py;
    # which slot leases which task is up to the queue, and one slot may take them all)
    assert set(threads) <= {f"chunkflow-slot-{i}" for i in range(4)} and len(threads) == 8  # 2 lease loops a slot
    assert open_queue(one).enqueued == 0
    produce(job, two, stage=2)
    assert work(two, 2, poll=0.1).tasks == 8
    assert_complete_and_exact(job)


def test_two_slots_respect_max_tasks(tmp_path):
    from chunkflow.engines.queue_worker import work

    job = small_job(tmp_path)
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one)
    summary = work(one, 1, lease=30, poll=0.1, max_tasks=3)
    assert summary.tasks == 3
    queue = open_queue(one)
    assert queue.enqueued == 5 and queue.leased == 0
    assert len(list(open_store(job.store).list("done/stage1/"))) == 3


def test_a_failing_slot_stops_the_other_and_hands_everything_back(tmp_path, monkeypatch):
    """Ctrl-C in one slot's task: both slots stop, every leased task is back in the queue, no done
    marker was written for a task that did not finish."""
    import chunkflow.engines.queue_worker as queue_module

    job = small_job(tmp_path)
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one)
    plain, calls = queue_module.run_task, []

    def second_raises(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt()
        return plain(*args, **kwargs)

    monkeypatch.setattr(queue_module, "run_task", second_raises)
    with pytest.raises(KeyboardInterrupt):
        queue_module.work(one, 1, lease=30, poll=0.1)
    queue = open_queue(one)
    done = len(list(open_store(job.store).list("done/stage1/")))
    assert queue.leased == 0 and queue.enqueued == 8 - done and done <= 2
    assert not list(open_store(job.store).list("running/stage1/"))


def test_a_stage_one_worker_with_two_slots_meeting_stage_two_says_stage_one_is_over_once(tmp_path, capsys, caplog):
    """Each slot of a stage-one worker that meets stage-two tasks stops; the worker says why once."""
    import logging

    from chunkflow.engines.queue_worker import work

    job = small_job(tmp_path)
    _stage_one_done(job, capsys)
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one, stage=2)
    with caplog.at_level(logging.INFO, logger="chunkflow"):
        summary = work(one, 1, lease=30, poll=0.1, slots=2)
    assert summary.tasks == 0
    said = [r for r in caplog.records if "stage one is over" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert open_queue(one).enqueued == job.layout.num_blocks  # every stage-two task handed back
