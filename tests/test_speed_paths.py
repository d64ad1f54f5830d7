"""The fast paths of stage one compute exactly what the plain ones did.

Per-patch conversion into a reused batch buffer, the separable and slab-wise weight sum, the
in-place accumulation and the background prefetch of the next block's input are all speed-ups;
none may change a bit of the answer (Invariant 1 needs the reference and stage one to sum the same
numbers in the same order).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkflow.blend as blend
from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum, normalise, weight_map, weight_sum
from chunkflow.geometry import Layout
import chunkflow.inference as inference
from chunkflow.errors import NonFiniteOutput
from chunkflow.inference import _float_into, blended_inference, to_float
from chunkflow.planning import plan
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import InputPrefetcher, Resources, inference_and_donate, inference_and_donate_many, reference
from chunkflow.storage import StorageError, open_volume
from tests.helpers import CONV3, examples, make_input, stored_bytes


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                                   "float16", "float32", "float64"])
def test_float_into_is_to_float_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        src = rng.integers(info.min, info.max, size=(1, 5, 7, 9), dtype=dtype, endpoint=True)
    else:
        src = rng.standard_normal((1, 5, 7, 9)).astype(dtype)
    dst = np.empty(src.shape, dtype=np.float32)
    _float_into(dst, src)
    assert np.array_equal(dst.view(np.uint32), to_float(src).view(np.uint32))
    strided = np.empty((2, *src.shape), dtype=np.float32)[1]
    _float_into(strided, src[..., ::-1])  # a patch cut from a chunk is not contiguous
    assert np.array_equal(strided.view(np.uint32), to_float(src[..., ::-1]).view(np.uint32))


@settings(max_examples=examples(40), deadline=None)
@given(patch=st.tuples(st.integers(1, 9), st.integers(1, 12), st.integers(1, 12)), channels=st.integers(1, 3),
       planes_bytes=st.integers(1, 2000), mode=st.sampled_from(["constant", "gaussian", "bump"]),
       seed=st.integers(0, 2 ** 16), batch_size=st.integers(1, 3))
def test_accumulating_a_few_planes_at_a_time_is_the_whole_patch_multiply_and_add(
        patch, channels, planes_bytes, mode, seed, batch_size):
    """``w * y`` is added a few z-planes at a time (``ACCUMULATE_BYTES``), bit for bit the sum of whole-patch
    ``np.multiply`` then ``+=`` in grid order: the two roundings per voxel did not become one."""
    rng = np.random.default_rng(seed)
    patch = Vec(patch)
    region = Bbox(Vec(0, 0, 0), patch * 2 + Vec(1, 2, 3))
    w = weight_map(mode, tuple(patch))
    origins = [Vec(int(rng.integers(0, s - p + 1)) for s, p in zip(region.shape, patch)) for _ in range(7)]
    image = rng.standard_normal((1, *region.shape)).astype(np.float32) * 1e3

    def predict(batch):
        return np.concatenate([batch * np.float32(c + 1.3) for c in range(channels)], axis=1)

    expected = np.zeros((channels, *region.shape), np.float32)
    for o in origins:
        box = Bbox(o, o + patch)
        y = predict(image[(None, slice(None)) + box.slices(region)])[0]
        expected[(slice(None),) + box.slices(region)] += np.multiply(y, w)
    old = inference.ACCUMULATE_BYTES
    inference.ACCUMULATE_BYTES = planes_bytes * 4
    try:
        got = blended_inference(image, region, origins, region, np.ones(region.shape, np.float32), w, predict,
                                patch, channels, batch_size, normalise=False)
    finally:
        inference.ACCUMULATE_BYTES = old
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_a_non_finite_plane_anywhere_in_a_patch_is_refused_naming_that_patch(monkeypatch):
    monkeypatch.setattr(inference, "ACCUMULATE_BYTES", 4 * 4 * 4)  # one plane (4x4 float32) at a time
    region, patch = Bbox(Vec(0, 0, 0), Vec(8, 4, 4)), Vec(4, 4, 4)
    image = np.ones((1, 8, 4, 4), np.float32)
    image[0, 7, 3, 3] = np.inf  # the last plane of the second patch only
    with pytest.raises(NonFiniteOutput, match="output patch 0-4_0-4_4-8"):
        blended_inference(image, region, [Vec(0, 0, 0), Vec(4, 0, 0)], region, np.ones((8, 4, 4), np.float32),
                          weight_map("constant", (4, 4, 4)), lambda b: b.copy(), patch, 1)


@pytest.mark.parametrize("mode", ["constant", "gaussian", "bump"])
def test_weight_sum_object_equals_the_patch_loop_bitwise(mode):
    bbox = Bbox(Vec(-3, 5, 0), Vec(37, 61, 50))
    layout = Layout(bbox, Vec(7, 12, 10), Vec(2, 5, 3), Vec(14, 24, 20), Vec(7, 12, 10))
    w = weight_map(mode, tuple(layout.patch))
    ws = WeightSum(w, [ax.origins for ax in layout.axes])
    assert ws.separable == (mode == "constant")
    rng = np.random.default_rng(1)
    regions = [bbox] + [c for c in map(layout.chunk_box, layout.block_indices()) if c is not None]
    for _ in range(20):
        a = [int(rng.integers(s, e)) for s, e in zip(bbox.start, bbox.stop)]
        b = [int(rng.integers(x + 1, e + 1)) for x, e in zip(a, bbox.stop)]
        regions.append(Bbox(Vec(a), Vec(b)))
    for region in regions:
        expected = weight_sum(w, layout.origins_overlapping(region), region)
        assert np.array_equal(ws.over(region), expected), region


def test_slab_wise_normalise_equals_one_division(monkeypatch):
    layout = Layout(Bbox(Vec(0, 0, 0), Vec(30, 40, 50)), Vec(8, 16, 16), Vec(2, 4, 4), Vec(16, 32, 32))
    w = weight_map("gaussian", tuple(layout.patch))
    ws = WeightSum(w, [ax.origins for ax in layout.axes])
    region = Bbox(Vec(3, 1, 2), Vec(29, 40, 47))
    acc = np.random.default_rng(2).random((2,) + tuple(region.shape), dtype=np.float32)
    whole = acc.copy()
    normalise(whole, region, ws.over(region))
    monkeypatch.setattr(blend, "SLAB_VOXELS", 3 * region.shape[1] * region.shape[2])  # 9 slabs of 3 planes
    assert len(list(ws.slabs(region))) == 9
    normalise(acc, region, ws)
    assert np.array_equal(acc, whole)


def test_integer_input_blends_like_converted_input():
    layout = Layout(Bbox(Vec(0, 0, 0), Vec(12, 40, 40)), Vec(6, 16, 16), Vec(2, 4, 4), Vec(12, 40, 40))
    w = weight_map("bump", tuple(layout.patch))
    ws = WeightSum(w, [ax.origins for ax in layout.axes])
    image = np.random.default_rng(3).integers(0, 256, size=(1, 12, 40, 40)).astype(np.uint8)
    image[:, :6, :16, :16] = 0  # a blank patch: skipped, like before

    def predict(batch):
        return np.concatenate([np.sqrt(batch), batch * batch], axis=1)

    origins = list(layout.all_origins())
    args = (layout.bbox, origins, layout.bbox, ws, w, predict, layout.patch, 2)
    seconds: dict[str, float] = {}
    raw = blended_inference(image, *args, batch_size=3, seconds=seconds)
    converted = blended_inference(to_float(image), *args, batch_size=1)
    assert np.array_equal(raw, converted)
    assert set(seconds) == {"gather", "model", "accumulate", "normalise"}


def _job(tmp_path, name="job", **kw):
    url, _ = make_input(tmp_path / "in", (14, 44, 40), dtype="uint8", seed=4, chunk=(4, 8, 12))
    return plan(url, f"file://{tmp_path / (name + '_out')}", str(tmp_path / name), CONV3, "10,22,22",
                output_patch="4,16,16", overlap="1,5,5", block="8,24,24", blend="gaussian", storage_chunk="4,8,12",
                **kw)


def test_prefetching_run_writes_the_same_bytes_as_plain_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(blend, "SLAB_VOXELS", 600)  # many N slabs per chunk too
    job = _job(tmp_path, batch_size=3)
    res = Resources(job)
    blocks = list(job.layout.block_indices())
    stats = list(inference_and_donate_many(job, iter(blocks), res))
    assert [b for b, _ in stats] == blocks
    assert sum(s.patches for _, s in stats) == job.layout.num_patches
    phases = set().union(*(s.seconds for _, s in stats))
    assert {"read", "model", "blend", "normalise", "write", "donate"} <= phases
    prefetched = stored_bytes(tmp_path)
    for idx in blocks:
        inference_and_donate(job, idx, Resources(job))
    assert stored_bytes(tmp_path) == prefetched
    for idx in blocks:
        receive_and_blend(job, idx, res)
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, reference(job, Resources(job)), rtol=0, atol=1e-5)


def test_stale_prefetch_is_discarded(tmp_path):
    job = _job(tmp_path)
    res = Resources(job)
    blocks = list(job.layout.block_indices())
    res.prefetch(blocks[-1])  # a block this worker does not run next
    inference_and_donate(job, blocks[0], res, prefetch_next=blocks[1])
    with_stale = stored_bytes(tmp_path)
    inference_and_donate(job, blocks[0], Resources(job))
    assert stored_bytes(tmp_path) == with_stale
    inference_and_donate(job, blocks[1], res)  # takes the prefetch made while block 0 ran
    assert res.prefetcher._pending is None


def test_prefetch_errors_surface_only_for_the_block_that_needs_them():
    calls = []

    def read(box):
        calls.append(box)
        if box.start[0] < 0:
            raise StorageError(f"cannot read {box.name}")
        return np.full((1, 1, 1, 1), box.start[0])

    bad, good, other = (Bbox.from_shape((z, 0, 0), (1, 1, 1)) for z in (-1, 1, 2))
    pf = InputPrefetcher()
    pf.submit(bad, read)
    assert pf.take(good, read)[0, 0, 0, 0] == 1  # the unused failed read is not our error
    pf.submit(bad, read)
    with pytest.raises(StorageError, match="cannot read"):
        pf.take(bad, read)
    pf.submit(other, read)
    pf.submit(other, read)  # the same box twice: one read
    assert pf.take(other, read)[0, 0, 0, 0] == 2
    assert calls.count(other) == 1


@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_grid_patch_once_with_prefetch_and_batching(tmp_path, batch_size):
    job = _job(tmp_path, batch_size=batch_size)
    res = Resources(job)
    computed = sum(s.patches for _, s in inference_and_donate_many(job, job.layout.block_indices(), res))
    assert computed == job.layout.num_patches
    for idx in job.layout.block_indices():
        receive_and_blend(job, idx, res)
    expected = reference(job, Resources(job))
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)
    for idx in job.layout.block_indices():  # cores are summed in the reference's order: bit-identical
        core = job.layout.core_box(idx)
        if not core.is_empty() and batch_size == 1:
            sl = (slice(None),) + core.slices(job.layout.bbox)
            assert np.array_equal(output[sl], expected[sl])


def test_local_engine_with_one_slot_reads_each_next_input_in_the_background(tmp_path):
    """With one task slot (two is the default, tests/test_engine_slots.py), the local engine reads
    every block's input after the first on the prefetch thread while the previous block computes."""
    import threading

    from chunkflow.engines import LocalEngine, run_stage
    from chunkflow.engines.task import worker_resources

    job = _job(tmp_path)
    res = worker_resources(job)
    threads = []
    plain = res.read_input

    def read(box):
        threads.append(threading.current_thread().name)
        return plain(box)

    res.read_input = read
    try:
        summary = run_stage(job, 1, LocalEngine(slots=1), progress=False)
    finally:
        del res.read_input
    blocks_with_input = sum(job.layout.chunk_box(b) is not None for b in job.layout.block_indices())
    assert summary.tasks == job.layout.num_blocks and len(threads) == blocks_with_input
    assert sum(name.startswith("chunkflow-prefetch") for name in threads) == blocks_with_input - 1
    for idx in job.layout.block_indices():
        receive_and_blend(job, idx, res)
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, reference(job, Resources(job)), rtol=0, atol=1e-5)


