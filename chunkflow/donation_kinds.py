"""Which donation keys every block of a job expects, without asking the layout block by block.

Counts: :meth:`ExpectedPieces.expected_counts` gives the number of pieces every block expects
as one vectorised product of per-axis answers, following :meth:`Layout.donations_to` term by
term (the grid is separable, see :mod:`chunkflow.geometry`):

- one piece per donor combination (donors along z x y x x), less the block itself;
- when the block owns patches, one piece of its own per non-empty band slab: slab ``a`` is
  ``[start, core start)`` along axis ``a``, the core part along the axes before it and the
  whole block after it, each clipped to the block's own chunk;
- with whole-block writes, its core cut into z slabs (:meth:`Layout.core_pieces`).

Names: along one axis, two blocks whose geometry is the same relative to their start (length,
core start, donors and their pieces, own chunk) receive the same pieces, shifted; so a block's
pieces depend only on its triple of per-axis *kinds*. :meth:`ExpectedPieces.locate` asks
``donations_to`` once per kind triple it meets (usually a few dozen for a whole job: first,
interior and last blocks along each axis), keeps the pieces relative to the block start, and
gives any block's ``{piece name: piece index}`` from them, so a listed key is classified with
one dictionary lookup. Piece indices are per kind (0..count-1); the order is ``donations_to``'s.

Keys in any order: :meth:`ExpectedPieces.classify` finds a key's piece from its block's kind and
the piece's ranges relative to the block start (each range text parsed once), so a listing in no
order (a directory read with ``os.scandir``) costs the same per key as a sorted one, and nothing
is built per block.
"""
from __future__ import annotations

import re

import numpy as np

from chunkflow.bbox import Vec
from chunkflow.block_set import BlockGrid
from chunkflow.geometry import AxisPlan, Layout

__all__ = ["ExpectedPieces", "popcount"]

#: per kind triple: the pieces' ranges relative to the block start ((z0, z1), (y0, y1), (x0, x1)),
#: their donors' offsets (dz, dy, dx) and raw bytes
_Kind = tuple[list[tuple[tuple[int, int], ...]], list[tuple[int, int, int]], list[int]]
#: a range along one axis as a box name spells it: ASCII integers without leading zeros
_RANGE = re.compile(r"(0|-?[1-9][0-9]*)-(0|-?[1-9][0-9]*)", re.ASCII)
#: range texts remembered per axis (legitimate keys need a few per block along the axis; stray ones
#: are parsed each time once this many are known)
RANGE_CACHE = 1 << 16


def _axis_signature(ax: AxisPlan, k: int) -> tuple:
    """Everything about block ``k`` along ``ax`` that its donations depend on, relative to its start."""
    bs, be = ax.block_range(k)
    chunk = ax.chunk(k)
    return (be - bs, ax.core_start(k) - bs,
            tuple((d - k, *(p - bs for p in ax.piece(d, k))) for d in ax.donors(k)),
            None if chunk is None else (chunk[0] - bs, chunk[1] - bs))


def _overlaps(lo: int, hi: int, chunk: tuple[int, int] | None) -> bool:
    return chunk is not None and max(lo, chunk[0]) < min(hi, chunk[1])


