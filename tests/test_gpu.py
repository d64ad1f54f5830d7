"""The CUDA paths, bit-compared with the CPU path (every test is marked ``gpu``).

Skipped where ``torch.cuda.is_available()`` is false (tests/conftest.py). ``benchmarks/gpu_check.py``
runs them on a GPU machine; ``CHUNKFLOW_GPU_TEST_DEVICE=cpu`` (``gpu_check.py --device cpu``) runs
the same code on the CPU, a dry run that catches bugs in the tests before a GPU is at hand.

Tolerances: float32 on the GPU equals float32 on the CPU within the README's 1e-5 (the float32
rounding of the same sum in another order; the networks here differ from float64 by up to 3e-6 on
the CPU). That needs full float32 convolutions: cuDNN's default, TF32, rounds products to a
10-bit mantissa (~1e-3), so a failing float32 comparison reports the difference with TF32 off too.
Reduced precision is compared with float32 on the CPU within ``REDUCED`` (max, mean |difference|):
bfloat16 measured on the CPU against float32 gave max 0.051 / mean 0.003 on these nets, float16
has 3 more mantissa bits. A stage-one run and the whole-volume reference on the same device, at
the same precision and batch size 1, compute each patch alone in both, so they agree within 1e-5
whatever the precision.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import chunkflow
from chunkflow.backends import load_backend
from chunkflow.storage import open_volume
from tests.helpers import CONV3, CONV3_SAME, make_input

#: volumes in precomputed, or zarr on a GPU machine that carries only what these tests need (no CloudVolume)
FORMAT = os.environ.get("CHUNKFLOW_BENCH_FORMAT") or ("precomputed" if importlib.util.find_spec("cloudvolume") else "zarr")

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("CHUNKFLOW_GPU_TEST_DEVICE", "cuda")
BENCH_NET = str(ROOT / "benchmarks" / "bench_unet.py")
ONNX = str(ROOT / "chunkflow" / "demo" / "membrane_unet.onnx")
TOL = 1e-5
#: precision -> (max, mean) |difference| allowed against float32 on the CPU
REDUCED = {"bfloat16": (0.1, 1e-2), "float16": (2e-2, 2e-3)}
MODELS = [CONV3_SAME, "builtin:membrane", BENCH_NET]


@contextlib.contextmanager
def no_tf32():
    """Full float32 convolutions and matmuls on CUDA while inside (restored afterwards)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def assert_fp32_close(compute, what: str) -> None:
    """``compute()`` returns ``(got, expected)``; they must agree within ``TOL``. On a miss the message
    also gives the difference with TF32 off, which tells TF32 rounding from a real error."""
    got, expected = compute()
    diff = float(np.abs(np.asarray(got) - np.asarray(expected)).max())
    if diff <= TOL:
        return
    note = ""
    if DEVICE.startswith("cuda"):
        with no_tf32():
            again, ref = compute()
        note = (f"; with TF32 off {float(np.abs(np.asarray(again) - np.asarray(ref)).max()):.2e} (cudnn.allow_tf32 "
                f"was {torch.backends.cudnn.allow_tf32}: float32 on CUDA should run full-precision convolutions)")
    pytest.fail(f"{what}: max |{DEVICE} - cpu| = {diff:.2e} > {TOL:g}{note}")


def batches(count: int, size: int = 2, patch=(16, 64, 64), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((size, 1, *patch), dtype=np.float32) for _ in range(count)]


def needs(precision: str) -> None:
    if precision == "float16" and not DEVICE.startswith("cuda"):
        pytest.skip("float16 runs on CUDA only")
    if precision == "bfloat16" and DEVICE.startswith("cuda") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")


# ---------------------------------------------------------------- the PyTorch backend

@pytest.mark.parametrize("model", MODELS)
def test_backend_float32_on_the_device_equals_cpu(model):
    """Pinned upload, ``non_blocking`` copies both ways; each output is the caller's own."""
    cpu, dev = load_backend(model), load_backend(model, device=DEVICE)
    assert dev.device == DEVICE
    xs = batches(3)
    expected = [cpu.predict(x) for x in xs]
    got = [dev.predict(x) for x in xs]  # kept across calls: no output may alias a later one's buffer
    for g in got:
        assert g.dtype == np.float32 and g.flags.c_contiguous
    assert_fp32_close(lambda: (np.stack([dev.predict(x) for x in xs]), np.stack(expected)), f"{model} predict")
    assert_fp32_close(lambda: (np.stack(got), np.stack(expected)), f"{model} predict, outputs kept")
    assert np.array_equal(xs[0], batches(3)[0])  # the input batch is left as it was


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("model", MODELS)
def test_backend_reduced_precision_is_close_to_cpu_float32(model, precision):
    """Autocast on the device, float32 out."""
    needs(precision)
    cpu, dev = load_backend(model), load_backend(model, device=DEVICE, precision=precision)
    x = batches(1, size=3)[0]
    out = dev.predict(x)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    diff = np.abs(out - cpu.predict(x))
    top, mean = REDUCED[precision]
    assert diff.max() <= top and diff.mean() <= mean, f"{precision}: max {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("model", [CONV3_SAME, BENCH_NET])
