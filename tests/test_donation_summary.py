"""The streamed ``inspect`` summary against a brute force over the full listing, on real directory stores.

Jobs here are planned on hypothetical volumes (a manifest, no voxels): their stores are
fabricated object by object (expected donations present or not, unexpected, stray and
malformed names, done markers), so the tests reach every state without running a model.
The brute force uses only the layout (``donations_to``), strict key parsing and sets.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chunkflow import geometry
from chunkflow.bbox import Bbox, Vec
from chunkflow.donation_kinds import ExpectedPieces
from chunkflow.donation_reads import Reservoir
from chunkflow.donation_report import STATES, inspect_store
from chunkflow.geometry import parse_key
from chunkflow.job import Job
from chunkflow.store_layout import MANIFEST
from chunkflow.stages import DONATIONS
from chunkflow.errors import UsageError
from chunkflow.storage import DirectoryStore
from chunkflow.storage.donation_codec import encode_donation
from tests.helpers import axis_strategy, examples, hypothetical_job, job_or_reject

#: names under donations/ that are not strict keys (all valid file names on a directory store)
MALFORMED = ["a%b%c", "1-2_3-4_5-x%0-1_0-1_0-1", "0-8_0-8_0-4%0-8_0-8_0-99", "007-8_0-4_0-4%0-1_0-1_0-1",
             "sub/0-4_0-4_0-4%0-1_0-1_0-1", "no-percent", "0-4_0-4_0-4%"]


def put(root: Path, name: str, data: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def fabricate(root: Path, job: Job, rng: np.random.Generator, present: float, extras: int, done: float) -> None:
    """Expected donations present with probability ``present`` (random bytes, random sizes), ``extras``
    each of unexpected, stray and malformed names, done markers with probability ``done``."""
    layout = job.layout
    boxes = [layout.block_box(idx) for idx in layout.block_indices()]
    for idx, box in zip(layout.block_indices(), boxes):
        for d in layout.donations_to(idx):
            if rng.random() < present:
                put(root, DONATIONS + d.key, rng.bytes(int(rng.integers(0, 40))))
    for _ in range(extras):
        box = boxes[int(rng.integers(len(boxes)))]
        lo = [int(rng.integers(a, b)) for a, b in zip(box.start, box.stop)]
        hi = [int(rng.integers(a + 1, b + 1)) for a, b in zip(lo, box.stop)]
        put(root, f"{DONATIONS}{box.name}%{Bbox(Vec(lo), Vec(hi)).name}", b"u" * int(rng.integers(1, 9)))
        shifted = Bbox(box.start + 1, box.stop + 1)   # a block of no grid: a stray key
        put(root, f"{DONATIONS}{shifted.name}%{shifted.name}", b"s" * int(rng.integers(1, 9)))
        put(root, DONATIONS + MALFORMED[int(rng.integers(len(MALFORMED)))], b"junk")
    for stage in (1, 2):
        for box in boxes:
            if rng.random() < done:
                put(root, f"done/stage{stage}/{box.name}", b"{}")
    put(root, "done/stage1/not-a-block", b"{}")
    put(root, "done/other", b"{}")


def brute_force(root: Path, job: Job | None) -> dict:
    """The report's totals and rows, from the whole listing held in memory."""
    store = DirectoryStore(root)
    listed = dict(store.list_with_sizes(DONATIONS))
    done = set(store.list("done/stage1/")) | set(store.list("done/stage2/"))   # other names under done/ are not read
    valid, malformed = {}, 0
    for name, size in listed.items():
        try:
            block, _ = parse_key(name[len(DONATIONS):])
            valid[name[len(DONATIONS):]] = (block.name, size)
        except ValueError:
            malformed += 1
    rows, orphans, stored = {}, 0, 0
    if job is not None:
        layout = job.layout
        itemsize = np.dtype(job.donation_dtype).itemsize
        names = {layout.block_box(idx).name: idx for idx in layout.block_indices()}
        for key, (block, size) in valid.items():
            orphans += block not in names
            stored += size
        for name, idx in names.items():
            expected = {d.key: d.piece.size * job.out_channels * itemsize for d in layout.donations_to(idx)}
            mine = {k for k, (b, _) in valid.items() if b == name}
            rows[name] = dict(expected=len(expected), present=len(mine & set(expected)),
                              missing=sorted(set(expected) - mine), unexpected=sorted(mine - set(expected)),
                              stored=sum(valid[k][1] for k in mine & set(expected)),
                              raw=sum(expected[k] for k in mine & set(expected)))
    else:
        blocks = {b for b, _ in valid.values()} | {n.split("/")[2] for n in done
                                                   if n.startswith(("done/stage1/", "done/stage2/"))}
        for name in blocks:
            mine = {k for k, (b, _) in valid.items() if b == name}
            rows[name] = dict(expected=None, present=len(mine), missing=[], unexpected=[],
                              stored=sum(valid[k][1] for k in mine), raw=0)
        stored = sum(size for _, size in valid.values())
    for name, row in rows.items():
        row["stage1"], row["stage2"] = f"done/stage1/{name}" in done, f"done/stage2/{name}" in done
        row["state"] = ("bad" if row["unexpected"] else "blended" if row["stage2"] else
                        "incomplete" if row["expected"] is None or row["missing"] else "complete")
    return dict(rows=rows, malformed=malformed, orphans=orphans, stored=stored,
                objects=len(listed) + len(done) + (job is not None))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(axis_strategy(), axis_strategy(), axis_strategy()), st.booleans(), st.booleans(),
       st.tuples(st.integers(-9, 9), st.integers(-9, 9), st.integers(-9, 9)), st.integers(0, 2**32 - 1),
       st.floats(0, 1), st.integers(0, 3), st.floats(0, 1))
