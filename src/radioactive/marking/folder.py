"""Folder marking: mark the planned units in fixed batches, write the released copy and the record.

A run is planned (:mod:`radioactive.marking.plan`: which images, which fixed units), and its units are
journaled as they finish (:mod:`radioactive.marking.resume`), so a killed run resumes to the same bytes; under
torchrun the units are shared among the ranks (:mod:`radioactive.marking.distributed`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import OUTPUT_FORMATS, OutputFormat, atomic_writer, read_image
from ..errors import RadioactiveError
from ..keys import Key
from ..networks import load_marking_network
from .distributed import SINGLE, Ranks
from .optimise import MarkingConfig, carrier_shifts, cpu_threads, image_generator, mark_batch, psnr_db
from .plan import (  # noqa: F401 (re-exported: the public names of folder marking)
    COPY_CHUNK,
    RECORD_SCHEMA,
    RunPlan,
    Unit,
    check_output_dir,
    output_name,
    plan_run,
    plan_units,
    select_holdout,
    select_marked,
    select_withheld,
)
from .progress import Progress
from .resume import Journal, journal_path, open_run, part_path, part_paths, write_atomic


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
        psnr_db_mean, psnr_db_p5: PSNR of the marked images (dB, 0-255 scale).
        linf_max: largest |marked - vanilla| over all marked pixels (8-bit levels).
        seconds: wall time.
        output_format: the released copy's encoding (``png``, or e.g. ``jpeg q90``).
        carrier_shift_lossless_mean, carrier_shift_mean: lossy formats only: mean feature shift along the
            carrier (marking network, centre view; :func:`radioactive.marking.optimise.carrier_shifts`) of the
            released marked images, before encoding and as a reader decodes them.
        mark_survival: lossy formats only: ``carrier_shift_mean / carrier_shift_lossless_mean``, the share
            of the mark's feature shift that the encoding kept (None for png, which keeps all of it, and when
            the marked images moved no feature before encoding).
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
    linf_max: int = 0
    seconds: float = 0.0
    output_format: str = "png"
    carrier_shift_lossless_mean: float | None = None
    carrier_shift_mean: float | None = None
    mark_survival: float | None = None
    psnr_db_released_mean: float | None = None
    psnr_db_released_p5: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(db: float) -> float | None:
    """A PSNR for JSON: None for identical images (infinite PSNR)."""
    return None if math.isinf(db) else db


@functools.cache
def _heap_trimmer() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or a no-op where there is none (macOS, musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def _run_units(plan: RunPlan, key: Key, kept: dict[int, list], journal: Journal, ranks: Ranks, seed: int,
               config: MarkingConfig, device: str, strict: bool, progress: Progress) -> None:
    """Do this rank's units not in ``kept`` (unit -> PSNRs of a kept unit), journaling each as it finishes."""
    folder, units, bases, fmt = plan.folder, plan.units, plan.bases, plan.output_format
    mine = [n for n in range(len(units)) if ranks.owns(n)]
    net = None
    if any(units[n].kind in ("mark", "holdout") for n in mine if n not in kept):
        net = load_marking_network(key.network)[0].to(device)
        if net.feature_dim != key.dim:
            raise RadioactiveError(f"key dimension {key.dim} differs from the marking network's {net.feature_dim}")

    def run_unit(n: int, unit: Unit) -> dict:
        """Do one unit and return its journal line."""
        out = {"unit": n, "files": [], "entries": [], "psnr": [], "skipped": [], "copied": 0}
        if fmt.lossy:
            out["released_psnr"] = []  # every released image as decoded, against its source

        def write(base: str, rel: str, data: bytes) -> str:
            out["files"].append([base, rel, write_atomic(bases[base] / rel, data)])
            return out["files"][-1][2]

        def skip(i: int, reason: str) -> None:
            if strict:
                raise RadioactiveError(f"{folder.files[i]} cannot be used ({reason}); --strict turns skips into failures")
            out["skipped"].append([folder.files[i], reason])
            write("output", folder.files[i], folder.path(i).read_bytes())  # unchanged, as given

        imgs, idx, icc = [], [], {}
        for i in unit.indices:
            if unit.kind == "unreadable":
                skip(i, plan.unreadable[i])
                continue
            try:
                image = read_image(folder.path(i))
            except RadioactiveError as e:
                skip(i, str(e))
                continue
            icc[i] = image.icc_profile  # kept in marked and unmarked outputs alike
            if unit.kind == "copy":
                data = fmt.encode(image.pixels, image.icc_profile)
                write("output", output_name(folder.files[i], fmt.suffix), data)
                out["copied"] += 1
                if fmt.lossy:
                    pr = psnr_db(image.pixels, fmt.decode(data))
                    out["released_psnr"].append(_finite(pr))
            else:
                imgs.append(image.pixels)
                idx.append(i)
        if not idx:
            return out
        batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        labels = [folder.labels[i] for i in idx]
        gens = [image_generator(seed, folder.files[i]) for i in idx]
        marked_t = mark_batch(net, batch, key.carriers[labels], config, gens)
        marked = marked_t.permute(0, 2, 3, 1).numpy()
        encoded = [fmt.encode(m, icc[i]) for i, m in zip(idx, marked)]
        if fmt.lossy:  # how much of the mark the encoding keeps, image by image
            decoded = [fmt.decode(b) for b in encoded]
            lossless, kept_shift = carrier_shifts(
                net, batch, [marked_t, torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)], key.carriers[labels])
        released = unit.kind == "mark"
        for j, (i, vanilla, m, k) in enumerate(zip(idx, imgs, marked, labels)):
            out_rel = output_name(folder.files[i], fmt.suffix)
            sha = write("output" if released else "holdout", out_rel, encoded[j])
            p = psnr_db(vanilla, m)
            out["psnr"].append(_finite(p))
            entry = {
                "source": folder.files[i], "output": out_rel, "class": folder.classes[k], "carrier_index": k,
                "psnr_db": _finite(round(p, 4)),
                "linf": int(np.abs(vanilla.astype(np.int16) - m.astype(np.int16)).max()),
                "sha256": sha, "released": released,
            }
            if fmt.lossy:
                pr = psnr_db(vanilla, decoded[j])
                entry.update(psnr_db_released=_finite(round(pr, 4)),
                             carrier_shift_lossless=round(float(lossless[j]), 5),
                             carrier_shift=round(float(kept_shift[j]), 5))
                if released:
                    out["released_psnr"].append(_finite(pr))
            out["entries"].append(entry)
        return out

    for n in mine:
        unit = units[n]
        if n in kept:
            progress.update(n, unit.kind, len(unit.indices), kept[n], kept=True)
            continue
        line = run_unit(n, unit)
        journal.append(line)
        progress.update(n, unit.kind, len(unit.indices), line["psnr"], kept=False)
        # A marking step's activations (about 1 GB for 125 images on CPU) are freed at the end of a batch,
        # but glibc keeps freed heap pages resident and the fragments add up over batches: the peak RSS
        # rose by 100 MB over 16 batches and 145 MB over 80. Returning them after every unit keeps the
        # peak flat (docs/performance.md).
        _heap_trimmer()()


