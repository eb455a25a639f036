"""Exact Clopper-Pearson bounds (exporter/binomial.py): closed forms, symmetry, and scipy when present."""

from __future__ import annotations

import math

import pytest

from exporter.binomial import binomial_cdf, clopper_pearson, upper_bound


def test_closed_forms_at_the_edges() -> None:
    lo, hi = clopper_pearson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 20), abs=1e-12)
    lo, hi = clopper_pearson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 20), abs=1e-12)
    assert upper_bound(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300), abs=1e-12)  # the "rule of three": ~3/n
    assert clopper_pearson(0, 0) == (0.0, 1.0) and upper_bound(0, 0) == 1.0


def test_known_values() -> None:
    # k=1, n=20: the upper end solves (1-p)^20 + 20 p (1-p)^19 = 0.025 (textbook value 0.2487)
    lo, hi = clopper_pearson(1, 20)
    assert hi == pytest.approx(0.248732762772, abs=1e-9)
    assert lo == pytest.approx(0.001265089498, abs=1e-9)
    assert binomial_cdf(1, 20, hi) == pytest.approx(0.025, abs=1e-12)


def test_the_bounds_solve_the_binomial_tails() -> None:
    for k, n in [(3, 7), (5, 1000), (17, 400), (250, 1000)]:
        lo, hi = clopper_pearson(k, n, 0.9)
        assert binomial_cdf(k, n, hi) == pytest.approx(0.05, rel=1e-8)
        assert 1 - binomial_cdf(k - 1, n, lo) == pytest.approx(0.05, rel=1e-8)
        assert lo < k / n < hi


def test_symmetry_and_the_one_sided_bound() -> None:
    lo, hi = clopper_pearson(3, 50)
    lo2, hi2 = clopper_pearson(47, 50)
    assert lo == pytest.approx(1 - hi2, abs=1e-12) and hi == pytest.approx(1 - lo2, abs=1e-12)
    assert clopper_pearson(6, 1000)[1] == pytest.approx(upper_bound(6, 1000, 0.975), abs=1e-12)
    assert upper_bound(6, 1000, 0.95) < clopper_pearson(6, 1000, 0.95)[1]


def test_large_counts_stay_accurate() -> None:
    lo, hi = clopper_pearson(100, 100_000)
    assert 0.0008 < lo < 0.001 < hi < 0.00125
    assert math.isfinite(binomial_cdf(100, 100_000, hi))


def test_bad_arguments() -> None:
    for args in [(-1, 5), (6, 5), (1, 5, 0.0), (1, 5, 1.0)]:
        with pytest.raises(ValueError):
            clopper_pearson(*args)


def test_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 20), (1, 20), (2, 60), (7, 200), (12, 600), (31, 1000), (19, 20), (400, 2000)]:
        for conf in (0.9, 0.95, 0.99):
            a = (1 - conf) / 2
            lo, hi = clopper_pearson(k, n, conf)
            assert lo == pytest.approx(stats.beta.ppf(a, k, n - k + 1) if k else 0.0, abs=1e-9)
            assert hi == pytest.approx(stats.beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0, abs=1e-9)
            assert upper_bound(k, n, conf) == pytest.approx(stats.beta.ppf(conf, k + 1, n - k) if k < n else 1.0, abs=1e-9)
