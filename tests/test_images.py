"""Image folders in the wild: formats, modes, corrupt files, accounting."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from radioactive.data import load_rgb
from radioactive.errors import RadioactiveError
from radioactive.marking import MarkingConfig, mark_folder

FAST = MarkingConfig(steps=1, batch_size=4)


@pytest.fixture()
def photo(cifar_small):
    path = next((cifar_small[0] / "cat").iterdir())
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("BMP", ".bmp"),
                                     ("TIFF", ".tif"), ("GIF", ".gif")])
def test_formats_read_as_rgb(tmp_path, photo, fmt, ext):
    path = tmp_path / f"img{ext.upper()}"
    Image.fromarray(photo).save(path, format=fmt)
    a = load_rgb(path)
    assert a.dtype == np.uint8 and a.shape == photo.shape
    if fmt in ("PNG", "BMP", "TIFF"):
        assert np.array_equal(a, photo)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_modes_read_as_rgb(tmp_path, photo, mode):
    im = Image.fromarray(photo)
    im = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png" if mode != "1" else "x.bmp")
    im.save(path)
    a = load_rgb(path)
    assert a.shape == photo.shape and a.dtype == np.uint8
    if mode == "L":
        assert np.all(a[..., 0] == a[..., 1])


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert np.all(load_rgb(tmp_path / "t.png") == 255)


def test_exif_orientation_applied(tmp_path, photo):
    wide = np.concatenate([photo, photo], axis=1)  # 32 x 64
    im = Image.fromarray(wide)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "r.jpg").shape[:2] == (64, 32)


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
    from radioactive.keys import Key

    k2 = Key(key.carriers[:2], ("cat", "dog"), key.network)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    s = mark_folder(src, k2, tmp_path / "out", fraction=1.0, config=FAST, progress=False)
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
    from radioactive.keys import Key

    k2 = Key(key.carriers[:2], ("cat", "dog"), key.network)
    with pytest.raises(RadioactiveError, match="strict"):
        mark_folder(src, k2, tmp_path / "out", fraction=1.0, config=FAST, progress=False, strict=True)
