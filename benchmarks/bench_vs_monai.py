"""chunkflow's two-stage run against MONAI's whole-volume ``sliding_window_inference``.

Same model (the ~1.4 M parameter ``bench_unet.py``), same patch, overlap, gaussian blend and batch
size, same input (a synthetic EM volume, uint8). MONAI gets the whole volume as one in-memory
tensor; chunkflow plans blocks, reads its input from a precomputed volume, writes its output to
one and moves every overlap through the donation store (stage one, barrier, stage two), so its
time includes all of its I/O. Each side runs ``--repeats`` times, interleaved (ours, MONAI, ours,
...), and the fastest run of each is compared (this machine may be shared).

    python benchmarks/bench_vs_monai.py                       # 64x512x512, patch 16x128x128
    python benchmarks/bench_vs_monai.py --shape 32,256,256 --repeats 1

Prints and records (results/vs_monai.json): times (wall and CPU), the model's share, the overhead
outside the model, patches computed vs the grid, the max abs difference of the two outputs,
donated bytes vs output bytes, and where stage one's time went.
"""
from __future__ import annotations

import time

import fire
import numpy as np
import torch

from common import BENCH_NET, Timed, choice, make_input, run_two_stage, save, scratch, zyx
import chunkflow
from chunkflow import Vec
# the model is loaded once, handed to run_two_stage (its load untimed, as MONAI's) and its torch module to
# MONAI: the API loads the job's model itself and does not hand out its backend
from chunkflow.backends import load_backend
from chunkflow.storage import create_volume, open_volume  # MONAI's I/O, timed apart: the API has no volume I/O


