"""The ``chunkflow`` command (python-fire). Sizes are ZYX, e.g. ``--input-patch 16,128,128``.

Every user mistake ends in one line on stderr and exit status 2; set ``CHUNKFLOW_DEBUG=1`` for
the traceback.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fire

from chunkflow.cli_common import as_process, raise_on_sigterm, setup_logging, user_errors
from chunkflow.cli_inspect import inspect as inspect_command
from chunkflow.cli_view import view as view_command
from chunkflow.cli_fleet import barrier, produce, status
from chunkflow.cli_stages import check_command_line, report_failures
from chunkflow.backends import check_device
from chunkflow.engines import check_options, make_engine, run_job
from chunkflow.job import JobError
from chunkflow.planning import load_job, make_job, plan as plan_job
from chunkflow.region import parse_region
from chunkflow.stages import Resources, cast_output, reference as reference_output
from chunkflow.storage import StorageError, create_volume, open_volume
from chunkflow.storage.volume_urls import volume_location
from chunkflow.storage.volumes import input_missing

log = logging.getLogger("chunkflow")

FLAG_DOCS = {
    "input": "input volume: file:///path, gs://bucket/path, s3://... (Neuroglancer precomputed) or PATH.zarr.",
    "output": "output volume, created if absent (covering the region: --bbox, or the input's bounds at --mip).",
    "donations": "the job's store: a local directory or gs://bucket/prefix (manifest, donations, done markers).",
    "model": "builtin:membrane, identity, net.py (defines build_model()), net.pt (TorchScript) or net.onnx.",
    "input_patch": "network input patch, ZYX, e.g. 20,256,256.",
    "output_patch": "network output patch (default: the input patch); smaller = the net's context margin.",
    "overlap": "overlap of neighbouring output patches in voxels, ZYX, e.g. 4,32,32.",
    "block": "block size, ZYX: the unit of output ownership, a multiple of the output's storage chunk.",
    "weights": "optional state-dict file for a .py model (loaded with weights_only=True).",
    "blend": "constant, gaussian (MONAI's, sigma_scale 0.125) or bump (original chunkflow's).",
    "dtype": "output dtype: float32, uint8 ([0, 1] scaled to 0..255) or float16 (zarr only).",
    "pad_mode": "input padding past the volume's faces: reflect or constant (zeros).",
    "precision": "float32, or float16/bfloat16 autocast on CUDA (accumulation stays float32).",
    "device": "cpu, cuda or cuda:N (CUDA_VISIBLE_DEVICES is respected).",
    "batch_size": "patches per forward pass.",
    "storage_chunk": "storage chunk of a new output volume, ZYX (default: the largest divisor of the block <= 16,64,64).",
    "donation_dtype": "float32 (exact) or float16 (half the bytes; error <= 2^-11 relative per piece).",
    "compression": "donation compression: none, zstd or blosc.",
    "force": "rerun blocks that are already done.",
    "bbox": "region to compute, x0-x1_y0-y1_z0-z1 in voxels of --mip (default: the whole input); context comes "
            "from the input beyond it.",
    "mip": "resolution level of the input: precomputed scales[N], OME-Zarr datasets[N] (default 0).",
    "output_compression": "codec of a new output's chunks: default (the format's lossless default), none, and per "
                          "format gzip, zstd, ... (docs/formats_precomputed.md, docs/formats_zarr.md).",
    "mask": "a mask layer (any level of a precomputed or zarr volume): patches whose output box is zero there "
            "are not computed and count as zeros.",
    "mask_mip": "resolution level of the mask layer (default 0).",
    "sharded": "create the output sharded (precomputed shards, zarr v3 shards) in shards that tile the block; "
               "stage two then writes whole blocks (docs/design.md, sharded outputs).",
    "fill_missing": "read input chunks that do not exist as zeros (default: refuse the block, naming the chunk).",
    "cleanup": "delete each block's donations once its output is written.",
    "quiet": "no progress bars or log lines.",
    "dry_run": "validate and print tasks, patches, donations, bytes and a calibrated time estimate; write nothing.",
    "engine": "local (this process) or dask (Dask distributed); fleets of queue workers: `chunkflow produce`.",
    "mode": "barrier (all of stage one, then stage two) or streaming (a block's stage two starts once its donors are done).",
    "workers": "dask: worker processes of the LocalCluster (default: one per core, or per GPU for a CUDA job).",
    "scheduler": "dask: tcp://host:8786 of a running scheduler to use instead of a LocalCluster.",
}


def documented(summary: str):
    """Give a command a Google-style docstring built from FLAG_DOCS, so `--help` explains every flag."""
    def decorate(fn):
        import inspect
        names = [n for n in inspect.signature(fn).parameters if n in FLAG_DOCS]
        fn.__doc__ = summary.strip() + "\n\nArgs:\n" + "".join(f"    {n}: {FLAG_DOCS[n]}\n" for n in names)
        return fn
    return decorate


@user_errors
@documented("Validate a job, create its output volume, and write its manifest into the donation store.")
def plan(input: str, output: str, donations: str, model: str, input_patch: str, output_patch: str | None = None,
         overlap: str = "0,0,0", block: str | None = None, weights: str | None = None, blend: str = "gaussian",
         dtype: str = "float32", pad_mode: str = "reflect", precision: str = "float32", device: str = "cpu",
         batch_size: int = 1, storage_chunk: str | None = None, donation_dtype: str = "float32",
         compression: str = "none", fill_missing: bool = False, bbox: str | None = None, mip: int = 0,
         output_compression: str = "default", mask: str | None = None, mask_mip: int = 0, sharded: bool = False, dry_run: bool = False,
         quiet: bool = False) -> None:
    setup_logging(quiet)
    options = dict(output_patch=output_patch, overlap=overlap, block=block, weights=weights, blend=blend, dtype=dtype,
                   pad_mode=pad_mode, precision=precision, device=device, batch_size=batch_size,
                   storage_chunk=storage_chunk, donation_dtype=donation_dtype, compression=compression,
                   fill_missing=fill_missing, bbox=bbox, mip=mip, output_compression=output_compression,
                   mask=mask, mask_mip=mask_mip, sharded=sharded)
    if dry_run:
        from chunkflow.dryrun import dry_run_job
        job, _, _ = make_job(input, output, donations, model, input_patch, **options)
        for line in dry_run_job(job):
            print(line)
        return
    job = plan_job(input, output, donations, model, input_patch, **options)
    layout = job.layout
    print(f"job {job.job_hash} planned in {job.store}")
    print(f"  {layout.num_blocks} blocks of {_zyx(job.block)} ({_zyx(layout.grid_shape)} z,y,x), "
          f"{layout.num_patches} patches, output chunks {_zyx(job.storage_chunk)}")
    print(f"  stage one:  python -m inference_and_donate run {job.store} --blocks all")
    print(f"  stage two:  python -m receive_and_blend run {job.store} --blocks all")


@user_errors
@documented("""Plan, then stage one over all blocks, the barrier, and stage two, in this process.

