"""Blended patch-by-patch inference on the model's device: the same sum as ``inference.blended_inference``.

Why: with a fast GPU, the host-side work of the numpy path (cutting patches, sending each batch up
and its output down, ``w * y`` and the division by ``N``) is per voxel and can cost as much as the
model. Here the input chunk goes to the device once, patches are cut there, ``w * y`` is added
into a float32 accumulator there, normalised there, and the result comes back once. The host only
queues work; it waits for the device twice per region: once for the blank-patch flags (which decide
the batches), and once at the end (the NaN check and the download).

Bit for bit what the numpy path computes, wherever the arithmetic is IEEE (the CPU, and CUDA for
everything but the model itself): the same float32 conversion (an integer cast to float32, then
divided by its dtype's maximum, held in a device tensor: CUDA divides by a host scalar as a
multiplication by its reciprocal, which is not the same), the same batches (the same blank patches
skipped, the same patches per batch), a separate multiply and add per patch in the same order (no
fused multiply-add), the same ``N`` slabs. ``tests/test_device_blend.py`` checks this on the CPU.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum
from chunkflow.errors import ModelError, NonFiniteOutput
from chunkflow.inference import _crop_to, _Timer

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]

#: input dtypes that go up as stored and are converted on the device (others: ``to_float`` on the host)
_DEVICE_DTYPES = frozenset(np.dtype(d) for d in ("uint8", "int8", "int16", "uint16", "int32", "int64", "float16",
                                                 "float32", "float64", "bool"))


def device_blended_inference(
    image: np.ndarray,
    image_box: Bbox,
    origins: Sequence[Vec],
    region: Bbox,
    normaliser: np.ndarray | WeightSum,
    weights: np.ndarray,
    backend,
    input_patch: Vec,
    channels: int,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    seconds: dict[str, float] | None = None,
    normalise: bool = True,
) -> tuple[np.ndarray, int]:
    """``inference.blended_inference`` on the device of a torch backend: numpy in, numpy out.

    Args:
        image: input, C,Z,Y,X numpy array over ``image_box`` (any dtype ``blended_inference`` takes).
        image_box: the box ``image`` covers (the region grown by the context margin).
        origins: output-patch origins to compute, in global grid order.
        region: the output region; every patch's output box lies inside it.
        normaliser: ``N(x)`` over ``region`` as an array, or the grid's ``WeightSum`` (slab by slab).
        weights: the output patch weight map (its shape is the output patch).
        backend: a backend with ``torch_device`` and ``device_forward`` (``TorchBackend``).
        input_patch: the network's input patch size.
        channels: the number of output channels of the model.
        batch_size: patches per model call (blank patches leave a batch short, as in numpy).
        progress: called with the number of origins dealt with after each batch is queued.
        seconds: if given, seconds are added under ``gather`` (upload, cutting patches),
            ``model`` (queueing the model, and the final wait for the device), ``accumulate``
            and ``normalise``; on CUDA the host only queues work, so the final wait holds most.
        normalise: False returns the plain sum of ``w * y`` (normalise it later with
            :func:`chunkflow.blend.normalise`).

    Returns:
        (float32 C_out,Z,Y,X over ``region`` on the host, the number of patches run).

    Raises:
        NonFiniteOutput: a patch's output holds NaN or Inf (checked once the region is done,
            before anything is returned, so nothing of it is written).
        ModelError: the model returned the wrong channels, batch length or patch size.
    """
    device = backend.torch_device
    timer = _Timer(seconds)
    with torch.no_grad():
        x, nonzero_of = upload(image, device)
        acc, computed = blend_tensor(x, image_box, origins, region, normaliser, weights, backend.device_forward,
                                     input_patch, channels, batch_size, progress, timer, normalise, nonzero_of)
        del x, nonzero_of
        out = download(acc)
    timer.lap("model")
    log.debug("blended %d of %d patches over %s on %s", computed, len(origins), region.name, device)
    return out, computed


def upload(image: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | np.ndarray]:
    """The image as a float32 tensor on ``device``, converted as :func:`inference.to_float` does,
    and what blank patches are to be judged on (see :func:`blank_flags`).

    The image goes up once in its stored dtype (a uint8 chunk costs a quarter of a float32 one),
    through pinned memory with a non-blocking copy on CUDA, and is converted there. A dtype torch
    cannot hold (big-endian, long double, ...) is converted on the host instead, and its blank
    patches judged there.
    """
    array = np.ascontiguousarray(image)
    if array.dtype not in _DEVICE_DTYPES:
        from chunkflow.inference import to_float

        return _to_device(_from_numpy(to_float(array)), device), array
    raw = _to_device(_from_numpy(array), device)
    x = tensor_to_float(raw)
    return x, raw if raw.dtype == torch.float64 else x


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without its warning for a read-only array: chunkflow only reads these."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``: through pinned memory without waiting, on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staging.copy_(tensor)
    return staging.to(device, non_blocking=True)


def tensor_to_float(raw: torch.Tensor) -> torch.Tensor:
    """float32 of ``raw`` exactly as :func:`inference.to_float`: integers cast to float32, then
    divided by their dtype's maximum (as a float32 tensor on the same device); floats cast."""
    if raw.dtype.is_floating_point or raw.dtype == torch.bool or raw.dtype.is_complex:
        return raw.to(torch.float32)
    maximum = np.float32(np.iinfo(np.dtype(str(raw.dtype).removeprefix("torch."))).max)
    return raw.to(torch.float32).div_(torch.tensor(maximum, device=raw.device))


