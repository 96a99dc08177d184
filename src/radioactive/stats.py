"""Null distributions and p-values for the radioactive-data test.

Implements the statistical test of Sablayrolles et al., "Radioactive data:
tracing through training", ICML 2020, Section 3 ("statistical test"):

* Under the null hypothesis (the model was not trained on marked data) the
  cosine ``C`` between a fixed carrier ``u`` and a classifier direction is
  distributed like the cosine between ``u`` and a uniform random unit vector
  in ``R^d``.  Its density is proportional to ``(1 - c^2)^((d-3)/2)`` on
  ``[-1, 1]``, i.e. ``(C + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)``, and the
  one-sided tail is, for ``c >= 0``,
  ``P(C >= c) = 1/2 * I_{1-c^2}((d-1)/2, 1/2)`` (regularised incomplete beta).
* Per-class p-values are combined with Fisher's method (Fisher, 1925):
  ``T = -2 sum_i ln p_i ~ chi^2_{2k}``, so the combined p-value is the
  regularised upper incomplete gamma function ``Q(k, T/2)``.

All p-values are handled as log10 probabilities so that extremely small values
(down to 1e-1000000 and beyond) stay finite and accurate.  No mpmath: only
numpy/scipy with log-space continued fractions / finite sums in the tails.
"""

from __future__ import annotations

import math
import operator

import numpy as np
from scipy import special

__all__ = ["cosine_log10_pvalue", "fisher_log10_pvalue", "format_pvalue"]

_LN10 = math.log(10.0)
_LN2 = math.log(2.0)
_CLIP_TOL = 1e-3  # cosines within 1 + _CLIP_TOL of [-1, 1] are clipped
_TINY = 1e-280  # below this, scipy results are replaced by log-space methods
_ONE_MINUS = float(np.nextafter(1.0, 0.0))  # largest float64 below 1


def _check_dim(dim) -> int:
    if isinstance(dim, (bool, np.bool_)):
        raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
    try:
        d = operator.index(dim)
    except TypeError:
        if isinstance(dim, (float, np.floating)) and float(dim).is_integer():
            d = int(dim)
        else:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}") from None
    if d < 2:
        raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
    return d


def _log_betainc_cf(a: float, b: float, x: np.ndarray, log1mx: np.ndarray) -> np.ndarray:
    """Natural log of I_x(a, b) via the continued fraction, in log space.

    Uses I_x(a,b) = x^a (1-x)^b / (a B(a,b)) * CF (Numerical Recipes
    ``betacf``, modified Lentz).  The prefactor is evaluated in logs, so there
    is no underflow.  Converges in O(sqrt(a)) steps for x < (a+1)/(a+b+2),
    which always holds where it is used (tails that underflow float64).
    ``log1mx`` is ``ln(1 - x)``, passed in to avoid cancellation.
    """
    x = np.asarray(x, dtype=np.float64)
    fpmin = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < fpmin, fpmin, d)
    d = 1.0 / d
    h = d.copy()
    active = np.ones(x.shape, dtype=bool)
    max_iter = int(100 + 50 * math.sqrt(a))
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < fpmin, fpmin, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < fpmin, fpmin, c)
        d = 1.0 / d
        h = np.where(active, h * d * c, h)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < fpmin, fpmin, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < fpmin, fpmin, c)
        d = 1.0 / d
        delta = d * c
        h = np.where(active, h * delta, h)
        active &= np.abs(delta - 1.0) > 1e-16
        if not active.any():
            break
    return (a * np.log(x) + b * log1mx - special.betaln(a, b)
            - math.log(a) + np.log(h))


