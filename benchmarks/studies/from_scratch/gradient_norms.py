"""Size of the gradient test's per-image term h = J_phi(x) (-grad_x CE_model(x, y)) for several models.

Why: a reference whose h is much larger than the suspect's dominates the per-class sums S_k = sum (h_S - h_R)
and drowns the suspect's signal, although the test stays exact. Prints the mean and median |h| over the
vanilla originals of the first --images marked images of a record, and the mean cosine of h with the image's
carrier.

    python benchmarks/studies/from_scratch/gradient_norms.py --record demo-output/private/record.jsonl \
        --key demo-output/private/key.safetensors --models demo-output/private/marking-network.safetensors \
        demo-output/models/marked.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from radioactive.blackbox import read_record
from radioactive.data import load_rgb
from radioactive.gradient import pulled_back_gradients
from radioactive.keys import Key
from radioactive.networks import load_marking_network, load_runnable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.add_argument("--images", type=int, default=200)
    a = p.parse_args(argv)
    key = Key.load(a.key)
    marker, _ = load_marking_network(key.network)
    _, entries = read_record(a.record)
    chosen = [e for e in entries if e.released][:a.images]
    x = torch.from_numpy(np.stack([load_rgb(e.source) for e in chosen])).permute(0, 3, 1, 2).float() / 255
    index = {c: i for i, c in enumerate(key.classes)}
    y = torch.tensor([index[e.class_name] for e in chosen])
    for path in a.models:
        h = pulled_back_gradients(load_runnable(path)[0], marker, x, y).double()
        norms = h.norm(dim=1)
        cos = torch.nn.functional.cosine_similarity(h, key.carriers[y].double(), dim=1)
        print(json.dumps({"model": str(path), "images": len(chosen), "mean_norm": round(norms.mean().item(), 3),
                          "median_norm": round(norms.median().item(), 3),
                          "mean_cos_with_carrier": round(cos.mean().item(), 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
