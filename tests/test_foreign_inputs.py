"""Inputs made by other tools, run through `chunkflow run` and compared with `chunkflow reference`.

Every input here is written by the tool a lab would have used (tensorstore, CloudVolume, ome-zarr,
zarr-python, igneous), never by chunkflow. For each one the test checks two things:

* chunkflow reads it voxel for voxel as the tool wrote it (``open_volume(url, mip=...)`` against
  the array handed to the tool, or against the tool's own read where the tool computed the data,
  as igneous's downsampling does), with the geometry the tool gave it (offset, resolution);
* ``chunkflow run`` (two stages, several blocks) over a region of it equals ``chunkflow
  reference`` (whole-volume inference in one process) over the same region and mip, to 1e-5.

Outputs are read back by readers chunkflow did not write: tensorstore (zarr + zstd) and
CloudVolume (precomputed + gzip, stored as NAME.gz on file://, which tensorstore does not see:
docs/formats_precomputed.md). Sharded outputs are not tested here (see docs/design.md).

Small volumes (16x64x64 at the level that is run) keep the module well under a minute on 2 cores.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from chunkflow import cli
from chunkflow.bbox import Bbox, Vec
from chunkflow.storage import open_volume
from tests.helpers import CONV3

# CONV3 is valid: the output patch is the input patch - 6; overlap and bump blending as tests/test_region.py
FLAGS = ["--model", CONV3, "--input-patch", "14,38,38", "--output-patch", "8,32,32", "--overlap", "2,8,8",
         "--blend", "bump", "--quiet"]
BLOCK = "16,32,32"
ATOL = 1e-5
#: a small sharding spec (4 shards of 2x2x2 chunks, 2 minishards each), gzip'd index and data, as real layers have
SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 2, "hash": "identity", "minishard_bits": 1,
            "shard_bits": 2, "minishard_index_encoding": "gzip", "data_encoding": "gzip"}


def _main(*args) -> int:
    try:
        cli.main([str(a) for a in args])
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def _em(shape_zyx, dtype="uint8", seed=0) -> np.ndarray:
    """Z,Y,X noise smoothed along x, scaled to the dtype's range."""
    rng = np.random.default_rng(seed)
    data = rng.random(shape_zyx)
    data = (data + np.roll(data, 1, axis=-1)) / 2
    return (data * np.iinfo(dtype).max).astype(dtype)


def run_and_compare(tmp: Path, url: str, name: str, *, bbox: str | None = None, mip: int = 0, zarr: bool = False,
                    extra=(), ref_extra=()) -> tuple[str, np.ndarray, Bbox]:
    """`chunkflow run` and `chunkflow reference` over the same region and mip; the run's output must
    equal the reference. Returns (output url, reference array, region)."""
    out = str(tmp / f"{name}.zarr") if zarr else f"file://{tmp / name}"
    ref = str(tmp / f"{name}-ref.zarr") if zarr else f"file://{tmp / (name + '-ref')}"
    region = ["--bbox", bbox] if bbox else []
    common = ["--input", url, "--mip", mip, *region, *FLAGS]
    assert _main("run", *common, "--output", out, "--donations", tmp / f"{name}.job", "--block", BLOCK, *extra) == 0
    assert _main("reference", *common, "--output", ref, *ref_extra) == 0
    got, want = open_volume(out), open_volume(ref)
    expected_box = Bbox.from_name(bbox) if bbox else open_volume(url, mip=mip).bbox
    assert got.bbox == want.bbox == expected_box
    assert got.resolution == want.resolution == open_volume(url, mip=mip).resolution
    assert got.num_channels == 3
    expected = want.read(expected_box)
    np.testing.assert_allclose(got.read(expected_box), expected, rtol=0, atol=ATOL)
    return out, expected, expected_box


# -- sharded precomputed inputs ------------------------------------------------------------------
def _tensorstore_sharded(path: Path, data_xyzc: np.ndarray, offset_xyz, sharding=SHARDING) -> str:
    import tensorstore as ts

    store = ts.open({
        "driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
        "multiscale_metadata": {"type": "image", "data_type": str(data_xyzc.dtype), "num_channels": 1},
        "scale_metadata": {"size": list(data_xyzc.shape[:3]), "voxel_offset": list(offset_xyz),
                           "resolution": [8, 8, 40], "encoding": "raw", "chunk_size": [16, 16, 8],
                           "sharding": sharding},
        "create": True}).result()
    store[ts.d[:].translate_to[0]].write(data_xyzc).result()
    return f"file://{path}"


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob("*") if p.is_file() and p.name != "info")


#: shards that are not boxes: murmurhash3 spreads the chunks of each shard over the volume
HASHED = dict(SHARDING, hash="murmurhash3_x86_128", preshift_bits=0, minishard_bits=2, shard_bits=1)


