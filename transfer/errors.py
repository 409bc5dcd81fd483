"""Problems a user can fix (:class:`UserError`) become one line on stderr and exit status 1;
signals one ``interrupted by`` line. A bug still raises: its traceback is the right report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from transfer.interrupts import Interrupted, interrupts_raise


class UserError(Exception):
    """A problem the user can fix; the message is shown as-is, on one line."""


class ParamError(UserError):
    """A bad value of one param, found after the params file loaded (an architecture that
    does not exist, a device this machine lacks). The message starts with the file the
    value came from: ``source``, by default the params file the stage read, which
    :func:`transfer.params.load_params` records in :attr:`source`."""

    source = "params.yaml"

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        super().__init__(f"{source or ParamError.source}: {key} {problem}")


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's ``main`` and exit with a one-line message on user errors, Ctrl-C, SIGTERM
    or SIGHUP: 1 for an error, else 128 + the signal's number as a shell reports it (130 for
    Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    try:
        with interrupts_raise(exiting=True):
            main(argv)
    except UserError as exc:
        message = " ".join(str(exc).split("\n"))
        say(f"error: {message}")
        sys.exit(1)
    except KeyboardInterrupt as exc:
        interrupted = Interrupted.of(exc)
        detail = interrupted.detail or "nothing was written to the stage's outputs"
        if os.environ.get("RANK", "0") == "0":  # of several training processes, the first speaks for all
            say(f"interrupted by {interrupted.signal_name}: {detail}")
        sys.exit(interrupted.exit_code)


def say(line: str) -> None:
    """``line`` on stderr in one write, so that lines of processes sharing it never interleave."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
