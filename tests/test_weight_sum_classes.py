"""N(x) from its source coordinates only (chunkflow.weight_sum_classes, WeightSum.over/divide) is the
patch loop's N bit for bit: any grid, any region, any weight map (random, not symmetric), every path."""
from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow import blend
from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum, normalise, weight_map, weight_sum
from chunkflow.geometry import axis_origins
from chunkflow.weight_sum_classes import AxisClasses
from tests.helpers import examples


@st.composite
def grids(draw):
    """(weights, per-axis origins, every origin in grid order, the volume, a region inside it)."""
    patch, overlap, start, length = [], [], [], []
    for _ in range(3):
        p = draw(st.integers(1, 9))
        patch.append(p)
        overlap.append(draw(st.integers(0, p - 1)))
        start.append(draw(st.integers(-5, 5)))
        length.append(draw(st.integers(p, 40)))
    axes = [list(axis_origins(s, n, p, o)) for s, n, p, o in zip(start, length, patch, overlap)]
    seed = draw(st.integers(0, 2 ** 16))
    kind = draw(st.sampled_from(["random", "gaussian", "bump", "constant"]))
    if kind == "random":
        weights = (np.random.default_rng(seed).random(patch, dtype=np.float32) * 7 + 1e-3).astype(np.float32)
    else:
        weights = weight_map(kind, tuple(patch))
    lo = [draw(st.integers(s, s + n - 1)) for s, n in zip(start, length)]
    hi = [draw(st.integers(a + 1, s + n)) for a, s, n in zip(lo, start, length)]
    return weights, axes, list(itertools.product(*axes)), Bbox(Vec(lo), Vec(hi))


@settings(max_examples=150, deadline=None)
@given(grids())
def test_over_is_the_patch_loop_bit_for_bit(grid):
    weights, axes, origins, region = grid
    expected = weight_sum(weights, [Vec(o) for o in origins], region)
    assert np.array_equal(WeightSum(weights, axes).over(region).view(np.uint32), expected.view(np.uint32))


@settings(max_examples=150, deadline=None)
@given(grids(), st.sampled_from(["runs", "slabs", "tiny slabs"]), st.integers(1, 2))
def test_divide_is_one_division_by_the_patch_loop_bit_for_bit(grid, path, channels):
    weights, axes, origins, region = grid
    n = weight_sum(weights, [Vec(o) for o in origins], region)
    acc = np.random.default_rng(7).random((channels,) + tuple(region.shape), dtype=np.float32)
    expected = acc / n
    saved = blend.SLAB_VOXELS, blend.MIN_RUN_BOX_VOXELS
    try:
        if path == "runs":
            blend.MIN_RUN_BOX_VOXELS = 1
        elif path == "slabs":
            blend.MIN_RUN_BOX_VOXELS = region.size + 1  # never by runs
        else:
            blend.SLAB_VOXELS = 1  # compact sum larger than a slab: one plane at a time
        normalise(acc, region, WeightSum(weights, axes))
    finally:
        blend.SLAB_VOXELS, blend.MIN_RUN_BOX_VOXELS = saved
    assert np.array_equal(acc.view(np.uint32), expected.view(np.uint32))


def test_a_regular_grid_needs_about_one_stride_per_axis():
    origins = axis_origins(0, 1000, 128, 32)  # stride 96, the last origin snapped to the end
    classes = AxisClasses.of(origins, 128, 100, 900)
    assert 96 <= classes.size <= 96 + 128
    assert len(classes.runs) <= 800 // 96 + 3
    assert classes.runs[0].start == 0 and classes.runs[-1].stop == 800
    assert all(a.stop == b.start for a, b in zip(classes.runs, classes.runs[1:]))


def test_source_coordinates_have_the_keys_of_the_coordinates_they_stand_for():
    origins = axis_origins(3, 50, 7, 3)
    classes = AxisClasses.of(origins, 7, 3, 53)
    sources = [c for a, b in classes.intervals for c in range(a, b)]

    def key(c):
        return tuple(c - o for o in origins if o <= c < o + 7)

    for i, c in enumerate(range(3, 53)):
        assert key(sources[classes.compact_index[i]]) == key(c)
    assert len({key(c) for c in range(3, 53)}) == classes.size  # one source per key


def test_a_grid_of_stride_one_falls_back_to_slabs_and_stays_exact():
    axes = [axis_origins(0, 30, 4, 3)] * 3  # stride 1: every coordinate is a run of its own
    weights = weight_map("gaussian", (4, 4, 4))
    region = Bbox(Vec(0, 0, 0), Vec(30, 30, 30))
    acc = np.ones((1, 30, 30, 30), dtype=np.float32)
    expected = acc / weight_sum(weights, [Vec(o) for o in itertools.product(*axes)], region)
    normalise(acc, region, WeightSum(weights, axes))
    assert np.array_equal(acc, expected)


