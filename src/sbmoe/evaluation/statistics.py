"""Statistics over seeds and paired significance tests on per-query scores.

Per-query scores are plain dicts, query id -> score, one per system (the per-metric entries of the
``per_query.json`` that :func:`sbmoe.evaluation.metrics.save_metrics` writes). Paired tests compare two
systems on the queries both were scored on; a query only one of them has cannot be paired and is
left out.

The tests follow Smucker, Allan and Carterette, "A Comparison of Statistical Significance Tests for
Information Retrieval Evaluation" (CIKM 2007): the paired two-sided Student's t-test and Fisher's
paired randomization test, whose p-value is estimated from random sign flips of the per-query
differences with an explicit seed. Comparisons of several systems against one baseline are
corrected with Bonferroni.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from sbmoe.core.errors import UsageError
from sbmoe.evaluation.tables import Cell, Column, Report, Row, Table, metric_label

TestName = Literal["t-test", "randomization"]
TESTS: tuple[str, ...] = ("t-test", "randomization")

# Upper bound on the entries of one block of sign flips (trials x queries), so memory stays at a few
# MB whatever the number of queries.
_BLOCK_ENTRIES = 1 << 20


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of e.g. one metric over seeds.

    Args:
        values: One number per run.

    Returns:
        ``(mean, std)``; ``std`` is 0.0 for a single value.

    Raises:
        ValueError: ``values`` is empty.
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise UsageError("mean_std needs at least one value")
    std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
    return float(np.mean(array)), std


def paired_t_test(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Two-sided paired Student's t-test on the queries ``a`` and ``b`` have in common.

    Args:
        a: Query id -> score of one system.
        b: Query id -> score of the other.

    Returns:
        The p-value. 1.0 when the paired scores are all equal (scipy would return NaN), 0.0 when the
        differences are all the same non-zero value.

    Raises:
        ValueError: No query in common, a NaN score, or fewer than two common queries with scores
            that differ (the test has no degrees of freedom).
    """
    from scipy.stats import ttest_rel  # scipy is slow to import and only needed here

    x, y = _paired(a, b)
    if np.array_equal(x, y):
        return 1.0
    if x.size < 2:
        raise UsageError("the t-test needs at least two queries in common")
    with warnings.catch_warnings():
        # Near-constant differences make scipy warn about precision loss; the result (t = +-inf,
        # p = 0) is still the right limit.
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(ttest_rel(x, y, alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p_value) else p_value


def randomization_test(
    a: Mapping[str, float], b: Mapping[str, float], trials: int = 10_000, seed: int = 42
) -> float:
    """Fisher's paired randomization test, two-sided, on the queries ``a`` and ``b`` have in common.

    Under the null hypothesis the two systems are exchangeable on every query, so each per-query
    difference is as likely to have either sign. Each trial flips the signs at random; the p-value is
    the share of trials whose mean difference is at least as far from zero as the observed one,
    counted as ``(count + 1) / (trials + 1)`` so that the observed assignment is one of the
    possibilities and a sampled p-value is never 0 (Phipson & Smyth, 2010).

    Args:
        a: Query id -> score of one system.
        b: Query id -> score of the other.
        trials: Number of random sign assignments.
        seed: Seed of the random generator: the same data, trials and seed give the same p-value.

    Returns:
        The p-value, in ``(0, 1]``.

    Raises:
        ValueError: No query in common, a NaN score, or ``trials < 1``.
    """
    if not isinstance(trials, int) or trials < 1:
        raise UsageError(f"trials must be a positive integer, got {trials!r}")
    x, y = _paired(a, b)
    diffs = x - y
    observed = abs(float(diffs.sum()))
    # Sums of the same numbers in another order may differ in the last bits; a permuted sum equal to
    # the observed one must count as "at least as extreme".
    tolerance = 1e-9 * float(np.abs(diffs).sum())
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ENTRIES // diffs.size)
    count, done = 0, 0
    while done < trials:
        rows = min(block, trials - done)
        # One float64 draw per sign keeps the stream independent of the block size.
        signs = np.where(rng.random((rows, diffs.size)) < 0.5, -1.0, 1.0)
        count += int(np.count_nonzero(np.abs(signs @ diffs) >= observed - tolerance))
        done += rows
    return (count + 1) / (trials + 1)


def bonferroni(p_values: Mapping[str, float]) -> dict[str, float]:
    """Bonferroni correction: each p-value times the number of comparisons, capped at 1.

    Args:
        p_values: Comparison name -> p-value, one entry per comparison made.

    Returns:
        Comparison name -> corrected p-value, in the same order.
    """
    count = len(p_values)
    return {name: min(1.0, float(p) * count) for name, p in p_values.items()}


@dataclass
class Comparison:
    """One system compared with the baseline, on the queries both were scored on.

    Attributes:
        system: Name of the system.
        num_queries: Number of queries in common with the baseline.
        mean: Mean score of the system on those queries.
        baseline_mean: Mean score of the baseline on those queries.
        mean_difference: ``mean - baseline_mean`` (positive: the system is better).
        p_value: Two-sided p-value of the test.
        corrected_p_value: ``p_value`` after Bonferroni over all comparisons of the report.
        significant: ``corrected_p_value < alpha``.
    """

    system: str
    num_queries: int
    mean: float
    baseline_mean: float
    mean_difference: float
    p_value: float
    corrected_p_value: float
    significant: bool


@dataclass
class ComparisonReport:
    """Every system against one baseline, on one metric; ``to_report`` renders it.

    Attributes:
        baseline: Name of the baseline system.
        baseline_mean: Mean score of the baseline over all its queries.
        test: ``"t-test"`` or ``"randomization"``.
        alpha: Significance level the corrected p-values are compared with.
        correction: The multiple-comparison correction applied (``"bonferroni"``).
        comparisons: One entry per other system, in input order.
        metric: Name of the metric, for display (may be empty).
        trials: Sign assignments per randomization test (None for the t-test).
        seed: Seed of the randomization tests (None for the t-test).
    """

    baseline: str
    baseline_mean: float
    test: str
    alpha: float
    comparisons: list[Comparison] = field(default_factory=list)
    correction: str = "bonferroni"
    metric: str = ""
    trials: int | None = None
    seed: int | None = None

    def __getitem__(self, system: str) -> Comparison:
        for comparison in self.comparisons:
            if comparison.system == system:
                return comparison
        raise KeyError(system)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``comparisons`` maps each system name to its fields."""
        data = asdict(self)
        data["comparisons"] = {
            c["system"]: {k: v for k, v in c.items() if k != "system"} for c in data["comparisons"]
        }
        return data

    def to_report(self, digits: int = 4, caption: str | None = None, label: str = "") -> Report:
        """The comparison as one table: the baseline first, then each system with its difference
        and p-values; a dagger marks the significant ones.

        Args:
            digits: Decimal places of means, differences and p-values (p-values smaller than that
                precision shows are written in scientific notation).
            caption: Table caption; the metric and the baseline when None.
            label: LaTeX ``\\label`` of the table; none when empty.
        """
        metric = metric_label(self.metric or "score")
        table = Table(
            [
                Column("mean", metric, digits),
                Column("difference", f"Δ vs {self.baseline}", digits, "signed"),
                Column("p_value", f"p ({self.test})", digits, "p"),
                Column("corrected_p_value", f"p ({self.correction})", digits, "p"),
            ],
            caption=f"{metric}: each system against {self.baseline}" if caption is None else caption,
            label=label,
        )
        table.rows.append(Row(f"{self.baseline} (baseline)", {"mean": Cell(self.baseline_mean)}))
        for c in self.comparisons:
            cells = {
                "mean": Cell(c.mean, dagger=c.significant),
                "difference": Cell(c.mean_difference),
                "p_value": Cell(c.p_value),
                "corrected_p_value": Cell(c.corrected_p_value),
            }
            table.rows.append(Row(c.system, cells))
        legend = (
            f"† {self.test} p-value after {self.correction} correction below α = {self.alpha:g} "
            f"(paired on the queries each system shares with {self.baseline})."
        )
        return Report([table], [legend], self.to_dict())


@dataclass(frozen=True)
class SignificanceTest:
    """Which paired test a comparison runs, and at what level.

    Attributes:
        test: ``"t-test"`` (:func:`paired_t_test`) or ``"randomization"`` (:func:`randomization_test`).
        alpha: Significance level for the corrected p-values.
        seed: Seed of every randomization test (each comparison uses the same seed).
        trials: Sign assignments per randomization test.
    """

    test: TestName = "t-test"
    alpha: float = 0.05
    seed: int = 42
    trials: int = 10_000


def compare_to_baseline(
    per_query: Mapping[str, Mapping[str, float]],
    baseline: str,
    significance: SignificanceTest | None = None,
    *,
    metric: str = "",
) -> ComparisonReport:
    """Test every system against ``baseline`` on one metric, with Bonferroni over the comparisons.

    Args:
        per_query: System name -> query id -> score (one metric). Each comparison uses the queries
            the system and the baseline have in common; a warning says when those differ from the
            baseline's queries.
        baseline: The system the others are compared with; a key of ``per_query``.
        significance: The test, its level and (randomization) its seed and trials; default: a
            paired t-test at 0.05.
        metric: Metric name, used only to label the report.

    Returns:
        The report, with one :class:`Comparison` per system other than the baseline.

    Raises:
        ValueError: Unknown test, ``alpha`` outside (0, 1), the baseline missing, no other system,
            or a system with no query in common with the baseline.
    """
    significance = significance or SignificanceTest()
    test, alpha, seed, trials = significance.test, significance.alpha, significance.seed, significance.trials
    if test not in TESTS:
        raise UsageError(f"unknown test {test!r}; choose one of {', '.join(TESTS)}")
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    if baseline not in per_query:
        raise UsageError(f"baseline {baseline!r} is not among the systems: {', '.join(map(repr, per_query))}")
    others = [name for name in per_query if name != baseline]
    if not others:
        raise UsageError("there is no system to compare with the baseline")

    base = per_query[baseline]
    if not base:
        raise UsageError(f"baseline {baseline!r} has no per-query scores")
    _, base_scores = _paired(base, base)
    raw: dict[str, float] = {}
    rows: dict[str, tuple[int, float, float]] = {}
    for name in others:
        scores = per_query[name]
        try:
            system_scores, baseline_scores = _paired(scores, base)
        except ValueError as exc:
            raise UsageError(f"system {name!r} against baseline {baseline!r}: {exc}") from None
        if system_scores.size != len(base) or system_scores.size != len(scores):
            warnings.warn(
                f"system {name!r} and baseline {baseline!r} are compared on the {system_scores.size} "
                f"queries they share ({name!r} has {len(scores)}, {baseline!r} has {len(base)})",
                RuntimeWarning,
                stacklevel=2,
            )
        if test == "t-test":
            raw[name] = paired_t_test(scores, base)
        else:
            raw[name] = randomization_test(scores, base, trials=trials, seed=seed)
        rows[name] = (system_scores.size, float(system_scores.mean()), float(baseline_scores.mean()))

    corrected = bonferroni(raw)
    comparisons = [
        Comparison(
            system=name,
            num_queries=rows[name][0],
            mean=rows[name][1],
            baseline_mean=rows[name][2],
            mean_difference=rows[name][1] - rows[name][2],
            p_value=raw[name],
            corrected_p_value=corrected[name],
            significant=corrected[name] < alpha,
        )
        for name in others
    ]
    randomized = test == "randomization"
    return ComparisonReport(
        baseline=baseline,
        baseline_mean=float(base_scores.mean()),
        test=test,
        alpha=alpha,
        comparisons=comparisons,
        metric=metric,
        trials=trials if randomized else None,
        seed=seed if randomized else None,
    )


# --------------------------------------------------------------------------------------------------
# internals


def _paired(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``a`` and ``b`` on their common query ids, sorted by id, as float64 arrays."""
    common = sorted(set(a).intersection(b))
    if not common:
        raise UsageError(f"no query in common ({len(a)} and {len(b)} queries)")
    x = np.array([float(a[qid]) for qid in common], dtype=np.float64)
    y = np.array([float(b[qid]) for qid in common], dtype=np.float64)
    for scores in (x, y):
        bad = np.flatnonzero(np.isnan(scores))
        if bad.size:
            raise UsageError(f"score of query {common[bad[0]]!r} is NaN")
    return x, y
