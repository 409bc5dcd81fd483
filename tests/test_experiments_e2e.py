"""DVC experiments on the pipeline, through the real CLI: a sweep of seeds and images per class
queued in DVC's syntax and run by ``dvc queue`` workers (each in a temporary git copy of the
repository, so everything a stage needs must be tracked by git or DVC), compared with ``dvc
exp show`` and ``dvc plots diff``, kept with ``dvc exp apply`` and ``dvc exp branch``, summed
up by the README's summary command as a person would by hand; a plain ``dvc exp run`` in the
workspace; and the tables people read fit a 160-column terminal.
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
    MODES,
    SEEDS,
    Experiments,
    Pipeline,
    cache_object,
    copy_repo,
    declared_plots,
    dvc_json,
    head_lock,
    local_cache,
    page_specs,
    plain_run,
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
    """A sweep queued with ``dvc exp run --queue -S 'data.train_per_class=2,all' -S
    'seed=range(1,3)' ... evaluate@feature_extract`` and run by two ``dvc queue start`` workers
    (in temporary copies of the repository, leaving the workspace alone): each experiment ran
    what its target needs (the weights stage did not change) and no other strategy; ``dvc exp
    show`` has each one's params and metrics; ``dvc plots diff`` draws two of them; ``dvc exp
    apply`` brings one into the workspace and ``dvc exp branch`` makes a git branch of another."""
    repo = experiments.repo
    assert set(experiments.status.values()) == {"Success"}, experiments.status
    assert len(experiments.status) == 2 * len(SEEDS), experiments.status
    for name, log in experiments.logs.items():
        assert ran_stages(log) == ["unzip", "features", "train@feature_extract", "evaluate@feature_extract"], log
        assert "Stage 'weights' didn't change, skipping" in log, (name, log)
    assert repo.git("status", "--porcelain") == "", "the queue changed the workspace"
    assert "Data and pipelines are up to date" in repo.dvc("status").stdout

    shown = experiments_of(dvc_json(repo, "exp", "show"))
    assert set(shown) == set(experiments.status), shown
    assert sorted((param(d, "seed"), str(param(d, "data.train_per_class"))) for d in shown.values()) == sorted(
        (seed, size) for seed in SEEDS for size in ("2", "all"))
    baseline = {mode: json.loads(repo.git("show", f"HEAD:metrics/{mode}.json")) for mode in MODES}
    for name, data in shown.items():
        assert param(data, "train.feature_extract.lr") == EXPERIMENT_LR and param(data, "train.finetune.lr") == 0.001
        committed = json.loads(repo.git("show", f"{experiments.rev(name)}:metrics/feature_extract.json"))
        assert data["metrics"]["metrics/feature_extract.json"]["data"] == committed, name
        for mode in ("finetune", "lp_ft"):  # not run: the commit's files, untouched
            assert data["metrics"][f"metrics/{mode}.json"]["data"] == baseline[mode], (name, mode)

    # Two experiments on one page: every chart holds both revisions' data, every image is
    # there once per revision.
    names = sorted(shown)[:2]
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

    # Apply one: its params and results are in the workspace, and up to date; the README's
    # experiments command then shows its change in the workspace's row too.
    applied, branched = names
    work = copy_repo(repo, tmp_path / "work")
    work.dvc("exp", "apply", applied)
    assert yaml.safe_load((work.root / "params.yaml").read_text())["seed"] == param(shown[applied], "seed")
    assert json.loads((work.root / "metrics" / "feature_extract.json").read_text()) == \
        shown[applied]["metrics"]["metrics/feature_extract.json"]["data"]
    assert dvc_json(work, "status", "evaluate@feature_extract") == {}  # the others ran with the commit's seed
    rows = changed_params(work)
    assert rows["workspace"] == rows[applied] != "" and rows[branch_of(work)] == "", rows

    # Branch another: a git branch with its params, lock and results.
    work.dvc("exp", "branch", branched, "sweep-branch")
    assert "sweep-branch" in work.git("branch", "--list").split()
    assert yaml.safe_load(work.git("show", "sweep-branch:params.yaml"))["seed"] == param(shown[branched], "seed")
    assert work.git("show", "sweep-branch:dvc.lock") == repo.git("show", f"{experiments.rev(branched)}:dvc.lock")


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


def test_a_plain_exp_run_in_the_workspace_is_the_changed_row(pipeline: Pipeline, tmp_path: Path) -> None:
    """The README's everyday ``dvc exp run -S ...`` run in the workspace (not queued), where
    ``dvc exp show`` marks the workspace a baseline too: the workspace and the new experiment
    show the changed param, the commit does not."""
    started = plain_run(tmp_path, pipeline)
    assert ran_stages(started.result().stdout) == ["train@feature_extract", "evaluate@feature_extract"]
    assert changed_params(started.repo) == {"workspace": "train.feature_extract.lr=0.0123",
                                            "plain": "train.feature_extract.lr=0.0123", branch_of(started.repo): ""}


def test_metrics_and_experiments_fit_a_terminal(experiments: Experiments) -> None:
    """With the three strategies trained, ``dvc metrics show`` fits 160 columns and says which
    split scored them; after the sweep, the README's compare command (:func:`readme_compare_command`)
    shows each experiment on one line with the accuracy of the strategy it ran (``-`` for those
    it did not) and the params it changed, written as in params.yaml; and its ``--revs HEAD
    <experiment>`` pairs each strategy's predictions at the two."""
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
    assert len(lines) == 1 + 2 + len(experiments.status), compare
    head = [f"{json.loads(repo.git('show', f'HEAD:metrics/{mode}.json'))['accuracy']:.4f}" for mode in MODES]
    for label in ("workspace", branch_of(repo)):
        (row,) = [line.split() for line in lines[1:] if line.split()[0] == label]
        assert row == [label, *head], row
    shown = experiments_of(dvc_json(repo, "exp", "show"))
    for name, data in shown.items():
        (row,) = [line.split() for line in lines[1:] if f"[{name}]" in line]
        rev = experiments.rev(name)
        ran = json.loads(repo.git("show", f"{rev}:metrics/feature_extract.json"))["accuracy"]
        assert row[2:5] == ["-", f"{ran:.4f}", "-"], row
        size = param(data, "data.train_per_class")
        assert row[5:] == [f"seed={param(data, 'seed')}", *([f"data.train_per_class={size}"] if size != "all" else []),
                           f"train.feature_extract.lr={EXPERIMENT_LR}"], row

    # --revs with an experiment's name, as the README shows it: each strategy's predictions at
    # the two revisions, read through dvc.api and paired.
    name = sorted(shown)[0]
    revs = subprocess.run([*readme_compare_command()[:3], "--revs", "HEAD", name], cwd=repo.root,
                          env=repo.env, capture_output=True, text=True, check=True).stdout
    for mode in MODES:
        right = [{row.split(",")[0]: row.split(",")[1] == row.split(",")[2]
                  for row in repo.git("show", f"{rev}:plots/{mode}/predictions.csv").splitlines()[1:]}
                 for rev in ("HEAD", experiments.rev(name))]
        if right[0].keys() != right[1].keys():  # another seed split other images off into val/
            assert f"{mode}: not compared (" in revs and "were scored on different images" in revs, revs
            continue
        only = [sum(r[k] and not other[k] for k in r) for r, other in (right, right[::-1])]
        assert f"{mode}: HEAD " in revs, revs
        assert f"right only in HEAD: {only[0]}, only in {name}: {only[1]}; McNemar mid-p = " in revs, revs
    assert "Traceback" not in revs, revs


