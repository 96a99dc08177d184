"""Lossy output formats (issue #5): refused unless asked for, then every released image in that format, and
the share of the mark that survives measured, printed and recorded.

Real CIFAR-10 images (conftest's subset) and the default marking network.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from radioactive.data import OutputFormat, list_image_folder, load_rgb, read_image
from radioactive.errors import RadioactiveError
from radioactive.marking import MarkingConfig, carrier_shifts, mark_folder, output_name

CFG = MarkingConfig(steps=10, batch_size=32)
MAGIC = {"jpeg": b"\xff\xd8\xff", "webp": b"RIFF", "png": b"\x89PNG"}


@pytest.mark.parametrize("kwargs", [{"format": "jpeg"}, {"format": "webp"}, {"format": "gif"},
                                    {"format": "png", "quality": 0}, {"format": "jpeg", "quality": 101,
                                                                     "allow_lossy": True}])
def test_output_format_refuses_lossy_without_consent_and_bad_values(kwargs):
    with pytest.raises(RadioactiveError, match="allow_lossy|one of|1..100"):
        OutputFormat(**kwargs)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_keeps_size_and_icc_and_only_png_is_exact(photo_rgb, fmt):
    out = OutputFormat(fmt, 80, allow_lossy=True)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = out.encode(photo_rgb, icc)
    assert data.startswith(MAGIC[fmt])
    with Image.open(io.BytesIO(data)) as im:
        assert im.info.get("icc_profile") == icc
        assert "exif" not in im.info
    back = out.decode(data)
    assert back.shape == photo_rgb.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - photo_rgb.astype(int))
    if fmt == "png":
        assert err.max() == 0
    else:
        assert 0 < err.mean() < 8  # lossy, yet the same picture


@pytest.fixture(scope="module")
def photo_rgb(cifar_small):
    folder = list_image_folder(cifar_small[0])
    return load_rgb(folder.path(0))


def test_mark_cli_refuses_lossy_without_allow_lossy(cifar_small, tmp_path):
    key = tmp_path / "key.safetensors"
    subprocess.run([sys.executable, "-m", "radioactive", "keygen", "--data", str(cifar_small[0]), "--seed", "1",
                    "--output", str(key)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "radioactive", "mark", "--source", str(cifar_small[0]), "--key", str(key),
                           "--fraction", "0.1", "--output", str(tmp_path / "rel"), "--vault", str(tmp_path / "vault"),
                           "--output-format", "jpeg"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--allow-lossy" in proc.stderr and "lossy" in proc.stderr
    assert not (tmp_path / "rel").exists() and not (tmp_path / "vault").exists()
    png_quality = subprocess.run([sys.executable, "-m", "radioactive", "mark", "--source", str(cifar_small[0]), "--key",
                                  str(key), "--fraction", "0.1", "--output", str(tmp_path / "rel"), "--vault",
                                  str(tmp_path / "vault"), "--quality", "80"],
                                 capture_output=True, text=True, check=False)
    assert png_quality.returncode == 2 and "lossless" in png_quality.stderr
    assert not (tmp_path / "rel").exists()


@pytest.fixture(scope="module")
def jpeg_run(cifar_small, key, tmp_path_factory):
    out = tmp_path_factory.mktemp("lossy") / "released"
    fmt = OutputFormat("jpeg", 75, allow_lossy=True)
    summary = mark_folder(cifar_small[0], key, out, fraction=0.25, config=CFG, progress=False, output_format=fmt)
    lines = [json.loads(x) for x in (out.parent / "released.record.jsonl").read_text().splitlines()]
    return summary, out, fmt, lines[0], lines[1:]


def test_lossy_run_writes_every_image_in_that_format(jpeg_run, cifar_small):
    summary, out, fmt, header, entries = jpeg_run
    folder = list_image_folder(cifar_small[0])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(output_name(f, ".jpg") for f in folder.files)
    assert all((out / f).read_bytes().startswith(MAGIC["jpeg"]) for f in written)
    assert header["output_format"] == {"format": "jpeg", "quality": 75}
    assert summary.output_format == "jpeg q75" and summary.num_marked == len(entries) > 0
    # unmarked images go through the same encoder with the same settings: same bytes as encoding the source
    marked = {e["source"] for e in entries}
    for f in folder.files:
        if f not in marked:
            image = read_image(folder.path(folder.files.index(f)))
            assert (out / output_name(f, ".jpg")).read_bytes() == fmt.encode(image.pixels, image.icc_profile)


def test_lossy_run_measures_how_much_of_the_mark_survives(jpeg_run, cifar_small, key, marking_net):
    summary, out, _, _, entries = jpeg_run
    net = marking_net[0]
    folder = list_image_folder(cifar_small[0])
    vanilla = torch.from_numpy(np.stack([load_rgb(folder.path(folder.files.index(e["source"]))) for e in entries]))
    released = torch.from_numpy(np.stack([load_rgb(out / e["output"]) for e in entries]))
    carriers = key.carriers[[e["carrier_index"] for e in entries]]
    (shift,) = carrier_shifts(net, vanilla.permute(0, 3, 1, 2), [released.permute(0, 3, 1, 2)], carriers)
    recorded = torch.tensor([e["carrier_shift"] for e in entries])
    # the recorded shift is that of the file a reader decodes (batch arithmetic differs in the last bits)
    assert torch.allclose(shift, recorded, atol=2e-3), (shift - recorded).abs().max()
    lossless = np.array([e["carrier_shift_lossless"] for e in entries])
    assert summary.carrier_shift_lossless_mean == pytest.approx(lossless.mean(), rel=1e-4)
    assert summary.mark_survival == pytest.approx(recorded.sum().item() / lossless.sum(), rel=1e-4)
    # JPEG 75 keeps part of the mark, not all of it (these sources are JPEGs: re-encoding snaps the marked
    # pixels back towards the source's own JPEG grid, so the released image can be nearer the vanilla one)
    assert lossless.mean() > 0 and 0 < summary.mark_survival < 0.95
    assert all(e["psnr_db_released"] != e["psnr_db"] for e in entries)
    # every released image, marked or not, as decoded against its source
    assert 25 < summary.psnr_db_released_p5 <= summary.psnr_db_released_mean < 60


def test_report_of_a_lossy_release_says_so(jpeg_run, tmp_path):
    from radioactive.detection import DetectionResult
    from radioactive.report import html_report

    summary, out, _, _, _ = jpeg_run
    from radioactive.detection.result import WhiteBoxDetails

    fingerprint = json.loads(Path(summary.record).read_text().splitlines()[0])["key_fingerprint"]
    result = DetectionResult(method="white-box", validity="exact", log10_pvalue=-3.0, alpha=1e-3, classes=["a"],
                             cosines=[0.1], class_log10_pvalues=[-3.0], dim=1280, key_fingerprint=fingerprint,
                             details=WhiteBoxDetails(alignment_r2=1.0, num_alignment_images=100))
    html = html_report(result, tmp_path / "r.html", record=summary.record).read_text()
    assert "Lossy release" in html and "jpeg, quality 75" in html
    assert f"{100 * summary.mark_survival:.1f} %" in html


def test_png_run_records_no_survival_fields(cifar_small, key, tmp_path):
    summary = mark_folder(cifar_small[0], key, tmp_path / "rel", fraction=0.1, config=MarkingConfig(steps=1),
                          progress=False)
    lines = (tmp_path / "rel.record.jsonl").read_text().splitlines()
    assert "output_format" not in json.loads(lines[0])
    entries = [json.loads(x) for x in lines[1:]]
    # the shift as re-read from disk is recorded for every format; the lossless one only for lossy formats
    assert all("carrier_shift" in e and "carrier_shift_lossless" not in e for e in entries)
    assert summary.mark_survival is None and summary.output_format == "png"
    # a later run in another format may --overwrite this one: the old png files are ours, and removed
    mark_folder(cifar_small[0], key, tmp_path / "rel", fraction=0.1, config=MarkingConfig(steps=1), progress=False,
                overwrite=True, output_format=OutputFormat("webp", 90, allow_lossy=True))
    suffixes = {p.suffix for p in (tmp_path / "rel").rglob("*") if p.is_file()}
    assert suffixes == {".webp"}
