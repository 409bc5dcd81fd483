"""Stage ``compare``, and the commands that compare runs (docs/comparing.md):

- the stage pairs every two strategies of one run (McNemar's test on the images one gets
  right and the other wrong);
- ``--revs A B`` pairs each strategy's runs in two revisions or experiments;
- ``--experiments`` lists each experiment's accuracies and changed params on one line;
- ``--summary`` sums up a sweep: the experiments grouped by their params other than the seed,
  each strategy's mean accuracy over seeds with its spread, differences paired by seed with
  their intervals and verdicts, and the images every run of a group gets wrong.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict

from transfer.atomic import write_json
from transfer.errors import UserError, one_line
from transfer.params import Probability, Text
from transfer.schema import Schema, validate
from transfer.stage import run_stage
from transfer.statistics import Paired, Spread, pair, wilson_interval
from transfer.strategies import STRATEGIES

HEADER = ("pair", "images", "accuracy", "right only in each", "McNemar mid-p", "verdict")


class Prediction(Schema):
    """A row of evaluate's ``predictions.csv``, whose cells are text."""

    model_config = ConfigDict(strict=False)
    path: Text
    actual: Text
    predicted: Text
    confidence: Probability


def right_answers(text: str, source: str) -> dict[str, bool]:
    """image -> whether it was predicted right, from a predictions.csv's ``text``."""
    answers: dict[str, bool] = {}
    try:
        for line, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):
            prediction = validate(Prediction, row, f"{source} line {line} (evaluate writes it)")
            if prediction.path in answers:
                raise UserError(f"{source} line {line} predicts {prediction.path} a second time (evaluate writes it)")
            answers[prediction.path] = prediction.actual == prediction.predicted
    except csv.Error as exc:
        raise UserError(f"{source} is not a CSV table ({exc}; evaluate writes it)") from None
    if not answers:
        raise UserError(f"{source} holds no predictions (evaluate writes it): run `dvc repro`")
    return answers


def interval(correct: int, images: int) -> str:
    low, high = wilson_interval(correct, images)
    return f"{correct / images:.4f} (95% CI {low:.3f}-{high:.3f})"


def pairs_of(answers: dict[str, dict[str, bool]]) -> list[Paired]:
    return [pair(a, b, answers[a], answers[b]) for a, b in itertools.combinations(answers, 2)]


def within_run(files: list[Path], table: Path, report: Path) -> None:
    """Every pair of the strategies whose predictions ``files`` are (``plots/<strategy>/predictions.csv``)."""
    pairs = pairs_of({file.parent.name: right_answers(file.read_text(encoding="utf-8"), str(file)) for file in files})
    rows = [(f"{p.a} vs {p.b}", str(p.images), f"{p.a_correct / p.images:.4f} vs {p.b_correct / p.images:.4f}",
             f"{p.a_only} vs {p.b_only}", f"{p.p_value:.4f}", p.verdict) for p in pairs]
    from transfer.figures import save_table  # matplotlib, for the stage only

    save_table(table, HEADER, rows, "Paired comparison of the strategies (McNemar's test, mid-p)")
    write_json(report, {"pairs": [p._asdict() | {"verdict": p.verdict} for p in pairs]})
    print_table([HEADER, *rows])


def across_revs(revs: list[str], strategies: list[str]) -> None:
    """Each strategy's predictions at two revisions, compared on the images both scored."""
    import dvc.api
    from dvc.exceptions import DvcException

    if not strategies:
        raise UserError("no plots/<strategy>/predictions.csv here to find the strategies by: run `dvc repro`, or "
                        "name them with --strategy")
    for name in strategies:
        path = f"plots/{name}/predictions.csv"
        try:
            paired = pair(*revs, *(right_answers(dvc.api.read(path, rev=rev), f"{path} at {rev}") for rev in revs))
        except (DvcException, FileNotFoundError, UserError) as exc:
            print(f"{name}: not compared ({one_line(exc, 200)})")
            continue
        print(f"{name}: {paired.a} {interval(paired.a_correct, paired.images)}, {paired.b} "
              f"{interval(paired.b_correct, paired.images)}, {paired.images} images\n  right only in {paired.a}: "
              f"{paired.a_only}, only in {paired.b}: {paired.b_only}; McNemar mid-p = {paired.p_value:.4f}: "
              f"{paired.verdict}")


