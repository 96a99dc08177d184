"""Reading images as displayed (8-bit RGB, by the policy of docs/images.md) and batching them for a network.

Every image a command reads goes through :func:`read_image` (or :func:`load_rgb`, its pixels);
:func:`to_batch` turns stacked pixels into the float batch a network takes.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageCms, UnidentifiedImageError

from ..errors import RadioactiveError
from .folders import ImageFolder

log = logging.getLogger(__name__)

MAX_PIXELS = 89_478_485
"""Largest image read, in pixels (Pillow's default ``Image.MAX_IMAGE_PIXELS``, about 9459 x 9459):
0.27 GB as 8-bit RGB. Larger images are refused from their header, before any pixel is decoded."""
ALPHA_BACKGROUND = (255, 255, 255)
"""8-bit RGB colour that transparent pixels are composited on (white)."""


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


def to_batch(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """Stack 8-bit RGB images into the float batch a network takes.

    Args:
        images: (B, H, W, 3) uint8 RGB array, or a sequence of B (H, W, 3) uint8 arrays of one size.

    Returns:
        (B, 3, H, W) float32 RGB in [0, 1] (levels / 255), not normalised, on the CPU.

    Shape:
        (B, H, W, 3) uint8 -> (B, 3, H, W) float32.
    """
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