# --------------------------------------------------------------------------- sweeps over seeds

#: t's 97.5% point for 1 degree of freedom (two seeds), from the tables.
T_975_1 = 12.706205


def readme_summary_command() -> list[str]:
    (line,) = [line for line in README.read_text().splitlines() if line.startswith("python -m stages.compare --sum")]
    return shlex.split(line.split(" #")[0])


def sweep_runs(experiments: Experiments) -> list[dict[str, Any]]:
    """Each experiment of the sweep as a person would tally it: its seed and images per class
    (``dvc exp show``), feature_extract's accuracy and wrong images (its own commit's metrics
    and predictions, read with git)."""
    repo, runs = experiments.repo, []
    for name, data in experiments_of(dvc_json(repo, "exp", "show")).items():
        rev = experiments.rev(name)
        csv_text = repo.git("show", f"{rev}:plots/feature_extract/predictions.csv")
        rows = [line.split(",") for line in csv_text.splitlines()[1:]]
        runs.append({"name": name, "rev": rev, "seed": param(data, "seed"),
                     "group": param(data, "data.train_per_class"),
                     "accuracy": json.loads(repo.git("show", f"{rev}:metrics/feature_extract.json"))["accuracy"],
                     "wrong": {path for path, actual, predicted, _ in rows if actual != predicted},
                     "scored": [row[0] for row in rows]})
    return runs


