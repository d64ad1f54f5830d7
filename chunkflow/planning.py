"""``plan``: validate a job once, create its output volume, write its manifest.

Nothing is written until every check has passed: a bad flag leaves no manifest and no
output volume behind.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from chunkflow.backends import check_device, load_backend, model_checksum, require_device, verify_model
from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.done_reset import check_leftovers, holds_any, reset_done_state, reset_pending
from chunkflow.errors import MissingInput
from chunkflow.geometry import GeometryError, Layout
from chunkflow.job import (COMPRESSIONS, DONATION_DTYPES, Job, JobError, default_storage_chunk,
                           refuse_fraction_overlap, validate_parameters)
from chunkflow.job_params import JobParameters, takes_job_parameters
from chunkflow.masking import BLOCK_MAP, MASK_DIGEST, encode_block_map, mask_digest, masked_blocks, open_mask
from chunkflow.output_claims import check_claims, claim_output, read_record
from chunkflow.region import check_output_region, parse_region
from chunkflow.storage import DirectoryStore, ObjectStore, StorageError, create_volume, open_store, open_volume
from chunkflow.storage.sharding import check_shards_tile, output_shard
from chunkflow.store_layout import DONE, MANIFEST, OUTPUT_CLAIM
from chunkflow.storage.durability import job_durability
from chunkflow.storage.volume_factory import check_output_compression
from chunkflow.storage.volume_urls import absolute_url, classify, same_or_nested, volume_format, volume_location
from chunkflow.storage.volumes import input_missing

log = logging.getLogger(__name__)


@takes_job_parameters()
def plan(params: JobParameters, device_here: bool = True, force: bool = False) -> Job:
    """:func:`plan_job` of the :class:`JobParameters` given by keyword (``plan(input, output, ...)``).

    Args:
        params: the job's parameters.
        device_here: also load the model on ``device`` here (False when the workers are elsewhere).
        force: reset a job whose done markers no longer stand for its output (see :func:`plan_job`).
    """
    return plan_job(params, device_here, force)


def plan_job(params: JobParameters, device_here: bool = True, force: bool = False, check_only: bool = False) -> Job:
    """Validate every parameter, create the output volume if needed, write the manifest.

    Planning the same parameters twice returns the existing job; planning different ones into a
    store that already holds a job is refused (it would mix two jobs' donations).

    Args:
        params: the job's parameters (``params.donations`` is the job store).
        device_here: also load the model on ``params.device`` on this machine (False when the
            workers are elsewhere, e.g. a Dask scheduler's).
        force: a job whose done markers no longer stand for its output (deleted, replaced, written
            over by another job) is reset instead of refused: its done state is forgotten
            (:mod:`chunkflow.done_reset`) and every block is computed again.
        check_only: every check (the store, the output's claims, leftovers, the mask's metadata) and
            nothing written: what ``run`` does before it starts a cluster (a changed mask's data is
            found by the plan proper, still before the first write).

    Returns:
        The planned job, as its manifest holds it (with ``check_only``, as it would be planned).
    """
    if not isinstance(params.donations, str):  # Fire shifts a spilled value into the third positional slot
        raise JobError(f"--donations {params.donations!r} is not a store location: a value landed where DONATIONS "
                       "goes (sizes take commas, --overlap 4,16,16; a positional argument given again as a flag "
                       "shifts the ones after it)")
    store = open_store(params.donations)
    check_store(store)
    job, existing_output, source = make_job(replace(params, donations=store.url), device_here, claims=False)
    previous = _existing_job(store)
    if previous is not None and previous.job_hash != job.job_hash and _spelled_otherwise(previous, job):
        job = previous  # planned before local paths were stored absolute: the same job, resumed as it was
    if previous is not None and previous.job_hash != job.job_hash:
        if (previous.model, previous.weights) == (job.model, job.weights) \
                and previous.model_checksum != job.model_checksum:
            verify_model(previous.model, previous.weights, previous.model_checksum)  # one line naming the file
        raise _another_job(store, job, previous)
    interrupted = reset_pending(store)  # a reset began and was cut off: its markers are not to be trusted
    record = read_record(store)  # the claim this store made in the output, if it made one
    done = previous is not None and holds_any(store, f"{DONE}/")
    stale = False
    if existing_output is not None:  # after the store's refusal, which names what differs
        stale = check_claims(existing_output, job, params.overwrite, done and not interrupted, force, record)
    check_leftovers(store, job, previous is not None, existing_output is not None, done, force or interrupted)
    stale = stale or (done and existing_output is None)  # with force: the output was deleted after the run
    output = job.output
    block_map = digest = None
    if job.mask:  # a mask changed in place since the job was planned is refused, not mixed in
        mask = open_mask(job, source.resolution)
        if check_only:
            return job
        digest = mask_digest(job, mask)
        if store.exists(BLOCK_MAP):
            _check_mask_unchanged(store, job, digest)
        else:
            block_map = _block_map(job, mask)
    if check_only:
        return job
    if interrupted or stale:  # every check has passed: forget the done state before the first write
        reset_done_state(store, "finishing a reset that was cut off" if interrupted else
                         "its done markers no longer stand for its output (deleted, replaced or written over)")
    durable = job_durability(output, store)
    wrote = existing_output is None
    if existing_output is None:
        existing_output = create_volume(output, job.layout.bbox, Vec(job.storage_chunk), job.out_channels,
                                        job.output_dtype, resolution=source.resolution,
                                        compression=job.output_compression, shard=output_shard(job))
    claim = claim_output(existing_output, job, None if stale else record)  # before the first byte of data
    if claim is not None:  # the store remembers which claim is its own: workers refuse an output without it
        store.put(OUTPUT_CLAIM, json.dumps(claim).encode())
        wrote = True
    if previous is None and store.put(MANIFEST, job.to_json().encode(), if_absent=True):
        log.info("planned job %s: %d blocks, %d patches", job.job_hash, job.layout.num_blocks, job.layout.num_patches)
        wrote = True
    if block_map is not None:  # a new job survives a crash between its writes
        if digest is not None:
            store.put(MASK_DIGEST, digest.encode())
        store.put(BLOCK_MAP, block_map)
        wrote = True
    if wrote:
        durable.settle()
    planned = load_job(store)
    if planned.job_hash != job.job_hash:  # another planner won a race to this store
        raise _another_job(store, job, planned)
    return planned


def _another_job(store: ObjectStore, job: Job, held: Job) -> JobError:
    """The refusal to plan ``job`` into a store that holds ``held``, naming what differs."""
    differences = "; ".join(job.differences(held))
    which = f" ({differences})" if differences else ""
    return JobError(f"{store.url} already holds job {held.job_hash} with other parameters{which}; give a new "
                    "--donations location (or delete that one)")


def make_job(p: JobParameters, device_here: bool = True, claims: bool = True) -> tuple[Job, object | None, object]:
    """Validate everything and build the Job, writing nothing.

    Args:
        p: the job's parameters; ``p.donations`` is the job store's URL ("" for none: the
            reference), ``p.bbox`` the region in voxels of level ``p.mip`` (default: the whole
            input); ``p.sharded`` creates a new output sharded (an existing one is written
            sharded if it is).
        device_here: also load the model on ``p.device`` on this machine (False when the
            workers are elsewhere, e.g. a Dask scheduler's).
        claims: refuse a region of an existing output that another job claimed, unless
            ``p.overwrite`` (:mod:`chunkflow.output_claims`); ``plan_job`` checks it itself, later.

    Returns:
        ``(job, existing output volume or None, input volume)``.
    """
    in_patch = Vec.parse(p.input_patch, "input patch")
    out_patch = Vec.parse(p.output_patch, "output patch") if p.output_patch is not None else in_patch
    refuse_fraction_overlap(p.overlap, out_patch)
    overlap_v = Vec.parse(p.overlap, "overlap")
    validate_parameters(in_patch, out_patch, p.blend, p.dtype, p.pad_mode, p.precision)
    if p.donation_dtype not in DONATION_DTYPES:
        raise JobError(f"donation dtype {p.donation_dtype!r} is not one of {', '.join(DONATION_DTYPES)}")
    if p.compression not in COMPRESSIONS:
        raise JobError(f"compression {p.compression!r} is not one of {', '.join(COMPRESSIONS)}")
    if not isinstance(p.batch_size, int) or isinstance(p.batch_size, bool) or p.batch_size < 1:
        raise JobError(f"--batch-size {p.batch_size!r} must be a positive integer")
    for flag, value in (("--fill-missing", p.fill_missing), ("--sharded", p.sharded), ("--overwrite", p.overwrite)):
        if not isinstance(value, bool):
            raise JobError(f"{flag} takes no value (got {value!r})")
    check_locations(p.input, p.output, p.donations)
    p = replace(p, input=absolute_url(p.input), output=absolute_url(p.output))  # one volume from any directory
    for flag, value in (("--mip", p.mip), ("--mask-mip", p.mask_mip)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise JobError(f"{flag} {value!r} is not a resolution level (0, 1, 2, ...)")
    if p.mask is not None and (not isinstance(p.mask, str) or not p.mask):
        raise JobError(f"--mask {p.mask!r} is not a volume URL")
    if p.mask is not None:
        if same_or_nested(volume_location(p.mask), volume_location(p.output)):
            raise JobError(f"--mask {p.mask} is the output {p.output} (or inside it, or holds it); give the mask "
                           "layer")
        mask = open_volume(p.mask, missing="zeros", mip=p.mask_mip)  # refused here if absent or without that level
        p = replace(p, mask=absolute_url(p.mask))
    if not isinstance(p.output_compression, str):
        raise JobError(f"--output-compression {p.output_compression!r} is not a codec name")

    if p.dtype == "float16" and volume_format(p.output) == "precomputed":
        raise JobError(f"output dtype float16 is not supported by Neuroglancer precomputed ({p.output}); use float32 "
                       "or uint8, or a zarr output")
    source = open_volume(p.input, missing=input_missing(p.fill_missing), mip=p.mip)
    if not source.resolution_known:
        log.warning("input %s has no voxel size (a zarr array without a 'resolution' attribute): the output "
                    "is described as %s nm voxels", p.input, zyx_text(source.resolution, floats=True))
    if p.mask is not None:
        check_mask_resolution(mask, source, p.mask, p.mip)
    bbox = parse_region(p.bbox, source.bbox, p.mip)
    block_v = Vec.parse(p.block, "block") if p.block is not None else Vec(min(s, 128) for s in bbox.shape)
    check_device(p.device)
    backend = load_backend(p.model, p.weights, device="cpu", precision="float32")
    if device_here and p.device != "cpu":
        require_device(p.device)
        load_backend(p.model, p.weights, device=p.device, precision=p.precision)
    out_channels, produced = backend.output_shape(tuple(in_patch), source.num_channels)
    if Vec(produced) not in (out_patch, in_patch):
        raise JobError(f"model {p.model} turns an input patch of {zyx_text(in_patch)} into {zyx_text(produced)}; give "
                       f"--output-patch {zyx_text(produced)} (or a patch the model supports)")

    output, sharded = p.output, p.sharded
    existing = _existing_output(output)
    if existing is not None:
        if existing.num_channels != out_channels or str(existing.dtype) != p.dtype:
            raise JobError(f"output {output} has {existing.num_channels} channels of {existing.dtype}; the job "
                           f"makes {out_channels} channels of {p.dtype}")
        if sharded and not existing.sharded:
            raise JobError(f"output {output} exists unsharded; --sharded applies to new outputs only (leave it out, "
                           "or give a new output)")
        sharded = existing.sharded  # a sharded output is written whole blocks at a time, flag or not
        if tuple(existing.resolution) != tuple(source.resolution):
            raise JobError(f"output {output} has voxels of {zyx_text(existing.resolution, floats=True)} nm (z,y,x), "
                           f"the input at mip {p.mip} has {zyx_text(source.resolution, floats=True)} nm; give an "
                           "output at the input's resolution")
        chunk = existing.chunk_size
        check_output_region(bbox, existing.bbox, chunk, output, source.bbox)
        have = getattr(existing, "compression", None)
        if p.output_compression != "default" and have is not None and have != p.output_compression:
            raise JobError(f"output {output} exists with compression {have}; --output-compression "
                           f"{p.output_compression} applies to new outputs only (leave it out, or give a new output)")
    else:
        check_output_compression(output, p.output_compression, p.dtype, out_channels)
        chunk = (Vec.parse(p.storage_chunk, "storage chunk") if p.storage_chunk is not None
                 else default_storage_chunk(block_v))
    check_overlap_fits(overlap_v, in_patch, out_patch, p.output_patch is not None)
    check_patch_fits(bbox, in_patch, out_patch, p.output_patch is not None, p.bbox is not None)
    try:
        Layout(bbox, out_patch, overlap_v, block_v, chunk)
    except GeometryError as err:
        whose = (f" (the storage chunk of the existing output {output}: a block must be a multiple of it, or give a "
                 "new output)" if existing is not None and "storage chunk" in str(err) else "")
        raise JobError(f"{err}{whose}") from None
    if existing is not None and existing.sharded:
        check_shards_tile(bbox, existing, block_v, output)
    if not p.fill_missing and not source.has_data():
        raise MissingInput(f"input {p.input} holds no chunks at all (its info file promises {bbox.name}); plan with "
                           "--fill-missing if it is meant to be zeros")
    job = Job(input=p.input, output=output, store=p.donations, bbox=bbox, input_patch=in_patch,
              output_patch=out_patch, overlap=overlap_v, block=block_v, storage_chunk=chunk, blend=p.blend,
              model=p.model, weights=p.weights, model_checksum=model_checksum(p.model, p.weights),
              in_channels=source.num_channels, out_channels=out_channels, output_dtype=p.dtype,
              pad_mode=p.pad_mode, precision=p.precision, donation_dtype=p.donation_dtype,
              donation_compression=p.compression, device=p.device, batch_size=p.batch_size,
              fill_missing=p.fill_missing, mip=p.mip, output_compression=p.output_compression, mask=p.mask,
              mask_mip=p.mask_mip, sharded=sharded)
    if existing is None:
        output_shard(job)  # refuses a block that the new output's shards cannot tile
    elif claims:
        check_claims(existing, job, p.overwrite)
    return job, existing, source


def _output_patch_named(in_patch: Vec, out_patch: Vec, out_patch_given: bool) -> str:
    """The output patch as the user set it: without --output-patch it is the input patch."""
    return (f"output patch {zyx_text(out_patch)}" if out_patch_given else
            f"input patch {zyx_text(in_patch)} (the output patch, as --output-patch is not given)")


def check_overlap_fits(overlap: Vec, in_patch: Vec, out_patch: Vec, out_patch_given: bool) -> None:
    """Refuse an overlap that is not smaller than the output patch, naming the flag that set the patch
    (``Layout`` checks the same with the geometry's words; a patch that is not positive is left to it)."""
    for a, axis in enumerate("zyx"):
        if out_patch[a] > 0 and overlap[a] >= out_patch[a]:
            raise JobError(f"overlap {zyx_text(overlap)} must be smaller than the "
                           f"{_output_patch_named(in_patch, out_patch, out_patch_given)} along {axis}; give an "
                           f"overlap of at most {out_patch[a] - 1} along {axis}")


def check_patch_fits(region: Bbox, in_patch: Vec, out_patch: Vec, out_patch_given: bool, region_given: bool) -> None:
    """Refuse an output patch larger than the region, naming the flag that set it: without
    --output-patch the output patch is the input patch, so the input patch is the one to shrink."""
    for a, axis in enumerate("zyx"):
        if out_patch[a] <= region.shape[a]:
            continue
        what = _output_patch_named(in_patch, out_patch, out_patch_given)
        larger = " (or a larger --bbox)" if region_given else ""
        raise JobError(f"{what} is larger than the volume {zyx_text(region.shape)} along {axis}; give a patch of "
                       f"at most {region.shape[a]} along {axis}{larger}")


def check_mask_resolution(mask, source, mask_url: str, mip: int) -> None:
    """Refuse a mask or an input without a voxel size of its own where the default (1 nm) would
    misplace the mask: it is laid over the input by physical coordinates, so a plain zarr mask over a
    40x8x8 nm input covered a corner and left the rest uncomputed at exit 0 (and the other way round).
    A mask and an input that both lack a voxel size agree voxel for voxel and are accepted."""
    if (mask.resolution_known and source.resolution_known) or tuple(mask.resolution) == tuple(source.resolution):
        return
    bare, url = (mask, mask_url) if not mask.resolution_known else (source, source.url)
    what = "--mask" if bare is mask else "the input"
    raise JobError(f"{what} {url} has no voxel size (a zarr array without a 'resolution' attribute), so the mask "
                   f"({zyx_text(mask.resolution, floats=True)} nm) would be laid over the input at mip {mip} "
                   f"({zyx_text(source.resolution, floats=True)} nm) with the 1 nm default; give it its voxel size: "
                   f"python3 -c \"import zarr; zarr.open_array('{classify(bare.url)[1]}').attrs.update(resolution=[Z, Y, X])\"")


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


def _block_map(job: Job, mask) -> bytes:
    """The bit map of blocks with no patch in the mask (computed before anything is written)."""
    masked, kept = masked_blocks(job, mask)
    log.info("mask %s: %d of %d blocks and %d of %d patches skipped", job.mask, int(masked.sum()), len(masked),
             job.layout.num_patches - kept, job.layout.num_patches)
    return encode_block_map(masked)


def _check_mask_unchanged(store: ObjectStore, job: Job, digest: str | None) -> None:
    """Refuse a mask that differs under the region from when the job was planned (not checked: a job
    planned before digests were recorded, and a mask too large to read at once)."""
    try:
        planned = store.get(MASK_DIGEST).decode()
    except KeyError:
        return
    if digest is None:
        log.info("mask %s is too large to read at once: not checked against the planned one", job.mask)
    elif planned != digest:
        raise JobError(f"mask {job.mask} changed since this job was planned into {store.url}: the planned block "
                       "map no longer matches it, and blocks already run used the old mask; plan into a new "
                       "--donations location")


def _spelled_otherwise(previous: Job, job: Job) -> bool:
    """Whether ``previous`` (a manifest of an older chunkflow, with relative local paths) is ``job`` once
    its paths are made absolute here, as :func:`make_job` makes them."""
    try:
        spelled = replace(previous, input=absolute_url(previous.input), output=absolute_url(previous.output),
                          mask=absolute_url(previous.mask) if previous.mask else previous.mask, job_hash="")
    except (StorageError, JobError):
        return False
    return spelled.job_hash == job.job_hash


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
