"""``sliding_window``: exact blended inference of an array in memory (numpy or torch, CPU or GPU).

It is the same computation as chunkflow's volumes, on an array instead of a volume: the grid
comes from :class:`chunkflow.geometry.Layout` (``axis_origins``, MONAI's window placement), the
weights from :func:`chunkflow.blend.weight_map`, ``N(x)`` from :class:`chunkflow.blend.WeightSum`,
and the sum from :func:`chunkflow.inference.blended_inference`, the function stage one and the
whole-volume reference call. The faces are padded the way ``Volume.read`` pads them.

A torch tensor on CUDA stays there: the blending runs on its device
(:func:`chunkflow.device_blend.blend_tensor`, the same sums as numpy's) and the result is a tensor
on that device. A numpy array or a CPU tensor is blended on the host in numpy (the device path
also runs on the CPU when ``CHUNKFLOW_DEVICE_BLEND=1``, which is how the tests check it).
"""
from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

import numpy as np

from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum, weight_map
from chunkflow.errors import GeometryError, ModelError, NonFiniteOutput, UsageError
from chunkflow.geometry import Layout
from chunkflow.backend_blend import device_blend_wanted
from chunkflow.inference import blended_inference, to_float
from chunkflow.job import refuse_fraction_overlap, validate_parameters

if TYPE_CHECKING:  # annotations only: importing chunkflow must not import torch
    import torch

Size = Union[int, Sequence[int], str]
Array = Union[np.ndarray, "torch.Tensor"]


