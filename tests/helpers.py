"""Shared helpers for tests: real volumes on disk, real models, a forward-call counter."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hypothesis import assume
from hypothesis import strategies as st

from chunkflow.bbox import Bbox, Vec
from chunkflow.errors import GeometryError
from chunkflow.job import Job
from chunkflow.storage import create_volume
from chunkflow.store_layout import MANIFEST

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


# ---- hypothetical jobs (a manifest, no volumes) for property tests of the control plane ------------

def hypothetical_job(root: Path, shape, patch, overlap, block, chunk, start=(0, 0, 0), sharded: bool = False,
                     channels: int = 1, dtype: str = "float32") -> Job:
    """A planned job on a volume that does not exist: its manifest in a directory store at ``root``."""
    job = Job(input="file:///nonexistent/in", output="file:///nonexistent/out", store=str(root),
              bbox=Bbox.from_shape(Vec(start), Vec(shape)).name, input_patch=tuple(patch), output_patch=tuple(patch),
              overlap=tuple(overlap), block=tuple(block), storage_chunk=tuple(chunk), blend="constant",
              model="identity", weights=None, model_checksum="0", in_channels=1, out_channels=channels,
              donation_dtype=dtype, sharded=sharded)
    job.layout  # noqa: B018 - validates the geometry
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(job.to_json())
    return job


def axis_strategy():
    return st.tuples(st.sampled_from([4, 6, 8]), st.integers(1, 3), st.integers(0, 3), st.integers(2, 8),
                     st.integers(0, 3), st.sampled_from([1, 2]))


def job_of(root: Path, axes, sharded: bool, start) -> Job:
    """A :func:`hypothetical_job` from three draws of :func:`axis_strategy`, one per axis ZYX: (block size,
    blocks, voxels trimmed off the last block, patch, overlap, storage chunks per block); starting at ``start``.
    Raises GeometryError where they cannot be planned (see :func:`job_or_reject`)."""
    block, patch, overlap, shape, chunk = [], [], [], [], []
    for b, n, trim, p, o, c in axes:
        size = max(b * n - min(trim, b - 1), min(p, b))
        p = min(p, b, size)
        block.append(b)
        patch.append(p)
        overlap.append(min(o, p - 1))
        shape.append(size)
        chunk.append(b // c if b % c == 0 else b)
    return hypothetical_job(root, shape, patch, overlap, block, chunk, start=start, sharded=sharded)


def job_or_reject(root: Path, axes, sharded: bool, start) -> Job:
    """:func:`job_of` inside a hypothesis test: axes that cannot be planned reject the example."""
    try:
        return job_of(root, axes, sharded, start)
    except GeometryError:
        assume(False)


def cli_status(*args) -> int:
    """``chunkflow ARGS`` in this process (arguments made strings); its exit status."""
    from chunkflow.cli import main

    try:
        return main([str(a) for a in args]) or 0
    except SystemExit as stop:
        return int(stop.code or 0)
