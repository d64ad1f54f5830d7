"""A job whose done markers no longer stand for its output is reset, not resumed over stale markers.

An adversarial review of the day's fixes (2026-11-29) found exits 0 over wrong data wherever old
markers survived a rewrite: an interrupted ``run --force`` (it recomputed over the old markers, so a
plain rerun skipped the blocks it had not reached), a worker that opened the output before another
job claimed its region with --overwrite (it wrote over that finished job), and a job's own stage
scripts that reported it done after another job had written over it. Now ``--force`` resets the done
state first (``chunkflow/done_reset.py``, behind ``reset.json``), workers re-read the output's claims
before each block's writes, and every stage run checks the job's standing before it skips a block.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from chunkflow.cli import stages as cli_stages
from chunkflow.errors import JobError
from chunkflow.planning import load_job
from chunkflow.stages import Resources, inference_and_donate
from chunkflow.storage import open_volume
from chunkflow.store_layout import RESET
from tests.helpers import cli_status, make_input

FLAGS = ["--model", "identity", "--input-patch", "8,32,32", "--overlap", "2,8,8", "--block", "8,32,32", "--quiet"]



def _stage(stage: int, *args) -> int:
    try:
        cli_stages.main(stage, [str(a) for a in args])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _markers(store) -> list:
    return sorted(p.name for p in store.glob("done/stage*/*"))


def test_an_interrupted_force_run_leaves_no_stale_marker(tmp_path):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=21)
    out, job = f"file://{tmp_path / 'out'}", tmp_path / "job"
    assert cli_status("run", url, out, *FLAGS, "--donations", job) == 0
    shutil.rmtree(tmp_path / "out")
    # `run --force` cut off after one block: its plan resets the done state, then one block runs
    assert cli_status("plan", url, out, job, *FLAGS, "--force") == 0
    assert _markers(job) == [] and not (job / RESET).exists()
    inference_and_donate(load_job(str(job)), (0, 0, 0))
    assert len(_markers(job)) == 1
    assert cli_status("run", url, out, *FLAGS, "--donations", job) == 0  # a plain rerun computes the rest
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5


def test_a_reset_cut_off_half_way_is_finished_before_anything_is_skipped(tmp_path, capsys):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=22)
    out, job = f"file://{tmp_path / 'out'}", tmp_path / "job"
    assert cli_status("run", url, out, *FLAGS, "--donations", job) == 0
    volume = open_volume(out)
    volume.write(volume.bbox, np.zeros((1, *volume.bbox.shape), np.float32))  # what a reset's run would redo
    (job / RESET).write_text(json.dumps({"why": "test"}))  # the markers are still there: the reset was cut off
    capsys.readouterr()
    assert _stage(1, "run", job, "--blocks", "all") == 2  # workers refuse, whatever the markers say
    assert "was cut off" in capsys.readouterr().err
    assert cli_status("run", url, out, *FLAGS, "--donations", job) == 0  # planning finishes the reset: all recomputed
    assert not (job / RESET).exists()
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_a_job_written_over_is_not_reported_done_and_its_open_workers_write_nothing(tmp_path, capsys, fmt):
    a_url, a = make_input(tmp_path / "a", (8, 64, 64), seed=23)
    b_url, b = make_input(tmp_path / "b", (8, 64, 64), seed=24)
    out = str(tmp_path / "out.zarr") if fmt == "zarr" else f"file://{tmp_path / 'out'}"
    assert cli_status("run", a_url, out, *FLAGS, "--donations", tmp_path / "A") == 0
    job_a = load_job(str(tmp_path / "A"))
    res = Resources(job_a)
    res.output  # noqa: B018 - a worker of A that opened the output before B's plan
    assert cli_status("run", b_url, out, *FLAGS, "--donations", tmp_path / "B", "--overwrite") == 0
    with pytest.raises(JobError, match="claimed after this job was planned"):
        inference_and_donate(job_a, (0, 0, 0), res)  # refused before its writes: B's result stays
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - b).max() <= 1e-5
    capsys.readouterr()
    for stage in (1, 2):  # A's own stage scripts no longer say "already done"
        assert _stage(stage, "run", tmp_path / "A", "--blocks", "all") == 2
        assert "claimed after this job was planned" in capsys.readouterr().err
    from chunkflow.engines.queue import produce
    with pytest.raises(JobError, match="claimed after this job was planned"):
        produce(job_a, f"fq://{tmp_path / 'queue'}")  # nor does a fleet's producer skip its blocks as done


def test_the_same_job_planned_into_another_store_does_not_revive_the_first_stores_markers(tmp_path, capsys):
    """A review (2026-11-29): the same job planned into a second store re-created the deleted output and
    claimed it under the same job hash, and the first store's markers then counted it done at exit 0.
    Each store knows its own claim (an id in output_claim.json), so the first store finds it gone."""
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=25)
    out = f"file://{tmp_path / 'out'}"
    assert cli_status("run", url, out, *FLAGS, "--donations", tmp_path / "S1") == 0
    shutil.rmtree(tmp_path / "out")
    assert cli_status("plan", url, out, tmp_path / "S2", *FLAGS) == 0
    capsys.readouterr()
    assert cli_status("run", url, out, *FLAGS, "--donations", tmp_path / "S1") == 2
    assert "claim is gone" in capsys.readouterr().err
    assert cli_status("run", url, out, *FLAGS, "--donations", tmp_path / "S1", "--force") == 0
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5


def test_a_checkpoint_written_back_after_a_reset_is_ignored(tmp_path):
    """A review (2026-11-29): a poller (status, a waiting barrier) that read the done state before a reset
    wrote its checkpoint back after it, and a plain rerun skipped every block over a new, empty output."""
    from chunkflow.done_log import DoneView
    from chunkflow.storage import open_store

    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=26)
    out, job_dir = f"file://{tmp_path / 'out'}", tmp_path / "job"
    assert cli_status("run", url, out, *FLAGS, "--donations", job_dir) == 0
    job = load_job(str(job_dir))
    views = [DoneView(open_store(job.store), stage, job) for stage in (1, 2)]
    for view in views:
        view.refresh()
        view._dirty = True  # a poller that moved on and will save
    shutil.rmtree(tmp_path / "out")
    assert cli_status("plan", url, out, job_dir, *FLAGS, "--force") == 0  # resets
    assert all(view.save() for view in views)  # the stale checkpoints land after the reset
    assert cli_status("run", url, out, *FLAGS, "--donations", job_dir) == 0
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5
