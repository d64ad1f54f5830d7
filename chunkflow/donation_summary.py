"""Per-block counters of a donation store, filled from streamed listings in bounded memory.

``chunkflow inspect`` reads the ``donations/`` and ``done/stage{1,2}/`` listings once, name by name, and
keeps numpy arrays indexed by block, never a structure per object:

- :class:`JobTally` (a manifest is present): per block a bitmask of the expected pieces found
  (one bit per piece, see :mod:`chunkflow.donation_kinds`), stored bytes, a count of unexpected
  keys and the two done flags: about 30 bytes a block, so a million blocks with ten million
  donations take ~30 MB. Listed keys are classified with one dictionary lookup each (the
  listing is sorted, so a block's keys come together and its piece names are built once).
- :class:`PrefixTally` (no manifest): blocks are whatever names the keys carry, so it holds one
  dictionary entry per distinct block name (~150 bytes a block) plus the same counters; each
  key is parsed strictly (slower per object, still bounded by the number of blocks).

Both keep only the first :data:`KEEP` malformed and stray names (and count the rest), the
piece sizes of the selected blocks only when the report will list them piece by piece, and a
:class:`~chunkflow.donation_reads.Reservoir` sample of keys for ``--sample``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from chunkflow.donation_kinds import ExpectedPieces, popcount
from chunkflow.donation_reads import UNCHECKED, PieceCheck, Reservoir
from chunkflow.geometry import parse_key
from chunkflow.job import Job
from chunkflow.stages import DONATIONS

__all__ = ["DONE", "KEEP", "JobTally", "PrefixTally"]

DONE = "done/"
#: malformed, stray, unexpected names and read errors kept for the report (the rest are counted)
KEEP = 100
BATCH = 1 << 16
_STAGES = {f"{DONE}stage1/": 1, f"{DONE}stage2/": 2}


class _Tally:
    """What both tallies share: anomalies, done flags, read results."""

    def __init__(self, sample: Reservoir | None, keep_sizes: bool):
        self.sample = sample
        self.sizes: dict[int, dict[str, int]] | None = {} if keep_sizes else None  # block -> {key: size}
        self.malformed: list[tuple[str, str]] = []
        self.malformed_count = 0
        self.orphans: list[str] = []
        self.orphan_count = 0
        self.unexpected_keys: dict[int, list[str]] = {}
        self.unexpected_kept = 0
        self.odd_bytes: dict[int, int] = {}      # block (-1: stray) -> bytes of its unexpected or stray keys
        self.listed = 0
        self._reported = 0
        self.read = 0
        self.checks: dict[str, PieceCheck] = {}   # per key, only for blocks whose sizes are kept
        self.errors: dict[int, list[str]] = {}
        self.errors_kept = 0
        self.refused: np.ndarray | None = None
        self.foreign: np.ndarray | None = None
        self.bad_checksum: np.ndarray | None = None
        self.read_any: np.ndarray | None = None
        self.full = False

    def _tick(self, progress: Callable[[int], None] | None) -> None:
        if progress is not None:
            progress(self.listed - self._reported)
        self._reported = self.listed

    def _malformed(self, name: str, reason: str) -> None:
        self.malformed_count += 1
        if len(self.malformed) < KEEP:
            self.malformed.append((name, reason))

    def _orphan(self, name: str, size: int) -> None:
        self.orphan_count += 1
        self.odd_bytes[-1] = self.odd_bytes.get(-1, 0) + size
        if len(self.orphans) < KEEP:
            self.orphans.append(name)

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
            if self.errors_kept < KEEP * 100:
                self.errors.setdefault(block, []).append(error)
                self.errors_kept += 1
        if self.sizes is not None and block in self.sizes:
            self.checks[key] = check

    def read_column(self, block: int) -> tuple[str, str]:
        """``(job, checksum)`` columns of a block: ``-`` until one of its pieces was read."""
        if self.read_any is None or not self.read_any[block]:
            return UNCHECKED, UNCHECKED
        checksum = ("bad" if self.bad_checksum[block] else "ok") if self.full else UNCHECKED
        return "foreign" if self.foreign[block] else "ok", checksum


class JobTally(_Tally):
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
        locate, cut = self.pieces.locate, len(DONATIONS)
        keep = self.sample is not None or self.sizes is not None
        last, flat, names = None, -1, None
        blocks: list[int] = []
        indices: list[int] = []
        sizes: list[int] = []
        keys: list[str] = []
        count = 0
        for name, size in listing:
            count += 1
            key = name[cut:]
            block, _, piece = key.partition("%")
            if block != last:
                last = block
                found = locate(block)
                flat, names = found if found is not None else (-1, None)
            i = names.get(piece) if names is not None else None
            if i is None:
                self._odd(name, key, size)
                continue
            blocks.append(flat)
            indices.append(i)
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
            self._malformed(name, str(err))
            return
        flat = self.grid.flat(box.name)
        if flat is None:
            self._orphan(name, size)
            return
        self.unexpected[flat] += 1
        self.odd_bytes[flat] = self.odd_bytes.get(flat, 0) + size
        if self.unexpected_kept < KEEP * 100:
            self.unexpected_keys.setdefault(flat, []).append(key)
            self.unexpected_kept += 1

    def add_done(self, names: Iterable[str], progress: Callable[[int], None] | None = None) -> None:
        """Set the done flags from the names listed under ``done/`` (names that are not markers of a
        block of the job are counted as listed and otherwise ignored)."""
        bz, by, bx = self.pieces.block_text     # the grid's names, inlined: this loop sees every marker
        _, ny, nx = self.grid.shape
        found: dict[int, list[int]] = {1: [], 2: []}
        count = 0
        for name in names:
            count += 1
            stage = _STAGES.get(name[:12])
            if stage is None:
                continue
            parts = name[12:].split("_")
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
        """``(block, key)`` of every present expected piece of the selected blocks, in raster order
        (keys rebuilt from the bitmasks, not kept)."""
        for block in np.flatnonzero(self.selected & self.bits.any(axis=1)):
            for i, key, _, _ in self.pieces.pieces_of(int(block), donors=False):
                if self.has_piece(int(block), i):
                    yield int(block), key


class PrefixTally(_Tally):
    """Counters of a bare prefix of donations (no manifest): nothing is expected; blocks are the
    names the keys and done markers carry. ``select(name)`` says whether a block is reported."""

    def __init__(self, select: Callable[[str], bool], keep_limit: int, sample: Reservoir | None = None):
        super().__init__(sample, keep_sizes=True)
        self._select = select
        self._keep_limit = keep_limit
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self.n = 0
        self._size = 1024
        self.selected = np.zeros(self._size, dtype=bool)
        self.present_count = np.zeros(self._size, dtype=np.int64)
        self.stored = np.zeros(self._size, dtype=np.int64)
        self.stage1 = np.zeros(self._size, dtype=bool)
        self.stage2 = np.zeros(self._size, dtype=bool)
        self.raw_bytes = np.zeros(self._size, dtype=np.int64)
        self.unexpected = np.zeros(self._size, dtype=np.int32)
        self.hashes: dict[int, set[str]] = {}
        self.selected_count = 0

    def _block(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = self.n
            self.names.append(name)
            self.n += 1
            if self.n > self._size:
                self._size *= 2
                for attr in ("selected", "present_count", "stored", "stage1", "stage2", "raw_bytes", "unexpected"):
                    old = getattr(self, attr)
                    grown = np.zeros(self._size, dtype=old.dtype)
                    grown[:len(old)] = old
                    setattr(self, attr, grown)
            if self._select(name):
                self.selected[i] = True
                self.selected_count += 1
                if self.selected_count > self._keep_limit:
                    self.sizes = None   # too many blocks to list piece by piece
                    self.checks.clear()
        return i

    def add_donations(self, listing: Iterable[tuple[str, int]], progress: Callable[[int], None] | None = None) -> None:
        cut = len(DONATIONS)
        blocks: list[int] = []
        sizes: list[int] = []
        keys: list[str] = []
        for name, size in listing:
            self.listed += 1
            key = name[cut:]
            try:
                box, _ = parse_key(key)
            except ValueError as err:
                self._malformed(name, str(err))
                continue
            blocks.append(self._block(box.name))
            sizes.append(size)
            keys.append(key)
            if len(blocks) >= BATCH:
                self._flush(blocks, sizes, keys, progress)
                blocks, sizes, keys = [], [], []
        self._flush(blocks, sizes, keys, progress)

    def _flush(self, blocks: list[int], sizes: list[int], keys: list[str],
               progress: Callable[[int], None] | None) -> None:
        self._tick(progress)
        if not blocks:
            return
        f = np.array(blocks, dtype=np.int64)
        s = np.array(sizes, dtype=np.int64)
        np.add.at(self.present_count, f, 1)
        np.add.at(self.stored, f, s)
        self._keep(f, keys, s, self.selected[f])

    def add_done(self, names: Iterable[str], progress: Callable[[int], None] | None = None) -> None:
        for name in names:
            self.listed += 1
            stage = _STAGES.get(name[:12])
            if stage is not None and "/" not in name[12:]:
                i = self._block(name[12:])   # may grow the arrays: index them after
                (self.stage1 if stage == 1 else self.stage2)[i] = True
        self._tick(progress)

    def valid_items(self, listing: Iterable[tuple[str, int]]) -> Iterator[tuple[int, str]]:
        """``(block, key)`` of the well-formed keys of selected blocks in a (second) listing."""
        cut = len(DONATIONS)
        for name, _ in listing:
            key = name[cut:]
            try:
                box, _ = parse_key(key)
            except ValueError:
                continue
            i = self.index.get(box.name)
            if i is not None and self.selected[i]:
                yield i, key

    def record(self, block: int, key: str, check: PieceCheck) -> None:
        super().record(block, key, check)
        self.raw_bytes[block] += check[3]
        if check[4] is not None:
            self.hashes.setdefault(block, set()).add(check[4])
            if len(self.hashes[block]) > 2:   # "mixed" needs only to know there are two
                self.hashes[block] = set(list(self.hashes[block])[:2])

    def read_column(self, block: int) -> tuple[str, str]:
        job, checksum = super().read_column(block)
        if job != UNCHECKED:
            job = "ok" if len(self.hashes.get(block, ())) <= 1 else "mixed"
        return job, checksum

    # ---- results ----------------------------------------------------------------------------
    def trim(self) -> None:
        """Cut the grown arrays to the blocks seen."""
        for attr in ("selected", "present_count", "stored", "stage1", "stage2", "raw_bytes", "unexpected"):
            setattr(self, attr, getattr(self, attr)[:self.n])
        self._size = self.n

    def present(self) -> np.ndarray:
        return self.present_count[:self.n]

    def expected(self) -> None:
        return None

    def raw(self) -> np.ndarray:
        return self.raw_bytes[:self.n]

    def name(self, block: int) -> str:
        return self.names[block]

