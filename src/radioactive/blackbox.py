"""Black-box detection: only the suspect's outputs are needed.

Two tests, both on d_i = loss(vanilla_i) - loss(marked_i), the change of the
suspect's true-class cross-entropy when image i is replaced by its marked
version.

Exact control test (used when the record has withheld marked images, see
``mark --holdout-fraction``): the owner marked 2n images and released a
random half of them marked (A), keeping the others' marked versions private
and releasing their vanilla versions (B). Under H0 (the suspect does not
depend on which half was released, e.g. it never saw the release, or saw
only vanilla images) the d_i of A and B are exchangeable, so the one-sided
Mann-Whitney U test of "d larger on A than on B" has an exact null by the
randomisation, whatever the model. A model trained on the release fitted
the marked versions of A and the vanilla versions of B: d is larger on A.

Paired test, when there is no withheld set (one-sided Wilcoxon signed-rank over images): for each marked
image i of the private record, d_i = loss(vanilla_i) - loss(marked_i), the
cross-entropy of the true class (from logits, or -log of the probability).
A model trained on the marked images fits their marked versions better:
d_i > 0. The p-value is that of H0 "the d_i are symmetric about 0" against
"shifted to > 0" (scipy.stats.wilcoxon, zero differences dropped, exact
null distribution for small n, normal approximation with continuity
correction otherwise).

Mirror statistic (runnable suspects, or outputs on the files of ``radioactive mirror-images``):
m_i = loss(mirror_i) - loss(marked_i), with the mirror x - delta (:func:`mirror_image`). With a
holdout it is also fed to the exact control test. It has no image-level p-value: a carrier moves the
images of its class together, and vanilla models already respond to that per class (class means of m
from -1.9 to +0.76 nats on two vanilla from-scratch models, docs/from-scratch.md cell 7), so images
of a class are not independent.

Assumptions, stated: under H0 the suspect is independent of the key, so the
direction each image was pushed in is a random carrier the model knows
nothing of; a perturbation in a random direction raises the loss of a model
that fits the vanilla image (the loss is smallest near it), so under H0 the
d_i lean negative, which makes the one-sided test conservative. Pairs must be
independent across images (one pair per image); the class effects above weaken that, and the test
relies on the curvature term outweighing them (it did in every vanilla control measured). A model whose outputs do not
change (constant outputs) gives d_i = 0 for every image: no pair is left and
the result is p = 1, "not detected"; non-finite outputs are dropped the same
way.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sstats

from .data import encode_png, load_rgb
from .detection import DetectionResult
from .errors import RadioactiveError


@dataclass(frozen=True)
class RecordEntry:
    source: Path  # vanilla image
    output: Path  # marked image
    label: int
    class_name: str
    released: bool = True
    name: str = ""  # the record's output name (relative to the released or holdout folder)
    sha256: str = ""  # of the marked output file, as written by mark

    @property
    def mirror_name(self) -> str:
        """Relative PNG path of this image's mirror in a mirror folder (see :func:`write_mirror_images`)."""
        return f"{'released' if self.released else 'holdout'}/{Path(self.name).with_suffix('.png').as_posix()}"


