"""Marking throughput: our batched marker against the official loop, at equal quality.

Marks the same images with
  (a) ours: ``radioactive.marking.mark_batch`` (all images of a batch optimised together,
      Adam, 50 steps, per-image augmentation draws), and
  (b) a re-implementation of the official loop as its README runs it
      (facebookresearch/radioactive_data, make_data_radioactive.py): one image per
      optimiser; plain SGD, lr 1.0, on ImageNet-normalised pixels; 90 steps;
      loss = -(phi(t(x~)) - phi(x))^T u + 0.0005 ||x~ - x||^2 + 0.01 ||phi(t(x~)) - phi(x)||
      (norms on normalised pixels / features, phi(x) on the centre view); projection on the
      L-inf ball (10 levels) after every step; rounding to 8-bit levels every 10 steps and at
      the end; random resized crop + flip re-drawn every step.
Both use the same marking network (EfficientNet-Lite0, the project's) and the same
augmentation code, so only the loop differs. Reports images/s, mean PSNR (dB, 0-255) and
the mean feature shift along the carrier (measured on the centre view) for each, their
ratios, and achieved GFLOP/s against this machine's measured fp32 matrix-multiply peak.
The last line is one JSON object.

    python benchmarks/perf/marking_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from radioactive.augment import ResizedCropFlip
from radioactive.data import extract_cifar10, list_image_folder, load_rgb
from radioactive.keys import random_carriers
from radioactive.marking import MarkingConfig, image_generator, mark_batch, psnr_db
from radioactive.networks import MarkingNetworkSpec, load_marking_network


def official_loop(net, image: torch.Tensor, carrier: torch.Tensor, gen: torch.Generator, steps=90, lr=1.0,
                  lambda_ft_l2=0.01, lambda_l2_img=0.0005, radius=10, round_every=10) -> torch.Tensor:
    """One image (3, H, W) uint8 -> marked uint8, following the official loop."""
    pre = net.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    x0 = (image[None].float() / 255 - mean) / std  # normalised pixels
    raw = net.model  # works on normalised pixels; resize done below
    aug = ResizedCropFlip()

    def phi(xn):
        captured = {}
        h = net.classifier.register_forward_pre_hook(lambda m, i: captured.setdefault("f", i[0]))
        s = pre.image_size
        if s is not None and tuple(xn.shape[-2:]) != (s, s):
            xn = torch.nn.functional.interpolate(xn, size=(s, s), mode="bilinear", align_corners=False)
        raw(xn)
        h.remove()
        return captured["f"].flatten(1)

    with torch.no_grad():
        ft_orig = phi(x0)
    img = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([img], lr=lr)
    eps = radius / 255 / std
    for i in range(steps):
        ft = phi(aug.apply(img, aug.draw([gen])))
        loss = -((ft - ft_orig) * carrier).sum() + lambda_ft_l2 * (ft - ft_orig).norm(dim=1).sum() \
            + lambda_l2_img * (img - x0).norm() ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            img.copy_(torch.maximum(torch.minimum(img, x0 + eps), x0 - eps))
            if i % round_every == 0:
                img.copy_((((img * std + mean).clamp(0, 1) * 255).round() / 255 - mean) / std)
    with torch.no_grad():
        out = ((img * std + mean).clamp(0, 1) * 255).round()
        out = torch.maximum(torch.minimum(out, image[None].float() + radius), image[None].float() - radius)
    return out[0].to(torch.uint8)


def matmul_peak_gflops(n=2048, reps=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def step_gflops(net, size: int) -> float:
    """GFLOP of one forward + backward of the marking network on one image (forward x 3)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, size, size, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        net.features(x).sum().backward()
    return fc.get_total_flops() / 1e9


