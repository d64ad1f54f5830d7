"""``inspect`` and the done-marker listings read a directory store unsorted, one entry at a time (issue 13).

``DirectoryStore.scan`` streams ``os.scandir`` instead of holding a directory's sorted names, so
``inspect`` over millions of donations uses memory that follows the block grid only. Everything
downstream must then give the same answer in any order: a key's piece is found on its own
(``ExpectedPieces.classify``), and what the report keeps of long lists (malformed, stray and
unexpected keys, read errors, examples) is the smallest, not the first met. Real directory stores
on disk throughout; :class:`OrderedStore` is the real store whose scan yields its own listing in
a chosen order.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow.bbox import Bbox, Vec
from chunkflow.donation_kinds import ExpectedPieces
from chunkflow.donation_report import inspect_store
from chunkflow.donation_summary import KEEP
from chunkflow.store_layout import MANIFEST
from chunkflow.stages import DONATIONS
from chunkflow.storage import DirectoryStore
from tests.helpers import axis_strategy, examples, hypothetical_job, job_of, job_or_reject
from tests.test_donation_summary import MALFORMED, fabricate, put


class OrderedStore(DirectoryStore):
    """A real directory store whose unsorted scans come in an order chosen by ``seed`` (None: sorted)."""

    def __init__(self, root, seed: int | None):
        super().__init__(root)
        self.seed = seed

    def _order(self, items: list) -> list:
        if self.seed is None:
            return sorted(items)
        random.Random(self.seed).shuffle(items)
        return items

    def scan(self, prefix: str = ""):
        return iter(self._order(list(super().scan(prefix))))

    def scan_with_sizes(self, prefix: str = ""):
        return iter(self._order(list(super().scan_with_sizes(prefix))))


# ---- the store's streamed listing ------------------------------------------------------------

NAMES = st.lists(st.lists(st.sampled_from(["a", "b", "ab", "a%1", "0-4_0-4_0-4", ".cftmp-x", "done", "z"]),
                          min_size=1, max_size=4).map("/".join), max_size=25)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NAMES, st.sampled_from(["", "a", "a/", "a/b", "a/b/", "ab", "done/", "done/a", "a%", "zz/"]))
def test_scan_lists_what_list_lists_in_any_order(names, prefix):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        made = []
        for name in names:
            path = root / name
            if any(p.is_file() for p in path.parents if p != root) or path.is_dir():
                continue  # a file where a folder would go, or the reverse
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * len(name))
            made.append(name)
        store = DirectoryStore(root)
        assert sorted(store.scan(prefix)) == sorted(store.list(prefix))
        assert sorted(store.scan_with_sizes(prefix)) == sorted(store.list_with_sizes(prefix))
        assert set(store.list(prefix)) <= set(made)
        if prefix.endswith("/"):
            assert sorted(store.names_under(prefix)) == sorted(n[len(prefix):] for n in store.list(prefix))
        assert not any(".cftmp-" in n.rpartition("/")[2] for n in store.scan(prefix))


def test_scan_skips_links_to_folders_and_a_missing_root(tmp_path):
    put(tmp_path / "s", "donations/k", b"12")
    os.symlink(tmp_path / "s" / "donations", tmp_path / "s" / "donations" / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "s" / "donations" / "broken")
    store = DirectoryStore(tmp_path / "s")
    assert sorted(store.scan("donations/")) == list(store.list("donations/")) == ["donations/broken", "donations/k"]
    assert list(store.scan_with_sizes("donations/")) == [("donations/k", 2)]   # a broken link has no size
    assert list(DirectoryStore(tmp_path / "absent").scan("")) == []


# ---- a key's piece, found on its own ----------------------------------------------------------

@settings(max_examples=examples(40), deadline=None)
@given(st.tuples(axis_strategy(), axis_strategy(), axis_strategy()), st.booleans(),
       st.tuples(st.integers(-9, 9), st.integers(-9, 9), st.integers(-9, 9)), st.integers(0, 2**32 - 1))
def test_classify_finds_exactly_the_expected_pieces(axes, sharded, start, seed):
    """Every expected key gives its block and piece index (those of ``locate``); keys of no grid block,
    pieces a block does not expect, other spellings of the same numbers and junk give None."""
    with tempfile.TemporaryDirectory() as tmp:
        job = job_or_reject(Path(tmp), axes, sharded, start)
        layout = job.layout
        pieces = ExpectedPieces(layout, 4)
        rng = np.random.default_rng(seed)
        expected = set()
        for flat, idx in enumerate(layout.block_indices()):
            block = layout.block_box(idx).name
            _, names = pieces.locate(block)
            for piece, i in names.items():
                assert pieces.classify(f"{block}%{piece}") == (flat, i)
                expected.add(f"{block}%{piece}")
        boxes = [layout.block_box(idx) for idx in layout.block_indices()]
        for _ in range(200):
            box = boxes[int(rng.integers(len(boxes)))]
            lo = [int(rng.integers(a - 2, b)) for a, b in zip(box.start, box.stop)]
            hi = [int(rng.integers(a + 1, b + 3)) for a, b in zip(lo, box.stop)]
            key = f"{box.name}%{Bbox(Vec(lo), Vec(hi)).name}"
            assert (pieces.classify(key) is not None) == (key in expected)
        some = sorted(expected)[:5]
        for key in some:
            block, piece = key.split("%")
            x, rest = piece.split("-", 1)
            for other in (f"{block}%0{x}-{rest}" if x != "0" else None, f"{block}%+{x}-{rest}", f"{block}%{piece}%",
                          f"{block}/%{piece}", f"{block}%{piece}_0-1", f"{block}x%{piece}"):
                assert other is None or pieces.classify(other) is None
        for junk in MALFORMED + ["", "%", "a_b_c%d_e_f"]:
            assert pieces.classify(junk) is None


# ---- the report in any listing order ----------------------------------------------------------

def _reports(root: Path, **kwargs) -> list[dict]:
    return [inspect_store(OrderedStore(root, seed), **kwargs).to_json() for seed in (None, 1, 2)] + \
        [inspect_store(DirectoryStore(root), **kwargs).to_json()]


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(axis_strategy(), axis_strategy(), axis_strategy()), st.booleans(), st.booleans(),
       st.integers(0, 2**32 - 1), st.floats(0, 1), st.integers(0, 3), st.floats(0, 1), st.sampled_from([1, 1000]))
def test_the_report_is_the_same_in_any_listing_order(axes, sharded, manifest, seed, present, extras, done, limit):
    """Sorted, shuffled twice, and as ``os.scandir`` gives it: the same report, JSON for JSON, with
    headers read (the fabricated pieces are refused: read errors per block) and without."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "job"
        job = job_or_reject(root, axes, sharded, (0, 0, 0))
        fabricate(root, job, np.random.default_rng(seed), present, extras, done)
        if not manifest:
            (root / MANIFEST).unlink()
        for headers in (None, True):
            first, *others = _reports(root, headers=headers, limit=limit)
            assert all(other == first for other in others)


