"""Per-class means of the black-box statistics on released and holdout marked images (docs/from-scratch.md, cell 7).

For each model, prints one JSON line: for the released and (if any) holdout marked images of a record, the
per-class means of m = loss(mirror) - loss(marked) and of d = loss(vanilla) - loss(marked), and the
image-level Wilcoxon log10 p of m > 0 (reported to show it is not a valid test when class means differ).

    python benchmarks/studies/from_scratch/mirror_class_means.py \
        runs/from_scratch/marked-6c22132bfb.record.jsonl MODEL [MODEL ...]
"""

from __future__ import annotations

import json
import sys

import numpy as np
from scipy import stats

from radioactive.blackbox import outputs_of, mirror_image, read_record, true_class_loss
from radioactive.data import load_rgb
from radioactive.networks import load_runnable


def main(argv=None) -> int:
    args = argv or sys.argv[1:]
    record, models = args[0], args[1:]
    _, entries = read_record(record)
    for m in models:
        net, meta = load_runnable(m)
        size = meta.get("preprocessing", {}).get("image_size")
        lab = np.array([meta["classes"].index(e.class_name) for e in entries])
        n = len(entries)
        lm = true_class_loss(outputs_of(net, lambda i: load_rgb(entries[i].output), n, size, 250), lab)
        lv = true_class_loss(outputs_of(net, lambda i: load_rgb(entries[i].source), n, size, 250), lab)
        lx = true_class_loss(outputs_of(net, lambda i: mirror_image(load_rgb(entries[i].source),
                                                                  load_rgb(entries[i].output)), n, size, 250), lab)
        rel = np.array([e.released for e in entries])
        out = {"record": record, "model": m}
        for part, sel in (("released", rel), ("holdout", ~rel)):
            if sel.any():
                out[part] = {name: [round(float(v[sel & (lab == k)].mean()), 4) for k in range(lab.max() + 1)]
                             for name, v in (("mirror_class_means", lx - lm), ("d_class_means", lv - lm))}
                out[part]["mirror_wilcoxon_log10_p"] = float(np.log10(stats.wilcoxon((lx - lm)[sel],
                                                                                     alternative="greater").pvalue))
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
