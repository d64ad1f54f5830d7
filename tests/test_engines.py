"""Engines and dependency modes: every (engine, mode) reproduces the whole-volume reference;
duplicated concurrent tasks change nothing; an interrupted run resumes with only the remaining
tasks; status reports progress; bad engine flags end in one line; a stage-two rerun with --cleanup
removes what a late duplicate of a donor donated again."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import fire
import numpy as np
import pytest

from chunkflow.cli import COMMANDS
from chunkflow.cli.stages import main as stage_main
from chunkflow.engines import LocalEngine, StageTask, make_engine, run_job
from chunkflow.stages import Resources, reference
from chunkflow.storage import open_store, open_volume
from chunkflow.units import count
from tests.test_engines_support import PY, ROOT, Killer, assert_complete_and_exact, fleet_env, run_flags, small_job


@pytest.fixture(scope="module")
def dask_engine():
    engine = make_engine("dask", workers=2)
    yield engine
    engine.close()


@pytest.mark.parametrize("engine_name, mode, model", [
    ("local", "barrier", "conv3"), ("local", "streaming", "identity"),
    ("dask", "barrier", "identity"), ("dask", "streaming", "conv3"),
])
def test_every_engine_and_mode_equals_the_reference(tmp_path, request, engine_name, mode, model):
    """The default engines: two local task slots, two Dask workers of two threads each."""
    job = small_job(tmp_path, model)
    engine = request.getfixturevalue("dask_engine") if engine_name == "dask" else LocalEngine()
    summary = run_job(job, engine, progress=False, mode=mode)
    assert summary.stage1.tasks == summary.stage2.tasks == job.layout.num_blocks
    assert summary.stage1.stats.patches == job.layout.num_patches  # each grid patch computed once
    assert len(summary.final_times) == job.layout.num_blocks
    assert_complete_and_exact(job)


def test_streaming_runs_blending_before_inference_ends(tmp_path):
    """In streaming order some block is final before the last stage-one task is done."""
    job = small_job(tmp_path)
    order = [stage for stage, _, _ in LocalEngine(1).stream(
        StageTask(job, 1), StageTask(job, 2), list(job.layout.block_indices()),
        {b: job.layout.dependencies(b) for b in job.layout.block_indices()})]
    assert order.index(2) < len(order) - 1 - order[::-1].index(1)
    assert_complete_and_exact(job)


class Twins:
    """Runs a stage task once both copies of it have started (on two workers): a rendezvous
    through files, so the two copies are truly in flight at the same time."""

    def __init__(self, task: StageTask, where: Path):
        self.task, self.where = task, where

    def __call__(self, item):
        block, copy = item
        name = "_".join(map(str, block))
        (self.where / f"{self.task.stage}-{name}-{copy}").touch()
        deadline = time.monotonic() + 30
        while not (self.where / f"{self.task.stage}-{name}-{1 - copy}").exists():
            assert time.monotonic() < deadline, "the twin never started"
            time.sleep(0.005)
        return self.task(block)


def test_every_task_twice_concurrently_changes_nothing(tmp_path, dask_engine):
    job = small_job(tmp_path)
    client = dask_engine.client
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2
    for stage in (1, 2):
        twins = Twins(StageTask(job, stage, force=True), tmp_path)
        results = []
        for b in job.layout.block_indices():  # one pair in flight at a time: each worker runs one task
            pair = [client.submit(twins, (b, copy), workers=[workers[copy]], allow_other_workers=False,
                                  pure=False) for copy in (0, 1)]
            results += client.gather(pair)
        assert len(results) == 2 * job.layout.num_blocks and not any(r.skipped for r in results)
    assert_complete_and_exact(job)


def test_forced_rerun_on_the_same_cluster_really_runs(tmp_path, dask_engine):
    """Dask keys are new per run: a finished task of an earlier run is never handed back instead."""
    job = small_job(tmp_path)
    store = open_store(job.store)
    for mode in ("barrier", "streaming", "barrier"):
        started = time.time()
        run_job(job, dask_engine, force=True, progress=False, mode=mode)
        for stage in (1, 2):
            finished = [json.loads(store.get(n))["finished"] for n in store.list(f"done/stage{stage}/")]
            assert len(finished) == job.layout.num_blocks and min(finished) >= started


def test_resume_after_half_the_blocks_runs_only_the_rest(tmp_path, capsys):
    job = small_job(tmp_path)
    names = [job.layout.block_box(b).name for b in job.layout.block_indices()]
    stage_main(1, ["run", job.store, "--blocks", ",".join(names[:4]), "--quiet"])
    capsys.readouterr()
    fire.Fire(COMMANDS, ["status", job.store, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["stages"]["1"]["done"] == 4 and report["stages"]["1"]["total"] == 8
    assert report["stages"]["1"]["eta_s"] is not None and report["stages"]["2"]["done"] == 0
    fire.Fire(COMMANDS, ["run", *run_flags(job), "--engine", "dask", "--workers", "2", "--mode", "streaming",
                         "--quiet"])
    out = capsys.readouterr().out
    assert "stage one: 4 tasks run, 4 already done" in out and "stage two: 8 tasks run, 0 already done" in out
    # the throughput counts the voxels this run wrote (4 cores and 8 bands), not the whole volume
    written = int(out.split(" output voxels written")[0].rsplit("(", 1)[1].replace(",", ""))
    assert 0 < written < job.layout.bbox.size
    assert_complete_and_exact(job)
    fire.Fire(COMMANDS, ["run", *run_flags(job), "--quiet"])
    out = capsys.readouterr().out
    assert "stage one: 0 tasks run, 8 already done" in out and "stage two: 0 tasks run, 8 already done" in out
    assert "throughput: n/a (no task ran)" in out


@pytest.mark.slow  # `chunkflow run` in a subprocess, killed (a kill test; no server, no worker fleet)
def test_killed_run_resumes(tmp_path, capsys):
    """SIGKILL a `chunkflow run` right after its first block is done; the rerun does the rest.
    The local engine pipelines stage one on two slots (up to four blocks in flight: two reading or
    on the model, two writing behind), so the others may have finished a few more."""
    job = small_job(tmp_path)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    proc = subprocess.Popen([PY, "-m", "chunkflow.cli", "run", *run_flags(job), "--quiet"],
                            env=fleet_env(pauses, "stage1:after-done"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killer, deadline = Killer(pauses), time.monotonic() + 60
    while not killer.poll():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL
    store = open_store(job.store)
    done = len(list(store.list("done/stage1/")))
    # blocks are tiny: the other slots may finish every block before the kill lands (then the rerun
    # resumes at stage two, which the kill left untouched)
    assert 1 <= done <= job.layout.num_blocks
    running = {n.rsplit("/", 1)[1] for n in store.list("running/stage1/")}
    finished = {n.rsplit("/", 1)[1] for n in store.list("done/stage1/")}
    assert finished & running and len(running) <= 4  # the dead process's markers stay behind...
    fire.Fire(COMMANDS, ["status", job.store, "--json"])
    # ...but the parked block is done; only the other blocks in flight, killed mid-run, may look running
    assert json.loads(capsys.readouterr().out)["stages"]["1"]["running"] == len(running - finished) <= 3
    fire.Fire(COMMANDS, ["run", *run_flags(job), "--quiet"])
    ran = count(job.layout.num_blocks - done, "task")
    assert f"stage one: {ran} run, {done} already done" in capsys.readouterr().out
    assert_complete_and_exact(job)


def test_status_counts_running_and_failed_tasks(tmp_path, capsys):
    job = small_job(tmp_path)
    store = open_store(job.store)
    names = [job.layout.block_box(b).name for b in job.layout.block_indices()]
    store.put(f"running/stage1/{names[0]}", json.dumps({"started": time.time() - 30, "attempt": 1}).encode())
    store.put(f"failed/stage1/{names[1]}", json.dumps({"error": "boom", "attempt": 1}).encode())
    fire.Fire(COMMANDS, ["status", job.store])
    out = capsys.readouterr().out
    assert "inference-and-donate        8      0        1       1" in out
    assert f"failed: {names[1]}" in out and "oldest running task started 30 s ago" in out


def test_eta_measures_recent_completions_not_the_idle_days_before_a_resume(tmp_path):
    from chunkflow.done_log import announce
    from chunkflow.status import job_status

    job = small_job(tmp_path)
    store = open_store(job.store)
    names = [job.layout.block_box(b).name for b in job.layout.block_indices()]
    now, days = time.time(), 3 * 86400

    def done(name, finished, seconds=10.0):  # as mark_done writes it: the marker, then its log entry
        store.put(f"done/stage1/{name}", json.dumps({"finished": finished, "seconds": {"model": seconds}}).encode())
        announce(store, 1, name)

    for i, name in enumerate(names[:4]):  # the job ran for 40 s three days ago, 4 blocks in a row
        done(name, now - days + 10 * (i + 1))
    # a block runs now (with nothing running, status shows no time at all: tests/test_status.py)
    store.put(f"running/stage1/{names[7]}", json.dumps({"started": now - 5, "attempt": 1}).encode())
    eta = job_status(job, now=now)["stages"]["1"]["eta_s"]
    assert eta == pytest.approx(40, rel=0.01)  # 4 more blocks at that pace, not 3 more days
    done(names[4], now - 50)  # resumed a minute ago: 2 blocks since (each 10 s of work)
    done(names[5], now - 20)
    eta = job_status(job, now=now)["stages"]["1"]["eta_s"]
    assert eta == pytest.approx(2 / (2 / 60), rel=0.01)  # 2 blocks in the 60 s since the first started


@pytest.mark.parametrize("flags, message", [
    (["--engine", "spark"], "engine 'spark' is not one of local, dask"),
    (["--engine", "queue"], "the queue engine runs as separate workers"),
    (["--mode", "eager"], "mode 'eager' is not one of barrier, streaming"),
    (["--engine", "dask", "--workers", "0"], "--workers 0 must be a positive integer"),
    (["--engine", "dask", "--scheduler", "localhost"], "is not a scheduler address"),
    (["--engine", "dask", "--scheduler", "tcp://127.0.0.1:9"], "cannot connect to the Dask scheduler"),
    (["--engine", "dask", "--workers", "2", "--scheduler", "tcp://127.0.0.1:9"],
     "--workers 2 sizes the LocalCluster chunkflow starts; with --scheduler"),
])
def test_bad_engine_flags_end_in_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr("chunkflow.engines.dask.CONNECT_TIMEOUT", 1)
    job = small_job(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        fire.Fire(COMMANDS, ["run", *run_flags(job), "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not list(open_store(job.store).list("done/"))


def test_unreachable_queue_ends_in_one_line(tmp_path, capsys):
    job = small_job(tmp_path)
    for queue in ("fq:///proc/chunkflow-no-such-queue", "redis://localhost/q"):
        with pytest.raises(SystemExit) as exit_:
            fire.Fire(COMMANDS, ["produce", job.store, queue, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "queue" in err and len(err.splitlines()) == 1, err


def test_runner_output_matches_reference_bitwise_in_cores(tmp_path, dask_engine):
    """The core of every block is summed in the reference's order: bit-identical on Dask too."""
    job = small_job(tmp_path, seed=3)
    run_job(job, dask_engine, progress=False, mode="streaming")
    output = open_volume(job.output).read(job.layout.bbox)
    expected = reference(job, Resources(job))
    for idx in job.layout.block_indices():
        core = job.layout.core_box(idx)
        if not core.is_empty():
            sl = (slice(None),) + core.slices(job.layout.bbox)
            assert np.array_equal(output[sl], expected[sl])


