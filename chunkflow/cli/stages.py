"""Stage entry points for fleets: ``inference_and_donate.py`` and ``receive_and_blend.py``.

Each has two commands::

    python inference_and_donate.py run JOB --blocks all --device cuda:0     blocks of a job, here
    python inference_and_donate.py worker QUEUE [--job JOB] [--wait]        lease tasks from a queue
    python receive_and_blend.py run JOB --blocks 0-128_0-128_0-16,128-256_0-128_0-16
    python receive_and_blend.py worker QUEUE

``python inference_and_donate.py JOB ...`` (no command) still means ``run`` (see :func:`_means_run`).
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import signal
import sys
import weakref
from collections.abc import Callable

import fire

from chunkflow.bbox import Bbox, Vec
from chunkflow.cli.common import setup_logging, usage_error, user_errors
from chunkflow.cli.stage_two_guard import require_stage_one
from chunkflow.job import Job, JobError
from chunkflow.planning import load_job
from chunkflow.units import count

log = logging.getLogger(__name__)

SCRIPTS = {1: "inference_and_donate.py", 2: "receive_and_blend.py"}


def select_blocks(job: Job, blocks) -> list[Vec] | None:
    """``all`` -> None (every block); otherwise block names ``x0-x1_y0-y1_z0-z1`` (comma or list)."""
    if blocks in (None, "all"):
        return None
    example = job.layout.block_box(Vec(0, 0, 0)).name
    if isinstance(blocks, str):
        names = [b for b in blocks.replace(";", ",").split(",") if b.strip()]
    elif isinstance(blocks, (list, tuple)):
        names = [str(b) for b in blocks]
    else:
        raise JobError(f"--blocks {blocks!r} is not 'all' or a list of block names like {example}")
    if not names:
        raise JobError(f"--blocks {blocks!r} selects no block; give 'all' or block names like {example}")
    selected = []
    for name in names:
        try:
            box = Bbox.from_name(name)
        except ValueError as err:
            raise JobError(f"--blocks {name!r}: {err}; use 'all' or names like {job.layout.block_box(Vec(0, 0, 0)).name}") from None
        selected.append(job.layout.block_index_of(box))
    return selected


RUN_ARGS = {
    "job": "the job's store (the --donations location given to `chunkflow plan`).",
    "blocks": "'all' or block names x0-x1_y0-y1_z0-z1 separated by commas.",
    "device": "cpu, cuda or cuda:N (default: the job's).",
    "batch_size": "patches per forward pass (default: the job's).",
    "force": "rerun blocks that are already done.",
    "cleanup": "delete each block's donations after it is written, and the leftover donations of blocks "
               "already done (late duplicates of their donors).",
    "quiet": "no progress bar.",
}
RUN_NOTE = """Every selected block is tried: a block that fails (e.g. its donations are missing or
corrupt) is reported in one line at the end and the exit status is non-zero (2, or 1 if
a block failed unexpectedly)."""
#: what stage two's ``run`` adds to RUN_NOTE
STAGE_TWO_NOTE = """

