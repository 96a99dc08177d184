"""White-box detection: was the suspect trained on data marked with this key?

Sablayrolles et al. 2020, Section 4:

1. Alignment (Section 4.2): on vanilla held-out images, features F (N, D)
   of the marking network and F_s (N, D_s) of the suspect; least squares
   X = argmin ||F_c X - F_s,c||^2 on centred features (D, D_s).
2. The suspect's last linear layer W (K, D_s) pulled back into the marking
   network's space: W~ = W X^T (K, D).
3. Per-class cosine c_k = cos(w~_k, u_k) and its exact p-value under the null
   "u_k is uniform on the sphere, independent of w~_k"
   (:func:`radioactive.stats.cosine_log10_pvalue`).
4. Fisher's combination over the classes (:func:`radioactive.stats.fisher_log10_pvalue`).

Everything is kept as log10 p, so nothing underflows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import list_image_folder, load_folder_array, to_batch
from ..errors import RadioactiveError
from ..keys import Key
from ..networks import FeatureNetwork, load_marking_network
from ..stats import cosine_log10_pvalue, fisher_log10_pvalue
from ..suspects import load_suspect
from .access import (OwnerFiles, SuspectAccess, check_alignment_images, check_unique, derived_rng, stream_name,
                     unit_vectors)
from .registry import MethodEntry, register_method, setting
from .result import DecoyKeys, DetectionResult, WhiteBoxDetails

log = logging.getLogger(__name__)

DECOY_TAG = "white-box decoy keys"
WEAK_ALIGNMENT_R2 = 0.5
"""Below this held-out R^2 the reports add a caveat: the p-value stays exact (the alignment never sees the key),
but a weak alignment loses power, so "not detected" says little (docs/concepts.md)."""


@dataclass
class Alignment:
    """Linear map from the marking network's features to the suspect's.

    Attributes:
        matrix: (D, D_s) float64, F_c @ matrix ~ F_s,c on centred features.
        r2: in-sample coefficient of determination of the fit (1 = exact), in (-inf, 1].
        num_images: N, images the fit used.
        r2_heldout: R^2 on the last fifth of the images of a fit refitted on the first four fifths (None when
            N < 10); unlike ``r2`` it does not reach 1 by over-fitting.
        ridge: the ridge weight used.
    """

    matrix: np.ndarray
    r2: float
    num_images: int
    r2_heldout: float | None = None
    ridge: float = 0.0


def _solve(fc: np.ndarray, fsc: np.ndarray, ridge: float) -> np.ndarray:
    if ridge > 0:
        gram = fc.T @ fc
        lam = ridge * np.trace(gram) / fc.shape[1]
        return np.linalg.solve(gram + lam * np.eye(fc.shape[1]), fc.T @ fsc)
    return np.linalg.lstsq(fc, fsc, rcond=None)[0]


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    tot = float((target**2).sum())
    return 1.0 - float(((pred - target) ** 2).sum()) / tot if tot > 0 else 0.0


def fit_alignment(features: np.ndarray, suspect_features: np.ndarray, ridge: float = 0.0) -> Alignment:
    """Least-squares alignment (Sablayrolles et al. 2020, Section 4.2), on centred features.

    With N <= D images the least-squares fit interpolates (in-sample R^2 = 1 whatever the models) and says
    nothing: it is refused unless a ridge is given. The held-out R^2 (fit on 4/5 of the images, scored on the
    rest, centred with the fit part's means) is the honest measure of fit and is what reports show.

    Args:
        features: (N, D) marking-network features of vanilla images.
        suspect_features: (N, D_s) suspect features of the same images.
        ridge: Tikhonov weight, relative to the mean eigenvalue of F_c^T F_c (0: plain least squares).

    Returns:
        the fitted :class:`Alignment`.

    Raises:
        RadioactiveError: N differs between the two, N < 2, or N <= D without a ridge.
    """
    f = np.asarray(features, dtype=np.float64)
    fs = np.asarray(suspect_features, dtype=np.float64)
    if f.shape[0] != fs.shape[0] or f.shape[0] < 2:
        raise RadioactiveError(f"alignment needs the same N >= 2 images for both networks, got {f.shape[0]}, {fs.shape[0]}")
    n, d = f.shape
    if n <= d and ridge <= 0:
        raise RadioactiveError(f"alignment: {n} images for {d} marking features is under-determined (the fit would "
                               f"interpolate and read R^2 1.000); give more than {d} vanilla images, or a ridge "
                               "(--ridge 0.1)")
    x = _solve(f - f.mean(0), fs - fs.mean(0), ridge)
    r2 = _r2((f - f.mean(0)) @ x, fs - fs.mean(0))
    heldout = None
    if n >= 10:
        cut = n - n // 5
        fa, fsa = f[:cut], fs[:cut]
        if cut > d or ridge > 0:
            xa = _solve(fa - fa.mean(0), fsa - fsa.mean(0), ridge)
            heldout = _r2((f[cut:] - fa.mean(0)) @ xa, fs[cut:] - fsa.mean(0))
    return Alignment(x, r2, n, heldout, ridge)


def class_cosines(weight: np.ndarray, carriers: np.ndarray, alignment: np.ndarray | None) -> np.ndarray:
    """Cosines between pulled-back classifier rows and carriers.

    Args:
        weight: (K, D_s) suspect classifier rows, already in the key's class order.
        carriers: (K, D) unit carriers.
        alignment: (D, D_s) map, or None for the identity (D_s = D).

    Returns:
        (K,) float64 cosines in [-1, 1].
    """
    w = np.asarray(weight, dtype=np.float64)
    w_tilde = w if alignment is None else w @ np.asarray(alignment, dtype=np.float64).T
    u = np.asarray(carriers, dtype=np.float64)
    norms = np.linalg.norm(w_tilde, axis=1) * np.linalg.norm(u, axis=1)
    cos = np.where(norms > 0, (w_tilde * u).sum(1) / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def whitebox_test(weight: np.ndarray, carriers: np.ndarray, classes: list[str], alignment: Alignment | None,
                  alpha: float = 1e-3, key_fingerprint: str = "") -> DetectionResult:
    """The white-box test from a classifier already expressed against the key's classes (exact).

    Args:
        weight: (K, D_s) classifier rows in the key's class order.
        carriers: (K, D) unit carriers.
        classes: the K class names (each once).
        alignment: fitted map, or None when the suspect's features are the marking network's (D_s = D).
        alpha: significance level of the verdict, in (0, 1).

    Returns:
        a :class:`DetectionResult` (method ``white-box``, validity ``exact``) with per-class cosines and log10
        p-values and their Fisher combination.

    Raises:
        RadioactiveError: alpha outside (0, 1); a class named twice.
    """
    check_unique(list(classes))
    carriers = np.asarray(carriers, dtype=np.float64)
    cos = class_cosines(weight, carriers, None if alignment is None else alignment.matrix)
    dim = carriers.shape[1]
    lp = np.atleast_1d(cosine_log10_pvalue(cos, dim))
    details = WhiteBoxDetails()
    if alignment is not None:
        details = WhiteBoxDetails(alignment.r2, alignment.r2_heldout, alignment.num_images, alignment.ridge,
                                  alignment_caveat(alignment))
    return DetectionResult(
        method="white-box", validity="exact", log10_pvalue=float(fisher_log10_pvalue(lp)), alpha=alpha,
        classes=list(classes), class_log10_pvalues=[float(v) for v in lp], cosines=[float(c) for c in cos], dim=dim,
        key_fingerprint=key_fingerprint, details=details,
    )


def alignment_caveat(alignment: Alignment) -> str:
    """The sentence reports show beside a white-box result whose alignment is weak ('' when it is not)."""
    r2 = alignment.r2_heldout if alignment.r2_heldout is not None else alignment.r2
    if r2 >= WEAK_ALIGNMENT_R2:
        return ""
    return (f"the alignment explains only {r2:.2f} of the suspect's feature variance on held-out images: the "
            "p-value is exact, but the test has little power, so 'not detected' is weak evidence (for a model "
            "trained from scratch, use the gradient test)")


@torch.no_grad()
def extract_features(net: FeatureNetwork, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Features of uint8 images.

    Args:
        net: frozen network.
        images: (N, H, W, 3) uint8 RGB.

    Returns:
        (N, D) float64 features.
    """
    net.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = to_batch(images[s:s + batch_size])
        out.append(net.features(x).double().numpy())
    return np.concatenate(out)


def match_classes(key_classes, suspect_classes, only: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Indices (into the key, into the suspect) of the classes to test, matched by name.

    Raises:
        RadioactiveError: a key class (or a class of ``only``) is unknown to the suspect.
    """
    wanted = list(only) if only else list(key_classes)
    s_index = {c: i for i, c in enumerate(suspect_classes)}
    k_index = {c: i for i, c in enumerate(key_classes)}
    missing = [c for c in wanted if c not in s_index or c not in k_index]
    if missing:
        raise RadioactiveError(f"classes not found in both the key and the suspect: {missing[:5]}")
    return [k_index[c] for c in wanted], [s_index[c] for c in wanted]


def pull_back(suspect: str | Path, key: Key, images: str | Path, ridge: float = 0.0,
              only_classes: list[str] | None = None, max_images: int | None = None,
              image_size: int | None = None, layer: str | None = None,
              record: str | Path | None = None) -> tuple[np.ndarray, list[int], Alignment, dict, int]:
    """The suspect's classifier rows expressed in the marking network's feature space.

    Args:
        record: the private record, when the owner has it: alignment images that are marked images of it are
            refused (:func:`radioactive.detection.access.check_alignment_images`).

    Returns:
        W~ (K', D) float64 in the key's class order (restricted to ``only_classes``),
        the key's class indices tested, the alignment, the suspect's sidecar, its feature dimension D_s.

    Raises:
        RadioactiveError: as :func:`fit_alignment` and :func:`match_classes`; marked alignment images.
    """
    marking, _ = load_marking_network(key.network)
    if marking.feature_dim != key.dim:
        raise RadioactiveError(
            f"the key's carriers have dimension {key.dim} but the marking network {key.network.name} "
            f"has {marking.feature_dim} features"
        )
    net, meta = load_suspect(suspect, layer=layer)
    k_idx, s_idx = match_classes(key.classes, meta["classes"], only_classes)
    folder = list_image_folder(images)
    n = len(folder) if max_images is None else min(max_images, len(folder))
    check_alignment_images([folder.path(i) for i in range(n)], record)
    x, _ = load_folder_array(folder, image_size)
    x = x[:n]
    alignment = fit_alignment(extract_features(marking, x), extract_features(net, x), ridge)
    weight = net.classifier.weight.detach().double().numpy()[s_idx]
    return weight @ alignment.matrix.T, k_idx, alignment, meta, net.feature_dim


def decoy_log10_pvalues(w_tilde: np.ndarray, num_keys: int, rng: np.random.Generator) -> np.ndarray:
    """Combined log10 p-values of ``num_keys`` fresh random keys against the same classifier.

    Decoy carriers are drawn uniformly on the sphere from ``rng`` (:func:`radioactive.detection.access.derived_rng`
    gives a stream no key can share); they were never used to mark anything, so their statistics sample the null
    for this very suspect.

    Args:
        w_tilde: (K, D) pulled-back classifier rows.
        rng: the decoys' random stream.

    Returns:
        (num_keys,) float64 combined log10 p-values.
    """
    k, d = w_tilde.shape
    out = np.empty(num_keys)
    for i in range(num_keys):
        cos = class_cosines(w_tilde, unit_vectors(rng, k, d), None)
        out[i] = fisher_log10_pvalue(np.atleast_1d(cosine_log10_pvalue(cos, d)))
    return out


def empirical_log10_pvalue(statistic: float, decoys: np.ndarray) -> float:
    """log10 of (1 + #{decoys <= statistic}) / (1 + n): the rank of the real key among decoys
    (a valid p-value when the decoys and the real key are exchangeable under the null)."""
    return float(np.log10((1 + np.sum(decoys <= statistic)) / (1 + len(decoys))))


def detect(suspect: str | Path, key: Key, images: str | Path, alpha: float = 1e-3, ridge: float = 0.0,
           only_classes: list[str] | None = None, max_images: int | None = None,
           image_size: int | None = None, decoys: int = 0, decoy_seed: int = 0,
           layer: str | None = None, record: str | Path | None = None) -> DetectionResult:
    """White-box detection of a suspect whose weights and architecture are known (exact).

    Args:
        suspect: suspect weights (``.safetensors`` with its ``.json`` sidecar).
        key: the key whose marked data is suspected.
        images: ImageFolder of vanilla held-out images (never marked ones), used to fit the alignment (the test
            split); more images than the marking network has features.
        alpha: significance level of the verdict.
        ridge: alignment ridge weight (0: least squares).
        only_classes: test only these classes (each once), chosen before looking at any result.
        max_images: use at most this many images (the first ones, sorted).
        image_size: resize images to this side (needed when sizes differ).
        decoys: number of fresh random keys scored against the same suspect, from a stream derived from the key's
            fingerprint and ``decoy_seed``; their distribution and the real key's rank go into the details.
        layer: name of the suspect's last linear layer (default: the sidecar's, else the last nn.Linear).
        record: the private record, to refuse alignment images that are marked ones (recommended).

    Returns:
        the :class:`DetectionResult`.

    Raises:
        RadioactiveError: unreadable inputs, class or dimension mismatch, duplicate classes, marked or too few
            alignment images.
    """
    t0 = time.time()
    check_unique(only_classes)
    w_tilde, k_idx, alignment, meta, d_s = pull_back(suspect, key, images, ridge, only_classes, max_images,
                                                     image_size, layer, record)
    result = whitebox_test(w_tilde, key.carriers.numpy()[k_idx], [key.classes[i] for i in k_idx], alignment, alpha,
                           key.fingerprint)
    if decoys:
        dec = decoy_log10_pvalues(w_tilde, decoys, derived_rng(key.fingerprint, DECOY_TAG, decoy_seed))
        result.details.decoys = DecoyKeys(decoys, stream_name(key.fingerprint, DECOY_TAG, decoy_seed),
                                          empirical_log10_pvalue(result.log10_pvalue, dec),
                                          [round(float(v), 6) for v in dec])
    result.settings = {"ridge": ridge, "classes": list(only_classes) if only_classes else None,
                       "max_images": max_images, "decoy_keys": decoys, "decoy_seed": decoy_seed, "layer": layer}
    result.suspect = {"path": str(suspect), "architecture": meta.get("architecture"),
                      "test_accuracy": meta.get("test_accuracy"), "feature_dim": d_s}
    result.seconds = time.time() - t0
    return result


@dataclass(frozen=True)
class WhiteBoxConfig:
    """Settings of the white-box test (fix them before testing any suspect)."""

    ridge: float = setting(0.0, "white-box: alignment ridge weight (0: least squares; needed when images <= D)",
                           check=lambda v: v >= 0, expected=">= 0")
    max_images: int | None = setting(None, "white-box: use at most this many alignment images",
                                     parse=int, check=lambda v: v >= 2, expected=">= 2")
    decoy_keys: int = setting(0, "white-box: also score this many fresh random keys and report the real key's rank",
                              check=lambda v: v >= 0, expected=">= 0")
    decoy_seed: int = setting(0, "white-box: seed of the decoy keys' stream (derived from the key's fingerprint)",
                              check=lambda v: v >= 0, expected=">= 0")
    layer: str | None = setting(None, "white-box: name of the suspect's last linear layer (default: the sidecar's "
                                      "'classifier', else the last nn.Linear)", parse=str)
    classes: tuple[str, ...] | None = None


def _run(owner: OwnerFiles, suspect: SuspectAccess, config: WhiteBoxConfig, alpha: float) -> DetectionResult:
    owner.need("key", "images", method="the white-box test")
    if suspect.path is None:
        raise RadioactiveError("the white-box test needs the suspect's weights (--suspect)")
    return detect(suspect.path, owner.key, owner.images, alpha, config.ridge, config.classes, config.max_images,
                  decoys=config.decoy_keys, decoy_seed=config.decoy_seed, layer=config.layer, record=owner.record)


def _null(owner: OwnerFiles, suspect: SuspectAccess, config: WhiteBoxConfig, num: int, seed: int) -> np.ndarray:
    """Combined log10 p-values of ``num`` fresh keys (never the owner's) against this suspect's pulled-back rows."""
    owner.need("key", "images", method="the white-box test")
    w_tilde = pull_back(suspect.path, owner.key, owner.images, config.ridge, config.classes, config.max_images,
                        layer=config.layer, record=owner.record)[0]
    return decoy_log10_pvalues(w_tilde, num, derived_rng(owner.key.fingerprint, "calibration keys", seed))


register_method(MethodEntry(
    name="white-box", run=_run, access=("weights",), reads=("key", "images", "record"), optional=("record",),
    validity="exact", config=WhiteBoxConfig, null=_null,
    summary="cosine of each class's classifier row, aligned to the marking network, with its carrier "
            "(Sablayrolles et al. 2020, Section 4); for linear probes and fine-tuned marking networks",
))
