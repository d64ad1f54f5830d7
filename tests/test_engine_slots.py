"""Engines that overlap I/O with compute, with a bounded number of tasks in flight.

The local engine with two slots really runs two tasks at once (a rendezvous that only concurrent
tasks pass), yields each result once, isolates failures, keeps streaming dependencies and stops
its threads on an interrupt before control returns. Two-stage runs with one and two local slots
and on Dask, in both orders, equal the whole-volume reference. The Dask engine never has more
futures in the scheduler than its window (counted on the scheduler while the run goes)."""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkflow.engines import Failed, LocalEngine, NotRun, make_engine, run_job, run_stage
from chunkflow.engines.base import EngineError
from chunkflow.engines.local import Dependencies, Slots, demand_order
from chunkflow.errors import Interrupted
from chunkflow.storage import open_store, open_volume
from tests.helpers import examples
from tests.test_engines_support import assert_complete_and_exact, small_job
from tests.test_interruptible import CtrlCElsewhere


@pytest.fixture()
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt, as in a fresh ``chunkflow run`` (earlier tests in this
    process, e.g. Dask clusters, may have left another SIGINT handler behind)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def slot_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("chunkflow-slot")]


class Concurrency:
    """Counts the calls running at once (and the most there ever were)."""

    def __init__(self) -> None:
        self.lock, self.now, self.most, self.calls = threading.Lock(), 0, 0, []

    def __enter__(self) -> "Concurrency":
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.now -= 1


def test_two_slots_run_two_tasks_at_once():
    """Each task waits at a two-party barrier: it passes only if another task is running at the
    same moment. With one slot the barrier times out and every task fails."""
    for slots, expect_pass in ((2, True), (1, False)):
        rendezvous, seen = threading.Barrier(2, timeout=1 if slots == 1 else 20), Concurrency()

        def task(i: int) -> int:
            with seen:
                rendezvous.wait()
                return i * 10

        results = dict(LocalEngine(slots).map(task, range(6)))
        assert sorted(results) == list(range(6))
        if expect_pass:
            assert results == {i: i * 10 for i in range(6)} and seen.most == 2
        else:
            assert all(isinstance(r, Failed) and r.kind == "BrokenBarrierError" for r in results.values())
            assert seen.most == 1
            rendezvous.reset()
    assert not slot_threads()


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fails=st.lists(st.booleans(), max_size=25), slots=st.integers(1, 4))
def test_map_yields_every_task_once_and_isolates_failures(fails, slots):
    seen = Concurrency()

    def task(i: int) -> int:
        with seen:
            time.sleep(0.001)
            if fails[i]:
                raise ValueError(f"task {i} is bad")
            return -i

    results = list(LocalEngine(slots).map(task, range(len(fails))))
    assert sorted(t for t, _ in results) == list(range(len(fails)))  # each once
    for i, result in results:
        if fails[i]:
            assert isinstance(result, Failed) and result.message == f"task {i} is bad" and not result.refusal
        else:
            assert result == -i
    assert seen.most <= slots
    assert not slot_threads()


@st.composite
def graphs(draw):
    """Firsts 0..n-1 (some failing), seconds each depending on a few firsts (or on none)."""
    n = draw(st.integers(0, 12))
    fails = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    seconds = draw(st.lists(st.lists(st.integers(0, max(n - 1, 0)), max_size=4 if n else 0), max_size=12))
    return n, fails, {f"b{i}": sorted(set(d)) for i, d in enumerate(seconds)}


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=graphs(), slots=st.integers(1, 3))
def test_stream_runs_a_second_task_only_after_its_dependencies(graph, slots):
    n, fails, dependencies = graph
    finished, lock, seen = set(), threading.Lock(), Concurrency()
    early = []

    def first(i: int) -> int:
        with seen:
            time.sleep(0.001)
            if fails[i]:
                raise RuntimeError("no")
            with lock:
                finished.add(i)
            return i

    def second(b: str) -> str:
        with seen:
            with lock:
                early.extend(d for d in dependencies[b] if d not in finished)
            return b

    out = list(LocalEngine(slots).stream(first, second, range(n), dependencies))
    assert not early
    ones = {task: result for stage, task, result in out if stage == 1}
    twos = {task: result for stage, task, result in out if stage == 2}
    assert len(ones) + len(twos) == len(out) and sorted(ones) == list(range(n)) and set(twos) == set(dependencies)
    for b, result in twos.items():
        failed = [d for d in dependencies[b] if fails[d]]
        if failed:
            assert isinstance(result, NotRun) and sorted(result.blocked_by) == failed
        else:
            assert result == b
    assert seen.most <= slots and not slot_threads()


