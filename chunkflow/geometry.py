"""The global patch grid, the block grid, and who donates what to whom (pure, no I/O).

Everything here is a function of the volume's bounding box, the output patch size, the overlap,
the block size and the output storage chunk size. Every worker derives the same answers.

The grid is separable: each axis has its own sorted list of patch origins, and a patch is one
origin per axis. So everything about a block is a product of three 1D answers (``AxisPlan``),
which keeps planning a petavoxel job cheap: nothing here is proportional to the number of
patches or blocks, only to the length of one axis.

Per axis, for block ``k = [bs, be)``:

- its *own* patches are those whose origin lies in ``[bs, be)`` (origin assignment);
- its *chunk* is the union of its own patches' outputs: ``[first_own, last_own + patch)``;
- ``e`` is the end of the last patch owned by a lower block (``bs`` if none reaches in);
- its *core* starts at the first storage-chunk boundary strictly above ``e`` (or at ``bs`` when
  nothing reaches in). The core is written by stage one; the rest of the block (the *band*,
  rounded out to whole storage chunks) is written by stage two. Making the core start strictly
  above ``e`` keeps every donation key unique: no piece a block keeps for itself can have the
  same box as a piece a lower neighbour sends.

With ``whole_block_writes`` (a sharded output) stage one writes nothing and donates its core too;
stage two writes the whole block (docs/design.md, "Sharded outputs").
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Iterator

from chunkflow.bbox import Bbox, Vec, zyx_text
from chunkflow.errors import GeometryError

KEY_SEPARATOR = "%"
#: whole-block writes donate the core in z slabs of whole storage chunks of about this many voxels
CORE_PIECE_VOXELS = 1 << 24


def axis_origins(start: int, length: int, patch: int, overlap: int) -> tuple[int, ...]:
    """Patch origins along one axis: ``start + k*stride``, plus one flush with the far end.

    This is exactly MONAI's window placement (``dense_patch_slices`` with a scan interval of
    ``patch - overlap``): windows that would run past the end are moved back to end flush.
    """
    stride = patch - overlap
    last = start + length - patch
    origins = list(range(start, last + 1, stride))
    if origins[-1] != last:
        origins.append(last)
    return tuple(origins)


@dataclass(frozen=True)
class AxisPlan:
    """Everything about one axis: patch origins, blocks, chunks, cores, donations."""

    start: int
    stop: int
    patch: int
    block: int
    storage_chunk: int
    origins: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return -(-(self.stop - self.start) // self.block)

    def block_range(self, k: int) -> tuple[int, int]:
        bs = self.start + k * self.block
        return bs, min(bs + self.block, self.stop)

    def own(self, k: int) -> tuple[int, int]:
        """Index range ``[lo, hi)`` into ``origins`` of the patches block ``k`` owns."""
        bs, be = self.block_range(k)
        return bisect.bisect_left(self.origins, bs), bisect.bisect_left(self.origins, be)

    def chunk(self, k: int) -> tuple[int, int] | None:
        lo, hi = self.own(k)
        if hi == lo:
            return None
        return self.origins[lo], self.origins[hi - 1] + self.patch

    def reach(self, k: int) -> int:
        """End of the last patch owned by a lower block, at least the block start."""
        bs, _ = self.block_range(k)
        lo, _ = self.own(k)
        return max(bs, self.origins[lo - 1] + self.patch) if lo > 0 else bs

    def core_start(self, k: int) -> int:
        bs, be = self.block_range(k)
        e = self.reach(k)
        if e <= bs:
            return bs
        c = self.storage_chunk
        return min(be, self.start + ((e - self.start) // c + 1) * c)

    def block_index(self, coordinate: int) -> int:
        return (coordinate - self.start) // self.block

    def receivers(self, k: int) -> range:
        """Block indices (including ``k``) that block ``k``'s chunk overlaps."""
        ch = self.chunk(k)
        if ch is None:
            return range(0)
        return range(self.block_index(ch[0]), self.block_index(ch[1] - 1) + 1)

    def donors(self, k: int) -> list[int]:
        """Block indices (``k`` included if it owns patches) whose chunks overlap block ``k``."""
        bs, _ = self.block_range(k)
        first = bisect.bisect_right(self.origins, bs - self.patch)
        _, hi = self.own(k)
        return sorted({self.block_index(o) for o in self.origins[first:hi]})

    def piece(self, donor: int, k: int) -> tuple[int, int]:
        ch = self.chunk(donor)
        assert ch is not None
        bs, be = self.block_range(k)
        return max(ch[0], bs), min(ch[1], be)


