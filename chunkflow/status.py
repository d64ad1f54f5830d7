"""``chunkflow status``: per stage, how many blocks are done, running and failed, with an ETA.

Read from the job's own markers (see :mod:`chunkflow.engines.task`), which every engine
keeps, and optionally from a task queue's counters:

- done: ``done/stage{n}/{block}`` exists, read at the cost of what changed since the last
  look (:mod:`chunkflow.done_log`: a checkpoint, then the done log since it; the checkpoint is
  written back when it moved on). A block with a running marker that the log does not count
  done has its done marker checked (up to ``SAMPLE`` of them): a worker killed between its done
  marker and its log entry leaves such a block;
- running: a ``running/`` marker and no done marker. A worker killed mid-task leaves its
  running marker until a retry finishes, so ``oldest_running_s`` helps to spot the dead, and a
  queue worker's marker whose heartbeat (refreshed at every lease renewal) is older than its
  lease is *stale*: its worker is probably dead (``stale_blocks``);
- failed: the last attempt raised (``failed/``) and no attempt is running or succeeded; one
  line each (``failures``) says which attempt failed, how, and whether the task was given up;
- ETA: the remaining blocks (neither done nor failed: a failed block does not finish by itself)
  over the *recent* throughput, from the done markers' finish times and task durations (a
  random sample of ``SAMPLE`` markers on big jobs, scaled up): the blocks finished in the last
  ``ETA_WINDOW_S`` seconds over the time since the earliest of them started. If none finished
  that recently (a stopped job, or one resumed so recently that no block has finished since),
  the last ``ETA_RECENT`` completions measure the rate the job had while it last ran. So a job
  resumed days after it stopped is not measured over the idle days.

  A time is shown only while the stage progresses. No time (``eta_s`` null, the reason in
  ``eta_reason``, printed as ``- (reason)``) when

  * every block that is not done is failed: ``"N failed"``;
  * no block of the stage is running and none finished within the last ``G`` seconds:
    ``"none running"``. ``G`` is twice the mean interval between the recent completions (the
    time from the earliest start to the latest finish of the completions that measure the rate,
    over their number), at least ``ETA_GRACE_MIN_S`` and at most ``ETA_GRACE_MAX_S``: a queue
    worker between two tasks (its running marker gone, the next one not yet written, or an
    empty-looking queue polled again) has 0 running for a moment, and its job still progresses.
    The latest finish is the newest of the sampled done markers and of the done markers of the
    blocks the done log lists since ``now - G`` (so a big job's sample does not hide the last
    completion); that listing is made only when nothing is running.

  With blocks running but no finished block to measure a rate from, ``eta_s`` is null and
  ``eta_reason`` ``"not measured"`` (printed ``?``). A done stage has ``eta_s`` 0 (``done``).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import deque

import numpy as np

from chunkflow.block_set import BlockGrid, BlockSet
from chunkflow.done_log import DoneView, bucket_of
from chunkflow.engines.attempts import failure_line, failures, gave_up, is_stale, marker_names
from chunkflow.engines.task import STAGE_NAMES
from chunkflow.job import Job
from chunkflow.storage import ObjectStore, open_store
from chunkflow.store_layout import log_prefix, marker_name

log = logging.getLogger(__name__)

SAMPLE = 256
ETA_WINDOW_S = 1800.0  # completions within this many seconds of now measure the rate
ETA_RECENT = 16        # otherwise the last this many completions (the rate while the job last ran)
ETA_GRACE_MIN_S = 10.0   # with nothing running, a completion this recent (or within 2 mean intervals)...
ETA_GRACE_MAX_S = 300.0  # ...but never older than this, still shows the ETA (workers between two tasks)
NOT_MEASURED = "not measured"  # eta_reason with blocks running but no finished block to measure a rate from
SHOWN = 20             # failed and stale blocks named in the report


def job_status(job: Job, queue_url: str | None = None, now: float | None = None, **queue_kwargs) -> dict:
    """A JSON-able report of ``job``'s progress (and of ``queue_url``'s counters when given)."""
    store = open_store(job.store)
    now = time.time() if now is None else now
    grid = BlockGrid(job.layout)
    total = grid.size
    report: dict = {"job": job.job_hash, "store": job.store, "blocks": total, "stages": {}}
    for stage in (1, 2):
        view = DoneView(store, stage, job, grid)
        done = view.refresh()
        running = {b for b in marker_names(store, "running", stage) if grid.flat(b) is not None}
        unheard = sorted(b for b in running if b not in done)
        if view.probe(unheard if len(unheard) <= SAMPLE else random.sample(unheard, SAMPLE)):
            done = view.done
        view.save()
        running = {b for b in running if b not in done}
        failed = {b for b in marker_names(store, "failed", stage) if b not in done and b not in running
                  and grid.flat(b) is not None}
        runs = _records(store, "running", stage, running)
        stale = sorted(r["block"] for r in runs if r.get("block") in running and is_stale(r, now))
        shown = failures(store, stage, sorted(failed)[:SHOWN])
        eta, reason = _eta(store, stage, done, total, len(running), len(failed), now)
        report["stages"][str(stage)] = {
            "name": STAGE_NAMES[stage], "total": total, "done": len(done), "running": len(running),
            "failed": len(failed), "eta_s": eta, "eta_reason": reason,
            "oldest_running_s": _oldest(runs, now), "failed_blocks": sorted(failed)[:SHOWN],
            "stale": len(stale), "stale_blocks": stale[:SHOWN],
            "gave_up_blocks": sorted(b for b, r in shown.items() if gave_up(r)),
            "failures": [failure_line(b, r) for b, r in sorted(shown.items())],
        }
    if queue_url:
        report["queue"] = queue_status(queue_url, **queue_kwargs)
    return report


def queue_status(queue_url: str, **queue_kwargs) -> dict:
    """The queue's own counters: enqueued (leased included), leased, and for fq:// inserted/completed."""
    from chunkflow.engines.queue import open_queue

    queue = open_queue(queue_url, **queue_kwargs)
    counters = {"url": queue_url, "enqueued": int(queue.enqueued), "leased": int(queue.leased)}
    for name in ("inserted", "completed"):
        value = getattr(queue, name)
        counters[name] = None if isinstance(value, float) and math.isnan(value) else int(value)
    return counters


