"""Which jobs write which regions of an output volume, kept in the volume's own metadata, so that a
job planned over a region another job wrote (or is writing) is refused unless asked for.

Why: ``chunkflow run`` into the output of a finished job replaced that job's data at exit 0, and the
first job's ``status`` and ``inspect --verify`` still said it was done (a new user's walkthrough,
2026-11-29). Now every job that plans into an output records a *claim* there (a precomputed info
file's ``chunkflow_jobs`` list, per mip; an attribute of the zarr array): its job hash, region, job
store, model and when it was planned. A job whose region overlaps another job's claim is refused in
one line naming that job, before anything is written, unless it is planned with ``overwrite``
(``--overwrite``), which writes over it and adds its own claim beside the old one.

Claims are kept in the order they were made. A job whose claim is followed by an overlapping claim
of another job was written over: its done markers no longer stand for the output, so planning it
again is refused unless ``--force`` (with ``--overwrite``), which recomputes it and claims again,
last; so is a job whose store says it claimed the output (``output_claim.json``) while the output
holds no claim of it (replaced). Workers check the same when they open the output
(:func:`check_output_is_ours`).

What stays allowed: the same job planned again (a resume, another ``--donations`` store, another
batch size or device: the job hash leaves those out) finds its own claim; jobs over regions that do
not overlap write one output one after another, as before. An output without claims (made by
another tool, or by chunkflow before claims existed) is not protected. Two planners claiming one
output at the same instant can both succeed (the metadata is read, extended and written back).
"""
from __future__ import annotations

import json
import logging
import time
import uuid

from chunkflow.bbox import Bbox
from chunkflow.errors import GeometryError
from chunkflow.job import Job, JobError
from chunkflow.storage.volumes import CLAIMS_KEY
from chunkflow.store_layout import OUTPUT_CLAIM

log = logging.getLogger(__name__)

__all__ = ["CLAIMS_KEY", "check_claims", "check_output_is_ours", "claim_of", "claim_output", "read_record"]

