"""How sure a comparison of accuracies is: each run's interval, the paired test of two
classifiers scored on the same images, and intervals over runs repeated with other seeds
(docs/comparing.md says how to read them).

Plain Python: the compare stage and command use it without importing torch.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

from transfer.errors import UserError

#: Below this p-value a difference is called shown, at the 5% level.
LEVEL = 0.05


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct`` out of ``total`` (95% for the
    default ``z``). Unlike the normal approximation it stays within [0, 1] and is sound for
    accuracies near 0 or 1 and for small validation sets."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a_only: int, b_only: int) -> tuple[float, float]:
    """McNemar's test, two-sided: with ``a_only`` images that A gets right and B wrong, and
    ``b_only`` the other way round, the chance of a split at least this uneven if each such
    image were a fair coin (the images both get right or both wrong say nothing about which is
    better). Returns the exact p-value and the mid-p-value, which counts the observed split
    half (Fagerland, Lydersen and Laake 2013: the exact test is conservative, mid-p keeps
    closer to the nominal level)."""
    n, k = a_only + b_only, min(a_only, b_only)
    term = tail = 1  # C(n, 0); each next binomial coefficient from the last, in exact integers
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n), min(1.0, (2 * tail - term) / 2**n)  # int / int is correctly rounded


def t_quantile(df: int, level: float = 0.95) -> float:
    """The ``t`` with P(|T| <= t) = ``level`` for Student's t with ``df`` degrees of freedom,
    by bisection on its exact distribution for whole ``df`` (Abramowitz and Stegun 26.7.3-4)."""
    def inside(t: float) -> float:
        # one series for both parities: odd df starts at cos(theta) and adds 2/pi * theta
        theta, odd = math.atan(t / math.sqrt(df)), df % 2
        cos2, total, term = math.cos(theta) ** 2, 0.0, math.cos(theta) ** odd
        for j in range(df // 2):
            total += term
            term *= cos2 * (2 * j + 1 + odd) / (2 * j + 2 + odd)
        return 2 / math.pi * (theta + math.sin(theta) * total) if odd else math.sin(theta) * total

    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        if inside(middle) < level:
            low = middle
        else:
            high = middle
    return (low + high) / 2


class Spread(NamedTuple):
    """Values over repeated runs (seeds): their mean and spread, and a 95% t-interval of the
    mean (None for a single run, which says nothing about the spread)."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        n = len(values)
        mean = sum(values) / max(n, 1)
        if n < 2:
            return cls(n, mean, None, None, None)
        sd = statistics.stdev(values)
        half = t_quantile(n - 1) * sd / math.sqrt(n)
        return cls(n, mean, sd, mean - half, mean + half)

    def verdict(self, a: str, b: str) -> str:
        """Of paired differences A - B: whether their interval leaves 0 out."""
        if self.low is None or self.high is None:
            return "one seed: nothing can be said across seeds"
        if self.low <= 0 <= self.high:
            return f"not shown to differ across {self.n} seeds"
        return f"{a if self.mean > 0 else b} is better across {self.n} seeds"


class Paired(NamedTuple):
    """Two classifiers' answers on the same images, and what they say of each other."""

    a: str
    b: str
    images: int
    a_correct: int
    b_correct: int
    a_only: int  #: images A gets right and B wrong
    b_only: int
    p_value: float  #: McNemar's mid-p-value, which the verdict rests on
    p_exact: float

    @property
    def verdict(self) -> str:
        if self.p_value >= LEVEL:
            return f"not shown to differ at the {LEVEL:.0%} level"
        better = self.a if self.a_only > self.b_only else self.b
        return f"{better} is better at the {LEVEL:.0%} level"


def pair(a: str, b: str, right_a: dict[str, bool], right_b: dict[str, bool]) -> Paired:
    """Compare A's and B's answers (image -> right or not); they must have scored the same images."""
    if right_a.keys() != right_b.keys():
        only = sorted(right_a.keys() ^ right_b.keys())
        raise UserError(f"{a} and {b} were scored on different images ({len(only)} not in both, such as {only[0]}): "
                        "evaluate them on the same data (`dvc repro`)")
    a_only = sum(right_a[k] and not right_b[k] for k in right_a)
    b_only = sum(right_b[k] and not right_a[k] for k in right_a)
    p_exact, p_value = mcnemar(a_only, b_only)
    return Paired(a, b, len(right_a), sum(right_a.values()), sum(right_b.values()), a_only, b_only, p_value, p_exact)
