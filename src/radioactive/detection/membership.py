"""Membership test: the suspect fits the released images better than images the owner withheld."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sstats

from ..data import list_image_folder
from ..data.record import read_withheld
from ..errors import RadioactiveError
from ..suspects import load_runnable
from .access import OwnerFiles, SuspectAccess
from .outputs import model_outputs, read_outputs_file, true_class_loss
from .registry import MethodEntry, register_method, setting
from .result import DetectionResult, MembershipDetails


def membership_test(loss_released: np.ndarray, loss_withheld: np.ndarray, groups_released: np.ndarray,
                    groups_withheld: np.ndarray) -> dict:
    """Test that the suspect fits the released images better than images the owner withheld.

    Before release, the owner withholds a uniformly random subset of each class (group) and never
    publishes it. Under H0 (the suspect does not depend on which images were withheld: it never saw
    the release, or was trained on other data, possibly including the same photographs) the losses
    of released and withheld images of a class are exchangeable. A model trained on the release fits
    its training images better than unseen ones (the generalisation gap), so withheld losses rank high.
    Losses must be computed on the *vanilla* versions of both sets, so that marking cannot break the
    exchangeability. This test does not use the mark (it is a dataset-membership test in the spirit of
    Maini et al., "Dataset Inference", ICLR 2021); it complements the radioactive tests.

    Statistic: s_i = (within-class midrank of the loss - 1) / (N_c - 1) in [0, 1] for each image
    (N_c images in its class), T = sum over withheld images of (s_i - 1/2). Under H0 each class's
    withheld set is a uniform random subset of its class, so E[T] = 0. Hoeffding (1963, Theorem 4)
    shows that the moment generating function of a sum drawn without replacement from a finite
    population is at most that of the same number of draws with replacement; the strata are
    independent. So for every lambda >= 0, P(T >= t) <= exp(-lambda t) prod_c M_c(lambda)^(n_c), where
    M_c is the exact MGF of one draw of s - 1/2 from class c's N_c scores (the Chernoff bound with the
    population's own distribution, minimised over lambda). That bound is returned as the p-value: an
    upper bound on the exact randomisation p-value, valid at any magnitude, never anti-conservative;
    for large classes it approaches the normal tail with the scores' variance 1/12. The Mann-Whitney
    normal approximation on the pooled losses is reported beside it for information.

    Args:
        loss_released, loss_withheld: (N_r,), (N_w,) true-class losses (non-finite values rank as the largest loss).
        groups_released, groups_withheld: class index of each image.

    Returns:
        dict with ``log10_pvalue`` (Hoeffding bound, <= 0), ``statistic`` (T / n: mean centred score,
        in [-1/2, 1/2]), ``num_released``, ``num_withheld``, ``median_loss_released``,
        ``median_loss_withheld``, ``mannwhitney_log10_pvalue``.

    Raises:
        RadioactiveError: no withheld or no released image, or shapes that do not match.
    """
    lr = np.asarray(loss_released, dtype=np.float64)
    lw = np.asarray(loss_withheld, dtype=np.float64)
    gr, gw = np.asarray(groups_released), np.asarray(groups_withheld)
    if lr.shape != gr.shape or lw.shape != gw.shape or lr.ndim != 1:
        raise RadioactiveError("losses and class indices must be 1-d arrays of the same length")
    if len(lr) == 0 or len(lw) == 0:
        raise RadioactiveError("the membership test needs released and withheld images")
    lr, lw = np.where(np.isfinite(lr), lr, np.inf), np.where(np.isfinite(lw), lw, np.inf)
    t, n, strata = 0.0, 0, []
    for g in np.unique(gw):
        a, b = lr[gr == g], lw[gw == g]
        if len(a) == 0:
            continue  # a class with nothing released says nothing
        ranks = sstats.rankdata(np.concatenate([a, b]))  # midranks; +inf ties rank together
        s = (ranks - 1) / (len(a) + len(b) - 1) - 0.5
        t += float(s[len(a):].sum())
        n += len(b)
        strata.append((s, len(b)))
    if n == 0:
        raise RadioactiveError("no class has both released and withheld images")
    log10_p = _chernoff_log10_bound(t, strata) if t > 0 else 0.0
    mw = sstats.mannwhitneyu(lw[np.isfinite(lw)], lr[np.isfinite(lr)], alternative="greater", method="asymptotic")
    mw_p = float(mw.pvalue)
    return {"log10_pvalue": log10_p, "statistic": t / n, "num_released": int(len(lr)), "num_withheld": int(n),
            "median_loss_released": float(np.median(lr)), "median_loss_withheld": float(np.median(lw)),
            "mannwhitney_log10_pvalue": _log10_or_floor(mw_p, mw, len(lw), len(lr))}


def _log10_or_floor(p: float, res, n1: int, n2: int) -> float:
    """log10 of a Mann-Whitney p-value, from the normal tail in log space when it underflows (never -inf)."""
    if p > 0:
        return math.log10(p)
    z = (float(res.statistic) - n1 * n2 / 2 - 0.5) / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return float(sstats.norm.logsf(z) / math.log(10))


def _chernoff_log10_bound(t: float, strata: list[tuple[np.ndarray, int]]) -> float:
    """log10 of min over lambda >= 0 of exp(-lambda t) prod_c (mean_i exp(lambda s_ci))^(n_c): the
    Chernoff bound on P(T >= t) for sums drawn without replacement (see :func:`membership_test`)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    def log_bound(lam: float) -> float:
        return -lam * t + sum(k * (logsumexp(lam * s) - math.log(len(s))) for s, k in strata)

    hi = 1.0
    while log_bound(2 * hi) < log_bound(hi) and hi < 1e6:  # bracket the convex minimum
        hi *= 2
    res = minimize_scalar(log_bound, bounds=(0.0, 2 * hi), method="bounded", options={"xatol": 1e-10})
    return min(0.0, float(res.fun) / math.log(10))


