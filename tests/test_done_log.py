"""The done log (issue 13): ``done_set`` from a checkpoint and the log since it equals the set of
done markers across polls with skewed clocks; a poll lists only what changed (request counts on
fake-gcs-server); a store without log entries still gives the right answer; the barrier never
produces stage two while a block counted done has no done marker."""
from __future__ import annotations

import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow.block_set import BlockGrid, BlockSet
from chunkflow.done_log import ALLOWANCE_MINUTES, BUCKET_S, DoneView, LostDoneMarkers, announce, done_set, \
    encode_summary, log_name
from chunkflow.engines.queue import barrier, open_queue, produce
from chunkflow.errors import Refusal
from chunkflow.job import Job
from chunkflow.masking import BLOCK_MAP, encode_block_map
from chunkflow.stages import is_done
from chunkflow.storage import DirectoryStore, ObjectStore, open_store
from chunkflow.storage import gcs
from tests.helpers import examples

T0 = 1_700_000_000.0  # the fabricated clocks of the property test start here


def grid_job(store: str, shape: tuple[int, int, int] = (1, 8, 8), mask: str | None = None) -> Job:
    """A job over ``shape`` blocks of one voxel each: nothing to compute, only a block grid."""
    z, y, x = shape
    return Job(input="file:///nonexistent/in", output="file:///nonexistent/out", store=store,
               bbox=f"0-{x}_0-{y}_0-{z}", input_patch=(1, 1, 1), output_patch=(1, 1, 1), overlap=(0, 0, 0),
               block=(1, 1, 1), storage_chunk=(1, 1, 1), blend="constant", model="identity", weights=None,
               model_checksum="none", in_channels=1, out_channels=1, mask=mask)


def finish(store: ObjectStore, stage: int, name: str, when: float | None = None, log: bool = True) -> None:
    """What ``mark_done`` writes for a block (at the fabricated time ``when``): the marker, then its log entry."""
    store.put(f"done/stage{stage}/{name}", b"{}")
    if log:
        announce(store, stage, name, now=when)


def markers(store: ObjectStore, grid: BlockGrid, stage: int = 1) -> set[int]:
    prefix = f"done/stage{stage}/"
    return {grid.flat(n[len(prefix):]) for n in store.list(prefix)}


def flats(blocks: BlockSet) -> set[int]:
    return {int(i) for i in np.flatnonzero(blocks.bits)}


# ---- (1) the view equals the done markers, poll after poll ---------------------------------------

BEHIND = ALLOWANCE_MINUTES * BUCKET_S - 1
SKEW = st.one_of(st.integers(-BEHIND, -BEHIND // 2), st.integers(-BEHIND, 900))  # behind (less than the allowance), ahead
EVENT = st.tuples(st.integers(0, 63), st.integers(0, 1800), SKEW)  # block, real time of the write, clock skew
POLL = st.tuples(st.integers(0, 1900), st.sampled_from(["same view", "reload", "reload", "no checkpoint"]),
                 st.booleans())


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 63), max_size=10), st.lists(EVENT, min_size=1, max_size=40),
       st.lists(POLL, min_size=2, max_size=10))
def test_polls_with_skewed_clocks_see_exactly_the_done_markers(legacy, events, polls):
    """Blocks finish at random times on workers whose clocks are off by up to the allowance (so log
    entries land in buckets out of order); pollers at random times keep, reload or lose the
    checkpoint. Each poll's view is exactly the set of done markers written before it."""
    with tempfile.TemporaryDirectory() as tmp:
        store = DirectoryStore(tmp)
        job = grid_job(tmp)
        grid = BlockGrid(job.layout)
        for block in legacy:  # done before the log existed: markers only, before any poll
            finish(store, 1, grid.name(block), log=False)
        pending = sorted(events, key=lambda e: e[1])
        view = None
        for at, how, save in sorted(polls, key=lambda p: p[0]):
            while pending and pending[0][1] <= at:
                block, real, skew = pending.pop(0)
                finish(store, 1, grid.name(block), T0 + real + skew)
            if how == "no checkpoint":
                store.delete("summary/stage1")
            if view is None or how != "same view":
                view = DoneView(store, 1, job, grid)
            seen = view.refresh(now=T0 + at)
            assert flats(seen) == markers(store, grid)
            if save:
                view.save()
        assert flats(done_set(store, 1, job, now=T0 + 1900)) == markers(store, grid)


