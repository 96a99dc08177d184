"""Safe, resumable writing of a released copy: what ``mark`` may touch, atomic writes, the run journal.

Output folder rules (``radioactive mark --output``):

* A missing or empty folder is written into.
* A non-empty folder is refused, unless ``--resume`` or ``--overwrite`` is given (not both).
* With either flag, every file in it must be one a run of ``mark`` on this source writes: ``<rel>.png``
  (or ``.jpg``, ``.webp``: any output format, so a run may ``--overwrite`` one in another format) for a
  source image ``<rel>`` (marked or copied), ``<rel>`` itself (an unreadable image copied unchanged),
  or a leftover temporary file of an atomic write (``.radioactive-*.partial``, ``.tmp-*``). Anything else
  (another file, a symlink) is refused and named: it would be released with the copy, and deleting it
  could lose data. Nothing outside the output folder is ever deleted, except the run's own journal and
  leftover temporary files in the private holdout folder.
* ``--overwrite`` starts afresh: it deletes those files of ours, then runs as if the folder were empty.
  The private holdout folder (outside the output) is not emptied: the new run replaces the files it
  writes there, and only those its record lists belong to it.
* ``--resume`` continues the interrupted run that the journal describes. Its identity (key fingerprint,
  classes, source, output, record, seed, fraction, marked and holdout files, marking config, device,
  package version, every source file's name, size and mtime) must equal this run's, else it is refused
  with the names of the differing fields. Finished units whose every file exists with the journaled
  sha256 are kept; the rest are redone whole. Leftover temporary files are deleted.

Journal (``<record>.partial``, beside the private record, never inside the released copy): JSON lines,
the first ``{"kind": "radioactive-mark-journal", "schema", "identity"}``, then one line per finished
unit of work (a batch of marked images or a chunk of copies), appended, flushed and fsynced after the
unit's files were written: ``{"unit", "files": [[base, rel, sha256], ...], ...}`` with whatever the
record and the summary need. The journal is removed once the record is written.

In a distributed run (:mod:`radioactive.marking.distributed`) rank 0 writes the journal's header (and the
units kept by ``--resume``), and every rank appends the units it finishes to its own part,
``<record>.rank<r>.partial``, with the same header. ``--resume`` reads the journal and every part, whatever
the number of processes of the interrupted run and of this one (units do not depend on it), writes the
verified units into a new journal and deletes the parts; rank 0 merges them into the record at the end.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..data import atomic_write_bytes, atomic_writer, sha256_file
from ..errors import RadioactiveError

JOURNAL_KIND = "radioactive-mark-journal"
JOURNAL_SCHEMA = 1
TEMP_PREFIX, TEMP_SUFFIX = ".radioactive-", ".partial"


def journal_path(record: Path) -> Path:
    """The journal of the run that writes ``record``: ``<record>.partial`` beside it."""
    return record.with_name(record.name + TEMP_SUFFIX)


def part_path(record: Path, rank: int) -> Path:
    """Rank ``rank``'s part of the journal of a distributed run that writes ``record``: ``<record>.rank<r>.partial``."""
    return record.with_name(f"{record.name}.rank{rank}{TEMP_SUFFIX}")


def part_paths(record: Path) -> list[Path]:
    """The journal parts beside ``record`` (of a run with any number of processes), sorted."""
    return sorted(record.parent.glob(f"{glob.escape(record.name)}.rank*{TEMP_SUFFIX}"))


def write_atomic(path: Path, data: bytes, private: bool = False) -> str:
    """Write ``data`` to ``path`` atomically; return its sha256 (hex).

    The bytes go through :func:`radioactive.data.atomic_write_bytes` (fsynced, usual permissions, clear errors
    on a full disk or a denied write), staged under a hidden name without an image extension
    (``.tmp-*.partial``) and renamed into place: a run killed at any point leaves no file that an image
    loader (torchvision's ``ImageFolder`` reads hidden files too) would take for an image. ``mark`` deletes
    such leftovers on ``--resume`` and ``--overwrite``. ``private``: mode 0600, new folders 0700 (the vault).
    """
    atomic_write_bytes(path, data, private)
    return hashlib.sha256(data).hexdigest()


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary file of an atomic write (ours, or :func:`radioactive.data.atomic_write_bytes`')."""
    return (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)) or name.startswith(".tmp-")


@dataclass
class FolderContents:
    """The files under a folder, sorted by who wrote them (paths are absolute, sorted)."""

    ours: list[Path] = field(default_factory=list)
    temporary: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)


