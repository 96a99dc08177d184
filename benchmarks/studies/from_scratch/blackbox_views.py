"""Black-box detection lever: average the suspect's loss over the trainer's augmentation views.

A model trained with pad-4 random crops and flips saw each training image under
many shifts, never necessarily the centred view; the paired black-box test
reads one view per image. This script scores each marked image and its vanilla
version under 50 pad-crop + flip views (shifts -4, -2, 0, 2, 4 px in each
direction x 2 flips) and
runs the paired and the holdout-control tests on losses averaged over
growing sets of views (the per-image statistic changes, the tests' nulls do
not: one number per image and version, whatever the suspect).

Prints one JSON line per (record, model) and appends it to --results.

    python benchmarks/studies/from_scratch/blackbox_views.py --record runs/from_scratch/marked-63829a0f94.record.jsonl \
        --models runs/from_scratch/models/suspect-63829a0f94-resnet18-30-0.05-1.safetensors ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from radioactive.augment import PadCropFlip
from radioactive.blackbox import control_test, paired_test, read_record, true_class_loss
from radioactive.data import load_rgb
from radioactive.networks import load_runnable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line  # noqa: E402

SHIFTS = (0, 2, 4, 6, 8)  # crop offsets in the 4-px zero-padded image (4 = centred)
VIEW_SETS = {  # name -> (indices into SHIFTS, flips)
    "centre": ((2,), (0,)),
    "flip2": ((2,), (0, 1)),
    "grid18": ((0, 2, 4), (0, 1)),
    "grid50": ((0, 1, 2, 3, 4), (0, 1)),
}


def view_losses(net, images: torch.Tensor, labels: np.ndarray, batch: int = 500) -> np.ndarray:
    """(N, 5, 5, 2) true-class losses of (N, 3, 32, 32) images in [0, 1] under pad-4 crops at SHIFTS + flip."""
    aug = PadCropFlip()
    n = len(images)
    out = np.empty((n, len(SHIFTS), len(SHIFTS), 2))
    with torch.no_grad():
        for iy, dy in enumerate(SHIFTS):
            for ix, dx in enumerate(SHIFTS):
                for fl in range(2):
                    params = torch.tensor([[dx, dy, fl]] * n)
                    x = aug.apply(images, params)
                    logits = torch.cat([net(x[s:s + batch]) for s in range(0, n, batch)]).double().numpy()
                    out[:, iy, ix, fl] = true_class_loss(logits, labels)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.add_argument("--cache", type=Path, default=Path("runs/blackbox_views"))
    p.add_argument("--results", type=Path, default=RESULTS / "blackbox_views.jsonl")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    header, entries = read_record(a.record)
    released = np.array([e.released for e in entries])
    def load(paths):
        return torch.from_numpy(np.stack([load_rgb(q) for q in paths])).permute(0, 3, 1, 2).float() / 255
    xm, xv = load([e.output for e in entries]), load([e.source for e in entries])
    xmirror = (2 * xv - xm).clamp(0, 1)  # the mark subtracted instead of added: never released
    for model in a.models:
        t0 = time.time()
        cache = a.cache / f"{a.record.stem}--{model.stem}.npz"
        net, meta = load_runnable(model)
        labels = np.array([meta["classes"].index(e.class_name) for e in entries])
        if cache.is_file():
            z = np.load(cache)
            lm, lv, lx = z["marked"], z["vanilla"], z["mirror"]
        else:
            lm, lv, lx = (view_losses(net, x, labels) for x in (xm, xv, xmirror))
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache, marked=lm, vanilla=lv, mirror=lx)
        out = {"record": str(a.record), "model": str(model), "num_released": int(released.sum()),
               "num_holdout": int((~released).sum())}
        for name, (shifts, flips) in VIEW_SETS.items():
            sel = np.ix_(range(len(entries)), shifts, shifts, flips)
            m, v, x = (arr[sel].reshape(len(entries), -1).mean(1) for arr in (lm, lv, lx))
            row = {"paired": paired_test(v[released], m[released])[0],
                   "mirror_paired": paired_test(x[released], m[released])[0],
                   "median_d": float(np.median((v - m)[released]))}
            if (~released).any():
                row["control"] = control_test((v - m)[released], (v - m)[~released])[0]
            out[name] = row
        out["seconds"] = time.time() - t0
        out = append_result(a.results, out, command_line(__file__, argv or sys.argv[1:]))
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
