"""Reading the stage scripts' command lines before Fire does: ``JOB`` alone meaning ``run``, a flag of
the other stage or one the command does not take refused in one line, and the help text.

Its own module so that :mod:`chunkflow.cli.stages` (the commands) stays about the commands.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import weakref
from collections.abc import Callable

from chunkflow.cli.common import usage_error

#: command -> {flag it does not take: why}, for :func:`check_command_line` (not an attribute of the
#: command: Fire would list it in the help as a member)
FOREIGN_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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

