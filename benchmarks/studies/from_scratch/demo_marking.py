"""The marking budget on the demo replicates: re-mark each replicate with another configuration, retrain its
marked suspect, and run its gradient test.

Each replicate folder (written by `radioactive demo` or benchmarks/studies/from_scratch/demo_replicates.py) keeps its marking
network, key, selection (the demo's seed), vanilla control and references; only the marks change, so a
reading moves only through the marking configuration. The suspect is trained with the demo's own recipe and
seed (seed + 1), and tested with the replicate's own reference(s) (private/reference*.safetensors). One JSON
line per replicate and configuration is appended to --results; a line already there is skipped (resume).

    python benchmarks/studies/from_scratch/demo_marking.py --demos demo-output runs/demo_replicates/from-scratch-seed{1,2} \
        --lambda-img 0.55 --tag lam0.55
    python benchmarks/studies/from_scratch/demo_marking.py --demos ... --target-psnr 40.5 --tag psnr40.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from radioactive.gradient import gradient_detect
from radioactive.keys import Key
from radioactive.marking import MARKING_PRESETS, mark_folder
from radioactive.demo import DemoConfig
from radioactive.training import train

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, nargs="+", required=True, help="demo output folders (from-scratch setting)")
    p.add_argument("--tag", required=True, help="name of this configuration (folder and results key)")
    p.add_argument("--lambda-img", type=float, default=None)
    p.add_argument("--target-psnr", type=float, default=None, help="calibrate lambda_img to this mean PSNR (dB)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--views", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="Adam step in 8-bit levels")
    p.add_argument("--work", type=Path, default=Path("runs/demo_marking"))
    p.add_argument("--results", type=Path, default=RESULTS / "demo_marking.jsonl")
    a = p.parse_args(argv)
    command = command_line(__file__, argv or sys.argv[1:])
    done = set()
    if a.results.exists():
        done = {(r["demo"], r["tag"]) for r in map(json.loads, a.results.read_text().splitlines())}
    for demo in a.demos:
        if (str(demo), a.tag) in done:
            continue
        t0 = time.time()
        summary = json.loads((demo / "summary.json").read_text())
        seed = summary["config"]["seed"]
        config = MARKING_PRESETS["from-scratch"]
        changes = {k: v for k, v in (("lambda_img", a.lambda_img), ("steps", a.steps), ("views", a.views),
                                     ("lr", None if a.lr is None else a.lr / 255)) if v is not None}
        config = replace(config, **changes)
        key = Key.load(demo / "private" / "key.safetensors")
        work = a.work / f"{demo.name}-{a.tag}"
        vanilla = demo / "data" / "vanilla"
        calibration = None
        if a.target_psnr is not None:
            from radioactive.marking import calibrate_lambda_img
            calibration = calibrate_lambda_img(vanilla / "train", key, a.target_psnr, fraction=0.1, seed=seed,
                                               config=config)
            config = replace(config, lambda_img=calibration.lambda_img)
        mark = mark_folder(vanilla / "train", key, work / "released", record=work / "record.jsonl", fraction=0.1,
                           seed=seed, config=config, progress=False, resume=True)
        trainer = replace(DemoConfig().resolved().training, seed=seed + 1)  # the demo's recipe (its summary's config)
        suspect = train(work / "released", vanilla / "test", work / "marked.safetensors", trainer, progress=False)
        refs = sorted((demo / "private").glob("reference*.safetensors"))
        result = gradient_detect(work / "record.jsonl", key, suspect.weights, reference=refs)
        control = json.loads((demo / "detect-vanilla.json").read_text())
        row = {"demo": str(demo), "demo_seed": seed, "tag": a.tag, "marking": asdict(config),
               "calibration": None if calibration is None else asdict(calibration),
               "psnr_db_mean": mark.psnr_db_mean, "psnr_db_p5": mark.psnr_db_p5,
               "accuracy": suspect.test_accuracy,
               "control_accuracy": summary["suspects"]["vanilla"]["accuracy"],
               "log10_pvalue": result.log10_pvalue, "cosines": [round(c, 4) for c in result.cosines],
               "references": [str(r) for r in refs],
               "shipped_log10_pvalue": summary["suspects"]["marked"]["log10_pvalue"],
               "control_log10_pvalue": control["log10_pvalue"],
               "seconds": time.time() - t0}
        row = append_result(a.results, row, command)
        print(json.dumps({k: row[k] for k in ("demo_seed", "tag", "psnr_db_mean", "accuracy", "log10_pvalue",
                                              "shipped_log10_pvalue")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
