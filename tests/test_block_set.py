"""BlockGrid and BlockSet: block names <-> flat indices, and set algebra, against the Layout itself."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.bbox import Bbox, Vec
from chunkflow.block_set import BlockGrid, BlockSet
from chunkflow.geometry import Layout
from tests.helpers import examples

axis = st.tuples(st.integers(-50, 50), st.integers(8, 90), st.integers(4, 12), st.integers(0, 3), st.integers(1, 3))


def layout_of(axes) -> Layout:
    start = Vec(a[0] for a in axes)
    shape = Vec(a[1] for a in axes)
    patch = Vec(min(a[2], a[1]) for a in axes)
    overlap = Vec(min(a[3], p - 1) for a, p in zip(axes, patch))
    block = Vec(max(p, a[4] * p) for a, p in zip(axes, patch))
    overlap = Vec(min(o, b - 1) for o, b in zip(overlap, block))
    return Layout(Bbox(start, start + shape), patch, overlap, block)


@settings(max_examples=examples(60), deadline=None)
@given(st.tuples(axis, axis, axis), st.data())
def test_grid_names_and_indices_agree_with_the_layout(axes, data):
    layout = layout_of(axes)
    grid = BlockGrid(layout)
    indices = list(layout.block_indices())
    assert grid.size == layout.num_blocks == len(indices)
    for flat, idx in enumerate(indices):
        name = layout.block_box(idx).name
        assert grid.flat(name) == flat
        assert grid.name(flat) == name
        assert grid.index(flat) == idx
        assert grid.flat_of(idx) == flat
    chosen = data.draw(st.sets(st.integers(0, len(indices) - 1)))
    names = [layout.block_box(indices[i]).name for i in chosen]
    blocks = BlockSet(grid)
    assert blocks.add_names(names + ["0-1_0-1_0-1", "junk", "1-2_3-4"]) == len(names) - sum(
        n == "0-1_0-1_0-1" for n in names)
    assert len(blocks) == len(chosen)
    assert list(blocks) == [layout.block_box(indices[i]).name for i in sorted(chosen)]
    assert list(blocks.indices()) == [indices[i] for i in sorted(chosen)]
    assert BlockSet.from_bytes(grid, blocks.to_bytes()) == blocks
    rest = ~blocks
    assert len(rest) == len(indices) - len(chosen)
    assert len(blocks | rest) == len(indices) and len(blocks & rest) == 0
    assert (BlockSet.full(grid) - rest) == blocks and blocks.issubset(BlockSet.full(grid))


def test_names_of_other_grids_are_not_members():
    layout = Layout(Bbox(Vec(0, 0, 0), Vec(16, 64, 64)), Vec(8, 16, 16), Vec(2, 4, 4), Vec(8, 32, 32))
    blocks = BlockSet.full(BlockGrid(layout))
    assert "0-32_0-32_0-8" in blocks
    assert "0-32_0-32_0-9" not in blocks and "0-32_0-32" not in blocks and 5 not in blocks
    blocks.discard("0-32_0-32_0-8")
    assert "0-32_0-32_0-8" not in blocks and len(blocks) == layout.num_blocks - 1
    assert blocks.bits.dtype == np.bool_
