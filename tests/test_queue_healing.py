"""Fleets that heal: a queue worker whose task raises hands it back and goes on, the task is given
up after --max-attempts (counted across workers, killed attempts included), `chunkflow status`
and `chunkflow barrier` name it, `produce` gives it fresh attempts once the cause is fixed, and a
running marker whose worker died is reported stale. Real worker processes on fq:// and sqs://
(moto_server) queues; the poison is a real model that raises on one voxel of the input."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import fire
import numpy as np
import pytest

from chunkflow.cli import COMMANDS
from chunkflow.engines.queue import barrier, open_queue, produce
from chunkflow.engines.queue_worker import work
from chunkflow.planning import plan
from chunkflow.status import job_status
from chunkflow.storage import open_store, open_volume
from tests.helpers import MODELS, make_input
from tests.test_engines_support import FLAGS, PY, ROOT, SHAPE, assert_complete_and_exact, fleet_env, small_job, \
    tasks_run, worker
from tests.test_queue import _refused, _sqs_queue

POISON_MODEL = str(MODELS / "poison.py")
POISON = 7.0  # tests/models/poison.py raises on any input voxel above 5


def poisoned_job(tmp: Path):
    """A job of the poison model with one poisoned input voxel that only the last block's patches
    read; returns (job, that block's name, a function that removes the poison)."""
    url, data = make_input(tmp / "in", SHAPE, seed=1, chunk=(8, 16, 16))
    job = plan(url, f"file://{tmp / 'out'}", str(tmp / "job"), POISON_MODEL, storage_chunk="8,16,16",
               **FLAGS["identity"])
    layout, readers = job.layout, np.zeros(SHAPE, dtype=int)
    blocks = list(layout.block_indices())
    for b in blocks:  # every block reads its chunk grown by the context margin
        readers[layout.chunk_box(b).grow(job.context_margin).slices(layout.bbox)] += 1
    target = blocks[-1]
    alone = np.zeros(SHAPE, dtype=bool)
    alone[layout.block_box(target).slices(layout.bbox)] = True
    voxel = (0, *map(int, np.argwhere(alone & (readers == 1))[0]))
    volume, clean = open_volume(url), float(data[voxel])
    data[voxel] = POISON
    volume.write(volume.bbox, data)

    def cure() -> None:
        data[voxel] = clean
        volume.write(volume.bbox, data)
    return job, layout.block_box(target).name, cure


def _finish(procs: list[subprocess.Popen], timeout: float = 90) -> list[tuple[int, str, str]]:
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return results


def _poison_fleet(job, block: str, queue: str, env: dict, extra: list[subprocess.Popen] = ()):
    """Two stage-one workers on ``queue`` until they stop; checks that the poisoned block was tried
    three times and given up by one of them while every other block was done."""
    produce(job, queue)
    results = _finish([worker(1, queue, env, "--max-attempts", "3") for _ in range(2)] + list(extra))
    workers, others = results[:2], results[2:]
    gave_up = f"chunkflow: error: inference-and-donate {block}: gave up after 3 attempts: unexpected " \
              "RuntimeError: poisoned input voxel"
    assert sorted(rc for rc, _, _ in workers) == [0, 1], workers  # the worker that gave up exits 1 (a bug)
    assert [gave_up in err for rc, _, err in workers] == [rc == 1 for rc, _, _ in workers]
    summaries = [out.strip().splitlines()[-1] for _, out, _ in workers]
    assert sum(tasks_run(s) for s in summaries) == job.layout.num_blocks - 1
    assert sum(int(m) for s in summaries for m in re.findall(r"(\d+) failed attempts? handed back", s)) == 2
    store = open_store(job.store)
    names = {job.layout.block_box(b).name for b in job.layout.block_indices()}
    assert {n.rsplit("/", 1)[1] for n in store.list("done/stage1/")} == names - {block}
    record = json.loads(store.get(f"failed/stage1/{block}"))
    assert (record["attempt"], record["max_attempts"], record["gave_up"], record["kind"], record["refusal"]) == \
        (3, 3, True, "RuntimeError", False)
    assert not list(store.list("running/stage1/")) and open_queue(queue).enqueued == 0
    return others


def _status(capsys, job, *flags: str) -> str:
    fire.Fire(COMMANDS, ["status", job.store, *flags])
    return capsys.readouterr().out


@pytest.mark.integration  # queue worker processes
def test_fq_fleet_gives_up_a_poison_task_barrier_names_it_and_produce_retries_it(tmp_path, capsys):
    job, block, cure = poisoned_job(tmp_path)
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    waiting = subprocess.Popen([PY, "-m", "chunkflow.cli", "barrier", job.store, two, "--poll", "0.2", "--timeout",
                                "120"], env=fleet_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    [(rc, out, err)] = _poison_fleet(job, block, one, fleet_env(), [waiting])

    # the barrier reported the block while it waited (at most once failing, once given up), then gave up
    reported = [line for line in err.splitlines() if line.startswith("barrier: stage one failed for")]
    assert reported and len(reported) == len(set(reported)) <= 2, err
    assert all(block in line for line in reported) and "gave up after 3 attempts" in reported[-1]
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith(f"chunkflow: error: stage one of job {job.job_hash} cannot complete: "
                                       f"1 of 8 blocks were given up: {block}: gave up after 3 attempts"), err
    assert "not complete after" not in err and not out  # not the timeout, and no stage two produced

    text = _status(capsys, job)
    assert "inference-and-donate        8      7        0       1" in text
    assert (f"failed: {block}: gave up after 3 attempts: unexpected RuntimeError: poisoned input voxel"
            in text), text
    report = json.loads(_status(capsys, job, "--json"))["stages"]["1"]
    assert (report["done"], report["failed"], report["failed_blocks"], report["gave_up_blocks"]) == \
        (7, 1, [block], [block])

    cure()  # the cause fixed: produce enqueues the block again, with fresh attempts
    assert produce(job, one) == 1
    assert not open_store(job.store).exists(f"failed/stage1/{block}")
    summary = work(one, 1, lease=10, poll=0.1)
    assert (summary.tasks, summary.retries, summary.failed) == (1, 0, 0)  # attempt 1 again
    assert barrier(job, two, poll=0.2, timeout=30) == job.layout.num_blocks
    assert work(two, 2, poll=0.1).tasks == job.layout.num_blocks
    assert_complete_and_exact(job)


@pytest.mark.usefixtures("sqs_endpoint")
def test_sqs_fleet_gives_up_a_poison_task(tmp_path, capsys):
    job, block, _ = poisoned_job(tmp_path)
    _poison_fleet(job, block, _sqs_queue(f"poison-{uuid.uuid4().hex[:8]}"), fleet_env())
    report = json.loads(_status(capsys, job, "--json"))["stages"]["1"]
    assert (report["done"], report["failed"], report["gave_up_blocks"]) == (7, 1, [block])


@pytest.mark.parametrize("max_attempts", [3, 4])
def test_a_block_whose_workers_were_killed_max_attempts_times_is_not_run_again(tmp_path, max_attempts):
    """Three attempts ended without a result (their running marker says attempt 3): with
    --max-attempts 3 the task is given up unrun, with 4 it runs a fourth time."""
    job = small_job(tmp_path)
    store, queue = open_store(job.store), f"fq://{tmp_path / 'q'}"
    name = job.layout.block_box(next(iter(job.layout.block_indices()))).name
    store.put(f"running/stage1/{name}", json.dumps({"job": job.job_hash, "block": name, "attempt": 3, "pid": 1,
                                                    "started": time.time() - 600}).encode())
    produce(job, queue)
    summary = work(queue, 1, lease=30, poll=0.1, max_attempts=max_attempts)
    assert open_queue(queue).enqueued == 0 and not store.exists(f"running/stage1/{name}")
    if max_attempts == 3:
        assert summary.tasks == 7 and summary.exit_status() == 1
        assert summary.given_up == [f"inference-and-donate {name}: gave up after 3 attempts: unexpected "
                                    "AttemptsExhausted: attempt 3 ended without a result: its worker was killed or "
                                    "lost (preempted? out of memory?)"]
        assert json.loads(store.get(f"failed/stage1/{name}"))["gave_up"] is True
        assert not store.exists(f"done/stage1/{name}")
    else:
        assert summary.tasks == 8 and summary.retries == 3 and not summary.given_up and summary.exit_status() == 0
        assert store.exists(f"done/stage1/{name}") and not store.exists(f"failed/stage1/{name}")


def test_a_task_that_fails_once_comes_back_after_a_delay_and_is_done(tmp_path, monkeypatch):
    """The worker does not stop: the failed task is handed back, invisible for a while (not at once,
    not for a whole lease), and its second attempt succeeds."""
    import chunkflow.engines.queue_worker as queue_worker

    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    victim = job.layout.block_box(next(iter(job.layout.block_indices()))).name
    plain, calls = queue_worker.run_task, []

    def flaky(job, stage, block, **kwargs):
        name = job.layout.block_box(block).name
        if name == victim:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise RuntimeError("transient")
        return plain(job, stage, block, **kwargs)

    monkeypatch.setattr(queue_worker, "run_task", flaky)
    summary = queue_worker.work(queue, 1, lease=3, poll=0.1)
    assert (summary.tasks, summary.failed, summary.given_up, summary.exit_status()) == (8, 1, [], 0)
    assert len(calls) == 2 and calls[1] - calls[0] >= 1.0  # FileQueue timestamps are whole seconds: 3 s, less 1
    assert len(list(open_store(job.store).list("done/stage1/"))) == 8 and open_queue(queue).enqueued == 0


def test_worker_refuses_max_attempts_that_is_not_a_whole_number(tmp_path, capsys):
    job = small_job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    for value in ("0", "abc", "1.5"):
        err = _refused(capsys, 1, ["worker", queue, "--max-attempts", value, "--quiet"])
        assert "--max-attempts" in err and "must be a whole number, at least 1" in err
    assert open_queue(queue).leased == 0


@pytest.mark.integration  # a queue worker process, killed
def test_status_reports_the_running_marker_of_a_killed_worker_stale(tmp_path, capsys):
    """A live worker refreshes its running marker's heartbeat at every lease renewal, so it is not
    stale however long its task takes; once SIGKILLed, its marker is stale after one lease."""
    job = small_job(tmp_path)
    pauses, queue = tmp_path / "pauses", f"fq://{tmp_path / 'q'}"
    pauses.mkdir()
    produce(job, queue)
    proc = worker(1, queue, fleet_env(pauses, "stage1:before-write"), "--slots", "1")  # --lease 2
    store = open_store(job.store)
    try:
        deadline = time.monotonic() + 60
        while not (pauses / "stage1-before-write.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        [marker] = list(store.list("running/stage1/"))
        block = marker.rsplit("/", 1)[1]
        time.sleep(3.0)  # longer than the lease: only the heartbeat keeps the marker fresh
        record = json.loads(store.get(marker))
        assert record["lease"] == 2 and record["heartbeat"] > record["started"] + 1.5
        report = job_status(job)["stages"]["1"]
        assert (report["running"], report["stale"]) == (1, 0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    time.sleep(2.5)
    report = json.loads(_status(capsys, job, "--json"))["stages"]["1"]
    assert (report["running"], report["stale"], report["stale_blocks"]) == (1, 1, [block])
    assert f"1 stale (worker probably dead): {block}" in _status(capsys, job)
