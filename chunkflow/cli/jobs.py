"""``chunkflow plan``, ``run``, ``reference``, ``demo`` and ``show``: a job planned, run and checked
from this process (fleets of workers: :mod:`chunkflow.cli.fleet` and :mod:`chunkflow.cli.stages`).

Sizes are ZYX, e.g. ``--input-patch 16,128,128``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from chunkflow.cli.common import setup_logging, user_errors
from chunkflow.cli.stages import report_failures
from chunkflow.backends import check_device
from chunkflow.bbox import zyx_text
from chunkflow.block_writes import check_fits_float16_output
from chunkflow.cost_model import DEFAULT_PRICES, Prices, takes_prices
from chunkflow.engines import check_options, make_engine, run_job
from chunkflow.job import JobError
from chunkflow.job_params import JobParameters, takes_job_parameters
from chunkflow.output_claims import claim_output
from chunkflow.planning import load_job, make_job, plan_job
from chunkflow.region import parse_region
from chunkflow.stages import Resources, cast_output, reference as reference_output
from chunkflow.storage import StorageError, create_volume, open_volume
from chunkflow.storage.volume_urls import volume_location
from chunkflow.storage.volumes import input_missing
from chunkflow.units import count


#: the job parameters `reference` does not take, and the values it uses: it computes the whole region
#: as one block (its own size), into an output of its own, with no job store
REFERENCE_OMITS = {"donations": "", "block": None, "storage_chunk": None, "donation_dtype": "float32",
                   "compression": "none", "sharded": False}


@user_errors
@takes_job_parameters(flags=True)
@takes_prices
def plan(params: JobParameters, dry_run: bool = False, force: bool = False, quiet: bool = False,
         prices: Prices = DEFAULT_PRICES) -> None:
    """Validate a job, create its output volume, and write its manifest into the donation store.

    Args:
        dry_run: validate and print tasks, patches, donations, object operations, bytes, a calibrated time
            estimate and what the job costs at the --price-* flags' prices; write nothing.
        force: reset a job whose done markers no longer stand for its output (deleted, replaced, or written
            over by another job): its done state is forgotten and every block is computed again.
        quiet: no progress bars or log lines.
    """
    setup_logging(quiet)
    if dry_run:
        from chunkflow.dryrun import dry_run_job
        job, _, _ = make_job(params)
        for line in dry_run_job(job, prices=prices):
            print(line)
        return
    job = plan_job(params, force=force)
    layout = job.layout
    print(f"job {job.job_hash} planned in {job.store}")
    print(f"  {count(layout.num_blocks, 'block')} of {zyx_text(job.block)} ({zyx_text(layout.grid_shape)} z,y,x), "
          f"{layout.num_patches} patches, output chunks {zyx_text(job.storage_chunk)}")
    print(f"  stage one:  python -m inference_and_donate run {job.store} --blocks all")
    print(f"  stage two:  python -m receive_and_blend run {job.store} --blocks all")


@user_errors
@takes_job_parameters(defaults={"donations": None}, flags=True)
def run(params: JobParameters, force: bool = False, cleanup: bool = False, engine: str = "local",
        mode: str = "barrier", workers: int | None = None, scheduler: str | None = None, quiet: bool = False) -> None:
    """Plan, then stage one over all blocks, the barrier, and stage two, in this process.

    --donations defaults to a directory beside a local output (OUTPUT.donations). Finished
    blocks are skipped on a rerun unless --force.

    Args:
        force: rerun blocks that are already done.
        cleanup: delete each block's donations once its output is written.
        engine: local (this process) or dask (Dask distributed); fleets of queue workers: `chunkflow produce`.
        mode: barrier (all of stage one, then stage two) or streaming (a block's stage two starts once its donors
            are done).
        workers: dask: worker processes of the LocalCluster (default: one per core, or per GPU for a CUDA job).
        scheduler: dask: tcp://host:8786 of a running scheduler to use instead of a LocalCluster.
        quiet: no progress bars or log lines.
    """
    setup_logging(quiet)
    check_options(engine, mode, workers, scheduler)
    params = replace(params, donations=params.donations or _default_store(params.output))
    device_here = scheduler is None
    if engine != "local":  # every check first, then the cluster, then the first write: a cluster that
        logging.disable(logging.WARNING)  # cannot start changes nothing; the plan proper warns, once
        try:
            plan_job(params, device_here, force=force, check_only=True)
        finally:
            logging.disable(logging.NOTSET)
    running = make_engine(engine, workers=workers, scheduler=scheduler,
                          gpu=check_device(params.device).startswith("cuda"))
    try:
        job = plan_job(params, device_here, force=force)
        job = job.with_runtime(device=params.device, batch_size=params.batch_size)
        summary = run_job(job, running, force=force, progress=not quiet, cleanup=cleanup, mode=mode, check=False)
    finally:
        running.close()
    for line in summary.lines():
        print(line)
    report_failures(summary.failure_lines(), summary.exit_status)


@user_errors
@takes_job_parameters(omit=REFERENCE_OMITS, flags=True)
def reference(params: JobParameters, quiet: bool = False) -> None:
    """Whole-volume blended inference in one process, written to OUTPUT: the answer `run` must match.

    Takes the model/patch/overlap/blend flags of `run`; use it on a small volume to validate a job.

    Args:
        quiet: no progress bars or log lines.
    """
    setup_logging(quiet)
    source = open_volume(params.input, missing=input_missing(params.fill_missing), mip=params.mip)
    region = parse_region(params.bbox, source.bbox, params.mip)
    try:
        chunk = open_volume(params.output).chunk_size
    except StorageError:
        chunk = region.shape
    whole = tuple(-(-s // c) * c for s, c in zip(region.shape, chunk))
    job, existing, source = make_job(replace(params, block=whole, bbox=region.name))
    result = reference_output(job, Resources(job))
    if params.dtype == "float16":
        check_fits_float16_output(result, region, [region])  # refused before the output is made or written
    target = existing or create_volume(job.output, region, job.storage_chunk, job.out_channels, params.dtype,
                                       resolution=source.resolution, compression=params.output_compression)
    claim_output(target, job)
    target.write(region, cast_output(result, params.dtype))
    print(f"reference of {region.name} (mip {params.mip}) written to {params.output}")


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