class ExpectedPieces:
    """The pieces each block of ``layout`` expects; ``raw_per_voxel`` is channels x itemsize."""

    def __init__(self, layout: Layout, raw_per_voxel: int):
        self.layout = layout
        self.raw_per_voxel = raw_per_voxel
        self.grid = BlockGrid(layout)
        self.shape = self.grid.shape
        self._kind: list[np.ndarray] = []     # per axis (z, y, x): kind of each block index
        for ax in layout.axes:
            seen: dict[tuple, int] = {}
            self._kind.append(np.array([seen.setdefault(_axis_signature(ax, k), len(seen))
                                        for k in range(ax.num_blocks)], dtype=np.int64))
        self._kind_list = [k.tolist() for k in self._kind]
        self._nkinds = tuple(int(k.max()) + 1 for k in self._kind)
        self._starts = [[ax.block_range(k)[0] for k in range(ax.num_blocks)] for ax in layout.axes]
        #: per axis: "start-stop" of each block -> its index along that axis
        self.block_text = self.grid.axis_index
        self._kinds: dict[int, _Kind] = {}
        self._counts: np.ndarray | None = None
        #: per kind triple: the pieces' ranges relative to the block start (z0, z1, y0, y1, x0, x1) -> index
        self._relative: dict[int, dict[tuple[int, ...], int]] = {}
        #: per axis: range text -> (start, stop), None when it is no canonical range
        self._ranges: list[dict[str, tuple[int, int] | None]] = [{}, {}, {}]

    # ---- counts, vectorised over the grid ----------------------------------------------------
    def expected_counts(self) -> np.ndarray:
        """How many pieces each block expects (raster order), from per-axis answers only."""
        if self._counts is None:
            self._counts = self._count().ravel()
        return self._counts

    def _count(self) -> np.ndarray:
        z, y, x = (_axis_terms(ax) for ax in self.layout.axes)

        def outer(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
            return a[:, None, None] * b[None, :, None] * c[None, None, :]

        own = outer(z["own"], y["own"], x["own"])
        total = outer(z["donors"], y["donors"], x["donors"]) - own
        total += outer(z["low"], y["full"], x["full"])      # the band's z slab
        total += outer(z["high"], y["low"], x["full"])      # its y slab
        total += outer(z["high"], y["high"], x["low"])      # its x slab
        if self.layout.whole_block_writes:                  # the core, in z slabs
            plane = np.outer(y["core"], x["core"])
            values, inverse = np.unique(plane, return_inverse=True)
            slab = np.array([self.layout.core_slab(int(v)) for v in values], dtype=np.int64)[inverse.ravel()]
            slabs = -(-z["core"][:, None, None] // slab.reshape(plane.shape)[None, :, :])
            total += own * outer(z["core"] > 0, y["core"] > 0, x["core"] > 0) * slabs
        return total

    # ---- one block --------------------------------------------------------------------------
    def _kind_id(self, z: int, y: int, x: int) -> int:
        kz, ky, kx = self._kind_list
        return (kz[z] * self._nkinds[1] + ky[y]) * self._nkinds[2] + kx[x]

    def _pieces(self, z: int, y: int, x: int) -> _Kind:
        """The pieces of block (z, y, x)'s kind triple, relative to its start (asked once per triple)."""
        kid = self._kind_id(z, y, x)
        known = self._kinds.get(kid)
        if known is None:
            idx = Vec(z, y, x)
            start = self.layout.block_box(idx).start
            rel, donors, raw = [], [], []
            for d in self.layout.donations_to(idx):
                rel.append(tuple((d.piece.start[a] - start[a], d.piece.stop[a] - start[a]) for a in range(3)))
                donors.append(tuple(int(v) for v in d.donor - idx))
                raw.append(d.piece.size * self.raw_per_voxel)
            known = self._kinds[kid] = (rel, donors, raw)
        return known

    def _names(self, z: int, y: int, x: int) -> tuple[_Kind, list[str]]:
        kind = self._pieces(z, y, x)
        bz, by, bx = self._starts[0][z], self._starts[1][y], self._starts[2][x]
        return kind, [f"{bx + x0}-{bx + x1}_{by + y0}-{by + y1}_{bz + z0}-{bz + z1}"
                      for (z0, z1), (y0, y1), (x0, x1) in kind[0]]

    def locate(self, block_name: str) -> tuple[int, dict[str, int]] | None:
        """``(flat index, {piece name: piece index})`` of the block called ``block_name``; None when
        it is not a block of the grid. The names are the exact (canonical) spellings."""
        flat = self.grid.flat(block_name)
        if flat is None:
            return None
        _, names = self._names(*(int(v) for v in np.unravel_index(flat, self.shape)))
        return flat, {name: i for i, name in enumerate(names)}

    def classify(self, key: str) -> tuple[int, int] | None:
        """``(flat block index, piece index)`` of a donation key ``{block}%{piece}`` that names a block of
        the grid and a piece it expects, spelled exactly as the layout names them; None for any other
        key. Keys may come in any order: nothing is built per block (see the module docstring)."""
        block, _, piece = key.partition("%")
        b, p = block.split("_"), piece.split("_")
        if len(b) != 3 or len(p) != 3:
            return None
        tz, ty, tx = self.block_text
        z, y, x = tz.get(b[2]), ty.get(b[1]), tx.get(b[0])
        if z is None or y is None or x is None:
            return None
        cz, cy, cx = self._ranges
        rz, ry, rx = cz.get(p[2], False), cy.get(p[1], False), cx.get(p[0], False)
        if rz is False or ry is False or rx is False:
            rz, ry, rx = self._range(0, p[2]), self._range(1, p[1]), self._range(2, p[0])
        if rz is None or ry is None or rx is None:
            return None
        kz, ky, kx = self._kind_list
        table = self._relative.get((kz[z] * self._nkinds[1] + ky[y]) * self._nkinds[2] + kx[x])  # _kind_id
        if table is None:
            table = self._relative_table(z, y, x)
        sz, sy, sx = self._starts[0][z], self._starts[1][y], self._starts[2][x]
        i = table.get((rz[0] - sz, rz[1] - sz, ry[0] - sy, ry[1] - sy, rx[0] - sx, rx[1] - sx))
        return None if i is None else ((z * self.shape[1] + y) * self.shape[2] + x, i)

    def _range(self, axis: int, text: str) -> tuple[int, int] | None:
        """``(start, stop)`` of a range text along ``axis`` (remembered), None if not canonical."""
        cache = self._ranges[axis]
        found = cache.get(text, False)
        if found is False:
            m = _RANGE.fullmatch(text)
            found = (int(m[1]), int(m[2])) if m else None
            if len(cache) < RANGE_CACHE:
                cache[text] = found
        return found

    def _relative_table(self, z: int, y: int, x: int) -> dict[tuple[int, ...], int]:
        rel = self._pieces(z, y, x)[0]
        table = self._relative[self._kind_id(z, y, x)] = {
            (z0, z1, y0, y1, x0, x1): i for i, ((z0, z1), (y0, y1), (x0, x1)) in enumerate(rel)}
        return table

    def pieces_of(self, flat: int, donors: bool = True) -> list[tuple[int, str, str | None, int]]:
        """``(piece index, key, donor block name, raw bytes)`` of every piece block ``flat`` expects
        (donor None unless ``donors``), sorted by key as ``donations_to`` gives them (the indices
        follow the kind's first block, whose keys may sort otherwise)."""
        z, y, x = (int(v) for v in np.unravel_index(int(flat), self.shape))
        (_, offsets, raw), names = self._names(z, y, x)
        block = self.grid.name(flat)
        _, ny, nx = self.shape
        return sorted(((i, f"{block}%{name}",
                        self.grid.name(((z + dz) * ny + y + dy) * nx + x + dx) if donors else None, raw[i])
                       for i, (name, (dz, dy, dx)) in enumerate(zip(names, offsets))), key=lambda p: p[1])

    # ---- the whole grid, vectorised ---------------------------------------------------------
    def kind_ids(self) -> np.ndarray:
        """The kind-triple id of every block (raster order)."""
        kz, ky, kx = np.ix_(*self._kind)
        return ((kz * self._nkinds[1] + ky) * self._nkinds[2] + kx).ravel()

    def present_raw(self, bits: np.ndarray) -> np.ndarray:
        """Raw bytes of the present pieces of every block, from their ``(blocks, words)`` bitmasks
        (bits are set only through :meth:`locate`, so every kind with a bit set is known)."""
        raw = np.zeros(len(bits), dtype=np.int64)
        blocks = np.flatnonzero(bits.any(axis=1))
        if not len(blocks):
            return raw
        known = np.array(sorted(self._kinds), dtype=np.int64)
        width = max(len(self._kinds[k][2]) for k in self._kinds.keys())
        table = np.zeros((len(known), width), dtype=np.int64)
        for row, kid in enumerate(known):
            sizes = self._kinds[int(kid)][2]
            table[row, :len(sizes)] = sizes
        rows = np.searchsorted(known, self.kind_ids()[blocks])
        for i in range(min(width, bits.shape[1] * 64)):
            has = ((bits[blocks, i >> 6] >> np.uint64(i & 63)) & np.uint64(1)).astype(bool)
            raw[blocks[has]] += table[rows[has], i]
        return raw


_TERMS = ("donors", "own", "low", "high", "full", "core")


def _axis_terms(ax: AxisPlan) -> dict[str, np.ndarray]:
    """Per block index along ``ax``: its donors, whether it owns patches, whether its own chunk
    reaches below its core start (``low``), into its core (``high``), into the block (``full``),
    and its core's length."""
    rows = []
    for k in range(ax.num_blocks):
        bs, be = ax.block_range(k)
        cs, chunk = ax.core_start(k), ax.chunk(k)
        rows.append((len(ax.donors(k)), chunk is not None, _overlaps(bs, cs, chunk), _overlaps(cs, be, chunk),
                     _overlaps(bs, be, chunk), max(0, be - cs)))
    return dict(zip(_TERMS, np.array(rows, dtype=np.int64).reshape(-1, len(_TERMS)).T))


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(bits: np.ndarray) -> np.ndarray:
    """Set bits per row of a ``(rows, words)`` uint64 array."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(bits).sum(axis=1, dtype=np.int64)
    return _POP8[bits.view(np.uint8)].reshape(len(bits), -1).sum(axis=1, dtype=np.int64)
