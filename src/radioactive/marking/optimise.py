"""Marking: optimise images so that their features move along their class carrier.

Objective per image x of class k (Sablayrolles et al. 2020, Section 3.2,
with the feature penalty re-formulated, see below)::

    minimise  - phi(t(x~))^T u_k
              + lambda_img * || x~ - x ||^2
              + lambda_ft  * || P_perp( phi(t(x~)) - phi(t(x)) ) ||^2

* t: random resized crop + horizontal flip, re-drawn at every step; the same
  draw is applied to the marked and the vanilla image.
* ||x~ - x||^2 is summed over the pixels in [0, 1] and scaled by 1024 / (H W)
  (the sum for a 32 x 32 image), so that lambda_img means the same at any size.
* P_perp projects onto the orthogonal complement of u_k: the feature penalty
  keeps the image's features where they were in every direction except the
  carrier's. The paper's form (unsquared distance to the centre view of the
  vanilla image, including the carrier direction) fights both the mark and
  the augmentation (../shared/PAPER.md, "Measured on this machine").
* Constraints after every step: |x~ - x| <= linf / 255 and x~ in [0, 1];
  x~ is rounded to 8-bit levels every ``round_every`` steps and at the end
  (rounding, never truncation), so the saved image satisfies the bound.
* Per-image quality floor (``min_psnr``, applied by ``mark_folder`` after the
  optimisation, :func:`enforce_min_psnr`): an image whose PSNR is below the
  floor has its perturbation scaled down (x + s (x~ - x), re-rounded) by the
  largest s that brings it to the floor. The mean PSNR hides a tail.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..augment import AUGMENTATIONS, PadCropFlip, ResizedCropFlip
from ..errors import RadioactiveError
from ..networks import FeatureNetwork


@dataclass(frozen=True)
class MarkingConfig:
    """Settings of the marking optimisation (the defaults are the project's measured choice).

    Attributes:
        steps: optimisation steps per image.
        lr: Adam learning rate on the pixel perturbation, in [0, 1] pixel units.
        linf: L-infinity radius in 8-bit levels (1..255).
        lambda_img: weight of the squared pixel distance (summed over pixels in [0, 1], scaled to a
            32 x 32 image: multiplied by 1024 / (H W), so one value gives a similar PSNR at any size).
        lambda_ft: weight of the squared feature drift orthogonal to the carrier.
        round_every: round to 8-bit levels every this many steps (and at the end).
        batch_size: images optimised together (results do not depend on it).
        crop_scale: area range of the random resized crop.
        augmentation: ``resized_crop`` (random resized crop + flip, with ``crop_scale``) or ``pad_crop``
            (zero-pad 4 px, random 32 px crop + flip: the usual CIFAR trainer's augmentation).
        views: augmented views per step whose objectives are averaged (expectation over transformations).
        min_psnr: per-image PSNR floor in dB (0-255 scale); an image below it has its perturbation blended
            down until it reaches the floor (:func:`enforce_min_psnr`); 0 turns the floor off. Default 35 dB:
            with the linear preset on CIFAR-10 (EfficientNet-Lite0, 64 px) the worst of 200 images was at 38.8
            dB (mean 41.8), so the floor changes nothing there; the demo's from-scratch marks (mean 40.5 dB)
            have their 5th percentile at 35.8 dB and their worst at about 31.5 dB (RMSE 6.8 levels, visible
            as noise on flat areas): fewer than 5 % of them are blended. docs/images.md, "Quality floor".
        threads: CPU intra-op threads (``torch.set_num_threads``) of each process while ``mark_folder``
            marks (restored afterwards); None (default): torch's count, at least 2. Part of the arithmetic:
            on this machine a run with 1 thread and one with 2 or more differ in the last bit of some
            reductions, hence in a few 8-bit levels, while 2, 3, 4 and 8 threads agree (docs/distributed.md).
            So the default never uses 1 thread (torchrun gives each worker 1): a run's bytes do not depend on
            the number of cores or of processes.
    """

    steps: int = 50
    lr: float = 0.5 / 255
    linf: int = 10
    lambda_img: float = 10.0
    lambda_ft: float = 0.0
    round_every: int = 10
    batch_size: int = 125
    crop_scale: tuple[float, float] = (0.5, 1.0)
    augmentation: str = "resized_crop"
    views: int = 1
    min_psnr: float = 35.0
    threads: int | None = None

    def __post_init__(self):
        if self.augmentation not in AUGMENTATIONS:
            raise RadioactiveError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {self.augmentation!r}")
        if self.views < 1:
            raise RadioactiveError(f"views must be >= 1, got {self.views}")
        if not 1 <= self.linf <= 255:
            raise RadioactiveError(f"linf must be in 1..255 (8-bit levels), got {self.linf}")
        if self.threads is not None and self.threads < 1:
            raise RadioactiveError(f"threads must be >= 1, got {self.threads}")
        if self.steps < 0 or self.batch_size < 1 or self.round_every < 1:
            raise RadioactiveError("steps must be >= 0, batch_size and round_every >= 1")
        if self.lr <= 0 or self.lambda_img < 0 or self.lambda_ft < 0:
            raise RadioactiveError("lr must be > 0 and the penalty weights >= 0")
        if not (self.min_psnr == 0 or 20 <= self.min_psnr <= 80):
            raise RadioactiveError(f"min_psnr must be 0 (no floor) or in [20, 80] dB, got {self.min_psnr}")


MARKING_PRESETS: dict[str, MarkingConfig] = {
    "linear": MarkingConfig(),
    "from-scratch": MarkingConfig(augmentation="pad_crop", lambda_img=0.7),
}
"""The measured marking configurations, by the trainer they are meant for.

* ``linear``: the class defaults. With the ImageNet EfficientNet-Lite0 marking network at 64 px, they are
  what the linear-probe and fine-tuning studies measured (docs/results.md); about 42 dB.
* ``from-scratch``: the best found for suspects trained from scratch (benchmarks/studies/from_scratch/NOTES.md, cells 4-5):
  the CIFAR trainer's pad-4 crop + flip while marking, and lambda_img 0.7, the pixel weight that gives
  about 41.4 dB with an in-domain marking network whose features have a norm of about 15 (a ResNet-18
  trained at 32 px on the owner's vanilla images, ``radioactive train --recipe scratch``). With
  another marking network, check the PSNR that ``mark`` reports and adjust lambda_img.
"""


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images on the 0-255 scale; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def enforce_min_psnr(vanilla: np.ndarray, marked: np.ndarray, floor_db: float) -> tuple[np.ndarray, float]:
    """Blend a marked image towards its vanilla version until its PSNR reaches ``floor_db``.

    ``blended = round(vanilla + s * (marked - vanilla))`` (clipped to 0..255) with the largest ``s`` in [0, 1]
    (bisection to 2^-20 on s, after a first guess from the MSE's s^2 scaling) whose PSNR is at least
    ``floor_db``. Rounding keeps every change within the marked one, so the L-infinity bound still holds.

    Args:
        vanilla, marked: (H, W, 3) uint8 RGB, same shape.
        floor_db: the floor in dB (0-255 scale); 0 leaves the image as it is.

    Returns:
        (the image to write, s): ``marked`` itself and 1.0 when it is at or above the floor.
    """
    if floor_db <= 0 or psnr_db(vanilla, marked) >= floor_db:
        return marked, 1.0
    v = vanilla.astype(np.float64)
    d = marked.astype(np.float64) - v

    def at(s: float) -> np.ndarray:
        return np.clip(np.round(v + s * d), 0, 255).astype(np.uint8)

    lo, hi = 0.0, 1.0
    guess = min(1.0, math.sqrt((255.0**2 / 10 ** (floor_db / 10)) / float(np.mean(d**2))))
    if psnr_db(vanilla, at(guess)) >= floor_db:
        lo = guess
    else:
        hi = guess
    while hi - lo > 2**-20:
        mid = (lo + hi) / 2
        if psnr_db(vanilla, at(mid)) >= floor_db:
            lo = mid
        else:
            hi = mid
    return at(lo), lo


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op CPU threads (None: the current count, at least 2), then
    restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before) if n is None else n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def image_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one image's augmentation draws, from the run seed and its relative path."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def mark_batch(net: FeatureNetwork, images: torch.Tensor, carriers: torch.Tensor, config: MarkingConfig,
               generators: list[torch.Generator]) -> torch.Tensor:
    """Mark a batch of same-size images.

    Args:
        net: frozen marking network (eval mode).
        images: (B, 3, H, W) uint8 RGB vanilla images.
        carriers: (B, D) float32 unit carrier of each image's class.
        config: marking settings.
        generators: one per image, for its augmentation draws.

    Returns:
        (B, 3, H, W) uint8 marked images with |marked - vanilla| <= config.linf.
    """
    if net.training:
        raise RadioactiveError("the marking network must be in eval mode")
    dev = next(net.parameters()).device
    x = images.to(dev, torch.float32) / 255.0
    eps = config.linf / 255.0
    lo = torch.clamp(x - eps, min=0.0)
    hi = torch.clamp(x + eps, max=1.0)
    aug = ResizedCropFlip(scale=config.crop_scale) if config.augmentation == "resized_crop" else PadCropFlip()
    pixel_scale = 1024.0 / (x.shape[-2] * x.shape[-1])  # the penalty is per 32 x 32 image: same PSNR trade-off at any size
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)
    u = carriers.to(dev, torch.float32)
    for step in range(config.steps):
        xm = x + delta
        loss = config.lambda_img * (delta**2).flatten(1).sum(1) * pixel_scale
        for _ in range(config.views):
            params = aug.draw(generators)
            f = net.features(aug.apply(xm, params))
            loss = loss - (f * u).sum(1) / config.views
            if config.lambda_ft > 0:
                with torch.no_grad():
                    f0 = net.features(aug.apply(x, params))
                d = f - f0
                d_perp = d - (d * u).sum(1, keepdim=True) * u
                loss = loss + config.lambda_ft * (d_perp**2).sum(1) / config.views
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            xm = torch.maximum(torch.minimum(x + delta, hi), lo)
            if (step + 1) % config.round_every == 0:
                xm = torch.round(xm * 255) / 255
            delta.copy_(xm - x)
    with torch.no_grad():
        out = torch.round((x + delta).clamp(0, 1) * 255)
        ref = images.to(dev, torch.float32)
        out = torch.maximum(torch.minimum(out, ref + config.linf), ref - config.linf)
    return out.to(torch.uint8).cpu()


def carrier_shifts(net: FeatureNetwork, vanilla: torch.Tensor, versions: list[torch.Tensor],
                   carriers: torch.Tensor) -> list[torch.Tensor]:
    """How far each version of a batch moved the marking network's features along the carriers.

    The quantity the marking objective maximises (Sablayrolles et al. 2020, Section 3.2), on the centre
    view (no augmentation): ``(phi(v) - phi(vanilla))^T u`` per image, for each version ``v``; used to
    measure how much of a mark survives lossy compression (the released vs the lossless marked image).

    Args:
        net: the marking network (eval mode).
        vanilla: (B, 3, H, W) uint8 vanilla images.
        versions: (B, 3, H, W) uint8 images each (marked, re-encoded, ...).
        carriers: (B, D) unit carrier of each image's class.

    Returns:
        One (B,) float32 CPU tensor per version, in feature units.
    """
    dev = next(net.parameters()).device
    u = carriers.to(dev, torch.float32)
    with torch.no_grad():
        f0 = net.features(vanilla.to(dev, torch.float32) / 255.0)
        return [((net.features(v.to(dev, torch.float32) / 255.0) - f0) * u).sum(1).cpu() for v in versions]
