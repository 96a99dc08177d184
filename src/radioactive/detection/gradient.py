"""Gradient test: a white-box test of a suspect trained from scratch, through its input gradients.

Why: a network trained from scratch on marked images has its own feature space, which a linear alignment
to the marking network's does not recover at small scale (benchmarks/studies/from_scratch/NOTES.md), so the classic white-box
test of its classifier rows fails. But such a suspect learns each carrier as a cue for its class: near
the vanilla version x of a marked image, moving the pixels so that the marking network's features phi
move along the class's carrier u lowers the suspect's loss. The test asks the suspect which way it wants
each image to move, and reads that direction in the marking network's feature space:

    h(x) = J_phi(x) (-grad_x CE(S(x) / T, y))   (D,)   a Jacobian-vector product through the marker
    S_k  = sum over the test images x of class k of [h_S(x) - mean over references R of h_R(x)]
    c_k  = cos(S_k, u_k),   p_k = P(C >= c_k) for C the cosine of a uniform random unit vector in R^D
    p    = Fisher's combination of the p_k over the tested classes.

<u_k, h(x)> is the first-order change of the suspect's loss when x moves by the one-step mark
J_phi(x)^T u_k (the gradient direction of the marking objective, Sablayrolles et al. 2020, Section 3.2),
so c_k is large when the suspect prefers images marked with the real carrier. T is a temperature on the
logits, fixed before any test (default :data:`TEMPERATURE`): a suspect fits its training images, so at T = 1
the softmax saturates and the few images it fits worst dominate each sum; a softer softmax weighs the images
more evenly. The null holds for any T. The references are models
the owner trained on vanilla images, without the key; subtracting them removes the part of h that any
model trained on these photographs shares (without a reference that shared part dominates and the test
loses most of its power: benchmarks/studies/from_scratch/NOTES.md).

The test images are the vanilla originals of the released marked images, listed in the private record.

Null hypothesis H0: the suspect and the references are independent of the key (e.g. never trained on
data marked with it). The test images are chosen by the record's seed, not by the carriers, and are
read unmarked, so S_k is then independent of u_k, which is uniform on the unit sphere: c_k has exactly
the null density of :func:`radioactive.stats.cosine_log10_pvalue` (Sablayrolles et al. 2020, Section 3),
whatever the models are. Carriers are independent across classes, so the p_k are independent and
Fisher's combination is exact. Never use marked images here: their pixels depend on the carriers.

Cost: per model, one backward pass of the model and one forward-mode Jacobian-vector product of the
marking network per image: about 3 s per model for 1,000 CIFAR images (ResNet-18 suspect and marker,
2 idle CPU cores). Memory: one batch of images and K x D sums per model.

Fix the references before looking at a suspect's result: which vanilla model serves as the reference
moves a reading by up to 1.7 orders of magnitude (benchmarks/studies/from_scratch/NOTES.md), so choosing it afterwards
would bias the p-value. Innocent models tested with the same key and references get correlated
p-values (they share S_k's reference part); each p-value is still exact.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_rgb, sha256_file, to_batch
from ..data.record import RecordEntry, read_record
from ..errors import RadioactiveError
from ..keys import Key
from ..networks import FeatureNetwork, load_marking_network
from ..stats import cosine_log10_pvalue, fisher_log10_pvalue
from ..suspects import load_runnable
from .access import OwnerFiles, SuspectAccess, check_unique, derived_rng, unit_vectors
from .registry import MethodEntry, register_method, setting
from .result import DetectionResult, GradientDetails

TEMPERATURE = 2.0
"""Default T of the gradient test's loss (module docstring). Measured on the demo replicates
(benchmarks/studies/from_scratch/NOTES.md,
"Calibrated marks and a softer loss"): with one reference, T = 2 read p-values 1.4 to 3.9 orders of magnitude
lower than T = 1 on six marked suspects, the vanilla controls unchanged (-0.15 to -1.19); chosen among 1, 2, 4, 8
and 16 on three of the suspects, then confirmed on the three others."""


def pulled_back_gradients(model: torch.nn.Module, marker: FeatureNetwork, images: torch.Tensor,
                          labels: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """h(x) = J_phi(x) (-grad_x CE(model(x) / T, y)) for a batch (module docstring).

    Args:
        model: maps (B, 3, H, W) images in [0, 1] to (B, K) logits; autograd must differentiate it in its input.
        marker: the marking network; phi = its features (input of its last linear layer).
        images: (B, 3, H, W) float images in [0, 1], vanilla.
        labels: (B,) int64 class indices in the model's class order.
        temperature: T > 0, dividing the logits (default :data:`TEMPERATURE`).

    Returns:
        (B, D) float64: the first-order change of the marking network's features when each image moves
        along the negative gradient of its own cross-entropy loss. Only its direction is used.

    Raises:
        RadioactiveError: T <= 0; the model is not differentiable in its input, or gives outputs of another shape
            than (B, K > max label).
    """
    if not temperature > 0:
        raise RadioactiveError(f"temperature must be > 0, got {temperature}")
    x = images.detach().clone().requires_grad_(True)
    logits = model(x)
    if logits.ndim != 2 or logits.shape[0] != len(x) or logits.shape[1] <= int(labels.max()):
        raise RadioactiveError(f"the model gives outputs of shape {tuple(logits.shape)} for {len(x)} images of "
                               f"{int(labels.max()) + 1}+ classes")
    try:
        (grad,) = torch.autograd.grad(F.cross_entropy(logits / temperature, labels, reduction="sum"), x)
    except RuntimeError as e:
        raise RadioactiveError(f"the model is not differentiable in its input, which the gradient test needs ({e})") from e
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        _, jvp = torch.func.jvp(marker.features, (images.detach(),), (-grad,))
    return jvp.double()


def _batches(entries: list[RecordEntry], batch_size: int):
    """Consecutive runs of at most batch_size entries whose images have one size: (entries, (B, 3, H, W) in [0, 1])."""
    run, imgs = [], []
    for e in entries:
        if e.sha256 and sha256_file(e.source) == e.sha256:
            raise RadioactiveError(f"{e.source} is byte-identical to its marked output: the test needs the vanilla "
                                   "originals (give their folder with source_root / --source)")
        a = load_rgb(e.source)
        if run and (len(run) == batch_size or a.shape != imgs[0].shape):
            yield run, to_batch(imgs)
            run, imgs = [], []
        run.append(e)
        imgs.append(a)
    if run:
        yield run, to_batch(imgs)


TEMPERATURE_RANGE = (0.1, 100.0)
"""Accepted T (inclusive); the one home of this range (CLI, configs and checks read it)."""


def _check_temperature(t: float) -> None:
    lo, hi = TEMPERATURE_RANGE
    if not lo <= t <= hi:
        raise RadioactiveError(f"temperature must be in [{lo:g}, {hi:g}], got {t}")


def gradient_statistic(record: str | Path, key: Key, suspect: str | Path,
                       reference: str | Path | list[str | Path] | tuple = (), only_classes: list[str] | None = None,
                       source_root: str | Path | None = None, batch_size: int = 100, device: str = "cpu",
                       temperature: float = TEMPERATURE) -> tuple[torch.Tensor, list[int], dict]:
    """S_k for every tested class (module docstring): the part of the test that does not depend on the carriers.

    Returns:
        S (K', D) float64 (suspect minus the references' mean), the key's class indices tested (sorted), and
        ``{"suspect_sha256", "reference_sha256", "images_per_class"}``.

    Raises:
        RadioactiveError: as :func:`gradient_detect`.
    """
    if batch_size < 1:
        raise RadioactiveError("batch_size must be at least 1")
    _check_temperature(temperature)
    check_unique(only_classes)
    references = [reference] if isinstance(reference, (str, Path)) else list(reference)
    suspect_sha = sha256_file(Path(suspect)) if Path(suspect).is_file() else None
    reference_sha = [sha256_file(Path(r)) if Path(r).is_file() else None for r in references]
    for r, r_sha in zip(references, reference_sha):
        if Path(r).resolve() == Path(suspect).resolve() or (r_sha is not None and r_sha == suspect_sha):
            raise RadioactiveError(f"the reference {r} is the suspect itself: a reference must be a vanilla model "
                                   "trained without the key")
    header, entries = read_record(record, source_root)
    if header.get("key_fingerprint") != key.fingerprint:
        raise RadioactiveError(f"the key ({key.fingerprint}) is not the one the record was marked with "
                               f"({header.get('key_fingerprint')})")
    index = {c: i for i, c in enumerate(key.classes)}
    if only_classes is not None:
        unknown = sorted(set(only_classes) - set(index))
        if unknown:
            raise RadioactiveError(f"classes {unknown} are not in the key")
    wanted = set(index) if only_classes is None else set(only_classes)
    chosen = [e for e in entries if e.released and e.class_name in wanted]
    if not chosen:
        raise RadioactiveError(f"{record} lists no released marked image of the tested classes")
    classes = sorted({index[e.class_name] for e in chosen})
    row = {k: i for i, k in enumerate(classes)}
    marker = load_marking_network(key.network)[0].to(device).eval()
    for p in marker.parameters():
        p.requires_grad_(False)
    models = []
    for path in [suspect, *references]:
        net, meta = load_runnable(path)
        missing = sorted({key.classes[k] for k in classes} - set(meta["classes"]))
        if missing:
            raise RadioactiveError(f"classes {missing} of the record are unknown to {path}")
        models.append((path, net.to(device).eval(), meta["classes"]))
    sums = torch.zeros(len(models), len(classes), key.dim, dtype=torch.float64)
    for batch, x in _batches(chosen, batch_size):
        rows = torch.tensor([row[index[e.class_name]] for e in batch])
        for m, (path, net, names) in enumerate(models):
            labels = torch.tensor([names.index(e.class_name) for e in batch], device=device)
            h = pulled_back_gradients(net, marker, x.to(device), labels, temperature).cpu()
            if not torch.isfinite(h).all():
                raise RadioactiveError(f"{path} gives non-finite gradients on {batch[0].source.parent}")
            sums[m].index_add_(0, rows, h)
    stat = sums[0] - sums[1:].mean(0) if references else sums[0]
    if references and bool((stat.norm(dim=1) <= 1e-9 * sums[0].norm(dim=1)).any()):
        raise RadioactiveError("the suspect's gradients equal the references' mean: it cannot be told from them "
                               "(is a reference a copy of the suspect?)")
    info = {"suspect_sha256": suspect_sha, "reference_sha256": reference_sha,
            "images_per_class": [sum(index[e.class_name] == k for e in chosen) for k in classes]}
    return stat, classes, info


def gradient_pvalues(stat: torch.Tensor | np.ndarray, carriers: torch.Tensor | np.ndarray,
                     dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Cosines c_k = cos(S_k, u_k), their exact one-sided log10 p_k and Fisher's combination.

    Args:
        stat: (K', D) S_k. carriers: (K', D) the carriers of the same classes. dim: D.

    Returns:
        (K',) cosines in [-1, 1], (K',) log10 p_k, combined log10 p.
    """
    s = torch.as_tensor(np.asarray(stat), dtype=torch.float64)
    u = torch.as_tensor(np.asarray(carriers), dtype=torch.float64)
    cos = F.cosine_similarity(s, u, dim=1).numpy()
    class_log10 = np.asarray(cosine_log10_pvalue(cos, dim), dtype=float).reshape(-1)
    return cos, class_log10, float(fisher_log10_pvalue(class_log10))


