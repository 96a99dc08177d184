"""Encoding the images of a released copy: PNG (lossless, default), JPEG and WebP, no metadata but ICC.

Every image of a released copy, marked or not, goes through :class:`OutputFormat` (:func:`encode_png` for
png), so that format, metadata and compression settings do not tell them apart.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import RadioactiveError
from .images import DecodedImage


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


