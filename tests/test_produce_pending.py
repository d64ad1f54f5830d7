"""``produce`` and a worker's "is my job finished" cost the done bitmap and what changed, not the job's size
(issue 13), and never skip a block that is not done.

Jobs are planned on hypothetical volumes (a manifest in a real directory store, no voxels); blocks are
marked done with :func:`chunkflow.stages.mark_done`, as workers do (done marker, then its log entry).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow.block_set import BlockGrid, BlockSet
from chunkflow.done_log import done_set
from chunkflow.store_layout import LOG
from chunkflow.engines.attempts import failed_record, reset_given_up
from chunkflow.store_layout import marker_name
from chunkflow.engines.queue import JobBinding, open_queue, produce
from chunkflow.stages import Stats, mark_done
from chunkflow.storage import DirectoryStore
from tests.helpers import axis_strategy, examples, job_of, job_or_reject
from tests.test_queue_produce import fq_blocks


def _names(job) -> list[str]:
    return [job.layout.block_box(idx).name for idx in job.layout.block_indices()]


def _mark(store: DirectoryStore, job, names: list[str], stage: int = 1) -> None:
    boxes = {job.layout.block_box(idx).name: job.layout.block_box(idx) for idx in job.layout.block_indices()}
    for name in names:
        mark_done(store, stage, boxes[name], job, Stats())


def _unlog(store: DirectoryStore, names: set[str], stage: int = 1) -> None:
    """Remove the done-log entries of ``names``: their workers were killed between marker and entry."""
    for entry in list(store.list(f"{LOG}/stage{stage}/")):
        if entry.rpartition("/")[2] in names:
            store.delete(entry)


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(axis_strategy(), axis_strategy(), axis_strategy()), st.integers(0, 2**32 - 1), st.floats(0, 1),
       st.floats(0, 1), st.sampled_from(["none", "before", "after"]))
def test_produce_enqueues_every_block_not_done_and_only_those_the_log_does_not_vouch_for(axes, seed, done, unlogged,
                                                                                        checkpoint):
    """Every block not done is enqueued. A done block is skipped when its log entry (or a checkpoint)
    says so; a done block whose entry its killed worker never wrote may be enqueued again (its task
    finds it done). Without a checkpoint, produce lists the done markers: exactly the blocks not done."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "job"
        job = job_or_reject(root, axes, False, (0, 0, 0))
        store = DirectoryStore(root)
        rng = np.random.default_rng(seed)
        names = _names(job)
        finished = [n for n in names if rng.random() < done]
        early, late = finished[:len(finished) // 2], finished[len(finished) // 2:]
        _mark(store, job, early)
        if checkpoint == "before":
            done_set(store, 1, job)  # a checkpoint that knows only the early half
        _mark(store, job, late)
        if checkpoint == "after":
            done_set(store, 1, job)
        lost = {n for n in finished if rng.random() < unlogged}
        _unlog(store, lost)
        queue = Path(tmp) / "q"
        count = produce(job, f"fq://{queue}")
        enqueued = fq_blocks(queue) if count else []
        assert count == len(enqueued) == len(set(enqueued))
        not_done = set(names) - set(finished)
        assert not_done <= set(enqueued)
        vouched = set(finished) - lost
        if checkpoint in ("before", "after"):
            vouched |= set(early if checkpoint == "before" else finished)
        assert set(enqueued) <= set(names) - vouched
        if checkpoint == "none":
            assert set(enqueued) == not_done


def test_produce_force_enqueues_every_block_in_raster_order(tmp_path):
    job = job_of(tmp_path / "job", ((8, 3, 0, 4, 2, 1), (8, 2, 1, 4, 2, 1), (8, 3, 0, 4, 2, 2)), False, (0, 0, 0))
    store = DirectoryStore(tmp_path / "job")
    _mark(store, job, _names(job)[::2])
    assert produce(job, f"fq://{tmp_path / 'q'}", force=True) == job.layout.num_blocks
    assert sorted(fq_blocks(tmp_path / "q")) == sorted(_names(job))
    assert produce(job, f"fq://{tmp_path / 'p'}") == len(_names(job)[1::2])
    assert sorted(fq_blocks(tmp_path / "p")) == sorted(_names(job)[1::2])
    assert open_queue(f"fq://{tmp_path / 'p'}").inserted == len(_names(job)[1::2])  # the counter of a new queue
    produce(job, f"fq://{tmp_path / 'p'}")
    assert open_queue(f"fq://{tmp_path / 'p'}").inserted == 2 * len(_names(job)[1::2])


@settings(max_examples=examples(40), deadline=None)
@given(st.tuples(axis_strategy(), axis_strategy(), axis_strategy()), st.integers(0, 2**32 - 1))
def test_block_names_are_the_layouts_names_in_raster_order(axes, seed):
    with tempfile.TemporaryDirectory() as tmp:
        job = job_or_reject(Path(tmp), axes, False, (3, -5, 7))
        grid = BlockGrid(job.layout)
        chosen = BlockSet(grid, np.random.default_rng(seed).random(grid.size) < 0.5)
        truth = [n for i, n in enumerate(_names(job)) if chosen.bits[i]]
        names = chosen.names()
        assert len(names) == len(truth) and list(names) == list(chosen) == truth
        assert [names[i] for i in range(len(names))] == truth
        assert names[1:4] == truth[1:4] and names[::-1] == truth[::-1]
        assert all(n in chosen for n in truth)


def test_a_workers_finished_check_follows_the_log_and_the_given_up_blocks(tmp_path):
    job = job_of(tmp_path / "job", ((8, 3, 0, 4, 2, 1), (8, 2, 0, 4, 2, 1), (8, 2, 0, 4, 2, 1)), False, (0, 0, 0))
    store = DirectoryStore(tmp_path / "job")
    names = _names(job)
    binding = JobBinding(job)
    assert not binding._finished(1)
    _mark(store, job, names[:-2])
    assert not binding._finished(1)
    view = binding._views[1]
    failed = {names[-2]: failed_record(RuntimeError("boom"), 3, 3), names[-1]: failed_record(RuntimeError("x"), 1, 3)}
    for block, record in failed.items():
        store.put(marker_name("failed", 1, block), json.dumps(record).encode())
    assert not binding._finished(1)  # one block failed, not given up: its workers try again
    _mark(store, job, names[-1:])
    assert binding._finished(1)      # done, or given up
    assert binding._views[1] is view and not binding._finished(2)
    assert reset_given_up(store, 1, BlockSet(view.grid, ~view.done.bits)) == [names[-2]]
    assert not binding._finished(1)  # given up no more: it will run again
