"""Carrier-permutation test (permutation.py, beside this script) on trained suspects.

Marks a pool of vanilla test images (never released) once per carrier of the
key, caches the marked pools, and prints the black-box and white-box
permutation p-values of each suspect as JSON lines (appended to --results).

    python benchmarks/studies/from_scratch/carrier_permutation.py --key-seed 1000 --pool-per-class 5 \
        --suspects runs/from_scratch/models/suspect-....safetensors runs/from_scratch/models/control-....safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from radioactive.data import list_image_folder, load_rgb
from radioactive.detection import match_classes
from radioactive.keys import generate_key
from radioactive.marking import MarkingConfig
from radioactive.networks import load_marking_network, load_suspect

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line, use_study  # noqa: E402

use_study("from_scratch")
from permutation import marked_pools, permutation_log10_pvalue, response_matrices  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=Path("runs/from_scratch/cifar10-1000-200/test"))
    p.add_argument("--key-seed", type=int, default=1000)
    p.add_argument("--pool-per-class", type=int, default=5)
    p.add_argument("--steps", type=int, default=MarkingConfig.steps)
    p.add_argument("--suspects", type=Path, nargs="+", required=True)
    p.add_argument("--cache", type=Path, default=Path("runs/permutation"))
    p.add_argument("--results", type=Path, default=RESULTS / "carrier_permutation.jsonl")
    a = p.parse_args(argv)
    t0 = time.time()
    folder = list_image_folder(a.images)
    key = generate_key(folder.classes, seed=a.key_seed)
    per = {}
    idx = []
    for i, k in enumerate(folder.labels):  # the last images of each class (detection's alignment uses the first)
        per.setdefault(k, []).append(i)
    for k in sorted(per):
        idx.extend(per[k][-a.pool_per_class:])
    pool = torch.from_numpy(np.stack([load_rgb(folder.path(i)) for i in idx])).permute(0, 3, 1, 2).contiguous()
    cache = a.cache / f"pool-key{a.key_seed}-{a.pool_per_class}-{a.steps}-{key.fingerprint}.pt"
    if cache.is_file():
        pools = list(torch.load(cache, weights_only=True))
    else:
        net, _ = load_marking_network(key.network)
        pools = marked_pools(net, pool, key.carriers, MarkingConfig(steps=a.steps))
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack(pools), cache)
    for s in a.suspects:
        suspect, meta = load_suspect(s)
        _, s_idx = match_classes(key.classes, meta["classes"])
        black, white = response_matrices(suspect, pool, pools, s_idx)
        row = {"suspect": str(s), "key_seed": a.key_seed, "pool": len(idx),
               "log10_p_black": permutation_log10_pvalue(black), "log10_p_white": permutation_log10_pvalue(white),
               "diag_minus_offdiag_black": float(np.trace(black) / len(black) - (black.sum() - np.trace(black)) / (black.size - len(black))),
               "accuracy": meta.get("test_accuracy"), "seconds": time.time() - t0}
        row = append_result(a.results, row, command_line(__file__, argv or sys.argv[1:]))
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
