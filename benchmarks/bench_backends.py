"""The three model backends side by side on the benchmark U-Net: PyTorch eager, TorchScript, ONNX Runtime.

The net of ``bench_unet.py`` is traced to TorchScript and exported to ONNX (dynamic batch and
spatial axes, the exporter the demo net uses); each backend is loaded through
``chunkflow.backends.load_backend`` exactly as a job would, and runs the same synthetic EM
patches. Reported per backend and batch size: seconds per 16x128x128 patch (best of
``--repeats`` batches after one warm-up) and the max abs difference to PyTorch eager.

    python benchmarks/bench_backends.py
"""
from __future__ import annotations

import time

import fire
import numpy as np
import torch

from common import BENCH_NET, save, scratch, zyx
# the model backends themselves are what this measures (load_backend's predict on each): not in the API
from chunkflow.backends import load_backend
from chunkflow.demo import make_em_volume
from chunkflow.demo.train import export_onnx


def per_patch(backend, batch: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    out = backend.predict(batch)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        backend.predict(batch)
        best = min(best, time.perf_counter() - t)
    return best / len(batch), out


def main(patch: str | tuple = "16,128,128", repeats: int = 3) -> None:
    """The three model backends side by side on the benchmark U-Net: PyTorch eager, TorchScript, ONNX Runtime.

    Args:
        patch: patch, ZYX (16,128,128 or 16x128x128); batches of 1 and 4 such patches.
        repeats: timed batches per backend and batch size (best one kept), after one warm-up.
    """
    patch = tuple(int(v) for v in zyx(patch, "patch").split(","))
    repeats = int(repeats)
    workdir = scratch("cf-bench-backends-")
    eager = load_backend(BENCH_NET)
    ts_path, onnx_path = workdir / "bench_unet.ts", workdir / "bench_unet.onnx"
    with torch.inference_mode():
        torch.jit.trace(eager.module, torch.rand(1, 1, *patch)).save(str(ts_path))
    export_onnx(eager.module, onnx_path)
    backends = {"pytorch": eager, "torchscript": load_backend(str(ts_path)), "onnx": load_backend(str(onnx_path))}
    image, _ = make_em_volume((patch[0], 2 * patch[1], 2 * patch[2]), seed=5)
    tiles = [image[:, y:y + patch[1], x:x + patch[2]] for y in (0, patch[1]) for x in (0, patch[2])]
    rows = []
    for batch_size in (1, 4):
        batch = np.stack(tiles[:batch_size])[:, None].astype(np.float32) / 255
        reference = None
        for name, backend in backends.items():
            seconds, out = per_patch(backend, batch, repeats)
            reference = out if reference is None else reference
            diff = float(np.abs(out - reference).max())
            rows.append({"backend": name, "batch": batch_size, "seconds_per_patch": round(seconds, 4),
                         "max_abs_diff_vs_pytorch": diff})
            print(f"  {name:12s} batch {batch_size}: {seconds:.3f} s per patch, max |diff| vs PyTorch {diff:.1e}",
                  flush=True)
    print(f"recorded in {save('backends', {'patch': list(patch), 'rows': rows})}")


if __name__ == "__main__":
    fire.Fire(main)
