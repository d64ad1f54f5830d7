"""Attempts of one task across a fleet: counted from the markers, given up after ``max_attempts``,
and a heartbeat that tells a live attempt from the marker a dead worker left behind.

The markers (:mod:`chunkflow.engines.task`) are the only shared state, so every worker counts
the same attempts::

    running/stage{n}/{block}  attempt, host, pid, started; from a queue worker also ``lease``
                              and ``heartbeat`` (refreshed at every lease renewal)
    failed/stage{n}/{block}   attempt, error (one line), kind, refusal, finished; from a queue
                              worker also ``max_attempts`` and ``gave_up``

An attempt's number is one more than the highest number either marker records, so an attempt
whose worker was killed (it leaves its running marker) counts like one that raised. Two workers
that start the same block at the same instant may both take the same number: a task is then
tried once more than ``max_attempts``, never fewer times. :class:`FailedWatch` follows the failed
blocks of a stage for a waiting barrier and for a worker asking whether its job is finished.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Container, Iterable

from chunkflow.block_set import BlockSet
from chunkflow.errors import is_refusal, one_line
from chunkflow.storage import ObjectStore
from chunkflow.store_layout import marker_name, marker_prefix

log = logging.getLogger(__name__)


class AttemptsExhausted(RuntimeError):
    """A task whose ``max_attempts`` are used up, not run again (its workers were killed, or a
    stray duplicate of a task given up)."""


def marker_names(store: ObjectStore, kind: str, stage: int) -> set[str]:
    """The blocks that have a ``kind`` marker of ``stage`` (one listing)."""
    prefix = marker_prefix(kind, stage)
    return {name[len(prefix):] for name in store.list(prefix)}


def read_record(store: ObjectStore, name: str) -> dict | None:
    try:
        record = json.loads(store.get(name))
    except (KeyError, ValueError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def last_attempt(store: ObjectStore, stage: int, block: str) -> tuple[int, dict | None]:
    """The highest attempt number the block's running and failed markers record (0: none), and
    its failed record."""
    last, failed = 0, None
    for kind in ("running", "failed"):
        record = read_record(store, marker_name(kind, stage, block))
        if record is None:
            continue
        if kind == "failed":
            failed = record
        try:
            last = max(last, int(record.get("attempt", 0)))
        except (TypeError, ValueError):
            continue
    return last, failed


def failed_record(err: BaseException, attempt: int, max_attempts: int | None) -> dict:
    """What a failed marker records about ``err``; ``gave_up`` once ``attempt`` reaches ``max_attempts``."""
    record = {"attempt": attempt, "error": one_line(err, limit=2000), "kind": type(err).__name__,
              "refusal": is_refusal(err), "finished": time.time()}
    if max_attempts is not None:
        record.update(max_attempts=max_attempts, gave_up=attempt >= max_attempts)
    return record


def exhausted(store: ObjectStore, stage: int, block: str, last: int, failed: dict | None,
              max_attempts: int, extra: dict) -> AttemptsExhausted:
    """Give up on a block whose ``last`` attempt already reached ``max_attempts`` without running
    it: keep a failed marker that says so (the one of a task given up stays as it is), remove the
    running marker a killed attempt left, and return the exception to raise."""
    if failed is not None and failed.get("gave_up"):
        reason = failure_line(block, failed)
    else:
        reason = (f"attempt {last} ended without a result: its worker was killed or lost (preempted? out of "
                  "memory?)")
        if failed is not None:
            reason += f"; attempt {failed.get('attempt')} failed: {_what(failed)}"
        record = {**extra, "attempt": last, "error": reason, "kind": AttemptsExhausted.__name__, "refusal": False,
                  "finished": time.time(), "max_attempts": max_attempts, "gave_up": True}
        store.put(marker_name("failed", stage, block), json.dumps(record).encode())
    store.delete(marker_name("running", stage, block))
    return AttemptsExhausted(f"{block}: not run again, {last} of {max_attempts} attempts used: {reason}")


def failures(store: ObjectStore, stage: int, blocks: Iterable[str]) -> dict[str, dict]:
    """The failed records of ``blocks`` (one batched read); unreadable or vanished ones are left out."""
    blocks = list(blocks)
    blobs = store.get_many([marker_name("failed", stage, b) for b in blocks]) if blocks else {}
    records = {}
    for block in blocks:
        data = blobs.get(marker_name("failed", stage, block))
        try:
            record = json.loads(data) if data is not None else None
        except ValueError:
            record = None
        if isinstance(record, dict):
            records[block] = record
    return records


def gave_up(record: dict | None) -> bool:
    return bool(record and record.get("gave_up"))


def _what(record: dict) -> str:
    error, kind = record.get("error", "?"), record.get("kind")
    if record.get("refusal", True) or not kind:
        return str(error)
    return f"unexpected {kind}: {error}"


def failure_line(block: str, record: dict) -> str:
    """One line: the block, where its attempts stand, and the last error."""
    attempt, most = record.get("attempt", "?"), record.get("max_attempts")
    if gave_up(record):
        return f"{block}: gave up after {attempt} attempts: {_what(record)}"
    if most is not None:
        return f"{block}: attempt {attempt} of {most} failed, to be retried: {_what(record)}"
    return f"{block}: attempt {attempt} failed: {_what(record)}"


def reset_given_up(store: ObjectStore, stage: int, blocks: Container[str]) -> list[str]:
    """Delete the failed markers of the ``blocks`` given up, so that their attempts count from 1
    again (``produce`` calls this for the tasks it enqueues); returns those blocks. ``blocks``: a set
    or a :class:`~chunkflow.block_set.BlockSet` (one membership test per failed block)."""
    failed = marker_names(store, "failed", stage)  # few: failures only, so that is what the set is made of
    if not failed:
        return []
    failed = {b for b in failed if b in blocks}
    given_up = sorted(b for b, r in failures(store, stage, sorted(failed)).items() if gave_up(r))
    for block in given_up:
        store.delete(marker_name("failed", stage, block))
    return given_up


def is_stale(record: dict, now: float) -> bool:
    """A running marker whose last heartbeat (or start) is older than its lease: its worker stopped
    renewing, so it is probably dead. Markers without a lease (local and Dask engines) never are."""
    lease, beat = record.get("lease"), record.get("heartbeat", record.get("started"))
    if not isinstance(lease, (int, float)) or not isinstance(beat, (int, float)):
        return False
    return now - beat > lease


class Heartbeat:
    """Refreshes the running marker of the attempt in progress; the lease keeper calls :meth:`beat`
    at every renewal (one small write per ``lease / 3`` seconds)."""

    def __init__(self, lease: float):
        self.lease = float(lease)
        self._lock = threading.Lock()
        self._target: tuple[ObjectStore, str, dict] | None = None

    def attach(self, store: ObjectStore, name: str, record: dict) -> None:
        with self._lock:
            self._target = (store, name, dict(record))

    def detach(self) -> None:
        """After this returns no beat writes the marker again (the caller may delete it)."""
        with self._lock:
            self._target = None

    def beat(self) -> None:
        with self._lock:
            if self._target is None:
                return
            store, name, record = self._target
            record["heartbeat"] = time.time()
            store.put(name, json.dumps(record).encode())


class FailedWatch:
    """The failed blocks of one stage that a waiting barrier reports: each one line when first
    seen and one more when it is given up; ``given_up`` holds the failed records of those."""

    def __init__(self, store: ObjectStore, stage: int):
        self.store, self.stage = store, stage
        self.seen: set[str] = set()
        self.given_up: dict[str, dict] = {}

    def update(self, pending: BlockSet | set[str]) -> list[str]:
        """Read the failed markers of ``pending`` blocks (not done) not given up yet; the new lines.
        One listing of the failed markers (few: failures only), whatever the number of blocks."""
        failed = {b for b in marker_names(self.store, "failed", self.stage) if b in pending}
        self.given_up = {b: r for b, r in self.given_up.items() if b in failed}
        lines = []
        for block, record in failures(self.store, self.stage, sorted(failed - set(self.given_up))).items():
            if block not in self.seen or gave_up(record):
                lines.append(failure_line(block, record))
            self.seen.add(block)
            if gave_up(record):
                self.given_up[block] = record
        return lines

    def covers(self, pending: BlockSet | set[str]) -> bool:
        """Whether every block of ``pending`` was given up."""
        return len(pending) <= sum(1 for b in self.given_up if b in pending)

    def describe(self, blocks: BlockSet | set[str], most: int = 5) -> str:
        shown = blocks.first(most) if isinstance(blocks, BlockSet) else sorted(blocks)[:most]
        more = f"; and {len(blocks) - most} more" if len(blocks) > most else ""
        return "; ".join(failure_line(b, self.given_up[b]) for b in shown) + more
