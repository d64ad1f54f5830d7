"""Built-in demo assets: synthetic EM data and a small membrane-detecting 3D U-Net.

Why: chunkflow must be runnable end to end (plan, infer, donate, blend, inspect) with nothing to
download. ``make_em_volume`` makes EM-like data with a known membrane mask; ``builtin:membrane``
names the U-Net in :mod:`chunkflow.demo.unet` with weights fitted by :mod:`chunkflow.demo.train`.

This package does not import torch at import time. Which built-in models there are and where their
files lie is :mod:`chunkflow.builtin_models`; ``builtin_paths`` is offered here too for callers
that think of the files as demo assets.
"""
from __future__ import annotations

from chunkflow.builtin_models import BUILTIN_MODELS, builtin_paths
from chunkflow.demo.synthetic import make_em_volume

__all__ = ["make_em_volume", "BUILTIN_MODELS", "builtin_paths"]
