"""One definition of a job's parameters (issue 12): ``plan``, ``run``, ``reference``, the dry run and
``chunkflow.plan`` all take theirs from :class:`chunkflow.job_params.JobParameters`, so a new
parameter is one new field.
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

import pytest

import chunkflow
from chunkflow.cli import COMMANDS, REFERENCE_OMITS
from chunkflow.cli.stage_args import check_command_line, help_text
from chunkflow.cost_model import PRICE_PARAMETERS
from chunkflow.dryrun import hypothetical
from chunkflow.job_params import JobParameters, takes_job_parameters, with_field_docs

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {f.name: f for f in dataclasses.fields(JobParameters)}

#: each command's flags that are not job parameters, and the job parameters it leaves out
OWN = {
    "plan": ({"dry_run", "force", "quiet", *PRICE_PARAMETERS}, set()),
    "run": ({"force", "cleanup", "engine", "mode", "workers", "scheduler", "quiet"}, set()),
    "reference": ({"quiet"}, set(REFERENCE_OMITS)),
}


def _listed(text: str) -> set[str]:
    """Every parameter a help screen lists: positional arguments and flags."""
    positional = text.split("\nPOSITIONAL ARGUMENTS\n", 1)[1].split("\nFLAGS\n", 1)[0]
    flags = text.split("\nFLAGS\n", 1)[1]
    return ({n.lower() for n in re.findall(r"^    ([A-Z_]+)$", positional, re.M)}
            | {f.replace("-", "_") for f in re.findall(r"^\s+(?:-[A-Za-z], )?--([\w-]+)=", flags, re.M)})


@pytest.mark.parametrize("name", sorted(OWN))
def test_every_job_parameter_is_a_flag_with_its_help_and_nothing_else_is(name):
    own, omitted = OWN[name]
    text = re.sub(r"\x1b\[[\d;]*m", "", help_text(COMMANDS[name], name, "chunkflow"))
    assert _listed(text) == (set(FIELDS) - omitted) | own
    for field in set(FIELDS) - omitted:
        assert FIELDS[field].metadata["help"] in text, field
    assert set(inspect.signature(COMMANDS[name]).parameters) == (set(FIELDS) - omitted) | own


@pytest.mark.parametrize("name", sorted(OWN))
def test_unknown_and_omitted_flags_are_refused_in_one_line(capsys, name):
    positional = ["in", "out", *(["store"] if name == "plan" else []), "model", "8,8,8"]
    for flag in ["--no-such-flag", *("--" + f.replace("_", "-") for f in OWN[name][1])]:
        with pytest.raises(SystemExit) as info:
            check_command_line(COMMANDS, [name, *positional, flag, "1"], "chunkflow")
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and f"unknown flag {flag}" in err, err


def test_the_library_plan_takes_every_field_and_documents_it():
    params = inspect.signature(chunkflow.plan).parameters
    assert list(params) == [*FIELDS, "device_here", "force"]
    doc = inspect.getdoc(chunkflow.plan)
    for name in params:
        assert re.search(rf"^    {name}: ", doc, re.M), name
    assert params["input_patch"].annotation == "Size" and params["block"].annotation == "Size | None"


def test_dry_run_parameters_that_are_job_parameters_share_their_defaults_and_help():
    differ = {"model": "identity", "block": inspect.Parameter.empty}
    doc = inspect.getdoc(hypothetical)
    shared = [n for n in inspect.signature(hypothetical).parameters if n in FIELDS]
    assert {"input_patch", "block", "overlap", "output_patch", "storage_chunk", "model", "batch_size"} <= set(shared)
    for name in shared:
        default = FIELDS[name].default if FIELDS[name].default is not dataclasses.MISSING else inspect.Parameter.empty
        assert inspect.signature(hypothetical).parameters[name].default == differ.get(name, default), name
        assert f"    {name}: {FIELDS[name].metadata['help']}" in doc, name
    for name in inspect.signature(hypothetical).parameters:
        assert re.search(rf"^    {name}: ", doc, re.M), name


def test_locations_may_be_paths_and_the_command_builds_the_parameters(tmp_path):
    params = JobParameters(tmp_path / "in", "out", tmp_path / "job", "identity", "8,8,8")
    assert params.input == str(tmp_path / "in") and params.donations == str(tmp_path / "job")

    @takes_job_parameters(omit={"donations": "", "sharded": True}, defaults={"blend": "bump"}, flags=True)
    def command(params: JobParameters, quiet: bool = False) -> tuple:
        """A command.

        Args:
            quiet: say nothing.
        """
        return params, quiet

    made, quiet = command("in", "out", "m", (8, 8, 8), quiet=True, mip=2)
    assert made == JobParameters("in", "out", "", "m", (8, 8, 8), blend="bump", mip=2, sharded=True) and quiet
    signature = inspect.signature(command)
    assert "donations" not in signature.parameters and "sharded" not in signature.parameters
    assert signature.parameters["input_patch"].annotation == "str"
    assert signature.parameters["blend"].default == "bump"
    assert list(signature.parameters)[-1] == "quiet"
    assert "    quiet: say nothing." in command.__doc__ and "    mip: resolution level" in command.__doc__
    with pytest.raises(TypeError, match="bogus"):
        takes_job_parameters(omit={"bogus": 1})
    with pytest.raises(TypeError, match="blend"):
        takes_job_parameters(omit={"blend": "bump"}, defaults={"blend": "constant"})


def test_field_docs_are_added_to_a_docstring_without_an_args_section():
    def fn(block, extra):
        """Summary.

        More.

        Returns:
            nothing.
        """
    with pytest.raises(TypeError, match="extra"):
        with_field_docs(fn.__doc__, inspect.signature(fn))
    doc = with_field_docs("Summary.\n\nReturns:\n    x.", inspect.signature(lambda block, mip: None))
    assert doc.startswith("Summary.\n\nArgs:\n    block: block size") and doc.endswith("Returns:\n    x.\n")


NEW_FIELD = r'''
import dataclasses, inspect, json, re, sys
import chunkflow.job_params as job_params

made = []

class Extended(job_params.JobParameters):
    def __post_init__(self):
        super().__post_init__()
        made.append(self)

Extended = dataclasses.make_dataclass("JobParameters", [("halo", int, dataclasses.field(
    default=3, metadata={"help": "test-only: a parameter added as one field."}))], bases=(Extended,), frozen=True)
job_params.JobParameters = Extended

import chunkflow
from chunkflow.cli import COMMANDS, main
from chunkflow.cli.stage_args import help_text

found = {"api": "halo" in inspect.signature(chunkflow.plan).parameters
         and "halo: test-only" in inspect.getdoc(chunkflow.plan)}
for name in ("plan", "run", "reference"):
    text = help_text(COMMANDS[name], name, "chunkflow")
    args = ["file:///nonexistent/in", sys.argv[1] + "/out-" + name, "identity", "8,8,8", "--halo", "5"]
    if name == "plan":
        args.insert(2, sys.argv[1] + "/job")
    try:
        main([name, *args])
    except SystemExit as exit:
        code = exit.code
    found[name] = ["--halo=HALO" in text and "test-only: a parameter added as one field." in text, code,
                   made[-1].halo if made else None]
    made.clear()
try:
    chunkflow.plan("file:///nonexistent/in", "out", sys.argv[1] + "/job", "identity", "8,8,8", halo=7)
except chunkflow.Refusal:
    found["api_value"] = made[-1].halo
print(json.dumps(found))
'''


def test_a_new_field_is_a_flag_of_every_command_and_a_parameter_of_the_library(tmp_path):
    """Adding one field to JobParameters (here in a fresh process) is all it takes."""
    done = subprocess.run([sys.executable, "-c", NEW_FIELD, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"api": True, "plan": [True, 2, 5], "run": [True, 2, 5], "reference": [True, 2, 5],
                     "api_value": 7}, done.stderr
    assert not list(tmp_path.iterdir()), "a refused command wrote something"
