"""The backend contract shared by every inference engine, plus validation and model checksums.

Why a separate module: stages, planning and the job manifest code against :class:`Backend` and
:func:`model_checksum` only; they must not care whether patches go through PyTorch, ONNX Runtime or
a site plugin. Keeping the contract, the error type and argument validation here (with no torch
import) lets the identity and ONNX backends, and ``plan``, run where torch is not installed.

Contract of :meth:`Backend.predict`: a float32 numpy batch ``[N, C_in, z, y, x]`` already scaled
to [0, 1] goes in; a float32 numpy batch ``[N, C_out, z', y', x']`` comes out. The accumulation
dtype downstream is always float32, so backends return float32 even when they compute in reduced
precision.
"""
from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np

from chunkflow.builtin_models import BUILTIN_PREFIX, builtin_paths
from chunkflow.errors import ModelError

__all__ = [
    "Backend",
    "ModelError",
    "PRECISIONS",
    "check_device",
    "require_device",
    "check_precision",
    "check_file",
    "cuda_unavailable",
    "checksum_of",
    "model_checksum",
    "model_files",
]

PRECISIONS = ("float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(cpu|cuda)(:(\d+))?$")
_BACKENDS_WITH_FILES = ("pytorch", "torchscript", "onnx")  # "onnx:/path/net.onnx" names the backend explicitly
CUDA_UNAVAILABLE = "CUDA is not available on this machine; use --device cpu"


def cuda_unavailable(device: str) -> ModelError:
    """The one error for asking for a GPU that this machine does not have."""
    return ModelError(f"device {device!r}: {CUDA_UNAVAILABLE}")


def check_device(device: str) -> str:
    """Validate the device syntax (``cpu``, ``cuda`` or ``cuda:N``); return it normalised."""
    text = str(device).strip().lower()
    m = _DEVICE_RE.match(text)
    if not m or (m.group(1) == "cpu" and m.group(2)):
        raise ModelError(f"unknown device {device!r}; valid: 'cpu', 'cuda' or 'cuda:N'")
    return text


