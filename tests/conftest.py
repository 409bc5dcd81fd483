"""Shared fixtures: tiny generated data sets, a real loopback HTTP server, params files, a
throw-away copy of the repository for running the real DVC CLI.

Everything here is built from real components (PIL images in a real zip, a real
``ThreadingHTTPServer`` on 127.0.0.1, the real ``dvc`` and ``git``) so the tests exercise
what users run; failures are injected at the edges (the server's answers), never by mocking
the code under test. Nothing here touches the internet.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# The stages and the library are imported in-process; make that work however pytest is run.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


#: Session-scoped builds whose tests must share a worker, so that each is built once: the
#: scope their test files are sent to (the pipeline's experiments are a copy of it).
SHARED_BUILDS = {"pipeline": "pipeline", "experiments": "pipeline", "beside_pipeline": "pipeline",
                 "trained": "trained"}


def shared_build_scopes(folder: Path = Path(__file__).parent) -> dict[str, str]:
    """Test file -> the scope of the shared build its tests use, read from their source: a test
    that takes one of :data:`SHARED_BUILDS` as a fixture, or starts beside the pipeline."""
    scopes = {}
    for path in sorted(folder.glob("test_*.py")):
        functions = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)]
        names = {arg.arg for f in functions for arg in f.args.args} | {
            node.id for f in functions for decorator in f.decorator_list for node in ast.walk(decorator)
            if isinstance(node, ast.Name)}
        found = [SHARED_BUILDS[name] for name in SHARED_BUILDS if name in names]
        if found:
            scopes[f"{folder.name}/{path.name}"] = found[0]
    return scopes


#: The test files that take longest after the shared pipeline's tests (each runs several
#: processes that import torch), sent out right after them: the many short files then fill the
#: end of the run on both cores, where a long one would end it on one.
SLOW_FILES = ("tests/test_resume.py", "tests/test_distributed.py", "tests/test_train_stage.py",
              "tests/test_features.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scheduling (tests on both cores): each test file on one worker, so that its module
    fixtures are made once, and the files of a shared build on one worker, so that it is
    built once (``--dist loadgroup`` would do it, but its groups are lost on pytest 9.2). The
    longest first: the pipeline's tests, then :data:`SLOW_FILES`."""
    from xdist.scheduler import LoadScopeScheduling

    scopes = shared_build_scopes()
    assert all((REPO_ROOT / file).is_file() for file in SLOW_FILES), SLOW_FILES

    class OneWorkerPerBuild(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return scopes.get(file, file)

        def _assign_work_unit(self, node: Any) -> None:
            for scope in reversed(("pipeline", *SLOW_FILES)):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return OneWorkerPerBuild(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that use the pipeline's experiments late, and those that wait for a run started
    beside the pipeline last: both run in the background from the moment the pipeline is
    built, beside the tests that need neither (``dvc_pipeline.beside_pipeline``)."""
    pipeline = sys.modules.get("dvc_pipeline")
    beside = pipeline.registered_beside() if pipeline else set()
    items.sort(key=lambda item: (item.name in beside, "experiments" in getattr(item, "fixturenames", ())))


#: The signals that stop a stage, and this process's handlers of them as pytest started it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_HANDLERS = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}


@pytest.fixture(autouse=True)
def _signal_handlers() -> Iterator[None]:
    """Each test starts and ends with the handlers pytest started with: a stage that ran here
    and ended by a signal or Ctrl-C leaves its handlers (or, after a signal, the signals
    ignored) for its process's last moments, which in a test worker are the next tests'."""
    for sig, handler in _HANDLERS.items():
        signal.signal(sig, handler)
    yield
    for sig, handler in _HANDLERS.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback and '.invalid' requests must never be routed through a proxy of the host."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- data sets

#: One clearly different colour per class, so a model can learn the generated images.
CLASS_COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (230, 200, 30), (160, 40, 200)]
#: Fixed zip timestamps, so the same arguments give byte-identical archives (stable sha256).
ZIP_TIME = (2020, 1, 1, 0, 0, 0)
EXTRAS = frozenset({"gif", "corrupt", "litter"})
GIF_NAME = "imageNotFound.gif"
CORRUPT_NAME = "corrupt.jpg"


def make_image(colour: tuple[int, int, int], size: int, seed: str, fmt: str = "PNG") -> bytes:
    """A ``size``x``size`` image of ``colour`` with light per-pixel noise, encoded as ``fmt``."""
    rng = random.Random(seed)
    pixels = [tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
              for _ in range(size * size)]
    image = Image.new("RGB", (size, size))
    image.putdata(pixels)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def sideways_jpeg(path: Path, left: tuple[int, int, int], right: tuple[int, int, int],
                  width: int = 64, height: int = 32) -> Path:
    """A JPEG stored ``width`` x ``height``, ``left`` colour on its left half and ``right`` on
    its right, whose EXIF says to turn it 90 degrees clockwise (Orientation 6), as phones
    store photos: upright it is ``height`` wide, ``left`` on top."""
    image = Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def bilevel_png(width: int, height: int) -> bytes:
    """A genuine black ``width`` x ``height`` PNG of 1 bit a pixel: a few kB even past
    Pillow's decompression-bomb limit (10,000 x 10,000 is about 13 kB), so tests can hold
    images that are too large to decode without making one."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(zf: zipfile.ZipFile, name: str, data: bytes | None = None) -> None:
    """Write a member with fixed metadata; ``data=None`` writes a folder entry."""
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    if data is None:
        info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
        zf.writestr(info, b"")
    else:
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data)


def make_dataset_zip(
    path: str | os.PathLike[str],
    classes: Iterable[str] = ("ants", "bees"),
    n_train: int = 6,
    n_val: int = 4,
    size: int = 32,
    n_test: int = 0,
    top: str = "hymenoptera_data",
    extra: Iterable[str] = (),
    fmt: str = "PNG",
) -> Path:
    """Write a tiny image-folder zip laid out like hymenoptera_data.zip and return its path.

    ``<top>/{train,val[,test]}/<class>/<class>_<split>_<i>.png`` (folder entries included, as
    in the real archive); ``top=""`` puts the splits at the archive's top. A split with 0 images is
    left out entirely. ``extra`` adds, by name:

    * ``"gif"``: ``train/<first class>/imageNotFound.gif``, a valid GIF of an unsupported type
      (the real archive has one);
    * ``"corrupt"``: ``val/<last class>/corrupt.jpg``, a truncated JPEG that does not decode;
    * ``"litter"``: ``__MACOSX/`` resource forks, ``.DS_Store`` files and a valid image inside
      ``train/<first class>/.ipynb_checkpoints/``, all of which must be ignored.

    The same arguments always give the same bytes.
    """
    classes = tuple(classes)
    extra = set(extra)
    if extra - EXTRAS:
        raise ValueError(f"unknown extra {sorted(extra - EXTRAS)}; known: {sorted(EXTRAS)}")
    fmt = fmt.upper()
    suffix = {"PNG": ".png", "JPEG": ".jpg"}[fmt]
    prefix = f"{top}/" if top else ""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        if top:
            _add(zf, prefix)
        for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
            if count == 0:
                continue
            _add(zf, f"{prefix}{split}/")
            for k, cls in enumerate(classes):
                _add(zf, f"{prefix}{split}/{cls}/")
                colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
                for i in range(count):
                    name = f"{cls}_{split}_{i}"
                    _add(zf, f"{prefix}{split}/{cls}/{name}{suffix}",
                         make_image(colour, size, name, fmt))
        if "gif" in extra:
            gif = io.BytesIO()
            Image.new("P", (8, 8)).save(gif, format="GIF")
            _add(zf, f"{prefix}train/{classes[0]}/{GIF_NAME}", gif.getvalue())
        if "corrupt" in extra:
            jpeg = make_image(CLASS_COLOURS[0], max(size, 64), "corrupt", "JPEG")
            _add(zf, f"{prefix}val/{classes[-1]}/{CORRUPT_NAME}", jpeg[: len(jpeg) // 2])
        if "litter" in extra:
            _add(zf, "__MACOSX/")
            _add(zf, f"__MACOSX/{prefix}train/{classes[0]}/._{classes[0]}_train_0{suffix}", b"\0" * 82)
            _add(zf, f"{prefix}.DS_Store", b"\0\0\0\1Bud1")
            _add(zf, f"{prefix}train/{classes[0]}/.DS_Store", b"\0\0\0\1Bud1")
            _add(zf, f"{prefix}train/{classes[0]}/.ipynb_checkpoints/")
            _add(zf, f"{prefix}train/{classes[0]}/.ipynb_checkpoints/x-checkpoint{suffix}",
                 make_image(CLASS_COLOURS[0], size, "checkpoint", fmt))
    return path


@pytest.fixture
def make_zip() -> Callable[..., Path]:
    """:func:`make_dataset_zip`, as a fixture for tests that need custom archives."""
    return make_dataset_zip


@pytest.fixture
def dataset_zip(tmp_path: Path) -> Path:
    """A tiny hymenoptera-like zip (2 classes, 6 train + 4 val PNGs each) with the real
    archive's oddities: an unsupported .gif and __MACOSX/.DS_Store litter."""
    return make_dataset_zip(tmp_path / "src" / "hymenoptera_data.zip", extra=("gif", "litter"))


# --------------------------------------------------------------------------- params

DELETE = object()  #: a value for :func:`write_params` that removes the key


def set_keys(raw: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted keys (``data.url``) set, or removed by DELETE."""
    raw = copy.deepcopy(raw)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return raw


def write_params(dest: str | os.PathLike[str], changes: Mapping[str, Any] | None = None) -> Path:
    """Write the repository's params.yaml with ``changes`` applied to ``dest``.

    Starting from the committed file keeps tests on the real schema as keys are added.
    """
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(set_keys(raw, changes or {}), sort_keys=False), encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- HTTP server

#: ``fail_first`` value meaning "every request fails".
ALWAYS = 10**9


@dataclass
class Route:
    """How the server answers one path.

    The first ``fail_first`` requests fail as ``fail_with`` says: an HTTP status code (500,
    503, 429...), ``"truncate"`` (announce the full Content-Length, send half, close) or
    ``"stall"`` (send the headers and half the body, then go silent for ``stall`` seconds).
    Later requests get ``status`` with ``body``.
    """

    body: bytes
    status: int = 200
    content_type: str = "application/zip"
    fail_first: int = 0
    fail_with: int | str = 500
    stall: float = 5.0
    hits: int = 0


@dataclass
class LoopbackServer:
    """A real HTTP server on 127.0.0.1 serving :class:`Route` s, with a request log."""

    base_url: str
    routes: dict[str, Route] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, name: str, body: bytes, **options: Any) -> str:
        """Serve ``body`` at ``/<name>`` (options: see :class:`Route`); return its URL."""
        self.routes[name] = Route(body, **options)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def hits(self, name: str) -> int:
        """How many requests reached ``/<name>``."""
        with self.lock:
            return self.log.count(f"/{name}")


def _handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output quiet

        def do_GET(self) -> None:
            with server.lock:
                server.log.append(self.path)
                route = server.routes.get(self.path.lstrip("/"))
                if route is not None:
                    route.hits += 1
                    failing = route.hits <= route.fail_first
            if route is None:
                self._answer(404, b"<html><body>not found</body></html>", "text/html")
            elif not failing:
                self._answer(route.status, route.body, route.content_type)
            elif isinstance(route.fail_with, int):
                self._answer(route.fail_with, b"<html><body>try later</body></html>", "text/html")
            elif route.fail_with == "truncate":
                self._head(200, len(route.body), route.content_type)
                self.wfile.write(route.body[: len(route.body) // 2])
                self.wfile.flush()
                self.close_connection = True
            elif route.fail_with == "stall":
                self._head(200, len(route.body), route.content_type)
                self.wfile.write(route.body[: len(route.body) // 2])
                self.wfile.flush()
                server.stop.wait(route.stall)
                self.close_connection = True
            else:
                raise ValueError(f"unknown failure {route.fail_with!r}")

        def _head(self, status: int, length: int, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            if status >= 400:
                self.send_header("Connection", "close")
            self.end_headers()

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self._head(status, len(body), content_type)
            self.wfile.write(body)

    return Handler


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    """A real HTTP server on 127.0.0.1 (a free port), running in a thread for one test."""
    server = LoopbackServer(base_url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    server.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port() -> int:
    """A loopback port that was bound and closed again, so connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- stage output checks

def error_line(stderr: str) -> str:
    """The one ``error:`` line a failing stage prints; fail if stderr holds anything else
    than that line and ``warning:`` lines (retries), e.g. a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    others = [line for line in lines if not line.startswith(("error:", "warning:"))]
    assert not others, stderr
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files/folders that atomic writes must never leave behind."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and
                  (p.name.endswith(".tmp") or p.name.endswith(".old")))


def processes_in_group(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(status.parent.name))
    return found


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 120) -> None:
    """Poll ``condition`` while ``process`` runs; fail if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the stage ended first ({process.returncode}):\n{process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out")
        time.sleep(0.05)


def stage_env() -> dict[str, str]:
    """Environment for subprocesses: no proxies, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return env


@contextlib.contextmanager
def torchrun_here() -> Iterator[None]:
    """For running, in this process, a stage that asks for several processes (a start-up of
    torch costs more than such a test's training): the stage's torchrun agent, here, takes over
    the termination signals and sets OMP_NUM_THREADS for its processes; both are put back."""
    handlers, threads = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}, os.environ.get("OMP_NUM_THREADS")
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.environ.pop("OMP_NUM_THREADS", None)
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads


def run_module(module: str, args: Iterable[str], cwd: Path = REPO_ROOT,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> <args>`` like DVC does and capture its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


# --------------------------------------------------------------------------- DVC repository copy

@dataclass
class DvcRepo:
    """A git repository holding a copy of the project, for running the real DVC CLI."""

    root: Path
    env: dict[str, str]

    def set_params(self, changes: Mapping[str, Any]) -> None:
        """Change dotted keys of this copy's params.yaml (a YAML round-trip)."""
        path = self.root / "params.yaml"
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        path.write_text(yaml.safe_dump(set_keys(raw, changes), sort_keys=False), encoding="utf-8")

    def dvc(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``python -m dvc <args>`` in the copy; with ``check``, fail showing its output."""
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"dvc {' '.join(args)} exited {proc.returncode}\n"
                        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        return proc

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid",
                               "-c", "commit.gpgsign=false", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, check=True).stdout


def project_files(root: Path = REPO_ROOT) -> list[str]:
    """The project's files as git sees them: tracked plus untracked-but-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted({name for name in out.split("\0") if name and (root / name).is_file()})


def copy_project(root: Path) -> None:
    """Copy the project's files (as git sees them, see :func:`project_files`) into ``root``."""
    for name in project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)


#: Who commits in the copies, as DvcRepo.git says with -c: DVC's own git (``dvc exp run`` commits
#: experiments and stashes a changed workspace) reads it from these variables.
GIT_IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "test"), ("EMAIL", "test@example.invalid"))}


def dvc_env(home: Path, site_cache: Path, **extra: str) -> dict[str, str]:
    """The stages' environment for the dvc CLI, with its own HOME and site cache, no
    telemetry, and a git identity (the throw-away HOME has no git config)."""
    env = stage_env()
    env.update({
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(site_cache),
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(home),
        **GIT_IDENTITY,
        **extra,
    })
    home.mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def dvc_repo(tmp_path: Path) -> DvcRepo:
    """A committed git copy of the project in ``tmp_path/"repo"`` (no data, no DVC cache)."""
    root = tmp_path / "repo"
    copy_project(root)
    repo = DvcRepo(root, dvc_env(tmp_path / "home", tmp_path / "dvc-site-cache"))
    repo.git("init", "-q")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "copy of the project")
    return repo


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The weights stage's ``models/pretrained.pt`` for ``model.weights: none``: the backbone is
    torch's initialisation from the seed, as the train and features stages build it."""
    from imagefolders import tiny_params

    import stages.weights

    root = tmp_path_factory.mktemp("weights")
    out = root / "models" / "pretrained.pt"
    stages.weights.main(["--params", str(tiny_params(root / "params.yaml")), "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny trained checkpoint (``trained.Trained``), made once per session for the
    evaluate and predict tests. Imported here, not at the top: ``trained`` imports conftest."""
    from trained import shared_trained

    return shared_trained(tmp_path_factory)


def find_metrics(node: Any, path: str) -> dict[str, Any] | None:
    """The metrics of ``path`` anywhere in ``dvc metrics show/diff --json`` output (the nesting
    differs between DVC versions)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.replace("\\", "/") == path and isinstance(value, dict):
                return value.get("data", value)
            found = find_metrics(value, path)
            if found is not None:
                return found
    return None


@pytest.fixture(scope="session")
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The whole pipeline reproduced once per session through the dvc CLI and shared by the
    end-to-end tests (``dvc_pipeline.Pipeline``; treat it as read-only, change a copy)."""
    from dvc_pipeline import shared_pipeline

    return shared_pipeline(tmp_path_factory, request)


@pytest.fixture(scope="session")
def experiments(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A copy of the pipeline with a queued sweep of seeds run (``dvc_pipeline.Experiments``)."""
    from dvc_pipeline import shared_experiments

    return shared_experiments(tmp_path_factory, request)

