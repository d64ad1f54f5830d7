"""The model is pinned by the manifest's checksum: a model or weights file replaced after planning is
refused by every engine before the first patch (nothing written), and a worker loads the very bytes
it verified (issue 14)."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from chunkflow.backends import ModelChanged, load_backend, model_checksum
from chunkflow.backends.pin import pinned, read_verified
from chunkflow.engines import LocalEngine, run_job
from chunkflow.engines.queue import open_queue, produce
from chunkflow.engines import make_engine
from chunkflow.engines.task import _BACKENDS, _CACHES, worker_resources
from chunkflow.planning import plan
from chunkflow.storage import open_store
from tests.helpers import CONV3, make_input
from tests.test_engines_support import FLAGS, PY, ROOT, SCRIPTS, SHAPE, fleet_env

DEMO = ROOT / "chunkflow" / "demo"
REFUSED = "changed since the job was planned"
WHAT_TO_DO = "re-plan the job, or put the planned file back"


def _other_net(path: Path) -> None:
    """Replace the conv3 network file by another network of the same shape (another seed)."""
    path.write_text(Path(CONV3).read_text().replace("manual_seed(1234)", "manual_seed(4321)"))


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = load_backend(CONV3).module
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.save(net.state_dict(), path)
    return path


def _torchscript(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(torch.nn.Conv3d(1, 2, 3, padding=1)).save(str(path))
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _batch() -> np.ndarray:
    return np.random.default_rng(0).random((1, 1, 10, 12, 12), dtype=np.float32)


# ---- the backends: verified before the load, loaded from the verified bytes ----------------------

@pytest.mark.parametrize("kind", ["python", "weights", "torchscript", "onnx"])
def test_a_file_replaced_after_the_checksum_is_refused_in_one_line(tmp_path, kind):
    net = tmp_path / "net.py"
    shutil.copy(CONV3, net)
    weights = None
    if kind == "python":
        model, replace = str(net), lambda: _other_net(net)
    elif kind == "weights":
        model, weights = str(net), str(_weights(tmp_path / "w.pt", 1))
        replace = lambda: _weights(tmp_path / "w.pt", 2)  # noqa: E731
    elif kind == "torchscript":
        model = str(_torchscript(tmp_path / "net.pt", 1))
        replace = lambda: _torchscript(tmp_path / "net.pt", 2)  # noqa: E731
    else:
        model = str(tmp_path / "net.onnx")
        shutil.copy(DEMO / "membrane_unet.onnx", model)
        replace = lambda: Path(model).write_bytes(Path(model).read_bytes() + b"\0")  # noqa: E731
    planned = model_checksum(model, weights)
    load_backend(model, weights, checksum=planned)  # unchanged: loads
    replace()
    found = model_checksum(model, weights)
    with pytest.raises(ModelChanged) as refused:
        load_backend(model, weights, checksum=planned)
    line = str(refused.value)
    assert "\n" not in line and REFUSED in line and WHAT_TO_DO in line
    assert planned[:12] in line and found[:12] in line
    assert repr(weights if kind == "weights" else model) in line


def test_identity_and_builtin_verify_too():
    load_backend("identity:2", checksum=model_checksum("identity:2"))
    with pytest.raises(ModelChanged):
        load_backend("identity:2", checksum=model_checksum("identity:3"))
    load_backend("builtin:membrane", checksum=model_checksum("builtin:membrane"))


def test_the_model_is_loaded_from_the_bytes_that_were_verified(tmp_path):
    net = tmp_path / "net.py"
    shutil.copy(CONV3, net)
    planned_output = load_backend(str(net)).predict(_batch())
    files = read_verified(str(net), None, model_checksum(str(net)))
    _other_net(net)  # replaced between the check and the load
    assert not np.allclose(load_backend(str(net)).predict(_batch()), planned_output)
    with pinned(files):
        np.testing.assert_array_equal(load_backend(str(net)).predict(_batch()), planned_output)


# ---- a planned job: every engine refuses a replaced file, writing nothing ------------------------

def _job(tmp_path: Path, name: str = "a", weights: bool = False):
    """A conv3 job whose model (and weights) are files of its own in ``tmp_path``."""
    net = tmp_path / "net.py"
    if not net.exists():
        shutil.copy(CONV3, net)
    w = str(_weights(tmp_path / "w.pt", 1)) if weights else None
    url, _ = make_input(tmp_path / f"in-{name}", SHAPE, seed=1, chunk=(8, 16, 16))
    return plan(url, f"file://{tmp_path / f'out-{name}'}", str(tmp_path / f"job-{name}"), str(net), weights=w,
                storage_chunk="8,16,16", **FLAGS["conv3"])


def _nothing_written(tmp_path: Path, before: dict[str, bytes], name: str = "a") -> None:
    after = _files(tmp_path / f"out-{name}")
    assert after == before, "the output changed"
    store = open_store(str(tmp_path / f"job-{name}"))
    assert not list(store.list("donations/")) and not list(store.list("done/"))


def test_worker_model_cache_verifies_the_file_again_for_a_new_job(tmp_path):
    """A long-lived worker keeps one model loaded across jobs; a new job with the same model path
    verifies the file again instead of reusing the cache blindly."""
    first, second = _job(tmp_path, "a"), _job(tmp_path, "b")
    assert first.model_checksum == second.model_checksum and first.job_hash != second.job_hash
    with _CACHES:
        _BACKENDS.clear()
    try:
        loaded = worker_resources(first).backend
        assert worker_resources(first).backend is loaded  # cached for its job
        _other_net(tmp_path / "net.py")
        with pytest.raises(ModelChanged, match=REFUSED):
            _ = worker_resources(second).backend
        assert worker_resources(first).backend is loaded  # the verified, loaded network stays the planned one
    finally:
        with _CACHES:
            _BACKENDS.clear()


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_engines_refuse_every_block_of_a_replaced_model(tmp_path, engine):
    job = _job(tmp_path)
    before = _files(tmp_path / "out-a")
    _other_net(tmp_path / "net.py")
    running = LocalEngine() if engine == "local" else make_engine("dask", workers=1)
    try:
        summary = run_job(job, running, progress=False, check=False)
    finally:
        if engine != "local":
            running.close()
    assert summary.exit_status == 2 and summary.stage2_held
    lines = summary.failure_lines()
    assert all(REFUSED in line and WHAT_TO_DO in line for line in lines[:-1]), lines
    assert len(summary.failures) == job.layout.num_blocks
    _nothing_written(tmp_path, before)
    assert len(list(open_store(job.store).list("failed/stage1/"))) == job.layout.num_blocks  # saying why


def _stderr_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow  # the stage script in a subprocess
@pytest.mark.parametrize("replaced", ["model", "weights"])
def test_stage_one_run_command_refuses_before_any_block(tmp_path, replaced):
    job = _job(tmp_path, weights=True)
    before = _files(tmp_path / "out-a")
    if replaced == "model":
        _other_net(tmp_path / "net.py")
    else:
        _weights(tmp_path / "w.pt", 2)
    proc = subprocess.run([PY, SCRIPTS[1], "run", job.store, "--blocks", "all", "--quiet"], env=fleet_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = _stderr_line(proc)
    assert REFUSED in line and WHAT_TO_DO in line and job.model_checksum[:12] in line
    assert repr(job.weights if replaced == "weights" else job.model) in line
    _nothing_written(tmp_path, before)
    assert not list(open_store(job.store).list("failed/")) and not list(open_store(job.store).list("running/"))


@pytest.mark.integration  # a queue worker process
def test_stage_one_queue_worker_refuses_and_hands_the_task_back(tmp_path):
    job = _job(tmp_path)
    queue = f"fq://{tmp_path / 'q'}"
    produce(job, queue)
    before = _files(tmp_path / "out-a")
    _other_net(tmp_path / "net.py")
    proc = subprocess.run([PY, SCRIPTS[1], "worker", queue, "--lease", "5", "--poll", "0.2", "--quiet"],
                          env=fleet_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = _stderr_line(proc)
    assert REFUSED in line and WHAT_TO_DO in line and job.model_checksum[:12] in line
    _nothing_written(tmp_path, before)
    assert open_queue(queue).enqueued == job.layout.num_blocks and open_queue(queue).leased == 0
    failed = list(open_store(job.store).list("failed/stage1/"))
    assert failed and all(REFUSED in open_store(job.store).get(name).decode() for name in failed)


@pytest.mark.slow  # `chunkflow run` in a subprocess
@pytest.mark.parametrize("engine", ["local", "dask"])
def test_chunkflow_run_refuses_to_rerun_a_job_whose_model_changed(tmp_path, engine):
    """`chunkflow run` re-plans: the replaced file's checksum is not the manifest's, so it is refused,
    naming the file and what to do, not only "another job"."""
    job = _job(tmp_path)
    before = _files(tmp_path / "out-a")
    _other_net(tmp_path / "net.py")
    flags = ["--input", job.input, "--output", job.output, "--donations", job.store, "--model", job.model]
    flags += [x for name, value in FLAGS["conv3"].items() for x in (f"--{name.replace('_', '-')}", value)]
    if engine == "dask":
        flags += ["--engine", "dask", "--workers", "1"]
    proc = subprocess.run([PY, "-m", "chunkflow", "run", *flags, "--quiet"], env=fleet_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    line = _stderr_line(proc)
    assert REFUSED in line and "net.py" in line and job.model_checksum[:12] in line
    _nothing_written(tmp_path, before)


def test_checksum_of_a_file_is_its_sha256(tmp_path):
    net = tmp_path / "net.py"
    shutil.copy(CONV3, net)
    assert model_checksum(str(net)) == hashlib.sha256(net.read_bytes()).hexdigest()
