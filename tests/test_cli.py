"""The command line: real runs through Fire, and one clear line for every user mistake.

Most cases call the Fire entry point in-process (same code path as the console script, without
paying a Python start-up per case); a few run the installed scripts as real subprocesses.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import fire
import numpy as np
import pytest

from chunkflow.cli import COMMANDS, main
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
    ({"overlap": "0.25"}, "overlap 0.25 is in voxels, z,y,x integers such as 4,16,16, not a fraction (MONAI's overlap "
                          "0.25,0.25,0.25 of this patch is 2,8,8)"),
    ({"overlap": "8,8,8"}, "must be smaller than the input patch 8,32,32 (the output patch, as --output-patch is not "
                           "given) along z; give an overlap of at most 7 along z"),
    ({"overlap": "2,32,8", "output-patch": "8,32,32"}, "overlap 2,32,8 must be smaller than the output patch 8,32,32 "
                                                        "along y; give an overlap of at most 31 along y"),
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
    ({"batch-size": "0"}, "--batch-size 0"),
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
    line = fails_with(capsys, "already holds job", "plan", *common(tmp_path, volume, blend="constant", overlap="2,4,8"))
    assert "with other parameters (overlap 2,4,8 here, 2,8,8 there; blend constant here, gaussian there); give a new " \
           "--donations location" in line, line


def test_a_refused_replan_lists_three_differences_and_counts_the_rest(tmp_path, volume, capsys):
    cli("plan", *common(tmp_path, volume))
    manifest = (tmp_path / "job" / "manifest.json").read_bytes()
    capsys.readouterr()
    line = fails_with(capsys, "already holds job", "plan",
                      *common(tmp_path, volume, blend="constant", overlap="2,4,8", block="16,64,64",
                              **{"pad-mode": "constant"}))
    assert ("(overlap 2,4,8 here, 2,8,8 there; block 16,64,64 here, 16,32,32 there; blend constant here, gaussian "
            "there; and 1 more)") in line, line
    assert (tmp_path / "job" / "manifest.json").read_bytes() == manifest


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


@pytest.mark.slow  # the stage scripts in subprocesses
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
    result = subprocess.run([sys.executable, "inference_and_donate.py", "run", str(job), "--cleanup", "--force"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--cleanup is a stage-two flag" in result.stderr and not result.stdout


@pytest.mark.slow  # a subprocess
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


# ---- the command line is checked before anything runs ------------------------------------------

def main_fails(capsys, argv: list[str], *messages: str) -> str:
    """``chunkflow ARGV`` (the console script's entry point) ends in one line, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chunkflow: error: "), err
    for message in messages:
        assert message in err[0], err[0]
    return err[0]


@pytest.fixture
def planned(tmp_path, volume, capsys):
    cli("plan", *common(tmp_path, volume))
    capsys.readouterr()
    return tmp_path / "job"


@pytest.mark.parametrize("extra, messages", [
    (["--stge", "2"], ["unknown flag --stge for `chunkflow produce`", "did you mean --stage?",
                       "valid: --job, --queue, --stage, --blocks, --force, --quiet"]),
    (["--stage=2", "--blocks=all", "--forse"], ["unknown flag --forse", "did you mean --force?"]),
    (["--quiet", "--bloks=all"], ["unknown flag --bloks for `chunkflow produce`"]),
    (["-q"], ["flag -q for `chunkflow produce` is ambiguous: --queue or --quiet"]),
    (["1", "all", "False", "True", "surplus"], ["too many arguments for `chunkflow produce`: 'surplus'"]),
])
def test_produce_with_a_bad_command_line_enqueues_nothing(planned, tmp_path, capsys, extra, messages):
    """Fire would run the command first and complain about the leftover arguments afterwards."""
    main_fails(capsys, ["produce", planned, f"fq://{tmp_path / 'q'}", *extra], *messages)
    assert not (tmp_path / "q").exists()


def test_flag_forms_fire_accepts_still_work_and_help_runs_nothing(planned, tmp_path, capsys):
    queue = f"fq://{tmp_path / 'q'}"
    with pytest.raises(SystemExit) as exit_info:  # help after the arguments: Fire's help, no tasks produced
        main(["produce", str(planned), queue, "--help"])
    assert exit_info.value.code == 0 and "--stage" in capsys.readouterr().err and not (tmp_path / "q").exists()
    main(["produce", str(planned), queue, "--no-force", "--blocks=all", "--quiet"])  # --no-force: Fire's --noforce
    assert "8 stage-one tasks" in capsys.readouterr().out
    main(["produce", "--queue", queue, "--job", str(planned), "--noforce", "-s", "1", "--quiet"])
    assert "8 stage-one tasks" in capsys.readouterr().out


def test_barrier_with_a_mistyped_flag_does_not_wait(planned, tmp_path, capsys):
    main_fails(capsys, ["barrier", planned, f"fq://{tmp_path / 'q'}", "--poll", "0.1", "--timeout", "0.2",
                        "--timout", "1"], "unknown flag --timout", "did you mean --timeout?")
    assert not (tmp_path / "q").exists()


def test_run_with_a_mistyped_flag_runs_nothing(tmp_path, volume, capsys):
    main_fails(capsys, ["run", *common(tmp_path, volume), "--engine", "dask", "--wrkers", "2"],
               "unknown flag --wrkers for `chunkflow run`", "did you mean --workers?")
    assert not (tmp_path / "out").exists() and not (tmp_path / "job").exists()


@pytest.mark.parametrize("argv, messages", [
    (["prodce", "/x", "fq:///q"], ["unknown command 'prodce' for `chunkflow`", "did you mean produce?"]),
    (["produce", "/x"], ["`chunkflow produce` needs QUEUE"]),
    (["status"], ["`chunkflow status` needs JOB"]),
])
def test_unknown_commands_and_missing_arguments_end_in_one_line(capsys, argv, messages):
    main_fails(capsys, argv, *messages)


@pytest.mark.slow  # a worker subprocess
def test_stage_script_with_a_mistyped_flag_leases_nothing(tmp_path, volume, capsys):
    """A real worker process: `--wrkers 2` is refused before it leases (it would run every task)."""
    from chunkflow.engines.queue import open_queue, produce
    from chunkflow.planning import load_job

    cli("plan", *common(tmp_path, volume))
    queue = f"fq://{tmp_path / 'q'}"
    produce(load_job(str(tmp_path / "job")), queue)
    result = subprocess.run([sys.executable, "inference_and_donate.py", "worker", queue, "--wrkers", "2"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("chunkflow: error: unknown flag --wrkers for `inference_and_donate.py worker`; "
                                     "valid: --queue, --job, --lease, --wait, --poll, --force, --max-tasks, "
                                     "--device, --batch-size, --max-attempts, --slots, --quiet")
    assert open_queue(queue).enqueued == 8 and open_queue(queue).inserted == 8 and open_queue(queue).leased == 0
    assert not (tmp_path / "job" / "done").exists()


# ---- a stdout closed early (`chunkflow inspect JOB | head -2`) ------------------------------------

def _many_blocks(tmp_path: Path) -> str:
    """A planned job of 1024 blocks (a manifest on disk): `inspect --limit 100000` prints ~0.5 MB."""
    from tests.helpers import hypothetical_job

    hypothetical_job(tmp_path / "many", (16, 128, 128), (4, 8, 8), (1, 2, 2), (4, 8, 8), (4, 8, 8))
    return str(tmp_path / "many")


def _chunkflow(*args: str, stdout) -> subprocess.Popen:
    """``python -m chunkflow ARGS`` in a process running this checkout's code."""
    return subprocess.Popen([sys.executable, "-m", "chunkflow", *args], cwd=ROOT, stdout=stdout,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.slow  # a subprocess
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`chunkflow inspect JOB --limit 100000 | head -c 100`: the reader leaves mid-output; the command
    stops with the status a shell shows for a Unix tool ended by SIGPIPE, and nothing on stderr."""
    proc = _chunkflow("inspect", _many_blocks(tmp_path), "--limit", "100000", stdout=subprocess.PIPE)
    assert proc.stdout.read(100).startswith(b"job ")
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE and err == b"", err


@pytest.mark.slow  # a subprocess
def test_a_reader_gone_before_the_first_write_ends_the_command_quietly(tmp_path):
    """`chunkflow show JOB` whose few lines are written only as the process exits, into a pipe whose
    reader is already gone: the last flush fails quietly too."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = _chunkflow("show", _many_blocks(tmp_path), stdout=write)
    finally:
        os.close(write)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE and err == b"", err


def test_a_broken_pipe_of_a_socket_is_still_a_bug(capsys):
    """A BrokenPipeError that is not our stdout's (a socket whose peer closed) is reported as a bug."""
    import socket

    from chunkflow.cli.common import user_errors

    @user_errors
    def send() -> None:
        ours, theirs = socket.socketpair()
        theirs.close()
        with ours:
            ours.sendall(b"x" * 1_000_000)

    with pytest.raises(SystemExit) as exit_info:
        send()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("chunkflow: bug: BrokenPipeError") and err.count("\n") == 1, err


# ---- the stage scripts: a mistyped command is not a job ----------------------------------------

@pytest.mark.parametrize("stage, argv, message", [
    (1, ["rnu", "{job}"], "unknown command 'rnu' for `inference_and_donate.py` (did you mean run?); valid: run, worker"),
    (1, ["rnu"], "unknown command 'rnu' for `inference_and_donate.py` (did you mean run?); valid: run, worker"),
    (2, ["wroker", "fq:///tmp/queue"],
     "unknown command 'wroker' for `receive_and_blend.py` (did you mean worker?); valid: run, worker"),
    (2, ["{job}", "all"], "unknown command '{job}' for `receive_and_blend.py`; valid: run, worker"),
], ids=["rnu-job", "rnu", "wroker-queue", "two-jobs"])
def test_a_mistyped_stage_command_is_refused_not_read_as_a_job(planned, capsys, stage, argv, message):
    from chunkflow.cli.stages import main as stage_main

    before = sorted(p.relative_to(planned) for p in planned.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        stage_main(stage, [a.replace("{job}", str(planned)) for a in argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"chunkflow: error: {message.replace('{job}', str(planned))}\n"
    assert sorted(p.relative_to(planned) for p in planned.rglob("*")) == before


def test_a_stage_script_given_only_a_job_runs_it(tmp_path, volume, capsys, monkeypatch):
    """`inference_and_donate.py JOB [--flags]` still means `run`, a relative job directory named like a
    command (`work`, close to `worker`) included."""
    from chunkflow.cli.stages import main as stage_main

    cli("plan", *common(tmp_path, volume, donations=str(tmp_path / "work")))
    monkeypatch.chdir(tmp_path)
    stage_main(1, ["work", "--blocks", "0-32_0-32_0-16", "--quiet"])
    assert "stage one: 1 block run, 0 already done" in capsys.readouterr().out


def test_the_readme_gives_slots_only_to_commands_that_take_it():
    """README: `--slots` is a flag of the queue workers only; `chunkflow run` and the stage scripts' `run`
    refuse it, and every command line in the README that passes it is a worker's."""
    import inspect
    import re

    from chunkflow.cli.stage_args import check_command_line
    from chunkflow.cli.stages import run_command, worker_command

    for stage in (1, 2):
        assert "slots" in inspect.signature(worker_command(stage)).parameters
        assert "slots" not in inspect.signature(run_command(stage)).parameters
    assert "slots" not in inspect.signature(COMMANDS["run"]).parameters
    with pytest.raises(SystemExit):
        check_command_line({"run": run_command(1)}, ["run", "/job", "--slots", "1"], "inference_and_donate.py")
    readme = (ROOT / "README.md").read_text()
    spans = [s for s in re.findall(r"`([^`]*--slots[^`]*)`", readme) if s != "--slots"]
    assert spans, "the README no longer says which commands take --slots"
    for span in spans:
        assert re.match(r"python -m (inference_and_donate|receive_and_blend) worker ", span), span


@pytest.mark.parametrize("flag", ["--cleanup=no", "--force=false", "--quiet=3", "--fill-missing=yes", "--overwrite=0"])
def test_on_off_flags_take_no_value(tmp_path, volume, capsys, flag):
    """Fire passes ``--cleanup=no`` as the string "no", which is true: it deleted the donations it was
    told to keep (an adversarial review, 2026-11-29). Every flag annotated bool refuses a value, in one
    line, before anything is written."""
    name = flag.split("=")[0]
    line = fails_with(capsys, f"{name} takes no value", "run", volume, f"file://{tmp_path / 'out'}", "identity",
                      "8,32,32", "--overlap", "2,8,8", "--block", "8,32,32", "--donations", tmp_path / "job", flag)
    assert repr(flag.split("=")[1])[1:-1] in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "job").exists()


def test_a_size_with_spaces_names_the_shifted_value(tmp_path, volume, capsys):
    """``--overlap 4 16 16`` made Fire shift 16 into DONATIONS: "store URL 16 is not a string" (a new user's
    walkthrough, 2026-11-29). The line now says a value landed there and how sizes are written."""
    line = fails_with(capsys, "--donations 16 is not a store location", "run", volume, f"file://{tmp_path / 'out'}",
                      "identity", "8,32,32", "--overlap", "4", "16", "16")
    assert "--overlap 4,16,16" in line
    assert not (tmp_path / "out").exists()


def test_a_block_that_does_not_fit_an_existing_output_says_whose_chunk_it_is(tmp_path, volume, capsys):
    """A leftover output's storage chunk made a later plan's block refusal puzzling (a new user's
    walkthrough, 2026-11-29): the line now says the chunk is the existing output's."""
    from chunkflow.bbox import Bbox, Vec
    from chunkflow.storage import create_volume

    create_volume(f"file://{tmp_path / 'out'}", Bbox((0, 0, 0), (24, 64, 64)), Vec(8, 20, 20), 1, "float32")
    line = fails_with(capsys, "not a multiple of the output storage chunk 8,20,20", "plan", *common(tmp_path, volume))
    assert "existing output" in line and "new output" in line