def test_submit_keeps_two_batches_in_flight_with_the_right_outputs(model):
    """The double-buffered ``submit``: two batches in flight, each input overwritten as soon as
    submit returns (allowed by the contract), each output read before the second-next submit, a
    smaller last batch (a staging buffer of another shape)."""
    cpu, dev = load_backend(model), load_backend(model, device=DEVICE)
    xs = batches(5, patch=(8, 64, 64)) + batches(1, size=1, patch=(8, 64, 64), seed=1)
    expected = [cpu.predict(x) for x in xs]

    def pipelined() -> tuple[np.ndarray, np.ndarray]:
        buffer = np.empty_like(xs[0])
        pending, got = [], []
        for x in xs:
            staged = buffer[: len(x)]
            staged[...] = x
            pending.append(dev.submit(staged))
            staged[...] = -1.0  # the backend must have copied it already
            if len(pending) == 2:
                got.append(pending.pop(0)().copy())
        got.extend(wait().copy() for wait in pending)
        return np.concatenate(got), np.concatenate(expected)

    assert_fp32_close(pipelined, f"{model} submit")
    first, second = dev.submit(xs[0]), dev.submit(xs[1])
    out0, out1 = first(), second()  # both in flight before either is waited for; valid until a third submit
    assert_fp32_close(lambda: (np.stack([out0, out1]), np.stack(expected[:2])), f"{model} submit, two in flight")


# ---------------------------------------------------------------- in memory, against MONAI

def _net(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 2, 3, padding=1), torch.nn.Sigmoid()).eval()


@pytest.mark.parametrize("blend,batch", [("gaussian", 1), ("gaussian", 4), ("constant", 3)])
def test_sliding_window_on_a_device_tensor_equals_monai_on_it(blend, batch):
    """Both tools get the same tensor on the device and the same network there."""
    inferers = pytest.importorskip("monai.inferers")
    patch, overlap = (16, 64, 64), (4, 16, 16)
    image = torch.from_numpy(np.random.default_rng(3).random((1, 40, 150, 130), dtype=np.float32)).to(DEVICE)
    net = _net().to(DEVICE)
    out = chunkflow.sliding_window(image, net, patch, overlap=overlap, blend=blend, batch_size=batch)
    assert out.device == image.device and out.dtype == torch.float32 and tuple(out.shape) == (2, 40, 150, 130)
    with torch.no_grad():
        expected = inferers.sliding_window_inference(image[None], roi_size=patch, sw_batch_size=batch, predictor=net,
                                                     overlap=[(v - 0.5) / p for v, p in zip(overlap, patch)],
                                                     mode=blend, sigma_scale=0.125)[0]
    assert expected.device == image.device
    diff = float((out - expected).abs().max())
    assert diff <= TOL, f"max |chunkflow - MONAI| on {DEVICE} = {diff:.2e}"

    host = chunkflow.sliding_window(image.cpu().numpy(), _numpy(_net()), patch, overlap=overlap, blend=blend,
                                    batch_size=batch)
    assert_fp32_close(lambda: (chunkflow.sliding_window(image, net, patch, overlap=overlap, blend=blend,
                                                        batch_size=batch).cpu().numpy(), host),
                      "sliding_window on the device vs numpy on the host")


def _numpy(net):
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()
    return predict


def test_sliding_window_uint8_device_tensor_with_context_margin():
    """Integer input scaled on the way, valid convolutions, reflect padding at the faces: the device
    tensor's result equals the host array's."""
    backend_cpu = load_backend(CONV3)
    data = (np.random.default_rng(5).random((22, 60, 60)) * 255).astype(np.uint8)
    data[:, :20] = 0  # blank patches are skipped on both
    host = chunkflow.sliding_window(data, backend_cpu.predict, (14, 26, 26), output_patch=(8, 20, 20),
                                    overlap=(2, 6, 4), batch_size=3)
    net = load_backend(CONV3, device=DEVICE).module
    tensor = torch.from_numpy(data).to(DEVICE)
    assert_fp32_close(lambda: (chunkflow.sliding_window(tensor, net, (14, 26, 26), output_patch=(8, 20, 20),
                                                        overlap=(2, 6, 4), batch_size=3).cpu().numpy(), host),
                      "uint8 tensor with a context margin")


# ---------------------------------------------------------------- two stages on volumes

