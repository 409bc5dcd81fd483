"""DVC experiments on the pipeline, through the real CLI: queued experiments run by ``dvc
queue`` workers (each in a temporary git copy of the repository, so everything a stage needs
must be tracked by git or DVC), compared with ``dvc exp show`` and ``dvc plots diff``, kept
with ``dvc exp apply`` and ``dvc exp branch``; and the tables people read, ``dvc metrics
show`` and a ``dvc exp show`` comparing learning rates, fit a 160-column terminal.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO_ROOT, DvcRepo
from dvc_pipeline import (
    EXPERIMENT_LR,
    EXPERIMENTS,
    MODES,
    Experiments,
    copy_repo,
    declared_plots,
    dvc_json,
    page_specs,
    ran_stages,
)

#: The command the README shows to compare experiments (its only ``dvc exp show --only-changed``
#: line), run as written but for the pager.
README = REPO_ROOT / "README.md"
WIDTH = 160


def readme_compare_command() -> list[str]:
    """The README's compare command as dvc's arguments: the test checks what users read."""
    (line,) = [line for line in README.read_text().splitlines() if line.startswith("dvc exp show --only-changed")]
    argv = shlex.split(line.split(" #")[0])
    return [*argv[1:], "--no-pager"]


def experiments_of(shown: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> data (params, metrics, deps) of every experiment in ``dvc exp show --json``."""
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            (rev,) = exp["revs"]
            found[exp["name"]] = rev["data"]
    return found


def param(data: dict[str, Any], dotted: str) -> Any:
    node = data["params"]["params.yaml"]["data"]
    for part in dotted.split("."):
        node = node[part]
    return node


def test_queued_experiments_run_in_temporary_copies(experiments: Experiments, tmp_path: Path) -> None:
    """Two experiments queued with ``dvc exp run --queue -S`` and run by two ``dvc queue
    start`` workers (in temporary copies of the repository, leaving the workspace alone) each
    rerun their own mode; ``dvc exp show`` has each one's param and both modes' accuracy;
    ``dvc plots diff`` draws both; ``dvc exp apply`` brings one into the workspace and ``dvc
    exp branch`` makes a git branch of the other."""
    repo = experiments.repo
    assert experiments.status == {name: "Success" for name in EXPERIMENTS}, experiments.status
    for name, key in EXPERIMENTS.items():
        mode = key.split(".")[1]
        log = experiments.logs[name]
        assert ran_stages(log) == [f"train@{mode}", f"evaluate@{mode}"], log
        assert "Stage 'features' didn't change, skipping" in log, log
    assert repo.git("status", "--porcelain") == "", "the queue changed the workspace"
    assert "Data and pipelines are up to date" in repo.dvc("status").stdout

    shown = experiments_of(dvc_json(repo, "exp", "show"))
    assert set(shown) == set(EXPERIMENTS), shown
    for name, key in EXPERIMENTS.items():
        data = shown[name]
        for mode in MODES:
            lr = param(data, f"train.{mode}.lr")
            assert lr == (EXPERIMENT_LR if key == f"train.{mode}.lr" else 0.001), (name, mode, lr)
            committed = json.loads(repo.git("show", f"{experiments.rev(name)}:metrics/{mode}.json"))
            assert data["metrics"][f"metrics/{mode}.json"]["data"] == committed, (name, mode)
            assert 0 <= committed["accuracy"] <= 1
    # Each experiment left the other mode's results as committed.
    baseline = json.loads(repo.git("show", "HEAD:metrics/finetune.json"))
    assert shown["head-lr"]["metrics"]["metrics/finetune.json"]["data"] == baseline

    # Both experiments on one page: every chart holds both revisions' data, every image is
    # there once per revision.
    names = list(EXPERIMENTS)
    repo.dvc("plots", "diff", *names, "-o", str(tmp_path / "diff"))
    page = (tmp_path / "diff" / "index.html").read_text(encoding="utf-8")
    specs = page_specs(page)
    plots = declared_plots(repo.root)
    assert sorted(specs) == sorted(p.title for p in plots if not p.is_image)
    for title, spec in specs.items():
        revisions = {row.get("rev") for row in spec["data"]["values"]}
        assert revisions == set(names), (title, revisions)
    images = re.findall(r'<p>([^<]+)</p>\s*<img src="([^"]+)">', page)
    assert sorted(rev for rev, _ in images) == sorted(names * sum(p.is_image for p in plots)), images
    assert all((tmp_path / "diff" / src).is_file() for _, src in images), images

    # Apply one: its params and results are in the workspace, and up to date.
    work = copy_repo(repo, tmp_path / "work")
    work.dvc("exp", "apply", "finetune-lr")
    params = yaml.safe_load((work.root / "params.yaml").read_text())
    assert params["train"]["finetune"]["lr"] == EXPERIMENT_LR
    applied = json.loads((work.root / "metrics" / "finetune.json").read_text())
    assert applied == shown["finetune-lr"]["metrics"]["metrics/finetune.json"]["data"]
    assert dvc_json(work, "status") == {}

    # Branch the other: a git branch with its params, lock and results.
    work.dvc("exp", "branch", "head-lr", "head-lr-branch")
    assert "head-lr-branch" in work.git("branch", "--list").split()
    branched = yaml.safe_load(work.git("show", "head-lr-branch:params.yaml"))
    assert branched["train"]["feature_extract"]["lr"] == EXPERIMENT_LR
    assert json.loads(work.git("show", "head-lr-branch:metrics/feature_extract.json")) == \
        shown["head-lr"]["metrics"]["metrics/feature_extract.json"]["data"]
    assert work.git("show", "head-lr-branch:dvc.lock") == repo.git("show", f"{experiments.rev('head-lr')}:dvc.lock")


