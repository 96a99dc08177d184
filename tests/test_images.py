"""Image folders in the wild (issue #5): formats, modes, 16-bit, orientation, sizes, ICC
profiles, corrupt files, listing rules and safe writes.

Every file is made in the test from a real photo (CIFAR-10 from ``cifar_small``, or an
ImageNet photo from ``../shared/data/imagenet-samples-250.tar``). The policy tested
here is written in docs/images.md.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from radioactive import data
from radioactive.data import (
    ALPHA_BACKGROUND,
    atomic_write_bytes,
    default_data_dir,
    display_size,
    encode_png,
    list_image_folder,
    load_rgb,
    read_image,
)
from radioactive.errors import RadioactiveError
from radioactive.keys import Key
from radioactive.marking import MarkingConfig, mark_folder

FAST = MarkingConfig(steps=1, batch_size=4)


# ----------------------------------------------------------------------------- real photos


@pytest.fixture()
def photo(cifar_small):
    """A real 32x32 CIFAR-10 photo, (32, 32, 3) uint8."""
    path = min((cifar_small[0] / "cat").iterdir())
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture()
def photo2(cifar_small):
    """A second, different real 32x32 photo."""
    path = min((cifar_small[0] / "dog").iterdir())
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def big_photo():
    """A real ImageNet photo at its own size (not square), (H, W, 3) uint8."""
    with tarfile.open(default_data_dir() / "imagenet-samples-250.tar") as tf:
        member = sorted(m.name for m in tf.getmembers() if m.isfile() and m.name.endswith(".JPEG"))[3]
        return np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB"))


@pytest.fixture()
def wide(big_photo):
    """A 24 x 40 crop of the ImageNet photo: not square, so orientation errors show."""
    return big_photo[100:124, 100:140].copy()


# ----------------------------------------------------------------------------- file makers


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written chunk by chunk (Pillow cannot hold 16-bit RGB): (H, W) grey,
    (H, W, 2) grey+alpha, (H, W, 3) RGB or (H, W, 4) RGBA uint16 samples."""
    h, w = samples.shape[:2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if samples.ndim == 2 else samples.shape[2]]
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


_D50 = _s15(0.9642) + _s15(1.0) + _s15(0.8249)


