"""The patch grid, block grid and donation plan (pure), including Invariant 1 in memory.

The in-memory pipeline here uses the real geometry, blending and ``blended_inference`` with a
real numpy "network" (a context-using 3D filter), so a hypothesis search over volumes, patches,
overlaps and blocks can run thousands of cuts in seconds. The same invariant is proven again
end to end with real volumes, stores and PyTorch models in ``test_two_stages_exact.py``.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import weight_map, weight_sum
from chunkflow.geometry import GeometryError, Layout, axis_origins, make_key, parse_key
from chunkflow.inference import blended_inference
from tests.helpers import examples


def test_axis_origins_match_monai_placement():
    monai_utils = pytest.importorskip("monai.data.utils")
    for length, patch, overlap in [(64, 16, 4), (100, 16, 4), (17, 16, 3), (16, 16, 0), (50, 7, 6)]:
        interval = patch - overlap if patch != length else patch
        slices = monai_utils.dense_patch_slices((length,), (patch,), (interval,))
        assert tuple(s[0].start for s in slices) == axis_origins(0, length, patch, overlap)


def test_axis_origins_are_offset_and_flush():
    assert axis_origins(10, 30, 8, 2) == (10, 16, 22, 28, 32)
    assert axis_origins(0, 8, 8, 2) == (0,)


def test_key_round_trip_and_strict_parser():
    block = Bbox(Vec(0, 0, 0), Vec(112, 1152, 1152))
    piece = Bbox(Vec(0, 0, 0), Vec(112, 1152, 64))
    key = make_key(block, piece)
    assert key == "0-1152_0-1152_0-112%0-64_0-1152_0-112"
    assert parse_key(key) == (block, piece)
    for bad in ["../x", "a%b%c", "0-1_0-1_0-1", "0-1_0-1_0-1%0-1_0-1_0-1/..", "0-a_0-1_0-1%0-1_0-1_0-1",
                "0-4_0-4_0-4%0-8_0-4_0-4", "0-4_0-4_0-4%0-4_0-4_4-0", "", "0-4_0-4_0-4%0-4_0-4_0-4 "]:
        with pytest.raises(ValueError):
            parse_key(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch=Vec(8, 8, 8), overlap=Vec(8, 2, 2), block=Vec(16, 16, 16)), "smaller than the output patch"),
    (dict(patch=Vec(8, 8, 8), overlap=Vec(2, 2, 6), block=Vec(16, 16, 4), storage_chunk=Vec(4, 4, 4)),
     "smaller than the block"),
    (dict(patch=Vec(8, 80, 8), overlap=Vec(2, 2, 2), block=Vec(16, 16, 16)), "larger than the volume"),
    (dict(patch=Vec(8, 8, 8), overlap=Vec(2, 2, 2), block=Vec(16, 16, 12), storage_chunk=Vec(8, 8, 8)),
     "not a multiple of the output storage chunk"),
    (dict(patch=Vec(0, 8, 8), overlap=Vec(0, 2, 2), block=Vec(16, 16, 16)), "must be positive"),
    (dict(patch=Vec(8, 8, 8), overlap=Vec(2, -1, 2), block=Vec(16, 16, 16)), "must not be negative"),
])
def test_validation_errors_name_the_value(kwargs, message):
    with pytest.raises(GeometryError, match=message):
        Layout(Bbox(Vec(0, 0, 0), Vec(32, 32, 32)), **kwargs)


layouts = st.builds(
    lambda shape, patch, ov, block, chunk_div, offset: _layout(shape, patch, ov, block, chunk_div, offset),
    shape=st.tuples(*[st.integers(4, 40)] * 3), patch=st.tuples(*[st.integers(1, 16)] * 3),
    ov=st.tuples(*[st.integers(0, 15)] * 3), block=st.tuples(*[st.integers(2, 24)] * 3),
    chunk_div=st.tuples(*[st.integers(1, 4)] * 3), offset=st.tuples(*[st.integers(-5, 5)] * 3))


def _layout(shape, patch, ov, block, chunk_div, offset):
    patch = tuple(min(p, s) for p, s in zip(patch, shape))
    chunk = tuple(max(1, b // d) for b, d in zip(block, chunk_div))
    block = tuple(c * max(1, b // c) for c, b in zip(chunk, block))
    ov = tuple(min(o, p - 1, b - 1) for o, p, b in zip(ov, patch, block))
    try:
        return Layout(Bbox.from_shape(offset, shape), Vec(patch), Vec(ov), Vec(block), Vec(chunk))
    except GeometryError as err:
        assert "same region" in str(err)
        return None


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts)
def test_donation_plan_is_consistent(layout):
    """Every patch is owned by exactly one block; donors and receivers agree; keys are unique;
    core and band tile each block; stage-two writes are storage aligned."""
    if layout is None:
        return
    owned = [o for idx in layout.block_indices() for o in layout.own_origins(idx)]
    assert sorted(owned) == sorted(layout.all_origins())
    assert len(owned) == layout.num_patches
    sent = {d.key: d for idx in layout.block_indices() for d in layout.donations_from(idx)}
    received = {}
    for idx in layout.block_indices():
        box = layout.block_box(idx)
        expected = layout.donations_to(idx)
        keys = [d.key for d in expected]
        assert len(keys) == len(set(keys))
        for d in expected:
            received[d.key] = d
            assert box.contains(d.piece)
        core, bands = layout.core_box(idx), layout.band_boxes(idx)
        covered = np.zeros(box.shape, dtype=int)
        for part in ([] if core.is_empty() else [core]) + bands:
            covered[part.slices(box)] += 1
            for a in range(3):
                assert (part.start[a] - layout.bbox.start[a]) % layout.storage_chunk[a] == 0
                stop = part.stop[a]
                assert stop == layout.bbox.stop[a] or (stop - layout.bbox.start[a]) % layout.storage_chunk[a] == 0
        assert (covered == 1).all()
        # the core is touched only by the block's own patches
        if not core.is_empty():
            for origin in layout.origins_overlapping(core):
                assert layout.block_box(idx).contains_point(origin)
    assert sent.keys() == received.keys()
    for key in sent:
        assert sent[key].piece == received[key].piece and sent[key].donor == received[key].donor


def _filter_net(context: int):
    """A deterministic 'network' that uses context: a 3D box filter plus a nonlinearity,
    valid convolution (output smaller than input by ``context`` on each side), 2 channels."""
    def predict(batch: np.ndarray) -> np.ndarray:
        c = context
        x = batch[:, 0]
        out = np.zeros((x.shape[0],) + tuple(s - 2 * c for s in x.shape[1:]), dtype=np.float32)
        for dz, dy, dx in itertools.product(range(2 * c + 1), repeat=3):
            out += x[:, dz:dz + out.shape[1], dy:dy + out.shape[2], dx:dx + out.shape[3]]
        out /= (2 * c + 1) ** 3
        return np.stack([np.tanh(3 * out), out ** 2], axis=1).astype(np.float32)
    return predict


def simulate(layout: Layout, image: np.ndarray, mode: str, context: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-stage pipeline in memory (same functions as the real stages) and the reference."""
    bbox = layout.bbox
    padded_box = bbox.grow(context)
    padded = np.pad(image, [(0, 0)] + [(context, context)] * 3, mode="reflect")
    w = weight_map(mode, tuple(layout.patch))
    predict = _filter_net(context)
    in_patch = layout.patch + 2 * context

    def infer(region, origins):
        n = weight_sum(w, layout.origins_overlapping(region), region)
        box = region.grow(context)
        img = padded[(slice(None),) + box.slices(padded_box)]
        return blended_inference(img, box, origins, region, n, w, predict, in_patch, 2, batch_size)

    reference = infer(bbox, list(layout.all_origins()))
    output = np.full((2,) + tuple(bbox.shape), np.nan, dtype=np.float32)
    store = {}
    for idx in layout.block_indices():  # stage one
        chunk = layout.chunk_box(idx)
        if chunk is None:
            continue
        out = infer(chunk, layout.own_origins(idx))
        core = layout.core_box(idx)
        if not core.is_empty():
            output[(slice(None),) + core.slices(bbox)] = out[(slice(None),) + core.slices(chunk)]
        for d in layout.donations_from(idx):
            store[d.key] = out[(slice(None),) + d.piece.slices(chunk)].copy()
    for idx in reversed(list(layout.block_indices())):  # stage two, any order
        for band in layout.band_boxes(idx):
            total = np.zeros((2,) + tuple(band.shape), dtype=np.float32)
            for d in layout.donations_to(idx):
                part = d.piece.intersect(band)
                if not part.is_empty():
                    total[(slice(None),) + part.slices(band)] += store[d.key][(slice(None),) + part.slices(d.piece)]
            output[(slice(None),) + band.slices(bbox)] = total
    return output, reference