def test_cleanup_rerun_removes_donations_a_late_duplicate_wrote(tmp_path, capsys):
    """A donor's stage one run again after its receivers were blended and cleaned up re-donates;
    stage two with --cleanup over the finished blocks removes those leftovers (in either order)."""
    job = small_job(tmp_path)
    store = open_store(job.store)
    fire.Fire(COMMANDS, ["run", *run_flags(job), "--cleanup", "--quiet"])
    assert not list(store.list("donations/"))
    output = open_volume(job.output).read(job.layout.bbox)
    donor = next(b for b in job.layout.block_indices() if len(job.layout.donations_from(b)) > 4)
    late = {"donations/" + d.key for d in job.layout.donations_from(donor)}
    for argv in (["run", job.store, "--blocks", "all", "--cleanup", "--quiet"],  # receive_and_blend run
                 ["run", *run_flags(job), "--mode", "streaming", "--cleanup", "--quiet"]):  # chunkflow run
        stage_main(1, ["run", job.store, "--blocks", job.layout.block_box(donor).name, "--force", "--quiet"])
        assert set(store.list("donations/")) == late  # the late duplicate's donations
        capsys.readouterr()
        if argv[1] == job.store:
            stage_main(2, argv)
        else:
            fire.Fire(COMMANDS, argv)
        out = capsys.readouterr().out
        assert "two: 0 tasks run, 8 already done" in out.replace("blocks run", "tasks run"), out
        assert f"cleanup: {len(late)} leftover donations of finished blocks removed" in out
        assert not list(store.list("donations/"))
    np.testing.assert_array_equal(open_volume(job.output).read(job.layout.bbox), output)
    stage_main(1, ["run", job.store, "--blocks", job.layout.block_box(donor).name, "--force", "--quiet"])
    stage_main(2, ["run", job.store, "--quiet"])  # without --cleanup nothing is swept
    assert set(store.list("donations/")) == late and "cleanup" not in capsys.readouterr().out
