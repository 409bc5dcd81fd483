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
import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO_ROOT
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

#: The command the README shows to compare experiments (its only ``... --experiments`` line).
README = REPO_ROOT / "README.md"
WIDTH = 160


def readme_compare_command() -> list[str]:
    """The README's compare command as a command line: the test checks what users read."""
    (line,) = [line for line in README.read_text().splitlines() if line.startswith("python -m stages.compare --exp")]
    return shlex.split(line.split(" #")[0])


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
    reaches = {"finetune-lr": ["train@finetune", "evaluate@finetune", "compare"],  # lp_ft starts from the head:
               "head-lr": ["train@feature_extract", "train@lp_ft", "evaluate@feature_extract", "evaluate@lp_ft",
                           "compare"]}
    for name in EXPERIMENTS:
        log = experiments.logs[name]
        assert ran_stages(log) == reaches[name], log
        assert "Stage 'features' didn't change, skipping" in log, log
    assert repo.git("status", "--porcelain") == "", "the queue changed the workspace"
    assert "Data and pipelines are up to date" in repo.dvc("status").stdout

    shown = experiments_of(dvc_json(repo, "exp", "show"))
    assert set(shown) == set(EXPERIMENTS), shown
    committed_params = yaml.safe_load(repo.git("show", "HEAD:params.yaml"))["train"]
    for name, key in EXPERIMENTS.items():
        data = shown[name]
        for mode in MODES:
            lr = param(data, f"train.{mode}.lr")
            assert lr == (EXPERIMENT_LR if key == f"train.{mode}.lr" else committed_params[mode]["lr"]), (name, mode)
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


def test_metrics_and_experiments_fit_a_terminal(experiments: Experiments) -> None:
    """With the three strategies trained, ``dvc metrics show`` fits 160 columns and says which
    split scored them; after ``dvc exp run -S train.finetune.lr=...`` (and one for
    feature_extract), the README's compare command (:func:`readme_compare_command`) shows each
    experiment on one line with every strategy's accuracy and the params it changed, and its
    ``--revs HEAD <experiment>`` pairs each strategy's predictions at the two."""
    repo = experiments.repo
    table = repo.dvc("metrics", "show").stdout
    lines = table.splitlines()
    assert max(map(len, lines)) <= WIDTH, table
    assert lines[0].split()[:2] == ["Path", "accuracy"] and {"held_out", "split"} <= set(lines[0].split()), table
    assert {line.split()[0] for line in lines[1:]} == {f"metrics/{mode}.json" for mode in MODES}, table
    assert all(line.split()[-1] == "val" and "False" in line.split() for line in lines[1:]), table

    compare = subprocess.run(readme_compare_command(), cwd=repo.root, env=repo.env, capture_output=True, text=True,
                             check=True).stdout
    lines = compare.splitlines()
    assert max(map(len, lines)) <= WIDTH, compare
    assert lines[0].split() == ["experiment", *MODES, "params", "changed", "from", "the", "commit"], compare
    branch = repo.git("rev-parse", "--abbrev-ref", "HEAD").strip()
    expected = {label: ("HEAD", "") for label in ("workspace", branch)}
    expected |= {f"[{name}]": (experiments.rev(name), f"{key}={EXPERIMENT_LR}") for name, key in EXPERIMENTS.items()}
    assert len(lines) == 1 + len(expected), compare
    for label, (rev, changed) in expected.items():
        (row,) = [line.split() for line in lines[1:] if label in line]
        accuracies = [f"{json.loads(repo.git('show', f'{rev}:metrics/{mode}.json'))['accuracy']:.4f}" for mode in MODES]
        assert row[-len(MODES) - bool(changed):len(row) - bool(changed)] == accuracies, (label, row)
        assert (row[-1] if changed else "") == changed, (label, row)

    # --revs with an experiment's name, as the README shows it: each strategy's predictions at
    # the two revisions, read through dvc.api and paired.
    revs = subprocess.run([*readme_compare_command()[:3], "--revs", "HEAD", "finetune-lr"], cwd=repo.root,
                          env=repo.env, capture_output=True, text=True, check=True).stdout
    for mode in MODES:
        right = [{row.split(",")[0]: row.split(",")[1] == row.split(",")[2]
                  for row in repo.git("show", f"{rev}:plots/{mode}/predictions.csv").splitlines()[1:]}
                 for rev in ("HEAD", experiments.rev("finetune-lr"))]
        only = [sum(r[k] and not other[k] for k in r) for r, other in (right, right[::-1])]
        assert f"{mode}: HEAD " in revs, revs
        assert f"right only in HEAD: {only[0]}, only in finetune-lr: {only[1]}; McNemar p = " in revs, revs
    assert revs.count("right only in") == len(MODES) and "Traceback" not in revs, revs
