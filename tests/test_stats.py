"""Tests for radioactive.stats (null cosine tail and Fisher combination).

High-precision references come from mpmath (independent of the scipy /
continued-fraction code under test): the cosine tail is a direct quadrature
of the null density (1 - t^2)^((d-3)/2), the Fisher tail is mpmath's
regularised upper incomplete gamma.
"""

import functools
import math

import mpmath as mp
import numpy as np
import pytest
from scipy import stats as sps

from radioactive.stats import cosine_log10_pvalue, fisher_log10_pvalue, format_pvalue

mp.mp.dps = 50

DIMS = [2, 3, 4, 10, 16, 100, 512, 1280, 2048, 10000, 100000]
COSINES = [-1.0, -1 + 1e-12, -0.9, -0.5, -0.1, -1e-8, 0.0, 1e-8, 1e-4, 0.01,
           0.05, 0.1, 0.2, 0.5, 0.7071, 0.9, 0.99, 0.999999, 1 - 1e-12]


def _close(value, ref, rtol=1e-6, atol_small=1e-9):
    """Relative error in log10 p, absolute where |log10 p| < 1e-3."""
    if abs(ref) < 1e-3:
        return abs(value - ref) <= atol_small
    return abs(value - ref) <= rtol * abs(ref)


@functools.cache
def _ln_tail_pos(c, d):
    """ln P(C >= c), c in [0, 1), by quadrature of the null density."""
    c = mp.mpf(c)
    if d == 2:  # C = cos(uniform angle)
        return mp.log(mp.acos(c) / mp.pi)
    if d == 3:  # C uniform on [-1, 1] (Archimedes)
        return mp.log((1 - c) / 2)
    a = mp.mpf(d - 1) / 2
    l0 = mp.log((1 - c) * (1 + c))

    def g(t):  # density / density(c), to keep the integral O(1)
        return mp.exp((a - 1) * (mp.log((1 - t) * (1 + t)) - l0))

    scale = min(1 - c, 1 / mp.sqrt(a - 1))
    if c > 0:
        scale = min(scale, (1 - c * c) / (2 * c * (a - 1)))
    pts, j = [c], 0
    while True:  # geometric split points; stop once the integrand is negligible
        t = c + scale * mp.mpf(2) ** j
        if t >= 1 or g(t) < mp.mpf(10) ** -60:
            pts.append(min(t, mp.mpf(1)))
            break
        pts.append(t)
        j += 1
    return (a - 1) * l0 + mp.log(mp.quad(g, pts)) - mp.log(mp.beta(mp.mpf(1) / 2, a))


@functools.cache
def ref_cosine(c, d):
    """Reference log10 P(C >= c) (c as a float64, d an int)."""
    if c >= 0:
        return float(_ln_tail_pos(c, d) / mp.log(10))
    return float(mp.log10(1 - mp.exp(_ln_tail_pos(-c, d))))


def ref_fisher(log10_ps):
    k = len(log10_ps)
    t = -mp.log(10) * mp.fsum([mp.mpf(float(v)) for v in log10_ps])
    return float(mp.log10(mp.gammainc(k, t, mp.inf, regularized=True)))


# ----------------------------------------------------------------- reference grid
def test_quadrature_reference_matches_mpmath_betainc():
    # Sanity check of the test's own reference where mpmath.betainc is reliable.
    for d, c in [(10, 0.9), (512, 0.75), (10000, 0.99), (1000000, 0.999999)]:
        a = mp.mpf(d - 1) / 2
        x = (1 - mp.mpf(c)) * (1 + mp.mpf(c))
        b = float(mp.log10(mp.betainc(a, mp.mpf(1) / 2, 0, x, regularized=True) / 2))
        assert abs(ref_cosine(c, d) - b) <= 1e-12 * abs(b)


@pytest.mark.parametrize("d", DIMS)
def test_cosine_reference_grid(d):
    got = cosine_log10_pvalue(np.array(COSINES), d)
    assert got.shape == (len(COSINES),) and got.dtype == np.float64
    for c, v in zip(COSINES, got):
        ref = ref_cosine(1 - 2**-53 if c == 1 else c, d)
        assert _close(v, ref), (d, c, v, ref)


