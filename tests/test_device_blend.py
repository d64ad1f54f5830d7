"""Blending on the model's device (``chunkflow.device_blend``) sums exactly what the numpy path sums.

The device path runs on the CPU too (torch tensors on "cpu", ``CHUNKFLOW_DEVICE_BLEND=1``), where
every operation it uses is IEEE float32 like numpy's, so there it must equal the numpy path bit for
bit: the same conversion of the input, the same batches, the same blank patches skipped, the same
``w * y`` added in the same order, the same division by ``N``. Tests marked ``gpu`` compare CUDA
with the CPU's numpy path within 1e-5 (the model's own float32 arithmetic differs on a GPU).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chunkflow
from chunkflow import device_blend
from chunkflow.backends import load_backend
from chunkflow.backends.pytorch import TorchBackend
from chunkflow.bbox import Bbox, Vec
from chunkflow.blend import WeightSum, normalise, weight_map, weight_sum
from chunkflow.errors import ModelError, NonFiniteOutput
from chunkflow.geometry import Layout
from chunkflow.backend_blend import DEVICE_BLEND_ENV, run_blended, uses_device_blend
from chunkflow.inference import blended_inference, to_float
from chunkflow.planning import plan
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import Resources, inference_and_donate, reference
from chunkflow.storage import open_volume
from tests.helpers import CONV3, examples, make_input, stored_bytes

GPU = os.environ.get("CHUNKFLOW_GPU_TEST_DEVICE", "cuda")  # "cpu": a dry run of the gpu tests (conftest.py)


def _conv(c_in: int, c_out: int, seed: int = 7) -> torch.nn.Module:
    """A fixed-random same-size conv net whose output at 0 is not 0 (so skipping blank patches shows)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv3d(c_in, c_out, 3, padding=1), torch.nn.Sigmoid())
    finally:
        torch.random.set_rng_state(state)


