"""What a donation store holds, block by block: the report behind ``chunkflow inspect``.

The report comes from three listings by prefix (``donations/``, ``done/stage1/``,
``done/stage2/``) and the manifest, whatever the number of objects: no request per block, no object body. The
listings are streamed (``ObjectStore.scan``: in no particular order on a directory store) into
per-block counters (:mod:`chunkflow.donation_summary`), so memory follows the number of blocks,
not of objects, and the report does not depend on the order of the listings. The manifest's
layout says which keys every block expects (:mod:`chunkflow.donation_kinds`); the listing says
which exist and their sizes. From the keys alone one also knows each piece's raw size, hence the
compression ratio, without fetching anything.

A report always has the totals (blocks by state, donations, bytes, examples of each state,
the first problem blocks). It has a row per block (:class:`BlockReport`) for every selected
block when the selection (the whole job, ``region`` or ``block``) has at most ``limit``
blocks, otherwise for the first ``limit`` problem blocks only; rows list their pieces one by
one only in the first case.

Bodies are read only when asked: ``verify`` fetches listed donations (a bounded thread pool,
one piece in memory per thread) and checks checksum, shape and job hash with the same decoder
stage two uses; ``headers`` (the default for one block) reads only the first
:data:`HEAD_BYTES` of each piece with a ranged GET; ``sample`` reads a uniform random sample of
that many present donations instead of all of them.

A listed name under ``donations/`` that is not a strict ``{block}%{piece}`` key (``..``,
``/``, non-integer ranges, ...) is reported as malformed and never used as a path: it
is not read, not parsed into a box, not deleted. Nothing here writes to the store.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from chunkflow.bbox import Bbox
from chunkflow.donation_reads import HEAD_BYTES, UNCHECKED, Reservoir, check_piece, read_pieces
from chunkflow.donation_prefix import PrefixTally
from chunkflow.donation_summary import JobTally
from chunkflow.errors import UsageError
from chunkflow.geometry import GeometryError
from chunkflow.job import Job
from chunkflow.store_layout import DONE, MANIFEST, marker_prefix
from chunkflow.planning import load_job
from chunkflow.stages import DONATIONS
from chunkflow.storage import ObjectStore, StorageError
from chunkflow.units import count, human_bytes

__all__ = ["BlockReport", "PieceReport", "StoreReport", "inspect_store", "check_piece", "HEAD_BYTES",
           "STATES", "region_box"]

log = logging.getLogger(__name__)

STATES = ("complete", "blended", "incomplete", "bad")
#: rows for every selected block up to this many blocks, else rows for this many problem blocks
LIMIT = 1000
#: examples of each state, and problem block names, in the totals
EXAMPLES = 3
PROBLEMS = 20


@dataclass
class PieceReport:
    """One expected (or found) donation of a block."""

    key: str
    piece: str
    donor: str | None
    present: bool
    size: int = 0
    raw: int = 0
    job: str = UNCHECKED        # "ok", "foreign" or "-" (not read)
    checksum: str = UNCHECKED   # "ok", "bad" or "-" (not verified)
    error: str | None = None


@dataclass
class BlockReport:
    """Donations a block expects vs what the store holds, and its done markers."""

    block: str
    stage1: bool
    stage2: bool
    expected: int | None
    present: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stored_bytes: int = 0
    raw_bytes: int = 0
    job: str = UNCHECKED
    checksum: str = UNCHECKED
    errors: list[str] = field(default_factory=list)
    pieces: list[PieceReport] | None = None

    @property
    def state(self) -> str:
        """``blended`` (stage two done; its donations may be cleaned up), ``bad`` (a piece was
        refused or does not belong), ``complete`` or ``incomplete``."""
        if self.errors or self.unexpected:
            return "bad"
        if self.stage2:
            return "blended"
        if self.expected is None or self.missing:
            return "incomplete"
        return "complete"


@dataclass
class StoreReport:
    url: str
    job_hash: str | None
    donation_dtype: str | None
    compression: str | None
    blocks: list[BlockReport]          # rows: see ``rows``
    malformed: list[tuple[str, str]]   # the first KEEP; ``malformed_count`` in all
    orphans: list[str]                 # the first KEEP; ``orphan_count`` in all
    objects: int
    stored_bytes: int
    raw_bytes: int
    checked: str
    state_counts: dict[str, int] = field(default_factory=dict)
    num_blocks: int = 0
    rows: str = "all"                  # "all": a row per selected block; "problems": the first problem blocks
    limit: int = LIMIT
    grid: list[int] | None = None
    selection: dict = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)
    donations: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    problems: dict = field(default_factory=dict)
    malformed_count: int = 0
    orphan_count: int = 0
    sample: dict | None = None

    @property
    def healthy(self) -> bool:
        """Every selected block complete or blended, and no malformed, stray or refused object."""
        c = self.counts()
        return not self.malformed_count and not self.orphan_count and not c["incomplete"] and not c["bad"]

    def counts(self) -> dict[str, int]:
        return dict(self.state_counts)

    def summary(self) -> str:
        c = self.counts()
        d = self.donations
        ratio = f" (raw {human_bytes(self.raw_bytes)}, ratio {self.raw_bytes / self.stored_bytes:.2f}x)" \
            if self.raw_bytes and self.stored_bytes else ""
        anomalies = ""
        if self.malformed_count or self.orphan_count:
            anomalies = f"; {self.malformed_count} malformed and {self.orphan_count} stray keys"
        sample = ""
        if self.sample is not None:
            sample = f"; read a random sample of {self.sample['read']} of {self.sample['of']} donations"
        return (f"{count(self.num_blocks, 'block')}: {c['complete']} complete, {c['blended']} blended, "
                f"{c['incomplete']} incomplete, {c['bad']} bad; donations {d['present']}/{d['expected']} present, "
                f"{human_bytes(self.stored_bytes)} stored{ratio}; {self.objects} objects listed{anomalies}{sample}")

    def to_json(self) -> dict:
        data = asdict(self)
        for block, raw in zip(self.blocks, data["blocks"]):
            raw["state"] = block.state
            if raw["pieces"] is None:
                del raw["pieces"]
        data["malformed"] = [{"name": n, "reason": r} for n, r in self.malformed]
        data["counts"] = data.pop("state_counts")
        data["healthy"] = self.healthy
        data["summary"] = self.summary()
        return data


def inspect_store(store: ObjectStore, block: str | None = None, verify: bool = False, headers: bool | None = None,
                  workers: int = 16, region: str | None = None, sample: int | None = None, limit: int = LIMIT,
                  progress: bool = False, seed: int | None = None) -> StoreReport:
    """Report on ``store``: a planned job (manifest present) or a prefix holding donations.

    ``block`` restricts the report to one block (by name) and lists its pieces; their
    headers are then read by default. ``region`` (``x0-x1_y0-y1_z0-z1``) restricts it to the
    blocks intersecting that box. ``verify`` fetches and fully checks the present pieces (all of
    them, or a random ``sample`` of that many; ``sample`` alone implies ``verify``). ``limit``
    bounds the rows (see the module docstring); ``progress`` shows tqdm bars on stderr.
    """
    if block is not None and region is not None:
        raise UsageError("--block and --region cannot be used together: --block NAME is one block")
    job = load_job(store) if store.exists(MANIFEST) else None
    wanted = _block_name(block, job) if block is not None else None
    box = region_box(region, job) if region is not None else None
    read = "body" if verify or (sample is not None and not headers) else (
        "head" if (headers if headers is not None else wanted is not None) else None)
    reservoir = Reservoir(sample, seed) if sample is not None and read else None
    if job is not None:
        selected = _job_selection(job, wanted, box)
        count = job.layout.num_blocks if selected is None else int(selected.sum())
        tally: JobTally | PrefixTally = JobTally(job, selected, keep_sizes=count <= limit, sample=reservoir)
    else:
        select = ((lambda name: name == wanted) if wanted else
                  _region_selector(box) if box is not None else (lambda name: True))
        tally = PrefixTally(select, limit, sample=reservoir)
    with _bar(progress, "listing", "name") as bar:
        # One block: list only its own keys (they all start with its name), not the whole store.
        tally.add_donations(store.scan_with_sizes(f"{DONATIONS}{wanted}%" if wanted else DONATIONS), bar.update)
        for stage in (1, 2):   # two listings, not one of done/: only the markers' two folders are read
            names = store.scan(marker_prefix(DONE, stage) + (wanted or ""))
            tally.add_done((n for n in names if n.endswith(f"/{wanted}")) if wanted else names, bar.update)
    if isinstance(tally, PrefixTally):
        tally.trim()
        if tally.n == 0 and not tally.malformed_count and wanted is None:
            raise StorageError(f"no chunkflow job and no donations at {store.url}")
        if wanted is not None and not tally.selected.any():
            raise StorageError(f"no donations or done markers for block {wanted} in {store.url}")
    present = tally.present()
    population = int(present[tally.selected].sum())
    log.debug("inspect %s: %d names listed, %d blocks, %d present donations selected", store.url, tally.listed,
              tally.n, population)
    if read:
        tally.start_reads(tally.n, read == "body")
        if reservoir is not None:
            items = iter(sorted(reservoir.items))
        elif isinstance(tally, JobTally):
            items = tally.present_items()
        else:
            items = tally.valid_items(store.scan_with_sizes(f"{DONATIONS}{wanted}%" if wanted else DONATIONS))
        total = len(reservoir.items) if reservoir is not None else population
        with _bar(progress, "verifying" if read == "body" else "headers", "piece", total) as bar:
            read_pieces(store, items, job, read == "body", workers, tally.record, bar.update)
    return _report(store, job, tally, present, read, limit, wanted, region, reservoir, population)


def _bar(progress: bool, desc: str, unit: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress, leave=False,
                mininterval=0.5)


def _block_name(block: str, job: Job | None) -> str:
    try:
        box = Bbox.from_name(str(block))
    except ValueError as err:
        raise UsageError(f"--block {block!r}: {err}") from None
    if job is not None:
        try:
            job.layout.block_index_of(box)
        except GeometryError as err:
            raise UsageError(f"--block {block!r}: {err}") from None
    return box.name


def region_box(region: str, job: Job | None = None) -> Bbox:
    """``--region`` as a box; with ``job``, one that intersects its volume."""
    try:
        box = Bbox.from_name(str(region))
    except ValueError:
        raise UsageError(f"--region {region!r} is not a box x0-x1_y0-y1_z0-z1 of integers with each start below "
                         "its stop (e.g. 0-1024_0-1024_0-64)") from None
    if job is not None and box.intersect(job.layout.bbox).is_empty():
        raise UsageError(f"--region {region} does not intersect the job's volume {job.layout.bbox.name}")
    return box


def _region_selector(region: Bbox) -> Callable[[str], bool]:
    """Whether a block name (prefix mode) is a box that intersects ``region``."""
    def select(name: str) -> bool:
        try:
            return not Bbox.from_name(name).intersect(region).is_empty()
        except ValueError:
            return False
    return select


def _job_selection(job: Job, wanted: str | None, box: Bbox | None) -> np.ndarray | None:
    """The selected blocks as a bool per block (raster order); None for all of them."""
    layout = job.layout
    if wanted is None and box is None:
        return None
    mask = np.zeros(tuple(layout.grid_shape), dtype=bool)
    if wanted is not None:
        mask[tuple(layout.block_index_of(Bbox.from_name(wanted)))] = True
    else:
        clip = box.intersect(layout.bbox)
        mask[tuple(slice(ax.block_index(lo), ax.block_index(hi - 1) + 1)
                   for ax, lo, hi in zip(layout.axes, clip.start, clip.stop))] = True
    return mask.ravel()


def _states(tally: JobTally | PrefixTally, present: np.ndarray) -> np.ndarray:
    """Each block's state as an index into :data:`STATES` (the rule of :attr:`BlockReport.state`)."""
    expected = tally.expected()
    bad = tally.unexpected[:tally.n] > 0
    if tally.refused is not None:
        bad |= tally.refused > 0
    blended = ~bad & tally.stage2
    incomplete = ~bad & ~tally.stage2
    if expected is not None:
        incomplete &= present < expected
    state = np.zeros(tally.n, dtype=np.uint8)
    state[blended], state[incomplete], state[bad] = 1, 2, 3
    return state


