"""Stage two's blending throughput against numpy's ``a += b``, and donated bytes against geometry.

1. ``a += b`` on float32 arrays of 1, 8 and 64 MiB: the bandwidth ceiling of an in-place sum here
   (and at 64 MiB into a fresh ``np.zeros``, whose pages the sum touches first, as stage two's do).
2. A real job (identity model, so stage one is quick; 64x512x512, patch 16x128x128, overlap
   4x32x32, blocks 32x256x256): stage one runs once, then stage two over every block runs
   ``repeats`` times, each in a fresh process (the timed loop starts once its volume and store
   are open), each time right after ``a += b`` is measured again, so every ratio compares numbers
   taken under the same load. Stage two's ``blend`` phase sums every received piece into the
   band; its throughput is piece bytes summed per second, reported as a fraction of that
   repetition's ``a += b``, as the median and the range over repetitions. Fetch, verify and write
   are reported too. With ``--baseline DIR`` (a checkout of another version), that version's
   stage two runs on the same donations, interleaved with this one.
3. Donated bytes over output bytes, measured in that run and computed by the dry run
   (``chunkflow.dryrun.summarise``) for other block sizes, against the geometric surface ratio
   ``sum_a overlap_a / block_a``: the fraction of a block within one overlap of its three lower
   faces, the least any exact scheme must move between blocks.

    python benchmarks/bench_stage_two.py [--repeats 5] [--baseline /path/to/old/checkout]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import fire
import numpy as np

from common import ROOT, make_input, run_two_stage, save, scratch, zyx
import chunkflow
from chunkflow import Bbox, Vec
# the dry run's donated bytes for layouts of other block sizes (no volume, no job): not in the API
from chunkflow.dryrun import summarise
from chunkflow.geometry import Layout
from chunkflow.job import default_storage_chunk

BLOCKS = ("32,256,256", "64,512,512", "112,1152,1152", "128,2048,2048")


def add_bandwidth(mib: int, repeats: int = 10, fresh: bool = False) -> float:
    """Bytes of ``b`` added into ``a`` per second (best of ``repeats``); ``fresh``: ``a`` is a new
    ``np.zeros`` each time, so its pages are first touched by the sum, as in stage two."""
    n = mib * 2 ** 20 // 4
    a, b = np.ones(n, dtype=np.float32), np.full(n, 0.5, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        if fresh:
            del a
            t = time.perf_counter()
            a = np.zeros(n, dtype=np.float32)
            a += b
        else:
            t = time.perf_counter()
            a += b
        best = min(best, time.perf_counter() - t)
    return b.nbytes / best


def surface(overlap: Vec, block: Vec) -> float:
    return sum(o / b for o, b in zip(overlap, block))


#: stage two over every block of the job in ``argv[1]``, timed once the volume and store are open. It runs
#: with the chunkflow of ``--baseline`` too, which may predate the public API (``chunkflow.open_job``), and
#: times receive_and_blend itself with one Resources opened beforehand and no markers: internals on purpose.
DRIVER = r"""
import json, sys, time
from chunkflow.planning import load_job
from chunkflow.stages import Resources, Stats
try:
    from chunkflow.stage_two import receive_and_blend
except ImportError:  # versions before stage two had its own module
    from chunkflow.stages import receive_and_blend
job = load_job(sys.argv[1])
res = Resources(job)
res.output, res.store
stats, t = Stats(), time.perf_counter()
for idx in job.layout.block_indices():
    stats.add(receive_and_blend(job, idx, res))
