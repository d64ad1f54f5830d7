"""What every chunkflow command line shares: one line per error, exit statuses, logging.

It imports only :mod:`chunkflow.errors`. The CLI is the package :mod:`chunkflow.cli`: its modules
depend on the library, and nothing in the library imports them.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import Callable

from chunkflow.errors import Interrupted, Refusal, Terminated, one_line


def user_errors(fn):
    """One line on stderr for whatever ends a command: a :class:`Refusal` (the user's or the
    data's problem) exits 2; any other exception is a bug in chunkflow and exits 1 with a line
    that says so; Ctrl-C or SIGTERM exits 130 or 143 with a line that says how to resume.
    ``CHUNKFLOW_DEBUG=1`` re-raises instead, with the traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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
            if os.environ.get("CHUNKFLOW_DEBUG"):
                raise
            print(f"chunkflow: bug: {one_line(err, typed=True)} (unexpected: a bug in chunkflow, the "
                  "model or the machine, not a mistake in the command; CHUNKFLOW_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
            sys.exit(1)
    return wrapper


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


def as_process(entry: Callable[[], object]) -> None:
    """Run a command line as the whole life of this process (the scripts' and the console command's
    entry point). An interrupted command (exit 130 or 143, its line already printed and its tasks
    handed back) ends the process at once: Python would otherwise wait at exit for worker threads
    still inside a read or a write of a block that has no done marker, which is recomputed anyway."""
    try:
        entry()
    except SystemExit as exit:
        if exit.code in (130, 143):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit.code)
        raise


def raise_on_sigterm() -> None:
    """SIGTERM (Kubernetes, SLURM preemption) unwinds like Ctrl-C, as :class:`Terminated`."""
    def terminate(signum, frame):
        raise Terminated()
    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (a command called from a library's thread)
        pass

