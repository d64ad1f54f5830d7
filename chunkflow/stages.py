"""The two stages, as plain functions of (job, block). No engine in sight.

``inference_and_donate`` (stage one, one block, GPU): blended inference over the patches the
block owns, its core written to the output volume, every other piece of its chunk donated.

``receive_and_blend`` (stage two, one block, CPU): every expected piece fetched and verified,
summed in key order, cast, and written over the block's band. It reads only donations and
writes only the band, so running it again (or after a crash half-way) writes the same bytes.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from chunkflow.backends import Backend, load_backend
from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import weight_map, weight_sum
from chunkflow.inference import blended_inference, to_float
from chunkflow.job import Job
from chunkflow.storage import ObjectStore, Volume, open_store, open_volume
from chunkflow.storage.donation_codec import DonationError, decode_donation, encode_donation

log = logging.getLogger(__name__)

DONATIONS = "donations/"


class MissingDonations(RuntimeError):
    """Stage two found pieces missing or refused; nothing was written."""

    def __init__(self, block: Bbox, missing: list[str], corrupt: list[str]):
        self.block, self.missing, self.corrupt = block, missing, corrupt
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing)}")
        if corrupt:
            parts.append(f"{len(corrupt)} refused: {'; '.join(corrupt)}")
        super().__init__(f"block {block.name} cannot be blended, donations {' and '.join(parts)}; nothing was written")


@dataclass
class Stats:
    """What one task did, for progress summaries."""

    patches: int = 0
    voxels: int = 0
    donated_bytes: int = 0
    donations: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def time(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now

    def add(self, other: "Stats") -> None:
        self.patches += other.patches
        self.voxels += other.voxels
        self.donated_bytes += other.donated_bytes
        self.donations += other.donations
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


class Resources:
    """What a worker opens once and reuses across the tasks of one job."""

    def __init__(self, job: Job, backend: Backend | None = None):
        self.job = job
        self._backend = backend

    @cached_property
    def input(self) -> Volume:
        return open_volume(self.job.input)

    @cached_property
    def output(self) -> Volume:
        return open_volume(self.job.output)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.job.store)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = load_backend(self.job.model, self.job.weights, self.job.device, self.job.precision)
        return self._backend

    @cached_property
    def weights(self) -> np.ndarray:
        return weight_map(self.job.blend, self.job.output_patch)


def done_marker(stage: int, block: Bbox) -> str:
    return f"done/stage{stage}/{block.name}"


def inference_and_donate(job: Job, block: Vec, res: Resources | None = None, progress=None) -> Stats:
    """Stage one for block index ``block``: infer its chunk, write its core, donate the rest."""
    res = res or Resources(job)
    layout, stats = job.layout, Stats()
    box = layout.block_box(block)
    chunk = layout.chunk_box(block)
    t = time.perf_counter()
    if chunk is not None:
        out = _infer_region(job, res, chunk, layout.own_origins(block), stats, progress)
        t = time.perf_counter()
        core = layout.core_box(block)
        if not core.is_empty():
            res.output.write(core, cast_output(out[(slice(None),) + core.slices(chunk)], job.output_dtype))
            stats.voxels += core.size
        t = stats.time("write", t)
        for donation in layout.donations_from(block):
            piece = out[(slice(None),) + donation.piece.slices(chunk)].astype(job.donation_dtype)
            data = encode_donation(np.ascontiguousarray(piece), donation.piece, donation.key, job.job_hash,
                                   compression=job.donation_compression)
            res.store.put(DONATIONS + donation.key, data)
            stats.donated_bytes += len(data)
            stats.donations += 1
        t = stats.time("donate", t)
    _mark_done(res.store, 1, box, job, stats)
    return stats


def _infer_region(job: Job, res: Resources, region: Bbox, origins: list[Vec], stats: Stats, progress) -> np.ndarray:
    t = time.perf_counter()
    image_box = region.grow(job.context_margin)
    image = to_float(res.input.read(image_box, pad_mode=job.pad_mode))
    t = stats.time("read", t)
    normaliser = weight_sum(res.weights, job.layout.origins_overlapping(region), region)
    model_time = [0.0]

    def predict(batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        result = res.backend.predict(batch)
        model_time[0] += time.perf_counter() - started
        stats.patches += len(batch)
        return result

    out = blended_inference(image, image_box, origins, region, normaliser, res.weights, predict,
                            Vec(job.input_patch), job.out_channels, job.batch_size, progress)
    t = stats.time("blend", t)
    stats.seconds["model"] = stats.seconds.get("model", 0.0) + model_time[0]
    stats.seconds["blend"] -= model_time[0]
    return out


def receive_and_blend(job: Job, block: Vec, res: Resources | None = None, cleanup: bool = False) -> Stats:
    """Stage two for block index ``block``: verify, sum and write every donated piece."""
    res = res or Resources(job)
    layout, stats = job.layout, Stats()
    box = layout.block_box(block)
    bands = layout.band_boxes(block)
    expected = layout.donations_to(block)
    t = time.perf_counter()
    if bands:
        blobs = res.store.get_many([DONATIONS + d.key for d in expected])
        t = stats.time("fetch", t)
        missing, corrupt, pieces = [], [], []
        for donation in expected:
            data = blobs.get(DONATIONS + donation.key)
            if data is None:
                missing.append(donation.key)
                continue
            try:
                _, array = decode_donation(data, donation.key, job.job_hash)
            except DonationError as err:
                corrupt.append(str(err))
                continue
            pieces.append((donation.piece, array))
            stats.donated_bytes += len(data)
        if missing or corrupt:
            raise MissingDonations(box, missing, corrupt)
        t = stats.time("verify", t)
        region = _union(bands)
        total = np.zeros((job.out_channels,) + tuple(region.shape), dtype=np.float32)
        for piece, array in pieces:
            total[(slice(None),) + piece.slices(region)] += array
        t = stats.time("blend", t)
        for band in bands:
            res.output.write(band, cast_output(total[(slice(None),) + band.slices(region)], job.output_dtype))
            stats.voxels += band.size
        t = stats.time("write", t)
        stats.donations = len(pieces)
    _mark_done(res.store, 2, box, job, stats)
    if cleanup:
        for donation in expected:
            res.store.delete(DONATIONS + donation.key)
    return stats


def reference(job: Job, res: Resources | None = None, progress=None) -> np.ndarray:
    """Whole-volume blended inference in one process: what the two stages must reproduce."""
    res = res or Resources(job)
    region = job.layout.bbox
    return _infer_region(job, res, region, list(job.layout.all_origins()), Stats(), progress)


def cast_output(data: np.ndarray, dtype: str) -> np.ndarray:
    """float32 and float16 are cast; uint8 maps [0, 1] to 0..255 (clipped, rounded)."""
    if dtype == "uint8":
        return np.rint(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8)
    return data.astype(dtype, copy=False)


def is_done(store: ObjectStore, stage: int, block: Bbox) -> bool:
    return store.exists(done_marker(stage, block))


def _mark_done(store: ObjectStore, stage: int, block: Bbox, job: Job, stats: Stats) -> None:
    record = {"job": job.job_hash, "block": block.name, "patches": stats.patches, "voxels": stats.voxels,
              "donated_bytes": stats.donated_bytes, "seconds": stats.seconds, "finished": time.time()}
    store.put(done_marker(stage, block), json.dumps(record).encode())


def _union(boxes: list[Bbox]) -> Bbox:
    start = Vec(min(b.start[a] for b in boxes) for a in range(3))
    stop = Vec(max(b.stop[a] for b in boxes) for a in range(3))
    return Bbox(start, stop)
