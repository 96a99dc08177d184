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

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import atomic_write_bytes, list_image_folder, load_folder_array
from .errors import RadioactiveError
from .keys import Key
from .networks import FeatureNetwork, load_marking_network, load_suspect
from .stats import cosine_log10_pvalue, fisher_log10_pvalue, format_pvalue

log = logging.getLogger(__name__)

RESULT_SCHEMA = 1


@dataclass
class Alignment:
    """Linear map from the marking network's features to the suspect's.

    Attributes:
        matrix: (D, D_s) float64, F_c @ matrix ~ F_s,c on centred features.
        r2: coefficient of determination of the fit (1 = exact), in (-inf, 1].
        num_images: N, images the fit used.
    """

    matrix: np.ndarray
    r2: float
    num_images: int


def fit_alignment(features: np.ndarray, suspect_features: np.ndarray, ridge: float = 0.0) -> Alignment:
    """Least-squares alignment (Sablayrolles et al. 2020, Section 4.2), on centred features.

    Args:
        features: (N, D) marking-network features of vanilla images.
        suspect_features: (N, D_s) suspect features of the same images.
        ridge: Tikhonov weight, relative to the mean eigenvalue of F_c^T F_c (0: plain least squares).

    Returns:
        the fitted :class:`Alignment`.

    Raises:
        RadioactiveError: N differs between the two, or N < 2.
    """
    f = np.asarray(features, dtype=np.float64)
    fs = np.asarray(suspect_features, dtype=np.float64)
    if f.shape[0] != fs.shape[0] or f.shape[0] < 2:
        raise RadioactiveError(f"alignment needs the same N >= 2 images for both networks, got {f.shape[0]}, {fs.shape[0]}")
    n, d = f.shape
    if n < d:
        log.warning("alignment: %d images for %d marking features; the fit is under-determined, use more images", n, d)
    fc = f - f.mean(0)
    fsc = fs - fs.mean(0)
    if ridge > 0:
        gram = fc.T @ fc
        lam = ridge * np.trace(gram) / d
        x = np.linalg.solve(gram + lam * np.eye(d), fc.T @ fsc)
    else:
        x = np.linalg.lstsq(fc, fsc, rcond=None)[0]
    resid = fc @ x - fsc
    tot = float((fsc**2).sum())
    r2 = 1.0 - float((resid**2).sum()) / tot if tot > 0 else 0.0
    return Alignment(x, r2, n)


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


@dataclass
class DetectionResult:
    """Outcome of a detection test (white-box or black-box), one format for both.

    Attributes:
        method: ``white-box``, ``white-box gradient``, ``black-box``, ``black-box decoy-carrier`` or ``membership``.
        log10_pvalue: log10 of the combined p-value (<= 0; finite however small).
        detected: log10_pvalue < log10(alpha).
        alpha: significance level of the verdict.
        classes: class names tested, in order.
        cosines: per-class cosine c_k (white-box tests), in [-1, 1].
        class_log10_pvalues: per-class log10 p-values.
        dim: D, the dimension of the null (marking feature space).
        alignment_r2: R^2 of the alignment fit. num_alignment_images: N.
        key_fingerprint: identifies the key used.
        suspect: description of the suspect. seconds: wall time.
    """

    method: str
    log10_pvalue: float
    detected: bool
    alpha: float
    classes: list[str]
    cosines: list[float] = field(default_factory=list)
    class_log10_pvalues: list[float] = field(default_factory=list)
    dim: int = 0
    alignment_r2: float | None = None
    num_alignment_images: int = 0
    key_fingerprint: str = ""
    suspect: dict = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def pvalue_text(self) -> str:
        return format_pvalue(self.log10_pvalue)

    def verdict(self) -> str:
        if self.method == "membership":
            if self.detected:
                return (f"DETECTED: the suspect fits the released images better than the withheld ones: it was "
                        f"trained on the release (p = {self.pvalue_text} < alpha = {self.alpha:g}, membership).")
            return (f"not detected: no evidence that the suspect was trained on the release "
                    f"(p = {self.pvalue_text} >= alpha = {self.alpha:g}, membership).")
        if self.detected:
            return (f"DETECTED: the suspect was trained on data marked with this key "
                    f"(p = {self.pvalue_text} < alpha = {self.alpha:g}, {self.method}).")
        return (f"not detected: no evidence that the suspect was trained on data marked with this key "
                f"(p = {self.pvalue_text} >= alpha = {self.alpha:g}, {self.method}).")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update({"schema": RESULT_SCHEMA, "package_version": __version__, "pvalue": self.pvalue_text,
                  "verdict": self.verdict()})
        return d

    @classmethod
    def load(cls, path: str | Path) -> DetectionResult:
        """Read a result JSON written by :meth:`save`.

        Raises:
            RadioactiveError: missing or malformed file.
        """
        from dataclasses import fields

        try:
            d = json.loads(Path(path).read_text())
            return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        except (OSError, ValueError, TypeError) as e:
            raise RadioactiveError(f"{path} is not a detection result ({e})") from e

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())
        return path