@settings(max_examples=examples(50), deadline=None)
@given(grids(), st.data())
def test_one_weight_sum_over_many_regions_shares_compact_sums_and_stays_exact(grid, data):
    """A worker keeps one WeightSum for every block: compact sums are kept by their sources' keys
    and reused for regions placed alike on the grid. Each region's N is still the patch loop's."""
    weights, axes, origins, first = grid
    ws = WeightSum(weights, axes)
    lo_hi = [(min(a), max(a) + weights.shape[i]) for i, a in enumerate(axes)]
    for _ in range(4):
        lo = [data.draw(st.integers(a, b - 1)) for a, b in lo_hi]
        hi = [data.draw(st.integers(a + 1, min(a + 12, b))) for a, (_, b) in zip(lo, lo_hi)]
        for region in (first, Bbox(Vec(lo), Vec(hi))):
            expected = weight_sum(weights, [Vec(o) for o in origins], region)
            assert np.array_equal(ws.over(region).view(np.uint32), expected.view(np.uint32))


def test_the_interior_blocks_of_a_job_share_one_compact_sum():
    """The 108 blocks of a 96x1152x1152 job (or the 1690 of a 320x2560x2560 one) need 27 compact sums
    (3 placements per axis: first, interior, last), not one per block; a pickled WeightSum leaves its
    caches behind."""
    import pickle

    from chunkflow.geometry import Layout

    computed = []

    class Counting(WeightSum):
        def _compute_compact(self, classes):
            computed.append(1)
            return super()._compute_compact(classes)

    layout = Layout(Bbox(Vec(0, 0, 0), Vec(96, 1152, 1152)), Vec(16, 128, 128), Vec(4, 32, 32), Vec(32, 192, 192),
                    Vec(16, 64, 64))
    ws = Counting(weight_map("gaussian", (16, 128, 128)), [ax.origins for ax in layout.axes])
    chunks = [layout.chunk_box(b) for b in layout.block_indices()]
    for chunk in chunks:
        ws._compact(ws.classes(chunk))
    assert len(chunks) == 108 and len(computed) == 27 == len(ws._compacts)
    ws.__class__ = WeightSum  # picklable again (a local class is not)
    assert len(pickle.dumps(ws)) < ws.weights.nbytes + 10_000  # the weight map, not 27 compact sums
    assert pickle.loads(pickle.dumps(ws))._compacts == {}


def _classes_by_definition(origins, patch, lo, hi):
    """AxisClasses spelled out coordinate by coordinate (the implementation before it went to numpy)."""
    first, source = {}, []
    for c in range(lo, hi):
        source.append(first.setdefault(tuple(c - o for o in origins if o <= c < o + patch), c))
    sources = sorted(first.values())
    intervals = []
    for s in sources:
        if intervals and intervals[-1][1] == s:
            intervals[-1] = (intervals[-1][0], s + 1)
        else:
            intervals.append((s, s + 1))
    position = {s: i for i, s in enumerate(sources)}
    runs = []
    for i, s in enumerate(source):
        if not runs or source[i - 1] + 1 != s:
            runs.append([i, i + 1, position[s]])
        else:
            runs[-1][1] = i + 1
    keys = {c: key for key, c in first.items()}
    return intervals, runs, [position[s] for s in source], [keys[s] for s in sources]


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(1, 20), st.data())
def test_axis_classes_are_their_definition(patch, data):
    """Any sorted origins (a regular grid or not, none at all), any range (empty too), inside the grid or past it."""
    overlap = data.draw(st.integers(0, patch - 1))
    start, length = data.draw(st.integers(-5, 5)), data.draw(st.integers(patch, 120))
    origins = data.draw(st.one_of(st.just(list(axis_origins(start, length, patch, overlap))),
                                  st.lists(st.integers(-10, 60), max_size=8, unique=True).map(sorted)))
    lo = data.draw(st.integers(start - 3, start + length - 1))
    hi = data.draw(st.integers(lo, start + length + 3))  # an empty range too
    got = AxisClasses.of(origins, patch, lo, hi)
    intervals, runs, index, keys = _classes_by_definition(origins, patch, lo, hi)
    assert list(got.intervals) == intervals and [[r.start, r.stop, r.compact] for r in got.runs] == runs
    assert got.compact_index.tolist() == index and list(got.keys) == keys


def test_an_empty_region_has_an_empty_weight_sum():
    """A review (2026-11-29): the numpy AxisClasses raised IndexError on an empty range."""
    ws = WeightSum(weight_map("gaussian", (4, 5, 6)), [axis_origins(0, 20, n, 1) for n in (4, 5, 6)])
    region = Bbox(Vec(1, 2, 3), Vec(1, 10, 12))
    assert ws.over(region).shape == (0, 8, 9)
    acc = np.ones((1, 0, 8, 9), np.float32)
    normalise(acc, region, ws)
