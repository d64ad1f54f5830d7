"""The dry run's cost model (issue 13): object counts equal brute force over blocks and the
requests a real run makes, the dollars are the stated arithmetic, a petavoxel is priced from
per-axis sums in well under a second, bad price flags are refused in one line, and prices never
change the job."""
from __future__ import annotations

import collections
import itertools
import json
import math
import random
import time

import pytest

from chunkflow import cli
from chunkflow.bbox import Bbox, Vec
from chunkflow.cost_model import (DEFAULT_PRICES, GB, HEARTBEAT_SECONDS, PRICE_PARAMETERS, JobCounts, Prices,
                                  barrier_cost_per_hour, check_prices, estimate)
from chunkflow.dryrun import hypothetical, job_counts, summarise
from chunkflow.io_counts import io_counts
from chunkflow.errors import UsageError
from chunkflow.geometry import GeometryError, Layout
from tests.helpers import CONV3, make_input


def _cells(box: Bbox, origin, size) -> set[tuple[int, int, int]]:
    """The grid cells ``box`` meets, from its voxels (per axis, then every combination)."""
    if box.is_empty():
        return set()
    per_axis = [{(v - origin[a]) // size[a] for v in range(box.start[a], box.stop[a])} for a in range(3)]
    return set(itertools.product(*per_axis))


def brute_force(layout: Layout, context, input_box: Bbox, input_chunk, unit) -> dict:
    """Input chunks read, output objects written (and by stage one), block by block."""
    reads = core = 0
    written: list[tuple[int, int, int]] = []
    for idx in layout.block_indices():
        chunk = layout.chunk_box(idx)
        if chunk is not None:
            reads += len(_cells(chunk.grow(context).intersect(input_box), input_box.start, input_chunk))
            cells = _cells(layout.core_box(idx), layout.bbox.start, unit)
            core += len(cells)
            written += cells
        for band in layout.band_boxes(idx):
            written += _cells(band, layout.bbox.start, unit)
    assert len(written) == len(set(written)), "an output object written twice"
    assert set(written) == _cells(layout.bbox, layout.bbox.start, unit), "an output object never written"
    return {"input_reads": reads, "output_objects": len(written), "core_objects": core}


def _layouts(count: int, seed: int):
    rng = random.Random(seed)
    made = 0
    while made < count:
        shape = [rng.randint(3, 40) for _ in range(3)]
        patch = [rng.randint(1, s) for s in shape]
        overlap = [rng.randint(0, p - 1) for p in patch]
        chunk = [rng.randint(1, 5) for _ in range(3)]
        block = [c * rng.randint(1, 5) for c in chunk]
        start = [rng.randint(-9, 9) for _ in range(3)]
        try:
            layout = Layout(Bbox.from_shape(start, shape), Vec(patch), Vec(overlap), Vec(block), Vec(chunk),
                            whole_block_writes=rng.random() < 0.25)
        except GeometryError:
            continue
        made += 1
        yield layout, rng


def test_object_counts_equal_brute_force_on_random_layouts():
    for layout, rng in _layouts(60, seed=5):
        context = Vec(rng.randint(0, 4) for _ in range(3))
        input_box = Bbox(layout.bbox.start - Vec(rng.randint(0, 6) for _ in range(3)),
                         layout.bbox.stop + Vec(rng.randint(0, 6) for _ in range(3)))
        input_chunk = Vec(rng.randint(1, 7) for _ in range(3))
        unit = layout.storage_chunk
        if layout.whole_block_writes:  # a shard: whole chunks that tile the block
            unit = Vec(c * rng.choice([f for f in range(1, b // c + 1) if (b // c) % f == 0])
                       for b, c in zip(layout.block, layout.storage_chunk))
        got = io_counts(layout, context, input_box, input_chunk, unit)
        expected = brute_force(layout, context, input_box, input_chunk, unit)
        assert {k: getattr(got, k) for k in expected} == expected, (layout.bbox, layout.block, context)
        if layout.whole_block_writes:
            assert got.core_objects == 0  # stage one donates its core, stage two writes the whole block


def test_a_real_run_makes_exactly_the_requests_the_model_counts(tmp_path, monkeypatch):
    """Every store request and every input and output chunk of a run (barrier order, --cleanup),
    counted at the store and the volumes, against the dry run's numbers."""
    from chunkflow import api
    from chunkflow.engines import make_engine
    from chunkflow.engines.runner import run_stage
    from chunkflow.storage import open_volume
    from chunkflow.storage.objects import DirectoryStore
    from chunkflow.storage.precomputed import PrecomputedVolume

    url, _ = make_input(tmp_path / "in", (20, 64, 60), seed=2, chunk=(4, 16, 20))
    job = api.plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), CONV3, "10,26,26",
                   output_patch="4,20,20", overlap="1,5,5", block="8,32,20", storage_chunk="4,16,20")
    store: collections.Counter = collections.Counter()
    # get_many calls get; names_under with a start offset calls list (counted there), without one it walks itself
    for method in ("put", "get", "exists", "delete", "list", "list_with_sizes", "get_head", "names_under"):
        def counted(self, name="", *args, _method=method, _plain=getattr(DirectoryStore, method), **kwargs):
            kinds = [name] if isinstance(name, str) else list(name)
            delegates = _method == "names_under" and (args or kwargs.get("start_offset")) is not None
            for one in kinds if not delegates else []:
                store["list" if _method == "names_under" else _method, one.split("/")[0]] += 1
            return _plain(self, name, *args, **kwargs)
        monkeypatch.setattr(DirectoryStore, method, counted)
    chunks: collections.Counter = collections.Counter()

    def tally(kind, plain):
        def wrapped(self, box, *args):
            chunks[kind, self.url] += len(_cells(box, self.bbox.start, self.chunk_size))
            return plain(self, box, *args)
        return wrapped
    monkeypatch.setattr(PrecomputedVolume, "_read", tally("read", PrecomputedVolume._read))
    monkeypatch.setattr(PrecomputedVolume, "_write", tally("write", PrecomputedVolume._write))

    engine = make_engine("local")
    try:
        run_stage(job, 1, engine, progress=False)
        core_written = chunks["write", job.output]
        run_stage(job, 2, engine, progress=False, cleanup=True)
    finally:
        engine.close()

    source = open_volume(url)
    summary = summarise(job.layout, job.out_channels)
    counts = job_counts(summary, io_counts(job.layout, job.context_margin, source.bbox, source.chunk_size))
    ops = estimate(counts).ops
    tasks = summary.stage_one_tasks + summary.stage_two_tasks
    assert summary.donations == 79 and tasks == 36  # a layout with donations between blocks and to bands
    assert chunks["read", url] == ops.reads_input == counts.input_reads
    assert chunks["write", job.output] == ops.writes_output and core_written == counts.core_objects > 0
    assert store["put", "donations"] == store["get", "donations"] == ops.writes_donations == ops.reads_donations
    assert store["delete", "donations"] == ops.deletes_donations
    marker_puts = sum(n for (method, kind), n in store.items() if method == "put" and kind != "donations")
    marker_reads = sum(n for (method, kind), n in store.items()
                       if method in ("get", "exists", "get_head", "get_many") and kind != "donations")
    assert marker_puts == ops.writes_markers and store["put", "log"] == tasks
    assert marker_reads == ops.reads_markers
    assert sum(n for (method, _), n in store.items() if method.startswith("list")) == ops.lists
    assert sum(n for (method, kind), n in store.items() if method == "delete" and kind != "donations") == \
        ops.deletes_markers
    assert sum(store.values()) == ops.writes - ops.writes_output + ops.reads - ops.reads_input + ops.lists + ops.deletes


def test_dollars_are_the_stated_arithmetic():
    c = JobCounts(stage_one_tasks=10, stage_two_tasks=12, input_reads=5_000, output_objects=2_000, core_objects=800,
                  donations=300, output_bytes=3 * GB, donated_bytes=GB, output_voxels=2 * 10 ** 12,
                  model_seconds=7200.0)
    p = Prices(gpu_hour=2.0, cpu_hour=0.5, class_a=0.01, class_b=0.001, gb_month=0.1, storage_months=3.0,
               stage_two_mb_s=GB / 1e6 / 3600)  # one GB of donations per hour
    e = estimate(c, p)
    writes = 2_000 + 300 + 3 * 22 + 2
    reads = 5_000 + 300 + 4 * 22 + 11  # 4 per task; 11 per job (cost_model.JOB_READS)
    assert (e.ops.writes, e.ops.reads, e.ops.lists, e.ops.deletes) == (writes, reads, 2, 2 * 22 + 300)
    assert e.ops.peak_bytes == 4 * GB
    assert e.gpu_hours == 2.0 and math.isclose(e.cpu_hours, 1.0)
    assert math.isclose(e.class_a, (writes + 2) / 1000 * 0.01) and math.isclose(e.class_b, reads / 1000 * 0.001)
    assert math.isclose(e.storage, 4 * 0.1 * 3) and e.gpu == 4.0 and math.isclose(e.cpu, 0.5)
    assert math.isclose(e.total, e.class_a + e.class_b + 1.2 + 4.0 + 0.5)
    assert math.isclose(e.per_teravoxel, e.total / 2)
    assert e.ops.heartbeats == int((7200 + 3600) // HEARTBEAT_SECONDS)
    uncalibrated = estimate(JobCounts(**{**c.__dict__, "model_seconds": None}), p)
    assert uncalibrated.gpu is None and math.isclose(uncalibrated.total, e.total - 4.0)
    assert math.isclose(barrier_cost_per_hour(p, poll=5.0), (720 * 2 + 60) / 1000 * 0.01)


def test_the_defaults_are_the_stated_list_prices():
    assert (DEFAULT_PRICES.class_a, DEFAULT_PRICES.class_b, DEFAULT_PRICES.gb_month) == (0.005, 0.0004, 0.020)
    assert math.isclose(DEFAULT_PRICES.gpu_hour, 0.35 + 0.19) and DEFAULT_PRICES.cpu_hour == 0.19
    from chunkflow.engines.queue import DEFAULT_LEASE, SAVE_EVERY_S
    from chunkflow.cost_model import BARRIER_SAVE_SECONDS
    assert HEARTBEAT_SECONDS == DEFAULT_LEASE / 3 and BARRIER_SAVE_SECONDS == SAVE_EVERY_S


def test_a_petavoxel_is_priced_from_per_axis_sums_in_well_under_a_second():
    started = time.perf_counter()
    layout = Layout(Bbox(Vec(0, 0, 0), Vec(100_000, 100_000, 100_000)), Vec(20, 256, 256), Vec(4, 64, 64),
                    Vec(112, 1152, 1152), Vec(16, 64, 64))
    s = summarise(layout, out_channels=1, input_patch=(20, 256, 256))
    io = io_counts(layout)
    e = estimate(job_counts(s, io))
    assert time.perf_counter() - started < 1.0
    assert io.output_objects == 6250 * 1563 * 1563  # ceil(100000 / chunk) per axis: each chunk written once
    assert io.input_reads >= io.output_objects and 0 < io.core_objects < io.output_objects
    assert e.ops.writes == io.output_objects + s.donations + 3 * 2 * s.blocks + 2
    assert e.total > 0 and math.isclose(e.per_teravoxel, e.total / 1000)


def test_the_report_and_its_json_say_the_same(capsys):
    args = ("200,2000,2000", "20,256,256", "112,1152,1152")
    kw = dict(overlap="4,64,64", calibrate_batches=1, price_class_a=0.01)
    text = hypothetical(*args, **kw)
    data = json.loads(hypothetical(*args, **kw, json=True))
    ops, dollars = data["cost"]["operations"], data["cost"]["dollars"]
    assert f"object writes: {ops['writes']:,} = {ops['writes_output']:,} output objects" in text
    assert f"object reads: {ops['reads']:,} = {ops['reads_input']:,} input chunks" in text
    assert f"Class A ${dollars['class_a']:,.2f}" in text and data["cost"]["prices"]["class_a"] == 0.01
    assert "per teravoxel" in text and "as of 2025" in text and data["cost"]["prices_as_of"] == "2025"
    assert data["plan"]["donations"] == ops["writes_donations"] and data["calibration"]["patches"] == 1


@pytest.mark.parametrize("flag, value, valid", [
    ("price_gpu_hour", "abc", ">= 0"), ("price_class_a", -1, ">= 0"), ("price_gb_month", float("nan"), ">= 0"),
    ("price_cpu_hour", True, ">= 0"), ("stage_two_mb_s", 0, "> 0"), ("storage_months", "1,2", ">= 0")])
def test_a_bad_price_is_refused_in_one_line_naming_it(flag, value, valid):
    with pytest.raises(UsageError) as err:
        check_prices(**{flag: value})
    message = str(err.value)
    assert message.startswith(f"--{flag.replace('_', '-')} {value!r}: give a number {valid}") and "\n" not in message


def test_a_bad_price_flag_on_the_command_line_exits_2_and_writes_nothing(tmp_path, capsys):
    url, _ = make_input(tmp_path / "in", (20, 64, 60), seed=2, chunk=(4, 16, 20))
    before = sorted(tmp_path.rglob("*"))
    for dry_run in (True, False):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["plan", url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), CONV3, "10,26,26",
                      "--output-patch", "4,20,20", "--block", "8,32,20", "--price-gpu-hour", "cheap",
                      *(["--dry-run"] if dry_run else []), "--quiet"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert "--price-gpu-hour 'cheap': give a number >= 0, US dollars per stage-one (GPU) worker-hour" in err
        assert sorted(tmp_path.rglob("*")) == before


def test_prices_are_no_job_parameters_and_leave_the_job_as_it_is(tmp_path, capsys):
    import dataclasses

    from chunkflow.api import open_job
    from chunkflow.job_params import JobParameters

    assert not set(PRICE_PARAMETERS) & {f.name for f in dataclasses.fields(JobParameters)}
    url, _ = make_input(tmp_path / "in", (20, 64, 60), seed=2, chunk=(4, 16, 20))
    hashes = []
    for prices in ({}, {"price_gpu_hour": 9.0, "price_class_a": 1.0, "storage_months": 12}):
        # planning the same job into the same store again is accepted only when nothing of it changed
        cli.plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), CONV3, "10,26,26",
                 output_patch="4,20,20", block="8,32,20", quiet=True, **prices)
        hashes.append(open_job(tmp_path / "job").job_hash)
    assert hashes[0] == hashes[1]
    cli.plan(url, f"file://{tmp_path / 'c'}_out", str(tmp_path / "c"), CONV3, "10,26,26", output_patch="4,20,20",
             block="8,32,20", dry_run=True, quiet=True, price_gpu_hour=0.0, price_cpu_hour=0.0, price_class_a=0.0,
             price_class_b=0.0, price_gb_month=0.0)
    printed = capsys.readouterr().out
    assert "cost in US dollars" in printed and "$0.00 = Class A $0.00 + Class B $0.00 + storage $0.00" in printed
    assert not (tmp_path / "c").exists()


def test_plan_help_states_every_price_with_its_date(capsys):
    from chunkflow.cli.stage_args import help_text

    text = help_text(cli.COMMANDS["plan"], "plan", "chunkflow")
    for flag in PRICE_PARAMETERS:
        assert f"--{flag.replace('_', '-')}=" in text
    assert text.count("as of 2025") == 5