def membership_losses(record: str | Path, suspect: str | Path | None = None, outputs: str | Path | None = None,
                      classes: list[str] | None = None, source_root=None, max_released_per_withheld: int = 20,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, dict]:
    """The suspect's true-class losses on the withheld images and a sample of released ones (vanilla versions).

    Returns:
        losses (N,), the suspect's class index per image (N,), is_withheld (N,) bool, the withheld (path, class)
        pairs, and the record's header.

    Raises:
        RadioactiveError: as :func:`membership_detect`.
    """
    if (suspect is None) == (outputs is None):
        raise RadioactiveError("give either a runnable suspect or a file of its outputs")
    header, withheld = read_withheld(record, source_root)
    src = Path(source_root or header["source"])
    folder = list_image_folder(src)
    held = {p for p, _ in withheld}
    rng = np.random.default_rng([seed, 0x3E3])
    released: list[tuple[Path, str]] = []
    for k, name in enumerate(folder.classes):
        pool = [folder.path(i).resolve() for i in range(len(folder)) if folder.labels[i] == k]
        pool = [p for p in pool if p not in held]
        n_w = sum(1 for _, c in withheld if c == name)
        take = min(len(pool), max_released_per_withheld * n_w)
        released += [(pool[i], name) for i in sorted(rng.choice(len(pool), take, replace=False))]
    items, queries = released + withheld, 0
    if suspect is not None:
        net, meta = load_runnable(suspect)
        s_classes = classes or list(meta["classes"])
        size = meta.get("preprocessing", {}).get("image_size")
        out = model_outputs(net, [p for p, _ in items], size)
        kind = "logits"
    else:
        rows, kind = read_outputs_file(outputs)
        items = [it for it in items if str(it[0]) in rows]
        if not any(str(p) in rows for p, _ in withheld):
            raise RadioactiveError(f"{outputs} has no outputs for the withheld images (e.g. {withheld[0][0]})")
        out = np.stack([rows[str(p)] for p, _ in items])
        s_classes = classes or header.get("classes")
    index = {c: i for i, c in enumerate(s_classes)}
    unknown = sorted({c for _, c in items if c not in index})
    if unknown:
        raise RadioactiveError(f"classes of the record unknown to the suspect: {unknown[:5]}")
    labels = np.array([index[c] for _, c in items])
    loss = true_class_loss(out, labels, kind)
    is_w = np.array([p in held for p, _ in items])
    return loss, labels, is_w, withheld, header


