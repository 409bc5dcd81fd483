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
    Background,
    Experiments,
    Pipeline,
    background,
    beside_pipeline,
    cache_object,
    copy_repo,
    declared_plots,
    dvc_json,
    head_lock,
    local_cache,
    page_specs,
    ran_stages,
    run_in_background,
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
    assert changed_params(work) == {"workspace": "train.finetune.lr=0.01", "finetune-lr": "train.finetune.lr=0.01",
                                    "head-lr": "train.feature_extract.lr=0.01", branch_of(work): ""}

    # Branch the other: a git branch with its params, lock and results.
    work.dvc("exp", "branch", "head-lr", "head-lr-branch")
    assert "head-lr-branch" in work.git("branch", "--list").split()
    branched = yaml.safe_load(work.git("show", "head-lr-branch:params.yaml"))
    assert branched["train"]["feature_extract"]["lr"] == EXPERIMENT_LR
    assert json.loads(work.git("show", "head-lr-branch:metrics/feature_extract.json")) == \
        shown["head-lr"]["metrics"]["metrics/feature_extract.json"]["data"]
    assert work.git("show", "head-lr-branch:dvc.lock") == repo.git("show", f"{experiments.rev('head-lr')}:dvc.lock")


def changed_params(repo: Any) -> dict[str, str]:
    """Row label -> the params it changed, as the README's compare command prints them."""
    table = subprocess.run(readme_compare_command(), cwd=repo.root, env=repo.env, capture_output=True, text=True,
                           check=True).stdout
    header, *rows = table.splitlines()
    at = header.index("params changed")
    return {(line.split()[1].strip("[]") if "[" in line.split()[1] else line.split()[0]): line[at:].strip()
            for line in rows}


def branch_of(repo: Any) -> str:
    return repo.git("rev-parse", "--abbrev-ref", "HEAD").strip()


PLAIN_RUN = "test_a_plain_exp_run_in_the_workspace_is_the_changed_row"


@beside_pipeline(PLAIN_RUN, "after")
def start_plain_run(base: Path, pipeline: Pipeline) -> Background:
    """The README's everyday experiment, run in the workspace of a copy of the pipeline, in the
    background as soon as the pipeline is built."""
    return run_in_background(copy_repo(pipeline.repo, base), ["exp", "run", "-S", "evaluate.grid_images=3", "-n",
                                                               "plain", "evaluate@feature_extract"], base)


def test_a_plain_exp_run_in_the_workspace_is_the_changed_row(pipeline: Pipeline, tmp_path: Path) -> None:
    """The README's everyday ``dvc exp run -S ...`` run in the workspace (not queued), where
    ``dvc exp show`` marks the workspace a baseline too: the workspace and the new experiment
    show the changed param, the commit does not."""
    started = background(PLAIN_RUN) or start_plain_run(tmp_path, pipeline)
    ran = started.result()
    assert ran_stages(ran.stdout) == ["evaluate@feature_extract"], ran.stdout
    assert changed_params(started.repo) == {"workspace": "evaluate.grid_images=3", "plain": "evaluate.grid_images=3",
                                            branch_of(started.repo): ""}


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
        assert f"right only in HEAD: {only[0]}, only in finetune-lr: {only[1]}; McNemar mid-p = " in revs, revs
    assert revs.count("right only in") == len(MODES) and "Traceback" not in revs, revs


# --------------------------------------------------------------------------- sweeps over seeds

#: t's 97.5% point for 2 degrees of freedom (three seeds), from the tables.
T_975_2 = 4.302653


def readme_summary_command() -> list[str]:
    (line,) = [line for line in README.read_text().splitlines() if line.startswith("python -m stages.compare --sum")]
    return shlex.split(line.split(" #")[0])


def sweep_runs(repo: Any) -> list[dict[str, Any]]:
    """Each experiment of the sweep as a person would tally it: its seed and images per class
    (``dvc exp show``), feature_extract's accuracy and wrong images (its own commit's metrics
    and predictions, read with git)."""
    runs = []
    refs = repo.git("for-each-ref", "--format=%(refname)", "refs/exps").split()
    for name, data in experiments_of(dvc_json(repo, "exp", "show")).items():
        rev = next(r for r in refs if r.endswith("/" + name))
        csv_text = repo.git("show", f"{rev}:plots/feature_extract/predictions.csv")
        rows = [line.split(",") for line in csv_text.splitlines()[1:]]
        runs.append({"name": name, "rev": rev, "seed": param(data, "seed"),
                     "group": param(data, "data.train_per_class"),
                     "accuracy": json.loads(repo.git("show", f"{rev}:metrics/feature_extract.json"))["accuracy"],
                     "wrong": {path for path, actual, predicted, _ in rows if actual != predicted},
                     "scored": [row[0] for row in rows]})
    return runs


