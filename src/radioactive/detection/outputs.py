"""The suspect's outputs: running a model on images, reading an outputs file from an API, the loss of the
true class, and the mirror images (the mark subtracted) that black-box tests query.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from ..data import encode_png, load_rgb, to_batch
from ..data.record import read_record
from ..errors import RadioactiveError


def true_class_loss(outputs: np.ndarray, labels: np.ndarray, kind: str = "logits") -> np.ndarray:
    """Cross-entropy of the true class.

    Args:
        outputs: (N, K) logits or probabilities.
        labels: (N,) class indices.
        kind: ``logits`` or ``probs``.

    Returns:
        (N,) float64 losses in nats; NaN where the outputs are not finite.
    """
    o = np.asarray(outputs, dtype=np.float64)
    idx = np.arange(len(o))
    with np.errstate(all="ignore"):
        if kind == "logits":
            m = o.max(1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(o - m).sum(1))
            loss = lse - o[idx, labels]
        elif kind == "probs":
            loss = -np.log(np.clip(o[idx, labels], 1e-300, None))
        else:
            raise RadioactiveError(f"outputs kind must be 'logits' or 'probs', got {kind!r}")
    loss[~np.isfinite(o).all(1)] = np.nan
    return loss


def model_outputs(net, paths: list[Path], image_size: int | None = None, batch_size: int = 250) -> np.ndarray:
    """Logits (N, K) of a runnable suspect on image files."""
    return outputs_of(net, lambda i: load_rgb(paths[i]), len(paths), image_size, batch_size)


def mirror_image(vanilla: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """The mirror of a marked image: the mark subtracted instead of added, ``clip(2 x - x_marked, 0, 255)``.

    Never released: the suspect cannot have trained on it. A model that fitted the marked version
    x + delta sits at distance 2 |delta| from the mirror x - delta, against |delta| from the vanilla x,
    so to second order its loss rises 4 times as much there as at x, while for a model that never saw
    either version the two are symmetric about x to second order (the mirror statistic of
    :func:`blackbox_detect`).

    Args:
        vanilla, marked: (H, W, 3) uint8 RGB of the same shape.

    Returns:
        (H, W, 3) uint8.

    Raises:
        RadioactiveError: shapes that differ (the marked file is not a copy of the vanilla image).
    """
    if vanilla.shape != marked.shape:
        raise RadioactiveError(f"marked image {marked.shape} and vanilla image {vanilla.shape} differ in shape")
    return np.clip(2 * vanilla.astype(np.int16) - marked.astype(np.int16), 0, 255).astype(np.uint8)


def default_mirror_dir(record: str | Path) -> Path:
    """Where :func:`write_mirror_images` writes by default: the vault's ``mirror/`` for a vault's record (a
    ``record.jsonl`` beside a ``key.safetensors``), else ``<record folder>/<record stem>.mirror``."""
    record = Path(record)
    if record.name == "record.jsonl" and (record.parent / "key.safetensors").is_file():
        return record.parent / "mirror"
    return record.parent / f"{record.stem}.mirror"


def write_mirror_images(record: str | Path, out: str | Path | None = None, source_root=None,
                        released_root=None) -> dict:
    """Write the mirror (:func:`mirror_image`) of every marked image of a record as PNG, for black-box
    detection through an API: query the suspect with these files too and add their outputs to the
    outputs file; :func:`blackbox_detect` then reports the mirror statistic (and, with a holdout, the
    exact control test on it).

    Layout: ``out/released/<output name>.png`` and ``out/holdout/<output name>.png`` (the record's
    output names, suffix ``.png``). The folder is written in full under a temporary name and renamed, so
    it is either complete or absent. Keep it private, like the record: the mirrors reveal the marks.

    Args:
        record: the private record of ``mark``.
        out: folder to create (default :func:`default_mirror_dir`); must not exist.

    Returns:
        ``{"mirror": folder, "num_images": n}``.

    Raises:
        RadioactiveError: as :func:`read_record`; ``out`` or ``<out>.partial`` exists (nothing is
        deleted); unreadable images; a marked image whose size differs from its vanilla version.
    """
    _, entries = read_record(record, source_root, released_root)
    out = Path(out) if out is not None else default_mirror_dir(record)
    tmp = out.with_name(out.name + ".partial")
    for p in (out, tmp):
        if p.exists():
            raise RadioactiveError(f"{p} exists; remove it or choose another folder")
    try:
        for e in entries:
            dst = tmp / e.mirror_name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(encode_png(mirror_image(load_rgb(e.source), load_rgb(e.output))))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"mirror": str(out), "num_images": len(entries)}


def outputs_of(net, load, n: int, image_size: int | None = None, batch_size: int = 250) -> np.ndarray:
    """Logits of a runnable suspect on images made or read on demand.

    Args:
        net: module mapping (B, 3, H, W) float images in [0, 1] to (B, K) outputs (:func:`load_runnable`).
        load: ``load(i)`` gives image i as (H, W, 3) uint8 RGB, for i in 0..n-1; called once per image,
            batch by batch, so at most ``batch_size`` images are held at a time.
        image_size: resize (bilinear) to this square size first, when given and different.

    Returns:
        (n, K) float64 outputs.
    """
    import torch
    from PIL import Image

    out = []
    for s in range(0, n, batch_size):
        imgs = []
        for i in range(s, min(n, s + batch_size)):
            a = load(i)
            if image_size is not None and a.shape[:2] != (image_size, image_size):
                a = np.asarray(Image.fromarray(a).resize((image_size, image_size), Image.BILINEAR))
            imgs.append(a)
        x = to_batch(imgs)
        with torch.no_grad():
            out.append(net(x).double().numpy())
    return np.concatenate(out)


def read_outputs_file(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Outputs a user got from an API.

    Formats: JSON lines ``{"path": ..., "logits": [...]}`` or ``{"path": ..., "probs": [...]}``;
    or CSV with a ``path`` column and columns ``logit_0..logit_{K-1}`` or ``prob_0..prob_{K-1}``.
    ``path`` is the image file as given to the API: the released copy's file
    for a marked image, the source file for its vanilla version (absolute,
    or relative to the outputs file's folder).

    Returns:
        path (resolved) -> (K,) outputs, and the kind (``logits`` or ``probs``).

    Raises:
        RadioactiveError: unreadable file, mixed kinds, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise RadioactiveError(f"outputs file not found: {path}")
    rows, kinds = {}, set()
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    cols = sorted((c for c in r if c and c.startswith(("logit_", "prob_"))),
                                  key=lambda c: int(c.split("_")[1]))
                    kinds.add("logits" if cols and cols[0].startswith("logit_") else "probs")
                    rows[r["path"]] = np.array([float(r[c]) for c in cols])
        else:
            for ln in path.read_text().splitlines():
                if not ln.strip():
                    continue
                r = json.loads(ln)
                kind = "logits" if "logits" in r else "probs"
                kinds.add(kind)
                rows[r["path"]] = np.asarray(r[kind], dtype=np.float64)
    except (ValueError, KeyError) as e:
        raise RadioactiveError(f"cannot read outputs file {path}: {e}") from e
    if not rows or len(kinds) != 1:
        raise RadioactiveError(f"{path}: expected rows with either logits or probs, not both")
    resolved = {str((path.parent / p).resolve()): v for p, v in rows.items()}
    return resolved, kinds.pop()