def read_record(record: str | Path, source_root: str | Path | None = None,
                released_root: str | Path | None = None) -> tuple[dict, list[RecordEntry]]:
    """Read a private record written by ``mark``.

    Paths in the record are resolved inside their base folder (the record's
    ``source`` and ``output``, or the roots given here); a path that escapes
    its base (``../``) is refused.

    Returns:
        the header dictionary and one entry per marked image.

    Raises:
        RadioactiveError: missing or malformed record, escaping paths.
    """
    record = Path(record)
    if not record.is_file():
        raise RadioactiveError(f"record not found: {record}")
    try:
        lines = [json.loads(ln) for ln in record.read_text().splitlines() if ln.strip()]
        header = lines[0]
        if header.get("kind") != "radioactive-record":
            raise ValueError("no record header")
    except (ValueError, IndexError) as e:
        raise RadioactiveError(f"{record} is not a radioactive record ({e})") from e
    src = Path(source_root or header["source"]).resolve()
    out = Path(released_root or header["output"]).resolve()
    hold = Path(header.get("holdout") or record.parent / f"{record.stem}.holdout").resolve()
    entries = []
    for n, ln in enumerate(lines[1:], start=2):
        if isinstance(ln, dict) and ln.get("withheld"):
            continue  # never released: see read_withheld
        try:
            base = out if ln.get("released", True) else hold
            s, o = (src / ln["source"]).resolve(), (base / ln["output"]).resolve()
            entry = RecordEntry(s, o, int(ln["carrier_index"]), str(ln["class"]), bool(ln.get("released", True)),
                                str(ln["output"]), str(ln.get("sha256", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RadioactiveError(f"{record}: malformed entry on line {n} ({e!r})") from e
        if not s.is_relative_to(src) or not o.is_relative_to(base):
            raise RadioactiveError(f"record path escapes its folder: {ln['source']!r} / {ln['output']!r}")
        entries.append(entry)
    return header, entries


def read_withheld(record: str | Path, source_root: str | Path | None = None) -> tuple[dict, list[tuple[Path, str]]]:
    """The images a record says were withheld from the release (``mark --withhold-fraction``).

    Returns:
        the header and (vanilla source path, class name) per withheld image, resolved inside the source folder.

    Raises:
        RadioactiveError: as :func:`read_record`; a record without withheld images.
    """
    read_record(record, source_root)  # validates the header and every marked entry
    lines = [json.loads(ln) for ln in Path(record).read_text().splitlines() if ln.strip()]
    header = lines[0]
    src = Path(source_root or header["source"]).resolve()
    out = []
    for ln in lines[1:]:
        if not ln.get("withheld"):
            continue
        try:
            path, name = (src / ln["source"]).resolve(), str(ln["class"])
        except (KeyError, TypeError) as e:
            raise RadioactiveError(f"{record}: malformed withheld entry ({e!r})") from e
        if not path.is_relative_to(src):
            raise RadioactiveError(f"record path escapes its folder: {ln['source']!r}")
        out.append((path, name))
    if not out:
        raise RadioactiveError(f"{record} lists no withheld image; mark with --withhold-fraction to use this test")
    return header, out


def true_class_loss(outputs: np.ndarray, labels: np.ndarray, kind: str = "logits") -> np.ndarray:
    """Cross-entropy of the true class.

    Args:
        outputs: (N, K) logits or probabilities.
        labels: (N,) class indices.
        kind: ``logits`` or ``probs``.

    Returns:
        (N,) float64 losses in nats; NaN where the outputs are not finite.
    """
    o = np.asarray(outputs, dtype=np.float64)
    idx = np.arange(len(o))
    with np.errstate(all="ignore"):
        if kind == "logits":
            m = o.max(1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(o - m).sum(1))
            loss = lse - o[idx, labels]
        elif kind == "probs":
            loss = -np.log(np.clip(o[idx, labels], 1e-300, None))
        else:
            raise RadioactiveError(f"outputs kind must be 'logits' or 'probs', got {kind!r}")
    loss[~np.isfinite(o).all(1)] = np.nan
    return loss


def paired_test(loss_vanilla: np.ndarray, loss_marked: np.ndarray) -> tuple[float, int, float]:
    """One-sided Wilcoxon signed-rank test of d = loss_vanilla - loss_marked > 0.

    Returns:
        (log10 p-value, number of informative pairs, median of d).
    """
    d = np.asarray(loss_vanilla, dtype=np.float64) - np.asarray(loss_marked, dtype=np.float64)
    d = d[np.isfinite(d)]
    d = d[np.abs(d) > 1e-9]  # no change (constant outputs, float noise): not informative
    if len(d) == 0:
        return 0.0, 0, 0.0
    res = sstats.wilcoxon(d, alternative="greater", zero_method="wilcox", correction=True)
    p = float(res.pvalue)
    if p > 0:
        return min(0.0, math.log10(p)), len(d), float(np.median(d))
    # the normal approximation underflowed: use its log tail
    n = len(d)
    ranks = sstats.rankdata(np.abs(d))
    w = ranks[d > 0].sum()
    mu, sd = n * (n + 1) / 4, math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    z = (w - mu - 0.5) / sd
    return float(sstats.norm.logsf(z) / math.log(10)), n, float(np.median(d))


def model_outputs(net, paths: list[Path], image_size: int | None = None, batch_size: int = 250) -> np.ndarray:
    """Logits (N, K) of a runnable suspect on image files."""
    return outputs_of(net, lambda i: load_rgb(paths[i]), len(paths), image_size, batch_size)


def mirror_image(vanilla: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """The mirror of a marked image: the mark subtracted instead of added, ``clip(2 x - x_marked, 0, 255)``.

    Never released: the suspect cannot have trained on it. A model that fitted the marked version
    x + delta sits at distance 2 |delta| from the mirror x - delta, against |delta| from the vanilla x,
    so to second order its loss rises 4 times as much there as at x, while for a model that never saw
    either version the two are symmetric about x to second order (the mirror statistic of
    :func:`blackbox_detect`).

    Args:
        vanilla, marked: (H, W, 3) uint8 RGB of the same shape.

    Returns:
        (H, W, 3) uint8.

    Raises:
        RadioactiveError: shapes that differ (the marked file is not a copy of the vanilla image).
    """
    if vanilla.shape != marked.shape:
        raise RadioactiveError(f"marked image {marked.shape} and vanilla image {vanilla.shape} differ in shape")
    return np.clip(2 * vanilla.astype(np.int16) - marked.astype(np.int16), 0, 255).astype(np.uint8)


def default_mirror_dir(record: str | Path) -> Path:
    """Where :func:`write_mirror_images` writes by default: ``<record folder>/<record stem>.mirror``."""
    record = Path(record)
    return record.parent / f"{record.stem}.mirror"


def write_mirror_images(record: str | Path, out: str | Path | None = None, source_root=None,
                        released_root=None) -> dict:
    """Write the mirror (:func:`mirror_image`) of every marked image of a record as PNG, for black-box
    detection through an API: query the suspect with these files too and add their outputs to the
    outputs file; :func:`blackbox_detect` then reports the mirror statistic (and, with a holdout, the
    exact control test on it).

    Layout: ``out/released/<output name>.png`` and ``out/holdout/<output name>.png`` (the record's
    output names, suffix ``.png``). The folder is written in full under a temporary name and renamed, so
    it is either complete or absent. Keep it private, like the record: the mirrors reveal the marks.

    Args:
        record: the private record of ``mark``.
        out: folder to create (default :func:`default_mirror_dir`); must not exist.

    Returns:
        ``{"mirror": folder, "num_images": n}``.

    Raises:
        RadioactiveError: as :func:`read_record`; ``out`` or ``<out>.partial`` exists (nothing is
        deleted); unreadable images; a marked image whose size differs from its vanilla version.
    """
    _, entries = read_record(record, source_root, released_root)
    out = Path(out) if out is not None else default_mirror_dir(record)
    tmp = out.with_name(out.name + ".partial")
    for p in (out, tmp):
        if p.exists():
            raise RadioactiveError(f"{p} exists; remove it or choose another folder")
    try:
        for e in entries:
            dst = tmp / e.mirror_name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(encode_png(mirror_image(load_rgb(e.source), load_rgb(e.output))))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"mirror": str(out), "num_images": len(entries)}


def outputs_of(net, load, n: int, image_size: int | None = None, batch_size: int = 250) -> np.ndarray:
    """Logits of a runnable suspect on images made or read on demand.

    Args:
        net: module mapping (B, 3, H, W) float images in [0, 1] to (B, K) outputs (:func:`load_runnable`).
        load: ``load(i)`` gives image i as (H, W, 3) uint8 RGB, for i in 0..n-1; called once per image,
            batch by batch, so at most ``batch_size`` images are held at a time.
        image_size: resize (bilinear) to this square size first, when given and different.

    Returns:
        (n, K) float64 outputs.
    """
    import torch
    from PIL import Image

    out = []
    for s in range(0, n, batch_size):
        imgs = []
        for i in range(s, min(n, s + batch_size)):
            a = load(i)
            if image_size is not None and a.shape[:2] != (image_size, image_size):
                a = np.asarray(Image.fromarray(a).resize((image_size, image_size), Image.BILINEAR))
            imgs.append(a)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            out.append(net(x).double().numpy())
    return np.concatenate(out)


def read_outputs_file(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Outputs a user got from an API.

    Formats: JSON lines ``{"path": ..., "logits": [...]}`` or ``{"path": ..., "probs": [...]}``;
    or CSV with a ``path`` column and columns ``logit_0..logit_{K-1}`` or ``prob_0..prob_{K-1}``.
    ``path`` is the image file as given to the API: the released copy's file
    for a marked image, the source file for its vanilla version (absolute,
    or relative to the outputs file's folder).

    Returns:
        path (resolved) -> (K,) outputs, and the kind (``logits`` or ``probs``).

    Raises:
        RadioactiveError: unreadable file, mixed kinds, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise RadioactiveError(f"outputs file not found: {path}")
    rows, kinds = {}, set()
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    cols = sorted((c for c in r if c and c.startswith(("logit_", "prob_"))),
                                  key=lambda c: int(c.split("_")[1]))
                    kinds.add("logits" if cols and cols[0].startswith("logit_") else "probs")
                    rows[r["path"]] = np.array([float(r[c]) for c in cols])
        else:
            for ln in path.read_text().splitlines():
                if not ln.strip():
                    continue
                r = json.loads(ln)
                kind = "logits" if "logits" in r else "probs"
                kinds.add(kind)
                rows[r["path"]] = np.asarray(r[kind], dtype=np.float64)
    except (ValueError, KeyError) as e:
        raise RadioactiveError(f"cannot read outputs file {path}: {e}") from e
    if not rows or len(kinds) != 1:
        raise RadioactiveError(f"{path}: expected rows with either logits or probs, not both")
    resolved = {str((path.parent / p).resolve()): v for p, v in rows.items()}
    return resolved, kinds.pop()


def blackbox_detect(record: str | Path, suspect: str | Path | None = None, outputs: str | Path | None = None,
                    alpha: float = 1e-3, classes: list[str] | None = None, source_root=None,
                    released_root=None, only_classes: list[str] | None = None,
                    mirror_root: str | Path | None = None) -> DetectionResult:
    """Black-box test of a suspect from its outputs on the marked images and their vanilla versions.

    Args:
        record: the private record of ``mark`` (lists marked images and vanilla sources).
        suspect: a runnable suspect (weights + sidecar, or TorchScript + sidecar), or
        outputs: a file of outputs (see :func:`read_outputs_file`).
        alpha: significance level of the verdict.
        classes: the suspect's class names in output order (default: the
            suspect's sidecar; for an outputs file, the key's class order, as in the record).
        only_classes: test only the marked images of these classes.

    Returns:
        a :class:`DetectionResult` with method ``black-box``; ``extra`` holds
        the number of informative pairs and the median loss difference.

    Raises:
        RadioactiveError: neither or both of suspect/outputs, missing images or outputs.
    """
    from .networks import load_runnable

    t0 = time.time()
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
    released = np.array([e.released for e in entries])
    paired_log10_p, n, median = paired_test(lv[released], lm[released])
    extra = {"paired_test": "one-sided Wilcoxon signed-rank on loss(vanilla) - loss(marked), released images",
             "paired_log10_pvalue": paired_log10_p, "pairs": n, "median_loss_difference": median,
             "num_marked_images": int(released.sum()), "num_holdout_images": int((~released).sum())}
    log10_p = paired_log10_p
    if o_mirror is not None:
        # descriptive only: no image-level p-value, because a carrier moves all the images of its class the
        # same way and even vanilla models respond to that per class (docs/from-scratch.md, cell 7)
        lx = true_class_loss(o_mirror, labels, kind)
        m = lx - lm
        extra["median_mirror_difference"] = float(np.nanmedian(m[released])) if released.any() else 0.0
        extra["class_mean_mirror_difference"] = {
            c: float(np.nanmean(m[released & (labels == k)])) for c, k in sorted(
                {e.class_name: int(lab) for e, lab in zip(entries, labels)}.items()) if (released & (labels == k)).any()}
    if (~released).any():
        d = lv - lm
        log10_p, med_b = control_test(d[released], d[~released])
        extra.update({"test": "one-sided Mann-Whitney U: d on released marked images > d on withheld marked images",
                      "median_loss_difference_holdout": med_b, "control_log10_pvalue": log10_p})
        if o_mirror is not None:
            dx = lx - lm
            extra["control_mirror_log10_pvalue"] = control_test(dx[released], dx[~released])[0]
    else:
        extra["test"] = extra["paired_test"]
    return DetectionResult(
        method="black-box", log10_pvalue=log10_p, detected=bool(log10_p < math.log10(alpha)), alpha=alpha,
        classes=sorted(names), key_fingerprint=header.get("key_fingerprint", ""),
        suspect={"path": str(suspect or outputs)}, seconds=time.time() - t0, extra=extra,
    )


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
            "mannwhitney_log10_pvalue": math.log10(mw_p) if mw_p > 0 else -math.inf}


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
        a :class:`DetectionResult` with method ``membership``; ``extra`` has the statistic, counts and medians.

    Raises:
        RadioactiveError: no withheld image in the record, neither or both of suspect/outputs, missing images.
    """
    from .data import list_image_folder
    from .networks import load_runnable

    t0 = time.time()
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
    items = released + withheld
    if suspect is not None:
        net, meta = load_runnable(suspect)
        s_classes = classes or list(meta["classes"])
        size = meta.get("preprocessing", {}).get("image_size")
        out = model_outputs(net, [p for p, _ in items], size)
        kind = "logits"
    else:
        o_mirror = None  # an API was not asked about the mirror images
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
    res = membership_test(loss[~is_w], loss[is_w], labels[~is_w], labels[is_w])
    log10_p = res.pop("log10_pvalue")
    return DetectionResult(
        method="membership", log10_pvalue=log10_p, detected=bool(log10_p < math.log10(alpha)), alpha=alpha,
        classes=sorted({c for _, c in withheld}), key_fingerprint=header.get("key_fingerprint", ""),
        suspect={"path": str(suspect or outputs)}, seconds=time.time() - t0,
        extra={"test": "released vs withheld images, within-class ranks of the true-class loss on vanilla "
                       "versions; Chernoff bound for sampling without replacement", **res},
    )
