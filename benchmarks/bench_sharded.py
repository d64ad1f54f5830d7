"""Sharded outputs: what whole-block writes cost against the plain two-stage run.

On a sharded output (``--sharded``) stage one writes nothing and donates its core to its own block,
and stage two writes the whole block (docs/design.md, "Sharded outputs"). So every output voxel
goes through the donation store, where only the band did before. This script runs the same job
four ways (precomputed and zarr, each unsharded and sharded) and records:

* bytes through the donation store per output byte: donated (put by stage one) + fetched (by stage
  two), over the output's bytes; the difference sharded - unsharded is the core, donated and
  fetched once more;
* wall and CPU seconds of each stage (and of its write/donate/fetch phases), the output's objects
  and bytes on disk, the donation objects;
* the peak of Python-tracked memory (tracemalloc: numpy arrays and bytes) of one stage-one and one
  stage-two task of the last block;
* that the sharded output equals the unsharded one: max |difference| over the volume, and
  bit-identical where the unsharded job's core is.

The four variants run interleaved: round r runs each once, in an order rotated by r, so load that
drifts over the run hits each alike; medians over ``repeats`` rounds, with min-max. The analytic
figure for a production layout (``--paper``, no data: the dry run's counts) is recorded beside it.

    python benchmarks/bench_sharded.py                                   # 128x512x512, identity model
    python benchmarks/bench_sharded.py --shape 64,256,256 --block 32,128,128 --repeats 2
"""
from __future__ import annotations

import logging
import shutil
import statistics
import tracemalloc

import fire
import numpy as np

from common import make_input, run_two_stage, save, scratch, zyx
import chunkflow
from chunkflow import Bbox, Vec
# the dry run's byte counts for a layout alone (no volume, no job): what `chunkflow plan --dry-run` prints
from chunkflow.dryrun import summarise
from chunkflow.geometry import Layout
# peak_memory: the tracemalloc peak of one task alone, with Resources opened before tracing starts and no
# markers; the API's per-block functions open them inside the task (and rerunning needs force)
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import Resources, inference_and_donate

log = logging.getLogger("bench_sharded")

VARIANTS = (("precomputed", False), ("precomputed", True), ("zarr", False), ("zarr", True))
#: a production layout (design.md §15 with power-of-two blocks, which precomputed shards need)
PAPER = dict(shape="384,4096,4096", patch="16,192,192", overlap="4,32,32", block="128,1024,1024", chunk="16,64,64")


def _name(fmt: str, sharded: bool) -> str:
    return f"{fmt}{' sharded' if sharded else ''}"


def _on_disk(root) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _plan(workdir, url: str, fmt: str, sharded: bool, flags: dict, tag: str):
    out = workdir / f"out-{tag}"
    output = f"file://{out}" if fmt == "precomputed" else f"{out}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.zarr", ignore_errors=True)
    shutil.rmtree(workdir / f"job-{tag}", ignore_errors=True)
    job = chunkflow.plan(url, output, str(workdir / f"job-{tag}"), flags["model"], flags["patch"],
                         overlap=flags["overlap"], block=flags["block"], storage_chunk=flags["chunk"],
                         blend="gaussian", sharded=sharded)
    return job, (out if fmt == "precomputed" else workdir / f"out-{tag}.zarr")


def measure_once(workdir, url: str, fmt: str, sharded: bool, flags: dict) -> tuple[dict, np.ndarray, object]:
    job, root = _plan(workdir, url, fmt, sharded, flags, _name(fmt, sharded).replace(" ", "-"))
    run = run_two_stage(job)
    objects, size = _on_disk(root)
    output_bytes = job.layout.bbox.size * job.out_channels * np.dtype(job.output_dtype).itemsize
    put, got = run.stats1.donated_bytes, run.stats2.donated_bytes
    row = {"variant": _name(fmt, sharded), "stage1_s": run.stage1.wall, "stage2_s": run.stage2.wall,
           "total_s": run.wall, "cpu_s": run.cpu, "stage1_write_s": run.stats1.seconds.get("write", 0.0),
           "stage1_donate_s": run.stats1.seconds.get("donate", 0.0),
           "stage2_fetch_s": run.stats2.seconds.get("fetch", 0.0),
           "stage2_write_s": run.stats2.seconds.get("write", 0.0), "donated_bytes": put, "fetched_bytes": got,
           "donation_objects": run.stats1.donations, "output_bytes": output_bytes,
           "store_bytes_per_output_byte": (put + got) / output_bytes, "output_objects": objects,
           "output_bytes_on_disk": size}
    return row, run.output, job


