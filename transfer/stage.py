"""How every stage (and command) ends: a problem the user can fix is one ``error:`` line and
exit status 1, whatever raised it (a :class:`UserError`, any ``OSError`` with its own message,
running out of memory); a signal is one ``interrupted by`` line; a closed stdout (``| head``)
ends quietly, as Unix tools do. Its outputs are replaced together at its end, or not at all
(:func:`transfer.atomic.staged_outputs`). A bug still raises: its traceback is the right report.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from transfer.atomic import staged_outputs
from transfer.errors import UserError, say
from transfer.interrupts import Interrupted, interrupts_raise

UNCHANGED = "the stage's outputs are as they were"


def stage_parser(doc: str, **paths: str | None) -> argparse.ArgumentParser:
    """A stage's command line: the first line of its ``doc`` as the description, ``--params``,
    and for each of ``paths`` a required path option (``model_out`` is ``--model-out``), its value
    the option's help (None: none)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name, text in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True, help=text)
    return parser


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's ``main`` and exit with one line on user errors, Ctrl-C, SIGTERM or
    SIGHUP: 1 for an error, else 128 + the signal's number as a shell reports it (130 for
    Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    try:
        with interrupts_raise(exiting=True), staged_outputs():
            main(argv)
    except BrokenPipeError:  # the reader of stdout went away: nothing to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(128 + signal.SIGPIPE)
    except UserError as exc:
        message = str(exc)
    except OSError as exc:
        message = "; ".join([str(exc), *getattr(exc, "__notes__", ())]) + f"; {UNCHANGED}"
    except MemoryError:
        message = ("out of memory: lower preprocess.resize and crop, train.batch_size, runtime.inference_batch_size "
                   f"or runtime.image_cache_mb; {UNCHANGED}")
    except KeyboardInterrupt as exc:
        interrupted = Interrupted.of(exc)
        detail = interrupted.detail or "nothing was written to the stage's outputs"
        if os.environ.get("RANK", "0") == "0":  # of several training processes, the first speaks for all
            say(f"interrupted by {interrupted.signal_name}: {detail}")
        sys.exit(interrupted.exit_code)
    else:
        return
    say(f"error: {' '.join(message.splitlines())}")
    sys.exit(1)