@dataclass(frozen=True)
class Donation:
    """One piece of a donor chunk's output that a receiving block adds in stage two."""

    donor: Vec
    receiver: Vec
    receiver_box: Bbox
    piece: Bbox

    @property
    def key(self) -> str:
        return make_key(self.receiver_box, self.piece)


def make_key(block: Bbox, piece: Bbox) -> str:
    return f"{block.name}{KEY_SEPARATOR}{piece.name}"


def parse_key(key: str) -> tuple[Bbox, Bbox]:
    """Parse ``{block}%{piece}`` strictly: no path separators, integers only, piece inside block."""
    if not isinstance(key, str) or key.count(KEY_SEPARATOR) != 1 or "/" in key or "\\" in key or ".." in key:
        raise GeometryError(f"{key!r} is not a donation key of the form x0-x1_y0-y1_z0-z1%x0-x1_y0-y1_z0-z1")
    block_name, piece_name = key.split(KEY_SEPARATOR)
    try:
        block, piece = Bbox.from_name(block_name), Bbox.from_name(piece_name)
    except ValueError as err:
        raise GeometryError(f"{key!r} is not a valid donation key: {err}") from None
    if not block.contains(piece):
        raise GeometryError(f"donation key {key!r}: the piece does not lie inside the block")
    return block, piece


