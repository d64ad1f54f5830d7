"""What a job will do, before it runs: ``chunkflow plan --dry-run``. Writes nothing.

Counts (tasks, patches, donation objects and bytes, redundant compute, output bytes, the largest
stage-one task's buffers) come from the layout's per-axis plans, never from a list of blocks:
the block grid is the product of three axes, and every count is a sum over blocks of a product
of per-axis terms, so it equals a product of per-axis sums. For instance the pieces block ``k``
donates to other blocks number ``prod_a |receivers_a(k_a)| - 1``. Planning a petavoxel job with
millions of blocks therefore costs a loop over each axis's blocks (thousands), in milliseconds
and kilobytes.

The time estimate comes from a short calibration: the model runs a few batches of random patches
on this machine's device, and ``patches in the grid x seconds per patch`` is the model time of
the whole job on one such worker. The blending, I/O and donation overhead around the model is
not in it (the benchmarks in ``docs/benchmarks.md`` measure it).

The same per-axis sums count the objects the job reads and writes (:func:`io_counts`: input
chunks, output chunks or shards), and :mod:`chunkflow.cost_model` adds the markers and turns it
all into requests, bytes at the peak, worker-hours and dollars at the ``--price-*`` flags' prices.

A hypothetical volume needs no data: ``python -m chunkflow.dryrun --shape 100000,100000,100000
--input-patch 20,256,256 --overlap 4,64,64 --block 112,1152,1152`` (model ``identity`` unless
given).
"""
from __future__ import annotations

import json as _json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from chunkflow.units import human_bytes
from chunkflow.backends import Backend
from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.cost_model import (DEFAULT_PRICES, CostEstimate, JobCounts, Prices, dollars, cost_lines, estimate,
                                  takes_prices)
from chunkflow.geometry import AxisPlan, GeometryError, Layout
from chunkflow.io_counts import IoCounts, io_counts
from chunkflow.job_params import documented_fields

log = logging.getLogger(__name__)

_HEADER_BYTES = 320  # a donation object's magic, length and JSON header, roughly


@dataclass(frozen=True)
class _Axis:
    """Per-axis sums over this axis's blocks (each term already zero for blocks without a chunk)."""

    with_chunk: int        # blocks that own at least one patch
    own: int               # patches owned
    receivers: int         # sum of |receivers|
    chunk: int             # sum of chunk lengths
    self_len: int          # sum of |chunk & own block|
    band: int              # sum of |chunk & [start, core)|       (the band slab along this axis)
    band_hits: int         # blocks where that is non-empty
    core: int              # sum of |chunk & [core, stop)|
    core_hits: int         # blocks where that is non-empty
    self_hits: int         # blocks where |chunk & own block| > 0
    max_chunk: int         # the longest chunk


def _axis_sums(ax: AxisPlan) -> _Axis:
    totals = dict.fromkeys(("with_chunk", "own", "receivers", "chunk", "self_len", "band", "band_hits", "core",
                            "core_hits", "self_hits", "max_chunk"), 0)
    for k in range(ax.num_blocks):
        ch = ax.chunk(k)
        if ch is None:
            continue
        lo, hi = ax.own(k)
        bs, be = ax.block_range(k)
        core = ax.core_start(k)
        self_len = max(0, min(ch[1], be) - max(ch[0], bs))
        band = max(0, min(ch[1], core) - max(ch[0], bs))
        core_len = max(0, min(ch[1], be) - max(ch[0], core))
        totals["with_chunk"] += 1
        totals["own"] += hi - lo
        totals["receivers"] += len(ax.receivers(k))
        totals["chunk"] += ch[1] - ch[0]
        totals["self_len"] += self_len
        totals["band"] += band
        totals["band_hits"] += band > 0
        totals["core"] += core_len
        totals["core_hits"] += core_len > 0
        totals["self_hits"] += self_len > 0
        totals["max_chunk"] = max(totals["max_chunk"], ch[1] - ch[0])
    return _Axis(**totals)


@dataclass(frozen=True)
class PlanSummary:
    """Everything the dry run reports about a layout (no calibration)."""

    blocks: int
    stage_one_tasks: int
    stage_two_tasks: int
    patches_grid: int
    patches_computed: int
    donations: int
    donations_between_blocks: int
    donated_voxels: int
    donated_voxels_between_blocks: int
    donated_bytes: int
    output_voxels: int
    output_bytes: int
    largest_chunk: Vec
    task_bytes: int

    @property
    def redundancy(self) -> float:
        """Patches computed over patches in the grid: 1.0 when every patch runs exactly once."""
        return self.patches_computed / self.patches_grid


