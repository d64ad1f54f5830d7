"""A job planned over a region of an output that another job wrote is refused unless --overwrite.

Found by a new user's walkthrough (2026-11-29): ``chunkflow run`` into a finished job's output
replaced its data at exit 0, and that job's ``status`` still said done. Every job now claims its
region in the output's own metadata (``chunkflow/output_claims.py``); these tests run real jobs
(identity model) on precomputed and zarr outputs and read the results back, and check that the
claimed outputs still open in readers chunkflow did not write (CloudVolume, tensorstore).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.storage import create_volume, open_volume
from chunkflow.storage.volumes import CLAIMS_KEY
from tests.helpers import cli_status, make_input

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--model", "identity", "--input-patch", "8,32,32", "--overlap", "2,8,8", "--block", "8,32,32", "--quiet"]
REFERENCE_FLAGS = FLAGS[:6] + ["--quiet"]  # no --block
OTHER_JOB = FLAGS[:4] + ["--overlap", "2,4,4"] + FLAGS[6:]



def _worker(script: str, store: Path) -> str:
    """A worker process of the job in ``store`` over every block (--force); its one refusal line (exit 2)."""
    done = subprocess.run([sys.executable, "-m", script, "run", str(store), "--blocks", "all", "--force", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    return done.stderr


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
    assert cli_status("run", first_url, out, *FLAGS, "--donations", tmp_path / "job1") == 0
    claims = _claims(out_path, fmt)
    assert len(claims) == 1 and claims[0]["region"] == "0-64_0-64_0-8" and claims[0]["store"].endswith("job1")
    before = _files(out_path)
    capsys.readouterr()

    # another job over the same region: one line naming the first job, nothing written
    assert cli_status("run", second_url, out, *FLAGS, "--donations", tmp_path / "job2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and claims[0]["job"] in err[0] and "--overwrite" in err[0], err
    assert _files(out_path) == before and not (tmp_path / "job2").exists()
    assert cli_status("plan", second_url, out, tmp_path / "job2", *FLAGS, "--dry-run") == 2  # the dry run says so too
    assert cli_status("reference", second_url, out, *REFERENCE_FLAGS) == 2
    assert _files(out_path) == before

    # the first job again, into another store (its job hash leaves the store out): its own region, and a
    # claim of that store's own (each store knows its claim: output_claim.json), planned again: no new one
    assert cli_status("run", first_url, out, *FLAGS, "--donations", tmp_path / "job1b") == 0
    assert cli_status("run", first_url, out, *FLAGS, "--donations", tmp_path / "job1b") == 0
    assert [c["job"] for c in _claims(out_path, fmt)] == [claims[0]["job"]] * 2

    # with --overwrite: the second job's result, both claims kept
    assert cli_status("run", second_url, out, *FLAGS, "--donations", tmp_path / "job2", "--overwrite") == 0
    result = open_volume(out).read(open_volume(out).bbox)
    assert np.abs(result - second).max() <= 1e-5 and np.abs(result - first).max() > 0.5
    assert [c["store"].rsplit("/", 1)[-1] for c in _claims(out_path, fmt)] == ["job1", "job1b", "job2"]


def test_jobs_over_disjoint_regions_share_an_output(tmp_path, capsys):
    """Regions written one after another by different jobs, as before; a third job over both is refused."""
    url, data = make_input(tmp_path / "em", (8, 64, 128), seed=3)
    out = f"file://{tmp_path / 'out'}"
    create_volume(out, Bbox((0, 0, 0), (8, 64, 128)), Vec(8, 32, 32), 1, "float32")  # no claims: another tool's
    for i, region in enumerate(("0-64_0-64_0-8", "64-128_0-64_0-8")):
        assert cli_status("run", url, out, *FLAGS, "--donations", tmp_path / f"h{i}", "--bbox", region) == 0
    claims = json.loads((tmp_path / "out" / "info").read_text())[CLAIMS_KEY]
    assert [c["region"] for c in claims] == ["0-64_0-64_0-8", "64-128_0-64_0-8"]
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5
    capsys.readouterr()
    assert cli_status("run", url, out, *OTHER_JOB, "--donations", tmp_path / "h2") == 2
    err = capsys.readouterr().err
    assert any(claim["job"] in err for claim in claims), err


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_claimed_outputs_open_in_other_readers(tmp_path, fmt):
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=4)
    out_path = tmp_path / ("out" if fmt == "precomputed" else "out.zarr")
    out = f"file://{out_path}" if fmt == "precomputed" else str(out_path)
    assert cli_status("run", url, out, *FLAGS) == 0
    assert _claims(out_path, fmt)
    if fmt == "precomputed":
        from cloudvolume import CloudVolume

        read = np.asarray(CloudVolume(out, mip=0)[:, :, :])  # x, y, z, c
        got = read.transpose(3, 2, 1, 0)
    else:
        import tensorstore as ts

        got = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out_path / "0")}}).result().read().result()
    assert np.abs(np.asarray(got) - data).max() <= 1e-5


@pytest.mark.slow
def test_a_job_written_over_by_another_must_recompute_and_then_owns_its_region_again(tmp_path, capsys):
    """A review (2026-11-29) found `--overwrite` on a finished job exit 0 having written nothing: its done
    markers skipped every block over the other job's data. Such a job now needs --force (recompute) with
    --overwrite; afterwards its claim is the latest, so resuming it needs no flag (nor does resuming a
    job that was planned with --overwrite once)."""
    a_url, a = make_input(tmp_path / "a", (8, 64, 64), seed=11)
    b_url, b = make_input(tmp_path / "b", (8, 64, 64), seed=12)
    out_path = tmp_path / "out.zarr"
    out = str(out_path)
    assert cli_status("run", a_url, out, *FLAGS, "--donations", tmp_path / "A") == 0
    assert cli_status("run", b_url, out, *FLAGS, "--donations", tmp_path / "B", "--overwrite") == 0
    assert cli_status("run", b_url, out, *FLAGS, "--donations", tmp_path / "B") == 0  # B resumes without the flag
    capsys.readouterr()
    assert cli_status("run", a_url, out, *FLAGS, "--donations", tmp_path / "A", "--overwrite") == 2
    line = capsys.readouterr().err.strip()
    assert "--force --overwrite" in line and "done markers" in line, line
    # A's workers refuse too: the output is B's now
    assert "claimed after this job was planned" in _worker("inference_and_donate", tmp_path / "A")
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - b).max() <= 1e-5
    assert cli_status("run", a_url, out, *FLAGS, "--donations", tmp_path / "A", "--overwrite", "--force") == 0
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - a).max() <= 1e-5
    assert [c["store"].rsplit("/", 1)[-1] for c in _claims(out_path, "zarr")] == ["A", "B", "A"]
    assert cli_status("run", a_url, out, *FLAGS, "--donations", tmp_path / "A") == 0  # A's own again: no flag


@pytest.mark.slow
def test_an_output_replaced_by_an_empty_one_is_not_taken_as_done(tmp_path, capsys):
    """A review (2026-11-29): an output deleted and re-created empty with the same geometry was skipped as
    done at exit 0. The job's store remembers that it claimed the output; plan and workers refuse an output
    without that claim, and `run --force` recomputes it."""
    url, data = make_input(tmp_path / "em", (8, 64, 64), seed=13)
    out_path = tmp_path / "out.zarr"
    out = str(out_path)
    assert cli_status("run", url, out, *FLAGS, "--donations", tmp_path / "job") == 0
    import shutil
    shutil.rmtree(out_path)
    create_volume(out, Bbox((0, 0, 0), (8, 64, 64)), Vec(8, 32, 32), 1, "float32")
    capsys.readouterr()
    assert cli_status("run", url, out, *FLAGS, "--donations", tmp_path / "job") == 2
    assert "claim is gone" in capsys.readouterr().err
    assert "does not hold this job's claim" in _worker("receive_and_blend", tmp_path / "job")
    assert not np.abs(open_volume(out).read(open_volume(out).bbox)).max() > 0
    assert cli_status("run", url, out, *FLAGS, "--donations", tmp_path / "job", "--force") == 0
    assert np.abs(open_volume(out).read(open_volume(out).bbox) - data).max() <= 1e-5


@pytest.mark.parametrize("fmt", ["precomputed", "zarr", "zarr-v2"])
def test_a_fresh_read_of_claims_sees_another_writers_claim_as_the_format_library_does(tmp_path, fmt):
    """Workers re-read an output's claims before each block's writes; on a local disk that read goes
    straight to the metadata file (the libraries' own re-open cost a millisecond a block). It must
    see what the library sees: a claim added by another opener, and none where there is none."""
    bbox = Bbox(Vec(0, 0, 0), Vec(8, 16, 16))
    if fmt == "zarr-v2":
        import zarr

        zarr.create_array(store=str(tmp_path / "v2.zarr"), shape=(1, 8, 16, 16), chunks=(1, 8, 16, 16),
                          dtype="float32", zarr_format=2, attributes={"voxel_offset": [0, 0, 0],
                                                                      "resolution": [1, 1, 1]})
        url = str(tmp_path / "v2.zarr")
    else:
        url = f"file://{tmp_path / 'out'}" if fmt == "precomputed" else str(tmp_path / "out.zarr")
        create_volume(url, bbox, Vec(8, 16, 16), 1, "float32", (1.0, 1.0, 1.0))
    worker, planner = open_volume(url), open_volume(url)
    assert worker.claims(fresh=True) == [] == worker.claims()
    claim = {"job": "j" * 16, "region": bbox.name, "store": "file:///s", "id": "c1"}
    planner.add_claim(claim)
    seen = worker.claims(fresh=True)
    assert [c["id"] for c in seen] == ["c1"] and worker.claims() == []  # opened before: only a fresh read sees it
    assert seen == open_volume(url).claims()  # what the format's library reads on a fresh open


def test_run_on_a_cluster_is_refused_over_another_jobs_claim_before_the_cluster_starts(tmp_path, capsys, monkeypatch):
    """`run --engine dask` checks everything a plan checks (here: the output's claims) before it starts
    its cluster: a refusal costs no cluster start-up, and a cluster that cannot start changes nothing."""
    import chunkflow.cli.jobs as jobs

    first_url, _ = make_input(tmp_path / "a", (8, 64, 64), seed=3)
    second_url, _ = make_input(tmp_path / "b", (8, 64, 64), seed=4)
    out = f"file://{tmp_path / 'out'}"
    assert cli_status("run", first_url, out, *FLAGS, "--donations", tmp_path / "job1") == 0
    started = []

    def no_cluster(*args, **kwargs):
        started.append(args)
        raise AssertionError("the cluster was started before the refusal")

    monkeypatch.setattr(jobs, "make_engine", no_cluster)
    capsys.readouterr()
    assert cli_status("run", second_url, out, *FLAGS, "--donations", tmp_path / "job2", "--engine", "dask") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert started == [] and len(err) == 1 and "--overwrite" in err[0], err
    assert not (tmp_path / "job2").exists()


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_an_output_metadata_file_that_cannot_be_read_again_fails_the_block_in_one_line(tmp_path, fmt):
    """Workers re-read the output's claims before each block's writes. A metadata file that has become
    unreadable (garbled here; on GCS a server gone, as tests/test_gcs_faults.py stops it) is a
    StorageError naming the volume, the block's failure: not an unexpected error reported as a bug."""
    from chunkflow.errors import StorageError
    from chunkflow.planning import load_job
    from chunkflow.stages import Resources, inference_and_donate

    url, _ = make_input(tmp_path / "em", (8, 64, 64), seed=5)
    out_path = tmp_path / ("out" if fmt == "precomputed" else "out.zarr")
    out = f"file://{out_path}" if fmt == "precomputed" else str(out_path)
    assert cli_status("plan", url, out, tmp_path / "job", *FLAGS) == 0
    job = load_job(str(tmp_path / "job"))
    res = Resources(job)
    res.output  # noqa: B018 - opened (and its claims checked) before the file is garbled
    metadata = out_path / "info" if fmt == "precomputed" else out_path / "0" / "zarr.json"
    metadata.write_text("{not json")
    with pytest.raises(StorageError, match="again .to check its jobs' claims.") as err:
        inference_and_donate(job, (0, 0, 0), res)
    assert "\n" not in str(err.value) and str(out_path) in str(err.value)


def test_run_on_a_cluster_warns_once_not_for_its_checks_and_again_for_its_plan(tmp_path, capsys, caplog, monkeypatch):
    """The checks before the cluster starts are the plan's own, run again after: their warnings (here
    --overwrite's) are the plan's to give, once."""
    import logging

    import chunkflow.cli.jobs as jobs

    first_url, _ = make_input(tmp_path / "a", (8, 64, 64), seed=6)
    second_url, _ = make_input(tmp_path / "b", (8, 64, 64), seed=7)
    out = f"file://{tmp_path / 'out'}"
    assert cli_status("run", first_url, out, *FLAGS, "--donations", tmp_path / "job1") == 0
    local = jobs.make_engine
    monkeypatch.setattr(jobs, "make_engine", lambda *a, **k: local("local"))  # the plan and run of a real engine
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chunkflow"):
        assert cli_status("run", second_url, out, *FLAGS[:-1], "--donations", tmp_path / "job2", "--engine", "dask",
                          "--overwrite") == 0
    said = [r.getMessage() for r in caplog.records if "--overwrite: writing over" in r.getMessage()]
    assert len(said) == 1, said
