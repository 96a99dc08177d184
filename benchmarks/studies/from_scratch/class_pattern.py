"""Experiment: class-consistent marks for suspects trained from scratch.

Per-image marks (the paper's) were not learnt by a ResNet-18 trained from
scratch on 10,000 CIFAR-10 images (docs/from-scratch.md). Hypothesis: the
suspect learns a mark only if it is the same signal in every marked image of
a class. Here each carrier u_l gets one pixel pattern delta_l (3 x 32 x 32),
optimised on a pool of training images of *all* classes (so delta_l depends
on u_l and that pool only, which keeps the carrier-permutation null exact) to
move the marking network's features along u_l under random resized crop +
flip; RMS bounded (PSNR about 42 dB) and L-inf <= 10 levels. A fraction q of
each class k is released as round(x + delta_k).

Then: train the suspect from scratch (same recipe and seed as the vanilla
control of benchmarks/studies/from_scratch/from_scratch.py, whose model is reused), and test it
and the control with the white-box test (alignment) and the
carrier-permutation test (permutation.py, beside this script). Appends one JSON line to
benchmarks/results/class_pattern.jsonl.

    python benchmarks/studies/from_scratch/class_pattern.py --fraction 0.1 --rms 2.0 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from radioactive.augment import ResizedCropFlip
from radioactive.data import atomic_write_bytes, encode_png, list_image_folder, load_rgb
from radioactive.detection import detect, match_classes
from radioactive.keys import generate_key
from radioactive.marking import psnr_db, select_marked
from radioactive.networks import load_marking_network, load_suspect
from radioactive.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line, use_study  # noqa: E402

use_study("from_scratch")
from permutation import permutation_log10_pvalue, response_matrices  # noqa: E402


def optimise_pattern(net, pool: torch.Tensor, u: torch.Tensor, steps: int, rms: float, linf: float,
                     gen: torch.Generator) -> torch.Tensor:
    """(3, H, W) float pattern in [0, 1] units moving features of pool images along u."""
    x = pool.float() / 255
    delta = torch.zeros(1, *x.shape[1:], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.5 / 255)
    aug = ResizedCropFlip()
    gens = [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen))) for _ in range(len(x))]
    for _ in range(steps):
        f = net.features(aug.apply((x + delta).clamp(0, 1), aug.draw(gens)))
        loss = -(f @ u).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(-linf / 255, linf / 255)
            r = delta.pow(2).mean().sqrt() * 255
            if r > rms:
                delta.mul_(rms / r)
    return delta.detach()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rms", type=float, default=2.0, help="pattern RMS in 8-bit levels (2.0 ~ 42 dB)")
    p.add_argument("--linf", type=float, default=10.0)
    p.add_argument("--pattern-pool", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("runs/from_scratch"))
    p.add_argument("--results", type=Path, default=RESULTS / "class_pattern.jsonl")
    a = p.parse_args(argv)
    t0 = time.time()
    data = a.workdir / "cifar10-1000-200"
    train_dir, test_dir = data / "train", data / "test"
    folder = list_image_folder(train_dir)
    key = generate_key(folder.classes, seed=2000 + a.seed)
    net, _ = load_marking_network(key.network)
    tag = f"pattern-q{a.fraction}-rms{a.rms}-s{a.seed}"
    released = a.workdir / tag / "train"
    patterns_path = a.workdir / f"{tag}.patterns.pt"
    rng = np.random.default_rng([a.seed, 7])
    if patterns_path.is_file():
        patterns = torch.load(patterns_path, weights_only=True)
    else:
        pool_idx = rng.choice(len(folder), size=a.pattern_pool, replace=False)
        pool = torch.from_numpy(np.stack([load_rgb(folder.path(i)) for i in pool_idx])).permute(0, 3, 1, 2)
        gen = torch.Generator().manual_seed(a.seed)
        patterns = torch.stack([optimise_pattern(net, pool, key.carriers[k], a.steps, a.rms, a.linf, gen)
                                for k in range(len(folder.classes))])
        patterns_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(patterns, patterns_path)
    chosen = set(select_marked(folder, a.fraction, a.seed))
    psnrs = []
    if not (released.parent / ".complete").is_file():
        for i in range(len(folder)):
            x = load_rgb(folder.path(i))
            if i in chosen:
                d = patterns[folder.labels[i]].permute(1, 2, 0).numpy() * 255
                m = np.clip(np.round(x.astype(np.float64) + d), 0, 255).astype(np.uint8)
                psnrs.append(psnr_db(x, m))
                x = m
            atomic_write_bytes(released / Path(folder.files[i]).with_suffix(".png"), encode_png(x))
        (released.parent / "psnr.json").write_text(json.dumps(psnrs))
        (released.parent / ".complete").write_text("ok")
    psnrs = json.loads((released.parent / "psnr.json").read_text())
    tcfg = TrainConfig(recipe="scratch", architecture="resnet18", epochs=a.epochs, lr=0.05, batch_size=128,
                       weight_decay=5e-4, image_size=32, seed=a.seed)
    suspect_w = a.workdir / "models" / f"{tag}-resnet18-{a.epochs}.safetensors"
    if not suspect_w.is_file():
        train(released, test_dir, suspect_w, tcfg, progress=False)
    control_w = a.workdir / "models" / f"control-vanilla-resnet18-{a.epochs}-0.05-{a.seed}.safetensors"
    if not control_w.is_file():
        train(train_dir, test_dir, control_w, tcfg, progress=False)
    test = list_image_folder(test_dir)
    per: dict[int, list[int]] = {}
    for i, k in enumerate(test.labels):
        per.setdefault(k, []).append(i)
    pidx = [i for k in sorted(per) for i in per[k][-5:]]
    pool = torch.from_numpy(np.stack([load_rgb(test.path(i)) for i in pidx])).permute(0, 3, 1, 2).contiguous()
    pools = [torch.clamp(torch.round(pool.float() + patterns[k] * 255), 0, 255).to(torch.uint8)
             for k in range(len(patterns))]
    out = {"fraction": a.fraction, "rms": a.rms, "seed": a.seed, "psnr_db_mean": float(np.mean(psnrs)),
           "psnr_db_p5": float(np.percentile(psnrs, 5)), "num_marked": len(chosen)}
    for name, w in (("suspect", suspect_w), ("control", control_w)):
        s, meta = load_suspect(w)
        _, s_idx = match_classes(key.classes, meta["classes"])
        black, white = response_matrices(s, pool, pools, s_idx)
        wb = detect(w, key, test_dir)
        out[name] = {"accuracy": meta["test_accuracy"], "log10_p_whitebox": wb.log10_pvalue,
                     "alignment_r2": wb.alignment_r2, "log10_p_permutation_black": permutation_log10_pvalue(black),
                     "log10_p_permutation_white": permutation_log10_pvalue(white),
                     "mean_diag_black": float(np.trace(black) / len(black)),
                     "mean_offdiag_black": float((black.sum() - np.trace(black)) / (black.size - len(black)))}
    out["seconds"] = time.time() - t0
    out = append_result(a.results, out, command_line(__file__, argv or sys.argv[1:]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
