"""Every mark verified on disk, and no release marked twice.

Verification: after a batch's files are written, ``mark_folder`` reads each marked image back from the disk
(released copy or private holdout folder, through :func:`radioactive.data.read_image`, as a trainer's
loader reads it) and measures its carrier shift, ``(phi(x~) - phi(x))^T u_k`` under the marking network,
centre view, no augmentation (:func:`radioactive.marking.optimise.carrier_shifts`; the quantity the marking
objective raises, Sablayrolles et al. 2020, Section 3.2). The shift goes into the image's record entry
(``carrier_shift``). An image is counted as **unmarked** when its shift is at most
``UNMARKED_RATIO`` x the run's median shift, or not positive (:func:`unmarked_threshold`).

Why a tenth of the median: the scale of a shift depends on the marking network (the norm of its features),
so an absolute threshold would not carry over; within one run, the shifts of ordinary images are
comparable. Measured with the linear preset on 200 CIFAR-10 images (EfficientNet-Lite0 at 64 px): median
4.74, weakest image 1.03 (0.22 x the median), 1st percentile 1.60; a flat white image 0.004 (0.001 x),
a flat black one 0.54 (0.11 x: it can only move up), a flat grey one 1.81 (0.38 x), a 4 x 4 image scaled up
to 32 x 32 3.82. So a tenth of the median separates images that cannot carry the mark (flat, saturated)
from weak but real marks.

Re-marking: a source that is itself a release of this tool is refused (marks of two keys on the same
images weaken both and confuse any claim) unless the caller allows it. A release is recognised by
(:func:`release_evidence`): its public notice (``NOTICE.txt`` written by ``mark --public-notice``), or a
record that names the source folder as its output, or a source image whose sha256 is that of an image a
record marked (released or holdout). The records compared are those of the vaults the caller names
(``mark --known-vault``) and the record already in the run's own vault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..data import ImageFolder, sha256_file
from ..errors import RadioactiveError
from ..vault import NOTICE, RECORD, read_record_header

UNMARKED_RATIO = 0.1
"""An image whose carrier shift is at most this share of the run's median shift (or <= 0) counts as unmarked."""

NOTICE_TITLE = "This dataset is marked with radioactive data."


def unmarked_threshold(shifts: np.ndarray) -> float:
    """The shift at or below which a marked image counts as unmarked: ``UNMARKED_RATIO`` x the median of the
    run's shifts, and never below 0 (a non-positive shift is never a mark).

    Args:
        shifts: (N,) carrier shifts of the run's marked images, feature units.
    """
    if shifts.size == 0:
        return 0.0
    return max(0.0, UNMARKED_RATIO * float(np.median(shifts)))


def shift_stats(shifts: np.ndarray) -> dict:
    """``carrier_shift_min``, ``_p5``, ``_median``, ``_mean`` of a run (empty when nothing was marked)."""
    if shifts.size == 0:
        return {}
    return {"carrier_shift_min": float(shifts.min()), "carrier_shift_p5": float(np.percentile(shifts, 5)),
            "carrier_shift_median": float(np.median(shifts)), "carrier_shift_mean": float(shifts.mean())}


def notice_text(commitment: str | None, version: str) -> str:
    """The public notice of a release (``NOTICE.txt``): that the dataset is marked, never which images."""
    lines = [NOTICE_TITLE, "",
             "Some of its images carry an imperceptible mark (Sablayrolles et al., \"Radioactive data: tracing",
             "through training\", ICML 2020). A model trained on them carries a trace that its owner can test",
             "for. Which images are marked is not stated here.", "",
             f"Marked with radioactive {version}."]
    if commitment:
        lines += ["", f"Commitment (sha256 over the owner's key, record and settings): {commitment}"]
    return "\n".join(lines) + "\n"


def _record_paths(vaults: Iterable[str | os.PathLike]) -> list[Path]:
    out = []
    for v in vaults:
        p = Path(v)
        record = p / RECORD if p.is_dir() else p
        if not record.is_file():
            raise RadioactiveError(f"{v} is neither a vault with a {RECORD} nor a record written by `radioactive mark`")
        out.append(record)
    return out


def release_evidence(folder: ImageFolder, records: Iterable[str | os.PathLike]) -> str | None:
    """Why the listed source folder is a release of this tool, or None when nothing says so (module docstring).

    Args:
        folder: the listed source.
        records: vault folders or record files to compare with (an empty list checks only the notice).

    Raises:
        RadioactiveError: a vault or record that cannot be read.
    """
    records = _record_paths(records)
    src = folder.root.resolve()
    marked: dict[str, str] = {}
    for record in records:
        header = read_record_header(record)
        if header.get("output") and Path(header["output"]) == src:
            return f"it is the release that the record {record} describes"
        with open(record) as f:
            next(f)
            for line in f:
                e = json.loads(line)
                if e.get("sha256"):
                    marked.setdefault(e["sha256"], str(record))
    for rel in folder.files if marked else ():
        digest = sha256_file(folder.root / rel)
        if digest in marked:
            return f"its image {rel} is an image that the record {marked[digest]} marked"
    notice = folder.root / NOTICE
    if notice.is_file():
        try:
            first = notice.read_text(errors="replace").splitlines()[:1]
        except OSError:
            first = []
        if first == [NOTICE_TITLE]:
            return f"it holds the public notice {notice} that `radioactive mark --public-notice` writes"
    return None


def check_not_a_release(folder: ImageFolder, records: Iterable[str | os.PathLike], allow_remark: bool) -> None:
    """Refuse a source that :func:`release_evidence` recognises as a release, unless ``allow_remark``.

    Raises:
        RadioactiveError: the source is a release (one line, with the evidence and the way out).
    """
    if allow_remark:
        return
    why = release_evidence(folder, list(records))
    if why is not None:
        raise RadioactiveError(f"the source {folder.root} is a release of radioactive: {why}; marking it again "
                               "stacks a second mark on marked images. Mark the original images, or pass "
                               "--allow-remark if this is really wanted")
