"""The whole pipeline reproduced once per test session through the real DVC CLI, shared by
the end-to-end tests and the rendering test, and helpers to read what dvc.yaml declares.

A throw-away git copy of the project (as ``conftest.dvc_repo`` makes one, but built once,
since ``dvc repro`` of every stage is the slowest thing the tests do) configured only in
params.yaml, with what the code was not written for: a local folder of three generated
classes with ``train/`` only (validation split off by ``data.val_fraction``), and
torchvision's MobileNetV3-Small started from a local ``.pth`` (random, with the BatchNorm
statistics of random images, so that its features tell the images apart). It trains every
strategy for two epochs on 32-pixel images, evaluates and compares them, and draws every plot.
The first run's results are committed, so ``HEAD`` holds the metrics and plots (they are
``cache: false`` and belong in git) and the diff commands have something to compare with.
Tests that change the repository work on a copy (:func:`copy_repo`); copies are cheap (a few
hundred MB of files, no training).

:func:`shared_experiments` adds, once per session, four experiments on a copy of that pipeline
(:data:`SWEEP`: two seeds of two sizes of ``data.train_per_class``), queued with ``dvc exp
run --queue`` in DVC's sweep syntax and run by two ``dvc queue start`` workers. The queue starts
as soon as the pipeline is built, where the session has tests that use it, and runs beside the
first tests. :func:`plain_run` is the README's everyday ``dvc exp run -S`` (a head-only change)
in the workspace of another copy, also started in the background. The caching and experiment
tests start from them, so they have second results (and run-cache entries) without training.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, DvcRepo, copy_project, dvc_env
from imagefolders import TINY_TRAIN, make_image_folders, random_state_dict, save_state_dict

from transfer.strategies import STRATEGIES

MODES = tuple(STRATEGIES)
CLASSES = ("cats", "dogs", "owls")  #: names the code has never seen
ARCH, HEAD = "mobilenet_v3_small", "classifier.3"
WEIGHTS_SEED = 3
#: Two epochs, so the history charts draw lines and not single points.
PIPELINE_PARAMS: dict[str, Any] = {
    **TINY_TRAIN,
    **{f"train.{name}.epochs": 2 for name in STRATEGIES},
    "runtime.inference_batch_size": 8,
    "evaluate.grid_images": 4,
}
#: The learning rate the experiments give the head (the committed run has 0.001).
EXPERIMENT_LR = 0.01
#: The seeds of :data:`SWEEP`: two, the fewest that give a spread and a pairing by seed (each
#: experiment costs four stage start-ups, most of the suite's time).
SEEDS = range(1, 3)
#: The experiments of :func:`shared_experiments`, a sweep in DVC's own syntax: two groups (2
#: training images per class, or all 4) of :data:`SEEDS`, each running feature_extract alone (the
#: cheapest: the other strategies keep the commit's results, which are not the experiment's),
#: at a learning rate that learns in two epochs.
SWEEP = ("-S", "data.train_per_class=2,all", "-S", f"seed=range({SEEDS.start},{SEEDS.stop})",
         "-S", f"train.feature_extract.lr={EXPERIMENT_LR}", "evaluate@feature_extract")


@dataclass(frozen=True)
class Pipeline:
    repo: DvcRepo
    first_run: subprocess.CompletedProcess[str]   # the `dvc repro` that built everything
    weights: Path                                 # the local state_dict model.weights names


@dataclass(frozen=True)
class Experiments:
    repo: DvcRepo              # a copy of the pipeline after the queue ran; workspace = the first run
    status: dict[str, str]     # experiment name -> its final `dvc queue status` (Success, Failed)
    logs: dict[str, str]       # experiment name -> its `dvc queue logs`

    def rev(self, name: str) -> str:
        """The git ref of experiment ``name`` (``refs/exps/..../<name>``)."""
        refs = self.repo.git("for-each-ref", "--format=%(refname)", "refs/exps").split()
        (ref,) = [r for r in refs if r.endswith("/" + name)]
        return ref

    def named(self, params: dict[str, Any]) -> str:
        """The name of the experiment whose params.yaml has these dotted keys' values."""
        def value(raw: dict[str, Any], dotted: str) -> Any:
            for part in dotted.split("."):
                raw = raw[part]
            return raw

        (name,) = [n for n in self.status if all(
            value(yaml.safe_load(self.repo.git("show", f"{self.rev(n)}:params.yaml")), k) == v
            for k, v in params.items())]
        return name


_SHARED: dict[str, Any] = {}