def cosine_log10_pvalue(cosines, dim):
    """log10 of the null tail probability P(C >= c) of a cosine similarity.

    ``C`` is the cosine between a fixed vector and a uniformly random unit
    vector in ``R^dim`` (the null hypothesis of Sablayrolles et al. 2020,
    Sec. 3).  Its density is ``∝ (1 - c^2)^((dim-3)/2)`` on ``[-1, 1]``, i.e.
    ``(C + 1)/2 ~ Beta((dim-1)/2, (dim-1)/2)``.  For ``c >= 0``,
    ``P(C >= c) = 1/2 I_{1-c^2}((dim-1)/2, 1/2)``; for ``c < 0``,
    ``P(C >= c) = 1 - P(C >= -c)``.

    Regimes: moderate values use ``scipy.special.betainc`` / ``betaincc``
    (with ``1 - c^2`` as ``(1-c)(1+c)`` near ``|c| = 1`` and ``c^2`` directly
    near 0, plus ``log1p``); tails that would underflow float64 (p < 1e-280)
    use a log-space continued fraction, accurate far below log10 p = -1e6.

    At ``c = 1`` exactly the true probability is 0; we return instead the
    tail at the largest float64 below 1 (``1 - 2**-53``), i.e. the smallest
    tail probability resolvable with float64 cosines.  The output is thus
    always finite and (weakly) decreasing in ``c``.

    Args:
        cosines: Python scalar or array-like of any shape (float16/32/64 or
            integer); upcast to float64.  Values in ``[-1-1e-3, 1+1e-3]`` are
            clipped to ``[-1, 1]`` (rounding noise).
        dim: Dimension ``d`` of the ambient space, an integer ``>= 2``
            (integral floats such as ``512.0`` are accepted).

    Returns:
        log10 p-values (units: log10 probability, in ``(-inf, 0]``, never NaN
        or -inf).  A numpy float64 array of the same shape as ``cosines``, or
        a Python float if ``cosines`` is a scalar / 0-d array.

    Raises:
        ValueError: If ``dim`` is not an integer >= 2, or if any cosine is
            NaN or lies outside ``[-1-1e-3, 1+1e-3]``.
    """
    d = _check_dim(dim)
    scalar = np.ndim(cosines) == 0
    c = np.array(cosines, dtype=np.float64, copy=True)
    if np.isnan(c).any():
        raise ValueError("cosines contain NaN")
    if (np.abs(c) > 1.0 + _CLIP_TOL).any():
        bad = c[np.abs(c) > 1.0 + _CLIP_TOL].ravel()[0]
        raise ValueError(f"cosines must lie in [-1, 1] (up to rounding), got {bad!r}")
    c = np.clip(c, -1.0, 1.0)
    c = np.where(c == 1.0, _ONE_MINUS, c)

    a = 0.5 * (d - 1)
    ac = np.abs(c)
    pos = c >= 0
    near0 = ac * ac < 0.5  # use c^2 directly (x = 1 - c^2 is near 1)
    y = ac * ac
    x = (1.0 - ac) * (1.0 + ac)  # 1 - c^2, accurate near |c| = 1
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        # q = I_x(a, 1/2) = 2 P(C >= |c|) = 1 - w, with w = I_{c^2}(1/2, a).
        w = special.betainc(0.5, a, y)
        q_near0 = np.where(w < 0.5, 1.0 - w, special.betaincc(0.5, a, y))
        q = np.where(near0, q_near0, special.betainc(a, 0.5, x))
        # c >= 0: p = q / 2;  c < 0: p = 1 - q / 2 (in [1/2, 1], no underflow)
        out = np.where(pos, np.log(np.maximum(q, _TINY)) - _LN2, np.log1p(-0.5 * q))
        deep = pos & (q < _TINY)
        if deep.any():
            out[deep] = _log_betainc_cf(a, 0.5, x[deep], 2.0 * np.log(ac[deep])) - _LN2
    out = np.minimum(out / _LN10, 0.0) + 0.0  # + 0.0 turns -0.0 into 0.0
    return float(out) if scalar else out