def peak_memory(job) -> dict:
    """tracemalloc peaks of one stage-one and one stage-two task of the last block (a fresh rerun)."""
    last = list(job.layout.block_indices())[-1]
    res = Resources(job)
    res.backend, res.input, res.output, res.store, res.weight_sum
    peaks = {}
    for stage, task in ((1, lambda: inference_and_donate(job, last, res)),
                        (2, lambda: receive_and_blend(job, last, res))):
        tracemalloc.start()
        task()
        peaks[f"stage{stage}_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    return peaks


def paper(shape: str, patch: str, overlap: str, block: str, chunk: str) -> dict:
    """Bytes through the donation store per output byte for a layout, from the dry run's counts."""
    record = {"shape": shape, "patch": patch, "overlap": overlap, "block": block, "chunk": chunk}
    for sharded in (False, True):
        layout = Layout(Bbox(Vec(0, 0, 0), Vec.parse(shape)), Vec.parse(patch), Vec.parse(overlap), Vec.parse(block),
                        Vec.parse(chunk), whole_block_writes=sharded)
        for dtype in ("float32", "uint8"):
            s = summarise(layout, 1, dtype)
            key = f"{'sharded' if sharded else 'unsharded'}_{dtype}"
            record[key] = {"donation_objects": s.donations, "donated_voxels_per_output_voxel":
                           s.donated_voxels / s.output_voxels,
                           "store_bytes_per_output_byte": 2 * s.donated_bytes / s.output_bytes}
    return record


def _summary(rows: list[dict]) -> dict:
    numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    return {k: {"median": statistics.median(r[k] for r in rows), "min": min(r[k] for r in rows),
                "max": max(r[k] for r in rows)} for k in numeric}


def main(shape: str | tuple = "128,512,512", patch: str | tuple = "16,128,128", overlap: str | tuple = "4,32,32",
         block: str | tuple = "64,256,256", chunk: str | tuple = "16,64,64", model: str = "identity",
         repeats: int = 3, keep: str | None = None) -> None:
    """Run the four variants ``repeats`` times interleaved and record the medians."""
    logging.basicConfig(level=logging.WARNING)
    flags = {"patch": zyx(patch), "overlap": zyx(overlap), "block": zyx(block), "chunk": zyx(chunk), "model": model}
    workdir = scratch("bench-sharded-", keep)
    url, _ = make_input(workdir, tuple(Vec.parse(zyx(shape))), chunk=tuple(Vec.parse(flags["chunk"])))
    rows: dict[str, list[dict]] = {_name(*v): [] for v in VARIANTS}
    outputs: dict[str, np.ndarray] = {}
    jobs = {}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for fmt, sharded in order:
            row, output, job = measure_once(workdir, url, fmt, sharded, flags)
            rows[row["variant"]].append(row)
            outputs[row["variant"]], jobs[row["variant"]] = output, job
            print(f"round {r + 1}: {row['variant']:<20} {row['total_s']:6.2f} s, store bytes per output byte "
                  f"{row['store_bytes_per_output_byte']:.3f}, {row['output_objects']} output objects")
    results = {}
    for variant, runs in rows.items():
        results[variant] = _summary(runs)
        results[variant].update(peak_memory(jobs[variant]))
    exact = {}
    for fmt in ("precomputed", "zarr"):
        plain, sharded = outputs[_name(fmt, False)], outputs[_name(fmt, True)]
        job = jobs[_name(fmt, False)]
        cores = [job.layout.core_box(i) for i in job.layout.block_indices()]
        core_identical = all(np.array_equal(plain[(slice(None),) + c.slices(job.layout.bbox)],
                                            sharded[(slice(None),) + c.slices(job.layout.bbox)])
                             for c in cores if not c.is_empty())
        exact[fmt] = {"max_abs_difference": float(np.abs(plain - sharded).max()), "core_bit_identical": core_identical}
    record = {"shape": zyx(shape), **flags, "repeats": repeats, "results": results, "exact": exact,
              "paper": paper(**PAPER)}
    _print(record)
    print(f"recorded in {save('sharded', record)}")


def _print(record: dict) -> None:
    print(f"\n{record['shape']} volume, block {record['block']}, chunk {record['chunk']}, patch {record['patch']}, "
          f"overlap {record['overlap']}, model {record['model']}, median of {record['repeats']}")
    print(f"{'variant':<20} {'total s':>8} {'stage1':>7} {'stage2':>7} {'store B/out B':>13} {'objects':>8} "
          f"{'s1 MiB':>7} {'s2 MiB':>7}")
    for variant, r in record["results"].items():
        print(f"{variant:<20} {r['total_s']['median']:8.2f} {r['stage1_s']['median']:7.2f} "
              f"{r['stage2_s']['median']:7.2f} {r['store_bytes_per_output_byte']['median']:13.3f} "
              f"{int(r['output_objects']['median']):8d} {r['stage1_peak_mib']:7.0f} {r['stage2_peak_mib']:7.0f}")
    for fmt, e in record["exact"].items():
        print(f"{fmt}: sharded vs unsharded max |diff| {e['max_abs_difference']:.2e}, core bit-identical "
              f"{e['core_bit_identical']}")
    p = record["paper"]
    print(f"paper layout {p['shape']} block {p['block']}: store bytes per output byte (float32 output) "
          f"{p['unsharded_float32']['store_bytes_per_output_byte']:.3f} unsharded, "
          f"{p['sharded_float32']['store_bytes_per_output_byte']:.3f} sharded; uint8 output "
          f"{p['unsharded_uint8']['store_bytes_per_output_byte']:.3f}, "
          f"{p['sharded_uint8']['store_bytes_per_output_byte']:.3f}")


if __name__ == "__main__":
    fire.Fire(main)
