"""PyTorch and TorchScript backends.

Model files this module loads (``load_backend`` routes them here by suffix):

- **A Python file** (``*.py``): it must define a function ``build_model()`` that takes no arguments
  and returns a ``torch.nn.Module``. Initialise parameters however you like (seed inside
  ``build_model`` if you want a fixed random net). The optional ``weights`` file is a state dict
  saved with ``torch.save(model.state_dict(), path)``; it is read with
  ``torch.load(weights, weights_only=True, map_location="cpu")`` (no arbitrary pickles are
  executed) and applied with a strict ``load_state_dict``. A checkpoint dict holding the state dict
  under ``"state_dict"`` and ``module.`` prefixes (DataParallel) are accepted too. The file is
  executed as an anonymous module: it may import installed packages but not sibling files.
- **TorchScript** (``*.pt``, ``*.ts``, ``*.jit``; ``*.pth`` too): loaded with ``torch.jit.load``.
  If the file is a plain state dict instead, the error says so and what to pass instead.
- **``builtin:membrane``**: the demo U-Net of :mod:`chunkflow.demo.unet` with its shipped weights.

Every file is read whole through :func:`~chunkflow.backends.pin.model_bytes` and loaded from memory: in a
worker those are the bytes it verified against the job's ``model_checksum``.

Why these choices: inference runs under ``torch.inference_mode()`` with the model in ``eval()``;
on CUDA the batch goes through pinned host memory with ``non_blocking`` copies so transfers overlap
with the GPU; reduced precision uses ``torch.autocast`` (float16/bfloat16 on CUDA, bfloat16 on CPU)
and the output is cast back with ``.float()`` because chunkflow always accumulates in float32. The
backend sets no thread counts and caches nothing globally, so several can coexist in one process.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import linecache
import logging
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chunkflow.backends.base import (
    Backend,
    ModelError,
    check_batch,
    check_device,
    check_precision,
    cuda_unavailable,
)
from chunkflow.backends.pin import model_bytes
from chunkflow.errors import one_line

logger = logging.getLogger(__name__)

__all__ = [
    "TorchBackend",
    "make_pytorch_backend",
    "make_torchscript_backend",
    "resolve_device",
    "load_python_model",
    "load_state_dict_file",
]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str, precision: str) -> torch.device:
    """Validate device and precision together for torch; return the torch device."""
    device = check_device(device)
    precision = check_precision(precision)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise cuda_unavailable(device)
        dev = torch.device(device)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ModelError(f"device {device!r} does not exist; valid: cuda:0 .. cuda:{count - 1}")
        if precision == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ModelError(f"precision 'bfloat16' is not supported by {device!r}; use float16 or float32")
        return dev
    if precision == "float16":
        raise ModelError("precision 'float16' is not supported on device 'cpu'; valid on cpu: float32, bfloat16")
    return torch.device("cpu")


class TorchBackend(Backend):
    """Runs a ``torch.nn.Module`` (eager or TorchScript) on numpy batches."""

    def __init__(self, module: torch.nn.Module, device: str = "cpu", precision: str = "float32",
                 name: str = "pytorch") -> None:
        self._dev = resolve_device(device, precision)
        self.device = check_device(device)
        self.precision = precision
        self.name = name
        self.module = module.to(self._dev).eval()
        if self._dev.type == "cuda" and precision == "float32":
            # float32 means float32: cuDNN would otherwise run convolutions in TF32 (a 10-bit mantissa,
            # about 1e-3 from the CPU). Process-wide, set once (a context manager per call would race
            # between a worker's two task slots); bfloat16 and float16 are the precisions for speed.
            torch.backends.cudnn.allow_tf32 = False
        self._slots: list[dict[str, Any]] = [{}, {}]  # pinned staging for submit(), used in turn
        self._turn = 0

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._dev.type, dtype=_DTYPES[self.precision])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module on ``x`` (autocast as asked), its output checked to be one 5-D tensor."""
        with self._autocast():
            y = self.module(x)
        if not isinstance(y, torch.Tensor):
            raise ModelError(f"model returned {type(y).__name__}; chunkflow expects a single tensor")
        if y.ndim != 5:
            raise ModelError(f"model returned shape {tuple(y.shape)}; expected [N, C, z, y, x]")
        return y

    @property
    def torch_device(self) -> torch.device:
        """The torch device the module lives on (what :meth:`device_forward` takes and returns)."""
        return self._dev

    def device_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a batch already on its device: float32 ``[N, C, z, y, x]`` on
        :attr:`torch_device` in, float32 ``[N, C_out, z', y', x']`` on the device out.

        Nothing is copied to or from the host and nothing waits for the device, so a caller can
        queue many batches (:mod:`chunkflow.device_blend`). Autocast as :attr:`precision` says;
        the output is cast back to float32. It may be ``x`` itself (``nn.Identity``): use it
        before writing ``x`` again.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.dtype != torch.float32:
            raise ModelError(f"device_forward() takes a float32 tensor [N, C, z, y, x]; got "
                             f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
        if x.device.type != self._dev.type or (self._dev.index is not None and x.device.index != self._dev.index):
            raise ModelError(f"device_forward() got a tensor on {x.device}; the model is on {self._dev}")
        with torch.inference_mode():
            return self._forward(x).float()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch)
        cuda = self._dev.type == "cuda"
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if cuda:
                x = x.pin_memory().to(self._dev, non_blocking=True)
            y = self._forward(x)
            y = y.float()
            if cuda:
                host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(y, non_blocking=True)
                torch.cuda.current_stream(self._dev).synchronize()
                return host.numpy()
            out = y.contiguous().numpy()
            # a net that returns its input (nn.Identity) must not hand the caller's buffer back
            return out.copy() if np.may_share_memory(out, batch) else out

    def submit(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """On CUDA: copy ``batch`` into pinned memory, queue the upload, the forward pass and the
        download on the device's stream, and return at once; the callable waits for that batch
        only. Two staging slots are used in turn, which is what the contract of
        :meth:`Backend.submit` allows (an output is valid until the second-next submit, by which
        time its slot's event has been waited on). Elsewhere: :meth:`predict`, synchronously.

        Untested on a GPU here (no GPU was available when it was written); the CPU path is.
        """
        if self._dev.type != "cuda":
            return super().submit(batch)
        batch = check_batch(batch)
        slot = self._slots[self._turn]
        self._turn = 1 - self._turn
        if slot.get("event") is not None:
            slot["event"].synchronize()  # the slot's previous batch is fully uploaded and downloaded
        with torch.inference_mode():
            staging = _pinned(slot, "in", batch.shape)
            staging.copy_(torch.from_numpy(batch))
            x = staging.to(self._dev, non_blocking=True)
            y = self._forward(x)
            host = _pinned(slot, "out", tuple(y.shape))
            host.copy_(y.float(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._dev))
            slot["event"] = event

        def wait() -> np.ndarray:
            event.synchronize()
            return host.numpy()
        return wait


def _pinned(slot: dict[str, Any], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The slot's pinned float32 host buffer ``name`` of ``shape`` (reallocated when it changes)."""
    buf = slot.get(name)
    if buf is None or tuple(buf.shape) != tuple(shape):
        buf = slot[name] = torch.empty(shape, dtype=torch.float32, pin_memory=True)
    return buf


def _import_python_file(path: Path) -> Any:
    """Execute a model .py file as an anonymous module (registered only while it runs), from its
    bytes as :func:`~chunkflow.backends.pin.model_bytes` gives them (the verified ones in a worker)."""
    name = "chunkflow_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    source = model_bytes(path)
    filename = str(path.resolve())
    try:
        code = compile(source, filename, "exec")
    except (SyntaxError, ValueError) as exc:
        raise ModelError(f"model file {str(path)!r} failed to import: {one_line(exc, limit=300)}") from exc
    text = source.decode("utf-8", errors="replace")
    # tracebacks and torch.jit.script read the source through linecache: the bytes run, not the disk's
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # dataclasses and typing need the module registered while it runs
    try:
        exec(code, module.__dict__)  # noqa: S102 - a model file is code by design (docs/security.md)
    except Exception as exc:
        raise ModelError(f"model file {str(path)!r} failed to import: {one_line(exc, limit=300)}") from exc
    finally:
        sys.modules.pop(name, None)
    return module


def load_python_model(path: str | Path) -> torch.nn.Module:
    """Build the network defined by ``build_model()`` in a Python file (see module docstring)."""
    module = _import_python_file(Path(path).expanduser())
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise ModelError(f"model file {str(path)!r} defines no build_model() function")
    try:
        net = build()
    except Exception as exc:
        raise ModelError(f"build_model() in {str(path)!r} failed: {one_line(exc, limit=300)}") from exc
    if not isinstance(net, torch.nn.Module):
        raise ModelError(f"build_model() in {str(path)!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _read_state_dict(weights: str | Path) -> Mapping[str, Any]:
    data = model_bytes(weights, "weights file")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ModelError(f"weights file {str(weights)!r} is not a readable state dict: {one_line(exc, limit=300)}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelError(f"weights file {str(weights)!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_state_dict_file(net: torch.nn.Module, weights: str | Path) -> None:
    """Load a state dict file into ``net`` strictly; a mismatch is one ModelError line."""
    state = dict(_read_state_dict(weights))
    own = net.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelError(f"weights file {str(weights)!r} does not fit the model: {one_line(exc, limit=300)}") from exc


def _strip_prefix(model: str, *prefixes: str) -> str:
    for prefix in prefixes:
        if model.startswith(prefix + ":"):
            return model[len(prefix) + 1:]
    return model


def make_pytorch_backend(
    model: str, weights: str | None = None, device: str = "cpu", precision: str = "float32"
) -> TorchBackend:
    """Factory for a ``.py`` model file (``pytorch:`` prefix optional) or ``builtin:NAME``."""
    resolve_device(device, precision)  # fail on device/precision before building anything
    if model.startswith("builtin:"):
        from chunkflow.demo import builtin_paths

        source, shipped = builtin_paths(model)
        net = load_python_model(source)
        load_state_dict_file(net, weights or shipped)
        return TorchBackend(net, device, precision, name="pytorch")
    path = _strip_prefix(model, "pytorch")
    net = load_python_model(path)
    if weights:
        load_state_dict_file(net, weights)
    else:
        logger.info("model %s: no weights file given, using the parameters build_model() set", path)
    return TorchBackend(net, device, precision, name="pytorch")


def make_torchscript_backend(
    model: str, weights: str | None = None, device: str = "cpu", precision: str = "float32"
) -> TorchBackend:
    """Factory for a TorchScript file (``torchscript:`` prefix optional); optional extra state dict."""
    resolve_device(device, precision)
    path = _strip_prefix(model, "torchscript")
    data = model_bytes(path)
    try:
        net = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception:
            state = None
        if isinstance(state, Mapping):
            raise ModelError(
                f"{str(path)!r} is a PyTorch state dict, not TorchScript; pass the network's .py file "
                "(defining build_model()) as the model and this file as the weights"
            ) from exc
        raise ModelError(f"{str(path)!r} is not a TorchScript file: {one_line(exc, limit=300)}") from exc
    if weights:
        load_state_dict_file(net, weights)
    return TorchBackend(net, device, precision, name="torchscript")
