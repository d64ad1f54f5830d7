"""Per-block counters of a donation store, filled from streamed listings in bounded memory.

``chunkflow inspect`` reads the ``donations/`` and ``done/stage{1,2}/`` listings once, name by name, and
keeps numpy arrays indexed by block, never a structure per object:

- :class:`JobTally` (a manifest is present): per block a bitmask of the expected pieces found
  (one bit per piece, see :mod:`chunkflow.donation_kinds`), stored bytes, a count of unexpected
  keys and the two done flags: about 30 bytes a block, so a million blocks with ten million
  donations take ~30 MB. Each listed key is classified on its own
  (:meth:`~chunkflow.donation_kinds.ExpectedPieces.classify`), so the listing may come in any
  order: a directory store streams it unsorted (``ObjectStore.scan``), never holding its names.
- :class:`~chunkflow.donation_prefix.PrefixTally` (no manifest): blocks are whatever names the
  keys carry, so it holds one dictionary entry per distinct block name (~150 bytes a block)
  plus the same counters; each key is parsed strictly (slower per object, still bounded by the
  number of blocks).

Both keep only the :data:`KEEP` smallest malformed and stray names (and count the rest): the
first ones of a sorted listing, whatever order the names came in. They keep the piece sizes of
the selected blocks only when the report will list them piece by piece, and a
:class:`~chunkflow.donation_reads.Reservoir` sample of keys for ``--sample``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from chunkflow.bounded import Smallest
from chunkflow.donation_kinds import ExpectedPieces, popcount
from chunkflow.donation_reads import UNCHECKED, PieceCheck, Reservoir
from chunkflow.geometry import parse_key
from chunkflow.job import Job
from chunkflow.store_layout import DONATIONS, DONE, marker_stages

__all__ = ["BATCH", "DONE_STAGES", "KEEP", "JobTally", "Tally"]

#: malformed, stray, unexpected names and read errors kept for the report (the rest are counted)
KEEP = 100
BATCH = 1 << 16
#: the stage of each folder of done markers (``done/stage1`` -> 1), the folder being a listed name's
#: part before its last ``/`` and the block the part after
DONE_STAGES = marker_stages(DONE)


class Tally:
    """What both tallies share: anomalies, done flags, read results."""

    def __init__(self, sample: Reservoir | None, keep_sizes: bool):
        self.sample = sample
        self.sizes: dict[int, dict[str, int]] | None = {} if keep_sizes else None  # block -> {key: size}
        self._malformed: Smallest[tuple[str, str]] = Smallest(KEEP)   # (name, reason)
        self._orphans: Smallest[str] = Smallest(KEEP)
        self._unexpected: Smallest[tuple[str, int]] = Smallest(KEEP * 100)   # (key, block)
        self._errors: Smallest[tuple] = Smallest(KEEP * 100)   # (order, block, error): see _error_order
        self._grouped: dict[str, tuple[int, dict[int, list[str]]]] = {}   # see _by_block
        self.odd_bytes: dict[int, int] = {}      # block (-1: stray) -> bytes of its unexpected or stray keys
        self.listed = 0
        self._reported = 0
        self.read = 0
        self.checks: dict[str, PieceCheck] = {}   # per key, only for blocks whose sizes are kept
        self.refused: np.ndarray | None = None
        self.foreign: np.ndarray | None = None
        self.bad_checksum: np.ndarray | None = None
        self.read_any: np.ndarray | None = None
        self.full = False

    def _tick(self, progress: Callable[[int], None] | None) -> None:
        if progress is not None:
            progress(self.listed - self._reported)
        self._reported = self.listed

    def _add_malformed(self, name: str, reason: str) -> None:
        self._malformed.add((name, reason))

    def _orphan(self, name: str, size: int) -> None:
        self.odd_bytes[-1] = self.odd_bytes.get(-1, 0) + size
        self._orphans.add(name)

    # ---- what is kept of the anomalies: the smallest, whatever the listing's order -------------
    @property
    def malformed(self) -> list[tuple[str, str]]:
        return self._malformed.items()

    @property
    def malformed_count(self) -> int:
        return self._malformed.count

    @property
    def orphans(self) -> list[str]:
        return self._orphans.items()

    @property
    def orphan_count(self) -> int:
        return self._orphans.count

    def unexpected_of(self, block: int) -> list[str]:
        """The unexpected keys kept of ``block`` (of the :data:`KEEP` x 100 smallest of the store)."""
        return self._by_block("unexpected", self._unexpected, 1, 0).get(block, [])

    def errors_of(self, block: int) -> list[str]:
        """The read errors kept of ``block``, in the order of :meth:`_error_order`."""
        return self._by_block("errors", self._errors, 1, 2).get(block, [])

    def _by_block(self, what: str, kept: Smallest, block_at: int, value_at: int) -> dict[int, list[str]]:
        """``kept``'s items grouped by block, smallest first (grouped again only after more were added)."""
        count, grouped = self._grouped.get(what, (-1, {}))
        if count != kept.count:
            grouped = {}
            for item in kept.items():
                grouped.setdefault(item[block_at], []).append(item[value_at])
            self._grouped[what] = (kept.count, grouped)
        return grouped

    def _error_order(self, key: str) -> object:
        """Where a read error goes among those kept: the order the pieces were read (a job's pieces
        are read in raster order, whatever the listing's)."""
        return self.read

    def _keep(self, blocks: np.ndarray, keys: list[str], sizes: np.ndarray, eligible: np.ndarray) -> None:
        """Piece sizes of the selected blocks (for their rows) and the sample's candidates."""
        chosen = np.flatnonzero(eligible)
        if self.sizes is not None:
            for j in chosen:
                self.sizes.setdefault(int(blocks[j]), {})[keys[j]] = int(sizes[j])
        if self.sample is not None:
            self.sample.offer([(int(blocks[j]), keys[j]) for j in chosen])

    # ---- reading ----------------------------------------------------------------------------
    def start_reads(self, n: int, full: bool) -> None:
        """Make room for the results of reading pieces (``full``: whole, else headers only)."""
        self.full = full
        self.refused = np.zeros(n, dtype=np.int32)
        self.foreign = np.zeros(n, dtype=bool)
        self.bad_checksum = np.zeros(n, dtype=bool)
        self.read_any = np.zeros(n, dtype=bool)

    def record(self, block: int, key: str, check: PieceCheck) -> None:
        """One piece read (the callback of :func:`~chunkflow.donation_reads.read_pieces`)."""
        job, checksum, error, _, _ = check
        self.read += 1
        self.read_any[block] = True
        if job == "foreign":
            self.foreign[block] = True
        if checksum == "bad":
            self.bad_checksum[block] = True
        if error:
            self.refused[block] += 1
            self._errors.add((self._error_order(key), block, error))
        if self.sizes is not None and block in self.sizes:
            self.checks[key] = check

    def read_column(self, block: int) -> tuple[str, str]:
        """``(job, checksum)`` columns of a block: ``-`` until one of its pieces was read."""
        if self.read_any is None or not self.read_any[block]:
            return UNCHECKED, UNCHECKED
        checksum = ("bad" if self.bad_checksum[block] else "ok") if self.full else UNCHECKED
        return "foreign" if self.foreign[block] else "ok", checksum


