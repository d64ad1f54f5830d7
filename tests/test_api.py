"""The library front door (chunkflow/api.py, chunkflow/in_memory.py, docs/api.md).

``chunkflow.sliding_window`` equals MONAI's ``sliding_window_inference`` (hypothesis, over
shapes, patches, overlaps, blends and batch sizes), a two-stage ``chunkflow.run`` of the same
array written to a volume, and chunkflow's ``reference`` with a context margin; torch in gives
torch out on the same device; refusals are one line; every ``python`` block of docs/api.md runs.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chunkflow
from chunkflow.backends import load_backend
from chunkflow.bbox import Bbox
from tests.helpers import CONV3, CONV3_SAME, examples, make_input

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent
#: the CPU, and the GPU as a ``gpu`` test (skipped without CUDA; CHUNKFLOW_GPU_TEST_DEVICE=cpu dry-runs it, conftest.py)
DEVICES = ["cpu", pytest.param(os.environ.get("CHUNKFLOW_GPU_TEST_DEVICE", "cuda"), marks=pytest.mark.gpu, id="gpu")]


def _net(channels_in: int = 1, channels_out: int = 2, seed: int = 0):
    gen = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv3d(channels_in, channels_out, 3, padding=1), torch.nn.Sigmoid()).eval()
    finally:
        torch.random.set_rng_state(gen)


def _numpy(net):
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()
    return predict


def _monai(image: np.ndarray, net, patch, overlap, blend: str, batch_size: int) -> np.ndarray:
    inferers = pytest.importorskip("monai.inferers")
    fractions = [(v - 0.5) / p if v else 0.0 for v, p in zip(overlap, patch)]
    with torch.no_grad():
        return inferers.sliding_window_inference(torch.from_numpy(image[None]), roi_size=tuple(patch),
                                                 sw_batch_size=batch_size, predictor=net, overlap=fractions,
                                                 mode=blend, sigma_scale=0.125)[0].numpy()


@st.composite
def _cases(draw):
    axes = []
    for top in (8, 14, 14):
        patch = draw(st.integers(1, top))
        axes.append((patch + draw(st.integers(0, 10)), patch, draw(st.integers(0, patch - 1))))
    shape, patch, overlap = zip(*axes)
    return (shape, patch, overlap, draw(st.sampled_from(["constant", "gaussian"])), draw(st.integers(1, 4)),
            draw(st.integers(1, 2)), draw(st.booleans()), draw(st.integers(0, 2 ** 16)))


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_equals_monai_sliding_window_inference(case):
    shape, patch, overlap, blend, batch_size, channels, as_tensor, seed = case
    image = np.random.default_rng(seed).random((channels,) + shape, dtype=np.float32)
    net = _net(channels)
    expected = _monai(image, net, patch, overlap, blend, batch_size)
    if as_tensor:
        out = chunkflow.sliding_window(torch.from_numpy(image), net, patch, overlap=overlap, blend=blend,
                                       batch_size=batch_size).numpy()
    else:
        out = chunkflow.sliding_window(image, _numpy(net), patch, overlap=overlap, blend=blend, batch_size=batch_size)
    assert out.shape == expected.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["barrier", "streaming"])
def test_equals_two_stage_run_of_the_same_array(tmp_path, mode):
    url, data = make_input(tmp_path / "in", (16, 56, 48), seed=3)
    job = chunkflow.plan(url, f"file://{tmp_path / 'out'}", tmp_path / "job", CONV3_SAME, (8, 24, 24),
                         overlap=(2, 6, 6), block=(8, 32, 32), blend="gaussian", batch_size=2)
    summary = chunkflow.run(job, mode=mode)
    assert summary.stage1.stats.patches == job.layout.num_patches and not summary.failures
    output = chunkflow.open_job(str(tmp_path / "job")).output
    from chunkflow.storage import open_volume
    written = open_volume(output).read(job.layout.bbox)
    out = chunkflow.sliding_window(data, load_backend(CONV3_SAME).predict, (8, 24, 24), overlap=(2, 6, 6),
                                   batch_size=3)
    np.testing.assert_allclose(out, written, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, chunkflow.reference(job), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_context_margin_equals_reference(tmp_path, pad_mode):
    """Valid convs (output patch < input patch), uint8 input with a blank region, an offset volume."""
    zero = Bbox.from_shape((2, -10, 5), (12, 30, 60))
    url, data = make_input(tmp_path / "in", (22, 60, 60), dtype="uint8", offset=(2, -10, 5), chunk=(6, 20, 30),
                           zero_region=zero)
    job = chunkflow.plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), CONV3, "14,26,26",
                         output_patch="8,20,20", overlap="2,6,4", block="12,40,30", pad_mode=pad_mode)
    expected = chunkflow.reference(job)
    out = chunkflow.sliding_window(data, load_backend(CONV3).predict, (14, 26, 26), output_patch=(8, 20, 20),
                                   overlap=(2, 6, 4), batch_size=3, pad_mode=pad_mode)
    assert out.shape == expected.shape == (3, 22, 60, 60)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    chunkflow.run(job)
    from chunkflow.storage import open_volume
    np.testing.assert_allclose(out, open_volume(job.output).read(job.layout.bbox), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_in_torch_out_on_the_same_device(device):
    image = np.random.default_rng(5).random((1, 12, 40, 36), dtype=np.float32)
    net = _net().to(device)
    seen = []

    def predictor(batch):
        seen.append((type(batch), batch.device.type, batch.dtype, torch.is_grad_enabled()))
        return net(batch)

    out = chunkflow.sliding_window(torch.from_numpy(image).to(device), predictor, (6, 16, 16), overlap=(2, 4, 4),
                                   batch_size=3)
    kind = torch.device(device).type
    assert isinstance(out, torch.Tensor) and out.device.type == kind and out.dtype == torch.float32
    assert set(seen) == {(torch.Tensor, kind, torch.float32, False)}
    expected = chunkflow.sliding_window(image, _numpy(net.cpu()), (6, 16, 16), overlap=(2, 4, 4), batch_size=3)
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=0, atol=1e-5)


def test_zyx_input_is_one_channel_and_numpy_batches_stay_numpy():
    image = np.random.default_rng(6).random((10, 30, 30), dtype=np.float32)
    kinds = []

    def predict(batch):
        kinds.append(type(batch))
        return _numpy(_net())(batch)

    out = chunkflow.sliding_window(image, predict, 8, overlap=3)
    assert out.shape == (2, 10, 30, 30) and set(kinds) == {np.ndarray}
    np.testing.assert_array_equal(out, chunkflow.sliding_window(image[None], predict, (8, 8, 8), overlap="3,3,3"))
    tensor = chunkflow.sliding_window(torch.from_numpy(image), _net(), 8, overlap=3)
    assert tuple(tensor.shape) == (2, 10, 30, 30)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_each_grid_patch_goes_through_the_predictor_once(batch_size):
    image = np.random.default_rng(7).random((1, 20, 50, 40), dtype=np.float32)
    image[:, :, :20] = 0  # blank patches are skipped, as chunkflow's volumes skip them
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return batch * 2.0 + 1.0

    skipped = chunkflow.sliding_window(image, predict, (8, 16, 16), overlap=(2, 4, 4), batch_size=batch_size)
    grid = 3 * 4 * 3
    assert 0 < sum(calls) < grid and max(calls) <= batch_size
    calls.clear()
    everything = chunkflow.sliding_window(image, predict, (8, 16, 16), overlap=(2, 4, 4), batch_size=batch_size,
                                          skip_blank=False, blend="constant")
    assert sum(calls) == grid and max(calls) <= batch_size
    np.testing.assert_allclose(everything, image * 2.0 + 1.0, rtol=0, atol=1e-6)  # constant blend of an affine map
    assert np.all(skipped[:, :, :4] == 0)  # only blank patches reach there


def test_skip_blank_false_equals_monai_where_the_predictor_of_zero_is_not_zero():
    image = np.random.default_rng(8).random((1, 12, 40, 40), dtype=np.float32)
    image[:, :, 10:30] = 0
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.Sigmoid()).eval()  # sigmoid(b) != 0 at zero input
    expected = _monai(image, net, (6, 16, 16), (2, 4, 4), "gaussian", 2)
    out = chunkflow.sliding_window(image, _numpy(net), (6, 16, 16), overlap=(2, 4, 4), batch_size=2, skip_blank=False)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    assert np.abs(chunkflow.sliding_window(image, _numpy(net), (6, 16, 16), overlap=(2, 4, 4)) - expected).max() > 0.1


def test_a_predictor_returning_its_own_input_is_not_corrupted():
    image = np.random.default_rng(9).integers(0, 255, (1, 9, 20, 20), dtype=np.uint8)
    for predictor in (lambda b: b, lambda b: b[:, :, 1:-1, 1:-1, 1:-1]):
        out = chunkflow.sliding_window(image, predictor, (6, 10, 10), output_patch=(4, 8, 8), overlap=(1, 3, 3),
                                       blend="constant", batch_size=4, pad_mode="constant")
        np.testing.assert_allclose(out, image / np.float32(255), rtol=0, atol=1e-6)


def _refusals():
    image = np.ones((1, 8, 16, 16), dtype=np.float32)
    ok = dict(image=image, predictor=lambda b: b, input_patch=(4, 8, 8))

    def nan(b):
        return b * np.nan

    def calls(**kw):
        return lambda: chunkflow.sliding_window(**{**ok, **kw})

    return {
        "list image": calls(image=[[1.0]]),
        "2-D image": calls(image=np.zeros((8, 8))),
        "5-D image": calls(image=image[None]),
        "complex image": calls(image=image.astype(np.complex64)),
        "no channels": calls(image=np.zeros((0, 8, 16, 16))),
        "predictor not callable": calls(predictor="net.pt"),
        "zero patch": calls(input_patch=(0, 8, 8)),
        "two sizes": calls(input_patch=(4, 8)),
        "float patch": calls(input_patch=(4.0, 8, 8)),
        "patch larger than image": calls(input_patch=(10, 8, 8)),
        "output patch larger": calls(output_patch=(6, 8, 8)),
        "output patch off centre": calls(output_patch=(3, 8, 8)),
        "fraction overlap": calls(overlap=0.25),
        "fraction overlaps": calls(overlap=(0.25, 0.5, 0.5)),
        "overlap as large as the patch": calls(overlap=(4, 0, 0)),
        "negative overlap": calls(overlap=-1),
        "unknown blend": calls(blend="linear"),
        "unknown pad mode": calls(pad_mode="edge"),
        "batch size 0": calls(batch_size=0),
        "batch size True": calls(batch_size=True),
        "batch size float": calls(batch_size=2.0),
        "skip_blank string": calls(skip_blank="yes"),
        "predictor returns a list": calls(predictor=lambda b: [b]),
        "predictor drops the batch axis": calls(predictor=lambda b: b[0]),
        "predictor returns too few": calls(predictor=lambda b: b[:1], batch_size=3),
        "predictor returns odd sizes": calls(predictor=lambda b: b[:, :, 1:]),
        "predictor returns NaN": calls(predictor=nan),
        "torch module for a numpy image": calls(predictor=torch.nn.Identity()),
        "tensor predictor returns numpy": calls(image=torch.from_numpy(image), predictor=lambda b: b.numpy()),
    }


@pytest.mark.parametrize("case", sorted(_refusals()))
def test_sliding_window_refusals_are_one_line(case):
    with pytest.raises(chunkflow.Refusal) as info:
        _refusals()[case]()
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 300, message


def test_job_functions_refuse_in_one_line(tmp_path):
    url, _ = make_input(tmp_path / "in", (16, 64, 64), seed=2)
    job = chunkflow.plan(url, f"file://{tmp_path / 'out'}", str(tmp_path / "job"), "identity", (8, 32, 32),
                         overlap=(2, 8, 8), block=(16, 32, 32))
    cases = [
        (chunkflow.GeometryError, lambda: chunkflow.inference_and_donate(job, "0-31_0-32_0-16")),
        (chunkflow.GeometryError, lambda: chunkflow.inference_and_donate(job, "not-a-name")),
        (chunkflow.GeometryError, lambda: chunkflow.inference_and_donate(job, (0, 2, 0))),
        (chunkflow.GeometryError, lambda: chunkflow.receive_and_blend(job, (0, 0))),
        (chunkflow.GeometryError, lambda: chunkflow.receive_and_blend(job, (0.0, 0, 0))),
        (chunkflow.MissingDonations, lambda: chunkflow.receive_and_blend(job, (0, 1, 1))),
        (chunkflow.EngineError, lambda: chunkflow.run(job, engine="spark")),
        (chunkflow.EngineError, lambda: chunkflow.run(job, mode="eventually")),
        (chunkflow.EngineError, lambda: chunkflow.run(job, workers=4)),
        (chunkflow.UsageError, lambda: chunkflow.run(job, force="yes")),
        (chunkflow.UsageError, lambda: chunkflow.run(42)),
        (chunkflow.ModelError, lambda: chunkflow.reference(job, device="tpu")),
        (chunkflow.JobError, lambda: chunkflow.open_job(str(tmp_path / "nowhere"))),
        (chunkflow.JobError, lambda: chunkflow.plan(url, f"file://{tmp_path / 'o2'}", str(tmp_path / "j2"),
                                                    "identity", (8, 32, 32), blend="linear")),
    ]
    for kind, call in cases:
        with pytest.raises(kind) as info:
            call()
        assert isinstance(info.value, chunkflow.Refusal) and "\n" not in str(info.value), str(info.value)


def test_per_block_stages_keep_the_engines_markers(tmp_path):
    url, data = make_input(tmp_path / "in", (16, 64, 48), seed=4)
    job = chunkflow.plan(url, f"file://{tmp_path / 'out'}", tmp_path / "job", "identity:2", "8,32,32",
                         overlap="2,8,8", block="8,32,32", blend="bump")
    names = [job.layout.block_box(i).name for i in job.layout.block_indices()]
    for i, name in enumerate(names):  # by name, by Bbox, by index, and by store location
        block = [name, Bbox.from_name(name), tuple(job.layout.block_index_of(Bbox.from_name(name)))][i % 3]
        result = chunkflow.inference_and_donate(job if i % 2 else job.store, block)
        assert not result.skipped and result.block == name
    assert chunkflow.inference_and_donate(job, names[0]).skipped
    assert not chunkflow.inference_and_donate(job, names[0], force=True).skipped
    for name in names:
        assert not chunkflow.receive_and_blend(job, name).skipped
    store = tmp_path / "job"
    assert sorted(p.name for p in (store / "done" / "stage1").iterdir()) == sorted(names)
    assert sorted(p.name for p in (store / "done" / "stage2").iterdir()) == sorted(names)
    assert not [p for kind in ("running", "failed") for p in (store / kind).rglob("*") if p.is_file()]
    record = json.loads((store / "done" / "stage2" / names[0]).read_text())
    assert record["job"] == job.job_hash
    from chunkflow.storage import open_volume
    written = open_volume(job.output).read(job.layout.bbox)
    np.testing.assert_allclose(written, chunkflow.reference(job), rtol=0, atol=1e-5)
    identity = chunkflow.sliding_window(data, lambda b: np.repeat(b, 2, axis=1), (8, 32, 32), overlap=(2, 8, 8),
                                        blend="bump")
    np.testing.assert_allclose(written, identity, rtol=0, atol=1e-5)


def test_plan_takes_the_planners_parameters():
    from chunkflow.job_params import JobParameters
    from chunkflow.planning import plan as planning_plan

    fields = {f.name: f for f in dataclasses.fields(JobParameters)}
    for fn in (chunkflow.plan, planning_plan):
        params = inspect.signature(fn).parameters
        assert list(params) == [*fields, "device_here", "force"]
        for name, field in fields.items():
            default = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
            assert params[name].default == default, name


def test_import_is_light_and_help_explains_every_parameter():
    code = ("import sys, chunkflow; "
            "heavy = [m for m in ('torch', 'dask', 'distributed', 'cloudvolume', 'zarr') if m in sys.modules]; "
            "assert not heavy, heavy; import pydoc; print(pydoc.render_doc(chunkflow.sliding_window, renderer="
            "pydoc.plaintext)); "
            "heavy = [m for m in ('torch', 'dask', 'cloudvolume') if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for name in inspect.signature(chunkflow.sliding_window).parameters:
        assert re.search(rf"^\s+{name}: ", text, re.M), name
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in text
    for name in ("plan", "open_job", "run", "inference_and_donate", "receive_and_blend", "reference", "Job", "Bbox",
                 "Vec", "Refusal", "GeometryError", "MissingDonations"):
        assert name in chunkflow.__all__ and getattr(chunkflow, name) is not None
    for fn in (chunkflow.plan, chunkflow.run, chunkflow.inference_and_donate, chunkflow.receive_and_blend,
               chunkflow.reference):
        doc = inspect.getdoc(fn)
        for name in inspect.signature(fn).parameters:
            assert re.search(rf"^\s+{name}: ", doc, re.M), (fn.__name__, name)
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())
    with pytest.raises(AttributeError):
        chunkflow.no_such_thing  # noqa: B018


def _doc_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "api.md").read_text(), re.S | re.M)


def test_every_python_block_of_docs_api_runs(tmp_path, monkeypatch):
    blocks = _doc_blocks()
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"docs/api.md python block {i + 1} failed: {err!r}\n{block}") from err


def test_a_misspelt_argument_is_a_refusal_with_the_closest_name():
    """docs/api.md promises a Refusal for every bad argument; a misspelt keyword was a plain TypeError
    (a new user's walkthrough, 2026-11-29)."""
    with pytest.raises(chunkflow.Refusal, match=r"'overlapp' \(did you mean overlap\?\)"):
        chunkflow.plan(input="a.zarr", output="b.zarr", donations="job", model="identity", input_patch="8,8,8",
                       overlapp="2,2,2")
    with pytest.raises(chunkflow.Refusal, match="missing a required argument: 'output'"):
        chunkflow.plan(input="a.zarr")


def test_a_monai_style_overlap_fraction_is_refused_with_its_voxels():
    """The same line in the API's sliding_window and in plan (which gave none: a new user's walkthrough)."""
    image = np.zeros((1, 8, 32, 32), dtype=np.float32)
    with pytest.raises(chunkflow.Refusal, match=r"not a fraction \(MONAI's overlap 0.5,0.5,0.5 of this patch is 4,16,16\)"):
        chunkflow.sliding_window(image, lambda x: x, "8,32,32", overlap=0.5)
