"""Image folders, the built-in CIFAR-10 data, image I/O and atomic writes.

Layout convention (torchvision ``ImageFolder``): ``root/<class>/.../<image>``;
the class index of a folder is its position among the sorted class folder
names. Images are read as RGB ``uint8`` arrays; every image a command reads
goes through :func:`load_rgb`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import RadioactiveError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
DATA_ENV = "RADIOACTIVE_DATA"


@dataclass(frozen=True)
class ImageFolder:
    """A listed image folder.

    Attributes:
        root: the folder holding one sub-folder per class.
        classes: class names in index order (sorted folder names).
        files: (N,) paths relative to ``root``, sorted, as POSIX strings.
        labels: (N,) class index of each file.
        ignored: relative paths of files that are not images (hidden files,
            other extensions); listed, never read.
    """

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    ignored: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]


def list_image_folder(root: str | os.PathLike, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """List an ImageFolder-style directory.

    Args:
        root: folder with one sub-folder per class (nested folders inside a
            class folder are allowed).
        classes: expected class names in order; when given, the folder's class
            names must match them exactly.

    Raises:
        RadioactiveError: the folder does not exist, has no class folders, a
            class folder holds no image, or its classes differ from ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise RadioactiveError(f"image folder not found: {root} (expected a folder with one sub-folder per class)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise RadioactiveError(f"{root} has no class sub-folders (expected the ImageFolder layout root/<class>/<image>)")
    if classes is not None and tuple(found) != tuple(classes):
        raise RadioactiveError(
            f"classes of {root} differ from the expected ones: found {found[:5]}..., expected {list(classes)[:5]}..."
        )
    files, labels, ignored = [], [], []
    for k, name in enumerate(found):
        n_before = len(files)
        seen: set[Path] = set()
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            real = Path(dirpath).resolve()
            if real in seen:  # symlink loop: follow each real folder once
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                rel = (Path(dirpath) / fn).relative_to(root).as_posix()
                if fn.startswith(".") or not fn.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(rel)
                else:
                    files.append(rel)
                    labels.append(k)
        if len(files) == n_before:
            raise RadioactiveError(f"class folder {root / name} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    order = np.argsort(np.array(files, dtype=object), kind="stable")
    return ImageFolder(
        root=root,
        classes=tuple(found),
        files=tuple(files[i] for i in order),
        labels=tuple(labels[i] for i in order),
        ignored=tuple(ignored),
    )


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as it is displayed, as RGB.

    EXIF orientation is applied; palette, greyscale and CMYK images are
    converted to RGB; an alpha channel is composited on white; 16-bit images
    are scaled to 8 bits by Pillow's conversion.

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        RadioactiveError: the file cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                scale = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.round(arr / scale * 255).clip(0, 255).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise RadioactiveError(f"cannot read image {path}: {e}") from e


def display_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as displayed (after EXIF orientation), read from its header.

    Raises:
        RadioactiveError: the file cannot be opened as an image.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise RadioactiveError(f"cannot read image {path}: {e}") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_folder_array(folder: ImageFolder, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load every image of ``folder`` into memory.

    Args:
        folder: listed image folder.
        size: side in px to resize to (bilinear); None keeps the size, which
            must then be the same for every image.

    Returns:
        images (N, H, W, 3) uint8 RGB, labels (N,) int64.

    Raises:
        RadioactiveError: an image cannot be read, or sizes differ and ``size`` is None.
    """
    arrays = []
    for i in range(len(folder)):
        a = load_rgb(folder.path(i))
        if size is not None and a.shape[:2] != (size, size):
            a = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
        if arrays and a.shape != arrays[0].shape:
            raise RadioactiveError(
                f"images of {folder.root} differ in size ({a.shape[:2]} vs {arrays[0].shape[:2]}); pass an image size"
            )
        arrays.append(a)
    return np.stack(arrays), np.asarray(folder.labels, dtype=np.int64)


# ----------------------------------------------------------------------------- writing


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder
    and a rename, so that ``path`` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give them the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_png(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 RGB array as PNG, with no metadata.

    Every image of a released copy goes through this function, marked or not,
    so that format, metadata and compression settings do not tell them apart.
    """
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------- built-in data


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
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
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
