"""A job planned with relative local paths names the same volumes from any working directory.

Found by a new user's walkthrough (2026-11-29): ``plan em.zarr ...`` stored ``"input": "em.zarr"``
as typed, so a worker started in another directory holding another ``em.zarr`` read that one and
exited 0 with the wrong volume's output. ``plan`` now stores absolute local zarr paths (the job
store and ``file:///`` URLs were absolute already); the workers below run from a directory whose
``em.zarr`` holds other data, and the output must still be the planned input's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import chunkflow
from chunkflow.storage import open_volume
from chunkflow.storage.volume_urls import absolute_url
from tests.helpers import make_input

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("url, made", [
    ("em.zarr", "{cwd}/em.zarr"),
    ("./data/em.zarr/0", "{cwd}/data/em.zarr/0"),
    ("zarr://em.zarr", "zarr://{cwd}/em.zarr"),
    ("/abs/em.zarr", "/abs/em.zarr"),
    ("zarr:///abs/em.zarr", "zarr:///abs/em.zarr"),
    ("file:///abs/em", "file:///abs/em"),
    ("gs://bucket/em", "gs://bucket/em"),
    ("zarr://gs://bucket/em.zarr", "zarr://gs://bucket/em.zarr"),
])
def test_absolute_url(tmp_path, monkeypatch, url, made):
    monkeypatch.chdir(tmp_path)
    assert absolute_url(url) == made.format(cwd=os.getcwd())


@pytest.mark.slow
@pytest.mark.parametrize("output", ["out.zarr", "{here}/out.zarr"])
def test_workers_elsewhere_read_the_planned_input(tmp_path, monkeypatch, output):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    _, planned = make_input(here / "em", (8, 48, 48), seed=1, fmt="zarr")
    _, decoy = make_input(elsewhere / "em", (8, 48, 48), seed=2, fmt="zarr")
    assert np.abs(planned - decoy).max() > 0.5
    monkeypatch.chdir(here)
    job = chunkflow.plan(input="em.zarr", output=output.format(here=here), donations="job", model="identity",
                         input_patch="4,16,16", overlap="2,4,4", block="8,24,24")
    manifest = json.loads((here / "job" / "manifest.json").read_text())
    assert manifest["input"] == str(here / "em.zarr") and manifest["output"] == str(here / "out.zarr")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for script in ("inference_and_donate", "receive_and_blend"):
        done = subprocess.run([sys.executable, "-m", script, "run", job.store, "--blocks", "all", "--quiet"],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    assert not (elsewhere / "out.zarr").exists()
    out = open_volume(str(here / "out.zarr")).read(job.layout.bbox)
    assert np.abs(out - planned).max() <= 1e-5


def test_a_job_planned_with_relative_paths_by_an_older_version_resumes(tmp_path, monkeypatch):
    """Its manifest holds the paths as typed, so its hash is not the one the same flags give now; planning
    it again from the same directory resumes it as it was instead of refusing the store (a review,
    2026-11-29)."""
    import dataclasses

    import zarr

    monkeypatch.chdir(tmp_path)
    make_input(tmp_path / "em", (8, 48, 48), seed=3, fmt="zarr")
    flags = dict(input="em.zarr", output="out.zarr", donations="job", model="identity", input_patch="4,16,16",
                 overlap="2,4,4", block="8,24,24")
    job = chunkflow.plan(**flags)
    old = dataclasses.replace(job, input="em.zarr", output="out.zarr", job_hash="")  # as the old version wrote it
    assert old.job_hash != job.job_hash
    (tmp_path / "job" / "manifest.json").write_text(old.to_json())
    (tmp_path / "job" / "output_claim.json").unlink()  # the old version claimed nothing
    array = zarr.open_array(str(tmp_path / "out.zarr" / "0"))
    array.update_attributes({"chunkflow_jobs": []})
    again = chunkflow.plan(**flags)
    assert again.job_hash == old.job_hash and again.input == "em.zarr"