def _log_gammaincc_int(k: int, t: float) -> float:
    """ln Q(k, t) for integer k >= 1 and t > 0, robust in the far tail.

    Uses the finite sum Q(k, t) = e^{-t} sum_{j<k} t^j / j! in log space
    (logsumexp) when scipy's ``gammaincc`` underflows.
    """
    q = special.gammaincc(k, t)
    if q > 0.5:
        return math.log1p(-special.gammainc(k, t))
    if q > _TINY:
        return math.log(q)
    j = np.arange(k, dtype=np.float64)
    return -t + float(special.logsumexp(j * math.log(t) - special.gammaln(j + 1.0)))


def fisher_log10_pvalue(log10_pvalues) -> float:
    """Combine independent p-values with Fisher's method, in log10 space.

    Fisher (1925): ``T = -2 sum_i ln p_i`` follows ``chi^2`` with ``2k``
    degrees of freedom under the joint null, so the combined p-value is
    ``P(chi^2_{2k} >= T) = Q(k, T/2)`` (regularised upper incomplete gamma).
    Used in Sablayrolles et al. 2020 (Sec. 3) to aggregate per-class cosine
    tests.  Moderate values use ``scipy.special.gammaincc`` (``log1p`` of
    ``gammainc`` when Q > 1/2); underflowing tails use the exact finite sum
    ``Q(k, t) = e^{-t} sum_{j<k} t^j/j!`` in log space.

    Args:
        log10_pvalues: Array-like of shape ``(k,)``, ``k >= 1`` (any shape is
            flattened), of log10 p-values (units: log10 probability).  Each
            must be finite and ``<= 0``; values in ``(0, 1e-12]`` are clipped
            to 0.

    Returns:
        The combined log10 p-value as a Python float in ``(-inf, 0]``; finite
        however extreme the inputs.  For ``k = 1`` the input is returned.

    Raises:
        ValueError: If the input is empty, contains NaN or -inf, or contains a
            value ``> 1e-12``.
    """
    lp = np.asarray(log10_pvalues, dtype=np.float64).ravel()
    if lp.size == 0:
        raise ValueError("fisher_log10_pvalue needs at least one p-value")
    if np.isnan(lp).any():
        raise ValueError("log10 p-values contain NaN")
    if np.isinf(lp).any():
        raise ValueError("log10 p-values must be finite (p = 0 is not allowed)")
    if (lp > 1e-12).any():
        raise ValueError(f"log10 p-values must be <= 0, got max {lp.max()!r}")
    lp = np.minimum(lp, 0.0)
    k = lp.size
    if k == 1:
        return float(lp[0])
    t = -_LN10 * float(math.fsum(lp))  # = T / 2
    if t == 0.0:
        return 0.0
    return min(_log_gammaincc_int(k, t) / _LN10, 0.0) + 0.0


def format_pvalue(log10_p: float, digits: int = 2) -> str:
    """Format a probability given as log10 in scientific notation.

    Works far beyond the float64 range, e.g. ``format_pvalue(-4060)`` gives
    ``"1.0e-4060"`` and ``format_pvalue(math.log10(3.2e-12))`` gives
    ``"3.2e-12"``.

    Args:
        log10_p: log10 of the probability (finite; usually <= 0).
        digits: Number of significant digits of the mantissa (>= 1).

    Returns:
        A string ``"<mantissa>e<sign><exponent>"`` (exponent at least 2 digits).

    Raises:
        ValueError: If ``log10_p`` is not finite or ``digits < 1``.
    """
    log10_p = float(log10_p)
    if not math.isfinite(log10_p):
        raise ValueError(f"log10_p must be finite, got {log10_p!r}")
    if digits < 1:
        raise ValueError("digits must be >= 1")
    exponent = math.floor(log10_p)
    mantissa = round(10.0 ** (log10_p - exponent), digits - 1)
    if mantissa >= 10.0:
        mantissa, exponent = mantissa / 10.0, exponent + 1
    return f"{mantissa:.{digits - 1}f}e{exponent:+03d}"