Stage two first checks that stage one is done for every block the selected blocks depend on;
if not, it is refused in one line (exit 2, --force or not) and nothing is written."""

#: per stage, the flags of the other stage's ``run`` and why this stage refuses them
OTHER_STAGE_FLAGS: dict[int, dict[str, str]] = {
    1: {"cleanup": "--cleanup is a stage-two flag (receive_and_blend deletes the donations it consumed)"},
    2: {name: f"--{name.replace('_', '-')} is a stage-one flag (inference_and_donate runs the network)"
        for name in ("device", "batch_size")},
}

#: command -> {flag it does not take: why}, for :func:`check_command_line` (not an attribute of the
#: command: Fire would list it in the help as a member)
FOREIGN_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_command(stage: int) -> Callable[..., None]:
    """The ``run`` command of a stage script: stage one takes --device/--batch-size, stage two
    --cleanup; a flag of the other stage is refused in one line by :func:`check_command_line`."""
    if stage == 1:
        def run(job: str, blocks: str = "all", device: str | None = None, batch_size: int | None = None,
                force: bool = False, quiet: bool = False) -> None:
            _run_blocks(1, job, blocks, device=device, batch_size=batch_size, force=force, quiet=quiet)
    else:
        def run(job: str, blocks: str = "all", force: bool = False, cleanup: bool = False,
                quiet: bool = False) -> None:
            _run_blocks(2, job, blocks, force=force, cleanup=cleanup, quiet=quiet)
    names = inspect.signature(run).parameters
    run.__doc__ = (f"Run stage {'one' if stage == 1 else 'two'} for blocks of a planned job, in this process.\n\n"
                   "Args:\n" + "".join(f"    {n}: {RUN_ARGS[n]}\n" for n in names) + "\n" + RUN_NOTE
                   + (STAGE_TWO_NOTE if stage == 2 else ""))
    command = user_errors(run)
    FOREIGN_FLAGS[command] = OTHER_STAGE_FLAGS[stage]
    return command


def _run_blocks(stage: int, job: str, blocks: str, device: str | None = None, batch_size: int | None = None,
                force: bool = False, cleanup: bool = False, quiet: bool = False) -> None:
    from chunkflow.engines import LocalEngine, run_stage
    from chunkflow.engines.failures import exit_status

    setup_logging(quiet)
    planned = load_job(job).with_runtime(device=device, batch_size=batch_size)
    selected = select_blocks(planned, blocks)
    if stage == 1:
        from chunkflow.backends import require_device, verify_model

        require_device(planned.device)  # before any block's markers are written
        verify_model(planned.model, planned.weights, planned.model_checksum)  # and the model is the planned one
    else:
        require_stage_one(planned, selected, job)  # before any block's markers are written, --force or not
    summary = run_stage(planned, stage, LocalEngine(), selected, force=force,
                        progress=not quiet, cleanup=cleanup, check=False)
    work = count(summary.stats.patches, "patch", "patches") if stage == 1 else \
        f"{count(summary.stats.donations, 'piece')} received"
    print(f"stage {'one' if stage == 1 else 'two'}: {count(summary.tasks, 'block')} run, {summary.skipped} already "
          f"done, {work}, {summary.seconds:.2f} s{summary.counts()}")
    if summary.swept:
        print(f"cleanup: {count(summary.swept, 'leftover donation')} of finished blocks removed")
    if summary.stats.filled_chunks:
        print(f"input: {count(summary.stats.filled_chunks, 'missing chunk')} read as zeros (--fill-missing)")
    report_failures([f.line() for f in summary.failures], exit_status(summary.failures))


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
               batch_size: int | None = None, max_attempts: int = 3, slots: int | None = None,
               quiet: bool = False) -> None:
        """Lease this stage's tasks from QUEUE and run them until the queue is empty.

        A task that was leased by a worker that died comes back when its lease runs out; this
        worker waits for it while others hold leases. A task that fails is handed back for another
        attempt and the worker goes on; after --max-attempts it is given up (deleted from the
        queue, its failed marker kept), and this worker exits 2 at the end (1 if the last error of
        a task given up was a bug), one line per task given up.

        A worker serves one job: --job's, or else the job of the first task of its stage that it
        leases (it binds itself to that job). A task of another job is handed back to the queue at
        once, with one warning line per job; without --wait, a worker that then finds only other
        jobs' tasks stops once its own job's stage is complete. Exits 2 at once on a task whose
        job's manifest changed after the tasks were produced.

        Args:
            queue: fq:///shared/dir or sqs://NAME (region AWS_DEFAULT_REGION, endpoint AWS_ENDPOINT_URL_SQS).
            job: serve only this job (its store); default: the job of the first task leased.
                Tasks of any other job are handed back (docs/security.md).
            lease: seconds a task stays invisible to others; renewed every lease/3 s while it runs,
                so it only bounds how soon a dead worker's task comes back.
            wait: keep polling when the queue is empty (a long-lived fleet worker).
            poll: seconds between polls of an empty queue.
            force: rerun tasks whose block is already done.
            cleanup: (stage two) delete each block's donations after it is written, and the leftover
                donations of a block already done when its task is leased again.
            max_tasks: stop after this many tasks (attempts that failed included).
            device: cpu, cuda or cuda:N (default: the job's; one worker per GPU).
            batch_size: patches per forward pass (default: the job's).
            max_attempts: attempts of a task (counted across workers, killed ones included) before it is given up.
            slots: task slots of this worker (default: 2 for stage one, whose blocks it pipelines: up to
                2 per slot at once, one reading or on the model, one writing behind it; 1 runs one block
                at a time, reading the next ahead, for the least memory; 1 for stage two).
            quiet: log warnings only.
        """
        from chunkflow.engines.queue_worker import work

        setup_logging(quiet)
        signal.signal(signal.SIGTERM, _terminate)
        summary = work(queue, stage, job_store=job, lease=lease, wait=wait, poll=poll, force=force,
                       max_tasks=max_tasks, device=device, batch_size=batch_size, cleanup=cleanup,
                       max_attempts=max_attempts, slots=slots)
        print(summary.line())
        report_failures(summary.given_up, summary.exit_status())
    return worker


def _terminate(signum, frame) -> None:
    """SIGTERM (Kubernetes, SLURM preemption): unwind, so the leased task is handed back at once."""
    sys.exit(128 + signum)


def main(stage: int, argv: list[str] | None = None) -> None:
    """Fire entry point of a stage script; a first argument that is no command means ``run``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command(stage), "worker": worker_command(stage)}
    if _means_run(argv, list(commands)):
        argv.insert(0, "run")
    fire.Fire(commands, command=check_command_line(commands, argv, SCRIPTS[stage]), name=SCRIPTS[stage])


def _means_run(argv: list[str], commands: list[str]) -> bool:
    """Whether ``argv`` is ``JOB [--flags]``, the stage script's ``run`` without its name. A first
    argument that is no command is read as the job only when it is the one positional argument and
    does not look like a mistyped command (a word with no '/' or ':', close to a command's name, that
    names no file or directory here): ``rnu /tmp/job``, ``wroker fq:///q`` or ``rnu`` is then refused
    as an unknown command, not read as a job."""
    if not argv or argv[0] in commands or argv[0].startswith("-"):
        return False
    first = argv[0]
    mistyped = ("/" not in first and ":" not in first and not os.path.exists(first)
                and bool(difflib.get_close_matches(first, commands, cutoff=0.6)))
    return not mistyped and len(_positionals(argv)) == 1


def _positionals(argv: list[str]) -> list[str]:
    """The positional arguments of ``argv``, read the way :func:`check_command_line` reads flags:
    ``--flag value`` takes the next argument unless it is a flag, ``--flag=value`` does not; the
    arguments after a final ``--`` are Fire's."""
    argv, _ = _split_fire_flags(argv)
    positional, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not _is_flag(arg):
            positional.append(arg)
        elif "=" not in arg and i + 1 < len(argv) and not _is_flag(argv[i + 1]):
            i += 1
        i += 1
    return positional


# ---- the command line, checked before Fire runs anything ---------------------------------------
#
# Fire hands arguments a command does not take to whatever the command returned, so a mistyped
# flag would only be reported after the command ran (tasks enqueued, a whole job computed). The
# command line is therefore parsed here first, the way Fire parses it (``--flag value``,
# ``--flag=value``, ``--flag`` before another flag or at the end for True, ``--noflag`` for False,
# ``-x`` as listed by --help (:func:`short_flags`), ``-`` and ``_`` alike), and refused in one line.
# ``--help`` is rendered here too, from Fire's help text, so that it lists exactly the short flags
# accepted here: Fire's help offers ``-x`` for the one parameter *with a default* starting with x,
# while its parser wants the one parameter of all (``-q`` of `produce JOB QUEUE ... --quiet` is
# ambiguous to the parser), and ``-h`` always means help.

HELP_FLAGS = ("-h", "--help")
FIRE_VERBOSE = ("-v", "--verbose")


def short_flags(fn: Callable[..., object]) -> dict[str, str]:
    """``{letter: parameter}``: the single-letter flags a command takes, and its help lists.

    ``-x`` names the one parameter starting with x, if that parameter is optional (or keyword-only);
    ``-h`` is always help.
    """
    params = inspect.signature(fn).parameters
    letters = [n[0] for n in params]
    return {n[0]: n for n, p in params.items()
            if letters.count(n[0]) == 1 and n[0] != "h" and (p.default is not p.empty or p.kind == p.KEYWORD_ONLY)}


def help_text(fn: Callable[..., object], name: str, prog: str, verbose: bool = False) -> str:
    """Fire's help screen of command ``name``, with a short flag only where :func:`short_flags` has it."""
    from fire import helptext, trace

    fire_trace = trace.FireTrace(fn, name=prog)
    fire_trace.AddAccessedProperty(fn, name, [name], None, None)
    shorts = short_flags(fn)

    def keep(match: re.Match) -> str:
        letter, flag = match.group(2), match.group(3)
        return match.group(0) if shorts.get(letter) == flag else match.group(1) + "--" + flag

    text = helptext.HelpText(fn, trace=fire_trace, verbose=verbose)
    text = re.sub(r"^(\s*(?:\x1b\[[\d;]*m)*)-([A-Za-z]), --(\w+)", keep, text, flags=re.MULTILINE)
    return re.sub(r"--(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), text)  # as the docs spell flags


def _show_help(fn, name: str, prog: str, fire_flags: list[str]) -> None:
    """Print the help of command ``name`` the way Fire does (stderr, paged on a terminal), exit 0."""
    from fire.core import Display

    Display([help_text(fn, name, prog, verbose=any(f in FIRE_VERBOSE for f in fire_flags))], out=sys.stderr)
    sys.exit(0)


def _split_fire_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` cut at its last ``--``: (the command's arguments, Fire's flags from ``--`` on)."""
    if "--" not in argv:
        return list(argv), []
    cut = len(argv) - 1 - argv[::-1].index("--")
    return argv[:cut], argv[cut:]


def _is_flag(arg: str) -> bool:
    """Fire's notion of a flag (so ``-1,2,3`` and ``-5`` are values, not flags)."""
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def _closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def check_command_line(commands: dict, argv: list[str], prog: str) -> list[str]:
    """The arguments to give Fire for ``argv``, checked against the selected command's signature.

    An unknown command or flag, a flag of the other stage, a single-letter flag that
    :func:`short_flags` does not list, too many or too few positional arguments end the process
    with one line (exit 2) before anything runs. ``--help``/``-h`` anywhere shows the command's
    help (:func:`help_text`) and runs nothing; Fire's own flags go after a ``--``. ``--no-flag``
    is rewritten to Fire's ``--noflag``, ``-x`` to the long flag it stands for.
    """
    args, fire_flags = _split_fire_flags(argv)
    if not args or args[0] in HELP_FLAGS:
        # Fire lists the commands; given after "--" it does so without its "INFO: Showing help" line
        return ["--", "--help", *fire_flags[1:]] if args else list(argv)
    name = args[0]
    fn = commands.get(name, commands.get(name.replace("-", "_")))
    if fn is None and name.startswith("-"):
        usage_error(f"`{prog}` takes a command first ({' or '.join(commands)}), then its arguments; got {name}")
    if fn is None:
        usage_error(f"unknown command {name!r} for `{prog}`{_closest(name, list(commands))}; "
                    f"valid: {', '.join(commands)}")
    if any(f in HELP_FLAGS for f in fire_flags):
        _show_help(fn, name, prog, fire_flags)
    command = f"{prog} {name}"
    params = inspect.signature(fn).parameters
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()):
        return list(argv)
    names = list(params)
    valid = ", ".join("--" + n.replace("_", "-") for n in names)
    shorts = short_flags(fn)
    foreign = FOREIGN_FLAGS.get(fn, {})
    given, positional, out = set(), [], [name]
    rest, i = args[1:], 0
    while i < len(rest):
        arg = rest[i]
        if arg in HELP_FLAGS:
            _show_help(fn, name, prog, fire_flags)
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
        elif len(key) == 1 and key in shorts:
            keyword = shorts[key]
            arg = f"--{keyword}" + ("=" + arg.split("=", 1)[1] if equals else "")
        elif len(key) == 1 and [n for n in names if n[0] == key]:
            matches = " or ".join("--" + n.replace("_", "-") for n in names if n[0] == key)
            if " or " in matches:
                usage_error(f"flag {arg} for `{command}` is ambiguous: {matches}")
            usage_error(f"flag {arg.split('=', 1)[0]} for `{command}` is not a short flag; use {matches}")
        else:
            shown = arg.split("=", 1)[0]
            other = [foreign[k] for k in (key, key[2:].lstrip("_") if key.startswith("no") else "") if k in foreign]
            if other:
                usage_error(f"{other[0]}; `{command}` does not take it")
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
