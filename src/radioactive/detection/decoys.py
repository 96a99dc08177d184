"""Decoy-carrier test: a black-box test of the suspect with the carrier, not the image, as the unit.

Why: a model trained from scratch on marked images learns each carrier as a cue for its class. It then
prefers a marked image x + delta to its mirror x - delta (the mark subtracted; see
:func:`radioactive.blackbox.mirror_image`) on images it never saw marked (benchmarks/studies/from_scratch/NOTES.md,
cell 7). But a carrier moves all the images of its class in one direction, and even vanilla models like
or dislike that direction as a class, so an image-level test of that preference has no valid null.
The randomness the owner controls is the carrier: it was drawn uniformly on the unit sphere,
independently of everything else. This test compares the real carrier of each class with decoy
carriers drawn from the same distribution.

Procedure, for each class k with released marked images:

1. Take its first n released marked images (record order), and draw M decoy carriers uniformly on the
   unit sphere from a stream derived from the key's fingerprint and ``seed``
   (:func:`radioactive.detection.access.derived_rng`), which no key can share.
2. Mark the vanilla versions of those n images with the real carrier and with each decoy. Use the
   record's marking configuration and each image's own augmentation draws, the same procedure as the
   release. For the real carrier this reproduces the released pixels of a lossless release.
3. For each carrier c, compute
   T_k(c) = mean over the n images of [m_S(c) - m_R(c)],
   where m(c) = loss(x - delta_c) - loss(x + delta_c) is the true-class cross-entropy of the suspect
   S, or of an optional reference R. The reference is a model the owner trained on vanilla images,
   before or without the key. Subtracting it removes the part of each carrier's effect that any model
   trained on these photographs shares; without it, m_R = 0.
4. p_k = (1 + #{decoys d : T_k(d) >= T_k(real)}) / (M + 1).
5. Combine the p_k with Fisher's method (:func:`radioactive.stats.fisher_log10_pvalue`).

Null hypothesis H0: the suspect and the reference are independent of the key (e.g. never trained on
data marked with it). Given the images, the models and the decoys' seed, the real carrier is then
exchangeable with its class's decoys. So p_k is super-uniform, exactly, whatever the models are
(a rank test; Phipson & Smyth 2010 for the +1). The carriers of different classes are independent,
so the p_k are independent, and Fisher's combination is valid. It is conservative, not exact, for these
discrete p-values: measured at alpha 0.05 with K 10 and M 29, P(p <= 0.05) = 0.012 under H0 (validity
``conservative`` in the registry). The smallest reachable combined p-value is set by M and the number of classes K: every
p_k = 1/(M+1) gives P(chi^2_{2K} >= 2K ln(M+1)).

Cost: (M + 1) * n * K marking optimisations and 2 * (M + 1) * n * K forward passes per model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..data import load_rgb, sha256_file
from ..data.record import read_record
from ..errors import RadioactiveError
from ..keys import Key
from ..marking.optimise import MarkingConfig, image_generator, mark_batch
from ..networks import load_marking_network
from ..stats import fisher_log10_pvalue
from ..suspects import load_runnable
from .access import OwnerFiles, SuspectAccess, check_unique, derived_rng, stream_name, unit_vectors
from .outputs import mirror_image, outputs_of, true_class_loss
from .registry import MethodEntry, register_method, setting
from .result import DecoyCarrierDetails, DetectionResult


def record_marking_config(header: dict) -> MarkingConfig:
    """The :class:`MarkingConfig` a record was written with (its header's ``config``).

    Raises:
        RadioactiveError: the header has no usable ``config``.
    """
    known = {f.name for f in fields(MarkingConfig)}
    cfg = header.get("config")
    if not isinstance(cfg, dict):
        raise RadioactiveError("the record's header has no marking config")
    try:
        return replace(MarkingConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in cfg.items() if k in known})
    except (TypeError, ValueError) as e:
        raise RadioactiveError(f"the record's marking config is not usable: {e}") from e


@dataclass(frozen=True)
class DecoyMarks:
    """The images of a decoy-carrier test, marked with the real and the decoy carriers.

    Attributes:
        classes: key class index of each tested class, in order.
        vanilla: per tested class, its n vanilla images ((H, W, 3) uint8).
        marked: per tested class, (M + 1, n, H, W, 3) uint8; row 0 is the real carrier.
        decoys: M. seed: the decoys' seed. key_fingerprint: the key's.
    """

    classes: list[int]
    vanilla: list[list[np.ndarray]]
    marked: list[np.ndarray]
    decoys: int
    seed: int
    key_fingerprint: str


DECOY_TAG = "decoy carriers"


_RECENT: dict = {}  # the last marks computed, by their inputs: the decoy-carrier and label-only tests share them


def decoy_marks(record: str | Path, key: Key, per_class: int = 20, decoys: int = 29, seed: int = 0,
                device: str = "cpu", classes: tuple[str, ...] | None = None) -> DecoyMarks:
    """Steps 1-2 of the test (module docstring): the costly part, reusable for several suspects and by the
    label-only test (the last result is kept, keyed by the record's bytes, the key and the settings).

    Args:
        classes: test only these classes of the key (each once; None: every class with released marked images).

    Raises:
        RadioactiveError: the key does not match the record, no class has a released marked image,
            n or M < 1, unreadable images, a class named twice or unknown to the key.
    """
    check_unique(classes)
    ident = (sha256_file(Path(record)) if Path(record).is_file() else str(record), key.fingerprint, per_class, decoys,
             seed, str(device), None if classes is None else tuple(classes))
    if ident in _RECENT:
        return _RECENT[ident]
    marks = _decoy_marks(record, key, per_class, decoys, seed, device, classes)
    _RECENT.clear()
    _RECENT[ident] = marks
    return marks


def _decoy_marks(record, key: Key, per_class: int, decoys: int, seed: int, device: str, classes) -> DecoyMarks:
    if per_class < 1 or decoys < 1:
        raise RadioactiveError("per_class and decoys must be at least 1")
    header, entries = read_record(record)
    if header.get("key_fingerprint") and header["key_fingerprint"] != key.fingerprint:
        raise RadioactiveError(f"the key ({key.fingerprint}) is not the one the record was marked with "
                               f"({header['key_fingerprint']})")
    cfg = record_marking_config(header)
    src_root = Path(header["source"]).resolve()
    index = {c: i for i, c in enumerate(key.classes)}
    if classes is not None:
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise RadioactiveError(f"classes {unknown} are not in the key")
        index = {c: i for c, i in index.items() if c in set(classes)}
    pools: dict[int, list] = {}
    for e in entries:
        if e.released and e.class_name in index and len(pools.setdefault(index[e.class_name], [])) < per_class:
            pools[index[e.class_name]].append(e)
    pools = {k: v for k, v in sorted(pools.items()) if v}
    if not pools:
        raise RadioactiveError(f"{record} lists no released marked image of the key's classes")
    marker = load_marking_network(key.network)[0].to(device).eval()
    rng = derived_rng(key.fingerprint, DECOY_TAG, seed)
    vanilla_all, marked_all = [], []
    for k, ents in pools.items():
        decoy_rows = torch.from_numpy(unit_vectors(rng, decoys, key.dim)).to(key.carriers.dtype)
        carriers = torch.cat([key.carriers[k:k + 1], decoy_rows])
        vanilla = [load_rgb(e.source) for e in ents]
        x = torch.from_numpy(np.stack(vanilla)).permute(0, 3, 1, 2)
        pairs = [(j, i) for j in range(len(carriers)) for i in range(len(ents))]
        marked = np.empty((len(carriers), len(ents), *vanilla[0].shape), dtype=np.uint8)
        for s in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[s:s + cfg.batch_size]
            gens = [image_generator(header["seed"], ents[i].source.relative_to(src_root).as_posix()) for _, i in chunk]
            out = mark_batch(marker, x[[i for _, i in chunk]], carriers[[j for j, _ in chunk]].contiguous(), cfg, gens)
            for (j, i), m in zip(chunk, out.permute(0, 2, 3, 1).cpu().numpy()):
                marked[j, i] = m
        vanilla_all.append(vanilla)
        marked_all.append(marked)
    return DecoyMarks(list(pools), vanilla_all, marked_all, decoys, seed, key.fingerprint)


def mirror_statistics(model: str | Path, marks: DecoyMarks, class_names: list[str]) -> np.ndarray:
    """(classes, M + 1) mean over each class's images of loss(mirror) - loss(marked) for one runnable model.

    Raises:
        RadioactiveError: unreadable model; a tested class the model does not know.
    """
    net, meta = load_runnable(model)
    size = meta.get("preprocessing", {}).get("image_size")
    out = np.zeros((len(marks.classes), marks.decoys + 1))
    for row, (k, vanilla, marked) in enumerate(zip(marks.classes, marks.vanilla, marks.marked)):
        if class_names[k] not in meta["classes"]:
            raise RadioactiveError(f"class {class_names[k]!r} of the record is unknown to {model}")
        flat = marked.reshape(-1, *marked.shape[2:])
        mirrors = [mirror_image(vanilla[n % len(vanilla)], flat[n]) for n in range(len(flat))]
        lab = np.full(len(flat), meta["classes"].index(class_names[k]))
        lm = true_class_loss(outputs_of(net, lambda n: flat[n], len(flat), size, 250), lab)
        lx = true_class_loss(outputs_of(net, lambda n: mirrors[n], len(flat), size, 250), lab)
        out[row] = np.nanmean((lx - lm).reshape(marked.shape[:2]), axis=1)
    return out


def rank_pvalues(t_stats: np.ndarray) -> np.ndarray:
    """log10 p_k = log10 (1 + #{decoys d : T_k(d) >= T_k(real)}) / (M + 1) per class; column 0 is the real carrier.

    Args:
        t_stats: (K', M + 1) statistics.

    Returns:
        (K',) log10 p_k.
    """
    real, dec = t_stats[:, 0], t_stats[:, 1:]
    return np.log10((1 + (dec >= real[:, None]).sum(1)) / (dec.shape[1] + 1))


def carrier_statistics(suspect: str | Path, references: list, marks: DecoyMarks, class_names: list[str]) -> np.ndarray:
    """(K', M + 1) T_k(c): the suspect's mirror statistic minus the references' mean (module docstring, step 3)."""
    t_stats = mirror_statistics(suspect, marks, class_names)
    if references:
        t_stats = t_stats - np.mean([mirror_statistics(r, marks, class_names) for r in references], axis=0)
    return t_stats


def decoy_carrier_detect(record: str | Path, key: Key, suspect: str | Path,
                         reference: str | Path | list[str | Path] | tuple | None = None,
                         per_class: int = 20, decoys: int = 29, seed: int = 0, alpha: float = 1e-3,
                         device: str = "cpu", marks: DecoyMarks | None = None,
                         only_classes: list[str] | tuple[str, ...] | None = None) -> DetectionResult:
    """Decoy-carrier test of a runnable suspect (module docstring: procedure, null, cost). Conservative.

    Args:
        record: the private record of ``mark`` (a lossless or lossy release; the marks are recomputed).
        key: the key the record was marked with (its fingerprint must match the record's).
        suspect: a runnable suspect (weights + sidecar, or TorchScript + sidecar).
        reference: optional runnable vanilla model(s), trained without the key (recommended: they remove
            the carrier effects shared by every model trained on these photographs); with several, m_R is
            their mean.
        per_class: n >= 1, released marked images per class used (fewer if a class has fewer).
        decoys: M >= 1 decoy carriers per class.
        seed: seed of the decoy carriers' stream, derived with the key's fingerprint (fix it before testing).
        alpha: significance level of the verdict.
        marks: :func:`decoy_marks` computed before (then per_class, decoys and seed are its own).
        only_classes: test only these classes (each once), fixed before testing (default: every class).

    Returns:
        a :class:`DetectionResult` with method ``decoy-carrier``, validity ``conservative``;
        ``class_log10_pvalues`` holds the log10 p_k, and the details hold T_k for the real carrier, the decoys'
        mean and standard deviation of T_k, n, M, the queries and the smallest reachable log10 p.

    Raises:
        RadioactiveError: as :func:`decoy_marks` and :func:`mirror_statistics`; marks made with another key.
    """
    t0 = time.time()
    if marks is None:
        marks = decoy_marks(record, key, per_class, decoys, seed, device, only_classes)
    elif marks.key_fingerprint != key.fingerprint:
        raise RadioactiveError("the decoy marks were made with another key")
    references = [reference] if isinstance(reference, (str, Path)) else list(reference or ())
    t_stats = carrier_statistics(suspect, references, marks, key.classes)
    real, dec = t_stats[:, 0], t_stats[:, 1:]
    class_log10 = rank_pvalues(t_stats)
    log10_p = fisher_log10_pvalue(class_log10)
    floor = fisher_log10_pvalue(np.full(len(class_log10), -math.log10(marks.decoys + 1)))
    queries = 2 * sum(m.shape[0] * m.shape[1] for m in marks.marked)
    return DetectionResult(
        method="decoy-carrier", validity="conservative", log10_pvalue=log10_p, alpha=alpha,
        classes=[key.classes[k] for k in marks.classes], class_log10_pvalues=class_log10.tolist(),
        dim=key.dim, key_fingerprint=key.fingerprint, suspect={"path": str(suspect)},
        settings={"references": [str(r) for r in references], "decoy_carriers": marks.decoys,
                  "classes": list(only_classes) if only_classes else None,
                  "per_class": max(len(v) for v in marks.vanilla), "decoy_seed": marks.seed},
        details=DecoyCarrierDetails(
            [str(r) for r in references], [sha256_file(Path(r)) if Path(r).is_file() else None for r in references],
            [len(v) for v in marks.vanilla], marks.decoys, stream_name(key.fingerprint, DECOY_TAG, marks.seed),
            real.tolist(), dec.mean(1).tolist(), dec.std(1, ddof=1).tolist() if marks.decoys > 1 else None,
            floor, queries),
        seconds=time.time() - t0,
    )


@dataclass(frozen=True)
class DecoyCarrierConfig:
    """Settings of the decoy-carrier test (fix them before testing any suspect; the audit plan holds them)."""

    decoy_carriers: int = setting(29, "decoy-carrier: decoy carriers per class (M)", check=lambda v: v >= 1,
                                  expected=">= 1")
    per_class: int = setting(20, "decoy-carrier: released marked images per class (n)", check=lambda v: v >= 1,
                             expected=">= 1")
    decoy_seed: int = setting(0, "decoy-carrier: seed of the decoy carriers' stream (derived from the key's "
                                 "fingerprint, so never a key's own carriers)", check=lambda v: v >= 0, expected=">= 0")
    classes: tuple[str, ...] | None = None


def _run(owner: OwnerFiles, suspect: SuspectAccess, config: DecoyCarrierConfig, alpha: float) -> DetectionResult:
    owner.need("key", "record", method="the decoy-carrier test")
    if suspect.path is None:
        raise RadioactiveError("the decoy-carrier test needs a runnable suspect (--suspect): it queries images made at "
                               "test time")
    return decoy_carrier_detect(owner.record, owner.key, suspect.path, list(owner.references), config.per_class,
                                config.decoy_carriers, config.decoy_seed, alpha, only_classes=config.classes)


def _null(owner: OwnerFiles, suspect: SuspectAccess, config: DecoyCarrierConfig, num: int, seed: int) -> np.ndarray:
    """``num`` independent null p-values: (M + 1) * num carriers per class, split into groups of M + 1; in each group
    the first carrier plays the real one (for a model that never saw the marks the key's own carrier is as fresh as
    any). Cost: num times the test's marking."""
    m = config.decoy_carriers
    marks = decoy_marks(owner.record, owner.key, config.per_class, (m + 1) * num - 1, seed, classes=config.classes)
    t_stats = carrier_statistics(suspect.path, list(owner.references), marks, owner.key.classes)
    return np.array([fisher_log10_pvalue(rank_pvalues(t_stats[:, g * (m + 1):(g + 1) * (m + 1)]))
                     for g in range(num)])


register_method(MethodEntry(
    name="decoy-carrier", run=_run, access=("runnable",), reads=("key", "record", "references"),
    optional=("references",), validity="conservative", config=DecoyCarrierConfig, null=_null,
    summary="rank of the real carrier among decoy carriers by how much the suspect prefers marked images to their "
            "mirrors (minus the references); the outputs-only test for models trained from scratch",
))