def summarise(layout: Layout, out_channels: int = 1, output_dtype: str = "float32", donation_dtype: str = "float32",
              in_channels: int = 1, input_dtype: str = "uint8", context: Sequence[int] = (0, 0, 0),
              input_patch: Sequence[int] | None = None, batch_size: int = 1) -> PlanSummary:
    """Counts for the whole job in time and memory proportional to the number of blocks per axis.

    ``task_bytes`` is the largest stage-one task's buffers: its input chunk (stored dtype, grown by
    the context margin), its float32 output chunk, and one batch of input and output patches.
    """
    axes = [_axis_sums(ax) for ax in layout.axes]

    def prod(field: str) -> int:
        return int(np.prod([getattr(a, field) for a in axes], dtype=object))

    tasks = prod("with_chunk")
    between = prod("receivers") - tasks
    between_voxels = prod("chunk") - prod("self_len")
    band_pieces, band_voxels = 0, 0
    for a in range(3):  # slab a of the band: core along axes < a, band along a, whole block along > a
        hits = [axes[b].core_hits if b < a else axes[b].band_hits if b == a else axes[b].self_hits for b in range(3)]
        lens = [axes[b].core if b < a else axes[b].band if b == a else axes[b].self_len for b in range(3)]
        band_pieces += int(np.prod(hits, dtype=object))
        band_voxels += int(np.prod(lens, dtype=object))
    donated = between_voxels + band_voxels
    pieces = between + band_pieces
    if layout.whole_block_writes:  # a sharded output: each block's core travels as pieces of its own too
        donated += prod("core")
        pieces += _core_pieces(layout)
    chunk = Vec(a.max_chunk for a in axes)
    in_patch = Vec(input_patch) if input_patch is not None else layout.patch + 2 * Vec(context)
    task = (in_channels * np.dtype(input_dtype).itemsize * (chunk + 2 * Vec(context)).prod()
            + out_channels * 4 * chunk.prod()
            + batch_size * 4 * (in_channels * in_patch.prod() + out_channels * layout.patch.prod()))
    return PlanSummary(
        blocks=layout.num_blocks, stage_one_tasks=tasks, stage_two_tasks=layout.num_blocks,
        patches_grid=layout.num_patches, patches_computed=prod("own"),
        donations=pieces, donations_between_blocks=between, donated_voxels=donated,
        donated_voxels_between_blocks=between_voxels,
        donated_bytes=donated * out_channels * np.dtype(donation_dtype).itemsize + pieces * _HEADER_BYTES,
        output_voxels=layout.bbox.size, output_bytes=layout.bbox.size * out_channels * np.dtype(output_dtype).itemsize,
        largest_chunk=chunk, task_bytes=int(task))