def gradient_detect(record: str | Path, key: Key, suspect: str | Path,
                    reference: str | Path | list[str | Path] | tuple = (), alpha: float = 1e-3,
                    only_classes: list[str] | None = None, source_root: str | Path | None = None,
                    batch_size: int = 100, device: str = "cpu", temperature: float = TEMPERATURE) -> DetectionResult:
    """Gradient test of a differentiable suspect (module docstring: statistic, null, cost). Exact.

    Args:
        record: the private record of ``mark``; the vanilla originals of its released marked images are
            read (never the marked images; holdout and withheld entries are not used).
        key: the key the record was marked with (its fingerprint must match the record's); its marking
            network is loaded.
        suspect: a runnable suspect (weights + sidecar, or TorchScript + sidecar) that autograd can
            differentiate in its input.
        reference: zero or more runnable models trained on vanilla data without the key (recommended; their
            h are averaged); none may be the suspect's file.
        alpha: significance level of the verdict, in (0, 1).
        only_classes: test only these classes, each once (chosen before looking at any result keeps the test exact).
        source_root: the folder of vanilla originals, if it moved since marking (default: the record's).
        batch_size: images per pass (>= 1).
        device: torch device of the models (``cpu``, ``cuda``).
        temperature: T dividing every model's logits, in :data:`TEMPERATURE_RANGE` (module docstring); fix it
            before testing.

    Returns:
        a :class:`DetectionResult` with method ``gradient``: per-class cosines c_k in [-1, 1], their log10 p_k, and
        the combined log10 p; its details hold the record, the references (paths and sha256) and the images per class.

    Raises:
        RadioactiveError: bad alpha, batch size or temperature; duplicate classes; the record has no key fingerprint or
            another key's; no released marked image of the tested classes; an unknown class; unreadable images or
            models; a source image identical to its marked output; a reference that is the suspect's file; a model
            that is not differentiable, gives non-finite gradients, or cannot be told from the references.
    """
    t0 = time.time()
    if not 0 < alpha < 1:
        raise RadioactiveError(f"alpha must be in (0, 1), got {alpha}")
    references = [reference] if isinstance(reference, (str, Path)) else list(reference)
    stat, classes, info = gradient_statistic(record, key, suspect, references, only_classes, source_root, batch_size,
                                             device, temperature)
    cos, class_log10, log10_p = gradient_pvalues(stat, key.carriers[classes], key.dim)
    return DetectionResult(
        method="gradient", validity="exact", log10_pvalue=log10_p, alpha=alpha,
        classes=[key.classes[k] for k in classes], class_log10_pvalues=class_log10.tolist(), cosines=cos.tolist(),
        dim=key.dim, key_fingerprint=key.fingerprint, suspect={"path": str(suspect), "sha256": info["suspect_sha256"]},
        settings={"temperature": temperature, "references": [str(r) for r in references],
                  "classes": list(only_classes) if only_classes else None},
        details=GradientDetails(str(record), [str(r) for r in references], info["reference_sha256"], temperature,
                                info["images_per_class"]),
        seconds=time.time() - t0,
    )