def require_device(device: str) -> None:
    """Refuse a CUDA device that this machine does not have (whatever the backend: even one that
    would run anywhere must not hide that the workers asked for a GPU they lack)."""
    device = check_device(device)
    if device == "cpu":
        return
    try:
        import torch
    except ImportError:
        try:
            import onnxruntime
        except ImportError:
            raise cuda_unavailable(device) from None
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise cuda_unavailable(device) from None
        return
    if not torch.cuda.is_available():
        raise cuda_unavailable(device)
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ModelError(f"device {device!r}: this machine has {torch.cuda.device_count()} visible GPUs "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def check_precision(precision: str) -> str:
    """Validate the precision name; return it."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def check_file(path: str | os.PathLike[str], what: str = "model file") -> Path:
    """Return ``path`` as a Path if it is an existing regular file, else raise ModelError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{what} {str(path)!r} does not exist")
    if not p.is_file():
        raise ModelError(f"{what} {str(path)!r} is not a regular file")
    return p


def check_batch(batch: np.ndarray) -> np.ndarray:
    """Ensure a predict() input is a 5-D float32 array; convert dtype if needed (no copy if not)."""
    if not isinstance(batch, np.ndarray) or batch.ndim != 5:
        shape = getattr(batch, "shape", None)
        raise ModelError(f"predict() takes a float32 array [N, C, z, y, x]; got shape {shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


class Backend(ABC):
    """One loaded model on one device: patches in, patches out.

    Attributes: ``name`` (``"pytorch"``, ``"torchscript"``, ``"onnx"``, ``"identity"`` or a plugin's
    name), ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``) and ``precision``.
    """

    name: str = "backend"
    device: str = "cpu"
    precision: str = "float32"
    #: True when :meth:`submit` has finished its batch when it returns and every output is a new
    #: array that no later call touches: the blocks of a worker may then take the model batch by
    #: batch (one call at a time) instead of block by block, so one block gathers and accumulates
    #: while another's batch runs (:class:`chunkflow.stage_pipeline.Turn`). False (block by block)
    #: unless a backend says so: an asynchronous device, or outputs valid only until the
    #: second-next submit, need the block's whole turn.
    independent_batches: bool = False

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on float32 ``[N, C_in, z, y, x]``; return float32 ``[N, C_out, z', y', x']``."""

    def submit(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Start the model on ``batch``; the returned callable waits for and returns the output.

        Lets the caller gather and accumulate one batch while the device computes the next.
        Contract: ``batch`` may be overwritten as soon as this returns (copy what you keep), and
        an output returned by the callable stays valid until the second-next ``submit``. The
        default runs :meth:`predict` at once; the PyTorch backend overlaps on CUDA.
        """
        out = self.predict(batch)
        return lambda: out

    def output_shape(
        self, input_patch: tuple[int, int, int], in_channels: int = 1
    ) -> tuple[int, tuple[int, int, int]]:
        """Run one zero patch through the model; return ``(C_out, (z', y', x'))``.

        Used by planning to learn the output patch size (and so the crop margin of a valid-
        convolution net) without the user having to state it. A patch the model rejects raises
        ModelError naming the patch.
        """
        patch = tuple(int(s) for s in input_patch)
        if len(patch) != 3 or min(patch) < 1:
            raise ModelError(f"input patch {input_patch!r} must be three positive ZYX sizes")
        zeros = np.zeros((1, int(in_channels), *patch), dtype=np.float32)
        try:
            out = self.predict(zeros)
        except ModelError:
            raise
        except Exception as exc:  # the model's own complaint, squeezed to one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model rejects input patch {patch} with {in_channels} channel(s): {first}"
            ) from exc
        if out.ndim != 5 or out.shape[0] != 1 or min(out.shape[2:]) < 1:
            raise ModelError(f"model output for patch {patch} has unusable shape {out.shape}")
        return int(out.shape[1]), (int(out.shape[2]), int(out.shape[3]), int(out.shape[4]))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device} ({self.precision})>"


def model_files(model: str, weights: str | None = None) -> list[Path]:
    """The files whose bytes :func:`model_checksum` hashes for ``model`` and ``weights``, in order
    (none for ``identity`` or a plugin name that is not a file). Raises ModelError for a missing one."""
    files: list[Path] = []
    for kind, item in _checksum_items(model, weights):
        if kind == "file":
            files.append(item)  # type: ignore[arg-type]
    return files


def _checksum_items(model: str, weights: str | None) -> list[tuple[str, "str | Path"]]:
    """What the checksum of a model string covers: ``("text", s)`` or ``("file", path)`` items."""
    if model == "identity" or model.startswith("identity:"):
        return [("text", model)]
    if model.startswith(BUILTIN_PREFIX):
        source, shipped = builtin_paths(model)
        return [("text", model), ("file", source),
                ("file", check_file(weights, "weights file") if weights else shipped)]
    prefix, sep, rest = model.partition(":")
    if sep and rest and not Path(model).expanduser().is_file() and (
            prefix in _BACKENDS_WITH_FILES or Path(rest).expanduser().is_file()):
        model = rest  # "onnx:/x/net.onnx", a plugin's "tensorrt:/x/engine.plan": hash the file itself
    path = Path(model).expanduser()
    items: list[tuple[str, str | Path]]
    if path.is_file():
        items = [("file", path)]
    elif Path(model).suffix.lower() in (".py", ".pt", ".ts", ".jit", ".pth", ".onnx"):
        check_file(model)  # raises: a missing model file
        items = []
    else:
        items = [("text", model)]
    if weights:
        items.append(("file", check_file(weights, "weights file")))
    return items


def checksum_of(model: str, weights: str | None, read: Callable[[Path], bytes]) -> str:
    """:func:`model_checksum` with every file's bytes obtained through ``read`` (so a caller can
    keep the very bytes it hashed, see :mod:`chunkflow.backends.pin`)."""
    parts = [hashlib.sha256(item.encode() if kind == "text" else read(item)).hexdigest()  # type: ignore[union-attr,arg-type]
             for kind, item in _checksum_items(model, weights)]
    if len(parts) == 1:
        return parts[0]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def model_checksum(model: str, weights: str | None = None) -> str:
    """A sha256 hex digest that identifies the network the job runs, for the job manifest.

    - A model file alone: the sha256 of its bytes (same as ``sha256sum``).
    - A model file and a weights file: sha256 of ``"<sha256 model>\\n<sha256 weights>"``.
    - ``identity`` / ``identity:C``: sha256 of the model string (stable).
    - ``builtin:NAME``: sha256 over the name, the network's source file and its shipped weights,
      so retraining the demo net changes the checksum (and so the job hash), as it should.
    - A plugin name that is not a file: sha256 of the string (plus the weights file if given).
    """
    return checksum_of(model, weights, lambda path: path.read_bytes())
