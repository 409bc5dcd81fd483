"""Ctrl-C, SIGTERM and SIGHUP, handled alike: one exception, raised where the signal arrives.

A terminal's Ctrl-C sends SIGINT; ``kill``, systemd, Kubernetes and cloud pre-emption send
SIGTERM, and a closed terminal or SSH session sends SIGHUP. The default action of the last
two kills Python on the spot: no ``finally`` runs, so temporary files stay behind and
nothing says what happened. :func:`interrupts_raise` makes all three raise
:class:`Interrupted`, a ``KeyboardInterrupt``, so every path that already cleans up after
Ctrl-C (atomic writes, DataLoader workers) does the same for the others, and the stage exits
with the shell's code for the signal (130, 143, 129) after one line
(:func:`transfer.errors.run_stage`). :func:`deferred_interrupts` holds them while a few
files that must agree with each other are written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

#: The signals that stop a stage the way Ctrl-C does, and how the message names them
#: (Windows has no SIGHUP).
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
if hasattr(signal, "SIGHUP"):
    NAMES[signal.SIGHUP] = "SIGHUP (the terminal closed)"
SIGNALS = tuple(NAMES)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived. ``detail`` says what the stage left behind and how to go
    on; without one, :func:`transfer.errors.run_stage` says that nothing was written."""

    def __init__(self, signum: int = signal.SIGINT, detail: str | None = None) -> None:
        self.signum, self.detail = signum, detail
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        return NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, what a shell reports for a process the signal ended."""
        return 128 + self.signum

    @classmethod
    def of(cls, exc: KeyboardInterrupt) -> Interrupted:
        """``exc`` as an :class:`Interrupted` (a plain KeyboardInterrupt is a SIGINT)."""
        return exc if isinstance(exc, Interrupted) else cls(signal.SIGINT)


def _raise(signum: int, frame: FrameType | None) -> None:
    # One is enough: a second (torchrun passing on the signal its processes got as well, a
    # second Ctrl-C) must not cut short the clean-up that the first one started.
    for other in SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise(exiting: bool = False) -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`.

    A signal that is ignored when the block starts stays ignored (a background job of a
    non-interactive shell starts with SIGINT ignored, and ``nohup``-like launchers ignore
    others on purpose). Once one has arrived, further ones are ignored while the clean-up
    runs; ``exiting``: the process ends after the block, so they stay ignored after it too.
    Outside the main thread, where Python cannot set handlers, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _raise)
    try:
        yield
    except BaseException as exc:
        if not (exiting and isinstance(exc, KeyboardInterrupt)):
            _restore(previous)
        raise
    _restore(previous)


def _restore(handlers: dict[int, Any]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the block runs; one that arrived meanwhile takes effect
    (its handler runs, raising) as soon as the block is done.

    For files that must agree with each other, such as the training history and the state a
    run resumes from: a signal can end the run before them or after them, never between.
    Only signals whose handler is Python code are held; ignored ones and the OS default
    (which would end the process anyway) are left alone.
    """
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
    """A DataLoader's ``worker_init_fn``: SIGTERM and SIGHUP end the worker quietly, as
    Ctrl-C does.

    A terminal, systemd and Kubernetes signal every process of a job, loader workers
    included. Torch's workers then die of SIGTERM or SIGHUP, and torch raises "DataLoader
    worker ... is killed by signal" in the main process in place of its clean interruption.
    Raising :class:`Interrupted` instead, a worker leaves through torch's own handling of
    Ctrl-C in workers (a quiet, successful exit), and the main process stops as usual. A
    signal the stage was started with ignored stays ignored.
    """
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise)
