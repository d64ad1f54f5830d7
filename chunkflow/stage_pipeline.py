"""Stage one as a three-stage pipeline in one worker: read ahead | device | write-behind.

A stage-one block goes through three steps: its input is read, its patches go through the model
(the *device* step, one block at a time), and its output is normalised, written, donated and
marked done (*write-behind*). :class:`StageGates` bounds how many blocks of one worker are in the
first two steps together and how many are in the third, so that a task slot can take its next
block as soon as its block has left the device while that block's writes go on:

- ``compute``: at most ``slots`` blocks between the start of their read and the moment they have a
  write-behind place (each holds its input chunk until its device step ends, and its float32
  output chunk from the start of its device step; one block is on the device at a time);
- ``write_behind``: at most ``slots`` blocks between the end of their device step and their done
  marker (each holds its float32 output chunk and, on the shared write pool, at most
  ``block_writes.IO_THREADS`` slabs or pieces being written).

So a worker holds at most ``slots`` input chunks and ``2 x slots`` float32 output chunks (plus one
batch in and out on the device, ``N`` slabs and the write pool's slabs): with the default two
slots, two blocks' compute buffers and two blocks' outputs being written.

A block leaving the device takes its write-behind place *before* it gives up its compute place,
so it is always counted in one of the two, and it waits (holding its output, off the device) while
``slots`` blocks are still being written. Every step of a block still runs in the thread of its
own task, so its failure is its task's failure and its done marker is written after its last write
has returned (docs/design.md §11); engines only need to run up to ``2 x slots`` stage-one tasks at
once (:func:`stage_one_threads`) for the gates, not the engine, to be the bound.

:class:`DeviceTurns` hands the device from one block to the next without leaving it idle: a block
takes the device (``Resources.device_lock``) just before its first batch is submitted, having
already gathered it, and hands it over right after its last batch is submitted, so the next block's
first batch queues behind it while it accumulates its last output. Since a backend's output stays
valid only until the second-next ``submit`` (:meth:`chunkflow.backends.Backend.submit`), the next
block's second submit waits until the previous block has consumed its last output. A backend whose
submit finishes its batch and returns a new array (``Backend.independent_batches``: the identity)
has no output to protect: its blocks take the device batch by batch, so one gathers and accumulates
on one core while the other's batch runs.

:class:`InputPrefetcher` reads one block's input ahead in the background (one task slot, where no
second slot reads while the first computes).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from chunkflow.bbox import Bbox
from chunkflow.errors import Interrupted

log = logging.getLogger(__name__)

__all__ = ["DeviceTurns", "InputPrefetcher", "Place", "StageGates", "Turn", "stage_one_threads"]

#: seconds between two looks at the cancel flag while waiting for a place
POLL = 0.05


def stage_one_threads(slots: int) -> int:
    """Stage-one tasks an engine with ``slots`` task slots runs at once: two per slot (one reading
    or on the device, one writing behind) from two slots on; one slot runs one block at a time."""
    return 2 * slots if slots >= 2 else max(1, slots)


class StageGates:
    """The bounded compute and write-behind steps of one worker's stage one (see the module doc).

    Counters for tests and reports: ``computing``/``writing`` (blocks in each step now) and
    ``most_computing``/``most_writing`` (the most there ever were)."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots!r}")
        self.slots = slots
        self._cond = threading.Condition()
        self.computing = self.writing = 0
        self.most_computing = self.most_writing = 0

    def enter(self, cancelled: threading.Event, name: str) -> "Place":
        """Wait for a compute place for block ``name``; :class:`Interrupted` if the run is cancelled first."""
        with self._cond:
            self._wait(lambda: self.computing < self.slots, cancelled, name, "a place to compute")
            self.computing += 1
            self.most_computing = max(self.most_computing, self.computing)
        return Place(self, name)

    def _wait(self, ready, cancelled: threading.Event, name: str, what: str) -> None:
        while not ready():
            if cancelled.is_set():
                raise Interrupted(f"stage one of {name} stopped while waiting for {what} (the run was interrupted)")
            self._cond.wait(POLL)
        if cancelled.is_set():
            raise Interrupted(f"stage one of {name} stopped while waiting for {what} (the run was interrupted)")

    def _to_write_behind(self, cancelled: threading.Event, name: str) -> None:
        with self._cond:
            self._wait(lambda: self.writing < self.slots, cancelled, name, "a place to write")
            self.writing += 1
            self.most_writing = max(self.most_writing, self.writing)
            self.computing -= 1
            self._cond.notify_all()

    def _leave(self, step: str) -> None:
        with self._cond:
            if step == "compute":
                self.computing -= 1
            else:
                self.writing -= 1
            self._cond.notify_all()


