"""PNG slices of donated pieces and blocks, for a person looking for seams or gaps.

A block is drawn as two panels of one z slice, on one shared grey scale:

* **donations**: the sum of the pieces the block received (what stage two adds), with
  every voxel no piece covers tinted: blue for the core (written by stage one, never
  donated), red where an expected piece is missing, magenta where one was refused
  (corrupt or another job's), amber where the block is blended and its pieces were
  cleaned up;
* **output**: the same slice of the output volume.

A piece is drawn alone. Everything is rendered in memory; the file is written only
once the image is complete, so a failure leaves no file behind.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.geometry import parse_key
from chunkflow.job import Job
from chunkflow.stages import DONATIONS, done_marker
from chunkflow.storage import ObjectStore, StorageError, open_volume
from chunkflow.storage.donation_codec import DonationError, decode_donation, read_header
from chunkflow.errors import UsageError


CORE, OK, CONSUMED, MISSING, REFUSED = 0, 1, 2, 3, 4
TINTS = {CORE: (40, 60, 140), MISSING: (200, 30, 30), REFUSED: (200, 0, 200), CONSUMED: (190, 130, 0)}
LEGEND = ((CORE, "core (no donation)"), (MISSING, "missing"), (REFUSED, "refused"), (CONSUMED, "consumed"))
CAPTION = 14


def render_piece(store: ObjectStore, key: str, job: Job | None = None, z: int | None = None, channel: int = 0):
    """One z slice of one donated piece (a PIL image). The piece is fully verified first."""
    try:
        _, piece = parse_key(key)
    except ValueError as err:
        raise UsageError(f"--piece: {err}") from None
    try:
        data = store.get(DONATIONS + key)
    except KeyError:
        raise UsageError(f"donation {key} is not in {store.url}") from None
    job_hash = job.job_hash if job is not None else read_header(data, key).job_hash
    _, array = decode_donation(data, key, job_hash)
    z = _pick_z(piece, z)
    c = _pick_channel(array.shape[0], channel)
    plane = array[c, z - piece.start[0]].astype(np.float32)
    lo, hi = _range([plane])
    panel = _panel(_grey(plane, lo, hi), np.full(plane.shape, OK, np.uint8))
    return _compose([(panel, [f"piece {key}", f"z={z} channel {c} range [{lo:.4g}, {hi:.4g}]"])], legend=False)


def render_block(store: ObjectStore, job: Job, block: str, z: int | None = None, channel: int = 0):
    """Summed donations of one block beside the output volume, one z slice.

    Returns the PIL image and the refusals (one line each) of pieces drawn as refused.
    """
    layout = job.layout
    box = Bbox.from_name(block)
    idx = layout.block_index_of(box)
    z = _pick_z(box, z)
    c = _pick_channel(job.out_channels, channel)
    blended = store.exists(done_marker(2, box))
    shape = tuple(box.shape[1:])
    total = np.zeros(shape, np.float32)
    state = np.full(shape, CORE, np.uint8)
    missing = np.zeros(shape, bool)
    pieces = [d for d in layout.donations_to(idx) if d.piece.start[0] <= z < d.piece.stop[0]]
    blobs = store.get_many([DONATIONS + d.key for d in pieces])
    refused = []
    for d in pieces:
        region = (slice(d.piece.start[1] - box.start[1], d.piece.stop[1] - box.start[1]),
                  slice(d.piece.start[2] - box.start[2], d.piece.stop[2] - box.start[2]))
        data = blobs[DONATIONS + d.key]
        if data is None:
            state[region] = np.maximum(state[region], CONSUMED if blended else MISSING)
            missing[region] = not blended
            continue
        try:
            _, array = decode_donation(data, d.key, job.job_hash)
        except DonationError as err:
            refused.append(str(err))
            state[region] = np.maximum(state[region], REFUSED)
            continue
        total[region] += array[c, z - d.piece.start[0]]
        state[region] = np.maximum(state[region], OK)
    output = _output_slice(job, box, z, c)
    # where a refused piece hides a missing one, show both as red and magenta stripes
    both = missing & (state == REFUSED)
    stripes = (np.add.outer(np.arange(shape[0]), np.arange(shape[1])) // 2) % 2 == 0
    state[both & stripes] = MISSING
    lo, hi = _range([total[state == OK], output])
    left = _panel(_grey(total, lo, hi), state)
    right = _panel(_grey(output, lo, hi), np.full(shape, OK, np.uint8))
    status = "blended" if blended else "not blended yet"
    return _compose([
        (left, [f"donations to {box.name} (sum)", f"z={z} channel {c}, {len(pieces)} pieces here, {status}"]),
        (right, [f"output {job.output}", f"z={z} channel {c}, grey range [{lo:.4g}, {hi:.4g}]"]),
    ], legend=True), refused


def check_png_path(path: str) -> None:
    """Refuse a PNG path whose directory does not exist before any work is done."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise StorageError(f"cannot write PNG {path}: directory {parent} does not exist")


