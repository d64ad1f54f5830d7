"""Done markers never vouch for data that is not there (an adversarial review, 2026-11-29).

Two ways a rerun used to exit 0 over lost data, because every block was skipped as done: the output
deleted after a run (the rerun created an empty output and skipped every block), and a job store whose
manifest was deleted, then planned again with another job (the old job's markers were taken as the
new job's). ``plan`` now refuses both in one line, before writing anything; ``run --force`` recomputes
a deleted output.
"""
from __future__ import annotations

import shutil

import numpy as np

from chunkflow.storage import open_volume
from tests.helpers import cli_status, make_input

FLAGS = ["--model", "identity", "--input-patch", "8,32,32", "--overlap", "2,8,8", "--block", "8,32,32", "--quiet"]



def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_deleted_output_is_not_taken_as_done(tmp_path, capsys):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=5)
    out, job = f"file://{tmp_path / 'out'}", tmp_path / "job"
    assert cli_status("run", url, out, *FLAGS, "--donations", job) == 0
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    assert cli_status("run", url, out, *FLAGS, "--donations", job) == 2
    line = _one_line(capsys)
    assert "does not exist" in line and "--force" in line, line
    assert not (tmp_path / "out").exists()
    assert cli_status("plan", url, out, job, *FLAGS) == 2 and not (tmp_path / "out").exists()
    assert cli_status("run", url, out, *FLAGS, "--donations", job, "--force") == 0
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5


def test_a_store_without_its_manifest_is_refused(tmp_path, capsys):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=6)
    other_url, other = make_input(tmp_path / "other", (8, 64, 64), seed=7)
    job = tmp_path / "job"
    assert cli_status("run", url, f"file://{tmp_path / 'out'}", *FLAGS, "--donations", job) == 0
    (job / "manifest.json").unlink()
    before = sorted(p.relative_to(job).as_posix() for p in job.rglob("*"))
    capsys.readouterr()
    assert cli_status("run", other_url, f"file://{tmp_path / 'out2'}", *FLAGS, "--donations", job) == 2
    line = _one_line(capsys)
    assert "no manifest.json" in line and "leftovers" in line, line
    assert not (tmp_path / "out2").exists()
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*")) == before


def test_a_volume_replaced_after_plan_is_refused_by_the_workers(tmp_path):
    """An input re-created smaller between `plan` and the workers was read past its new bounds at
    exit 0 (an adversarial review, 2026-11-29); an output replaced by another volume would take the
    job's writes. A worker opening either refuses the block in one line, writing nothing."""
    import pytest

    import chunkflow
    from chunkflow.errors import StorageError

    make_input(tmp_path / "em", (8, 64, 64), seed=8)
    job = chunkflow.plan(input=f"file://{tmp_path / 'em'}", output=f"file://{tmp_path / 'out'}",
                         donations=str(tmp_path / "job"), model="identity", input_patch="8,32,32", overlap="2,8,8",
                         block="8,32,32")
    shutil.rmtree(tmp_path / "em")
    make_input(tmp_path / "em", (8, 64, 48), seed=8)
    with pytest.raises(StorageError, match="replaced after plan"):
        chunkflow.inference_and_donate(job.store, (0, 0, 0))
    assert not any((tmp_path / "job" / "donations").glob("*")) if (tmp_path / "job" / "donations").exists() else True
    shutil.rmtree(tmp_path / "em")
    make_input(tmp_path / "em", (8, 64, 64), seed=8)
    shutil.rmtree(tmp_path / "out")
    make_input(tmp_path / "out", (8, 64, 64), dtype="uint8", seed=9)  # another volume at the output's path
    with pytest.raises(StorageError, match="replaced after plan"):
        chunkflow.inference_and_donate(job.store, (0, 0, 0))


def test_a_leftover_block_map_is_refused_too(tmp_path, capsys):
    """A store holding only a mask's block map (manifest deleted) made a new job skip blocks by the old
    mask at exit 0 (a review, 2026-11-29)."""
    url, _ = make_input(tmp_path / "em", (8, 64, 64), seed=10)
    (tmp_path / "job" / "mask").mkdir(parents=True)
    (tmp_path / "job" / "mask" / "blocks.bin").write_bytes(b"\xff")
    assert cli_status("run", url, f"file://{tmp_path / 'out'}", *FLAGS, "--donations", tmp_path / "job") == 2
    assert "a mask's block map but no manifest.json" in _one_line(capsys)
    assert not (tmp_path / "out").exists()