def sliding_window(
    image: Array,
    predictor: Callable[[Array], Array],
    input_patch: Size,
    output_patch: Size | None = None,
    overlap: Size = 0,
    blend: str = "gaussian",
    batch_size: int = 1,
    pad_mode: str = "reflect",
    skip_blank: bool = True,
    progress: bool = False,
) -> Array:
    """Blended patch-by-patch inference of a whole array in memory, exactly as chunkflow's volumes.

    Every output voxel is ``sum_p w(x - p) * predictor(patch p)(x) / N(x)`` over the patches of
    one global grid: per axis, origins ``0, s, 2s, ...`` with stride ``s = output_patch - overlap``,
    plus one patch flush with the far face. This is MONAI's window placement and weighting, so
    for an image at least as large as the patch::

        chunkflow.sliding_window(x, f, p, overlap=v, blend=m, batch_size=b)
        == monai.inferers.sliding_window_inference(x[None], p, b, f, overlap=[(v_a - 0.5) / p_a
               if v_a else 0 for each axis a], mode=m, sigma_scale=0.125)[0]

    within 1e-5 (float32 rounding), and it equals chunkflow's two-stage run and ``reference`` of
    the same array written to a volume.

    Args:
        image: the input, C,Z,Y,X or Z,Y,X (one channel), a numpy array or a torch tensor on any
            device. Integers are scaled by their dtype's maximum (uint8 / 255), so the predictor
            sees [0, 1] for unsigned data; floats pass unchanged (as float32). Z,Y,X must each be
            at least the output patch.
        predictor: called with batches ``B,C,*input_patch`` (float32, ``1 <= B <= batch_size``):
            numpy arrays for a numpy ``image``, torch tensors on ``image.device`` (under
            ``torch.no_grad()``) for a torch ``image``. It returns the same kind, shaped
            ``B,C_out,*output_patch``, or ``B,C_out,*input_patch`` whose centre is then cropped.
            It is called once per grid patch, in grid (Z,Y,X raster) order.
        input_patch: the predictor's input patch, Z,Y,X: three ints, ``"16,64,64"``, or one int
            for a cube.
        output_patch: the part of each patch whose prediction is kept, Z,Y,X, centred in the
            input patch (the difference must be even per axis); default ``input_patch``. When it
            is smaller, the predictor sees a context margin ``(input_patch - output_patch) / 2``
            around each output patch, and the image is padded by that margin at its faces.
        overlap: overlap of neighbouring output patches, in voxels, Z,Y,X (or one int), each
            ``0 <= overlap < output_patch``. MONAI's fraction ``f`` of a patch ``p`` is
            ``p - int(p * (1 - f))`` voxels; a float is refused rather than guessed.
        blend: ``"gaussian"`` (MONAI's importance map with ``sigma_scale=0.125``, floored at
            1e-3), ``"constant"`` (plain averaging) or ``"bump"`` (the original chunkflow map).
        batch_size: how many patches the predictor gets at once (a positive int).
        pad_mode: how the context margin is filled beyond the image's faces: ``"reflect"``
            (``numpy.pad`` reflect, mirrored about the edge voxel) or ``"constant"`` (zeros).
            Unused without a margin.
        skip_blank: a patch whose whole input (margin included) is zero is not run and predicts
            0, as in chunkflow's volumes (its weight still counts in ``N``). ``False`` runs every
            patch, as MONAI does; the two differ only where ``predictor(0) != 0``.
        progress: show a tqdm bar of patches.

    Returns:
        float32 ``C_out,Z,Y,X`` (also for a Z,Y,X image): a numpy array for a numpy ``image``,
        a torch tensor on ``image.device`` for a torch ``image``.

    Raises:
        chunkflow.errors.UsageError: ``image`` is not a numpy array or torch tensor, not 3-D or
            4-D, or not numeric; ``predictor`` is not callable; ``batch_size``, ``skip_blank`` or
            ``progress`` has the wrong type.
        chunkflow.errors.GeometryError: a size that is not three positive ints, a float overlap,
            an overlap not smaller than the output patch, or an output patch larger than the image.
        chunkflow.errors.JobError: an output patch larger than, or not centred in, the input
            patch; an unknown ``blend`` or ``pad_mode``.
        chunkflow.errors.ModelError: the predictor returned something other than one
            ``B,C_out,Z,Y,X`` array (tensor) per batch, or patches of another size.
        chunkflow.errors.NonFiniteOutput: the predictor returned NaN or Inf.

    Every one of these is a :class:`chunkflow.errors.Refusal` with a one-line message.
    """
    torch = _torch_of(image)
    if not callable(predictor):
        raise UsageError(f"predictor {type(predictor).__name__} is not callable: give a function or model that maps "
                         "a batch B,C,Z,Y,X to B,C_out,Z,Y,X")
    torch_module = sys.modules.get("torch")
    if torch is None and torch_module is not None and isinstance(predictor, torch_module.nn.Module):
        raise UsageError("predictor is a torch module and image a numpy array: give the image as a torch tensor "
                         "(torch.from_numpy(image)), or a predictor that takes and returns numpy arrays")
    for name, value in (("skip_blank", skip_blank), ("progress", progress)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} {value!r} must be True or False")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size {batch_size!r} must be a positive integer")
    in_patch = _size(input_patch, "input patch")
    out_patch = _size(output_patch, "output patch") if output_patch is not None else in_patch
    over = _size(overlap, "overlap", patch=out_patch)
    validate_parameters(in_patch, out_patch, blend, "float32", pad_mode, "float32")

    on_device = torch is not None and device_blend_wanted(image.device.type)
    if on_device:
        tensor = _device_tensor(image, torch)
        spatial = tuple(tensor.shape[1:])
    else:
        array, device = _host_array(image, torch)
        spatial = array.shape[1:]
    region = Bbox.from_shape((0, 0, 0), spatial)
    for axis, name in enumerate("zyx"):
        if out_patch[axis] > region.shape[axis]:
            raise GeometryError(f"output patch {_shape(out_patch)} is larger than the image {_shape(region.shape)} "
                                f"along {name}; give a smaller patch or pad the image")
    layout = Layout(region, out_patch, over, region.shape)  # refuses overlaps not below the patch
    if on_device:
        return _on_device(tensor, predictor, layout, in_patch, blend, batch_size, pad_mode, skip_blank, progress)
    channels_in = array.shape[0]
    if not skip_blank:  # a channel of ones: no patch is blank; the predictor never sees it
        array = np.concatenate([array, np.ones_like(array[:1])])
    margin = (in_patch - out_patch) // 2
    if any(margin):
        widths = [(0, 0)] + [(m, m) for m in margin]
        array = np.pad(array, widths, mode="reflect") if pad_mode == "reflect" else np.pad(array, widths)
    image_box = region.grow(margin)
    origins = list(layout.all_origins())
    weights = weight_map(blend, tuple(out_patch))
    normaliser = WeightSum(weights, [ax.origins for ax in layout.axes])

    predict = _Predict(_caller(predictor, torch, device, channels_in))
    channels = predict.probe(array, image_box, origins, margin, in_patch)
    with _reporting(len(origins), progress) as bar:
        out = blended_inference(array, image_box, origins, region, normaliser, weights, predict, in_patch, channels,
                                batch_size, progress=bar)
    return out if torch is None else torch.from_numpy(out).to(device)