def by_hand(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample sd and the 95% t-interval of the mean of three values."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    half = T_975_2 * sd / len(values) ** 0.5
    return mean, sd, mean - half, mean + half


def test_a_sweep_of_seeds_is_summed_up_as_by_hand(sweep: Any, tmp_path: Path) -> None:
    """``dvc exp run --queue -S 'data.train_per_class=2,all' -S 'seed=range(1,4)'`` run by two
    workers, then the README's summary command: per group, n, the mean accuracy, its sd,
    min-max and 95% interval equal a hand computation from each experiment's metrics; so does
    the difference between the groups paired by seed, with its verdict; the images every run
    of a group got wrong are those of the predictions; finetune and lp_ft, which the sweep did
    not run, are in none of it (their metrics files are the commit's); the curve is drawn."""
    repo = sweep.repo
    assert set(sweep.status.values()) == {"Success"}, sweep.status
    runs = sweep_runs(repo)
    assert sorted((str(r["group"]), r["seed"]) for r in runs) == sorted((g, s) for g in ("2", "all") for s in (1, 2, 3))
    plot = tmp_path / "summary.png"
    out = subprocess.run([*readme_summary_command(), "--plot", str(plot)], cwd=repo.root, env=repo.env,
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert max(map(len, lines)) <= WIDTH and "Traceback" not in out, out
    assert lines[0].startswith("6 experiments in 2 groups (by data.train_per_class)"), out

    def line_of(*starts: str) -> list[str]:
        (found,) = [line.split() for line in lines if line.split()[:len(starts)] == list(starts)]
        return found

    by_seed = {}
    for group in (2, "all"):
        of = sorted((r for r in runs if r["group"] == group), key=lambda r: r["seed"])
        by_seed[group] = [r["accuracy"] for r in of]
        mean, sd, low, high = by_hand(by_seed[group])
        values = by_seed[group]
        assert line_of(f"data.train_per_class={group}", "feature_extract") == [
            f"data.train_per_class={group}", "feature_extract", "3", f"{mean:.4f}", f"{sd:.4f}",
            f"{min(values):.4f}-{max(values):.4f}", f"{low:.4f}", "to", f"{high:.4f}"], out
        wrong = set.intersection(*(r["wrong"] for r in of))
        assert line_of(f"data.train_per_class={group}:")[1:3] == [str(len(wrong)), "images"], out
        assert all(image in out for image in wrong)
    (row,) = [line for line in lines if line.startswith("feature_extract: data.train_per_class=")]
    first, second = (2, "all") if row.startswith("feature_extract: data.train_per_class=2 ") else ("all", 2)
    mean, _, low, high = by_hand([a - b for a, b in zip(by_seed[first], by_seed[second], strict=True)])
    verdict = "not shown to differ across 3 seeds" if low <= 0 <= high else \
        f"data.train_per_class={first if mean > 0 else second} is better across 3 seeds"
    assert " ".join(row.split()[4:]) == f"3 {mean:+.4f} {low:+.4f} to {high:+.4f} {verdict}", out
    assert "finetune" not in out and "lp_ft" not in out, "the sweep ran feature_extract alone"
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_images_per_class_are_nested_subsets_and_leave_validation_alone(sweep: Any) -> None:
    """With the same seed, ``data.train_per_class: 2`` trains on two of each class's four
    training images, among them, and scores exactly the validation images of ``all``; the
    README's experiments command prints each experiment's params as written (``seed=1``, not
    ``seed=1.0``) and no accuracy for the strategies it did not run."""
    repo = sweep.repo
    runs = {(r["group"], r["seed"]): r for r in sweep_runs(repo)}
    for seed in (1, 2, 3):
        small, full = runs[(2, seed)], runs[("all", seed)]
        reports = [json.loads(cache_object(local_cache(repo), head_lock(repo, run["rev"])["reports/data.json"])
                              .read_text()) for run in (small, full)]
        assert [set(r["train"]["per_class"].values()) for r in reports] == [{2}, {4}]
        assert reports[0]["val"] == reports[1]["val"] and reports[0]["train_per_class"] == 2
        assert small["scored"] == full["scored"]
    table = subprocess.run(readme_compare_command(), cwd=repo.root, env=repo.env, capture_output=True, text=True,
                           check=True).stdout
    for run in runs.values():
        (line,) = [line for line in table.splitlines() if f"[{run['name']}]" in line]
        changed = {f"seed={run['seed']}", f"train.feature_extract.lr={EXPERIMENT_LR}"} | (
            {f"data.train_per_class={run['group']}"} if run["group"] != "all" else set())
        assert set(line.split()[-len(changed):]) == changed, line
        assert line.split()[2] == "-" and line.split()[4] == "-", f"{run['name']} ran feature_extract alone: {line}"

