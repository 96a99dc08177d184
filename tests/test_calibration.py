"""Tests for radioactive.calibration: fresh keys scored against a fixed classifier must give uniform p-values,
the check must be able to fail when the null is wrong, and the ``calibrate`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats as sps

from radioactive.calibration import ALPHAS, binomial_band, calibrate_weights, random_weights, summarise
from radioactive.detection import whitebox as whitebox_module
from radioactive.detection import whitebox_test
from radioactive.keys import random_carriers

K, D = 10, 1280
N_KEYS = 1000


def _interval(n, alpha):
    lo, hi = sps.binom.interval(0.99, n, alpha)
    return [lo / n, hi / n]


def _check_consistent(res, n):
    """The result's own fields agree with its definition of 'calibrated'."""
    assert res.num_keys == n
    assert 0 <= res.ks_pvalue <= 1
    assert set(res.fpr) == set(res.fpr_interval_99) == {str(a) for a in ALPHAS}
    inside = all(res.fpr_interval_99[a][0] <= res.fpr[a] <= res.fpr_interval_99[a][1] for a in res.fpr)
    assert res.calibrated == (res.ks_pvalue > 0.01 and inside)
    for a in ALPHAS:
        assert res.fpr_interval_99[str(a)] == pytest.approx(_interval(n, a))
        # a share of n keys: a multiple of 1 / n
        assert res.fpr[str(a)] * n == pytest.approx(round(res.fpr[str(a)] * n))
    q = res.log10_pvalue_quantiles
    assert list(q) == ["0", "1", "5", "50"]
    assert q["0"] <= q["1"] <= q["5"] <= q["50"] <= 0


def test_random_weights_are_calibrated():
    res = calibrate_weights(random_weights(K, D), N_KEYS, name="random")
    _check_consistent(res, N_KEYS)
    assert res.calibrated
    assert res.ks_pvalue > 0.01
    for a in ALPHAS:
        lo, hi = res.fpr_interval_99[str(a)]
        assert lo <= res.fpr[str(a)] <= hi
    # the median p of uniform p-values is 1/2
    assert -0.5 < res.log10_pvalue_quantiles["50"] < -0.15
    assert res.suspect == "random" and res.to_dict()["num_keys"] == N_KEYS


def test_random_weights_seeded():
    a, b = random_weights(K, D, seed=3), random_weights(K, D, seed=3)
    assert a.shape == (K, D) and np.array_equal(a, b)
    assert not np.array_equal(a, random_weights(K, D, seed=4))
    r1 = calibrate_weights(a, 200, seed=7)
    r2 = calibrate_weights(a, 200, seed=7)
    assert r1.to_dict() == r2.to_dict()
    assert r1.log10_pvalue_quantiles != calibrate_weights(a, 200, seed=8).log10_pvalue_quantiles


def test_weights_aligned_with_a_key_are_still_calibrated_for_fresh_keys():
    """A model that carries a real key is detected with that key, yet fresh keys (independent of it) stay uniform."""
    carriers = random_carriers(K, D, torch.Generator().manual_seed(123)).numpy().astype(np.float64)
    rng = np.random.default_rng(5)
    w = 0.5 * carriers + rng.standard_normal((K, D)) / np.sqrt(D)
    real = whitebox_test(w, carriers, [f"c{k}" for k in range(K)], None)
    assert real.detected and real.log10_pvalue < -20  # the weights really do carry the key
    res = calibrate_weights(w, N_KEYS, seed=11)
    _check_consistent(res, N_KEYS)
    assert res.calibrated, res
    assert res.log10_pvalue_quantiles["0"] > -6  # no fresh key comes anywhere near the real key's p-value


