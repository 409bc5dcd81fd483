"""The paired comparison of strategies (``transfer.statistics``, the ``compare`` stage), checked
against cases worked by hand.

The exact McNemar test looks only at the discordant images, the ``b`` that A gets right and B
wrong and the ``c`` the other way round: if neither classifier were better, each would be a
fair coin, so the two-sided p-value is ``2 * P(X <= min(b, c))`` for ``X ~ Binomial(b + c,
1/2)``, capped at 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import error_line
from trained import exit_code

from stages import compare as compare_stage
from transfer.statistics import mcnemar, pair


@pytest.mark.parametrize(("a_only", "b_only", "p"), [
    (0, 0, 1.0),              # nothing discordant: no evidence either way
    (1, 0, 1.0),              # 2 * 1/2
    (5, 0, 0.0625),           # 2 * 1/32: five to none is not enough at the 5% level
    (6, 0, 0.03125),          # 2 * 1/64: six to none is the fewest that is
    (3, 5, 0.7265625),        # 2 * (1 + 8 + 28 + 56) / 256 = 186/256
    (2, 3, 1.0),              # 2 * (1 + 5 + 10) / 32 = 1
    (10, 2, 0.03857421875),   # 2 * (1 + 12 + 66) / 4096 = 158/4096
    (20, 10, 0.0987371467),   # a two-sided binomial test of 10 in 30, as tables give it
])
def test_mcnemar_matches_hand_worked_cases(a_only: int, b_only: int, p: float) -> None:
    assert mcnemar(a_only, b_only) == pytest.approx(p, abs=1e-10)
    assert mcnemar(b_only, a_only) == mcnemar(a_only, b_only), "which one is A does not matter"


def test_mcnemar_is_exact_for_large_counts() -> None:
    """Thousands of discordant images: no overflow to inf/nan, and tiny p-values stay positive."""
    assert mcnemar(30_000, 30_000) == 1.0
    p = mcnemar(600, 400)  # z = (200 - 1) / sqrt(1000) = 6.3 in the normal approximation
    assert 1e-12 < p < 1e-8


def test_pair_counts_what_each_gets_right_alone() -> None:
    """A right on 1-4, B right on 3-5: 2 images only A gets right (1, 2), 1 only B (5)."""
    right_a = {str(i): i in (1, 2, 3, 4) for i in range(6)}
    right_b = {str(i): i in (3, 4, 5) for i in range(6)}
    paired = pair("A", "B", right_a, right_b)
    assert (paired.images, paired.a_correct, paired.b_correct, paired.a_only, paired.b_only) == (6, 4, 3, 2, 1)
    assert paired.p_value == 1.0 and paired.verdict == "not shown to differ at the 5% level"


def test_the_verdict_names_the_better_one_only_when_shown() -> None:
    right = {str(i): True for i in range(10)}
    six_wrong = {str(i): i >= 6 for i in range(10)}
    assert pair("A", "B", right, six_wrong).verdict == "A is better at the 5% level"
    assert pair("B", "A", six_wrong, right).verdict == "A is better at the 5% level"
    five_wrong = {str(i): i >= 5 for i in range(10)}
    assert pair("A", "B", right, five_wrong).verdict == "not shown to differ at the 5% level"


def test_pairs_must_be_scored_on_the_same_images() -> None:
    with pytest.raises(ValueError, match=r"A and B were scored on different images \(2 not in both, such as x\)"):
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
    assert [p["p_value"] for p in pairs] == [0.03125, 1.0, 0.125]  # 2/64, 2*2/4 capped, 2*8/128
    assert [p["verdict"] for p in pairs] == ["first is better at the 5% level", "not shown to differ at the 5% level",
                                             "not shown to differ at the 5% level"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["pair", "images"] and len(out) == 4, out
    assert out[1].split()[:9] == ["first", "vs", "second", "8", "1.0000", "vs", "0.2500", "6", "vs"], out
    assert table.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert exit_code(compare_stage.main, args) == 0
    assert json.loads(report.read_text())["pairs"] == pairs


def test_the_stage_refuses_what_it_cannot_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file, images that differ, or a file that is not evaluate's: one line each,
    nothing written."""
    a = predictions(tmp_path, "a", [True, True])
    out = ["--table", str(tmp_path / "t.png"), "--report", str(tmp_path / "r.json")]
    assert exit_code(compare_stage.main, [str(a), str(tmp_path / "b" / "predictions.csv"), *out]) == 1
    assert "does not exist: run the evaluate stages first" in error_line(capsys.readouterr().err)
    longer = predictions(tmp_path, "longer", [True, True, True])
    assert exit_code(compare_stage.main, [str(a), str(longer), *out]) == 1
    assert "a and longer were scored on different images (1 not in both" in error_line(capsys.readouterr().err)
    other = tmp_path / "other.csv"
    other.write_text("image,label\nx,ants\n", encoding="utf-8")
    assert exit_code(compare_stage.main, [str(a), str(other), *out]) == 1
    assert "has no 'path' column: it is not evaluate's predictions.csv" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "r.json").exists()
