"""The simulated accelerator of benchmarks/sim_accelerator.py: deterministic identity output, real
device time held (rate x voxels, counted), launches that return at once, FIFO order under
concurrent submitters, and both stages with it reproducing the identity reference (Invariant 1)."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from chunkflow.backends import ModelError, load_backend
from chunkflow.planning import plan
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import Resources, inference_and_donate_many, reference
from chunkflow.storage import open_volume
from tests.helpers import make_input

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from sim_accelerator import SimulatedAccelerator, make_simulated_backend  # noqa: E402


def batch_of(n: int, seed: int, shape=(8, 32, 32), channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, *shape), dtype=np.float32)


def test_output_is_the_identity_bit_for_bit_and_deterministic():
    sim = SimulatedAccelerator(rate_ns=1)
    batch = batch_of(3, seed=4, channels=2)
    first, second = sim.predict(batch), sim.predict(batch)
    assert first.dtype == np.float32 and first.shape == batch.shape
    assert np.array_equal(first, batch) and np.array_equal(second, batch)
    assert first is not second and not np.shares_memory(first, batch)
    three = SimulatedAccelerator(rate_ns=0, channels=3).predict(batch)
    assert three.shape == (3, 3, 8, 32, 32) and all(np.array_equal(three[:, c], batch[:, 0]) for c in range(3))
    assert SimulatedAccelerator(0).output_shape((8, 32, 32)) == (1, (8, 32, 32))


def test_the_device_is_held_rate_times_voxels_and_counted():
    rate, batches = 400.0, 8
    sim = SimulatedAccelerator(rate_ns=rate)
    sim.predict(batch_of(1, 0))
    sim.reset()
    assert (sim.busy_seconds, sim.nominal_seconds, sim.batches, sim.voxels) == (0.0, 0.0, 0, 0)
    waits = [sim.submit(batch_of(n, n)) for n in range(1, batches + 1)]  # 1..8 patches of 8x32x32
    for wait in waits:
        wait()
    voxels = sum(range(1, batches + 1)) * 8 * 32 * 32
    expected = rate * voxels * 1e-9  # 0.118 s
    assert sim.batches == batches and sim.voxels == voxels
    assert sim.nominal_seconds == pytest.approx(expected, rel=1e-9)
    assert sim.busy_seconds >= expected  # never less than asked: it sleeps to a deadline
    assert sim.busy_seconds <= expected + batches * 0.05  # and only sleep's overshoot more
    for wait in waits:
        assert wait.finished - wait.started >= rate * wait().shape[0] * 8 * 32 * 32 * 1e-9


def test_submit_returns_before_the_device_finishes_and_keeps_its_own_copy():
    sim = SimulatedAccelerator(rate_ns=20_000)  # 2 patches of 8x32x32: 0.33 s of device time
    batch = batch_of(2, seed=1)
    original = batch.copy()
    t = time.perf_counter()
    wait = sim.submit(batch)
    returned = time.perf_counter() - t
    batch[...] = -1.0  # the caller reuses its buffer at once, as blended_inference does
    assert not wait.done()
    assert returned < 0.2
    output = wait()
    assert wait.done() and wait.finished - wait.started >= 0.32
    assert np.array_equal(output, original)
    assert np.array_equal(wait(), original)  # waiting again returns the same output


def test_fifo_order_holds_with_concurrent_submitters():
    sim = SimulatedAccelerator(rate_ns=50)  # ~0.4 ms per patch
    launches: dict[int, list] = {t: [] for t in range(4)}
    start = threading.Barrier(4)

    def submitter(tid: int) -> None:
        start.wait()
        for i in range(12):
            batch = np.full((1 + i % 3, 1, 8, 32, 32), tid * 100 + i, dtype=np.float32)
            launches[tid].append((tid * 100 + i, batch.shape, sim.submit(batch)))

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    every = [launch for per in launches.values() for _, _, launch in per]
    for per in launches.values():
        for value, shape, launch in per:
            out = launch()
            assert out.shape == shape and np.all(out == value)  # each submitter gets its own batch back
        seqs = [launch.seq for _, _, launch in per]
        assert seqs == sorted(seqs)  # one thread's batches run in the order it submitted them
    by_seq = sorted(every, key=lambda launch: launch.seq)
    assert [launch.seq for launch in by_seq] == list(range(48))
    for before, after in zip(by_seq, by_seq[1:]):  # one device, strictly in submission order
        assert before.finished <= after.started
    assert sim.batches == 48 and sim.voxels == sum(launch().shape[0] for launch in every) * 8 * 32 * 32


def test_factory_and_refusals():
    assert make_simulated_backend("sim").rate_ns == 30.0
    sim = make_simulated_backend("sim:5:3", device="cuda:1")
    assert (sim.rate_ns, sim.channels, sim.device) == (5.0, 3, "cuda:1")
    for bad in ("sim:x", "sim:1:2:3", "simulated"):
        with pytest.raises(ModelError):
            make_simulated_backend(bad)
    with pytest.raises(ModelError):
        SimulatedAccelerator(rate_ns=-1)
    with pytest.raises(ModelError):
        SimulatedAccelerator(rate_ns=1).predict(np.zeros((8, 32, 32), dtype=np.float32))


def two_stage(tmp_path: Path, url: str, name: str, backend) -> tuple[object, np.ndarray]:
    job = plan(url, f"file://{tmp_path / name}", f"file://{tmp_path / (name + '.store')}", "identity",
               "8,32,32", overlap="2,8,8", block="12,40,40", batch_size=3)
    res = Resources(job, backend)
    blocks = list(job.layout.block_indices())
    for _ in inference_and_donate_many(job, iter(blocks), res):
        pass
    for block in blocks:
        receive_and_blend(job, block, res)
    return job, open_volume(job.output).read(job.layout.bbox)


def test_both_stages_with_the_simulator_reproduce_the_identity_reference(tmp_path):
    url, _ = make_input(tmp_path / "in", (20, 72, 80), dtype="uint8", seed=3)
    sim = SimulatedAccelerator(rate_ns=2)
    job, output = two_stage(tmp_path, url, "sim", sim)
    _, plain = two_stage(tmp_path, url, "plain", load_backend("identity"))
    assert np.array_equal(output, plain)  # the same numbers summed in the same order as the identity model
    expected = reference(job, Resources(job))
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)
    for block in job.layout.block_indices():  # the cores are bit-identical to the reference
        core = job.layout.core_box(block)
        if not core.is_empty():
            sl = (slice(None),) + core.slices(job.layout.bbox)
            assert np.array_equal(output[sl], expected[sl])
    assert sim.voxels >= job.layout.num_patches * 8 * 32 * 32  # every grid patch went through the device
    assert sim.busy_seconds >= sim.voxels * 2e-9


@pytest.mark.slow  # ~3 s: two full measurements and the reference
def test_the_benchmark_measurement_checks_itself(tmp_path):
    from bench_accelerator import Measurement, verdict

    url, _ = make_input(tmp_path / "in", (16, 64, 64), dtype="uint8", seed=5)
    m = Measurement(url, str(tmp_path / "m"), "8,32,32", "2,8,8", "8,32,32", 2, rate=5.0)
    first, second = m.once(check=True), m.once()
    assert first["core_max_difference"] == 0.0 and first["max_difference"] <= 1e-5
    assert "BROKEN" not in verdict(first)
    for run in (first, second):
        assert 0.0 < run["busy_fraction"] <= 1.0
        assert run["busy_seconds"] >= run["nominal_seconds"] > 0
        assert run["device_voxels"] == run["patches"] * 8 * 32 * 32
    assert second["stage2_voxels"] == first["stage2_voxels"] > 0
    broken = {**first, "core_max_difference": 1e-7}
    assert "BROKEN" in verdict(broken)
