"""Plots and readable reports of detection results."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from scipy import special

from .data import atomic_write_bytes
from .detection import DetectionResult


def null_cosine_density(c: np.ndarray, dim: int) -> np.ndarray:
    """Density of the cosine between a fixed vector and a uniform unit vector in R^dim:
    (1 - c^2)^((dim-3)/2) / B(1/2, (dim-1)/2) on [-1, 1] (Sablayrolles et al. 2020, Section 3)."""
    c = np.clip(np.asarray(c, dtype=np.float64), -1 + 1e-15, 1 - 1e-15)
    log_f = (dim - 3) / 2 * np.log1p(-c * c) - special.betaln(0.5, (dim - 1) / 2)
    return np.exp(log_f)


def plot_cosines(result: DetectionResult, path: str | Path, title: str | None = None) -> Path:
    """PNG of the per-class cosines against the null density of the cosine (D = result.dim).

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cos = np.asarray(result.cosines)
    spread = 5 / np.sqrt(max(result.dim, 2))
    lim = max(spread, float(np.abs(cos).max()) * 1.15 if len(cos) else spread)
    grid = np.linspace(-lim, lim, 400)
    decoys = result.extra.get("decoys")
    if decoys:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
        vals = np.asarray(decoys["log10_pvalues"])
        lo = min(vals.min(), result.log10_pvalue) - 0.5
        ax2.hist(vals, bins=30, range=(lo, 0), color="tab:gray", alpha=0.6, label=f"{len(vals)} decoy keys")
        ax2.axvline(result.log10_pvalue, color="tab:red", lw=2, label="the real key")
        ax2.set_xlabel("combined log10 p-value")
        ax2.set_title(f"empirical log10 p = {decoys['empirical_log10_pvalue']:.2f}", fontsize=10)
        ax2.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    dens = null_cosine_density(grid, result.dim)
    ax.fill_between(grid, dens, alpha=0.25, color="tab:gray", label=f"null density (D = {result.dim})")
    top = dens.max()
    for i, c in enumerate(cos):
        ax.vlines(c, 0, top * 0.9, color="tab:red" if result.class_log10_pvalues[i] < -2 else "tab:blue", lw=1.5)
        if len(cos) <= 20:
            ax.text(c, top * 0.92, result.classes[i], rotation=90, fontsize=7, ha="center", va="bottom")
    ax.plot([], [], color="tab:red", label="class cosine (p < 0.01)")
    ax.plot([], [], color="tab:blue", label="class cosine")
    ax.set_xlabel("cosine between pulled-back classifier row and carrier")
    ax.set_yticks([])
    ax.set_title(title or f"{result.method}: log10 p = {result.log10_pvalue:.2f}")
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def markdown_report(summary: dict, plots: dict[str, str]) -> str:
    """A short readable report of a demo run (Markdown).

    Args:
        summary: the demo's summary dictionary.
        plots: suspect name -> plot file name relative to the report.
    """
    s = summary
    lines = [
        "# Radioactive data: demo report",
        "",
        f"Dataset: {s['dataset']}. Marked fraction: {100 * s['marked_fraction']:.1f} % "
        f"({s['marking']['num_marked']} of {s['marking']['num_images']} training images).",
        f"Marking: mean PSNR {s['psnr_db_mean']:.2f} dB (5th percentile {s['psnr_db_p5']:.2f} dB), "
        f"largest pixel change {s['linf_max']} levels of 255.",
        "",
        "| suspect | trained on | test accuracy | log10 p (white-box) | rank among decoy keys (log10) | log10 p (black-box) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in s["suspects"].items():
        emp = r.get("decoy_empirical_log10_pvalue")
        lines.append(f"| {name} | {r['trained_on']} | {100 * r['accuracy']:.2f} % | {r['log10_pvalue']:.2f} | "
                     f"{'-' if emp is None else f'{emp:.2f}'} | {r.get('blackbox_log10_pvalue', float('nan')):.2f} | "
                     f"{'detected' if r['detected'] else 'not detected'} |")
    lines += ["", "What this means: the p-value is the probability that a model which never saw the marked images "
              "would show cosines this aligned with the secret carriers. It is exact under that null hypothesis, "
              f"whatever the model. The verdict uses alpha = {s['alpha']:g} on the white-box p-value. "
              "The decoy column is the rank of the real key among fresh random keys scored against the same "
              "model (an empirical p-value, bounded below by 1/(decoys+1)). The black-box p-value compares the "
              "model's loss on the marked images with their vanilla versions (one-sided Wilcoxon signed-rank).", ""]
    for name, p in plots.items():
        lines += [f"## {name}", "", f"![{name}]({p})", ""]
    lines += [f"Total time: {s['seconds']:.0f} s.", ""]
    return "\n".join(lines)
