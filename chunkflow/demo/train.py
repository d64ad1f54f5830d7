"""Fit the demo membrane U-Net on synthetic EM and ship its weights.

Run ``python -m chunkflow.demo.train`` (a few minutes on a laptop CPU). It:

1. makes a few synthetic volumes (seeds 1000+, never the demo's seed 0 nor the held-out seed),
2. trains :class:`~chunkflow.demo.unet.MembraneUNet` with binary cross-entropy on random patches
   (with flips/transposes in the xy plane for augmentation) under a wall-clock budget,
3. reports AUC and best F1 of membrane detection on a held-out synthetic volume,
4. saves the state dict to ``chunkflow/demo/membrane_unet.pt`` and exports the ONNX model to
   ``chunkflow/demo/membrane_unet.onnx`` (dynamic batch *and* spatial axes, so any patch size works).

Why a script and not a fixture: the weights are part of the package (``builtin:membrane``), so they
must be reproducible by anyone; this is the recipe.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import fire
import numpy as np
import torch
from torch import nn

from chunkflow.demo.synthetic import make_em_volume
from chunkflow.demo.unet import MembraneUNet, build_model

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent
HELD_OUT_SEED = 4242
ONNX_OPSET = 17


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (Mann-Whitney U), no sklearn needed."""
    scores = scores.ravel().astype(np.float64)
    labels = labels.ravel().astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties so that a constant score gives exactly 0.5
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first, counts):
        if c > 1:
            ranks[order[f:f + c]] = f + (c + 1) / 2.0
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_f1(scores: np.ndarray, labels: np.ndarray, thresholds: int = 50) -> tuple[float, float]:
    """Best F1 over evenly spaced thresholds in (0, 1); returns (f1, threshold)."""
    scores = scores.ravel()
    labels = labels.ravel().astype(bool)
    best = (0.0, 0.5)
    for t in np.linspace(0.02, 0.98, thresholds):
        pred = scores >= t
        tp = float(np.count_nonzero(pred & labels))
        fp = float(np.count_nonzero(pred & ~labels))
        fn = float(np.count_nonzero(~pred & labels))
        f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
        if f1 > best[0]:
            best = (f1, float(t))
    return best


def predict_volume(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Whole-volume membrane probability (the net is fully convolutional; small volumes only)."""
    model.eval()
    with torch.inference_mode():
        x = torch.from_numpy(image.astype(np.float32) / 255.0)[None, None]
        return model(x)[0, 0].numpy()


def evaluate(model: nn.Module, shape: tuple[int, int, int] = (32, 192, 192)) -> dict[str, float]:
    """AUC, best F1 and mean probabilities on a held-out synthetic volume."""
    image, mask = make_em_volume(shape, seed=HELD_OUT_SEED)
    prob = predict_volume(model, image)
    f1, thr = best_f1(prob, mask)
    return {
        "auc": roc_auc(prob, mask),
        "f1": f1,
        "threshold": thr,
        "f1_at_0.5": _f1_at(prob, mask, 0.5),
        "mean_prob_membrane": float(prob[mask].mean()),
        "mean_prob_other": float(prob[~mask].mean()),
    }


def _f1_at(prob: np.ndarray, mask: np.ndarray, t: float) -> float:
    pred = prob >= t
    tp = np.count_nonzero(pred & mask)
    return float(2 * tp / max(2 * tp + np.count_nonzero(pred & ~mask) + np.count_nonzero(~pred & mask), 1))


def _random_batch(
    volumes: list[tuple[np.ndarray, np.ndarray]], patch: tuple[int, int, int], batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(batch):
        image, mask = volumes[int(rng.integers(len(volumes)))]
        o = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, patch)]
        sl = tuple(slice(a, a + p) for a, p in zip(o, patch))
        x = image[sl].astype(np.float32) / 255.0
        y = mask[sl].astype(np.float32)
        # augmentation that respects anisotropy: flips on every axis, transpose of y and x
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        if rng.random() < 0.5:
            x, y = x.transpose(0, 2, 1), y.transpose(0, 2, 1)
        # a random brightness/contrast change so the net does not latch on absolute grey levels
        x = np.clip((x - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05), 0.0, 1.0)
        xs.append(np.ascontiguousarray(x)[None])
        ys.append(np.ascontiguousarray(y)[None])
    return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).float()


def train(
    seconds: float = 150.0,
    patch: tuple[int, int, int] = (16, 64, 64),
    batch: int = 4,
    volumes: int = 3,
    lr: float = 3e-3,
    seed: int = 0,
) -> MembraneUNet:
    """Train from scratch for ``seconds`` of wall-clock time and return the model (in eval mode)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = [make_em_volume((48, 192, 192), seed=1000 + i) for i in range(volumes)]
    model = build_model()
    assert isinstance(model, MembraneUNet)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # membranes are ~7% of voxels: weight them up so the net does not settle on "all cytoplasm"
    frac = float(np.mean([m.mean() for _, m in data]))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1.0 - frac) / frac / 2.0))
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < seconds:
        x, y = _random_batch(data, patch, batch, rng)
        loss = loss_fn(model.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            logger.info("step %d  loss %.4f  (%.0f s)", step, loss.item(), time.monotonic() - start)
        if time.monotonic() - start > 0.75 * seconds:
            for g in opt.param_groups:
                g["lr"] = lr * 0.2
    logger.info("trained %d steps in %.0f s", step, time.monotonic() - start)
    return model.eval()


def export_onnx(model: nn.Module, path: Path, opset: int = ONNX_OPSET) -> None:
    """Export with dynamic batch and spatial axes (legacy TorchScript-based exporter: robust here)."""
    model.eval()
    dummy = torch.zeros(1, 1, 16, 64, 64)
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():
        # the legacy exporter is deprecated but handles the dynamic spatial crops of the U-Net well
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, dummy, path, axes, opset)


def _export(model: nn.Module, dummy: torch.Tensor, path: Path, axes: dict[int, str], opset: int) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": axes, "output": axes},
        opset_version=opset,
        dynamo=False,
    )


def main(seconds: float = 150.0, out_dir: str = str(DEMO_DIR)) -> None:
    """Train the demo membrane U-Net, evaluate it, save its weights and the ONNX export.

    Writes ``membrane_unet.pt`` (state dict) and ``membrane_unet.onnx`` into ``out_dir``, which
    by default is the package's own ``chunkflow/demo/``: the shipped weights are overwritten.

    Args:
        seconds: training wall-clock budget, in seconds.
        out_dir: where to write membrane_unet.pt and membrane_unet.onnx (default: next to this file).
    """
    seconds, out = float(seconds), Path(str(out_dir))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model = train(seconds=seconds)
    metrics = evaluate(model)
    logger.info("held-out synthetic volume (seed %d): %s", HELD_OUT_SEED,
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    out.mkdir(parents=True, exist_ok=True)
    pt = out / "membrane_unet.pt"
    torch.save(model.state_dict(), pt)
    export_onnx(model, out / "membrane_unet.onnx")
    logger.info("wrote %s and %s", pt, out / "membrane_unet.onnx")


if __name__ == "__main__":
    fire.Fire(main, name="chunkflow.demo.train")