def test_cosine_extreme_tails_against_mpmath():
    cases = [(1_000_000, 0.99499), (1_000_000, 0.99999), (100_000, 1 - 1e-12),
             (10_000_000, 0.7), (1_000_000, 0.0371)]  # the last one: p ~ 1e-301
    got = [cosine_log10_pvalue(c, d) for d, c in cases]
    refs = [ref_cosine(c, d) for d, c in cases]
    assert -1.1e6 < refs[0] < -0.9e6 and refs[1] < -2e6 and refs[3] < -1e6
    for (d, c), v, r in zip(cases, got, refs):
        assert math.isfinite(v) and _close(v, r, rtol=1e-9), (d, c, v, r)


def test_cosine_at_one_is_finite_and_documented():
    for d in [2, 3, 512, 100000]:
        v = cosine_log10_pvalue(1.0, d)
        assert math.isfinite(v) and v < 0
        assert v == cosine_log10_pvalue(float(np.nextafter(1.0, 0.0)), d)
        assert cosine_log10_pvalue(-1.0, d) == 0.0


# ----------------------------------------------------------------- paper values
def test_reference_values_dim_512():
    lp = cosine_log10_pvalue([0.1, 0.2], 512)
    assert 10 ** lp[0] == pytest.approx(0.01175, rel=1e-3)
    assert 10 ** lp[1] == pytest.approx(2.50e-6, rel=2e-3)
    assert fisher_log10_pvalue(np.full(10, lp[0])) == pytest.approx(-9.93, abs=0.01)
    assert fisher_log10_pvalue(np.full(1000, lp[1])) == pytest.approx(-4060.7, abs=0.05)


# ----------------------------------------------------------------- inputs
def test_dtypes_and_scalars():
    rng = np.random.default_rng(0)
    base = np.concatenate([rng.uniform(-1, 1, 50), [1.0, -1.0, 0.0, 0.999]])
    for d in [3, 512, 100000]:
        for dtype in [np.float16, np.float32, np.float64]:
            arr = base.astype(dtype)
            got = cosine_log10_pvalue(arr, d)
            assert got.dtype == np.float64 and got.shape == arr.shape
            np.testing.assert_array_equal(got, cosine_log10_pvalue(arr.astype(np.float64), d))
            scal = [cosine_log10_pvalue(float(v), d) for v in arr[:5]]
            assert all(isinstance(s, float) for s in scal)
            np.testing.assert_array_equal(scal, got[:5])
    assert isinstance(cosine_log10_pvalue(np.float32(0.3), 512), float)
    assert cosine_log10_pvalue(np.zeros((2, 3)), np.int64(512)).shape == (2, 3)
    assert cosine_log10_pvalue(0.1, 512.0) == cosine_log10_pvalue(0.1, 512)


def test_clipping_and_invalid_cosines():
    assert cosine_log10_pvalue(1 + 1e-7, 512) == cosine_log10_pvalue(1.0, 512)
    assert cosine_log10_pvalue(-1 - 1e-7, 512) == cosine_log10_pvalue(-1.0, 512) == 0.0
    for bad in [1.5, -1.5, float("nan"), [0.1, np.nan], [0.2, 1.01]]:
        with pytest.raises(ValueError):
            cosine_log10_pvalue(bad, 512)


@pytest.mark.parametrize("dim", [1, 0, -3, 2.5, "512", True])
def test_invalid_dim(dim):
    with pytest.raises(ValueError):
        cosine_log10_pvalue(0.1, dim)


def test_never_nan_or_inf_dense_random():
    rng = np.random.default_rng(1)
    for d in np.unique(np.round(10 ** rng.uniform(np.log10(2), 7, 40)).astype(int)):
        c = np.concatenate([rng.uniform(-1, 1, 500), 1 - 10 ** rng.uniform(-16, 0, 200),
                            -1 + 10 ** rng.uniform(-16, 0, 200), [1.0, -1.0, 0.0]])
        v = cosine_log10_pvalue(c, int(d))
        assert np.isfinite(v).all() and (v <= 0).all(), d