def _icc(device_class: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A minimal ICC v2 profile: header, tag table, the given tags plus a description and a D50 white point."""
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", 5) + b"test\0" + b"\0" * 78
    tags = tags + [(b"desc", desc), (b"wtpt", b"XYZ " + b"\0" * 4 + _D50)]
    body, table, start = b"", b"", 128 + 4 + 12 * len(tags)
    for sig, payload in tags:
        payload += b"\0" * (-len(payload) % 4)
        table += sig + struct.pack(">II", start + len(body), len(payload))
        body += payload
    header = (struct.pack(">I", start + len(body)) + b"lcms" + struct.pack(">I", 0x02100000) + device_class + space
              + pcs + b"\0" * 12 + b"acsp" + b"\0" * 28 + _D50 + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def _curve(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256))


def linear_rgb_profile() -> bytes:
    """An RGB display profile with linear (gamma 1) curves: far from sRGB."""
    xyz = {b"rXYZ": (0.4361, 0.2225, 0.0139), b"gXYZ": (0.3851, 0.7169, 0.0971), b"bXYZ": (0.1431, 0.0606, 0.7141)}
    tags = [(sig, b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz[sig])) for sig in xyz]
    tags += [(sig, _curve(1.0)) for sig in (b"rTRC", b"gTRC", b"bTRC")]
    return _icc(b"mntr", b"RGB ", b"XYZ ", tags)


def linear_gray_profile() -> bytes:
    """A greyscale profile with a linear (gamma 1) curve."""
    return _icc(b"mntr", b"GRAY", b"XYZ ", [(b"kTRC", _curve(1.0))])


def cmyk_profile() -> bytes:
    """A CMYK printer profile whose colours are greys of lightness L* = 100 (1 - c)(1 - k),
    whatever magenta and yellow: a profile nobody would guess, so its use shows."""
    identity = bytes(range(256))
    clut = b"".join(bytes([round(255 * (1 - c) * (1 - k)), 128, 128])
                    for c, m, y, k in itertools.product((0, 1), repeat=4))
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft1" + b"\0" * 4 + bytes([4, 3, 2, 0]) + matrix + identity * 4 + clut + identity * 3
    return _icc(b"prtr", b"CMYK", b"Lab ", [(b"A2B0", lut)])


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB transfer function, [0, 1] -> 8-bit levels (float)."""
    v = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return 255 * v


def patch_png_size(png: bytes, w: int, h: int) -> bytes:
    """A real PNG whose header claims ``w`` x ``h`` pixels (its data stays small)."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", w, h) + png[24:29]
    return png[:8] + _chunk(b"IHDR", ihdr) + png[33:]


def patch_jpeg_size(jpeg: bytes, w: int, h: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims ``w`` x ``h`` pixels."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9:]


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("BMP", ".bmp"),
                                     ("TIFF", ".tif"), ("GIF", ".gif")])
def test_formats_read_as_rgb(tmp_path, photo, fmt, ext):
    path = tmp_path / f"img{ext.upper()}"
    Image.fromarray(photo).save(path, format=fmt)
    a = load_rgb(path)
    assert a.dtype == np.uint8 and a.shape == photo.shape
    if fmt in ("PNG", "BMP", "TIFF"):
        assert np.array_equal(a, photo)
    else:  # lossy (JPEG, WebP) or a 256-colour palette (GIF): close to the photo
        assert np.abs(a.astype(int) - photo).mean() < 8


def test_webp_lossless_exact(tmp_path, photo):
    path = _save(Image.fromarray(photo), tmp_path / "x.webp", lossless=True)
    assert np.array_equal(load_rgb(path), photo)


@pytest.mark.parametrize("fmt,ext", [("GIF", ".gif"), ("PNG", ".apng"), ("TIFF", ".tiff"), ("WEBP", ".webp")])
def test_first_frame_of_animations_and_multipage_files(tmp_path, photo, photo2, fmt, ext):
    first, second = Image.fromarray(photo), Image.fromarray(photo2)
    path = tmp_path / f"anim{ext}"
    kw = {"lossless": True} if fmt == "WEBP" else {}
    first.save(path, format=fmt, save_all=True, append_images=[second], **kw)
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 2
    a = load_rgb(path)
    if fmt == "GIF":  # quantised to a palette: nearer the first frame than the second
        assert np.abs(a.astype(int) - photo).mean() < 8 < np.abs(a.astype(int) - photo2).mean()
    else:
        assert np.array_equal(a, photo)


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_modes_read_as_rgb(tmp_path, photo, mode):
    im = Image.fromarray(photo)
    im = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png" if mode != "1" else "x.bmp")
    im.save(path)
    a = load_rgb(path)
    assert a.shape == photo.shape and a.dtype == np.uint8


def test_greyscale_replicated_exactly(tmp_path, photo):
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    a = load_rgb(_save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
    assert all(np.array_equal(a[..., c], grey) for c in range(3))


def test_bilevel_is_black_and_white(tmp_path, photo):
    im = Image.fromarray(photo).convert("1")
    a = load_rgb(_save(im, tmp_path / "b.png"))
    assert set(np.unique(a)) <= {0, 255}
    assert np.array_equal(a[..., 0] == 255, np.asarray(im))


def test_palette_exact(tmp_path, photo):
    im = Image.fromarray(photo).quantize(64)
    a = load_rgb(_save(im, tmp_path / "p.png"))
    assert np.array_equal(a, np.asarray(im.convert("RGB")))


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Independent reference: rgb over the white background, alpha in 8-bit levels."""
    bg = np.array(ALPHA_BACKGROUND, dtype=float)
    a = alpha[..., None].astype(float) / 255
    return rgb.astype(float) * a + bg * (1 - a)


def test_alpha_composited_on_white(tmp_path, photo, photo2):
    alpha = np.asarray(Image.fromarray(photo2).convert("L"))  # a real, varied alpha channel
    rgba = np.dstack([photo, alpha])
    a = load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    assert np.abs(a - _composite(photo, alpha)).max() <= 1
    transparent = np.dstack([photo, np.zeros_like(alpha)])
    assert np.all(load_rgb(_save(Image.fromarray(transparent, "RGBA"), tmp_path / "z.png")) == 255)


def test_grey_alpha_composited_on_white(tmp_path, photo, photo2):
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    alpha = np.asarray(Image.fromarray(photo2).convert("L"))
    a = load_rgb(_save(Image.fromarray(np.dstack([grey, alpha]), "LA"), tmp_path / "la.png"))
    assert np.abs(a - _composite(np.dstack([grey] * 3), alpha)).max() <= 1


def test_palette_transparency_composited(tmp_path, photo):
    im = Image.fromarray(photo).quantize(16)
    index = np.asarray(im)
    clear = int(index[0, 0])
    expected = np.asarray(im.convert("RGB")).copy()
    expected[index == clear] = ALPHA_BACKGROUND
    for ext in (".png", ".gif"):
        a = load_rgb(_save(im, tmp_path / f"pt{ext}", transparency=clear))
        assert np.array_equal(a, expected), ext
    # without transparency the same palette shows its colours
    assert np.array_equal(load_rgb(_save(im, tmp_path / "opaque.png")), np.asarray(im.convert("RGB")))


def test_palette_with_alpha_table_composited(tmp_path, photo):
    im = Image.fromarray(photo).quantize(8)
    alphas = bytes([0, 64, 128, 192, 255, 255, 255, 255])
    a = load_rgb(_save(im, tmp_path / "pa.png", transparency=alphas))
    per_pixel = np.frombuffer(alphas, np.uint8)[np.asarray(im)]
    assert np.abs(a - _composite(np.asarray(im.convert("RGB")), per_pixel)).max() <= 1


def test_rgb_colour_key_transparency(tmp_path, photo):
    key = tuple(int(v) for v in photo[5, 5])
    expected = photo.copy()
    expected[np.all(photo == key, axis=-1)] = ALPHA_BACKGROUND
    a = load_rgb(_save(Image.fromarray(photo), tmp_path / "ck.png", transparency=key))
    assert np.array_equal(a, expected) and not np.array_equal(a, photo)


def test_alpha_and_colour_kept_beside_the_composite(tmp_path, photo, photo2):
    from radioactive.data import apply_delta, encode_png

    alpha = np.asarray(Image.fromarray(photo2).convert("L"))
    image = read_image(_save(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), tmp_path / "t.png"))
    assert np.array_equal(image.alpha, alpha) and np.array_equal(image.colour, photo)
    assert read_image(_save(Image.fromarray(photo), tmp_path / "o.png")).alpha is None
    pal = Image.fromarray(photo).quantize(16)
    clear = int(np.asarray(pal)[0, 0])
    image_p = read_image(_save(pal, tmp_path / "p.png", transparency=clear))
    assert np.array_equal(image_p.alpha, np.where(np.asarray(pal) == clear, 0, 255))
    # the mark's change goes to the colour channels, clipped; the alpha is written back unchanged
    marked = np.clip(image.pixels.astype(int) + 3, 0, 255).astype(np.uint8)
    colour = apply_delta(image, marked)
    delta = marked.astype(int) - image.pixels.astype(int)
    assert np.array_equal(colour, np.clip(photo.astype(int) + delta, 0, 255))
    with Image.open(io.BytesIO(encode_png(colour, None, image.alpha))) as im:
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im)[..., 3], alpha)
        assert np.array_equal(np.asarray(im)[..., :3], colour)
    opaque = read_image(tmp_path / "o.png")
    assert apply_delta(opaque, marked) is marked


