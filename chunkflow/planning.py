"""``plan``: validate a job once, create its output volume, write its manifest.

Nothing is written until every check has passed: a bad flag leaves no manifest and no
output volume behind.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from chunkflow.backends import check_device, load_backend, model_checksum, require_device
from chunkflow.bbox import Vec
from chunkflow.errors import MissingInput
from chunkflow.geometry import GeometryError, Layout
from chunkflow.job import (COMPRESSIONS, DONATION_DTYPES, MANIFEST, Job, JobError, default_storage_chunk,
                           validate_parameters)
from chunkflow.masking import BLOCK_MAP, encode_block_map, masked_blocks, open_mask
from chunkflow.region import check_output_region, parse_region
from chunkflow.storage import DirectoryStore, ObjectStore, StorageError, create_volume, open_store, open_volume
from chunkflow.storage.sharding import check_shards_tile, output_shard
from chunkflow.storage.volume_factory import check_output_compression
from chunkflow.storage.volume_urls import same_or_nested, volume_format, volume_location
from chunkflow.storage.volumes import input_missing

log = logging.getLogger(__name__)


def plan(input: str, output: str, donations: str, model: str, input_patch, **options) -> Job:
    """Validate every parameter, create the output volume if needed, write the manifest.

    Takes the arguments of ``make_job``. Planning the same parameters twice returns the
    existing job; planning different ones into a store that already holds a job is refused
    (it would mix two jobs' donations).
    """
    store = open_store(donations)
    check_store(store)
    job, existing_output, source = make_job(input, output, store.url, model, input_patch, **options)
    previous = _existing_job(store)
    if previous is not None and previous.job_hash != job.job_hash:
        raise JobError(f"{store.url} already holds job {previous.job_hash} with other parameters; give a new "
                       f"--donations location (or delete that one)")
    if existing_output is None:
        create_volume(output, job.layout.bbox, Vec(job.storage_chunk), job.out_channels, job.output_dtype,
                      resolution=source.resolution, compression=job.output_compression, shard=output_shard(job))
    block_map = _block_map(job, source) if job.mask and not store.exists(BLOCK_MAP) else None
    if previous is None and store.put(MANIFEST, job.to_json().encode(), if_absent=True):
        log.info("planned job %s: %d blocks, %d patches", job.job_hash, job.layout.num_blocks, job.layout.num_patches)
    if block_map is not None:
        store.put(BLOCK_MAP, block_map)
    planned = load_job(store)
    if planned.job_hash != job.job_hash:  # another planner won a race to this store
        raise JobError(f"{store.url} already holds job {planned.job_hash} with other parameters; give a new "
                       f"--donations location (or delete that one)")
    return planned


def make_job(
    input: str,
    output: str,
    store: str,
    model: str,
    input_patch: str | tuple,
    output_patch: str | tuple | None = None,
    overlap: str | tuple = "0,0,0",
    block: str | tuple | None = None,
    weights: str | None = None,
    blend: str = "gaussian",
    dtype: str = "float32",
    pad_mode: str = "reflect",
    precision: str = "float32",
    device: str = "cpu",
    batch_size: int = 1,
    storage_chunk: str | tuple | None = None,
    donation_dtype: str = "float32",
    compression: str = "none",
    fill_missing: bool = False,
    bbox: str | None = None,
    mip: int = 0,
    output_compression: str = "default",
    mask: str | None = None,
    mask_mip: int = 0,
    sharded: bool = False,
    device_here: bool = True,
):
    """Validate everything and build the Job, writing nothing.

    ``bbox``: the region ``x0-x1_y0-y1_z0-z1`` to compute, in voxels of level ``mip`` (default:
    the whole input). ``sharded``: a new output is created sharded (an existing one is written sharded
    if it is). ``device_here``: the model is also loaded on ``device`` on this machine (False when the
    workers are elsewhere, e.g. a Dask scheduler's). Returns ``(job, existing output volume or
    None, input volume)``.
    """
    in_patch = Vec.parse(input_patch, "input patch")
    out_patch = Vec.parse(output_patch, "output patch") if output_patch is not None else in_patch
    overlap_v = Vec.parse(overlap, "overlap")
    validate_parameters(in_patch, out_patch, blend, dtype, pad_mode, precision)
    if donation_dtype not in DONATION_DTYPES:
        raise JobError(f"donation dtype {donation_dtype!r} is not one of {', '.join(DONATION_DTYPES)}")
    if compression not in COMPRESSIONS:
        raise JobError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise JobError(f"--batch-size {batch_size!r} must be a positive integer")
    for flag, value in (("--fill-missing", fill_missing), ("--sharded", sharded)):
        if not isinstance(value, bool):
            raise JobError(f"{flag} takes no value (got {value!r})")
    check_locations(input, output, store)
    for flag, value in (("--mip", mip), ("--mask-mip", mask_mip)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise JobError(f"{flag} {value!r} is not a resolution level (0, 1, 2, ...)")
    if mask is not None and (not isinstance(mask, str) or not mask):
        raise JobError(f"--mask {mask!r} is not a volume URL")
    if mask is not None:
        if same_or_nested(volume_location(mask), volume_location(output)):
            raise JobError(f"--mask {mask} is the output {output} (or inside it, or holds it); give the mask layer")
        open_volume(mask, missing="zeros", mip=mask_mip)  # refused here if absent or without that level
    if not isinstance(output_compression, str):
        raise JobError(f"--output-compression {output_compression!r} is not a codec name")

    if dtype == "float16" and volume_format(output) == "precomputed":
        raise JobError(f"output dtype float16 is not supported by Neuroglancer precomputed ({output}); use float32 "
                       "or uint8, or a zarr output")
    source = open_volume(input, missing=input_missing(fill_missing), mip=mip)
    bbox = parse_region(bbox, source.bbox, mip)
    block_v = Vec.parse(block, "block") if block is not None else Vec(min(s, 128) for s in bbox.shape)
    check_device(device)
    backend = load_backend(model, weights, device="cpu", precision="float32")
    if device_here and device != "cpu":
        require_device(device)
        load_backend(model, weights, device=device, precision=precision)
    out_channels, produced = backend.output_shape(tuple(in_patch), source.num_channels)
    if Vec(produced) not in (out_patch, in_patch):
        raise JobError(f"model {model} turns an input patch of {_zyx(in_patch)} into {_zyx(produced)}; give "
                       f"--output-patch {_zyx(produced)} (or a patch the model supports)")

    existing = _existing_output(output)
    if existing is not None:
        if existing.num_channels != out_channels or str(existing.dtype) != dtype:
            raise JobError(f"output {output} has {existing.num_channels} channels of {existing.dtype}; the job "
                           f"makes {out_channels} channels of {dtype}")
        if sharded and not existing.sharded:
            raise JobError(f"output {output} exists unsharded; --sharded applies to new outputs only (leave it out, "
                           "or give a new output)")
        sharded = existing.sharded  # a sharded output is written whole blocks at a time, flag or not
        if tuple(existing.resolution) != tuple(source.resolution):
            raise JobError(f"output {output} has voxels of {_zyx_f(existing.resolution)} nm (z,y,x), the input at "
                           f"mip {mip} has {_zyx_f(source.resolution)} nm; give an output at the input's resolution")
        chunk = existing.chunk_size
        check_output_region(bbox, existing.bbox, chunk, output, source.bbox)
        have = getattr(existing, "compression", None)
        if output_compression != "default" and have is not None and have != output_compression:
            raise JobError(f"output {output} exists with compression {have}; --output-compression "
                           f"{output_compression} applies to new outputs only (leave it out, or give a new output)")
    else:
        check_output_compression(output, output_compression, dtype, out_channels)
        chunk = Vec.parse(storage_chunk, "storage chunk") if storage_chunk is not None else default_storage_chunk(block_v)
    try:
        Layout(bbox, out_patch, overlap_v, block_v, chunk)
    except GeometryError as err:
        raise JobError(str(err)) from None
    if existing is not None and existing.sharded:
        check_shards_tile(bbox, existing, block_v, output)
    if not fill_missing and not source.has_data():
        raise MissingInput(f"input {input} holds no chunks at all (its info file promises {bbox.name}); plan with "
                           "--fill-missing if it is meant to be zeros")
    job = Job(input=input, output=output, store=store, bbox=bbox.name, input_patch=in_patch,
              output_patch=out_patch, overlap=overlap_v, block=block_v, storage_chunk=chunk, blend=blend,
              model=model, weights=weights, model_checksum=model_checksum(model, weights),
              in_channels=source.num_channels, out_channels=out_channels, output_dtype=dtype, pad_mode=pad_mode,
              precision=precision, donation_dtype=donation_dtype, donation_compression=compression,
              device=device, batch_size=batch_size, fill_missing=fill_missing, mip=mip,
              output_compression=output_compression, mask=mask, mask_mip=mask_mip, sharded=sharded)
    if existing is None:
        output_shard(job)  # refuses a block that the new output's shards cannot tile
    return job, existing, source


def check_locations(input: str, output: str, store: str | None) -> None:
    """Refuse an output that is (or holds, or lies inside) the input, and a job store that is
    either volume: the first write would destroy data that this job reads or writes."""
    source, target = volume_location(input), volume_location(output)
    if same_or_nested(source, target):
        raise JobError(f"output {output} is the input {input} (or inside it, or holds it): the job would overwrite "
                       "its own input; give another output location")
    if store:
        where = store[len("file://"):] if store.startswith("file://") else store
        where = os.path.realpath(where) if "://" not in where else where.rstrip("/")
        for flag, url, location in (("input", input, source), ("output", output, target)):
            if same_or_nested(where, location):
                raise JobError(f"--donations {store} is the {flag} volume {url} (or inside it, or holds it); give "
                               "the job store a location of its own")


def check_store(store: ObjectStore) -> None:
    """Refuse a job store that cannot be written, before anything is created: a local path that
    is a file, or lies under a file, or under a directory this user may not write."""
    if not isinstance(store, DirectoryStore):
        return
    root = Path(store.root)
    if root.exists() and not root.is_dir():
        raise StorageError(f"--donations {root} is a file, not a directory; give a directory path (it is created "
                           "if absent)")
    parent = root
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StorageError(f"--donations {root}: {parent} is a file, so the job store cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"--donations {root}: {parent} is not writable by this user")


def _block_map(job: Job, source) -> bytes:
    """The bit map of blocks with no patch in the mask (computed before anything is written)."""
    masked, kept = masked_blocks(job, open_mask(job, source.resolution))
    log.info("mask %s: %d of %d blocks and %d of %d patches skipped", job.mask, int(masked.sum()), len(masked),
             job.layout.num_patches - kept, job.layout.num_patches)
    return encode_block_map(masked)


def load_job(store: str | ObjectStore) -> Job:
    """Read and verify the manifest of the job in ``store`` (a URL or an open store)."""
    store = open_store(store) if isinstance(store, str) else store
    job = _existing_job(store)
    if job is None:
        raise JobError(f"no job at {store.url}: run `chunkflow plan` first")
    return job


def _existing_job(store: ObjectStore) -> Job | None:
    try:
        text = store.get(MANIFEST).decode()
    except KeyError:
        return None
    return Job.from_json(text, where=f"{store.url}/{MANIFEST}").at(store.url)


def _existing_output(url: str):
    try:
        return open_volume(url)
    except StorageError:
        return None


def _zyx_f(v) -> str:
    return ",".join(f"{float(x):g}" for x in v)


def _zyx(v) -> str:
    return ",".join(str(int(x)) for x in v)