# ----------------------------------------------------------------- structure
@pytest.mark.parametrize("d", [2, 3, 4, 16, 512, 100000, 10**7])
def test_monotone_and_symmetric(d):
    c = np.unique(np.concatenate([np.linspace(-1, 1, 20001), 1 - np.logspace(-16, 0, 500),
                                  np.logspace(-16, 0, 500), -np.logspace(-16, 0, 500)]))
    v = cosine_log10_pvalue(c, d)
    assert (np.diff(v) <= 1e-12 * np.abs(v[1:]) + 1e-15).all()
    moderate = np.linspace(-0.999, 0.999, 101)
    total = 10 ** cosine_log10_pvalue(moderate, d) + 10 ** cosine_log10_pvalue(-moderate, d)
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    assert cosine_log10_pvalue(0.0, d) == pytest.approx(-math.log10(2), abs=1e-15)


@pytest.mark.parametrize("d", [3, 16, 512])
def test_monte_carlo_null(d):
    rng = np.random.default_rng(1234 + d)
    n, chunk = 200_000, 25_000
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    cos = []
    for _ in range(n // chunk):
        g = rng.standard_normal((chunk, d))
        cos.append(g @ u / np.linalg.norm(g, axis=1))
    cos = np.concatenate(cos)
    sd = 1 / math.sqrt(d)
    for thr in [-2 * sd, -0.5 * sd, 0.0, 0.5 * sd, sd, 2 * sd, 3 * sd]:
        thr = float(np.clip(thr, -0.999, 0.999))
        p = 10 ** cosine_log10_pvalue(thr, d)
        freq = np.mean(cos >= thr)
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (thr, freq, p)
    pvals = 10 ** cosine_log10_pvalue(cos, d)
    assert sps.kstest(pvals, "uniform").pvalue > 1e-3


# ----------------------------------------------------------------- Fisher
def _fisher_cases():
    rng = np.random.default_rng(2)
    cases = []
    for k in [1, 2, 10, 1000, 100000]:
        mixed = np.zeros(k)
        mixed[::2] = -300
        cases += [np.full(k, -1e5), np.full(k, -1e-7), np.full(k, -3.0), np.full(k, -1e6 / k),
                  -rng.exponential(1 / math.log(10), k), mixed, np.zeros(k)]
    return cases


FISHER_CASES = _fisher_cases()


@pytest.mark.parametrize("i", range(len(FISHER_CASES)))
def test_fisher_against_mpmath(i):
    lp = FISHER_CASES[i]
    got = fisher_log10_pvalue(lp)
    assert isinstance(got, float) and math.isfinite(got) and got <= 0
    if not lp.any():
        assert got == 0.0
    ref = ref_fisher(lp)
    assert _close(got, ref, rtol=1e-9), (len(lp), lp[:2], got, ref)


def test_fisher_matches_scipy_moderate():
    rng = np.random.default_rng(3)
    for k in [2, 5, 10, 50, 300]:
        for _ in range(5):
            p = rng.uniform(1e-4, 1, k)
            sp_p = sps.combine_pvalues(p, method="fisher").pvalue
            assert fisher_log10_pvalue(np.log10(p)) == pytest.approx(np.log10(sp_p), rel=1e-9, abs=1e-12)


def test_fisher_k1_and_clipping():
    for v in [0.0, -0.3, -12.5, -1e6, -1e300]:
        assert fisher_log10_pvalue([v]) == v
    assert fisher_log10_pvalue([1e-13, -2.0]) == fisher_log10_pvalue([0.0, -2.0])
    assert fisher_log10_pvalue(np.zeros(100000)) == 0.0


@pytest.mark.parametrize("bad", [[], [0.1], [-1.0, 1e-6], [np.nan, -1.0], [-np.inf]])
def test_fisher_invalid(bad):
    with pytest.raises(ValueError):
        fisher_log10_pvalue(bad)


# ----------------------------------------------------------------- formatting
def test_format_pvalue():
    assert format_pvalue(-4060) == "1.0e-4060"
    assert format_pvalue(math.log10(3.2e-12)) == "3.2e-12"
    assert format_pvalue(-4060.7) == "2.0e-4061"
    assert format_pvalue(0.0) == "1.0e+00"
    assert format_pvalue(math.log10(9.99e-5)) == "1.0e-04"
    assert format_pvalue(-1e6, digits=3) == "1.00e-1000000"
    with pytest.raises(ValueError):
        format_pvalue(float("-inf"))
