"""Invariant 1 with every backend and with batching; ONNX Runtime agrees with PyTorch.

The demo U-Net ships as PyTorch weights (``builtin:membrane``) and as an ONNX graph
(``chunkflow/demo/membrane_unet.onnx``); a TorchScript file is traced from it here. Each backend
runs the two stages over several blocks and must reproduce its own whole-volume reference within
1e-5, computing every grid patch exactly once, at batch sizes 1 and 3 (PyTorch eager and identity
at batch size 1 are covered by ``tests/test_two_stages_exact.py``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chunkflow.backends import load_backend
from chunkflow.demo import make_em_volume
from chunkflow.planning import plan
from chunkflow.stage_two import receive_and_blend
from chunkflow.stages import Resources, inference_and_donate_many, reference
from chunkflow.storage import open_volume
from tests.helpers import CountingBackend, make_input

ONNX = str(Path(__file__).resolve().parents[1] / "chunkflow" / "demo" / "membrane_unet.onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory) -> str:
    torch = pytest.importorskip("torch")
    net = load_backend("builtin:membrane").module
    path = tmp_path_factory.mktemp("ts") / "membrane.ts"
    with torch.inference_mode():
        torch.jit.trace(net, torch.rand(1, 1, 8, 32, 32)).save(str(path))
    return str(path)


def test_onnx_equals_pytorch_on_the_demo_net():
    torch_be, onnx_be = load_backend("builtin:membrane"), load_backend(ONNX)
    assert onnx_be.name == "onnx" and torch_be.name == "pytorch"
    image, _ = make_em_volume((16, 96, 96), seed=3)
    x = image[None, None].astype(np.float32) / 255
    for batch in (x, np.concatenate([x[:, :, :8, :48, :40], x[:, :, 8:, 48:, 56:]]), x[:, :, :5, :37, :50]):
        a, b = torch_be.predict(batch), onnx_be.predict(batch)
        assert a.shape == b.shape and b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)


def _run(job, backend):
    res = Resources(job, backend)
    for _ in inference_and_donate_many(job, job.layout.block_indices(), res):
        pass
    for idx in job.layout.block_indices():
        receive_and_blend(job, idx, res)
    return open_volume(job.output).read(job.layout.bbox)


@pytest.mark.parametrize("backend, batch_size", [  # PyTorch and identity at batch 1: tests/test_two_stages_exact.py
    ("pytorch", 3), ("torchscript", 1), ("torchscript", 3), ("onnx", 1), ("onnx", 3), ("identity", 3)])
def test_invariant_1_with_every_backend(tmp_path, torchscript_file, backend, batch_size):
    models = {"pytorch": "builtin:membrane", "torchscript": torchscript_file, "onnx": ONNX, "identity": "identity:2"}
    model = models[backend]
    url, _ = make_input(tmp_path / "in", (12, 64, 56), dtype="uint8", seed=7, chunk=(4, 16, 8))
    job = plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), model, "6,32,32", overlap="2,8,8",
               block="8,32,32", blend="gaussian", storage_chunk="4,16,8", batch_size=batch_size)
    counter = CountingBackend(load_backend(model))
    assert counter.name == ("pytorch" if backend == "pytorch" else backend)
    output = _run(job, counter)
    assert counter.patches == job.layout.num_patches
    assert job.layout.num_blocks == 8
    expected = reference(job, Resources(job, counter.backend))
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)


def test_two_stage_onnx_equals_pytorch_reference(tmp_path):
    """The ONNX job's two-stage output against the PyTorch whole-volume reference: 1e-4."""
    url, _ = make_input(tmp_path / "in", (12, 64, 56), dtype="uint8", seed=8, chunk=(4, 16, 8))
    jobs = {name: plan(url, f"file://{tmp_path / name}", str(tmp_path / f"job_{name}"), model, "6,32,32",
                       overlap="2,8,8", block="8,32,32", storage_chunk="4,16,8", batch_size=2)
            for name, model in (("onnx", ONNX), ("pytorch", "builtin:membrane"))}
    output = _run(jobs["onnx"], load_backend(ONNX))
    expected = reference(jobs["pytorch"], Resources(jobs["pytorch"]))
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-4)