def membership_detect(record: str | Path, suspect: str | Path | None = None, outputs: str | Path | None = None,
                      alpha: float = 1e-3, classes: list[str] | None = None, source_root=None,
                      max_released_per_withheld: int = 20, seed: int = 0) -> DetectionResult:
    """Black-box membership test of a suspect: released against withheld images (see :func:`membership_test`).

    The vanilla versions of the withheld images (listed in the record) and of a random sample of the
    released images (every image of the record's source folder that was not withheld, at most
    ``max_released_per_withheld`` per withheld image of the same class; the sample is drawn with ``seed``,
    independently of the suspect) are scored by the suspect's true-class loss.

    Args:
        record: private record of ``mark --withhold-fraction``.
        suspect: a runnable suspect (weights + sidecar, or TorchScript + sidecar), or
        outputs: a file of the suspect's outputs on those source images (see :func:`read_outputs_file`).
        alpha: significance level of the verdict.
        classes: the suspect's class names in output order (default: sidecar, else the record's).

    Returns:
        a :class:`DetectionResult` with method ``membership``, validity ``conservative`` (a Chernoff bound on an
        exact randomisation p-value), with :class:`MembershipDetails`.

    Raises:
        RadioactiveError: no withheld image in the record, neither or both of suspect/outputs, missing images.
    """
    t0 = time.time()
    loss, labels, is_w, withheld, header = membership_losses(record, suspect, outputs, classes, source_root,
                                                             max_released_per_withheld, seed)
    res = membership_test(loss[~is_w], loss[is_w], labels[~is_w], labels[is_w])
    return DetectionResult(
        method="membership", validity="conservative", log10_pvalue=res["log10_pvalue"], alpha=alpha,
        classes=sorted({c for _, c in withheld}), key_fingerprint=header.get("key_fingerprint", ""),
        suspect={"path": str(suspect or outputs)},
        settings={"max_released_per_withheld": max_released_per_withheld, "seed": seed},
        details=MembershipDetails(res["statistic"], res["num_released"], res["num_withheld"],
                                  res["median_loss_released"], res["median_loss_withheld"], len(loss)),
        seconds=time.time() - t0,
    )


@dataclass(frozen=True)
class MembershipConfig:
    """Settings of the membership test (fixed before testing)."""

    max_released_per_withheld: int = setting(20, "membership: released images scored per withheld image",
                                             check=lambda v: v >= 1, expected=">= 1")
    sample_seed: int = setting(0, "membership: seed of the sample of released images scored",
                               check=lambda v: v >= 0, expected=">= 0")


def _args(owner: OwnerFiles, suspect: SuspectAccess) -> dict:
    owner.need("record", method="the membership test")
    return {"record": owner.record, "suspect": suspect.path if suspect.outputs is None else None,
            "outputs": suspect.outputs, "classes": list(suspect.classes) if suspect.classes else None,
            "source_root": owner.source_root}


def _run(owner: OwnerFiles, suspect: SuspectAccess, config: MembershipConfig, alpha: float) -> DetectionResult:
    return membership_detect(**_args(owner, suspect), alpha=alpha,
                             max_released_per_withheld=config.max_released_per_withheld, seed=config.sample_seed)


def _null(owner: OwnerFiles, suspect: SuspectAccess, config: MembershipConfig, num: int, seed: int) -> np.ndarray:
    """Fresh random withheld sets: within each class, as many images as the record withheld, drawn uniformly among
    the scored images of that class (what the null says is random), scored with the same losses."""
    loss, labels, is_w, _, _ = membership_losses(**_args(owner, suspect),
                                                 max_released_per_withheld=config.max_released_per_withheld,
                                                 seed=config.sample_seed)
    rng = np.random.default_rng([seed, 0x3E4])
    out = np.empty(num)
    for i in range(num):
        w = np.zeros(len(loss), dtype=bool)
        for g in np.unique(labels[is_w]):
            idx = np.flatnonzero(labels == g)
            w[rng.choice(idx, int((is_w & (labels == g)).sum()), replace=False)] = True
        out[i] = membership_test(loss[~w], loss[w], labels[~w], labels[w])["log10_pvalue"]
    return out


register_method(MethodEntry(
    name="membership", run=_run, access=("outputs",), reads=("record", "withheld"), validity="conservative",
    config=MembershipConfig, null=_null, null_unit="splits",
    summary="the suspect fits released images better than images withheld from the release (within-class ranks, "
            "Chernoff bound); needs mark --withhold-fraction; does not use the mark",
))
