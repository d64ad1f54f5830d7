"""Streaming against barrier order on the Dask engine: when do blocks become final, and the total.

In barrier order no block is final before the last stage-one task ends; in streaming order a
block's stage two runs as soon as its donors' stage one is done (``Layout.dependencies``), so
final blocks appear while inference still runs elsewhere. Both orders run on the same
LocalCluster, on two copies of the same job, ``--repeats`` times interleaved (barrier,
streaming, barrier, ...); the medians are compared, and the two outputs must be identical.

    python benchmarks/streaming_vs_barrier.py                                   # 32x256x256, U-Net
    python benchmarks/streaming_vs_barrier.py --shape 16,128,128 --workers 2 --repeats 1

Prints, per order: seconds until the first block is final, until half the blocks are, until all
are (the total); and streaming / barrier ratios of each.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.demo.synthetic import make_em_volume
from chunkflow.engines import make_engine, run_job
from chunkflow.planning import plan
from chunkflow.storage import create_volume, open_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,256,256", help="volume, ZYX")
    parser.add_argument("--block", default="16,64,64", help="block, ZYX")
    parser.add_argument("--patch", default="16,64,64", help="input (= output) patch, ZYX")
    parser.add_argument("--overlap", default="4,16,16", help="patch overlap, ZYX")
    parser.add_argument("--model", default="builtin:membrane", help="any chunkflow model string")
    parser.add_argument("--workers", type=int, default=None, help="Dask workers (default: one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cf-streaming-") as tmp:
        work = Path(tmp)
        shape = Vec.parse(args.shape)
        image, _ = make_em_volume(tuple(shape), seed=3)
        source = create_volume(f"file://{work / 'input'}", Bbox(Vec(0, 0, 0), shape), Vec(16, 64, 64), 1, "uint8")
        source.write(source.bbox, image[None])
        jobs = {mode: plan(f"file://{work / 'input'}", f"file://{work / mode}", str(work / f"{mode}.job"), args.model,
                           args.patch, overlap=args.overlap, block=args.block)
                for mode in ("barrier", "streaming")}
        engine = make_engine("dask", workers=args.workers)
        workers = len(engine.client.scheduler_info()["workers"])
        try:
            run_job(jobs["barrier"], engine, force=True, progress=False)  # warm up: workers load the model
            results: dict[str, list[tuple[float, float, float]]] = {"barrier": [], "streaming": []}
            for _ in range(args.repeats):
                for mode, job in jobs.items():
                    summary = run_job(job, engine, force=True, progress=False, mode=mode)
                    finals = summary.final_times
                    results[mode].append((finals[0], finals[len(finals) // 2], summary.seconds))
        finally:
            engine.close()
        job = jobs["barrier"]
        same = np.array_equal(open_volume(job.output).read(job.layout.bbox),
                              open_volume(jobs["streaming"].output).read(job.layout.bbox))

    median = {mode: [statistics.median(r[i] for r in runs) for i in range(3)] for mode, runs in results.items()}
    print(f"{job.layout.num_blocks} blocks of {args.block} over {args.shape}, model {args.model}, "
          f"{workers} Dask workers, median of {args.repeats}")
    print(f"{'':<11}{'first final':>13}{'half final':>13}{'all final':>12}")
    for mode, (first, half, total) in median.items():
        print(f"{mode:<11}{first:>12.2f}s{half:>12.2f}s{total:>11.2f}s")
    b, s = median["barrier"], median["streaming"]
    print(f"{'ratio':<11}{s[0] / b[0]:>13.2f}{s[1] / b[1]:>13.2f}{s[2] / b[2]:>12.2f}   (streaming / barrier)")
    print(f"outputs identical: {same}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
