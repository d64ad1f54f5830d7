"""Backends: real models through real engines (PyTorch, TorchScript, ONNX Runtime), no mocks."""
from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from chunkflow.backends import Backend, ModelError, load_backend, model_checksum, resolve_backend_name

MODELS = Path(__file__).resolve().parent / "models"
CONV3 = str(MODELS / "conv3.py")
CONV3_SAME = str(MODELS / "conv3_same.py")
DEMO = Path(__file__).resolve().parents[1] / "chunkflow" / "demo"


def _batch(n: int = 2, c: int = 1, shape: tuple[int, int, int] = (8, 32, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, c, *shape), dtype=np.float32)


@pytest.fixture(scope="module")
def membrane() -> Backend:
    return load_backend("builtin:membrane")


# ---------------------------------------------------------------- identity

def test_identity_returns_input_and_a_copy() -> None:
    be = load_backend("identity")
    assert be.name == "identity" and be.device == "cpu"
    x = _batch(c=2)
    y = be.predict(x)
    assert y.dtype == np.float32 and np.array_equal(x, y)
    assert not np.shares_memory(x, y)
    assert be.output_shape((4, 5, 6), in_channels=2) == (2, (4, 5, 6))


def test_identity_with_channels_copies_channel_zero() -> None:
    be = load_backend("identity:3")
    x = _batch(c=2)
    y = be.predict(x)
    assert y.shape == (2, 3, 8, 32, 32)
    for c in range(3):
        assert np.array_equal(y[:, c], x[:, 0])
    assert be.output_shape((4, 5, 6)) == (3, (4, 5, 6))


# ---------------------------------------------------------------- pytorch

def test_builtin_membrane_shapes_and_range(membrane: Backend) -> None:
    assert membrane.name == "pytorch"
    y = membrane.predict(_batch(n=2, shape=(8, 48, 40)))
    assert y.shape == (2, 1, 8, 48, 40) and y.dtype == np.float32
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert membrane.output_shape((16, 64, 64)) == (1, (16, 64, 64))
    assert membrane.output_shape((5, 37, 50)) == (1, (5, 37, 50))  # any size, no hidden padding


def test_valid_conv_py_model_shrinks_output() -> None:
    be = load_backend(CONV3)
    assert be.output_shape((20, 40, 40)) == (3, (14, 34, 34))
    y = be.predict(_batch(n=3, shape=(10, 12, 14)))
    assert y.shape == (3, 3, 4, 6, 8) and y.dtype == np.float32
    # fixed init: two loads agree exactly
    assert np.array_equal(y, load_backend(CONV3).predict(_batch(n=3, shape=(10, 12, 14))))
    assert load_backend(CONV3_SAME).output_shape((6, 7, 8)) == (3, (6, 7, 8))


def test_py_model_with_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(99)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 4, 3), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 3, 3), torch.nn.Sigmoid(),
    ).eval()
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    be = load_backend(CONV3, weights=str(weights))
    x = _batch(shape=(9, 9, 9))
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(be.predict(x), expected, rtol=0, atol=1e-6)
    assert not np.allclose(load_backend(CONV3).predict(x), expected)  # the weights really were used


def test_torchscript_round_trip_equals_eager(tmp_path: Path, membrane: Backend) -> None:
    from chunkflow.backends.pytorch import TorchBackend

    assert isinstance(membrane, TorchBackend)
    scripted = torch.jit.script(membrane.module)
    path = tmp_path / "membrane_scripted.pt"
    scripted.save(str(path))
    ts = load_backend(str(path))
    assert ts.name == "torchscript"
    x = _batch(n=2, shape=(6, 40, 36), seed=3)
    np.testing.assert_allclose(ts.predict(x), membrane.predict(x), rtol=0, atol=1e-6)


def test_bfloat16_autocast_on_cpu_returns_float32() -> None:
    be = load_backend(CONV3_SAME, precision="bfloat16")
    x = _batch(shape=(6, 16, 16))
    y = be.predict(x)
    assert y.dtype == np.float32 and y.shape == (2, 3, 6, 16, 16)
    np.testing.assert_allclose(y, load_backend(CONV3_SAME).predict(x), atol=2e-2)


# ---------------------------------------------------------------- onnx

def test_onnx_equals_pytorch_on_demo_net(membrane: Backend) -> None:
    be = load_backend(str(DEMO / "membrane_unet.onnx"))
    assert be.name == "onnx"
    for shape in [(16, 64, 64), (5, 37, 50)]:
        x = _batch(n=2, shape=shape, seed=7)
        y = be.predict(x)
        assert y.shape == (2, 1, *shape) and y.dtype == np.float32
        np.testing.assert_allclose(y, membrane.predict(x), rtol=0, atol=1e-4)
    assert be.output_shape((8, 32, 32)) == (1, (8, 32, 32))


# ---------------------------------------------------------------- registry and plugins

def test_resolve_backend_name() -> None:
    assert resolve_backend_name("identity:4") == "identity"
    assert resolve_backend_name("builtin:membrane") == "builtin"
    assert resolve_backend_name("/a/b/net.py") == "pytorch"
    assert resolve_backend_name("net.jit") == "torchscript"
    assert resolve_backend_name("onnx:/x/model.bin") == "onnx"
    assert resolve_backend_name("pznet:/models/net") == "pznet"


