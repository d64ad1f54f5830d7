"""Sharded outputs (``--sharded``): Neuroglancer precomputed shards and zarr v3 shards.

Every shard has one writer: shards tile the blocks, stage one donates its core to its own block,
and stage two writes the whole block (``Layout.whole_block_writes``). The output equals the
whole-volume reference and is read back by readers chunkflow did not write (tensorstore,
CloudVolume, zarr-python); sharded inputs written by those libraries are read correctly; killed
and duplicated workers change nothing; a layout whose blocks the shards do not tile is refused in
one line with nothing written.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import fire
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow import cli
from chunkflow.bbox import Bbox, Vec
from chunkflow.cli import COMMANDS
from chunkflow.engines import LocalEngine, run_job
from chunkflow.engines.queue import barrier, produce
from chunkflow.geometry import GeometryError, Layout
from chunkflow.job import Job
from chunkflow.planning import load_job, plan
from chunkflow.stages import Resources, reference
from chunkflow.storage import create_volume, open_volume
from chunkflow.storage.sharding import choose_precomputed_shard, precomputed_shard_size, precomputed_sharding_spec
from tests.helpers import CONV3_SAME, make_input
from tests.test_engines_support import FLAGS, SHAPE, Killer, assert_complete_and_exact, fleet_env, run_fleet
from tests.test_geometry import float32_sum_tolerance, simulate

ts = pytest.importorskip("tensorstore")


# ---- geometry: whole-block writes ------------------------------------------------------------
def _whole_block_layout(shape, patch, ov, block, chunk_div, offset):
    patch = tuple(min(p, s) for p, s in zip(patch, shape))
    chunk = tuple(max(1, b // d) for b, d in zip(block, chunk_div))
    block = tuple(c * max(1, b // c) for c, b in zip(chunk, block))
    ov = tuple(min(o, p - 1, b - 1) for o, p, b in zip(ov, patch, block))
    try:
        return Layout(Bbox.from_shape(offset, shape), Vec(patch), Vec(ov), Vec(block), Vec(chunk),
                      whole_block_writes=True)
    except GeometryError as err:
        assert "same region" in str(err)
        return None


whole_block_layouts = st.builds(
    _whole_block_layout, shape=st.tuples(*[st.integers(4, 40)] * 3), patch=st.tuples(*[st.integers(1, 16)] * 3),
    ov=st.tuples(*[st.integers(0, 15)] * 3), block=st.tuples(*[st.integers(2, 24)] * 3),
    chunk_div=st.tuples(*[st.integers(1, 4)] * 3), offset=st.tuples(*[st.integers(-5, 5)] * 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(whole_block_layouts, st.sampled_from(["constant", "gaussian", "bump"]), st.integers(0, 1),
       st.integers(0, 2**31 - 1))
def test_whole_block_plan_is_consistent_and_exact_in_memory(layout, mode, context, seed):
    """Stage one writes nothing and stage two the whole block; the block's own chunk reaches it as
    pieces (band slabs and core slabs) that tile it once; donors and receivers agree; keys are unique;
    the two stages in memory equal the reference."""
    if layout is None:
        return
    sent = {d.key: d for idx in layout.block_indices() for d in layout.donations_from(idx)}
    received = {}
    for idx in layout.block_indices():
        box = layout.block_box(idx)
        assert layout.core_box(idx).is_empty() and layout.band_boxes(idx) == [box]
        expected = layout.donations_to(idx)
        assert len({d.key for d in expected}) == len(expected)
        received.update((d.key, d) for d in expected)
        own = np.zeros(box.shape, dtype=int)
        for d in expected:
            assert box.contains(d.piece)
            if d.donor == idx:
                own[d.piece.slices(box)] += 1
        chunk = layout.chunk_box(idx)
        mine = np.zeros(box.shape, dtype=int)
        if chunk is not None:
            mine[chunk.intersect(box).slices(box)] = 1
        assert (own == mine).all()
    assert sent.keys() == received.keys()
    if context and min(layout.bbox.shape) <= context:
        return
    image = np.random.default_rng(seed).random((1,) + tuple(layout.bbox.shape), dtype=np.float32)
    output, expected_output = simulate(layout, image, mode, context, 2)
    np.testing.assert_allclose(output, expected_output, rtol=0, atol=float32_sum_tolerance(layout))


def test_core_pieces_are_bounded_z_slabs_and_the_dry_run_counts_them():
    from chunkflow.dryrun import summarise

    bbox = Bbox(Vec(0, 0, 0), Vec(336, 3456, 3456))
    plain = Layout(bbox, Vec(16, 192, 192), Vec(4, 32, 32), Vec(112, 1152, 1152), Vec(16, 64, 64))
    whole = Layout(bbox, Vec(16, 192, 192), Vec(4, 32, 32), Vec(112, 1152, 1152), Vec(16, 64, 64),
                   whole_block_writes=True)
    idx = Vec(1, 1, 1)
    pieces = whole.core_pieces(idx)
    assert len(pieces) > 1 and all(p.size <= 2 * (1 << 24) and p.shape[0] % 16 == 0 for p in pieces)
    assert sum(p.size for p in pieces) == plain.core_box(idx).size
    assert plain.core_pieces(idx) == []
    one, two = summarise(plain), summarise(whole)
    core = sum(plain.core_box(i).size for i in plain.block_indices())
    assert two.donated_voxels - one.donated_voxels == core
    assert two.donations - one.donations == sum(len(whole.core_pieces(i)) for i in whole.block_indices())


# ---- precomputed shard boxes -----------------------------------------------------------------
@pytest.mark.parametrize("grid", [(4, 4, 4), (7, 5, 3), (8, 2, 1), (4, 2, 1), (1, 1, 9), (16, 16, 2)])
def test_precomputed_shard_boxes_match_the_compressed_morton_codes(grid):
    """Brute force over every chunk of a grid (x, y, z): the chunks whose keys share a shard number
    are exactly the aligned boxes precomputed_shard_size names, and where it says None some shard
    file holds chunks that are not one box."""
    from cloudvolume.datasource.precomputed.common import compressed_morton_code

    chunk = Vec(4, 8, 16)
    points = np.array(list(itertools.product(*(range(g) for g in grid))))
    codes = compressed_morton_code(points, grid).astype(np.uint64)
    total = sum(int(np.ceil(np.log2(g))) if g > 1 else 0 for g in grid)
    shape = Vec(g * c for g, c in zip(grid[::-1], chunk))
    for p, m, s in itertools.product(range(4), range(3), range(total + 2)):
        hashed = {"hash": "murmurhash3_x86_128", "preshift_bits": p, "minishard_bits": m, "shard_bits": s}
        assert (precomputed_shard_size(hashed, shape, chunk) is None) == (s > 0 and p < total)
        size = precomputed_shard_size(dict(hashed, hash="identity"), shape, chunk)
        groups: dict[int, list] = {}
        for point, number in zip(points, (codes >> np.uint64(p + m)) & np.uint64((1 << s) - 1)):
            groups.setdefault(int(number), []).append(tuple(int(v) for v in point))
        if size is None:
            assert not all(_is_box(pts) for pts in groups.values()), (p, m, s)
            continue
        per_box = tuple(int(v) for v in (size // chunk))[::-1]  # chunks per shard, x, y, z
        boxes = {n: {tuple(v // b for v, b in zip(pt, per_box)) for pt in pts} for n, pts in groups.items()}
        assert all(len(b) == 1 for b in boxes.values()), (p, m, s, size)
        assert len({next(iter(b)) for b in boxes.values()}) == len(groups)


def _is_box(points: list[tuple[int, int, int]]) -> bool:
    lo, hi = np.min(points, axis=0), np.max(points, axis=0)
    return len(set(points)) == int(np.prod(hi - lo + 1))


@pytest.mark.parametrize("block, chunk, shape, shard", [
    ((16, 64, 64), (8, 32, 32), (32, 128, 128), (16, 64, 64)),
    ((32, 64, 64), (8, 32, 32), (32, 128, 128), (16, 64, 64)),       # two shards per block
    ((128, 1024, 1024), (16, 64, 64), (1024, 8192, 8192), (128, 1024, 1024)),
    ((64, 1024, 1024), (16, 64, 64), (1024, 8192, 8192), (64, 512, 512)),  # four per block
    ((112, 128, 128), (16, 64, 64), (100, 512, 512), (32, 128, 128)),  # spans z: shards inside it
])
def test_chosen_shards_tile_the_block_and_round_trip_through_the_spec(block, chunk, shape, shard):
    from cloudvolume.datasource.precomputed.sharding import image_shard_shape_from_spec

    region = Bbox.from_shape((0, 0, 0), shape)
    got = choose_precomputed_shard(Vec(block), Vec(chunk), region, Vec(8, 32, 32))
    assert got == Vec(shard)
    spec = precomputed_sharding_spec(got, Vec(chunk), Vec(shape), "raw")
    assert precomputed_shard_size(spec, Vec(shape), Vec(chunk)) == got
    assert tuple(image_shard_shape_from_spec(spec, Vec(shape).xyz(), Vec(chunk).xyz()))[::-1] == tuple(got)


# ---- end to end ---------------------------------------------------------------------------------
def _files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))} if path.exists() else {}


def _run_and_reference(tmp_path: Path, output: str, block: str, model: str = "identity:2") -> tuple:
    url, _ = make_input(tmp_path / "in", (32, 128, 128), seed=11, chunk=(8, 32, 32))
    flags = ["--input", url, "--model", model, "--input-patch", "8,32,32", "--overlap", "2,8,8", "--quiet"]
    job_flags = ["--output", output, "--block", block, "--sharded", "--donations", str(tmp_path / "job")]
    fire.Fire(COMMANDS, ["plan", *flags, *job_flags, "--storage-chunk", "8,32,32"])  # plan's storage chunk...
    fire.Fire(COMMANDS, ["run", *flags, *job_flags])  # ...is the existing output's: the same job
    fire.Fire(COMMANDS, ["reference", *flags, "--output", f"file://{tmp_path / 'ref'}"])
    job = load_job(str(tmp_path / "job"))
    got = open_volume(output).read(job.layout.bbox)
    expected = open_volume(f"file://{tmp_path / 'ref'}").read(job.layout.bbox)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    plain = Layout(job.layout.bbox, job.layout.patch, job.layout.overlap, job.layout.block, job.layout.storage_chunk)
    for idx in plain.block_indices():  # the core went through a donation and is still bit-identical
        core = plain.core_box(idx)
        if not core.is_empty():
            sl = (slice(None),) + core.slices(job.layout.bbox)
            assert np.array_equal(got[sl], expected[sl])
    return job, expected


def test_sharded_precomputed_run_equals_reference_and_other_readers_agree(tmp_path):
    out = tmp_path / "out"
    job, expected = _run_and_reference(tmp_path, f"file://{out}", "32,64,64", model=CONV3_SAME)
    assert job.sharded and job.layout.whole_block_writes
    info = json.loads((out / "info").read_text())
    sharding = info["scales"][0]["sharding"]
    assert sharding["@type"] == "neuroglancer_uint64_sharded_v1" and sharding["hash"] == "identity"
    files = [p.name for p in (out / info["scales"][0]["key"]).iterdir()]
    assert len(files) == 8 and all(f.endswith(".shard") for f in files)  # 16,64,64 shards: two per block
    t = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}"}, read=True).result()
    assert "sharding" in json.dumps(t.spec().to_json())
    np.testing.assert_array_equal(np.asarray(t.read().result()).transpose(3, 2, 1, 0), open_volume(job.output)
                                  .read(job.layout.bbox))
    from cloudvolume import CloudVolume

    cv = CloudVolume(f"precomputed://file://{out}", progress=False)
    assert tuple(cv.image.shard_shape(0)) == (64, 64, 16)
    np.testing.assert_allclose(np.asarray(cv[:, :, :]).transpose(3, 2, 1, 0), expected, rtol=0, atol=1e-5)


def test_sharded_zarr_run_equals_reference_and_other_readers_agree(tmp_path):
    import zarr

    out = tmp_path / "out.zarr"
    job, expected = _run_and_reference(tmp_path, str(out), "16,64,64")
    array = zarr.open_array(str(out / "0"), mode="r")
    assert array.shards == (2, 16, 64, 64) and array.chunks == (2, 8, 32, 32)
    np.testing.assert_allclose(array[:], expected, rtol=0, atol=1e-5)
    t = ts.open({"driver": "zarr3", "kvstore": f"file://{out / '0'}"}, read=True).result()
    assert t.schema.codec.to_json()["codecs"][0]["name"] == "sharding_indexed"
    np.testing.assert_allclose(np.asarray(t.read().result()), expected, rtol=0, atol=1e-5)


def _tensorstore_precomputed(path: Path, data: np.ndarray, chunk_xyz, sharding: dict, offset_xyz=(0, 0, 0)):
    """A precomputed layer written by tensorstore (data C,Z,Y,X)."""
    c, z, y, x = data.shape
    spec = {"driver": "neuroglancer_precomputed", "kvstore": f"file://{path}",
            "multiscale_metadata": {"type": "image", "data_type": str(data.dtype), "num_channels": c},
            "scale_metadata": {"size": [x, y, z], "chunk_size": list(chunk_xyz), "resolution": [8, 8, 40],
                               "voxel_offset": list(offset_xyz), "encoding": "raw", "sharding": sharding}}
    t = ts.open(spec, create=True).result()
    t.write(data.transpose(3, 2, 1, 0)).result()


SHARD_2X2X2 = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": 1,
               "minishard_bits": 2, "shard_bits": 3, "minishard_index_encoding": "gzip", "data_encoding": "gzip"}


def test_sharded_inputs_written_by_tensorstore_and_zarr_are_read_correctly(tmp_path):
    import zarr

    data = np.random.default_rng(5).random((1, 24, 96, 80), dtype=np.float32)
    _tensorstore_precomputed(tmp_path / "ts_in", data, (16, 16, 4), SHARD_2X2X2, offset_xyz=(3, -5, 7))
    vol = open_volume(f"file://{tmp_path / 'ts_in'}")
    assert vol.sharded and vol.bbox == Bbox.from_shape((7, -5, 3), (24, 96, 80))
    assert vol.shard_size is None  # 3 shard bits of the 6 above the shard: files wrap, which reads fine
    np.testing.assert_array_equal(vol.read(vol.bbox), data)
    np.testing.assert_array_equal(vol.read(Bbox.from_shape((9, 1, 10), (5, 40, 30))),
                                  data[:, 2:7, 6:46, 7:37])
    array = zarr.create_array(store=str(tmp_path / "z_in.zarr"), shape=data.shape[1:], chunks=(4, 16, 16),
                              shards=(8, 32, 32), dtype="float32", attributes={"voxel_offset": [0, 0, 0],
                                                                               "resolution": [40.0, 8.0, 8.0]})
    array[:] = data[0]
    zvol = open_volume(str(tmp_path / "z_in.zarr"))
    assert zvol.sharded and zvol.shard_size == Vec(8, 32, 32) and zvol.chunk_size == Vec(4, 16, 16)
    np.testing.assert_array_equal(zvol.read(zvol.bbox), data)
    # and a whole job reads it: the identity model with constant blending gives the input back
    job = plan(f"file://{tmp_path / 'ts_in'}", f"file://{tmp_path / 'out'}", str(tmp_path / "job"), "identity",
               "8,32,32", overlap="2,8,8", block="24,48,40", blend="constant", storage_chunk="8,16,20")
    run_job(job, LocalEngine(), progress=False)
    np.testing.assert_allclose(open_volume(job.output).read(job.layout.bbox), data, rtol=0, atol=1e-6)


def test_an_existing_sharded_output_whose_shards_tile_the_blocks_is_written(tmp_path):
    """A sharded output made by tensorstore (shards of 2x2x2 chunks): planned without --sharded, the
    job writes it sharded, whole blocks at a time, and it equals the reference."""
    url, _ = make_input(tmp_path / "in", (32, 128, 128), seed=3, chunk=(8, 32, 32))
    _tensorstore_precomputed(tmp_path / "out", np.zeros((2, 32, 128, 128), np.float32), (32, 32, 8), SHARD_2X2X2)
    job = plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), "identity:2", "8,32,32", overlap="2,8,8",
               block="16,64,64")
    assert job.sharded and tuple(job.storage_chunk) == (8, 32, 32)
    run_job(job, LocalEngine(), progress=False)
    got = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path / 'out'}"}).result()
    np.testing.assert_allclose(np.asarray(got.read().result()).transpose(3, 2, 1, 0), reference(job, Resources(job)),
                               rtol=0, atol=1e-5)


def test_masked_blocks_on_a_sharded_output(tmp_path):
    """A masked block sends nothing and its stage two writes the whole block (zeros where only its
    own patches reach), with no second write of its core."""
    url, _ = make_input(tmp_path / "in", (32, 128, 128), seed=1, chunk=(8, 32, 32))
    mask = np.zeros((1, 32, 128, 128), np.uint8)
    mask[:, :12, :40, :50] = 1
    create_volume(f"file://{tmp_path / 'mask'}", Bbox.from_shape((0, 0, 0), (32, 128, 128)), Vec(8, 32, 32), 1,
                  "uint8").write(Bbox.from_shape((0, 0, 0), (32, 128, 128)), mask)
    job = plan(url, str(tmp_path / "out.zarr"), str(tmp_path / "job"), "identity:2", "8,32,32", overlap="2,8,8",
               block="16,64,64", storage_chunk="8,32,32", sharded=True, mask=f"file://{tmp_path / 'mask'}")
    run_job(job, LocalEngine(), progress=False)
    output = open_volume(job.output).read(job.layout.bbox)
    assert 0 < np.count_nonzero(output) < output.size
    np.testing.assert_allclose(output, reference(job, Resources(job)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["precomputed", "zarr"])
def test_sharded_output_on_gcs(gcs_bucket, fmt):
    """Shards uploaded whole to a real GCS API (fake-gcs-server), one object each, with no
    Content-Encoding (Neuroglancer reads shards by byte range)."""
    from tests.test_gcs_pipeline import _client, gcs_job

    job = gcs_job(gcs_bucket, fmt, sharded=True)
    run_job(job, LocalEngine(), progress=False)
    np.testing.assert_allclose(open_volume(job.output).read(job.layout.bbox), reference(job, Resources(job)),
                               rtol=0, atol=1e-5)
    blobs = [b for b in _client().list_blobs(gcs_bucket, prefix="job-out") if not b.name.endswith(("info", ".json"))]
    assert len(blobs) == job.layout.num_blocks  # one shard per block (8,32,32)
    if fmt == "precomputed":
        assert all(b.name.endswith(".shard") and not b.content_encoding for b in blobs)


# ---- refusals: one line, exit 2, nothing written -----------------------------------------------
def _refused(capsys, argv: list[str], root: Path) -> str:
    before = _files(root)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert _files(root) == before
    return err


def test_layouts_the_shards_cannot_tile_are_refused_naming_a_block(tmp_path, capsys):
    import zarr

    url, _ = make_input(tmp_path / "in", (32, 128, 128), seed=3, chunk=(8, 32, 32))
    _tensorstore_precomputed(tmp_path / "pc", np.zeros((2, 32, 128, 128), np.float32), (32, 32, 8), SHARD_2X2X2)
    zarr.create_array(store=str(tmp_path / "z.zarr"), shape=(2, 32, 128, 128), chunks=(2, 8, 32, 32),
                      shards=(2, 16, 64, 64), dtype="float32",
                      attributes={"voxel_offset": [0, 0, 0], "resolution": [40.0, 8.0, 8.0]})
    flags = ["--input", url, "--model", "identity:2", "--input-patch", "8,32,32", "--overlap", "2,8,8", "--quiet"]
    base = ["plan", *flags, "--storage-chunk", "8,32,32", "--donations", str(tmp_path / "job")]
    for output in (f"file://{tmp_path / 'pc'}", str(tmp_path / "z.zarr")):
        err = _refused(capsys, ["run", *flags, "--output", output, "--block", "8,32,32"], tmp_path)
        assert "sharded in shards of 16,64,64" in err and "--block 16,64,64" in err
        err = _refused(capsys, [*base, "--output", output, "--block", "16,64,64", "--bbox", "0-128_0-128_8-32"],
                       tmp_path)
        assert "not aligned to the shards" in err and "--bbox 0-128_0-128_0-32" in err
    one_shard = dict(SHARD_2X2X2, preshift_bits=0, minishard_bits=0, shard_bits=0)
    _tensorstore_precomputed(tmp_path / "one", np.zeros((2, 32, 128, 128), np.float32), (32, 32, 8), one_shard)
    err = _refused(capsys, [*base, "--output", f"file://{tmp_path / 'one'}", "--block", "16,64,64"], tmp_path)
    assert "--block 32,128,128" in err
    wrapped = dict(SHARD_2X2X2, preshift_bits=0, shard_bits=1)  # shard number = bit 2 (z0): z planes 0, 2
    _tensorstore_precomputed(tmp_path / "wrapped", np.zeros((2, 32, 128, 128), np.float32), (32, 32, 8), wrapped)
    err = _refused(capsys, [*base, "--output", f"file://{tmp_path / 'wrapped'}", "--block", "16,64,64"], tmp_path)
    assert "not one box" in err and "--block 32,128,128" in err
    err = _refused(capsys, [*base, "--output", f"file://{tmp_path / 'new'}", "--block", "24,96,96", "--sharded"],
                   tmp_path)
    assert "power-of-two" in err and "--block 32,128,128" in err
    create_volume(f"file://{tmp_path / 'plain'}", Bbox.from_shape((0, 0, 0), (32, 128, 128)), Vec(8, 32, 32), 2,
                  "float32")
    err = _refused(capsys, [*base, "--output", f"file://{tmp_path / 'plain'}", "--block", "16,64,64", "--sharded"],
                   tmp_path)
    assert "--sharded applies to new outputs only" in err


def test_jobs_planned_before_sharding_keep_their_hash(tmp_path):
    url, _ = make_input(tmp_path / "in", (16, 64, 64), chunk=(8, 32, 32))
    job = plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), "identity", "8,32,32", block="8,32,32")
    old = json.loads(job.to_json())
    del old["sharded"]
    assert Job.from_json(json.dumps(old)).job_hash == job.job_hash
    assert Job(**{**json.loads(job.to_json()), "sharded": True, "job_hash": ""}).job_hash != job.job_hash


# ---- killed and duplicated workers -------------------------------------------------------------
def _sharded_small_job(tmp: Path, output: str):
    url, _ = make_input(tmp / "in", SHAPE, seed=1, chunk=(8, 16, 16))
    job = plan(url, output, str(tmp / "job"), "identity", storage_chunk="8,16,16", sharded=True, **FLAGS["identity"])
    assert open_volume(output).sharded
    return job


@pytest.mark.integration  # queue worker processes, killed
def test_fq_workers_killed_mid_write_on_a_sharded_output(tmp_path):
    job = _sharded_small_job(tmp_path, f"file://{tmp_path / 'out'}")
    points = "stage1:during-write,stage1:after-write,stage2:before-write,stage2:during-write"
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env, killer = fleet_env(pauses, points), Killer(pauses)
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    produce(job, one)
    run_fleet(1, one, env, killer)
    assert barrier(job, two, poll=0.2, timeout=30) == job.layout.num_blocks
    run_fleet(2, two, env, killer)
    assert set(killer.killed) == {p.replace(":", "-") for p in points.split(",")}
    assert_complete_and_exact(job)


@pytest.mark.integration  # queue worker processes
def test_fq_every_task_twice_at_once_on_a_sharded_output(tmp_path):
    job = _sharded_small_job(tmp_path, str(tmp_path / "out.zarr"))
    one, two = f"fq://{tmp_path / 'q1'}", f"fq://{tmp_path / 'q2'}"
    produce(job, one)
    produce(job, one, force=True)
    run_fleet(1, one, fleet_env(), flags=("--force",))
    produce(job, two, stage=2)
    produce(job, two, stage=2, force=True)
    run_fleet(2, two, fleet_env(), flags=("--force",))
    assert_complete_and_exact(job)
