"""Measured processes, and the throw-away DVC copy of the project the benchmark runs in.

Why measure from outside: the figure a user pays is the wall time of the whole command
(``dvc repro train@finetune`` with DVC's start-up, dependency checks and caching; the
reference script with its imports and DataLoader start-up), not a loop timer inside it. The
stages' own run records give the inside view (per-epoch seconds, images per second, the stage
process's peak memory); this module adds the outside one: wall time, CPU time and peak
memory of the command's whole process tree.

Why a copy of the project: timing ``dvc repro`` must not touch the developer's workspace,
DVC cache or dvc.lock, and must start from a known state (the stages to time forgotten, so
they really run, see :meth:`ProjectCopy.forget`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

MIB = 2**20
VENV_BIN = Path(sys.executable).parent
#: Variables that change how OpenMP threads wait (stages/__init__.py sets the first two).
OPENMP_WAIT_VARS = ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY")
#: The processes started here and still running, so an interrupted benchmark can end them.
_LIVE: set[subprocess.Popen[bytes]] = set()


class BenchmarkError(RuntimeError):
    """A measured command failed; the message holds its output's tail."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


class TreeSampler:
    """Samples the memory of a process and all its descendants every ``interval`` seconds,
    in a thread, and keeps the peaks.

    Why sample: the kernel's ``ru_maxrss`` (``wait4``, ``/usr/bin/time -v``) is the peak of
    the *largest single* process of a tree, but the reference loop's four DataLoader workers
    are separate processes whose memory comes on top of the main one. Their resident sizes
    (RSS) summed over-count the pages forked workers share with their parent, so the sum of
    proportional set sizes (PSS: each shared page split among the processes sharing it) is kept
    too: it is what the tree costs the machine. Sampling can miss a peak shorter than the
    interval.
    """

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.max_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while True:
            self._sample(root)
            if self._stop.wait(self.interval):
                return

    def _sample(self, root: Any) -> None:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = count = 0
        for process in processes:
            try:
                info = process.memory_full_info()
            except psutil.Error:  # ended (or a zombie) between listing and reading
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            count += 1
        if count:
            self.samples += 1
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.max_processes = max(self.max_processes, count)


@dataclass
class Measured:
    """One command's outside view. ``largest_process_peak_mib`` is the kernel's ``ru_maxrss``
    from ``wait4`` (the largest single process of the tree); ``cpu_*`` sum the whole tree
    (every descendant that was waited for); ``tree_peak_*`` are sampled (:class:`TreeSampler`)."""

    name: str
    argv: list[str]
    cwd: str
    env_overrides: dict[str, str | None]
    started_at: str
    loadavg_before: list[float]
    returncode: int = 0
    wall_seconds: float = 0.0
    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    largest_process_peak_mib: float = 0.0
    tree_peak_rss_mib: float | None = None
    tree_peak_pss_mib: float | None = None
    tree_max_processes: int | None = None
    memory_samples: int = 0
    stdout: str = ""
    stderr: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def environment(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with the venv's ``bin/`` first on PATH (the stages run
    ``python -m stages.X`` from DVC), and ``overrides`` applied (``None`` removes a variable)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_measured(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], logs: Path, name: str,
                 interval: float, overrides: Mapping[str, str | None] | None = None) -> Measured:
    """Run ``argv`` to completion, stdout and stderr into ``logs/<name>.{out,err}``, and
    measure it (:class:`Measured`). Does not check the exit code."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    measured = Measured(name=name, argv=[str(a) for a in argv], cwd=str(cwd), env_overrides=dict(overrides or {}),
                        started_at=now(), loadavg_before=[round(x, 2) for x in os.getloadavg()],
                        stdout=str(out_path), stderr=str(err_path))
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        # A session of its own: the whole tree can be ended together if the benchmark is
        # interrupted, and a Ctrl-C in the terminal reaches the benchmark only.
        proc = subprocess.Popen(measured.argv, cwd=cwd, env=dict(env), stdout=out, stderr=err,
                                start_new_session=True)
        _LIVE.add(proc)
        try:
            with TreeSampler(proc.pid, interval) as sampler:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
                measured.wall_seconds = round(time.perf_counter() - started, 3)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            end_group(proc)
            raise
        finally:
            _LIVE.discard(proc)
    proc.returncode = measured.returncode = os.waitstatus_to_exitcode(status)
    measured.cpu_user_seconds = round(usage.ru_utime, 2)
    measured.cpu_system_seconds = round(usage.ru_stime, 2)
    measured.largest_process_peak_mib = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    if sampler.samples:
        measured.tree_peak_rss_mib = round(sampler.peak_rss / MIB, 1)
        measured.tree_peak_pss_mib = round(sampler.peak_pss / MIB, 1)
        measured.tree_max_processes = sampler.max_processes
    measured.memory_samples = sampler.samples
    return measured


def end_group(proc: subprocess.Popen[bytes]) -> None:
    """End the process group this module started for ``proc`` (by its id) and reap it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def end_all() -> None:
    """End every command still running (an interrupted benchmark)."""
    for proc in list(_LIVE):
        end_group(proc)


