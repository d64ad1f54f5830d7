"""Tasks that did not finish: what an engine hands back for them, and how a run reports them.

One task's exception never ends the others. An engine yields, in place of a task's result:

- :class:`Failed` for a task that raised (after the engine's own retries, if any): the
  exception's type and message on one line, and whether it is a *refusal* (a user or data
  problem: a :class:`chunkflow.errors.Refusal`, e.g. missing or corrupt donations) or unexpected;
- :class:`NotRun` (streaming order) for a stage-two task that was not started because stage
  one of a block it depends on failed.

The runner turns them into :class:`TaskFailure` records: one line each, and an exit status
(2 when every failure is a refusal, 1 when any is unexpected). ``CHUNKFLOW_DEBUG`` set: engines
re-raise the first exception instead, with its traceback.
"""
from __future__ import annotations

import os
import pickle
import traceback
from dataclasses import dataclass, field

from chunkflow.errors import is_refusal, one_line

STAGE_NAMES = {1: "inference-and-donate", 2: "receive-and-blend"}


def debugging() -> bool:
    """``CHUNKFLOW_DEBUG`` is set: let a task's exception end the run with its traceback."""
    return bool(os.environ.get("CHUNKFLOW_DEBUG"))


@dataclass
class Failed:
    """A task that raised. ``error`` is the exception itself where it is at hand (it travels
    between processes only if it survives pickling)."""

    kind: str
    message: str
    refusal: bool
    detail: str = ""
    error: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, err: BaseException) -> "Failed":
        return cls(type(err).__name__, one_line(err), is_refusal(err),
                   "".join(traceback.format_exception(type(err), err, err.__traceback__)), err)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        try:
            pickle.loads(pickle.dumps(self.error))
        except Exception:  # noqa: BLE001 - e.g. an exception whose __init__ takes other arguments
            state["error"] = None
        return state


@dataclass
class NotRun:
    """A task that was not started because the tasks in ``blocked_by`` (its dependencies) failed."""

    blocked_by: list


class TaskFailed(RuntimeError):
    """A task's failure re-raised where the original exception is not at hand (another process)."""


@dataclass
class TaskFailure:
    """One failed or not-run task of a run, for the report."""

    stage: int
    block: str
    message: str = ""
    kind: str = ""
    refusal: bool = True
    blocked_by: list[str] = field(default_factory=list)
    error: BaseException | None = field(default=None, repr=False, compare=False)
    detail: str = field(default="", repr=False)

    @classmethod
    def of(cls, stage: int, block: str, outcome: Failed | NotRun, names: list[str] | None = None) -> "TaskFailure":
        if isinstance(outcome, NotRun):
            return cls(stage, block, blocked_by=list(names or []))
        return cls(stage, block, outcome.message, outcome.kind, outcome.refusal, error=outcome.error,
                   detail=outcome.detail)

    def line(self) -> str:
        name = f"{STAGE_NAMES[self.stage]} {self.block}"
        if self.blocked_by:
            return f"{name} not run: stage one of {', '.join(self.blocked_by)} failed"
        if self.refusal:
            return f"{name}: {self.message}"
        return f"{name} failed with an unexpected {self.kind}: {self.message} (CHUNKFLOW_DEBUG=1 for the traceback)"

    def exception(self) -> BaseException:
        """The exception to raise for this failure: the original one where it is at hand."""
        if self.error is not None:
            return self.error
        return TaskFailed(self.line())


def exit_status(failures: list[TaskFailure]) -> int:
    """0 without failures, 1 if any task failed unexpectedly (a bug), else 2 (refusals only)."""
    if not failures:
        return 0
    return 1 if any(not f.refusal and not f.blocked_by for f in failures) else 2