def _report(store: ObjectStore, job: Job | None, tally: JobTally | PrefixTally, present: np.ndarray, read: str | None,
            limit: int, wanted: str | None, region: str | None, reservoir: Reservoir | None,
            population: int) -> StoreReport:
    sel = tally.selected
    state = _states(tally, present)
    expected = tally.expected()
    raw = tally.raw()
    chosen = np.flatnonzero(sel)
    counts = np.bincount(state[chosen], minlength=len(STATES))
    problem = chosen[state[chosen] >= 2]
    order = _display_order(tally, chosen if len(chosen) <= limit else problem, limit)
    rows = [_row(tally, int(i), int(present[i]), raw, expected) for i in order]
    odd = sum(b for i, b in tally.odd_bytes.items() if (i < 0 and wanted is None and region is None) or
              (i >= 0 and sel[i]))
    examples = {s: [tally.name(i) for i in _listing_order(tally, chosen[state[chosen] == k], EXAMPLES)]
                for k, s in enumerate(STATES)}
    sampled = None if reservoir is None else {"requested": reservoir.size, "read": tally.read, "of": population}
    return StoreReport(
        url=store.url, job_hash=job.job_hash if job else None, donation_dtype=job.donation_dtype if job else None,
        compression=job.donation_compression if job else None, blocks=rows, malformed=tally.malformed,
        orphans=tally.orphans, objects=tally.listed + (job is not None),
        stored_bytes=int(tally.stored[chosen].sum()) + odd, raw_bytes=int(raw[chosen].sum()),
        checked={"body": "verified", "head": "headers", None: "listing"}[read],
        state_counts={s: int(c) for s, c in zip(STATES, counts)}, num_blocks=len(chosen),
        rows="all" if len(chosen) <= limit else "problems", limit=limit,
        grid=list(tally.grid.shape) if isinstance(tally, JobTally) else None,
        selection={"block": wanted, "region": region, "blocks": len(chosen)},
        stages={"stage1": int(tally.stage1[chosen].sum()), "stage2": int(tally.stage2[chosen].sum())},
        donations={"expected": int(expected[chosen].sum()) if expected is not None else 0,
                   "present": int(present[chosen].sum()),
                   "missing": int((expected[chosen] - present[chosen]).sum()) if expected is not None else 0,
                   "unexpected": int(tally.unexpected[chosen].sum())},
        examples=examples,
        problems={"count": len(problem),
                  "first": [tally.name(int(i)) for i in _display_order(tally, problem, PROBLEMS)]},
        malformed_count=tally.malformed_count, orphan_count=tally.orphan_count, sample=sampled)


