"""The paired comparison of strategies (``transfer.statistics``, the ``compare`` stage), checked
against cases worked by hand.

The exact McNemar test looks only at the discordant images, the ``b`` that A gets right and B
wrong and the ``c`` the other way round: if neither classifier were better, each would be a
fair coin, so the two-sided p-value is ``2 * P(X <= min(b, c))`` for ``X ~ Binomial(b + c,
1/2)``, capped at 1; the mid-p-value counts the observed split half: ``2 * P(X <= k) - P(X = k)``.
Over seeds, a mean comes with Student's t-interval, its t from the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import error_line
from trained import exit_code

from stages import compare as compare_stage
from transfer.errors import UserError
from transfer.statistics import Spread, mcnemar, pair, t_quantile


@pytest.mark.parametrize(("a_only", "b_only", "exact", "mid"), [
    (0, 0, 1.0, 1.0),                     # nothing discordant: no evidence either way
    (1, 0, 1.0, 0.5),                     # 2 * 1/2; 2 * 1/2 - 1/2
    (5, 0, 0.0625, 0.03125),              # 2 * 1/32; 2/32 - 1/32: five to none is shown by mid-p
    (6, 0, 0.03125, 0.015625),            # 2 * 1/64; 1/64
    (3, 5, 0.7265625, 0.5078125),         # 2 * (1 + 8 + 28 + 56) / 256 = 186/256; (186 - 56)/256
    (2, 3, 1.0, 0.6875),                  # 2 * 16/32 capped; (32 - 10)/32
    (10, 2, 0.03857421875, 0.0224609375),  # 158/4096; (158 - 66)/4096
    (20, 10, 0.0987371467, 0.0707555460),  # a two-sided binomial test of 10 in 30 as tables give it; - C(30,10)/2^30
])
def test_mcnemar_matches_hand_worked_cases(a_only: int, b_only: int, exact: float, mid: float) -> None:
    assert mcnemar(a_only, b_only) == pytest.approx((exact, mid), abs=1e-10)
    assert mcnemar(b_only, a_only) == mcnemar(a_only, b_only), "which one is A does not matter"


def test_mcnemar_is_exact_for_large_counts() -> None:
    """Thousands of discordant images: no overflow to inf/nan, and tiny p-values stay positive."""
    assert mcnemar(30_000, 30_000) == (1.0, 1.0)
    exact, mid = mcnemar(600, 400)  # z = (200 - 1) / sqrt(1000) = 6.3 in the normal approximation
    assert 1e-12 < mid < exact < 1e-8


@pytest.mark.parametrize(("df", "t"), [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                       (29, 2.0452), (120, 1.9799)])
def test_t_quantiles_are_the_tables(df: int, t: float) -> None:
    assert t_quantile(df) == pytest.approx(t, abs=1e-4)


def test_a_spread_over_seeds_is_the_hand_worked_one() -> None:
    """0.954, 0.961, 0.967, 0.967, 0.967 (five seeds of the issue): mean 0.9632, sd 0.005762,
    interval 0.9632 -+ 2.7764 * 0.005762 / sqrt(5); one value has no spread."""
    spread = Spread.of([0.954, 0.961, 0.967, 0.967, 0.967])
    assert (spread.n, spread.mean, spread.sd) == (5, pytest.approx(0.9632), pytest.approx(0.0057619, abs=1e-6))
    assert (spread.low, spread.high) == (pytest.approx(0.956046, abs=1e-5), pytest.approx(0.970354, abs=1e-5))
    assert Spread.of([0.9]) == Spread(1, 0.9, None, None, None)
    # 0.05, 0.06, 0.07: 0.06 -+ 4.3027 * 0.01 / sqrt(3) = 0.0352 to 0.0848; 0.01, 0.02, 0.03: -0.0048 to 0.0448
    assert Spread.of([0.05, 0.06, 0.07]).verdict("A", "B") == "A is better across 3 seeds"
    assert Spread.of([0.01, 0.02, 0.03]).verdict("A", "B") == "not shown to differ across 3 seeds"
    assert Spread.of([-0.05, -0.06, -0.07]).verdict("A", "B") == "B is better across 3 seeds"


def run(name: str, seed: int, accuracies: dict[str, float], **params: object) -> dict[str, object]:
    """An experiment as :func:`stages.compare.exp_show` reads it."""
    return {"name": name, "rev": name * 4, "kind": "experiment", "params": {"seed": seed, "model.arch": "resnet18",
            **params}, "metrics": {s: {"accuracy": a} for s, a in accuracies.items()}}


def test_a_sweep_is_grouped_by_its_params_but_the_seed_and_paired_by_seed() -> None:
    """Two lrs over three seeds: two groups named by the lr alone (the seed and the params that
    do not vary are no group), finetune against feature_extract within each, and each strategy
    between the two lrs, each difference paired by seed, with its t-interval (t = 4.3027)."""
    runs = [run(f"e{seed}{lr}", seed, {"finetune": f, "feature_extract": e}, **{"train.lr": lr})
            for lr, results in ((0.001, [(0.90, 0.80), (0.92, 0.83), (0.94, 0.86)]),
                                (0.01, [(0.70, 0.80), (0.75, 0.80), (0.71, 0.80)]))
            for seed, (f, e) in zip((1, 2, 3), results, strict=True)]
    rows, swept = compare_stage.sweep_rows(runs, None)
    assert swept == ["train.lr"] and sorted(rows["group"].unique()) == ["train.lr=0.001", "train.lr=0.01"]
    assert len(rows) == 12 and set(rows["seed"]) == {1, 2, 3}
    table = {r[0]: r[1:] for r in compare_stage.paired_rows(rows, swept)}
    # 0.10, 0.09, 0.08: mean 0.09, sd 0.01, half 4.3027 * 0.01 / sqrt(3) = 0.02484
    assert table["train.lr=0.001: finetune - feature_extract"] == (
        "3", "+0.0900", "+0.0652 to +0.1148", "finetune is better across 3 seeds")
    # -0.10, -0.05, -0.09: mean -0.08, sd 0.026458, half 0.06572
    assert table["train.lr=0.01: finetune - feature_extract"] == (
        "3", "-0.0800", "-0.1457 to -0.0143", "feature_extract is better across 3 seeds")
    # feature_extract, lr 0.01 - 0.001: 0.0, -0.03, -0.06: mean -0.03, sd 0.03, half 0.07452
    assert table["feature_extract: train.lr=0.01 - 0.001"] == (
        "3", "-0.0300", "-0.1045 to +0.0445", "not shown to differ across 3 seeds")
    assert table["finetune: train.lr=0.01 - 0.001"][:2] == ("3", "-0.2000")
    lone, _ = compare_stage.sweep_rows([run("a", 1, {"finetune": 0.5}), run("b", 2, {"finetune": 0.6})], None)
    assert set(lone["group"]) == {"all"}, "only the seed varies: one group"
    with pytest.raises(UserError, match="no finished experiments"):
        compare_stage.sweep_rows([{**run("c", 1, {}), "metrics": {}}], None)


def test_a_learning_curve_is_paired_in_the_order_of_its_sizes_and_only_where_both_ran() -> None:
    """Sizes 5, 10, 50 and all (as strings they would sort 10, 5, 50): feature_extract at every
    size, finetune at 5 and 10 alone. No row pairs finetune with a size it never ran at."""
    runs = [run(f"e{seed}{size}", seed, {"feature_extract": 0.8 + seed / 100 + rank / 50}
                | ({"finetune": 0.9 + seed / 100 + rank / 50} if size in (5, 10) else {}),
                **{"data.train_per_class": size})
            for rank, size in enumerate((50, "all", 10, 5)) for seed in (1, 2)]
    rows, swept = compare_stage.sweep_rows(runs, None)
    assert list(rows.drop_duplicates("group")["group"]) == [f"data.train_per_class={n}" for n in (5, 10, 50, "all")]
    labels = [r[0] for r in compare_stage.paired_rows(rows, swept)]
    assert labels == ["data.train_per_class=5: finetune - feature_extract",
                      "data.train_per_class=10: finetune - feature_extract",
                      "finetune: data.train_per_class=10 - 5",
                      *(f"feature_extract: data.train_per_class={b} - {a}" for a, b in
                        ((5, 10), (5, 50), (5, "all"), (10, 50), (10, "all"), (50, "all")))]


def test_a_strategy_counts_only_where_it_ran_with_the_experiments_params() -> None:
    """An experiment that ran feature_extract alone keeps the commit's finetune results: its
    dvc.lock says finetune ran with another seed, or on another data folder, than the experiment's."""
    lock = {"stages": {
        "unzip": {"params": {"params.yaml": {"seed": 1}}, "outs": [{"path": "data", "md5": "new.dir"}]},
        "train@feature_extract": {"params": {"params.yaml": {"seed": 1, "train.feature_extract": {"lr": 0.1}}},
                                  "deps": [{"path": "data", "md5": "new.dir"}],
                                  "outs": [{"path": "fe.pt", "md5": "f"}]},
        "evaluate@feature_extract": {"params": {"params.yaml": {"seed": 1}}, "deps": [{"path": "fe.pt", "md5": "f"}]},
        "train@finetune": {"params": {"params.yaml": {"seed": 1}}, "deps": [{"path": "data", "md5": "old.dir"}],
                           "outs": [{"path": "ft.pt", "md5": "t"}]},
        "evaluate@finetune": {"params": {"params.yaml": {"seed": 42}}, "deps": [{"path": "ft.pt", "md5": "t"}]},
    }}
    params = {"seed": 1, "train.feature_extract.lr": 0.1}
    assert compare_stage.fresh(lock, params, "evaluate@feature_extract")
    assert not compare_stage.fresh(lock, params, "evaluate@finetune"), "another seed"
    lock["stages"]["evaluate@finetune"]["params"]["params.yaml"]["seed"] = 1
    assert not compare_stage.fresh(lock, params, "evaluate@finetune"), "another data folder"
    assert not compare_stage.fresh(lock, {**params, "train.feature_extract.lr": 0.2}, "evaluate@feature_extract")
    assert not compare_stage.fresh(lock, params, "evaluate@lp_ft"), "never ran"