def blank_flags(source: torch.Tensor | np.ndarray, boxes: Sequence[Bbox], image_box: Bbox) -> list[bool]:
    """Per box, whether ``source`` (C,Z,Y,X over ``image_box``) holds a nonzero value there: True
    for a patch to run. On a device, every box is reduced there and the flags come back at once.

    ``source`` must be zero exactly where the stored input is (``patch.any()`` of the numpy path):
    the float32 input for integers (nonzero stays nonzero after the division), float16 and
    float32; the stored values for float64 (tiny values underflow to 0 in float32).
    """
    if not boxes:
        return []
    cuts = [(slice(None),) + box.slices(image_box) for box in boxes]
    if isinstance(source, np.ndarray):
        return [bool(source[cut].any()) for cut in cuts]
    return torch.stack([source[cut].any() for cut in cuts]).cpu().tolist()


def blend_tensor(
    x: torch.Tensor,
    image_box: Bbox,
    origins: Sequence[Vec],
    region: Bbox,
    normaliser: np.ndarray | WeightSum,
    weights: np.ndarray,
    forward: Forward,
    input_patch: Vec,
    channels: int | None,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    timer: _Timer | None = None,
    normalise: bool = True,
    nonzero_of: torch.Tensor | np.ndarray | None = None,
    skip_blank: bool = True,
) -> tuple[torch.Tensor, int]:
    """The blended sum over ``region`` from a float32 tensor on the model's device, left there.

    Args:
        x: float32 C,Z,Y,X input over ``image_box`` on the device (read only).
        image_box, origins, region, normaliser, weights, input_patch, batch_size, progress,
            normalise: as :func:`device_blended_inference`.
        forward: float32 batch ``B,C,*input_patch`` on the device -> ``B,C_out,*patch`` on the
            device (``*patch`` the output patch or a centred larger one, cropped here). Its
            output may share memory with its input: it is used before the batch is refilled.
        channels: the expected C_out, or None to take it from the first output (from a zero
            patch run once when every patch is blank).
        timer: adds seconds to phases (see ``device_blended_inference``).
        nonzero_of: what blank patches are judged on (:func:`blank_flags`; default ``x``): a
            patch whose input is zero there is not run, its prediction is zero.
        skip_blank: False runs every patch, blank or not.

    Returns:
        (float32 C_out,Z,Y,X tensor over ``region`` on ``x``'s device, the number of patches run).
    """
    timer = timer or _Timer(None)
    device = x.device
    output_patch = Vec(weights.shape)
    margin = (Vec(input_patch) - output_patch) // 2
    boxes = [Bbox(o - margin, o - margin + input_patch) for o in origins]
    if skip_blank:
        keep = blank_flags(x if nonzero_of is None else nonzero_of, boxes, image_box)
    else:
        keep = [True] * len(origins)
    w = _host_to(np.ascontiguousarray(weights, dtype=np.float32), device)
    batch_size = max(1, batch_size)
    batch = torch.empty((min(batch_size, max(1, len(origins))), x.shape[0]) + tuple(input_patch), dtype=torch.float32,
                        device=device)
    state = _Sum(region, output_patch, channels, device)
    timer.lap("gather")
    for first in range(0, len(origins), batch_size):
        kept = [i for i in range(first, min(first + batch_size, len(origins))) if keep[i]]
        for k, i in enumerate(kept):
            batch[k].copy_(x[(slice(None),) + boxes[i].slices(image_box)])
        timer.lap("gather")
        if kept:
            outputs = _checked(forward(batch[:len(kept)]), len(kept), output_patch, state.channels)
            timer.lap("model")
            state.add(outputs, [origins[i] for i in kept], w)
            timer.lap("accumulate")
        if progress is not None:
            progress(min(batch_size, len(origins) - first))
    if state.acc is None:  # nothing ran: the output is zeros, with the channels of a zero patch
        zeros = torch.zeros((1, x.shape[0]) + tuple(input_patch), dtype=torch.float32, device=device)
        state.start(_checked(forward(zeros), 1, output_patch, state.channels).shape[1])
        timer.lap("model")
    state.refuse_non_finite()
    assert state.acc is not None
    if normalise:
        normalise_tensor(state.acc, region, normaliser)
        timer.lap("normalise")
    return state.acc, state.computed


