"""Engines hand stage tasks to workers; they know nothing of blending."""
from chunkflow.engines.local import LocalEngine
from chunkflow.engines.runner import RunSummary, StageSummary, run_job, run_stage

__all__ = ["LocalEngine", "RunSummary", "StageSummary", "run_job", "run_stage"]