def pipeline_env(home: Path, site_cache: Path) -> dict[str, str]:
    """``conftest.dvc_env`` plus one torch thread per stage: with 32-pixel images thread
    hand-offs cost more than they save, and on a loaded machine spinning OpenMP threads made
    the stages many times slower. Results are the same."""
    return dvc_env(home, site_cache, OMP_NUM_THREADS="1")


# --------------------------------------------------------------------------- dvc.yaml, resolved

_INTERPOLATION = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def _lookup(context: dict[str, Any], dotted: str) -> Any:
    node: Any = context
    for part in dotted.split("."):
        node = node[part]
    return node


def _interpolate(node: Any, context: dict[str, Any]) -> Any:
    """``node`` with every ``${name}`` replaced from ``context``, keys included (a whole-string
    ``${name}`` keeps the value's type, as DVC does)."""
    if isinstance(node, str):
        whole = _INTERPOLATION.fullmatch(node)
        if whole:
            return _lookup(context, whole.group(1))
        return _INTERPOLATION.sub(lambda m: str(_lookup(context, m.group(1))), node)
    if isinstance(node, dict):
        return {_interpolate(k, context): _interpolate(v, context) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, context) for v in node]
    return node


def resolved_stages(root: Path = REPO_ROOT) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages as ``dvc repro`` runs them: ``foreach`` and ``matrix`` stages expanded
    to ``name@key`` / ``name@value`` with ``${key}``, ``${item}`` and ``${item.field}`` filled in."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    resolved: dict[str, dict[str, Any]] = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            items = stage["foreach"]
            pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
            for key, item in pairs:
                resolved[f"{name}@{key}"] = _interpolate(stage["do"], {"key": key, "item": item})
        elif "matrix" in stage:
            matrix = stage["matrix"]
            body = {k: v for k, v in stage.items() if k != "matrix"}
            for values in itertools.product(*matrix.values()):
                assert all(isinstance(v, str | int | float) for v in values), "name@value needs scalar values"
                item = dict(zip(matrix, values, strict=True))
                resolved[f"{name}@{'-'.join(map(str, values))}"] = _interpolate(body, {"item": item})
        else:
            resolved[name] = stage
    return resolved


def declared_stages(root: Path = REPO_ROOT) -> list[str]:
    """The stage names ``dvc repro`` runs, from dvc.yaml (``name@key`` for foreach/matrix)."""
    return list(resolved_stages(root))


def _entries(stage: dict[str, Any], kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, options) of a stage's ``outs``/``metrics``/``plots`` list."""
    for entry in stage.get(kind) or []:
        if isinstance(entry, str):
            yield entry, {}
        else:
            ((path, options),) = entry.items()
            yield path, options or {}


def declared_outputs(root: Path = REPO_ROOT) -> dict[str, dict[str, str]]:
    """Every output path by kind (``outs``, ``metrics``, ``plots``) and the stage that writes it."""
    found: dict[str, dict[str, str]] = {"outs": {}, "metrics": {}, "plots": {}}
    for name, stage in resolved_stages(root).items():
        for kind, paths in found.items():
            paths.update((path, name) for path, _ in _entries(stage, kind))
    return found


def in_dvc_cache(root: Path = REPO_ROOT) -> dict[str, bool]:
    """Every output path and whether DVC caches it (``cache: false``: the file lives in git)."""
    return {path: options.get("cache", True) for stage in resolved_stages(root).values()
            for kind in ("outs", "metrics", "plots") for path, options in _entries(stage, kind)}


def declared_metrics(root: Path = REPO_ROOT) -> list[str]:
    """The metrics files the stages declare (what ``dvc metrics show`` lists)."""
    return list(declared_outputs(root)["metrics"])


# --------------------------------------------------------------------------- declared plots

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
#: Output options that say how DVC stores a file, not how it is drawn.
STORAGE_OPTIONS = frozenset({"cache", "persist", "desc", "remote", "push", "type", "labels", "meta"})