def _on_device(tensor: "torch.Tensor", predictor: Callable, layout: Layout, in_patch: Vec, blend: str,
               batch_size: int, pad_mode: str, skip_blank: bool, progress: bool) -> "torch.Tensor":
    """:func:`sliding_window` with the blending on ``tensor``'s device (see the module docstring).

    Args:
        tensor: the validated C,Z,Y,X input (:func:`_device_tensor`); it stays on its device.
        predictor: the user's predictor of tensors.
        layout: the patch grid over the image.
        in_patch, blend, batch_size, pad_mode, skip_blank, progress: as :func:`sliding_window`.

    The same numbers as the host path: the conversion of :func:`chunkflow.inference.to_float`,
    ``numpy.pad``'s padding, the same blank patches skipped and the same sums in the same order.
    The predictor sees the same patches in grid order, though not split the same way into calls
    (the host path runs the first patch alone to learn ``C_out``; here the first output tells it).
    """
    import torch

    from chunkflow import device_blend

    region = layout.bbox
    out_patch = layout.patch
    margin = (in_patch - out_patch) // 2
    origins = list(layout.all_origins())
    weights = weight_map(blend, tuple(out_patch))
    normaliser = WeightSum(weights, [ax.origins for ax in layout.axes])
    with torch.no_grad(), _reporting(len(origins), progress) as bar:
        raw = tensor.detach()
        x = device_blend.pad_tensor(device_blend.tensor_to_float(raw), margin, pad_mode)
        nonzero_of = device_blend.pad_tensor(raw, margin, pad_mode) if raw.dtype == torch.float64 else None
        out, _ = device_blend.blend_tensor(x, region.grow(margin), origins, region, normaliser, weights,
                                           _tensor_forward(predictor, torch, tensor.device), in_patch, None,
                                           batch_size, bar, nonzero_of=nonzero_of, skip_blank=skip_blank)
    return out


@contextlib.contextmanager
def _reporting(total: int, progress: bool) -> Iterator[Callable[[int], Any] | None]:
    """A tqdm bar's ``update`` while the blending runs (None without ``progress``), and its
    NonFiniteOutput reworded: that message speaks of blocks written, here nothing is returned."""
    bar = _bar(total) if progress else None
    try:
        yield bar.update if bar is not None else None
    except NonFiniteOutput as err:
        raise NonFiniteOutput(f"{str(err).split(';')[0].replace('the model', 'the predictor')}; nothing was "
                              "returned (check the predictor and the image there)") from None
    finally:
        if bar is not None:
            bar.close()


def _tensor_forward(predictor: Callable, torch: Any, device: Any) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """The predictor as the device path calls it: a float32 batch on ``device`` in, its output
    checked as :func:`_caller` checks it and returned as float32 on ``device``."""

    def forward(batch: "torch.Tensor") -> "torch.Tensor":
        out = predictor(batch)
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"the predictor returned {type(out).__name__} for a tensor batch; it must return one "
                             "tensor B,C_out,Z,Y,X")
        if out.ndim != 5 or len(out) != len(batch) or out.shape[1] < 1:
            raise ModelError(f"the predictor returned shape {_shape(out.shape)} for a batch of {_shape(batch.shape)}; "
                             "it must return B,C_out,Z,Y,X with the batch's B")
        if out.is_complex() or out.dtype == torch.bool:
            raise ModelError(f"the predictor returned {out.dtype} values; it must return real numbers")
        return out.detach().to(device=device, dtype=torch.float32)

    return forward


class _Predict:
    """The predictor as ``blended_inference`` calls it, with the output channels learnt up front.

    ``blended_inference`` needs ``C_out`` before its first batch, and MONAI-style predictors do not
    say it. :meth:`probe` runs the first patch that ``blended_inference`` will run (the first
    non-blank one in grid order) on its own and keeps its output; the first batch then reuses it,
    so every grid patch still goes through the predictor once.
    """

    def __init__(self, call: Callable[[np.ndarray], np.ndarray]):
        self.call = call
        self.first: tuple[np.ndarray, np.ndarray] | None = None

    def probe(self, array: np.ndarray, image_box: Bbox, origins: list[Vec], margin: Vec, in_patch: Vec) -> int:
        patch = None
        for origin in origins:
            box = Bbox(origin - margin, origin - margin + in_patch)
            candidate = array[(slice(None),) + box.slices(image_box)]
            if candidate.any():  # the test blended_inference applies
                patch = to_float(candidate)[None]
                break
        if patch is None:  # every patch is blank: nothing is run, but the output needs its channels
            return self.call(np.zeros((1, array.shape[0]) + tuple(in_patch), dtype=np.float32)).shape[1]
        out = self.call(patch)
        self.first = (patch, out)
        return out.shape[1]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        first, self.first = self.first, None
        if first is None or not np.array_equal(batch[0], first[0][0], equal_nan=True):
            return self.call(batch)
        if len(batch) == 1:
            return first[1]
        rest = self.call(batch[1:])
        if rest.shape[1:] != first[1].shape[1:]:
            raise ModelError(f"the predictor returned patches of {_shape(rest.shape[1:])} and of "
                             f"{_shape(first[1].shape[1:])}; it must return the same C_out,Z,Y,X for every patch")
        return np.concatenate([first[1], rest])


