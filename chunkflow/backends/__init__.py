"""Inference backends: one call, patches in, patches out.

``load_backend(model, weights, device, precision)`` turns a model string into a :class:`Backend`:

============================  =================================================================
model string                  backend
============================  =================================================================
``identity``, ``identity:C``  output = input; ``C`` copies of channel 0 (no torch needed)
``builtin:membrane``          the demo 3D U-Net with its shipped weights (PyTorch)
``path/net.py``               PyTorch: the file defines ``build_model() -> torch.nn.Module``;
                              optional weights = a state dict (see :mod:`.pytorch`)
``path/net.pt|.ts|.jit``      TorchScript (``torch.jit.load``)
``path/net.onnx``             ONNX Runtime
``NAME`` or ``NAME:ARGS``     the backend registered as ``NAME`` in the entry-point group
                              ``chunkflow.backends``; it gets the whole model string
============================  =================================================================

Why a registry: a site can add its own engine (e.g. a pznet or TensorRT adapter) by shipping a
package with an entry point, without forking chunkflow. The built-ins are looked up exactly the
same way through :data:`BUILTIN_BACKENDS` (which wins over a plugin of the same name), so the
entry point contract is exercised by every run. A factory is any callable
``(model: str, weights: str | None, device: str, precision: str) -> Backend``. Factories are
imported lazily, so ``identity`` and ``onnx`` work where torch is not installed.

Every unusable argument raises :class:`ModelError` with one line naming the value and what is valid.
With ``checksum`` (what every worker passes: the job's ``model_checksum``) the files are verified first
and the built-in backends load the verified bytes (:mod:`.pin`).
"""
from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from chunkflow.backends.base import (
    PRECISIONS,
    Backend,
    ModelError,
    check_device,
    check_precision,
    model_checksum,
    require_device,
)
from chunkflow.backends.pin import ModelChanged, pinned, read_verified, verify_model

logger = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "ModelChanged",
    "ModelError",
    "PRECISIONS",
    "BUILTIN_BACKENDS",
    "ENTRY_POINT_GROUP",
    "load_backend",
    "model_checksum",
    "require_device",
    "resolve_backend_name",
    "verify_model",
]

ENTRY_POINT_GROUP = "chunkflow.backends"

Factory = Callable[[str, "str | None", str, str], Backend]

#: built-in backend name -> "module:callable" (imported only when used)
BUILTIN_BACKENDS: dict[str, str] = {
    "identity": "chunkflow.backends.identity:make_identity_backend",
    "builtin": "chunkflow.backends.pytorch:make_pytorch_backend",
    "pytorch": "chunkflow.backends.pytorch:make_pytorch_backend",
    "torchscript": "chunkflow.backends.pytorch:make_torchscript_backend",
    "onnx": "chunkflow.backends.onnx:make_onnx_backend",
}

_SUFFIXES = {
    ".py": "pytorch",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
    ".jit": "torchscript",
    ".onnx": "onnx",
}


def resolve_backend_name(model: str) -> str:
    """Which backend name a model string selects (see the table in the module docstring)."""
    if model == "identity" or model.startswith("identity:"):
        return "identity"
    if model.startswith("builtin:"):
        return "builtin"
    suffix = Path(model).suffix.lower()
    prefix, sep, _ = model.partition(":")
    if sep and (prefix in BUILTIN_BACKENDS or prefix in _plugin_names()):
        return prefix  # explicit "onnx:/path/file", or a plugin's "tensorrt:/path/net.onnx"
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    return prefix if sep else model


def _plugin_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _find_factory(name: str, model: str) -> Factory:
    target = BUILTIN_BACKENDS.get(name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(f"backend {name!r} for model {model!r} is not usable here: {exc}") from exc
        return getattr(module, attr)
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        valid = "identity, identity:C, builtin:membrane, *.py, *.pt/*.ts/*.jit, *.onnx"
        plugins = [n for n in _plugin_names() if n not in BUILTIN_BACKENDS]
        if plugins:
            valid += ", or a plugin: " + ", ".join(plugins)
        raise ModelError(f"unknown model or backend {model!r}; valid: {valid}")
    try:
        factory = matches[0].load()
    except Exception as exc:
        raise ModelError(f"backend plugin {name!r} ({matches[0].value}) failed to load: {exc}") from exc
    if not callable(factory):
        raise ModelError(f"backend plugin {name!r} ({matches[0].value}) is not callable")
    return factory


def load_backend(
    model: str, weights: str | None = None, device: str = "cpu", precision: str = "float32",
    checksum: str | None = None,
) -> Backend:
    """Load ``model`` on ``device`` at ``precision`` and return a ready :class:`Backend`.

    ``device`` is ``cpu``, ``cuda`` or ``cuda:N``; ``precision`` is ``float32``, ``float16``
    (CUDA only) or ``bfloat16``. ``checksum`` (a job's ``model_checksum``; every worker passes it):
    the model and weights files are read once and checked against it before anything is loaded or
    imported, and loaded from those bytes (:mod:`chunkflow.backends.pin`); a changed file raises
    :class:`~chunkflow.backends.pin.ModelChanged`. Raises :class:`ModelError` (one line) for
    anything unusable.
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"model must be a non-empty string, got {model!r}")
    model = model.strip()
    check_device(device)
    check_precision(precision)
    name = resolve_backend_name(model)
    factory = _find_factory(name, model)
    weights = str(weights) if weights else None
    if checksum is None:
        backend = factory(model, weights, device, precision)
    else:
        with pinned(read_verified(model, weights, checksum)):
            backend = factory(model, weights, device, precision)
    if not isinstance(backend, Backend):
        raise ModelError(f"backend {name!r} returned {type(backend).__name__}, not a chunkflow Backend")
    logger.debug("loaded model %s with the %s backend on %s (%s)", model, backend.name, device, precision)
    return backend
