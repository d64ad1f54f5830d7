"""Engines hand stage tasks to workers; they know nothing of blending.

``local`` (this process), ``dask`` (Dask distributed) and, for fleets of independent workers,
the task queue (:mod:`chunkflow.engines.queue`, python-task-queue ``fq://`` and ``sqs://``).
"""
from chunkflow.engines.base import ENGINES, MODES, EngineError, check_options, make_engine
from chunkflow.engines.failures import Failed, NotRun
from chunkflow.engines.local import LocalEngine
from chunkflow.engines.runner import RunSummary, StageSummary, done_blocks, run_job, run_stage, run_with
from chunkflow.engines.task import StageTask, TaskResult, run_task

__all__ = ["ENGINES", "MODES", "EngineError", "Failed", "LocalEngine", "NotRun", "RunSummary", "StageSummary", "StageTask",
           "TaskResult", "check_options", "done_blocks", "make_engine", "run_job", "run_stage", "run_task",
           "run_with"]