class Layout:
    """The patch grid and block grid of one job, and the donation plan they imply.

    Args:
        bbox: the output volume region to compute (ZYX, global voxels).
        patch: output patch size (ZYX).
        overlap: overlap of neighbouring output patches, in voxels (ZYX).
        block: block size (ZYX); a multiple of ``storage_chunk``.
        storage_chunk: the output volume's storage chunk size (ZYX).
        whole_block_writes: stage two writes every block whole, stage one donates its core (sharded outputs).
    """

    def __init__(self, bbox: Bbox, patch: Vec, overlap: Vec, block: Vec, storage_chunk: Vec | None = None,
                 whole_block_writes: bool = False):
        self.bbox, self.patch, self.overlap, self.block = bbox, Vec(patch), Vec(overlap), Vec(block)
        self.storage_chunk = Vec(storage_chunk) if storage_chunk is not None else self.block
        self.whole_block_writes = bool(whole_block_writes)
        self._validate()
        self.axes = tuple(
            AxisPlan(
                bbox.start[a], bbox.stop[a], self.patch[a], self.block[a], self.storage_chunk[a],
                axis_origins(bbox.start[a], bbox.shape[a], self.patch[a], self.overlap[a]),
            )
            for a in range(3)
        )
        self._check_unique_keys()

    def _validate(self) -> None:
        names = ("z", "y", "x")
        for label, value in (("patch", self.patch), ("block", self.block), ("storage chunk", self.storage_chunk)):
            for a in range(3):
                if value[a] <= 0:
                    raise GeometryError(f"{label} size {zyx_text(value)} must be positive along {names[a]}")
        for a in range(3):
            if self.overlap[a] < 0:
                raise GeometryError(f"overlap {zyx_text(self.overlap)} must not be negative along {names[a]}")
            if self.overlap[a] >= self.patch[a]:
                raise GeometryError(
                    f"overlap {zyx_text(self.overlap)} must be smaller than the output patch {zyx_text(self.patch)} along {names[a]}")
            if self.overlap[a] >= self.block[a]:
                raise GeometryError(
                    f"overlap {zyx_text(self.overlap)} must be smaller than the block {zyx_text(self.block)} along {names[a]}")
            if self.patch[a] > self.bbox.shape[a]:
                raise GeometryError(
                    f"output patch {zyx_text(self.patch)} is larger than the volume {zyx_text(self.bbox.shape)} along {names[a]}")
            if self.block[a] % self.storage_chunk[a]:
                raise GeometryError(
                    f"block {zyx_text(self.block)} is not a multiple of the output storage chunk "
                    f"{zyx_text(self.storage_chunk)} along {names[a]}; use e.g. "
                    f"{zyx_text(_round_up(self.block, self.storage_chunk))}")

    def _check_unique_keys(self) -> None:
        """Every key a block expects must be unique.

        Sufficient, and cheap (per axis, linear in its blocks): along every axis the 1-D pieces a
        block receives from its donors (itself included) are pairwise distinct. Two different 3-D
        donors differ along some axis, so their pieces differ there; a piece a block keeps for its
        own band cannot equal a lower donor's piece either, because the core starts strictly above
        the lower donors' reach. Only when that fails (blocks smaller than the output patch) is the
        exact check run, one block of each distinct kind."""
        if all(_distinct_axis_pieces(ax) for ax in self.axes):
            return
        reps = [self._representatives(ax) for ax in self.axes]
        for idx in itertools.product(*reps):
            keys = [d.key for d in self.donations_to(Vec(idx))]
            if len(keys) != len(set(keys)):
                raise GeometryError(
                    f"block {zyx_text(self.block)} with patch {zyx_text(self.patch)} and overlap {zyx_text(self.overlap)} "
                    "makes two donors send the same region to one block (this can happen when blocks are smaller "
                    "than the output patch); use a block at least as large as the output patch")

    @staticmethod
    def _representatives(ax: AxisPlan) -> list[int]:
        seen: dict[tuple, int] = {}
        for k in range(ax.num_blocks):
            bs, be = ax.block_range(k)
            sig = (be - bs, ax.core_start(k) - bs, tuple((d - k, *(p - bs for p in ax.piece(d, k))) for d in ax.donors(k)),
                   None if ax.chunk(k) is None else tuple(c - bs for c in ax.chunk(k)))  # type: ignore[union-attr]
            seen.setdefault(sig, k)
        return sorted(seen.values())

    # ---- grid sizes ------------------------------------------------------------------------
    @property
    def stride(self) -> Vec:
        return self.patch - self.overlap

    @property
    def grid_shape(self) -> Vec:
        """Blocks along z, y, x."""
        return Vec(ax.num_blocks for ax in self.axes)

    @property
    def num_blocks(self) -> int:
        return self.grid_shape.prod()

    @property
    def num_patches(self) -> int:
        return Vec(len(ax.origins) for ax in self.axes).prod()

    # ---- blocks ----------------------------------------------------------------------------
    def block_indices(self) -> Iterator[Vec]:
        """All block indices in ZYX raster order, generated lazily."""
        for idx in itertools.product(*(range(ax.num_blocks) for ax in self.axes)):
            yield Vec(idx)

    def block_box(self, idx: Vec) -> Bbox:
        r = [ax.block_range(k) for ax, k in zip(self.axes, idx)]
        return Bbox(Vec(a for a, _ in r), Vec(b for _, b in r))

    def block_index_of(self, box: Bbox) -> Vec:
        """The index of the block whose box is exactly ``box``; GeometryError otherwise."""
        idx = Vec(ax.block_index(s) for ax, s in zip(self.axes, box.start))
        if not all(0 <= i < n for i, n in zip(idx, self.grid_shape)) or self.block_box(idx) != box:
            raise GeometryError(f"{box.name} is not a block of this job (blocks are {zyx_text(self.block)} from "
                                f"{self.bbox.name})")
        return idx

    def chunk_box(self, idx: Vec) -> Bbox | None:
        """The region block ``idx``'s own patches cover (None if it owns no patch)."""
        r = [ax.chunk(k) for ax, k in zip(self.axes, idx)]
        if any(c is None for c in r):
            return None
        return Bbox(Vec(c[0] for c in r), Vec(c[1] for c in r))  # type: ignore[index]

    def own_origins(self, idx: Vec) -> list[Vec]:
        """Origins of the patches block ``idx`` computes, in global grid (ZYX raster) order."""
        ranges = [ax.origins[slice(*ax.own(k))] for ax, k in zip(self.axes, idx)]
        return [Vec(o) for o in itertools.product(*ranges)]

    def origins_overlapping(self, region: Bbox) -> list[Vec]:
        """Origins of all grid patches whose output overlaps ``region``, in grid order."""
        ranges = []
        for a, ax in enumerate(self.axes):
            lo = bisect.bisect_right(ax.origins, region.start[a] - ax.patch)
            hi = bisect.bisect_left(ax.origins, region.stop[a])
            ranges.append(ax.origins[lo:hi])
        return [Vec(o) for o in itertools.product(*ranges)]

    def all_origins(self) -> Iterator[Vec]:
        for o in itertools.product(*(ax.origins for ax in self.axes)):
            yield Vec(o)

    def core_box(self, idx: Vec) -> Bbox:
        """The storage-aligned part of block ``idx`` that stage one writes (may be empty; always
        empty with whole-block writes, where stage one donates its core instead)."""
        box = self.block_box(idx)
        if self.whole_block_writes:
            return Bbox(box.stop, box.stop)
        return self._core(idx)

    def band_boxes(self, idx: Vec) -> list[Bbox]:
        """The block minus its core as up to three disjoint, storage-aligned slabs (stage two writes
        these); with whole-block writes, the whole block."""
        if self.whole_block_writes:
            return [self.block_box(idx)]
        return self._band(idx)

    def core_pieces(self, idx: Vec) -> list[Bbox]:
        """With whole-block writes, the core that stage one donates to its own block, cut along z into
        slabs of whole storage chunks (about :data:`CORE_PIECE_VOXELS` each); otherwise none."""
        core = self._core(idx)
        if not self.whole_block_writes or core.is_empty():
            return []
        return list(core.z_slabs(self.core_slab(core.shape[1] * core.shape[2])))

    def core_slab(self, plane: int) -> int:
        """How thick (in z) the core pieces of a core with ``plane`` voxels per z plane are."""
        c = self.storage_chunk[0]
        return c * max(1, CORE_PIECE_VOXELS // (max(1, plane) * c))

    def _core(self, idx: Vec) -> Bbox:
        """The part of block ``idx`` that only its own patches touch, from storage-chunk boundaries."""
        box = self.block_box(idx)
        return Bbox(Vec(ax.core_start(k) for ax, k in zip(self.axes, idx)), box.stop)

    def _band(self, idx: Vec) -> list[Bbox]:
        """The block minus :meth:`_core`, as up to three disjoint slabs (z, then y, then x)."""
        box, core = self.block_box(idx), self._core(idx)
        slabs = []
        for a in range(3):
            start, stop = list(box.start), list(box.stop)
            for b in range(a):
                start[b] = core.start[b]
            stop[a] = core.start[a]
            slab = Bbox(Vec(start), Vec(stop))
            if not slab.is_empty():
                slabs.append(slab)
        return slabs

    # ---- donations -------------------------------------------------------------------------
    def donations_to(self, idx: Vec) -> list[Donation]:
        """Every piece block ``idx`` must receive before stage two, sorted by key.

        Pieces from other blocks are their chunk clipped to this block; the block's own
        contribution to its band is kept as up to three pieces of its own (one per band slab), and
        with whole-block writes its core as the :meth:`core_pieces`.
        """
        box = self.block_box(idx)
        result = []
        for donor in itertools.product(*(ax.donors(k) for ax, k in zip(self.axes, idx))):
            donor = Vec(donor)
            if donor == idx:
                continue
            piece = Bbox(*zip(*(ax.piece(d, k) for ax, d, k in zip(self.axes, donor, idx))))
            result.append(Donation(donor, idx, box, piece))
        own = self.chunk_box(idx)
        if own is not None:
            for slab in self._band(idx):
                piece = own.intersect(slab)
                if not piece.is_empty():
                    result.append(Donation(idx, idx, box, piece))
            result.extend(Donation(idx, idx, box, piece) for piece in self.core_pieces(idx))
        return sorted(result, key=lambda d: d.key)

    def donations_from(self, idx: Vec) -> list[Donation]:
        """Every piece block ``idx``'s chunk sends (to other blocks and to its own band)."""
        chunk = self.chunk_box(idx)
        if chunk is None:
            return []
        result = []
        for rec in itertools.product(*(ax.receivers(k) for ax, k in zip(self.axes, idx))):
            rec = Vec(rec)
            if rec == idx:
                continue
            box = self.block_box(rec)
            result.append(Donation(idx, rec, box, chunk.intersect(box)))
        box = self.block_box(idx)
        for slab in self._band(idx):
            piece = chunk.intersect(slab)
            if not piece.is_empty():
                result.append(Donation(idx, idx, box, piece))
        result.extend(Donation(idx, idx, box, piece) for piece in self.core_pieces(idx))
        return sorted(result, key=lambda d: d.key)

    def dependencies(self, idx: Vec) -> list[Vec]:
        """Blocks whose stage one must finish before stage two of ``idx`` (itself included)."""
        return sorted({d.donor for d in self.donations_to(idx)} | {idx})


def _distinct_axis_pieces(ax: AxisPlan) -> bool:
    for k in range(ax.num_blocks):
        pieces = [ax.piece(d, k) for d in ax.donors(k)]
        if len(pieces) != len(set(pieces)):
            return False
    return True


def _round_up(v: Vec, m: Vec) -> Vec:
    return Vec(-(-a // b) * b for a, b in zip(v, m))
