"""What a queue worker did: the counts it prints when it stops and its exit status."""
from __future__ import annotations

from dataclasses import dataclass, field

from chunkflow.engines.failures import STAGE_NAMES
from chunkflow.resources import Stats
from chunkflow.units import count

__all__ = ["WorkerSummary"]


@dataclass
class WorkerSummary:
    stage: int
    tasks: int = 0
    skipped: int = 0
    retries: int = 0
    seconds: float = 0.0
    stats: Stats = field(default_factory=Stats)
    swept: int = 0  # leftover donations of finished blocks removed (--cleanup)
    failed: int = 0  # attempts that raised and were handed back for another attempt
    given_up: list[str] = field(default_factory=list)  # one line per task this worker gave up
    given_up_refusals: bool = True  # every task given up ended in a refusal (exit 2, else 1)

    @property
    def handled(self) -> int:
        return self.tasks + self.skipped + self.failed + len(self.given_up)

    def add(self, other: "WorkerSummary") -> None:
        """Add the counts of another slot of the same worker."""
        self.tasks += other.tasks
        self.skipped += other.skipped
        self.retries += other.retries
        self.stats.add(other.stats)
        self.swept += other.swept
        self.failed += other.failed
        self.given_up += other.given_up
        self.given_up_refusals &= other.given_up_refusals

    def line(self) -> str:
        swept = f", {count(self.swept, 'leftover donation')} of finished blocks removed" if self.swept else ""
        failed = f", {count(self.failed, 'failed attempt')} handed back" if self.failed else ""
        given_up = f", {count(len(self.given_up), 'task')} given up" if self.given_up else ""
        work = count(self.stats.patches, "patch", "patches") if self.stage == 1 else \
            f"{count(self.stats.donations, 'piece')} received"
        retries = count(self.retries, "retry", "retries")
        return (f"{STAGE_NAMES[self.stage]} worker: {count(self.tasks, 'task')} run, {self.skipped} skipped (already "
                f"done), {retries} (of tasks that failed or whose worker died), {work}, {self.seconds:.1f} s"
                f"{swept}{failed}{given_up}")

    def exit_status(self) -> int:
        """0 unless this worker gave a task up: then 2 (refusals) or 1 (a bug)."""
        if not self.given_up:
            return 0
        return 2 if self.given_up_refusals else 1
