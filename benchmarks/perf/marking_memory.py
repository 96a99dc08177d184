"""Peak resident memory of `radioactive mark` on 2,000 and 20,000 CIFAR-10 images: it must not grow with the data.

Each size is marked by the real command line (``python -m radioactive mark``) in a fresh process, and that
process's own peak RSS is read from ``os.wait4`` (``ru_maxrss``), so the two peaks never mix and the figure is
what a user's run holds. The slices are the first N/10 training images of every class of the CIFAR-10
archive (``../shared/data/cifar10-jpeg.tar.gz``, real JPEGs), copied once into ``--workdir``. Few steps are
enough: the optimisation's memory depends on the batch size, not on the dataset; what could grow with the
dataset is the listing, the plan, the journal, the record and the copying, which every run exercises whole.

    nice -n 19 .venv/bin/python benchmarks/perf/marking_memory.py            # 2,000 and 20,000 images, --steps 1

A third run, the control, marks *every* image of the small slice: as many marking batches as the large run
at a tenth of the images. The optimisation's transient memory (about 1 GB for 125 images) sets the peak, and
the first full batch peaks lower than the later ones, so a gap between the two sizes that the control closes
comes from the number of batches, not from the number of images.

The last line of output is one JSON object: ``rss_mb_2k``, ``rss_mb_20k``, ``ratio`` (20k over 2k),
``within_20_percent``, ``rss_mb_2k_all_marked`` (the control), with the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from radioactive.data import cifar10_subset, list_image_folder
from radioactive.keys import generate_key


def slice_of(workdir: Path, n: int) -> Path:
    """The first n/10 CIFAR-10 training images of every class, copied once into ``workdir``."""
    dest = workdir / f"cifar10-{n}"
    if not (dest / ".complete").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        cifar10_subset(dest, n // 10, 0)
        (dest / ".complete").write_text("ok\n")
    return dest / "train"


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; return its own peak RSS (MB), its wall time (s) and its stderr's last line."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"mark failed ({proc.returncode}): {lines[-1] if lines else ''}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, lines[-1] if lines else ""  # ru_maxrss: KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], help="the two dataset sizes (images)")
    p.add_argument("--steps", type=int, default=1, help="marking steps")
    p.add_argument("--fraction", type=float, default=0.1, help="marked fraction")
    p.add_argument("--batch-size", type=int, default=125, help="images marked together")
    p.add_argument("--no-control", action="store_true", help="skip the control run (small slice, all marked)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "radioactive-marking-memory",
                   help="where the slices are copied and marked (kept between runs)")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    small, large = sorted(args.sizes)
    key_file = args.workdir / "key.safetensors"
    rows = {}
    runs = [(small, args.fraction), (large, args.fraction)]
    if not args.no_control:
        runs.append((small, min(1.0, args.fraction * large / small)))
    for n, fraction in runs:
        src = slice_of(args.workdir, n)
        assert len(list_image_folder(src)) == n
        if not key_file.exists():
            generate_key(list(list_image_folder(src).classes), seed=0).save(key_file)
        out = args.workdir / f"released-{n}"
        shutil.rmtree(out, ignore_errors=True)
        Path(f"{out}.record.jsonl").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "radioactive", "mark", "--source", str(src), "--key", str(key_file),
               "--output", str(out), "--fraction", str(fraction), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)]
        rss, seconds, summary = peak_rss_mb(cmd)
        name = n if fraction == args.fraction else "control"
        rows[name] = {"rss_mb": round(rss, 1), "seconds": round(seconds, 1)}
        print(f"{n:>6} images, fraction {fraction:g}: peak RSS {rss:7.1f} MB, {seconds:6.1f} s  ({summary})", flush=True)
        shutil.rmtree(out)
    ratio = rows[large]["rss_mb"] / rows[small]["rss_mb"]
    print(f"peak RSS {large} / {small} images: {ratio:.3f} (target: within 20 %)")
    if "control" in rows:
        print(f"peak RSS {large} images / {small} images all marked (same number of batches): "
              f"{rows[large]['rss_mb'] / rows['control']['rss_mb']:.3f}")
    print(json.dumps({
        "rss_mb_2k": rows[small]["rss_mb"], "rss_mb_20k": rows[large]["rss_mb"], "ratio": round(ratio, 4),
        "within_20_percent": abs(ratio - 1) <= 0.2, "sizes": [small, large], "steps": args.steps,
        "rss_mb_2k_all_marked": rows.get("control", {}).get("rss_mb"),
        "fraction": args.fraction, "batch_size": args.batch_size,
        "seconds": {str(n): r["seconds"] for n, r in rows.items()}, "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