def _caller(predictor: Callable, torch: Any, device: Any, channels_in: int) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch in, float32 numpy batch out, through a predictor of numpy arrays or of tensors on ``device``."""

    def call(batch: np.ndarray) -> np.ndarray:
        given = np.ascontiguousarray(batch[:, :channels_in])  # the ones channel of skip_blank=False stays here
        if torch is None:
            out = predictor(given)
            if not isinstance(out, np.ndarray):
                raise ModelError(f"the predictor returned {type(out).__name__} for a numpy batch; it must return one "
                                 "numpy array B,C_out,Z,Y,X")
        else:
            with torch.no_grad():
                out = predictor(torch.from_numpy(given).to(device))
            if not isinstance(out, torch.Tensor):
                raise ModelError(f"the predictor returned {type(out).__name__} for a tensor batch; it must return one "
                                 "tensor B,C_out,Z,Y,X")
            out = out.detach().to(device="cpu", dtype=torch.float32).numpy()
        if out.ndim != 5 or len(out) != len(batch) or out.shape[1] < 1:
            raise ModelError(f"the predictor returned shape {_shape(out.shape)} for a batch of {_shape(given.shape)}; "
                             "it must return B,C_out,Z,Y,X with the batch's B")
        if not np.issubdtype(out.dtype, np.number) or np.iscomplexobj(out):
            raise ModelError(f"the predictor returned {out.dtype} values; it must return real numbers")
        out = out.astype(np.float32, copy=False)
        # blended_inference refills its batch buffer before it adds this output in: never alias it
        return out.copy() if np.may_share_memory(out, batch) or np.may_share_memory(out, given) else out

    return call


def _torch_of(image: Any) -> Any:
    """The torch module if ``image`` is a tensor, None if it is a numpy array; refused otherwise."""
    if isinstance(image, np.ndarray):
        return None
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(image, torch.Tensor):
        return torch
    raise UsageError(f"image is a {type(image).__name__}; give a numpy array or a torch tensor, C,Z,Y,X or Z,Y,X")


def _device_tensor(image: Any, torch: Any) -> "torch.Tensor":
    """The image as a C,Z,Y,X tensor on its own device, refused as :func:`_host_array` refuses it."""
    if image.is_complex() or image.is_quantized:
        raise UsageError(f"image holds {image.dtype} values; give real numbers")
    tensor = image[None] if image.ndim == 3 else image
    if tensor.ndim != 4 or tensor.shape[0] < 1:
        raise UsageError(f"image has shape {_shape(image.shape)}; give C,Z,Y,X or Z,Y,X (one call per item of a "
                         "batch)")
    return tensor


def _host_array(image: Any, torch: Any) -> tuple[np.ndarray, Any]:
    """The image as a C,Z,Y,X numpy array on the host, and the torch device it came from (or None)."""
    device = None
    if torch is not None:
        device = image.device
        tensor = image.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # numpy has no bfloat16
        if tensor.is_complex():
            raise UsageError(f"image holds {tensor.dtype} values; give real numbers")
        array = tensor.cpu().numpy()
    else:
        array = image
    if array.dtype.kind not in "biuf":
        raise UsageError(f"image holds {array.dtype} values; give integers or floats")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[0] < 1:
        raise UsageError(f"image has shape {_shape(array.shape)}; give C,Z,Y,X or Z,Y,X (one call per item of a "
                         "batch)")
    return array, device


def _size(value: Any, what: str, patch: Vec | None = None) -> Vec:
    """Three ints (or one, or ``"z,y,x"``); for an overlap, a MONAI-style fraction is refused with the voxels."""
    if patch is not None:
        refuse_fraction_overlap(value, patch)
    size = Vec.parse(value, what)
    if patch is None and any(s <= 0 for s in size):
        raise GeometryError(f"{what} {_shape(size)} must be positive along z, y and x")
    return size


def _bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sliding window", unit="patch")


def _shape(values: Sequence) -> str:
    return ",".join(str(v) for v in values)