def whitebox_test(weight: np.ndarray, carriers: np.ndarray, classes: list[str], alignment: Alignment | None,
                  alpha: float = 1e-3, key_fingerprint: str = "") -> DetectionResult:
    """The white-box test from a classifier already expressed against the key's classes.

    Args:
        weight: (K, D_s) classifier rows in the key's class order.
        carriers: (K, D) unit carriers.
        classes: the K class names.
        alignment: fitted map, or None when the suspect's features are the marking network's (D_s = D).
        alpha: significance level of the verdict, in (0, 1).

    Returns:
        a :class:`DetectionResult` with per-class cosines and log10 p-values and their Fisher combination.
    """
    if not 0 < alpha < 1:
        raise RadioactiveError(f"alpha must be in (0, 1), got {alpha}")
    carriers = np.asarray(carriers, dtype=np.float64)
    cos = class_cosines(weight, carriers, None if alignment is None else alignment.matrix)
    dim = carriers.shape[1]
    lp = np.atleast_1d(cosine_log10_pvalue(cos, dim))
    combined = fisher_log10_pvalue(lp)
    return DetectionResult(
        method="white-box", log10_pvalue=float(combined), detected=bool(combined < np.log10(alpha)), alpha=alpha,
        classes=list(classes), cosines=[float(c) for c in cos], class_log10_pvalues=[float(v) for v in lp], dim=dim,
        alignment_r2=None if alignment is None else alignment.r2,
        num_alignment_images=0 if alignment is None else alignment.num_images, key_fingerprint=key_fingerprint,
    )


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
        x = torch.from_numpy(images[s:s + batch_size]).permute(0, 3, 1, 2).float() / 255
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
              image_size: int | None = None, layer: str | None = None) -> tuple[np.ndarray, list[int], Alignment, dict, int]:
    """The suspect's classifier rows expressed in the marking network's feature space.

    Returns:
        W~ (K', D) float64 in the key's class order (restricted to ``only_classes``),
        the key's class indices tested, the alignment, the suspect's sidecar, its feature dimension D_s.
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
    x, _ = load_folder_array(folder, image_size)
    if max_images is not None:
        x = x[:max_images]
    alignment = fit_alignment(extract_features(marking, x), extract_features(net, x), ridge)
    weight = net.classifier.weight.detach().double().numpy()[s_idx]
    return weight @ alignment.matrix.T, k_idx, alignment, meta, net.feature_dim


def decoy_log10_pvalues(w_tilde: np.ndarray, num_keys: int, seed: int = 0) -> np.ndarray:
    """Combined log10 p-values of ``num_keys`` fresh random keys against the same classifier.

    Decoy carriers are drawn uniformly on the sphere (normalised Gaussians,
    numpy Generator seeded with ``seed``); they were never used to mark
    anything, so their statistics sample the null for this very suspect.

    Args:
        w_tilde: (K, D) pulled-back classifier rows.

    Returns:
        (num_keys,) float64 combined log10 p-values.
    """
    rng = np.random.default_rng([seed, 0xDEC0])  # a stream of its own: never the same as another seeded draw
    k, d = w_tilde.shape
    out = np.empty(num_keys)
    for i in range(num_keys):
        u = rng.standard_normal((k, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        cos = class_cosines(w_tilde, u, None)
        out[i] = fisher_log10_pvalue(np.atleast_1d(cosine_log10_pvalue(cos, d)))
    return out


def empirical_log10_pvalue(statistic: float, decoys: np.ndarray) -> float:
    """log10 of (1 + #{decoys <= statistic}) / (1 + n): the rank of the real key among decoys
    (a valid p-value when the decoys and the real key are exchangeable under the null)."""
    return float(np.log10((1 + np.sum(decoys <= statistic)) / (1 + len(decoys))))


def detect(suspect: str | Path, key: Key, images: str | Path, alpha: float = 1e-3, ridge: float = 0.0,
           only_classes: list[str] | None = None, max_images: int | None = None,
           image_size: int | None = None, decoys: int = 0, decoy_seed: int = 0,
           layer: str | None = None) -> DetectionResult:
    """White-box detection of a suspect saved by ``radioactive train``.

    Args:
        suspect: suspect weights (``.safetensors`` with its ``.json`` sidecar).
        key: the key whose marked data is suspected.
        images: ImageFolder of vanilla held-out images (never marked ones),
            used to fit the alignment (the test split).
        alpha: significance level of the verdict.
        ridge: alignment ridge weight (0: least squares).
        only_classes: test only these classes (e.g. the marked ones).
        max_images: use at most this many images (the first ones, sorted).
        image_size: resize images to this side (needed when sizes differ).
        decoys: number of fresh random keys scored against the same suspect;
            their distribution and the real key's rank (an empirical p-value)
            go into ``extra``.
        layer: name of the suspect's last linear layer (default: the sidecar's, else the last nn.Linear).

    Returns:
        the :class:`DetectionResult`.

    Raises:
        RadioactiveError: unreadable inputs, class or dimension mismatch.
    """
    t0 = time.time()
    w_tilde, k_idx, alignment, meta, d_s = pull_back(suspect, key, images, ridge, only_classes, max_images,
                                                     image_size, layer)
    result = whitebox_test(w_tilde, key.carriers.numpy()[k_idx], [key.classes[i] for i in k_idx], None, alpha,
                           key.fingerprint)
    result.alignment_r2, result.num_alignment_images = alignment.r2, alignment.num_images
    if decoys:
        dec = decoy_log10_pvalues(w_tilde, decoys, decoy_seed)
        result.extra["decoys"] = {"num_keys": decoys, "seed": decoy_seed,
                                  "empirical_log10_pvalue": empirical_log10_pvalue(result.log10_pvalue, dec),
                                  "log10_pvalues": [round(float(v), 6) for v in dec]}
    result.suspect = {"path": str(suspect), "architecture": meta.get("architecture"),
                      "test_accuracy": meta.get("test_accuracy"), "feature_dim": d_s}
    result.seconds = time.time() - t0
    return result
