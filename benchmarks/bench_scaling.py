"""Scaling with volume size: chunkflow's two stages against MONAI, and the pipeline's own overhead.

Two models, patch 16x128x128, overlap 4x32x32, blocks 32x256x256, gaussian blend, batch 1:

- ``builtin:membrane`` (the demo U-Net, PyTorch): total time of ours (two stages, all I/O) and of
  MONAI's whole-volume ``sliding_window_inference``, per volume size;
- ``identity``: the model costs nothing, so the time is all overhead (reading, gathering,
  blending, normalising, writing, donating, stage two); MONAI runs with an identity predictor
  too. Divided by the voxels, this is what the pipeline adds per voxel on any device.

    python benchmarks/bench_scaling.py            # ~5 minutes on 2 cores
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import fire
import torch

from bench_vs_monai import run_monai
from common import make_input, run_two_stage, save, zyx, zyx_list
import chunkflow
from chunkflow import Vec
# the model is loaded once and handed to run_two_stage (its load is not timed) and its torch module to
# MONAI: the API loads the job's model itself and does not hand out its backend
from chunkflow.backends import load_backend

NET_SIZES = ("16,256,256", "32,256,256", "32,512,512", "64,512,512")
IDENTITY_SIZES = ("32,256,256", "64,512,512", "64,1024,1024", "128,1024,1024")


def one(workdir: Path, shape: Vec, model: str, module: torch.nn.Module, patch: str, overlap: str,
        block: str) -> dict:
    url, image = make_input(workdir, tuple(shape))
    job = chunkflow.plan(url, f"file://{workdir / 'out'}", str(workdir / "job"), model, patch, overlap=overlap,
                         block=block, blend="gaussian", batch_size=1)
    backend = load_backend(model)
    ours = run_two_stage(job, backend, read_output=False)
    del ours.output
    t, pred, _ = run_monai(image, module, Vec.parse(patch), Vec.parse(overlap), 1, "gaussian")
    row = {"model": model, "shape": list(shape), "voxels": shape.prod(), "blocks": job.layout.num_blocks,
           "patches": job.layout.num_patches, "ours": round(ours.wall, 3), "ours_cpu": round(ours.cpu, 3),
           "ours_model": round(ours.stats1.seconds.get("model", 0.0), 3), "ours_stage2": round(ours.stage2.wall, 3),
           "monai": round(t.wall, 3), "monai_cpu": round(t.cpu, 3), "monai_model": round(pred.seconds, 3),
           "phases": {k: round(v, 4) for k, v in ours.stats1.seconds.items()}}
    print(f"  {model:18s} {args_shape(shape):>14s}: ours {ours.wall:7.2f} s (model {row['ours_model']:.2f}), "
          f"MONAI {t.wall:7.2f} s (model {pred.seconds:.2f})  load {t.load:.1f}", flush=True)
    return row


def args_shape(shape: Vec) -> str:
    return "x".join(map(str, shape))


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def main(patch: str | tuple = "16,128,128", overlap: str | tuple = "4,32,32", block: str | tuple = "32,256,256",
         net_sizes: str | tuple = ";".join(NET_SIZES), identity_sizes: str | tuple = ";".join(IDENTITY_SIZES)) -> None:
    """Scaling with volume size: chunkflow's two stages against MONAI, and the pipeline's own overhead.

    Args:
        patch: patch, ZYX (16,128,128 or 16x128x128).
        overlap: patch overlap, ZYX.
        block: block, ZYX.
        net_sizes: volumes for the demo U-Net, ZYX, separated by ';' (quote them; "" runs none).
        identity_sizes: volumes for the identity model, ZYX, separated by ';' (quote them; "" runs none).
    """
    patch, overlap, block = zyx(patch, "patch"), zyx(overlap, "overlap"), zyx(block, "block")
    rows = []
    net = load_backend("builtin:membrane").module
    cases = (("identity", Identity(), zyx_list(identity_sizes, "identity sizes")),
             ("builtin:membrane", net, zyx_list(net_sizes, "net sizes")))
    for model, module, sizes in cases:
        for text in sizes:
            with tempfile.TemporaryDirectory(prefix="cf-bench-scale-") as tmp:
                rows.append(one(Path(tmp), Vec.parse(text), model, module, patch, overlap, block))
    for r in rows:
        r["ours_ns_per_voxel"] = round(1e9 * (r["ours"] - r["ours_model"]) / r["voxels"], 2)
        r["monai_ns_per_voxel"] = round(1e9 * (r["monai"] - r["monai_model"]) / r["voxels"], 2)
    print(f"{'model':18s} {'volume':>14s} {'ours s':>8s} {'MONAI s':>8s} {'ratio':>6s} "
          f"{'ours overhead ns/vx':>20s} {'MONAI overhead ns/vx':>21s}")
    for r in rows:
        print(f"{r['model']:18s} {'x'.join(map(str, r['shape'])):>14s} {r['ours']:8.2f} {r['monai']:8.2f} "
              f"{r['ours'] / r['monai']:6.3f} {r['ours_ns_per_voxel']:20.1f} {r['monai_ns_per_voxel']:21.1f}")
    record = {"patch": patch, "overlap": overlap, "block": block, "rows": rows}
    print(f"recorded in {save('scaling', record)}")


if __name__ == "__main__":
    fire.Fire(main)
