"""Where a job's objects live in its store: the one place that spells the layout.

A job's store (the ``--donations`` location) holds::

    manifest.json                        the job's parameters, written once (chunkflow.job)
    donations/{block}%{piece}            stage-one pieces, read by stage two (chunkflow.block_writes)
    done/stage{n}/{block}                the block is final for stage n: the authority, never deleted
    running/stage{n}/{block}             an attempt started (chunkflow.engines.attempts)
    failed/stage{n}/{block}              the last attempt failed: its error
    log/stage{n}/{minute:010d}/{block}   an empty entry after each done marker (chunkflow.done_log)
    summary/stage{n}                     a checkpoint of the done bitmap (chunkflow.done_log)
    output_claim.json                    the claim this job recorded in its output (chunkflow.output_claims)
    reset.json                           a reset of the done state in progress (chunkflow.done_reset)
    done_generation                      how many resets there were: checkpoints of another count are ignored

Block names are ``x0-x1_y0-y1_z0-z1`` (:attr:`chunkflow.bbox.Bbox.name`); every function here takes
the name, not the box, so no module below the job needs a ``Bbox`` to spell a key.
"""
from __future__ import annotations

__all__ = ["DONATIONS", "DONE", "FAILED", "LOG", "DONE_GENERATION", "MANIFEST", "OUTPUT_CLAIM", "RESET", "RUNNING", "SUMMARY", "donation_name",
           "done_marker", "log_name", "log_prefix", "marker_name", "marker_prefix", "marker_stages", "summary_name"]

MANIFEST = "manifest.json"
OUTPUT_CLAIM = "output_claim.json"
RESET = "reset.json"
DONE_GENERATION = "done_generation"
DONATIONS = "donations/"
DONE, RUNNING, FAILED = "done", "running", "failed"
LOG = "log"
SUMMARY = "summary"


def marker_prefix(kind: str, stage: int) -> str:
    """``done/stage1/`` and the like: the prefix of every ``kind`` marker of ``stage``."""
    return f"{kind}/stage{stage}/"


def marker_name(kind: str, stage: int, block: str) -> str:
    """``running/stage1/{block}`` and the like (``kind``: :data:`DONE`, :data:`RUNNING`, :data:`FAILED`)."""
    return f"{kind}/stage{stage}/{block}"


def marker_stages(kind: str) -> dict[str, int]:
    """The stage of each folder of ``kind`` markers: ``{"done/stage1": 1, "done/stage2": 2}`` for :data:`DONE`.

    A marker is ``{folder}/{block}`` and a block name holds no ``/``, so ``name.rpartition("/")``
    splits a listed name into a key of this dict and the block: one split and one lookup a name
    for the loops that read millions of markers. Any other name's folder is not a key.
    """
    return {marker_prefix(kind, stage).rstrip("/"): stage for stage in (1, 2)}


def done_marker(stage: int, block: str) -> str:
    """The done marker of ``block`` for ``stage``."""
    return marker_name(DONE, stage, block)


def donation_name(key: str) -> str:
    """The object of the donation ``key`` (``{block}%{piece}``)."""
    return DONATIONS + key


def log_prefix(stage: int) -> str:
    """The prefix of ``stage``'s done log."""
    return f"{LOG}/stage{stage}/"


def log_name(stage: int, block: str, bucket: int) -> str:
    """The done-log entry of ``block`` for ``stage`` in minute ``bucket``."""
    return f"{log_prefix(stage)}{bucket:010d}/{block}"


def summary_name(stage: int) -> str:
    """The done log's checkpoint of ``stage``."""
    return f"{SUMMARY}/stage{stage}"