@pytest.mark.parametrize("wrong_dim, direction", [(lambda d: d // 4, "conservative"),
                                                  (lambda d: d * 4, "anti-conservative")],
                         ids=["dim/4", "dim*4"])
def test_check_fails_with_a_wrong_null(monkeypatch, wrong_dim, direction):
    """The check can fail: p-values from the null of the wrong dimension are not uniform."""
    true_null = whitebox_module.cosine_log10_pvalue
    monkeypatch.setattr(whitebox_module, "cosine_log10_pvalue", lambda cos, dim: true_null(cos, wrong_dim(dim)))
    res = calibrate_weights(random_weights(K, D, seed=1), N_KEYS, seed=2)
    _check_consistent(res, N_KEYS)
    assert not res.calibrated
    assert res.ks_pvalue < 1e-10
    lo, hi = res.fpr_interval_99["0.05"]
    if direction == "conservative":  # a wider null: p-values pile up near 1, too few false positives
        assert res.fpr["0.05"] < lo
    else:  # a narrower null: far too many false positives
        assert res.fpr["0.05"] > hi


def test_default_seeds_do_not_reuse_the_weights_as_a_fresh_key():
    res = calibrate_weights(random_weights(K, D), N_KEYS)
    # 1000 independent null keys: P(min p < 1e-10) ~ 1e-7
    assert res.log10_pvalue_quantiles["0"] > -10


# ----------------------------------------------------------------------------- command line


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "radioactive", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_calibrate_white_box_on_a_random_probe(key, cifar_small, tmp_path):
    """``calibrate --method white-box``: fresh keys against a linear probe with random weights (a model that never
    saw any mark), through the registry's null sampler; the same numbers as the library's."""
    from probes import linear_probe

    from radioactive.detection import OwnerFiles, SuspectAccess
    from radioactive.detection.registry import get_method

    key_path = key.save(tmp_path / "key.safetensors")
    probe = linear_probe(tmp_path / "probe.safetensors", random_weights(len(key.classes), key.dim, 1), key)
    out = tmp_path / "sub" / "calibration.json"
    proc = _run_cli("calibrate", "--method", "white-box", "--key", key_path, "--suspect", probe, "--images",
                    cifar_small[1], "--ridge", 0.1, "--keys", 300, "--output", out)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["num_keys"] == 300 and printed["method"] == "white-box" and printed["validity"] == "exact"
    assert printed["unit"] == "keys" and printed["suspect"] == str(probe)
    assert 0 <= printed["ks_pvalue"] <= 1
    assert set(printed["fpr"]) == set(printed["false_positives"]) == {"0.05", "0.01", "0.001"}
    assert printed["within_band"] is True and isinstance(printed["calibrated"], bool)
    assert json.loads(out.read_text()) == printed
    # the same computation through the library
    entry = get_method("white-box")
    owner = OwnerFiles(key=key, images=cifar_small[1])
    config = entry.config(ridge=0.1)
    lib = summarise(entry.null(owner, SuspectAccess.of_model(probe), config, 300, 0), "white-box", "exact", "keys",
                    str(probe)).to_dict()
    assert printed["ks_pvalue"] == pytest.approx(lib["ks_pvalue"])
    assert printed["fpr"] == lib["fpr"]


def test_cli_calibrate_needs_a_suspect_and_a_key(key, tmp_path, capsys):
    from probes import linear_probe

    from radioactive.cli import main

    with pytest.raises(SystemExit) as e:  # no suspect: a usage error
        main(["calibrate", "--keys", "10"])
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--suspect" in lines[0]
    probe = linear_probe(tmp_path / "probe.safetensors", random_weights(len(key.classes), key.dim, 1), key)
    assert main(["calibrate", "--suspect", str(probe), "--keys", "10"]) == 1  # no key: an error naming the flag
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--key" in lines[0]
    with pytest.raises(SystemExit) as e:  # a descriptive statistic has no null to calibrate
        main(["calibrate", "--method", "paired", "--suspect", str(probe), "--keys", "10"])
    assert e.value.code == 2 and "invalid choice: 'paired'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- summarise (every method)


def test_summarise_uniform_pvalues_are_within_band():
    """Exact p-values (uniform): every rate inside its 99 % band, KS passes, within_band and calibrated."""
    n = 20_000
    lp = np.log10(np.random.default_rng(0).uniform(size=n))
    res = summarise(lp, "gradient", "exact", "keys", "synthetic")
    assert res.method == "gradient" and res.validity == "exact" and res.unit == "keys" and res.num_keys == n
    for a in ALPHAS:
        lo, hi = res.fpr_interval_99[str(a)]
        assert (lo, hi) == pytest.approx(binomial_band(n, a)) and lo < a < hi
        assert lo <= res.fpr[str(a)] <= hi
        assert res.false_positives[str(a)] == round(res.fpr[str(a)] * n)
    assert res.within_band and res.calibrated and res.ks_pvalue > 0.01


def test_summarise_flags_anti_conservative_and_accepts_conservative_pvalues():
    """A test whose p-values are too small is above the band (its validity is refuted); one whose p-values are too
    large (conservative, e.g. discrete ranks) is below the band: within_band, though not calibrated."""
    n = 20_000
    u = np.random.default_rng(1).uniform(size=n)
    anti = summarise(np.log10(u**1.5), "paired", "exact", "keys")  # P(p <= a) = a^(2/3): 0.136 at 0.05
    assert not anti.within_band and not anti.calibrated
    for a in ALPHAS:
        assert anti.fpr[str(a)] > anti.fpr_interval_99[str(a)][1]
    assert anti.fpr["0.05"] == pytest.approx(0.05 ** (2 / 3), abs=0.01)
    cons = summarise(np.log10(u ** (2 / 3)), "decoy-carrier", "conservative", "keys")  # P(p <= a) = a^1.5
    assert cons.within_band and not cons.calibrated
    assert cons.fpr["0.05"] < cons.fpr_interval_99["0.05"][0]


def test_real_vanilla_model_trained_by_the_project_is_calibrated(cifar_small, key, tmp_path):
    """(b) of the calibration check: a linear classifier trained by `train` on real vanilla images,
    pulled back through the real alignment, scored against 1,000 fresh keys."""
    from radioactive.detection import pull_back
    from radioactive.training import TrainConfig, train

    trained = train(cifar_small[0], cifar_small[1], tmp_path / "vanilla.safetensors",
                    TrainConfig(recipe="linear", epochs=3, views=1), progress=False)
    w_tilde = pull_back(trained.weights, key, cifar_small[1], ridge=0.1)[0]  # 60 images < D: needs a ridge
    result = calibrate_weights(w_tilde, num_keys=1000, seed=3, name="vanilla linear")
    assert result.calibrated, result
    assert result.ks_pvalue > 0.01