def test_a_block_the_log_missed_is_announced_when_its_retry_finds_it_done(tmp_path):
    """A worker killed between its done marker and its log entry: the next poll cannot know; the
    retry's ``is_done`` writes the entry again and the poll after it counts the block."""
    store, job = DirectoryStore(tmp_path), grid_job(str(tmp_path))
    grid = BlockGrid(job.layout)
    done_set(store, 1, job)  # a checkpoint: from now on only the log is read
    finish(store, 1, grid.name(5), log=False)
    assert len(done_set(store, 1, job)) == 0
    assert is_done(store, 1, job.layout.block_box(grid.index(5)))
    assert flats(done_set(store, 1, job)) == {5}


def test_a_damaged_checkpoint_is_ignored_and_rebuilt(tmp_path, caplog):
    store, job = DirectoryStore(tmp_path), grid_job(str(tmp_path))
    grid = BlockGrid(job.layout)
    for block in (1, 2, 3):
        finish(store, 1, grid.name(block))
    done_set(store, 1, job)
    data = bytearray(store.get("summary/stage1"))
    data[-1] ^= 0xFF
    store.put("summary/stage1", bytes(data))
    assert flats(done_set(store, 1, job)) == {1, 2, 3}
    assert "checksum mismatch" in caplog.text
    other = grid_job(str(tmp_path), shape=(1, 8, 16))  # another job's grid: not its checkpoint
    assert flats(done_set(store, 1, other)) == {BlockGrid(other.layout).flat(grid.name(b)) for b in (1, 2, 3)}


# ---- (3) a store written before the log existed -----------------------------------------------

@pytest.mark.parametrize("names", ["x and y_z tables", "BlockGrid.flat"])
def test_a_store_without_log_entries_or_checkpoint_gives_the_right_answer(tmp_path, monkeypatch, names):
    if names == "BlockGrid.flat":  # the way names are read on grids with very many block columns
        monkeypatch.setattr("chunkflow.done_log._YZ_TABLE", 0)
    store, job = DirectoryStore(tmp_path), grid_job(str(tmp_path), shape=(2, 8, 8))
    grid = BlockGrid(job.layout)
    chosen = {0, 7, 64, 127}
    for block in chosen:
        finish(store, 1, grid.name(block), log=False)
    store.put("done/stage1/0-1_0-1_5-6", b"{}")  # not a block of this grid: ignored
    assert not list(store.list("log/")) and not store.exists("summary/stage1")
    assert flats(done_set(store, 1, job)) == chosen
    assert store.exists("summary/stage1")
    finish(store, 1, grid.name(9))  # and from then on the log
    assert flats(done_set(store, 1, job)) == chosen | {9}
    assert flats(done_set(store, 2, job)) == set()


def test_stage_one_counts_the_blocks_the_mask_leaves_no_patch(tmp_path):
    store, job = DirectoryStore(tmp_path), grid_job(str(tmp_path), mask="file:///nonexistent/mask")
    grid = BlockGrid(job.layout)
    masked = np.zeros(grid.size, dtype=bool)
    masked[[3, 4, 60]] = True
    store.put(BLOCK_MAP, encode_block_map(masked))
    finish(store, 1, grid.name(10))
    assert flats(done_set(store, 1, job)) == {3, 4, 10, 60}
    assert flats(done_set(store, 2, job)) == set()


# ---- listings from a start name ------------------------------------------------------------------