class DeferredConv:
    """A real backend whose ``submit`` returns before computing, like a GPU stream: it copies the
    batch (the caller refills its buffer at once) and runs the model only when waited on. It
    records the order of calls, so the test sees batch k+1 started before batch k is used."""

    def __init__(self, backend):
        self.backend, self.events, self.submitted = backend, [], 0

    def predict(self, batch):
        return self.backend.predict(batch)

    def submit(self, batch):
        k, kept = self.submitted, batch.copy()
        self.submitted += 1
        self.events.append(("submit", k))

        def wait():
            self.events.append(("wait", k))
            return self.backend.predict(kept)
        return wait


def test_overlapped_batches_give_the_same_bytes_and_run_ahead(tmp_path):
    from chunkflow.backends import load_backend

    job = _job(tmp_path, batch_size=2)
    plain = Resources(job)
    deferred = Resources(job, DeferredConv(load_backend(CONV3)))
    blocks = list(job.layout.block_indices())
    inference_and_donate(job, blocks[0], plain)
    expected = stored_bytes(tmp_path)
    inference_and_donate(job, blocks[0], deferred)
    assert stored_bytes(tmp_path) == expected
    events = deferred.backend.events
    assert events.index(("submit", 1)) < events.index(("wait", 0))  # the next batch runs while one is summed
    assert [k for what, k in events if what == "wait"] == list(range(deferred.backend.submitted))
    np.testing.assert_array_equal(reference(job, Resources(job, DeferredConv(load_backend(CONV3)))),
                                  reference(job, Resources(job)))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_a_patch_is_blank_exactly_when_every_voxel_is_zero(dtype):
    """The blank-patch test decides from the first row when it can, and scans the patch otherwise:
    one non-zero voxel anywhere (a NaN too) makes a patch hold data, as ``patch.any()`` says."""
    shape = (2, 3, 4, 5)
    assert not inference._holds_data(np.zeros(shape, dtype))
    for index in [(0, 0, 0, 0), (0, 0, 0, 4), (0, 0, 1, 0), (1, 2, 3, 4), (1, 0, 0, 0)]:
        patch = np.zeros(shape, dtype)
        patch[index] = 1
        assert inference._holds_data(patch) and inference._holds_data(patch[:, ::-1])
    if dtype == "float32":
        patch = np.zeros(shape, dtype)
        patch[1, 1, 1, 1] = np.nan
        assert inference._holds_data(patch) == bool(patch.any()) is True
        patch[1, 1, 1, 1] = -0.0
        assert not inference._holds_data(patch)