class _Sum:
    """The float32 accumulator of one region and the per-batch finiteness flags (kept on the device)."""

    def __init__(self, region: Bbox, output_patch: Vec, channels: int | None, device: torch.device):
        self.region, self.output_patch, self.device = region, output_patch, device
        self.channels = channels
        self.acc: torch.Tensor | None = None
        self.product: torch.Tensor | None = None
        self.finite: list[torch.Tensor] = []
        self.origins: list[Vec] = []
        self.computed = 0
        if channels is not None:
            self.start(channels)

    def start(self, channels: int) -> None:
        """Allocate the accumulator for ``channels`` output channels."""
        self.channels = channels
        self.acc = torch.zeros((channels,) + tuple(self.region.shape), dtype=torch.float32, device=self.device)

    def add(self, outputs: torch.Tensor, origins: list[Vec], w: torch.Tensor) -> None:
        """Add ``w * y`` of each output patch into its box: one multiply for the batch, then one
        add per patch in order (a separate multiply and add, rounded as numpy rounds them)."""
        if self.acc is None:
            self.start(outputs.shape[1])
        assert self.acc is not None
        if self.product is None or self.product.shape[0] < len(outputs):
            self.product = torch.empty(outputs.shape, dtype=torch.float32, device=self.device)
        product = self.product[:len(outputs)]
        torch.mul(outputs, w, out=product)
        for origin, one in zip(origins, product):
            self.acc[(slice(None),) + Bbox(origin, origin + self.output_patch).slices(self.region)].add_(one)
        self.finite.append(torch.isfinite(outputs).flatten(1).all(1))
        self.origins.extend(origins)
        self.computed += len(origins)

    def refuse_non_finite(self) -> None:
        """Raise NonFiniteOutput naming the first patch whose output held NaN or Inf (one wait)."""
        if not self.finite:
            return
        bad = torch.nonzero(~torch.cat(self.finite)).flatten()[:1].cpu().tolist()
        if bad:
            origin = self.origins[bad[0]]
            raise NonFiniteOutput(f"the model returned NaN or Inf for the output patch "
                                  f"{Bbox(origin, origin + self.output_patch).name}; nothing of this block was "
                                  "written (check the model and its input there)")


def _checked(outputs: object, count: int, output_patch: Vec, channels: int | None) -> torch.Tensor:
    """The model's output for a batch of ``count``, checked and cropped to ``output_patch``."""
    if not isinstance(outputs, torch.Tensor):
        raise ModelError(f"the model returned {type(outputs).__name__}; chunkflow expects one tensor B,C,Z,Y,X")
    if outputs.ndim != 5 or len(outputs) != count:
        raise ModelError(f"the model returned shape {tuple(outputs.shape)} for a batch of {count}; "
                         "expected B,C_out,Z,Y,X with the batch's B")
    outputs = _crop_to(outputs, output_patch)
    if channels is not None and outputs.shape[1] != channels:
        raise ModelError(f"the model returned {outputs.shape[1]} channels; the job expects {channels}")
    return outputs


def normalise_tensor(acc: torch.Tensor, region: Bbox, normaliser: np.ndarray | WeightSum) -> None:
    """Divide ``acc`` by ``N`` in place on its device: the slabs and divisions of ``blend.normalise``."""
    if isinstance(normaliser, np.ndarray):
        acc.div_(_host_to(normaliser, acc.device))
        return
    for slab in normaliser.slabs(region):
        acc[(slice(None),) + slab.slices(region)].div_(_host_to(normaliser.over(slab), acc.device))


def _host_to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 numpy array as a tensor on ``device`` (without waiting, on CUDA)."""
    return _to_device(_from_numpy(np.ascontiguousarray(array, dtype=np.float32)), device)


def pad_tensor(x: torch.Tensor, margin: Sequence[int], mode: str) -> torch.Tensor:
    """``x`` (C,Z,Y,X) padded by ``margin`` on both sides of Z, Y and X, as ``numpy.pad`` pads it:
    ``"reflect"`` (mirrored about the edge voxel, repeated when the margin exceeds the axis) or
    ``"constant"`` (zeros). Reflect gathers with numpy's own padded index per axis, so it is
    numpy's layout for any margin."""
    if not any(margin):
        return x
    if mode == "reflect":
        for axis, m in enumerate(margin):
            if m:
                index = np.pad(np.arange(x.shape[axis + 1]), (m, m), mode="reflect")
                x = x.index_select(axis + 1, _from_numpy(index).to(x.device))
        return x
    out = x.new_zeros((x.shape[0],) + tuple(n + 2 * m for n, m in zip(x.shape[1:], margin)))
    out[(slice(None),) + tuple(slice(m, m + n) for n, m in zip(x.shape[1:], margin))] = x
    return out


def download(acc: torch.Tensor) -> np.ndarray:
    """``acc`` as a numpy array on the host: through pinned memory on CUDA, waiting once."""
    if acc.device.type != "cuda":
        return acc.numpy()
    host = torch.empty(acc.shape, dtype=acc.dtype, pin_memory=True)
    host.copy_(acc, non_blocking=True)
    torch.cuda.current_stream(acc.device).synchronize()
    return host.numpy()