class JobTally(Tally):
    """Counters of a planned job's store: per block, which expected pieces are present."""

    def __init__(self, job: Job, selected: np.ndarray | None = None, keep_sizes: bool = False,
                 sample: Reservoir | None = None):
        super().__init__(sample, keep_sizes)
        self.job = job
        self.pieces = ExpectedPieces(job.layout, job.out_channels * np.dtype(job.donation_dtype).itemsize)
        self.grid = self.pieces.grid
        n = self.n = self.grid.size
        self.selected = np.ones(n, dtype=bool) if selected is None else selected
        words = (max(1, int(self.pieces.expected_counts().max(initial=0))) + 63) // 64
        self.bits = np.zeros((n, words), dtype=np.uint64)    # one bit per expected piece
        self.stored = np.zeros(n, dtype=np.int64)
        self.unexpected = np.zeros(n, dtype=np.int32)
        self.stage1 = np.zeros(n, dtype=bool)
        self.stage2 = np.zeros(n, dtype=bool)

    def add_donations(self, listing: Iterable[tuple[str, int]], progress: Callable[[int], None] | None = None) -> None:
        """Count a listing of ``donations/`` (or of one block's keys)."""
        classify, cut = self.pieces.classify, len(DONATIONS)
        keep = self.sample is not None or self.sizes is not None
        blocks: list[int] = []
        indices: list[int] = []
        sizes: list[int] = []
        keys: list[str] = []
        count = 0
        for name, size in listing:
            count += 1
            key = name[cut:]
            found = classify(key)
            if found is None:
                self._odd(name, key, size)
                continue
            blocks.append(found[0])
            indices.append(found[1])
            sizes.append(size)
            if keep:
                keys.append(key)
            if len(blocks) >= BATCH:
                self.listed += count
                count = 0
                self._flush(blocks, indices, sizes, keys, progress)
                blocks, indices, sizes, keys = [], [], [], []
        self.listed += count
        self._flush(blocks, indices, sizes, keys, progress)

    def _flush(self, blocks: list[int], indices: list[int], sizes: list[int], keys: list[str],
               progress: Callable[[int], None] | None) -> None:
        self._tick(progress)
        if not blocks:
            return
        f = np.array(blocks, dtype=np.int64)
        p = np.array(indices, dtype=np.int64)
        s = np.array(sizes, dtype=np.int64)
        np.add.at(self.stored, f, s)
        np.bitwise_or.at(self.bits, (f, p >> 6), np.left_shift(np.uint64(1), (p & 63).astype(np.uint64)))
        if keys:
            self._keep(f, keys, s, self.selected[f])

    def _odd(self, name: str, key: str, size: int) -> None:
        """A key that is not an expected piece of a block: malformed, stray or unexpected."""
        try:
            box, _ = parse_key(key)
        except ValueError as err:
            self._add_malformed(name, str(err))
            return
        flat = self.grid.flat(box.name)
        if flat is None:
            self._orphan(name, size)
            return
        self.unexpected[flat] += 1
        self.odd_bytes[flat] = self.odd_bytes.get(flat, 0) + size
        self._unexpected.add((key, flat))

    def add_done(self, names: Iterable[str], progress: Callable[[int], None] | None = None) -> None:
        """Set the done flags from the names listed under ``done/`` (names that are not markers of a
        block of the job are counted as listed and otherwise ignored)."""
        bz, by, bx = self.pieces.block_text     # the grid's names, inlined: this loop sees every marker
        _, ny, nx = self.grid.shape
        found: dict[int, list[int]] = {1: [], 2: []}
        count = 0
        for name in names:
            count += 1
            folder, _, block = name.rpartition("/")
            stage = DONE_STAGES.get(folder)
            if stage is None:
                continue
            parts = block.split("_")
            if len(parts) != 3:
                continue
            x, y, z = bx.get(parts[0]), by.get(parts[1]), bz.get(parts[2])
            if x is not None and y is not None and z is not None:
                batch = found[stage]
                batch.append((z * ny + y) * nx + x)
                if len(batch) >= BATCH:
                    self.listed += count
                    count = 0
                    self._mark(found, progress)
        self.listed += count
        self._mark(found, progress)

    def _mark(self, found: dict[int, list[int]], progress: Callable[[int], None] | None) -> None:
        self._tick(progress)
        for stage, flags in ((1, self.stage1), (2, self.stage2)):
            if found[stage]:
                flags[np.array(found[stage], dtype=np.int64)] = True
                found[stage].clear()

    # ---- results ----------------------------------------------------------------------------
    def present(self) -> np.ndarray:
        return popcount(self.bits)

    def expected(self) -> np.ndarray:
        return self.pieces.expected_counts()

    def raw(self) -> np.ndarray:
        return self.pieces.present_raw(self.bits)

    def name(self, block: int) -> str:
        return self.grid.name(block)

    def has_piece(self, block: int, index: int) -> bool:
        return bool((int(self.bits[block, index >> 6]) >> (index & 63)) & 1)

    def present_items(self) -> Iterator[tuple[int, str]]:
        """``(block, key)`` of every present expected piece of the selected blocks, in raster order and
        by key within a block (keys rebuilt from the bitmasks, not kept)."""
        for block in np.flatnonzero(self.selected & self.bits.any(axis=1)):
            for i, key, _, _ in self.pieces.pieces_of(int(block), donors=False):
                if self.has_piece(int(block), i):
                    yield int(block), key
