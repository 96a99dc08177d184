"""Choose the pixel weight lambda_img that gives a target mean PSNR, on a pilot of the images a run will mark.

The PSNR a fixed lambda_img gives depends on the marking network (the scale of its features and of their
gradients): the from-scratch preset's 0.7 gave 42.45, 41.07 and 41.60 dB with three ResNet-18 marking
networks trained on one vanilla slice with seeds 0, 1 and 2 (benchmarks/studies/from_scratch/NOTES.md, "The demo"). Marks as
strong as a PSNR budget allows need the weight chosen per marking network.

Method: mark a pilot (an evenly spaced sample of the images the run marks, with the run's own seed, so each
pilot image gets exactly the marks the run will give it at that weight), and search lambda_img on a log scale:
bracket the target by halving or doubling, then interpolate log lambda_img linearly in PSNR inside the
bracket (the measured PSNR is close to linear in log lambda_img: about 6-7 dB per unit of ln lambda_img with
an in-domain ResNet-18). The returned weight is the one tried whose pilot mean is at or above the target and
closest to it, so the pilot never falls below the target. The full run's mean differs from the pilot's by the
sampling error of the pilot (a few tenths of a dB with 200 images); ``mark`` reports the full run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data import list_image_folder, read_image
from ..errors import RadioactiveError
from ..keys import Key
from ..networks import load_marking_network
from .optimise import MarkingConfig, cpu_threads, enforce_min_psnr, image_generator, mark_batch, psnr_db
from .plan import chosen_indices

PILOT_IMAGES = 200


@dataclass(frozen=True)
class LambdaCalibration:
    """The outcome of :func:`calibrate_lambda_img`.

    Attributes:
        lambda_img: the chosen pixel weight (> 0).
        psnr_db_mean: the pilot's mean PSNR at ``lambda_img``, in dB.
        target_psnr_db: the target, in dB.
        pilot_images: images in the pilot.
        reached: whether ``psnr_db_mean`` lies in [target, target + tolerance]. When not, ``lambda_img`` is the
            smallest weight tried at or above the target (its marks are the strongest tried within the budget),
            or, if no weight reached the target, the one with the highest pilot PSNR; ``stopped`` says why.
        trials: every (lambda_img, pilot mean PSNR in dB) tried, in order.
        stopped: ``tolerance`` (reached), ``plateau`` (a smaller weight no longer changes the marks: the steps or
            the L-infinity radius bind) or ``max_trials``.
    """

    lambda_img: float
    psnr_db_mean: float
    target_psnr_db: float
    pilot_images: int
    reached: bool
    trials: list[tuple[float, float]] = field(default_factory=list)
    stopped: str = "tolerance"


def calibrate_lambda_img(source: str | Path, key: Key, target_psnr_db: float, fraction: float | None = None,
                         files: list[str] | None = None, seed: int = 0,
                         config: MarkingConfig = MarkingConfig(),  # noqa: B008
                         pilot_images: int = PILOT_IMAGES, tolerance_db: float = 0.15, max_trials: int = 10,
                         device: str = "cpu") -> LambdaCalibration:
    """Find the lambda_img whose marks have a mean PSNR just above ``target_psnr_db`` (module docstring).

    Args:
        source: the ImageFolder that ``mark`` will mark (class names = the key's classes).
        key: the key (its carriers and marking network).
        target_psnr_db: the mean PSNR wanted, in dB (20 to 80; the project's imperceptibility floor is 40).
        fraction, files, seed: as for :func:`radioactive.marking.mark_folder`: they decide which images the run
            marks; the pilot is an evenly spaced sample of them.
        config: the other marking settings (steps, L-infinity radius, augmentation, ...); its lambda_img is the
            first weight tried (1.0 if it is 0).
        pilot_images: at most this many images are marked per trial (>= 1).
        tolerance_db: stop once a pilot mean lies in [target, target + tolerance_db].
        max_trials: at most this many pilot markings (>= 2).
        device: torch device of the optimisation.

    Returns:
        a :class:`LambdaCalibration`; use ``replace(config, lambda_img=result.lambda_img)`` for the run.

    Raises:
        RadioactiveError: a target outside [20, 80] dB, 0 steps, bad pilot size, tolerance or trial count, classes that
            differ from the key's, a bad fraction or file list, or no readable pilot image.
    """
    if not 20 <= target_psnr_db <= 80:
        raise RadioactiveError(f"the target PSNR must be in [20, 80] dB, got {target_psnr_db}")
    if pilot_images < 1 or max_trials < 2 or tolerance_db <= 0:
        raise RadioactiveError("pilot_images must be >= 1, max_trials >= 2 and tolerance_db > 0")
    if config.steps == 0:
        raise RadioactiveError("0 marking steps leave every image unmarked: there is no pixel weight to calibrate")
    folder = list_image_folder(source)
    if tuple(folder.classes) != tuple(key.classes):
        raise RadioactiveError(f"the classes of {source} differ from the key's")
    chosen = chosen_indices(folder, fraction, files, seed)
    pilot = [chosen[int(j)] for j in np.unique(np.linspace(0, len(chosen) - 1, min(pilot_images, len(chosen))).round())]
    groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    for i in pilot:
        try:
            pixels = read_image(folder.path(i)).pixels
        except RadioactiveError:
            continue  # the run skips it too
        groups.setdefault(pixels.shape, []).append((i, pixels))
    if not groups:
        raise RadioactiveError(f"none of the {len(pilot)} pilot images of {source} could be read")
    net = load_marking_network(key.network)[0].to(device)
    if net.feature_dim != key.dim:
        raise RadioactiveError(f"key dimension {key.dim} differs from the marking network's {net.feature_dim}")

    def pilot_psnr(lam: float) -> float:
        cfg = replace(config, lambda_img=lam)
        values = []
        with cpu_threads(config.threads):
            for items in groups.values():
                for b in range(0, len(items), config.batch_size):
                    part = items[b:b + config.batch_size]
                    x = torch.from_numpy(np.stack([p for _, p in part])).permute(0, 3, 1, 2).contiguous()
                    labels = [folder.labels[i] for i, _ in part]
                    marked = mark_batch(net, x, key.carriers[labels], cfg,
                                        [image_generator(seed, folder.files[i]) for i, _ in part])
                    for (_, v), m in zip(part, marked.permute(0, 2, 3, 1).numpy()):
                        p = psnr_db(v, enforce_min_psnr(v, m, cfg.min_psnr)[0])  # as the run writes it
                        if math.isfinite(p):
                            values.append(p)
        return float(np.mean(values)) if values else math.inf

    lam0 = config.lambda_img if config.lambda_img > 0 else 1.0
    return search_lambda(pilot_psnr, lam0, target_psnr_db, tolerance_db, max_trials, len(pilot))


def search_lambda(psnr_at, lam0: float, target_psnr_db: float, tolerance_db: float, max_trials: int,
                  pilot_images: int = 0) -> LambdaCalibration:
    """The search of :func:`calibrate_lambda_img`, given ``psnr_at(lambda_img) -> mean PSNR in dB`` (module
    docstring): ``hi`` is the smallest weight tried at or above the target, ``lo`` the largest below it.

    Stops (``LambdaCalibration.stopped``) at ``tolerance`` (a pilot mean in [target, target + tolerance_db]),
    ``plateau`` (halving the weight no longer changes the pilot mean, or the bracket cannot shrink further) or
    ``max_trials``.
    """
    trials: list[tuple[float, float]] = []
    lo = hi = None  # (lambda, psnr)
    lam, stopped = lam0, "max_trials"
    while len(trials) < max_trials:
        p = psnr_at(lam)
        trials.append((lam, p))
        if p >= target_psnr_db:
            hi = (lam, p) if hi is None or lam < hi[0] else hi
        else:
            lo = (lam, p) if lo is None or lam > lo[0] else lo
        if hi is not None and hi[1] - target_psnr_db <= tolerance_db:
            stopped = "tolerance"
            break
        if lo is None and len(trials) >= 2 and (trials[-1][1] == trials[-2][1]
                                                 or abs(trials[-1][1] - trials[-2][1]) < 0.01):
            stopped = "plateau"  # halving lambda_img no longer changes the marks: the steps or the L-inf radius bind
            break
        if lo is None:
            lam = lam / 2
        elif hi is None:
            lam = lam * 2
        else:  # interpolate log lambda linearly in PSNR, kept inside the middle 80 % of the bracket
            a, b = math.log(lo[0]), math.log(hi[0])
            t = (target_psnr_db - lo[1]) / (hi[1] - lo[1]) if math.isfinite(hi[1]) else 0.5
            lam = math.exp(a + min(max(t, 0.1), 0.9) * (b - a))
            if b - a < 1e-6:
                stopped = "plateau"
                break
    if hi is None:
        best = max(trials, key=lambda t: t[1])
        return LambdaCalibration(best[0], best[1], target_psnr_db, pilot_images, False, trials, stopped)
    return LambdaCalibration(hi[0], hi[1], target_psnr_db, pilot_images, stopped == "tolerance", trials, stopped)
