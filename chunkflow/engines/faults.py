"""Test-only fault injection: park a worker at a named point so a test can SIGKILL it exactly there.

Never set these variables in production; unset, the hook costs one environment lookup per task.

``CHUNKFLOW_TEST_PAUSE_AT``
    comma-separated points, e.g. ``stage1:during-write,stage2:after-write``. Points per stage:

    - ``before-write``: the task computed its result and is about to make its first write;
    - ``during-write``: its first write (stage one: the first slab of the core; stage two: the first band slab) is
      done, the others (donations, other slabs) are not;
    - ``after-write``: every write is done, the done marker is not;
    - ``after-done``: the done marker is written, the engine has not been told (queue task not
      deleted, Dask result not returned).
``CHUNKFLOW_TEST_PAUSE_DIR``
    a directory. The first process to reach a listed point creates ``DIR/stage1-during-write.pid``
    (``O_EXCL``, so exactly one process per point), writes its pid into it and sleeps
    ``CHUNKFLOW_TEST_PAUSE_SECONDS`` (default 600) waiting to be killed; later arrivals pass.
"""
from __future__ import annotations

import copy
import logging
import os
import time

from chunkflow.store_layout import DONE

log = logging.getLogger(__name__)

POINTS = ("before-write", "during-write", "after-write", "after-done")


def pause_points() -> set[str]:
    raw = os.environ.get("CHUNKFLOW_TEST_PAUSE_AT", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def pause(point: str) -> None:
    """Park this process at ``point`` if it is armed and no other process took it first."""
    if point not in pause_points():
        return
    directory = os.environ.get("CHUNKFLOW_TEST_PAUSE_DIR", ".")
    path = os.path.join(directory, point.replace(":", "-") + ".pid")
    try:
        fd = os.open(path + ".tmp" + str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        os.link(path + ".tmp" + str(os.getpid()), path)  # atomic: the pid is complete when the name appears
    except FileExistsError:
        return
    finally:
        os.unlink(path + ".tmp" + str(os.getpid()))
    log.warning("test fault hook: pid %d paused at %s", os.getpid(), point)
    time.sleep(float(os.environ.get("CHUNKFLOW_TEST_PAUSE_SECONDS", "600")))


class _Watched:
    """A volume or store whose writes pass through the pause points of one task."""

    def __init__(self, target, watch: "_Watch"):
        self._target, self._watch = target, watch

    def __getattr__(self, name):
        return getattr(self._target, name)

    def write(self, *args, **kwargs):
        return self._watch.data_write(lambda: self._target.write(*args, **kwargs))

    def put(self, name: str, *args, **kwargs):
        if not name.startswith(DONE + "/"):
            return self._watch.data_write(lambda: self._target.put(name, *args, **kwargs))
        pause(f"stage{self._watch.stage}:after-write")
        result = self._target.put(name, *args, **kwargs)
        pause(f"stage{self._watch.stage}:after-done")
        return result


class _Watch:
    def __init__(self, stage: int):
        self.stage, self.writes = stage, 0

    def data_write(self, write):
        if self.writes == 0:
            pause(f"stage{self.stage}:before-write")
        result = write()
        self.writes += 1
        if self.writes == 1:
            pause(f"stage{self.stage}:during-write")
        return result


def watched(resources, stage: int):
    """``resources`` itself when no pause point is armed, else a copy whose writes are watched."""
    if not pause_points():
        return resources
    if stage == 1:  # load these on the shared object, not on the per-task copy
        resources.backend, resources.input
    resources.durable  # one flush shared by the worker's tasks, as without the watch
    watch = _Watch(stage)
    view = copy.copy(resources)
    view.__dict__["output"] = _Watched(resources.output, watch)
    view.__dict__["store"] = _Watched(resources.store, watch)
    return view