def _merge(plan: RunPlan, t0: float) -> MarkSummary:
    """Rank 0, once every rank is done: write the record from the journal and its parts, and sum up.

    Streams: the journal files are indexed (unit -> line offset) and each unit's line read back in unit
    order and written to the record at once, so memory does not grow with the number of images.
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
    psnr, released_psnr = array("d"), array("d")
    skipped: dict[str, str] = {}
    num_marked = num_entries = num_copied = linf_max = 0
    shift_sums = [0.0, 0.0]  # released marked images: carrier shift before / after a lossy encoding
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "rb")) for p in paths]
        record = stack.enter_context(atomic_writer(plan.record))
        record.write((json.dumps(plan.header) + "\n").encode())
        for n in range(len(plan.units)):
            k, pos = where[n]
            files[k].seek(pos)
            r = json.loads(files[k].readline())
            for e in r["entries"]:
                record.write((json.dumps(e) + "\n").encode())
                num_entries += 1
                num_marked += e["released"]
                if e["released"] and "carrier_shift" in e:
                    shift_sums[0] += e["carrier_shift_lossless"]
                    shift_sums[1] += e["carrier_shift"]
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
    return MarkSummary(
        output=str(plan.output), record=str(plan.record), num_images=len(folder), num_marked=num_marked,
        num_copied=num_copied, num_holdout=num_entries - num_marked, num_withheld=len(plan.withheld),
        num_skipped=len(skipped), skipped=[{"file": f, "reason": r} for f, r in sorted(skipped.items())],
        ignored=list(folder.ignored),
        psnr_db_mean=float(np.mean(finite)) if finite.size else None,
        psnr_db_p5=float(np.percentile(finite, 5)) if finite.size else None,
        linf_max=linf_max, seconds=time.time() - t0, output_format=plan.output_format.describe(),
        **_survival(plan.output_format.lossy, num_marked, *shift_sums), **lossy_psnr,
    )


def _survival(lossy: bool, n: int, lossless: float, kept: float) -> dict:
    """The summary's carrier-shift fields (lossy formats with marked images only)."""
    if not lossy or n == 0:
        return {}
    return {"carrier_shift_lossless_mean": lossless / n, "carrier_shift_mean": kept / n,
            "mark_survival": kept / lossless if lossless > 0 else None}