def test_cmyk_jpeg_without_profile(tmp_path, photo):
    path = _save(Image.fromarray(photo).convert("CMYK"), tmp_path / "c.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    a = load_rgb(path)
    assert np.abs(a.astype(int) - photo).mean() < 4  # Pillow's conversion inverts its own exactly, up to JPEG


@pytest.mark.parametrize("how", ["ycbcr-image", "rgb-no-transform", "ycbcr-tiff"])
def test_ycbcr_and_rgb_encodings(tmp_path, photo, how):
    im = Image.fromarray(photo)
    if how == "ycbcr-image":
        path = _save(im.convert("YCbCr"), tmp_path / "y.jpg", quality=95)
    elif how == "rgb-no-transform":  # Adobe transform 0: RGB stored without the YCbCr transform
        path = _save(im, tmp_path / "r.jpg", quality=95, keep_rgb=True)
        assert Image.open(path).info.get("adobe_transform") == 0
    else:
        path = _save(im.convert("YCbCr"), tmp_path / "y.tif")
        assert Image.open(path).mode == "YCbCr"
    a = load_rgb(path)
    assert a.shape == photo.shape and np.abs(a.astype(int) - photo).mean() < 4


def test_cielab_tiff_converted(tmp_path, big_photo):
    path = _save(Image.fromarray(big_photo).convert("LAB"), tmp_path / "lab.tif")
    assert Image.open(path).mode == "LAB"
    assert np.abs(load_rgb(path).astype(int) - big_photo).mean() < 1.5


def test_float_pixels_refused(tmp_path, photo):
    grey = np.asarray(Image.fromarray(photo).convert("L")).astype(np.float32) / 255
    path = _save(Image.fromarray(grey, "F"), tmp_path / "f.tif")
    with pytest.raises(RadioactiveError, match="floating-point"):
        load_rgb(path)


# ----------------------------------------------------------------------------- 16-bit


@pytest.fixture()
def samples16(photo, photo2):
    """16-bit samples whose high byte is the photo and low byte another photo: (32, 32, 3) uint16."""
    return photo.astype(np.uint16) << 8 | photo2.astype(np.uint16)


def test_16bit_rgb_png_keeps_high_byte(tmp_path, photo, samples16):
    path = tmp_path / "rgb16.png"
    path.write_bytes(png16(samples16))
    assert np.array_equal(load_rgb(path), photo)


def test_16bit_rgba_png(tmp_path, photo, samples16):
    opaque = np.full(samples16.shape[:2], 65535, np.uint16)
    path = tmp_path / "rgba16.png"
    path.write_bytes(png16(np.dstack([samples16, opaque])))
    assert np.array_equal(load_rgb(path), photo)


@pytest.mark.parametrize("alpha", [False, True])
def test_16bit_grey_png_keeps_high_byte(tmp_path, photo, samples16, alpha):
    grey = samples16[..., 1]
    path = tmp_path / "g16.png"
    path.write_bytes(png16(np.dstack([grey, np.full_like(grey, 65535)]) if alpha else grey))
    if not alpha:
        assert Image.open(path).mode == "I;16"
    a = load_rgb(path)
    assert all(np.array_equal(a[..., c], photo[..., 1]) for c in range(3))


def test_16bit_grey_and_rgb_agree(tmp_path, samples16):
    """The same 16-bit values give the same 8-bit pixels in grey and in RGB files."""
    grey = samples16[..., 0]
    (tmp_path / "g.png").write_bytes(png16(grey))
    (tmp_path / "c.png").write_bytes(png16(np.dstack([grey] * 3)))
    assert np.array_equal(load_rgb(tmp_path / "g.png"), load_rgb(tmp_path / "c.png"))


def test_16bit_tiff_and_extremes(tmp_path, samples16):
    grey = samples16[..., 2].copy()
    grey[0, :4] = [0, 255, 256, 65535]
    path = _save(Image.fromarray(grey), tmp_path / "g16.tif")
    assert Image.open(path).mode == "I;16"
    a = load_rgb(path)[..., 0]
    assert np.array_equal(a, (grey >> 8).astype(np.uint8))
    assert list(a[0, :4]) == [0, 0, 1, 255]


def test_32bit_integer_pixels(tmp_path, samples16):
    values = samples16[..., 0].astype(np.int32)
    ok = _save(Image.fromarray(values, "I"), tmp_path / "i32.tif")
    assert Image.open(ok).mode == "I"
    assert np.array_equal(load_rgb(ok)[..., 0], (values >> 8).astype(np.uint8))
    values[0, 0] = 70000
    bad = _save(Image.fromarray(values, "I"), tmp_path / "i32big.tif")
    with pytest.raises(RadioactiveError, match="0..65535"):
        load_rgb(bad)


# ----------------------------------------------------------------------------- orientation

_DISPLAY = {  # numpy reference of what a viewer shows for each EXIF orientation of the stored pixels
    1: lambda s: s, 2: np.fliplr, 3: lambda s: np.rot90(s, 2), 4: np.flipud,
    5: lambda s: np.swapaxes(s, 0, 1), 6: lambda s: np.rot90(s, -1),
    7: lambda s: np.rot90(np.fliplr(s), -1), 8: lambda s: np.rot90(s, 1),
}
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def _oriented(path: Path, displayed: np.ndarray, orientation: int, fmt: str = "PNG") -> Path:
    stored = np.ascontiguousarray(_DISPLAY[_INVERSE[orientation]](displayed))
    assert np.array_equal(_DISPLAY[orientation](stored), displayed)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, format=fmt, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_read_as_displayed(tmp_path, wide, orientation):
    path = _oriented(tmp_path / f"o{orientation}.png", wide, orientation)
    a = load_rgb(path)
    assert np.array_equal(a, wide)
    assert display_size(path) == (wide.shape[1], wide.shape[0])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_jpeg_output_upright_without_tag(tmp_path, wide, orientation):
    path = _oriented(tmp_path / "o.jpg", np.kron(wide, np.ones((4, 4, 1), np.uint8)), orientation, "JPEG")
    a = load_rgb(path)
    assert display_size(path) == (a.shape[1], a.shape[0]) == (160, 96)
    out = Image.open(io.BytesIO(encode_png(a)))
    assert out.size == (160, 96) and len(out.getexif()) == 0 and "exif" not in out.info
    small = np.asarray(out.resize((40, 24), Image.BOX))
    assert np.abs(small.astype(int) - wide).mean() < 6  # upright: the same picture, not a rotated one


def test_damaged_exif_read_as_stored(tmp_path, wide):
    path = tmp_path / "badexif.jpg"
    Image.fromarray(wide).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    a = load_rgb(path)
    assert a.shape == wide.shape and display_size(path) == (40, 24)


# ----------------------------------------------------------------------------- sizes and bombs


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 1), (17, 31)])
def test_small_images_exact(tmp_path, photo, h, w):
    crop = photo[:h, :w]
    for ext in (".png", ".bmp", ".tif"):
        a = load_rgb(_save(Image.fromarray(crop), tmp_path / f"s{ext}"))
        assert np.array_equal(a, crop), ext
    assert load_rgb(_save(Image.fromarray(crop), tmp_path / "s.jpg")).shape == crop.shape


