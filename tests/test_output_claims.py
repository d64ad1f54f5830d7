"""A job planned over a region of an output that another job wrote is refused unless --overwrite.

Found by a new user's walkthrough (2026-11-29): ``chunkflow run`` into a finished job's output
replaced its data at exit 0, and that job's ``status`` still said done. Every job now claims its
region in the output's own metadata (``chunkflow/output_claims.py``); these tests run real jobs
(identity model) on precomputed and zarr outputs and read the results back, and check that the
claimed outputs still open in readers chunkflow did not write (CloudVolume, tensorstore).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.cli import main as cli_main
from chunkflow.storage import create_volume, open_volume
from chunkflow.storage.volumes import CLAIMS_KEY
from tests.helpers import make_input

FLAGS = ["--model", "identity", "--input-patch", "8,32,32", "--overlap", "2,8,8", "--block", "8,32,32", "--quiet"]
REFERENCE_FLAGS = FLAGS[:6] + ["--quiet"]  # no --block
OTHER_JOB = FLAGS[:4] + ["--overlap", "2,4,4"] + FLAGS[6:]


def _run(*args) -> int:
    try:
        return cli_main([str(a) for a in args]) or 0
    except SystemExit as stop:
        return int(stop.code or 0)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _claims(out: Path, fmt: str) -> list[dict]:
    if fmt == "precomputed":
        return json.loads((out / "info").read_text()).get(CLAIMS_KEY, [])
    return json.loads((out / "0" / "zarr.json").read_text())["attributes"].get(CLAIMS_KEY, [])


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_a_finished_jobs_output_is_not_overwritten_without_overwrite(tmp_path, capsys, fmt):
    first_url, first = make_input(tmp_path / "a", (8, 64, 64), seed=1)
    second_url, second = make_input(tmp_path / "b", (8, 64, 64), seed=2)
    out_path = tmp_path / ("out" if fmt == "precomputed" else "out.zarr")
    out = f"file://{out_path}" if fmt == "precomputed" else str(out_path)
    assert _run("run", first_url, out, *FLAGS, "--donations", tmp_path / "job1") == 0
    claims = _claims(out_path, fmt)
    assert len(claims) == 1 and claims[0]["region"] == "0-64_0-64_0-8" and claims[0]["store"].endswith("job1")
    before = _files(out_path)
    capsys.readouterr()

    # another job over the same region: one line naming the first job, nothing written
    assert _run("run", second_url, out, *FLAGS, "--donations", tmp_path / "job2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and claims[0]["job"] in err[0] and "--overwrite" in err[0], err
    assert _files(out_path) == before and not (tmp_path / "job2").exists()
    assert _run("plan", second_url, out, tmp_path / "job2", *FLAGS, "--dry-run") == 2  # the dry run says so too
    assert _run("reference", second_url, out, *REFERENCE_FLAGS) == 2
    assert _files(out_path) == before

    # the first job again, into another store (its job hash leaves the store out): its own region
    assert _run("run", first_url, out, *FLAGS, "--donations", tmp_path / "job1b") == 0
    assert len(_claims(out_path, fmt)) == 1

    # with --overwrite: the second job's result, both claims kept
    assert _run("run", second_url, out, *FLAGS, "--donations", tmp_path / "job2", "--overwrite") == 0
    result = open_volume(out).read(open_volume(out).bbox)
    assert np.abs(result - second).max() <= 1e-5 and np.abs(result - first).max() > 0.5
    assert [c["store"].rsplit("/", 1)[-1] for c in _claims(out_path, fmt)] == ["job1", "job2"]


def test_jobs_over_disjoint_regions_share_an_output(tmp_path, capsys):
    """Regions written one after another by different jobs, as before; a third job over both is refused."""
    url, data = make_input(tmp_path / "em", (8, 64, 128), seed=3)
    out = f"file://{tmp_path / 'out'}"
    create_volume(out, Bbox((0, 0, 0), (8, 64, 128)), Vec(8, 32, 32), 1, "float32")  # no claims: another tool's
    for i, region in enumerate(("0-64_0-64_0-8", "64-128_0-64_0-8")):
        assert _run("run", url, out, *FLAGS, "--donations", tmp_path / f"h{i}", "--bbox", region) == 0
    claims = json.loads((tmp_path / "out" / "info").read_text())[CLAIMS_KEY]
    assert [c["region"] for c in claims] == ["0-64_0-64_0-8", "64-128_0-64_0-8"]
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5
    capsys.readouterr()
    assert _run("run", url, out, *OTHER_JOB, "--donations", tmp_path / "h2") == 2
    assert claims[0]["job"] in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_claimed_outputs_open_in_other_readers(tmp_path, fmt):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=4)
    out_path = tmp_path / ("out" if fmt == "precomputed" else "out.zarr")
    out = f"file://{out_path}" if fmt == "precomputed" else str(out_path)
    assert _run("run", url, out, *FLAGS) == 0
    assert _claims(out_path, fmt)
    if fmt == "precomputed":
        from cloudvolume import CloudVolume

        read = np.asarray(CloudVolume(out, mip=0)[:, :, :])  # x, y, z, c
        got = read.transpose(3, 2, 1, 0)
    else:
        import tensorstore as ts

        got = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out_path / "0")}}).result().read().result()
    assert np.abs(np.asarray(got) - data).max() <= 1e-5
