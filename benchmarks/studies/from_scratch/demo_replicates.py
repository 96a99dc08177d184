"""`radioactive demo` replicated over seeds: how stable is the demo's reading?

Each seed is an independent replicate of the whole story (the seed draws the marking network's training,
the key, the selection and marking, and the suspects' training, which uses seed + 1). One JSON line per
seed is appended to --results as it finishes (a finished seed is never rerun; a demo folder that already
holds a summary.json is read, not rerun), so a stopped session loses at most the seed in progress.

    python benchmarks/studies/from_scratch/demo_replicates.py --seeds 0 1 2     # the from-scratch setting (make demo's)
    python benchmarks/studies/from_scratch/demo_replicates.py --seeds 0 --setting linear
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from radioactive.demo import SETTINGS, DemoConfig, run_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line  # noqa: E402


def row_of(summary: dict, seed: int, command: str, folder: Path | None = None) -> dict:
    """The replicate's figures from its summary.json (and the gradient test's temperature from its folder)."""
    detect = folder / "detect-marked.json" if folder is not None else None
    extra = json.loads(detect.read_text()).get("extra", {}) if detect is not None and detect.is_file() else {}
    return {
        "lambda_img_calibration": summary.get("lambda_img_calibration"), "temperature": extra.get("temperature"),
        "setting": summary["setting"], "seed": seed, "dataset": summary["dataset"],
        "marked_fraction": summary["marked_fraction"], "psnr_db_mean": summary["psnr_db_mean"],
        "psnr_db_p5": summary["psnr_db_p5"], "linf_max": summary["linf_max"],
        "marking_network_accuracy": (summary.get("marking_network") or {}).get("accuracy"),
        "suspects": {name: {k: s[k] for k in ("accuracy", "test", "log10_pvalue", "detected", "blackbox_log10_pvalue",
                                              "train_seconds", "detect_seconds")}
                     for name, s in summary["suspects"].items()},
        "seconds": summary["seconds"], "package_version": summary["package_version"], "command": command,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--setting", choices=SETTINGS, default=DemoConfig.setting)
    p.add_argument("--workdir", type=Path, default=Path("runs/demo_replicates"))
    p.add_argument("--results", type=Path, default=RESULTS / "demo_replicates.jsonl")
    a = p.parse_args(argv)
    command = command_line(__file__, argv or sys.argv[1:])
    done = set()
    if a.results.is_file():
        done = {(r["setting"], r["seed"]) for r in map(json.loads, a.results.read_text().splitlines())}
    for seed in a.seeds:
        if (a.setting, seed) in done:
            print(f"seed {seed}: already in {a.results}", flush=True)
            continue
        out = a.workdir / f"{a.setting}-seed{seed}"
        if (out / "summary.json").is_file():
            summary = json.loads((out / "summary.json").read_text())
        else:
            if out.exists():  # an interrupted replicate of this script's own work folder: start it again
                shutil.rmtree(out)
            summary = run_demo(out, DemoConfig(setting=a.setting, seed=seed), progress=False)
        row = row_of(summary, seed, command, out)
        row = append_result(a.results, row, command)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
