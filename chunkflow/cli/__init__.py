"""The ``chunkflow`` command (python-fire). Sizes are ZYX, e.g. ``--input-patch 16,128,128``.

Every user mistake ends in one line on stderr and exit status 2; set ``CHUNKFLOW_DEBUG=1`` for
the traceback.

The commands live in the package's modules: :mod:`~chunkflow.cli.jobs` (plan, run, reference,
demo, show), :mod:`~chunkflow.cli.inspection` (inspect), :mod:`~chunkflow.cli.fleet` (produce,
barrier, status) and :mod:`~chunkflow.cli.view` (view); :mod:`~chunkflow.cli.stages` holds the
stage scripts ``inference_and_donate.py`` and ``receive_and_blend.py``. This module holds the
command table and the entry points.
"""
from __future__ import annotations

import sys

import fire

from chunkflow.cli.common import as_process, raise_on_sigterm
from chunkflow.cli.fleet import barrier, produce, status
from chunkflow.cli.inspection import inspect as inspect_command
from chunkflow.cli.jobs import REFERENCE_OMITS, demo, plan, reference, run, show
from chunkflow.cli.stage_args import check_command_line
from chunkflow.cli.view import view as view_command

__all__ = ["COMMANDS", "REFERENCE_OMITS", "barrier", "console", "demo", "main", "plan", "produce", "reference",
           "run", "show", "status"]

#: the ``chunkflow`` subcommands, by name
COMMANDS = {"plan": plan, "run": run, "reference": reference, "demo": demo, "show": show, "inspect": inspect_command,
            "produce": produce, "barrier": barrier, "status": status, "view": view_command}


def main(argv: list[str] | None = None) -> None:
    """The console script: the command line is checked (unknown flags, extra arguments) before
    Fire runs anything, since Fire would report them only after the command ran."""
    raise_on_sigterm()
    argv = list(sys.argv[1:] if argv is None else argv)
    fire.Fire(COMMANDS, command=check_command_line(COMMANDS, argv, "chunkflow"), name="chunkflow")


def console() -> None:
    """The ``chunkflow`` command as a process (:func:`chunkflow.cli.common.as_process`)."""
    as_process(main)