# --------------------------------------------------------------------------- experiments

def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` as ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool | None) else str(value)


def exp_show() -> list[dict[str, Any]]:
    """``dvc exp show --json``, which keeps params and metrics apart, by file: one record per
    row (the workspace, the commit, each experiment), named as ``--experiments`` shows it, with
    its params and the metrics of each strategy it ran with them (``metrics/<strategy>.json``, see :func:`fresh`)."""
    records = []
    for baseline in json.loads(output([sys.executable, "-m", "dvc", "exp", "show", "--json"], "dvc exp show failed")):
        for rev in [baseline, *(e["revs"][0] for e in baseline.get("experiments") or [])]:
            data = rev.get("data") or {}
            params = flat(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
            if rev["rev"] == "workspace":  # a baseline too, with no name, and its dvc.lock not committed
                kind = name = "workspace"
                lock = Path("dvc.lock").read_text(encoding="utf-8") if Path("dvc.lock").exists() else ""
            else:
                kind, name = "baseline", rev.get("name") or rev["rev"][:7]
                if rev is not baseline:
                    kind, name = "experiment", f"{rev['rev'][:7]} [{name}]"
                lock = output(["git", "show", f"{rev['rev']}:dvc.lock"])
            lock = yaml.safe_load(lock) or {}  # a commit never reproduced has none: nothing of it ran
            records.append({"rev": rev["rev"], "name": name, "kind": kind, "params": params, "metrics": {
                Path(file).stem: m.get("data") or {} for file, m in (data.get("metrics") or {}).items()
                if fresh(lock, params, f"evaluate@{Path(file).stem}")}})
    return records


def fresh(lock: dict[str, Any], params: dict[str, Any], stage: str) -> bool:
    """Whether ``stage`` of a ``dvc.lock`` ran with ``params``: it and every stage upstream with
    the params as they are, on inputs as the stages that wrote them left them. An experiment
    that ran some strategies keeps the others' metrics files of the commit, which are not its."""
    stages = lock.get("stages") or {}
    outs = {out["path"]: (name, out.get("md5")) for name, entry in stages.items() for out in entry.get("outs", [])}
    todo = [stage]
    for name in todo:  # grows by each stage upstream, once
        entry = stages.get(name)
        if entry is None or any(params.get(key) != value for key, value in
                                flat(entry.get("params", {}).get("params.yaml", {})).items()):
            return False
        for dep in entry.get("deps", []):
            if dep["path"] in outs:
                writer, md5 = outs[dep["path"]]
                if md5 != dep.get("md5"):
                    return False
                if writer not in todo:
                    todo.append(writer)
    return True


def output(command: list[str], failure: str = "") -> str:
    """What ``command`` prints; where it fails, a UserError ``failure: what it said``, or "" without a ``failure``."""
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode and failure:
        raise UserError(f"{failure}: {one_line(proc.stderr, 300)}")
    return "" if proc.returncode else proc.stdout


def experiments(strategies: list[str] | None) -> None:
    """The workspace, its commit and each experiment: accuracies, and params not as committed."""
    records = exp_show()
    commit = next((r["params"] for r in records if r["kind"] == "baseline"), {})
    strategies = strategies or [s for s in STRATEGIES if any(s in r["metrics"] for r in records)]
    table = [("experiment", *strategies, "params changed from the commit")]
    for r in records:
        accuracies = [r["metrics"].get(s, {}).get("accuracy") for s in strategies]
        table.append((r["name"], *(f"{a:.4f}" if isinstance(a, float | int) else "-" for a in accuracies),
                      " ".join(f"{k}={shown(v)}" for k, v in r["params"].items() if commit.get(k) != v)))
    print_table(table)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# --------------------------------------------------------------------------- sweeps

def summary(strategies: list[str] | None, plot: Path) -> None:
    """The experiments of this commit, grouped by their params other than the seed."""
    rows, swept = sweep_rows([r for r in exp_show() if r["kind"] == "experiment"], strategies)
    print(f"{rows['rev'].nunique()} experiments in {rows['group'].nunique()} groups (by "
          f"{', '.join(swept) or 'nothing but the seed'}); accuracy over seeds, mean with its 95% interval")
    table, series, groups = [("group", "strategy", "n", "mean", "sd", "min-max", "95% CI of the mean")], {}, {}
    for (group, strategy), values in rows.groupby(["group", "strategy"], sort=False)["accuracy"]:
        spread = series.setdefault(strategy, {})[groups.setdefault(group, len(groups))] = Spread.of(values.tolist())
        table.append((group, strategy, str(spread.n), f"{spread.mean:.4f}", "-" if spread.sd is None else
                      f"{spread.sd:.4f}", f"{min(values):.4f}-{max(values):.4f}", interval_of(spread)))
    print_table(table)
    rows["right"] = list(map(run_answers, rows["rev"], rows["strategy"]))
    if rows.groupby("group")["seed"].nunique().max() < 2:
        print("\none seed per group: nothing can be said across seeds; each experiment's strategies paired on its "
              "images (McNemar) instead")
        for (group, seed), runs in rows.groupby(["group", "seed"], sort=False):
            for p in pairs_of(runs.set_index("strategy")["right"].to_dict()):
                print(f"  {group} seed {seed}: {p.a} vs {p.b}: right only in each {p.a_only} vs {p.b_only}, mid-p "
                      f"= {p.p_value:.4f}: {p.verdict}")
    else:
        print("\ndifferences paired by seed (mean, 95% interval)")
        print_table([("compared", "seeds", "mean difference", "95% CI", "verdict"), *paired_rows(rows, swept)])
    print("\nwrong in every run of the group (label noise or hard cases to look at)")
    for group, runs in rows.groupby("group", sort=False):
        wrong = sorted(set.intersection(*({image for image in answers if not answers[image]}
                                          for answers in runs["right"])))
        print(f"  {group}: {len(wrong)} image{'' if len(wrong) == 1 else 's'}")
        for image in wrong[:10]:
            print(f"    {image}")
        if len(wrong) > 10:
            print(f"    ... and {len(wrong) - 10} more")
    draw(plot, rows, swept, series)
    print(f"\n-> {plot}")


def draw(plot: Path, rows: Any, swept: list[str], series: dict[str, dict[int, Spread]]) -> None:
    """Each strategy's accuracy (``series``: by the index of each group it ran in) against the
    swept param, or against each group where several were swept: where one was, each group is
    one of its values. In the rows' order: numbers, then words, ``all`` last."""
    from transfer.figures import save_sweep  # matplotlib, only to draw

    column = swept[0] if len(swept) == 1 else "group"
    runs = rows.value_counts(["group", "strategy"])  # each spread's n
    seeds = f"{runs.min()}" if runs.min() == runs.max() else f"{runs.min()}-{runs.max()}"
    save_sweep(plot, list(rows.drop_duplicates("group")[column]), series, column, f"accuracy over {seeds} seeds")


def sweep_rows(runs: list[dict[str, Any]], strategies: list[str] | None) -> tuple[Any, list[str]]:
    """One row per experiment and strategy it ran: its accuracy, its seed, and its group, the
    values of the params (``swept``) that differ between the experiments, the seed aside, as
    params.yaml writes them."""
    import pandas as pd

    runs = [r for r in runs if r["metrics"]]
    if not runs:
        raise UserError("no finished experiments of this commit to sum up: queue some, e.g. dvc exp run --queue "
                        "-S 'seed=range(1,6)', then dvc queue start")
    swept = [k for k in runs[0]["params"] if k != "seed" and len({shown(r["params"].get(k)) for r in runs}) > 1]

    def order(value: Any) -> tuple[bool, Any, str]:  # numbers in order, then words: "all" last
        number = isinstance(value, int | float)
        return not number, value if number else 0, str(value)

    scored = sorted(((r, s, m["accuracy"]) for r in runs for s, m in r["metrics"].items()
                     if s in (strategies or STRATEGIES) and isinstance(m.get("accuracy"), int | float)),
                    key=lambda row: ([order(row[0]["params"].get(k)) for k in swept], list(STRATEGIES).index(row[1])))
    rows = pd.DataFrame([{"rev": r["rev"], "seed": r["params"].get("seed"),
                          "group": " ".join(f"{k}={shown(r['params'].get(k))}" for k in swept) or "all",
                          **{k: shown(r["params"].get(k)) for k in swept}, "strategy": s, "accuracy": accuracy}
                         for r, s, accuracy in scored])
    return rows.drop_duplicates(["group", "seed", "strategy"]), swept  # one run of the same params and seed


def paired_rows(rows: Any, swept: list[str]) -> list[tuple[str, ...]]:
    """Strategies against each other within each group, and each strategy between two groups
    that differ in one param, their runs paired by seed; in the rows' order (:func:`sweep_rows`),
    and only where both sides ran with at least one seed in common."""
    table = rows.pivot_table(index=["group", "seed"], columns="strategy", values="accuracy", sort=False)
    ran = [s for s in STRATEGIES if s in table]
    out = [compared(f"{group}: {a} - {b}", by_seed[a] - by_seed[b], a, b)
           for group, by_seed in table.groupby("group", sort=False) for a, b in itertools.combinations(ran, 2)]
    groups = rows.drop_duplicates("group").set_index("group")[swept]
    for (g1, v1), (g2, v2) in itertools.combinations(groups.iterrows(), 2):
        differ = v1.index[v1 != v2]
        if len(differ) == 1:
            (k,) = differ
            a, b = f"{k}={v2[k]}", f"{k}={v1[k]}"
            out += [compared(f"{s}: {a} - {v1[k]}", table.loc[g2][s] - table.loc[g1][s], a, b) for s in ran]
    return [row for row in out if row[1] != "0"]


def compared(label: str, diffs: Any, a: str, b: str) -> tuple[str, ...]:
    """A row of paired differences A - B (a pandas Series by seed; the seeds only one ran are NaN)."""
    spread = Spread.of(diffs.dropna().tolist())
    return label, str(spread.n), f"{spread.mean:+.4f}", interval_of(spread, "+"), spread.verdict(a, b)


def interval_of(spread: Spread, sign: str = "") -> str:
    return "-" if spread.low is None else f"{spread.low:{sign}.4f} to {spread.high:{sign}.4f}"


def run_answers(rev: str, strategy: str) -> dict[str, bool]:
    """An experiment's predictions (kept in git: evaluate's plots are ``cache: false``)."""
    path = f"plots/{strategy}/predictions.csv"
    source = f"{path} at {rev[:7]}"
    return right_answers(output(["git", "show", f"{rev}:{path}"], f"cannot read {source}"), source)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="*", type=Path, help="the stage: each strategy's predictions.csv")
    parser.add_argument("--table", type=Path, help="the stage: the table's picture")
    parser.add_argument("--report", type=Path, help="the stage: the pairs as JSON")
    parser.add_argument("--revs", nargs=2, metavar=("A", "B"), help="compare two git revisions or experiments")
    parser.add_argument("--experiments", action="store_true", help="each experiment's accuracies and params")
    parser.add_argument("--summary", action="store_true", help="the experiments' accuracies over seeds, by group")
    parser.add_argument("--plot", type=Path, default="reports/summary.png", help="with --summary: its picture")
    parser.add_argument("--strategy", nargs="+", help="with --revs, --experiments or --summary: the strategies to "
                        "show (default: each one evaluated)")
    args = parser.parse_args(argv)
    if args.summary:
        summary(args.strategy, args.plot)
    elif args.experiments:
        experiments(args.strategy)
    elif args.revs:
        across_revs(args.revs, args.strategy or sorted(p.parent.name for p in Path("plots").glob("*/predictions.csv")))
    elif len(args.predictions) >= 2 and args.table and args.report:
        within_run(args.predictions, args.table, args.report)
    else:
        parser.error("give two or more predictions.csv files with --table and --report, or --revs A B, "
                     "--experiments or --summary")


if __name__ == "__main__":
    run_stage(main)
