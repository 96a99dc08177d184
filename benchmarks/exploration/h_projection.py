# Exploration (benchmarks/exploration/README.md); output: h_projection.txt
import numpy as np, sys
from radioactive.stats import cosine_log10_pvalue, fisher_log10_pvalue

def test(S, C, P=None):
    """S (K,D) class sums, C (K,D) carriers, P (D,r) orthonormal basis of the removed subspace."""
    if P is not None:
        S = S - (S @ P) @ P.T; C = C - (C @ P) @ P.T
        dim = S.shape[1] - P.shape[1]
    else:
        dim = S.shape[1]
    cos = (S * C).sum(1) / np.linalg.norm(S, axis=1) / np.linalg.norm(C, axis=1)
    return fisher_log10_pvalue(np.asarray(cosine_log10_pvalue(cos, dim), float)), cos

def classsum(h, y, K=10):
    return np.stack([h[y == k].sum(0) for k in range(K)])

def basis(X, r):
    X = X - X.mean(0)
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    return vt[:r].T

def within(h, y):
    h = h.copy()
    for k in np.unique(y): h[y == k] -= h[y == k].mean(0)
    return h

R = [0, 4, 8, 16, 32, 64, 128, 256]
for s in (0, 1, 2):
    z = np.load(f"runs/exploration/demo{s}.npz")
    C = z["carriers"]; ym, yu = z["y_marked"], z["y_unmarked"]
    refs = [f"v{t}" for t in range(5) if t not in (s, s + 1)]
    ref = refs[0]
    for who in ("suspect", f"v{s+1}"):
        hm = z[f"{who}_marked"].astype(float) - z[f"{ref}_marked"]
        hu = z[f"{who}_unmarked"].astype(float) - z[f"{ref}_unmarked"]
        S = classsum(hm, ym)
        out = {}
        srcs = {
            "A_unmarked_d": within(hu, yu),
            "B_marked_d_within": within(hm, ym),
            "C_features": z["features"].astype(float),
            "D_refref_unm": (z[f"{refs[1]}_unmarked"] - z[f"{refs[2]}_unmarked"]).astype(float),
            "F_ref_h_unm": z[f"{ref}_unmarked"].astype(float),
        }
        line = [f"demo{s} {who:8s} base {test(S, C)[0]:7.2f}"]
        for nm, X in srcs.items():
            vals = [test(S, C, basis(X, r) if r else None)[0] for r in R]
            line.append(f"  {nm:20s} " + " ".join(f"{v:7.2f}" for v in vals))
        print("\n".join(line))
    print()
