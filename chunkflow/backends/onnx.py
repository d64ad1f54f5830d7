"""ONNX Runtime backend (``*.onnx`` model files).

Why: ONNX Runtime runs exported networks without PyTorch installed (lighter worker images) and is
often the fastest CPU engine. The model file carries its own weights, so a separate weights file is
refused rather than silently ignored.

Device: ``cpu`` uses ``CPUExecutionProvider``; ``cuda`` / ``cuda:N`` uses ``CUDAExecutionProvider``
(``device_id`` N) when onnxruntime-gpu provides it, else fails with a clear message. Precision:
the graph runs in the precision it was exported in, so only ``float32`` is accepted (export a
half-precision graph and run it through a plugin if you need that). The session's thread counts are
left at onnxruntime's defaults, like the PyTorch backend's.

The model's first input takes the batch; the first output is returned. The demo U-Net is exported
with dynamic batch and spatial axes, so any patch size works; a graph with fixed axes rejects other
sizes with onnxruntime's message.
"""
from __future__ import annotations

import logging

import numpy as np

from chunkflow.backends.base import (
    Backend,
    ModelError,
    check_batch,
    check_device,
    check_precision,
    cuda_unavailable,
)
from chunkflow.backends.pin import model_bytes

logger = logging.getLogger(__name__)

__all__ = ["OnnxBackend", "make_onnx_backend"]


def _import_ort():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError("the onnx backend needs onnxruntime; install it with 'pip install chunkflow[onnx]'") from exc
    return onnxruntime


class OnnxBackend(Backend):
    """Runs an ONNX graph with onnxruntime on numpy batches."""

    name = "onnx"

    def __init__(self, path: str, device: str = "cpu", precision: str = "float32") -> None:
        ort = _import_ort()
        self.device = check_device(device)
        self.precision = check_precision(precision)
        if self.precision != "float32":
            raise ModelError(
                f"precision {precision!r} is not supported by the onnx backend (the graph runs as "
                "exported); valid: float32"
            )
        data = model_bytes(path)
        providers: list[str | tuple[str, dict[str, int]]]
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise cuda_unavailable(self.device)
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(data, providers=providers)
        except Exception as exc:
            first = " ".join(str(exc).split())[:300]
            raise ModelError(f"{str(path)!r} is not a loadable ONNX model: {first}") from exc
        if self.device.startswith("cuda") and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise ModelError(f"onnxruntime could not start its CUDA provider for {self.device} (it would fall back to "
                             f"the CPU: check the CUDA and cuDNN libraries of onnxruntime-gpu); providers in use: "
                             f"{', '.join(self.session.get_providers())}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        logger.debug("onnx model %s on %s via %s", path, self.device, self.session.get_providers())

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch)
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        out = np.asarray(out)
        if out.ndim != 5:
            raise ModelError(f"onnx model returned shape {out.shape}; expected [N, C, z, y, x]")
        return np.ascontiguousarray(out, dtype=np.float32)


def make_onnx_backend(
    model: str, weights: str | None = None, device: str = "cpu", precision: str = "float32"
) -> OnnxBackend:
    """Factory for an ``.onnx`` file (``onnx:`` prefix optional). Weights live in the graph."""
    path = model[len("onnx:"):] if model.startswith("onnx:") else model
    if weights:
        raise ModelError(f"an ONNX model carries its own weights; drop the weights file {weights!r}")
    return OnnxBackend(path, device, precision)