def column(header: str, row: str, name: str) -> str:
    """The cell of column ``name`` in a rich table ``row``: the word under the header's span
    (metrics are right-aligned, params left-aligned; both sit inside the header's span)."""
    start = header.index(name)
    end = start + len(name)
    for match in re.finditer(r"\S+", row):
        if match.start() < end and match.end() > start:
            return match.group()
    return ""


def test_metrics_and_experiments_fit_a_terminal(experiments: Experiments) -> None:
    """With both modes trained, ``dvc metrics show`` fits 160 columns; after ``dvc exp run -S
    train.finetune.lr=...`` (and one for feature_extract), the README's compare command
    (:func:`readme_compare_command`) shows each experiment on one line with both learning rates and both
    modes' accuracy."""
    repo = experiments.repo
    table = repo.dvc("metrics", "show").stdout
    lines = table.splitlines()
    assert max(map(len, lines)) <= WIDTH, table
    assert lines[0].split()[:2] == ["Path", "accuracy"], table
    assert {line.split()[0] for line in lines[1:]} == {f"metrics/{mode}.json" for mode in MODES}, table

    compare = DvcRepo(repo.root, {**repo.env, "COLUMNS": str(WIDTH)}).dvc(*readme_compare_command()).stdout
    assert max(map(len, compare.splitlines())) <= WIDTH, compare
    assert "…" not in compare, f"columns were collapsed:\n{compare}"
    lines = [line for line in compare.splitlines() if line.strip(" ─")]
    header = lines[0]
    names = [f"metrics/{mode}.json:accuracy" for mode in MODES] + [f"train.{mode}.lr" for mode in MODES]
    assert header.split() == ["Experiment", *names], compare

    branch = repo.git("rev-parse", "--abbrev-ref", "HEAD").strip()
    expected = {label: ("HEAD", {}) for label in ("workspace", branch)}
    expected |= {f"[{name}]": (experiments.rev(name), {key: EXPERIMENT_LR}) for name, key in EXPERIMENTS.items()}
    assert len(lines) == 1 + len(expected), compare
    for label, (rev, changed) in expected.items():
        (row,) = [line for line in lines[1:] if label in line]
        for mode in MODES:
            lr = changed.get(f"train.{mode}.lr", 0.001)
            accuracy = json.loads(repo.git("show", f"{rev}:metrics/{mode}.json"))["accuracy"]
            assert column(header, row, f"train.{mode}.lr") == f"{lr:.5g}", (label, row)
            assert column(header, row, f"metrics/{mode}.json:accuracy") == f"{accuracy:.5g}", (label, row)
