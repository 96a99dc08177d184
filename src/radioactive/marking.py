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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .augment import AUGMENTATIONS, PadCropFlip, ResizedCropFlip
from .data import ImageFolder, atomic_write_bytes, display_size, encode_png, list_image_folder, load_rgb
from .errors import RadioactiveError
from .keys import Key
from .networks import FeatureNetwork, load_marking_network

log = logging.getLogger(__name__)

RECORD_SCHEMA = 1


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

    def __post_init__(self):
        if self.augmentation not in AUGMENTATIONS:
            raise RadioactiveError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {self.augmentation!r}")
        if self.views < 1:
            raise RadioactiveError(f"views must be >= 1, got {self.views}")
        if not 1 <= self.linf <= 255:
            raise RadioactiveError(f"linf must be in 1..255 (8-bit levels), got {self.linf}")
        if self.steps < 0 or self.batch_size < 1 or self.round_every < 1:
            raise RadioactiveError("steps must be >= 0, batch_size and round_every >= 1")
        if self.lr <= 0 or self.lambda_img < 0 or self.lambda_ft < 0:
            raise RadioactiveError("lr must be > 0 and the penalty weights >= 0")


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images on the 0-255 scale; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


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


@dataclass
class MarkSummary:
    """What ``mark_folder`` did.

    Attributes:
        output: the released copy (ImageFolder layout).
        record: the private record (JSON lines) of the marked images.
        num_images: images in the source.
        num_marked, num_copied: images marked / written unmarked.
        num_holdout: images marked but withheld (their vanilla version is released).
        num_skipped, skipped: image files that could not be read (corrupt, truncated, over Pillow's
            size limit); each is copied unchanged into the released copy and listed with the reason.
        Every file of the source is accounted for exactly once:
        num_marked + num_copied + num_skipped + len(ignored) (+ num_holdout, released as vanilla
        copies and counted in num_copied) = files in the source.
        ignored: source files that are not images (not copied).
        psnr_db_mean, psnr_db_p5: PSNR of the marked images (dB, 0-255 scale).
        linf_max: largest |marked - vanilla| over all marked pixels (8-bit levels).
        seconds: wall time.
    """

    output: str
    record: str
    num_images: int
    num_marked: int
    num_copied: int
    num_holdout: int = 0
    num_skipped: int = 0
    skipped: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    psnr_db_mean: float | None = None
    psnr_db_p5: float | None = None
    linf_max: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def select_marked(folder: ImageFolder, fraction: float, seed: int) -> list[int]:
    """Choose round(fraction x n_k) images of every class k, uniformly at random (seeded)."""
    if not 0 < fraction <= 1:
        raise RadioactiveError(f"marked fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(folder.labels)
    chosen = []
    for k in range(len(folder.classes)):
        idx = np.flatnonzero(labels == k)
        n = int(round(fraction * len(idx)))
        chosen.extend(rng.choice(idx, size=n, replace=False).tolist())
    return sorted(chosen)


def select_holdout(folder: ImageFolder, fraction: float, seed: int, exclude: set[int]) -> list[int]:
    """Choose round(fraction x n_k) images of every class among those not in ``exclude`` (seeded, independent
    of the marked selection's draws)."""
    if not 0 <= fraction < 1:
        raise RadioactiveError(f"holdout fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 1])
    labels = np.asarray(folder.labels)
    chosen = []
    for k in range(len(folder.classes)):
        all_k = np.flatnonzero(labels == k)
        idx = np.array([i for i in all_k if i not in exclude], dtype=np.int64)
        n = min(int(round(fraction * len(all_k))), len(idx))
        chosen.extend(rng.choice(idx, size=n, replace=False).tolist())
    return sorted(chosen)


def output_name(rel: str) -> str:
    """Relative path of an image in the released copy: same folders and stem, ``.png``."""
    return str(Path(rel).with_suffix(".png").as_posix())


def check_output_dir(source: Path, output: Path, overwrite: bool) -> None:
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise RadioactiveError(f"output folder {output} is inside the source folder {source}; choose another place")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RadioactiveError(f"output folder {output} exists and is not empty (pass --overwrite to replace its files)")


def mark_folder(source: str | Path, key: Key, output: str | Path, record: str | Path | None = None,
                fraction: float | None = None, files: list[str] | None = None, seed: int = 0,
                config: MarkingConfig = MarkingConfig(), overwrite: bool = False, progress: bool = True,
                device: str = "cpu", holdout_fraction: float = 0.0, strict: bool = False) -> MarkSummary:
    """Mark a fraction of an image folder and write a complete released copy.

    Every image of the source is written to ``output`` at the same relative
    path with a ``.png`` suffix, losslessly and with the same encoder
    settings and no metadata, marked or not, so that the copy does not tell
    which images carry the mark; unmarked images keep their exact pixels.
    The private record (outside the copy) lists each marked image.

    Args:
        source: ImageFolder-style folder whose class names are the key's classes.
        key: the key (its carriers and marking network).
        output: folder of the released copy (created; never inside ``source``).
        record: private record path (JSON lines); default ``<output>.record.jsonl`` beside ``output``.
        fraction: marked fraction q in (0, 1], chosen per class; or
        files: explicit relative paths to mark (exclusive with ``fraction``).
        seed: seed of the selection and of the augmentation draws.
        config: optimisation settings.
        overwrite: allow a non-empty output folder.
        progress: show a progress bar.
        holdout_fraction: also mark this share of each class's images with the same key but do not
            release them (the released copy holds their vanilla version); their marked versions go to the
            private folder ``<record stem>.holdout/`` beside the record. They give the black-box test an exact
            control (see :mod:`radioactive.blackbox`).
        strict: fail on the first unreadable image instead of skipping it.
        device: torch device of the optimisation (``cpu``, ``cuda``); CPU results are bit-reproducible.

    Raises:
        RadioactiveError: classes differ from the key's, bad fraction or file
            list, output inside the source or not empty, unreadable images.
    """
    t0 = time.time()
    source, output = Path(source), Path(output)
    folder = list_image_folder(source)
    if tuple(folder.classes) != tuple(key.classes):
        raise RadioactiveError(
            f"the classes of {source} ({len(folder.classes)}) differ from the key's ({len(key.classes)}); "
            "make the key with `radioactive keygen --data` on this folder"
        )
    check_output_dir(source, output, overwrite)
    record = Path(record) if record else output.parent / f"{output.name}.record.jsonl"
    if record.resolve().is_relative_to(output.resolve()):
        raise RadioactiveError("the private record must be written outside the released copy")
    if record.resolve().is_relative_to(source.resolve()):
        raise RadioactiveError("the private record must be written outside the source folder")
    names: dict[str, str] = {}
    for rel in folder.files:
        other = names.setdefault(output_name(rel).lower(), rel)
        if other != rel:
            raise RadioactiveError(f"{other} and {rel} would both be written as {output_name(rel)}; rename one")
    if (fraction is None) == (files is None):
        raise RadioactiveError("give either a marked fraction or a list of files to mark")
    if files is not None:
        index = {f: i for i, f in enumerate(folder.files)}
        unknown = [f for f in files if f not in index]
        if unknown:
            raise RadioactiveError(f"{len(unknown)} listed files are not images of {source}, e.g. {unknown[0]}")
        chosen = sorted({index[f] for f in files})
    else:
        chosen = select_marked(folder, fraction, seed)
    net, spec = load_marking_network(key.network)
    net = net.to(device)
    if net.feature_dim != key.dim:
        raise RadioactiveError(f"key dimension {key.dim} differs from the marking network's {net.feature_dim}")
    marked_set = set(chosen)
    holdout = select_holdout(folder, holdout_fraction, seed, marked_set) if holdout_fraction else []
    holdout_dir = record.parent / f"{record.stem}.holdout"
    output.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({
        "kind": "radioactive-record", "schema": RECORD_SCHEMA, "package_version": __version__,
        "key_fingerprint": key.fingerprint, "classes": list(key.classes), "source": str(source.resolve()), "output": str(output.resolve()),
        "holdout": str(holdout_dir.resolve()) if holdout else None, "holdout_fraction": holdout_fraction,
        "fraction": fraction, "seed": seed, "config": asdict(config),
    })]
    psnrs, linf_max = [], 0
    bar = tqdm(total=len(chosen) + len(holdout), desc="marking", unit="img", disable=not progress)
    # a batch holds images of one size

    skipped: dict[int, str] = {}

    def skip(i: int, err: Exception) -> None:
        if strict:
            raise RadioactiveError(f"{folder.files[i]} cannot be used ({err}); --strict turns skips into failures")
        skipped[i] = str(err)
        atomic_write_bytes(output / folder.files[i], folder.path(i).read_bytes())  # unchanged, as given

    def flush(idx: list[int], released: bool):
        nonlocal linf_max
        imgs, ok = [], []
        for i in idx:
            try:
                imgs.append(load_rgb(folder.path(i)))
                ok.append(i)
            except RadioactiveError as e:
                skip(i, e)
        idx = ok
        if not idx:
            return
        batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        labels = [folder.labels[i] for i in idx]
        gens = [image_generator(seed, folder.files[i]) for i in idx]
        marked = mark_batch(net, batch, key.carriers[labels], config, gens).permute(0, 2, 3, 1).numpy()
        for i, vanilla, m, k in zip(idx, imgs, marked, labels):
            out_rel = output_name(folder.files[i])
            data = encode_png(m)
            atomic_write_bytes((output if released else holdout_dir) / out_rel, data)
            p = psnr_db(vanilla, m)
            linf = int(np.abs(vanilla.astype(np.int16) - m.astype(np.int16)).max())
            linf_max = max(linf_max, linf)
            psnrs.append(p)
            lines.append(json.dumps({
                "source": folder.files[i], "output": out_rel, "class": folder.classes[k], "carrier_index": k,
                "psnr_db": None if math.isinf(p) else round(p, 4), "linf": linf,
                "sha256": hashlib.sha256(data).hexdigest(), "released": released,
            }))
        bar.update(len(idx))
        bar.set_postfix(psnr=f"{np.mean(psnrs):.1f}dB")

    for group, released in ((chosen, True), (holdout, False)):
        pending = {}
        for i in group:
            try:
                size = display_size(folder.path(i))
            except RadioactiveError as e:
                skip(i, e)
                continue
            pending.setdefault(size, []).append(i)
            if len(pending[size]) == config.batch_size:
                flush(pending.pop(size), released)
        for idx in pending.values():
            flush(idx, released)
    bar.close()
    copied = 0
    for i in tqdm(range(len(folder)), desc="copying", unit="img", disable=not progress):
        if i in marked_set or i in skipped:
            continue
        try:
            pixels = load_rgb(folder.path(i))
        except RadioactiveError as e:
            skip(i, e)
            continue
        atomic_write_bytes(output / output_name(folder.files[i]), encode_png(pixels))
        copied += 1
    atomic_write_bytes(record, ("\n".join(lines) + "\n").encode())
    finite = [p for p in psnrs if math.isfinite(p)]
    return MarkSummary(
        output=str(output), record=str(record), num_images=len(folder),
        num_marked=len(chosen) - sum(1 for i in chosen if i in skipped), num_copied=copied,
        num_holdout=len(holdout) - sum(1 for i in holdout if i in skipped),
        num_skipped=len(skipped), skipped=[{"file": folder.files[i], "reason": r} for i, r in sorted(skipped.items())],
        ignored=list(folder.ignored),
        psnr_db_mean=float(np.mean(finite)) if finite else None,
        psnr_db_p5=float(np.percentile(finite, 5)) if finite else None,
        linf_max=linf_max, seconds=time.time() - t0,
    )
