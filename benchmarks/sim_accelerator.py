"""A simulated accelerator: a stand-in for a fast GPU, to measure how busy chunkflow keeps one.

:class:`SimulatedAccelerator` is a :class:`~chunkflow.backends.base.Backend` whose "device" is one
thread that runs submitted batches strictly in submission (FIFO) order. For each batch it holds the
device for ``rate_ns`` nanoseconds per patch voxel computed (``N x z x y x x`` of the input batch),
sleeping with the GIL released, and returns the identity (a copy of the batch), so a run with it
must reproduce the ``identity`` model's whole-volume reference exactly.

Why: on a CPU-only machine the real model is the slowest thing by far, so nothing shows whether
reading, blending, writing and donating would keep a GPU fed. With this backend the model costs a
chosen, known number of seconds of "device" time, the host is free while it runs (as with a CUDA
launch), and ``busy_seconds / wall`` is the fraction of the time a real accelerator of that speed
would have been working. The rate is a parameter, not a measurement of any GPU: the benchmark's
default (30 ns per voxel) is the figure issue 11 uses for "a fast GPU".

:meth:`submit` behaves like a CUDA launch: it copies the batch (the caller may overwrite its
buffer as soon as it returns), queues it and returns at once; the returned callable waits for that
batch's output. Any number of threads may submit at once. Outputs are fresh arrays, so they stay
valid forever (the contract only asks until the second-next submit).
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np

# a backend of our own, injected through Resources (bench_accelerator.py): it implements the backend
# contract of chunkflow.backends.base, which the API does not expose
from chunkflow.backends.base import Backend, ModelError, check_batch, check_device, check_precision

__all__ = ["Launch", "SimulatedAccelerator", "make_simulated_backend"]

log = logging.getLogger(__name__)


class Launch:
    """One submitted batch: call it to wait for the output.

    Attributes: ``seq`` (submission number, from 0), ``started`` and ``finished`` (``perf_counter``
    times at which the device took and released it; None until then).
    """

    def __init__(self, seq: int, batch: np.ndarray) -> None:
        self.seq = seq
        self.batch = batch
        self.started: float | None = None
        self.finished: float | None = None
        self._done = threading.Event()
        self._output: np.ndarray | None = None
        self._error: BaseException | None = None

    def __call__(self) -> np.ndarray:
        """Wait for the device to finish this batch; return its output (or raise its error)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._output is not None
        return self._output

    def done(self) -> bool:
        """Whether the device has finished this batch."""
        return self._done.is_set()

    def _finish(self, output: np.ndarray | None, error: BaseException | None = None) -> None:
        self._output, self._error, self.batch = output, error, None
        self.finished = time.perf_counter()
        self._done.set()


class SimulatedAccelerator(Backend):
    """A device thread that holds itself ``rate_ns`` per patch voxel per batch; output = input.

    Args:
        rate_ns: device nanoseconds per input-patch voxel (per batch: ``rate_ns x N x z x y x x``;
            channels are not counted). 0 makes the device instantaneous (it still queues).
        channels: None returns the batch unchanged; ``C`` returns ``C`` copies of channel 0
            (as the ``identity:C`` model does).
        device: the device name it reports (``cpu``, ``cuda``, ``cuda:N``); nothing is demanded of it.
        precision: the precision it reports (it always computes in float32).

    Counters (since construction or :meth:`reset`): ``busy_seconds`` (seconds the device was held,
    measured), ``nominal_seconds`` (``rate_ns x voxels``, what it was asked to hold), ``batches``,
    ``voxels``.
    """

    name = "simulated"

    def __init__(self, rate_ns: float = 30.0, channels: int | None = None, device: str = "cpu",
                 precision: str = "float32") -> None:
        if not rate_ns >= 0:
            raise ModelError(f"rate_ns must be >= 0 nanoseconds per voxel, got {rate_ns!r}")
        if channels is not None and int(channels) < 1:
            raise ModelError(f"channels must be >= 1, got {channels!r}")
        self.rate_ns = float(rate_ns)
        self.channels = None if channels is None else int(channels)
        self.device = check_device(device)
        self.precision = check_precision(precision)
        self._lock = threading.Lock()  # submission order (seq, queue) and the counters
        self._queue: queue.SimpleQueue[Launch | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters (``busy_seconds``, ``nominal_seconds``, ``batches``, ``voxels``)."""
        with self._lock:
            self.busy_seconds = 0.0
            self.nominal_seconds = 0.0
            self.batches = 0
            self.voxels = 0

    def submit(self, batch: np.ndarray) -> Launch:
        """Copy ``batch`` (float32 ``[N, C, z, y, x]``), queue it and return at once; calling the
        returned :class:`Launch` waits for and returns its output."""
        copy = np.array(check_batch(batch), dtype=np.float32, copy=True)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sim-accelerator", daemon=True)
                self._thread.start()
            launch = Launch(self._seq, copy)
            self._seq += 1
            self._queue.put(launch)
        return launch

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Submit ``batch`` and wait for its output."""
        return self.submit(batch)()

    def close(self) -> None:
        """Stop the device thread after the batches already queued (a later submit starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            launch = self._queue.get()
            if launch is None:
                return
            self._execute(launch)

    def _execute(self, launch: Launch) -> None:
        start = launch.started = time.perf_counter()
        batch = launch.batch
        voxels = int(batch.shape[0]) * int(np.prod(batch.shape[2:]))
        hold = self.rate_ns * voxels * 1e-9
        try:
            output = batch if self.channels is None else np.repeat(batch[:, :1], self.channels, axis=1)
        except BaseException as err:  # noqa: BLE001 - handed to the waiter, the device carries on
            launch._finish(None, err)
            return
        remaining = start + hold - time.perf_counter()
        while remaining > 0:
            time.sleep(remaining)
            remaining = start + hold - time.perf_counter()
        busy = time.perf_counter() - start
        with self._lock:
            self.busy_seconds += busy
            self.nominal_seconds += hold
            self.batches += 1
            self.voxels += voxels
        launch._finish(output)

    def __repr__(self) -> str:
        return f"<SimulatedAccelerator {self.rate_ns:g} ns/voxel on {self.device} ({self.precision})>"


def make_simulated_backend(model: str, weights: str | None = None, device: str = "cpu",
                           precision: str = "float32") -> SimulatedAccelerator:
    """Backend factory for the model strings ``sim``, ``sim:RATE`` and ``sim:RATE:C`` (RATE in ns per
    voxel, default 30; C output channels), usable as a ``chunkflow.backends`` entry point."""
    if weights:
        raise ModelError(f"the simulated accelerator takes no weights, got {weights!r}")
    parts = model.split(":")
    if parts[0] != "sim" or len(parts) > 3:
        raise ModelError(f"bad simulated accelerator model {model!r}; valid: 'sim', 'sim:RATE' or 'sim:RATE:C'")
    try:
        rate = float(parts[1]) if len(parts) > 1 and parts[1] else 30.0
        channels = int(parts[2]) if len(parts) > 2 else None
    except ValueError:
        raise ModelError(f"bad simulated accelerator model {model!r}; RATE is a number, C an integer") from None
    return SimulatedAccelerator(rate, channels, device, precision)
