"""Streaming against barrier order: when do blocks become final, and the total, above the noise.

In barrier order no block is final before the last stage-one task ends; in streaming order a
block's stage two runs as soon as its donors' stage one is done (``Layout.dependencies``), so
final blocks appear while inference still runs elsewhere. Both orders run on the same engine
(the local engine with ``--slots`` task slots, or a Dask LocalCluster), on two copies of the
same job, ``--repeats`` interleaved pairs (the order inside a pair alternates, so a drift in the
machine's load hits both alike); per order the median and spread (min-max) of the total time
and of the time the first block became final, and the median of the per-pair ratios (with a 95 %
bootstrap interval over the pairs), are compared. The two outputs must be identical.

    python benchmarks/streaming_vs_barrier.py                                   # local engine, 5 pairs
    python benchmarks/streaming_vs_barrier.py --engine dask --workers 2
    python benchmarks/streaming_vs_barrier.py --device cuda --shape 64,512,512 --block 32,128,128

Records every run, the medians, spreads, ratios, the identity check and the 1-minute load average
(before, sampled during, after) in ``results/streaming_vs_barrier.json``.
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

from common import save, zyx  # first: it puts this checkout on sys.path
import chunkflow
from chunkflow import Bbox, Vec
from chunkflow.demo.synthetic import make_em_volume
# one engine, started once (a Dask cluster's start-up, the model's loading) and kept across every
# timed run, and the local engine's --slots: chunkflow.run starts and stops an engine per call and
# always runs the local engine with its default slots, so the runs go through run_job directly
from chunkflow.engines import LocalEngine, make_engine, run_job
from chunkflow.storage import create_volume, open_volume  # the input volume, and the outputs compared


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


def spread(values: list[float]) -> dict:
    """Median, min and max of ``values``."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def median_interval(ratios: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median of ``ratios`` (the pairs resampled with replacement):
    whether a claim such as "streaming total <= 1.03 x barrier" holds above the pairs' noise."""
    values = np.asarray(ratios, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(draws, len(values)))
    medians = np.median(values[picks], axis=1)
    return float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def main(shape: str | tuple = "32,256,256", block: str | tuple = "16,64,64", patch: str | tuple = "16,64,64",
         overlap: str | tuple = "4,16,16", model: str = "builtin:membrane", engine: str = "local", slots: int = 2,
         workers: int | None = None, repeats: int = 5, device: str = "cpu") -> None:
    """Streaming against barrier order: when do blocks become final, and the total.

    Args:
        shape: volume, ZYX (16,128,128 or 16x128x128).
        block: block, ZYX.
        patch: input (= output) patch, ZYX.
        overlap: patch overlap, ZYX.
        model: any chunkflow model string.
        engine: local or dask.
        slots: task slots of the local engine.
        workers: Dask workers (default: one per core).
        repeats: interleaved pairs of runs (barrier and streaming); medians and spreads are compared.
        device: cpu or cuda (the local engine; a Dask LocalCluster pins one GPU per worker).
    """
    shape, block, patch, overlap = (zyx(v, what) for v, what in
                                    ((shape, "shape"), (block, "block"), (patch, "patch"), (overlap, "overlap")))
    model, repeats, slots = str(model), int(repeats), int(slots)
    workers = None if workers is None else int(workers)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cf-streaming-") as tmp:
        work = Path(tmp)
        size = Vec.parse(shape)
        image, _ = make_em_volume(tuple(size), seed=3)
        source = create_volume(f"file://{work / 'input'}", Bbox(Vec(0, 0, 0), size), Vec(16, 64, 64), 1, "uint8")
        source.write(source.bbox, image[None])
        jobs = {mode: chunkflow.plan(f"file://{work / 'input'}", f"file://{work / mode}", str(work / f"{mode}.job"),
                                     model, patch, overlap=overlap, block=block, device=device)
                for mode in ("barrier", "streaming")}
        running = LocalEngine(slots) if engine == "local" else make_engine(
            "dask", workers=workers, gpu=device.startswith("cuda"))
        label = f"local engine, {slots} slots" if engine == "local" else \
            f"Dask, {len(running.client.scheduler_info()['workers'])} workers of 2 threads"
        try:
            run_job(jobs["barrier"], running, force=True, progress=False)  # warm up: the model is loaded
            results: dict[str, list[tuple[float, float, float]]] = {"barrier": [], "streaming": []}
            with LoadSampler() as load:
                for pair in range(repeats):
                    for mode in (("barrier", "streaming") if pair % 2 == 0 else ("streaming", "barrier")):
                        summary = run_job(jobs[mode], running, force=True, progress=False, mode=mode)
                        finals = summary.final_times
                        results[mode].append((finals[0], finals[len(finals) // 2], summary.seconds))
                        print(f"  {mode:<10} first {finals[0]:.2f} s, half {finals[len(finals) // 2]:.2f} s, "
                              f"all {summary.seconds:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
        finally:
            running.close()
        job = jobs["barrier"]
        same = np.array_equal(open_volume(job.output).read(job.layout.bbox),
                              open_volume(jobs["streaming"].output).read(job.layout.bbox))

    names = ("first_final", "half_final", "all_final")
    spreads = {mode: {name: spread([r[i] for r in runs]) for i, name in enumerate(names)}
               for mode, runs in results.items()}
    ratios = {name: [s[i] / b[i] for b, s in zip(results["barrier"], results["streaming"])]
              for i, name in enumerate(names)}
    print(f"{job.layout.num_blocks} blocks of {block} over {shape}, model {model} on {device}, {label}, "
          f"{repeats} interleaved pairs")
    print(f"{'':<11}{'first final: median (min-max)':>32}{'all final: median (min-max)':>32}")
    for mode, spr in spreads.items():
        first, total = spr["first_final"], spr["all_final"]
        print(f"{mode:<11}{first['median']:>14.2f} s ({first['min']:.2f}-{first['max']:.2f}){'':>2}"
              f"{total['median']:>14.2f} s ({total['min']:.2f}-{total['max']:.2f})")
    for name in ("first_final", "all_final"):
        r = ratios[name]
        low, high = median_interval(r)
        print(f"streaming / barrier, {name}: median of pairs {statistics.median(r):.3f} "
              f"(95 % bootstrap interval {low:.3f}-{high:.3f}; min {min(r):.3f}, max {max(r):.3f}); ratio of medians "
              f"{spreads['streaming'][name]['median'] / spreads['barrier'][name]['median']:.3f}")
    print(f"outputs identical: {same}")
    load_after = os.getloadavg()[0]
    during = load.samples or [load_after]
    print(f"1-minute load average: {load_before:.2f} before; during the runs {min(during):.2f}-{max(during):.2f} "
          f"(mean {statistics.fmean(during):.2f}, {len(during)} samples); {load_after:.2f} after")
    record = {
        "shape": shape, "block": block, "patch": patch, "overlap": overlap, "model": model, "device": device,
        "engine": engine, "slots": slots if engine == "local" else None, "workers": workers, "repeats": repeats,
        "blocks": job.layout.num_blocks,
        "runs": {mode: [dict(zip(names, (round(v, 3) for v in r))) for r in runs] for mode, runs in results.items()},
        "spread": spreads,
        "ratio_streaming_over_barrier": {name: {**spread(r), "median_95": [round(v, 3) for v in median_interval(r)]}
                                         for name, r in ratios.items()},
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