def _job(tmp_path: Path, model: str = CONV3_SAME, batch: int = 2, precision: str = "float32", name: str = "job",
         device: str = "cpu", **geometry):
    url, _ = make_input(tmp_path / f"{name}-in", geometry.pop("shape", (24, 80, 72)), dtype="uint8", seed=4,
                        fmt=FORMAT)
    options = dict(input_patch=(8, 32, 32), overlap=(2, 8, 8), block=(8, 40, 40), blend="gaussian")
    options.update(geometry)
    output = f"file://{tmp_path / f'{name}-out'}" if FORMAT == "precomputed" else f"{tmp_path / f'{name}-out'}.zarr"
    return chunkflow.plan(url, output, tmp_path / name, model, batch_size=batch,
                          precision=precision, device=device, **options)


def _written(job) -> np.ndarray:
    return open_volume(job.output).read(job.layout.bbox)


@pytest.mark.parametrize("mode", ["barrier", "streaming"])
@pytest.mark.parametrize("model,geometry", [
    (CONV3_SAME, {}),
    (CONV3, {"input_patch": (14, 38, 38), "output_patch": (8, 32, 32)}),  # a context margin
    ("builtin:membrane", {"input_patch": (8, 64, 64), "overlap": (2, 16, 16), "block": (16, 64, 64)}),
])
def test_two_stage_run_on_the_device_equals_the_cpu_reference(tmp_path, mode, model, geometry):
    job = _job(tmp_path, model, **geometry)
    expected = chunkflow.reference(job)  # the job's device: cpu
    summary = chunkflow.run(job, mode=mode, device=DEVICE)
    assert not summary.failures and summary.stage1.stats.patches == job.layout.num_patches
    assert_fp32_close(lambda: (_written(job), expected), f"{model} two stages ({mode})")
    same_device = chunkflow.reference(job, device=DEVICE)
    diff = float(np.abs(_written(job) - same_device).max())
    assert diff <= TOL, f"two stages vs the reference, both on {DEVICE}: {diff:.2e} (Invariant 1)"


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_two_stage_run_in_reduced_precision(tmp_path, precision):
    """Invariant 1 on the device at batch size 1 (each patch computed alone in both runs), and
    close to float32 on the CPU."""
    needs(precision)
    job = _job(tmp_path, "builtin:membrane", batch=1, precision=precision, device=DEVICE, input_patch=(8, 64, 64),
               overlap=(2, 16, 16), block=(16, 64, 64))
    chunkflow.run(job)
    out = _written(job)
    same = chunkflow.reference(job)
    assert float(np.abs(out - same).max()) <= TOL
    float32_cpu = chunkflow.reference(_job(tmp_path, "builtin:membrane", batch=1, name="f32", input_patch=(8, 64, 64),
                                           overlap=(2, 16, 16), block=(16, 64, 64)))
    diff = np.abs(out - float32_cpu)
    top, mean = REDUCED[precision]
    assert diff.max() <= top and diff.mean() <= mean, f"{precision}: max {diff.max():.3g}, mean {diff.mean():.3g}"


def test_onnx_cuda_provider_equals_cpu(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if DEVICE.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    dev = load_backend(ONNX, device=DEVICE)
    if DEVICE.startswith("cuda"):
        assert dev.session.get_providers()[0] == "CUDAExecutionProvider"
    cpu = load_backend(ONNX)
    xs = batches(2, size=2, patch=(8, 64, 64))
    np.testing.assert_allclose(np.stack([dev.predict(x) for x in xs]), np.stack([cpu.predict(x) for x in xs]),
                               rtol=0, atol=TOL, err_msg="onnx on the device vs onnx on the CPU (TF32 on the "
                               "CUDA provider would explain ~1e-3: its use_tf32 option)")
    job = _job(tmp_path, ONNX, input_patch=(8, 64, 64), overlap=(2, 16, 16), block=(16, 64, 64))
    chunkflow.run(job, device=DEVICE)
    np.testing.assert_allclose(_written(job), chunkflow.reference(job), rtol=0, atol=TOL)


def test_dask_local_cluster_runs_a_cuda_job_one_worker_per_gpu(tmp_path):
    """A job planned for the device on a Dask LocalCluster: one worker per visible GPU, each pinned
    to its own (``CUDA_VISIBLE_DEVICES``), stage one asking for the ``GPU`` resource."""
    pytest.importorskip("distributed")
    job = _job(tmp_path, CONV3_SAME, device=DEVICE)
    workers = None if DEVICE.startswith("cuda") else 1
    summary = chunkflow.run(job, engine="dask", mode="streaming", workers=workers)
    assert summary.engine == "dask" and not summary.failures
    assert summary.stage1.stats.patches == job.layout.num_patches
    assert_fp32_close(lambda: (_written(job), chunkflow.reference(job, device="cpu")), "dask on the device")