--donations defaults to a directory beside a local output (OUTPUT.donations). Finished
blocks are skipped on a rerun unless --force.""")
def run(input: str, output: str, model: str, input_patch: str, output_patch: str | None = None,
        overlap: str = "0,0,0", block: str | None = None, donations: str | None = None, weights: str | None = None,
        blend: str = "gaussian", dtype: str = "float32", pad_mode: str = "reflect", precision: str = "float32",
        device: str = "cpu", batch_size: int = 1, force: bool = False, cleanup: bool = False,
        donation_dtype: str = "float32", compression: str = "none", fill_missing: bool = False,
        bbox: str | None = None, mip: int = 0, output_compression: str = "default", mask: str | None = None, mask_mip: int = 0, sharded: bool = False, engine: str = "local", mode: str = "barrier", workers: int | None = None, scheduler: str | None = None,
        quiet: bool = False) -> None:
    setup_logging(quiet)
    check_options(engine, mode, workers, scheduler)
    donations = donations or _default_store(output)
    options = dict(output_patch=output_patch, overlap=overlap, block=block, weights=weights, blend=blend, dtype=dtype,
                   pad_mode=pad_mode, precision=precision, device=device, batch_size=batch_size,
                   donation_dtype=donation_dtype, compression=compression, fill_missing=fill_missing, bbox=bbox,
                   mip=mip, output_compression=output_compression, mask=mask, mask_mip=mask_mip, sharded=sharded,
                   device_here=scheduler is None)
    if engine != "local":  # every check first, then the cluster, then the first write: a cluster that
        make_job(input, output, donations, model, input_patch, **options)  # cannot start changes nothing
    running = make_engine(engine, workers=workers, scheduler=scheduler, gpu=check_device(device).startswith("cuda"))
    try:
        job = plan_job(input, output, donations, model, input_patch, **options)
        job = job.with_runtime(device=device, batch_size=batch_size)
        summary = run_job(job, running, force=force, progress=not quiet, cleanup=cleanup, mode=mode, check=False)
    finally:
        running.close()
    for line in summary.lines():
        print(line)
    report_failures(summary.failure_lines(), summary.exit_status)


@user_errors
@documented("""Whole-volume blended inference in one process, written to OUTPUT: the answer `run` must match.

