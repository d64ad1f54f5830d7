"""Which blocks are done, at the cost of what changed since the last look, not of what exists.

Done markers (``done/stage{n}/{block}``) are the authority and chunkflow never deletes one, but
listing them costs one request per 1000 blocks. So a poller (``chunkflow status``, each poll of
``chunkflow barrier``, ``produce``, the runner) reads three other things::

    log/stage{n}/{minute:010d}/{block}   an empty entry, written by :func:`announce` right after
                                         the done marker (minute: ``time.time() // 60`` of the
                                         worker's clock)
    summary/stage{n}                     a checkpoint: a bitmap of blocks known done (one bit per
                                         block) and a watermark W, with the job's hash and grid
    done/stage{n}/                       listed in full only without a usable checkpoint (a job
                                         planned before the log existed), when a barrier saw no
                                         block finish for a while, and to confirm before stage two

A (bitmap, W) pair is *correct* when every block in the bitmap has a done marker and every block
whose log entry lies in a bucket below W is in the bitmap. A poll that starts at time ``t`` lists
only the buckets from W on (``start_offset``), adds what it finds, and moves W to
``minute(t) - ALLOWANCE_MINUTES``: an entry in an older bucket was written (and its done marker
before it) before ``t`` if no clock is more than the allowance, less the time one write may take,
behind the poller's. Each pair a poller writes is correct on its own, so any poller may overwrite
the checkpoint; a stale one is only less fresh.

A worker killed between its done marker and its log entry leaves a done block no poll hears of:
the task's retry finds the block done and announces it (:func:`chunkflow.stages.is_done`), a
barrier that saw no block finish for ``SWEEP_AFTER_S`` lists every done marker once, and
``status`` checks the done markers of the blocks it would count as running.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

from chunkflow.block_set import BlockGrid, BlockSet
from chunkflow.done_reset import done_generation
from chunkflow.errors import JobError, StorageError
from chunkflow.job import Job
from chunkflow.masking import masked_set
from chunkflow.storage import ObjectStore
from chunkflow.store_layout import DONE, done_marker, log_name, log_prefix, marker_prefix, summary_name

__all__ = ["ALLOWANCE_MINUTES", "DoneView", "LostDoneMarkers", "SWEEP_AFTER_S", "announce", "bucket_of", "decode_summary",
           "done_set", "encode_summary", "log_name"]

log = logging.getLogger(__name__)

BUCKET_S = 60
#: minutes a log entry may lag behind a poller's clock: clock skew plus the time one write may take
ALLOWANCE_MINUTES = 10
#: seconds without a newly finished block after which a waiting barrier lists every done marker once
SWEEP_AFTER_S = 600.0
_MAGIC = b"chunkflow-done-summary 1\n"
_BATCH = 1 << 16
_YZ_TABLE = 1 << 18  # most rows of the name table of _Reader (else BlockGrid.flat)


class LostDoneMarkers(JobError):
    """Blocks counted done (by the checkpoint and the log) that have no done marker."""


def bucket_of(seconds: float) -> int:
    """The log bucket (minute) of a time in seconds since the epoch."""
    return int(seconds // BUCKET_S)


def announce(store: ObjectStore, stage: int, block: str, now: float | None = None) -> None:
    """Write the log entry of ``block``'s done marker for ``stage`` (after the marker itself)."""
    store.put(log_name(stage, block, bucket_of(time.time() if now is None else now)), b"")


def done_set(store: ObjectStore, stage: int, job: Job, grid: BlockGrid | None = None, save: bool = True,
             confirm: bool = False, now: float | None = None) -> BlockSet:
    """The blocks of ``job`` done for ``stage`` (stage one: also those the mask leaves no patch), from
    the checkpoint and the log since it; ``save``: write the checkpoint if it moved on.

    ``confirm``: when the log says every block is done, list every done marker before saying so;
    LostDoneMarkers (one line) if a block counted done has none. ``now``: the time of the poll
    (default: this machine's clock)."""
    view = DoneView(store, stage, job, grid)
    done = view.refresh(now)
    if confirm and len(done) == view.grid.size:
        lost = view.rebuild(now)
        done = view.done
        if lost:
            view.save()
            raise view.lost_error(lost)
    if save:
        view.save()
    return done


