"""The whole pipeline through the real DVC CLI, on tiny generated data: ``dvc repro`` builds
every output of every stage, ``dvc metrics show`` and ``dvc plots show`` present them, an
unchanged pipeline reruns nothing, and a changed param reruns exactly the stages that read
it, with ``dvc params diff`` / ``dvc metrics diff`` showing the change against the commit.

The plots page is checked against dvc.yaml's own ``plots:`` list, so a plot declared there
but missing from the page (a wrong file name, a field the template cannot find) fails here.
Whether the browser then draws it is ``test_plots_render.py``'s business.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import DvcRepo, find_metrics
from dvc_pipeline import (
    MODES,
    Pipeline,
    copy_repo,
    datum_point,
    declared_plots,
    declared_stages,
    expected_confusion,
    expected_points,
    page_images,
    page_specs,
    plots_show,
    shared_pipeline,
)
from PIL import Image


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """Reproduced once per session (the slow part) and shared with the rendering test."""
    return shared_pipeline(tmp_path_factory)


def ran_stages(stdout: str) -> list[str]:
    """The stages a ``dvc repro`` ran, in order."""
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")]


def test_repro_builds_every_output(pipeline: Pipeline) -> None:
    """Every stage ran once, dvc.lock records each with all its outputs, and they exist."""
    root = pipeline.repo.root
    stages = declared_stages(root)
    assert sorted(ran_stages(pipeline.first_run.stdout)) == sorted(stages)
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    assert sorted(lock) == sorted(stages)
    for name, stage in lock.items():
        for out in stage.get("outs", []):
            assert (root / out["path"]).exists(), f"{name}: {out['path']} is missing"

    for mode in MODES:
        report = json.loads((root / "metrics" / mode / "eval.json").read_text())
        assert report["images"] == 6 and report["device"] == "cpu"
        assert set(report["per_class"]) == {"ants", "bees"}
        for key in ("accuracy", "loss", "macro", "checkpoint_epoch"):
            assert key in report
        header = (root / "plots" / mode / "predictions.csv").read_text().splitlines()[0]
        assert header == "path,actual,predicted,confidence"
    for png in [p.id for p in declared_plots(root) if p.is_image]:
        with Image.open(root / png) as image:
            assert image.format == "PNG", png
    # metrics and plots are small text/pictures kept in git (cache: false), models in DVC's cache
    tracked = pipeline.repo.git("ls-files").split()
    assert "dvc.lock" in tracked and "metrics/finetune/eval.json" in tracked
    assert "plots/finetune/predictions.png" in tracked and "models/finetune.pt" not in tracked


def test_metrics_show_lists_both_evaluations(pipeline: Pipeline) -> None:
    """``dvc metrics show`` presents each mode's eval.json, accuracy included."""
    shown = json.loads(pipeline.repo.dvc("metrics", "show", "--json").stdout)
    for mode in MODES:
        path = f"metrics/{mode}/eval.json"
        metrics = find_metrics(shown, path)
        assert metrics is not None, shown
        on_disk = json.loads((pipeline.repo.root / path).read_text())
        assert metrics["accuracy"] == on_disk["accuracy"]
        assert metrics["per_class"]["ants"]["support"] == 3


def test_plots_show_presents_every_declared_plot(pipeline: Pipeline, tmp_path: Path) -> None:
    """``dvc plots show`` writes a page with one chart per declared vega plot, holding the
    data of its CSV files (both modes' histories, each confusion matrix's predictions), and
    every declared image, copied next to the page byte for byte."""
    root = pipeline.repo.root
    html = plots_show(pipeline.repo, tmp_path / "out")
    specs, images = page_specs(html), page_images(html)
    plots = declared_plots(root)
    assert set(specs) == {p.id for p in plots if not p.is_image}
    assert set(images) == {p.id for p in plots if p.is_image}

    for plot in plots:
        if plot.is_image:
            copied = tmp_path / "out" / images[plot.id]
            assert copied.read_bytes() == (root / plot.id).read_bytes(), plot.id
            continue
        assert plot.props is not None
        values = specs[plot.id]["data"]["values"]
        if plot.props.get("template") == "confusion":
            x = plot.props["x"]
            ((_, y),) = plot.series()
            counts: dict[tuple[str, str], int] = {}
            for row in values:
                counts[row[x], row[y]] = counts.get((row[x], row[y]), 0) + 1
            assert counts == expected_confusion(plot, root), plot.id
        else:
            points = {p for p in (datum_point(d, plot) for d in values) if p is not None}
            assert points == expected_points(plot, root), plot.id
            assert len({(path, field) for path, field, _, _ in points}) == len(plot.series()) > 1


def test_unchanged_pipeline_reruns_nothing(pipeline: Pipeline) -> None:
    """A second ``dvc repro`` with nothing changed runs no stage."""
    second = pipeline.repo.dvc("repro")
    assert ran_stages(second.stdout) == []
    assert "Data and pipelines are up to date" in pipeline.repo.dvc("status").stdout
    assert pipeline.repo.git("status", "--porcelain") == ""


def test_changed_param_reruns_its_stages_and_shows_in_diffs(pipeline: Pipeline, tmp_path: Path) -> None:
    """Changing train.finetune.lr reruns train@finetune and evaluate@finetune only; ``dvc
    params diff`` shows the param and ``dvc metrics diff`` the finetune metrics that moved,
    against the committed first run, and nothing of feature_extract."""
    repo: DvcRepo = copy_repo(pipeline.repo, tmp_path)
    repo.set_params({"train.finetune.lr": 0.01})
    rerun = repo.dvc("repro")
    assert ran_stages(rerun.stdout) == ["train@finetune", "evaluate@finetune"]

    params = json.loads(repo.dvc("params", "diff", "--json").stdout)
    assert list(params) == ["params.yaml"] and list(params["params.yaml"]) == ["train.finetune.lr"], params
    change = params["params.yaml"]["train.finetune.lr"]
    assert (change["old"], change["new"]) == (0.001, 0.01)

    diff = json.loads(repo.dvc("metrics", "diff", "--json").stdout)
    before = json.loads(repo.git("show", "HEAD:metrics/finetune/train.json"))
    after = json.loads((repo.root / "metrics" / "finetune" / "train.json").read_text())
    assert after["final_train_loss"] != before["final_train_loss"]
    train_diff = find_metrics(diff, "metrics/finetune/train.json")
    assert train_diff is not None, diff
    assert train_diff["final_train_loss"]["old"] == pytest.approx(before["final_train_loss"])
    assert train_diff["final_train_loss"]["new"] == pytest.approx(after["final_train_loss"])
    eval_diff = find_metrics(diff, "metrics/finetune/eval.json")
    assert eval_diff is not None and "loss" in eval_diff, diff
    assert find_metrics(diff, "metrics/feature_extract/eval.json") is None, diff
    assert find_metrics(diff, "metrics/feature_extract/train.json") is None, diff