def save_png(image, path: str) -> None:
    """Write the finished image; an unwritable path is a one-line :class:`StorageError`."""
    try:
        image.save(Path(path), format="PNG")
    except OSError as exc:
        raise StorageError(f"cannot write PNG {path}: {exc.strerror or exc}") from None


def _output_slice(job: Job, box: Bbox, z: int, c: int) -> np.ndarray:
    plane = Bbox(Vec(z, box.start[1], box.start[2]), Vec(z + 1, box.stop[1], box.stop[2]))
    data = open_volume(job.output).read(plane)[c, 0]
    if data.dtype == np.uint8:
        return data.astype(np.float32) / 255.0
    return data.astype(np.float32)


def _pick_z(box: Bbox, z: int | None) -> int:
    if z is None:
        return (box.start[0] + box.stop[0] - 1) // 2
    if not isinstance(z, int) or not box.start[0] <= z < box.stop[0]:
        raise UsageError(f"--z {z!r} is outside {box.name} (z from {box.start[0]} to {box.stop[0] - 1})")
    return z


def _pick_channel(channels: int, channel: int) -> int:
    if not isinstance(channel, int) or not 0 <= channel < channels:
        raise UsageError(f"--channel {channel!r} is not one of 0..{channels - 1}")
    return channel


def _range(arrays: list[np.ndarray]) -> tuple[float, float]:
    values = [a[np.isfinite(a)] for a in arrays if a.size]
    values = [v for v in values if v.size]
    if not values:
        return 0.0, 1.0
    lo = float(min(v.min() for v in values))
    hi = float(max(v.max() for v in values))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _grey(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.clip((np.nan_to_num(plane, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(scaled * 255).astype(np.uint8)


def _panel(grey: np.ndarray, state: np.ndarray) -> np.ndarray:
    """An RGB Y,X,3 array: grey values where ``state`` is OK, the state's tint elsewhere."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for code, colour in TINTS.items():
        rgb[state == code] = colour
    return rgb


def _compose(panels: list[tuple[np.ndarray, list[str]]], legend: bool):
    """Panels side by side, upscaled (nearest) so small blocks stay visible, captions above."""
    from PIL import Image, ImageDraw

    height, width = panels[0][0].shape[:2]
    scale = max(1, min(8, math.ceil(256 / max(height, width))))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = [max(width * scale, *(int(measure.textlength(t)) for t in captions)) for _, captions in panels]
    legend_width = sum(14 + int(measure.textlength(label)) + 16 for _, label in LEGEND) if legend else 0
    gap, top = 8, CAPTION * 2 + 4
    bottom = CAPTION + 6 if legend else 0
    canvas = Image.new("RGB", (max(sum(columns) + gap * (len(panels) + 1), legend_width + gap),
                               top + height * scale + bottom + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for (rgb, captions), column in zip(panels, columns):
        canvas.paste(Image.fromarray(rgb, "RGB").resize((width * scale, height * scale), Image.NEAREST), (x, top))
        for j, text in enumerate(captions):
            draw.text((x, 2 + j * CAPTION), text, fill=(0, 0, 0))
        x += column + gap
    if legend:
        x, y = gap, top + height * scale + 4
        for code, label in LEGEND:
            draw.rectangle([x, y, x + 10, y + 10], fill=TINTS[code])
            draw.text((x + 14, y - 1), label, fill=(0, 0, 0))
            x += 14 + int(draw.textlength(label)) + 16
    return canvas
