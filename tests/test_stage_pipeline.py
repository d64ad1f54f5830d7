"""Stage one as a pipeline (chunkflow.stage_pipeline): a slot takes its next block as soon as its
block has left the model, while that block's writes go on behind it; never more than ``slots``
blocks write behind or read/compute at once; a failure in a write behind the model fails that
block's task (no done marker, a failed marker, the engine told); the device is handed from block
to block at the last submit without breaking the backends' output-validity contract, or batch by
batch for a backend whose batches are independent (``Backend.independent_batches``).

Every wait here is on an event with a timeout: under the old design (a slot takes its next block
only once the last one is written) the first test's writes would wait for a third block that never
reaches the model, and time out."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from chunkflow.backends import load_backend
from chunkflow.engines import Failed, LocalEngine, StageTask, TaskResult
from chunkflow.engines.task import worker_resources
from chunkflow.errors import Interrupted, StorageError
from chunkflow.planning import plan
from chunkflow.stage_pipeline import DeviceTurns, StageGates, stage_one_threads
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import Resources, inference_and_donate_many, reference
from chunkflow.storage import open_store, open_volume
from tests.helpers import make_input
from tests.test_stages import FailingPuts

TIMEOUT = 30.0


def _job(tmp_path, batch_size: int = 2):
    """An identity job of eight blocks, each with patches of its own and donations to make."""
    url, _ = make_input(tmp_path / "in", (16, 64, 64), dtype="uint8", seed=4, chunk=(4, 16, 16))
    return plan(url, f"file://{tmp_path / 'job_out'}", str(tmp_path / "job"), "identity", "6,20,20", overlap="2,6,6",
                block="8,32,32", storage_chunk="4,16,16", blend="gaussian", batch_size=batch_size)


class Observed:
    """A real backend that records, for every batch, which block's thread ran it (the block each
    thread last read the input of) and how many threads were inside the model at once."""

    def __init__(self, backend, reading: dict[int, str]):
        self.backend, self.reading = backend, reading
        self.name, self.device = backend.name, backend.device
        self.lock, self.inside, self.most_inside = threading.Lock(), 0, 0
        self.on_model: list[tuple[float, str]] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.on_model.append((time.perf_counter(), self.reading[threading.get_ident()]))
        try:
            return self.backend.predict(batch)
        finally:
            with self.lock:
                self.inside -= 1

    def blocks_on_model(self) -> set[str]:
        with self.lock:
            return {name for _, name in self.on_model}


class HeldWrites:
    """The job's real output volume or store, whose data writes wait until ``release`` is set (a
    write that waits longer than TIMEOUT goes on and counts in ``timed_out``). Records which
    blocks have a write waiting and when each write finished. Done markers are not held."""

    def __init__(self, target, owner, release: threading.Event, log: dict):
        self._target, self._owner, self._release, self._log = target, owner, release, log

    def __getattr__(self, name):
        return getattr(self._target, name)

    def _held(self, block: str, write):
        with self._log["lock"]:
            self._log["waiting"].setdefault(block, 0)
            self._log["waiting"][block] += 1
        if not self._release.wait(TIMEOUT):
            self._log["timed_out"] += 1
        try:
            return write()
        finally:
            with self._log["lock"]:
                self._log["waiting"][block] -= 1
                self._log["finished"].append(time.perf_counter())

    def write(self, box, data, *args, **kwargs):
        return self._held(self._owner(box), lambda: self._target.write(box, data, *args, **kwargs))

    def put(self, name: str, data, *args, **kwargs):
        if not name.startswith("donations/"):
            return self._target.put(name, data, *args, **kwargs)
        return self._held(self._owner(name), lambda: self._target.put(name, data, *args, **kwargs))


def _wait_for(condition, seconds: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_slot_takes_its_next_block_while_its_last_one_is_still_writing(tmp_path):
    """Every data write is held until blocks of three different chunks have been on the model: with
    two slots, two blocks write behind while a third (and a fourth) read and compute. While the
    writes are held, exactly four inputs are read (two blocks writing, two holding their output
    waiting for a place to write) and never more; then everything completes, bit for bit as the
    reference wants it."""
    job = _job(tmp_path)
    layout, blocks = job.layout, list(job.layout.block_indices())
    assert len(blocks) == 8
    reading: dict[int, str] = {}
    res = Resources(job, Observed(load_backend("identity"), reading))
    backend = res.backend
    read_boxes: list[str] = []
    plain_read = res.read_input

    def read(box):
        name = next(layout.block_box(b).name for b in blocks if layout.chunk_box(b).grow(job.context_margin) == box)
        reading[threading.get_ident()] = name
        read_boxes.append(name)
        return plain_read(box)

    donor = {d.key: layout.block_box(b).name for b in blocks for d in layout.donations_from(b)}
    cores = [(layout.core_box(b), layout.block_box(b).name) for b in blocks]

    def owner(what) -> str:
        if isinstance(what, str):
            return donor[what[len("donations/"):]]
        return next(name for core, name in cores if not what.intersect(core).is_empty())

    release, log = threading.Event(), {"lock": threading.Lock(), "waiting": {}, "finished": [], "timed_out": 0}
    res.read_input = read
    res.output = HeldWrites(res.output, owner, release, log)
    res.store = HeldWrites(res.store, owner, release, log)
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(inference_and_donate_many(job, blocks, res, slots=2)))
    runner.start()
    try:
        assert _wait_for(lambda: len(backend.blocks_on_model()) >= 3), "a third block never reached the model"
        assert not log["finished"] and not log["timed_out"]  # while every write of the first blocks waits
        assert _wait_for(lambda: len(read_boxes) == 4)
        time.sleep(0.5)  # the pipeline is full: nothing more may be read until a block has been written
        gates = res.gates(2)
        assert len(read_boxes) == 4 and gates.computing == 2 and gates.writing == 2
        with log["lock"]:
            assert 1 <= sum(n > 0 for n in log["waiting"].values()) <= 2  # blocks with a write under way
    finally:
        release.set()
        runner.join(TIMEOUT)
    assert not runner.is_alive() and not log["timed_out"]
    assert [b for b, _ in results] == blocks
    assert sorted(read_boxes) == sorted(layout.block_box(b).name for b in blocks)
    gates = res.gates(2)
    assert gates.most_writing == 2 and gates.most_computing == 2 and gates.computing == gates.writing == 0
    assert backend.most_inside == 1  # one block on the model at a time
    for block in blocks:
        receive_and_blend(job, block, Resources(job))
    np.testing.assert_allclose(open_volume(job.output).read(layout.bbox), reference(job, Resources(job)),
                               rtol=0, atol=1e-6)


class FailingWrites:
    """The job's real output volume, refusing writes that touch ``bad`` (a block's core)."""

    def __init__(self, volume, bad):
        self.volume, self.bad = volume, bad

    def write(self, box, data, *args, **kwargs):
        if not box.intersect(self.bad).is_empty():
            raise StorageError(f"refused write of {box.name}")
        return self.volume.write(box, data, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.volume, name)


@pytest.mark.parametrize("where", ["donation", "core"])
def test_a_failed_write_behind_fails_its_own_task(tmp_path, where):
    """Through the engine (two slots, stage one pipelined): a write of one block refused by the
    storage fails that block's task (Failed, a failed marker, no done marker, no running marker),
    while every other block is done."""
    job = _job(tmp_path)
    layout, blocks = job.layout, list(job.layout.block_indices())
    victim = blocks[4]
    assert not layout.core_box(victim).is_empty() and layout.donations_from(victim)
    res = worker_resources(job)
    if where == "donation":
        res.store = FailingPuts(res.store, layout.donations_from(victim)[0].key)
    else:
        res.output = FailingWrites(res.output, layout.core_box(victim))
    results = dict(LocalEngine(2).map(StageTask(job, 1), blocks))
    assert set(results) == set(blocks)
    failed = results.pop(victim)
    assert isinstance(failed, Failed) and failed.kind == "StorageError" and "refused" in failed.message
    assert all(isinstance(r, TaskResult) and not r.skipped for r in results.values())
    store = open_store(job.store)
    done = {n.rsplit("/", 1)[1] for n in store.list("done/stage1/")}
    name = layout.block_box(victim).name
    assert done == {layout.block_box(b).name for b in blocks} - {name}
    assert store.exists(f"failed/stage1/{name}") and not list(store.list("running/"))
    gates = res.gates(2)
    assert gates.computing == gates.writing == 0 and gates.most_writing >= 1


def test_the_engines_run_two_stage_one_tasks_per_slot():
    job = object()
    task, threads = StageTask(job, 1).for_slots(3)
    assert threads == 6 == stage_one_threads(3) and task.slots == 3 and task.stage == 1
    two = StageTask(job, 2)
    assert two.for_slots(3) == (two, 3)
    assert stage_one_threads(1) == 1 and stage_one_threads(2) == 4


def test_the_gates_bound_each_step_and_give_way_to_a_cancel():
    gates, cancelled = StageGates(2), threading.Event()
    first, second = gates.enter(cancelled, "a"), gates.enter(cancelled, "b")
    entered = threading.Event()

    def third() -> None:
        with gates.enter(cancelled, "c"):
            entered.set()

    waiter = threading.Thread(target=third)
    waiter.start()
    assert not entered.wait(0.2)  # two blocks compute: a third waits
    first.leave_device(cancelled)  # a leaves the device: its compute place goes to c
    assert entered.wait(TIMEOUT)
    waiter.join(TIMEOUT)
    second.leave_device(cancelled)
    third_place = gates.enter(cancelled, "d")
    assert (gates.computing, gates.writing) == (1, 2)
    failed: list[BaseException] = []

    def fourth() -> None:
        try:
            third_place.leave_device(cancelled)  # both write-behind places are taken: it waits
        except Interrupted as err:
            failed.append(err)

    waiter = threading.Thread(target=fourth)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive() and not failed
    cancelled.set()
    waiter.join(TIMEOUT)
    assert len(failed) == 1 and "d" in str(failed[0])
    for place in (first, second, third_place):
        place.close()
    assert (gates.computing, gates.writing, gates.most_writing, gates.most_computing) == (0, 0, 2, 2)
    with pytest.raises(Interrupted):
        gates.enter(cancelled, "e")  # a cancelled run starts no block


def test_the_device_is_handed_over_at_the_last_submit_within_the_output_contract():
    """Block a hands the device over after its last submit; block b's first submit goes at once,
    but its second waits until a has consumed its last output (an output stays valid until the
    second-next submit only)."""
    turns = DeviceTurns(threading.Lock())
    a = turns.turn()
    a.before_submit()
    a.before_submit()
    a.hand_over()  # a's last batch is submitted; a still has to accumulate it
    b_first, b_second = threading.Event(), threading.Event()

    def block_b() -> None:
        with turns.turn() as b:
            b.before_submit()
            b_first.set()
            b.before_submit()
            b_second.set()
            b.hand_over()

    thread = threading.Thread(target=block_b)
    thread.start()
    assert b_first.wait(TIMEOUT)
    assert not b_second.wait(0.2)
    a.close()  # a's last output consumed
    assert b_second.wait(TIMEOUT)
    thread.join(TIMEOUT)
    c = turns.turn()
    c.before_submit()  # b handed over and closed: c is not kept waiting
    c.before_submit()
    c.close()
    assert not turns.lock.locked()


def test_a_block_with_one_submit_hands_over_only_after_the_block_before_it():
    """b submits once: c's first submit would be a's second-next, so b hands over only once a is done."""
    turns = DeviceTurns(threading.Lock())
    a = turns.turn()
    a.before_submit()
    a.hand_over()
    b = turns.turn()
    b.before_submit()
    handed = threading.Event()

    def hand_over() -> None:
        b.hand_over()
        handed.set()

    thread = threading.Thread(target=hand_over)
    thread.start()
    assert not handed.wait(0.2)
    a.close()
    assert handed.wait(TIMEOUT)
    thread.join(TIMEOUT)
    b.close()
    assert not turns.lock.locked()


def test_per_batch_turns_hold_the_device_around_each_submit_only():
    """Per batch, a block gives the device back after each submit: another block's submit goes in
    between two of its own, and nobody waits for a previous block's last output."""
    turns = DeviceTurns(threading.Lock())
    a, b = turns.turn(per_batch=True), turns.turn(per_batch=True)
    a.before_submit()
    assert turns.lock.locked()
    got = threading.Event()
    thread = threading.Thread(target=lambda: (b.before_submit(), got.set()))
    thread.start()
    assert not got.wait(0.2)  # one call at a time
    a.after_submit()
    assert got.wait(TIMEOUT)
    thread.join(TIMEOUT)
    b.after_submit()
    a.before_submit()  # a's second submit: b has not handed over, and need not
    a.after_submit()
    b.before_submit()
    b.hand_over()
    assert not turns.lock.locked()
    a.close()
    b.close()
    assert not turns.lock.locked()


