"""``chunkflow demo``: the whole two-stage pipeline on a synthetic EM volume, checked.

Makes an EM-like volume, plans a job with the built-in membrane U-Net over several blocks,
runs stage one, the barrier and stage two in this process, runs the whole-volume reference,
and reports the largest deviation between the two with PNG slices to look at.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import chunkflow
from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.demo.synthetic import make_em_volume
from chunkflow.storage import create_volume, open_volume  # the API reads and writes no volumes of its own

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

INPUT_PATCH = "16,64,64"
OVERLAP = "4,16,16"
RESOLUTION = (40.0, 8.0, 8.0)
TOLERANCE = 1e-5


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
    job = chunkflow.plan(input_url, output_url, str(workdir / "job"), "builtin:membrane", INPUT_PATCH,
                         overlap=OVERLAP, block=block, blend=blend)
    summary = chunkflow.run(job, engine="local", progress=progress)

    t = time.perf_counter()
    expected = chunkflow.reference(job)
    reference_seconds = time.perf_counter() - t
    output = open_volume(output_url).read(job.layout.bbox)
    deviation = float(np.abs(output - expected).max())

    pictures = _write_pngs(workdir, image, output[0], expected[0], job, deviation)
    layout = job.layout
    lines = [
        f"chunkflow demo in {workdir}",
        f"volume {zyx_text(size)} (z,y,x) uint8, synthetic EM at {RESOLUTION[0]:g}x{RESOLUTION[1]:g}x{RESOLUTION[2]:g} nm,"
        f" made in {made:.1f} s",
        f"model builtin:membrane, patch {INPUT_PATCH}, overlap {OVERLAP}, blend {blend}, blocks {block}",
        *summary.lines(),
        f"reference (whole volume, one process): {layout.num_patches} patches in {reference_seconds:.2f} s",
        f"max |two-stage - reference| = {deviation:.3g}  ({'OK' if deviation <= TOLERANCE else 'MISMATCH'}, "
        f"tolerance {TOLERANCE:g})",
        f"pictures: {', '.join(str(p.relative_to(workdir)) for p in pictures)}",
        f"view: python3 -m chunkflow view {output_url} {input_url}  (pip install 'chunkflow[view]' for the local client)",
    ]
    if deviation > TOLERANCE:
        raise RuntimeError("\n".join(lines))
    return lines


def _write_pngs(workdir: Path, image: np.ndarray, output: np.ndarray, expected: np.ndarray, job,
                deviation: float) -> list[Path]:
    from PIL import Image

    z = image.shape[0] // 2
    blocks = job.layout.grid_shape
    pictures = []
    grey = image[z]
    prob = np.clip(output[z], 0, 1)
    panels = [grey, (prob * 255).astype(np.uint8)]
    for name, panel in zip(("input", "membranes"), panels):
        path = workdir / f"{name}_z{z}.png"
        Image.fromarray(panel).save(path)
        pictures.append(path)
    difference, _ = difference_image(np.abs(output[z] - expected[z]), z, deviation)
    path = workdir / f"difference_z{z}.png"
    difference.save(path)
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


def difference_image(diff: np.ndarray, z: int, volume_max: float,
                     tolerance: float = TOLERANCE) -> tuple[Image.Image, list[str]]:
    """|two-stage - reference| of one z slice: grey from 0 (black) to the slice's maximum (white),
    a colour bar labelled in absolute values, and that maximum in the title.

    Returns the PIL image and the texts drawn on it (title, subtitle, then the bar's labels).
    """
    from PIL import Image, ImageDraw

    finite = diff[np.isfinite(diff)]
    top = float(finite.max()) if finite.size else 0.0
    fraction = np.clip(np.nan_to_num(diff, nan=top, posinf=top) / top, 0, 1) if top > 0 else np.zeros(diff.shape)
    grey = np.rint(fraction * 255).astype(np.uint8)
    height, width = diff.shape
    scale = max(1, min(8, math.ceil(256 / max(height, width))))
    title = f"max |difference| = {top:.3g}" + (" (bit-identical)" if top == 0 else "")
    subtitle = f"|two-stage - reference| at z={z}; whole volume {volume_max:.3g}, tolerance {tolerance:g}"
    ticks = [(top, f"{top:.3g}"), (top / 2, f"{top / 2:.3g}"), (0.0, "0")] if top > 0 else [(0.0, "0")]
    big, small = _font(16), _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    gap, bar, title_height = 10, 16, 44
    label_width = max(int(measure.textlength(text, font=small)) for _, text in ticks)
    panel_w, panel_h = width * scale, height * scale
    canvas_w = max(gap + panel_w + gap + bar + 6 + label_width + gap,
                   gap + int(max(measure.textlength(title, font=big), measure.textlength(subtitle, font=small))) + gap)
    canvas = Image.new("RGB", (canvas_w, title_height + panel_h + 2 * gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 6), title, fill=(0, 0, 0), font=big)
    draw.text((gap, 26), subtitle, fill=(60, 60, 60), font=small)
    y0 = title_height + gap
    canvas.paste(Image.fromarray(grey).convert("RGB").resize((panel_w, panel_h), Image.NEAREST), (gap, y0))
    x0 = gap + panel_w + gap
    ramp = np.linspace(255, 0, panel_h)[:, None].repeat(bar, axis=1) if top > 0 else np.zeros((panel_h, bar))
    canvas.paste(Image.fromarray(np.rint(ramp).astype(np.uint8)).convert("RGB"), (x0, y0))
    draw.rectangle([x0 - 1, y0 - 1, x0 + bar, y0 + panel_h], outline=(0, 0, 0))
    for value, text in ticks:
        y = y0 + round((1 - (value / top if top > 0 else 0)) * (panel_h - 1))
        draw.line([x0 + bar, y, x0 + bar + 4, y], fill=(0, 0, 0))
        draw.text((x0 + bar + 6, min(max(y - 7, y0 - 4), y0 + panel_h - 10)), text, fill=(0, 0, 0), font=small)
    return canvas, [title, subtitle, *(text for _, text in ticks)]


def _font(size: int):
    """Pillow's default font at ``size`` px where FreeType is available, its bitmap font otherwise."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()
