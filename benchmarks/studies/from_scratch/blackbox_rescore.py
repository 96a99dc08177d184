"""Re-run the library's black-box tests (``blackbox_detect``) on cached suspects and controls.

Used when a new black-box statistic is added after models were trained: the models and records are
read from the from-scratch cache, nothing is retrained. Appends one JSON line per (record, model) to
--results with every black-box p-value the library reports.

    python benchmarks/studies/from_scratch/blackbox_rescore.py \\
        --record runs/from_scratch/marked-63829a0f94.record.jsonl \\
        --models runs/from_scratch/models/suspect-63829a0f94-resnet18-30-0.05-1.safetensors ...
    python benchmarks/studies/from_scratch/blackbox_rescore.py --reproduce-cell lin-q20   # the cell's suspect and control

With --reproduce-cell the record, suspect and control come from benchmarks/studies/reproduce/reproduce.py's cache
(runs/reproduce); a cell whose models are not cached is refused rather than trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from radioactive.blackbox import blackbox_detect

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line, use_study  # noqa: E402
use_study("reproduce")

KEYS = ("paired_log10_pvalue", "control_log10_pvalue", "control_mirror_log10_pvalue", "median_loss_difference",
        "median_mirror_difference", "class_mean_mirror_difference", "num_marked_images", "num_holdout_images")


def reproduce_cell(cell_id: str) -> tuple[Path, list[Path]]:
    """Record, suspect and vanilla control of a finished reproduce.py cell, from its cache."""
    import reproduce as rp
    from radioactive.keys import generate_key

    c, work = rp.grid()[cell_id], Path("runs/reproduce")
    data = rp.cell_data(c, work)
    key = generate_key(data["all_classes"], rp.marker_spec(c, work, data, "cpu"), seed=c.key_seed)
    record = rp.get_marking(c, key, data, work, "cpu")["record"]
    vanilla = data.get("train_sub", data["train_full"])
    released = record.parent / "train"
    if data["subset"]:
        released = record.parent / f"k{c.classes}-png" / "train"
    models = []
    for train_dir in (released, vanilla):
        mid = rp.digest([str(train_dir), str(data["test"]), {**rp.recipe_dict(rp.train_config(c)),
                                                            "backbone": rp.train_config(c).backbone.to_dict()},
                         c.augment])
        w = work / "models" / f"{mid}.safetensors"
        if not w.is_file():
            raise SystemExit(f"{cell_id}: model {w} is not cached")
        models.append(w)
    return record, models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", type=Path)
    p.add_argument("--models", type=Path, nargs="+")
    p.add_argument("--reproduce-cell", default=None, help="a cell id of benchmarks/studies/reproduce/reproduce.py (cached)")
    p.add_argument("--results", type=Path, default=RESULTS / "blackbox_rescore.jsonl")
    a = p.parse_args(argv)
    if a.reproduce_cell:
        a.record, a.models = reproduce_cell(a.reproduce_cell)
    elif not (a.record and a.models):
        p.error("give --record and --models, or --reproduce-cell")
    for model in a.models:
        t0 = time.time()
        r = blackbox_detect(a.record, model)
        row = {"record": str(a.record), "model": str(model), "log10_pvalue": r.log10_pvalue,
               **{k: r.extra.get(k) for k in KEYS}, "seconds": time.time() - t0}
        row = append_result(a.results, row, command_line(__file__, ["--record", str(a.record), "--models", str(model)]))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
