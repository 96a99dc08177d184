"""Per-image pulled-back gradients h for every vanilla model and the marked suspect of each demo replicate."""
import sys, json, random
from pathlib import Path
import numpy as np, torch
from radioactive.keys import Key
from radioactive.blackbox import read_record
from radioactive.gradient import pulled_back_gradients, _batches
from radioactive.networks import load_marking_network, load_runnable

V = {0: "demo-output/private/marking-network", 1: "demo-output/models/vanilla", 2: "demo-output/private/reference",
     3: "runs/demo_replicates/from-scratch-seed1/private/reference",
     4: "runs/demo_replicates/from-scratch-seed2/private/reference"}
DEMOS = {0: "demo-output", 1: "runs/demo_replicates/from-scratch-seed1", 2: "runs/demo_replicates/from-scratch-seed2"}
torch.set_num_threads(2)
for s, d in DEMOS.items():
    out = Path(f"runs/exploration/demo{s}.npz")
    if out.exists():
        continue
    key = Key.load(f"{d}/private/key.safetensors")
    header, entries = read_record(f"{d}/private/record.jsonl")
    released = [e for e in entries if e.released]
    marked_src = {e.source for e in released}
    # unmarked training images: same record lists copied ones? take from the vanilla folder
    src_root = Path(header["source"])
    rng = random.Random(123)
    others = []
    for c in key.classes:
        files = sorted(p for p in (src_root / c).iterdir() if p not in marked_src)
        others += [(c, p) for p in rng.sample(files, 100)]
    class E:  # minimal entry
        def __init__(self, c, p): self.class_name, self.source, self.sha256 = c, p, None
    sets = {"marked": released, "unmarked": [E(c, p) for c, p in others]}
    marker = load_marking_network(key.network)[0].eval()
    for p in marker.parameters(): p.requires_grad_(False)
    models = {f"v{t}": V[t] + ".safetensors" for t in V}
    models["suspect"] = f"{d}/models/marked.safetensors"
    res = {"carriers": key.carriers.double().numpy(), "classes": np.array(key.classes)}
    for name, path in models.items():
        net, meta = load_runnable(path); net.eval()
        for sname, ents in sets.items():
            hs, ys = [], []
            for batch, x in _batches(ents, 100):
                y = torch.tensor([meta["classes"].index(e.class_name) for e in batch])
                hs.append(pulled_back_gradients(net, marker, x, y).float().numpy())
                ys.append(np.array([key.classes.index(e.class_name) for e in batch]))
            res[f"{name}_{sname}"] = np.concatenate(hs); res[f"y_{sname}"] = np.concatenate(ys)
        print(s, name, flush=True)
    # marker features of the vanilla images
    feats = []
    for sname in ("marked", "unmarked"):
        for batch, x in _batches(sets[sname], 100):
            with torch.no_grad(): feats.append(marker.features(x).numpy())
    res["features"] = np.concatenate(feats)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **res)
