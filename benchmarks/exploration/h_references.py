import numpy as np
from radioactive.stats import cosine_log10_pvalue, fisher_log10_pvalue
def lp(W, C, dim=512):
    cos = (W * C).sum(1) / np.linalg.norm(W, axis=1) / np.linalg.norm(C, axis=1)
    return fisher_log10_pvalue(np.asarray(cosine_log10_pvalue(cos, dim), float)), cos
def classsum(h, y, K=10): return np.stack([h[y == k].sum(0) for k in range(K)])
for s in (0, 1, 2):
    z = np.load(f"runs/exploration/demo{s}.npz"); C = z["carriers"]; ym, yu = z["y_marked"], z["y_unmarked"]
    refs = [f"v{t}" for t in range(5) if t not in (s, s + 1)]
    for who in ("suspect", f"v{s+1}"):
        for nr in (1, 2, 3):
            R = refs[:nr] if s != 0 else refs[:nr]
            hm = z[f"{who}_marked"].astype(float) - np.mean([z[f"{r}_marked"] for r in R], 0)
            hu = z[f"{who}_unmarked"].astype(float) - np.mean([z[f"{r}_unmarked"] for r in R], 0)
            a, cm = lp(classsum(hm, ym), C); b, cu = lp(classsum(hu, yu), C)
            c, _ = lp(classsum(hm, ym) + classsum(hu, yu), C)
            print(f"demo{s} {who:8s} refs{nr} marked {a:6.2f} unmarked {b:6.2f} both {c:6.2f}  |S_m|/|S_u| "
                  f"{np.linalg.norm(classsum(hm, ym))/np.linalg.norm(classsum(hu, yu)):.2f}")
    # twin reference: suspect minus its same-seed vanilla twin (not available to an owner; shows the ceiling)
    hm = z["suspect_marked"].astype(float) - z[f"v{s+1}_marked"]
    print(f"demo{s} suspect twin-ref marked {lp(classsum(hm, ym), C)[0]:6.2f}", np.round(lp(classsum(hm, ym), C)[1], 3))
    for t in range(5):
        print(f"   norms {t}", np.median(np.linalg.norm(z[f'v{t}_marked'], axis=1)).round(2), end="")
    print("  suspect", np.median(np.linalg.norm(z['suspect_marked'], axis=1)).round(2))