def test_large_image_read_at_full_size(tmp_path, big_photo):
    big = Image.fromarray(big_photo).resize((4000, 3000), Image.BILINEAR)  # 12 megapixels
    path = _save(big, tmp_path / "big.jpg", quality=90)
    a = load_rgb(path)
    assert a.shape == (3000, 4000, 3)
    assert np.abs(a[::50, ::50].astype(int) - np.asarray(big)[::50, ::50]).mean() < 4


def test_max_pixels_refuses_before_decoding(tmp_path, big_photo, monkeypatch):
    path = _save(Image.fromarray(big_photo), tmp_path / "p.png")
    h, w = big_photo.shape[:2]
    decoded = _count_decodes(monkeypatch)
    with pytest.raises(RadioactiveError, match=f"{w}x{h} = .* over the limit of 10,000"):
        load_rgb(path, max_pixels=10_000)
    with pytest.raises(RadioactiveError, match="over the limit"):
        display_size(path, max_pixels=10_000)
    assert decoded == []
    assert load_rgb(path, max_pixels=w * h).shape == big_photo.shape


def _count_decodes(monkeypatch) -> list:
    """Record every pixel decoding (ImageFile.load) from now on."""
    calls, real = [], ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("w,h", [(10_000, 9_000), (60_000, 60_000)])