@dataclass(frozen=True)
class GradientConfig:
    """Settings of the gradient test (fix them before testing any suspect; the audit plan holds them)."""

    temperature: float = setting(TEMPERATURE, "gradient: T dividing the models' logits in the test's loss",
                                 check=lambda v: TEMPERATURE_RANGE[0] <= v <= TEMPERATURE_RANGE[1],
                                 expected=f"in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]")
    batch_size: int = 100
    classes: tuple[str, ...] | None = None


def _run(owner: OwnerFiles, suspect: SuspectAccess, config: GradientConfig, alpha: float) -> DetectionResult:
    owner.need("key", "record", method="the gradient test")
    if suspect.path is None:
        raise RadioactiveError("the gradient test needs a runnable, differentiable suspect (--suspect)")
    return gradient_detect(owner.record, owner.key, suspect.path, list(owner.references), alpha, config.classes,
                           owner.source_root, config.batch_size, temperature=config.temperature)


def _null(owner: OwnerFiles, suspect: SuspectAccess, config: GradientConfig, num: int, seed: int) -> np.ndarray:
    """Combined log10 p-values of ``num`` fresh keys against this suspect's S_k (the models never saw them)."""
    stat, classes, _ = gradient_statistic(owner.record, owner.key, suspect.path, list(owner.references),
                                          config.classes, owner.source_root, config.batch_size,
                                          temperature=config.temperature)
    rng = derived_rng(owner.key.fingerprint, "calibration keys", seed)
    return np.array([gradient_pvalues(stat, unit_vectors(rng, len(classes), owner.key.dim), owner.key.dim)[2]
                     for _ in range(num)])


register_method(MethodEntry(
    name="gradient", run=_run, access=("weights",), reads=("key", "record", "references"), optional=("references",),
    validity="exact", config=GradientConfig, null=_null,
    summary="cosine of each carrier with the suspect's input gradients on the vanilla originals, pulled back "
            "through the marking network, minus the references'; for models trained from scratch",
))
