"""Folder marking: mark the planned units in fixed batches, write the released copy and the record.

A run is planned (:mod:`radioactive.marking.plan`: which images, which fixed units), and its units are
journaled as they finish (:mod:`radioactive.marking.resume`), so a killed run resumes to the same bytes; under
torchrun the units are shared among the ranks (:mod:`radioactive.marking.distributed`).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data import OUTPUT_FORMATS, OutputFormat, apply_delta, atomic_write_bytes, read_image
from ..errors import RadioactiveError
from ..keys import Key
from ..networks import load_marking_network
from ..vault import KEY, NOTICE, RECORD, Vault, finish_vault, start_vault
from .distributed import SINGLE, Ranks
from .optimise import MarkingConfig, carrier_shifts, cpu_threads, enforce_min_psnr, image_generator, mark_batch, psnr_db
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
from .summary import MarkSummary, merge_run
from .resume import Journal, journal_path, open_run, part_path, part_paths, write_atomic
from .verify import check_not_a_release, notice_text

log = logging.getLogger(__name__)


def _encode(fmt: OutputFormat, image, pixels: np.ndarray) -> bytes:
    """The released bytes of ``pixels`` (the image's displayed pixels, marked or not): with its alpha channel
    unchanged and its colour channels changed by the mark (:func:`radioactive.data.apply_delta`) when it has
    one and the format keeps it; composited on white otherwise (jpeg)."""
    if image.alpha is not None and fmt.keeps_alpha:
        return fmt.encode(apply_delta(image, pixels), image.icc_profile, image.alpha)
    return fmt.encode(pixels, image.icc_profile)


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
            out["files"].append([base, rel, write_atomic(bases[base] / rel, data, private=base == "holdout")])
            return out["files"][-1][2]

        def skip(i: int, reason: str) -> None:
            if strict:
                raise RadioactiveError(f"{folder.files[i]} cannot be used ({reason}); --strict turns skips into failures")
            out["skipped"].append([folder.files[i], reason])
            write("output", folder.files[i], folder.path(i).read_bytes())  # unchanged, as given

        imgs, idx, icc, decoded_images = [], [], {}, {}
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
                rel = output_name(folder.files[i], fmt.suffix)
                write("output", rel, _encode(fmt, image, image.pixels))
                out["copied"] += 1
                if fmt.lossy:
                    pr = psnr_db(image.pixels, read_image(bases["output"] / rel).pixels)
                    out["released_psnr"].append(_finite(pr))
            else:
                imgs.append(image.pixels)
                idx.append(i)
                decoded_images[i] = image
        if not idx:
            return out
        batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        labels = [folder.labels[i] for i in idx]
        gens = [image_generator(seed, folder.files[i]) for i in idx]
        marked = mark_batch(net, batch, key.carriers[labels], config, gens).permute(0, 2, 3, 1).numpy()
        floored = [enforce_min_psnr(v, m, config.min_psnr) for v, m in zip(imgs, marked)]  # the per-image floor
        marked = np.stack([m for m, _ in floored])
        released = unit.kind == "mark"
        base = "output" if released else "holdout"
        shas, on_disk = [], []
        for i, m in zip(idx, marked):
            out_rel = output_name(folder.files[i], fmt.suffix)
            shas.append(write(base, out_rel, _encode(fmt, decoded_images[i], m)))
            on_disk.append(read_image(bases[base] / out_rel).pixels)  # verified as a trainer's loader reads it
        versions = [torch.from_numpy(np.stack(on_disk)).permute(0, 3, 1, 2)]
        if fmt.lossy:  # how much of the mark the encoding keeps, image by image
            versions.insert(0, torch.from_numpy(marked).permute(0, 3, 1, 2))
        shifts = carrier_shifts(net, batch, versions, key.carriers[labels])
        for j, (i, vanilla, m, k) in enumerate(zip(idx, imgs, marked, labels)):
            p = psnr_db(vanilla, m)
            out["psnr"].append(_finite(p))
            entry = {
                "source": folder.files[i], "output": output_name(folder.files[i], fmt.suffix),
                "class": folder.classes[k], "carrier_index": k, "psnr_db": _finite(round(p, 4)),
                "linf": int(np.abs(vanilla.astype(np.int16) - m.astype(np.int16)).max()),
                "sha256": shas[j], "released": released, "carrier_shift": round(float(shifts[-1][j]), 5),
            }
            if floored[j][1] < 1:
                entry["blend"] = round(floored[j][1], 6)
            if fmt.lossy:
                pr = psnr_db(vanilla, on_disk[j])
                entry.update(psnr_db_released=_finite(round(pr, 4)), carrier_shift_lossless=round(float(shifts[0][j]), 5))
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


def mark_folder(source: str | Path, key: Key, output: str | Path, record: str | Path | None = None,
                fraction: float | None = None, files: list[str] | None = None, seed: int = 0,
                config: MarkingConfig = MarkingConfig(), overwrite: bool = False, progress: bool = True,  # noqa: B008
                device: str = "cpu", holdout_fraction: float = 0.0, strict: bool = False,
                resume: bool = False, withhold_fraction: float = 0.0, metrics: str | Path | None = None,
                ranks: Ranks = SINGLE, output_format: OutputFormat = OutputFormat(),  # noqa: B008
                vault: str | Path | None = None, known_vaults: tuple[str | Path, ...] = (), allow_remark: bool = False,
                public_notice: bool = False) -> MarkSummary:
    """Mark a fraction of an image folder and write a complete released copy; resumable, and distributable.

    Every image of the source is written to ``output`` at the same relative
    path with a ``.png`` suffix, losslessly and with the same encoder
    settings and no metadata but the ICC profile, marked or not, so that the copy does not tell
    which images carry the mark; unmarked images keep their exact pixels. A lossy ``output_format``
    (explicitly allowed) encodes every image, marked or not, in that format instead, and the record and
    summary then measure how much of the mark survived it (``MarkSummary.mark_survival``).
    The private record (outside the copy) lists each marked image. With a ``vault`` (what ``mark`` uses), every
    private file goes into that one folder, mode 0700 with 0600 files (:mod:`radioactive.vault`): a copy of the
    key, the record, the holdout images, a manifest of sha256 and the commitment.

    Every marked image is read back from the disk after writing and its carrier shift measured
    (:mod:`radioactive.marking.verify`): the record's ``carrier_shift``, and the summary's distribution and
    ``unmarked_images``; :meth:`MarkSummary.check_marked` raises when no image carries the mark. Each image
    is kept at or above ``config.min_psnr`` dB by scaling its perturbation down
    (:func:`radioactive.marking.optimise.enforce_min_psnr`; the record's ``blend``). Images with an alpha
    channel keep it (png, webp): the colour channels carry the mark (docs/images.md).

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
        record: the layout before vaults (kept until every caller passes ``vault``): private record path (JSON
            lines); default ``<output>.record.jsonl`` beside ``output``. Not with ``vault``.
        vault: the owner's private folder (:mod:`radioactive.vault`): ``record.jsonl``, ``holdout/``, a copy of
            the key, ``references/``, ``manifest.json`` and ``commitment.json`` go there. Never inside the
            release, never holding it, neither inside the source. A vault that already holds a record is
            refused unless ``overwrite``.
        known_vaults: vaults (or record files) of earlier runs: a source holding an image one of them marked, or
            a source that is their release, is refused (:mod:`radioactive.marking.verify`), as is one holding
            the public notice.
        allow_remark: mark such a source anyway.
        public_notice: write ``NOTICE.txt`` into the release: it says that the dataset is marked (and gives the
            commitment), never which images; the one non-image file a release may hold.
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
            distributed run, any rank's failure (on every rank), or a record folder the ranks do not share; a
            vault inside the release or the source, or holding the release; a vault with a record and no
            ``overwrite``; a source that is a release (unless ``allow_remark``).
    """
    t0 = time.time()
    source, output = Path(source), Path(output)
    vault = Path(vault) if vault is not None else None
    plan = ranks.step("checking the inputs", lambda: plan_run(
        source, key, output, record, fraction, files, seed, config, device, holdout_fraction, withhold_fraction, strict,
        output_format, vault))
    journal = Journal(journal_path(plan.record), plan.identity)

    def open_() -> dict[int, list]:
        """Rank 0: refuse a release as the source, open the vault, apply the output rules, start the journal;
        the kept units' PSNRs, by unit."""
        own = [vault] if vault is not None and (vault / RECORD).is_file() else []
        check_not_a_release(plan.folder, [*own, *known_vaults], allow_remark)
        if vault is not None:
            start_vault(vault, overwrite=overwrite, resume=resume)
        ours = {output_name(f, sfx) for f in plan.folder.files for sfx in OUTPUT_FORMATS.values()} | set(plan.folder.files)
        ours.add(NOTICE)
        done = open_run(output, plan.holdout_dir, ours, journal, resume, overwrite, plan.bases, part_paths(plan.record))
        output.mkdir(parents=True, exist_ok=True)
        if vault is not None:
            key.save(vault / KEY)  # the arguments are checked: the vault's copy of the key
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

    def finish() -> MarkSummary:
        """Rank 0: the record, then the vault's manifest and commitment, then the notice."""
        summary = merge_run(plan, t0)
        if vault is not None:
            summary.vault = str(vault)
            summary.commitment = finish_vault(Vault(vault), key, plan.header)["commitment"]
        if public_notice:
            atomic_write_bytes(output / NOTICE, notice_text(summary.commitment, __version__).encode())
            summary.notice = str(output / NOTICE)
        if summary.unmarked_images:
            log.warning("%d of %d marked images carry no mark on disk (carrier shift <= %.4g), e.g. %s",
                        summary.unmarked_images, summary.num_marked_images, summary.unmarked_threshold,
                        summary.unmarked[0]["source"])
        summary.seconds = time.time() - t0
        return summary

    summary = ranks.step("writing the record", lambda: finish() if ranks.rank == 0 else None)
    return ranks.broadcast(summary)