def test_streamed_summary_equals_brute_force(axes, sharded, manifest, start, seed, present, extras, done):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "job"
        job = job_or_reject(root, axes, sharded, start)
        fabricate(root, job, np.random.default_rng(seed), present, extras, done)
        if not manifest:
            (root / MANIFEST).unlink()
            job = None
        truth = brute_force(root, job)
        assume(truth["rows"])
        report = inspect_store(DirectoryStore(root))
        rows = truth["rows"]
        assert report.counts() == {s: sum(r["state"] == s for r in rows.values()) for s in STATES}
        assert report.num_blocks == len(rows) and report.rows == "all"
        assert report.donations["present"] == sum(r["present"] for r in rows.values())
        assert report.donations["expected"] == sum(r["expected"] or 0 for r in rows.values())
        assert report.stored_bytes == truth["stored"] and report.raw_bytes == sum(r["raw"] for r in rows.values())
        assert (report.malformed_count, report.orphan_count) == (truth["malformed"], truth["orphans"])
        assert report.objects == truth["objects"]
        assert report.stages == {f"stage{s}": sum(r[f"stage{s}"] for r in rows.values()) for s in (1, 2)}
        got = {b.block: b for b in report.blocks}
        assert set(got) == set(rows)
        for name, row in rows.items():
            b = got[name]
            assert (b.expected, b.present, b.missing, b.unexpected, b.stored_bytes, b.raw_bytes, b.state,
                    b.stage1, b.stage2) == (row["expected"], row["present"], row["missing"], row["unexpected"],
                                            row["stored"], row["raw"], row["state"], row["stage1"], row["stage2"])
            assert len(b.pieces) == (row["expected"] if job is not None else row["present"])
        problems = [n for n in got if got[n].state in ("incomplete", "bad")]
        assert report.problems["count"] == len(problems)
        assert report.healthy == (not problems and not truth["malformed"] and not truth["orphans"])
        # with fewer rows than blocks: the first problem blocks only, in the same order, no pieces
        small = inspect_store(DirectoryStore(root), limit=1)
        assert small.counts() == report.counts() and small.stored_bytes == report.stored_bytes
        if len(rows) > 1:
            assert small.rows == "problems" and [b.block for b in small.blocks] == problems[:1]
            assert all(b.pieces is None for b in small.blocks)
            assert [b.missing for b in small.blocks] == [got[n].missing for n in problems[:1]]


@settings(max_examples=examples(60), deadline=None)
@given(st.tuples(axis_strategy(), axis_strategy(), axis_strategy()), st.booleans(),
       st.tuples(st.integers(-9, 9), st.integers(-9, 9), st.integers(-9, 9)), st.sampled_from([None, 1, 40, 200]))
