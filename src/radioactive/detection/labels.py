"""Label-only test: the decoy-carrier design read through the suspect's top-k labels only.

Many suspects can only be queried through an API that returns labels. This test keeps the decoy-carrier test's
randomisation (:mod:`radioactive.detection.decoys`: the real carrier of each class ranked among M decoy carriers,
all put through the same marking procedure on the same n released images) and replaces the loss by what a
label-only API gives. For a carrier c of class k and image i, with x + delta_c the image marked with c and
x - delta_c its mirror:

    hit(x) = 1 if class k is among the suspect's top-k labels of x, else 0
    T_k(c) = mean over the n images of [hit_S(x + delta_c) - hit_S(x - delta_c)] - (the same for the references)

A model trained on images marked with the real carrier learned it as a cue for class k, so it labels x + delta as
k more often than the mirror x - delta. p_k = (1 + #{decoys d : T_k(d) >= T_k(real)}) / (M + 1) and Fisher's
combination over classes, as in the decoy-carrier test.

Null hypothesis H0: the suspect and the references are independent of the key. The real carrier is then
exchangeable with its decoys (the labels are a function of the images, which the carriers make alike in law), so
p_k is super-uniform; ties count against the real carrier (>=), and Fisher over discrete p-values is conservative:
validity ``conservative``.

Access: labels on images the auditor makes at test time. With a model file, its top-k labels are computed here
(nothing else of its outputs is used). With a label-only API, two rounds: ``radioactive label-queries --vault V
--output Q`` writes the query images under opaque random names (the mapping stays in the vault's
``label-queries.json``: the names must not tell the real carrier from the decoys), the auditor sends them to the
API and writes its answers as JSON lines ``{"path": "Q/<name>.png", "labels": ["cat", "dog", ...]}``, and
``radioactive audit --vault V --labels answers.jsonl`` reads them.

Cost: as the decoy-carrier test: (M + 1) n K marking optimisations, and 2 (M + 1) n K queries.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import encode_png, sha256_file
from ..errors import RadioactiveError
from ..keys import Key
from ..stats import fisher_log10_pvalue
from ..suspects import load_runnable
from .access import OwnerFiles, SuspectAccess, derived_rng, stream_name
from .decoys import DECOY_TAG, DecoyMarks, decoy_marks, rank_pvalues
from .outputs import mirror_image, outputs_of
from .registry import MethodEntry, register_method, setting
from .result import DecoyCarrierDetails, DetectionResult

QUERIES_FILE = "label-queries.json"


def _pairs(marks: DecoyMarks):
    """(row, flat marked images (M+1)*n, their mirrors) per tested class; flat index = carrier * n + image."""
    for row, (vanilla, marked) in enumerate(zip(marks.vanilla, marks.marked)):
        flat = marked.reshape(-1, *marked.shape[2:])
        mirrors = np.stack([mirror_image(vanilla[j % len(vanilla)], flat[j]) for j in range(len(flat))])
        yield row, flat, mirrors


def hits_of_model(model: str | Path, marks: DecoyMarks, class_names: list[str], top_k: int) -> list[np.ndarray]:
    """Per tested class, (2, M + 1, n) bool: is the class among the model's top-k labels of each marked image (0)
    and of its mirror (1)? Only the ranking of the model's outputs is used."""
    net, meta = load_runnable(model)
    size = meta.get("preprocessing", {}).get("image_size")
    out = []
    for row, flat, mirrors in _pairs(marks):
        name = class_names[marks.classes[row]]
        if name not in meta["classes"]:
            raise RadioactiveError(f"class {name!r} of the record is unknown to {model}")
        k = meta["classes"].index(name)
        hits = []
        for images in (flat, mirrors):
            o = outputs_of(net, lambda j, images=images: images[j], len(images), size, 250)
            top = np.argsort(-o, axis=1)[:, :top_k]
            hits.append((top == k).any(1).reshape(marks.marked[row].shape[:2]))
        out.append(np.stack(hits))
    return out


def label_statistic(hits: list[np.ndarray]) -> np.ndarray:
    """(K', M + 1) T_k(c) = mean over images of hit(marked) - hit(mirror), from :func:`hits_of_model`'s arrays."""
    return np.stack([(h[0].astype(float) - h[1].astype(float)).mean(1) for h in hits])


