"""Built-in demo assets: synthetic EM data and a small membrane-detecting 3D U-Net.

Why: chunkflow must be runnable end to end (plan, infer, donate, blend, inspect) with nothing to
download. ``make_em_volume`` makes EM-like data with a known membrane mask; ``builtin:membrane``
names the U-Net in :mod:`chunkflow.demo.unet` with weights fitted by :mod:`chunkflow.demo.train`.

This package does not import torch at import time; ``builtin_paths`` only locates files.
"""
from __future__ import annotations

from pathlib import Path

from chunkflow.demo.synthetic import make_em_volume

__all__ = ["make_em_volume", "BUILTIN_MODELS", "builtin_paths"]

#: builtin model name -> (network source file, shipped weights file), both inside this package
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "membrane": ("unet.py", "membrane_unet.pt"),
}


def builtin_paths(model: str) -> tuple[Path, Path]:
    """Resolve ``builtin:NAME`` to (source .py, shipped state-dict) paths inside the package.

    Raises ``chunkflow.backends.ModelError`` for an unknown name or weights missing from the install.
    """
    from chunkflow.backends.base import ModelError

    name = model.split(":", 1)[1] if model.startswith("builtin:") else model
    if name not in BUILTIN_MODELS:
        valid = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS))
        raise ModelError(f"unknown builtin model {model!r}; valid: {valid}")
    here = Path(__file__).resolve().parent
    source, weights = (here / f for f in BUILTIN_MODELS[name])
    if not weights.is_file():
        raise ModelError(
            f"weights {str(weights)!r} of {model!r} are missing from this install; "
            "run 'python -m chunkflow.demo.train' or reinstall chunkflow with its package data"
        )
    return source, weights
