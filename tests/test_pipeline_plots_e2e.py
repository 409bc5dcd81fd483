"""The whole pipeline through the real DVC CLI, on tiny generated data: ``dvc repro`` builds
every output of every stage (and a run-cache entry for each), ``dvc metrics show`` and ``dvc
plots show`` present them, an unchanged pipeline reruns nothing, and a changed param reruns
exactly the stages that read it, with ``dvc params diff`` / ``dvc metrics diff`` showing the
change against the commit.

The plots page is checked against every plot dvc.yaml declares (its top-level ``plots:`` and
each stage's ``plots:`` outputs), so a plot declared there but missing from the page (a wrong
file name, a field the template cannot find) fails here. Whether the browser then draws it is
``test_plots_render.py``'s business.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import DvcRepo, find_metrics
from dvc_pipeline import (
    CLASSES,
    MODES,
    Pipeline,
    bar_axes,
    cache_object,
    datum_point,
    declared_metrics,
    declared_outputs,
    declared_plots,
    declared_stages,
    expected_bars,
    expected_confusion,
    expected_points,
    in_dvc_cache,
    local_cache,
    page_images,
    page_specs,
    plain_run,
    plots_show,
    ran_stages,
    read_csv_rows,
    resolved_stages,
    run_cache_entries,
    workspace_lock,
)
from PIL import Image

#: What metrics/<mode>.json holds: the numbers people compare across runs, nothing else.
METRIC_KEYS = {"accuracy", "ci95_low", "ci95_high", "loss", "macro_f1", "best_epoch", "images", "split", "held_out"}


def test_repro_builds_every_output(pipeline: Pipeline) -> None:
    """Every stage ran once; dvc.lock records each with all its outputs, which exist; data,
    models, reports and the training histories are in DVC's cache and git-ignored, the
    evaluation's metrics and plots in git; every stage left a run-cache entry (a plain
    ``cache: false`` output would have prevented it)."""
    repo, root = pipeline.repo, pipeline.repo.root
    stages = declared_stages(root)
    assert sorted(ran_stages(pipeline.first_run.stdout)) == sorted(stages)
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    assert sorted(lock) == sorted(stages)
    declared = declared_outputs(root)
    for name, stage in lock.items():
        locked = {out["path"] for out in stage.get("outs", [])}
        expected = {path for paths in declared.values() for path, writer in paths.items() if writer == name}
        assert locked == expected, name
        for path in locked:
            assert (root / path).exists(), f"{name}: {path} is missing"

    tracked = set(repo.git("ls-files").split())
    assert "dvc.lock" in tracked
    cached = in_dvc_cache(root)
    in_git = {path for path, by_dvc in cached.items() if not by_dvc}
    assert in_git == set(declared["metrics"]) | {p for p in declared["plots"] if "history" not in p}
    assert in_git <= tracked, sorted(in_git - tracked)
    hashes = workspace_lock(repo)
    for path in (p for p, by_dvc in cached.items() if by_dvc):
        assert path not in tracked and not any(t.startswith(path + "/") for t in tracked), path
        assert repo.git("check-ignore", path).strip() == path
        assert cache_object(local_cache(repo), hashes[path]).is_file(), f"{path} is not in DVC's cache"
    assert set(declared["outs"]) <= {p for p, by_dvc in cached.items() if by_dvc}
    assert {p.split("/")[0] for p in declared["outs"]} == {"data", "models", "reports"}

    # One run-cache entry per stage, recognised by its command.
    runs = run_cache_entries(local_cache(repo))
    commands = {name: stage["cmd"] for name, stage in resolved_stages(root).items()}
    assert sorted(entry["cmd"] for entry in runs) == sorted(commands.values()), "a stage has no run-cache entry"

    for mode in MODES:
        metrics = json.loads((root / "metrics" / f"{mode}.json").read_text())
        assert set(metrics) == METRIC_KEYS
        assert metrics["images"] == 6 and metrics["best_epoch"] in (1, 2)
        assert 0 <= metrics["ci95_low"] <= metrics["accuracy"] <= metrics["ci95_high"] <= 1
        header = (root / "plots" / mode / "predictions.csv").read_text().splitlines()[0]
        assert header == "path,actual,predicted,confidence"
        classes = read_csv_rows(root / "plots" / mode / "classes.csv")
        assert [row["class"] for row in classes] == list(CLASSES)
        assert {row["support"] for row in classes} == {"2"}
        assert set(classes[0]) == {"class", "precision", "recall", "f1", "support"}
        for stage in ("train", "evaluate"):
            record = json.loads((root / "reports" / mode / f"{stage}.json").read_text())
            assert record["device"] == "cpu" and record["threads"] == 1, record
            assert record["versions"]["dvc"] and record["git"]["commit"], record
    for png in [p.id for p in declared_plots(root) if p.is_image]:
        with Image.open(root / png) as image:
            assert image.format == "PNG", png

    # The compare stage paired every two strategies on the images they were scored on,
    # counted here again from their predictions.
    right = {mode: {row["path"]: row["actual"] == row["predicted"]
                    for row in read_csv_rows(root / "plots" / mode / "predictions.csv")} for mode in MODES}
    pairs = json.loads((root / "reports" / "comparison.json").read_text())["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [(a, b) for i, a in enumerate(MODES) for b in MODES[i + 1:]]
    for p in pairs:
        a, b = right[p["a"]], right[p["b"]]
        assert p["images"] == len(a) == 6 and a.keys() == b.keys()
        assert (p["a_only"], p["b_only"]) == (sum(a[k] and not b[k] for k in a), sum(b[k] and not a[k] for k in a))
        assert 0 < p["p_value"] <= 1 and p["verdict"].endswith("at the 5% level"), p


def test_metrics_show_lists_both_evaluations(pipeline: Pipeline) -> None:
    """``dvc metrics show`` presents exactly the declared metrics files (one per mode, no run
    record or data report), with the values on disk."""
    root = pipeline.repo.root
    shown = json.loads(pipeline.repo.dvc("metrics", "show", "--json").stdout)
    assert declared_metrics(root) == [f"metrics/{mode}.json" for mode in MODES]
    for path in declared_metrics(root):
        metrics = find_metrics(shown, path)
        assert metrics is not None, shown
        assert metrics == json.loads((root / path).read_text()), path
    assert "reports/" not in json.dumps(shown) and "models/" not in json.dumps(shown), shown


def test_plots_show_presents_every_declared_plot(pipeline: Pipeline, tmp_path: Path) -> None:
    """``dvc plots show`` writes a page with one chart per declared vega plot, titled as
    declared and holding the data of its CSV files (both modes' histories, each confusion
    matrix's predictions, each per-class bar), and every declared image, copied next to the
    page byte for byte."""
    root = pipeline.repo.root
    html = plots_show(pipeline.repo, tmp_path / "out")
    specs, images = page_specs(html), page_images(html)
    plots = declared_plots(root)
    charts = [p for p in plots if not p.is_image]
    assert sorted(specs) == sorted(p.title for p in charts)
    assert set(images) == {p.id for p in plots if p.is_image}
    assert {p.stage for p in plots} >= {None, *(f"evaluate@{mode}" for mode in MODES)}

    for plot in plots:
        if plot.is_image:
            copied = tmp_path / "out" / images[plot.id]
            assert copied.read_bytes() == (root / plot.id).read_bytes(), plot.id
            continue
        assert plot.props is not None
        values = specs[plot.title]["data"]["values"]
        assert values, plot.id
        if plot.template == "confusion":
            x = plot.props["x"]
            ((_, y),) = plot.series()
            counts: dict[tuple[str, str], int] = {}
            for row in values:
                counts[row[x], row[y]] = counts.get((row[x], row[y]), 0) + 1
            assert counts == expected_confusion(plot, root), plot.id
        elif plot.template.startswith("bar"):
            category, value = bar_axes(plot)
            assert {row[category]: float(row[value]) for row in values} == expected_bars(plot, root), plot.id
        else:
            points = {p for p in (datum_point(d, plot) for d in values) if p is not None}
            assert points == expected_points(plot, root), plot.id
            assert len({x for _, _, x, _ in points}) == 2, f"{plot.id}: two epochs, two points per line"
            if plot.stage is None:  # the top-level charts overlay both modes
                assert len({(path, field) for path, field, _, _ in points}) == len(plot.series()) > 1


def test_unchanged_pipeline_reruns_nothing(pipeline: Pipeline) -> None:
    """A second ``dvc repro`` with nothing changed runs no stage."""
    second = pipeline.repo.dvc("repro")
    assert ran_stages(second.stdout) == []
    assert "Data and pipelines are up to date" in pipeline.repo.dvc("status").stdout
    assert pipeline.repo.git("status", "--porcelain") == ""


def test_changed_param_reruns_its_stages_and_shows_in_diffs(pipeline: Pipeline, tmp_path: Path) -> None:
    """The README's plain experiment (dvc_pipeline.plain_run: ``dvc exp run -S
    train.feature_extract.lr=0.0123`` in the workspace) reran train@feature_extract and
    evaluate@feature_extract only; ``dvc params diff`` shows the param and ``dvc metrics diff``
    the feature_extract metrics that moved, against the committed first run, and nothing of
    finetune."""
    started = plain_run(tmp_path, pipeline)
    repo: DvcRepo = started.repo
    assert ran_stages(started.result().stdout) == ["train@feature_extract", "evaluate@feature_extract"]

    params = json.loads(repo.dvc("params", "diff", "--json").stdout)
    assert list(params) == ["params.yaml"] and list(params["params.yaml"]) == ["train.feature_extract.lr"], params
    change = params["params.yaml"]["train.feature_extract.lr"]
    assert (change["old"], change["new"]) == (0.001, 0.0123)

    diff = json.loads(repo.dvc("metrics", "diff", "--json").stdout)
    before = json.loads(repo.git("show", "HEAD:metrics/feature_extract.json"))
    after = json.loads((repo.root / "metrics" / "feature_extract.json").read_text())
    assert after["loss"] != before["loss"]
    head_diff = find_metrics(diff, "metrics/feature_extract.json")
    assert head_diff is not None, diff
    assert head_diff["loss"]["old"] == pytest.approx(before["loss"])
    assert head_diff["loss"]["new"] == pytest.approx(after["loss"])
    assert find_metrics(diff, "metrics/finetune.json") is None, diff

    # feature_extract's git-tracked results changed, nothing of finetune; run records are DVC's.
    changed = {line[3:] for line in repo.git("status", "--porcelain").splitlines()}
    assert {"params.yaml", "dvc.lock", "metrics/feature_extract.json",
            "plots/feature_extract/predictions.csv"} <= changed
    assert not any("finetune" in path or path.startswith("reports/") for path in changed), changed