@settings(max_examples=examples(50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts, st.sampled_from(["constant", "gaussian", "bump"]), st.integers(0, 2), st.integers(1, 5),
       st.integers(0, 2**31 - 1))
def test_invariant_1_in_memory(layout, mode, context, batch_size, seed):
    """Output of the two stages == whole-volume blended inference, for any cut."""
    if layout is None:
        return
    image = np.random.default_rng(seed).random((1,) + tuple(layout.bbox.shape), dtype=np.float32)
    if context and min(layout.bbox.shape) <= context:
        return
    output, reference = simulate(layout, image, mode, context, batch_size)
    assert not np.isnan(output).any(), "some voxel was written by neither stage"
    np.testing.assert_allclose(output, reference, rtol=0, atol=float32_sum_tolerance(layout))


def float32_sum_tolerance(layout: Layout) -> float:
    """The two stages add a voxel's normalised contributions (each at most 1 in size for these
    nets, summing to at most ~1) grouped by donor, the reference patch by patch: two orders of a
    float32 sum of ``n`` terms differ by up to ~``n`` units of 2^-24. ``n`` is at most 8 for
    overlaps below half the patch, so 1e-5 holds there; hypothesis also draws overlaps of
    ``patch - 1`` (stride 1: hundreds of patches on one voxel), where the bound grows with ``n``."""
    n = 1
    for a in range(3):
        n *= -(-layout.patch[a] // layout.stride[a])
    return max(1e-5, 2 * n * 2.0 ** -24)


@pytest.mark.parametrize("name", ["032-64_0-8_0-8", "0-8_0-8_0-8\n", "\uff132-64_0-8_0-8", "-0-8_0-8_0-8", " 0-8_0-8_0-8"])
def test_box_names_have_one_spelling(name):
    """Leading zeros, a trailing newline, non-ASCII digits or -0 would let two different strings
    name one box (two objects for one donation) or slip a junk key past the parser."""
    with pytest.raises(ValueError, match="is not a box name"):
        Bbox.from_name(name)
    with pytest.raises(ValueError):
        parse_key(f"0-64_0-64_0-64%{name}")