@dataclass(frozen=True)
class DeclaredPlot:
    """One plot ``dvc plots show`` draws: an entry of dvc.yaml's top-level ``plots:`` or a
    stage's ``plots:`` output; a vega chart (``props``) or an image."""

    id: str                        # the top-level name, or the output's path
    props: dict[str, Any] | None   # None for an image file
    stage: str | None = None       # the stage declaring it; None for the top-level ``plots:``

    @property
    def is_image(self) -> bool:
        return self.props is None

    @property
    def title(self) -> str:
        """The chart's title on the page: its ``title`` prop, else its id."""
        assert self.props is not None
        return self.props.get("title") or self.id

    @property
    def template(self) -> str:
        assert self.props is not None
        return self.props.get("template", "linear")

    def series(self) -> list[tuple[str, str]]:
        """(data file, y field) pairs the chart plots."""
        assert self.props is not None
        y = self.props["y"]
        per_file = y if isinstance(y, dict) else {self.id: y}
        pairs = []
        for path, fields in per_file.items():
            pairs.extend((path, field) for field in ([fields] if isinstance(fields, str) else fields))
        return pairs

    def files(self) -> list[str]:
        """The files behind the plot: the image, or the chart's data files."""
        return [self.id] if self.is_image else sorted({path for path, _ in self.series()})


def _plot(plot_id: str, options: dict[str, Any] | None, stage: str | None) -> DeclaredPlot:
    if plot_id.lower().endswith(IMAGE_SUFFIXES):
        return DeclaredPlot(plot_id, None, stage)
    return DeclaredPlot(plot_id, {k: v for k, v in (options or {}).items() if k not in STORAGE_OPTIONS}, stage)


def declared_plots(root: Path = REPO_ROOT) -> list[DeclaredPlot]:
    """Every plot dvc.yaml declares, top-level ``plots:`` first, then each stage's ``plots:``
    outputs, read from the project so new plots are covered too."""
    raw = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    plots = []
    for entry in raw.get("plots") or []:
        if isinstance(entry, str):
            plots.append(_plot(entry, {}, None))
        else:
            ((plot_id, props),) = entry.items()
            plots.append(_plot(plot_id, props, None))
    for name, stage in resolved_stages(root).items():
        plots.extend(_plot(path, options, name) for path, options in _entries(stage, "plots"))
    return plots


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


Point = tuple[str, str, float, float]   # (data file, y field, x, y)


def expected_points(plot: DeclaredPlot, root: Path) -> set[Point]:
    """Every (file, field, x, y) a line chart must show, read from its CSV files."""
    assert plot.props is not None
    x = plot.props["x"]
    return {(path, field, float(row[x]), float(row[field]))
            for path, field in plot.series() for row in read_csv_rows(root / path)}


def _series_file(plot: DeclaredPlot, name: str) -> str:
    """The declared file DVC calls ``name`` (it drops the files' common folder prefix)."""
    (path,) = {p for p, _ in plot.series() if p == name or p.endswith("/" + name)}
    return path


def datum_point(datum: dict[str, Any], plot: DeclaredPlot) -> Point | None:
    """The (file, field, x, y) of one vega datum of ``plot``, or None for a datum without a
    y value (vega's smoothing layer adds such rows).

    DVC names each series by file (one field per file: ``filename``), by ``file::field``, or
    not at all when the chart has one file (a stage's plot output).
    """
    assert plot.props is not None
    if "filename::field" in datum:
        name, field = datum["filename::field"].split("::")
        path, y = _series_file(plot, name), datum.get("dvc_inferred_y_value")
    else:
        files = plot.files()
        path = _series_file(plot, datum["filename"]) if "filename" in datum else files[0]
        assert "filename" in datum or len(files) == 1, (plot.id, datum)
        fields = [f for p, f in plot.series() if p == path]
        if "field" in datum:
            field, y = datum["field"], datum.get("dvc_inferred_y_value")
        else:
            (field,) = fields
            y = datum.get(field)
    if y is None:
        return None
    return path, field, float(datum[plot.props["x"]]), float(y)


def expected_confusion(plot: DeclaredPlot, root: Path) -> dict[tuple[str, str], int]:
    """(actual, predicted) -> count from a confusion chart's CSV file."""
    assert plot.props is not None
    ((path, field),) = plot.series()
    x = plot.props["x"]
    return dict(Counter((row[x], row[field]) for row in read_csv_rows(root / path)))


def bar_axes(plot: DeclaredPlot) -> tuple[str, str]:
    """(category field, value field) of a bar chart."""
    assert plot.props is not None
    x, y = plot.props["x"], plot.props["y"]
    return (y, x) if plot.template == "bar_horizontal" else (x, y)


def expected_bars(plot: DeclaredPlot, root: Path) -> dict[str, float]:
    """category -> value of a bar chart, from its CSV file."""
    category, value = bar_axes(plot)
    ((path, _),) = plot.series()
    return {row[category]: float(row[value]) for row in read_csv_rows(root / path)}


# --------------------------------------------------------------------------- dvc plots show's page