class DoneView:
    """One poller's view of the done blocks of one stage: the checkpoint, then the log since it."""

    def __init__(self, store: ObjectStore, stage: int, job: Job, grid: BlockGrid | None = None):
        self.store, self.stage, self.job = store, stage, job
        self.grid = grid if grid is not None else BlockGrid(job.layout)
        self.markers = BlockSet(self.grid)  # blocks known to have a done marker
        self.watermark: int | None = None   # None: nothing read yet
        self._masked: BlockSet | None = masked_set(job, store, self.grid) if stage == 1 else None
        self.generation = 0  # of the done state this view read (a checkpoint of an older one predates a reset)
        self._dirty = False
        self._reader = _Reader(self.grid)

    @property
    def summary_name(self) -> str:
        return summary_name(self.stage)

    @property
    def done(self) -> BlockSet:
        """The blocks done: those with a done marker and, in stage one, those the mask leaves no patch."""
        return self.markers | self._masked if self._masked is not None else self.markers.copy()

    def refresh(self, now: float | None = None) -> BlockSet:
        """Read what changed: the first time the checkpoint (or, without a usable one, every done
        marker), then the log from the watermark on. Returns :attr:`done`."""
        now = time.time() if now is None else now  # before listing: entries written before now are seen
        if self.watermark is None and not self._load():
            self.rebuild(now)
            return self.done
        prefix = log_prefix(self.stage)
        before = len(self.markers)
        names = self.store.names_under(prefix, start_offset=f"{prefix}{self.watermark:010d}/")
        self._reader.add(self.markers, names, 11)  # after the bucket: {minute:010d}/
        watermark = max(self.watermark, bucket_of(now) - ALLOWANCE_MINUTES)
        self._dirty |= watermark != self.watermark or len(self.markers) != before
        self.watermark = watermark
        return self.done

    def rebuild(self, now: float | None = None) -> BlockSet:
        """List every done marker (the authority): the view becomes exactly them. Returns the blocks
        the view counted done that have none (empty unless markers were removed or the checkpoint
        was damaged)."""
        now = time.time() if now is None else now
        prefix = marker_prefix(DONE, self.stage)
        listed = BlockSet(self.grid)
        self._reader.add(listed, self.store.names_under(prefix), 0)
        lost = self.markers - listed
        self.markers, self.watermark, self._dirty = listed, bucket_of(now) - ALLOWANCE_MINUTES, True
        if lost:  # their log entries from the watermark on would count them again: remove those
            prefix = log_prefix(self.stage)
            for name in list(self.store.list(prefix, start_offset=f"{prefix}{self.watermark:010d}/")):
                if name.rpartition("/")[2] in lost:
                    self.store.delete(name)
        return lost

    def probe(self, names: Iterable[str], threads: int = 16) -> int:
        """Check the done markers of a few blocks one by one (e.g. those with a running marker,
        which a worker killed before its log entry leaves); adds those found, returns how many."""
        names = [n for n in dict.fromkeys(names) if self.grid.flat(n) is not None and n not in self.markers]
        if not names:
            return 0

        def exists(name: str) -> bool:
            return self.store.exists(done_marker(self.stage, name))

        with ThreadPoolExecutor(max_workers=min(threads, len(names)), thread_name_prefix="cf-probe") as pool:
            found = [n for n, hit in zip(names, pool.map(exists, names)) if hit]
        self.markers.add_names(found)
        self._dirty |= bool(found)
        return len(found)

    def save(self) -> bool:
        """Write the checkpoint if the view moved on since it was read or written (best effort: a
        store this process may not write keeps the older one)."""
        if self.watermark is None or not self._dirty:
            return False
        try:
            self.store.put(self.summary_name, encode_summary(self.job, self.stage, self.markers, self.watermark,
                                                             self.generation))
        except StorageError as err:
            log.info("could not write %s/%s: %s", self.store.url, self.summary_name, err)
            return False
        self._dirty = False
        return True

    def lost_error(self, lost: BlockSet) -> LostDoneMarkers:
        shown = ", ".join(lost.first(5)) + (" ..." if len(lost) > 5 else "")
        return LostDoneMarkers(
            f"stage {self.stage} of job {self.job.job_hash}: {len(lost)} blocks counted done have no done marker in "
            f"{self.store.url} ({shown}): markers removed by hand, or a damaged {self.summary_name}; it was rebuilt "
            f"from the done markers, so `chunkflow produce {self.store.url} QUEUE --stage {self.stage}` enqueues "
            "those blocks again")

    def _load(self) -> bool:
        self.generation = done_generation(self.store)  # before the checkpoint: a reset after it makes it old
        try:
            data = self.store.get(self.summary_name)
        except KeyError:
            return False
        try:
            self.markers, self.watermark = decode_summary(data, self.job, self.stage, self.grid, self.generation)
        except ValueError as err:
            log.warning("ignoring %s/%s (%s): listing the done markers instead", self.store.url, self.summary_name,
                        err)
            return False
        return True


