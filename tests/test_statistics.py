"""Seed statistics and paired significance tests, on hand-checked per-query scores."""

from __future__ import annotations

import importlib
import itertools
import json
import math

import numpy as np
import pytest

from sbmoe.evaluation import statistics
from sbmoe.evaluation.statistics import (
    ComparisonReport,
    SignificanceTest,
    bonferroni,
    compare_to_baseline,
    mean_std,
    paired_t_test,
    randomization_test,
)

# --------------------------------------------------------------------------------------------------
# mean_std


def test_mean_std_by_hand():
    # mean = 10 / 4 = 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; s^2 = 5 / (4 - 1)
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5 / 3))


def test_mean_std_single_value_and_empty():
    assert mean_std([0.25]) == (0.25, 0.0)
    assert mean_std(x for x in [0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


# --------------------------------------------------------------------------------------------------
# paired t-test

# Differences a - b: 0.1, 0.0, 0.2, 0.3.
A = {"q1": 0.5, "q2": 0.6, "q3": 0.7, "q4": 0.8}
B = {"q1": 0.4, "q2": 0.6, "q3": 0.5, "q4": 0.5}


def test_paired_t_test_by_hand():
    # mean d = 0.6 / 4 = 0.15; deviations -0.05, -0.15, 0.05, 0.15; sum of squares 0.05
    # s^2 = 0.05 / 3; standard error^2 = s^2 / 4 = 0.05 / 12 = 1 / 240
    # t^2 = 0.15^2 / (1/240) = 0.0225 * 240 = 5.4, so t = 2.3238 with 3 degrees of freedom.
    # Student's t with 3 df has a closed-form CDF; with x = t / sqrt(3) = sqrt(1.8) = 1.341641:
    #   two-sided p = 1 - (2 / pi) * (x / (1 + x^2) + atan(x))
    #               = 1 - 0.636620 * (0.479157 + 0.930274) = 0.102728
    x = math.sqrt(5.4 / 3)
    expected = 1 - (2 / math.pi) * (x / (1 + x * x) + math.atan(x))
    assert expected == pytest.approx(0.102728, abs=1e-6)
    assert paired_t_test(A, B) == pytest.approx(expected, rel=1e-9)
    assert paired_t_test(B, A) == pytest.approx(expected, rel=1e-9)  # two-sided: symmetric


def test_paired_t_test_degenerate_cases():
    assert paired_t_test(A, dict(A)) == 1.0  # identical scores: p = 1, not NaN
    assert paired_t_test({"q1": 0.3}, {"q1": 0.3}) == 1.0
    shifted = {qid: score + 0.125 for qid, score in A.items()}
    assert paired_t_test(shifted, A) == 0.0  # the same non-zero difference everywhere
    with pytest.raises(ValueError, match="at least two queries"):
        paired_t_test({"q1": 0.3}, {"q1": 0.2})


def test_only_common_queries_are_paired():
    a = {**A, "extra-a": 1.0}
    b = {**B, "extra-b": 0.0}
    assert paired_t_test(a, b) == paired_t_test(A, B)
    assert randomization_test(a, b, trials=2000) == randomization_test(A, B, trials=2000)
    # Order of the dicts does not matter: scores are paired by query id.
    reordered = dict(reversed(list(B.items())))
    assert paired_t_test(A, reordered) == paired_t_test(A, B)


def test_no_common_query_or_nan_raises():
    for test in (paired_t_test, randomization_test):
        with pytest.raises(ValueError, match="no query in common"):
            test({"q1": 0.1}, {"q2": 0.2})
        with pytest.raises(ValueError, match="'q2' is NaN"):
            test(A, {**B, "q2": float("nan")})


# --------------------------------------------------------------------------------------------------
# randomization test

# Differences a - b: 0.4, 0.3, 0.2, -0.1; observed |sum| = 0.8.
RA = {"q1": 0.9, "q2": 0.8, "q3": 0.5, "q4": 0.3}
RB = {"q1": 0.5, "q2": 0.5, "q3": 0.3, "q4": 0.4}
# The 2^4 sign flips of (0.4, 0.3, 0.2, 0.1) give |sum|:
#   ++++ 1.0  +++- 0.8  ++-+ 0.6  ++-- 0.4  +-++ 0.4  +-+- 0.2  +--+ 0.0  +--- 0.2
# and the same eight again with every sign reversed. |sum| >= 0.8 for ++++, +++-, ----, ---+:
# exact two-sided p = 4 / 16 = 0.25 (the tie at exactly 0.8 must count).
EXACT_P = 0.25


def _enumerated_p(a, b):
    diffs = np.array([a[q] - b[q] for q in sorted(a)])
    observed = abs(diffs.sum())
    flips = [abs(np.dot(signs, diffs)) for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def test_randomization_test_matches_the_enumerated_p_value():
    assert _enumerated_p(RA, RB) == EXACT_P
    # 20000 trials: standard error sqrt(0.25 * 0.75 / 20000) = 0.0031; allow about 5 of them.
    assert randomization_test(RA, RB, trials=20_000, seed=42) == pytest.approx(EXACT_P, abs=0.015)
    assert randomization_test(RB, RA, trials=20_000, seed=42) == pytest.approx(EXACT_P, abs=0.015)


def test_randomization_test_all_positive_case():
    # (0.4, 0.3, 0.2, 0.1): only ++++ and ---- reach |sum| = 1.0, so p = 2 / 16.
    a = {"q1": 0.9, "q2": 0.8, "q3": 0.5, "q4": 0.5}
    b = {"q1": 0.5, "q2": 0.5, "q3": 0.3, "q4": 0.4}
    assert _enumerated_p(a, b) == 0.125
    assert randomization_test(a, b, trials=20_000) == pytest.approx(0.125, abs=0.012)


def test_randomization_test_is_deterministic_for_a_seed():
    first = randomization_test(RA, RB, trials=5000, seed=7)
    assert randomization_test(RA, RB, trials=5000, seed=7) == first
    others = {randomization_test(RA, RB, trials=5000, seed=seed) for seed in (1, 2, 3)}
    assert len(others | {first}) > 1  # other seeds draw other sign flips...
    for p in others:
        assert p == pytest.approx(first, abs=0.04)  # ...and land close (SE 0.006 each)


def test_randomization_test_does_not_depend_on_block_size(monkeypatch):
    expected = randomization_test(RA, RB, trials=3001, seed=3)
    monkeypatch.setattr(statistics, "_BLOCK_ENTRIES", 7)  # blocks of one trial
    assert randomization_test(RA, RB, trials=3001, seed=3) == expected


def test_randomization_p_is_never_zero_and_identical_systems_give_one():
    rng = np.random.default_rng(0)
    base = {f"q{i}": float(x) for i, x in enumerate(rng.random(50))}
    better = {qid: score + 0.5 for qid, score in base.items()}
    # No sign flip but the observed one (and its mirror) reaches |sum| = 25: count 0.
    assert randomization_test(better, base, trials=999) == 1 / 1000
    assert randomization_test(base, dict(base), trials=999) == 1.0
    with pytest.raises(ValueError, match="trials"):
        randomization_test(RA, RB, trials=0)


# --------------------------------------------------------------------------------------------------
# Bonferroni


def test_bonferroni_multiplies_and_caps():
    # three comparisons: 0.01 * 3 = 0.03, 0.2 * 3 = 0.6, 0.5 * 3 = 1.5 -> capped at 1
    corrected = bonferroni({"x": 0.01, "y": 0.2, "z": 0.5})
    assert corrected == pytest.approx({"x": 0.03, "y": 0.6, "z": 1.0})
    assert list(corrected) == ["x", "y", "z"]
    assert bonferroni({"only": 0.04}) == {"only": 0.04}
    assert bonferroni({}) == {}


# --------------------------------------------------------------------------------------------------
# compare_to_baseline and the report


def _systems():
    return {"fine-tuned": B, "sb_moe": A, "same": dict(B)}


def test_compare_to_baseline_t_test():
    report = compare_to_baseline(_systems(), "fine-tuned", metric="ndcg@10")
    assert isinstance(report, ComparisonReport)
    assert [c.system for c in report.comparisons] == ["sb_moe", "same"]
    assert report.baseline_mean == pytest.approx(0.5)
    moe = report["sb_moe"]
    assert moe.num_queries == 4
    assert moe.mean == pytest.approx(0.65)
    assert moe.mean_difference == pytest.approx(0.15)
    assert moe.p_value == pytest.approx(0.102728, abs=1e-6)
    assert moe.corrected_p_value == pytest.approx(2 * 0.102728, abs=2e-6)  # two comparisons
    assert moe.significant is False
    assert report["same"].p_value == 1.0 and report["same"].corrected_p_value == 1.0
    assert report.trials is None and report.seed is None
    loose = compare_to_baseline(_systems(), "fine-tuned", SignificanceTest(alpha=0.25))
    assert loose["sb_moe"].significant is True  # 0.2055 < 0.25
    with pytest.raises(KeyError):
        report["fine-tuned"]


def test_compare_to_baseline_randomization():
    systems = {"base": RB, "better": RA}
    report = compare_to_baseline(systems, "base", SignificanceTest("randomization", seed=5, trials=20_000))
    assert report["better"].p_value == pytest.approx(EXACT_P, abs=0.015)
    assert report["better"].corrected_p_value == report["better"].p_value  # one comparison
    assert report["better"].p_value == randomization_test(RA, RB, trials=20_000, seed=5)
    assert (report.trials, report.seed, report.test) == (20_000, 5, "randomization")


def test_compare_to_baseline_warns_about_unpaired_queries():
    systems = {"base": {**B, "q9": 0.0}, "other": A}
    with pytest.warns(RuntimeWarning, match="compared on the 4 queries they share"):
        report = compare_to_baseline(systems, "base")
    assert report["other"].num_queries == 4
    assert report.baseline_mean == pytest.approx(2.0 / 5)  # over all the baseline's queries
    assert report["other"].baseline_mean == pytest.approx(0.5)  # over the shared ones


def test_compare_to_baseline_errors():
    with pytest.raises(ValueError, match="unknown test"):
        compare_to_baseline(_systems(), "fine-tuned", SignificanceTest("wilcoxon"))
    with pytest.raises(ValueError, match="baseline 'nope'"):
        compare_to_baseline(_systems(), "nope")
    with pytest.raises(ValueError, match="no system to compare"):
        compare_to_baseline({"base": A}, "base")
    with pytest.raises(ValueError, match="alpha"):
        compare_to_baseline(_systems(), "fine-tuned", SignificanceTest(alpha=1.5))
    with pytest.raises(ValueError, match=r"system 'far'.*no query in common"):
        compare_to_baseline({"base": A, "far": {"x": 0.1}}, "base")


def test_report_renders():
    report = compare_to_baseline(_systems(), "fine-tuned", SignificanceTest(alpha=0.25), metric="ndcg@10")
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["baseline"] == "fine-tuned" and data["test"] == "t-test"
    assert set(data["comparisons"]) == {"sb_moe", "same"}
    assert data["comparisons"]["sb_moe"]["significant"] is True

    rendered = report.to_report(label="tab:moe")
    assert rendered.to_dict()["comparisons"] == data["comparisons"]
    markdown = rendered.to_markdown()
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| system | nDCG@10 | Δ vs fine-tuned |")
    assert len(lines) == 2 + 1 + 2
    # Five columns: significance is the dagger on the mean (explained below the table).
    assert all(line.count("|") - line.count("\\|") == 6 for line in lines)
    assert "| fine-tuned (baseline) | 0.5000 |" in markdown
    assert "| sb_moe | 0.6500 † | +0.1500 | 0.1027 | 0.2055 |" in markdown
    assert "| same | 0.5000 | +0.0000 |" in markdown
    assert "α = 0.25" in markdown

    latex = rendered.to_latex()
    assert "\\begin{tabular}{lrrrr}" in latex and "\\label{tab:moe}" in latex
    assert "\\toprule" in latex and "\\caption{nDCG@10: each system against fine-tuned." in latex
    assert "sb\\_moe & 0.6500$^\\dagger$ & +0.1500 & 0.1027 & 0.2055 \\\\" in latex
    assert "same & 0.5000 & +0.0000" in latex and "same & 0.5000$^" not in latex


# --------------------------------------------------------------------------------------------------
# Cross-check against ranx (a test-time reference only; sbmoe.evaluation.statistics does not import it)


def test_t_test_agrees_with_ranx():
    from ranx.statistical_tests import paired_student_t_test

    rng = np.random.default_rng(1)
    a = {f"q{i}": float(x) for i, x in enumerate(rng.random(40))}
    b = {qid: min(1.0, score + float(rng.normal(0.03, 0.1))) for qid, score in a.items()}
    ids = sorted(a)
    ranx_p, _ = paired_student_t_test(np.array([b[q] for q in ids]), np.array([a[q] for q in ids]))
    assert paired_t_test(b, a) == pytest.approx(ranx_p, rel=1e-12)


def test_randomization_agrees_with_ranx_up_to_its_counting(monkeypatch):
    """ranx's Fisher test draws the same null distribution, but counts differently.

    ranx swaps each query's (control, treatment) pair at random, which flips the sign of that
    query's difference: the same null distribution as ours. Its p-value is count / permutations,
    ours (count + 1) / (trials + 1), so ranx can report p = 0 for a sampled test while ours is at
    least 1 / (trials + 1). ranx runs it as a parallel numba kernel; its pure-Python version (the
    ``py_func``, with numpy's global generator seeded by ranx) is called here to avoid a JIT compile
    and to make it deterministic.
    """
    module = importlib.import_module("ranx.statistical_tests.fisher_randomization_test")
    monkeypatch.setattr(module, "permute", module.permute.py_func)
    ranx_fisher = module.fisher_randomization_test.py_func
    state = np.random.get_state()
    try:
        ids = sorted(RA)
        control, treatment = np.array([RB[q] for q in ids]), np.array([RA[q] for q in ids])
        ranx_p, _ = ranx_fisher(control, treatment, 20_000, 0.01, 42)
        assert ranx_p == pytest.approx(EXACT_P, abs=0.015)
        assert randomization_test(RA, RB, trials=20_000) == pytest.approx(ranx_p, abs=0.02)

        # 20 queries all improved by 0.5: exact p = 2 / 2^20, so no sampled flip reaches it.
        base = np.linspace(0.0, 0.4, 20)
        ranx_p, _ = ranx_fisher(base, base + 0.5, 1000, 0.01, 42)
        assert ranx_p == 0.0
        ours = randomization_test(
            {str(i): x + 0.5 for i, x in enumerate(base)},
            {str(i): x for i, x in enumerate(base)},
            trials=1000,
        )
        assert ours == 1 / 1001
    finally:
        np.random.set_state(state)
