"""The catalogue of bad inputs: each gets exactly one line on stderr naming the bad value, a
non-zero exit, no traceback, and leaves every volume and store byte for byte as it was.

The commands run in-process through the same entry points as the console scripts
(``chunkflow.cli.main`` and ``chunkflow.cli.stages.main``, which check the command line before
Fire runs anything); a few run as real subprocesses to check what a user's terminal shows.
docs/reliability.md lists this catalogue.
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chunkflow import cli
from chunkflow.cli import stages as cli_stages
from chunkflow.bbox import Bbox
from tests.helpers import make_input

PY = sys.executable
SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "identity", "minishard_bits": 0,
            "shard_bits": 0, "minishard_index_encoding": "raw", "data_encoding": "raw"}


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """An input volume, a planned job with its output, a plain file, a sharded output, a layer
    with an info file and no data, all under ``tmp_path``."""
    from cloudvolume import CloudVolume

    make_input(tmp_path / "em", (16, 64, 64), seed=3)
    cli.main(["plan", *base(tmp_path, output=f"file://{tmp_path / 'out'}", donations=str(tmp_path / "job")),
              "--quiet"])
    (tmp_path / "afile").write_text("not a directory\n")
    for name, dtype in (("sharded", "float32"), ("empty", "float32")):
        info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type=dtype, encoding="raw",
                                           resolution=[40, 8, 8][::-1], voxel_offset=[0, 0, 0],
                                           volume_size=[64, 64, 16], chunk_size=[32, 32, 16])
        if name == "sharded":
            info["scales"][0]["sharding"] = SHARDING
        CloudVolume(f"precomputed://file://{tmp_path / name}", info=info).commit_info()
    return tmp_path


def base(root: Path, **overrides) -> list[str]:
    flags = {"input": f"file://{root / 'em'}", "output": f"file://{root / 'new'}", "donations": str(root / "newjob"),
             "model": "identity", "input-patch": "8,32,32", "overlap": "2,8,8", "block": "16,32,32"}
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with a hash of its bytes."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# (command, extra arguments or flag overrides, text the one line must contain)
# For plan/run a dict overrides the base flags; for the other commands a list is the argv tail
# ({root} is the test's directory).
PLAN = [
    ({"output": "file://{root}/em"}, "is the input"),
    ({"output": "precomputed://file://{root}/em/"}, "is the input"),
    ({"output": "file://{root}/em/inside"}, "is the input"),
    ({"output": "file://{root}", "donations": "/tmp/elsewhere-job"}, "is the input"),
    ({"donations": "{root}/em"}, "--donations"),
    ({"donations": "{root}/afile"}, "is a file"),
    ({"donations": "{root}/afile/job"}, "is a file"),
    ({"device": "cuda"}, "CUDA is not available"),
    ({"device": "cuda:3"}, "CUDA is not available"),
    ({"device": "tpu"}, "'tpu'"),
    ({"block": "8.5,32,32"}, "'8.5,32,32'"),
    ({"block": "True,32,32"}, "'True,32,32'"),
    ({"input-patch": "8,32"}, "'8,32'"),
    ({"input-patch": "0,32,32"}, "must be positive"),
    ({"overlap": "8,8,8"}, "must be smaller than the input patch 8,32,32 (the output patch, as --output-patch is not "
                           "given) along z; give an overlap of at most 7 along z"),
    ({"overlap": "2,32,8", "output-patch": "8,32,32"}, "overlap 2,32,8 must be smaller than the output patch 8,32,32 "
                                                        "along y; give an overlap of at most 31 along y"),
    ({"output-patch": "8,31,32"}, "not centred"),
    ({"output-patch": "8,40,32"}, "larger than the input patch"),
    ({"input-patch": "8,128,32"}, "input patch 8,128,32 (the output patch, as --output-patch is not given) is larger "
                                  "than the volume 16,64,64 along y; give a patch of at most 64 along y"),
    ({"input-patch": "8,128,32", "output-patch": "8,128,32"}, "output patch 8,128,32 is larger than the volume "
                                                              "16,64,64 along y; give a patch of at most 64 along y"),
    ({"input-patch": "8,32,32", "bbox": "0-64_0-64_0-4"}, "larger than the volume 4,64,64 along z; give a patch of "
                                                          "at most 4 along z (or a larger --bbox)"),
    ({"storage-chunk": "16,32,24"}, "not a multiple of the output storage chunk"),
    ({"batch-size": "True"}, "--batch-size True"),
    ({"batch-size": "2.5"}, "--batch-size 2.5"),
    ({"batch-size": "0"}, "--batch-size 0"),
    ({"blend": "triangle"}, "'triangle'"),
    ({"dtype": "int7"}, "'int7'"),
    ({"dtype": "float16"}, "float16 is not supported by Neuroglancer precomputed"),
    ({"pad-mode": "wrap"}, "'wrap'"),
    ({"precision": "float8"}, "'float8'"),
    ({"compression": "lz4"}, "'lz4'"),
    ({"donation-dtype": "int8"}, "'int8'"),
    ({"fill-missing": "3"}, "--fill-missing"),
    ({"input": "file:///nonexistent/volume"}, "no volume at file:///nonexistent/volume"),
    ({"input": "ftp://x/y"}, "'ftp://x/y'"),
    ({"input": "file://{root}/empty"}, "holds no chunks"),
    ({"model": "{root}/nosuch.onnx"}, "nosuch.onnx"),
    ({"model": "no-such-backend"}, "no-such-backend"),
    ({"output": "file://{root}/sharded"}, "sharded"),
    ({"stge": "2"}, "--stge"),
    ({"input": "{root}/em"}, "'{root}/em' (did you mean file://{root}/em?)"),
    ({"output": "file:/{root}/new"}, "'file:/{root}/new' (did you mean file://{root}/new?)"),
    ({"donations": "file:/{root}/newjob"}, "(did you mean file://{root}/newjob?)"),
]
RUN = [
    ({"device": "cuda"}, "CUDA is not available"),
    ({"engine": "spark"}, "'spark'"),
    ({"mode": "sideways"}, "'sideways'"),
    ({"engine": "dask", "workers": "1.5"}, "--workers 1.5"),
    ({"engine": "dask", "workers": "True"}, "--workers True"),
    ({"workers": "2"}, "--engine dask"),
    ({"engine": "dask", "scheduler": "nowhere"}, "'nowhere'"),
    ({"output": "precomputed://file://{root}/em"}, "is the input"),
]
STAGE_ONE = [
    (["run", "{root}/job", "--blocks", ""], "selects no block"),
    (["run", "{root}/job", "--blocks", ","], "selects no block"),
    (["run", "{root}/job", "--blocks", "0-1_0-1_0-1"], "0-1_0-1_0-1"),
    (["run", "{root}/job", "--blocks", "0-32_0-32"], "0-32_0-32"),
    (["run", "{root}/job", "--device", "cuda"], "CUDA is not available"),
    (["run", "{root}/job", "--batch-size", "1.5"], "--batch-size 1.5"),
    (["run", "{root}/job", "--cleanup"], "--cleanup"),
    (["run", "{root}/nojob"], "no job at"),
    (["run", "{root}/afile"], "afile"),
    (["rnu", "{root}/job"], "unknown command 'rnu' for `inference_and_donate.py` (did you mean run?); valid: run, worker"),
    (["rnu"], "unknown command 'rnu' for `inference_and_donate.py` (did you mean run?)"),
]
STAGE_TWO = [
    (["run", "{root}/job", "--device", "cpu"], "--device"),
    (["run", "{root}/job", "--blocks", "True"], "--blocks"),
    (["wroker", "fq:///tmp/queue"], "unknown command 'wroker' for `receive_and_blend.py` (did you mean worker?)"),
    (["run", "{root}/job"], "stage one is not done for 4 of the 4 blocks of the job (first: 0-32_0-32_0-16)"),
    (["run", "{root}/job", "--blocks", "0-32_0-32_0-16", "--force"], "stage one is not done for 1 of the 1 block"),
]
CHUNKFLOW = [
    (["show", "{root}/nojob"], "no job at"),
    (["status", "{root}/nojob"], "no job at"),
    (["inspect", "{root}/job", "--block", "nonsense"], "nonsense"),
    (["produce", "{root}/job", "ftp://queue"], "ftp://queue"),
    (["plan", "--input", "x"], "needs"),
    (["frobnicate"], "frobnicate"),
]


def _fill(value: str, root: Path) -> str:
    return value.replace("{root}", str(root))


def _refused(capsys, entry, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, (exit_info.value.code, captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("chunkflow: error: ") and "Traceback" not in captured.err
    return lines[0]


def _check(world: Path, capsys, entry, argv: list[str], message: str) -> None:
    before = snapshot(world)
    line = _refused(capsys, entry, argv)
    assert _fill(message, world) in line, line
    assert snapshot(world) == before, "a refused command changed a volume or a store"


@pytest.mark.parametrize("overrides, message", PLAN, ids=[m for _, m in PLAN])
def test_plan_refusals(world, capsys, overrides, message):
    flags = {k: _fill(v, world) for k, v in overrides.items()}
    _check(world, capsys, cli.main, ["plan", *base(world, **flags)], message)


@pytest.mark.parametrize("overrides, message", PLAN[:12] + RUN, ids=[m for _, m in PLAN[:12] + RUN])
def test_run_refusals(world, capsys, overrides, message):
    flags = {k: _fill(v, world) for k, v in overrides.items()}
    _check(world, capsys, cli.main, ["run", *base(world, **flags)], message)


@pytest.mark.parametrize("argv, message", STAGE_ONE, ids=[m for _, m in STAGE_ONE])
def test_stage_one_refusals(world, capsys, argv, message):
    _check(world, capsys, lambda a: cli_stages.main(1, a), [_fill(a, world) for a in argv], message)


@pytest.mark.parametrize("argv, message", STAGE_TWO, ids=[m for _, m in STAGE_TWO])
def test_stage_two_refusals(world, capsys, argv, message):
    _check(world, capsys, lambda a: cli_stages.main(2, a), [_fill(a, world) for a in argv], message)


@pytest.mark.parametrize("argv, message", CHUNKFLOW, ids=[m for _, m in CHUNKFLOW])
def test_other_command_refusals(world, capsys, argv, message):
    _check(world, capsys, cli.main, [_fill(a, world) for a in argv], message)


def test_the_catalogue_holds_at_least_forty_cases():
    assert len(PLAN) + len(RUN) + len(STAGE_ONE) + len(STAGE_TWO) + len(CHUNKFLOW) >= 40


def test_dry_run_creates_nothing(world, capsys):
    before = snapshot(world)
    cli.main(["plan", *base(world, output=str(world / "new.zarr")), "--dry-run"])
    assert "nothing was written" in capsys.readouterr().out
    assert snapshot(world) == before


def test_a_bug_is_reported_as_a_bug_not_a_refusal(capsys):
    """An exception that is no Refusal (numpy's broadcast error, say) exits 1 with a line that
    says it is unexpected, instead of blaming the user with exit 2."""
    from chunkflow.cli.common import user_errors

    @user_errors
    def broken():
        import numpy as np

        np.zeros(3) + np.zeros(4)

    with pytest.raises(SystemExit) as exit_info:
        broken()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1
    assert err[0].startswith("chunkflow: bug: ValueError: operands could not be broadcast") and "CHUNKFLOW_DEBUG" in err[0]


def test_every_user_facing_error_is_a_refusal():
    from chunkflow import errors
    from chunkflow.backends import ModelError
    from chunkflow.engines.queue import QueueError
    from chunkflow.geometry import GeometryError
    from chunkflow.job import JobError
    from chunkflow.errors import MissingDonations
    from chunkflow.storage import StorageError
    from chunkflow.storage.donation_codec import DonationError

    for cls in (ModelError, QueueError, GeometryError, JobError, MissingDonations, StorageError, DonationError,
                errors.MissingInput, errors.NonFiniteOutput, errors.UsageError, errors.EngineError):
        assert issubclass(cls, errors.Refusal), cls
    assert not issubclass(ValueError, errors.Refusal)


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("args", [
    ["-m", "chunkflow", "run", "{flags}", "--device", "cuda"],
    ["-m", "chunkflow", "plan", "{flags}", "--output", "file://{root}/em"],
    ["-m", "inference_and_donate", "run", "{root}/job", "--blocks", ""],
], ids=["run-cuda", "plan-output-is-input", "stage-blocks-empty"])
def test_a_real_terminal_sees_one_line(world, args):
    argv = []
    for a in args:
        argv.extend(base(world) if a == "{flags}" else [_fill(a, world)])
    before = snapshot(world)
    result = subprocess.run([PY, *argv], capture_output=True, text=True, cwd=world, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("chunkflow: error: "), result.stderr
    assert snapshot(world) == before


@pytest.mark.slow  # three subprocess runs, one interrupted
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_is_one_line_and_the_rerun_resumes(world, sig, status):
    """A slow python model (so the signal lands mid-run): one line, exit 130/143, and running the same
    command again finishes the job with output identical to an uninterrupted run."""
    import time

    from chunkflow.storage import open_volume

    slow = world / "slow.py"
    slow.write_text("import time\nimport torch\n\n\nclass Slow(torch.nn.Module):\n"
                    "    def forward(self, x):\n        time.sleep(0.05)\n        return x * 2\n\n\n"
                    "def build_model():\n    return Slow()\n")
    flags = base(world, model=str(slow), output=f"file://{world / 'slow_out'}", donations=str(world / "slow_job"))
    command = [PY, "-m", "chunkflow", "run", *flags, "--quiet"]
    proc = subprocess.Popen(command, cwd=world, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = world / "slow_job" / "done" / "stage1"
    deadline = time.monotonic() + 120
    while not (marker.exists() and any(marker.iterdir())) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == status, err
    assert len(lines) == 1 and lines[0].startswith("chunkflow: interrupted: ") and "resume" in lines[0], err
    rerun = subprocess.run(command, cwd=world, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout
    ref = world / "slow_ref"
    subprocess.run([PY, "-m", "chunkflow", "run", *base(world, model=str(slow), output=f"file://{ref}",
                                                        donations=str(world / "ref_job")), "--quiet"],
                   cwd=world, check=True, capture_output=True, timeout=300)
    box = Bbox((0, 0, 0), (16, 64, 64))
    assert (open_volume(f"file://{world / 'slow_out'}").read(box) == open_volume(f"file://{ref}").read(box)).all()


def test_dask_without_its_extra_is_refused_before_anything_is_written(world, capsys, monkeypatch):
    """`--engine dask` where dask.distributed cannot be imported (the extra not installed)."""
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` sees without the package
    _check(world, capsys, cli.main, ["run", *base(world, engine="dask")], "pip install 'chunkflow[dask]'")


@pytest.mark.integration  # `chunkflow run --engine dask` in a subprocess
def test_a_dask_cluster_whose_workers_die_at_start_is_one_line_and_writes_nothing(world, tmp_path_factory):
    """Real worker processes that die as they start (a sitecustomize that exits in every process
    multiprocessing spawns): `chunkflow run --engine dask` says so in one line, exit 2, and the
    output and job store are not created (the cluster starts before the first write)."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if any('multiprocessing' in a or 'spawn_main' in a or 'forkserver' in a for a in sys.argv):\n"
        "    os._exit(3)\n")
    before = snapshot(world)
    env = dict(__import__("os").environ, PYTHONPATH=f"{site}:{Path(__file__).resolve().parent.parent}")
    result = subprocess.run([PY, "-m", "chunkflow", "run", *base(world, engine="dask", workers="1"), "--quiet"],
                            capture_output=True, text=True, cwd=world, timeout=300, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "LocalCluster could not start" in lines[0], lines[0]
    assert snapshot(world) == before
