"""What ``mark_folder`` did: :class:`MarkSummary`, its printed lines and the check that the mark is there, and
:func:`merge_run`, which writes the record from the run's journals and sums the run up."""

from __future__ import annotations

import contextlib
import json
import time
from array import array
from dataclasses import asdict, dataclass, field

import numpy as np

from ..data import atomic_writer
from ..errors import RadioactiveError
from .plan import RunPlan
from .resume import Journal, journal_path, part_paths
from .verify import shift_stats, unmarked_threshold


@dataclass
class MarkSummary:
    """What ``mark_folder`` did.

    Attributes:
        output: the released copy (ImageFolder layout).
        record: the private record (JSON lines) of the marked images.
        num_images: images in the source.
        num_marked, num_copied: images marked / written unmarked.
        num_holdout: images marked but kept private (their vanilla version is released).
        num_withheld: images left out of the released copy altogether (listed in the record), for the
            membership test (see ``withhold_fraction``).
        num_skipped, skipped: image files that could not be read (corrupt, truncated, over Pillow's
            size limit); each is copied unchanged into the released copy and listed with the reason.
        Every file of the source is accounted for exactly once:
        num_marked + num_copied + num_withheld + num_skipped + len(ignored) (+ num_holdout, released as
        vanilla copies and counted in num_copied) = files in the source.
        ignored: source files that are not images (not copied).
        psnr_db_mean, psnr_db_p5, psnr_db_min: PSNR of the marked images (dB, 0-255 scale) that differ from
            their source; None when every marked image is identical to it (infinite PSNR).
        identical_images: marked images identical to their source (no pixel changed: infinite PSNR, left
            out of the PSNR statistics and counted here).
        blended_images: marked images whose perturbation was scaled down to reach ``config.min_psnr``.
        linf_max: largest |marked - vanilla| over all marked pixels (8-bit levels).
        seconds: wall time.
        output_format: the released copy's encoding (``png``, or e.g. ``jpeg q90``).
        carrier_shift_min, carrier_shift_p5, carrier_shift_median, carrier_shift_mean: feature shift along
            the carrier (marking network, centre view; :func:`radioactive.marking.optimise.carrier_shifts`) of
            every marked image (released and holdout) as read back from the disk after writing
            (:mod:`radioactive.marking.verify`).
        unmarked_threshold: the shift at or below which an image counts as unmarked (a tenth of the median,
            :func:`radioactive.marking.verify.unmarked_threshold`).
        unmarked_images, unmarked: how many marked images carry no mark by that rule (flat, saturated or
            tiny images), and which: ``{"source", "carrier_shift", "released"}`` each, sorted by source.
        carrier_shift_lossless_mean: lossy formats only: the mean shift of the marked images before
            encoding (``carrier_shift_mean``: as a reader decodes them).
        mark_survival: lossy formats only: ``carrier_shift_mean / carrier_shift_lossless_mean``, the share
            of the mark's feature shift that the encoding kept (None for png, which keeps all of it, and when
            the marked images moved no feature before encoding).
        vault: the vault folder (None in the layout without a vault).
        commitment: the vault's commitment, 64 hex digits (:func:`radioactive.vault.commitment`).
        notice: the public notice written into the release (``NOTICE.txt``), if asked for.
        psnr_db_released_mean, psnr_db_released_p5: lossy formats only: PSNR of every released image
            (marked or not) as decoded, against its source (dB); ``psnr_db_mean`` is the marked images'
            before encoding.
    """

    output: str
    record: str
    num_images: int
    num_marked: int
    num_copied: int
    num_holdout: int = 0
    num_withheld: int = 0
    num_skipped: int = 0
    skipped: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    psnr_db_mean: float | None = None
    psnr_db_p5: float | None = None
    psnr_db_min: float | None = None
    identical_images: int = 0
    blended_images: int = 0
    linf_max: int = 0
    seconds: float = 0.0
    output_format: str = "png"
    carrier_shift_min: float | None = None
    carrier_shift_p5: float | None = None
    carrier_shift_median: float | None = None
    carrier_shift_mean: float | None = None
    unmarked_threshold: float | None = None
    unmarked_images: int = 0
    unmarked: list[dict] = field(default_factory=list)
    carrier_shift_lossless_mean: float | None = None
    mark_survival: float | None = None
    psnr_db_released_mean: float | None = None
    psnr_db_released_p5: float | None = None
    vault: str | None = None
    commitment: str | None = None
    notice: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_marked_images(self) -> int:
        """Images marked, released or holdout."""
        return self.num_marked + self.num_holdout

    def check_marked(self) -> None:
        """Raise unless at least one marked image carries the mark on disk (``mark`` exits non-zero then).

        Raises:
            RadioactiveError: images were to be marked and every one of them is unmarked
                (:mod:`radioactive.marking.verify`), e.g. after 0 steps or with a huge pixel weight.
        """
        n = self.num_marked_images
        if n and self.unmarked_images == n:
            largest = max((u["carrier_shift"] for u in self.unmarked), default=0.0)
            what = ("every marked image is identical to its source" if self.identical_images == n else
                    f"the largest carrier shift read back from the disk is {largest:.4g}, at or below the "
                    f"threshold {self.unmarked_threshold or 0:.4g}")
            raise RadioactiveError(f"no image carries the mark: {what} (all {n} marked images); the release "
                                   f"{self.output} is unmarked (--steps 0, or a --lambda-img so large that no pixel moves?)")

    def lines(self) -> list[str]:
        """What ``mark`` prints on stderr: the counts, the PSNR and carrier-shift distributions (never nan),
        the unmarked images, the lossy-output measures and the commitment."""
        total = self.num_marked + self.num_copied + self.num_withheld + self.num_skipped + len(self.ignored)
        out = [f"{total} files: {self.num_marked} marked, {self.num_copied} copied"
               f"{f' (incl. {self.num_holdout} holdout: marked privately, released vanilla)' if self.num_holdout else ''}, "
               f"{f'{self.num_withheld} withheld (not released), ' if self.num_withheld else ''}"
               f"{self.num_skipped} skipped, {len(self.ignored)} ignored (not images)"]
        n = self.num_marked_images
        if n:
            same = f"; {self.identical_images} identical to their source (no PSNR)" if self.identical_images else ""
            if self.psnr_db_mean is None:
                out.append(f"PSNR: all {n} marked images are identical to their source")
            else:
                out.append(f"PSNR of the {n - self.identical_images} marked images that differ from their source: "
                           f"mean {self.psnr_db_mean:.2f} dB, 5th percentile {self.psnr_db_p5:.2f}, min "
                           f"{self.psnr_db_min:.2f}{same}")
            if self.blended_images:
                out.append(f"{self.blended_images} images had their mark scaled down to the --min-psnr floor")
            if self.carrier_shift_median is not None:
                out.append(f"carrier shift read back from the disk (marking network, centre view): min "
                           f"{self.carrier_shift_min:.4g}, 5th percentile {self.carrier_shift_p5:.4g}, median "
                           f"{self.carrier_shift_median:.4g}, mean {self.carrier_shift_mean:.4g}")
            if self.unmarked_images:
                names = ", ".join(u["source"] for u in self.unmarked[:5]) + (", ..." if self.unmarked_images > 5 else "")
                out.append(f"{self.unmarked_images} of {n} images carry no mark (shift <= {self.unmarked_threshold:.4g}, "
                           f"a tenth of the median; flat, saturated or tiny images?): {names}")
        if self.psnr_db_released_mean is not None:
            out.append(f"lossy output ({self.output_format}): released images (marked or not) as decoded: PSNR "
                       f"{self.psnr_db_released_mean:.2f} dB (5th percentile {self.psnr_db_released_p5:.2f} dB) "
                       "against their sources; the PSNR above is the marked images' before encoding")
        if self.output_format != "png" and self.mark_survival is None and n:
            out.append(f"lossy output ({self.output_format}): no mark to measure (the marked images moved no "
                       "feature along their carrier before encoding)")
        if self.mark_survival is not None:
            out.append(f"lossy output ({self.output_format}): the marked images keep "
                       f"{100 * self.mark_survival:.1f} % of the mark's feature shift along the carrier "
                       f"({self.carrier_shift_mean:.4f} of {self.carrier_shift_lossless_mean:.4f}, mean over "
                       f"{n} images, marking network, centre view); a lossless png keeps 100 %")
        if self.commitment:
            out.append(f"commitment {self.commitment} (publish or timestamp it with the release; vault {self.vault})")
        return out


