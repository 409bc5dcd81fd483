"""The whole pipeline reproduced once per test session through the real DVC CLI, shared by
the end-to-end test and the rendering test.

A throw-away git copy of the project (as ``conftest.dvc_repo`` makes one, but built once,
since ``dvc repro`` of every stage is the slowest thing the tests do) fetches a tiny
generated zip from a local path, trains both modes for two epochs on 32-pixel images from
random weights, evaluates them and draws every plot. The first run's results are committed,
so ``HEAD`` holds the metrics and plots (they are ``cache: false`` and belong in git) and
the diff commands have something to compare with. Tests that change the repository work
on a copy (:func:`copy_repo`).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, DvcRepo, copy_project, dvc_env, make_dataset_zip
from imagefolders import TINY_TRAIN

MODES = ("finetune", "feature_extract")
#: Two epochs, so the history charts draw lines and not single points.
PIPELINE_PARAMS: dict[str, Any] = {
    **TINY_TRAIN,
    "train.finetune.epochs": 2,
    "train.feature_extract.epochs": 2,
    "runtime.inference_batch_size": 8,
    "evaluate.grid_images": 4,
}


@dataclass(frozen=True)
class Pipeline:
    repo: DvcRepo
    first_run: subprocess.CompletedProcess[str]   # the `dvc repro` that built everything


_SHARED: dict[str, Pipeline] = {}


def pipeline_env(home: Path, site_cache: Path) -> dict[str, str]:
    """``conftest.dvc_env`` plus one torch thread per stage: with 32-pixel images thread
    hand-offs cost more than they save, and on a loaded machine spinning OpenMP threads made
    the stages many times slower. Results are the same."""
    return dvc_env(home, site_cache, OMP_NUM_THREADS="1")


def declared_stages(root: Path = REPO_ROOT) -> list[str]:
    """The stage names ``dvc repro`` runs, from dvc.yaml (``matrix`` stages as ``name@value``)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    names = []
    for name, stage in stages.items():
        matrix = stage.get("matrix")
        if matrix:
            assert len(matrix) == 1, "name@value naming assumes a one-key matrix"
            (values,) = matrix.values()
            names.extend(f"{name}@{value}" for value in values)
        else:
            names.append(name)
    return names


def build_pipeline(base: Path) -> Pipeline:
    """Copy the project into ``base/repo``, commit, ``dvc repro`` it all, commit the results."""
    root = base / "repo"
    copy_project(root)
    repo = DvcRepo(root, pipeline_env(base / "home", base / "dvc-site-cache"))
    archive = make_dataset_zip(base / "src" / "hymenoptera_data.zip", n_train=4, n_val=3)
    repo.set_params({**PIPELINE_PARAMS, "data.url": str(archive), "data.sha256": None})
    repo.git("init", "-q")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "copy of the project, tiny params")
    first = repo.dvc("repro", timeout=600)
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "first run")
    return Pipeline(repo, first)


def shared_pipeline(factory: pytest.TempPathFactory) -> Pipeline:
    """The session's one reproduced pipeline (built on first use). Treat it as read-only."""
    if "pipeline" not in _SHARED:
        _SHARED["pipeline"] = build_pipeline(factory.mktemp("pipeline"))
    return _SHARED["pipeline"]


def copy_repo(repo: DvcRepo, base: Path) -> DvcRepo:
    """A private copy of ``repo`` (git history, DVC cache and workspace) to change freely."""
    root = Path(shutil.copytree(repo.root, base / "repo", symlinks=True))
    return DvcRepo(root, pipeline_env(base / "home", base / "dvc-site-cache"))


# --------------------------------------------------------------------------- declared plots

@dataclass(frozen=True)
class DeclaredPlot:
    """One entry of dvc.yaml's top-level ``plots:``: a vega chart (``props``) or an image."""

    id: str
    props: dict[str, Any] | None   # None for an image file

    @property
    def is_image(self) -> bool:
        return self.props is None

    def series(self) -> list[tuple[str, str]]:
        """(data file, y field) pairs the chart plots."""
        assert self.props is not None
        pairs = []
        for path, fields in self.props["y"].items():
            pairs.extend((path, field) for field in ([fields] if isinstance(fields, str) else fields))
        return pairs


def declared_plots(root: Path = REPO_ROOT) -> list[DeclaredPlot]:
    """dvc.yaml's top-level ``plots:``, read from the project so new plots are covered too."""
    plots = []
    for entry in yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["plots"]:
        if isinstance(entry, str):
            plots.append(DeclaredPlot(entry, None))
        else:
            ((plot_id, props),) = entry.items()
            plots.append(DeclaredPlot(plot_id, props or {}))
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


def datum_point(datum: dict[str, Any], plot: DeclaredPlot) -> Point | None:
    """The (file, field, x, y) of one vega datum of ``plot``, or None for a datum without a
    y value (vega's smoothing layer adds such rows).

    DVC names each series by file (one field per file) or ``file::field``, with the files'
    common folder prefix dropped, so names are matched by their end.
    """
    assert plot.props is not None
    if "filename::field" in datum:
        name, field = datum["filename::field"].split("::")
        y = datum.get("dvc_inferred_y_value")
    else:
        name = datum["filename"]
        field = next(f for p, f in plot.series() if p == name or p.endswith("/" + name))
        y = datum.get(field)
    if y is None:
        return None
    path = next(p for p, f in plot.series() if (p == name or p.endswith("/" + name)) and f == field)
    return path, field, float(datum[plot.props["x"]]), float(y)


def expected_confusion(plot: DeclaredPlot, root: Path) -> dict[tuple[str, str], int]:
    """(actual, predicted) -> count from a confusion chart's CSV file."""
    assert plot.props is not None
    ((path, field),) = plot.series()
    x = plot.props["x"]
    return dict(Counter((row[x], row[field]) for row in read_csv_rows(root / path)))


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