def scan_folder(folder: Path, ours: set[str]) -> FolderContents:
    """Sort every entry under ``folder`` (symlinks not followed): relative POSIX paths in ``ours``,
    temporary files, and the rest (foreign files, symlinks, other non-regular entries)."""
    out = FolderContents()
    if not folder.is_dir():
        return out
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                p = Path(e.path)
                if e.is_dir(follow_symlinks=False):
                    stack.append(p)
                elif not e.is_file(follow_symlinks=False):
                    out.foreign.append(p)
                elif is_temporary(e.name):
                    out.temporary.append(p)
                else:
                    (out.ours if p.relative_to(folder).as_posix() in ours else out.foreign).append(p)
    for paths in (out.ours, out.temporary, out.foreign):
        paths.sort()
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class Journal:
    """The append-only journal of one run (see the module docstring)."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, json.loads(json.dumps(identity))  # compared as read back from JSON
        self._f = None

    def _header(self) -> str:
        return json.dumps({"kind": JOURNAL_KIND, "schema": JOURNAL_SCHEMA, "identity": self.identity})

    def is_journal(self) -> bool:
        """Whether the file at ``path`` starts with a journal header (of any run)."""
        try:
            with open(self.path) as f:
                head = json.loads(f.readline())
            return head.get("kind") == JOURNAL_KIND and head.get("schema") == JOURNAL_SCHEMA
        except (OSError, ValueError, AttributeError):
            return False

    def units(self) -> Iterator[tuple[int, dict]]:
        """(byte offset of its line, line) of every finished unit, in file order, read one line at a time;
        a unit journaled twice appears twice (the later line wins); a torn last line is dropped.

        Raises:
            RadioactiveError: the file is not a journal, or its run's identity differs from this one's.
        """
        if not self.is_journal():
            raise RadioactiveError(f"{self.path} is not a journal of `radioactive mark`; move it away or pass --overwrite")
        with open(self.path, "rb") as f:
            old, new = _flat(json.loads(f.readline())["identity"]), _flat(self.identity)
            diffs = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if diffs:
                raise RadioactiveError(
                    f"cannot resume: the interrupted run ({self.path}) used other arguments or inputs "
                    f"({', '.join(diffs)}); re-run it with its own arguments (the same --preset and flags), or pass "
                    "--overwrite to start afresh"
                )
            while True:
                pos, ln = f.tell(), f.readline()
                try:
                    u = json.loads(ln)
                except ValueError:  # the end, or a line torn by a kill mid-append: that unit is redone
                    return
                yield pos, u

    def read(self) -> dict[int, dict]:
        """The finished units of the interrupted run, by unit number (a torn last line is dropped).

        Raises:
            RadioactiveError: the file is not a journal, or its run's identity differs from this one's.
        """
        return {u["unit"]: u for _, u in self.units()}

    def start(self, kept: Iterable[dict]) -> None:
        """Write the header and the ``kept`` units atomically (replacing any older journal), then open for appends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # a folder it needs is an ordinary one; the file is 0600
        with atomic_writer(self.path, private=True) as f:  # it lists the marked images: private like the record
            f.write((self._header() + "\n").encode())
            for u in kept:
                f.write((json.dumps(u) + "\n").encode())
        self._f = open(self.path, "a")  # noqa: SIM115 (kept open for the run's appends; closed by close())

    def append(self, unit: dict) -> None:
        """Record a finished unit: one line, flushed and fsynced."""
        self._f.write(json.dumps(unit) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self, remove: bool) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if remove:
            self.path.unlink(missing_ok=True)


def verified(unit: dict, bases: dict[str, Path]) -> bool:
    """Whether every file a journaled unit wrote exists with its journaled sha256."""
    return all((bases[b] / rel).is_file() and sha256_file(bases[b] / rel) == sha for b, rel, sha in unit["files"])


def open_run(output: Path, private: Path, ours: set[str], journal: Journal, resume: bool, overwrite: bool,
             bases: dict[str, Path], parts: list[Path] = ()) -> dict[int, dict]:
    """Apply the output folder rules (module docstring) and start the journal.

    A distributed run's journal parts (``parts``) count as part of the journal: ``resume`` keeps their
    verified units too; they are deleted once the new journal is written.

    Args:
        output: the released copy's folder.
        private: the private folder of marked holdout images (only its temporary files are touched).
        ours: relative POSIX paths a run on this source may write into ``output``.
        journal: this run's journal (its identity set, not started).
        resume, overwrite: the flags.
        bases: folder of each ``base`` name used in the journal's file lists.
        parts: journal parts of an earlier distributed run (:func:`part_paths`).

    Returns:
        The interrupted run's finished and verified units, by number (empty for a fresh start).

    Raises:
        RadioactiveError: both flags; a non-empty output without either; foreign files with either;
            ``--resume`` with nothing to resume or with other arguments.
    """
    if resume and overwrite:
        raise RadioactiveError("--resume and --overwrite exclude each other: resume continues a run, overwrite restarts it")
    if output.exists() and not output.is_dir():
        raise RadioactiveError(f"output {output} exists and is not a folder")
    non_empty = output.is_dir() and any(output.iterdir())
    if non_empty and not (resume or overwrite):
        raise RadioactiveError(f"output folder {output} exists and is not empty; pass --resume to continue an "
                               "interrupted run with the same arguments, or --overwrite to start afresh")
    contents = scan_folder(output, ours)
    if non_empty and contents.foreign:
        f = contents.foreign
        raise RadioactiveError(f"output folder {output} holds {len(f)} entries that `radioactive mark` does not write "
                               f"(e.g. {f[0].relative_to(output)}); move them away or choose another output folder")
    units: dict[int, dict] = {}
    parts = [Journal(p, journal.identity) for p in parts]
    if resume and journal.path.exists():
        found = journal.read()
        for part in parts:
            found.update(part.read())
        units = {n: u for n, u in found.items() if verified(u, bases)}
    elif resume and non_empty:
        raise RadioactiveError(f"nothing to resume in {output}: no journal {journal.path} (the run finished, or was "
                               "started by another command); pass --overwrite to start afresh")
    for j in [journal, *parts]:
        if j.path.exists() and not j.is_journal():
            raise RadioactiveError(f"{j.path} exists and is not a journal of `radioactive mark`; move it away")
    for p in contents.temporary + scan_folder(private, set()).temporary:
        p.unlink()
    if overwrite:
        for p in contents.ours:
            p.unlink()
    journal.start([units[n] for n in sorted(units)])
    for part in parts:
        part.path.unlink()
    return units
