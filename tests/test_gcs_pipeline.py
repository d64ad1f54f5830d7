"""The whole pipeline with input, output and donations on a real GCS API server (fake-gcs-server).

Everything goes through the real client libraries (google-cloud-storage for donations,
CloudVolume/cloud-files for precomputed, gcsfs for zarr); damage is done to the bucket
through google-cloud-storage, as an operator or a bug would.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.engines import LocalEngine, run_job, run_stage
from chunkflow.donation_report import inspect_store
from chunkflow.job import JobError
from chunkflow.store_layout import MANIFEST
from chunkflow.planning import plan
from chunkflow.errors import MissingDonations
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import DONATIONS, Resources, inference_and_donate, reference
from chunkflow.storage import create_volume, open_store, open_volume

SHAPE = (16, 64, 64)


def _client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="chunkflow-test", credentials=AnonymousCredentials())


def smooth(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Smooth content with a little noise: realistic for compression, distinct per voxel."""
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    noise = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return (0.5 + 0.3 * np.sin(x / 5 + z / 3) * np.cos(y / 7) + 0.05 * noise)[None].astype(np.float32)


def gcs_job(bucket: str, fmt: str = "precomputed", name: str = "job", compression: str = "none", **kw):
    if fmt == "precomputed":
        inp, out = f"gs://{bucket}/{name}-in", f"gs://{bucket}/{name}-out"
    else:
        inp, out = f"zarr://gs://{bucket}/{name}-in.zarr", f"zarr://gs://{bucket}/{name}-out.zarr"
    vol = create_volume(inp, Bbox.from_shape((0, 0, 0), SHAPE), Vec(8, 32, 32), 1, "float32")
    vol.write(vol.bbox, smooth())
    return plan(inp, out, f"gs://{bucket}/{name}", "identity", "8,32,32", overlap="2,8,8", block="8,32,32",
                compression=compression, **kw)


def _objects(bucket: str, prefix: str) -> dict[str, int]:
    """name -> generation of every live object under ``prefix``."""
    return {b.name: b.generation for b in _client().list_blobs(bucket, prefix=prefix)}


def _expected_keys(job) -> set[str]:
    return {DONATIONS + d.key for idx in job.layout.block_indices() for d in job.layout.donations_to(idx)}


@pytest.mark.parametrize("fmt, compression", [("precomputed", "none"), ("zarr", "blosc")])
def test_two_stages_on_gcs_equal_the_reference(gcs_bucket, fmt, compression):
    job = gcs_job(gcs_bucket, fmt, compression=compression)
    assert job.output.startswith(("gs://", "zarr://gs://")) and job.store.startswith("gs://")
    summary = run_job(job, LocalEngine(), progress=False)
    assert summary.stage2.tasks == job.layout.num_blocks
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, reference(job, Resources(job)), rtol=0, atol=1e-5)

    report = inspect_store(open_store(job.store), verify=True)
    assert report.healthy and report.counts()["blended"] == job.layout.num_blocks, report.summary()
    assert all(b.checksum == "ok" and b.job == "ok" for b in report.blocks if b.present)
    # exactly one object per expected key, nothing else under donations/
    names = [n for n in _objects(gcs_bucket, "job/" + DONATIONS)]
    assert sorted(n[len("job/"):] for n in names) == sorted(_expected_keys(job))


def test_damaged_donations_are_named_and_refused_and_other_blocks_blend(gcs_bucket):
    job = gcs_job(gcs_bucket)
    run_stage(job, 1, LocalEngine(), progress=False)
    store = open_store(job.store)
    assert inspect_store(store).counts()["complete"] == job.layout.num_blocks

    target = Vec(1, 1, 1)
    box = job.layout.block_box(target)
    keys = [d.key for d in job.layout.donations_to(target)]
    bucket = _client().bucket(gcs_bucket)
    bucket.blob(f"job/{DONATIONS}{keys[0]}").delete()
    blob = bucket.blob(f"job/{DONATIONS}{keys[1]}")
    data = bytearray(blob.download_as_bytes())
    data[-5] ^= 0xFF
    blob.upload_from_string(bytes(data))

    listed = inspect_store(store)
    [row] = [b for b in listed.blocks if b.block == box.name]
    assert row.state == "incomplete" and row.missing == [keys[0]] and not listed.healthy
    verified = inspect_store(store, verify=True)
    [row] = [b for b in verified.blocks if b.block == box.name]
    assert row.state == "bad" and row.checksum == "bad"
    assert any(keys[1] in e and "checksum" in e for e in row.errors)
    assert all(b.state == "complete" for b in verified.blocks if b.block != box.name)

    before = _objects(gcs_bucket, "job-out/")
    with pytest.raises(MissingDonations) as err:
        receive_and_blend(job, target)
    assert keys[0] in str(err.value) and keys[1] in str(err.value) and "checksum" in str(err.value)
    assert _objects(gcs_bucket, "job-out/") == before  # nothing written

    others = [idx for idx in job.layout.block_indices() if idx != target]
    run_stage(job, 2, LocalEngine(), blocks=others, progress=False)
    output = open_volume(job.output).read(job.layout.bbox)
    expected = reference(job, Resources(job))
    for idx in others:
        sl = (slice(None),) + job.layout.block_box(idx).slices(job.layout.bbox)
        np.testing.assert_allclose(output[sl], expected[sl], rtol=0, atol=1e-5)


