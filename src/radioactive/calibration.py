"""Calibration: fresh keys a model never saw must give uniform p-values.

For a fixed classifier W~ (pulled back into the marking network's space) and
``n`` independent fresh keys, the white-box p-values are i.i.d. uniform on
[0, 1] if the null distribution is exact (Sablayrolles et al. 2020, Section
3: the cosine between a fixed vector and a uniform unit vector). This module
measures it: Kolmogorov-Smirnov test against the uniform law, and false
positive rates at alpha = 0.05 and 0.01 against their 99 % binomial interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sstats

from .detection import decoy_log10_pvalues

ALPHAS = (0.05, 0.01)


@dataclass
class CalibrationResult:
    """Attributes:
        suspect: what was tested (a path, or ``random weights K x D``).
        num_keys: fresh keys scored.
        ks_pvalue: KS test of the p-values against U(0, 1).
        fpr: alpha -> share of keys with p < alpha.
        fpr_interval_99: alpha -> 99 % binomial interval of that share under exact calibration.
        calibrated: ks_pvalue > 0.01 and every FPR inside its interval.
        log10_pvalue_quantiles: 0, 1, 5, 50 % quantiles of the keys' log10 p.
    """

    suspect: str
    num_keys: int
    ks_pvalue: float
    fpr: dict
    fpr_interval_99: dict
    calibrated: bool
    log10_pvalue_quantiles: dict

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_weights(w_tilde: np.ndarray, num_keys: int = 1000, seed: int = 0, name: str = "") -> CalibrationResult:
    """Score ``num_keys`` fresh keys against the classifier rows ``w_tilde`` (K, D)."""
    lp = decoy_log10_pvalues(np.asarray(w_tilde, dtype=np.float64), num_keys, seed)
    p = 10.0**lp
    ks = float(sstats.kstest(p, "uniform").pvalue)
    fpr, intervals, ok = {}, {}, ks > 0.01
    for a in ALPHAS:
        rate = float(np.mean(p < a))
        lo, hi = sstats.binom.interval(0.99, num_keys, a)
        fpr[str(a)] = rate
        intervals[str(a)] = [lo / num_keys, hi / num_keys]
        ok = ok and lo / num_keys <= rate <= hi / num_keys
    q = {str(k): float(np.quantile(lp, k / 100)) for k in (0, 1, 5, 50)}
    return CalibrationResult(name, num_keys, ks, fpr, intervals, bool(ok), q)


def random_weights(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """(K, D) Gaussian classifier rows: a model that has learnt nothing about any key."""
    return np.random.default_rng(seed).standard_normal((num_classes, dim))