def test_image_bomb_refused_unread(tmp_path, photo, monkeypatch, fmt, w, h):
    """A real image whose header claims 90 million pixels (between Pillow's warning and error
    limits) or 3.6 billion (over Pillow's error limit): refused, with no warning escaping and
    nothing decoded."""
    assert Image.MAX_IMAGE_PIXELS < w * h
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG" if fmt == "png" else "JPEG")
    bomb = patch_png_size(buf.getvalue(), w, h) if fmt == "png" else patch_jpeg_size(buf.getvalue(), w, h)
    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(bomb)
    decoded = _count_decodes(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RadioactiveError, match="limit") as err:
            load_rgb(path)
        with pytest.raises(RadioactiveError, match="limit"):
            display_size(path)
    assert str(path) in str(err.value) and "refused unread" in str(err.value)
    assert decoded == []
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ----------------------------------------------------------------------------- corrupt files


def _jpeg_bytes(photo) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("case,reason", [
    ("truncated.jpg", "truncated"),
    ("truncated.png", "truncated"),
    ("zero.jpg", "empty file"),
    ("text.png", "not an image format"),
    ("garbage-after-header.png", "damaged header"),
])
def test_corrupt_files_raise_with_reason(tmp_path, big_photo, case, reason):
    jpeg = _jpeg_bytes(big_photo)
    buf = io.BytesIO()
    Image.fromarray(big_photo).save(buf, format="PNG")
    png = buf.getvalue()
    content = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "zero.jpg": b"",
        "text.png": b"a text file, not an image\n",
        "garbage-after-header.png": png[:33] + bytes(range(256)) * 40,
    }[case]
    path = tmp_path / case
    path.write_bytes(content)
    with pytest.raises(RadioactiveError, match=reason) as err:
        load_rgb(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(RadioactiveError, match="No such file"):
        load_rgb(tmp_path / "absent.png")


# ----------------------------------------------------------------------------- ICC profiles


def test_rgb_profile_kept_pixels_unchanged(tmp_path, photo):
    icc = linear_rgb_profile()
    assert ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip() == "RGB"
    path = _save(Image.fromarray(photo), tmp_path / "p.png", icc_profile=icc)
    img = read_image(path)
    assert np.array_equal(img.pixels, photo)  # not converted: a gamma-1 profile would change them a lot
    assert img.icc_profile == icc
    out = Image.open(io.BytesIO(encode_png(img.pixels, img.icc_profile)))
    assert out.info.get("icc_profile") == icc and np.array_equal(np.asarray(out), photo)
    jpeg = read_image(_save(Image.fromarray(photo), tmp_path / "p.jpg", icc_profile=icc))
    assert jpeg.icc_profile == icc


def test_no_profile_means_no_profile_written(tmp_path, photo):
    img = read_image(_save(Image.fromarray(photo), tmp_path / "p.png"))
    assert img.icc_profile is None
    assert "icc_profile" not in Image.open(io.BytesIO(encode_png(img.pixels))).info


def test_cmyk_profile_converted_to_srgb(tmp_path, photo):
    cmyk = Image.fromarray(photo).convert("CMYK")
    path = _save(cmyk, tmp_path / "c.jpg", quality=95, icc_profile=cmyk_profile())
    stored = np.asarray(Image.open(path)).astype(float) / 255  # decoded CMYK, JPEG loss included
    lightness = 100 * (1 - stored[..., 0]) * (1 - stored[..., 3])
    y = np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3)
    img = read_image(path)
    assert img.icc_profile is None and img.mode == "CMYK"
    assert np.abs(img.pixels - srgb_encode(y)[..., None]).max() <= 3  # the profile's greys, in sRGB
    naive = load_rgb(_save(cmyk, tmp_path / "n.jpg", quality=95))
    assert np.abs(naive.astype(int) - photo).mean() < 4  # without a profile: Pillow's conversion


def test_grey_profile_converted_to_srgb(tmp_path, photo):
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    path = _save(Image.fromarray(grey, "L"), tmp_path / "g.png", icc_profile=linear_gray_profile())
    img = read_image(path)
    assert img.icc_profile is None
    assert np.abs(img.pixels - srgb_encode(grey / 255)[..., None]).max() <= 1


@pytest.mark.parametrize("profile", ["gray-on-rgb", "damaged"])
def test_unusable_profile_ignored(tmp_path, photo, profile):
    icc = linear_gray_profile() if profile == "gray-on-rgb" else b"not an ICC profile" * 10
    img = read_image(_save(Image.fromarray(photo), tmp_path / "p.png", icc_profile=icc))
    assert np.array_equal(img.pixels, photo) and img.icc_profile is None


# ----------------------------------------------------------------------------- listing