def test_expected_pieces_by_kind_equal_the_layout(axes, sharded, start, core_voxels):
    """Counts (vectorised, per axis), names and donors of every block's pieces equal ``donations_to``;
    ``core_voxels`` shrinks the whole-block-writes core pieces so that a core is cut in several slabs."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        if core_voxels is not None:
            patch.setattr(geometry, "CORE_PIECE_VOXELS", core_voxels)
        job = job_or_reject(Path(tmp), axes, sharded, start)
        layout = job.layout
        pieces = ExpectedPieces(layout, 4)
        counts = pieces.expected_counts()
        for flat, idx in enumerate(layout.block_indices()):
            truth = {d.key: (layout.block_box(d.donor).name, d.piece.size * 4) for d in layout.donations_to(idx)}
            assert counts[flat] == len(truth)
            assert {key: (donor, raw) for _, key, donor, raw in pieces.pieces_of(flat)} == truth
            located, names = pieces.locate(layout.block_box(idx).name)
            assert located == flat and {f"{layout.block_box(idx).name}%{n}" for n in names} == set(truth)
        assert pieces.locate("0-1_0-1_0-1x") is None and pieces.locate("nonsense") is None


@settings(max_examples=examples(40), deadline=None)
@given(st.tuples(axis_strategy(), axis_strategy(), axis_strategy()), st.booleans(),
       st.tuples(st.integers(-9, 30), st.integers(-9, 30), st.integers(-9, 30)),
       st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20)))
def test_region_selects_exactly_the_blocks_intersecting_it(axes, manifest, lo, size):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "job"
        job = job_or_reject(root, axes, False, (0, 0, 0))
        fabricate(root, job, np.random.default_rng(0), 0.5, 0, 0.5)
        region = Bbox(Vec(lo), Vec(lo) + Vec(size))
        boxes = [job.layout.block_box(idx) for idx in job.layout.block_indices()]
        if not manifest:
            (root / MANIFEST).unlink()
            truth = brute_force(root, None)
            boxes = [Bbox.from_name(n) for n in truth["rows"] if n != "not-a-block"]
        inside = {b.name for b in boxes if not b.intersect(region).is_empty()}
        if manifest and region.intersect(job.layout.bbox).is_empty():
            with pytest.raises(UsageError, match=f"--region {region.name} does not intersect"):
                inspect_store(DirectoryStore(root), region=region.name)
            return
        report = inspect_store(DirectoryStore(root), region=region.name, limit=10**6)
        assert {b.block for b in report.blocks} == inside and report.num_blocks == len(inside)
        assert report.selection == {"block": None, "region": region.name, "blocks": len(inside)}


def test_bad_region_and_block_values_are_one_clear_error(tmp_path):
    job = hypothetical_job(tmp_path / "job", (16, 64, 64), (8, 32, 32), (2, 8, 8), (8, 32, 32), (8, 32, 32))
    store = DirectoryStore(tmp_path / "job")
    for region, message in [("abc", "--region 'abc' is not a box x0-x1_y0-y1_z0-z1"),
                            ("0-10_0-10", "--region '0-10_0-10' is not a box"),
                            ("5-1_0-10_0-10", "--region '5-1_0-10_0-10' is not a box"),
                            ("100-200_0-10_0-10", f"does not intersect the job's volume {job.layout.bbox.name}")]:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            inspect_store(store, region=region)
    with pytest.raises(UsageError, match="--block and --region cannot be used together"):
        inspect_store(store, region="0-10_0-10_0-10", block="0-32_0-32_0-8")


class CountingStore(DirectoryStore):
    """A real directory store that counts the donation bodies and heads it is asked for."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, name: str) -> bytes:
        if name.startswith(DONATIONS):
            self.reads.append(name)
        return super().get(name)

    def get_head(self, name: str, nbytes: int) -> bytes:
        if name.startswith(DONATIONS):
            self.reads.append(name)
        return super().get_head(name, nbytes)