def _core_pieces(layout: Layout) -> int:
    """How many core pieces (``Layout.core_pieces``) all blocks send, from the distinct core lengths per axis."""
    counts = [Counter(ax.block_range(k)[1] - ax.core_start(k) for k in range(ax.num_blocks) if ax.chunk(k) is not None)
              for ax in layout.axes]
    return sum(nz * ny * nx * -(-z // layout.core_slab(y * x)) for z, nz in counts[0].items()
               for y, ny in counts[1].items() for x, nx in counts[2].items() if z and y and x)


def job_counts(summary: PlanSummary, io: IoCounts, calibration: Calibration | None = None) -> JobCounts:
    """The numbers :func:`chunkflow.cost_model.estimate` takes, from the dry run's counts.

    Args:
        summary: the layout's counts (:func:`summarise`).
        io: its object counts (:func:`io_counts`).
        calibration: the model's timing, for the GPU hours (None: not estimated).
    """
    seconds = None if calibration is None else summary.patches_computed * calibration.seconds_per_patch
    return JobCounts(stage_one_tasks=summary.stage_one_tasks, stage_two_tasks=summary.stage_two_tasks,
                     input_reads=io.input_reads, output_objects=io.output_objects, core_objects=io.core_objects,
                     donations=summary.donations, output_bytes=summary.output_bytes,
                     donated_bytes=summary.donated_bytes, output_voxels=summary.output_voxels, model_seconds=seconds)


@dataclass(frozen=True)
class Calibration:
    seconds_per_patch: float
    patches: int
    device: str


def calibrate(backend: Backend, input_patch: Sequence[int], in_channels: int = 1, batch_size: int = 1,
              batches: int = 3, seed: int = 0) -> Calibration:
    """Seconds per patch of ``backend`` on random patches: one warm-up batch, then ``batches`` timed."""
    rng = np.random.default_rng(seed)
    batch = rng.random((max(1, batch_size), in_channels, *input_patch), dtype=np.float32)
    backend.predict(batch)
    started = time.perf_counter()
    for _ in range(batches):
        backend.predict(batch)
    elapsed = time.perf_counter() - started
    patches = batches * len(batch)
    return Calibration(elapsed / patches, patches, backend.device)


def report_lines(summary: PlanSummary, layout: Layout, calibration: Calibration | None = None) -> list[str]:
    """The dry run's printout."""
    s = summary
    lines = [
        f"dry run: nothing was written. {s.blocks:,} blocks of {zyx_text(layout.block)} ({zyx_text(layout.grid_shape)} z,y,x) "
        f"over {layout.bbox.name} ({s.output_voxels:,} voxels)",
        f"  tasks: {s.stage_one_tasks:,} stage one (inference-and-donate), {s.stage_two_tasks:,} stage two "
        f"(receive-and-blend)" + _patchless(s),
        f"  patches: {s.patches_grid:,} in the grid, {s.patches_computed:,} computed; redundant compute "
        f"{s.patches_computed:,} / {s.patches_grid:,} = {s.redundancy:.3f}",
        f"  donations: {s.donations:,} objects ({s.donations_between_blocks:,} between blocks, "
        f"{s.donations - s.donations_between_blocks:,} to a block's own band), {human_bytes(s.donated_bytes)} "
        f"uncompressed = {s.donated_bytes / s.output_bytes:.3f} x the output",
        f"  output: {human_bytes(s.output_bytes)} in storage chunks of {zyx_text(layout.storage_chunk)} z,y,x"
        + (" (each block's core written whole, in its shard)" if layout.whole_block_writes else ""),
        f"  largest stage-one task: chunk {zyx_text(s.largest_chunk)}, ~{human_bytes(s.task_bytes)} of buffers "
        f"(input + output chunk + one batch; plus one more input chunk where the next block's input is "
        f"prefetched, and the model)",
    ]
    if calibration is not None:
        seconds = s.patches_computed * calibration.seconds_per_patch
        rate = s.output_voxels / seconds if seconds > 0 else float("inf")
        lines.append(f"  calibration on {calibration.device}: {calibration.seconds_per_patch * 1000:.1f} ms per patch "
                     f"({calibration.patches} patches timed)")
        lines.append(f"  estimate, model time on one such worker: {rate:,.0f} voxels/s, {seconds / 3600:,.2f} hours "
                     f"({seconds / 3600 / 24:,.2f} days); divide by the number of workers")
    return lines



def _patchless(s: PlanSummary) -> str:
    """Why some blocks have no stage-one task: no patch of the grid starts in them."""
    idle = s.blocks - s.stage_one_tasks
    if idle <= 0:
        return ""
    return (f"; {idle:,} of the {s.blocks:,} blocks own no patch (no patch of the grid starts in them: the last "
            "patch along an axis starts in the block before and ends flush with the volume, and a block narrower "
            "than the patch stride can fall between two starts), so they run no model and stage two fills them "
            "from their neighbours' donations")


def dry_run_job(job, calibrate_batches: int = 3, prices: Prices = DEFAULT_PRICES) -> list[str]:
    """Report lines for a validated :class:`chunkflow.job.Job`, calibrating its model on its device.

    Args:
        job: the job.
        calibrate_batches: batches timed for the estimate (0: no calibration, no GPU hours).
        prices: the cost model's prices (:mod:`chunkflow.cost_model`).
    """
    from chunkflow.backends import load_backend

    layout = job.layout
    dtype, input_box, input_chunk = _input_geometry(job)
    summary = summarise(layout, job.out_channels, job.output_dtype, job.donation_dtype, job.in_channels,
                        dtype, job.context_margin, job.input_patch, job.batch_size)
    io = io_counts(layout, job.context_margin, input_box, input_chunk, _output_unit(job))
    calibration = None
    if calibrate_batches > 0:
        backend = load_backend(job.model, job.weights, job.device, job.precision)
        calibration = calibrate(backend, job.input_patch, job.in_channels, job.batch_size, calibrate_batches)
    cost = estimate(job_counts(summary, io, calibration), prices)
    return report_lines(summary, layout, calibration) + cost_lines(cost, human_bytes) + _mask_lines(job, cost)


def report_dict(summary: PlanSummary, layout: Layout, calibration: Calibration | None, cost: CostEstimate) -> dict:
    """The report's numbers, for JSON: the layout's counts, the calibration and the cost model's numbers.

    Args:
        summary: the layout's counts.
        layout: the layout.
        calibration: the model's timing (None: not calibrated).
        cost: the cost model's estimate.
    """
    counts = asdict(summary)
    counts.update(largest_chunk=list(summary.largest_chunk), redundancy=summary.redundancy,
                  grid_shape=list(layout.grid_shape), block=list(layout.block), region=layout.bbox.name)
    return {"plan": counts, "calibration": None if calibration is None else asdict(calibration),
            "cost": cost.as_dict()}


def _mask_lines(job, cost: CostEstimate | None = None) -> list[str]:
    """What the mask saves: blocks with no stage-one task and patches not computed (reads the mask),
    and, with a calibrated ``cost``, the GPU time and total scaled by the patches computed."""
    if not job.mask:
        return []
    from chunkflow.masking import masked_blocks, open_mask
    from chunkflow.storage import open_volume

    layout = job.layout
    masked, kept = masked_blocks(job, open_mask(job, open_volume(job.input, mip=job.mip).resolution))
    skipped = layout.num_patches - kept
    lines = [f"mask {job.mask} (mip {job.mask_mip}): {int(masked.sum()):,} of {layout.num_blocks:,} blocks get no "
             f"stage-one task, {skipped:,} of {layout.num_patches:,} patches ({skipped / layout.num_patches:.0%}) "
             "are not computed (the counts and costs above are without the mask)"]
    if cost is not None and cost.gpu is not None and layout.num_patches:
        share = kept / layout.num_patches
        lines.append(f"  with the mask: stage one {cost.gpu_hours * share:,.2f} GPU hours ({dollars(cost.gpu * share)}), "
                     f"in all about {dollars(cost.total - cost.gpu * (1 - share))} (the model time scaled by the "
                     "patches computed; reads, writes and stage two as without the mask, so an upper bound)")
    return lines


def _input_geometry(job) -> tuple[str, Bbox, Vec]:
    """The input's dtype, bounds and storage chunk at the job's mip."""
    from chunkflow.storage import open_volume

    volume = open_volume(job.input, mip=job.mip)
    return str(volume.dtype), volume.bbox, volume.chunk_size


def _output_unit(job) -> Vec | None:
    """The shard a sharded output is written in (None: its storage chunk)."""
    if not job.layout.whole_block_writes:
        return None
    from chunkflow.storage import StorageError, open_volume
    from chunkflow.storage.sharding import output_shard

    try:
        shard = open_volume(job.output).shard_size
    except StorageError:
        shard = None
    return shard if shard is not None else output_shard(job)


@documented_fields
@takes_prices
def hypothetical(shape: str, input_patch: str, block: str, overlap: str = "0,0,0", output_patch: str | None = None,
                 start: str = "0,0,0", storage_chunk: str | None = None, input_chunk: str | None = None,
                 model: str = "identity", weights: str | None = None, device: str = "cpu", batch_size: int = 1,
                 channels: int = 1, dtype: str = "float32", calibrate_batches: int = 3,
                 prices: Prices = DEFAULT_PRICES, json: bool = False) -> str:
    """Dry run against a volume that does not exist: ``--shape Z,Y,X`` (and ``--start``).

    The flags a planned job also has take the help of its parameters
    (:class:`chunkflow.job_params.JobParameters`).

    Args:
        shape: the hypothetical volume's size, ZYX, e.g. 100000,100000,100000.
        start: its first voxel, ZYX.
        input_chunk: its storage chunk, ZYX, for the count of input reads (default: the output's storage chunk).
        channels: its channels (the model's input channels).
        calibrate_batches: batches of random patches timed on --device for the estimate (0: no estimate).
        prices: the cost model's prices: the --price-* flags (:func:`chunkflow.cost_model.takes_prices`).
        json: print the numbers as one JSON object instead of the report.

    Returns:
        The report, one line per count.
    """
    from chunkflow.backends import load_backend
    from chunkflow.job import default_storage_chunk

    in_patch = Vec.parse(input_patch, "input patch")
    out_patch = Vec.parse(output_patch, "output patch") if output_patch else in_patch
    block_v = Vec.parse(block, "block")
    chunk = Vec.parse(storage_chunk, "storage chunk") if storage_chunk else default_storage_chunk(block_v)
    layout = Layout(Bbox.from_shape(Vec.parse(start), Vec.parse(shape, "shape")), out_patch,
                    Vec.parse(overlap, "overlap"), block_v, chunk)
    in_chunk = Vec.parse(input_chunk, "input chunk") if input_chunk else chunk
    if min(in_chunk) <= 0:
        raise GeometryError(f"input chunk {zyx_text(in_chunk)} must be positive along z, y and x, e.g. 64,64,64")
    backend = load_backend(model, weights, device)
    out_channels, _ = backend.output_shape(tuple(in_patch), channels)
    context = (in_patch - out_patch) // 2
    summary = summarise(layout, out_channels, dtype, "float32", channels, "uint8", context, in_patch, batch_size)
    calibration = calibrate(backend, in_patch, channels, batch_size, calibrate_batches) if calibrate_batches else None
    cost = estimate(job_counts(summary, io_counts(layout, context, layout.bbox, in_chunk), calibration), prices)
    if json:
        return _json.dumps(report_dict(summary, layout, calibration, cost), indent=2)
    return "\n".join(report_lines(summary, layout, calibration) + cost_lines(cost, human_bytes))


if __name__ == "__main__":
    import fire

    from chunkflow.cli.common import user_errors

    fire.Fire(user_errors(hypothetical), name="python -m chunkflow.dryrun")