#: the table's count columns and their narrowest widths; a column widens to two spaces more than its longest number
COLUMNS = {"total": 7, "done": 7, "running": 9, "failed": 8}


def format_status(report: dict) -> list[str]:
    """The table ``chunkflow status`` prints (one line per stage, then the details)."""
    stages = list(report["stages"].values())
    widths = {k: max([w] + [len(str(s[k])) + 2 for s in stages]) for k, w in COLUMNS.items()}
    lines = [f"job {report['job']} in {report['store']}: {report['blocks']} blocks"]
    lines.append(f"  {'stage':<22}" + "".join(f"{k:>{w}}" for k, w in widths.items()) + "  ETA")
    for s in stages:
        eta = _eta_text(s)
        lines.append(f"  {s['name']:<22}" + "".join(f"{s[k]:>{w}}" for k, w in widths.items()) + f"  {eta}")
        if s["oldest_running_s"] is not None and s["running"]:
            lines.append(f"    oldest running task started {_duration(s['oldest_running_s'])} ago")
        if s["stale"]:
            more = " ..." if s["stale"] > len(s["stale_blocks"]) else ""
            lines.append(f"    {s['stale']} stale (worker probably dead): {', '.join(s['stale_blocks'])}{more}")
        described = {line.split(":", 1)[0] for line in s["failures"]}
        lines.extend(f"    failed: {line}" for line in s["failures"])
        lines.extend(f"    failed: {block}" for block in s["failed_blocks"] if block not in described)
        if s["failed"] > len(s["failed_blocks"]):
            lines.append(f"    ... and {s['failed'] - len(s['failed_blocks'])} more failed")
    queue = report.get("queue")
    if queue:
        extra = "".join(f", {queue[k]} {k}" for k in ("inserted", "completed") if queue[k] is not None)
        lines.append(f"  queue {queue['url']}: {queue['enqueued']} enqueued ({queue['leased']} leased){extra}")
    return lines