def _write_jpeg(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def test_extensions_any_case_and_content_decides(tmp_path, photo):
    names = ["a.JPG", "b.jpeg", "c.JPEG", "d.jpe", "e.JFIF", "f.tif", "g.TIFF", "h.Png", "i.dib", "j.apng"]
    for n in names:
        ext = n.rsplit(".", 1)[1].lower()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "jfif": "JPEG", "tif": "TIFF", "tiff": "TIFF",
               "png": "PNG", "dib": "BMP", "apng": "PNG"}[ext]
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(photo).save(tmp_path / "c" / n, format=fmt)
    Image.fromarray(photo).save(tmp_path / "c" / "png-named.jpg", format="PNG")  # the extension lies
    (tmp_path / "c" / "noext").write_bytes((tmp_path / "c" / "a.JPG").read_bytes())
    folder = list_image_folder(tmp_path)
    assert sorted(folder.files) == sorted(f"c/{n}" for n in names + ["png-named.jpg"])
    assert folder.ignored == ("c/noext",) and folder.ignored_reasons == ("not an image extension",)
    for i in range(len(folder)):
        assert load_rgb(folder.path(i)).shape == photo.shape
    assert np.array_equal(load_rgb(tmp_path / "c" / "png-named.jpg"), photo)


def test_non_ascii_file_names(tmp_path, photo):
    names = ["猫 café.JPG", "cafe\u0301.png", "Ölbild (1).jpeg", "emoji 🐈.webp"]
    for n in names:
        (tmp_path / "chat").mkdir(exist_ok=True)
        Image.fromarray(photo).save(tmp_path / "chat" / n)
    raw = os.path.join(os.fsencode(tmp_path / "chat"), b"latin1-caf\xe9.png")  # not UTF-8: kept as the OS gives it
    try:
        with open(raw, "wb") as f:
            Image.fromarray(photo).save(f, format="PNG")
    except OSError:  # a file system that only takes UTF-8 names
        raw = None
    folder = list_image_folder(tmp_path)
    assert len(folder) == len(names) + (raw is not None)
    for i in range(len(folder)):
        assert load_rgb(folder.path(i)).shape == photo.shape


def test_nested_folders_belong_to_their_class(tmp_path, photo, photo2):
    _write_jpeg(tmp_path / "cat" / "top.jpg", photo)
    _write_jpeg(tmp_path / "cat" / "2019" / "summer" / "deep.jpg", photo)
    _write_jpeg(tmp_path / "dog" / "a" / "b.jpg", photo2)
    folder = list_image_folder(tmp_path)
    assert folder.classes == ("cat", "dog")
    assert dict(zip(folder.files, folder.labels)) == {"cat/2019/summer/deep.jpg": 0, "cat/top.jpg": 0, "dog/a/b.jpg": 1}


def test_hidden_non_image_and_stray_files_listed(tmp_path, photo):
    _write_jpeg(tmp_path / "cat" / "a.jpg", photo)
    _write_jpeg(tmp_path / "cat" / ".hidden.jpg", photo)
    _write_jpeg(tmp_path / "cat" / ".thumbs" / "a.jpg", photo)
    _write_jpeg(tmp_path / ".git" / "objects" / "x.jpg", photo)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / "labels.csv").write_text("a.jpg,cat\n")
    _write_jpeg(tmp_path / "stray.jpg", photo)
    os.mkfifo(tmp_path / "cat" / "pipe.jpg")  # never opened: opening a pipe would block
    folder = list_image_folder(tmp_path)
    assert folder.files == ("cat/a.jpg",)
    assert dict(zip(folder.ignored, folder.ignored_reasons)) == {
        ".git/objects/x.jpg": "hidden", "cat/.hidden.jpg": "hidden", "cat/.thumbs/a.jpg": "hidden",
        "cat/Thumbs.db": "not an image extension", "cat/notes.txt": "not an image extension",
        "cat/pipe.jpg": "not a regular file", "labels.csv": "not inside a class folder",
        "stray.jpg": "not inside a class folder",
    }


def test_symlinks_followed_once_without_loops(tmp_path, photo, photo2):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _write_jpeg(root / "cat" / "a.jpg", photo)
    _write_jpeg(root / "dog" / "b.jpg", photo2)
    _write_jpeg(outside / "x.jpg", photo)
    _write_jpeg(outside / "sub" / "y.jpg", photo2)
    (outside / "sub" / "back").symlink_to(outside, target_is_directory=True)  # a loop outside the root
    (root / "cat" / "more").symlink_to(outside, target_is_directory=True)  # followed: outside the root
    (root / "dog" / "again").symlink_to(outside, target_is_directory=True)  # already listed: not followed
    (root / "cat" / "self").symlink_to(root / "cat", target_is_directory=True)  # a loop inside the root
    (root / "cat" / "dogs").symlink_to(root / "dog", target_is_directory=True)  # another class: not followed
    (root / "cat" / "link.jpg").symlink_to(outside / "x.jpg")  # a file link: followed
    (root / "cat" / "dangling.jpg").symlink_to(outside / "gone.jpg")
    (root / "cat" / "itself.jpg").symlink_to(root / "cat" / "itself.jpg")
    folder = list_image_folder(root)
    assert dict(zip(folder.files, folder.labels)) == {
        "cat/a.jpg": 0, "cat/link.jpg": 0, "cat/more/sub/y.jpg": 0, "cat/more/x.jpg": 0, "dog/b.jpg": 1}
    reasons = dict(zip(folder.ignored, folder.ignored_reasons))
    assert set(reasons) == {"cat/more/sub/back", "cat/self", "cat/dogs", "cat/dangling.jpg", "cat/itself.jpg",
                            "dog/again"}
    assert "loop" in reasons["cat/more/sub/back"] and "already listed" in reasons["dog/again"]
    assert "inside the image folder" in reasons["cat/self"] and "inside the image folder" in reasons["cat/dogs"]
    assert reasons["cat/dangling.jpg"] == reasons["cat/itself.jpg"] == "broken symbolic link"
    assert np.array_equal(load_rgb(folder.root / "cat/link.jpg"), load_rgb(outside / "x.jpg"))


