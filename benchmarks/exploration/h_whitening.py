import numpy as np
from radioactive.stats import cosine_log10_pvalue, fisher_log10_pvalue
def lp(W, C, dim):
    cos = (W * C).sum(1) / np.linalg.norm(W, axis=1) / np.linalg.norm(C, axis=1)
    return fisher_log10_pvalue(np.asarray(cosine_log10_pvalue(cos, dim), float))
def classsum(h, y, K=10): return np.stack([h[y == k].sum(0) for k in range(K)])
def within(h, y):
    h = h.copy()
    for k in np.unique(y): h[y == k] -= h[y == k].mean(0)
    return h
for s in (0, 1, 2):
    z = np.load(f"runs/exploration/demo{s}.npz"); C = z["carriers"]; ym, yu = z["y_marked"], z["y_unmarked"]
    refs = [f"v{t}" for t in range(5) if t not in (s, s + 1)]; ref = refs[0]
    covs = {"Fref": np.cov(z[f"{ref}_unmarked"].T.astype(float)),
            "Fref_m": np.cov(z[f"{ref}_marked"].T.astype(float)),
            "feat": np.cov(z["features"].T.astype(float)),
            "Dwithin": None}
    for who in ("suspect", f"v{s+1}"):
        hm = z[f"{who}_marked"].astype(float) - z[f"{ref}_marked"]
        hu = z[f"{who}_unmarked"].astype(float) - z[f"{ref}_unmarked"]
        covs["Dwithin"] = np.cov(within(hu, yu).T)
        S = classsum(hm, ym)
        print(f"demo{s} {who:8s} base {lp(S, C, 512):6.2f}")
        for nm, Cv in covs.items():
            ev, V = np.linalg.eigh(Cv); ev, V = ev[::-1], V[:, ::-1]
            keep = " ".join(f"{lp(S @ V[:, :r], C @ V[:, :r], r):6.2f}" for r in (4, 8, 16, 32, 64, 128))
            ev = np.maximum(ev, ev[0] * 1e-6)
            pw = " ".join(f"{lp(S @ V @ np.diag(ev ** a) @ V.T, C, 512):6.2f}" for a in (-1, -0.5, 0.5, 1))
            print(f"   {nm:8s} keep-top r4..128: {keep} | pow -1,-.5,.5,1: {pw}")
