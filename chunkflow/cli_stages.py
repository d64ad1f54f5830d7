"""Stage entry points for fleets: ``inference_and_donate.py`` and ``receive_and_blend.py``.

Each has two commands::

    python inference_and_donate.py run JOB --blocks all --device cuda:0     blocks of a job, here
    python inference_and_donate.py worker QUEUE [--job JOB] [--wait]        lease tasks from a queue
    python receive_and_blend.py run JOB --blocks 0-128_0-128_0-16,128-256_0-128_0-16
    python receive_and_blend.py worker QUEUE

``python inference_and_donate.py JOB ...`` (no command) still means ``run``.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import logging
import re
import signal
import sys

import fire

from chunkflow.bbox import Bbox, Vec
from chunkflow.job import Job, JobError
from chunkflow.planning import load_job

log = logging.getLogger(__name__)

SCRIPTS = {1: "inference_and_donate.py", 2: "receive_and_blend.py"}


def user_errors(fn):
    """``chunkflow.cli.user_errors``, looked up when called (chunkflow.cli imports this module's users)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from chunkflow.cli import user_errors as wrap

        return wrap(fn)(*args, **kwargs)
    return wrapper


def setup_logging(quiet: bool = False) -> None:
    from chunkflow.cli import setup_logging as setup

    setup(quiet)


def select_blocks(job: Job, blocks) -> list[Vec] | None:
    """``all`` -> None (every block); otherwise block names ``x0-x1_y0-y1_z0-z1`` (comma or list)."""
    if blocks in (None, "all"):
        return None
    if isinstance(blocks, str):
        names = [b for b in blocks.replace(";", ",").split(",") if b]
    else:
        names = [str(b) for b in blocks]
    selected = []
    for name in names:
        try:
            box = Bbox.from_name(name)
        except ValueError as err:
            raise JobError(f"--blocks {name!r}: {err}; use 'all' or names like {job.layout.block_box(Vec(0, 0, 0)).name}") from None
        selected.append(job.layout.block_index_of(box))
    return selected


def run_command(stage: int):
    @user_errors
    def run(job: str, blocks: str = "all", device: str | None = None, batch_size: int | None = None,
            force: bool = False, cleanup: bool = False, quiet: bool = False) -> None:
        """Run this stage for blocks of a planned job, in this process.

        Args:
            job: the job's store (the --donations location given to `chunkflow plan`).
            blocks: 'all' or block names x0-x1_y0-y1_z0-z1 separated by commas.
            device: cpu, cuda or cuda:N (default: the job's).
            batch_size: patches per forward pass (default: the job's).
            force: rerun blocks that are already done.
            cleanup: (stage two) delete each block's donations after it is written, and the leftover
                donations of blocks already done (late duplicates of their donors).
            quiet: no progress bar.

        Every selected block is tried: a block that fails (e.g. its donations are missing or
        corrupt) is reported in one line at the end and the exit status is non-zero (2, or 1 if
        a block failed unexpectedly).
        """
        from chunkflow.engines import LocalEngine, run_stage
        from chunkflow.engines.failures import exit_status

        if cleanup and stage == 1:
            usage_error("--cleanup is a stage-two flag (receive_and_blend deletes what it consumed); "
                        "inference_and_donate has nothing to clean up")
        setup_logging(quiet)
        planned = load_job(job).with_runtime(device=device, batch_size=batch_size)
        summary = run_stage(planned, stage, LocalEngine(), select_blocks(planned, blocks), force=force,
                            progress=not quiet, cleanup=cleanup, check=False)
        print(f"stage {'one' if stage == 1 else 'two'}: {summary.tasks} blocks run, {summary.skipped} already done, "
              f"{summary.stats.patches} patches, {summary.seconds:.2f} s{summary.counts()}")
        if summary.swept:
            print(f"cleanup: {summary.swept} leftover donations of finished blocks removed")
        report_failures([f.line() for f in summary.failures], exit_status(summary.failures))
    return run


def report_failures(lines: list[str], status: int) -> None:
    """Every failed task in one line on stderr, then exit with ``status`` (2: refusals only, 1: a
    task failed unexpectedly); nothing when no task failed."""
    for line in lines:
        print(f"chunkflow: error: {line}", file=sys.stderr)
    if status:
        sys.exit(status)


def worker_command(stage: int):
    @user_errors
    def worker(queue: str, job: str | None = None, lease: int = 120, wait: bool = False, poll: float = 2.0,
               force: bool = False, cleanup: bool = False, max_tasks: int | None = None, device: str | None = None,
               batch_size: int | None = None, quiet: bool = False) -> None:
        """Lease this stage's tasks from QUEUE and run them until the queue is empty.

        A task that was leased by a worker that died comes back when its lease runs out; this
        worker waits for it while others hold leases. Exits 2 on a task of another job.

        Args:
            queue: fq:///shared/dir or sqs://NAME (region AWS_DEFAULT_REGION, endpoint AWS_ENDPOINT_URL_SQS).
            job: serve only this job (its store); tasks of any other job are refused.
            lease: seconds a task stays invisible to others; renewed every lease/3 s while it runs,
                so it only bounds how soon a dead worker's task comes back.
            wait: keep polling when the queue is empty (a long-lived fleet worker).
            poll: seconds between polls of an empty queue.
            force: rerun tasks whose block is already done.
            cleanup: (stage two) delete each block's donations after it is written, and the leftover
                donations of a block already done when its task is leased again.
            max_tasks: stop after this many tasks.
            device: cpu, cuda or cuda:N (default: the job's; one worker per GPU).
            batch_size: patches per forward pass (default: the job's).
            quiet: log warnings only.
        """
        from chunkflow.engines.queue import work

        setup_logging(quiet)
        signal.signal(signal.SIGTERM, _terminate)
        summary = work(queue, stage, job_store=job, lease=lease, wait=wait, poll=poll, force=force,
                       max_tasks=max_tasks, device=device, batch_size=batch_size, cleanup=cleanup)
        print(summary.line())
    return worker


def _terminate(signum, frame) -> None:
    """SIGTERM (Kubernetes, SLURM preemption): unwind, so the leased task is handed back at once."""
    sys.exit(128 + signum)


def main(stage: int, argv: list[str] | None = None) -> None:
    """Fire entry point of a stage script; a first argument that is no command means ``run``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command(stage), "worker": worker_command(stage)}
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv.insert(0, "run")
    fire.Fire(commands, command=check_command_line(commands, argv, SCRIPTS[stage]), name=SCRIPTS[stage])


# ---- the command line, checked before Fire runs anything ---------------------------------------
#
# Fire hands arguments a command does not take to whatever the command returned, so a mistyped
# flag would only be reported after the command ran (tasks enqueued, a whole job computed). The
# command line is therefore parsed here first, the way Fire parses it (``--flag value``,
# ``--flag=value``, ``--flag`` before another flag or at the end for True, ``--noflag`` for False,
# ``-x`` for the one parameter starting with x, ``-`` and ``_`` alike), and refused in one line.

HELP_FLAGS = ("-h", "--help")


def usage_error(message: str) -> None:
    """One line on stderr and exit status 2: the CLIs' answer to a user mistake."""
    print(f"chunkflow: error: {message}", file=sys.stderr)
    sys.exit(2)


def _is_flag(arg: str) -> bool:
    """Fire's notion of a flag (so ``-1,2,3`` and ``-5`` are values, not flags)."""
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def _closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def check_command_line(commands: dict, argv: list[str], prog: str) -> list[str]:
    """The arguments to give Fire for ``argv``, checked against the selected command's signature.

    An unknown command or flag, an ambiguous short flag, too many or too few positional
    arguments end the process with one line (exit 2) before anything runs. ``--help``/``-h``
    anywhere shows the command's help and runs nothing; Fire's own flags go after a ``--``.
    ``--no-flag`` is rewritten to Fire's ``--noflag``.
    """
    if "--" in argv:
        cut = len(argv) - 1 - argv[::-1].index("--")
        args, fire_flags = argv[:cut], argv[cut:]
    else:
        args, fire_flags = list(argv), []
    if not args or args[0] in HELP_FLAGS:
        return list(argv)  # Fire lists the commands
    name = args[0]
    fn = commands.get(name, commands.get(name.replace("-", "_")))
    if fn is None and name.startswith("-"):
        usage_error(f"`{prog}` takes a command first ({' or '.join(commands)}), then its arguments; got {name}")
    if fn is None:
        usage_error(f"unknown command {name!r} for `{prog}`{_closest(name, list(commands))}; "
                    f"valid: {', '.join(commands)}")
    if any(f in HELP_FLAGS for f in fire_flags):
        return [name, *fire_flags]  # help only: Fire calls nothing without arguments
    command = f"{prog} {name}"
    params = inspect.signature(fn).parameters
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()):
        return list(argv)
    names = list(params)
    valid = ", ".join("--" + n.replace("_", "-") for n in names)
    given, positional, out = set(), [], [name]
    rest, i = args[1:], 0
    while i < len(rest):
        arg = rest[i]
        if arg in HELP_FLAGS:
            return [name, "--", "--help", *fire_flags[1:]]
        if arg == "-":
            usage_error(f"unexpected argument '-' for `{command}` (commands cannot be chained)")
        if not _is_flag(arg):
            positional.append(arg)
            out.append(arg)
            i += 1
            continue
        equals = "=" in arg
        key = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        boolean = not equals and (i + 1 == len(rest) or _is_flag(rest[i + 1]))
        if key in params:
            keyword = key
        elif boolean and key.startswith("no") and key[2:] in params:
            keyword = key[2:]
        elif boolean and key.startswith("no_") and key[3:] in params:
            keyword, arg = key[3:], "--no" + key[3:]  # --no-force: Fire only knows --noforce
        elif len(key) == 1 and [n for n in names if n[0] == key]:
            matches = [n for n in names if n[0] == key]
            if len(matches) > 1:
                usage_error(f"flag {arg} for `{command}` is ambiguous: "
                            + " or ".join("--" + m.replace("_", "-") for m in matches))
            keyword = matches[0]
        else:
            shown = arg.split("=", 1)[0]
            usage_error(f"unknown flag {shown} for `{command}`"
                        f"{_closest('--' + key.replace('_', '-'), valid.split(', '))}; valid: {valid}")
        given.add(keyword)
        out.append(arg)
        if not equals and not boolean:
            out.append(rest[i + 1])
            i += 1
        i += 1
    slots = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and n not in given]
    takes = " ".join(n.upper() for n, p in params.items() if p.default is p.empty)
    if len(positional) > len(slots):
        extra = ", ".join(repr(a) for a in positional[len(slots):])
        usage_error(f"too many arguments for `{command}`: {extra} (usage: {command} {takes} [--flags]; "
                    f"valid flags: {valid})")
    filled = set(slots[:len(positional)])
    missing = [n for n, p in params.items() if p.default is p.empty and n not in given and n not in filled]
    if missing:
        usage_error(f"`{command}` needs {' and '.join(n.upper() for n in missing)} "
                    f"(usage: {command} {takes} [--flags]; --help for every flag)")
    return out + fire_flags


inference_and_donate = run_command(1)
receive_and_blend = run_command(2)
