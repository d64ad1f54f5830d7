"""``plan --dry-run``: the counts are right (brute force on small layouts), a million-block layout
is summarised from per-axis sums in bounded memory, and a dry run writes nothing."""
from __future__ import annotations

import random
import tracemalloc

import pytest

from chunkflow import cli
from chunkflow.bbox import Bbox, Vec
from chunkflow.dryrun import calibrate, hypothetical, summarise
from chunkflow.geometry import GeometryError, Layout
from chunkflow.backends import load_backend
from tests.helpers import CONV3, make_input


def brute_force(layout: Layout) -> dict:
    tasks = pieces = between = voxels = between_voxels = computed = 0
    for idx in layout.block_indices():
        tasks += layout.chunk_box(idx) is not None
        computed += len(layout.own_origins(idx))
        for d in layout.donations_from(idx):
            pieces += 1
            voxels += d.piece.size
            if d.receiver != idx:
                between += 1
                between_voxels += d.piece.size
    return {"stage_one_tasks": tasks, "donations": pieces, "donations_between_blocks": between,
            "donated_voxels": voxels, "donated_voxels_between_blocks": between_voxels, "patches_computed": computed}


def _random_layouts(count: int, seed: int, max_side: int = 60):
    rng = random.Random(seed)
    made = 0
    while made < count:
        shape = [rng.randint(3, max_side) for _ in range(3)]
        patch = [rng.randint(1, s) for s in shape]
        overlap = [rng.randint(0, p - 1) for p in patch]
        chunk = [rng.randint(1, 6) for _ in range(3)]
        block = [c * rng.randint(1, 6) for c in chunk]
        start = [rng.randint(-9, 9) for _ in range(3)]
        try:
            yield Layout(Bbox.from_shape(start, shape), Vec(patch), Vec(overlap), Vec(block), Vec(chunk))
        except GeometryError:
            continue
        made += 1


def test_counts_equal_brute_force_on_random_layouts():
    for layout in _random_layouts(60, seed=11):
        s = summarise(layout, out_channels=3, donation_dtype="float16")
        assert {k: getattr(s, k) for k in brute_force(layout)} == brute_force(layout)
        assert s.patches_computed == s.patches_grid and s.redundancy == 1.0
        assert s.donations == sum(len(layout.donations_to(i)) for i in layout.block_indices())
        assert s.output_bytes == layout.bbox.size * 3 * 4


@pytest.mark.slow  # a ten-thousand-block layout
def test_counts_equal_brute_force_on_a_ten_thousand_block_layout():
    layout = Layout(Bbox(Vec(0, 0, 0), Vec(170, 700, 650)), Vec(8, 32, 32), Vec(2, 8, 8), Vec(8, 32, 32),
                    Vec(4, 16, 16))
    assert layout.num_blocks > 10_000
    s = summarise(layout)
    assert {k: getattr(s, k) for k in brute_force(layout)} == brute_force(layout)


def test_a_million_block_job_is_summarised_from_per_axis_sums():
    """A petavoxel (10^15 voxels) job: 6.8 million blocks, 1.7 billion patches."""
    bbox = Bbox(Vec(0, 0, 0), Vec(100_000, 100_000, 100_000))
    tracemalloc.start()
    try:
        layout = Layout(bbox, Vec(20, 256, 256), Vec(4, 64, 64), Vec(112, 1152, 1152), Vec(16, 64, 64))
        s = summarise(layout, out_channels=3, input_patch=(28, 320, 320), context=(4, 32, 32), batch_size=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2 ** 20  # per-axis data only: no list of blocks, patches or keys
    assert s.blocks == 893 * 87 * 87 == layout.num_blocks >= 10 ** 6
    assert s.patches_grid == 6250 * 521 * 521 == s.patches_computed and s.redundancy == 1.0
    assert s.stage_one_tasks == s.stage_two_tasks == s.blocks
    assert s.output_bytes == 10 ** 15 * 3 * 4
    # every inner block face is crossed by donations from below: at least 3 per interior block
    assert s.donations_between_blocks >= 3 * (892 * 86 * 86)
    assert 0 < s.donated_bytes < s.output_bytes


def test_calibration_and_hypothetical_volume():
    c = calibrate(load_backend("identity"), (4, 8, 8), batch_size=2, batches=2)
    assert c.patches == 4 and c.seconds_per_patch > 0 and c.device == "cpu"
    text = hypothetical("1000,20000,20000", "20,256,256", "112,1152,1152", overlap="4,64,64", batch_size=2)
    assert "redundant compute" in text and "= 1.000" in text and "hours" in text
    assert "in storage chunks of 16,64,64 z,y,x" in text  # the default the planner would pick
    assert "own no patch" not in text
    edges = hypothetical("32,256,256", "16,64,64", "16,120,120", calibrate_batches=0)  # origins 0,64,128,192
    assert "tasks: 8 stage one (inference-and-donate), 18 stage two" in edges
    assert "10 of the 18 blocks own no patch" in edges and "neighbours' donations" in edges


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    url, _ = make_input(tmp_path / "in", (20, 64, 60), seed=2, chunk=(4, 16, 20))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cli.plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), CONV3, "10,26,26", output_patch="4,20,20",
             overlap="1,5,5", block="8,32,20", storage_chunk="4,16,20", dry_run=True, quiet=True)
    printed = capsys.readouterr().out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no manifest, no output volume
    layout = Layout(Bbox(Vec(0, 0, 0), Vec(20, 64, 60)), Vec(4, 20, 20), Vec(1, 5, 5), Vec(8, 32, 20), Vec(4, 16, 20))
    expected = brute_force(layout)
    assert f"{layout.num_blocks} blocks" in printed
    assert f"patches: {layout.num_patches} in the grid, {expected['patches_computed']} computed" in printed
    assert f"= {expected['patches_computed'] / layout.num_patches:.3f}" in printed
    assert f"donations: {expected['donations']} objects" in printed
    assert "in storage chunks of 4,16,20 z,y,x" in printed  # what the output volume will be made with
    assert "ms per patch" in printed and "hours" in printed
    assert f"output objects + {expected['donations']} donations + " in printed  # the cost model's lines
    assert "per teravoxel" in printed and "list prices as of 2025" in printed


def test_cli_dry_run_refuses_a_bad_job_like_plan(tmp_path, capsys):
    url, _ = make_input(tmp_path / "in", (20, 64, 60), seed=2, chunk=(4, 16, 20))
    with pytest.raises(SystemExit) as exit_:
        cli.plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), "identity", "8,32,32", overlap="8,8,8",
                 block="8,32,32", dry_run=True, quiet=True)
    assert exit_.value.code == 2
    assert "overlap" in capsys.readouterr().err


def test_a_million_blocks_whose_stride_does_not_divide_the_block_plan_per_axis(monkeypatch):
    """Patch stride and block share no period, so every block along an axis is of its own kind:
    key uniqueness must still be checked per axis, never block by block in 3-D."""
    calls = []
    plain = Layout.donations_to
    monkeypatch.setattr(Layout, "donations_to", lambda self, idx: calls.append(idx) or plain(self, idx))
    layout = Layout(Bbox(Vec(0, 0, 0), Vec(100_000, 100_000, 100_000)), Vec(193, 193, 193), Vec(4, 64, 64),
                    Vec(1000, 1000, 1000), Vec(8, 8, 8))
    assert layout.num_blocks == 10 ** 6 and calls == []
    s = summarise(layout)
    assert s.patches_computed == s.patches_grid and s.redundancy == 1.0 and calls == []