def test_entry_point_plugin_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real installed-distribution layout on sys.path, discovered by importlib.metadata."""
    (tmp_path / "cf_test_plugin.py").write_text(textwrap.dedent("""
        from chunkflow.backends.identity import IdentityBackend

        class Doubler(IdentityBackend):
            name = "doubler"
            def predict(self, batch):
                return 2 * super().predict(batch)

        def make(model, weights, device, precision):
            return Doubler(None, device, precision)
    """))
    dist = tmp_path / "cf_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cf-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[chunkflow.backends]\ndoubler = cf_test_plugin:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    be = load_backend("doubler:anything")
    assert be.name == "doubler"
    x = _batch()
    assert np.array_equal(be.predict(x), 2 * x)
    # a plugin taking a file with a suffix a built-in backend also knows (a TensorRT adapter and an .onnx)
    net = tmp_path / "net.onnx"
    net.write_bytes(b"not really onnx")
    assert load_backend(f"doubler:{net}").name == "doubler"
    assert model_checksum(f"doubler:{net}", None) == hashlib.sha256(net.read_bytes()).hexdigest()


# ---------------------------------------------------------------- checksums

def test_model_checksum(tmp_path: Path) -> None:
    raw = Path(CONV3).read_bytes()
    assert model_checksum(CONV3, None) == hashlib.sha256(raw).hexdigest()
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights")
    with_w = model_checksum(CONV3, str(w))
    assert len(with_w) == 64 and with_w != model_checksum(CONV3, None)
    assert model_checksum("identity", None) == model_checksum("identity", None) != model_checksum("identity:3", None)
    builtin = model_checksum("builtin:membrane", None)
    assert len(builtin) == 64 and builtin == model_checksum("builtin:membrane", None)
    with pytest.raises(ModelError, match="nope.py"):
        model_checksum(str(tmp_path / "nope.py"), None)
    assert model_checksum(f"pytorch:{CONV3}", None) == hashlib.sha256(raw).hexdigest()  # the file, not the string


# ---------------------------------------------------------------- errors: one line naming the value

def _state_dict_file(tmp_path: Path) -> str:
    path = tmp_path / "state.pt"
    torch.save(torch.nn.Conv3d(1, 1, 1).state_dict(), path)
    return str(path)


def _no_build_model(tmp_path: Path) -> str:
    path = tmp_path / "nobuild.py"
    path.write_text("import torch\nNET = torch.nn.Identity()\n")
    return str(path)


ERROR_CASES = [
    (lambda t: dict(model=str(t / "missing.py")), "missing.py"),
    (lambda t: dict(model=str(t / "missing.onnx")), "missing.onnx"),
    (lambda t: dict(model=str(t / "missing.pt")), "missing.pt"),
    (lambda t: dict(model=CONV3, weights=str(t / "missing_w.pt")), "missing_w.pt"),
    (lambda t: dict(model="no-such-backend"), "no-such-backend"),
    (lambda t: dict(model="builtin:nope"), "builtin:nope"),
    (lambda t: dict(model="identity:0"), "identity:0"),
    (lambda t: dict(model="identity", device="gpu"), "gpu"),
    (lambda t: dict(model="identity", device="cpu:1"), "cpu:1"),
    (lambda t: dict(model=CONV3, precision="float64"), "float64"),
    (lambda t: dict(model=CONV3, precision="float16"), "float16"),
    (lambda t: dict(model=str(DEMO / "membrane_unet.onnx"), precision="bfloat16"), "bfloat16"),
    (lambda t: dict(model=str(DEMO / "membrane_unet.onnx"), weights=CONV3), "conv3.py"),
    (lambda t: dict(model=_state_dict_file(t)), "state dict"),
    (lambda t: dict(model=_no_build_model(t)), "build_model"),
    (lambda t: dict(model=CONV3, weights=str(DEMO / "membrane_unet.pt")), "membrane_unet.pt"),
]


@pytest.mark.parametrize("case,needle", ERROR_CASES, ids=[n for _, n in ERROR_CASES])
def test_model_errors_are_one_line(case, needle: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError) as info:
        load_backend(**case(tmp_path))
    message = str(info.value)
    assert "\n" not in message and needle in message, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("model", ["builtin:membrane", CONV3, str(DEMO / "membrane_unet.onnx")])
def test_cuda_without_cuda_says_use_cpu(model: str) -> None:
    with pytest.raises(ModelError) as info:
        load_backend(model, device="cuda")
    assert "CUDA is not available on this machine; use --device cpu" in str(info.value)
    assert "\n" not in str(info.value)


def test_output_shape_of_too_small_patch_is_a_model_error() -> None:
    with pytest.raises(ModelError) as info:
        load_backend(CONV3).output_shape((4, 4, 4))
    assert "(4, 4, 4)" in str(info.value) and "\n" not in str(info.value)


def test_predict_rejects_wrong_rank() -> None:
    with pytest.raises(ModelError, match="shape"):
        load_backend("identity").predict(np.zeros((1, 8, 8, 8), np.float32))