@pytest.mark.parametrize("sharding", [SHARDING, HASHED], ids=["identity", "murmurhash3"])
def test_tensorstore_sharded_precomputed_input(tmp_path, sharding):
    data = _em((16, 64, 64), seed=1)                       # Z,Y,X
    url = _tensorstore_sharded(tmp_path / "em", data.T[..., None], (32, 16, 8), sharding)
    shards = 2 ** sharding["shard_bits"]
    assert _files(tmp_path / "em") == [f"{i}.shard" for i in range(shards)]  # no chunk files
    source = open_volume(url, missing="refuse")
    assert source.sharded and source.bbox == Bbox((8, 16, 32), (24, 80, 96)) and source.resolution == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(source.read(source.bbox), data[None])
    sub = Bbox((10, 30, 45), (21, 61, 90))                  # across shard boundaries
    np.testing.assert_array_equal(source.read(sub), data[None][(slice(None), *sub.slices(source.bbox))])
    # a region that cuts through shards: its context is read from the shards around it
    run_and_compare(tmp_path, url, "out", bbox="40-88_24-72_8-24")


def test_cloudvolume_sharded_precomputed_input(tmp_path):
    from cloudvolume import CloudVolume
    from cloudvolume.datasource.precomputed.sharding import image_shard_shape_from_spec

    size, offset, chunk = [64, 64, 16], [0, 128, 4], [16, 16, 8]
    info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="uint8", encoding="raw",
                                       resolution=[8, 8, 40], voxel_offset=offset, volume_size=size, chunk_size=chunk)
    info["scales"][0]["sharding"] = SHARDING
    url = f"file://{tmp_path / 'em'}"
    cv = CloudVolume(f"precomputed://{url}", info=info, compress=False, progress=False)
    cv.commit_info()
    data = _em((16, 64, 64), seed=2)
    xyzc = data.T[..., None]
    shard = [int(s) for s in image_shard_shape_from_spec(SHARDING, size, chunk)]
    for corner in itertools.product(*(range(0, s, sh) for s, sh in zip(size, shard))):  # one shard per upload
        local = tuple(slice(c, min(c + sh, s)) for c, sh, s in zip(corner, shard, size))
        cv[tuple(slice(o + s.start, o + s.stop) for o, s in zip(offset, local))] = xyzc[local]
    assert _files(tmp_path / "em") == ["0.shard", "1.shard", "2.shard", "3.shard"]
    source = open_volume(url, missing="refuse")
    assert source.sharded and source.bbox == Bbox((4, 128, 0), (20, 192, 64))
    np.testing.assert_array_equal(source.read(source.bbox), data[None])
    run_and_compare(tmp_path, url, "whole")                   # the whole layer, then a region into zarr
    run_and_compare(tmp_path, url, "region", zarr=True, bbox="16-48_136-184_4-20")


def test_sharded_input_with_black_chunks_tensorstore_left_out(tmp_path, capsys):
    """tensorstore does not store chunks equal to the fill value (black borders of a real dataset):
    such an input is refused in one line naming --fill-missing, and with it equals the reference."""
    data = _em((16, 64, 64), seed=3)
    data[:8, :16, :16] = 0                                 # exactly one chunk
    url = _tensorstore_sharded(tmp_path / "em", data.T[..., None], (0, 0, 0))
    np.testing.assert_array_equal(open_volume(url, missing="zeros").read(Bbox((0, 0, 0), (16, 64, 64))), data[None])
    capsys.readouterr()
    out = f"file://{tmp_path / 'refused'}"
    assert _main("run", "--input", url, "--output", out, "--block", BLOCK, *FLAGS) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "missing" in line]
    assert len(err) == 1 and "chunk" in err[0] and "--fill-missing" in err[0], err
    run_and_compare(tmp_path, url, "filled", extra=["--fill-missing"], ref_extra=["--fill-missing"])


@pytest.mark.xfail(strict=True, reason="PrecomputedVolume._read_filling counts missing chunks with CloudVolume's "
                                       "exists(), which looks for one file per chunk, so on a sharded layer every "
                                       "chunk of the read counts as missing: `run --fill-missing` reports 32 missing "
                                       "chunks where one is")
def test_fill_missing_counts_only_the_missing_chunks_of_a_sharded_input(tmp_path):
    data = _em((16, 64, 64), seed=3)
    data[:8, :16, :16] = 0                                 # one chunk, which tensorstore does not store
    url = _tensorstore_sharded(tmp_path / "em", data.T[..., None], (0, 0, 0))
    source = open_volume(url, missing="count")
    np.testing.assert_array_equal(source.read(source.bbox), data[None])
    assert source.filled_chunks == 1                        # 32: every chunk of the 4x4x2 grid


