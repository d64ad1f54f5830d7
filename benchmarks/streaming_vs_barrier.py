"""Streaming against barrier order on the Dask engine: when do blocks become final, and the total.

In barrier order no block is final before the last stage-one task ends; in streaming order a
block's stage two runs as soon as its donors' stage one is done (``Layout.dependencies``), so
final blocks appear while inference still runs elsewhere. Both orders run on the same
LocalCluster, on two copies of the same job, ``--repeats`` times interleaved (barrier,
streaming, barrier, ...); the medians are compared, and the two outputs must be identical.

    python benchmarks/streaming_vs_barrier.py                                   # 32x256x256, U-Net
    python benchmarks/streaming_vs_barrier.py --shape 16,128,128 --workers 2 --repeats 1

Prints, per order: seconds until the first block is final, until half the blocks are, until all
are (the total); and streaming / barrier ratios of each. Records every run, the medians, the
ratios, the identity check and the 1-minute load average (before, sampled during, after) in
``results/streaming_vs_barrier.json``.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import fire
import numpy as np

from common import save, zyx
from chunkflow.bbox import Bbox, Vec
from chunkflow.demo.synthetic import make_em_volume
from chunkflow.engines import make_engine, run_job
from chunkflow.planning import plan
from chunkflow.storage import create_volume, open_volume


class LoadSampler:
    """The 1-minute load average (``/proc/loadavg``), sampled every ``every`` seconds while the runs go."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(shape: str | tuple = "32,256,256", block: str | tuple = "16,64,64", patch: str | tuple = "16,64,64",
         overlap: str | tuple = "4,16,16",
         model: str = "builtin:membrane", workers: int | None = None, repeats: int = 3) -> None:
    """Streaming against barrier order on the Dask engine: when do blocks become final, and the total.

    Args:
        shape: volume, ZYX (16,128,128 or 16x128x128).
        block: block, ZYX.
        patch: input (= output) patch, ZYX.
        overlap: patch overlap, ZYX.
        model: any chunkflow model string.
        workers: Dask workers (default: one per core).
        repeats: interleaved runs of each order; the medians are compared.
    """
    shape, block, patch, overlap = (zyx(v, what) for v, what in
                                    ((shape, "shape"), (block, "block"), (patch, "patch"), (overlap, "overlap")))
    model, repeats = str(model), int(repeats)
    workers = None if workers is None else int(workers)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cf-streaming-") as tmp:
        work = Path(tmp)
        size = Vec.parse(shape)
        image, _ = make_em_volume(tuple(size), seed=3)
        source = create_volume(f"file://{work / 'input'}", Bbox(Vec(0, 0, 0), size), Vec(16, 64, 64), 1, "uint8")
        source.write(source.bbox, image[None])
        jobs = {mode: plan(f"file://{work / 'input'}", f"file://{work / mode}", str(work / f"{mode}.job"), model,
                           patch, overlap=overlap, block=block)
                for mode in ("barrier", "streaming")}
        engine = make_engine("dask", workers=workers)
        workers = len(engine.client.scheduler_info()["workers"])
        try:
            run_job(jobs["barrier"], engine, force=True, progress=False)  # warm up: workers load the model
            results: dict[str, list[tuple[float, float, float]]] = {"barrier": [], "streaming": []}
            with LoadSampler() as load:
                for _ in range(repeats):
                    for mode, job in jobs.items():
                        summary = run_job(job, engine, force=True, progress=False, mode=mode)
                        finals = summary.final_times
                        results[mode].append((finals[0], finals[len(finals) // 2], summary.seconds))
                        print(f"  {mode:<10} first {finals[0]:.2f} s, half {finals[len(finals) // 2]:.2f} s, "
                              f"all {summary.seconds:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
        finally:
            engine.close()
        job = jobs["barrier"]
        same = np.array_equal(open_volume(job.output).read(job.layout.bbox),
                              open_volume(jobs["streaming"].output).read(job.layout.bbox))

    median = {mode: [statistics.median(r[i] for r in runs) for i in range(3)] for mode, runs in results.items()}
    print(f"{job.layout.num_blocks} blocks of {block} over {shape}, model {model}, "
          f"{workers} Dask workers, median of {repeats}")
    print(f"{'':<11}{'first final':>13}{'half final':>13}{'all final':>12}")
    for mode, (first, half, total) in median.items():
        print(f"{mode:<11}{first:>12.2f}s{half:>12.2f}s{total:>11.2f}s")
    b, s = median["barrier"], median["streaming"]
    print(f"{'ratio':<11}{s[0] / b[0]:>13.2f}{s[1] / b[1]:>13.2f}{s[2] / b[2]:>12.2f}   (streaming / barrier)")
    print(f"outputs identical: {same}")
    load_after = os.getloadavg()[0]
    during = load.samples or [load_after]
    print(f"1-minute load average: {load_before:.2f} before; during the runs {min(during):.2f}-{max(during):.2f} "
          f"(mean {statistics.fmean(during):.2f}, {len(during)} samples); {load_after:.2f} after "
          f"(it includes this benchmark's own {workers} workers)")
    names = ("first_final", "half_final", "all_final")
    record = {
        "shape": shape, "block": block, "patch": patch, "overlap": overlap, "model": model,
        "workers": workers, "repeats": repeats, "blocks": job.layout.num_blocks,
        "runs": {mode: [dict(zip(names, (round(v, 3) for v in r))) for r in runs] for mode, runs in results.items()},
        "median": {mode: dict(zip(names, (round(v, 3) for v in m))) for mode, m in median.items()},
        "ratio_streaming_over_barrier": dict(zip(names, (round(s[i] / b[i], 4) for i in range(3)))),
        "outputs_identical": bool(same),
        "load_before": load_before, "load_after": load_after,
        "load_during": {"min": min(during), "max": max(during), "mean": round(statistics.fmean(during), 2),
                        "samples": len(during)},
    }
    print(f"recorded in {save('streaming_vs_barrier', record)}")


if __name__ == "__main__":
    started = time.perf_counter()
    fire.Fire(main)
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
