"""The command line: real runs through Fire, and one clear line for every user mistake.

Most cases call the Fire entry point in-process (same code path as the console script, without
paying a Python start-up per case); a few run the installed scripts as real subprocesses.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fire
import numpy as np
import pytest

from chunkflow.cli import COMMANDS
from chunkflow.storage import open_volume
from tests.helpers import CONV3, CONV3_SAME, make_input

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    fire.Fire(COMMANDS, command=[str(a) for a in args], name="chunkflow")


def fails_with(capsys, message: str, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("chunkflow: error: ") and message in err[0], err[0]
    return err[0]


@pytest.fixture
def volume(tmp_path):
    url, _ = make_input(tmp_path / "in", (24, 64, 64), seed=11)
    return url


def common(tmp_path, volume, **overrides):
    flags = {"input": volume, "output": f"file://{tmp_path / 'out'}", "donations": str(tmp_path / "job"),
             "model": "identity", "input-patch": "8,32,32", "overlap": "2,8,8", "block": "16,32,32"}
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


BAD = [
    ({"overlap": "8,8,8"}, "must be smaller than the output patch"),
    ({"overlap": "2,8,8", "block": "16,32,8", "storage-chunk": "8,8,8"}, "must be smaller than the block"),
    ({"input-patch": "8,128,32"}, "larger than the volume"),
    ({"block": "16,32,32", "storage-chunk": "16,32,24"}, "not a multiple of the output storage chunk"),
    ({"output-patch": "8,40,32"}, "larger than the input patch"),
    ({"output-patch": "8,31,32"}, "not centred"),
    ({"input-patch": "0,32,32"}, "must be positive"),
    ({"overlap": "2,-1,8"}, "must not be negative"),
    ({"blend": "triangle"}, "blend mode 'triangle'"),
    ({"dtype": "int7"}, "output dtype 'int7'"),
    ({"dtype": "float16"}, "float16 is not supported by Neuroglancer precomputed"),
    ({"input-patch": "8,32"}, "is not three integers"),
    ({"model": "nosuchdir/net.onnx"}, "does not exist"),
    ({"model": "no-such-backend"}, "no-such-backend"),
    ({"device": "tpu"}, "'tpu'"),
    ({"batch-size": "0"}, "batch size"),
    ({"input": "file:///nonexistent/volume"}, "no volume at"),
    ({"input": "ftp://x/y"}, "unsupported volume URL"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_plan_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, volume, capsys, overrides, message):
    fails_with(capsys, message, "plan", *common(tmp_path, volume, **overrides))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "job" / "manifest.json").exists()


def test_plan_refuses_a_different_job_in_the_same_store(tmp_path, volume, capsys):
    cli("plan", *common(tmp_path, volume))
    capsys.readouterr()
    fails_with(capsys, "already holds job", "plan", *common(tmp_path, volume, blend="constant"))


def test_edited_manifest_is_refused(tmp_path, volume, capsys):
    cli("plan", *common(tmp_path, volume))
    manifest = tmp_path / "job" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"blend": "gaussian"', '"blend": "constant"'))
    capsys.readouterr()
    fails_with(capsys, "changed after planning", "show", str(tmp_path / "job"))


def test_run_and_reference_agree_through_the_cli(tmp_path, volume, capsys):
    """`chunkflow run` and `chunkflow reference` with the same flags (valid-conv model, context margin)."""
    flags = ["--input", volume, "--model", CONV3, "--input-patch", "14,38,38", "--output-patch", "8,32,32",
             "--overlap", "2,8,8", "--blend", "bump", "--batch-size", "3", "--quiet"]
    cli("run", *flags, "--output", f"file://{tmp_path / 'run'}", "--block", "16,32,32")
    cli("reference", *flags, "--output", f"file://{tmp_path / 'ref'}")
    out = capsys.readouterr().out
    assert "stage one" in out and "reference of" in out
    bbox = open_volume(volume).bbox
    run = open_volume(f"file://{tmp_path / 'run'}").read(bbox)
    ref = open_volume(f"file://{tmp_path / 'ref'}").read(bbox)
    assert run.shape[0] == 3
    np.testing.assert_allclose(run, ref, rtol=0, atol=1e-5)


def test_stage_scripts_run_a_planned_job_and_skip_done_blocks(tmp_path, volume):
    """The top-level scripts as real subprocesses: plan, stage one, stage two, rerun skips."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    def run(*args):
        result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout
    run("-m", "chunkflow.cli", "plan", *common(tmp_path, volume, model=CONV3_SAME, **{"input-patch": "8,32,32"}))
    job = tmp_path / "job"
    assert "8 blocks run" in run("inference_and_donate.py", job, "--blocks", "all", "--quiet")
    assert "8 blocks run" in run("receive_and_blend.py", job, "--quiet")
    assert "0 blocks run, 8 already done" in run("receive_and_blend.py", job, "--quiet")
    result = subprocess.run([sys.executable, "receive_and_blend.py", str(job), "--blocks", "1-2_3-4_5-x"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a box name" in result.stderr


def test_console_script_help_explains_flags():
    result = subprocess.run([sys.executable, "-m", "chunkflow.cli", "run", "--help"], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PAGER="cat", PYTHONPATH=str(ROOT)))
    text = result.stdout + result.stderr
    for flag in ("--input", "--output", "--model", "--input-patch", "--output-patch", "--overlap", "--block",
                 "--donations", "--blend", "--batch-size", "--device", "--dtype"):
        assert flag.lstrip("-").replace("-", "_") in text.lower(), flag
    assert "context margin" in text and "ZYX" in text


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command.strip() in readme