def test_what_is_kept_of_long_lists_is_the_smallest_not_the_first_met(tmp_path):
    """More malformed, stray and unexpected keys than the report keeps: the kept ones are the smallest
    names (the first of a sorted listing), in any order; without a manifest too."""
    root = tmp_path / "job"
    job = job_of(root, ((8, 2, 0, 4, 2, 1),) * 3, False, (0, 0, 0))
    block = job.layout.block_box(Vec(0, 0, 0))
    for i in range(KEEP + 20):
        put(root, f"{DONATIONS}junk-{i:04d}", b"j")
        shifted = Bbox(block.start + 100 + i, block.stop + 100 + i)
        put(root, f"{DONATIONS}{shifted.name}%{shifted.name}", b"s")
        x, y = i % 8, (i // 8) % 8   # a voxel of the block: a key it does not expect
        put(root, f"{DONATIONS}{block.name}%{x}-{x + 1}_{y}-{y + 1}_0-1", b"u")
    first, *others = _reports(root, limit=1000)
    assert all(other == first for other in others)
    assert first["malformed_count"] == KEEP + 20 and len(first["malformed"]) == KEEP
    assert [m["name"] for m in first["malformed"]] == sorted(m["name"] for m in first["malformed"])
    assert first["malformed"][0]["name"] == f"{DONATIONS}junk-0000"
    assert first["orphan_count"] == KEEP + 20 and first["orphans"] == sorted(first["orphans"])
    assert first["donations"]["unexpected"] > 8
    (root / MANIFEST).unlink()
    first, *others = _reports(root, limit=1000)
    assert all(other == first for other in others)


def test_read_errors_of_a_block_come_by_key_whatever_block_of_its_kind_was_met_first(tmp_path):
    """Blocks 896-960 and 960-1024 along x are of one kind, but their keys sort differently (``960-976``
    after ``960-1024``): each block's refused pieces are reported in its own key order, in any listing
    order, not in the order of whichever block of the kind the listing met first."""
    root = tmp_path / "job"
    job = hypothetical_job(root, (16, 64, 1088), (8, 32, 32), (2, 8, 8), (16, 64, 64), (16, 64, 64))
    fabricate(root, job, np.random.default_rng(0), 1.0, 0, 0.0)
    first, *others = _reports(root, headers=True)
    assert all(other == first for other in others)
    assert len(first["blocks"]) == job.layout.num_blocks == 17
    for row in first["blocks"]:
        keys = [error.split()[1] for error in row["errors"]]
        assert keys == sorted(keys) and len(keys) == row["present"]
    assert sum(row["present"] for row in first["blocks"]) > 17