print(json.dumps({"wall": time.perf_counter() - t, "seconds": stats.seconds, "received": stats.donated_bytes}))
"""


def stage_two_once(store: str, checkout: str) -> dict:
    """Stage two over every block in a fresh process importing chunkflow from ``checkout``."""
    env = dict(os.environ, PYTHONPATH=checkout)
    done = subprocess.run([sys.executable, "-c", DRIVER, store], env=env, cwd=checkout, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f}, n={len(values)})"


def main(shape: str | tuple = "64,512,512", patch: str | tuple = "16,128,128", overlap: str | tuple = "4,32,32",
         block: str | tuple = "32,256,256", repeats: int = 5, baseline: str | None = None) -> None:
    """Stage two's blending throughput against numpy's ``a += b``, and donated bytes against geometry.

    Args:
        shape: volume of the real job (identity model), ZYX (64,512,512 or 64x512x512).
        patch: patch, ZYX (also used for the dry-run rows).
        overlap: patch overlap, ZYX (also used for the dry-run rows).
        block: block of the real job, ZYX (the dry-run rows use the fixed BLOCKS).
        repeats: stage-two runs (per version), each after a fresh ``a += b`` measurement.
        baseline: a checkout of another chunkflow version whose stage two runs interleaved with this one.
    """
    shape, patch, overlap, block = (zyx(v, what) for v, what in
                                    ((shape, "shape"), (patch, "patch"), (overlap, "overlap"), (block, "block")))
    bandwidth = {mib: add_bandwidth(mib) for mib in (1, 8, 64)}
    fresh = add_bandwidth(64, fresh=True)
    for mib, bps in bandwidth.items():
        print(f"numpy a += b, {mib:2d} MiB float32: {bps / 2**30:6.2f} GiB/s of b summed")
    print(f"numpy a = zeros(); a += b, 64 MiB (first touch): {fresh / 2**30:6.2f} GiB/s")

    workdir = scratch("cf-bench-s2-")
    url, _ = make_input(workdir, tuple(Vec.parse(shape)), synthetic=False)
    job = chunkflow.plan(url, f"file://{workdir / 'out'}", str(workdir / "job"), "identity", patch, overlap=overlap,
                         block=block, batch_size=4)
    run = run_two_stage(job, read_output=False)
    print(f"stage two over {job.layout.num_blocks} blocks: received {run.stats2.donated_bytes / 2**20:.1f} MiB in "
          f"{run.stats2.donations} pieces (first run, in process: {run.stage2.wall:.3f} s)")

    versions = {"this": str(ROOT)} | ({"baseline": str(baseline)} if baseline else {})
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    for _ in range(repeats):
        for name, checkout in versions.items():
            add, add_fresh = add_bandwidth(64, repeats=5), add_bandwidth(64, repeats=5, fresh=True)
            result = stage_two_once(job.store, checkout)
            blend = result["received"] / result["seconds"]["blend"]
            runs[name].append({**result, "add": add, "add_fresh": add_fresh, "blend_rate": blend,
                               "blend_over_add": blend / add, "blend_over_add_fresh": blend / add_fresh,
                               "load": os.getloadavg()[0]})
    for name, rows in runs.items():
        phases = {k: round(statistics.median(r["seconds"].get(k, 0.0) for r in rows), 4)
                  for k in ("fetch", "verify", "blend", "write")}
        print(f"{name} ({versions[name]}): blend {spread([r['blend_rate'] / 2**30 for r in rows])} GiB/s = "
              f"{spread([r['blend_over_add'] for r in rows])} x numpy a += b (64 MiB, same repetition), "
              f"{spread([r['blend_over_add_fresh'] for r in rows])} x with first touch")
        print(f"  stage two wall {spread([r['wall'] for r in rows])} s; phases (median s) {phases}; "
              f"load {spread([r['load'] for r in rows])}")
    s2 = runs["this"][-1]["seconds"]
    received = run.stats2.donated_bytes
    blend_rate = statistics.median(r["blend_rate"] for r in runs["this"])

    out_bytes = job.layout.bbox.size * job.out_channels * 4
    overlap_v = Vec.parse(overlap)
    measured = run.stats1.donated_bytes / out_bytes
    print(f"this run: donated {run.stats1.donated_bytes / 2**20:.1f} MiB / output {out_bytes / 2**20:.1f} MiB = "
          f"{measured:.3f}; geometric surface ratio {surface(overlap_v, Vec.parse(block)):.3f}")
    rows = []
    for text in BLOCKS:
        row_block = Vec.parse(text)
        volume = row_block * 8
        layout = Layout(Bbox(Vec(0, 0, 0), volume), Vec.parse(patch), overlap_v, row_block,
                        default_storage_chunk(row_block))
        s = summarise(layout)
        voxels = s.output_voxels
        between = s.donated_voxels_between_blocks
        rows.append({"block": list(row_block), "volume": list(volume),
                     "surface": round(surface(overlap_v, row_block), 4),
                     "between_blocks": round(between / voxels, 4),
                     "total": round(s.donated_voxels / voxels, 4),
                     "objects_per_block": round(s.donations / s.blocks, 2)})
        r = rows[-1]
        print(f"  blocks {text:>14s} (8x8x8 of them): surface {r['surface']:.3f}, donated between blocks "
              f"{r['between_blocks']:.3f}, with each block's own band {r['total']:.3f} x the output; "
              f"{r['objects_per_block']:.1f} objects per block")
    record = {"add_bandwidth": {str(k): v for k, v in bandwidth.items()}, "add_bandwidth_fresh_64": fresh,
              "stage2_seconds": s2,
              "stage2_wall": statistics.median(r["wall"] for r in runs["this"]), "received_bytes": received,
              "blend_rate": blend_rate, "repeats": runs, "baseline": baseline,
              "donated_over_output": measured, "surface": surface(overlap_v, Vec.parse(block)),
              "block": block, "rows": rows}
    print(f"recorded in {save('stage_two', record)}")


if __name__ == "__main__":
    fire.Fire(main)
