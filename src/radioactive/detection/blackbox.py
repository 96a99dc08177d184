"""Black-box tests from the suspect's outputs on the marked images of the record.

Both read d_i = loss(vanilla_i) - loss(marked_i), the change of the suspect's true-class cross-entropy when
image i is replaced by its marked version.

``black-box`` (approximate), the control test. It needs withheld marked images (``mark --holdout-fraction``):
the owner marked 2n images and released a random part of each class marked (A), keeping the others' marked
versions private and releasing their vanilla versions (B). Under H0 (the suspect does not depend on which
images were released marked: it never saw the release, or saw only vanilla images) the d_i of A and B are
exchangeable within each class, whatever the model. The one-sided Mann-Whitney U test of "d larger on A than on
B" uses the normal approximation with continuity correction, in log space: it holds when both sides have at
least about 10 images, and the within-class randomisation makes it conservative rather than liberal when classes
differ (the pooled permutation variance is the larger). The null-calibration benchmark redraws the split.

``paired`` (descriptive). Without a withheld set, only effect sizes: the median of d over released marked images,
the share of positive d, per-class medians, and the mirror statistic m_i = loss(mirror_i) - loss(marked_i)
(:func:`radioactive.detection.outputs.mirror_image`) when mirror outputs exist. A one-sided Wilcoxon signed-rank
test on d is NOT valid: a carrier shifts every image of its class the same way, so an innocent model's d are
correlated within a class and need not be centred on zero. Measured on a random-init ResNet-18 that never saw
marked data, 100 marked CIFAR-10 images and 4,000 fresh keys, it gave p <= 0.05 for 20.7 % of the keys
(../shared/PAPER.md, "Black-box detection"). So ``paired`` never prints a p-value or a verdict.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sstats

from ..data import load_rgb
from ..data.record import read_record
from ..errors import RadioactiveError
from ..suspects import load_runnable
from .access import OwnerFiles, SuspectAccess, check_unique
from .outputs import default_mirror_dir, mirror_image, model_outputs, outputs_of, read_outputs_file, true_class_loss
from .registry import MethodEntry, register_method
from .result import ControlDetails, DetectionResult, PairedDetails


@dataclass
class MarkedLosses:
    """The suspect's true-class losses on the record's marked images (nats).

    Attributes:
        classes: class name per image. labels: the suspect's class index per image.
        released: (N,) bool, True for released marked images, False for withheld (holdout) ones.
        vanilla, marked: (N,) losses on the vanilla and marked versions. mirror: (N,) on the mirrors, or None.
        queries: images sent to the suspect. key_fingerprint: the record's.
    """

    classes: list[str]
    labels: np.ndarray
    released: np.ndarray
    vanilla: np.ndarray
    marked: np.ndarray
    mirror: np.ndarray | None
    queries: int
    key_fingerprint: str


def marked_losses(record: str | Path, suspect: str | Path | None = None, outputs: str | Path | None = None,
                  classes: list[str] | None = None, source_root=None, released_root=None,
                  only_classes: list[str] | None = None, mirror_root: str | Path | None = None) -> MarkedLosses:
    """Query the suspect (or read its outputs) on every marked image of the record, its vanilla version and mirror.

    Args:
        record: the private record of ``mark`` (lists marked images and vanilla sources).
        suspect: a runnable suspect (weights + sidecar, or TorchScript + sidecar), or
        outputs: a file of outputs (see :func:`read_outputs_file`); mirrors are used when it has all of them.
        classes: the suspect's class names in output order (default: the suspect's sidecar; for an outputs file,
            the record's class order).
        only_classes: only the marked images of these classes (each once).

    Raises:
        RadioactiveError: neither or both of suspect/outputs, missing images or outputs, unknown classes.
    """
    check_unique(only_classes)
    if (suspect is None) == (outputs is None):
        raise RadioactiveError("give either a runnable suspect or a file of its outputs")
    header, entries = read_record(record, source_root, released_root)
    if only_classes:
        entries = [e for e in entries if e.class_name in set(only_classes)]
    if not entries:
        raise RadioactiveError(f"{record} lists no marked image (of the classes asked for)")
    names = sorted({e.class_name for e in entries})
    if suspect is not None:
        net, meta = load_runnable(suspect)
        s_classes = list(meta["classes"])
        size = meta.get("preprocessing", {}).get("image_size")
        o_marked = model_outputs(net, [e.output for e in entries], size)
        o_vanilla = model_outputs(net, [e.source for e in entries], size)
        o_mirror = outputs_of(net, lambda i: mirror_image(load_rgb(entries[i].source), load_rgb(entries[i].output)),
                            len(entries), size, 250)
        kind = "logits"
    else:
        rows, kind = read_outputs_file(outputs)
        missing = [e for e in entries if str(e.output) not in rows or str(e.source) not in rows]
        if len(missing) == len(entries):
            raise RadioactiveError(f"{outputs} has no outputs for the recorded images (e.g. {entries[0].output})")
        entries = [e for e in entries if e not in missing]
        o_marked = np.stack([rows[str(e.output)] for e in entries])
        o_vanilla = np.stack([rows[str(e.source)] for e in entries])
        mroot = Path(mirror_root) if mirror_root is not None else default_mirror_dir(record)
        mirrors = [str((mroot / e.mirror_name).resolve()) for e in entries]
        # the mirror tests run only when the API was asked about every mirror (see write_mirror_images)
        o_mirror = np.stack([rows[m] for m in mirrors]) if all(m in rows for m in mirrors) else None
        s_classes = classes or header.get("classes")
    if s_classes is None:  # outputs in the key's class order: the record's carrier index
        labels = np.array([e.label for e in entries])
    else:
        index = {c: i for i, c in enumerate(classes or s_classes)}
        unknown = [c for c in names if c not in index]
        if unknown:
            raise RadioactiveError(f"classes of the record unknown to the suspect: {unknown[:5]}")
        labels = np.array([index[e.class_name] for e in entries])
    if labels.max() >= o_marked.shape[1]:
        raise RadioactiveError(f"outputs have {o_marked.shape[1]} columns, fewer than the classes of the record")
    lv = true_class_loss(o_vanilla, labels, kind)
    lm = true_class_loss(o_marked, labels, kind)
    lx = None if o_mirror is None else true_class_loss(o_mirror, labels, kind)
    queries = (2 + (o_mirror is not None)) * len(entries)
    return MarkedLosses([e.class_name for e in entries], labels, np.array([e.released for e in entries]), lv, lm, lx,
                        queries, header.get("key_fingerprint", ""))


def control_test(d_released: np.ndarray, d_holdout: np.ndarray) -> tuple[float, float]:
    """One-sided Mann-Whitney U test of d_released > d_holdout (non-finite values dropped).

    Returns:
        (log10 p-value, median of d_holdout); p = 1 when a side is empty or every value is tied.
    """
    a = np.asarray(d_released, dtype=np.float64)
    b = np.asarray(d_holdout, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0 or np.ptp(np.concatenate([a, b])) <= 1e-9:
        return 0.0, float(np.median(b)) if len(b) else 0.0
    res = sstats.mannwhitneyu(a, b, alternative="greater", method="asymptotic", use_continuity=True)
    p = float(res.pvalue)
    if p > 0:
        return min(0.0, math.log10(p)), float(np.median(b))
    n1, n2 = len(a), len(b)
    u = float(res.statistic)
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return float(sstats.norm.logsf(z) / math.log(10)), float(np.median(b))


def blackbox_detect(record: str | Path, suspect: str | Path | None = None, outputs: str | Path | None = None,
                    alpha: float = 1e-3, classes: list[str] | None = None, source_root=None,
                    released_root=None, only_classes: list[str] | None = None,
                    mirror_root: str | Path | None = None) -> DetectionResult:
    """The control test (module docstring): released marked images against withheld marked images. Approximate.

    Args:
        record: the private record of ``mark --holdout-fraction``.
        suspect, outputs, classes, only_classes, mirror_root: as :func:`marked_losses`.
        alpha: significance level of the verdict.

    Returns:
        a :class:`DetectionResult` with method ``black-box``, validity ``approximate``.

    Raises:
        RadioactiveError: as :func:`marked_losses`; a record without withheld marked images (mark with
            --holdout-fraction; the paired effect size, ``paired``, needs none but gives no p-value).
    """
    t0 = time.time()
    ml = marked_losses(record, suspect, outputs, classes, source_root, released_root, only_classes, mirror_root)
    if ml.released.all() or not ml.released.any():
        raise RadioactiveError(f"{record} has no withheld marked images: the black-box control test needs them (mark "
                               "with --holdout-fraction); without them only the descriptive --method paired runs")
    d = ml.vanilla - ml.marked
    log10_p, med_b = control_test(d[ml.released], d[~ml.released])
    finite = d[ml.released][np.isfinite(d[ml.released])]
    med_a = float(np.median(finite)) if len(finite) else 0.0  # as control_test's med_b: never NaN (strict JSON)
    mirror_p = None
    if ml.mirror is not None:
        dx = ml.mirror - ml.marked
        mirror_p = control_test(dx[ml.released], dx[~ml.released])[0]
    return DetectionResult(
        method="black-box", validity="approximate", log10_pvalue=log10_p, alpha=alpha,
        classes=sorted(set(ml.classes)), key_fingerprint=ml.key_fingerprint,
        suspect={"path": str(suspect or outputs)}, settings={"classes": list(only_classes) if only_classes else None},
        details=ControlDetails(int(ml.released.sum()), int((~ml.released).sum()),
                               med_a, med_b, mirror_p, ml.queries),
        seconds=time.time() - t0,
    )


def paired_effect(record: str | Path, suspect: str | Path | None = None, outputs: str | Path | None = None,
                  alpha: float = 1e-3, classes: list[str] | None = None, source_root=None, released_root=None,
                  only_classes: list[str] | None = None, mirror_root: str | Path | None = None) -> DetectionResult:
    """The paired effect size (module docstring): descriptive, no p-value, no verdict.

    Returns:
        a :class:`DetectionResult` with method ``paired``, validity ``descriptive``, ``log10_pvalue`` None and
        :class:`PairedDetails`.

    Raises:
        RadioactiveError: as :func:`marked_losses`.
    """
    t0 = time.time()
    ml = marked_losses(record, suspect, outputs, classes, source_root, released_root, only_classes, mirror_root)
    d = (ml.vanilla - ml.marked)[ml.released]
    names = np.array(ml.classes)[ml.released]
    ok = np.isfinite(d) & (np.abs(d) > 1e-9)
    per_class = {c: float(np.median(d[ok & (names == c)])) for c in sorted(set(names)) if (ok & (names == c)).any()}
    mirror = None
    if ml.mirror is not None:
        m = (ml.mirror - ml.marked)[ml.released]
        mirror = float(np.nanmedian(m)) if np.isfinite(m).any() else None
    return DetectionResult(
        method="paired", validity="descriptive", log10_pvalue=None, alpha=alpha, classes=sorted(set(ml.classes)),
        key_fingerprint=ml.key_fingerprint, suspect={"path": str(suspect or outputs)},
        settings={"classes": list(only_classes) if only_classes else None},
        details=PairedDetails(int(ok.sum()), float(np.median(d[ok])) if ok.any() else 0.0,
                              float(np.mean(d[ok] > 0)) if ok.any() else 0.0, per_class, mirror, ml.queries),
        seconds=time.time() - t0,
    )


@dataclass(frozen=True)
class BlackBoxConfig:
    """Settings of the black-box tests (the classes, fixed before testing)."""

    classes: tuple[str, ...] | None = None


def _args(owner: OwnerFiles, suspect: SuspectAccess, method: str) -> dict:
    owner.need("record", method=method)
    return {"record": owner.record, "suspect": suspect.path if suspect.outputs is None else None,
            "outputs": suspect.outputs, "classes": list(suspect.classes) if suspect.classes else None,
            "source_root": owner.source_root, "mirror_root": owner.mirror_root}


def _run_control(owner: OwnerFiles, suspect: SuspectAccess, config: BlackBoxConfig, alpha: float) -> DetectionResult:
    return blackbox_detect(**_args(owner, suspect, "the black-box control test"), alpha=alpha,
                           only_classes=config.classes)


def _run_paired(owner: OwnerFiles, suspect: SuspectAccess, config: BlackBoxConfig, alpha: float) -> DetectionResult:
    return paired_effect(**_args(owner, suspect, "the paired effect size"), alpha=alpha, only_classes=config.classes)


def split_null(d: np.ndarray, groups: np.ndarray, num_released: dict, num: int, seed: int) -> np.ndarray:
    """log10 p-values of the control test under ``num`` fresh random splits, drawn within each class as ``mark``
    draws the holdout (``num_released[g]`` of class g's images released, the rest withheld)."""
    rng = np.random.default_rng([seed, 0xC0])
    out = np.empty(num)
    for i in range(num):
        released = np.zeros(len(d), dtype=bool)
        for g, n_r in sorted(num_released.items()):
            idx = np.flatnonzero(groups == g)
            released[rng.choice(idx, n_r, replace=False)] = True
        out[i] = control_test(d[released], d[~released])[0]
    return out


def _null_control(owner: OwnerFiles, suspect: SuspectAccess, config: BlackBoxConfig, num: int, seed: int) -> np.ndarray:
    """Fresh random holdout splits of the same marked images (what the null says is random)."""
    ml = marked_losses(**_args(owner, suspect, "the black-box control test"), only_classes=config.classes)
    groups = np.array(ml.classes)
    counts = {g: int((ml.released & (groups == g)).sum()) for g in set(ml.classes)}
    return split_null(ml.vanilla - ml.marked, groups, counts, num, seed)


register_method(MethodEntry(
    name="black-box", run=_run_control, access=("outputs",), reads=("record", "holdout"), validity="approximate",
    config=BlackBoxConfig, null=_null_control, null_unit="splits",
    summary="loss change from vanilla to marked on released marked images against withheld marked images "
            "(Mann-Whitney U); needs mark --holdout-fraction",
))
register_method(MethodEntry(
    name="paired", run=_run_paired, access=("outputs",), reads=("record",), validity="descriptive",
    config=BlackBoxConfig,
    summary="median loss change from vanilla to marked over released marked images: an effect size only, "
            "no valid null (never a p-value or a verdict)",
))