def mark_folder(source: str | Path, key: Key, output: str | Path, record: str | Path | None = None,
                fraction: float | None = None, files: list[str] | None = None, seed: int = 0,
                config: MarkingConfig = MarkingConfig(), overwrite: bool = False, progress: bool = True,  # noqa: B008
                device: str = "cpu", holdout_fraction: float = 0.0, strict: bool = False,
                resume: bool = False, withhold_fraction: float = 0.0, metrics: str | Path | None = None,
                ranks: Ranks = SINGLE, output_format: OutputFormat = OutputFormat()) -> MarkSummary:  # noqa: B008
    """Mark a fraction of an image folder and write a complete released copy; resumable, and distributable.

    Every image of the source is written to ``output`` at the same relative
    path with a ``.png`` suffix, losslessly and with the same encoder
    settings and no metadata but the ICC profile, marked or not, so that the copy does not tell
    which images carry the mark; unmarked images keep their exact pixels. A lossy ``output_format``
    (explicitly allowed) encodes every image, marked or not, in that format instead, and the record and
    summary then measure how much of the mark survived it (``MarkSummary.mark_survival``).
    The private record (outside the copy) lists each marked image.

    The run is cut into fixed units (:func:`plan_units`), each journaled beside the record once its files
    are written (:mod:`radioactive.marking.resume`), so a killed run continues with ``resume=True`` and ends
    with the same bytes, in the copy and in the record, as an uninterrupted run (on CPU, with the same
    ``config.threads``). Files are written atomically; the record is written last, and the journal then
    removed. With ``ranks`` from :func:`radioactive.marking.distributed.from_env` (under torchrun), every
    process calls this function with the same arguments; unit n is done by rank ``n % world_size`` and rank 0
    writes the record: the same bytes as one process (:mod:`radioactive.marking.distributed`).

    Args:
        source: ImageFolder-style folder whose class names are the key's classes.
        key: the key (its carriers and marking network).
        output: folder of the released copy (created; never inside ``source``).
        record: private record path (JSON lines); default ``<output>.record.jsonl`` beside ``output``.
        fraction: marked fraction q in (0, 1], chosen per class; or
        files: explicit relative paths to mark (exclusive with ``fraction``).
        seed: seed of the selection and of the augmentation draws.
        config: optimisation settings (``config.threads``: CPU threads while marking).
        overwrite: start afresh in a non-empty output folder: delete the files a run of ``mark`` on this
            source writes there (refused if it holds any other file; see :mod:`radioactive.resume`).
        resume: continue the interrupted run journaled beside ``record``, which must have had the same
            arguments and inputs (any number of processes); finished units whose files verify by sha256 are
            kept, the rest redone. On an empty or missing output folder, a fresh start.
        progress: show a progress bar (rank 0 only: its own units) with ETA and running mean PSNR.
        metrics: append one JSON line per finished unit to this file (:mod:`radioactive.marking.progress`;
            rank r > 0 of a distributed run writes ``<stem>.rank<r><suffix>``).
        holdout_fraction: also mark this share of each class's images with the same key but do not
            release them (the released copy holds their vanilla version); their marked versions go to the
            private folder ``<record stem>.holdout/`` beside the record. They give the black-box test an exact
            control (see :mod:`radioactive.blackbox`).
        withhold_fraction: leave this share of each class's unmarked images out of the released copy
            altogether; the record lists them. They give the black-box membership test its control (see
            :func:`radioactive.blackbox.membership_detect`).
        strict: fail on the first unreadable image instead of skipping it.
        device: torch device of the optimisation (``cpu``, ``cuda``: ``cuda:LOCAL_RANK`` in a distributed
            run); CPU results are bit-reproducible.
        ranks: this process's rank in a distributed run (default: one process).
        output_format: encoding of the released copy (default lossless PNG; see
            :class:`radioactive.data.OutputFormat`). Lossy formats also write, per marked entry of the record,
            ``carrier_shift_lossless``, ``carrier_shift`` and ``psnr_db_released`` (the image as decoded).

    Returns:
        The summary of the whole run, on every rank.

    Raises:
        RadioactiveError: classes differ from the key's, bad fraction or file list, output inside the
            source, output not empty without ``resume``/``overwrite`` (or with foreign files), both flags,
            ``resume`` with other arguments or nothing to resume, unreadable images with ``strict``; in a
            distributed run, any rank's failure (on every rank), or a record folder the ranks do not share.
    """
    t0 = time.time()
    source, output = Path(source), Path(output)
    plan = ranks.step("checking the inputs", lambda: plan_run(
        source, key, output, record, fraction, files, seed, config, device, holdout_fraction, withhold_fraction, strict,
        output_format))
    journal = Journal(journal_path(plan.record), plan.identity)

    def open_() -> dict[int, list]:
        """Rank 0: apply the output rules, start the journal; the kept units' PSNRs, by unit."""
        ours = {output_name(f, sfx) for f in plan.folder.files for sfx in OUTPUT_FORMATS.values()} | set(plan.folder.files)
        done = open_run(output, plan.holdout_dir, ours, journal, resume, overwrite, plan.bases, part_paths(plan.record))
        output.mkdir(parents=True, exist_ok=True)
        if ranks.distributed:
            journal.close(remove=False)  # every rank, rank 0 included, appends to its own part
        return {n: u["psnr"] for n, u in done.items()}

    kept = ranks.broadcast(ranks.step("opening the run", open_ if ranks.rank == 0 else dict))
    own = journal

    def start_part() -> None:
        nonlocal own
        if not journal.is_journal():
            raise RadioactiveError(f"cannot read the journal {journal.path} that rank 0 wrote: the output and the "
                                   "record must be on a filesystem that every rank (every node) shares")
        own = Journal(part_path(plan.record, ranks.rank), plan.identity)
        own.start([])

    if ranks.distributed:
        ranks.step("starting its journal part", start_part)

    def work() -> None:
        """This rank's units; its journal (part) closed before the others are told it is done (shared filesystems
        guarantee another node sees a file's content once its writer closed it)."""
        bar = None
        try:
            total = sum(len(u.indices) for n, u in enumerate(plan.units) if ranks.owns(n))
            bar = Progress(total, progress and ranks.rank == 0, metrics, ranks.rank, ranks.world_size)
            with cpu_threads(config.threads):
                _run_units(plan, key, kept, own, ranks, seed, config, ranks.device(device), strict, bar)
        finally:
            own.close(remove=False)
            if bar is not None:
                bar.close()

    ranks.step("marking", work)
    summary = ranks.step("writing the record", lambda: _merge(plan, t0) if ranks.rank == 0 else None)
    return ranks.broadcast(summary)
