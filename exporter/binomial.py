"""Exact (Clopper-Pearson) confidence bounds for a binomial proportion, without scipy.

A false-alarm rate measured as ``k`` flagged clients out of ``n`` is an estimate; what an
operator can rely on is a bound that holds with a stated confidence. Clopper and Pearson
(1934) invert the exact binomial test:

* the upper bound ``p_hi`` solves ``P(X <= k | n, p_hi) = alpha_hi`` (no larger rate makes
  ``k`` or fewer flags this likely), ``p_hi = 1`` when ``k = n``;
* the lower bound ``p_lo`` solves ``P(X >= k | n, p_lo) = alpha_lo``, ``p_lo = 0`` when ``k = 0``.

:func:`clopper_pearson` is the two-sided interval (``alpha_lo = alpha_hi = (1 - confidence) / 2``);
:func:`upper_bound` is the one-sided bound (``alpha_hi = 1 - confidence``). The detection
benchmark reports the *upper end of the two-sided 95 % interval*, i.e.
``clopper_pearson(k, n, 0.95)[1] == upper_bound(k, n, 0.975)``.

Both are found by bisection on the exact binomial tail, summed in log space (``math.lgamma``
for the coefficients, a log-sum-exp for the sum), so they stay accurate for tiny tails
and large ``n``; results are within 1e-12 of the exact root. Pure Python and numpy: the
exporter's ``calibrate`` may use them at runtime, where scipy is not a dependency.
"""

from __future__ import annotations

import math

import numpy as np

_TOL = 1e-13  # bisection stops when the bracket is this narrow (the promise is 1e-9)
_MAX_STEPS = 200


def _check(k: int, n: int, confidence: float) -> None:
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _log_binom_coefs(n: int, lo: int, hi: int) -> np.ndarray:
    """``log C(n, i)`` for ``i`` in ``lo..hi`` (inclusive)."""
    top = math.lgamma(n + 1)
    return np.array([top - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(lo, hi + 1)], dtype=np.float64)


def _log_tail(coefs: np.ndarray, i: np.ndarray, n: int, p: float) -> float:
    """``log sum_i C(n, i) p^i (1-p)^(n-i)`` over the given ``i`` (0 < p < 1)."""
    terms = coefs + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(terms.max())
    return top + math.log(float(np.exp(terms - top).sum()))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(0, k + 1, dtype=np.float64)
    return math.exp(_log_tail(_log_binom_coefs(n, 0, k), i, n, p))


def _bisect(log_f, target: float, increasing: bool) -> float:
    """The ``p`` in (0, 1) where the monotone ``log_f(p)`` crosses ``log(target)``."""
    lo, hi = 0.0, 1.0
    log_target = math.log(target)
    for _ in range(_MAX_STEPS):
        mid = 0.5 * (lo + hi)
        above = log_f(mid) > log_target
        if above == increasing:
            hi = mid
        else:
            lo = mid
        if hi - lo <= _TOL:
            break
    return 0.5 * (lo + hi)


def _upper(k: int, n: int, alpha: float) -> float:
    """The ``p`` with ``P(X <= k | n, p) = alpha``; 1 when ``k = n``."""
    if k >= n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)  # (1 - p)^n = alpha, in closed form
    coefs = _log_binom_coefs(n, 0, k)
    i = np.arange(0, k + 1, dtype=np.float64)
    return _bisect(lambda p: _log_tail(coefs, i, n, p), alpha, increasing=False)


def _lower(k: int, n: int, alpha: float) -> float:
    """The ``p`` with ``P(X >= k | n, p) = alpha``; 0 when ``k = 0``."""
    if k <= 0:
        return 0.0
    if k == n:
        return alpha ** (1.0 / n)  # p^n = alpha
    coefs = _log_binom_coefs(n, k, n)
    i = np.arange(k, n + 1, dtype=np.float64)
    return _bisect(lambda p: _log_tail(coefs, i, n, p), alpha, increasing=True)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact ``confidence`` interval ``(low, high)`` for ``k`` successes in ``n`` trials.

    Each side leaves ``(1 - confidence) / 2`` outside. ``n = 0`` gives ``(0, 1)``.
    """
    _check(k, n, confidence)
    if n == 0:
        return 0.0, 1.0
    alpha = (1.0 - confidence) / 2.0
    return _lower(k, n, alpha), _upper(k, n, alpha)


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact upper ``confidence`` bound for ``k`` successes in ``n`` trials (1 when ``n = 0``)."""
    _check(k, n, confidence)
    if n == 0:
        return 1.0
    return _upper(k, n, 1.0 - confidence)