def test_a_per_batch_turn_gives_the_device_back_when_its_submit_fails():
    """A model that raises in ``submit`` leaves the device free for the next block (the turn is
    given back after the submit, and again when it closes); taking a per-batch turn twice is a bug."""
    from chunkflow.bbox import Bbox, Vec
    from chunkflow.blend import weight_map
    from chunkflow.inference import blended_inference

    turns = DeviceTurns(threading.Lock())
    region = Bbox(Vec(0, 0, 0), Vec(4, 4, 4))

    def broken(batch):
        raise RuntimeError("the model broke")

    with pytest.raises(RuntimeError, match="the model broke"):
        with turns.turn(per_batch=True) as turn:
            blended_inference(np.ones((1, 4, 4, 4), np.float32), region, [Vec(0, 0, 0)], region,
                              np.ones((4, 4, 4), np.float32), weight_map("constant", (4, 4, 4)), broken,
                              Vec(4, 4, 4), 1, turn=turn)
    assert not turns.lock.locked()
    with turns.turn(per_batch=True) as turn:
        turn.before_submit()
        with pytest.raises(RuntimeError, match="bug: a per-batch turn was taken twice"):
            turn.before_submit()
        turn.after_submit()
    assert not turns.lock.locked()


class Recording:
    """The identity backend, recording which block's thread ran each batch (``reading``: the block
    each thread last read the input of), slow enough (10 ms a batch) for two blocks to meet."""

    def __init__(self, independent: bool, reading: dict[int, str]):
        self.backend, self.reading = load_backend("identity"), reading
        self.name, self.device, self.independent_batches = "identity", "cpu", independent
        self.lock, self.inside, self.most_inside, self.calls = threading.Lock(), 0, 0, []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.calls.append(self.reading[threading.get_ident()])
        time.sleep(0.01)
        try:
            return self.backend.predict(batch)
        finally:
            with self.lock:
                self.inside -= 1


