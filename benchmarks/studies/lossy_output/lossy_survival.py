"""How much of the mark survives a lossy released copy (issue #5): `mark --output-format jpeg|webp --allow-lossy`.

Each source is marked once, losslessly (the PNG release: the baseline, 100 % by construction). Every
lossy format and quality then encodes those same marked images, as ``mark_folder`` would (a lossy run
marks identically: same key, seed and configuration), and the feature shift along each image's carrier
(marking network, centre view, :func:`radioactive.marking.carrier_shifts`) is measured before encoding
and on the decoded file. ``mark_survival`` is the ratio of the means. One format (JPEG 90) is also run
through ``mark_folder`` itself, and its recorded survival must equal the figure computed here.

Two sources, because re-encoding a JPEG-born image behaves differently from encoding a lossless one:

* ``cifar10``: 20 training images of every CIFAR-10 class (32 px JPEGs, ../shared/data), half of each
  class marked (100 marked).
* ``imagenet128``: 40 ImageNet photos (../shared/data/imagenet-samples-250.tar), centre-cropped and downscaled
  to 128 x 128 (the downscaling erases their JPEG block grid) and saved as PNG, in 4 folders of 10 images,
  half of each marked (20 marked).

    nice -n 19 .venv/bin/python benchmarks/studies/lossy_output/lossy_survival.py              # about 6 min on 2 busy cores

Prints one line per (source, format) and writes ``benchmarks/results/lossy_survival.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from radioactive.data import OutputFormat, cifar10_subset, default_data_dir, list_image_folder, load_rgb
from radioactive.keys import generate_key
from radioactive.marking import MarkingConfig, carrier_shifts, mark_folder, psnr_db
from radioactive.networks import load_marking_network


def _t(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) uint8."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]

CHECKED = ("jpeg", 90)
FORMATS = [("png", 100), ("jpeg", 95), ("jpeg", 90), ("jpeg", 75), ("webp", 90), ("webp", 75)]


def imagenet128(dest: Path, n: int = 40, per_class: int = 10) -> Path:
    """``n`` ImageNet sample photos as 128 x 128 PNGs (centre crop, Lanczos), ``per_class`` per folder."""
    with tarfile.open(default_data_dir() / "imagenet-samples-250.tar") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".JPEG")), key=lambda m: m.name)
        for j, m in enumerate(members[:n]):
            with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                im = im.convert("RGB")
                s = min(im.size)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((128, 128), Image.Resampling.LANCZOS)
                folder = dest / f"group{j // per_class}"
                folder.mkdir(parents=True, exist_ok=True)
                im.save(folder / f"{Path(m.name).stem}.png")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=MarkingConfig().steps)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parents[2] / "results" / "lossy_survival.json")
    args = ap.parse_args()
    config = MarkingConfig(steps=args.steps, threads=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"cifar10": cifar10_subset(tmp / "cifar", 20, 0)[0], "imagenet128": imagenet128(tmp / "imagenet128")}
        for name, src in sources.items():
            folder = list_image_folder(src)
            key = generate_key(list(folder.classes), seed=0)
            net = load_marking_network(key.network)[0]
            t0 = time.perf_counter()
            s = mark_folder(src, key, tmp / f"{name}-png", fraction=0.5, seed=0, config=config, progress=False)
            entries = [json.loads(x) for x in Path(s.record).read_text().splitlines()[1:]]
            seconds = time.perf_counter() - t0
            vanilla = [load_rgb(src / e["source"]) for e in entries]
            marked = [load_rgb(Path(s.output) / e["output"]) for e in entries]
            carriers = key.carriers[[e["carrier_index"] for e in entries]]
            for fmt_name, quality in FORMATS:
                fmt = OutputFormat(fmt_name, quality, allow_lossy=True)
                released = [fmt.decode(fmt.encode(m)) for m in marked]
                before, after = [], []
                for v, m, r, u in zip(vanilla, marked, released, carriers):  # one at a time: sizes may differ
                    b_, a_ = carrier_shifts(net, _t(v), [_t(m), _t(r)], u[None])
                    before.append(b_.item())
                    after.append(a_.item())
                row = {"source": name, "format": fmt.describe(), "num_marked": len(entries),
                       "psnr_db_marked": round(s.psnr_db_mean, 2),
                       "psnr_db_released": round(float(np.mean([psnr_db(v, r) for v, r in zip(vanilla, released)])), 2),
                       "carrier_shift_lossless": round(float(np.mean(before)), 4),
                       "carrier_shift_released": round(float(np.mean(after)), 4),
                       "mark_survival": round(float(np.sum(after) / np.sum(before)), 4),
                       "mean_bytes_per_image": round(float(np.mean([len(fmt.encode(m)) for m in marked]))),
                       "marking_seconds": round(seconds, 1)}
                if (fmt_name, quality) == CHECKED:  # the same figure from mark_folder's own measurement
                    t = mark_folder(src, key, tmp / f"{name}-{fmt_name}{quality}", fraction=0.5, seed=0, config=config,
                                    progress=False, output_format=fmt)
                    row["mark_folder_survival"] = round(t.mark_survival, 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "command": ("python benchmarks/studies/lossy_output/lossy_survival.py"
                    + (f" --steps {args.steps}" if args.steps != 50 else "")),
        "config": {"steps": config.steps, "linf": config.linf, "lambda_img": config.lambda_img, "fraction": 0.5},
        "python": sys.version.split()[0], "machine": platform.machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
