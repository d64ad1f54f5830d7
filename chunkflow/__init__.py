"""chunkflow: exact blended 3D convnet inference, in memory or over volumes on a fleet.

In memory (numpy or torch, CPU or GPU)::

    out = chunkflow.sliding_window(image, predictor, input_patch=(16, 64, 64), overlap=(4, 16, 16))

On volumes::

    job = chunkflow.plan(input, output, donations, model, input_patch, overlap=..., block=...)
    chunkflow.run(job)                      # or, per block:
    chunkflow.inference_and_donate(job, "0-128_0-128_0-32")
    chunkflow.receive_and_blend(job, (0, 0, 0))
    chunkflow.reference(job)                # whole-volume inference, the numbers the stages equal

See docs/api.md. Everything but the errors is imported on first use, so ``import chunkflow`` is
fast and imports neither torch nor dask nor cloudvolume.
"""
import importlib as _importlib

from chunkflow.errors import (DonationError, EngineError, GeometryError, Interrupted, JobError, MissingDonations,
                              MissingInput, ModelError, NonFiniteOutput, QueueError, Refusal, StorageError,
                              Terminated, UsageError)

#: name -> module it is imported from on first use
_LAZY = {
    "sliding_window": "chunkflow.api",
    "plan": "chunkflow.api",
    "open_job": "chunkflow.api",
    "run": "chunkflow.api",
    "inference_and_donate": "chunkflow.api",
    "receive_and_blend": "chunkflow.api",
    "reference": "chunkflow.api",
    "Job": "chunkflow.job",
    "Bbox": "chunkflow.bbox",
    "Vec": "chunkflow.bbox",
    "RunSummary": "chunkflow.engines.runner",
    "TaskResult": "chunkflow.engines.task",
}

__all__ = [
    "Bbox", "DonationError", "EngineError", "GeometryError", "Interrupted", "Job", "JobError", "MissingDonations",
    "MissingInput", "ModelError", "NonFiniteOutput", "QueueError", "Refusal", "RunSummary", "StorageError",
    "TaskResult", "Terminated", "UsageError", "Vec", "inference_and_donate", "open_job", "plan", "receive_and_blend",
    "reference", "run", "sliding_window",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chunkflow' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list:
    return sorted({name for name in globals() if not name.startswith("_")} | set(_LAZY) | {"__all__", "__doc__"})
