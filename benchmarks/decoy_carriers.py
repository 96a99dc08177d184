"""Black-box decoy-carrier test (experiment): is the suspect's preference for marked over mirrored images
specific to the key's carriers?

Why: the mirror statistic m_i = loss(x_i - delta_i) - loss(x_i + delta_i) separates from-scratch suspects
from vanilla models, but on vanilla models its class means range over several nats (a carrier moves the
images of its class in one direction, which a model trained on the same photographs may like or not), so
the images of a class are not independent and an image-level Wilcoxon p-value is not valid. The unit of
randomisation is the carrier. This test draws, for every class k, M decoy carriers from the key's
distribution (uniform unit vectors, independent of everything else), marks the same n released images of
class k with each of them by the same procedure and the same per-image random draws as the real mark, and
ranks the statistic of the real carrier among its decoys:

    T_k(c) = mean over the n images of [m_S(c) - m_R(c)],   p_k = (1 + #{decoys with T_k >= T_k(real)}) / (M + 1)

where m_S and m_R are the mirror statistic of the suspect and of a reference model (a vanilla model the
owner trains on the vanilla images; it removes the part of a carrier's effect that any model trained on
these photographs shares). Under H0 (the suspect and the reference are independent of the key) the real
carrier is exchangeable with its decoys, so p_k is super-uniform, exactly; carriers are independent across
classes, so the p_k are independent and Fisher's combination is valid (conservative for these discrete
p-values). The smallest reachable p is about (M + 1)^-K before combination.

    python benchmarks/decoy_carriers.py --record runs/from_scratch/marked-6c22132bfb.record.jsonl \
        --marker runs/from_scratch/models/control-vanilla-resnet18-30-0.05-0.safetensors --key-seed 1000 \
        --reference runs/from_scratch/models/control-vanilla-resnet18-30-0.05-3.safetensors \
        --suspects runs/from_scratch/models/suspect-6c22132bfb-resnet18-30-0.05-1.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sstats

from radioactive.blackbox import mirror_image, read_record, true_class_loss, _outputs
from radioactive.data import load_rgb
from radioactive.keys import generate_key, random_carriers
from radioactive.marking import MarkingConfig
from radioactive.marking.optimise import image_generator, mark_batch
from radioactive.networks import MarkingNetworkSpec, load_marking_network, load_runnable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--marker", type=Path, required=True)
    p.add_argument("--key-seed", type=int, required=True)
    p.add_argument("--reference", type=Path, required=True, help="a vanilla model independent of the key")
    p.add_argument("--suspects", type=Path, nargs="+", required=True)
    p.add_argument("--per-class", type=int, default=20, help="released marked images per class (n)")
    p.add_argument("--decoys", type=int, default=29, help="decoy carriers per class (M)")
    p.add_argument("--decoy-seed", type=int, default=7)
    p.add_argument("--cache", type=Path, default=Path("runs/decoy_carriers"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/decoy_carriers.jsonl"))
    a = p.parse_args(argv)
    header, entries = read_record(a.record)
    classes = header["classes"]
    spec = MarkingNetworkSpec("trained", 32, path=str(a.marker))
    key = generate_key(classes, spec, seed=a.key_seed)
    if key.fingerprint != header["key_fingerprint"]:
        raise SystemExit("the key does not match the record")
    cfg = replace(MarkingConfig(), **{k: (tuple(v) if isinstance(v, list) else v) for k, v in header["config"].items()})
    pool = {k: [e for e in entries if e.released and e.label == k][:a.per_class] for k in range(len(classes))}
    src_root = Path(header["source"]).resolve()
    cache = a.cache / f"{a.record.stem}-n{a.per_class}-m{a.decoys}-s{a.decoy_seed}.pt"
    if cache.is_file():
        marks = torch.load(cache)
    else:
        net = load_marking_network(spec)[0].eval()
        g = torch.Generator().manual_seed(a.decoy_seed)
        marks = {}  # class -> (M + 1, n, 3, H, W) uint8; row 0 is the real carrier
        t0 = time.time()
        for k, ents in pool.items():
            x = torch.from_numpy(np.stack([load_rgb(e.source) for e in ents])).permute(0, 3, 1, 2)
            carriers = torch.cat([key.carriers[k:k + 1], random_carriers(a.decoys, key.dim, g)])
            # every (carrier, image) pair in batches; each image's draws restart from its own generator
            pairs = [(j, i) for j in range(len(carriers)) for i in range(len(ents))]
            out = torch.empty((len(carriers), len(ents), *x.shape[1:]), dtype=torch.uint8)
            for s in range(0, len(pairs), cfg.batch_size):
                chunk = pairs[s:s + cfg.batch_size]
                gens = [image_generator(header["seed"], ents[i].source.relative_to(src_root).as_posix())
                        for _, i in chunk]
                xm = mark_batch(net, x[[i for _, i in chunk]], carriers[[j for j, _ in chunk]].contiguous(), cfg, gens)
                for (j, i), m in zip(chunk, xm):
                    out[j, i] = m
            marks[k] = out
            print(f"class {k}: {len(carriers)} carriers x {len(ents)} images, {time.time() - t0:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(marks, cache)
    # the real carrier's recomputed marks against the released files (same procedure, same draws)
    same = [float((marks[k][0].permute(0, 2, 3, 1).numpy() == np.stack([load_rgb(e.output) for e in pool[k]]))
                  .mean()) for k in pool]

    def mirror_stats(model: Path) -> np.ndarray:
        """(K, M + 1) mean mirror statistic per class and carrier."""
        net, meta = load_runnable(model)
        size = meta.get("preprocessing", {}).get("image_size")
        out = np.zeros((len(pool), a.decoys + 1))
        for k, ents in pool.items():
            lab = np.full(len(ents), meta["classes"].index(classes[k]))
            van = [load_rgb(e.source) for e in ents]
            for j in range(a.decoys + 1):
                mk = [m.permute(1, 2, 0).numpy() for m in marks[k][j]]
                lm = true_class_loss(_outputs(net, lambda i: mk[i], len(mk), size, 250), lab)
                lx = true_class_loss(_outputs(net, lambda i: mirror_image(van[i], mk[i]), len(mk), size, 250), lab)
                out[k, j] = float(np.mean(lx - lm))
        return out

    ref = mirror_stats(a.reference)
    for model in [a.reference, *a.suspects]:
        t0 = time.time()
        s = mirror_stats(model)
        row = {"record": str(a.record), "model": str(model), "reference": str(a.reference),
               "per_class": a.per_class, "decoys": a.decoys, "real_mark_pixels_equal_released": min(same)}
        for name, t in (("calibrated", s - ref), ("raw", s)):
            pk = (1 + (t[:, 1:] >= t[:, :1]).sum(1)) / (a.decoys + 1)
            fisher = sstats.chi2.logsf(-2 * np.log(pk).sum(), 2 * len(pk)) / math.log(10)
            z = (t[:, 0] - t[:, 1:].mean(1)) / t[:, 1:].std(1, ddof=1)
            row[name] = {"class_log10_p": np.log10(pk).round(3).tolist(), "fisher_log10_p": float(fisher),
                         "class_z": z.round(2).tolist(),
                         "stouffer_log10_p_gaussian": float(sstats.norm.logsf(z.sum() / math.sqrt(len(z))) / math.log(10)),
                         "real_T": t[:, 0].round(4).tolist(), "decoy_T_mean": t[:, 1:].mean(1).round(4).tolist()}
        row["seconds"] = time.time() - t0
        row["command"] = "python benchmarks/decoy_carriers.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        a.results.parent.mkdir(parents=True, exist_ok=True)
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
