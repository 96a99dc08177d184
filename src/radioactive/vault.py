"""The owner's vault: every private file of a marking run, in one folder apart from the release.

Layout (docs/formats.md, "The vault"); on POSIX every folder is 0700 and every file 0600::

    VAULT/
      key.safetensors     a copy of the key the run used
      record.jsonl        the private record (header ``"kind": "radioactive-record"``; its ``holdout`` is VAULT/holdout)
      holdout/            the marked versions of the holdout images (released vanilla)
      mirror/             mirror images, written by ``mirror-images`` when asked
      references/         the owner's vanilla reference models, added later (.safetensors, TorchScript .pt)
      audit-plan.json     the audit plan, when the detection side writes one
      manifest.json       every other file (relative path -> sha256), with schema and package version
      commitment.json     the public commitment (:func:`commitment`) and what it covers

The release (``mark --output``) holds only images, and optionally ``NOTICE.txt``; the vault is never inside
it, it is never inside the vault, and neither is inside the source (:func:`check_separate`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .data import PRIVATE_DIR_MODE, atomic_write_bytes, make_dirs, sha256_file
from .errors import RadioactiveError
from .keys import Key

VAULT_SCHEMA = 1
COMMITMENT_SCHEMA = 1
KEY = "key.safetensors"
RECORD = "record.jsonl"
PLAN = "audit-plan.json"
MANIFEST = "manifest.json"
COMMITMENT = "commitment.json"
REFERENCES = "references"
HOLDOUT = "holdout"
MIRROR = "mirror"
NOTICE = "NOTICE.txt"
"""The one file of a release that is not an image: the public notice that the dataset is marked (optional)."""
REFERENCE_SUFFIXES = (".safetensors", ".pt")


def make_private_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path``: every folder created gets mode 0700 (whatever the umask); returns the path."""
    return make_dirs(path, private=True)


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (folders created on the way: 0700).

    Raises:
        RadioactiveError: the file cannot be written (the message says why).
    """
    atomic_write_bytes(path, data, private=True)


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or inside it (paths resolved, links followed)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b)


def check_separate(release: str | os.PathLike, vault: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Refuse a vault inside (or equal to) the release, a release inside the vault, and either inside the source.

    Raises:
        RadioactiveError: one clear line naming the two folders.
    """
    release, vault = Path(release), Path(vault)
    if _inside(vault, release):
        raise RadioactiveError(f"the vault {vault} is inside the release {release}: publishing the release would "
                               "publish the key and the record; put the vault elsewhere")
    if _inside(release, vault):
        raise RadioactiveError(f"the release {release} is inside the vault {vault}; give them separate folders")
    if source is not None:
        for what, p in (("release", release), ("vault", vault)):
            if _inside(p, Path(source)):
                raise RadioactiveError(f"the {what} {p} is inside the source folder {source}; choose another place")


@dataclass(frozen=True)
class Vault:
    """A vault folder (module docstring); :func:`open_vault` checks that one exists."""

    path: Path

    @property
    def key_path(self) -> Path:
        return self.path / KEY

    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def commitment_path(self) -> Path:
        return self.path / COMMITMENT

    @property
    def references_dir(self) -> Path:
        return self.path / REFERENCES

    @property
    def holdout_dir(self) -> Path:
        return self.path / HOLDOUT

    @property
    def mirror_dir(self) -> Path:
        return self.path / MIRROR

    def load_key(self) -> Key:
        """The key the run used (:meth:`radioactive.keys.Key.load`).

        Raises:
            RadioactiveError: as :meth:`Key.load`.
        """
        return Key.load(self.key_path)

    def record_header(self) -> dict:
        """The first line of the record (``"kind": "radioactive-record"``).

        Raises:
            RadioactiveError: the record cannot be read or is not a record.
        """
        return read_record_header(self.record_path)

    def references(self) -> list[Path]:
        """The reference models in ``references/``: its ``.safetensors`` and ``.pt`` (TorchScript) files, sorted."""
        d = self.references_dir
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in REFERENCE_SUFFIXES
                      and not p.name.startswith("."))


def read_record_header(path: Path) -> dict:
    """The header line of a record written by ``mark``.

    Raises:
        RadioactiveError: the file cannot be read, or its first line is not a record header.
    """
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
    except (OSError, ValueError) as e:
        raise RadioactiveError(f"cannot read the record {path}: {e}") from e
    if not isinstance(header, dict) or header.get("kind") != "radioactive-record":
        raise RadioactiveError(f"{path} is not a record written by `radioactive mark`")
    return header


def open_vault(path: str | os.PathLike) -> Vault:
    """The vault at ``path``.

    Raises:
        RadioactiveError: ``path`` is not a vault written by ``mark`` (no folder, no key or no record).
    """
    path = Path(path)
    missing = [n for n in (KEY, RECORD) if not (path / n).is_file()]
    if not path.is_dir() or missing:
        what = "no such folder" if not path.is_dir() else "no " + " and no ".join(missing)
        raise RadioactiveError(f"{path} is not a vault written by `radioactive mark --vault` ({what})")
    return Vault(path)


# ----------------------------------------------------------------------------- manifest


def _files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root`` (links to files count), but the manifest and commitment."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in (MANIFEST, COMMITMENT):
                out.append(rel)
    return sorted(out)


