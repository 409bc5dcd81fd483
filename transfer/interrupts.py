"""Ctrl-C, SIGTERM and SIGHUP handled alike: one exception, raised where the signal arrives.

SIGTERM (kill, systemd, cloud pre-emption) and SIGHUP (a closed terminal) kill Python on the
spot by default: no ``finally`` runs, temporary files stay, nothing says what happened. Raised
as :class:`Interrupted`, a ``KeyboardInterrupt``, they take every path that already cleans up
after Ctrl-C, and the stage exits with the shell's status for the signal after one line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

#: The signals that stop a stage, and how the message names them (Windows has no SIGHUP).
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
if hasattr(signal, "SIGHUP"):
    NAMES[signal.SIGHUP] = "SIGHUP (the terminal closed)"
SIGNALS = tuple(NAMES)


class Interrupted(KeyboardInterrupt):
    """A signal arrived; ``detail`` says what the stage left and how to go on (default: nothing
    was written)."""

    def __init__(self, signum: int = signal.SIGINT, detail: str | None = None) -> None:
        self.signum, self.detail = signum, detail
        self.signal_name = NAMES.get(signum, f"signal {signum}")
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended
        super().__init__(self.signal_name)

    @classmethod
    def of(cls, exc: KeyboardInterrupt) -> Interrupted:
        """``exc`` as an :class:`Interrupted` (a plain KeyboardInterrupt is a SIGINT)."""
        return exc if isinstance(exc, Interrupted) else cls()


def _raise(signum: int, frame: FrameType | None) -> None:
    # One is enough: a second (torchrun passing on the signal its processes got as well, a
    # second Ctrl-C) must not cut short the clean-up that the first one started.
    for other in SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def _raising() -> dict[int, Any]:
    """Have each of :data:`SIGNALS` but an ignored one raise :class:`Interrupted`; the handlers before."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _raise)
    return previous


@contextlib.contextmanager
def interrupts_raise(exiting: bool = False) -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`; one ignored
    when it starts stays ignored (``nohup``, a background job's SIGINT). ``exiting``: the
    process ends after the block, so later signals stay ignored during its clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _raising()
    restore = True
    try:
        yield
    except KeyboardInterrupt:
        restore = not exiting
        raise
    finally:
        if restore:
            for signum, handler in previous.items():  # None: not set from Python, so the default
                signal.signal(signum, handler or signal.SIG_DFL)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold the signals whose handler is Python code while the block runs, and raise one that
    arrived as soon as it is done: for files that must agree (the history and the resume
    state), which a signal then ends the run before or after, never between."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Callable[[int, FrameType | None], Any]] = {}
    for signum in SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):  # Python code, which raises (not SIG_IGN, SIG_DFL or a C handler)
            previous[signum] = handler  # type: ignore[assignment]
            signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pending:
        previous[pending[0]](pending[0], None)


def quiet_loader_worker(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: SIGTERM and SIGHUP end the worker the quiet way torch
    ends one on Ctrl-C. Signalled with the whole job (systemd, a terminal), a worker would
    otherwise die of them, and torch's "worker killed by signal" would mask the interruption.
    Nor does it print tracebacks of its own: multiprocessing's thread that hands the main
    process each batch's shared memory prints one (through ``sys.excepthook``) where the main
    process has just gone, which then said what happened; torch sends the worker's own errors
    to the main process, which reports them, and reports a worker that died."""
    _raising()
    sys.excepthook = lambda *exc: None