SPEC = re.compile(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (.*?);\s*'
                  r"vegaEmbed\('#\1', spec\);", re.S)
IMAGE = re.compile(r"<p>([^<]+)</p>\s*<div[^>]*>\s*<p>workspace</p>\s*<img src=\"([^\"]+)\">", re.S)


def page_specs(html: str) -> dict[str, dict[str, Any]]:
    """The vega-lite spec of each chart on the page, by its title."""
    specs = {}
    for _, text in SPEC.findall(html):
        spec = json.loads(text)
        title = spec.get("title")
        specs[title["text"] if isinstance(title, dict) else title] = spec
    return specs


def page_images(html: str) -> dict[str, str]:
    """The ``<img src>`` of each image plot on the page, by the plot's path."""
    return dict(IMAGE.findall(html))


def plots_show(repo: DvcRepo, out: Path, *options: str) -> str:
    """``dvc plots show -o out``; return the page's HTML."""
    repo.dvc("plots", "show", "-o", str(out), *options)
    return (out / "index.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- reading dvc's answers

def ran_stages(output: str) -> list[str]:
    """The stages a ``dvc repro``/``dvc exp run`` ran, in order (``Running stage 'name':``)."""
    return re.findall(r"^Running stage '([^']+)'", output, re.M)


def cached_stages(output: str) -> list[str]:
    """The stages it restored from the run-cache instead of running them."""
    return re.findall(r"^Stage '([^']+)' is cached - skipping run, checking out outputs", output, re.M)


def dvc_json(repo: DvcRepo, *args: str) -> Any:
    """Run a ``dvc ... --json`` command and parse its output."""
    return json.loads(repo.dvc(*args, "--json").stdout)


def lock_hashes(lock_text: str) -> dict[str, str]:
    """path -> md5 of every output dvc.lock records (``outs``, with metrics and plots)."""
    stages = yaml.safe_load(lock_text)["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def head_lock(repo: DvcRepo, rev: str = "HEAD") -> dict[str, str]:
    """:func:`lock_hashes` of dvc.lock as committed in ``rev``."""
    return lock_hashes(repo.git("show", f"{rev}:dvc.lock"))


def workspace_lock(repo: DvcRepo) -> dict[str, str]:
    return lock_hashes((repo.root / "dvc.lock").read_text(encoding="utf-8"))


def queue_status(repo: DvcRepo, names: list[str]) -> dict[str, str]:
    """name -> status in ``dvc queue status`` (Queued, Running, Success, Failed...)."""
    status = {}
    for line in repo.dvc("queue", "status").stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in names:
            status[fields[1]] = fields[-1]
    return status


def wait_for_queue(repo: DvcRepo, names: list[str], timeout: float = 300) -> dict[str, str]:
    """Wait until every task in ``names`` has finished (or fail after ``timeout`` seconds,
    showing the queue and its logs); name -> final status. A finished experiment leaves a git
    ref, which costs nothing to look for; ``dvc queue status`` (a second of CPU each time,
    which the running experiments need) is asked when they are all there, or every 20 s, for
    a task that failed and left none."""
    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    while True:
        refs = repo.git("for-each-ref", "--format=%(refname)", "refs/exps").split()
        all_there = all(any(ref.endswith("/" + name) for ref in refs) for name in names)
        if all_there or time.monotonic() - asked > 20:
            status, asked = queue_status(repo, names), time.monotonic()
            if len(status) == len(names) and all(s not in ("Queued", "Running") for s in status.values()):
                return status
        if time.monotonic() > deadline:
            logs = "\n".join(repo.dvc("queue", "logs", name, check=False).stdout[-3000:] for name in names)
            pytest.fail(f"the queue did not finish in {timeout:.0f}s:\n{queue_status(repo, names)}\n{logs}")
        time.sleep(1 if all_there else 0.5)


# --------------------------------------------------------------------------- DVC's cache
# A local-folder remote has the cache's layout, so these read a pushed remote too.

def local_cache(repo: DvcRepo) -> Path:
    return repo.root / ".dvc" / "cache"


def cache_object(cache: Path, md5: str) -> Path:
    """Where a cache (or remote) keeps the object ``md5`` (a ``.dir`` listing for a folder)."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def run_cache_entries(cache: Path) -> list[dict[str, Any]]:
    """The run-cache entries in a cache (or remote): each a stage's ``cmd``, ``deps`` and ``outs``."""
    return [yaml.safe_load(p.read_text(encoding="utf-8")) for p in (cache / "runs").glob("*/*/*")]


# --------------------------------------------------------------------------- background runs

@dataclass
class Background:
    """A ``dvc`` command running in the background in ``repo`` (in its own process group,
    its output going to files), and what its starter wants the test to know (``extra``)."""

    repo: DvcRepo
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Wait for it; fail showing its output unless it succeeded."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        done = subprocess.CompletedProcess(self.process.args, code, self.stdout.read_text(), self.stderr.read_text())
        if code != 0:
            pytest.fail(f"{' '.join(map(str, self.process.args[1:]))} exited {code}\n"
                        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
        return done

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


def run_in_background(repo: DvcRepo, args: list[str], base: Path, **extra: Any) -> Background:
    """Start ``dvc <args>`` in ``repo`` without waiting for it."""
    stdout, stderr = base / "dvc-stdout.txt", base / "dvc-stderr.txt"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo.root, env=repo.env,
                                   stdout=out, stderr=err, start_new_session=True)
    return Background(repo, process, stdout, stderr, extra)


#: Slow runs that some tests need and that need nothing from the running session, started in
#: the background beside the shared pipeline's build ("with") or right after it ("after"), so
#: that they use the cores the build leaves idle (each stage runs one torch thread): test
#: name -> (when, start). Test modules register theirs with :func:`beside_pipeline` when they
#: are imported; a run starts only where its test was selected.
_BESIDE: dict[str, tuple[str, Callable[..., Background]]] = {}


def beside_pipeline(test: str, when: str) -> Callable[[Callable[..., Background]], Callable[..., Background]]:
    """Register ``start(base)`` ("with"), or ``start(base, pipeline)`` ("after"), for ``test``."""
    assert when in ("with", "after")

    def register(start: Callable[..., Background]) -> Callable[..., Background]:
        _BESIDE[test] = (when, start)
        return start

    return register


def registered_beside() -> set[str]:
    """The tests that wait for a run started beside the pipeline."""
    return set(_BESIDE)


def background(test: str) -> Background | None:
    """The run started in the background for ``test``, or None where none was (the shared
    pipeline was not built in this session before the test, or the test was not registered)."""
    return _SHARED.get("background", {}).get(test)


def _start_beside(request: pytest.FixtureRequest, factory: pytest.TempPathFactory, when: str,
                  pipeline: Pipeline | None = None) -> None:
    selected = {item.name for item in request.session.items}
    runs = _SHARED.setdefault("background", {})
    for test, (moment, start) in _BESIDE.items():
        if moment == when and test in selected and test not in runs:
            base = factory.mktemp(f"background-{test[5:25]}")
            runs[test] = start(base) if pipeline is None else start(base, pipeline)
            request.session.addfinalizer(runs[test].stop)  # whatever happens to the test


# --------------------------------------------------------------------------- the shared builds

def new_repo(base: Path, changes: dict[str, Any]) -> DvcRepo:
    """A committed git copy of the project in ``base/repo`` with ``changes`` to params.yaml
    (as ``conftest.dvc_repo``, with the pipeline's environment)."""
    root = base / "repo"
    copy_project(root)
    repo = DvcRepo(root, pipeline_env(base / "home", base / "dvc-site-cache"))
    repo.set_params(changes)
    repo.git("init", "-q")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "copy of the project, tiny params")
    return repo


def pipeline_weights(base: Path) -> Path:
    """The local weights file the pipeline starts from (outside the repository, as a user's)."""
    return base / "weights" / f"{ARCH}.pth"


def build_pipeline(base: Path) -> Pipeline:
    """Copy the project into ``base/repo``, commit, ``dvc repro`` it all, commit the results."""
    folder = make_image_folders(base / "my-images", classes=CLASSES, n_train=6, n_val=0)
    shutil.rmtree(folder / "val")  # train/ only: unzip splits val/ off it
    weights = save_state_dict(random_state_dict(ARCH, seed=WEIGHTS_SEED, calibrated=True), pipeline_weights(base))
    repo = new_repo(base, {**PIPELINE_PARAMS, "data.url": str(folder), "data.sha256": None,
                           "data.val_fraction": 0.34, "model.arch": ARCH, "model.weights": str(weights)})
    first = repo.dvc("repro", timeout=600)
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "first run")
    return Pipeline(repo, first, weights)