class TimedPredictor:
    """MONAI's predictor: the same module, with the model's own time and patch count recorded."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.seconds, self.patches = module, 0.0, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        y = self.module(x)
        self.seconds += time.perf_counter() - started
        self.patches += x.shape[0]
        return y


def run_monai(image: np.ndarray, module: torch.nn.Module, patch: Vec, overlap: Vec, batch: int, blend: str):
    """MONAI on the whole volume in memory; the first call in a process also warms MONAI up untimed."""
    from monai.inferers import sliding_window_inference

    def call(volume: np.ndarray, predictor) -> torch.Tensor:
        x = torch.from_numpy(volume[None, None]).float().div_(255.0)
        return sliding_window_inference(x, roi_size=tuple(patch), sw_batch_size=batch, predictor=predictor,
                                        overlap=tuple(o / p for o, p in zip(overlap, patch)), mode=blend,
                                        sigma_scale=0.125)

    with torch.inference_mode():
        if not getattr(run_monai, "warm", False):
            call(image[tuple(slice(0, p) for p in patch)], module)
            run_monai.warm = True  # type: ignore[attr-defined]
        predictor = TimedPredictor(module)
        with Timed() as t:
            out = call(image, predictor)[0].numpy()
    return t, predictor, out


def monai_io(job, out: np.ndarray) -> Timed:
    """What MONAI's run adds to read its input from the job's precomputed volume and write its output to one."""
    with Timed() as t:
        volume = open_volume(job.input)
        volume.read(volume.bbox)
        target = create_volume(job.output + "_monai", volume.bbox, Vec(job.storage_chunk), out.shape[0], "float32")
        target.write(target.bbox, np.ascontiguousarray(out, dtype=np.float32))
    return t


def main(shape: str | tuple = "64,512,512", patch: str | tuple = "16,128,128", overlap: str | tuple = "4,32,32",
         block: str | tuple = "32,256,256", batch: int = 1, blend: str = "gaussian", repeats: int = 2,
         workdir: str | None = None) -> None:
    """chunkflow's two-stage run against MONAI's whole-volume ``sliding_window_inference``.

    Args:
        shape: volume, ZYX (64,512,512 or 64x512x512): a synthetic EM volume, uint8.
        patch: patch, ZYX.
        overlap: patch overlap, ZYX (MONAI gets it as a fraction of the patch).
        block: chunkflow's block, ZYX.
        batch: patches per forward pass (both tools).
        blend: gaussian or constant (both tools).
        repeats: runs of each tool, interleaved; the fastest of each is compared.
        workdir: keep the volumes, jobs and outputs here (default: a temporary directory, removed).
    """
    shape_text, patch_text, overlap_text, block_text = (
        zyx(v, what) for v, what in ((shape, "shape"), (patch, "patch"), (overlap, "overlap"), (block, "block")))
    batch, repeats, blend = int(batch), int(repeats), choice(blend, ("gaussian", "constant"), "blend")
    shape, patch, overlap = Vec.parse(shape_text), Vec.parse(patch_text), Vec.parse(overlap_text)
    workdir = scratch("cf-bench-monai-", None if workdir is None else str(workdir))
    url, image = make_input(workdir, tuple(shape))
    backend = load_backend(BENCH_NET)
    module = backend.module
    params = sum(p.numel() for p in module.parameters())
    print(f"model {BENCH_NET}: {params:,} parameters; volume {shape_text} uint8; patch {patch_text}, "
          f"overlap {overlap_text}, block {block_text}, batch {batch}, {blend}")

    ours, monai, monai_io_s = [], [], []
    for r in range(repeats):
        job = chunkflow.plan(url, f"file://{workdir / f'out{r}'}", str(workdir / f"job{r}"), BENCH_NET, patch_text,
                             overlap=overlap_text, block=block_text, blend=blend, batch_size=batch)
        run = run_two_stage(job, backend)
        ours.append(run)
        print(f"  ours  #{r}: {run.wall:7.2f} s wall, {run.cpu:7.2f} s CPU, model {run.stats1.seconds['model']:.2f} s"
              f" (load {run.stage2.load:.1f})", flush=True)
        t, pred, monai_out = run_monai(image, module, patch, overlap, batch, blend)
        io = monai_io(job, monai_out)
        monai.append((t, pred))
        monai_io_s.append(io.wall)
        print(f"  MONAI #{r}: {t.wall:7.2f} s wall, {t.cpu:7.2f} s CPU, model {pred.seconds:.2f} s "
              f"(load {t.load:.1f}); reading its input and writing its output would add {io.wall:.2f} s", flush=True)

    best = min(ours, key=lambda x: x.wall)
    mt, mp = min(monai, key=lambda x: x[0].wall)
    layout = job.layout
    s1, s2 = best.stats1, best.stats2
    model = s1.seconds["model"]
    overhead = best.wall - model
    m_overhead = mt.wall - mp.seconds
    diff = float(np.abs(best.output - monai_out).max())
    out_bytes = layout.bbox.size * job.out_channels * 4
    phases1 = {k: round(v, 3) for k, v in s1.seconds.items()}
    phases2 = {k: round(v, 3) for k, v in s2.seconds.items()}
    record = {
        "shape": list(shape), "patch": list(patch), "overlap": list(overlap), "block": list(Vec.parse(block_text)),
        "batch": batch, "blend": blend, "parameters": params, "blocks": layout.num_blocks,
        "ours_wall": [round(r.wall, 3) for r in ours], "ours_cpu": [round(r.cpu, 3) for r in ours],
        "monai_wall": [round(t.wall, 3) for t, _ in monai], "monai_cpu": [round(t.cpu, 3) for t, _ in monai],
        "ours_best": round(best.wall, 3), "ours_stage1": round(best.stage1.wall, 3),
        "ours_stage2": round(best.stage2.wall, 3), "ours_model": round(model, 3),
        "monai_best": round(mt.wall, 3), "monai_model": round(mp.seconds, 3),
        "ratio_wall": round(best.wall / mt.wall, 4), "monai_io": round(min(monai_io_s), 3),
        "ratio_wall_with_io": round(best.wall / (mt.wall + min(monai_io_s)), 4),
        "ratio_cpu": round(min(r.cpu for r in ours) / min(t.cpu for t, _ in monai), 4),
        "overhead_over_model": round(overhead / model, 4), "ours_overhead": round(overhead, 3),
        "monai_overhead": round(m_overhead, 3), "monai_overhead_over_model": round(m_overhead / mp.seconds, 4),
        "patches_computed": s1.patches, "patches_grid": layout.num_patches, "monai_patches": mp.patches,
        "redundancy": s1.patches / layout.num_patches, "max_abs_diff_vs_monai": diff,
        "donated_bytes": s1.donated_bytes, "donations": s1.donations, "output_bytes": out_bytes,
        "stage1_phases": phases1, "stage2_phases": phases2,
    }
    print(f"ours (two stages, best of {repeats}): {best.wall:.2f} s  = stage one {best.stage1.wall:.2f} s + "
          f"stage two {best.stage2.wall:.2f} s; model {model:.2f} s; overhead outside the model "
          f"{overhead:.2f} s = {100 * overhead / model:.1f}% of the model")
    print(f"MONAI whole volume (best of {repeats}): {mt.wall:.2f} s; model {mp.seconds:.2f} s; overhead "
          f"{m_overhead:.2f} s = {100 * m_overhead / mp.seconds:.1f}% of the model")
    print(f"ratio ours / MONAI: {record['ratio_wall']:.3f} wall, {record['ratio_cpu']:.3f} CPU; "
          f"{record['ratio_wall_with_io']:.3f} if MONAI also read and wrote the volumes (+{min(monai_io_s):.2f} s)")
    m = min(model, mp.seconds)
    print(f"at equal model time ({m:.2f} s, the faster of the two): ours {m + overhead:.2f} s vs MONAI "
          f"{m + m_overhead:.2f} s = {(m + overhead) / (m + m_overhead):.4f}")
    print(f"patches computed / patches in the grid: {s1.patches} / {layout.num_patches} = "
          f"{s1.patches / layout.num_patches:.3f} (MONAI ran {mp.patches})")
    print(f"max |ours - MONAI| = {diff:.2e}")
    print(f"donated {s1.donated_bytes / 2**20:.1f} MiB in {s1.donations} pieces = "
          f"{s1.donated_bytes / out_bytes:.3f} x the output ({out_bytes / 2**20:.1f} MiB)")
    print(f"stage one phases (s): {phases1}")
    print(f"stage two phases (s): {phases2}")
    print(f"recorded in {save('vs_monai', record)}")


if __name__ == "__main__":
    fire.Fire(main)