SEGMENT = st.text("ab0-", min_size=1, max_size=3).filter(lambda s: s not in (".", ".."))


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.lists(SEGMENT, min_size=1, max_size=3).map("/".join), max_size=20),
       st.text("ab0-/", max_size=6), st.sampled_from(["", "a", "a/", "b/a"]))
def test_directory_listing_from_a_start_name_equals_filtering_every_name(names, start, prefix):
    names = [n for n in dict.fromkeys(names) if not any(m.startswith(n + "/") for m in names)]
    with tempfile.TemporaryDirectory() as tmp:
        store = DirectoryStore(tmp)
        for name in names:
            store.put(name, b"x")
        expected = sorted(n for n in names if n.startswith(prefix) and n >= start)
        assert sorted(store.list(prefix, start_offset=start)) == expected
        assert sorted(n for n, _ in store.list_with_sizes(prefix, start_offset=start)) == expected


def test_gcs_listing_from_a_start_name(gcs_bucket):
    """fake-gcs-server honours ``startOffset``, and GCSStore passes it below its own prefix."""
    store = open_store(f"gs://{gcs_bucket}/job")
    names = ["log/stage1/0000000005/a", "log/stage1/0000000007/b", "log/stage1/0000000007/c",
             "log/stage1/0000000009/a", "log/stage2/0000000001/a", "done/stage1/a"]
    for name in names:
        store.put(name, b"")
    open_store(f"gs://{gcs_bucket}/other").put("log/stage1/0000000008/z", b"")
    assert list(store.list("log/stage1/", start_offset="log/stage1/0000000007/")) == names[1:4]
    assert list(store.list("log/stage1/", start_offset="log/stage1/0000000007/c")) == names[2:4]
    assert [n for n, _ in store.list_with_sizes("log/", start_offset="log/stage1/0000000009/")] == names[3:5]


# ---- (2) a poll costs what changed: list requests on fake-gcs-server ---------------------------------

class RequestCounter:
    """Counts the HTTP requests the real google client of a GCSStore sends (a wrapper of its session)."""

    def __init__(self, store):
        self.session = store._client._http
        self.sent: list[tuple[str, str]] = []
        send = self.session.request

        def request(*args, **kwargs):
            method = kwargs.get("method", args[0] if args else "?")
            url = kwargs.get("url", args[1] if len(args) > 1 else "?")
            self.sent.append((method, url))
            return send(*args, **kwargs)

        self.session.request = request

    def lists(self) -> int:
        return sum(1 for method, url in self.sent if method == "GET" and url.split("?")[0].endswith("/o"))

    def reset(self) -> None:
        self.sent.clear()


def _put_many(store: ObjectStore, names: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: store.put(n, b""), names))


