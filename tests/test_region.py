"""Regions of interest (--bbox) and mip levels (--mip): the output over a region is exactly
whole-volume inference over that region, with context from the real input beyond it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkflow import cli
from chunkflow.bbox import Bbox, Vec
from chunkflow.engines import LocalEngine, run_job
from chunkflow.errors import JobError
from chunkflow.planning import plan
from chunkflow.region import aligned_region, is_aligned, parse_region
from chunkflow.stages import Resources, reference
from chunkflow.storage import open_volume
from tests.helpers import CONV3, examples, make_input

WHOLE = Bbox((0, 0, 0), (16, 64, 64))


def _main(*args: str) -> int:
    try:
        cli.main([str(a) for a in args])
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def test_parse_region_checks_the_input_bounds():
    assert parse_region(None, WHOLE) == WHOLE
    assert parse_region("8-40_0-32_4-12", WHOLE) == Bbox((4, 0, 8), (12, 32, 40))
    with pytest.raises(JobError, match="reaches outside the input.*inside it: 8-64_0-32_4-16"):
        parse_region("8-70_0-32_4-20", WHOLE)
    with pytest.raises(JobError, match="is not a box name"):
        parse_region("8-40_0-32", WHOLE)
    with pytest.raises(JobError, match="is not a box name"):
        parse_region(True, WHOLE)


def test_aligned_region_rounds_outward_to_the_chunk_grid():
    chunk = Vec(8, 32, 32)
    out = Bbox((0, 0, 0), (20, 64, 100))
    assert is_aligned(Bbox((8, 32, 64), (20, 64, 100)), out, chunk)  # stops at the far faces
    assert not is_aligned(Bbox((4, 0, 0), (8, 32, 32)), out, chunk)
    assert aligned_region(Bbox((4, 10, 40), (9, 33, 70)), out, chunk) == Bbox((0, 0, 32), (16, 64, 96))
    assert aligned_region(Bbox((4, 10, 70), (19, 33, 99)), out, chunk) == Bbox((0, 0, 64), (20, 64, 100))


@settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mz=st.integers(0, 1), my=st.integers(0, 2), mx=st.integers(0, 2), nz=st.integers(1, 2), ny=st.integers(1, 2),
       nx=st.integers(1, 2), blocks=st.sampled_from([(8, 16, 16), (16, 32, 32), (8, 32, 16)]))
def test_context_comes_from_the_input_beyond_the_region(tmp_path_factory, mz, my, mx, nz, ny, nx, blocks):
    """Invariant 1 over a region, against an independent answer: with overlap 0 and a region on
    the whole volume's patch grid, every region voxel is covered by the very patch that covers it
    in whole-volume inference, so the two stages over the region must equal the whole-volume
    reference restricted to it (padding at the region's faces instead of reading real context
    would change the voxels near them)."""
    tmp = tmp_path_factory.mktemp("region")
    url, _ = make_input(tmp / "em", (24, 80, 80), seed=21)
    patch = Vec(8, 16, 16)  # CONV3 is valid: input patch = output patch + 6
    start = Vec(mz, my, mx) * patch
    region = Bbox(start, start + Vec(nz, ny, nx) * patch)
    block = Vec(min(b, s) for b, s in zip(blocks, region.shape))
    common = dict(input_patch=(14, 22, 22), output_patch=tuple(patch), overlap=(0, 0, 0), blend="gaussian")
    whole = plan(url, f"file://{tmp / 'whole'}", str(tmp / "whole_job"), CONV3, block=(8, 16, 16), **common)
    expected = reference(whole, Resources(whole))[(slice(None),) + region.slices(whole.layout.bbox)]
    job = plan(url, f"file://{tmp / 'out'}", str(tmp / "job"), CONV3, block=tuple(block), bbox=region.name, **common)
    assert job.layout.bbox == region
    run_job(job, LocalEngine(), progress=False)
    out = open_volume(f"file://{tmp / 'out'}")
    assert out.bbox == region
    np.testing.assert_allclose(out.read(region), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reference(job, Resources(job)), expected, rtol=0, atol=1e-5)


FLAGS = ["--model", CONV3, "--input-patch", "14,38,38", "--output-patch", "8,32,32", "--overlap", "2,8,8",
         "--blend", "bump", "--quiet"]


def test_two_regions_one_after_another_into_one_output(tmp_path):
    """A new output covers exactly its region; a second region goes into an existing larger output
    where it is aligned to its chunks; each region equals its own reference."""
    url, _ = make_input(tmp_path / "em", (16, 64, 128), seed=22)
    big = f"file://{tmp_path / 'big'}"
    # the output over the whole input, written region by region
    assert _main("plan", "--input", url, "--output", big, "--donations", tmp_path / "j0", "--block", "16,32,32",
                 "--bbox", "0-64_0-64_0-16", *FLAGS[:-1]) == 0
    info = json.loads((tmp_path / "big" / "info").read_text())
    assert info["scales"][0]["voxel_offset"] == [0, 0, 0] and info["scales"][0]["size"] == [64, 64, 16]
    assert _main("run", "--input", url, "--output", f"file://{tmp_path / 'whole'}", "--block", "16,32,32",
                 *FLAGS) == 0  # a full-size output to write the second region into
    for i, region in enumerate(("0-64_0-64_0-16", "64-128_32-64_0-16")):
        out = f"file://{tmp_path / 'whole'}"
        assert _main("run", "--input", url, "--output", out, "--donations", tmp_path / f"r{i}", "--overwrite", "--block",
                     "16,32,32", "--bbox", region, *FLAGS) == 0
        ref = f"file://{tmp_path / f'ref{i}'}"
        assert _main("reference", "--input", url, "--output", ref, "--bbox", region, *FLAGS) == 0
        box = Bbox.from_name(region)
        assert open_volume(ref).bbox == box
        np.testing.assert_allclose(open_volume(out).read(box), open_volume(ref).read(box), rtol=0, atol=1e-5)


def test_a_region_not_aligned_to_an_existing_output_is_refused_with_the_aligned_one(tmp_path, capsys):
    url, _ = make_input(tmp_path / "em", (16, 64, 64), seed=23)
    out = f"file://{tmp_path / 'out'}"
    assert _main("run", "--input", url, "--output", out, "--block", "16,32,32", *FLAGS) == 0
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    capsys.readouterr()
    status = _main("run", "--input", url, "--output", out, "--donations", tmp_path / "j2", "--block", "16,32,32",
                   "--bbox", "8-40_0-32_0-16", *FLAGS)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "not aligned" in err[0] and "--bbox 0-64_0-32_0-16" in err[0], err[0]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    assert not (tmp_path / "j2").exists()


def _two_mips(path: Path) -> tuple[str, np.ndarray]:
    """A precomputed layer with mip 0 and mip 1 (2x in x and y), a non-zero offset, data at both."""
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="uint8", encoding="raw",
                                       resolution=[4, 4, 40], voxel_offset=[64, 32, 8], volume_size=[256, 128, 16],
                                       chunk_size=[32, 32, 8])
    cv = CloudVolume(f"precomputed://file://{path}", info=info, compress=False)
    cv.add_scale((2, 2, 1), chunk_size=[32, 32, 8])
    cv.commit_info()
    rng = np.random.default_rng(5)
    mip1 = CloudVolume(f"precomputed://file://{path}", mip=1, compress=False)
    data = (rng.random((128, 64, 16, 1)) * 255).astype(np.uint8)  # x, y, z, c
    mip1[32:160, 16:80, 8:24] = data
    mip0 = CloudVolume(f"precomputed://file://{path}", mip=0, compress=False)
    mip0[64:320, 32:160, 8:24] = np.repeat(np.repeat(data, 2, axis=0), 2, axis=1)
    return f"file://{path}", data.transpose(3, 2, 1, 0)


def test_a_region_at_mip_1_equals_the_reference_at_mip_1(tmp_path, capsys):
    url, data = _two_mips(tmp_path / "em")
    source = open_volume(url, mip=1)
    assert source.bbox == Bbox((8, 16, 32), (24, 80, 160)) and source.resolution == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(source.read(source.bbox), data)
    region = "64-160_16-80_8-24"
    out, ref = f"file://{tmp_path / 'out'}", f"file://{tmp_path / 'ref'}"
    assert _main("run", "--input", url, "--output", out, "--mip", "1", "--bbox", region, "--block", "16,32,32",
                 *FLAGS) == 0
    assert _main("reference", "--input", url, "--output", ref, "--mip", "1", "--bbox", region, *FLAGS) == 0
    written = open_volume(out)
    assert written.bbox == Bbox.from_name(region) and written.resolution == (40.0, 8.0, 8.0)
    np.testing.assert_allclose(written.read(written.bbox), open_volume(ref).read(written.bbox), rtol=0, atol=1e-5)
    capsys.readouterr()
    assert _main("plan", "--input", url, "--output", f"file://{tmp_path / 'x'}", "--donations", tmp_path / "jx",
                 "--mip", "2", *FLAGS) == 2
    err = capsys.readouterr().err
    assert "--mip 2" in err and "0 (40x4x4 nm), 1 (40x8x8 nm)" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "jx").exists()


def test_issue_acceptance_mip_1_region_into_sharded_compressed_outputs(tmp_path):
    """A region at mip 1 of a multi-scale layer with an offset, run into sharded, compressed
    outputs (precomputed: gzip shards of 2x2x2 chunks; zarr: zstd shards), equals `chunkflow
    reference` over the same region at the same mip; read back by tensorstore, a reader we did
    not write."""
    ts = pytest.importorskip("tensorstore")
    url, _ = _two_mips(tmp_path / "em")
    region = "64-160_16-80_8-24"
    box = Bbox.from_name(region)
    ref = f"file://{tmp_path / 'ref'}"
    assert _main("reference", "--input", url, "--output", ref, "--mip", "1", "--bbox", region, *FLAGS) == 0
    expected = open_volume(ref).read(box)
    outputs = {"precomputed": (f"file://{tmp_path / 'pc'}", "gzip"), "zarr": (str(tmp_path / "out.zarr"), "zstd")}
    for url_out, codec in outputs.values():
        flags = ["--input", url, "--output", url_out, "--mip", "1", "--bbox", region, "--block", "16,32,32",
                 "--sharded", "--output-compression", codec, *FLAGS]
        store = url_out.removeprefix("file://") + ".donations"  # where `run` keeps a local output's job
        assert _main("plan", "--donations", store, "--storage-chunk", "8,16,16", *flags) == 0  # shards of 2x2x2
        assert _main("run", *flags) == 0
        written = open_volume(url_out)
        assert written.sharded and written.bbox == box and written.resolution == (40.0, 8.0, 8.0)
        np.testing.assert_allclose(written.read(box), expected, rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "pc" / "info").read_text())["scales"][0]
    assert info["sharding"]["data_encoding"] == "gzip" and info["voxel_offset"] == [64, 16, 8]
    assert len(list((tmp_path / "pc").glob("*/*.shard"))) == 6  # one shard per block: 3 x 2 x 1 blocks
    pc = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path / 'pc'}"}).result()
    got = pc[ts.d["x", "y", "z"].translate_to[0, 0, 0]].read().result()  # x, y, z, c
    np.testing.assert_allclose(np.asarray(got).transpose(3, 2, 1, 0), expected, rtol=0, atol=1e-5)
    za = ts.open({"driver": "zarr3", "kvstore": f"file://{tmp_path / 'out.zarr' / '0'}"}).result()
    np.testing.assert_allclose(np.asarray(za.read().result()), expected, rtol=0, atol=1e-5)