def by_hand(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample sd and the 95% t-interval of the mean of two values."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    half = T_975_1 * sd / len(values) ** 0.5
    return mean, sd, mean - half, mean + half


def test_a_sweep_of_seeds_is_summed_up_as_by_hand(experiments: Experiments, tmp_path: Path) -> None:
    """``dvc exp run --queue -S 'data.train_per_class=2,all' -S 'seed=range(1,3)'`` run by two
    workers, then the README's summary command: per group, n, the mean accuracy, its sd,
    min-max and 95% interval equal a hand computation from each experiment's metrics; so does
    the difference between the groups paired by seed, with its verdict; the images every run
    of a group got wrong are those of the predictions; finetune and lp_ft, which the sweep did
    not run, are in none of it (their metrics files are the commit's); the curve is drawn."""
    repo = experiments.repo
    runs = sweep_runs(experiments)
    assert sorted((str(r["group"]), r["seed"]) for r in runs) == sorted((g, s) for g in ("2", "all") for s in SEEDS)
    plot = tmp_path / "summary.png"
    out = subprocess.run([*readme_summary_command(), "--plot", str(plot)], cwd=repo.root, env=repo.env,
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert max(map(len, lines)) <= WIDTH and "Traceback" not in out, out
    assert lines[0].startswith(f"{2 * len(SEEDS)} experiments in 2 groups (by data.train_per_class)"), out

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
            f"data.train_per_class={group}", "feature_extract", str(len(SEEDS)), f"{mean:.4f}", f"{sd:.4f}",
            f"{min(values):.4f}-{max(values):.4f}", f"{low:.4f}", "to", f"{high:.4f}"], out
        wrong = set.intersection(*(r["wrong"] for r in of))
        noun = "image" if len(wrong) == 1 else "images"
        assert line_of(f"data.train_per_class={group}:")[1:3] == [str(len(wrong)), noun], out
        assert all(image in out for image in wrong)
    (row,) = [line for line in lines if line.startswith("feature_extract: data.train_per_class=")]
    assert row.startswith("feature_extract: data.train_per_class=all - 2 "), "the later size minus the earlier"
    first, second = "all", 2
    mean, _, low, high = by_hand([a - b for a, b in zip(by_seed[first], by_seed[second], strict=True)])
    verdict = f"not shown to differ across {len(SEEDS)} seeds" if low <= 0 <= high else \
        f"data.train_per_class={first if mean > 0 else second} is better across {len(SEEDS)} seeds"
    assert " ".join(row.split()[4:]) == f"{len(SEEDS)} {mean:+.4f} {low:+.4f} to {high:+.4f} {verdict}", out
    assert "finetune" not in out and "lp_ft" not in out, "the sweep ran feature_extract alone"
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_images_per_class_are_nested_subsets_and_leave_validation_alone(experiments: Experiments) -> None:
    """With the same seed, ``data.train_per_class: 2`` trains on two of each class's four
    training images, among them, and scores exactly the validation images of ``all``."""
    repo = experiments.repo
    runs = {(r["group"], r["seed"]): r for r in sweep_runs(experiments)}
    for seed in SEEDS:
        small, full = runs[(2, seed)], runs[("all", seed)]
        reports = [json.loads(cache_object(local_cache(repo), head_lock(repo, run["rev"])["reports/data.json"])
                              .read_text()) for run in (small, full)]
        assert [set(r["train"]["per_class"].values()) for r in reports] == [{2}, {4}]
        assert reports[0]["val"] == reports[1]["val"] and reports[0]["train_per_class"] == 2
        assert small["scored"] == full["scored"]

