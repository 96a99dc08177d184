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

    python benchmarks/studies/from_scratch/decoy_carriers.py --record runs/from_scratch/marked-6c22132bfb.record.jsonl \
        --marker runs/from_scratch/models/control-vanilla-resnet18-30-0.05-0.safetensors --key-seed 1000 \
        --reference runs/from_scratch/models/control-vanilla-resnet18-30-0.05-3.safetensors \
        --suspects runs/from_scratch/models/suspect-6c22132bfb-resnet18-30-0.05-1.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sstats

from radioactive.blackbox import read_record
from radioactive.data import load_rgb
from radioactive.decoys import DecoyMarks, decoy_marks, mirror_statistics
from radioactive.keys import generate_key
from radioactive.networks import MarkingNetworkSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line  # noqa: E402


def cached_marks(a, key) -> DecoyMarks:
    """radioactive.decoys.decoy_marks, cached in --cache (a dict of uint8 tensors: class -> (M + 1, n, 3, H, W))."""
    cache = a.cache / f"{a.record.stem}-n{a.per_class}-m{a.decoys}-s{a.decoy_seed}.pt"
    if not cache.is_file():
        t0 = time.time()
        marks = decoy_marks(a.record, key, a.per_class, a.decoys, a.decoy_seed, a.device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: torch.from_numpy(m).permute(0, 1, 4, 2, 3) for k, m in zip(marks.classes, marks.marked)}, cache)
        print(f"marked {sum(m.shape[0] * m.shape[1] for m in marks.marked)} images in {time.time() - t0:.0f} s",
              flush=True)
        return marks
    saved = torch.load(cache, weights_only=True)  # written by this script
    _, entries = read_record(a.record)
    index = {c: i for i, c in enumerate(key.classes)}
    vanilla = {k: [load_rgb(e.source) for e in entries if e.released and index[e.class_name] == k][:a.per_class]
               for k in saved}
    classes = sorted(saved)
    return DecoyMarks(classes, [vanilla[k] for k in classes],
                      [saved[k].permute(0, 1, 3, 4, 2).numpy() for k in classes], a.decoys, a.decoy_seed,
                      key.fingerprint)


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
    p.add_argument("--device", default="cpu", help="torch device of the marking (cpu, cuda)")
    p.add_argument("--cache", type=Path, default=Path("runs/decoy_carriers"))
    p.add_argument("--results", type=Path, default=RESULTS / "decoy_carriers.jsonl")
    a = p.parse_args(argv)
    header, _ = read_record(a.record)
    key = generate_key(header["classes"], MarkingNetworkSpec("trained", 32, path=str(a.marker)), seed=a.key_seed)
    if key.fingerprint != header["key_fingerprint"]:
        raise SystemExit("the key does not match the record")
    marks = cached_marks(a, key)
    ref = mirror_statistics(a.reference, marks, key.classes)
    for model in [a.reference, *a.suspects]:
        t0 = time.time()
        s = mirror_statistics(model, marks, key.classes)
        row = {"record": str(a.record), "model": str(model), "reference": str(a.reference),
               "per_class": a.per_class, "decoys": a.decoys}
        for name, t in (("calibrated", s - ref), ("raw", s)):
            pk = (1 + (t[:, 1:] >= t[:, :1]).sum(1)) / (a.decoys + 1)
            fisher = sstats.chi2.logsf(-2 * np.log(pk).sum(), 2 * len(pk)) / math.log(10)
            z = (t[:, 0] - t[:, 1:].mean(1)) / t[:, 1:].std(1, ddof=1)
            row[name] = {"class_log10_p": np.log10(pk).round(3).tolist(), "fisher_log10_p": float(fisher),
                         "class_z": z.round(2).tolist(),
                         "stouffer_log10_p_gaussian": float(sstats.norm.logsf(z.sum() / math.sqrt(len(z))) / math.log(10)),
                         "real_T": t[:, 0].round(4).tolist(), "decoy_T_mean": t[:, 1:].mean(1).round(4).tolist()}
        row["seconds"] = time.time() - t0
        row = append_result(a.results, row, command_line(__file__, argv or sys.argv[1:]))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
