"""Gradient test (white-box, from scratch) on the from-scratch cells, with its levers.

The test (radioactive.gradient): for each class k, the sum over the vanilla originals x of the released
marked images of h_S(x) - mean_R h_R(x), with h(x) = J_phi(x) (-grad_x CE(x, y)) pulled back through the
marking network; cosine with the carrier u_k, exact p-value under the uniform-carrier null, Fisher.

Levers (all keep the null exact: the images are vanilla and chosen without the carriers):
    --image-set marked    the vanilla originals of the released marked images (the library's choice)
    --image-set unmarked  the training images that were not marked
    --image-set test      the vanilla test slice
    --views N             h averaged over N views (identity, flip, then random pad-4 crops +- flip)
    --unit                each image's h scaled to unit norm before the sum

    python benchmarks/studies/from_scratch/gradient_test.py --record runs/from_scratch/marked-63829a0f94.record.jsonl \
        --marker runs/from_scratch/models/control-vanilla-resnet18-30-0.05-0.safetensors --key-seed 1000 \
        --reference runs/from_scratch/models/control-vanilla-resnet18-30-0.05-3.safetensors \
        --models runs/from_scratch/models/suspect-63829a0f94-resnet18-30-0.05-1.safetensors

One JSON line per model is appended to --results (models given as references are skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from radioactive.blackbox import read_record
from radioactive.data import load_rgb
from radioactive.gradient import pulled_back_gradients
from radioactive.keys import generate_key
from radioactive.networks import MarkingNetworkSpec, load_marking_network, load_runnable
from radioactive.stats import cosine_log10_pvalue, fisher_log10_pvalue

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line  # noqa: E402


def image_set(header: dict, entries, classes: list[str], which: str) -> list[tuple[Path, int]]:
    src = Path(header["source"])
    if which == "marked":
        return [(e.source, classes.index(e.class_name)) for e in entries if e.released]
    if which == "test":
        return [(p, k) for k, c in enumerate(classes) for p in sorted((src.parent / "test" / c).iterdir())]
    used = {e.source.resolve() for e in entries}
    return [(p, k) for k, c in enumerate(classes) for p in sorted((src / c).iterdir()) if p.resolve() not in used]


def view(x: torch.Tensor, v: int, g: torch.Generator) -> torch.Tensor:
    if v == 0:
        return x
    if v == 1:
        return x.flip(-1)
    dx, dy = torch.randint(-4, 5, (2,), generator=g).tolist()
    x = F.pad(x, (4, 4, 4, 4), mode="reflect")[..., 4 + dy:36 + dy, 4 + dx:36 + dx]
    return x.flip(-1) if v % 2 else x


def model_h(path: Path, marker, x: torch.Tensor, y: torch.Tensor, views: int, device: str) -> torch.Tensor:
    net = load_runnable(path)[0].to(device)
    g = torch.Generator().manual_seed(0)
    h = torch.zeros(len(x), marker.feature_dim, dtype=torch.float64)
    for v in range(views):
        for s in range(0, len(x), 100):
            xb = view(x[s:s + 100], v, g).to(device)
            h[s:s + 100] += pulled_back_gradients(net, marker, xb, y[s:s + 100].to(device)).cpu()
    return h / views


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--marker", type=Path, required=True)
    p.add_argument("--key-seed", type=int, required=True)
    p.add_argument("--reference", type=Path, nargs="*", default=[], help="vanilla models independent of the key")
    p.add_argument("--models", type=Path, nargs="+", required=True, help="suspects and vanilla controls")
    p.add_argument("--image-set", choices=("marked", "unmarked", "test"), default="marked")
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--unit", action="store_true")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--results", type=Path, default=RESULTS / "gradient_test.jsonl")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    header, entries = read_record(a.record)
    key = generate_key(header["classes"], MarkingNetworkSpec("trained", 32, path=str(a.marker)), seed=a.key_seed)
    if key.fingerprint != header["key_fingerprint"]:
        raise SystemExit("the key does not match the record")
    items = image_set(header, entries, key.classes, a.image_set)
    x = torch.from_numpy(np.stack([load_rgb(q) for q, _ in items])).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([k for _, k in items])
    marker = load_marking_network(key.network)[0].to(a.device).eval()
    for q in marker.parameters():
        q.requires_grad_(False)

    def unit(h):
        return h / h.norm(dim=1, keepdim=True).clamp_min(1e-300) if a.unit else h

    refs = [unit(model_h(r, marker, x, y, a.views, a.device)) for r in a.reference]
    ref = torch.stack(refs).mean(0) if refs else 0.0
    for model in a.models:
        if model in a.reference:
            continue
        t0 = time.time()
        d = unit(model_h(model, marker, x, y, a.views, a.device)) - ref
        sums = torch.stack([d[y == k].sum(0) for k in range(len(key.classes))])
        cos = F.cosine_similarity(sums, key.carriers.double(), dim=1).numpy()
        lp = np.asarray(cosine_log10_pvalue(cos, key.dim))
        row = {"record": str(a.record), "model": str(model), "reference": [str(r) for r in a.reference],
               "image_set": a.image_set, "images": len(items), "views": a.views, "unit": a.unit,
               "log10_p": round(float(fisher_log10_pvalue(lp)), 3), "class_cosines": cos.round(4).tolist(),
               "class_log10_p": lp.round(3).tolist(), "seconds": round(time.time() - t0, 1)}
        row = append_result(a.results, row, command_line(__file__, argv or sys.argv[1:]))
        print(json.dumps({k: row[k] for k in ("model", "image_set", "views", "unit", "log10_p")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
