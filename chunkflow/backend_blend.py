"""Blended inference through a backend, on the best path it offers: on the device for a torch
backend on CUDA (:mod:`chunkflow.device_blend`), through numpy otherwise (:mod:`chunkflow.inference`).

Its own module so that both paths sit below it: the device path reuses the numpy path's pieces, and
only this dispatcher knows them both.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum
from chunkflow.inference import blended_inference
from chunkflow.stage_pipeline import Turn


#: ``1`` runs :func:`run_blended` on the device path for any torch backend (also on the CPU, which
#: is how the tests exercise it), ``0`` never; unset: the device path on CUDA only.
DEVICE_BLEND_ENV = "CHUNKFLOW_DEVICE_BLEND"


def device_blend_wanted(device_type: str | None) -> bool:
    """Whether to blend on a torch device of this type (``"cuda"``, ``"cpu"``): on CUDA, unless
    :data:`DEVICE_BLEND_ENV` says ``1`` (always) or ``0`` (never)."""
    forced = os.environ.get(DEVICE_BLEND_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return device_type == "cuda"


def uses_device_blend(backend: object) -> bool:
    """Whether :func:`run_blended` blends on ``backend``'s device (see :data:`DEVICE_BLEND_ENV`)."""
    if not callable(getattr(backend, "device_forward", None)):
        return False
    return device_blend_wanted(getattr(getattr(backend, "torch_device", None), "type", None))


def run_blended(
    image: np.ndarray,
    image_box: Bbox,
    origins: Sequence[Vec],
    region: Bbox,
    normaliser: np.ndarray | WeightSum,
    weights: np.ndarray,
    backend: object,
    input_patch: Vec,
    channels: int,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    seconds: dict[str, float] | None = None,
    normalise: bool = True,
    turn: Turn | None = None,
) -> tuple[np.ndarray, int]:
    """:func:`blended_inference` through a backend, on the best path it offers.

    A torch backend on CUDA (one with ``device_forward`` and ``torch_device``) blends on the
    device (:func:`chunkflow.device_blend.device_blended_inference`: the chunk goes up once, the
    sum comes back once); any other backend goes through numpy here, with its ``submit`` when
    it has one (duck-typed plugins may only have ``predict``). Both sum the same numbers in the
    same order; :data:`DEVICE_BLEND_ENV` overrides the choice.

    Args: as :func:`blended_inference`, with ``backend`` in place of ``predict``/``submit``.
        ``turn`` (:class:`chunkflow.stage_pipeline.Turn`): the device is taken for the whole call on
        the device path (the chunk lives there), from the first submit to the last on the numpy path.

    Returns:
        (float32 C_out,Z,Y,X over ``region`` on the host, the number of patches the model ran).
    """
    if uses_device_blend(backend):
        from chunkflow.device_blend import device_blended_inference  # imports torch

        with turn.hold() if turn is not None else contextlib.nullcontext():
            return device_blended_inference(image, image_box, origins, region, normaliser, weights, backend,
                                            input_patch, channels, batch_size, progress, seconds, normalise)
    counted = [0]
    predict_of = getattr(backend, "predict")
    submit_of = getattr(backend, "submit", None)

    def predict(batch: np.ndarray) -> np.ndarray:
        counted[0] += len(batch)
        return predict_of(batch)

    def submit(batch: np.ndarray) -> Callable[[], np.ndarray]:
        counted[0] += len(batch)
        return submit_of(batch)

    out = blended_inference(image, image_box, origins, region, normaliser, weights, predict, input_patch, channels,
                            batch_size, progress, seconds, submit=submit if callable(submit_of) else None,
                            normalise=normalise, turn=turn)
    return out, counted[0]
