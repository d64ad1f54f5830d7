"""Blended patch-by-patch inference over one region (pure apart from calling the model).

``blended_inference`` is the one function both stage one (a block's chunk) and the
whole-volume reference call, so they sum the same numbers in the same order.

Where the time goes, and why it is laid out this way (the model should be the only cost):

- *gather*: each patch is copied (and, for integer input, scaled to [0, 1]) straight into one
  reusable float32 batch buffer, so the input chunk can stay in its stored dtype (a uint8
  chunk costs a quarter of a float32 copy) and no per-batch ``np.stack`` allocates;
- *accumulate*: ``w * y`` goes into one reusable buffer of a few z-planes (``np.multiply(..., out=)``)
  and is added in place into the chunk buffer while still in the cache (:func:`_add_weighted`);
- *normalise*: the division by ``N(x)`` runs slab by slab (:class:`chunkflow.blend.WeightSum`),
  so ``N`` never needs a chunk-sized buffer;
- *overlap*: with ``submit`` (a backend's :meth:`~chunkflow.backends.Backend.submit`), batch
  ``k + 1`` is started before batch ``k`` is accumulated, so on a GPU the gather and the
  accumulation run while the device computes. Batches are still accumulated in order, so the
  sums are the same numbers in the same order as without it.

Memory of one call: the input as given + the float32 output (C x region) + one batch in and
out + a few z-planes of one output patch + one ``N`` slab (at most ~32 MiB).

``run_blended`` is what stage one and the reference call with a backend: a torch backend on CUDA
blends on its device instead (:mod:`chunkflow.device_blend`: the chunk goes up once, patches are
cut and ``w * y`` summed there, the sum comes back once), with the same numbers in the same order.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum
from chunkflow.blend import normalise as divide
from chunkflow.errors import ModelError, NonFiniteOutput

if TYPE_CHECKING:
    from chunkflow.stage_pipeline import Turn

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]
Submit = Callable[[np.ndarray], Callable[[], np.ndarray]]


def to_float(image: np.ndarray) -> np.ndarray:
    """Input as float32: unsigned/signed integers are scaled by their dtype's maximum
    (uint8 / 255, uint16 / 65535, ...) so the model sees [0, 1]; floats pass unchanged."""
    if np.issubdtype(image.dtype, np.integer):
        return (image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)).astype(np.float32)
    return image.astype(np.float32, copy=False)


def _float_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = to_float(src)`` without the temporary, in one pass: the same casts, bit for bit
    (``dtype=float32`` makes numpy cast each integer to float32 before dividing, as ``to_float``)."""
    if np.issubdtype(src.dtype, np.integer):
        np.divide(src, np.float32(np.iinfo(src.dtype).max), out=dst, dtype=np.float32)
    else:
        dst[...] = src


def _holds_data(patch: np.ndarray) -> bool:
    """``patch.any()``, deciding from the first row where it can: a patch of data almost always
    has a non-zero there, so only blank (or nearly blank) patches are scanned in full."""
    return bool(patch[(0,) * (patch.ndim - 1)].any()) or bool(patch.any())


#: the bytes of ``w * y`` computed at once before it is added (a few z-planes of a patch): small
#: enough to be added from the cache, not from memory (multiply and add stay separate roundings)
ACCUMULATE_BYTES = 256 << 10


def _add_weighted(acc: np.ndarray, out: np.ndarray, weights: np.ndarray, product: np.ndarray) -> bool:
    """``acc += out * weights`` (C,Z,Y,X views of one patch) a few z-planes at a time through
    ``product`` (C, k, Y, X): the same two float32 roundings per voxel as one whole-patch multiply
    and add, with ``w * y`` still in the cache when it is added. Returns False, having stopped, at
    the first planes of ``out`` that hold NaN or Inf."""
    planes = product.shape[1]
    for z in range(0, out.shape[1], planes):
        part = out[:, z:z + planes]
        if not np.isfinite(part).all():
            return False
        into = product[:, :part.shape[1]]
        np.multiply(part, weights[z:z + planes], out=into)
        acc[:, z:z + planes] += into
    return True


