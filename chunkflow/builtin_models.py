"""The built-in models (``builtin:NAME``): their names and the files that define them.

Why its own module: the backends (to load a built-in model and to checksum it for the job
manifest) and the demo package (which ships the files) all need to know where a built-in model's
network source and weights lie. Keeping that here, torch-free and importing nothing of chunkflow
but its error type, lets each of them import it without importing the others.

The files themselves live in the ``chunkflow.demo`` package: the network in ``unet.py``, the
weights fitted by :mod:`chunkflow.demo.train` in ``membrane_unet.pt``.
"""
from __future__ import annotations

from pathlib import Path

from chunkflow.errors import ModelError

__all__ = ["BUILTIN_MODELS", "BUILTIN_MODEL_DIR", "BUILTIN_PREFIX", "builtin_paths"]

#: the model-string prefix that names a built-in model
BUILTIN_PREFIX = "builtin:"
#: builtin model name -> (network source file, shipped weights file), both inside ``chunkflow/demo``
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "membrane": ("unet.py", "membrane_unet.pt"),
}
#: the directory holding every built-in model's files (the ``chunkflow.demo`` package)
BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "demo"


def builtin_paths(model: str) -> tuple[Path, Path]:
    """Resolve ``builtin:NAME`` (or a bare ``NAME``) to its (source .py, shipped state-dict) paths.

    Raises :class:`~chunkflow.errors.ModelError` for an unknown name or weights missing from the install.
    """
    name = model[len(BUILTIN_PREFIX):] if model.startswith(BUILTIN_PREFIX) else model
    if name not in BUILTIN_MODELS:
        valid = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in sorted(BUILTIN_MODELS))
        raise ModelError(f"unknown builtin model {model!r}; valid: {valid}")
    source, weights = (BUILTIN_MODEL_DIR / f for f in BUILTIN_MODELS[name])
    if not weights.is_file():
        raise ModelError(
            f"weights {str(weights)!r} of {model!r} are missing from this install; "
            "run 'python -m chunkflow.demo.train' or reinstall chunkflow with its package data"
        )
    return source, weights
