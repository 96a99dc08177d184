"""Null calibration: p-values of a test on a model that never saw the marks must be (super-)uniform.

For a model independent of the key, a test with validity ``exact`` gives P(p <= alpha) = alpha, and a
``conservative`` one P(p <= alpha) <= alpha. Each registered test has a null sampler
(:attr:`radioactive.detection.registry.MethodEntry.null`) that redraws what its null says is random (fresh keys,
or fresh holdout splits) for one model; this module summarises the samples: false-positive rates at
:data:`ALPHAS` against the 99 % binomial band of an exact test, and a Kolmogorov-Smirnov test against U(0, 1).
A rate above the band's top refutes the declared validity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sstats

ALPHAS = (0.05, 0.01, 0.001)


def binomial_band(num: int, alpha: float, level: float = 0.99) -> tuple[float, float]:
    """The central ``level`` interval of Binomial(num, alpha) / num: where an exact test's false-positive rate
    lies with probability ``level`` (scipy.stats.binom.interval)."""
    lo, hi = sstats.binom.interval(level, num, alpha)
    return float(lo) / num, float(hi) / num


@dataclass
class CalibrationResult:
    """Attributes:
        suspect: what was tested (a path, or ``random weights K x D``).
        method: the test. validity: its declared class. unit: what was redrawn (``keys``, ``splits``).
        num_keys: samples scored.
        ks_pvalue: KS test of the p-values against U(0, 1) (a conservative test may fail it by design).
        fpr: alpha -> share of samples with p <= alpha.
        false_positives: alpha -> count.
        fpr_interval_99: alpha -> 99 % binomial interval of that share for an exact test.
        within_band: every rate at or below the top of its band (the target for exact and conservative tests).
        calibrated: ks_pvalue > 0.01 and every rate inside its band (what an exact test should show).
        log10_pvalue_quantiles: 0, 1, 5, 50 % quantiles of the samples' log10 p.
    """

    suspect: str
    num_keys: int
    ks_pvalue: float
    fpr: dict
    fpr_interval_99: dict
    calibrated: bool
    log10_pvalue_quantiles: dict
    method: str = "white-box"
    validity: str = "exact"
    unit: str = "keys"
    false_positives: dict | None = None
    within_band: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(log10_pvalues, method: str, validity: str, unit: str = "keys", name: str = "") -> CalibrationResult:
    """Rates at :data:`ALPHAS`, their bands and a KS test, from null samples of log10 p."""
    lp = np.asarray(log10_pvalues, dtype=np.float64)
    n = len(lp)
    p = 10.0**lp
    ks = float(sstats.kstest(p, "uniform").pvalue)
    fpr, counts, intervals, inside, below = {}, {}, {}, True, True
    for a in ALPHAS:
        k = int(np.sum(lp <= np.log10(a) + 1e-12))
        lo, hi = binomial_band(n, a)
        fpr[str(a)], counts[str(a)], intervals[str(a)] = k / n, k, [lo, hi]
        inside = inside and lo <= k / n <= hi
        below = below and k / n <= hi
    q = {str(k): float(np.quantile(lp, k / 100)) for k in (0, 1, 5, 50)}
    return CalibrationResult(name, n, ks, fpr, intervals, bool(ks > 0.01 and inside), q, method, validity, unit,
                             counts, bool(below))


def calibrate_weights(w_tilde: np.ndarray, num_keys: int = 1000, seed: int = 0, name: str = "") -> CalibrationResult:
    """Score ``num_keys`` fresh keys against the classifier rows ``w_tilde`` (K, D) with the white-box test."""
    from .detection.access import derived_rng
    from .detection.whitebox import decoy_log10_pvalues

    lp = decoy_log10_pvalues(np.asarray(w_tilde, dtype=np.float64), num_keys,
                             derived_rng(name, "calibration keys", seed))
    return summarise(lp, "white-box", "exact", "keys", name)


def random_weights(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """(K, D) Gaussian classifier rows: a model that has learnt nothing about any key."""
    return np.random.default_rng(seed).standard_normal((num_classes, dim))