def merge_run(plan: RunPlan, t0: float) -> MarkSummary:
    """Rank 0, once every rank is done: write the record from the journal and its parts, and sum up.

    Streams: the journal files are indexed (unit -> line offset) and each unit's line read back in unit
    order, twice: once for the carrier shifts (the unmarked threshold needs their median), once to write the
    record, so memory grows with the number of images by a few bytes only.
    """
    journal = Journal(journal_path(plan.record), plan.identity)
    paths = [journal.path, *part_paths(plan.record)]
    where: dict[int, tuple[int, int]] = {}  # unit -> (file, byte offset of its line)
    for k, p in enumerate(paths):
        where.update({u["unit"]: (k, pos) for pos, u in Journal(p, plan.identity).units()})
    missing = [n for n in range(len(plan.units)) if n not in where]
    if missing:
        raise RadioactiveError(
            f"{len(missing)} units of the run (e.g. unit {missing[0]}) are in no journal beside {plan.record}: the "
            "output and the record must be on a filesystem that every rank (every node) shares; run again with --resume")
    folder = plan.folder
    psnr, released_psnr, shifts = array("d"), array("d"), array("d")
    skipped: dict[str, str] = {}
    num_marked = num_entries = num_copied = linf_max = identical = blended = 0
    lossless_sum = 0.0  # marked images' carrier shift before a lossy encoding
    unmarked: list[dict] = []
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "rb")) for p in paths]

        def unit_lines():
            for n in range(len(plan.units)):
                k, pos = where[n]
                files[k].seek(pos)
                yield json.loads(files[k].readline())

        shifts.extend(e["carrier_shift"] for r in unit_lines() for e in r["entries"] if "carrier_shift" in e)
        threshold = unmarked_threshold(np.frombuffer(shifts, dtype=np.float64)) if shifts else None
        record = stack.enter_context(atomic_writer(plan.record, private=True))
        record.write((json.dumps(plan.header) + "\n").encode())
        for r in unit_lines():
            for e in r["entries"]:
                if threshold is not None and "carrier_shift" in e and e["carrier_shift"] <= threshold:
                    e["unmarked"] = True
                    unmarked.append({"source": e["source"], "carrier_shift": e["carrier_shift"], "released": e["released"]})
                record.write((json.dumps(e) + "\n").encode())
                num_entries += 1
                num_marked += e["released"]
                identical += e["psnr_db"] is None
                blended += "blend" in e
                lossless_sum += e.get("carrier_shift_lossless", 0.0)
                linf_max = max(linf_max, e["linf"])
            psnr.extend(p for p in r["psnr"] if p is not None)
            released_psnr.extend(p for p in r.get("released_psnr", []) if p is not None)
            num_copied += r["copied"]
            for f, why in r["skipped"]:
                skipped.setdefault(f, why)
        for i in plan.withheld:
            record.write((json.dumps({"source": folder.files[i], "class": folder.classes[folder.labels[i]],
                                      "carrier_index": folder.labels[i], "withheld": True}) + "\n").encode())
    journal.close(remove=True)
    for p in part_paths(plan.record):
        p.unlink(missing_ok=True)
    finite = np.frombuffer(psnr, dtype=np.float64)
    rel = np.frombuffer(released_psnr, dtype=np.float64)
    lossy_psnr = ({"psnr_db_released_mean": float(np.mean(rel)), "psnr_db_released_p5": float(np.percentile(rel, 5))}
                  if plan.output_format.lossy and rel.size else {})
    stats = shift_stats(np.frombuffer(shifts, dtype=np.float64))
    survival = {}
    if plan.output_format.lossy and shifts:
        survival = {"carrier_shift_lossless_mean": lossless_sum / len(shifts),
                    "mark_survival": sum(shifts) / lossless_sum if lossless_sum > 0 else None}
    return MarkSummary(
        output=str(plan.output), record=str(plan.record), num_images=len(folder), num_marked=num_marked,
        num_copied=num_copied, num_holdout=num_entries - num_marked, num_withheld=len(plan.withheld),
        num_skipped=len(skipped), skipped=[{"file": f, "reason": r} for f, r in sorted(skipped.items())],
        ignored=list(folder.ignored),
        psnr_db_mean=float(np.mean(finite)) if finite.size else None,
        psnr_db_p5=float(np.percentile(finite, 5)) if finite.size else None,
        psnr_db_min=float(np.min(finite)) if finite.size else None, identical_images=identical,
        blended_images=blended, linf_max=linf_max, seconds=time.time() - t0,
        output_format=plan.output_format.describe(), **stats, unmarked_threshold=threshold,
        unmarked_images=len(unmarked), unmarked=sorted(unmarked, key=lambda u: u["source"]), **survival, **lossy_psnr,
    )