def write_label_queries(vault: str | Path, out: str | Path, config: LabelConfig) -> dict:
    """Round 1 of a label-only audit through an API: write every query image under an opaque name.

    The images are the decoy-carrier test's marks (real and decoy carriers) and their mirrors, as PNG, named by a
    random stream derived from the key (the names say nothing of the carrier); the mapping goes into the vault's
    ``label-queries.json`` (0600).

    Returns:
        ``{"queries": folder, "num_images": n, "mapping": vault file}``.

    Raises:
        RadioactiveError: ``out`` exists; as :func:`decoy_marks`.
    """
    from ..vault import open_vault, update_manifest, write_private

    v = open_vault(vault)
    key = v.load_key()
    out = Path(out)
    if out.exists():
        raise RadioactiveError(f"{out} exists; choose a new folder for the query images")
    marks = decoy_marks(v.record_path, key, config.per_class, config.decoy_carriers, config.decoy_seed,
                        classes=config.classes)
    rng = derived_rng(key.fingerprint, "label query names", config.decoy_seed)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True)
    mapping = []
    for row, flat, mirrors in _pairs(marks):
        n = marks.marked[row].shape[1]
        for which, images in ((0, flat), (1, mirrors)):
            for j, img in enumerate(images):
                name = f"{rng.integers(0, 2**63):016x}.png"
                (tmp / name).write_bytes(encode_png(img))
                mapping.append({"name": name, "row": row, "carrier": j // n, "image": j % n, "mirror": which})
    order = np.argsort([m["name"] for m in mapping])
    mapping = [mapping[i] for i in order]
    tmp.rename(out)
    body = {"kind": "radioactive-label-queries", "schema": 1, "config": dataclasses.asdict(config),
            "classes": [key.classes[k] for k in marks.classes],
            "shape": [list(m.shape[:2]) for m in marks.marked], "queries": mapping}
    write_private(v.path / QUERIES_FILE, json.dumps(body).encode())
    update_manifest(v.path)
    return {"queries": str(out), "num_images": len(mapping), "mapping": str(v.path / QUERIES_FILE)}


def read_label_answers(answers: str | Path, vault: str | Path, top_k: int) -> tuple[list[np.ndarray], dict]:
    """Round 2: the API's labels for the query images, as :func:`hits_of_model`'s arrays.

    Args:
        answers: JSON lines ``{"path": ".../<name>.png", "labels": [class names, best first]}``; only the file name
            of ``path`` is matched against the vault's mapping, and the first ``top_k`` labels are used.

    Raises:
        RadioactiveError: no mapping in the vault (run ``label-queries`` first); missing answers.
    """
    path = Path(vault) / QUERIES_FILE
    try:
        body = json.loads(path.read_text())
        queries, shapes, classes = body["queries"], body["shape"], body["classes"]
    except (OSError, ValueError, KeyError) as e:
        raise RadioactiveError(f"no label queries in {vault}: run `radioactive label-queries` first ({e})") from e
    got = {}
    try:
        for ln in Path(answers).read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                got[Path(r["path"]).name] = [str(c) for c in r["labels"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RadioactiveError(f"cannot read label answers {answers}: {e}") from e
    missing = [q["name"] for q in queries if q["name"] not in got]
    if missing:
        raise RadioactiveError(f"{answers} has no labels for {len(missing)} of the {len(queries)} query images "
                               f"(e.g. {missing[0]})")
    hits = [np.zeros((2, *s), dtype=bool) for s in shapes]
    for q in queries:
        hits[q["row"]][q["mirror"], q["carrier"], q["image"]] = classes[q["row"]] in got[q["name"]][:top_k]
    return hits, body


@dataclass(frozen=True)
class LabelConfig:
    """Settings of the label-only test (fix them before testing; the audit plan holds them)."""

    top_k: int = setting(1, "labels: how many top labels the suspect returns (1: top-1)", check=lambda v: v >= 1,
                         expected=">= 1")
    decoy_carriers: int = setting(29, "labels: decoy carriers per class (M)", check=lambda v: v >= 1, expected=">= 1")
    per_class: int = setting(20, "labels: released marked images per class (n)", check=lambda v: v >= 1,
                             expected=">= 1")
    decoy_seed: int = setting(0, "labels: seed of the decoy carriers' stream", check=lambda v: v >= 0,
                              expected=">= 0")
    classes: tuple[str, ...] | None = None


def labels_detect(key: Key, suspect_hits: list[np.ndarray], reference_hits: list[list[np.ndarray]],
                  classes: list[int], config: LabelConfig, alpha: float, suspect: dict, references: list[str],
                  queries: int) -> DetectionResult:
    """The test from the suspect's (and references') hits (module docstring). Conservative.

    Args:
        key: the key. suspect_hits: per tested class (2, M + 1, n) bool (:func:`hits_of_model`,
            :func:`read_label_answers`). reference_hits: the same for each reference. classes: the key's class index
            of each tested class. config, alpha: the settings. suspect, references, queries: recorded.

    Returns:
        a :class:`DetectionResult` with method ``labels``, validity ``conservative``.
    """
    t = label_statistic(suspect_hits)
    if reference_hits:
        t = t - np.mean([label_statistic(h) for h in reference_hits], axis=0)
    class_log10 = rank_pvalues(t)
    m = t.shape[1] - 1
    return DetectionResult(
        method="labels", validity="conservative", log10_pvalue=fisher_log10_pvalue(class_log10), alpha=alpha,
        classes=[key.classes[k] for k in classes], class_log10_pvalues=class_log10.tolist(), dim=key.dim,
        key_fingerprint=key.fingerprint, suspect=suspect,
        settings={"top_k": config.top_k, "decoy_carriers": m, "per_class": config.per_class,
                  "decoy_seed": config.decoy_seed, "references": references},
        details=DecoyCarrierDetails(
            references, [sha256_file(Path(r)) if Path(r).is_file() else None for r in references],
            [int(h.shape[2]) for h in suspect_hits], m, stream_name(key.fingerprint, DECOY_TAG, config.decoy_seed),
            t[:, 0].tolist(), t[:, 1:].mean(1).tolist(), t[:, 1:].std(1, ddof=1).tolist() if m > 1 else None,
            fisher_log10_pvalue(np.full(len(class_log10), -np.log10(m + 1))), queries),
    )


def _run(owner: OwnerFiles, suspect: SuspectAccess, config: LabelConfig, alpha: float) -> DetectionResult:
    t0 = time.time()
    owner.need("key", "record", method="the label-only test")
    refs = [str(r) for r in owner.references]
    if suspect.kind == "outputs":
        raise RadioactiveError("the label-only test needs labels on its own query images (radioactive label-queries), "
                               "not an outputs file of other images")
    if suspect.kind == "labels":
        if owner.vault is None:
            raise RadioactiveError("a label-only audit through answers needs the vault (its label-queries.json)")
        hits, body = read_label_answers(suspect.outputs, owner.vault, config.top_k)
        if body.get("config", {}).get("decoy_carriers", config.decoy_carriers) != config.decoy_carriers:
            raise RadioactiveError("the label queries were written with other settings than the plan's")
        marks = decoy_marks(owner.record, owner.key, config.per_class, config.decoy_carriers, config.decoy_seed,
                        classes=config.classes) \
            if refs else None
        classes = [owner.key.classes.index(c) for c in body["classes"]]
    else:
        marks = decoy_marks(owner.record, owner.key, config.per_class, config.decoy_carriers, config.decoy_seed,
                        classes=config.classes)
        hits = hits_of_model(suspect.path, marks, owner.key.classes, config.top_k)
        classes = marks.classes
    ref_hits = [hits_of_model(r, marks, owner.key.classes, config.top_k) for r in refs] if refs else []
    result = labels_detect(owner.key, hits, ref_hits, classes, config, alpha, suspect.describe(), refs,
                           sum(int(h.size) for h in hits))
    result.seconds = time.time() - t0
    return result


def _null(owner: OwnerFiles, suspect: SuspectAccess, config: LabelConfig, num: int, seed: int) -> np.ndarray:
    """``num`` independent null p-values from groups of M + 1 fresh carriers (as the decoy-carrier test's)."""
    m = config.decoy_carriers
    marks = decoy_marks(owner.record, owner.key, config.per_class, (m + 1) * num - 1, seed, classes=config.classes)
    t = label_statistic(hits_of_model(suspect.path, marks, owner.key.classes, config.top_k))
    refs = [str(r) for r in owner.references]
    if refs:
        t = t - np.mean([label_statistic(hits_of_model(r, marks, owner.key.classes, config.top_k)) for r in refs],
                        axis=0)
    return np.array([fisher_log10_pvalue(rank_pvalues(t[:, g * (m + 1):(g + 1) * (m + 1)])) for g in range(num)])


register_method(MethodEntry(
    name="labels", run=_run, access=("labels",), reads=("key", "record", "references"), optional=("references",),
    validity="conservative", config=LabelConfig, null=_null,
    summary="the decoy-carrier ranking read through the suspect's top-k labels only: how much more often it labels "
            "marked images than their mirrors as their class, real carrier among decoys",
))