def _records(store: ObjectStore, kind: str, stage: int, names: set[str] | list[str]) -> list[dict]:
    chosen = sorted(names) if len(names) <= SAMPLE else random.sample(sorted(names), SAMPLE)
    blobs = store.get_many([marker_name(kind, stage, n) for n in chosen])
    records = []
    for data in blobs.values():
        if data is None:
            continue
        try:
            records.append(json.loads(data))
        except ValueError:
            continue
    return records


def _sample(done: BlockSet, n: int) -> list[str]:
    """The names of ``n`` blocks of ``done`` drawn at random (all of them if fewer): flat indices
    are drawn, and only those named."""
    flats = np.flatnonzero(done.bits)
    if len(flats) > n:
        flats = flats[sorted(random.sample(range(len(flats)), n))]
    return [done.grid.name(int(i)) for i in flats]


def _eta(store: ObjectStore, stage: int, done: BlockSet, total: int, running: int, failed: int,
         now: float) -> tuple[float | None, str | None]:
    """(seconds left, None), or (None, why no time is shown): see the module's doc."""
    if len(done) == total:
        return 0.0, None
    remaining = total - len(done) - failed
    if remaining <= 0:
        return None, f"{failed} failed"
    measured = _measure(store, stage, done, now)
    if not running:
        if measured is None:
            return None, "none running"
        rate, interval, newest = measured
        since = now - min(max(2 * interval, ETA_GRACE_MIN_S), ETA_GRACE_MAX_S)
        if newest < since and not _finished_since(store, stage, since):
            return None, "none running"
    if measured is None:
        return None, NOT_MEASURED
    return remaining / measured[0], None


def _measure(store: ObjectStore, stage: int, done: BlockSet, now: float) -> tuple[float, float, float] | None:
    """The recent throughput in blocks a second, the mean interval between those completions
    (seconds), and the newest sampled finish time; None without finish times to measure from."""
    if not done:
        return None
    tasks = []  # (finished, started) of the sampled done markers
    for r in _records(store, "done", stage, _sample(done, SAMPLE)):
        finished, seconds = r.get("finished"), r.get("seconds", {})
        if not isinstance(finished, (int, float)) or not isinstance(seconds, dict):
            continue
        tasks.append((finished, finished - sum(v for v in seconds.values() if isinstance(v, (int, float)))))
    if not tasks:
        return None
    scale = len(done) / len(tasks)  # each sampled marker stands for this many done blocks
    recent = [t for t in tasks if t[0] >= now - ETA_WINDOW_S]
    windowed = bool(recent)
    if not windowed:
        recent = sorted(tasks, reverse=True)[:ETA_RECENT]
    first = min(start for _, start in recent)
    busy = max(end for end, _ in recent) - first  # the time they ran, not the time since
    span = now - first if windowed else busy
    if span <= 0:
        return None
    return len(recent) * scale / span, max(busy, 0.0) / (len(recent) * scale), max(end for end, _ in tasks)


def _finished_since(store: ObjectStore, stage: int, since: float) -> bool:
    """Whether a block finished at or after ``since``: the done markers of the newest ``SAMPLE``
    entries of the done log from ``since``'s minute on (one listing of those buckets)."""
    prefix = log_prefix(stage)
    newest: deque[str] = deque(maxlen=SAMPLE)
    for name in store.list(prefix, start_offset=f"{prefix}{bucket_of(since):010d}/"):
        newest.append(name.rsplit("/", 1)[1])
    return any(isinstance(r.get("finished"), (int, float)) and r["finished"] >= since
               for r in _records(store, "done", stage, list(newest)))


def _eta_text(stage: dict) -> str:
    """The ETA column: ``done``, a time, ``?`` (not measured yet) or ``- (why no time)``."""
    if stage["done"] == stage["total"]:
        return "done"
    if stage["eta_s"] is not None:
        return _duration(stage["eta_s"])
    reason = stage.get("eta_reason")
    return "?" if reason in (None, NOT_MEASURED) else f"- ({reason})"


def _oldest(records: list[dict], now: float) -> float | None:
    started = [r["started"] for r in records if isinstance(r.get("started"), (int, float))]
    return max(0.0, now - min(started)) if started else None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"
