"""Forgetting a job's done state when its done markers no longer stand for its output.

Done markers are never deleted while they are true. They stop being true when the output they vouch
for is gone: deleted, replaced by another volume, or written over by another job (its claim came
later, :mod:`chunkflow.output_claims`). ``plan`` refuses such a job; with ``force`` (``chunkflow run
--force``, ``chunkflow plan --force``) it resets it instead, and every block is computed again.

A ``--force`` run used to keep the old markers and only recompute over them: interrupted, it left
markers of blocks it had not reached, and a plain rerun skipped them at exit 0 over missing data (an
adversarial review, 2026-11-29). The reset deletes them first, behind a flag (``reset.json``) written
before the first delete and removed after the last: a reset interrupted half-way is finished by the
next ``plan`` of the job, and workers refuse to run while the flag is there, so no stale marker is
ever read as done.
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from chunkflow.errors import JobError
from chunkflow.masking import BLOCK_MAP
from chunkflow.storage import ObjectStore
from chunkflow.store_layout import DONATIONS, DONE, DONE_GENERATION, FAILED, LOG, RESET, RUNNING, SUMMARY

if TYPE_CHECKING:
    from chunkflow.job import Job

log = logging.getLogger(__name__)

__all__ = ["check_leftovers", "done_generation", "holds_any", "reset_done_state", "reset_pending"]

#: what a reset deletes: the done markers and everything derived from them, and the attempts' markers
RESET_PREFIXES = (f"{SUMMARY}/", f"{LOG}/", f"{DONE}/", f"{RUNNING}/", f"{FAILED}/")


def done_generation(store: ObjectStore) -> int:
    """How many times the done state of the job in ``store`` was reset (0: never)."""
    try:
        return int(store.get(DONE_GENERATION).decode())
    except KeyError:
        return 0
    except ValueError:
        return -1  # unreadable: no checkpoint matches it, so every reader lists the markers


def holds_any(store: ObjectStore, prefix: str) -> bool:
    """Whether ``store`` holds an object under ``prefix`` (the first page of one listing)."""
    return next(iter(store.list(prefix)), None) is not None


def reset_pending(store: ObjectStore) -> bool:
    """Whether a reset of the done state began in ``store`` and has not finished."""
    return store.exists(RESET)


def reset_done_state(store: ObjectStore, why: str) -> int:
    """Delete every done marker of the job in ``store`` and what is derived from them (the done
    log, its checkpoints) and the attempts' markers, behind :data:`RESET`. Returns how many."""
    store.put(RESET, json.dumps({"why": why, "started": time.time()}).encode(), durable=True)
    # a poller that read the old state (status, a barrier) may write its checkpoint back after the deletes:
    # checkpoints carry the generation they were made in, and one of an older generation is ignored
    store.put(DONE_GENERATION, str(done_generation(store) + 1).encode(), durable=True)
    deleted = 0
    for prefix in RESET_PREFIXES:  # the checkpoints first: nothing may count a block done from them
        deleted += store.delete_many(list(store.list(prefix)))  # in parallel: a remote store's markers by the million
    store.delete(RESET)
    log.warning("reset the done state of the job in %s (%s): %d markers deleted, every block is computed again",
                store.url, why, deleted)
    return deleted


def check_leftovers(store: ObjectStore, job: Job, planned: bool, output_exists: bool, done: bool,
                    force: bool = False) -> None:
    """Refuse done markers that would vouch for data that is not there (found by an adversarial review,
    2026-11-29; each was an exit 0 with zeros or another job's output):

    * a store without a manifest that holds done markers or donations: another job's leftovers (a
      manifest deleted, an interrupted ``rm -r``), whose markers would make this job skip its blocks;
    * this job's store with done markers while its output does not exist: the output was deleted
      after the blocks were done, and a rerun would skip them over a new, empty output (unless
      ``force``, which recomputes every block). ``done``: the planned job's store holds done markers."""
    if not planned:
        for prefix, what in ((f"{DONE}/", "done markers"), (DONATIONS, "donations"), (BLOCK_MAP, "a mask's block map")):
            if holds_any(store, prefix):
                raise JobError(f"{store.url} holds {what} but no manifest.json: the leftovers of another job; give a "
                               "new --donations location, or delete that one")
    elif not output_exists and not force and done:
        raise JobError(f"output {job.output} does not exist, but job store {store.url} holds done markers of this "
                       "job: the data they vouch for is gone; recompute every block with `chunkflow run --force` "
                       "(or `chunkflow plan --force`, then its workers), or plan into a new --donations location")