def encode_summary(job: Job, stage: int, markers: BlockSet, watermark: int, generation: int = 0) -> bytes:
    packed = markers.to_bytes()
    header = {"job": job.job_hash, "stage": stage, "grid": list(markers.grid.shape), "watermark": int(watermark),
              "count": len(markers), "crc32": zlib.crc32(packed), "generation": int(generation)}
    return _MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + packed


def decode_summary(data: bytes, job: Job, stage: int, grid: BlockGrid, generation: int = 0) -> tuple[BlockSet, int]:
    """The bitmap and watermark of a checkpoint; ValueError (why) if it is not one of this job and stage,
    or was made before the job's done state was last reset (``generation``, :mod:`chunkflow.done_reset`)."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a chunkflow done summary")
    head, _, packed = data[len(_MAGIC):].partition(b"\n")
    try:
        header = json.loads(head)
        watermark, count, crc = int(header["watermark"]), int(header["count"]), int(header["crc32"])
        owner, shape, of_stage = header["job"], tuple(header["grid"]), header["stage"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable header: {err}") from None
    if owner != job.job_hash or of_stage != stage or shape != grid.shape:
        raise ValueError(f"written for job {owner} stage {of_stage} grid {shape}, not job {job.job_hash} stage "
                         f"{stage} grid {grid.shape}")
    if int(header.get("generation", 0)) != generation:
        raise ValueError(f"made in generation {header.get('generation', 0)} of the done state, which was reset since "
                         f"(generation {generation})")
    if zlib.crc32(packed) != crc:
        raise ValueError("checksum mismatch")
    markers = BlockSet.from_bytes(grid, packed)
    if len(markers) != count:
        raise ValueError(f"{len(markers)} blocks set, the header says {count}")
    return markers, watermark


class _Reader:
    """Flat indices of listed block names, for listings of millions: the name's ``x`` part and its
    ``y_z`` part are each looked up once (the ``y_z`` table has a row per block column), which is
    several times quicker than :meth:`BlockGrid.flat`."""

    def __init__(self, grid: BlockGrid):
        nz, ny, nx = grid.shape
        texts = grid.axis_texts
        self.grid = grid
        self.x = {t: i for i, t in enumerate(texts[2])}
        self.yz = {f"{ty}_{tz}": (z * ny + y) * nx for z, tz in enumerate(texts[0]) for y, ty in enumerate(texts[1])} \
            if ny * nz <= _YZ_TABLE else None

    def add(self, target: BlockSet, names: Iterable[str], cut: int) -> None:
        """Set the blocks named by a listing (each name from ``cut`` on); names that are no block of
        the grid are ignored."""
        xs, yzs, flat, bits, batch = self.x, self.yz, self.grid.flat, target.bits, []
        for name in names:
            if yzs is None:
                i = flat(name[cut:])
            else:
                x, _, yz = name[cut:].partition("_")
                i, offset = xs.get(x), yzs.get(yz)
                i = None if i is None or offset is None else i + offset
            if i is not None:
                batch.append(i)
                if len(batch) >= _BATCH:
                    bits[np.array(batch, dtype=np.int64)] = True
                    batch.clear()
        if batch:
            bits[np.array(batch, dtype=np.int64)] = True
