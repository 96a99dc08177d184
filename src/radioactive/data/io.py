"""Writing files: atomic writes (temporary file, fsync, rename), private modes, hashes.

Every file a command writes goes through :func:`atomic_write_bytes` (or :func:`atomic_writer`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import RadioactiveError


def read_json(path: str | os.PathLike, what: str, parse=None):
    """A JSON file's content, parsed by ``parse`` when given; every failure is one :class:`RadioactiveError` that
    names the file and ``what`` it should be.

    Args:
        path: the file. what: what it should be, for messages ("an audit plan").
        parse: ``dict -> object`` (e.g. a ``from_dict``); its RadioactiveError is prefixed with the path.

    Raises:
        RadioactiveError: unreadable file, invalid JSON, or ``parse``'s error.
    """
    import json

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RadioactiveError(f"{path} is not {what} ({e})") from e
    if parse is None:
        return d
    try:
        return parse(d)
    except RadioactiveError as e:
        raise RadioactiveError(f"{path}: {e}") from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_error(path: Path, e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write {path}: no space left on the device (or over quota); free some space and run "
                "again (files written so far are complete)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {path}: permission denied ({e.strerror}); write to a folder you may write to, "
                "or change its permissions")
    return f"cannot write {path}: {e.strerror or e}"


PRIVATE_FILE_MODE, PRIVATE_DIR_MODE = 0o600, 0o700
"""Permissions of the owner's private files and folders (the vault, :mod:`radioactive.vault`) on POSIX."""


def make_dirs(path: str | os.PathLike, private: bool = False) -> Path:
    """``mkdir -p path``; with ``private``, every folder it creates gets :data:`PRIVATE_DIR_MODE` (0700),
    whatever the umask (folders that existed keep theirs). Returns the path."""
    path = Path(path)
    if not private:
        path.mkdir(parents=True, exist_ok=True)
        return path
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        os.chmod(d, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask
    return path


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, private: bool = False) -> Iterator[BinaryIO]:
    """A binary file whose content becomes ``path`` when the block ends: written to a temporary file in the
    same folder, fsynced and renamed, so that ``path`` is either its previous version or complete; for
    content written piece by piece (a long record) without holding it in memory.

    The file gets the usual permissions (0666 less the umask); with ``private``, :data:`PRIVATE_FILE_MODE`
    (0600, from its creation on) and the folders created for it 0700 (:func:`make_dirs`). If the block
    raises, the temporary file is removed and a previous ``path`` is left as it was.

    Raises:
        RadioactiveError: the folder cannot be created or written (permission denied, read-only file
            system, disk full...); the message says which.
    """
    path = Path(path)
    tmp = None
    try:
        make_dirs(path.parent, private)
        # hidden, and no image extension: a leftover of a killed run is never taken for an image
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            if not private:  # mkstemp makes 0600 files: give public ones the usual permissions
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RadioactiveError(_write_error(path, e)) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder
    and a rename, so that ``path`` is either its previous version or complete
    (see :func:`atomic_writer`; ``private``: 0600, new folders 0700).

    Raises:
        RadioactiveError: the folder cannot be created or written (permission
            denied, read-only file system, disk full...); the message says which.
    """
    with atomic_writer(path, private) as f:
        f.write(data)