Takes the model/patch/overlap/blend flags of `run`; use it on a small volume to validate a job.""")
def reference(input: str, output: str, model: str, input_patch: str, output_patch: str | None = None,
              overlap: str = "0,0,0", weights: str | None = None, blend: str = "gaussian", dtype: str = "float32",
              pad_mode: str = "reflect", precision: str = "float32", device: str = "cpu", batch_size: int = 1,
              fill_missing: bool = False, bbox: str | None = None, mip: int = 0, output_compression: str = "default", mask: str | None = None, mask_mip: int = 0,
              quiet: bool = False) -> None:
    setup_logging(quiet)
    source = open_volume(input, missing=input_missing(fill_missing), mip=mip)
    region = parse_region(bbox, source.bbox, mip)
    try:
        chunk = open_volume(output).chunk_size
    except StorageError:
        chunk = region.shape
    whole = tuple(-(-s // c) * c for s, c in zip(region.shape, chunk))
    job, existing, source = make_job(input, output, "", model, input_patch, output_patch=output_patch,
                                     overlap=overlap, block=whole, weights=weights, blend=blend, dtype=dtype,
                                     pad_mode=pad_mode, precision=precision, device=device, batch_size=batch_size,
                                     storage_chunk=None, fill_missing=fill_missing, bbox=region.name, mip=mip,
                                     output_compression=output_compression, mask=mask, mask_mip=mask_mip)
    result = reference_output(job, Resources(job))
    target = existing or create_volume(output, region, job.storage_chunk, job.out_channels, dtype,
                                       resolution=source.resolution, compression=output_compression)
    target.write(region, cast_output(result, dtype))
    print(f"reference of {region.name} (mip {mip}) written to {output}")


@user_errors
def demo(workdir: str = "chunkflow-demo", shape: str = "32,256,256", block: str = "16,128,128",
         blend: str = "gaussian", quiet: bool = False) -> None:
    """Run the whole pipeline on a synthetic EM volume with the built-in membrane U-Net.

    Makes the volume, plans a job with several blocks, runs both stages, checks the output
    against the whole-volume reference, and writes PNG slices and a summary into WORKDIR.
    """
    from chunkflow.demo.pipeline import run_demo
    setup_logging(quiet)
    for line in run_demo(Path(workdir), shape=shape, block=block, blend=blend, progress=not quiet):
        print(line)


@user_errors
def show(donations: str) -> None:
    """Print a planned job's manifest."""
    print(json.dumps(json.loads(load_job(donations).to_json()), indent=2))


def _default_store(output: str) -> str:
    local = volume_location(output)
    if "://" in local:
        raise JobError(f"give --donations for a remote output such as {output} (a local directory or gs://bucket/prefix)")
    return local.rstrip("/") + ".donations"


def _zyx(v) -> str:
    return ",".join(str(int(x)) for x in v)


COMMANDS = {"plan": plan, "run": run, "reference": reference, "demo": demo, "show": show, "inspect": inspect_command,
            "produce": produce, "barrier": barrier, "status": status}
COMMANDS["view"] = view_command


def main(argv: list[str] | None = None) -> None:
    """The console script: the command line is checked (unknown flags, extra arguments) before
    Fire runs anything, since Fire would report them only after the command ran."""
    raise_on_sigterm()
    argv = list(sys.argv[1:] if argv is None else argv)
    fire.Fire(COMMANDS, command=check_command_line(COMMANDS, argv, "chunkflow"), name="chunkflow")


def console() -> None:
    """The ``chunkflow`` command as a process (:func:`chunkflow.cli_common.as_process`)."""
    as_process(main)


if __name__ == "__main__":
    console()
