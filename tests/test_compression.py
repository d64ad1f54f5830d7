"""Donation compression (lossless) and float16 donations (lossy within the documented bound).

float16 rounds each piece value to nearest: relative error <= u = 2^-11 for normal values,
absolute error <= 2^-25 below 2^-14 (subnormals). Stage two adds k pieces per voxel in
float32, so |blended - exact| <= 2^-11 * sum_i |p_i| + k * 2^-25, plus the float32 rounding
both paths share. docs/gcs.md derives it; these tests check it holds on a real pipeline.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chunkflow.bbox import Bbox, Vec
from chunkflow.engines import LocalEngine, run_job
from chunkflow.errors import ModelError
from chunkflow.donation_report import inspect_store
from chunkflow.planning import plan
from chunkflow.stages import DONATIONS, Resources, reference
from chunkflow.storage import create_volume, open_store, open_volume
from chunkflow.storage.donation_codec import decode_donation, encode_donation
from tests.helpers import CONV3_SAME
from tests.test_gcs_pipeline import smooth

SHAPE = (16, 64, 64)
U16 = 2.0 ** -11


def _input(tmp_path: Path, scale: float = 1.0) -> str:
    vol = create_volume(f"file://{tmp_path / 'in'}", Bbox.from_shape((0, 0, 0), SHAPE), Vec(8, 32, 32), 1, "float32")
    vol.write(vol.bbox, smooth(SHAPE) * np.float32(scale))
    return vol.url


def _job(tmp_path: Path, name: str, url: str, model: str = "identity", **kw):
    return plan(url, f"file://{tmp_path / (name + '-out')}", str(tmp_path / name), model, "8,32,32",
                overlap="2,8,8", block="8,32,32", **kw)


def _run(job) -> np.ndarray:
    run_job(job, LocalEngine(), progress=False)
    return open_volume(job.output).read(job.layout.bbox)


def test_zstd_and_blosc_are_lossless_and_smaller(tmp_path):
    url = _input(tmp_path)
    outputs, stored = {}, {}
    for compression in ("none", "zstd", "blosc"):
        job = _job(tmp_path, compression, url, compression=compression)
        outputs[compression] = _run(job)
        report = inspect_store(open_store(job.store), verify=True)
        assert report.healthy and all(b.checksum == "ok" for b in report.blocks if b.present)
        stored[compression] = report.stored_bytes
        assert report.raw_bytes == sum(d.piece.size * 4 for idx in job.layout.block_indices()
                                       for d in job.layout.donations_to(idx))
    assert np.array_equal(outputs["zstd"], outputs["none"]) and np.array_equal(outputs["blosc"], outputs["none"])
    assert stored["zstd"] < stored["none"] and stored["blosc"] < stored["none"]


def test_float16_donations_stay_within_the_documented_bound(tmp_path):
    url = _input(tmp_path)
    exact_job = _job(tmp_path, "f32", url, model=CONV3_SAME)
    half_job = _job(tmp_path, "f16", url, model=CONV3_SAME, donation_dtype="float16", compression="zstd")
    assert half_job.job_hash != exact_job.job_hash  # the dtype changes the numbers, so the job
    exact, half = _run(exact_job), _run(half_job)
    expected = reference(half_job, Resources(half_job))
    np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-5)  # float32 donations: exact

    layout, store = half_job.layout, open_store(half_job.store)
    abs_sum = np.zeros_like(expected)
    count = np.zeros(expected.shape[1:], np.int32)
    for idx in layout.block_indices():
        for d in layout.donations_to(idx):
            _, piece = decode_donation(store.get(DONATIONS + d.key), d.key, half_job.job_hash)
            assert piece.dtype == np.float16
            sl = d.piece.slices(layout.bbox)
            abs_sum[(slice(None),) + sl] += np.abs(piece.astype(np.float32))
            count[sl] += 1
    bound = U16 / (1 - U16) * abs_sum + count * 2.0 ** -25 + 2e-6  # 2e-6: float32 summation order
    error = np.abs(half - expected)
    assert (error <= bound).all(), float((error - bound).max())
    assert error.max() > 1e-5            # float16 really is lossy here...
    band = count > 0
    assert np.array_equal(half[:, ~band], exact[:, ~band])  # ...but the core never is
    assert error.max() <= U16 * np.abs(expected).max() * 8  # a few units of 2^-11 of the output scale


def test_float16_overflow_is_refused_not_written(tmp_path):
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="do not fit float16"):
        encode_donation(np.full((1, 2, 2, 2), 7e4, np.float32).astype(np.float16), Bbox.from_name("0-2_0-2_0-2"),
                        "0-2_0-2_0-2%0-2_0-2_0-2", "abc")
    job = _job(tmp_path, "big", _input(tmp_path, scale=1e5), donation_dtype="float16")
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="do not fit float16"):
        run_job(job, LocalEngine(), progress=False)
    assert not any(name.startswith(DONATIONS) for name in open_store(job.store).list())


def test_cli_run_with_compression_reports_the_ratio_in_inspect(tmp_path):
    url = _input(tmp_path)
    exe = Path(sys.executable).parent / "chunkflow"
    run = subprocess.run([str(exe), "run", url, f"file://{tmp_path / 'out'}", "identity", "8,32,32", "--overlap",
                          "2,8,8", "--block", "8,32,32", "--donations", str(tmp_path / "job"), "--compression",
                          "blosc", "--donation-dtype", "float16", "--quiet"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    shown = subprocess.run([str(exe), "inspect", str(tmp_path / "job")], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "(donations float16, compression blosc;" in shown.stdout
    ratio = float(shown.stdout.split("ratio ")[-1].split("x)")[0])
    assert ratio > 1.0


@pytest.mark.parametrize("model_scale", [1e5])
def test_float16_output_overflow_is_refused_not_written(tmp_path, model_scale):
    """A float16 (zarr) output cannot hold |value| > 65504: such values were written as inf at exit 0
    (an adversarial review, 2026-11-29). Each block is refused before its first write, in stage one
    (its core) and in stage two (its band), like float16 donations; a float32 output takes them."""
    url = _input(tmp_path, scale=model_scale)
    job = plan(url, str(tmp_path / "half.zarr"), str(tmp_path / "half"), "identity", "8,32,32", overlap="2,8,8",
               block="8,32,32", dtype="float16")
    with np.errstate(over="ignore"), pytest.raises(ModelError, match="do not fit float16"):
        run_job(job, LocalEngine(), progress=False)
    written = open_volume(job.output).read(job.layout.bbox)
    assert not np.isinf(written).any()  # refused blocks wrote nothing; blocks whose values fit are exact
    done = [name for name in open_store(job.store).list() if name.startswith("done/stage1/")]
    assert len(done) < job.layout.num_blocks
    fits = np.abs(open_volume(url).read(job.layout.bbox)) < 65504
    assert np.all((written == 0) | fits)
    # large values only in the bands: stage one writes every core and donates, stage two refuses every band
    layout = job.layout
    bands = [band for block in layout.block_indices() for band in layout.band_boxes(block)]
    data = smooth(SHAPE)
    for band in bands:
        data[(slice(None),) + band.slices(layout.bbox)] += np.float32(model_scale)
    vol = create_volume(f"file://{tmp_path / 'banded'}", layout.bbox, Vec(8, 32, 32), 1, "float32")
    vol.write(vol.bbox, data)
    banded = plan(vol.url, str(tmp_path / "b.zarr"), str(tmp_path / "b"), "identity", "8,32,32", overlap="2,8,8",
                  block="8,32,32", dtype="float16")
    with np.errstate(over="ignore"), pytest.raises(ModelError, match="do not fit float16"):
        run_job(banded, LocalEngine(), progress=False)
    store = open_store(banded.store)
    assert sum(name.startswith("done/stage1/") for name in store.list()) == layout.num_blocks
    with_bands = {layout.block_box(b).name for b in layout.block_indices() if layout.band_boxes(b)}
    assert with_bands and not with_bands & {n.rsplit("/", 1)[1] for n in store.list() if n.startswith("done/stage2/")}
    written = open_volume(banded.output).read(layout.bbox)
    assert not np.isinf(written).any()
    for block in layout.block_indices():
        core = layout.core_box(block)
        np.testing.assert_allclose(written[(slice(None),) + core.slices(layout.bbox)],
                                   data[(slice(None),) + core.slices(layout.bbox)], rtol=1e-3)
    np.testing.assert_allclose(_run(_job(tmp_path, "full", url)), open_volume(url).read(job.layout.bbox), rtol=1e-6)
