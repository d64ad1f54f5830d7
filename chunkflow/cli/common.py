"""What every chunkflow command line shares: one line per error, exit statuses, logging.

It imports only :mod:`chunkflow.errors`. The CLI is the package :mod:`chunkflow.cli`: its modules
depend on the library, and nothing in the library imports them.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import select
import signal
import sys
from typing import Callable, NoReturn

from chunkflow.errors import Interrupted, Refusal, Terminated, UsageError, one_line


def user_errors(fn):
    """One line on stderr for whatever ends a command: a :class:`Refusal` (the user's or the
    data's problem) exits 2; any other exception is a bug in chunkflow and exits 1 with a line
    that says so; Ctrl-C or SIGTERM exits 130 or 143 with a line that says how to resume.
    ``CHUNKFLOW_DEBUG=1`` re-raises instead, with the traceback. A BrokenPipeError of our own
    stdout (``chunkflow inspect JOB | head -2``) is no bug: the command ends quietly, exit
    :data:`CLOSED_STDOUT`; one of anything else (a socket) is still a bug."""
    switches = _switches(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_switches(fn, switches, args, kwargs)
            return fn(*args, **kwargs)
        except Interrupted as err:
            print(f"chunkflow: interrupted: {err}", file=sys.stderr)
            sys.exit(err.status)
        except KeyboardInterrupt:
            print("chunkflow: interrupted; run the same command again to resume (finished blocks are kept)",
                  file=sys.stderr)
            sys.exit(130)
        except Refusal as err:
            if os.environ.get("CHUNKFLOW_DEBUG"):
                raise
            print(f"chunkflow: error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:  # noqa: BLE001 - a bug: one line, not a traceback
            if isinstance(err, BrokenPipeError) and stdout_closed():
                leave_closed_stdout(CLOSED_STDOUT)
            if os.environ.get("CHUNKFLOW_DEBUG"):
                raise
            print(f"chunkflow: bug: {one_line(err, typed=True)} (unexpected: a bug in chunkflow, the "
                  "model or the machine, not a mistake in the command; CHUNKFLOW_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
            sys.exit(1)
    return wrapper


def _switches(fn: Callable) -> list[str]:
    """The parameters of ``fn`` annotated ``bool``: flags that take no value."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    return [name for name, p in parameters.items() if p.annotation in (bool, "bool")]


def _check_switches(fn: Callable, switches: list[str], args: tuple, kwargs: dict) -> None:
    """Refuse a value given to an on/off flag (Fire passes ``--cleanup=no`` as the string "no", which is
    true: it deleted donations; ``--force=false`` forced), before the command does anything."""
    if not switches:
        return
    try:
        given = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return  # Fire reports a wrong call itself
    for name in switches:
        value = given.get(name, False)
        if not isinstance(value, bool):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} takes no value (got {value!r}): give {flag} to turn it on, leave it out "
                             "to keep it off")


#: libraries that log their own retries and tracebacks for errors chunkflow reports in one line
NOISY_LOGGERS = ("gcsfs", "fsspec", "google", "urllib3", "cloudfiles")


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def usage_error(message: str) -> None:
    """One line on stderr and exit status 2: the CLIs' answer to a user mistake."""
    print(f"chunkflow: error: {message}", file=sys.stderr)
    sys.exit(2)


#: Exit status of a command whose stdout was closed before it wrote everything (``| head``): 128 + SIGPIPE,
#: what a shell reports for a Unix tool that SIGPIPE ended. SIGPIPE itself stays ignored (Python's default,
#: not SIG_DFL), so that a broken socket raises in the thread that owns it instead of killing a worker.
CLOSED_STDOUT = 128 + getattr(signal, "SIGPIPE", 13)


def stdout_closed() -> bool:
    """Whether our stdout has lost its reader: flushing it raises BrokenPipeError, or (its buffer
    already empty) polling its descriptor reports an error, as a pipe without a reader does."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):  # closed, or no descriptor: not a broken pipe
        return False
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or no descriptor
        return False


def leave_closed_stdout(status: int) -> NoReturn:
    """Exit with ``status`` and nothing on stderr (see :func:`_to_devnull`)."""
    _to_devnull()
    sys.exit(status)


def _to_devnull() -> None:
    """Point stdout at os.devnull, so that the interpreter's last flush of what is still buffered
    for a closed stdout does not fail (the Python docs' note on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _flush_stdout(status: int) -> int:
    """Flush stdout before the process exits with ``status``; returns the status to exit with:
    ``status``, or :data:`CLOSED_STDOUT` if stdout was closed under a command that succeeded."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _to_devnull()
        return status or CLOSED_STDOUT
    except (OSError, ValueError):  # closed by the command, or no descriptor: nothing to flush
        pass
    return status


def as_process(entry: Callable[[], object]) -> None:
    """Run a command line as the whole life of this process (the scripts' and the console command's
    entry point). An interrupted command (exit 130 or 143, its line already printed and its tasks
    handed back) ends the process at once: Python would otherwise wait at exit for worker threads
    still inside a read or a write of a block that has no done marker, which is recomputed anyway.
    What is still buffered for stdout is flushed here, so that a reader gone by then
    (``| head -2`` on a short output) ends the process quietly too."""
    try:
        entry()
        status = 0
    except SystemExit as exit:
        if exit.code in (130, 143):
            logging.shutdown()
            _flush_stdout(exit.code)
            sys.stderr.flush()
            os._exit(exit.code)
        if exit.code is not None and not isinstance(exit.code, int):
            raise  # a message for Python to print
        status = exit.code or 0
    sys.exit(_flush_stdout(status))


def raise_on_sigterm() -> None:
    """SIGTERM (Kubernetes, SLURM preemption) unwinds like Ctrl-C, as :class:`Terminated`."""
    def terminate(signum, frame):
        raise Terminated()
    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (a command called from a library's thread)
        pass

