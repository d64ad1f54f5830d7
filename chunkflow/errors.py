"""One error taxonomy: what is the user's (or the data's) problem, and what is chunkflow's.

Every error a user can cause derives from :class:`Refusal`. The command-line tools print a
refusal's message as one line and exit 2; the engines never retry one (it would fail the same
way again). Anything else that escapes chunkflow is a *bug*: one line that says so and how to
get the traceback (``CHUNKFLOW_DEBUG=1``), exit 1, and the engines' retries apply to it.

This module imports nothing from chunkflow, so every layer can raise these.
"""
from __future__ import annotations

__all__ = [
    "Refusal",
    "UsageError",
    "GeometryError",
    "JobError",
    "StorageError",
    "MissingInput",
    "ModelError",
    "NonFiniteOutput",
    "DonationError",
    "MissingDonations",
    "EngineError",
    "QueueError",
    "Interrupted",
    "Terminated",
    "is_refusal",
    "one_line",
]

MAX_MESSAGE = 4000


class Refusal(Exception):
    """A user or data problem, reported in one line that names the bad value and what is valid."""


class UsageError(Refusal, ValueError):
    """A command-line flag or value that the command does not take."""


class GeometryError(Refusal, ValueError):
    """A size, box or parameter combination that cannot be planned."""


class JobError(Refusal, ValueError):
    """A job that cannot be planned or loaded."""


class StorageError(Refusal, RuntimeError):
    """A volume or store that cannot be opened, read or written as asked."""


class MissingInput(StorageError):
    """Input chunks that do not exist where the input volume says it has data."""


class ModelError(Refusal, ValueError):
    """A model, weights file, device or precision that cannot be used."""


class NonFiniteOutput(ModelError):
    """The model produced NaN or Inf: the block is refused rather than written."""


class DonationError(Refusal, ValueError):
    """A donation was refused. ``str()`` is one line: ``donation KEY is/belongs ... REASON``."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"donation {key} {reason}")

    def __reduce__(self):
        return (type(self), (self.key, self.reason))


class MissingDonations(Refusal, RuntimeError):
    """Stage two found pieces missing or refused; nothing was written."""

    def __init__(self, block, missing: list[str], corrupt: list[str]):
        self.block, self.missing, self.corrupt = block, missing, corrupt
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing)}")
        if corrupt:
            parts.append(f"{len(corrupt)} refused: {'; '.join(corrupt)}")
        super().__init__(f"block {block.name} cannot be blended, donations {' and '.join(parts)}; nothing was written")

    def __reduce__(self):
        return (type(self), (self.block, self.missing, self.corrupt))


class EngineError(Refusal, ValueError):
    """An engine that cannot be started or used."""


class QueueError(EngineError):
    """A queue that cannot be used, or a task this worker must not run."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, SLURM preemption), raised where Ctrl-C's KeyboardInterrupt would be."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; ``str()`` says what was done and how to resume, and
    ``status`` is the exit status (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, status: int = 130) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        return (type(self), (str(self), self.status))

    @classmethod
    def of(cls, interrupt: BaseException, done: str) -> "Interrupted":
        """``done``: what finished before the interrupt, e.g. ``stage one: 3 blocks done``."""
        status = 143 if isinstance(interrupt, Terminated) else 130
        return cls(f"{done} in this run; run the same command to resume (finished blocks are kept and skipped)",
                   status)


def one_line(err: BaseException, *, first_only: bool = False, typed: bool = False, limit: int = MAX_MESSAGE) -> str:
    """The exception's message on one line, or its type's name if it has none.

    Every line of the message, joined; ``first_only`` keeps only the first (for libraries that
    append a response body or a traceback after it). ``typed`` puts the type's name in front
    (``OSError: ...``). A message longer than ``limit`` characters is cut, ending in ``...``.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        lines = [err.args[0]]
    text = lines[0] if first_only and lines else " ".join(lines)
    name = type(err).__name__
    if typed and text:
        text = f"{name}: {text}"
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text or name


def is_refusal(err: BaseException) -> bool:
    """A user or data problem, as opposed to a bug."""
    return isinstance(err, Refusal)