def test_retried_and_duplicated_donors_leave_one_object_per_key(gcs_bucket):
    job = gcs_job(gcs_bucket, compression="zstd")
    donor = Vec(0, 0, 0)
    inference_and_donate(job, donor)
    first = {b.name: b.md5_hash for b in _client().list_blobs(gcs_bucket, prefix="job/" + DONATIONS)}
    threads = [threading.Thread(target=inference_and_donate, args=(job, donor)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inference_and_donate(job, donor)  # and a plain retry
    listing = list(_client().list_blobs(gcs_bucket, prefix="job/" + DONATIONS, versions=True))
    assert sorted(b.name for b in listing) == sorted(first)  # one live object (one version) per key
    assert {b.name: b.md5_hash for b in listing} == first    # same bytes: a pure function of (job, block)
    assert len(first) == len(job.layout.donations_from(donor))


def test_cleanup_deletes_consumed_donations_and_a_rerun_skips_done_blocks(gcs_bucket):
    job = gcs_job(gcs_bucket)
    run_job(job, LocalEngine(), progress=False, cleanup=True)
    assert _objects(gcs_bucket, "job/" + DONATIONS) == {}
    output_objects = _objects(gcs_bucket, "job-out/")
    expected = reference(job, Resources(job))
    np.testing.assert_allclose(open_volume(job.output).read(job.layout.bbox), expected, rtol=0, atol=1e-5)

    rerun = run_stage(job, 2, LocalEngine(), progress=False, cleanup=True)
    assert rerun.skipped == job.layout.num_blocks and rerun.tasks == 0
    assert _objects(gcs_bucket, "job-out/") == output_objects

    report = inspect_store(open_store(job.store))
    assert report.healthy and report.counts()["blended"] == job.layout.num_blocks
    # forcing stage two past its done marker finds the donations gone: refused, nothing written
    with pytest.raises(MissingDonations):
        receive_and_blend(job, Vec(1, 1, 1))
    assert _objects(gcs_bucket, "job-out/") == output_objects


def test_cleanup_rerun_sweeps_what_a_late_duplicate_donated(gcs_bucket):
    """A donor run again after its receivers were blended and cleaned up writes its donations
    again; stage two with cleanup over the finished blocks removes them (one listing per block)."""
    job = gcs_job(gcs_bucket)
    run_job(job, LocalEngine(), progress=False, cleanup=True)
    output_objects = _objects(gcs_bucket, "job-out/")
    donor = next(b for b in job.layout.block_indices() if len(job.layout.donations_from(b)) > 4)
    inference_and_donate(job, donor)  # the late duplicate
    late = {f"job/{DONATIONS}{d.key}" for d in job.layout.donations_from(donor)}
    assert set(_objects(gcs_bucket, "job/" + DONATIONS)) == late
    rerun = run_stage(job, 2, LocalEngine(), progress=False, cleanup=True)
    assert rerun.skipped == job.layout.num_blocks and rerun.tasks == 0 and rerun.swept == len(late)
    assert _objects(gcs_bucket, "job/" + DONATIONS) == {}
    assert set(_objects(gcs_bucket, "job-out/")) == set(output_objects)


def test_manifest_is_never_overwritten_on_gcs(gcs_bucket):
    job = gcs_job(gcs_bucket)
    generation = _objects(gcs_bucket, f"job/{MANIFEST}")
    store = open_store(job.store)
    assert store.put(MANIFEST, b"{}", if_absent=True) is False  # ifGenerationMatch=0, enforced by the server
    with pytest.raises(JobError, match="already holds job"):
        plan(job.input, job.output, job.store, "identity", "8,32,32", overlap="2,8,8", block="8,32,32",
             blend="constant")
    assert plan(job.input, job.output, job.store, "identity", "8,32,32", overlap="2,8,8",
                block="8,32,32").job_hash == job.job_hash  # the same parameters: the same job
    assert _objects(gcs_bucket, f"job/{MANIFEST}") == generation


class RecordingStore:
    """The real GCS store, recording every name it is asked to read (to prove junk is not followed)."""

    def __init__(self, store):
        self._store, self.read = store, []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def get(self, name):
        self.read.append(name)
        return self._store.get(name)

    def get_head(self, name, nbytes):
        self.read.append(name)
        return self._store.get_head(name, nbytes)

    def get_many(self, names, workers=16):
        self.read.extend(names)
        return self._store.get_many(names, workers)


JUNK = ["donations/../x", "donations/a%b%c", "donations/1-2_3-4_5-x%0-1_0-1_0-1", "donations/x/../../manifest.json",
        "donations/0-32_0-32_0-8%0-8_0-8_0-99", "donations/%2e%2e"]


def test_junk_keys_are_reported_and_never_followed(gcs_bucket):
    job = gcs_job(gcs_bucket)
    run_stage(job, 1, LocalEngine(), progress=False)
    bucket = _client().bucket(gcs_bucket)
    for name in JUNK:
        bucket.blob("job/" + name).upload_from_string(b"junk")
    bucket.blob("job/" + DONATIONS + "0-32_0-32_0-7%0-8_0-8_0-7").upload_from_string(b"stray")  # not a block
    store = RecordingStore(open_store(job.store))
    report = inspect_store(store, verify=True)
    assert sorted(name for name, _ in report.malformed) == sorted(JUNK)
    assert report.orphans == [DONATIONS + "0-32_0-32_0-7%0-8_0-8_0-7"]
    assert not report.healthy
    assert all(b.state == "complete" for b in report.blocks)
    assert not set(store.read) & set(JUNK + report.orphans)
    assert set(store.read) <= _expected_keys(job) | {MANIFEST}
    run_stage(job, 2, LocalEngine(), progress=False)  # stage two is not disturbed
    np.testing.assert_allclose(open_volume(job.output).read(job.layout.bbox), reference(job, Resources(job)),
                               rtol=0, atol=1e-5)


def test_donation_of_another_job_is_refused_by_name(gcs_bucket):
    job = gcs_job(gcs_bucket)
    other = gcs_job(gcs_bucket, name="other", blend="constant")
    for j in (job, other):
        run_stage(j, 1, LocalEngine(), progress=False)
    target = Vec(1, 1, 1)
    key = job.layout.donations_to(target)[0].key
    bucket = _client().bucket(gcs_bucket)
    bucket.copy_blob(bucket.blob(f"other/{DONATIONS}{key}"), bucket, f"job/{DONATIONS}{key}")
    report = inspect_store(open_store(job.store), headers=True)
    [row] = [b for b in report.blocks if b.block == job.layout.block_box(target).name]
    assert row.job == "foreign" and row.state == "bad"
    assert row.errors == [f"donation {key} belongs to job {other.job_hash}, not {job.job_hash}"]
    with pytest.raises(MissingDonations, match=f"{key} belongs to job {other.job_hash}"):
        receive_and_blend(job, target)


# -- the command line on gs:// volumes: one line and exit 2 when the bucket or endpoint is bad ---------------------

CHUNKFLOW = shutil.which("chunkflow", path=str(Path(sys.executable).parent)) or "chunkflow"
PLAN_FLAGS = ["identity", "8,32,32", "--block", "8,32,32"]


def chunkflow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CHUNKFLOW, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def refused_endpoint() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"chunkflow: error: {expected}"], result.stderr


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_plan_names_a_missing_input_or_output_bucket(gcs_bucket, tmp_path, fmt):
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    prefix = "zarr://" if fmt == "zarr" else ""
    suffix = ".zarr" if fmt == "zarr" else ""
    source = f"{prefix}gs://{missing}/in{suffix}"
    result = chunkflow("plan", source, f"gs://{gcs_bucket}/out", f"gs://{gcs_bucket}/job", *PLAN_FLAGS, "--quiet")
    assert_one_line(result, f"bucket {missing} does not exist (open {source})")

    gcs_job(gcs_bucket, fmt, name="ok")  # an input that exists, an output bucket that does not
    target = f"{prefix}gs://{missing}/out{suffix}"
    result = chunkflow("plan", f"{prefix}gs://{gcs_bucket}/ok-in{suffix}", target, str(tmp_path / "job"), *PLAN_FLAGS,
                       "--quiet")
    assert_one_line(result, f"bucket {missing} does not exist (create {target})")
    assert sorted(_objects(gcs_bucket, "")) == sorted(_objects(gcs_bucket, "ok"))  # nothing written beside
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("source", ["gs://lab/in", "zarr://gs://lab/in.zarr"])
def test_plan_on_a_refused_endpoint_fails_fast_in_one_line(tmp_path, source):
    endpoint = refused_endpoint()
    env = {"STORAGE_EMULATOR_HOST": endpoint, "CHUNKFLOW_GCS_RETRY_DEADLINE": "2"}
    started = time.monotonic()
    result = chunkflow("plan", source, str(tmp_path / "out.zarr"), str(tmp_path / "job"), *PLAN_FLAGS, "--quiet",
                       env=env)
    elapsed = time.monotonic() - started
    host = endpoint[len("http://"):]
    assert_one_line(result, f"connection refused: GCS endpoint {host} (open {source})")
    assert elapsed < 30, f"took {elapsed:.0f} s"  # the retry deadline, not cloud-files' minutes of retries
    assert list(tmp_path.iterdir()) == []


def test_plan_on_gcs_keeps_the_credentials_notice_off_stdout(gcs_bucket):
    gcs_job(gcs_bucket, name="src")
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    result = subprocess.run([CHUNKFLOW, "plan", f"gs://{gcs_bucket}/src-in", f"gs://{gcs_bucket}/out",
                             f"gs://{gcs_bucket}/job", *PLAN_FLAGS], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith("job ") and lines[0].endswith(f"planned in gs://{gcs_bucket}/job")
    assert "credentials" not in result.stdout.lower() and "\x1b" not in result.stdout
    assert "credentials" not in result.stderr.lower()  # not moved to stderr either: one debug log line