class _Case:
    """One blending problem: a grid, a region of it (the whole volume or one block's chunk), an input."""

    def __init__(self, shape, out_patch, margin, overlap, mode, c_in, dtype, block, seed, blank, chunk_of=None,
                 array_normaliser=False):
        self.out_patch, self.margin = Vec(out_patch), Vec(margin)
        self.in_patch = self.out_patch + 2 * self.margin
        bbox = Bbox.from_shape((0, 0, 0), shape)
        self.layout = Layout(bbox, self.out_patch, Vec(overlap), Vec(block))
        self.weights = weight_map(mode, tuple(self.out_patch))
        self.weight_sum = WeightSum(self.weights, [ax.origins for ax in self.layout.axes])
        chunk = self.layout.chunk_box(chunk_of) if chunk_of is not None else None
        if chunk is None:
            self.region, self.origins = bbox, list(self.layout.all_origins())
        else:
            self.region, self.origins = chunk, self.layout.own_origins(chunk_of)
        self.normaliser = (weight_sum(self.weights, self.layout.origins_overlapping(self.region), self.region)
                           if array_normaliser else self.weight_sum)
        self.image_box = self.region.grow(self.margin)
        rng = np.random.default_rng(seed)
        data = rng.random((c_in,) + tuple(self.image_box.shape), dtype=np.float32)
        if np.dtype(dtype).kind in "ui":
            data = np.floor(data * np.iinfo(dtype).max).astype(dtype)
        else:
            data = data.astype(dtype)
        if blank:  # a corner of zeros: the patches inside it are not run
            data[(slice(None),) + tuple(slice(0, max(1, s // 2)) for s in data.shape[1:])] = 0
        self.image = data

    def args(self, backend, channels):
        return (self.image, self.image_box, self.origins, self.region, self.normaliser, self.weights, backend,
                self.in_patch, channels)


def _both(case: _Case, backend, channels, batch_size, monkeypatch, normalise_=True):
    """(numpy path, device path) outputs and patch counts through ``run_blended``."""
    monkeypatch.setenv(DEVICE_BLEND_ENV, "0")
    host = run_blended(*case.args(backend, channels), batch_size, normalise=normalise_)
    monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
    device = run_blended(*case.args(backend, channels), batch_size, normalise=normalise_)
    return host, device


def _bits(a: np.ndarray) -> np.ndarray:
    assert a.dtype == np.float32
    return np.ascontiguousarray(a).view(np.uint32)


@st.composite
def cases(draw):
    out_patch = tuple(draw(st.integers(1, 6)) for _ in range(3))
    overlap = tuple(draw(st.integers(0, p - 1)) for p in out_patch)
    shape = tuple(draw(st.integers(p, 3 * p + 1)) for p in out_patch)
    margin = tuple(draw(st.integers(0, 2)) for _ in range(3))
    block = tuple(draw(st.integers(p, max(p, s))) for p, s in zip(out_patch, shape))  # Layout wants >= patch
    layout_blocks = tuple(-(-s // b) for s, b in zip(shape, block))
    chunk_of = draw(st.none() | st.tuples(*(st.integers(0, n - 1) for n in layout_blocks)).map(Vec))
    return dict(shape=shape, out_patch=out_patch, margin=margin, overlap=overlap,
                mode=draw(st.sampled_from(["constant", "gaussian", "bump"])), c_in=draw(st.integers(1, 2)),
                dtype=draw(st.sampled_from(["uint8", "uint16", "float32"])), block=block,
                seed=draw(st.integers(0, 2 ** 16)), blank=draw(st.booleans()), chunk_of=chunk_of,
                array_normaliser=draw(st.booleans()))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=cases(), channels=st.integers(1, 3), batch_size=st.integers(1, 5), normalise_=st.booleans())
def test_device_path_on_cpu_equals_numpy_path_bit_for_bit(spec, channels, batch_size, normalise_, monkeypatch):
    case = _Case(**spec)
    backend = TorchBackend(_conv(spec["c_in"], channels))
    (host, host_n), (device, device_n) = _both(case, backend, channels, batch_size, monkeypatch, normalise_)
    assert host_n == device_n <= len(case.origins)
    assert host.shape == device.shape == (channels,) + tuple(case.region.shape)
    assert np.array_equal(_bits(host), _bits(device))
    if not normalise_:  # the caller's later division gives the normalised output, bit for bit
        monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
        whole, _ = run_blended(*case.args(backend, channels), batch_size)
        normalise(device, case.region, case.normaliser)
        assert np.array_equal(_bits(device), _bits(whole))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                   "float16", "float32", "float64", "bool", ">u2", "longdouble"])
def test_conversion_on_the_device_is_to_float_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        image = rng.integers(info.min, info.max, size=(2, 3, 5, 7), endpoint=True, dtype=np.dtype(dtype).newbyteorder("="))
        image = image.astype(dtype)
    elif dtype == "bool":
        image = rng.random((2, 3, 5, 7)) > 0.5
    else:
        image = (rng.standard_normal((2, 3, 5, 7)) * 100).astype(dtype)
    x, _ = device_blend.upload(image, torch.device("cpu"))
    assert x.dtype == torch.float32
    assert np.array_equal(_bits(x.numpy()), _bits(to_float(image)))


def test_blank_patches_are_skipped_as_the_numpy_path_skips_them(monkeypatch):
    """Tiny float64 values are not blank (they would be in float32): both paths run those patches."""
    case = _Case((6, 12, 12), (3, 4, 4), (1, 1, 1), (1, 1, 1), "gaussian", 1, "float64", (6, 12, 12), 3, True)
    case.image[...] = 0
    case.image[0, 5, 9, 9] = 1e-300  # float32(1e-300) == 0
    calls = []

    class Counting(TorchBackend):
        def device_forward(self, x):
            calls.append(len(x))
            return super().device_forward(x)

    backend = Counting(_conv(1, 2))
    (host, host_n), (device, device_n) = _both(case, backend, 2, 2, monkeypatch)
    voxel = Vec(5, 9, 9) + case.image_box.start
    expected = sum(all(a <= v < a + p for a, v, p in zip(o - case.margin, voxel, case.in_patch))
                   for o in case.origins)  # the patches whose input holds the tiny value
    assert host_n == device_n == sum(calls) == expected > 0
    assert np.array_equal(_bits(host), _bits(device))
    assert (host != 0).any() and (host == 0).any()  # run patches predict sigmoid(b) != 0, skipped ones 0


def test_an_all_blank_region_runs_nothing_and_is_zero(monkeypatch):
    case = _Case((5, 9, 9), (3, 4, 4), (1, 1, 1), (1, 2, 2), "bump", 1, "uint8", (5, 9, 9), 0, False)
    case.image[...] = 0
    backend = TorchBackend(_conv(1, 3))
    (host, host_n), (device, device_n) = _both(case, backend, 3, 4, monkeypatch)
    assert host_n == device_n == 0
    assert device.shape == (3, 5, 9, 9) and not device.any() and not host.any()


class _Poison(torch.nn.Module):
    """The conv net, but NaN (or Inf) for every patch whose input holds the marker value."""

    MARK = 0.5

    def __init__(self, value: float):
        super().__init__()
        self.net, self.value = _conv(1, 2), value

    def forward(self, x):
        y = self.net(x).clone()
        y[(x == self.MARK).flatten(1).any(1)] = self.value
        return y


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_non_finite_output_is_refused_naming_the_patch(value, batch_size, monkeypatch):
    case = _Case((8, 14, 14), (4, 5, 5), (1, 1, 1), (1, 2, 2), "gaussian", 1, "float32", (8, 14, 14), 5, False)
    case.image[0, 6, 8, 9] = _Poison.MARK
    first = next(o for o in case.origins
                 if all(a <= p < b for a, p, b in zip(o - case.margin, Vec(6, 8, 9) + case.image_box.start,
                                                      o - case.margin + case.in_patch)))
    name = Bbox(first, first + case.out_patch).name
    backend = TorchBackend(_Poison(value))
    messages = []
    for forced in ("0", "1"):
        monkeypatch.setenv(DEVICE_BLEND_ENV, forced)
        with pytest.raises(NonFiniteOutput) as err:
            run_blended(*case.args(backend, 2), batch_size)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert name in messages[1] and "\n" not in messages[1]


class _Wrong(torch.nn.Module):
    def __init__(self, channels: int = 2, drop: int = 0):
        super().__init__()
        self.channels, self.drop = channels, drop

    def forward(self, x):
        return x[self.drop:].repeat(1, self.channels, 1, 1, 1)


@pytest.mark.parametrize("module, match", [(_Wrong(channels=3), "3 channels"), (_Wrong(drop=1), "batch of 2"),
                                           (torch.nn.Flatten(), "shape")])
def test_wrong_outputs_are_refused_on_both_paths(module, match, monkeypatch):
    case = _Case((4, 8, 8), (2, 4, 4), (0, 0, 0), (0, 0, 0), "constant", 1, "float32", (4, 8, 8), 1, False)
    backend = TorchBackend(module)
    for forced in ("0", "1"):
        monkeypatch.setenv(DEVICE_BLEND_ENV, forced)
        with pytest.raises(ModelError, match=match):
            run_blended(*case.args(backend, 2), 2)


def test_identity_net_output_aliasing_its_batch_is_safe(monkeypatch):
    """nn.Identity hands the batch buffer back; it is added in before the buffer is refilled."""
    case = _Case((7, 11, 13), (3, 4, 5), (0, 0, 0), (1, 1, 2), "bump", 2, "uint8", (7, 11, 13), 9, True)
    backend = TorchBackend(torch.nn.Identity())
    (host, _), (device, _) = _both(case, backend, 2, 3, monkeypatch)
    assert np.array_equal(_bits(host), _bits(device))
    np.testing.assert_allclose(device, to_float(case.image), rtol=0, atol=1e-6)  # identity: gives back the input


def test_dispatch_and_device_forward(monkeypatch):
    backend = TorchBackend(_conv(1, 1))
    assert backend.torch_device == torch.device("cpu")
    monkeypatch.delenv(DEVICE_BLEND_ENV, raising=False)
    assert not uses_device_blend(backend)  # CPU: numpy unless forced
    monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
    assert uses_device_blend(backend) and not uses_device_blend(load_backend("identity"))
    with pytest.raises(ModelError, match="float32 tensor"):
        backend.device_forward(np.zeros((1, 1, 3, 3, 3), np.float32))
    with pytest.raises(ModelError, match="float32 tensor"):
        backend.device_forward(torch.zeros((1, 1, 3, 3, 3), dtype=torch.float64))
    with pytest.raises(ModelError, match="float32 tensor"):
        backend.device_forward(torch.zeros((1, 3, 3, 3)))
    out = backend.device_forward(torch.zeros((2, 1, 3, 4, 5)))
    assert out.dtype == torch.float32 and out.shape == (2, 1, 3, 4, 5)
    bf16 = TorchBackend(_conv(1, 1), precision="bfloat16").device_forward(torch.rand((1, 1, 3, 4, 5)))
    assert bf16.dtype == torch.float32


class _PredictOnly:
    """A duck-typed plugin with predict only (no submit, no device_forward)."""

    def __init__(self, backend):
        self.backend, self.patches = backend, 0

    def predict(self, batch):
        self.patches += len(batch)
        return self.backend.predict(batch)


def test_run_blended_counts_patches_through_predict_only_plugins(monkeypatch):
    case = _Case((6, 10, 10), (3, 4, 4), (1, 1, 1), (1, 1, 1), "gaussian", 1, "uint8", (6, 10, 10), 2, True)
    plugin = _PredictOnly(TorchBackend(_conv(1, 2)))
    monkeypatch.setenv(DEVICE_BLEND_ENV, "1")  # no device_forward: numpy whatever the variable says
    out, computed = run_blended(*case.args(plugin, 2), 3)
    assert computed == plugin.patches > 0
    expected = blended_inference(*case.args(plugin.backend.predict, 2), 3)
    assert np.array_equal(_bits(out), _bits(expected))


@settings(max_examples=examples(40), deadline=None)
@given(shape=st.tuples(*(st.integers(1, 6) for _ in range(3))), margin=st.tuples(*(st.integers(0, 9) for _ in range(3))),
       mode=st.sampled_from(["reflect", "constant"]))
def test_pad_tensor_is_numpy_pad(shape, margin, mode):
    a = np.random.default_rng(0).random((2,) + shape, dtype=np.float32)
    widths = [(0, 0)] + [(m, m) for m in margin]
    expected = np.pad(a, widths, mode="reflect") if mode == "reflect" else np.pad(a, widths)
    assert np.array_equal(device_blend.pad_tensor(torch.from_numpy(a), margin, mode).numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("skip_blank", [True, False])
def test_sliding_window_device_path_on_cpu_equals_the_host_path(dtype, skip_blank, monkeypatch):
    """A pointwise predictor sees the same values either way, so the outputs agree bit for bit."""
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.random((1, 9, 20, 21)) * 100).to(dtype)
    image[:, :5, :10, :10] = 0
    if dtype == torch.float64:
        image[0, 2, 3, 4] = 1e-300

    def predictor(batch):
        assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
        return torch.cat([batch * 2 + 1, torch.sqrt(batch + 1)], dim=1)

    outputs = []
    for forced in ("0", "1"):
        monkeypatch.setenv(DEVICE_BLEND_ENV, forced)
        outputs.append(chunkflow.sliding_window(image, predictor, (6, 10, 10), output_patch=(4, 6, 6),
                                                overlap=(1, 2, 3), blend="gaussian", batch_size=3,
                                                pad_mode="reflect", skip_blank=skip_blank))
    assert all(isinstance(o, torch.Tensor) and o.dtype == torch.float32 for o in outputs)
    assert np.array_equal(_bits(outputs[0].numpy()), _bits(outputs[1].numpy()))


def test_sliding_window_device_path_refuses_like_the_host_path(monkeypatch):
    monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
    image = torch.rand((8, 16, 16))
    with pytest.raises(NonFiniteOutput, match="the predictor returned NaN or Inf .*nothing was returned"):
        chunkflow.sliding_window(image, lambda b: b * float("nan"), 8)
    with pytest.raises(ModelError, match="for a tensor batch"):
        chunkflow.sliding_window(image, lambda b: b.numpy(), 8)
    with pytest.raises(ModelError, match="real numbers"):
        chunkflow.sliding_window(image, lambda b: b > 0, 8)


def _job(tmp_path, name="job", **kw):
    url, _ = make_input(tmp_path / "in", (14, 44, 40), dtype="uint8", seed=4, chunk=(4, 8, 12),
                        zero_region=Bbox(Vec(0, 0, 0), Vec(8, 20, 20)))
    return plan(url, f"file://{tmp_path / (name + '_out')}", str(tmp_path / name), CONV3, "10,22,22",
                output_patch="4,16,16", overlap="1,5,5", block="8,24,24", blend="gaussian", storage_chunk="4,8,12",
                **kw)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_two_stage_run_on_the_device_path_equals_the_reference(tmp_path, monkeypatch, batch_size):
    """Invariant 1 with the device path: the same bytes as the numpy path, and the reference."""
    job = _job(tmp_path, batch_size=batch_size)
    blocks = list(job.layout.block_indices())
    monkeypatch.setenv(DEVICE_BLEND_ENV, "0")
    for idx in blocks:
        inference_and_donate(job, idx, Resources(job))
    numpy_bytes = stored_bytes(tmp_path)
    expected = reference(job, Resources(job))
    monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
    res = Resources(job)
    assert uses_device_blend(res.backend)
    patches = sum(inference_and_donate(job, idx, res).patches for idx in blocks)
    assert stored_bytes(tmp_path) == numpy_bytes
    assert 0 < patches < job.layout.num_patches  # the blank corner is skipped
    for idx in blocks:
        receive_and_blend(job, idx, res)
    output = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)
    assert np.array_equal(_bits(reference(job, Resources(job))), _bits(expected))  # device reference == numpy's


# ---- on a GPU (skipped without CUDA; CHUNKFLOW_GPU_TEST_DEVICE=cpu runs them on the CPU as a dry run) ----

@pytest.fixture
def exact_cuda():
    """fp32 convolutions on CUDA without TF32 (on by default for cuDNN convolutions on Ampere+),
    so the model's outputs on the GPU are within float32 rounding of the CPU's."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device(GPU)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["constant", "gaussian", "bump"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("normalise_", [True, False])
def test_gpu_device_path_equals_the_cpu_numpy_path(exact_cuda, mode, dtype, normalise_, monkeypatch):
    case = _Case((13, 40, 37), (5, 12, 12), (1, 2, 2), (2, 3, 4), mode, 1, dtype, (8, 20, 20), 11, True,
                 chunk_of=Vec(0, 1, 0))
    cpu = TorchBackend(_conv(1, 3))
    gpu = TorchBackend(_conv(1, 3), device=str(exact_cuda))
    monkeypatch.delenv(DEVICE_BLEND_ENV, raising=False)
    if exact_cuda.type == "cuda":
        assert uses_device_blend(gpu) and not uses_device_blend(cpu)  # CUDA blends on the device by default
    else:
        monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
    seconds: dict[str, float] = {}
    out, computed = run_blended(*case.args(gpu, 3), 4, seconds=seconds, normalise=normalise_)
    monkeypatch.setenv(DEVICE_BLEND_ENV, "0")
    expected, expected_n = run_blended(*case.args(cpu, 3), 4, normalise=normalise_)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and computed == expected_n > 0
    scale = 1.0 if normalise_ else float(np.abs(expected).max())  # un-normalised sums grow with the weights
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * scale)
    assert {"gather", "model", "accumulate"} <= set(seconds)


@pytest.mark.gpu
def test_gpu_device_path_equals_numpy_path_on_the_same_gpu(exact_cuda, monkeypatch):
    """Same model outputs on both sides (both run on the GPU): only the blending differs, by IEEE
    float32 ops on each side, so the sums agree to float32 rounding."""
    case = _Case((12, 33, 35), (4, 10, 11), (1, 1, 1), (1, 3, 2), "gaussian", 2, "uint8", (12, 33, 35), 12, True)
    gpu = TorchBackend(_conv(2, 2), device=str(exact_cuda))
    (host, host_n), (device, device_n) = _both(case, gpu, 2, 3, monkeypatch)
    assert host_n == device_n
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_gpu_non_finite_output_is_refused(exact_cuda, monkeypatch):
    case = _Case((8, 14, 14), (4, 5, 5), (1, 1, 1), (1, 2, 2), "gaussian", 1, "float32", (8, 14, 14), 5, False)
    case.image[0, 6, 8, 9] = _Poison.MARK
    monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
    with pytest.raises(NonFiniteOutput, match="NaN or Inf for the output patch"):
        run_blended(*case.args(TorchBackend(_Poison(float("nan")), device=str(exact_cuda)), 2), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_gpu_device_forward_stays_on_the_device(exact_cuda, precision):
    if exact_cuda.type == "cpu" and precision == "float16":
        pytest.skip("float16 is refused on the CPU")
    backend = TorchBackend(_conv(1, 2), device=str(exact_cuda), precision=precision)
    x = torch.rand((3, 1, 4, 8, 8), device=exact_cuda)
    y = backend.device_forward(x)
    assert y.device.type == exact_cuda.type and y.dtype == torch.float32 and y.shape == (3, 2, 4, 8, 8)
    tol = 1e-5 if precision == "float32" else 2e-2
    np.testing.assert_allclose(y.cpu().numpy(), backend.predict(x.cpu().numpy()), rtol=0, atol=tol)


@pytest.mark.gpu
def test_gpu_sliding_window_keeps_the_tensor_on_the_device(exact_cuda, monkeypatch):
    monkeypatch.delenv(DEVICE_BLEND_ENV, raising=False)
    if exact_cuda.type == "cpu":
        monkeypatch.setenv(DEVICE_BLEND_ENV, "1")
    net = _conv(1, 3).to(exact_cuda)
    image = np.random.default_rng(8).integers(0, 256, (1, 10, 40, 36)).astype(np.uint8)
    image[:, :6, :20, :20] = 0
    seen = []

    def predictor(batch):
        seen.append(batch.device.type)
        return net(batch)

    out = chunkflow.sliding_window(torch.from_numpy(image).to(exact_cuda), predictor, (6, 16, 16),
                                   output_patch=(4, 12, 12), overlap=(1, 4, 4), blend="gaussian", batch_size=3)
    assert isinstance(out, torch.Tensor) and out.device.type == exact_cuda.type and out.dtype == torch.float32
    assert set(seen) == {exact_cuda.type}
    cpu_net = _conv(1, 3)
    expected = chunkflow.sliding_window(image, lambda b: cpu_net(torch.from_numpy(b)).detach().numpy(), (6, 16, 16),
                                        output_patch=(4, 12, 12), overlap=(1, 4, 4), blend="gaussian", batch_size=3)
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=0, atol=1e-5)