def update_manifest(vault_path: str | os.PathLike) -> dict:
    """Rewrite ``manifest.json``: the sha256 of every file of the vault but the manifest and the commitment.

    Returns:
        The manifest: ``{"kind": "radioactive-vault-manifest", "schema", "package_version", "files": {path: sha256}}``.
    """
    root = Path(vault_path)
    manifest = {"kind": "radioactive-vault-manifest", "schema": VAULT_SCHEMA, "package_version": __version__,
                "files": {rel: sha256_file(root / rel) for rel in _files(root)}}
    write_private(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def verify_manifest(vault_path: str | os.PathLike) -> list[str]:
    """What differs between the vault and its manifest: ``missing: <path>``, ``changed: <path>``, ``extra: <path>``
    (sorted by path), or ``no manifest.json`` / ``unreadable manifest.json``; empty when every file matches."""
    root = Path(vault_path)
    try:
        listed = json.loads((root / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST}"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"unreadable {MANIFEST}"]
    present = set(_files(root))
    problems = []
    for rel in sorted(present | set(listed)):
        if rel not in present:
            problems.append(f"missing: {rel}")
        elif rel not in listed:
            problems.append(f"extra: {rel}")
        elif sha256_file(root / rel) != listed[rel]:
            problems.append(f"changed: {rel}")
    return problems


# ----------------------------------------------------------------------------- commitment


def canonical_json(obj) -> bytes:
    """JSON with sorted keys, no spaces, ASCII only: the bytes the commitment hashes for settings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def commitment_text(vault_path: str | os.PathLike) -> tuple[str, list[str]]:
    """The text whose sha256 is the commitment, and the names it covers (docs/formats.md, "The commitment")::

        radioactive-commitment 1
        key.safetensors <sha256 of the file>
        record.jsonl <sha256 of the file>
        settings <sha256 of canonical_json(record header's "config")>

    one line each, ``\\n``-terminated. The audit plan is not covered: the owner may still change it (add references,
    say) after marking, until a suspect is tested; ``radioactive plan`` prints the plan's own sha256 to publish at
    that point (docs/formats.md, "The commitment").

    Raises:
        RadioactiveError: the folder is not a vault (:func:`open_vault`).
    """
    vault = open_vault(vault_path)
    header = vault.record_header()
    lines = [f"radioactive-commitment {COMMITMENT_SCHEMA}", f"{KEY} {sha256_file(vault.key_path)}",
             f"{RECORD} {sha256_file(vault.record_path)}",
             f"settings {hashlib.sha256(canonical_json(header.get('config'))).hexdigest()}"]
    covers = [KEY, RECORD, "settings"]
    return "".join(ln + "\n" for ln in lines), covers


def commitment(vault_path: str | os.PathLike) -> str:
    """The vault's commitment: 64 hex digits, the sha256 of :func:`commitment_text` (key, record and marking
    settings). Published or timestamped with the release, it shows that these files existed then.

    Raises:
        RadioactiveError: the folder is not a vault.
    """
    return hashlib.sha256(commitment_text(vault_path)[0].encode()).hexdigest()


def write_commitment(vault_path: str | os.PathLike) -> dict:
    """Write ``commitment.json``: ``{"schema", "commitment", "covers", "created", "package_version"}``; returns it.

    Raises:
        RadioactiveError: the folder is not a vault, or the file cannot be written.
    """
    text, covers = commitment_text(vault_path)
    out = {"schema": COMMITMENT_SCHEMA, "commitment": hashlib.sha256(text.encode()).hexdigest(), "covers": covers,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "package_version": __version__}
    write_private(Path(vault_path) / COMMITMENT, (json.dumps(out, indent=2) + "\n").encode())
    return out


def check_commitment(vault_path: str | os.PathLike, published: str) -> bool:
    """Whether the vault's files still give the ``published`` commitment (64 hex digits, any case and spacing).

    Raises:
        RadioactiveError: ``published`` is not 64 hex digits, or the folder is not a vault.
    """
    given = published.strip().lower()
    if len(given) != 64 or any(c not in "0123456789abcdef" for c in given):
        raise RadioactiveError(f"a commitment is 64 hex digits (as mark printed it), got {published!r}")
    return commitment(vault_path) == given


# ----------------------------------------------------------------------------- what mark does with it


def start_vault(path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> Vault:
    """Create (or reopen) the vault of a marking run, mode 0700, with its empty ``references/``. ``mark`` puts
    the key's copy in it once the run's arguments are checked.

    A vault that already holds a record belongs to a finished run: refused unless ``overwrite``.

    Raises:
        RadioactiveError: a vault with a record and no ``overwrite``; a path that is a file; unwritable folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RadioactiveError(f"the vault {path} exists and is not a folder")
    if (path / RECORD).exists() and not overwrite:
        if resume:
            raise RadioactiveError(f"nothing to resume: the vault {path} holds the record of a finished run; pass "
                                   "--overwrite to start afresh (its key copy and record are replaced)")
        raise RadioactiveError(f"the vault {path} already holds the record of a marking run: give each release a "
                               "vault of its own, or pass --overwrite to replace that run (its key copy and record "
                               "are lost)")
    make_private_dir(path)
    os.chmod(path, PRIVATE_DIR_MODE)  # an existing folder given as the vault becomes private too
    make_private_dir(path / REFERENCES)
    return Vault(path)


def finish_vault(vault: Vault, key: Key, header: dict) -> dict:
    """After the record is written: the audit plan hook, then the manifest and the commitment; returns
    ``commitment.json``'s content."""
    try:
        # The detection side's audit plan (written into the vault with write_private). The module lands with the
        # audit rewrite; until then there is none. Only its own absence is tolerated, not a failing import in it.
        from .detection.plan import write_default_plan
    except ModuleNotFoundError as e:
        if e.name not in (f"{__package__}.detection.plan", f"{__package__}.detection"):
            raise
        write_default_plan = None
    if write_default_plan is not None:
        write_default_plan(vault.path, key, header)
    update_manifest(vault.path)
    return write_commitment(vault.path)
