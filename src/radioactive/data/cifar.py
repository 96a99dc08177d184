"""The built-in data: the CIFAR-10 archive, where it is looked up and its extraction into the user cache."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..errors import RadioactiveError
from .folders import list_image_folder

log = logging.getLogger(__name__)

CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
DATA_ENV = "RADIOACTIVE_DATA"


def default_data_dir() -> Path:
    """Folder holding the built-in data archives.

    Looked up in order: the ``RADIOACTIVE_DATA`` environment variable,
    ``../shared/data`` from the working directory, ``../shared/data`` from the
    project's root (for an editable install).

    Raises:
        RadioactiveError: none of them exists.
    """
    candidates = []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[4] / "shared" / "data")
    for c in candidates:
        if (c / CIFAR10_ARCHIVE).is_file():
            return c
    raise RadioactiveError(
        f"built-in data not found: set {DATA_ENV} to the folder holding {CIFAR10_ARCHIVE} "
        f"(looked in {', '.join(str(c) for c in candidates)}), or pass an image folder"
    )


def cache_dir() -> Path:
    """User cache folder (``$RADIOACTIVE_CACHE``, else ``$XDG_CACHE_HOME/radioactive``, else ``~/.cache/radioactive``)."""
    if os.environ.get("RADIOACTIVE_CACHE"):
        return Path(os.environ["RADIOACTIVE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "radioactive"


def extract_cifar10(archive: str | os.PathLike | None = None) -> Path:
    """Extract the CIFAR-10 archive once into the user cache.

    Args:
        archive: path to ``cifar10-jpeg.tar.gz``; None looks it up with
            :func:`default_data_dir`.

    Returns:
        folder with ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``.

    Raises:
        RadioactiveError: the archive is missing or malformed.
    """
    archive = Path(archive) if archive is not None else default_data_dir() / CIFAR10_ARCHIVE
    if not archive.is_file():
        raise RadioactiveError(f"CIFAR-10 archive not found: {archive}")
    stat = archive.stat()
    tag = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / f"cifar10-{tag}"
    if (dest / ".complete").is_file():
        return dest
    log.info("extracting %s into %s", archive, dest)
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".tmp-"))
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        roots = [p for p in tmp.rglob("train") if p.is_dir()]
        if not roots:
            raise RadioactiveError(f"{archive} holds no train/ folder")
        top = roots[0].parent
        (top / ".complete").write_text("ok\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(top, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def cifar10_subset(dest: Path, train_per_class: int | None, test_per_class: int | None,
                   archive: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Copy the first images of each CIFAR-10 class (sorted by name) into
    ``dest/train`` and ``dest/test``.

    Args:
        dest: folder to create.
        train_per_class, test_per_class: images per class to keep (None: all;
            the archive has 5,000 and 1,000).

    Returns:
        (train folder, test folder).
    """
    src = extract_cifar10(archive)
    out = []
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        folder = list_image_folder(src / split)
        keep: dict[int, int] = {}
        for rel, k in zip(folder.files, folder.labels):
            if n is not None and keep.get(k, 0) >= n:
                continue
            keep[k] = keep.get(k, 0) + 1
            target = dest / split / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder.root / rel, target)
        out.append(dest / split)
    return out[0], out[1]