def test_pair_counts_what_each_gets_right_alone() -> None:
    """A right on 1-4, B right on 3-5: 2 images only A gets right (1, 2), 1 only B (5)."""
    right_a = {str(i): i in (1, 2, 3, 4) for i in range(6)}
    right_b = {str(i): i in (3, 4, 5) for i in range(6)}
    paired = pair("A", "B", right_a, right_b)
    assert (paired.images, paired.a_correct, paired.b_correct, paired.a_only, paired.b_only) == (6, 4, 3, 2, 1)
    assert (paired.p_exact, paired.p_value) == (1.0, 0.625) and paired.verdict == "not shown to differ at the 5% level"


def test_the_verdict_names_the_better_one_only_when_shown() -> None:
    right = {str(i): True for i in range(10)}
    six_wrong = {str(i): i >= 6 for i in range(10)}
    assert pair("A", "B", right, six_wrong).verdict == "A is better at the 5% level"
    assert pair("B", "A", six_wrong, right).verdict == "A is better at the 5% level"
    four_wrong = {str(i): i >= 4 for i in range(10)}  # mid-p 1/16: five would be shown (1/32)
    assert pair("A", "B", right, four_wrong).verdict == "not shown to differ at the 5% level"


def test_pairs_must_be_scored_on_the_same_images() -> None:
    with pytest.raises(UserError, match=r"A and B were scored on different images \(2 not in both, such as x\)"):
        pair("A", "B", {"x": True, "y": True}, {"y": True, "z": False})


