"""How much of the mark survives a lossy released copy (issue #5): `mark --output-format jpeg|webp --allow-lossy`.

For each lossy format and quality, the same images are marked with the same key and seed (so the marks
before encoding are identical to the lossless run's) and ``mark_folder`` measures, per marked image, the
feature shift along its carrier of the image as marked and of the file as a reader decodes it (marking
network, centre view). The ratio of the means is ``mark_survival``: the baseline is the lossless PNG
release, which keeps 100 % by construction.

Two sources, because re-encoding a JPEG-born image behaves differently from encoding a lossless one:

* ``cifar10``: 20 training images of every CIFAR-10 class (32 px JPEGs, ../shared/data), half of each
  class marked.
* ``imagenet128``: 40 ImageNet photos (../shared/data/imagenet-samples-250.tar), centre-cropped and downscaled
  to 128 x 128 (the downscaling erases their JPEG block grid) and saved as PNG, in 4 folders of 10 images,
  half of each marked.

    nice -n 19 .venv/bin/python benchmarks/lossy_survival.py              # about 10 min on 2 cores

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
from PIL import Image

from radioactive.data import OutputFormat, cifar10_subset, default_data_dir, list_image_folder
from radioactive.keys import generate_key
from radioactive.marking import MarkingConfig, mark_folder

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
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "lossy_survival.json")
    args = ap.parse_args()
    config = MarkingConfig(steps=args.steps, threads=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"cifar10": cifar10_subset(tmp / "cifar", 20, 0)[0], "imagenet128": imagenet128(tmp / "imagenet128")}
        for name, src in sources.items():
            key = generate_key(list(list_image_folder(src).classes), seed=0)
            for fmt_name, quality in FORMATS:
                fmt = OutputFormat(fmt_name, quality, allow_lossy=True)
                out = tmp / f"{name}-{fmt_name}{quality}"
                t0 = time.perf_counter()
                s = mark_folder(src, key, out, fraction=0.5, seed=0, config=config, progress=False, output_format=fmt)
                entries = [json.loads(x) for x in Path(s.record).read_text().splitlines()[1:]]
                released_psnr = [e.get("psnr_db_released", e["psnr_db"]) for e in entries]
                row = {"source": name, "format": fmt.describe(), "num_marked": s.num_marked,
                       "psnr_db_marked": round(s.psnr_db_mean, 2),
                       "psnr_db_released": round(float(np.mean(released_psnr)), 2),
                       "carrier_shift_lossless": s.carrier_shift_lossless_mean and round(s.carrier_shift_lossless_mean, 4),
                       "carrier_shift_released": s.carrier_shift_mean and round(s.carrier_shift_mean, 4),
                       "mark_survival": 1.0 if not fmt.lossy else round(s.mark_survival, 4),
                       "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "command": "python benchmarks/lossy_survival.py" + (f" --steps {args.steps}" if args.steps != 50 else ""),
        "config": {"steps": config.steps, "linf": config.linf, "lambda_img": config.lambda_img, "fraction": 0.5},
        "python": sys.version.split()[0], "machine": platform.machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