def shared_pipeline(factory: pytest.TempPathFactory, request: pytest.FixtureRequest | None = None) -> Pipeline:
    """The session's one reproduced pipeline (built on first use). Treat it as read-only.
    Given the fixture ``request``, the build also starts the selected tests' background runs
    (:func:`beside_pipeline`)."""
    if "pipeline" not in _SHARED:
        if request is not None:
            _start_beside(request, factory, "with")
        _SHARED["pipeline"] = build_pipeline(factory.mktemp("pipeline"))
        if request is not None:
            _start_beside(request, factory, "after", _SHARED["pipeline"])
            if any("experiments" in getattr(item, "fixturenames", ()) for item in request.session.items):
                queued = _SHARED["queue"] = queue_copy(_SHARED["pipeline"], factory)  # runs beside the first tests
                request.session.addfinalizer(lambda: queued.dvc("queue", "stop", "--kill", check=False))
    return _SHARED["pipeline"]


def queue_copy(pipeline: Pipeline, factory: pytest.TempPathFactory) -> DvcRepo:
    """A copy of the pipeline with :data:`SWEEP` queued and the queue started."""
    repo = copy_repo(pipeline.repo, factory.mktemp("experiments"))
    repo.dvc("exp", "run", "--queue", *SWEEP)
    start_queue(repo)
    return repo


