"""Keeping a leased queue task invisible while it runs (see :mod:`chunkflow.engines.queue`)."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from taskqueue import QueueEmptyError

from chunkflow.engines.failures import one_line

log = logging.getLogger(__name__)

LEASE_STOP_TIMEOUT = 5.0  # seconds a finished task waits for a lease renewal still in progress


class LeaseKeeper(threading.Thread):
    """Renews a task's lease (and those of the tasks in ``also``: a task leased ahead, see
    :mod:`chunkflow.engines.queue`) every ``lease / 3`` seconds until stopped.

    A renewal that fails is retried by python-task-queue with backoff (up to a minute or so);
    :meth:`stop` does not wait for that longer than ``LEASE_STOP_TIMEOUT``: the worker goes on
    (deletes or hands back the task) and the daemon thread finishes on its own. A late renewal
    of a deleted task fails; one of a handed-back task at worst hides it for one more lease.

    ``on_renew`` is called after every round of renewals (the running marker's heartbeat, see
    :class:`chunkflow.engines.attempts.Heartbeat`); an error there is logged, never raised.
    """

    def __init__(self, queue, task, lease: float, also=(), on_renew: Callable[[], None] | None = None):
        super().__init__(daemon=True, name="cf-lease")
        self.queue, self.task, self.lease = queue, task, lease
        self.tasks = [task, *also]
        self.on_renew = on_renew
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.lease / 3):
            for task in self.tasks:
                try:
                    self.queue.renew(task, int(self.lease))
                except Exception as err:  # noqa: BLE001 (a missed renewal only risks a harmless duplicate)
                    log.warning("could not renew the lease of task %s: %s", getattr(task, "id", "?"), one_line(err))
            if self.on_renew is not None and not self._stop_event.is_set():
                try:
                    self.on_renew()
                except Exception as err:  # noqa: BLE001 (a missed heartbeat only makes `status` suspicious)
                    log.warning("could not refresh the running marker's heartbeat: %s", one_line(err))

    def stop(self, timeout: float | None = None) -> None:
        self._stop_event.set()
        self.join(LEASE_STOP_TIMEOUT if timeout is None else timeout)
        if self.is_alive():
            log.warning("a renewal of the lease of task %s is still retrying; going on without waiting for it",
                        getattr(self.task, "id", "?"))


def lease_ahead(queue, lease: float, accept):
    """Lease one more task (no waiting) while the current one is about to run, so stage one can
    read its input in the background: ``(task, accept(task))``, the second None where ``accept``
    refuses or fails (the worker takes the task up after the current one, as if it had leased it
    then); ``(None, None)`` where nothing could be leased. The caller keeps the task's lease
    renewed (``LeaseKeeper(..., also=...)``) and hands it back if it stops before running it."""
    try:
        task = queue.lease(seconds=int(lease), num_tasks=1, wait_sec=0)
    except QueueEmptyError:
        return None, None
    except Exception as err:  # noqa: BLE001 (a half-written task file, a queue hiccup: no lookahead)
        log.warning("could not lease the next task (%s); going on without", one_line(err))
        return None, None
    try:
        return task, accept(task)
    except Exception as err:  # noqa: BLE001 (a task the worker loop refuses, after the current one)
        log.debug("task leased ahead not prefetched: %s", one_line(err))
        return task, None