@pytest.mark.parametrize("independent", [True, False])
def test_blocks_interleave_their_batches_only_when_the_backend_allows_it(tmp_path, independent):
    """With ``independent_batches`` two blocks' batches interleave on the model (one call at a time);
    without it each block's batches run together. Either way the result is the reference's, and
    the cores bit for bit."""
    job = _job(tmp_path, batch_size=1)
    layout, blocks = job.layout, list(job.layout.block_indices())
    reading: dict[int, str] = {}
    res = Resources(job, Recording(independent, reading))
    plain_read = res.read_input

    def read(box):
        reading[threading.get_ident()] = next(layout.block_box(b).name for b in blocks
                                              if layout.chunk_box(b).grow(job.context_margin) == box)
        return plain_read(box)

    res.read_input = read
    assert [b for b, _ in inference_and_donate_many(job, blocks, res, slots=2)] == blocks
    calls = res.backend.calls
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert res.backend.most_inside == 1
    assert (len(runs) > len(set(runs))) == independent, runs  # a block's batches split by another's
    for block in blocks:
        receive_and_blend(job, block, Resources(job))
    want = reference(job, Resources(job))
    np.testing.assert_allclose(open_volume(job.output).read(layout.bbox), want, rtol=0, atol=1e-6)
    for block in blocks:
        core = layout.core_box(block)
        if core.is_empty():
            continue
        got = open_volume(job.output).read(core)
        assert np.array_equal(got, want[(slice(None),) + core.slices(layout.bbox)])