class Place:
    """One block's place in the pipeline: compute first, then write-behind; :meth:`close` frees it."""

    def __init__(self, gates: StageGates, name: str):
        self.gates, self.name, self.step = gates, name, "compute"

    def leave_device(self, cancelled: threading.Event) -> float:
        """Trade the compute place for a write-behind place (waiting for one); returns the seconds waited."""
        t = time.perf_counter()
        self.gates._to_write_behind(cancelled, self.name)
        self.step = "write-behind"
        return time.perf_counter() - t

    def close(self) -> None:
        if self.step:
            self.gates._leave(self.step)
            self.step = ""

    def __enter__(self) -> "Place":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceTurns:
    """Blocks taking turns on one device, handing it over at their last submit (see the module doc).

    All turns of one DeviceTurns must be of one kind (block by block, or per batch): a per-batch
    turn does not wait for the last output of a block-by-block one. They are: the kind comes from
    the one backend of the worker's :class:`~chunkflow.resources.Resources`."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock
        self._guard = threading.Lock()
        self._last_done: threading.Event | None = None  # set once the last block to hand over has its outputs

    def turn(self, per_batch: bool = False) -> "Turn":
        """A turn for one block (nothing is taken until its first :meth:`Turn.before_submit`); with
        ``per_batch`` (a backend with ``independent_batches``), the device is taken for each submit
        only (:meth:`Turn.after_submit` gives it back)."""
        return Turn(self, per_batch)

    def _take(self) -> threading.Event | None:
        self.lock.acquire()
        with self._guard:
            previous, self._last_done = self._last_done, None
        return previous

    def _hand_over(self, done: threading.Event) -> None:
        with self._guard:
            self._last_done = done
        self.lock.release()


class Turn:
    """One block's use of the device: :meth:`before_submit` before every submit, :meth:`after_submit`
    after it, :meth:`hand_over` after the last one, :meth:`close` once its outputs have all been
    consumed (or it failed).

    Block by block (the default), the device is held from the first submit to the last. With
    ``per_batch`` it is held around each submit only: for a backend whose submit finishes its batch
    and returns a new array (``Backend.independent_batches``), so there is no output to protect and
    nothing running on the device between two submits; blocks then interleave their batches, one
    call at a time, and each still accumulates its own outputs in its own order.

    ``waited``: seconds spent waiting for the device (the lock, and the previous block's last output)."""

    def __init__(self, turns: DeviceTurns, per_batch: bool = False):
        self.turns = turns
        self.per_batch = per_batch
        self.waited = 0.0
        self.submits = 0
        self.holding = False
        self.done = threading.Event()
        self._previous: threading.Event | None = None

    def before_submit(self) -> None:
        if self.per_batch:
            if self.holding:
                raise RuntimeError("bug: a per-batch turn was taken twice without after_submit()")
            t = time.perf_counter()
            self.turns.lock.acquire()
            self.holding = True
            self.waited += time.perf_counter() - t
            self.submits += 1
            return
        if self.submits == 0:
            t = time.perf_counter()
            self._previous = self.turns._take()
            self.holding = True
            self.waited += time.perf_counter() - t
        elif self.submits == 1 and self._previous is not None:
            t = time.perf_counter()
            self._previous.wait()  # its last output stays valid until our second submit
            self.waited += time.perf_counter() - t
        self.submits += 1

    def after_submit(self) -> None:
        """A batch is submitted: per batch, the device is free again (block by block, nothing)."""
        if self.per_batch and self.holding:
            self.holding = False
            self.turns.lock.release()

    def hand_over(self) -> None:
        """The last batch is submitted: the next block may start submitting (per batch, it already
        could: only a device still held, as by :meth:`hold`, is given back)."""
        if self.per_batch:
            self.after_submit()
            return
        if self.holding:
            self.holding = False
            if self._previous is not None and self.submits < 2:
                self._previous.wait()  # we never waited for it: the next block must not overtake it
            self.turns._hand_over(self.done)

    def hold(self) -> "Turn":
        """Take the device for the whole of a ``with`` block (the on-device path keeps its tensors there)."""
        self.before_submit()
        return self

    def __enter__(self) -> "Turn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.done.set()
        self.hand_over()


class InputPrefetcher:
    """Reads one chunk's input in a background thread, so the next chunk's read and decode overlap
    the model's work on this one. At most one read is pending, which bounds the extra memory to
    one input chunk (in its stored dtype)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Bbox, Future] | None = None

    def submit(self, box: Bbox, read: Callable[[Bbox], np.ndarray]) -> None:
        with self._lock:
            if self._pending is not None and self._pending[0] == box:
                return
            self._drop_pending()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunkflow-prefetch")
            self._pending = (box, self._pool.submit(read, box))

    def take(self, box: Bbox, read: Callable[[Bbox], np.ndarray]) -> np.ndarray:
        """The input over ``box``: the prefetched array if one was started for it, else read now."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending[0] == box:
            return pending[1].result()  # a failed prefetch raises here, as the read itself would
        if pending is not None:
            self._wait_quietly(pending[1])
        return read(box)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._wait_quietly(self._pending[1])
            self._pending = None

    @staticmethod
    def _wait_quietly(future: Future) -> None:
        """Let a prefetch nobody wants finish (no two reads at once); its error is not ours."""
        if not future.cancel():
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - a read of a block we are not running
                log.debug("unused prefetch failed: %s", err)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]