def measure(net, images: list[np.ndarray], carriers: torch.Tensor, label: str, batch: int) -> dict:
    u = carriers
    res = {}
    # ours
    t = time.perf_counter()
    ours = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[s:s + batch])).permute(0, 3, 1, 2).contiguous()
        gens = [image_generator(0, f"{label}-{i}") for i in range(s, s + len(x))]
        ours.extend(mark_batch(net, x, u[s:s + len(x)], MarkingConfig(batch_size=batch), gens).permute(0, 2, 3, 1).numpy())
    res["ours_seconds"] = time.perf_counter() - t
    # official
    t = time.perf_counter()
    base = []
    for i, im in enumerate(images):
        x = torch.from_numpy(im).permute(2, 0, 1).contiguous()
        base.append(official_loop(net, x, u[i:i + 1], image_generator(1, f"{label}-{i}")).permute(1, 2, 0).numpy())
    res["baseline_seconds"] = time.perf_counter() - t

    def quality(marked):
        ps = [psnr_db(a, b) for a, b in zip(images, marked)]
        shifts = []
        with torch.no_grad():
            for s in range(0, len(images), 50):
                v = torch.from_numpy(np.stack(images[s:s + 50])).permute(0, 3, 1, 2).float() / 255
                m = torch.from_numpy(np.stack(marked[s:s + 50])).permute(0, 3, 1, 2).float() / 255
                shifts.append(((net.features(m) - net.features(v)) * u[s:s + 50]).sum(1))
        return float(np.mean(ps)), float(torch.cat(shifts).mean())

    res["ours_psnr_db"], res["ours_shift"] = quality(ours)
    res["baseline_psnr_db"], res["baseline_shift"] = quality(base)
    n = len(images)
    res["ours_images_per_s"] = n / res["ours_seconds"]
    res["baseline_images_per_s"] = n / res["baseline_seconds"]
    res["ratio"] = res["ours_images_per_s"] / res["baseline_images_per_s"]
    res["psnr_delta_db"] = res["ours_psnr_db"] - res["baseline_psnr_db"]
    res["shift_ratio"] = res["ours_shift"] / res["baseline_shift"] if res["baseline_shift"] else float("nan")
    return res


def imagenet_photos(n: int) -> list[np.ndarray]:
    from radioactive.data import default_data_dir

    out = []
    with tarfile.open(default_data_dir() / "imagenet-samples-250.tar") as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if m.name.endswith(".JPEG") and len(out) < n:
                im = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                w, h = im.size
                c = min(w, h)
                im = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c)).resize((224, 224))
                out.append(np.asarray(im))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few images (under 5 minutes)")
    a = p.parse_args()
    n32, n224 = (50, 4) if a.quick else (250, 16)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak on this machine: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    out = {"matmul_peak_gflops": peak, "n_32px": n32, "n_224px": n224}
    folder = list_image_folder(extract_cifar10() / "train")
    idx = list(range(0, len(folder), len(folder) // n32))[:n32]
    imgs32 = [load_rgb(folder.path(i)) for i in idx]
    g = torch.Generator().manual_seed(0)
    for label, images, size, batch in (("32px", imgs32, 64, 50), ("224px", imagenet_photos(n224), 224, 8)):
        net, _ = load_marking_network(MarkingNetworkSpec(image_size=size))
        u = random_carriers(len(images), net.feature_dim, g)
        r = measure(net, images, u, label, batch)
        flop = step_gflops(net, size) * MarkingConfig().steps * len(images)
        r["ours_gflops_per_s"] = flop / r["ours_seconds"]
        r["gflops_fraction_of_peak"] = r["ours_gflops_per_s"] / peak
        print(f"{label}: ours {r['ours_images_per_s']:.2f} img/s (PSNR {r['ours_psnr_db']:.2f} dB, shift "
              f"{r['ours_shift']:.3f}); official loop {r['baseline_images_per_s']:.3f} img/s (PSNR "
              f"{r['baseline_psnr_db']:.2f} dB, shift {r['baseline_shift']:.3f}); ratio {r['ratio']:.1f}x; "
              f"{r['ours_gflops_per_s']:.1f} GFLOP/s = {100 * r['gflops_fraction_of_peak']:.1f} % of peak")
        for k, v in r.items():
            out[f"{k}_{label}"] = v
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
