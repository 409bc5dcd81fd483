"""Ctrl-C, SIGTERM and SIGHUP stop a stage alike: each raises :class:`Interrupted` where it
arrives (signals sent to this very process), an ignored one stays ignored, a held one takes
effect after the section it arrived in, and ``run_stage`` turns it into one line and the
shell's exit status for the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, stage_env

from transfer.interrupts import SIGNALS, Interrupted, deferred_interrupts, interrupts_raise
from transfer.stage import run_stage

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def send(signum: int, wait: float = 2) -> None:
    """Signal this process and wait (a raising handler cuts the wait short)."""
    os.kill(os.getpid(), signum)
    time.sleep(wait)


@pytest.mark.parametrize("signum", SIGNALS, ids=[signal.Signals(s).name for s in SIGNALS])
def test_each_signal_raises_where_it_arrives(signum: int) -> None:
    # Not ignored, whatever pytest was started under (nohup ignores SIGHUP, a background job
    # SIGINT, and an ignored one stays ignored: tested below); conftest puts it back after.
    signal.signal(signum, signal.SIG_DFL)
    before = signal.getsignal(signum)
    started = time.monotonic()
    with pytest.raises(Interrupted) as raised, interrupts_raise():
        send(signum)
    assert time.monotonic() - started < 1, "the signal did not interrupt the sleep"
    assert raised.value.signum == signum and raised.value.exit_code == 128 + signum
    assert signal.getsignal(signum) == before


def test_an_ignored_signal_stays_ignored() -> None:
    """As for a background job of a non-interactive shell (SIGINT) or under nohup (SIGHUP)."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interrupts_raise():
            send(signal.SIGTERM, wait=0.1)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_held_signal_takes_effect_after_the_section() -> None:
    written = []
    with pytest.raises(Interrupted) as raised, interrupts_raise():
        with deferred_interrupts():
            send(signal.SIGTERM, wait=0.1)
            written.append("history")
            written.append("state")
        written.append("never")
    assert written == ["history", "state"]
    assert raised.value.signum == signal.SIGTERM


@pytest.mark.parametrize(("stop", "code", "line"), [
    (KeyboardInterrupt(), 130, "interrupted by Ctrl-C (SIGINT): nothing was written to the stage's outputs"),
    (Interrupted(signal.SIGTERM), 143, "interrupted by SIGTERM: nothing was written to the stage's outputs"),
    (Interrupted(signal.SIGTERM, "stopped after epoch 2"), 143, "interrupted by SIGTERM: stopped after epoch 2"),
])
def test_run_stage_prints_one_line_and_exits_with_the_signals_status(
        stop: KeyboardInterrupt, code: int, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv: list[str] | None) -> None:
        raise stop

    with pytest.raises(SystemExit) as exited:
        run_stage(main, [])
    assert exited.value.code == code
    assert capsys.readouterr().err == line + "\n"


#: What multiprocessing's resource sharer does in a loader worker when the main process it
#: hands a batch's shared memory to has just gone: it reports the broken pipe to sys.excepthook.
SHARER_MEETS_A_CLOSED_PIPE = """
import sys, threading
from transfer.interrupts import quiet_loader_worker
if sys.argv[1] == "worker":
    quiet_loader_worker(0)
def serve():
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        sys.excepthook(*sys.exc_info())
thread = threading.Thread(target=serve)
thread.start()
thread.join()
"""


@pytest.mark.parametrize("process", ["worker", "main"])
def test_a_loader_worker_prints_no_traceback_of_its_own(process: str) -> None:
    """Signalled with the whole job, the main process says the one line; a worker's
    multiprocessing thread meeting the pipe the main process closed says nothing (elsewhere the
    same report is the traceback it was)."""
    proc = subprocess.run([sys.executable, "-c", SHARER_MEETS_A_CLOSED_PIPE, process], cwd=REPO_ROOT,
                          env=stage_env(), capture_output=True, text=True, timeout=60, check=True)
    assert ("Traceback" in proc.stderr) == (process == "main"), proc.stderr
