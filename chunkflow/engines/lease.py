"""Keeping a leased queue task invisible while it runs (see :mod:`chunkflow.engines.queue`)."""
from __future__ import annotations

import logging
import threading

from chunkflow.engines.failures import one_line

log = logging.getLogger(__name__)

LEASE_STOP_TIMEOUT = 5.0  # seconds a finished task waits for a lease renewal still in progress


class LeaseKeeper(threading.Thread):
    """Renews a task's lease every ``lease / 3`` seconds until stopped.

    A renewal that fails is retried by python-task-queue with backoff (up to a minute or so);
    :meth:`stop` does not wait for that longer than ``LEASE_STOP_TIMEOUT``: the worker goes on
    (deletes or hands back the task) and the daemon thread finishes on its own. A late renewal
    of a deleted task fails; one of a handed-back task at worst hides it for one more lease.
    """

    def __init__(self, queue, task, lease: float):
        super().__init__(daemon=True, name="cf-lease")
        self.queue, self.task, self.lease = queue, task, lease
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.lease / 3):
            try:
                self.queue.renew(self.task, int(self.lease))
            except Exception as err:  # noqa: BLE001 (a missed renewal only risks a harmless duplicate)
                log.warning("could not renew the lease of task %s: %s", self.task.id, one_line(err))

    def stop(self, timeout: float | None = None) -> None:
        self._stop_event.set()
        self.join(LEASE_STOP_TIMEOUT if timeout is None else timeout)
        if self.is_alive():
            log.warning("a renewal of the lease of task %s is still retrying; going on without waiting for it",
                        getattr(self.task, "id", "?"))

