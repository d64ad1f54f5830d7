"""Which jobs write which regions of an output volume, kept in the volume's own metadata, so that a
job planned over a region another job wrote (or is writing) is refused unless asked for.

Why: ``chunkflow run`` into the output of a finished job replaced that job's data at exit 0, and the
first job's ``status`` and ``inspect --verify`` still said it was done (a new user's walkthrough,
2026-11-29). Now every job that plans into an output records a *claim* there (a precomputed info
file's ``chunkflow_jobs`` list, per mip; an attribute of the zarr array): its job hash, region, job
store, model and when it was planned. A job whose region overlaps another job's claim is refused in
one line naming that job, before anything is written, unless it is planned with ``overwrite``
(``--overwrite``), which writes over it and adds its own claim beside the old one.

What stays allowed: the same job planned again (a resume, another ``--donations`` store, another
batch size or device: the job hash leaves those out) finds its own claim; jobs over regions that do
not overlap write one output one after another, as before. An output without claims (made by
another tool, or by chunkflow before claims existed) is not protected. Two planners claiming one
output at the same instant can both succeed (the metadata is read, extended and written back).
"""
from __future__ import annotations

import logging
import time

from chunkflow.bbox import Bbox
from chunkflow.errors import GeometryError
from chunkflow.job import Job, JobError
from chunkflow.storage.volumes import CLAIMS_KEY

log = logging.getLogger(__name__)

__all__ = ["CLAIMS_KEY", "check_claims", "claim_of", "claim_output"]

def claim_of(job: Job) -> dict:
    """The claim ``job`` records in its output: what a later planner needs to name it."""
    return {"job": job.job_hash, "region": job.layout.bbox.name, "store": job.store, "model": job.model,
            "planned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _region(claim: object) -> Bbox | None:
    if not isinstance(claim, dict) or not isinstance(claim.get("region"), str):
        return None
    try:
        return Bbox.from_name(claim["region"])
    except (GeometryError, ValueError):
        return None


def check_claims(volume, job: Job, overwrite: bool = False) -> None:
    """Refuse ``job`` (:class:`~chunkflow.job.JobError`, one line) if its region overlaps a region that
    another job claimed in ``volume``; with ``overwrite``, log the jobs it writes over instead."""
    region = job.layout.bbox
    for claim in volume.claims():
        theirs = _region(claim)
        if theirs is None:
            log.warning("output %s holds an unreadable claim %r; ignored", volume.url, claim)
            continue
        if claim.get("job") == job.job_hash or theirs.intersect(region).is_empty():
            continue
        store = claim.get("store") or "none (a reference)"
        if overwrite:
            log.warning("--overwrite: writing over job %s's result in %s over %s (job store %s)", claim.get("job"),
                        volume.url, theirs.intersect(region).name, store)
            continue
        raise JobError(f"output {volume.url} holds job {claim.get('job')}'s result over {theirs.name} (model "
                       f"{claim.get('model')}, planned {claim.get('planned')}, job store {store}), which this "
                       f"job's region {region.name} overlaps; give another output, or plan with --overwrite to "
                       "replace it there")


def claim_output(volume, job: Job) -> None:
    """Record ``job``'s claim in ``volume`` unless it is there already (planning again writes nothing)."""
    if not any(isinstance(c, dict) and c.get("job") == job.job_hash for c in volume.claims()):
        volume.add_claim(claim_of(job))
