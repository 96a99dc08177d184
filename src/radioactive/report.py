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
from .errors import RadioactiveError


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


LABELLED_CLASSES = 20
"""At most this many classes are named on a cosine plot (the highest cosines); the table lists every class."""


def drawable_label(name: str, index: int) -> str:
    """``name`` if matplotlib's default font has a glyph for each of its characters, else ``#index`` (the HTML
    table, which the browser draws with its own fonts, shows the real name)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    if all(font.get_char_index(ord(ch)) != 0 or ch.isspace() for ch in name):
        return name
    return f"#{index}"


def cosine_figure(result: DetectionResult, title: str | None = None):
    """The matplotlib figure drawn by :func:`plot_cosines`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cos = np.asarray(result.cosines)
    spread = 5 / np.sqrt(max(result.dim, 2))
    lim = max(spread, float(np.abs(cos).max()) * 1.15 if len(cos) else spread)
    grid = np.linspace(-lim, lim, 400)
    decoys = getattr(result.details, "decoys", None)
    if decoys:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
        vals = np.asarray(decoys.log10_pvalues)
        lo = min(vals.min(), result.log10_pvalue) - 0.5
        ax2.hist(vals, bins=30, range=(lo, 0), color="tab:gray", alpha=0.6, label=f"{len(vals)} decoy keys")
        ax2.axvline(result.log10_pvalue, color="tab:red", lw=2, label="the real key")
        ax2.set_xlabel("combined log10 p-value")
        ax2.set_title(f"empirical log10 p = {decoys.empirical_log10_pvalue:.2f}", fontsize=10)
        ax2.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    dens = null_cosine_density(grid, result.dim)
    ax.fill_between(grid, dens, alpha=0.25, color="tab:gray", label=f"null density (D = {result.dim})")
    top = dens.max()
    labelled = set(np.argsort(-cos)[:LABELLED_CLASSES].tolist())  # at 100 classes, only the strongest are named
    for i, c in enumerate(cos):
        ax.vlines(c, 0, top * 0.9, color="tab:red" if result.class_log10_pvalues[i] < -2 else "tab:blue",
                  lw=1.5 if len(cos) <= 20 else 0.8)
        if i in labelled:
            ax.text(c, top * 0.92, drawable_label(result.classes[i], i), rotation=90, fontsize=7, ha="center",
                    va="bottom")
    ax.plot([], [], color="tab:red", label="class cosine (p < 0.01)")
    ax.plot([], [], color="tab:blue", label="class cosine")
    ax.set_xlabel("cosine between the class's pulled-back input gradients and its carrier"
                  if result.method == "gradient" else "cosine between pulled-back classifier row and carrier")
    if len(cos) > LABELLED_CLASSES:
        ax.text(0.99, 0.97, f"the {LABELLED_CLASSES} highest of {len(cos)} classes named", transform=ax.transAxes,
                ha="right", va="top", fontsize=7)
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
        f"Release: `{s.get('release')}` (images only: the folder to publish). Vault: `{s.get('vault')}` (the key, "
        "the record, the audit plan, the owner's models; private, 0700 folders and 0600 files). Commitment to "
        f"publish with the release: `{s.get('commitment')}`.",
        "",
        "| suspect | trained on | test accuracy | audit log10 p (Holm) | tests (validity: log10 p) | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in s["suspects"].items():
        tests = "; ".join(f"{m} ({t['validity']}: {t['log10_pvalue']:.2f})" for m, t in r["tests"].items())
        lp = r["log10_pvalue"]
        lines.append(f"| {name} | {r['trained_on']} | {100 * r['accuracy']:.2f} % | "
                     f"{'-' if lp is None else f'{lp:.2f}'} | {tests or '-'} | "
                     f"{'detected' if r['detected'] else 'not detected'} |")
    if scratch:
        test = ("The gradient test (needs a runnable suspect) takes, for each marked image's vanilla original, the "
                "suspect's loss gradient pulled back into the marking network's feature space, minus the same for "
                "the owner's vanilla reference models, sums it per class, and takes the cosine with the class's "
                "carrier. Its p-value is exact under the null that the suspect never saw the marked images, "
                "whatever the model (docs/concepts.md).")
    else:
        test = ("The white-box p-value is the probability that a model which never saw the marked images would show "
                "cosines this aligned with the secret carriers; it is exact under that null, whatever the model. "
                "The decoy keys are fresh random keys scored against the same model (reported, not used in the "
                "verdict).")
    lines += ["", "What this means: " + test + f" The audit runs the tests fixed in the vault's plan before any "
              f"suspect was trained and gives one verdict at family-wise alpha = {s['alpha']:g} (Holm's method).", ""]
    for name, p in plots.items():
        lines += [f"## {name}", "", f"![{name}]({p})", ""]
    lines += ["Detailed, self-contained audit reports: " + ", ".join(f"[{n}](audit-{n}.html)" for n in s["suspects"])
              + ".",
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


def _record_fingerprint(record: str | Path) -> str | None:
    from .data.record import read_record

    return read_record(record)[0].get("key_fingerprint")


def check_same_key(fingerprint: str, record: str | Path) -> None:
    """Refuse a record and a result made with different keys.

    Raises:
        RadioactiveError: the record's key fingerprint differs from ``fingerprint``.
    """
    theirs = _record_fingerprint(record)
    if fingerprint and theirs and theirs != fingerprint:
        raise RadioactiveError(f"the record was marked with key {theirs} but the result was computed with key "
                               f"{fingerprint}: give the record of the same key")


def _result_section(result: DetectionResult, heading: str = "h2") -> list[str]:
    """The parts of a report that describe one test's result (verdict first)."""
    from dataclasses import asdict

    lp = "n/a (descriptive: no valid null)" if result.log10_pvalue is None else f"{result.log10_pvalue:.3f}"
    parts = [f"<p class='verdict'><b>{html_lib.escape(result.verdict())}</b></p>", "<ul>",
             f"<li>test: {result.method} (validity: {result.validity})</li>",
             f"<li>combined p-value: {result.pvalue_text} (log10 p = {lp})</li>",
             f"<li>significance level alpha: {result.alpha:g}</li>",
             f"<li>key fingerprint: {html_lib.escape(result.key_fingerprint)}</li>"]
    if result.exploratory:
        parts.append("<li><b>exploratory</b>: settings changed after the plan was fixed: "
                     + html_lib.escape("; ".join(result.exploratory)) + "</li>")
    d = result.details
    if getattr(d, "alignment_r2", None) is not None:
        held = "" if d.alignment_r2_heldout is None else f", {d.alignment_r2_heldout:.3f} on held-out images"
        parts.append(f"<li>alignment R&sup2;: {d.alignment_r2:.3f} in sample{held} ({d.num_alignment_images} vanilla "
                     "images)</li>")
    parts.append("</ul>")
    if getattr(d, "alignment_caveat", ""):
        parts.append(f"<p class='caveat'><b>Caveat:</b> {html_lib.escape(d.alignment_caveat)}</p>")
    if result.cosines:
        parts.append(f"<{heading}>Per-class cosines against the null</{heading}>")
        parts.append(f"<img alt='per-class cosines' src='{_png_data_uri(cosine_figure(result))}'>")
        rows = "".join(f"<tr><td>{html_lib.escape(c)}</td><td>{cos:.4f}</td><td>{lp:.2f}</td></tr>"
                       for c, cos, lp in zip(result.classes, result.cosines, result.class_log10_pvalues))
        parts.append(f"<table><tr><th>class</th><th>cosine</th><th>log10 p</th></tr>{rows}</table>")
    if result.method == "decoy-carrier":
        parts.append(f"<{heading}>Real carrier against {d.decoy_carriers} decoy carriers per class</{heading}>")
        rows = "".join(f"<tr><td>{html_lib.escape(c)}</td><td>{t:.4f}</td><td>{m:.4f}</td><td>{lp:.2f}</td></tr>"
                       for c, t, m, lp in zip(result.classes, d.real_statistic, d.decoy_statistic_mean,
                                              result.class_log10_pvalues))
        parts.append("<table><tr><th>class</th><th>statistic, real carrier</th><th>mean over decoys</th>"
                     f"<th>log10 p (rank)</th></tr>{rows}</table>")
    if d is not None:
        shown = asdict(d)
        if isinstance(shown.get("decoys"), dict):
            shown["decoys"] = {k: v for k, v in shown["decoys"].items() if k != "log10_pvalues"}
        parts.append(f"<details><summary>Details ({type(d).__name__})</summary><pre>"
                     + html_lib.escape(json.dumps({"settings": result.settings, **shown}, indent=2)) + "</pre></details>")
    return parts


def _record_section(record: str | Path, triplets: int, amplify: int) -> list[str]:
    """PSNR distribution and vanilla / marked / difference examples from the private record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import load_rgb
    from .data.record import read_record

    parts = []
    header, entries = read_record(record)
    lines = [json.loads(ln) for ln in Path(record).read_text().splitlines()[1:] if ln.strip()]
    psnr = [ln["psnr_db"] for ln in lines if isinstance(ln.get("psnr_db"), (int, float))]
    if psnr:
        fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
        ax.hist(psnr, bins=40, color="tab:green", alpha=0.7)
        ax.set_xlabel("PSNR of marked images (dB)")
        ax.set_ylabel("images")
        fig.tight_layout()
        parts.append(f"<h2>Image quality</h2><p>{len(psnr)} marked images, mean PSNR {np.mean(psnr):.2f} dB, "
                     f"5th percentile {np.percentile(psnr, 5):.2f} dB, minimum {np.min(psnr):.2f} dB.</p>")
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
    return parts


_NULL_TEXT = ("<p>A p-value is the probability, for a model that never saw data marked with this key, of a result "
              "at least this extreme. Each test declares how its null holds: exact, conservative (never too small), "
              "or approximate; a descriptive effect size has no p-value. A small value means the model was very "
              "likely trained on the marked data; a large one means no evidence, not proof of innocence.</p>")


def _write_page(path: str | Path, title: str, parts: list[str]) -> Path:
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html_lib.escape(title) + "</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px 8px}.verdict{font-size:1.2em}img{max-width:100%}"
           ".caveat{background:#fff4e0;padding:6px}</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = Path(path)
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path


def html_report(result: DetectionResult, path: str | Path, record: str | Path | None = None,
                triplets: int = 4, amplify: int = 10) -> Path:
    """One self-contained HTML file (images embedded, no network) for one test's result, verdict first.

    Args:
        result: a detection result.
        path: HTML file to write.
        record: the private record of the marking; when given (it must be the same key's), the report adds the
            PSNR distribution of the marked images and ``triplets`` rows of vanilla / marked / difference
            (amplified ``amplify`` times around grey).

    Returns:
        the written path.

    Raises:
        RadioactiveError: a record of another key.
    """
    if record is not None:
        check_same_key(result.key_fingerprint, record)
    parts = ["<h1>Radioactive data: detection report</h1>", *_result_section(result), _NULL_TEXT]
    if record is not None:
        parts += _record_section(record, triplets, amplify)
    return _write_page(path, "radioactive report", parts)


def audit_html(audit, path: str | Path, vault: str | Path | None = None, record: str | Path | None = None,
               triplets: int = 4, amplify: int = 10) -> Path:
    """One self-contained HTML file for an audit: the family's verdict first, then a table of the tests (validity,
    p-value, Holm-adjusted p-value), what did not run and why, the vault's checks, and each test's section.

    Args:
        audit: a :class:`radioactive.detection.audit.AuditResult`.
        vault: the owner's vault (its record adds image quality and examples); or ``record``.

    Raises:
        RadioactiveError: a record of another key.
    """
    if record is None and vault is not None:
        from .vault import open_vault

        record = open_vault(vault).record_path
    fingerprint = next((t.key_fingerprint for t in audit.tests if t.key_fingerprint), "")
    if record is not None:
        check_same_key(fingerprint, record)
    parts = ["<h1>Radioactive data: audit report</h1>",
             f"<p class='verdict'><b>{html_lib.escape(audit.verdict())}</b></p>"]
    rows = "".join(f"<tr><td>{t.method}</td><td>{t.validity}</td><td>{t.pvalue_text}</td>"
                   f"<td>{format_adjusted(audit.adjusted_log10_pvalues.get(t.method))}</td>"
                   f"<td>{'yes' if t.exploratory else 'no'}</td></tr>" for t in audit.tests)
    parts.append("<table><tr><th>test</th><th>validity</th><th>p-value</th><th>Holm-adjusted</th>"
                 f"<th>exploratory</th></tr>{rows}</table>")
    if audit.not_run:
        parts.append("<p>Not run:</p><ul>" + "".join(f"<li>{html_lib.escape(k)}: {html_lib.escape(v)}</li>"
                                                    for k, v in audit.not_run.items()) + "</ul>")
    v = audit.vault or {}
    checks = []
    if v.get("commitment_matches") is not None:
        checks.append("the vault matches the published commitment" if v["commitment_matches"]
                      else "<b>the vault does NOT match the published commitment</b>")
    if v.get("manifest_problems"):
        checks.append("<b>the vault differs from its manifest</b>: "
                      + html_lib.escape("; ".join(map(str, v["manifest_problems"][:5]))))
    elif v:
        checks.append("every file of the vault matches its manifest")
    if checks:
        parts.append("<p>Vault: " + "; ".join(checks) + ".</p>")
    parts.append(_NULL_TEXT + f"<p>The audit's verdict controls the family-wise error at alpha = {audit.alpha:g} "
                 "over the tests run (Holm's step-down method).</p>")
    for t in audit.tests:
        parts += [f"<h2>{t.method}</h2>", *_result_section(t, "h3")]
    if record is not None:
        parts += _record_section(record, triplets, amplify)
    return _write_page(path, "radioactive audit", parts)


def format_adjusted(log10_p: float | None) -> str:
    from .stats import format_pvalue

    return "-" if log10_p is None else format_pvalue(log10_p)