def test_demand_order_completes_the_first_block_early():
    """On a 2x4x4 grid of neighbour-dependent blocks, raster order makes the first block ready
    after 22 stage-one tasks; the demand order after 8."""
    job_grid = [(z, y, x) for z in range(2) for y in range(4) for x in range(4)]

    def near(b):
        return sorted({tuple(min(max(v + d, 0), n - 1) for v, d, n in zip(b, (dz, dy, dx), (2, 4, 4)))
                       for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)})

    dependencies = {b: near(b) for b in job_grid}

    def first_ready(order):
        deps = Dependencies(job_grid, dependencies)
        for i, b in enumerate(order):
            deps.finished(b, False)
            if deps.ready:
                return i + 1

    order = demand_order(job_grid, dependencies)
    assert sorted(order) == sorted(job_grid)
    assert first_ready(job_grid) == 22 and first_ready(order) == 8


def test_slots_must_be_positive():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(EngineError, match="slots"):
            LocalEngine(bad)


class Cancellable:
    """A task that runs until its ``cancel()`` is called (as StageTask stops at its next batch),
    recording when each call ended and whether ``resume()`` came after."""

    def __init__(self, started: threading.Semaphore):
        self.started, self.cancelled, self.ended, self.resumed = started, threading.Event(), {}, False

    def __call__(self, i: int) -> int:
        self.started.release()
        while not self.cancelled.wait(0.005):
            pass
        time.sleep(0.2)  # a task does not stop at once: the engine must wait for it
        self.ended[i] = time.monotonic()
        return i

    def cancel(self) -> None:
        self.cancelled.set()

    def resume(self) -> None:
        self.resumed = len(self.ended) == 2


@pytest.mark.slow  # sends SIGINT to the test process
def test_interrupt_stops_running_tasks_before_it_returns(ctrl_c):
    """A Ctrl-C in the calling thread cancels both running tasks and waits for them: both have
    ended before the interrupt reaches the caller, and resume() comes after."""
    started = threading.Semaphore(0)
    task, main = Cancellable(started), threading.main_thread().ident

    def interrupt() -> None:
        started.acquire()
        started.acquire()
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(LocalEngine(2).map(task, range(5)))
    caught = time.monotonic()
    assert caught - began < 10
    assert sorted(task.ended) == [0, 1] and max(task.ended.values()) <= caught and task.resumed
    assert not slot_threads()


def test_an_interrupt_another_thread_received_stops_the_run(ctrl_c):
    """The SIGINT reaches a thread other than the main one, which waits in ``Slots.next`` and is
    not woken by it (as a signal that reached the main thread just before it blocked there: the
    load-dependent hang of the test above, when the engine waited in one ``get()``): the engine
    still cancels both tasks, waits for them and raises, before the watchdog cancels them."""
    task = Cancellable(threading.Semaphore(0))
    helper = CtrlCElsewhere(Slots.next.__code__, task.cancel)
    try:
        with pytest.raises(KeyboardInterrupt):
            list(LocalEngine(2).map(task, range(5)))
        caught = time.monotonic()
    finally:
        helper.handled()
    assert not helper.released.is_set(), "the engine went on waiting until the watchdog cancelled its tasks"
    assert sorted(task.ended) == [0, 1] and max(task.ended.values()) <= caught and task.resumed
    assert not slot_threads()