def check(measured: Measured) -> Measured:
    if measured.returncode != 0:
        raise BenchmarkError(f"{measured.name}: {' '.join(measured.argv)} exited {measured.returncode}\n"
                             f"--- stdout (tail)\n{tail(Path(measured.stdout))}\n"
                             f"--- stderr (tail)\n{tail(Path(measured.stderr))}")
    return measured


# --------------------------------------------------------------------------- the project copy

def project_files(root: Path) -> list[str]:
    """The project's files as git sees them: tracked plus untracked-but-not-ignored (as the
    tests' ``conftest.project_files`` does), so work in progress is benchmarked too."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted({name for name in out.split("\0") if name and (root / name).is_file()})


def git_state(root: Path) -> dict[str, Any]:
    """The commit of ``root`` and whether its tracked files differ from it (what was benchmarked)."""
    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "untracked": bool(git("ls-files", "--others", "--exclude-standard"))}


@dataclass
class ProjectCopy:
    """A committed git copy of the project where ``dvc`` runs, with its own DVC site cache
    and HOME (so no global DVC or git config of the machine changes what is measured)."""

    root: Path
    logs: Path
    interval: float
    env: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def dvc_env(base: Path) -> dict[str, str]:
        home = base / "home"
        home.mkdir(parents=True, exist_ok=True)
        return environment({"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(base / "dvc-site-cache"),
                            "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(home)})

    @classmethod
    def create(cls, source: Path, base: Path, logs: Path, interval: float,
               params: Mapping[str, Any]) -> ProjectCopy:
        """Copy ``source``'s files into ``base/repo``, apply ``params`` (dotted keys), commit."""
        root = base / "repo"
        for name in project_files(source):
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target)
        copy = cls(root, logs, interval, cls.dvc_env(base))
        copy.set_params(params)
        copy.git("init", "-q")
        copy.git("add", "-A")
        copy.git("commit", "-q", "-m", "benchmark copy of the project")
        return copy

    def clone(self, base: Path) -> ProjectCopy:
        """A second, independent copy (git history, DVC cache, workspace) for concurrent runs:
        two ``dvc repro`` cannot run in one repository at once."""
        root = Path(shutil.copytree(self.root, base / "repo", symlinks=True))
        return ProjectCopy(root, self.logs, self.interval, self.dvc_env(base))

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=benchmark", "-c", "user.email=benchmark@example.invalid",
                               "-c", "commit.gpgsign=false", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, check=True).stdout

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text(encoding="utf-8"))

    def set_params(self, changes: Mapping[str, Any]) -> None:
        """Set dotted keys (``train.finetune.epochs``) of this copy's params.yaml."""
        raw = self.params()
        for dotted, value in changes.items():
            *parents, last = dotted.split(".")
            node = raw
            for part in parents:
                node = node[part]
            if last not in node:
                raise KeyError(f"params.yaml has no {dotted}")
            node[last] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")

    def forget(self, stages: Sequence[str]) -> None:
        """Make DVC run ``stages`` again: delete their outputs and their dvc.lock entries.

        Why both: with the outputs deleted but the lock entry kept, DVC sees an unchanged
        stage and checks its outputs out of the cache *even with* ``--no-run-cache`` (its
        run-cache ``restore`` first tries the lock entry); without the entry the stage counts
        as changed, and ``--no-run-cache`` keeps DVC from restoring an earlier identical run.
        This is the state a user is in after changing a param the stage reads."""
        lock_path = self.root / "dvc.lock"
        if not lock_path.exists():
            return
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
        entries = lock.get("stages", {})
        for stage in stages:
            for out in (entries.pop(stage, None) or {}).get("outs", []):
                path = self.root / out["path"]
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        lock_path.write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")

    def dvc(self, *args: str, name: str, overrides: Mapping[str, str | None] | None = None) -> Measured:
        """``python -m dvc <args>`` in the copy, measured; fails on a non-zero exit."""
        env = dict(self.env)
        for key, value in (overrides or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return check(run_measured([sys.executable, "-m", "dvc", *args], cwd=self.root, env=env, logs=self.logs,
                                  name=name, interval=self.interval, overrides=overrides))

    def repro(self, target: str, expect: Sequence[str], *, name: str,
              overrides: Mapping[str, str | None] | None = None) -> Measured:
        """Time ``dvc repro --no-run-cache <target>`` after forgetting ``expect`` (the stages
        it must run); fail unless DVC ran each of them."""
        self.forget(expect)
        measured = self.dvc("repro", "--no-run-cache", target, name=name, overrides=overrides)
        output = Path(measured.stdout).read_text(encoding="utf-8", errors="replace")
        missing = [stage for stage in expect if f"Running stage '{stage}'" not in output]
        if missing:
            raise BenchmarkError(f"{name}: dvc repro {target} did not run {missing}\n{tail(Path(measured.stdout))}")
        return measured

    def read_json(self, relative: str) -> dict[str, Any]:
        return json.loads((self.root / relative).read_text(encoding="utf-8"))


@contextlib.contextmanager
def interrupts_end_children() -> Iterator[None]:
    """End the commands still running if the benchmark stops early (Ctrl-C, an error)."""
    try:
        yield
    finally:
        end_all()