def blended_inference(
    image: np.ndarray,
    image_box: Bbox,
    origins: Sequence[Vec],
    region: Bbox,
    normaliser: np.ndarray | WeightSum,
    weights: np.ndarray,
    predict: Predict,
    input_patch: Vec,
    channels: int,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    seconds: dict[str, float] | None = None,
    submit: Submit | None = None,
    normalise: bool = True,
    turn: "Turn | None" = None,
) -> np.ndarray:
    """Sum of ``w * model(patch) / N`` over the given output patch origins, on ``region``.

    Args:
        image: input, C,Z,Y,X, covering ``image_box`` (the region grown by the network's
            context margin, faces already padded); float, or integers scaled as :func:`to_float`.
        origins: output-patch origins to compute, in global grid order.
        region: output region; every patch's output box must lie inside it.
        normaliser: ``N(x)`` over ``region`` (``blend.weight_sum``), or a ``WeightSum`` of the
            whole grid, which computes it slab by slab.
        weights: the output patch weight map (its shape is the output patch size).
        predict: ``[B, C, *input_patch] -> [B, C_out, *output_patch]`` (or ``*input_patch``,
            in which case the centre is cropped).
        input_patch: the network's input patch size.
        channels: the number of output channels of the model.
        seconds: if given, seconds spent are added under ``gather``, ``model``, ``accumulate``
            and ``normalise`` (with ``submit``, ``model`` is the time spent waiting for it).
        submit: used instead of ``predict`` when given: starts a batch and returns a callable
            that waits for its output (see ``Backend.submit``), so the next batch is gathered
            and the previous one accumulated while the model runs.
        normalise: False returns the plain sum of ``w * model(patch)`` (divide it later with
            :func:`chunkflow.blend.normalise`, e.g. outside a lock on the device).
        turn: this region's turn on a device shared with other regions
            (:class:`chunkflow.stage_pipeline.Turn`): taken just before the first submit (the first
            batch already gathered), handed over right after the last one, before the last output
            is accumulated (or, per batch, taken and given back around each submit). Its waits are
            not counted under ``model``.

    A batch whose output holds NaN or Inf raises :class:`~chunkflow.errors.NonFiniteOutput`
    naming the first such patch (nothing is returned, so nothing of the region is written).

    A patch whose input is entirely zero is not run: its prediction is defined as zero
    (blank regions of EM volumes cost nothing), while its weight still counts in ``N``.

    Returns:
        float32 C_out,Z,Y,X over ``region``; zero where none of ``origins`` reaches.
    """
    timer = _Timer(seconds)
    output_patch = Vec(weights.shape)
    margin = (Vec(input_patch) - output_patch) // 2
    batch_size = max(1, batch_size)
    acc = np.zeros((channels,) + tuple(region.shape), dtype=np.float32)
    batch = np.empty((min(batch_size, max(1, len(origins))), image.shape[0]) + tuple(input_patch), dtype=np.float32)
    plane_bytes = channels * output_patch[1] * output_patch[2] * 4
    product = np.empty((channels, max(1, min(output_patch[0], ACCUMULATE_BYTES // plane_bytes)))
                       + tuple(output_patch[1:]), dtype=np.float32)
    if submit is None:
        def submit(b: np.ndarray) -> Callable[[], np.ndarray]:
            out = predict(b)
            return lambda: out

    def accumulate(kept: list[Vec], wait: Callable[[], np.ndarray], done: int) -> None:
        outputs = wait()
        timer.lap("model")
        if outputs.ndim != 5 or len(outputs) != len(kept):
            raise ModelError(f"the model returned shape {outputs.shape} for a batch of {len(kept)}; "
                             "expected B,C_out,Z,Y,X with the batch's B")
        outputs = _crop_to(outputs, output_patch)
        if outputs.shape[1] != channels:
            raise ModelError(f"the model returned {outputs.shape[1]} channels; the job expects {channels}")
        for origin, out in zip(kept, outputs):
            box = Bbox(origin, origin + output_patch)
            if not _add_weighted(acc[(slice(None),) + box.slices(region)], out, weights, product):
                raise NonFiniteOutput(f"the model returned NaN or Inf for the output patch {box.name}; nothing of "
                                      "this block was written (check the model and its input there)")
        timer.lap("accumulate")
        if progress is not None:
            progress(done)

    pending: tuple[list[Vec], Callable[[], np.ndarray], int] | None = None
    for first in range(0, len(origins), batch_size):
        batch_origins = origins[first:first + batch_size]
        kept = []
        for origin in batch_origins:
            box = Bbox(origin - margin, origin - margin + input_patch)
            patch = image[(slice(None),) + box.slices(image_box)]
            if _holds_data(patch):
                _float_into(batch[len(kept)], patch)
                kept.append(origin)
        timer.lap("gather")
        if kept:
            if turn is not None:
                waited = turn.waited
                turn.before_submit()
                timer.skip(turn.waited - waited)
            try:
                started = submit(batch[:len(kept)])
            finally:
                if turn is not None:
                    turn.after_submit()
            timer.lap("model")
            if pending is not None:
                accumulate(*pending)
            pending = (kept, started, len(batch_origins))
        elif pending is not None:
            pending = (pending[0], pending[1], pending[2] + len(batch_origins))
        elif progress is not None:
            progress(len(batch_origins))
    if turn is not None:
        turn.hand_over()
    if pending is not None:
        accumulate(*pending)
    if normalise:
        divide(acc, region, normaliser)
        timer.lap("normalise")
    return acc


class _Timer:
    """Adds the seconds since the previous lap to a named phase (a no-op without a dict)."""

    def __init__(self, seconds: dict[str, float] | None):
        self.seconds = seconds
        self.last = time.perf_counter()

    def skip(self, seconds: float) -> None:
        """Count the last ``seconds`` in no phase (time spent waiting for another region)."""
        self.last += seconds

    def lap(self, phase: str) -> None:
        if self.seconds is None:
            return
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


def _crop_to(outputs: np.ndarray, output_patch: Vec) -> np.ndarray:
    spatial = Vec(outputs.shape[2:])
    if spatial == output_patch:
        return outputs
    extra = spatial - output_patch
    if any(e < 0 or e % 2 for e in extra):
        raise ModelError(f"the model returned patches of {','.join(map(str, spatial))}; expected the output patch "
                         f"{','.join(map(str, output_patch))} or a centred larger patch")
    lo = extra // 2
    return outputs[(slice(None), slice(None)) + tuple(slice(a, a + p) for a, p in zip(lo, output_patch))]
