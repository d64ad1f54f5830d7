"""Peak memory of one stage-one task against its buffers.

Each case runs in a fresh process: plan a job, load the model, then run stage one for one
interior block (its chunk reaches into its neighbours, so it donates) while ``tracemalloc``
follows every numpy allocation and a thread samples the process's resident set (its growth over
the value before the task is reported; torch's memory shows only there). The buffers
the design budgets for are the input chunk (stored dtype, grown by the context margin), the
float32 output chunk, one batch of input and output patches, and the model's weights and
activations (not seen by tracemalloc; they show in the resident set).

    python benchmarks/bench_memory.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import fire
import psutil

from common import BENCH_NET, HERE, make_input, save, scratch

CASES = [  # model, volume, patch, overlap, block, batch: the block measured is (1, 1, 1), an interior one
    ("identity", "144,1152,1152", "16,128,128", "4,32,32", "48,384,384", 4),
    (BENCH_NET, "96,768,768", "16,128,128", "4,32,32", "32,256,256", 1),
    (BENCH_NET, "96,768,768", "16,128,128", "4,32,32", "32,256,256", 4),
]


class RssSampler:
    """The process's resident set, sampled every millisecond while the block runs."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "RssSampler":
        self.before = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(url: str, model: str, shape: str, patch: str, overlap: str, block: str, batch: int) -> dict:
    """Runs in the child process (the input volume was made by the parent, so its memory is not here)."""
    import chunkflow
    from chunkflow import Vec
    # the peak of one stage-one task alone: Resources (model, volumes, store) opened before the
    # sampler starts, the stage function called without the task path's markers; the API's
    # inference_and_donate opens them inside the task, and their memory would count
    from chunkflow.stages import Resources, inference_and_donate

    workdir = scratch("cf-bench-mem-")
    job = chunkflow.plan(url, f"file://{workdir / 'out'}", str(workdir / "job"), model, patch, overlap=overlap,
                         block=block, batch_size=batch)
    res = Resources(job)
    res.backend, res.input, res.output, res.store, res.weight_sum  # opened once per worker, not per task
    layout = job.layout
    idx = Vec(1, 1, 1)
    chunk = layout.chunk_box(idx)
    sampler = RssSampler()
    tracemalloc.start()
    with sampler:
        stats = inference_and_donate(job, idx, res)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    context = job.context_margin
    in_bytes = (chunk.grow(context).size * job.in_channels * res.input.dtype.itemsize)
    out_bytes = chunk.size * job.out_channels * 4
    batch_bytes = batch * 4 * (job.in_channels * Vec(job.input_patch).prod() + job.out_channels * layout.patch.prod())
    params = sum(p.numel() * p.element_size() for p in getattr(res.backend, "module", None).parameters()) \
        if hasattr(res.backend, "module") else 0
    return {"model": Path(model).name, "block": block, "batch": batch, "chunk": list(chunk.shape),
            "input_chunk": in_bytes, "output_chunk": out_bytes, "batch_bytes": batch_bytes, "model_params": params,
            "buffers": in_bytes + out_bytes + batch_bytes, "tracemalloc_peak": peak,
            "rss_peak_growth": sampler.peak - sampler.before, "rss_before": sampler.before,
            "donated_bytes": stats.donated_bytes, "patches": stats.patches}


def child(case: str) -> None:
    """In the child process: measure one case (a JSON list of ``measure``'s arguments), print one JSON line."""
    print(json.dumps(measure(*json.loads(case))))


def main() -> None:
    """Peak memory of one stage-one task against its buffers, for each of ``CASES`` (no flags).

    Each case runs in a fresh process (this script with ``--child JSON``, an internal entry point
    taken before Fire sees the command line).
    """
    rows, inputs = [], {}
    for case in CASES:
        shape = case[1]
        if shape not in inputs:
            workdir = scratch("cf-bench-mem-in-")
            inputs[shape], _ = make_input(workdir, tuple(int(v) for v in shape.split(",")), synthetic=False)
        done = subprocess.run([sys.executable, str(HERE / "bench_memory.py"), "--child",
                               json.dumps([inputs[shape], *case])],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        mib = 2 ** 20
        print(f"{row['model']:>14s} block {row['block']:>12s} batch {row['batch']}: chunk {row['chunk']}; "
              f"buffers {row['buffers'] / mib:7.1f} MiB (input {row['input_chunk'] / mib:.1f} + output "
              f"{row['output_chunk'] / mib:.1f} + batch {row['batch_bytes'] / mib:.1f}); numpy peak "
              f"{row['tracemalloc_peak'] / mib:7.1f} MiB = {row['tracemalloc_peak'] / row['buffers']:.2f} x buffers; "
              f"RSS grew {row['rss_peak_growth'] / mib:7.1f} MiB during the task "
              f"(model weights {row['model_params'] / mib:.1f} MiB)", flush=True)
    print(f"recorded in {save('memory', {'rows': rows})}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":  # internal: one case, in a fresh process
        child(sys.argv[2])
    else:
        fire.Fire(main)