def test_class_folder_may_be_a_link(tmp_path, photo):
    _write_jpeg(tmp_path / "store" / "cats" / "a.jpg", photo)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "cat").symlink_to(tmp_path / "store" / "cats", target_is_directory=True)
    folder = list_image_folder(tmp_path / "root")
    assert folder.classes == ("cat",) and folder.files == ("cat/a.jpg",)


# ----------------------------------------------------------------------------- atomic writes


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_atomic_write_replaces_and_sets_permissions(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "out.png"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and _leftovers(target.parent) == []
    names = []
    monkeypatch.setattr(os, "replace", lambda a, b: names.append(Path(a).name) or Path(a).unlink())
    atomic_write_bytes(target, b"third")
    assert names[0].startswith(".tmp-") and names[0].endswith(".partial")  # hidden, not an image extension
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_disk_full_leaves_previous_file_and_no_temp(tmp_path, monkeypatch, photo):
    target = tmp_path / "out.png"
    atomic_write_bytes(target, b"previous, complete")
    real_fdopen = os.fdopen

    class FullDisk:
        """A file object whose writes stop after 100 bytes with ENOSPC, like a full disk."""

        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(bytes(b)[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(RadioactiveError, match="no space left") as err:
        atomic_write_bytes(target, encode_png(photo))
    assert str(target) in str(err.value) and isinstance(err.value.__cause__, OSError)
    assert target.read_bytes() == b"previous, complete" and _leftovers(tmp_path) == []
    with pytest.raises(RadioactiveError, match="no space left"):
        atomic_write_bytes(tmp_path / "new.png", encode_png(photo))
    assert not (tmp_path / "new.png").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["mkstemp", "replace"])
def test_permission_errors_simulated(tmp_path, monkeypatch, where):
    """Permission denied when the temporary file is made, or when it is renamed over the target
    (runs as root too, where a read-only folder does not stop writes)."""
    target = tmp_path / "out.json"
    atomic_write_bytes(target, b"previous")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(data.tempfile if where == "mkstemp" else os, "mkstemp" if where == "mkstemp" else "replace",
                        denied)
    with pytest.raises(RadioactiveError, match="permission denied"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"previous" and _leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    atomic_write_bytes(folder / "out.png", b"previous")
    folder.chmod(0o555)
    try:
        with pytest.raises(RadioactiveError, match="permission denied"):
            atomic_write_bytes(folder / "out.png", b"new")
        with pytest.raises(RadioactiveError, match="permission denied"):
            atomic_write_bytes(folder / "sub" / "x.png", b"new")
        assert (folder / "out.png").read_bytes() == b"previous" and _leftovers(folder) == []
    finally:
        folder.chmod(0o755)


def test_encode_png_checks_its_input(photo):
    with pytest.raises(ValueError, match="uint8"):
        encode_png(photo.astype(np.float32))
    out = Image.open(io.BytesIO(encode_png(photo)))
    assert out.format == "PNG" and out.mode == "RGB" and not (set(out.info) - {"dpi"})
    assert np.array_equal(np.asarray(out), photo)


# ----------------------------------------------------------------------------- marking a folder from the wild


def _key2(key):
    return Key(key.carriers[:2], ("cat", "dog"), key.network)


def _messy_source(root, cifar_small):
    src = root / "src"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i, f in enumerate(sorted((cifar_small[0] / c).iterdir())[:6]):
            (src / c / f"{i}.jpg").write_bytes(f.read_bytes())
    (src / "cat" / "zero.jpg").write_bytes(b"")
    (src / "cat" / "text.png").write_text("not an image")
    good = (src / "dog" / "0.jpg").read_bytes()
    (src / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "dog" / "notes.txt").write_text("ignored")
    (src / "dog" / ".hidden.jpg").write_bytes(good)
    (src / "dog" / "ÜNICODE café.JPEG").write_bytes(good)
    return src


def test_corrupt_files_skipped_and_every_file_accounted(tmp_path, cifar_small, key):
    src = _messy_source(tmp_path, cifar_small)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    s = mark_folder(src, _key2(key), tmp_path / "out", fraction=1.0, config=FAST, progress=False)
    total = len(before)
    assert s.num_marked + s.num_copied + s.num_skipped + len(s.ignored) == total
    assert s.num_skipped >= 2 and {d["file"] for d in s.skipped} >= {"cat/zero.jpg", "cat/text.png"}
    assert sorted(s.ignored) == ["dog/.hidden.jpg", "dog/notes.txt"]
    for d in s.skipped:  # copied unchanged
        assert (tmp_path / "out" / d["file"]).read_bytes() == (src / d["file"]).read_bytes()
    assert (tmp_path / "out" / "dog" / "ÜNICODE café.png").is_file()
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_strict_fails_on_corrupt(tmp_path, cifar_small, key):
    src = _messy_source(tmp_path, cifar_small)
    with pytest.raises(RadioactiveError, match="strict"):
        mark_folder(src, _key2(key), tmp_path / "out", fraction=1.0, config=FAST, progress=False, strict=True)


def test_mark_folder_of_every_kind(tmp_path, photo, photo2, wide, samples16, key):
    """The whole input matrix in one folder: the run finishes, every file is accounted for once,
    outputs are RGB PNGs (RGBA for the sources with transparency) at the displayed size, upright and without EXIF."""
    src = tmp_path / "src"
    cat, dog = src / "cat", src / "dog"
    for d in (cat / "2020" / "deep", dog):
        d.mkdir(parents=True)
    im = Image.fromarray(photo)
    im.save(cat / "a.JPG", quality=90)
    im.save(cat / "b.webp")
    im.save(cat / "c.bmp")
    im.save(cat / "d.tif")
    im.save(cat / "e.gif", save_all=True, append_images=[Image.fromarray(photo2)])
    im.convert("L").save(cat / "f.png")
    im.convert("1").save(cat / "g.png")
    im.quantize(16).save(cat / "h.png", transparency=0)
    Image.fromarray(np.dstack([photo, np.asarray(Image.fromarray(photo2).convert("L"))])).save(cat / "i.png")
    im.convert("LA").save(cat / "j.png")
    im.convert("CMYK").save(cat / "k.jpg")
    im.convert("YCbCr").save(cat / "l.jpeg")
    (cat / "m16.png").write_bytes(png16(samples16))
    (cat / "n16.png").write_bytes(png16(samples16[..., 0]))
    im.save(cat / "2020" / "deep" / "o.jpeg")
    _oriented(dog / "rotated.jpg", wide, 6, "JPEG")
    Image.fromarray(photo[:3, :5]).save(dog / "tiny.png")
    im.save(dog / "猫.TIFF")
    im.save(dog / "icc.png", icc_profile=linear_rgb_profile())
    (dog / "zero.jpg").write_bytes(b"")
    (dog / "text.png").write_text("not an image")
    (dog / "truncated.jpg").write_bytes(_jpeg_bytes(photo)[:300])
    (dog / "bomb.png").write_bytes(patch_png_size(encode_png(photo), 10_000, 9_000))
    (dog / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (dog / "readme.txt").write_text("notes")
    n_files = sum(1 for p in src.rglob("*") if p.is_file())

    out = tmp_path / "out"
    s = mark_folder(src, _key2(key), out, fraction=0.5, config=FAST, progress=False)
    assert s.num_marked + s.num_copied + s.num_skipped + len(s.ignored) == n_files == 25
    assert sorted(d["file"] for d in s.skipped) == ["dog/bomb.png", "dog/text.png", "dog/truncated.jpg", "dog/zero.jpg"]
    assert all(d["reason"] for d in s.skipped)
    assert sorted(s.ignored) == ["dog/.DS_Store", "dog/readme.txt"]
    skipped = {out / d["file"] for d in s.skipped}  # copied unchanged
    written = [p for p in out.rglob("*.png") if p.is_file() and p not in skipped]
    assert len(written) == s.num_marked + s.num_copied
    transparent = {"cat/h.png", "cat/i.png", "cat/j.png"}  # palette with tRNS, RGBA, LA
    for p in written:
        with Image.open(p) as o:
            rgba = p.relative_to(out).as_posix() in transparent
            assert o.mode == ("RGBA" if rgba else "RGB") and len(o.getexif()) == 0, p
    with Image.open(out / "dog" / "rotated.png") as o:
        assert o.size == (wide.shape[1], wide.shape[0])
    with Image.open(out / "dog" / "tiny.png") as o:
        assert o.size == (5, 3)
    assert (out / "cat" / "2020" / "deep" / "o.png").is_file()


def test_released_copy_keeps_the_rgb_icc_profile_of_marked_and_copied_images(tmp_path, photo, key):
    icc = linear_rgb_profile()
    src = tmp_path / "src"
    for c in ("cat", "dog"):
        for i in range(2):
            (src / c).mkdir(parents=True, exist_ok=True)
            _save(Image.fromarray(photo), src / c / f"{i}.png", icc_profile=icc)
    s = mark_folder(src, _key2(key), tmp_path / "out", fraction=0.5, config=FAST, progress=False)
    assert s.num_marked == 2 and s.num_copied == 2
    for p in sorted((tmp_path / "out").rglob("*.png")):
        with Image.open(p) as im:
            assert im.info.get("icc_profile") == icc, p
