"""chunkflow.stages (stage one): two blocks in flight per worker (write-behind and prefetch by slots), and the
parallel writes of one block: the same bytes as one block at a time, the done marker last,
nothing written after a failure or an interrupt has been raised."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow.backends import load_backend
from chunkflow.errors import Interrupted, StorageError
from chunkflow.planning import plan
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import Resources, inference_and_donate, inference_and_donate_many, reference
from chunkflow.storage import open_volume
from tests.helpers import CONV3, examples, make_input, stored_bytes


def _job(tmp_path, name="job", model=CONV3, **kw):
    url, _ = make_input(tmp_path / "in", (14, 44, 40), dtype="uint8", seed=4, chunk=(4, 8, 12))
    options = dict(output_patch="4,16,16", overlap="1,5,5", block="8,24,24", blend="gaussian",
                   storage_chunk="4,8,12")
    if model != CONV3:
        options.pop("output_patch")
    options.update(kw)
    return plan(url, f"file://{tmp_path / (name + '_out')}", str(tmp_path / name), model, "10,22,22", **options)


def _done(tmp_path, name="job"):
    return sorted(p.name for p in (tmp_path / name / "done" / "stage1").glob("*"))


class SlowBackend:
    """A real backend whose every batch takes ``delay`` seconds more, with the GIL released (as a GPU
    kernel would), recording which threads were inside the model at once."""

    def __init__(self, backend, delay: float = 0.02):
        self.backend, self.delay = backend, delay
        self.name, self.device = backend.name, backend.device
        self.inside, self.most_inside, self._lock = 0, 0, threading.Lock()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            time.sleep(self.delay)
            return self.backend.predict(batch)
        finally:
            with self._lock:
                self.inside -= 1


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_slots_write_the_same_bytes_as_one_block_at_a_time(tmp_path, slots):
    job = _job(tmp_path, batch_size=2)
    blocks = list(job.layout.block_indices())
    for block in blocks:
        inference_and_donate(job, block, Resources(job))
    plain = stored_bytes(tmp_path)
    for path in (tmp_path / "job" / "done" / "stage1").glob("*"):
        path.unlink()
    results = list(inference_and_donate_many(job, iter(blocks), Resources(job), slots=slots))
    assert [b for b, _ in results] == blocks  # in order
    assert sum(s.patches for _, s in results) == job.layout.num_patches
    assert stored_bytes(tmp_path) == plain
    assert len(_done(tmp_path)) == len(blocks)


def test_two_slots_keep_one_block_on_the_model_and_overlap_the_other(tmp_path):
    job = _job(tmp_path, batch_size=4)
    slow = SlowBackend(load_backend(CONV3))
    results = list(inference_and_donate_many(job, job.layout.block_indices(), Resources(job, slow), slots=2))
    assert slow.most_inside == 1  # the device lock: never two blocks on the model at once
    waited = [s.seconds.get("wait", 0.0) for _, s in results]
    assert max(waited) > slow.delay  # a block was read and waited while another held the model
    phases = set().union(*(s.seconds for _, s in results))
    assert {"read", "wait", "model", "blend", "normalise", "write", "donate"} <= phases


class FailingPuts:
    """The job's real store, refusing puts of one donation key."""

    def __init__(self, store, bad: str):
        self.store, self.bad = store, bad
        self.url = store.url

    def put(self, name, data, **kw):
        if self.bad in name:
            raise StorageError(f"refused put of {name}")
        return self.store.put(name, data, **kw)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_failed_donation_leaves_no_done_marker_and_stops_nothing_halfway(tmp_path):
    job = _job(tmp_path)
    blocks = list(job.layout.block_indices())
    victim = job.layout.donations_from(blocks[1])[0]
    res = Resources(job)
    res.store = FailingPuts(res.store, victim.key)
    got = []
    with pytest.raises(StorageError, match="refused put"):
        for block, stats in inference_and_donate_many(job, blocks, res, slots=2):
            got.append(block)
    assert got == blocks[:1]
    assert job.layout.block_box(blocks[1]).name not in _done(tmp_path)
    snapshot, done = stored_bytes(tmp_path), _done(tmp_path)
    time.sleep(0.3)  # nothing still running in the background writes after the error was raised
    assert stored_bytes(tmp_path) == snapshot and _done(tmp_path) == done


def test_stopping_the_consumer_stops_the_block_in_flight(tmp_path):
    job = _job(tmp_path, batch_size=1)
    slow = SlowBackend(load_backend(CONV3), delay=0.05)
    res = Resources(job, slow)
    blocks = list(job.layout.block_indices())
    run = inference_and_donate_many(job, blocks, res, slots=2)
    first, _ = next(run)
    run.close()  # the caller stops (Ctrl-C in the engine's loop closes the generator the same way)
    done = _done(tmp_path)
    assert job.layout.block_box(first).name in done and len(done) <= 2
    snapshot = stored_bytes(tmp_path)
    time.sleep(0.3)
    assert stored_bytes(tmp_path) == snapshot and _done(tmp_path) == done
    assert not res.cancelled.is_set()  # a later run in this process is not cancelled
    slow.delay = 0.0  # the same Resources and backend finish the job, without the waits
    rest = [b for b in blocks if job.layout.block_box(b).name not in done]
    for block, _ in inference_and_donate_many(job, rest, res, slots=2):
        pass
    for block in blocks:
        receive_and_blend(job, block, res)
    expected = reference(job, Resources(job))
    np.testing.assert_allclose(open_volume(job.output).read(job.layout.bbox), expected, rtol=0, atol=1e-5)


def test_a_cancelled_block_raises_interrupted_before_writing(tmp_path):
    job = _job(tmp_path)
    res = Resources(job)
    before = stored_bytes(tmp_path)  # the output's info, written by plan
    res.cancelled.set()
    with pytest.raises(Interrupted):
        inference_and_donate(job, next(iter(job.layout.block_indices())), res)
    assert stored_bytes(tmp_path) == before and _done(tmp_path) == []


@settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slots=st.integers(1, 3), batch=st.integers(1, 5), blend=st.sampled_from(["constant", "gaussian", "bump"]),
       overlap=st.sampled_from(["0,0,0", "2,6,6", "4,10,10"]))
def test_invariant_1_with_slots(tmp_path_factory, slots, batch, blend, overlap):
    tmp_path = tmp_path_factory.mktemp("slots")
    job = _job(tmp_path, model="identity", batch_size=batch, blend=blend, overlap=overlap)
    res = Resources(job)
    for _ in inference_and_donate_many(job, job.layout.block_indices(), res, slots=slots):
        pass
    for block in job.layout.block_indices():
        receive_and_blend(job, block, res)
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, reference(job, Resources(job)), rtol=0, atol=1e-6)
