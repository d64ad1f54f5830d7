"""Shared helpers for tests: real volumes on disk, real models, a forward-call counter."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.storage import create_volume

MODELS = Path(__file__).parent / "models"


def examples(n: int) -> int:
    """Hypothesis examples for a property test: ``n``, or a fifth of it (at least 3) in the fast loop
    (``pytest -m "not slow"``, which sets ``CHUNKFLOW_FAST_LOOP``); the README's command runs them all."""
    return max(3, n // 5) if os.environ.get("CHUNKFLOW_FAST_LOOP") else n
CONV3 = str(MODELS / "conv3.py")            # valid convs: output = input - 6 per axis, 3 channels
CONV3_SAME = str(MODELS / "conv3_same.py")  # same-size output, 3 channels


def make_input(path: Path, shape, dtype: str = "float32", seed: int = 0, offset=(0, 0, 0), chunk=(8, 32, 32),
               fmt: str = "precomputed", zero_region: Bbox | None = None) -> tuple[str, np.ndarray]:
    """A real input volume with smooth random content; returns (url, array C,Z,Y,X)."""
    rng = np.random.default_rng(seed)
    data = rng.random((1,) + tuple(shape), dtype=np.float32)
    if dtype == "uint8":
        data = (data * 255).astype(np.uint8)
    if zero_region is not None:
        data[(slice(None),) + zero_region.slices(Bbox.from_shape(offset, shape))] = 0
    url = f"file://{path}" if fmt == "precomputed" else f"{path}.zarr"
    volume = create_volume(url, Bbox.from_shape(offset, shape), Vec(chunk), 1, dtype)
    volume.write(volume.bbox, data)
    return url, data


class CountingBackend:
    """Wraps a real backend and counts the patches that go through it."""

    def __init__(self, backend):
        self.backend = backend
        self.patches = 0
        self.calls = 0
        self.name = backend.name
        self.device = backend.device

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.patches += len(batch)
        return self.backend.predict(batch)

    def output_shape(self, *args, **kwargs):
        return self.backend.output_shape(*args, **kwargs)


def stored_bytes(tmp_path: Path, name: str = "job") -> dict[str, bytes]:
    """The donations and output chunks of the job stored at ``tmp_path/name`` (output
    ``tmp_path/name_out``), by path; done markers hold timings, so they are left out."""
    files = {}
    for root in (tmp_path / name / "donations", tmp_path / (name + "_out")):
        files.update({p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                      if p.is_file()})
    return files
