"""Gradient-test variants: which loss the suspect's input gradient is taken of.

    python benchmarks/exploration/gradient_losses.py                      # gradient_losses.txt
    python benchmarks/exploration/gradient_losses.py ce_t2 ce_t8 ce_t16   # gradient_temperatures.txt

Kinds: ``ce`` (T = 1), ``ce_tN`` (cross-entropy at temperature N, through the library's pulled_back_gradients),
``margin`` (logit margin), ``logit`` (raw logit of the class).
"""
import sys
import numpy as np, torch, torch.nn.functional as F, warnings
from radioactive.keys import Key
from radioactive.blackbox import read_record
from radioactive.gradient import _batches, pulled_back_gradients
from radioactive.networks import load_marking_network, load_runnable
from radioactive.stats import cosine_log10_pvalue, fisher_log10_pvalue
V = {0: "demo-output/private/marking-network", 1: "demo-output/models/vanilla", 2: "demo-output/private/reference",
     3: "runs/demo_replicates/from-scratch-seed1/private/reference",
     4: "runs/demo_replicates/from-scratch-seed2/private/reference"}
DEMOS = {0: "demo-output", 1: "runs/demo_replicates/from-scratch-seed1", 2: "runs/demo_replicates/from-scratch-seed2"}
torch.set_num_threads(2)
def loss(logits, y, kind):
    if kind == "margin":
        other = logits.clone(); other[torch.arange(len(y)), y] = -1e9
        return -(logits[torch.arange(len(y)), y] - torch.logsumexp(other, 1)).sum()
    if kind == "logit": return -logits[torch.arange(len(y)), y].sum()
def h(net, marker, x, y, kind):
    if kind == "ce" or kind.startswith("ce_t"):
        return pulled_back_gradients(net, marker, x, y, temperature=float(kind[4:]) if kind != "ce" else 1.0)
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(net(x), y, kind), x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        _, j = torch.func.jvp(marker.features, (x.detach(),), (-g,))
    return j.double()
KINDS = tuple(sys.argv[1:]) or ("ce", "margin", "ce_t4", "logit")
for s, d in DEMOS.items():
    key = Key.load(f"{d}/private/key.safetensors")
    _, entries = read_record(f"{d}/private/record.jsonl")
    ents = [e for e in entries if e.released]
    marker = load_marking_network(key.network)[0].eval()
    for p in marker.parameters(): p.requires_grad_(False)
    models = {"suspect": f"{d}/models/marked.safetensors", "control": V[s + 1] + ".safetensors",
              **{f"r{t}": V[t] + ".safetensors" for t in range(5) if t not in (s, s + 1)}}
    sums = {}
    for name, path in models.items():
        net, meta = load_runnable(path); net.eval()
        S = {k: torch.zeros(10, 512, dtype=torch.float64) for k in KINDS}
        for batch, x in _batches(ents, 100):
            y = torch.tensor([meta["classes"].index(e.class_name) for e in batch])
            rows = torch.tensor([key.classes.index(e.class_name) for e in batch])
            for k in KINDS: S[k].index_add_(0, rows, h(net, marker, x, y, k))
        sums[name] = S
    refs = [m for m in models if m.startswith("r")]
    C = key.carriers.double()
    for k in KINDS:
        out = []
        for who in ("suspect", "control"):
            for nr in (1, 3):
                st = sums[who][k] - torch.stack([sums[r][k] for r in refs[:nr]]).mean(0)
                cos = F.cosine_similarity(st, C, dim=1).numpy()
                out.append(fisher_log10_pvalue(np.asarray(cosine_log10_pvalue(cos, 512), float)))
        print(f"demo{s} {k:7s} suspect r1 {out[0]:6.2f} r3 {out[1]:6.2f} | "
              f"control r1 {out[2]:6.2f} r3 {out[3]:6.2f}", flush=True)