# -- OME-Zarr images written by ome-zarr-py ------------------------------------------------------
def test_ome_zarr_write_image_level_0_runs_and_its_level_1_is_refused_in_one_line(tmp_path, capsys):
    from ome_zarr.writer import write_image

    data = _em((16, 64, 64), seed=4)
    url = str(tmp_path / "img.zarr")
    write_image(data, url, scale_factors=[2], axes="zyx", scale={"z": 40.0, "y": 8.0, "x": 8.0},
                axes_units={a: "nanometer" for a in "zyx"})
    source = open_volume(url)
    assert source.bbox == Bbox((0, 0, 0), (16, 64, 64)) and source.resolution == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(source.read(source.bbox), data[None])
    run_and_compare(tmp_path, url, "out", zarr=True, bbox="8-56_0-48_0-16")

    # level 1 of write_image's pyramid sits a quarter of its voxel off the integer grid (pixel centres)
    for command in ("run", "reference"):
        capsys.readouterr()
        out = tmp_path / f"mip1-{command}.zarr"
        assert _main(command, "--input", url, "--output", out, "--mip", 1, *FLAGS) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a whole number" in err[0] and "pixel-centre pyramid" in err[0], err
        assert not out.exists() and not Path(f"{out}.donations").exists()


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_write_multiscale_with_whole_voxel_levels_runs_at_mip_1(tmp_path, version):
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    level0 = _em((16, 128, 128), seed=5)
    level1 = level0.reshape(16, 64, 2, 64, 2).mean(axis=(2, 4)).astype(np.uint8)
    # both levels translated by (2, 16, 32) level-0 voxels = (2, 8, 16) level-1 voxels: whole voxels at each
    translation = {"type": "translation", "translation": [80.0, 128.0, 256.0]}
    transforms = [[{"type": "scale", "scale": [40.0, 8.0, 8.0]}, translation],
                  [{"type": "scale", "scale": [40.0, 16.0, 16.0]}, translation]]
    fmt = FormatV04() if version == "0.4" else FormatV05()
    url = str(tmp_path / "img.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=fmt.zarr_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale([level0, level1], group, fmt=fmt, axes=[{"name": a, "type": "space", "unit": "nanometer"}
                                                                   for a in "zyx"],
                         coordinate_transformations=transforms, storage_options={"chunks": (8, 32, 32)})
    for mip, (level, start, res) in enumerate([(level0, (2, 16, 32), 8.0), (level1, (2, 8, 16), 16.0)]):
        source = open_volume(url, mip=mip)
        assert source.bbox == Bbox.from_shape(start, level.shape) and source.resolution == (40.0, res, res)
        np.testing.assert_array_equal(source.read(source.bbox), level[None])
    out, _, region = run_and_compare(tmp_path, url, "out", mip=1, zarr=True, bbox="24-72_8-56_2-18")
    # the output lies where its voxels lie in the input's level 1: offset x level-1 voxel size
    ms = zarr.open_group(out, mode="r").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 40.0, 16.0, 16.0]},
        {"type": "translation", "translation": [0.0, 80.0, 128.0, 384.0]}]
    assert region.start == Vec(2, 8, 24)


