"""Gradient test: a white-box test of a suspect trained from scratch, through its input gradients.

Why: a network trained from scratch on marked images has its own feature space, which a linear alignment
to the marking network's does not recover at small scale (docs/from-scratch.md), so the classic white-box
test of its classifier rows fails. But such a suspect learns each carrier as a cue for its class: near
the vanilla version x of a marked image, moving the pixels so that the marking network's features phi
move along the class's carrier u lowers the suspect's loss. The test asks the suspect which way it wants
each image to move, and reads that direction in the marking network's feature space:

    h(x) = J_phi(x) (-grad_x CE_S(x, y))         (D,)   a Jacobian-vector product through the marker
    S_k  = sum over the test images x of class k of [h_S(x) - mean over references R of h_R(x)]
    c_k  = cos(S_k, u_k),   p_k = P(C >= c_k) for C the cosine of a uniform random unit vector in R^D
    p    = Fisher's combination of the p_k over the tested classes.

<u_k, h(x)> is the first-order change of the suspect's loss when x moves by the one-step mark
J_phi(x)^T u_k (the gradient direction of the marking objective, Sablayrolles et al. 2020, Sec. 4.1),
so c_k is large when the suspect prefers images marked with the real carrier. The references are models
the owner trained on vanilla images, without the key; subtracting them removes the part of h that any
model trained on these photographs shares (without a reference that shared part dominates and the test
loses most of its power: docs/from-scratch.md).

The test images are the vanilla originals of the released marked images, listed in the private record.

Null hypothesis H0: the suspect and the references are independent of the key (e.g. never trained on
data marked with it). The test images are chosen by the record's seed, not by the carriers, and are
read unmarked, so S_k is then independent of u_k, which is uniform on the unit sphere: c_k has exactly
the null density of :func:`radioactive.stats.cosine_log10_pvalue` (Sablayrolles et al. 2020, Sec. 3),
whatever the models are. Carriers are independent across classes, so the p_k are independent and
Fisher's combination is exact. Never use marked images here: their pixels depend on the carriers.

Cost: per model, one backward pass of the model and one forward-mode Jacobian-vector product of the
marking network per image (about 3 s for 1,000 CIFAR images with a ResNet-18 on 2 CPU cores).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .blackbox import read_record
from .data import load_rgb
from .detection import DetectionResult
from .errors import RadioactiveError
from .keys import Key
from .networks import FeatureNetwork, load_marking_network, load_runnable
from .stats import cosine_log10_pvalue, fisher_log10_pvalue


def pulled_back_gradients(model: torch.nn.Module, marker: FeatureNetwork, images: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """h(x) = J_phi(x) (-grad_x CE(model(x), y)) for a batch (module docstring).

    Args:
        model: maps (B, 3, H, W) images in [0, 1] to (B, K) logits (a runnable suspect or reference).
        marker: the marking network; phi = its features (input of its last linear layer).
        images: (B, 3, H, W) float images in [0, 1], vanilla.
        labels: (B,) int64 class indices in the model's class order.

    Returns:
        (B, D) float64: the first-order change of the marking network's features when each image moves
        along the negative gradient of its own cross-entropy loss (nats per unit pixel step, pixels in [0, 1]).
    """
    x = images.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        _, jvp = torch.func.jvp(marker.features, (images.detach(),), (-grad,))
    return jvp.double()


def _model_h(path: str | Path, marker: FeatureNetwork, images: list[np.ndarray], class_names: list[str],
             batch_size: int, device: str) -> torch.Tensor:
    net, meta = load_runnable(path)
    net = net.to(device).eval()
    missing = sorted(set(class_names) - set(meta["classes"]))
    if missing:
        raise RadioactiveError(f"classes {missing} of the record are unknown to {path}")
    labels = torch.tensor([meta["classes"].index(c) for c in class_names])
    out = []
    start = 0
    while start < len(images):  # batches of consecutive images of one size
        stop = start + 1
        while stop < min(len(images), start + batch_size) and images[stop].shape == images[start].shape:
            stop += 1
        x = torch.from_numpy(np.stack(images[start:stop])).permute(0, 3, 1, 2).float().div(255).to(device)
        out.append(pulled_back_gradients(net, marker, x, labels[start:stop].to(device)).cpu())
        start = stop
    return torch.cat(out)


def gradient_detect(record: str | Path, key: Key, suspect: str | Path,
                    reference: str | Path | list[str | Path] | tuple = (), alpha: float = 1e-3,
                    batch_size: int = 100, device: str = "cpu") -> DetectionResult:
    """Gradient test of a differentiable suspect (module docstring: statistic, null, cost).

    Args:
        record: the private record of ``mark``; its released marked images' vanilla originals are read
            (the ``source`` folder must still hold them, unchanged).
        key: the key the record was marked with (its fingerprint must match the record's); its marking
            network is loaded.
        suspect: a runnable suspect (weights + sidecar, or TorchScript + sidecar) that autograd can
            differentiate.
        reference: zero or more runnable models trained on vanilla data without the key (recommended; one
            or more, their h are averaged).
        alpha: significance level of the verdict, in (0, 1).
        batch_size: images per pass (>= 1).

    Returns:
        a :class:`DetectionResult` with method ``white-box gradient``: per-class cosines c_k in [-1, 1],
        their log10 p_k, and the combined log10 p; ``extra`` holds the references and images per class.

    Raises:
        RadioactiveError: the key does not match the record, no released marked image of the key's
            classes, unreadable images or models, a class the suspect or a reference does not know.
    """
    t0 = time.time()
    if batch_size < 1:
        raise RadioactiveError("batch_size must be at least 1")
    references = [reference] if isinstance(reference, (str, Path)) else list(reference)
    header, entries = read_record(record)
    if header.get("key_fingerprint") and header["key_fingerprint"] != key.fingerprint:
        raise RadioactiveError(f"the key ({key.fingerprint}) is not the one the record was marked with "
                               f"({header['key_fingerprint']})")
    index = {c: i for i, c in enumerate(key.classes)}
    chosen = [e for e in entries if e.released and e.class_name in index]
    if not chosen:
        raise RadioactiveError(f"{record} lists no released marked image of the key's classes")
    images = [load_rgb(e.source) for e in chosen]
    names = [e.class_name for e in chosen]
    marker = load_marking_network(key.network)[0].to(device).eval()
    for p in marker.parameters():
        p.requires_grad_(False)
    h = _model_h(suspect, marker, images, names, batch_size, device)
    if references:
        h = h - torch.stack([_model_h(r, marker, images, names, batch_size, device) for r in references]).mean(0)
    ks = np.array([index[c] for c in names])
    classes = sorted(set(ks.tolist()))
    sums = torch.stack([h[torch.from_numpy(ks == k)].sum(0) for k in classes])
    cos = F.cosine_similarity(sums, key.carriers[classes].double(), dim=1).nan_to_num(0.0).numpy()
    class_log10 = np.asarray(cosine_log10_pvalue(cos, key.dim), dtype=float)
    log10_p = fisher_log10_pvalue(class_log10)
    return DetectionResult(
        method="white-box gradient", log10_pvalue=log10_p, detected=bool(log10_p < np.log10(alpha)), alpha=alpha,
        classes=[key.classes[k] for k in classes], cosines=cos.tolist(), class_log10_pvalues=class_log10.tolist(),
        dim=key.dim, key_fingerprint=key.fingerprint, suspect={"path": str(suspect)}, seconds=time.time() - t0,
        extra={"test": "cosine of each carrier with the sum over its class's vanilla images of the suspect's "
                       "negative input gradient pulled back through the marking network (minus the references' "
                       "mean); Fisher's combination over classes",
               "reference": [str(r) for r in references],
               "images_per_class": [int((ks == k).sum()) for k in classes]},
    )