def predictions(folder: Path, strategy: str, right: list[bool]) -> Path:
    """``plots/<strategy>/predictions.csv`` with one row per image, right or wrong as given."""
    path = folder / strategy / "predictions.csv"
    path.parent.mkdir(parents=True)
    rows = [f"val/{'ants' if i % 2 else 'bees'}/{i}.jpg,{'ants' if i % 2 else 'bees'},"
            f"{('ants' if i % 2 else 'bees') if ok else ('bees' if i % 2 else 'ants')},0.900000"
            for i, ok in enumerate(right)]
    path.write_text("path,actual,predicted,confidence\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_the_stage_pairs_every_strategy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three strategies, three pairs in the order given; the report holds the counts, the
    p-value and the verdict; the table is printed and drawn."""
    files = [predictions(tmp_path, "first", [True] * 8),
             predictions(tmp_path, "second", [True, True] + [False] * 6),
             predictions(tmp_path, "third", [False, True, True, True, True, True, True, True])]
    report, table = tmp_path / "reports" / "comparison.json", tmp_path / "comparison.png"
    args = [*map(str, files), "--table", str(table), "--report", str(report)]
    assert exit_code(compare_stage.main, args) == 0
    pairs = json.loads(report.read_text())["pairs"]
    assert [(p["a"], p["b"], p["images"], p["a_correct"], p["b_correct"], p["a_only"], p["b_only"]) for p in pairs] == [
        ("first", "second", 8, 8, 2, 6, 0), ("first", "third", 8, 8, 7, 1, 0), ("second", "third", 8, 2, 7, 1, 6)]
    assert [p["p_exact"] for p in pairs] == [0.03125, 1.0, 0.125]  # 2/64, 2*2/4 capped, 2*8/128
    assert [p["p_value"] for p in pairs] == [0.015625, 0.5, 0.0703125]  # mid-p: 1/64, 1/2, (16 - 7)/128
    assert [p["verdict"] for p in pairs] == ["first is better at the 5% level", "not shown to differ at the 5% level",
                                             "not shown to differ at the 5% level"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["pair", "images"] and len(out) == 4, out
    assert out[1].split()[:9] == ["first", "vs", "second", "8", "1.0000", "vs", "0.2500", "6", "vs"], out
    assert table.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert exit_code(compare_stage.main, args) == 0
    assert json.loads(report.read_text())["pairs"] == pairs


def test_the_stage_refuses_what_it_cannot_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file, images that differ, or a file that is not evaluate's (another table,
    a header alone, a row with only a path, a confidence that is no number, an image twice):
    one line each, naming the file and its line, nothing written."""
    a = predictions(tmp_path, "a", [True, True])
    out = ["--table", str(tmp_path / "t.png"), "--report", str(tmp_path / "r.json")]
    assert exit_code(compare_stage.main, [str(a), str(tmp_path / "b" / "predictions.csv"), *out]) == 1
    assert "No such file or directory" in error_line(capsys.readouterr().err)
    longer = predictions(tmp_path, "longer", [True, True, True])
    assert exit_code(compare_stage.main, [str(a), str(longer), *out]) == 1
    assert "a and longer were scored on different images (1 not in both" in error_line(capsys.readouterr().err)
    header = "path,actual,predicted,confidence\n"
    for text, expected in [("image,label\nx,ants\n", "line 2 (evaluate writes it): missing key path"),
                           (header, "holds no predictions (evaluate writes it)"),
                           (header + "val/a/1.jpg\n", "line 2 (evaluate writes it): actual: Input should be a valid "
                                                      "string, got None"),
                           (header + "x,ants,ants,high\n", "line 2 (evaluate writes it): confidence: Input should be a "
                                                           "valid number"),
                           (header + "x,ants,ants,0.5\nx,ants,bees,0.5\n", "line 3 predicts x a second time")]:
        other = tmp_path / "other.csv"
        other.write_text(text, encoding="utf-8")
        assert exit_code(compare_stage.main, [str(a), str(other), *out]) == 1
        assert f"{other} {expected}" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "r.json").exists()


def test_params_are_flattened_to_dotted_names_with_their_own_types() -> None:
    """As ``dvc.lock`` and the changed-params column name them; a flag stays a bool (``false``,
    as params.yaml writes it), an empty mapping adds nothing."""
    tree = {"seed": 1, "train": {"finetune": {"lr": 0.001}}, "data": {"sha256": None, "test": False}, "none": {}}
    params = compare_stage.flat(tree)
    assert params == {"seed": 1, "train.finetune.lr": 0.001, "data.sha256": None, "data.test": False}
    assert [compare_stage.shown(v) for v in params.values()] == ["1", "0.001", "null", "false"]
    assert compare_stage.flat({}) == {}
