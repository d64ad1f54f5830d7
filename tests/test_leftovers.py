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

from chunkflow.cli import main as cli_main
from chunkflow.storage import open_volume
from tests.helpers import make_input

FLAGS = ["--model", "identity", "--input-patch", "8,32,32", "--overlap", "2,8,8", "--block", "8,32,32", "--quiet"]


def _run(*args) -> int:
    try:
        return cli_main([str(a) for a in args]) or 0
    except SystemExit as stop:
        return int(stop.code or 0)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_deleted_output_is_not_taken_as_done(tmp_path, capsys):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=5)
    out, job = f"file://{tmp_path / 'out'}", tmp_path / "job"
    assert _run("run", url, out, *FLAGS, "--donations", job) == 0
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    assert _run("run", url, out, *FLAGS, "--donations", job) == 2
    line = _one_line(capsys)
    assert "does not exist" in line and "--force" in line, line
    assert not (tmp_path / "out").exists()
    assert _run("plan", url, out, job, *FLAGS) == 2 and not (tmp_path / "out").exists()
    assert _run("run", url, out, *FLAGS, "--donations", job, "--force") == 0
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5


def test_a_store_without_its_manifest_is_refused(tmp_path, capsys):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=6)
    other_url, other = make_input(tmp_path / "other", (8, 64, 64), seed=7)
    job = tmp_path / "job"
    assert _run("run", url, f"file://{tmp_path / 'out'}", *FLAGS, "--donations", job) == 0
    (job / "manifest.json").unlink()
    before = sorted(p.relative_to(job).as_posix() for p in job.rglob("*"))
    capsys.readouterr()
    assert _run("run", other_url, f"file://{tmp_path / 'out2'}", *FLAGS, "--donations", job) == 2
    line = _one_line(capsys)
    assert "no manifest.json" in line and "leftovers" in line, line
    assert not (tmp_path / "out2").exists()
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*")) == before