def copy_repo(repo: DvcRepo, base: Path) -> DvcRepo:
    """A private copy of ``repo`` (git history, DVC cache and workspace) to change freely."""
    root = Path(shutil.copytree(repo.root, base / "repo", symlinks=True))
    return DvcRepo(root, pipeline_env(base / "home", base / "dvc-site-cache"))


def start_queue(repo: DvcRepo, jobs: int = 2) -> None:
    """``dvc queue start --jobs <jobs>``, whose workers run the queued experiments in the background."""
    # Output to a file, not a pipe: the workers inherit it, and reading a pipe to its end
    # would wait for them to finish.
    with (repo.root.parent / "queue-start.txt").open("wb") as out:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "--jobs", str(jobs)], cwd=repo.root,
                       env=repo.env, stdout=out, stderr=subprocess.STDOUT, timeout=120, check=True)


def queued(repo: DvcRepo) -> list[str]:
    """The names of the experiments in ``dvc queue status`` (DVC names those it was not given)."""
    lines = repo.dvc("queue", "status").stdout.splitlines()
    return [line.split()[1] for line in lines[1:] if len(line.split()) > 2 and not line.startswith("Worker")]


def finish_queue(repo: DvcRepo, names: list[str], timeout: float = 400) -> dict[str, str]:
    """Wait for the started queue's experiments ``names``; name -> final status."""
    try:
        return wait_for_queue(repo, names, timeout=timeout)
    finally:
        repo.dvc("queue", "stop", check=False)  # the workers also leave by themselves once idle


def shared_experiments(factory: pytest.TempPathFactory, request: pytest.FixtureRequest | None = None) -> Experiments:
    """A copy of :func:`shared_pipeline` after the queue ran :data:`SWEEP` (built on first use;
    read-only): the experiments are in its git refs, their runs in its run-cache, and its
    workspace is still the first run's."""
    if "experiments" not in _SHARED:
        pipeline = shared_pipeline(factory, request)
        repo = _SHARED.pop("queue", None) or queue_copy(pipeline, factory)
        names = queued(repo)
        assert len(names) == 2 * len(SEEDS), names
        status = finish_queue(repo, names)
        logs = {name: repo.dvc("queue", "logs", name, check=False).stdout for name in names}
        _SHARED["experiments"] = Experiments(repo, status, logs)
    return _SHARED["experiments"]


#: The test the plain run of :func:`plain_run` is started for (others use it too), and its change.
PLAIN_RUN = "test_a_plain_exp_run_in_the_workspace_is_the_changed_row"
PLAIN_CHANGE = ("-S", "train.feature_extract.lr=0.0123")


@beside_pipeline(PLAIN_RUN, "after")
def start_plain_run(base: Path, pipeline: Pipeline) -> Background:
    return run_in_background(copy_repo(pipeline.repo, base), ["exp", "run", *PLAIN_CHANGE, "-n", "plain",
                                                               "evaluate@feature_extract"], base)


def plain_run(base: Path, pipeline: Pipeline) -> Background:
    """``dvc exp run -S train.feature_extract.lr=0.0123 -n plain evaluate@feature_extract`` in the
    workspace of a copy of the pipeline, finished (started beside the pipeline where the session
    runs :data:`PLAIN_RUN`, else now); read-only."""
    started = background(PLAIN_RUN) or _SHARED.get("plain") or start_plain_run(base, pipeline)
    _SHARED["plain"] = started
    started.result()
    return started
