"""The private record of a marking run: which images were marked, with which carrier, where they are.

Written by :mod:`radioactive.marking.plan` (``mark``); read here by every test that needs the owner's record.
The header is checked on load (kind, schema, key fingerprint, source and output folders).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import RadioactiveError


@dataclass(frozen=True)
class RecordEntry:
    source: Path  # vanilla image
    output: Path  # marked image
    label: int
    class_name: str
    released: bool = True
    name: str = ""  # the record's output name (relative to the released or holdout folder)
    sha256: str = ""  # of the marked output file, as written by mark

    @property
    def mirror_name(self) -> str:
        """Relative PNG path of this image's mirror in a mirror folder (see :func:`write_mirror_images`)."""
        return f"{'released' if self.released else 'holdout'}/{Path(self.name).with_suffix('.png').as_posix()}"


def read_record(record: str | Path, source_root: str | Path | None = None,
                released_root: str | Path | None = None) -> tuple[dict, list[RecordEntry]]:
    """Read a private record written by ``mark``.

    Paths in the record are resolved inside their base folder (the record's
    ``source`` and ``output``, or the roots given here); a path that escapes
    its base (``../``) is refused.

    Returns:
        the header dictionary and one entry per marked image.

    Raises:
        RadioactiveError: missing or malformed record, escaping paths.
    """
    record = Path(record)
    if not record.is_file():
        raise RadioactiveError(f"record not found: {record}")
    try:
        lines = [json.loads(ln) for ln in record.read_text().splitlines() if ln.strip()]
        header = lines[0]
        if header.get("kind") != "radioactive-record":
            raise ValueError("no record header")
        missing = [k for k in ("schema", "source", "output", "key_fingerprint") if k not in header]
        if missing:
            raise ValueError(f"its header lacks {missing}")
    except (ValueError, IndexError) as e:
        raise RadioactiveError(f"{record} is not a radioactive record ({e})") from e
    src = Path(source_root or header["source"]).resolve()
    out = Path(released_root or header["output"]).resolve()
    hold = Path(header.get("holdout") or record.parent / f"{record.stem}.holdout").resolve()
    entries = []
    for n, ln in enumerate(lines[1:], start=2):
        if isinstance(ln, dict) and ln.get("withheld"):
            continue  # never released: see read_withheld
        try:
            base = out if ln.get("released", True) else hold
            s, o = (src / ln["source"]).resolve(), (base / ln["output"]).resolve()
            entry = RecordEntry(s, o, int(ln["carrier_index"]), str(ln["class"]), bool(ln.get("released", True)),
                                str(ln["output"]), str(ln.get("sha256", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RadioactiveError(f"{record}: malformed entry on line {n} ({e!r})") from e
        if not s.is_relative_to(src) or not o.is_relative_to(base):
            raise RadioactiveError(f"record path escapes its folder: {ln['source']!r} / {ln['output']!r}")
        entries.append(entry)
    return header, entries


def read_withheld(record: str | Path, source_root: str | Path | None = None) -> tuple[dict, list[tuple[Path, str]]]:
    """The images a record says were withheld from the release (``mark --withhold-fraction``).

    Returns:
        the header and (vanilla source path, class name) per withheld image, resolved inside the source folder.

    Raises:
        RadioactiveError: as :func:`read_record`; a record without withheld images.
    """
    read_record(record, source_root)  # validates the header and every marked entry
    lines = [json.loads(ln) for ln in Path(record).read_text().splitlines() if ln.strip()]
    header = lines[0]
    src = Path(source_root or header["source"]).resolve()
    out = []
    for ln in lines[1:]:
        if not ln.get("withheld"):
            continue
        try:
            path, name = (src / ln["source"]).resolve(), str(ln["class"])
        except (KeyError, TypeError) as e:
            raise RadioactiveError(f"{record}: malformed withheld entry ({e!r})") from e
        if not path.is_relative_to(src):
            raise RadioactiveError(f"record path escapes its folder: {ln['source']!r}")
        out.append((path, name))
    if not out:
        raise RadioactiveError(f"{record} lists no withheld image; mark with --withhold-fraction to use this test")
    return header, out
