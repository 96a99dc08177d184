"""Image folders, the built-in CIFAR-10 data, image I/O and atomic writes.

Layout convention (torchvision ``ImageFolder``): ``root/<class>/.../<image>``;
the class index of a folder is its position among the sorted class folder
names. Every image a command reads goes through :func:`read_image` (or
:func:`load_rgb`, its pixels): 8-bit RGB as displayed, by the policy written
in docs/images.md; every file a command writes goes through
:func:`atomic_write_bytes`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from .errors import RadioactiveError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif")
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
DATA_ENV = "RADIOACTIVE_DATA"
MAX_PIXELS = 89_478_485
"""Largest image read, in pixels (Pillow's default ``Image.MAX_IMAGE_PIXELS``, about 9459 x 9459):
0.27 GB as 8-bit RGB. Larger images are refused from their header, before any pixel is decoded."""
ALPHA_BACKGROUND = (255, 255, 255)
"""8-bit RGB colour that transparent pixels are composited on (white)."""


@dataclass(frozen=True)
class ImageFolder:
    """A listed image folder.

    Attributes:
        root: the folder holding one sub-folder per class.
        classes: class names in index order (sorted folder names).
        files: (N,) paths relative to ``root``, sorted, as POSIX strings.
        labels: (N,) class index of each file.
        ignored: relative paths of entries that are not read (hidden files,
            other extensions, files outside the class folders, links not
            followed), sorted; listed, never read.
        ignored_reasons: why each entry of ``ignored`` is ignored, in the same order.
    """

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    ignored: tuple[str, ...] = ()
    ignored_reasons: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]


class _Lister:
    """Walks the class folders of one listing; see :func:`list_image_folder` for the rules."""

    def __init__(self, root: Path):
        self.root, self.root_real = root, root.resolve()
        self.files: list[str] = []
        self.labels: list[int] = []
        self.ignored: list[tuple[str, str]] = []
        self.walked: set[Path] = set()

    def rel(self, p: str | Path) -> str:
        return Path(p).relative_to(self.root).as_posix()

    def ignore_tree(self, path: Path, reason: str) -> None:
        """List ``path`` (a file, a link, or every file and link under a folder) as ignored; links are not followed."""
        if path.is_symlink() or not path.is_dir():
            self.ignored.append((self.rel(path), reason))
            return
        for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: self.ignored.append(
                (self.rel(e.filename), f"{reason}; cannot list this folder ({e.strerror})"))):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in filenames + links:
                self.ignored.append((self.rel(os.path.join(dirpath, name)), reason))

    def walk(self, folder: Path, label: int) -> None:
        """List the images under ``folder`` (at any depth) as class ``label``."""
        self.walked.add(folder.resolve())
        prefix = self.rel(folder) + "/"
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.ignored.append((prefix, f"cannot list this folder ({e.strerror})"))
            return
        for e in entries:
            rel = prefix + e.name
            if e.name.startswith("."):
                self.ignore_tree(Path(e.path), "hidden")
                continue
            link = e.is_symlink()
            if link:
                try:
                    mode = os.stat(e.path).st_mode  # the target's
                except (OSError, RuntimeError):  # RuntimeError: a link loop before Python 3.13
                    self.ignored.append((rel, "broken symbolic link"))
                    continue
                is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
            else:  # from the folder listing, no system call
                is_dir, is_file = e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)
            if is_dir:
                real = Path(e.path).resolve()
                if link and real.is_relative_to(self.root_real):
                    why = "link to a folder inside the image folder, not followed (its files are listed where they are)"
                    self.ignored.append((rel, why))
                elif real in self.walked:
                    self.ignored.append((rel, "link to a folder already listed (a loop), not followed"))
                else:
                    self.walk(Path(e.path), label)
            elif not is_file:
                self.ignored.append((rel, "not a regular file"))
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                self.ignored.append((rel, "not an image extension"))
            else:
                self.files.append(rel)
                self.labels.append(label)


def list_image_folder(root: str | os.PathLike, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """List an ImageFolder-style directory, accounting for every entry.

    Rules (docs/images.md):

    - classes are the non-hidden sub-folders of ``root`` (links to folders
      count), sorted by name;
    - every file under a class folder, at any depth, belongs to that class;
    - an image is a regular file (links to files are followed) whose name is
      not hidden and ends with one of :data:`IMAGE_EXTENSIONS`, in any case;
      its content, not its extension, decides how it is decoded;
    - a link to a folder outside ``root`` is followed, each real folder once
      (no loops); a link to a folder inside ``root`` is not followed, since
      that folder's files are listed where they are;
    - everything else is listed in ``ignored`` with a reason and never read:
      hidden files and every file of hidden folders, other extensions, files
      directly in ``root``, broken links, links not followed, special files.

    Args:
        root: folder with one sub-folder per class.
        classes: expected class names in order; when given, the folder's class
            names must match them exactly.

    Raises:
        RadioactiveError: the folder does not exist, has no class folders, a
            class folder holds no image, or its classes differ from ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise RadioactiveError(f"image folder not found: {root} (expected a folder with one sub-folder per class)")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    found = [p.name for p in entries if not p.name.startswith(".") and p.is_dir()]
    if not found:
        raise RadioactiveError(f"{root} has no class sub-folders (expected the ImageFolder layout root/<class>/<image>)")
    if classes is not None and tuple(found) != tuple(classes):
        raise RadioactiveError(
            f"classes of {root} differ from the expected ones: found {found[:5]}..., expected {list(classes)[:5]}..."
        )
    lister = _Lister(root)
    for p in entries:
        if p.name not in found:
            lister.ignore_tree(p, "hidden" if p.name.startswith(".") else "not inside a class folder")
    for k, name in enumerate(found):
        n_before = len(lister.files)
        lister.walk(root / name, k)
        if len(lister.files) == n_before:
            raise RadioactiveError(f"class folder {root / name} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    order = sorted(range(len(lister.files)), key=lister.files.__getitem__)
    ignored = sorted(lister.ignored)
    return ImageFolder(
        root=root,
        classes=tuple(found),
        files=tuple(lister.files[i] for i in order),
        labels=tuple(lister.labels[i] for i in order),
        ignored=tuple(r for r, _ in ignored),
        ignored_reasons=tuple(why for _, why in ignored),
    )


# ----------------------------------------------------------------------------- reading images

_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class DecodedImage:
    """An image read by :func:`read_image`.

    Attributes:
        pixels: (H, W, 3) uint8 RGB as displayed (EXIF orientation applied).
        icc_profile: the file's ICC profile when it describes RGB and the
            pixels are in its colour space (kept, to embed in the output);
            None when the pixels are sRGB (untagged, or converted to sRGB).
        mode: the Pillow mode of the file (``"RGB"``, ``"CMYK"``, ``"I;16"``...).
        alpha: (H, W) uint8 alpha channel (255 opaque) of an image with transparency (an alpha channel,
            or palette or colour-key transparency); None for an opaque image.
        colour: (H, W, 3) uint8 RGB colour channels before compositing (straight, not premultiplied) when
            ``alpha`` is given, else None. ``pixels`` is ``colour`` composited on :data:`ALPHA_BACKGROUND`;
            a released copy keeps ``alpha`` and writes the marked ``colour`` (:func:`apply_delta`).
    """

    pixels: np.ndarray
    icc_profile: bytes | None
    mode: str
    alpha: np.ndarray | None = None
    colour: np.ndarray | None = None


def _open(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """Open an image and check its size from the header; nothing is decoded yet."""
    try:
        if os.stat(path).st_size == 0:
            raise RadioactiveError(f"cannot read image {path}: empty file (0 bytes)")
        with warnings.catch_warnings():  # our own size limit below replaces Pillow's DecompressionBombWarning;
            warnings.simplefilter("ignore")  # its other warnings are about damaged metadata, handled here
            im = Image.open(path)
    except RadioactiveError:
        raise
    except Image.DecompressionBombError as e:
        raise RadioactiveError(f"cannot read image {path}: over Pillow's size limit, refused unread ({e})") from e
    except UnidentifiedImageError as e:
        raise RadioactiveError(f"cannot read image {path}: not an image format Pillow reads (unknown or damaged header)") from e
    except OSError as e:
        raise RadioactiveError(f"cannot read image {path}: {e.strerror or e}") from e
    except Exception as e:  # a damaged header can raise anything from a decoder plugin
        raise RadioactiveError(f"cannot read image {path}: damaged header ({type(e).__name__}: {e})") from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise RadioactiveError(
            f"cannot read image {path}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
            "(a decompression bomb, or an image too large to hold in memory); refused unread"
        )
    return im


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1-8) of an open image; 1 when absent, unknown or unreadable."""
    try:
        with warnings.catch_warnings():  # "Corrupt EXIF data": handled here
            warnings.simplefilter("ignore")
            o = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 -- damaged EXIF of an untrusted file: shown as stored
        return 1
    return o if o in _TRANSPOSE else 1


@functools.cache
def _srgb():
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _profile_space(icc: bytes | None) -> tuple[str | None, object | None]:
    """(colour space, parsed profile) of ICC bytes; (None, None) when absent or unreadable."""
    if not icc:
        return None, None
    try:
        p = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return p.profile.xcolor_space.strip(), p
    except Exception:  # noqa: BLE001 -- a damaged profile of an untrusted file is ignored, as if absent
        log.debug("unreadable ICC profile ignored")
        return None, None


def _to_srgb(im: Image.Image, profile) -> Image.Image | None:
    """``im`` (L, CMYK or LAB) converted from ``profile`` to sRGB by LittleCMS, perceptual intent; None if it fails."""
    try:
        # NOOPTIMIZE: LittleCMS's 8-bit precalculation is off by up to 10 levels in the shadows of a
        # gamma-1 profile; unoptimised it is exact to rounding (about 5x slower, for these files only)
        return ImageCms.profileToProfile(im, profile, _srgb(), renderingIntent=ImageCms.Intent.PERCEPTUAL,
                                         outputMode="RGB", flags=ImageCms.Flags.NOOPTIMIZE)
    except (ImageCms.PyCMSError, ValueError, OSError):
        log.debug("ICC profile cannot be applied to a %s image; ignored", im.mode)
        return None


def _composite(im: Image.Image) -> Image.Image:
    """RGBA image composited on :data:`ALPHA_BACKGROUND`, as RGB."""
    im = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", im.size, ALPHA_BACKGROUND + (255,)), im).convert("RGB")


def _split_alpha(im: Image.Image, grey_profile) -> tuple[Image.Image, Image.Image]:
    """(RGB colour channels before compositing, L alpha) of an image with transparency, converted like its pixels.

    Grey colour goes through the grey ICC profile as the composited pixels do; ``im`` is 8-bit here.
    """
    rgba = im.convert("RGBA")  # as _composite reads it
    colour, alpha = rgba.convert("RGB"), rgba.getchannel("A")
    if grey_profile is not None:
        converted = _to_srgb(colour.convert("L"), grey_profile)
        colour = colour if converted is None else converted
    return colour, alpha


def _to_rgb(im: Image.Image) -> tuple[Image.Image, bytes | None]:
    """Convert a decoded image to 8-bit RGB by the policy of docs/images.md; returns (image, kept RGB profile)."""
    rgb, icc, _ = _to_rgb_alpha(im)
    return rgb, icc


def _to_rgb_alpha(im: Image.Image) -> tuple[Image.Image, bytes | None, tuple[Image.Image, Image.Image] | None]:
    """:func:`_to_rgb`, and (colour, alpha) before compositing for an image with transparency (else None)."""
    icc = im.info.get("icc_profile") or None
    space, profile = _profile_space(icc)
    mode = im.mode
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if mode == "F":
        raise ValueError("floating-point pixels (mode F) have no defined 8-bit range")
    if mode.startswith("I"):  # 16-bit (or 32-bit integer) greyscale: keep the high byte, as Pillow does for 16-bit RGB
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{mode} pixels outside 0..65535 have no defined 8-bit range")
        im = Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L")
    if mode in _GREY_MODES:
        grey_profile = profile if space == "GRAY" else None
        split = _split_alpha(im, grey_profile) if has_alpha else None
        im = _composite(im).convert("L") if has_alpha else im.convert("L")
        converted = _to_srgb(im, profile) if space == "GRAY" else None
        return (im.convert("RGB") if converted is None else converted), None, split
    if mode == "CMYK":
        converted = _to_srgb(im, profile) if space == "CMYK" else None
        return (im.convert("RGB") if converted is None else converted), None, None
    if mode == "LAB":  # CIELAB (TIFF): defined colours, converted like a profile
        converted = _to_srgb(im, ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")))
        if converted is None:
            raise ValueError("CIELAB pixels cannot be converted to sRGB")
        return converted, None, None
    kept = icc if space == "RGB" else None
    if has_alpha:
        return _composite(im), kept, _split_alpha(im, None)
    return im.convert("RGB"), kept, None


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Read an image as it is displayed, as 8-bit RGB, by the policy of docs/images.md.

    The first frame of animated or multi-page files is read. EXIF
    orientation is applied. Alpha (and palette or colour-key transparency)
    is composited on :data:`ALPHA_BACKGROUND`; the alpha channel and the colour
    channels before compositing are returned too (``alpha``, ``colour``). 16-bit samples keep their high
    byte (v >> 8). A CMYK or greyscale ICC profile is applied (to sRGB, with
    LittleCMS, perceptual intent); an RGB profile is kept, pixels unchanged.

    Args:
        path: image file.
        max_pixels: images with more pixels (width x height) are refused from
            their header, before decoding; this bounds memory. Above twice
            Pillow's ``Image.MAX_IMAGE_PIXELS`` Pillow refuses them too.

    Returns:
        the (H, W, 3) uint8 RGB pixels and the ICC profile to embed with them
        (and, for an image with transparency, its alpha and colour channels).

    Raises:
        RadioactiveError: empty file, unknown format, damaged or truncated
            data, too many pixels, or pixels with no 8-bit meaning (mode F);
            the message gives the reason.
    """
    with _open(path, max_pixels) as im:
        orientation = _orientation(im)
        mode = im.mode
        try:
            rgb, icc, split = _to_rgb_alpha(im)
        except Exception as e:  # decoders raise OSError, ValueError, SyntaxError, struct.error...
            reason = str(e) or type(e).__name__
            raise RadioactiveError(f"cannot read image {path}: damaged or truncated image data ({reason})") from e
    if orientation != 1:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
        split = None if split is None else tuple(x.transpose(_TRANSPOSE[orientation]) for x in split)
    if split is None:
        return DecodedImage(np.asarray(rgb, dtype=np.uint8).copy(), icc, mode)
    return DecodedImage(np.asarray(rgb, dtype=np.uint8).copy(), icc, mode, alpha=np.asarray(split[1], np.uint8).copy(),
                        colour=np.asarray(split[0], np.uint8).copy())


def load_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Pixels of :func:`read_image`: (H, W, 3) uint8 RGB as displayed.

    Raises:
        RadioactiveError: as :func:`read_image`.
    """
    return read_image(path, max_pixels).pixels


def display_size(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image as displayed (after EXIF orientation), from its header.

    The same size as :func:`load_rgb`'s output (for PNG, reading the EXIF
    may decode the image).

    Raises:
        RadioactiveError: as :func:`read_image` for a bad header or too many pixels.
    """
    with _open(path, max_pixels) as im:
        w, h = im.size
        orientation = _orientation(im)
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


def _check_rgb8(image: np.ndarray, alpha: np.ndarray | None = None) -> None:
    """Raises ValueError unless ``image`` is (H, W, 3) uint8 and ``alpha`` None or (H, W) uint8."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
    if alpha is not None and (alpha.shape != image.shape[:2] or alpha.dtype != np.uint8):
        raise ValueError(f"expected an {image.shape[:2]} uint8 alpha channel, got {alpha.shape} {alpha.dtype}")


def _pil(image: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    return Image.fromarray(image, "RGB") if alpha is None else Image.fromarray(np.dstack([image, alpha]), "RGBA")


def apply_delta(image: DecodedImage, marked: np.ndarray) -> np.ndarray:
    """The colour channels to write for the marked version of ``image``: its displayed pixels when it is
    opaque, else its colour channels before compositing plus the mark's change, ``clip(colour + (marked -
    pixels), 0, 255)``, to be written with the unchanged alpha. Where alpha is 255 the written image shows
    exactly ``marked``; where it is lower the change shows scaled by alpha/255 (docs/images.md).

    Args:
        image: the vanilla image as read.
        marked: (H, W, 3) uint8, the marked version of ``image.pixels``.

    Returns:
        (H, W, 3) uint8.
    """
    if image.alpha is None:
        return marked
    delta = marked.astype(np.int16) - image.pixels.astype(np.int16)
    return np.clip(image.colour.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray, icc_profile: bytes | None = None, alpha: np.ndarray | None = None) -> bytes:
    """Encode an image as PNG with no metadata but its ICC profile.

    Every image of a released copy goes through this function, marked or not,
    so that format, metadata and compression settings do not tell them apart.

    Args:
        image: (H, W, 3) uint8 RGB (the colour channels, straight, when ``alpha`` is given).
        icc_profile: RGB ICC profile of the pixels (``DecodedImage.icc_profile``),
            embedded as the iCCP chunk; None writes none (sRGB implied).
        alpha: (H, W) uint8 alpha channel: written as an RGBA PNG; None: RGB.

    Raises:
        ValueError: ``image`` is not (H, W, 3) uint8, or ``alpha`` not (H, W) uint8.
    """
    _check_rgb8(image, alpha)
    buf = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    _pil(image, alpha).save(buf, format="PNG", compress_level=6, **extra)
    return buf.getvalue()


OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
"""Formats of a released copy and their file suffix; ``png`` is the only lossless one and the default."""


@dataclass(frozen=True)
class OutputFormat:
    """How every image of a released copy is encoded, marked or not (same settings, no metadata but ICC).

    ``png`` (default) is lossless: the released pixels are the marked pixels. ``jpeg`` and ``webp`` are
    lossy: compression removes part of the perturbation that carries the mark (docs/images.md, "Lossy
    output"; JPEG 75 on the released PNGs cut the linear-setting log10 p from -10.3 to -1.7,
    docs/results.md), so they are refused unless ``allow_lossy`` is set, and ``mark_folder`` then measures
    how much of the mark survives.

    Attributes:
        format: ``png``, ``jpeg`` (baseline, no chroma subsampling: 4:4:4) or ``webp`` (lossy, 4:2:0 as
            the format requires). JPEG keeps full-resolution chroma because the libjpeg default (4:2:0)
            cost 2.8 dB of PSNR at quality 95 on 128 px photos and cut the mark's survival at quality 90
            on CIFAR-10 from 68 % to 54 % (docs/images.md, "Lossy output").
        quality: encoder quality of the lossy formats, 1..100 (Pillow's scale); ignored for ``png``.
        allow_lossy: the caller's explicit consent to a lossy format.

    Raises:
        RadioactiveError: unknown format, quality outside 1..100, lossy format without ``allow_lossy``.
    """

    format: str = "png"
    quality: int = 90
    allow_lossy: bool = False

    def __post_init__(self):
        if self.format not in OUTPUT_FORMATS:
            raise RadioactiveError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.format!r}")
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise RadioactiveError(f"output quality must be an integer in 1..100, got {self.quality!r}")
        if self.lossy and not self.allow_lossy:
            raise RadioactiveError(
                f"{self.format} output is lossy and weakens the mark (JPEG 75 took the linear-setting log10 p from "
                "-10.3 to -1.7); ask for it explicitly (--allow-lossy, OutputFormat(allow_lossy=True)) or keep png")

    @property
    def lossy(self) -> bool:
        return self.format != "png"

    @property
    def suffix(self) -> str:
        return OUTPUT_FORMATS[self.format]

    def describe(self) -> str:
        """``png`` or e.g. ``jpeg q90``."""
        return f"{self.format} q{self.quality}" if self.lossy else self.format

    def to_dict(self) -> dict:
        return {"format": self.format, "quality": self.quality} if self.lossy else {"format": self.format}

    @property
    def keeps_alpha(self) -> bool:
        """Whether the format stores an alpha channel (png, webp; jpeg has none)."""
        return self.format != "jpeg"

    def encode(self, image: np.ndarray, icc_profile: bytes | None = None, alpha: np.ndarray | None = None) -> bytes:
        """Encode (H, W, 3) uint8 RGB with no metadata but its ICC profile (see :func:`encode_png`), with its
        (H, W) uint8 ``alpha`` channel when given (png; webp with lossless alpha, ``alpha_quality`` 100).

        Raises:
            ValueError: ``image`` is not (H, W, 3) uint8, a bad ``alpha``, or an ``alpha`` for jpeg.
        """
        if self.format == "png":
            return encode_png(image, icc_profile, alpha)
        _check_rgb8(image, alpha)
        buf = io.BytesIO()
        extra = {"icc_profile": icc_profile} if icc_profile else {}
        if self.format == "jpeg":
            if alpha is not None:
                raise ValueError("jpeg has no alpha channel")
            Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=self.quality, subsampling=0, **extra)
        else:
            _pil(image, alpha).save(buf, format="WEBP", quality=self.quality, method=4, alpha_quality=100, **extra)
        return buf.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        """The (H, W, 3) uint8 RGB pixels a reader gets from :meth:`encode`'s bytes (ICC profile not applied)."""
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))


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