def test_a_poll_lists_the_new_log_entries_not_every_marker(gcs_bucket, monkeypatch):
    """2100 blocks finished hours ago, then k more: a poll from the checkpoint makes one list request
    per page of new entries (at least one), where listing the markers takes one per page of done
    blocks. Pages of 100 names (GCS's are 1000), so that 2,100 blocks take 420 puts, not 4,200."""
    page = 100
    monkeypatch.setattr(gcs, "LIST_PAGE", page)
    store = open_store(f"gs://{gcs_bucket}/job")
    job = grid_job(store.url, shape=(1, 64, 128))
    grid = BlockGrid(job.layout)
    old = 210
    hours_ago = time.time() - 3 * 3600
    _put_many(store, [f"done/stage1/{grid.name(i)}" for i in range(old)]
              + [log_name(1, grid.name(i), int(hours_ago // BUCKET_S) + i % 50) for i in range(old)])
    counter = RequestCounter(store)
    assert len(done_set(store, 1, job)) == old  # no checkpoint yet: every marker listed, once
    assert counter.lists() == math.ceil(old / page)
    added = old
    for k in (0, 30, 120):
        names = [grid.name(i) for i in range(added, added + k)]
        _put_many(store, [f"done/stage1/{n}" for n in names])
        _put_many(store, [log_name(1, n, int(time.time() // BUCKET_S)) for n in names])
        added += k
        view = DoneView(store, 1, job, grid)
        counter.reset()
        assert len(view.refresh()) == added
        # one read of the checkpoint, then the log from the watermark on: the entries of the last
        # minutes (this test's, all of them new), not the old ones
        assert counter.lists() == max(1, math.ceil((added - old) / page)), counter.sent
        # besides: the read of the reset count (done_generation; absent here, so the client also checks the
        # bucket), which a checkpoint written back after a reset is told apart by
        others = [url for _, url in counter.sent if "done_generation" not in url and "?fields=name" not in url]
        assert len(others) == counter.lists() + 1, counter.sent
        assert all("startOffset=" in url for method, url in counter.sent if url.split("?")[0].endswith("/o"))
        view.save()
    counter.reset()
    DoneView(store, 1, job, grid).rebuild()
    assert counter.lists() == math.ceil(added / page)  # what every poll cost before the log


# ---- (4) the barrier never starts stage two while a counted block has no done marker ----------------

def _all_done(store: ObjectStore, job: Job, but: int | None = None) -> BlockGrid:
    grid = BlockGrid(job.layout)
    for i in range(grid.size):
        if i != but:
            finish(store, 1, grid.name(i))
    return grid


@pytest.mark.parametrize("damage", ["marker removed", "forged checkpoint"])
def test_barrier_refuses_stage_two_when_a_counted_block_has_no_done_marker(tmp_path, damage):
    store = DirectoryStore(tmp_path / "job")
    job = grid_job(str(tmp_path / "job"))
    if damage == "marker removed":
        grid = _all_done(store, job)
        assert len(done_set(store, 1, job)) == grid.size  # the checkpoint counts every block
        store.delete(f"done/stage1/{grid.name(17)}")
    else:  # a checkpoint that claims every block while block 17 has no marker
        grid = _all_done(store, job, but=17)
        store.put("summary/stage1", encode_summary(job, 1, BlockSet.full(grid), int(time.time() // BUCKET_S)))
    assert len(DoneView(store, 1, job, grid).refresh()) == grid.size  # the fast view is fooled...
    two = f"fq://{tmp_path / 'q2'}"
    with pytest.raises(LostDoneMarkers) as refusal:
        barrier(job, two, poll=0.05, timeout=5)
    assert isinstance(refusal.value, Refusal) and grid.name(17) in str(refusal.value)
    assert "1 blocks counted done have no done marker" in str(refusal.value)
    assert open_queue(two).enqueued == 0  # ...the barrier is not: nothing of stage two was produced
    assert flats(done_set(store, 1, job)) == set(range(grid.size)) - {17}  # the checkpoint was rebuilt
    one = f"fq://{tmp_path / 'q1'}"
    assert produce(job, one) == 1  # so produce enqueues the lost block again
    finish(store, 1, grid.name(17))
    assert barrier(job, two, poll=0.05, timeout=5) == grid.size


def test_barrier_finds_a_block_whose_log_entry_was_never_written(tmp_path, monkeypatch):
    """A worker killed between its done marker and its log entry, and no retry: after
    SWEEP_AFTER_S without a finished block the barrier lists every marker once and goes on."""
    monkeypatch.setattr("chunkflow.engines.queue.SWEEP_AFTER_S", 0.3)
    store = DirectoryStore(tmp_path / "job")
    job = grid_job(str(tmp_path / "job"))
    grid = BlockGrid(job.layout)
    done_set(store, 1, job)
    for i in range(grid.size):
        finish(store, 1, grid.name(i), log=i != 33)
    assert len(done_set(store, 1, job)) == grid.size - 1
    assert barrier(job, f"fq://{tmp_path / 'q2'}", poll=0.05, timeout=20) == grid.size
