"""What a folder run will do, decided before it writes anything, identically on every rank.

The marked, holdout and withheld images (seeded, per class), the released names, the fixed partition into
units (:func:`plan_units`), the record's header and the run's identity (what ``--resume`` compares).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data import ImageFolder, OutputFormat, display_size, list_image_folder
from ..errors import RadioactiveError
from ..keys import Key
from ..vault import HOLDOUT, RECORD, check_separate
from .optimise import MarkingConfig

RECORD_SCHEMA = 1


def select_marked(folder: ImageFolder, fraction: float, seed: int) -> list[int]:
    """Choose round(fraction x n_k) images of every class k, uniformly at random (seeded)."""
    if not 0 < fraction <= 1:
        raise RadioactiveError(f"marked fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(folder.labels)
    chosen = []
    for k in range(len(folder.classes)):
        idx = np.flatnonzero(labels == k)
        n = int(round(fraction * len(idx)))
        chosen.extend(rng.choice(idx, size=n, replace=False).tolist())
    return sorted(chosen)


def chosen_indices(folder: ImageFolder, fraction: float | None, files: list[str] | None, seed: int) -> list[int]:
    """The sorted indices of the images a run marks: ``select_marked(folder, fraction, seed)``, or the listed files.

    Raises:
        RadioactiveError: both or neither of fraction and files; a listed file that is not an image of the
            folder; nothing to mark.
    """
    if (fraction is None) == (files is None):
        raise RadioactiveError("give either a marked fraction or a list of files to mark")
    if files is not None:
        index = {f: i for i, f in enumerate(folder.files)}
        unknown = [f for f in files if f not in index]
        if unknown:
            raise RadioactiveError(f"{len(unknown)} listed files are not images of {folder.root}, e.g. {unknown[0]}")
        chosen = sorted({index[f] for f in files})
    else:
        chosen = select_marked(folder, fraction, seed)
    if not chosen:
        raise RadioactiveError("no image would be marked: " + ("the list of files is empty" if files is not None else
                               f"a fraction {fraction} of each class rounds to 0 images; raise --fraction"))
    return chosen


def _select_among(folder: ImageFolder, fraction: float, rng: np.random.Generator, exclude: set[int],
                  what: str) -> list[int]:
    """round(fraction x n_k) images of every class k, uniformly among those not in ``exclude``."""
    if not 0 <= fraction < 1:
        raise RadioactiveError(f"{what} fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(folder.labels)
    chosen = []
    for k in range(len(folder.classes)):
        all_k = np.flatnonzero(labels == k)
        idx = np.array([i for i in all_k if i not in exclude], dtype=np.int64)
        n = min(int(round(fraction * len(all_k))), len(idx))
        chosen.extend(rng.choice(idx, size=n, replace=False).tolist())
    return sorted(chosen)


def select_holdout(folder: ImageFolder, fraction: float, seed: int, exclude: set[int]) -> list[int]:
    """Choose round(fraction x n_k) images of every class among those not in ``exclude`` (seeded, independent
    of the marked selection's draws)."""
    return _select_among(folder, fraction, np.random.default_rng([seed, 1]), exclude, "holdout")


def select_withheld(folder: ImageFolder, fraction: float, seed: int, exclude: set[int]) -> list[int]:
    """Choose round(fraction x n_k) images of every class among those not in ``exclude``, uniformly at random
    (seeded, a stream of its own): they are left out of the released copy (the membership test's control)."""
    return _select_among(folder, fraction, np.random.default_rng([seed, 2]), exclude, "withheld")


def output_name(rel: str, suffix: str = ".png") -> str:
    """Relative path of an image in the released copy: same folders and stem, the output format's ``suffix``."""
    return str(Path(rel).with_suffix(suffix).as_posix())


def check_output_dir(source: Path, output: Path) -> None:
    """Refuse an output folder equal to or inside the source folder (the source is never written to)."""
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise RadioactiveError(f"output folder {output} is inside the source folder {source}; choose another place")


COPY_CHUNK = 256  # unmarked images written, and journaled, together


@dataclass(frozen=True)
class Unit:
    """One resumable unit of a folder run: images (indices into the folder) and what is done to them.

    Attributes:
        kind: ``unreadable`` (copied unchanged), ``mark`` (marked and released), ``holdout`` (marked and
            kept private), ``copy`` (released unmarked).
        indices: the images, in folder order.
    """

    kind: str
    indices: tuple[int, ...]


def plan_units(folder: ImageFolder, chosen: list[int], holdout: list[int], batch_size: int,
               unreadable: dict[int, str], withheld: list[int] = ()) -> list[Unit]:
    """The fixed partition of a run into units, the same in every run on the same inputs.

    Marked images are grouped by displayed size (sizes in order of first appearance) and cut into chunks of
    ``batch_size`` in folder order: a mark depends on its batch's composition in the last bit (floating point),
    so a resumed run must redo exactly the batches of an uninterrupted one to write the same bytes. Images
    whose header cannot be read are added to ``unreadable`` (index -> reason) and form the first unit.
    """
    units = []
    for kind, group in (("mark", chosen), ("holdout", holdout)):
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in group:
            try:
                by_size.setdefault(display_size(folder.path(i)), []).append(i)
            except RadioactiveError as e:
                unreadable[i] = str(e)
        units += [Unit(kind, tuple(idx[s:s + batch_size])) for idx in by_size.values()
                  for s in range(0, len(idx), batch_size)]
    if unreadable:
        units.insert(0, Unit("unreadable", tuple(sorted(unreadable))))
    marked = set(chosen) | set(withheld)
    rest = [i for i in range(len(folder)) if i not in marked and i not in unreadable]
    return units + [Unit("copy", tuple(rest[s:s + COPY_CHUNK])) for s in range(0, len(rest), COPY_CHUNK)]


def _names(classes) -> str:
    return ", ".join(list(classes)[:5]) + (", ..." if len(classes) > 5 else "")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _digest_items(items) -> str:
    """``_digest(list(items))`` without the list: the items' JSON fed to the hash one by one."""
    h = hashlib.sha256(b"[")
    for n, x in enumerate(items):
        h.update((", " if n else "").encode() + json.dumps(x).encode())
    h.update(b"]")
    return h.hexdigest()


@dataclass
class RunPlan:
    """Everything a run decides before it writes: the same on every rank."""

    folder: ImageFolder
    output_format: OutputFormat
    output: Path
    record: Path
    holdout_dir: Path
    units: list[Unit]
    unreadable: dict[int, str]
    withheld: list[int]
    header: dict
    identity: dict

    @property
    def bases(self) -> dict[str, Path]:
        return {"output": self.output, "holdout": self.holdout_dir}


def plan_run(source: Path, key: Key, output: Path, record: Path | None, fraction: float | None, files: list[str] | None,
          seed: int, config: MarkingConfig, device: str, holdout_fraction: float, withhold_fraction: float,
          strict: bool, output_format: OutputFormat = OutputFormat(), vault: Path | None = None) -> RunPlan:  # noqa: B008
    """Check the arguments and inputs and cut the run into units (see :func:`mark_folder`): with a ``vault``,
    the record is ``vault/record.jsonl`` and the holdout folder ``vault/holdout``; without one (the layout
    before vaults), ``record`` or ``<output>.record.jsonl`` and ``<record stem>.holdout`` beside it."""
    folder = list_image_folder(source)
    if tuple(folder.classes) != tuple(key.classes):
        raise RadioactiveError(
            f"the classes of {source} ({len(folder.classes)}: {_names(folder.classes)}) differ from the key's "
            f"({len(key.classes)}: {_names(key.classes)}); "
            "make the key with `radioactive keygen --data` on this folder"
        )
    check_output_dir(source, output)
    if vault is not None:
        if record is not None:
            raise RadioactiveError("give a vault or a record path, not both: the vault holds the record")
        check_separate(output, vault, source)
        record = Path(vault) / RECORD
    record = Path(record) if record else output.parent / f"{output.name}.record.jsonl"
    if record.resolve().is_relative_to(output.resolve()):
        raise RadioactiveError("the private record must be written outside the released copy")
    if record.resolve().is_relative_to(source.resolve()):
        raise RadioactiveError("the private record must be written outside the source folder")
    names: dict[str, str] = {}
    for rel in folder.files:
        out_rel = output_name(rel, output_format.suffix)
        other = names.setdefault(out_rel.lower(), rel)
        if other != rel:
            raise RadioactiveError(f"{other} and {rel} would both be written as {out_rel}; rename one")
    del names
    chosen = chosen_indices(folder, fraction, files, seed)
    holdout = select_holdout(folder, holdout_fraction, seed, set(chosen)) if holdout_fraction else []
    withheld = (select_withheld(folder, withhold_fraction, seed, set(chosen) | set(holdout))
                if withhold_fraction else [])
    holdout_dir = Path(vault) / HOLDOUT if vault is not None else record.parent / f"{record.stem}.holdout"
    unreadable: dict[int, str] = {}
    units = plan_units(folder, chosen, holdout, config.batch_size, unreadable, withheld)
    if strict and unreadable:
        i = min(unreadable)
        raise RadioactiveError(f"{folder.files[i]} cannot be used ({unreadable[i]}); --strict turns skips into failures")
    header = {
        "kind": "radioactive-record", "schema": RECORD_SCHEMA, "package_version": __version__,
        "key_fingerprint": key.fingerprint, "classes": list(key.classes), "source": str(source.resolve()), "output": str(output.resolve()),
        "holdout": str(holdout_dir.resolve()) if holdout else None, "holdout_fraction": holdout_fraction,
        "fraction": fraction, "seed": seed, "config": asdict(config),
    }
    if withheld:
        header["withhold_fraction"] = withhold_fraction
    if output_format.lossy:  # absent: png, as in records written before lossy output existed
        header["output_format"] = output_format.to_dict()
    stats = ((f, st.st_size, st.st_mtime_ns) for f, st in ((f, (source / f).stat()) for f in folder.files))
    identity = {**header, "record": str(record.resolve()), "device": torch.device(device).type, "strict": strict,
                "marked_files": _digest([folder.files[i] for i in chosen]),
                "holdout_files": _digest([folder.files[i] for i in holdout]), "source_files": _digest_items(stats),
                "withheld_files": _digest([folder.files[i] for i in withheld])}
    return RunPlan(folder, output_format, output, record, holdout_dir, units, unreadable, withheld, header, identity)