def _display_order(tally: JobTally | PrefixTally, indices: np.ndarray, limit: int) -> list[int]:
    """The first ``limit`` of ``indices`` in display order: raster order for a job, box order without one."""
    if isinstance(tally, JobTally):
        return [int(i) for i in indices[:limit]]
    return heapq.nsmallest(limit, (int(i) for i in indices), key=lambda i: _sort_key(tally.names[i]))


def _listing_order(tally: JobTally | PrefixTally, indices: np.ndarray, limit: int) -> list[int]:
    """The first ``limit`` of ``indices`` in the order a sorted listing meets them: raster order for a
    job, without one the order :meth:`PrefixTally.listing_rank` gives (the listing itself may come in
    any order)."""
    if isinstance(tally, JobTally):
        return [int(i) for i in indices[:limit]]
    return heapq.nsmallest(limit, (int(i) for i in indices), key=tally.listing_rank)


def _row(tally: JobTally | PrefixTally, i: int, present: int, raw: np.ndarray,
         expected: np.ndarray | None) -> BlockReport:
    job_column, checksum = tally.read_column(i)
    sizes = tally.sizes.get(i, {}) if tally.sizes is not None else None
    report = BlockReport(
        block=tally.name(i), stage1=bool(tally.stage1[i]), stage2=bool(tally.stage2[i]),
        expected=None if expected is None else int(expected[i]), present=present,
        unexpected=sorted(tally.unexpected_of(i)), stored_bytes=int(tally.stored[i]),
        raw_bytes=int(raw[i]), job=job_column, checksum=checksum, errors=list(tally.errors_of(i)))
    pieces = []
    if isinstance(tally, JobTally):
        for index, key, donor, piece_raw in tally.pieces.pieces_of(i):
            if not tally.has_piece(i, index):
                report.missing.append(key)
            if sizes is not None:
                pieces.append(PieceReport(key, key.split("%")[1], donor, key in sizes, sizes.get(key, 0), piece_raw))
    elif sizes is not None:
        pieces = [PieceReport(k, k.split("%")[1], None, True, size) for k, size in sorted(sizes.items())]
    if sizes is not None:
        for piece in pieces:
            check = tally.checks.get(piece.key)
            if check is not None:
                piece.job, piece.checksum, piece.error = check[0], check[1], check[2]
                piece.raw = piece.raw or check[3]
        report.pieces = pieces
    return report


def _sort_key(name: str):
    try:
        box = Bbox.from_name(name)
        return (0, tuple(box.start), name)
    except ValueError:
        return (1, (), name)
