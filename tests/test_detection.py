"""Tests for radioactive.detection: alignment, cosines, the white-box test, class matching,
the full ``detect`` path on real images, and calibration under the null."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats as sps

from radioactive.detection import class_cosines, detect, fit_alignment, match_classes, whitebox_test
from radioactive.errors import RadioactiveError
from radioactive.keys import generate_key, random_carriers
from radioactive.networks import Preprocessing

D = 1280
K = 10


def _marked_weight(carriers: np.ndarray, strength: float = 0.3, seed: int = 0) -> np.ndarray:
    """Classifier rows carrying the carriers: strength * u_k + Gaussian noise of norm ~1."""
    rng = np.random.default_rng(seed)
    k, d = carriers.shape
    return strength * carriers + rng.standard_normal((k, d)) / np.sqrt(d)


# ----------------------------------------------------------------------------- alignment


def test_fit_alignment_recovers_known_linear_map():
    rng = np.random.default_rng(0)
    n, d, ds = 400, 20, 15
    f = rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + rng.uniform(-5, 5, d)
    a = rng.standard_normal((d, ds))
    b = rng.standard_normal(ds) * 10
    fs = f @ a + b + 1e-6 * rng.standard_normal((n, ds))
    al = fit_alignment(f, fs)
    assert al.matrix.shape == (d, ds) and al.num_images == n
    np.testing.assert_allclose(al.matrix, a, atol=1e-5)
    assert 1 - 1e-9 < al.r2 <= 1.0
    # a small ridge shrinks a little but keeps the map
    ridged = fit_alignment(f, fs, ridge=1e-4)
    np.testing.assert_allclose(ridged.matrix, a, atol=1e-2)
    assert not np.allclose(ridged.matrix, al.matrix, atol=1e-9, rtol=0)
    assert ridged.r2 > 0.999


def test_fit_alignment_r2_reflects_noise():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((400, 20))
    signal = f @ rng.standard_normal((20, 5))
    noisy = signal + rng.standard_normal(signal.shape) * signal.std()  # half the variance is noise
    assert 0.4 < fit_alignment(f, noisy).r2 < 0.6
    assert abs(fit_alignment(f, rng.standard_normal((400, 5))).r2) < 0.1  # unrelated features


def test_fit_alignment_rejects_bad_shapes():
    with pytest.raises(RadioactiveError):
        fit_alignment(np.zeros((10, 3)), np.zeros((9, 3)))
    with pytest.raises(RadioactiveError):
        fit_alignment(np.zeros((1, 3)), np.zeros((1, 3)))


def test_fit_alignment_refuses_underdetermined_unless_ridge():
    """N <= D interpolates (in-sample R^2 = 1 for any features): refused without a ridge; with one, the held-out R^2
    tells the truth (issue 16: "alignment R^2 1.000" was shown for unrelated features)."""
    rng = np.random.default_rng(5)
    d = 60
    for n in (40, d):  # N < D and N = D
        f = rng.standard_normal((n, d))
        unrelated = rng.standard_normal((n, 8))
        with pytest.raises(RadioactiveError, match=rf"{n} images for {d} marking features is under-determined.*ridge"):
            fit_alignment(f, unrelated)
        al = fit_alignment(f, unrelated, ridge=0.1)
        assert al.ridge == 0.1 and al.num_images == n
        assert al.r2 > 0.8  # the in-sample fit still (nearly) interpolates noise
        assert al.r2_heldout is not None and al.r2_heldout < 0.1 < al.r2
    # N > D: least squares is accepted, and its held-out R^2 is reported too
    f = rng.standard_normal((300, 20))
    fs = f @ rng.standard_normal((20, 5)) + 0.1 * rng.standard_normal((300, 5))
    al = fit_alignment(f, fs)
    assert al.r2_heldout is not None and 0.95 < al.r2_heldout <= 1 and al.r2 > 0.95


# ----------------------------------------------------------------------------- cosines


def test_class_cosines_identity_known_values():
    rng = np.random.default_rng(2)
    u = np.linalg.qr(rng.standard_normal((50, 8)))[0].T  # 8 orthonormal rows in R^50
    carriers, other = u[:4], u[4:]
    target = np.array([0.9, 0.0, -0.5, 0.1])
    w = target[:, None] * carriers + np.sqrt(1 - target**2)[:, None] * other
    w *= np.array([[1.0], [3.0], [0.2], [7.0]])  # the row norms do not matter
    cos = class_cosines(w, carriers, None)
    assert cos.dtype == np.float64 and cos.shape == (4,)
    np.testing.assert_allclose(cos, target, atol=1e-12)
    w[1] = 0
    assert class_cosines(w, carriers, None)[1] == 0.0  # a zero row has cosine 0, not NaN


def test_class_cosines_pulls_back_through_alignment():
    rng = np.random.default_rng(3)
    d, ds = 30, 12
    x = rng.standard_normal((d, ds))
    w = rng.standard_normal((5, ds))
    u = rng.standard_normal((5, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    wt = w @ x.T
    expected = (wt * u).sum(1) / np.linalg.norm(wt, axis=1)
    np.testing.assert_allclose(class_cosines(w, u, x), expected, atol=1e-12)


# ----------------------------------------------------------------------------- white-box test


def test_whitebox_detects_marked_weights(key):
    u = key.carriers.numpy().astype(np.float64)
    w = _marked_weight(u)
    res = whitebox_test(w, u, list(key.classes), None, key_fingerprint=key.fingerprint)
    assert res.detected and res.log10_pvalue < -100  # cos ~0.29 in D = 1280: per class p ~ 1e-20
    assert res.method == "white-box" and res.dim == D and res.classes == list(key.classes)
    assert all(0.2 < c < 0.4 for c in res.cosines)  # 0.3 / sqrt(1 + 0.09)
    assert all(lp < -15 for lp in res.class_log10_pvalues)
    assert res.log10_pvalue < min(res.class_log10_pvalues)  # combining 10 classes adds evidence
    assert res.key_fingerprint == key.fingerprint and res.details.alignment_r2 is None
    assert "DETECTED" in res.verdict()


def test_whitebox_fresh_carriers_not_detected(key):
    w = _marked_weight(key.carriers.numpy().astype(np.float64))
    fresh = random_carriers(K, D, torch.Generator().manual_seed(12345)).numpy()
    res = whitebox_test(w, fresh, list(key.classes), None)
    assert not res.detected and res.log10_pvalue > -3
    assert all(abs(c) < 0.15 for c in res.cosines)
    assert res.verdict().startswith("not detected")


@pytest.mark.parametrize("control", ["cyclic-shift", "negated", "fresh-key"])
def test_whitebox_wrong_key_controls(key, control):
    u = key.carriers.numpy().astype(np.float64)
    w = _marked_weight(u)
    assert whitebox_test(w, u, list(key.classes), None).log10_pvalue < -10  # the marks are there
    if control == "cyclic-shift":
        wrong = np.roll(u, 1, axis=0)
    elif control == "negated":
        wrong = -u
    else:
        wrong = generate_key(list(key.classes), seed=2).carriers.numpy()
    res = whitebox_test(w, wrong, list(key.classes), None)
    assert not res.detected and res.log10_pvalue > -3
    if control == "negated":
        assert all(c < -0.2 for c in res.cosines) and res.log10_pvalue > -1e-6  # p ~ 1: one-sided test


def test_whitebox_rejects_bad_alpha(key):
    u = key.carriers.numpy()
    for alpha in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(RadioactiveError, match="alpha"):
            whitebox_test(u, u, list(key.classes), None, alpha=alpha)


def test_whitebox_alpha_sets_verdict(key):
    u = key.carriers.numpy().astype(np.float64)
    w = _marked_weight(u, strength=0.05, seed=4)
    res = whitebox_test(w, u, list(key.classes), None, alpha=0.5)
    lp = res.log10_pvalue
    assert whitebox_test(w, u, list(key.classes), None, alpha=10 ** (lp + 0.01)).detected
    assert not whitebox_test(w, u, list(key.classes), None, alpha=10 ** (lp - 0.01)).detected


# ----------------------------------------------------------------------------- class matching


def test_match_classes_permuted_suspect():
    key_classes = ["cat", "dog", "frog", "ship"]
    suspect = ["ship", "cat", "frog", "dog", "extra"]
    k_idx, s_idx = match_classes(key_classes, suspect)
    assert k_idx == [0, 1, 2, 3] and s_idx == [1, 3, 2, 0]
    assert [suspect[i] for i in s_idx] == [key_classes[i] for i in k_idx]
    k_idx, s_idx = match_classes(key_classes, suspect, only=["frog", "cat"])
    assert k_idx == [2, 0] and s_idx == [2, 1]


def test_match_classes_unknown_raises():
    with pytest.raises(RadioactiveError, match="zebra"):
        match_classes(["cat", "zebra"], ["cat", "dog"])
    with pytest.raises(RadioactiveError, match="horse"):
        match_classes(["cat", "dog"], ["cat", "dog"], only=["horse"])


# ----------------------------------------------------------------------------- full detect() on real images


def _write_suspect(path: Path, weight: np.ndarray, classes: list[str], spec, bias: np.ndarray | None = None,
                   drop: str | None = None) -> Path:
    """A linear-probe suspect written like radioactive.training does (safetensors + JSON sidecar)."""
    state = {"weight": torch.as_tensor(weight, dtype=torch.float32).contiguous(),
             "bias": torch.as_tensor(np.zeros(len(weight)) if bias is None else bias, dtype=torch.float32)}
    if drop:
        del state[drop]
    save_file(state, str(path))
    meta = {"architecture": "linear", "backbone": spec.to_dict(), "classifier": "head",
            "preprocessing": Preprocessing(None).to_dict(), "classes": list(classes), "test_accuracy": None}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


RIDGE = 0.1
"""Ridge of the alignments below: 60 test images for D = 1,280 features is under-determined."""


@pytest.fixture(scope="module")
def suspect(key, tmp_path_factory):
    """A suspect whose head rows carry the key's carriers, in the key's class order.

    The alignment fits 60 test images to 1,280 features, which is refused without a ridge; with the
    small ridge :data:`RIDGE` the map is nearly the projection onto the span of the centred features
    (in-sample R^2 ~ 1, held-out R^2 ~ 0.26), which keeps only ~|P u| ~ 0.2 of a carrier, so the rows
    carry it with strength 1 (cosine ~0.7 before the projection, ~0.15 after).
    """
    w = _marked_weight(key.carriers.numpy().astype(np.float64), strength=1.0, seed=7)
    bias = np.random.default_rng(8).standard_normal(K)
    path = _write_suspect(tmp_path_factory.mktemp("suspect") / "marked.safetensors", w, key.classes, key.network, bias)
    return path, w, bias


@pytest.fixture(scope="module")
def detected(suspect, key, cifar_small):
    return detect(suspect[0], key, cifar_small[1], ridge=RIDGE)


def test_detect_marked_suspect(detected, key):
    res = detected
    assert res.detected and res.log10_pvalue < -10
    assert res.details.alignment_r2 > 0.99 and res.details.ridge == RIDGE
    assert res.details.num_alignment_images == 60 and res.dim == D
    # the in-sample R^2 of an alignment with N < D says little; the held-out one is honest
    assert res.details.alignment_r2_heldout < 0.6 < res.details.alignment_r2
    assert res.details.alignment_caveat  # reports warn of the weak alignment
    assert res.classes == list(key.classes) and res.key_fingerprint == key.fingerprint
    assert all(c > 0 for c in res.cosines)
    assert res.suspect["architecture"] == "linear" and res.suspect["feature_dim"] == D


def test_detect_fresh_key_not_detected(suspect, key, cifar_small):
    fresh = generate_key(list(key.classes), seed=99)
    res = detect(suspect[0], fresh, cifar_small[1], ridge=RIDGE)
    assert not res.detected and res.log10_pvalue > -3
    assert res.details.alignment_r2 > 0.99  # the same suspect, only the key differs


def test_detect_permuted_sidecar_classes(suspect, key, cifar_small, detected, tmp_path):
    _, w, bias = suspect
    perm = np.array([3, 7, 0, 9, 1, 6, 2, 8, 5, 4])  # no fixed point
    path = _write_suspect(tmp_path / "perm.safetensors", w[perm], [key.classes[i] for i in perm], key.network,
                          bias[perm])
    res = detect(path, key, cifar_small[1], ridge=RIDGE)
    assert res.detected and res.classes == list(key.classes)
    np.testing.assert_allclose(res.cosines, detected.cosines, atol=1e-6)
    assert res.log10_pvalue == pytest.approx(detected.log10_pvalue, rel=1e-4)
    # the same rows under the key's class names, i.e. not re-ordered: no longer detected
    wrong = _write_suspect(tmp_path / "wrong.safetensors", w[perm], list(key.classes), key.network, bias[perm])
    assert not detect(wrong, key, cifar_small[1], ridge=RIDGE).detected


def test_detect_underdetermined_alignment_refused(suspect, key, cifar_small):
    with pytest.raises(RadioactiveError, match="60 images for 1280 marking features is under-determined"):
        detect(suspect[0], key, cifar_small[1])


def test_detect_duplicate_classes_refused(suspect, key, cifar_small):
    with pytest.raises(RadioactiveError, match=r"more than once: \['cat'\]"):
        detect(suspect[0], key, cifar_small[1], ridge=RIDGE, only_classes=["cat", "ship", "cat"])
    with pytest.raises(RadioactiveError, match="more than once"):
        whitebox_test(np.eye(2, D), np.eye(2, D), ["cat", "cat"], None)


def test_detect_only_classes(suspect, key, cifar_small):
    res = detect(suspect[0], key, cifar_small[1], ridge=RIDGE, only_classes=["cat", "ship"])
    assert res.classes == ["cat", "ship"] and len(res.cosines) == 2 and res.detected


def test_detect_unknown_class_in_sidecar_raises(suspect, key, tmp_path, cifar_small):
    _, w, _ = suspect
    classes = list(key.classes)
    classes[4] = "zebra"
    path = _write_suspect(tmp_path / "zebra.safetensors", w, classes, key.network)
    with pytest.raises(RadioactiveError, match=key.classes[4]):
        detect(path, key, cifar_small[1], ridge=RIDGE)


@pytest.mark.parametrize("missing", ["weight", "bias"])
def test_detect_weights_missing_tensor_raises(suspect, key, tmp_path, cifar_small, missing):
    _, w, _ = suspect
    path = _write_suspect(tmp_path / "partial.safetensors", w, key.classes, key.network, drop=missing)
    with pytest.raises(RadioactiveError, match=f"missing.*'{missing}'"):
        detect(path, key, cifar_small[1], ridge=RIDGE)


def test_detect_missing_sidecar_or_bad_weights_raise(suspect, key, tmp_path, cifar_small):
    with pytest.raises(RadioactiveError, match="not found"):
        detect(tmp_path / "absent.safetensors", key, cifar_small[1], ridge=RIDGE)
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(suspect[0].read_bytes())
    with pytest.raises(RadioactiveError, match="description not found"):
        detect(lonely, key, cifar_small[1], ridge=RIDGE)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not safetensors" * 64)
    garbage.with_suffix(".json").write_text(suspect[0].with_suffix(".json").read_text())
    with pytest.raises(RadioactiveError, match="safetensors"):
        detect(garbage, key, cifar_small[1], ridge=RIDGE)


def test_detect_wrong_row_count_raises(suspect, key, tmp_path, cifar_small):
    _, w, _ = suspect
    path = _write_suspect(tmp_path / "nine.safetensors", w[:9], key.classes, key.network, np.zeros(9))
    with pytest.raises(RadioactiveError, match="do not match"):
        detect(path, key, cifar_small[1], ridge=RIDGE)


# ----------------------------------------------------------------------------- calibration


def test_calibration_fresh_keys_give_uniform_pvalues():
    rng = np.random.default_rng(2024)
    weight = rng.standard_normal((K, D))  # a fixed model that never saw any of the keys
    classes = [f"c{k}" for k in range(K)]
    n = 200
    lp = np.array([
        whitebox_test(weight, random_carriers(K, D, torch.Generator().manual_seed(10_000 + i)).numpy(), classes,
                      None).log10_pvalue
        for i in range(n)
    ])
    p = 10**lp
    assert ((p > 0) & (p <= 1)).all()
    assert sps.kstest(p, "uniform").pvalue > 0.001
    lo, hi = sps.binom.interval(0.99, n, 0.05)
    assert lo <= int((p < 0.05).sum()) <= hi


# ----------------------------------------------------------------------------- known src bugs


def test_detect_sidecar_without_backbone_raises(suspect, key, tmp_path, cifar_small):
    path = tmp_path / "nobackbone.safetensors"
    path.write_bytes(suspect[0].read_bytes())
    meta = json.loads(suspect[0].with_suffix(".json").read_text())
    del meta["backbone"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(RadioactiveError):
        detect(path, key, cifar_small[1], ridge=RIDGE)


def test_detect_wrong_row_count_message_names_shapes(suspect, key, tmp_path, cifar_small):
    _, w, _ = suspect
    path = _write_suspect(tmp_path / "nine.safetensors", w[:9], key.classes, key.network, np.zeros(9))
    with pytest.raises(RadioactiveError, match="shape"):
        detect(path, key, cifar_small[1], ridge=RIDGE)