# -- zarr v3 with shards, written by zarr-python -------------------------------------------------
def test_zarr_v3_sharded_array_input(tmp_path):
    import zarr

    data = _em((16, 64, 64), dtype="uint16", seed=6)
    url = str(tmp_path / "em.zarr")
    array = zarr.create_array(url, shape=data.shape, chunks=(8, 16, 16), shards=(16, 32, 32), dtype="uint16",
                              attributes={"voxel_offset": [4, 8, 12], "resolution": [30.0, 6.0, 6.0]})
    array[:] = data
    codecs = json.loads((tmp_path / "em.zarr" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["sharding_indexed"]
    assert len(list((tmp_path / "em.zarr" / "c").rglob("*"))) > 4   # shard files, not one chunk per file
    source = open_volume(url)
    assert source.bbox == Bbox((4, 8, 12), (20, 72, 76)) and source.resolution == (30.0, 6.0, 6.0)
    assert (getattr(source, "shard_size", None) or source.chunk_size) == Vec(16, 32, 32)  # the unit of writes
    assert source.dtype == np.uint16
    np.testing.assert_array_equal(source.read(source.bbox), data[None])
    run_and_compare(tmp_path, url, "out", bbox="20-68_8-72_4-20")


# -- a multi-scale precomputed layer with an offset, downsampled by igneous -------------------------
MULTI_OFFSET, MULTI_SIZE = (64, 32, 8), (128, 128, 16)   # x, y, z of mip 0 at 4x4x40 nm


@pytest.fixture(scope="module")
def multi_mip(tmp_path_factory) -> tuple[str, str]:
    """mip 0 written by CloudVolume, mips 1 and 2 (2x2x1 each) by igneous's downsampling tasks run
    with a LocalTaskQueue; where igneous is not installed, by CloudVolume directly (add_scale and
    averaged uploads, gzip'd as igneous stores them). Returns (url, who made the mips)."""
    from cloudvolume import CloudVolume

    url = f"file://{tmp_path_factory.mktemp('multi') / 'em'}"
    info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="uint8", encoding="raw",
                                       resolution=[4, 4, 40], voxel_offset=list(MULTI_OFFSET),
                                       volume_size=list(MULTI_SIZE), chunk_size=[32, 32, 8])
    cv = CloudVolume(f"precomputed://{url}", info=info, compress=False, progress=False)
    cv.commit_info()
    data = _em(MULTI_SIZE[::-1], seed=7)
    cv[cv.bounds] = data.T[..., None]
    try:
        from igneous import task_creation as tc
        from taskqueue import LocalTaskQueue
    except ImportError:
        for mip in (1, 2):
            cv.add_scale((2 ** mip, 2 ** mip, 1), chunk_size=[32, 32, 8])
        cv.commit_info()
        for mip in (1, 2):
            f = 2 ** mip
            z, y, x = data.shape
            down = data.reshape(z, y // f, f, x // f, f).mean(axis=(2, 4)).astype(np.uint8)
            level = CloudVolume(f"precomputed://{url}", mip=mip, compress="gzip", progress=False)
            level[level.bounds] = down.T[..., None]
        return url, "cloudvolume"
    tasks = tc.create_downsampling_tasks(url, mip=0, num_mips=2, factor=(2, 2, 1))
    LocalTaskQueue(parallel=1, progress=False).insert_all(tasks)
    return url, "igneous"


def test_multi_mip_layer_reads_as_its_maker_wrote_it(multi_mip):
    from cloudvolume import CloudVolume

    url, maker = multi_mip
    assert maker == ("igneous" if importlib.util.find_spec("igneous") else "cloudvolume")
    for mip in (0, 1, 2):
        source = open_volume(url, mip=mip, missing="refuse")
        f = 2 ** mip
        start = Vec(MULTI_OFFSET[2], MULTI_OFFSET[1] // f, MULTI_OFFSET[0] // f)
        assert source.bbox == Bbox.from_shape(start, (MULTI_SIZE[2], MULTI_SIZE[1] // f, MULTI_SIZE[0] // f))
        assert source.resolution == (40.0, 4.0 * f, 4.0 * f)
        written = CloudVolume(f"precomputed://{url}", mip=mip, progress=False)
        expected = np.asarray(written[written.bounds]).transpose(3, 2, 1, 0)
        np.testing.assert_array_equal(source.read(source.bbox), expected)
        assert expected.any()


def test_region_at_mip_1_into_compressed_outputs_read_by_other_readers(tmp_path, multi_mip):
    """mip 1 is 64x64x16 at (x 32, y 16, z 8), 8x8x40 nm. A region of it into zarr+zstd (read back by
    tensorstore) and precomputed+gzip (read back by CloudVolume), each equal to the reference."""
    import tensorstore as ts
    from cloudvolume import CloudVolume

    url, _ = multi_mip
    region = "40-88_24-72_8-24"
    out, expected, box = run_and_compare(tmp_path, url, "zstd", mip=1, bbox=region, zarr=True,
                                         extra=["--output-compression", "zstd"])
    assert [c["name"] for c in json.loads((Path(out) / "0" / "zarr.json").read_text())["codecs"]] == ["bytes", "zstd"]
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{out}/0"}}).result()
    assert store.domain.labels == ("c", "z", "y", "x") and store.shape == (3, 16, 48, 48)
    np.testing.assert_allclose(store.read().result(), expected, rtol=0, atol=ATOL)

    gz = tmp_path / "gzip"
    assert _main("run", "--input", url, "--mip", 1, "--bbox", region, *FLAGS, "--output", f"file://{gz}",
                 "--block", BLOCK, "--output-compression", "gzip") == 0
    info = json.loads((gz / "info").read_text())
    scale = info["scales"][0]
    assert scale["voxel_offset"] == [40, 24, 8] and scale["size"] == [48, 48, 16]
    assert scale["resolution"] == [8.0, 8.0, 40.0] and info["chunkflow_output_compression"] == "gzip"
    assert _files(gz) and all(name.endswith(".gz") for name in _files(gz))
    cv = CloudVolume(f"precomputed://file://{gz}", progress=False)
    np.testing.assert_allclose(np.asarray(cv[cv.bounds]).transpose(3, 2, 1, 0), expected, rtol=0, atol=ATOL)
    assert box == Bbox((8, 24, 40), (24, 72, 88))
