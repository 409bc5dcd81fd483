"""Stage ``compare``, and a command: are two classifiers' accuracies on the same images shown
to differ? (docs/comparing.md). The stage pairs every two strategies of one run (the exact
McNemar test on the images one gets right and the other wrong); ``--revs A B`` pairs each
strategy's runs in two revisions or experiments; ``--experiments`` lists each experiment's
accuracies and changed params on one line (``dvc exp show``'s columns are too wide for that).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import re
from pathlib import Path

from transfer.atomic import write_json
from transfer.errors import UserError
from transfer.stage import run_stage
from transfer.statistics import Paired, pair, wilson_interval

HEADER = ("pair", "images", "accuracy", "right only in each", "McNemar p", "verdict")


def right_answers(text: str, source: str) -> dict[str, bool]:
    """image -> whether it was predicted right, from a predictions.csv's ``text``."""
    try:
        return {row["path"]: row["actual"] == row["predicted"] for row in csv.DictReader(io.StringIO(text))}
    except KeyError as exc:
        raise UserError(f"{source} has no {exc} column: it is not evaluate's predictions.csv") from None


def interval(correct: int, images: int) -> str:
    low, high = wilson_interval(correct, images)
    return f"{correct / images:.4f} (95% CI {low:.3f}-{high:.3f})"


def row(paired: Paired) -> tuple[str, ...]:
    return (f"{paired.a} vs {paired.b}", str(paired.images),
            f"{paired.a_correct / paired.images:.4f} vs {paired.b_correct / paired.images:.4f}",
            f"{paired.a_only} vs {paired.b_only}", f"{paired.p_value:.4f}", paired.verdict)


def within_run(files: list[Path], table: Path, report: Path) -> None:
    """Every pair of the strategies whose predictions ``files`` are (``plots/<strategy>/predictions.csv``)."""
    answers = {}
    for file in files:
        try:
            answers[file.parent.name] = right_answers(file.read_text(encoding="utf-8"), str(file))
        except FileNotFoundError:
            raise UserError(f"{file} does not exist: run the evaluate stages first (`dvc repro`)") from None
    try:
        pairs = [pair(a, b, answers[a], answers[b]) for a, b in itertools.combinations(answers, 2)]
    except ValueError as exc:
        raise UserError(f"{exc}: evaluate them on the same data (`dvc repro`)") from None
    rows = [row(p) for p in pairs]
    from transfer.figures import save_table  # matplotlib, for the stage only

    save_table(table, HEADER, rows, "Paired comparison of the strategies (exact McNemar test)")
    write_json(report, {"pairs": [{**vars(p), "p_value": p.p_value, "verdict": p.verdict} for p in pairs]})
    print_table([HEADER, *rows])


def across_revs(revs: list[str], strategies: list[str]) -> None:
    """Each strategy's predictions at two revisions, compared on the images both scored."""
    import dvc.api
    from dvc.exceptions import DvcException

    a, b = revs
    for name in strategies:
        path = f"plots/{name}/predictions.csv"
        try:
            answers = [right_answers(dvc.api.read(path, rev=rev), f"{path} at {rev}") for rev in revs]
        except (DvcException, FileNotFoundError) as exc:
            print(f"{name}: not compared ({' '.join(str(exc).split())[:160]})")
            continue
        try:
            paired = pair(a, b, *answers)
        except ValueError as exc:
            print(f"{name}: not compared: {exc}")
            continue
        print(f"{name}: {a} {interval(paired.a_correct, paired.images)}, {b} "
              f"{interval(paired.b_correct, paired.images)}, {paired.images} images\n  right only in {a}: "
              f"{paired.a_only}, only in {b}: {paired.b_only}; McNemar p = {paired.p_value:.4f}: {paired.verdict}")


#: dvc exp show's columns that are neither params nor metrics.
NOT_PARAMS = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}


def experiments(strategies: list[str] | None) -> None:
    """The workspace, its commit and each experiment: accuracies, and params not as committed."""
    import dvc.api

    rows = dvc.api.exp_show()
    params = [k for k in rows[0] if k not in NOT_PARAMS and ":" not in k and "/" not in k]
    found = [m.group(1) for k in rows[0] if (m := re.fullmatch(r"metrics/(.+)\.json:accuracy", k))]
    strategies = strategies or found
    baseline = next((r for r in rows if r.get("typ") == "baseline"), rows[0])
    table = [("experiment", *strategies, "params changed from the commit")]
    for r in rows:
        name = r["rev"] if r["typ"] in ("workspace", "baseline") else f"{r['rev']} [{r['Experiment']}]"
        changed = " ".join(f"{k}={r[k]}" for k in params if r.get(k) != baseline.get(k))
        accuracies = [r.get(f"metrics/{s}.json:accuracy") for s in strategies]
        table.append((name, *(f"{a:.4f}" if isinstance(a, float | int) else "-" for a in accuracies), changed))
    print_table(table)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for line in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="*", type=Path, help="the stage: each strategy's predictions.csv")
    parser.add_argument("--table", type=Path, help="the stage: the table's picture")
    parser.add_argument("--report", type=Path, help="the stage: the pairs as JSON")
    parser.add_argument("--revs", nargs=2, metavar=("A", "B"), help="compare two git revisions or experiments")
    parser.add_argument("--experiments", action="store_true", help="each experiment's accuracies and params")
    parser.add_argument("--strategy", nargs="+", help="with --revs or --experiments: the strategies to show "
                        "(default: each one evaluated in the workspace)")
    args = parser.parse_args(argv)
    if args.experiments:
        experiments(args.strategy)
    elif args.revs:
        across_revs(args.revs, args.strategy or sorted(p.parent.name for p in Path("plots").glob("*/predictions.csv")))
    elif len(args.predictions) >= 2 and args.table and args.report:
        within_run(args.predictions, args.table, args.report)
    else:
        parser.error("give two or more predictions.csv files with --table and --report, or --revs A B")


if __name__ == "__main__":
    run_stage(main)
