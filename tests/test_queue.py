"""Task-queue fleets: sqs:// against a real moto server, fq:// duplicates, and the refusals
(a queue of another job, a manifest changed after planning, a stage-one queue given to a
stage-two worker, stage two produced early), and --cleanup on stage-two workers."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fire
import numpy as np
import pytest

from chunkflow.cli import COMMANDS
from chunkflow.cli.stages import main as stage_main
from chunkflow.engines.queue import barrier, open_queue, produce
from chunkflow.job import Job
from chunkflow.store_layout import MANIFEST
from chunkflow.stages import Resources, reference
from chunkflow.storage import open_store, open_volume
from tests.test_engines_support import assert_complete_and_exact, fleet_env, run_fleet, small_job, tasks_run, \
    worker



def _sqs_queue(name: str) -> str:
    import boto3

    boto3.client("sqs", region_name="us-east-1").create_queue(QueueName=name)
    return f"sqs://{name}"


def test_sqs_fleet_with_barrier_equals_reference(tmp_path, sqs_endpoint):
    job = small_job(tmp_path)
    one, two = _sqs_queue(f"one-{uuid.uuid4().hex[:8]}"), _sqs_queue(f"two-{uuid.uuid4().hex[:8]}")
    assert produce(job, one) == job.layout.num_blocks
    assert open_queue(one).enqueued == job.layout.num_blocks
    run_fleet(1, one, fleet_env())
    assert open_queue(one).enqueued == 0
    assert barrier(job, two, poll=0.2, timeout=30) == job.layout.num_blocks
    outputs = run_fleet(2, two, fleet_env())
    assert sum(tasks_run(o) for o in outputs) == job.layout.num_blocks
    assert_complete_and_exact(job)


def test_missing_sqs_queue_ends_in_one_line(tmp_path, sqs_endpoint, capsys):
    job = small_job(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, ["produce", job.store, "sqs://no-such-queue", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "cannot use queue sqs://no-such-queue" in err and len(err.splitlines()) == 1


@pytest.mark.integration  # queue worker processes
def test_fq_every_task_twice_equals_reference(tmp_path, capsys):
    """Each task is in the queue twice and forced: both copies run, on two workers."""
    job = small_job(tmp_path)
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    produce(job, one)
    produce(job, one, force=True)
    fire.Fire(COMMANDS, ["status", job.store, "--queue", one, "--json"])
    assert json.loads(capsys.readouterr().out)["queue"]["enqueued"] == 2 * job.layout.num_blocks
    run_fleet(1, one, fleet_env(), flags=("--force",))
    produce(job, two, stage=2)
    produce(job, two, stage=2, force=True)
    run_fleet(2, two, fleet_env(), flags=("--force",))
    fire.Fire(COMMANDS, ["status", job.store, "--queue", one, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["queue"]["completed"] == 2 * job.layout.num_blocks and report["queue"]["enqueued"] == 0
    assert produce(job, one) == 0 and produce(job, two, stage=2) == 0  # nothing left to produce
    assert_complete_and_exact(job)


def _refused(capsys, stage: int, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        stage_main(stage, argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_worker_refuses_a_manifest_changed_after_planning(tmp_path, capsys):
    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    manifest = Path(tmp_path / "job" / MANIFEST)
    raw = json.loads(manifest.read_text())
    raw["blend"] = "constant"
    manifest.write_text(json.dumps(raw))  # edited, hash not updated
    assert "was changed after planning" in _refused(capsys, 1, ["worker", queue, "--quiet"])
    raw["job_hash"] = ""
    manifest.write_text(Job(**raw).to_json())  # a consistent manifest of another job
    assert "the manifest changed after the tasks were produced" in _refused(capsys, 1, ["worker", queue, "--quiet"])
    assert open_queue(queue).enqueued == job.layout.num_blocks


def test_stage_two_worker_refuses_stage_one_tasks_and_early_stage_two(tmp_path, capsys):
    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    assert "receive_and_blend workers take stage-two tasks" in _refused(capsys, 2, ["worker", queue, "--quiet"])
    with pytest.raises(SystemExit):
        fire.Fire(COMMANDS, ["produce", job.store, queue, "--stage", "2", "--quiet"])
    assert "stage one of job" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fire.Fire(COMMANDS, ["barrier", job.store, queue, "--poll", "0.1", "--timeout", "0.3", "--quiet"])
    assert "8 of 8 blocks not done" in capsys.readouterr().err


# ---- fq:// paths: only produce and barrier create a queue ------------------------------------

@pytest.mark.parametrize("url", ["fq://{tmp}/nonexistent/deeper", "fq://relative/dir", "fq://", "fq://{tmp}"])
def test_worker_refuses_an_fq_path_without_a_queue_and_creates_nothing(tmp_path, monkeypatch, capsys, url):
    monkeypatch.chdir(tmp_path)  # where a relative fq:// path would be created
    url = url.format(tmp=tmp_path)
    for stage in (1, 2):
        err = _refused(capsys, stage, ["worker", url, "--quiet"])
        assert url in err and ("no queue at" in err or "absolute directory" in err), err
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, ["status", str(tmp_path / "nojob"), "--queue", url])
    assert exit_.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_status_refuses_a_mistyped_queue_and_produce_a_relative_one(tmp_path, monkeypatch, capsys):
    job = small_job(tmp_path)
    produce(job, f"fq://{tmp_path / 'q'}")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    for argv in (["status", job.store, "--queue", f"fq://{tmp_path / 'qq'}"],
                 ["produce", job.store, "fq://q2", "--quiet"], ["barrier", job.store, "fq://", "--quiet"]):
        with pytest.raises(SystemExit) as exit_:
            fire.Fire(COMMANDS, argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    fire.Fire(COMMANDS, ["status", job.store, "--queue", f"fq://{tmp_path / 'q'}", "--json"])
    assert json.loads(capsys.readouterr().out)["queue"]["enqueued"] == job.layout.num_blocks


# ---- numbers that Fire passes through as strings ---------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lease", "abc"], "--lease 'abc' must be a number of seconds, at least 1"),
    (["--lease", "0.5"], "--lease 0.5 must be a number of seconds, at least 1"),
    (["--poll", "abc"], "--poll 'abc' must be a number of seconds above 0"),
    (["--max-tasks", "abc"], "--max-tasks 'abc' must be a whole number, at least 1"),
    (["--max-tasks", "1.5"], "--max-tasks 1.5 must be a whole number, at least 1"),
    (["--batch-size", "abc"], "--batch-size 'abc' must be a whole number, at least 1"),
])
def test_worker_refuses_non_numbers_before_leasing(tmp_path, capsys, flags, message):
    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    assert message in _refused(capsys, 1, ["worker", queue, *flags, "--quiet"])
    assert open_queue(queue).enqueued == job.layout.num_blocks and open_queue(queue).leased == 0


@pytest.mark.parametrize("argv, message", [
    (["barrier", "{job}", "{q}", "--timeout", "abc", "--poll", "0.1"], "--timeout 'abc' must be a number of seconds"),
    (["barrier", "{job}", "{q}", "--poll", "abc"], "--poll 'abc' must be a number of seconds above 0"),
    (["produce", "{job}", "{q}", "--stage", "abc"], "--stage 'abc' must be 1 or 2"),
    (["produce", "{job}", "{q}", "--stage"], "--stage True must be 1 or 2"),
])
def test_fleet_commands_refuse_non_numbers(tmp_path, capsys, argv, message):
    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, [a.format(job=job.store, q=queue) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "q").exists()


# ---- a task of the other stage -----------------------------------------------------------------

def _stage_one_done(job, capsys) -> None:
    stage_main(1, ["run", job.store, "--quiet"])
    capsys.readouterr()


@pytest.mark.integration  # a queue worker process
def test_waiting_stage_one_worker_hands_stage_two_tasks_back_and_keeps_polling(tmp_path, capsys):
    """`--wait` means serve forever: a stage-two task is left for stage-two workers."""
    job = small_job(tmp_path)
    _stage_one_done(job, capsys)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue, stage=2)
    proc = worker(1, queue, fleet_env(), "--wait")
    try:
        deadline = time.monotonic() + 60
        # a lease (handed back or not) gives the task file a timestamp; tasks are inserted at 0
        while all(p.name.startswith("0--") for p in (tmp_path / "q" / "queue").iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(1.5)  # several more polls
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert open_queue(queue).enqueued == job.layout.num_blocks
    assert not list((tmp_path / "job").glob("done/stage2/*"))


def test_tasks_of_another_job_are_handed_back_never_run_or_deleted(tmp_path, capsys, caplog):
    """`--job` is checked for tasks of either stage: another job's tasks go back to the queue untouched,
    with one line, and the worker stops once it finds none of its own (tests/test_queue_jobs.py)."""
    job, other = small_job(tmp_path / "a"), small_job(tmp_path / "b", seed=2)
    _stage_one_done(job, capsys)
    flags = ["--job", other.store, "--quiet", "--lease", "1", "--poll", "0.1"]
    two = f"fq://{tmp_path / 'q2'}"
    produce(job, two, stage=2)
    stage_main(2, ["worker", two, *flags])
    said = caplog.text  # the line (a warning) is checked on a real worker's stderr in tests/test_queue_jobs.py
    assert "handing back tasks of job" in said and job.job_hash in said and other.job_hash in said
    assert open_queue(two).enqueued == job.layout.num_blocks
    one = f"fq://{tmp_path / 'q1'}"
    produce(job, one, force=True)  # stage-one tasks of blocks that are done: strays for a stage-two worker...
    stage_main(2, ["worker", one, *flags])
    assert open_queue(one).enqueued == job.layout.num_blocks  # ...of its own job only, never deleted for another
    assert len(list(open_store(job.store).list("done/stage2/"))) == 0


# ---- the lease keeper never holds a finished task for long -------------------------------------

def test_lease_keeper_stop_does_not_wait_for_a_renewal_that_retries(tmp_path):
    """A renewal that cannot get the task's lock is retried with backoff by python-task-queue
    (tens of seconds); stopping the keeper gives up on it after LEASE_STOP_TIMEOUT."""
    from chunkflow.engines.lease import LEASE_STOP_TIMEOUT, LeaseKeeper as _LeaseKeeper

    job = small_job(tmp_path)
    queue_url = f"fq://{tmp_path / 'q'}"
    produce(job, queue_url)
    queue = open_queue(queue_url)
    task = queue.lease(seconds=60, num_tasks=1, wait_sec=0)
    movement = tmp_path / "q" / "movement" / task.id
    holder = subprocess.Popen(  # another process holds the task's lock, as a slow NFS peer might
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(120)", str(movement)], stdout=subprocess.PIPE, text=True)
    keeper = _LeaseKeeper(queue, task, 3)
    try:
        assert holder.stdout.readline().strip() == "locked"
        keeper.start()
        time.sleep(1.5)  # the first renewal started at 1 s and is retrying
        t = time.monotonic()
        keeper.stop()
        assert time.monotonic() - t < LEASE_STOP_TIMEOUT + 2
    finally:
        holder.kill()
        holder.wait()
    keeper.join(90)  # the lock is free again: the renewal goes through or gives up
    assert not keeper.is_alive()


# ---- --cleanup on stage-two workers ------------------------------------------------------------

def test_stage_two_worker_cleanup_removes_consumed_and_leftover_donations(tmp_path, capsys):
    """`receive_and_blend worker --cleanup` deletes each block's donations once it is written, and
    those a late duplicate of a donor wrote again when a finished block's task is leased again."""
    job = small_job(tmp_path)
    store = open_store(job.store)
    _stage_one_done(job, capsys)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue, stage=2)
    assert "--cleanup is a stage-two flag" in _refused(capsys, 1, ["worker", queue, "--cleanup", "--quiet"])
    assert open_queue(queue).enqueued == job.layout.num_blocks and open_queue(queue).leased == 0
    stage_main(2, ["worker", queue, "--cleanup", "--poll", "0.1", "--quiet"])
    assert "receive-and-blend worker: 8 tasks run" in capsys.readouterr().out
    assert not list(store.list("donations/")) and len(list(store.list("done/stage2/"))) == 8
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, reference(job, Resources(job)), rtol=0, atol=1e-5)

    donor = next(b for b in job.layout.block_indices() if len(job.layout.donations_from(b)) > 4)
    stage_main(1, ["run", job.store, "--blocks", job.layout.block_box(donor).name, "--force", "--quiet"])
    late = len(job.layout.donations_from(donor))
    assert len(list(store.list("donations/"))) == late
    assert produce(job, queue, stage=2, force=True) == job.layout.num_blocks  # duplicates of finished tasks
    capsys.readouterr()
    stage_main(2, ["worker", queue, "--cleanup", "--poll", "0.1", "--quiet"])
    out = capsys.readouterr().out
    assert "0 tasks run, 8 skipped (already done)" in out
    assert out.rstrip().endswith(f", {late} leftover donations of finished blocks removed"), out
    assert not list(store.list("donations/")) and open_queue(queue).enqueued == 0
    np.testing.assert_array_equal(open_volume(job.output).read(job.layout.bbox), output)
