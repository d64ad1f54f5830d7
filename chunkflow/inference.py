"""Blended patch-by-patch inference over one region (pure apart from calling the model).

``blended_inference`` is the one function both stage one (a block's chunk) and the
whole-volume reference call, so they sum the same numbers in the same order.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]


def to_float(image: np.ndarray) -> np.ndarray:
    """Input as float32: unsigned/signed integers are scaled by their dtype's maximum
    (uint8 / 255, uint16 / 65535, ...) so the model sees [0, 1]; floats pass unchanged."""
    if np.issubdtype(image.dtype, np.integer):
        return (image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)).astype(np.float32)
    return image.astype(np.float32, copy=False)


def blended_inference(
    image: np.ndarray,
    image_box: Bbox,
    origins: Sequence[Vec],
    region: Bbox,
    normaliser: np.ndarray,
    weights: np.ndarray,
    predict: Predict,
    input_patch: Vec,
    channels: int,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Sum of ``w * model(patch) / N`` over the given output patch origins, on ``region``.

    Args:
        image: float32 input, C,Z,Y,X, covering ``image_box`` (the region grown by the
            network's context margin, faces already padded).
        origins: output-patch origins to compute, in global grid order.
        region: output region; every patch's output box must lie inside it.
        normaliser: ``N(x)`` over ``region`` from every grid patch (``blend.weight_sum``).
        weights: the output patch weight map (its shape is the output patch size).
        predict: ``[B, C, *input_patch] -> [B, C_out, *output_patch]`` (or ``*input_patch``,
            in which case the centre is cropped).
        input_patch: the network's input patch size.
        channels: the number of output channels of the model.

    A patch whose input is entirely zero is not run: its prediction is defined as zero
    (blank regions of EM volumes cost nothing), while its weight still counts in ``N``.

    Returns:
        float32 C_out,Z,Y,X over ``region``; zero where none of ``origins`` reaches.
    """
    output_patch = Vec(weights.shape)
    margin = (Vec(input_patch) - output_patch) // 2
    acc = np.zeros((channels,) + tuple(region.shape), dtype=np.float32)
    for first in range(0, len(origins), max(1, batch_size)):
        batch_origins = origins[first:first + batch_size]
        inputs, kept = [], []
        for origin in batch_origins:
            box = Bbox(origin - margin, origin - margin + input_patch)
            patch = image[(slice(None),) + box.slices(image_box)]
            if patch.any():
                inputs.append(patch)
                kept.append(origin)
        if inputs:
            outputs = predict(np.stack(inputs))
            outputs = _crop_to(outputs, output_patch)
            if outputs.shape[1] != channels:
                raise ValueError(f"the model returned {outputs.shape[1]} channels; the job expects {channels}")
            for origin, out in zip(kept, outputs):
                box = Bbox(origin, origin + output_patch)
                acc[(slice(None),) + box.slices(region)] += out * weights
        if progress is not None:
            progress(len(batch_origins))
    acc /= normaliser
    return acc


def _crop_to(outputs: np.ndarray, output_patch: Vec) -> np.ndarray:
    spatial = Vec(outputs.shape[2:])
    if spatial == output_patch:
        return outputs
    extra = spatial - output_patch
    if any(e < 0 or e % 2 for e in extra):
        raise ValueError(f"the model returned patches of {','.join(map(str, spatial))}; expected the output patch "
                         f"{','.join(map(str, output_patch))} or a centred larger patch")
    lo = extra // 2
    return outputs[(slice(None), slice(None)) + tuple(slice(a, a + p) for a, p in zip(lo, output_patch))]
