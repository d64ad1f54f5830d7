"""``--help`` and the command-line check agree, for every command of the three CLIs (issue 9).

Each command's help is rendered the way a user gets it (``check_command_line`` with ``--help``);
every flag it prints, long or short, must be accepted and reach the parameter the help says
(checked through Fire itself, with a probe in place of the command); every parameter must be in
the help, and ``-h`` is help everywhere. Also: each stage's ``run`` has only its own flags, and
the demo's difference picture says in absolute numbers how small the difference is.
"""
from __future__ import annotations

import inspect
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import fire
import numpy as np
import pytest

from chunkflow.cli import COMMANDS
from chunkflow.cli.stage_args import check_command_line, help_text, short_flags
from chunkflow.cli.stages import SCRIPTS, run_command, worker_command
from chunkflow.demo.pipeline import difference_image

ROOT = Path(__file__).resolve().parent.parent


def _clis() -> list[tuple[str, dict]]:
    stages = [(SCRIPTS[s], {"run": run_command(s), "worker": worker_command(s)}) for s in (1, 2)]
    return [("chunkflow", COMMANDS), *stages]


CASES = [(prog, commands, name) for prog, commands in _clis() for name in commands]
IDS = [f"{prog} {name}" for prog, _, name in CASES]


def _exit(capsys, commands: dict, argv: list[str], prog: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        check_command_line(commands, argv, prog)
    return info.value.code, capsys.readouterr().err


def _help(capsys, commands: dict, name: str, prog: str, *where: str) -> str:
    code, text = _exit(capsys, commands, [name, *where], prog)
    assert code == 0, text
    return re.sub(r"\x1b\[[\d;]*m", "", text)


def _flags(text: str) -> list[tuple[str | None, str]]:
    """(short letter or None, parameter name) of every flag in the FLAGS section of a help screen."""
    section = text.split("\nFLAGS\n", 1)[1] if "\nFLAGS\n" in text else ""
    section = re.split(r"\n[A-Z][A-Z ]+\n", section)[0]
    found = re.findall(r"^\s+(?:-([A-Za-z]), )?--([\w-]+)=", section, flags=re.MULTILINE)
    return [(short, long.replace("-", "_")) for short, long in found]  # printed with hyphens: the parameter


def _required(fn) -> list[str]:
    return [n for n, p in inspect.signature(fn).parameters.items() if p.default is p.empty]


def _probe(fn):
    """A stand-in with ``fn``'s signature that returns the arguments Fire bound, instead of running."""
    signature = inspect.signature(fn)

    def probe(*args, **kwargs):
        return dict(signature.bind(*args, **kwargs).arguments)
    probe.__signature__ = signature
    return probe


def _parsed(commands: dict, name: str, argv: list[str], prog: str) -> dict:
    """``argv`` through check_command_line, then through Fire onto a probe of the command."""
    args = check_command_line(commands, argv, prog)
    return fire.Fire({name: _probe(commands[name])}, command=args, name=prog, serialize=lambda _: None)


@pytest.mark.parametrize("prog, commands, name", CASES, ids=IDS)
def test_every_parameter_is_in_the_help_and_every_flag_it_prints_works(capsys, prog, commands, name):
    fn = commands[name]
    text = _help(capsys, commands, name, prog, "--help")
    assert _help(capsys, commands, name, prog, "-h") == text
    flags = _flags(text)
    params = inspect.signature(fn).parameters
    required = _required(fn)
    for param in required:
        assert re.search(rf"^\s+{param.upper()}$", text, flags=re.MULTILINE), (param, text)
    assert sorted(long for _, long in flags) == sorted(n for n in params if n not in required)
    assert "h" not in [short for short, _ in flags], "-h is help, never a flag"
    assert {short: long for short, long in flags if short} == short_flags(fn)
    positional = [f"value-of-{n}" for n in required]
    for short, long in flags:
        for flag in (f"--{long}", f"--{long.replace('_', '-')}", *([f"-{short}"] if short else [])):
            bound = _parsed(commands, name, [name, *positional, flag, "7"], prog)
            assert bound[long] == 7, (flag, bound)
            assert [bound[n] for n in required] == positional
        capsys.readouterr()


@pytest.mark.parametrize("prog, commands, name", CASES, ids=IDS)
def test_short_flags_the_help_does_not_list_are_refused_and_h_is_help(capsys, prog, commands, name):
    fn = commands[name]
    positional = [f"value-of-{n}" for n in _required(fn)]
    listed = short_flags(fn)
    for letter in string.ascii_lowercase:
        if letter in listed or letter in inspect.signature(fn).parameters:
            continue
        argv = [name, *positional, f"-{letter}", "7"]
        if letter == "h":
            assert _exit(capsys, commands, argv, prog)[0] == 0
            continue
        code, err = _exit(capsys, commands, argv, prog)
        assert code == 2 and err.count("\n") == 1 and err.startswith("chunkflow: error: "), (letter, err)


def test_inspect_help_offers_headers_without_h(capsys):
    text = _help(capsys, COMMANDS, "inspect", "chunkflow", "--help")
    assert "--headers=HEADERS" in text and "-h, --headers" not in text
    code, err = _exit(capsys, COMMANDS, ["inspect", "/store", "--h"], "chunkflow")
    assert code == 2 and "use --headers" in err


@pytest.mark.parametrize("stage, own, other, belongs", [
    (1, {"device", "batch_size"}, "cleanup", "stage-two"),
    (2, {"cleanup"}, "device", "stage-one"),
    (2, {"cleanup"}, "batch_size", "stage-one"),
])
@pytest.mark.parametrize("command", ["run", "worker"])
def test_each_stage_command_takes_only_its_own_flags(capsys, stage, own, other, belongs, command):
    """Both commands of a stage script: the worker's help listed the other stage's flags (a new user's
    walkthrough, 2026-11-29)."""
    commands = {"run": run_command(stage), "worker": worker_command(stage)}
    params = set(inspect.signature(commands[command]).parameters)
    assert own <= params and other not in params
    text = _help(capsys, commands, command, SCRIPTS[stage], "--help")
    assert f"--{other.replace('_', '-')}=" not in text and all(f"--{flag.replace('_', '-')}=" in text for flag in own)
    flag = "--" + other.replace("_", "-")
    target = "/job" if command == "run" else "fq:///queue"
    for argv in ([command, target, flag, "1"], [command, target, flag], [command, target, "--no" + other]):
        code, err = _exit(capsys, commands, argv, SCRIPTS[stage])
        assert code == 2 and err.count("\n") == 1, err
        assert f"{flag} is a {belongs} flag" in err and f"`{SCRIPTS[stage]} {command}` does not take it" in err


def test_quiet_short_flag_of_a_stage_run_reaches_quiet():
    commands = {"run": run_command(2), "worker": worker_command(2)}
    bound = _parsed(commands, "run", ["run", "/job", "-q", "-c", "-b", "all"], SCRIPTS[2])
    assert {k: bound[k] for k in ("job", "quiet", "cleanup", "blocks", "force")} == {
        "job": "/job", "quiet": True, "cleanup": True, "blocks": "all", "force": False}


def test_difference_picture_states_the_absolute_difference():
    diff = np.zeros((32, 32), np.float32)
    diff[5, 7] = 2.4e-7
    diff[20, 3] = 1e-8
    image, texts = difference_image(diff, 16, 2.4e-7)
    title, subtitle, *labels = texts
    assert title == "max |difference| = 2.4e-07"
    assert "z=16" in subtitle and "whole volume 2.4e-07" in subtitle and "tolerance 1e-05" in subtitle
    assert labels == ["2.4e-07", "1.2e-07", "0"]
    pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 32 * 4 and pixels.shape[1] > 32 * 4  # small slices are enlarged
    bar = pixels[:, pixels.shape[1] // 2:]
    assert bar.max() == 255 and bar.min() == 0  # the colour bar runs from 0 (black) to the max (white)


def test_difference_picture_of_identical_results():
    image, texts = difference_image(np.zeros((8, 8), np.float32), 3, 0.0)
    assert texts[0] == "max |difference| = 0 (bit-identical)" and texts[2:] == ["0"]
    assert image.width > 8 and image.height > 8


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_the_command_list_comes_without_fire_s_info_line(flag):
    """`chunkflow --help` lists the commands; Fire's "INFO: Showing help with the command ..." line
    (which tells the user to type a `--` they never need) is not printed."""
    result = subprocess.run([sys.executable, "-m", "chunkflow", flag], capture_output=True, text=True,
                            cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    shown = result.stdout + result.stderr  # Fire pages help to stdout on a terminal, else to stderr
    assert result.returncode == 0, shown
    assert "INFO:" not in shown
    assert "COMMAND is one of the following" in shown and "plan" in shown


def test_help_spells_flags_with_hyphens_as_the_docs_do():
    """Fire lists `--input_patch`; the README, the docs and the errors say `--input-patch` (both work)."""
    commands = [(fn, name, "chunkflow") for name, fn in COMMANDS.items()]
    commands += [(make(stage), name, SCRIPTS[stage]) for stage in SCRIPTS
                 for name, make in (("run", run_command), ("worker", worker_command))]
    for fn, name, prog in commands:
        text = help_text(fn, name, prog)
        assert not re.search(r"--[a-z0-9]+_[a-z0-9_]+", text), (prog, name, re.findall(r"--\w+_\w+", text))
    assert "--output-patch=" in help_text(COMMANDS["plan"], "plan", "chunkflow")