def claim_of(job: Job) -> dict:
    """The claim ``job`` records in its output: what a later planner needs to name it."""
    return {"job": job.job_hash, "region": job.layout.bbox.name, "store": job.store, "model": job.model,
            "planned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "id": uuid.uuid4().hex}


def _region(claim: object) -> Bbox | None:
    if not isinstance(claim, dict) or not isinstance(claim.get("region"), str):
        return None
    try:
        return Bbox.from_name(claim["region"])
    except (GeometryError, ValueError):
        return None


def _standing(claims: list, job: Job, url: str, record: dict | None) -> tuple[int | None, list[tuple[int, dict, Bbox]]]:
    """The index of the claim this job's store made (``record``, its ``output_claim.json``; None: it
    made none here, or it is gone), and the claims of *other* jobs whose regions overlap ``job``'s,
    with their indices (claims are kept in the order they were made). Claims of the same job from
    another store are neither: they write the same numbers, but their markers are not this store's."""
    region, mine, others = job.layout.bbox, None, []
    wanted = record.get("id") if isinstance(record, dict) else None
    for i, claim in enumerate(claims):
        theirs = _region(claim)
        if theirs is None:
            log.warning("output %s holds an unreadable claim %r; ignored", url, claim)
        elif claim.get("job") == job.job_hash:
            if wanted is not None and claim.get("id") == wanted:
                mine = i
        elif not theirs.intersect(region).is_empty():
            others.append((i, claim, theirs))
    return mine, others


def _named(claim: dict, theirs: Bbox) -> str:
    store = claim.get("store") or "none (a reference)"
    return (f"job {claim.get('job')}'s result over {theirs.name} (model {claim.get('model')}, planned "
            f"{claim.get('planned')}, job store {store})")


def check_claims(volume, job: Job, overwrite: bool = False, done: bool = False, force: bool = False,
                 record: dict | None = None) -> bool:
    """Refuse ``job`` (:class:`~chunkflow.job.JobError`, one line) where ``volume`` says its region is
    another job's:

    * a job not yet in the output whose region overlaps another job's claim, unless ``overwrite``;
    * a job with ``done`` markers whose claim was followed by an overlapping claim of another job
      (written over after it was planned), or that has no claim but meets another job's, or whose
      store ``record``s a claim that the output no longer holds (replaced, or recreated by a plan of
      the same job into another store): its markers no longer stand for the output, so only ``force``
      (recompute all of it; with ``overwrite`` where another job's claim is there) is accepted.

    Claims made *before* the job's own (it was planned with ``overwrite`` once) need no flag again.

    Returns whether the job's done markers no longer stand for the output (with ``force``: the
    caller resets them, :mod:`chunkflow.done_reset`)."""
    mine, others = _standing(volume.claims(), job, volume.url, record)
    later = [(i, claim, theirs) for i, claim, theirs in others if mine is None or i > mine]
    replaced = mine is None and record is not None
    if not later and not replaced:
        return False
    if done and not force:
        since = f"{_named(later[-1][1], later[-1][2])} is there" if later else "its claim is gone: replaced"
        again = "--force --overwrite" if later else "--force"
        raise JobError(f"this job's region of {volume.url} is not only its own any more ({since}), so its done "
                       f"markers do not stand for the output; recompute it with `chunkflow run {again}` (or "
                       f"`chunkflow plan {again}`, then its workers), or plan into a new --donations location")
    if later and not overwrite:
        raise JobError(f"output {volume.url} holds {_named(later[-1][1], later[-1][2])}, which this job's region "
                       f"{job.layout.bbox.name} overlaps; give another output, or plan with --overwrite to replace it "
                       "there")
    for _, claim, theirs in later:
        log.warning("--overwrite: writing over job %s's result in %s over %s", claim.get("job"), volume.url,
                    theirs.intersect(job.layout.bbox).name)
    return done


def check_output_is_ours(volume, job: Job, record: dict | None, fresh: bool = False) -> None:
    """For a worker opening ``job``'s output: refuse (:class:`~chunkflow.job.JobError`) an output that
    another job has written over since ``job`` was planned, or that lost ``job``'s claim although
    its store says it ``claimed`` it (replaced): its writes would go over another job's result, or
    its done markers would stand for data that is not there. An output without claims, for a job
    planned before claims existed, is accepted. ``fresh``: read the claims again (before a block's
    writes: another job may have claimed its region since the output was opened)."""
    mine, others = _standing(volume.claims(fresh=fresh), job, volume.url, record)
    later = [(i, claim, theirs) for i, claim, theirs in others if mine is None or i > mine]
    if later:
        raise JobError(f"output {volume.url} holds {_named(later[-1][1], later[-1][2])}, claimed after this job was "
                       "planned: this job's done markers no longer stand for it and its workers would write over it; "
                       "recompute it with `chunkflow run --force --overwrite` (or `chunkflow plan --force "
                       "--overwrite`, then its workers)")
    if mine is None and record is not None:
        raise JobError(f"output {volume.url} does not hold this job's claim although the job claimed it when it was "
                       "planned: it was replaced; recompute it with `chunkflow run --force` (or `chunkflow plan "
                       "--force`, then its workers)")


def claim_output(volume, job: Job, record: dict | None = None) -> dict | None:
    """Record a claim of ``job`` in ``volume`` unless its store's claim (``record``) is there and is
    the latest one of any job over its region (planning again writes nothing); after writing over
    later claims, or for a new store, a new claim goes last. Returns the claim written (for the store's
    ``output_claim.json``), or None."""
    mine, others = _standing(volume.claims(), job, volume.url, record)
    if mine is not None and not any(i > mine for i, _, _ in others):
        return None
    claim = claim_of(job)
    volume.add_claim(claim)
    return claim


def read_record(store) -> dict | None:
    """The claim a job's store says it made in its output (``output_claim.json``), or None."""
    try:
        record = json.loads(store.get(OUTPUT_CLAIM).decode())
    except KeyError:
        return None
    except ValueError:
        return {"id": None}  # unreadable: a claim was made, and none can match it
    return record if isinstance(record, dict) else {"id": None}