@pytest.mark.slow  # waits out a write parked for 2 s
def test_interrupted_stage_one_leaves_no_thread_and_no_running_marker(tmp_path, monkeypatch, ctrl_c):
    """A real stage-one run is interrupted while one task's first write is parked (2 s): the
    runner raises Interrupted once the task in flight have ended (the parked one finishes the
    writes it started, the other stops at its next batch), no running marker is left, nothing
    is written after control returns, and a rerun completes the stage."""
    job = small_job(tmp_path)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    monkeypatch.setenv("CHUNKFLOW_TEST_PAUSE_AT", "stage1:before-write")
    monkeypatch.setenv("CHUNKFLOW_TEST_PAUSE_DIR", str(pauses))
    monkeypatch.setenv("CHUNKFLOW_TEST_PAUSE_SECONDS", "2")
    main = threading.main_thread().ident

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not (pauses / "stage1-before-write.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(Interrupted):
        run_stage(job, 1, LocalEngine(2), progress=False)
    assert time.monotonic() - began < 20 and not slot_threads()
    store = open_store(job.store)
    assert not list(store.list("running/"))
    done = set(store.list("done/stage1/"))
    assert len(done) < job.layout.num_blocks
    objects = sorted(store.list(""))
    output = open_volume(job.output).read(job.layout.bbox)
    time.sleep(2.5)  # longer than the pause: a task left running would write now
    assert sorted(store.list("")) == objects
    np.testing.assert_array_equal(open_volume(job.output).read(job.layout.bbox), output)
    run_stage(job, 1, LocalEngine(2), progress=False)  # and the run resumes
    assert len(list(store.list("done/stage1/"))) == job.layout.num_blocks


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("mode", ["barrier", "streaming"])
def test_local_slots_equal_the_reference(tmp_path, slots, mode):
    job = small_job(tmp_path, "conv3" if mode == "streaming" else "identity")
    summary = run_job(job, LocalEngine(slots), progress=False, mode=mode)
    assert summary.stage1.tasks == summary.stage2.tasks == job.layout.num_blocks
    assert summary.stage1.stats.patches == job.layout.num_patches
    assert_complete_and_exact(job)
    assert not slot_threads()


@pytest.fixture(scope="module")
def dask_engine():
    engine = make_engine("dask", workers=2)
    yield engine
    engine.close()


def tasks_in_scheduler(dask_scheduler, marker: str) -> int:
    """Tasks of ours the scheduler has not finished: waiting, queued or running on a worker."""
    return sum(1 for key, ts in dask_scheduler.tasks.items()
               if marker in str(key) and ts.state in ("waiting", "queued", "processing", "no-worker"))


class Slow:
    """A picklable task that takes a moment (its label names its Dask keys, so they can be counted)."""

    label = "slowtask"

    def __init__(self, seconds: float = 0.05, fail: frozenset = frozenset()):
        self.seconds, self.fail = seconds, fail

    def __call__(self, task):
        time.sleep(self.seconds)
        if task in self.fail:
            raise RuntimeError(f"{task} is bad")
        return task


def test_dask_workers_have_two_threads_and_a_window(dask_engine):
    client = dask_engine.client
    assert sorted(client.nthreads().values()) == [2, 2]
    assert dask_engine.window() == 8  # 2 x 4 worker threads


@pytest.mark.parametrize("window", [3, None])
def test_dask_map_never_has_more_than_the_window_in_flight(dask_engine, window):
    engine = dask_engine
    engine._fixed_window = window
    try:
        limit, counts, results = engine.window(), [], []
        for task, result in engine.map(Slow(0.05, frozenset({7})), range(40)):
            counts.append(engine.client.run_on_scheduler(tasks_in_scheduler, marker="slowtask"))
            results.append((task, result))
    finally:
        engine._fixed_window = None
    assert sorted(t for t, _ in results) == list(range(40))
    assert all(r == t for t, r in results if t != 7) and isinstance(dict(results)[7], Failed)
    assert 2 <= max(counts) <= limit


@pytest.mark.parametrize("window", [4, None])
def test_dask_stream_keeps_the_window_and_the_dependencies(dask_engine, window):
    dask_engine._fixed_window = window
    firsts = list(range(30))
    dependencies = {f"b{i}": [i, (i + 1) % 30, (i + 7) % 30] for i in range(30)}
    try:
        limit, counts, out = dask_engine.window(), [], []
        for item in dask_engine.stream(Slow(0.03, frozenset({5})), Slow(0.01), firsts, dependencies):
            counts.append(dask_engine.client.run_on_scheduler(tasks_in_scheduler, marker="slowtask"))
            out.append(item)
    finally:
        dask_engine._fixed_window = None
    assert max(counts) <= limit
    ones = {t: r for s, t, r in out if s == 1}
    twos = {t: r for s, t, r in out if s == 2}
    assert len(out) == 60 and sorted(ones) == firsts and set(twos) == set(dependencies)
    assert isinstance(ones[5], Failed)
    for b, result in twos.items():
        assert isinstance(result, NotRun) == (5 in dependencies[b])
    positions = {(s, t): i for i, (s, t, _) in enumerate(out)}
    for b, deps in dependencies.items():
        assert all(positions[(1, d)] < positions[(2, b)] for d in deps)


@pytest.mark.parametrize("mode", ["barrier", "streaming"])
def test_dask_two_stage_equals_the_reference(tmp_path, dask_engine, mode):
    job = small_job(tmp_path, "conv3")
    summary = run_job(job, dask_engine, progress=False, mode=mode)
    assert summary.stage1.tasks == summary.stage2.tasks == job.layout.num_blocks
    assert_complete_and_exact(job)

