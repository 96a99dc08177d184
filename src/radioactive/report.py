"""Plots and readable reports of detection results."""

from __future__ import annotations

import html as html_lib
import io
import json
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
    """PNG of the per-class cosines against the null density of the cosine (D = result.dim),
    and the decoy keys' distribution when the result has one.

    Returns:
        the written path.
    """
    import matplotlib.pyplot as plt

    fig = cosine_figure(result, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def cosine_figure(result: DetectionResult, title: str | None = None):
    """The matplotlib figure drawn by :func:`plot_cosines`."""
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
    ax.set_xlabel("cosine between the class's pulled-back input gradients and its carrier"
                  if result.method == "white-box gradient" else "cosine between pulled-back classifier row and carrier")
    ax.set_yticks([])
    ax.set_title(title or f"{result.method}: log10 p = {result.log10_pvalue:.2f}")
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def markdown_report(summary: dict, plots: dict[str, str]) -> str:
    """A short readable report of a demo run (Markdown).

    Args:
        summary: the demo's summary dictionary.
        plots: suspect name -> plot file name relative to the report.
    """
    s = summary
    scratch = s.get("setting") == "from-scratch"
    lines = [
        "# Radioactive data: demo report",
        "",
        f"Dataset: {s['dataset']}. Marked fraction: {100 * s['marked_fraction']:.1f} % "
        f"({s['marking']['num_marked']} of {s['marking']['num_images']} training images).",
        f"Marking: mean PSNR {s['psnr_db_mean']:.2f} dB (5th percentile {s['psnr_db_p5']:.2f} dB), "
        f"largest pixel change {s['linf_max']} levels of 255.",
    ]
    if scratch:
        m = s["marking_network"]
        lines += ["", "Setting: the trainer trains a ResNet-18 from scratch. The marking network is the owner's own "
                  f"ResNet-18, trained on the vanilla images ({100 * m['accuracy']:.2f} % test accuracy); the key "
                  "lives in its feature space and the marks follow the trainer's pad-crop + flip. The gradient "
                  f"test's references: {len(s['references'])} more vanilla ResNet-18, trained with other seeds ("
                  + ", ".join(f"{100 * r['accuracy']:.2f} %" for r in s["references"]) + ")."]
    lines += [
        "",
        "| suspect | trained on | test accuracy | test | log10 p | rank among decoy keys (log10) | log10 p (black-box) "
        "| verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in s["suspects"].items():
        emp = r.get("decoy_empirical_log10_pvalue")
        lines.append(f"| {name} | {r['trained_on']} | {100 * r['accuracy']:.2f} % | {r.get('test', 'white-box')} | "
                     f"{r['log10_pvalue']:.2f} | {'-' if emp is None else f'{emp:.2f}'} | "
                     f"{r.get('blackbox_log10_pvalue', float('nan')):.2f} | "
                     f"{'detected' if r['detected'] else 'not detected'} |")
    if scratch:
        test = ("The gradient test (white-box, needs the suspect's weights) takes, for each marked image's vanilla "
                "original, the suspect's loss gradient pulled back into the marking network's feature space, minus "
                "the same for a vanilla reference model the owner trained, sums it per class, and takes "
                "the cosine with the class's carrier. Its p-value is the probability that a model which never saw "
                "the marked images would give cosines this aligned; it is exact under that null, whatever the "
                "model (docs/concepts.md, gradient test).")
    else:
        test = ("The p-value is the probability that a model which never saw the marked images would show cosines "
                "this aligned with the secret carriers. It is exact under that null hypothesis, whatever the model. "
                "The decoy column is the rank of the real key among fresh random keys scored against the same "
                "model (an empirical p-value, bounded below by 1/(decoys+1)).")
    lines += ["", "What this means: " + test + f" The verdict uses alpha = {s['alpha']:g} on that p-value. "
              "The black-box p-value compares the model's loss on the marked images with their vanilla versions "
              "(one-sided Wilcoxon signed-rank).", ""]
    for name, p in plots.items():
        lines += [f"## {name}", "", f"![{name}]({p})", ""]
    lines += ["Detailed, self-contained reports: " + ", ".join(f"[{n}](report-{n}.html)" for n in s["suspects"]) + ".",
              "", f"Total time: {s['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _png_data_uri(fig_or_array) -> str:
    """A PNG data URI from a matplotlib figure or an (H, W, 3) uint8 array."""
    import base64

    buf = io.BytesIO()
    if isinstance(fig_or_array, np.ndarray):
        from PIL import Image

        Image.fromarray(fig_or_array).save(buf, format="PNG")
    else:
        import matplotlib.pyplot as plt

        fig_or_array.savefig(buf, format="png")
        plt.close(fig_or_array)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _lossy_paragraph(fmt: dict, lines: list[dict]) -> str:
    """What a lossy released copy (``mark --output-format``) did to the marked images, from the record."""
    rel = [ln for ln in lines if ln.get("released") and "carrier_shift" in ln]
    psnr_r = [ln["psnr_db_released"] for ln in rel if ln.get("psnr_db_released") is not None]
    before = sum(ln["carrier_shift_lossless"] for ln in rel)
    after = sum(ln["carrier_shift"] for ln in rel)
    text = (f"<p><b>Lossy release</b> ({html_lib.escape(fmt['format'])}, quality {fmt.get('quality')}): the PSNR "
            "above is the marked images' before encoding; the released files the examples below are read from "
            f"were encoded afterwards")
    if psnr_r:
        text += f" (mean PSNR {np.mean(psnr_r):.2f} dB as decoded)"
    if rel and before > 0:
        text += (f". They keep {100 * after / before:.1f} % of the mark's feature shift along the carriers "
                 f"({len(rel)} released marked images; 100 % for a lossless PNG release)")
    return text + ".</p>"


def html_report(result: DetectionResult, path: str | Path, record: str | Path | None = None,
                triplets: int = 4, amplify: int = 10) -> Path:
    """One self-contained HTML file (images embedded, no network) for a detection result.

    Args:
        result: a white-box or black-box result.
        path: HTML file to write.
        record: the private record of the marking; when given, the report adds
            the PSNR distribution of the marked images and ``triplets`` rows of
            vanilla / marked / difference (amplified ``amplify`` times around grey).

    Returns:
        the written path.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import load_rgb

    parts = ["<h1>Radioactive data: detection report</h1>",
             f"<p class='verdict'><b>{html_lib.escape(result.verdict())}</b></p>",
             "<ul>",
             f"<li>method: {result.method}</li>",
             f"<li>combined p-value: {result.pvalue_text} (log10 p = {result.log10_pvalue:.3f})</li>",
             f"<li>significance level alpha: {result.alpha:g}</li>",
             f"<li>key fingerprint: {html_lib.escape(result.key_fingerprint)}</li>"]
    if result.alignment_r2 is not None:
        parts.append(f"<li>alignment R&sup2;: {result.alignment_r2:.3f} on {result.num_alignment_images} vanilla images</li>")
    parts.append("</ul>")
    parts.append("<p>The p-value is the probability, for a model that never saw data marked with this key, of a "
                 "result at least this extreme. It is exact under that null hypothesis: a small value means the "
                 "model was very likely trained on the marked data; a large one means no evidence, not proof of "
                 "innocence.</p>")
    if result.cosines:
        parts.append("<h2>Per-class cosines against the null</h2>")
        parts.append(f"<img alt='per-class cosines' src='{_png_data_uri(cosine_figure(result))}'>")
        rows = "".join(f"<tr><td>{html_lib.escape(c)}</td><td>{cos:.4f}</td><td>{lp:.2f}</td></tr>"
                       for c, cos, lp in zip(result.classes, result.cosines, result.class_log10_pvalues))
        parts.append(f"<table><tr><th>class</th><th>cosine</th><th>log10 p</th></tr>{rows}</table>")
    if result.method == "black-box decoy-carrier":
        parts.append(f"<h2>Real carrier against {result.extra['decoy_carriers']} decoy carriers per class</h2>")
        rows = "".join(f"<tr><td>{html_lib.escape(c)}</td><td>{t:.4f}</td><td>{d:.4f}</td><td>{lp:.2f}</td></tr>"
                       for c, t, d, lp in zip(result.classes, result.extra["real_statistic"],
                                              result.extra["decoy_statistic_mean"], result.class_log10_pvalues))
        parts.append("<table><tr><th>class</th><th>statistic, real carrier</th><th>mean over decoys</th>"
                     f"<th>log10 p (rank)</th></tr>{rows}</table>")
    if result.extra:
        shown = {k: v for k, v in result.extra.items() if k != "decoys"}
        if "decoys" in result.extra:
            shown["decoys"] = {k: v for k, v in result.extra["decoys"].items() if k != "log10_pvalues"}
        parts.append("<h2>Details</h2><pre>" + html_lib.escape(json.dumps(shown, indent=2)) + "</pre>")
    if record is not None:
        from .blackbox import read_record

        header, entries = read_record(record)
        lines = [json.loads(ln) for ln in Path(record).read_text().splitlines()[1:] if ln.strip()]
        psnr = [ln["psnr_db"] for ln in lines if ln.get("psnr_db") is not None]
        if psnr:
            fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
            ax.hist(psnr, bins=40, color="tab:green", alpha=0.7)
            ax.set_xlabel("PSNR of marked images (dB)")
            ax.set_ylabel("images")
            fig.tight_layout()
            parts.append(f"<h2>Image quality</h2><p>{len(psnr)} marked images, mean PSNR {np.mean(psnr):.2f} dB, "
                         f"5th percentile {np.percentile(psnr, 5):.2f} dB.</p>")
            fmt = header.get("output_format")
            if fmt and fmt.get("format") != "png":
                parts.append(_lossy_paragraph(fmt, lines))
            parts.append(f"<img alt='PSNR histogram' src='{_png_data_uri(fig)}'>")
        rows = []
        for e in entries[:triplets]:
            try:
                v, m = load_rgb(e.source), load_rgb(e.output)
            except Exception:  # a moved folder: skip the examples, keep the report
                continue
            diff = np.clip(128 + amplify * (m.astype(np.int32) - v.astype(np.int32)), 0, 255).astype(np.uint8)
            scale = max(1, 128 // max(v.shape[:2]))
            big = [np.kron(a, np.ones((scale, scale, 1), np.uint8)) for a in (v, m, diff)]
            rows.append("<tr>" + "".join(f"<td><img alt='{t}' src='{_png_data_uri(a)}'></td>"
                                         for t, a in zip(("vanilla", "marked", "difference"), big)) + "</tr>")
        if rows:
            parts.append(f"<h2>Examples</h2><table><tr><th>vanilla</th><th>marked</th>"
                         f"<th>difference x{amplify}</th></tr>{''.join(rows)}</table>")
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>radioactive report</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px 8px}.verdict{font-size:1.2em}img{max-width:100%}"
           "</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = Path(path)
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path

