"""``chunkflow demo``: the whole two-stage pipeline on a synthetic EM volume, checked.

Makes an EM-like volume, plans a job with the built-in membrane U-Net over several blocks,
runs stage one, the barrier and stage two in this process, runs the whole-volume reference,
and reports the largest deviation between the two with PNG slices to look at.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.demo.synthetic import make_em_volume
from chunkflow.engines import LocalEngine, run_job
from chunkflow.planning import plan
from chunkflow.stages import Resources, reference
from chunkflow.storage import create_volume, open_volume

log = logging.getLogger(__name__)

INPUT_PATCH = "16,64,64"
OVERLAP = "4,16,16"
RESOLUTION = (40.0, 8.0, 8.0)


def run_demo(workdir: Path, shape: str = "32,256,256", block: str = "16,128,128", blend: str = "gaussian",
             progress: bool = True, seed: int = 7) -> list[str]:
    """Run the demo in ``workdir`` (recreated) and return the summary lines."""
    workdir = Path(workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    size = Vec.parse(shape, "shape")
    started = time.perf_counter()
    image, _ = make_em_volume(tuple(size), seed=seed, resolution=RESOLUTION)
    input_url = f"file://{workdir / 'input'}"
    volume = create_volume(input_url, Bbox(Vec(0, 0, 0), size), Vec(16, 64, 64), 1, "uint8", resolution=RESOLUTION)
    volume.write(volume.bbox, image[None])
    made = time.perf_counter() - started

    output_url = f"file://{workdir / 'output'}"
    job = plan(input_url, output_url, str(workdir / "job"), "builtin:membrane", INPUT_PATCH, overlap=OVERLAP,
               block=block, blend=blend)
    summary = run_job(job, LocalEngine(), progress=progress)

    t = time.perf_counter()
    expected = reference(job, Resources(job))
    reference_seconds = time.perf_counter() - t
    output = open_volume(output_url).read(job.layout.bbox)
    deviation = float(np.abs(output - expected).max())

    pictures = _write_pngs(workdir, image, output[0], expected[0], job)
    layout = job.layout
    lines = [
        f"chunkflow demo in {workdir}",
        f"volume {_zyx(size)} (z,y,x) uint8, synthetic EM at {RESOLUTION[0]:g}x{RESOLUTION[1]:g}x{RESOLUTION[2]:g} nm,"
        f" made in {made:.1f} s",
        f"model builtin:membrane, patch {INPUT_PATCH}, overlap {OVERLAP}, blend {blend}, blocks {block}",
        *summary.lines(),
        f"reference (whole volume, one process): {layout.num_patches} patches in {reference_seconds:.2f} s",
        f"max |two-stage - reference| = {deviation:.3g}  ({'OK' if deviation <= 1e-5 else 'MISMATCH'}, "
        "tolerance 1e-5)",
        f"pictures: {', '.join(str(p.relative_to(workdir)) for p in pictures)}",
        f"view: neuroglancer precomputed layers {input_url} and {output_url}",
    ]
    if deviation > 1e-5:
        raise RuntimeError("\n".join(lines))
    return lines


def _write_pngs(workdir: Path, image: np.ndarray, output: np.ndarray, expected: np.ndarray, job) -> list[Path]:
    from PIL import Image

    z = image.shape[0] // 2
    blocks = job.layout.grid_shape
    pictures = []
    grey = image[z]
    prob = np.clip(output[z], 0, 1)
    diff = np.abs(output[z] - expected[z])
    scale = diff.max() if diff.max() > 0 else 1.0
    panels = [grey, (prob * 255).astype(np.uint8), (diff / scale * 255).astype(np.uint8)]
    for name, panel in zip(("input", "membranes", "difference"), panels):
        path = workdir / f"{name}_z{z}.png"
        Image.fromarray(panel).save(path)
        pictures.append(path)
    combined = np.concatenate([np.pad(p, 4, constant_values=255) for p in panels[:2]], axis=1)
    rgb = np.repeat(combined[..., None], 3, axis=2)
    step = job.block[1]
    for k in range(1, blocks[1]):  # block borders on the output panel, in red
        rgb[4 + k * step, grey.shape[1] + 12:, :] = (255, 0, 0)
    for k in range(1, blocks[2]):
        rgb[4:-4, grey.shape[1] + 12 + k * job.block[2], :] = (255, 0, 0)
    path = workdir / f"input_and_output_z{z}.png"
    Image.fromarray(rgb).save(path)
    pictures.append(path)
    return pictures


def _zyx(v) -> str:
    return ",".join(str(int(x)) for x in v)
