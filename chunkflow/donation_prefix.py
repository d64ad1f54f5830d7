"""Per-block counters of a bare prefix of donations (no manifest), filled from streamed listings.

Nothing is expected: blocks are whatever names the keys and the done markers carry, so the tally
holds one dictionary entry per distinct block name (~150 bytes a block) plus the counters of
:class:`~chunkflow.donation_summary.Tally`; each key is parsed strictly (slower per object, still
bounded by the number of blocks). Listings may come in any order: what the report shows of them
(examples, read errors) is ordered by name, as a sorted listing would give it.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from chunkflow.donation_reads import UNCHECKED, PieceCheck, Reservoir
from chunkflow.donation_summary import BATCH, DONE_STAGES, Tally
from chunkflow.geometry import parse_key
from chunkflow.stages import DONATIONS

__all__ = ["PrefixTally"]


class PrefixTally(Tally):
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
                self._add_malformed(name, str(err))
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
            folder, _, block = name.rpartition("/")
            stage = DONE_STAGES.get(folder)
            if stage is not None:
                i = self._block(block)   # may grow the arrays: index them after
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

    def _error_order(self, key: str) -> object:
        """By key: the pieces are read in the order of a listing, which may be any."""
        return key

    def listing_rank(self, block: int) -> tuple[int, str]:
        """Where ``block`` comes in the order a sorted listing would meet it first: blocks with
        donations by name, then those only a stage-one done marker names, then stage two's."""
        first = 0 if self.present_count[block] else 1 if self.stage1[block] else 2
        return first, self.names[block]

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