@pytest.fixture
def encoded_job(tmp_path):
    """Every expected donation of a 3x2x2-block job, encoded (zstd), and one of them corrupted."""
    job = hypothetical_job(tmp_path / "job", (24, 64, 64), (8, 32, 32), (2, 8, 8), (8, 32, 32), (8, 16, 16))
    job = Job(**{**json.loads(job.to_json()), "donation_compression": "zstd"})
    (tmp_path / "job" / MANIFEST).write_text(job.to_json())
    keys = []
    for idx in job.layout.block_indices():
        for d in job.layout.donations_to(idx):
            data = np.full((1, *d.piece.shape), 0.5, dtype=np.float32)
            put(tmp_path / "job", DONATIONS + d.key, encode_donation(data, d.piece, d.key, job.job_hash, "zstd"))
            keys.append(d.key)
    corrupt = keys[len(keys) // 2]
    path = tmp_path / "job" / DONATIONS / corrupt
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x5A
    path.write_bytes(bytes(data))
    return job, keys, corrupt


def test_sample_reads_exactly_n_donations_and_finds_the_corrupt_one_when_it_covers_it(encoded_job):
    job, keys, corrupt = encoded_job
    root = Path(job.store)
    for seed in range(5):
        store = CountingStore(root)
        report = inspect_store(store, verify=True, sample=7, seed=seed)
        assert len(store.reads) == len(set(store.reads)) == 7 and set(store.reads) <= {DONATIONS + k for k in keys}
        assert report.sample == {"requested": 7, "read": 7, "of": len(keys)} and report.checked == "verified"
        assert report.counts()["bad"] == (DONATIONS + corrupt in store.reads)
    store = CountingStore(root)
    report = inspect_store(store, verify=True, sample=len(keys) + 5)     # covers every donation
    assert sorted(store.reads) == sorted(DONATIONS + k for k in keys)
    [bad] = [b for b in report.blocks if b.state == "bad"]
    assert bad.block == corrupt.split("%")[0] and bad.checksum == "bad"
    assert any(corrupt in e and "is corrupt" in e for e in bad.errors), bad.errors
    assert "read a random sample of" in report.summary()
    store = CountingStore(root)
    whole = inspect_store(store, verify=True)                             # no sample: everything, once
    assert sorted(store.reads) == sorted(DONATIONS + k for k in keys) and whole.sample is None
    assert whole.counts() == report.counts()
    heads = CountingStore(root)
    headers = inspect_store(heads, headers=True, sample=3)
    assert headers.checked == "headers" and len(heads.reads) == 3
    assert all(b.checksum == "-" for b in headers.blocks)            # a header says nothing of the checksum
    assert sum(b.job == "ok" for b in headers.blocks) == len({n.split("%")[0] for n in heads.reads})


def test_sample_of_a_region_reads_only_its_blocks(encoded_job):
    job, keys, _ = encoded_job
    store = CountingStore(job.store)
    block = job.layout.block_box(Vec(0, 0, 0))
    report = inspect_store(store, region=block.name, sample=100)
    mine = [k for k in keys if k.startswith(block.name + "%")]
    assert report.num_blocks == 1 and sorted(store.reads) == sorted(DONATIONS + k for k in mine)


def test_reservoir_is_a_uniform_sample_of_a_stream():
    counts = np.zeros(50, dtype=int)
    for seed in range(400):
        reservoir = Reservoir(5, seed)
        for start in range(0, 50, 7):
            reservoir.offer(list(range(start, min(start + 7, 50))))
        assert reservoir.seen == 50 and len(set(reservoir.items)) == 5
        counts[reservoir.items] += 1
    assert counts.sum() == 2000 and counts.min() > 15 and counts.max() < 65   # expected 40 each
    small = Reservoir(10, 0)
    small.offer([1, 2, 3])
    assert sorted(small.items) == [1, 2, 3]


def test_a_large_grid_lists_problem_blocks_not_every_block(tmp_path):
    """1,088 blocks with done markers and no donations: totals for all, rows for the first problems;
    without the manifest, the same blocks by name (nothing expected)."""
    job = hypothetical_job(tmp_path / "job", (32, 512, 544), (8, 32, 32), (2, 8, 8), (8, 32, 32), (8, 32, 32))
    root = tmp_path / "job"
    indices = list(job.layout.block_indices())
    names = [job.layout.block_box(idx).name for idx in indices]
    expected = [len(job.layout.donations_to(idx)) for idx in indices]
    (root / "done" / "stage1").mkdir(parents=True)
    (root / "done" / "stage2").mkdir(parents=True)
    for i, name in enumerate(names):
        (root / "done" / "stage1" / name).touch()
        if i % 50:
            (root / "done" / "stage2" / name).touch()
    report = inspect_store(DirectoryStore(root), limit=10)
    problems = [n for i, n in enumerate(names) if i % 50 == 0 and expected[i]]
    complete = [n for i, n in enumerate(names) if i % 50 == 0 and not expected[i]]
    assert report.counts() == {"complete": len(complete), "blended": len(names) - len(problems) - len(complete),
                               "incomplete": len(problems), "bad": 0}
    assert report.rows == "problems" and [b.block for b in report.blocks] == problems[:10]
    assert report.problems == {"count": len(problems), "first": problems[:20]}
    assert report.examples["blended"] == names[1:4] and report.examples["complete"] == complete[:3]
    assert report.donations == {"expected": sum(expected), "present": 0, "missing": sum(expected), "unexpected": 0}
    data = report.to_json()
    assert len(data["blocks"]) == 10 and data["counts"] == report.counts() and data["healthy"] is False
    assert json.loads(json.dumps(data)) == data
    (root / MANIFEST).unlink()
    bare = inspect_store(DirectoryStore(root), limit=10)
    assert bare.counts() == {"complete": 0, "blended": len(names) - len(names[::50]), "incomplete": len(names[::50]),
                             "bad": 0}
    assert bare.num_blocks == len(names) and bare.rows == "problems" and bare.grid is None
    order = sorted(names[::50], key=lambda n: tuple(Bbox.from_name(n).start))
    assert [b.block for b in bare.blocks] == order[:10] and all(b.expected is None for b in bare.blocks)
