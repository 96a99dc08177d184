"""Carrier-permutation test: exact null, power, and the marked-pool construction.

Not collected by the suite (testpaths is tests/); run it with
``.venv/bin/pytest -q benchmarks/studies/from_scratch/test_permutation.py``. The fixtures come from
tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from radioactive.marking import MarkingConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from permutation import marked_pools, permutation_log10_pvalue, response_matrices  # noqa: E402


def _suite_fixtures():
    path = Path(__file__).resolve().parents[3] / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_suite_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_suite = _suite_fixtures()
cifar_small, classes, marking_net, key, real_batch = (_suite.cifar_small, _suite.classes, _suite.marking_net,
                                                       _suite.key, _suite.real_batch)


def test_pvalue_is_exact_rank_among_permutations():
    m = np.zeros((4, 4))
    m[np.arange(4), np.arange(4)] = 1.0  # identity beats every other permutation
    assert math.isclose(permutation_log10_pvalue(m), math.log10(1 / 24))
    assert permutation_log10_pvalue(np.ones((4, 4))) == 0.0  # all ties: p = 1


def test_null_is_calibrated():
    """Exchangeable columns (carriers unrelated to classes): p-values uniform on the K! grid."""
    rng = np.random.default_rng(0)
    p = np.array([10 ** permutation_log10_pvalue(rng.normal(size=(5, 5))) for _ in range(400)])
    assert sps.kstest(p, "uniform").pvalue > 1e-3
    lo, hi = sps.binom.interval(0.99, len(p), 0.05)
    assert lo <= (p <= 0.05).sum() <= hi


def test_monte_carlo_branch_detects_and_is_bounded():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(15, 15)) + 4 * np.eye(15)
    lp = permutation_log10_pvalue(m, samples=5000)
    assert math.isclose(lp, math.log10(1 / 5001))
    assert permutation_log10_pvalue(rng.normal(size=(15, 15)), samples=5000) > -2.5


def test_ten_classes_reach_one_over_ten_factorial():
    m = np.random.default_rng(2).normal(size=(10, 10)) + 10 * np.eye(10)
    assert math.isclose(permutation_log10_pvalue(m), -math.log10(math.factorial(10)))


def test_marked_pools_and_responses(marking_net, real_batch, key):
    net = marking_net[0] if isinstance(marking_net, tuple) else marking_net
    pool = real_batch[0][:4]
    pools = marked_pools(net, pool, key.carriers[:3], MarkingConfig(steps=2, batch_size=4))
    assert len(pools) == 3 and all(p.shape == pool.shape and p.dtype == torch.uint8 for p in pools)
    assert all(int((p.int() - pool.int()).abs().max()) <= 10 for p in pools)
    assert not torch.equal(pools[0], pools[1])  # different carriers, different marks
    black, white = response_matrices(net, pool, pools, [0, 1, 2])
    assert black.shape == white.shape == (3, 3)
    assert np.isfinite(black).all() and np.all(np.abs(white) <= 1)
