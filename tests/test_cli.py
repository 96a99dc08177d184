"""End-to-end tests of the real command line on a small slice of the real CIFAR-10 images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radioactive.data import cifar10_subset
from radioactive.keys import Key
from radioactive.networks import MarkingNetworkSpec


def run_cli(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "radioactive", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def slice_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar-cli")
    return cifar10_subset(root / "vanilla", train_per_class=10, test_per_class=8)


@pytest.mark.slow
def test_keygen_mark_train_detect(slice_dirs, tmp_path):
    train_dir, test_dir = slice_dirs
    before = snapshot(train_dir)
    key = tmp_path / "key.safetensors"
    out = json.loads(run_cli("keygen", "--data", train_dir, "--seed", 3, "--output", key, check_rc=0).stdout)
    assert out["classes"] == 10 and out["dim"] == 1280
    released = tmp_path / "released" / "train"
    vault = tmp_path / "vault"
    out = json.loads(run_cli("mark", "--source", train_dir, "--key", key, "--fraction", 0.2, "--steps", 5,
                             "--batch-size", 8, "--output", released, "--vault", vault, check_rc=0).stdout)
    assert out["num_marked"] == 20 and out["num_copied"] == 80
    assert out["linf_max"] <= 10 and out["psnr_db_mean"] > 38
    assert snapshot(train_dir) == before, "the source folder was modified"
    assert len(list(released.rglob("*.png"))) == 100
    record = Path(out["record"])
    assert not record.resolve().is_relative_to(released.resolve()) and record.resolve().is_relative_to(vault.resolve())
    assert len(record.read_text().splitlines()) == 21

    suspect = tmp_path / "suspect.safetensors"
    out = json.loads(run_cli("train", "--recipe", "linear", "--train", released, "--test", test_dir, "--epochs", 2,
                             "--views", 1, "--output", suspect, check_rc=0).stdout)
    assert 0.1 < out["test_accuracy"] <= 1.0
    assert suspect.with_suffix(".json").is_file()

    result, plot = tmp_path / "result.json", tmp_path / "cosines.png"
    # 80 alignment images for D = 1280 features: under-determined, refused without a ridge
    line = _one_line_error(run_cli("detect", "--method", "white-box", "--suspect", suspect, "--key", key,
                                   "--images", test_dir), 1)
    assert "under-determined" in line and "--ridge" in line
    proc = run_cli("detect", "--method", "white-box", "--suspect", suspect, "--key", key, "--images", test_dir,
                   "--ridge", 0.1, "--output", result, "--plot", plot, check_rc=0)
    out = json.loads(proc.stdout)
    assert out == json.loads(result.read_text())
    assert len(out["cosines"]) == 10 and len(out["class_log10_pvalues"]) == 10
    assert np.isfinite(out["log10_pvalue"]) and out["log10_pvalue"] <= 0
    assert out["details"]["alignment_r2"] > 0.99  # a linear probe shares the marking network's features
    assert out["details"]["alignment_r2_heldout"] < out["details"]["alignment_r2"]  # N < D: the honest figure
    assert out["key_fingerprint"] == Key.load(key).fingerprint
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 100


def _one_line_error(proc, rc):
    assert proc.returncode == rc, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_folder_is_a_usage_error(tmp_path):
    line = _one_line_error(run_cli("keygen", "--data", tmp_path / "nope", "--output", tmp_path / "k"), 2)
    assert "no such file" in line


def test_bad_fraction_is_a_usage_error(tmp_path):
    line = _one_line_error(run_cli("mark", "--source", tmp_path, "--key", tmp_path, "--fraction", "1.5",
                                   "--output", tmp_path / "o", "--vault", tmp_path / "v"), 2)
    assert "(0, 1]" in line


def test_empty_class_folder(tmp_path, slice_dirs):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    Image.open(next((slice_dirs[0] / "cat").iterdir())).save(src / "cat" / "a.png")
    line = _one_line_error(run_cli("keygen", "--data", src, "--output", tmp_path / "k.safetensors"), 1)
    assert "holds no image" in line and "dog" in line


def test_key_dimension_mismatch(tmp_path, slice_dirs):
    train_dir, test_dir = slice_dirs
    classes = sorted(p.name for p in train_dir.iterdir())
    g = torch.randn(len(classes), 512)
    key = Key(g / g.norm(dim=1, keepdim=True), tuple(classes), MarkingNetworkSpec())
    path = key.save(tmp_path / "k512.safetensors")
    before = snapshot(train_dir)
    line = _one_line_error(run_cli("mark", "--source", train_dir, "--key", path, "--fraction", 0.1,
                                   "--output", tmp_path / "out", "--vault", tmp_path / "vault"), 1)
    assert "512" in line and "1280" in line
    assert snapshot(train_dir) == before


def test_not_a_key(tmp_path, slice_dirs):
    bad = tmp_path / "key.safetensors"
    bad.write_text("not a key")
    line = _one_line_error(run_cli("detect", "--method", "white-box", "--suspect", bad, "--key", bad, "--images",
                                   slice_dirs[1]), 1)
    assert "not a radioactive key" in line


def test_help_shows_defaults_and_example():
    proc = run_cli("mark", "--help", check_rc=0)
    assert "example:" in proc.stdout and "(default: the preset's)" in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "lambda_img 0.7" in text and "(default: linear)" in text


def test_html_report_is_self_contained(tmp_path, slice_dirs):
    """Every image the report references is embedded as a data URI and decodes."""
    import base64
    import io
    from html.parser import HTMLParser

    from radioactive.detection import DetectionResult
    from radioactive.detection.result import DecoyKeys, WhiteBoxDetails

    # a real record with real marked images
    train_dir = slice_dirs[0]
    key = tmp_path / "k.safetensors"
    run_cli("keygen", "--data", train_dir, "--seed", 5, "--output", key, check_rc=0)
    out = json.loads(run_cli("mark", "--source", train_dir, "--key", key, "--fraction", 0.1, "--steps", 2,
                             "--output", tmp_path / "rel" / "train", "--vault", tmp_path / "vault", check_rc=0).stdout)
    decoys = DecoyKeys(50, "test stream", -1.7, list(np.log10(np.random.default_rng(0).random(50))))
    result = DetectionResult(method="white-box", validity="exact", log10_pvalue=-12.5, alpha=1e-3,
                             classes=["a", "b", "c"], cosines=[0.1, 0.05, -0.02], class_log10_pvalues=[-5, -2, -0.1],
                             dim=1280, key_fingerprint=Key.load(key).fingerprint,  # report refuses another key's record
                             details=WhiteBoxDetails(0.9, 0.8, 100, 0.0, "", decoys))
    assert result.detected
    saved = result.save(tmp_path / "r.json")
    html = tmp_path / "report.html"
    run_cli("report", "--result", saved, "--record", out["record"], "--output", html, check_rc=0)

    class Images(HTMLParser):
        srcs: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(html.read_text())
    assert len(parser.srcs) >= 2 + 3  # cosines (with decoys), PSNR histogram, one triplet at least
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert im.size[0] > 0
    assert "DETECTED" in html.read_text() and "http" not in html.read_text().replace("http-equiv", "")


def test_released_files_are_readable_by_others_and_key_is_private(tmp_path, slice_dirs):
    import stat

    key = tmp_path / "k.safetensors"
    run_cli("keygen", "--data", slice_dirs[0], "--seed", 2, "--output", key, check_rc=0)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    out = tmp_path / "rel" / "train"
    run_cli("mark", "--source", slice_dirs[0], "--key", key, "--fraction", 0.1, "--steps", 1, "--output", out,
            "--vault", tmp_path / "vault", check_rc=0)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*.png")}
    assert all(m & 0o044 == 0o044 for m in modes), modes  # group and others can read the released copy


def test_output_inside_source_is_named_first(tmp_path, slice_dirs):
    key = tmp_path / "k.safetensors"
    run_cli("keygen", "--data", slice_dirs[0], "--seed", 2, "--output", key, check_rc=0)
    line = _one_line_error(run_cli("mark", "--source", slice_dirs[0], "--key", key, "--fraction", 0.1,
                                   "--output", slice_dirs[0] / "inside", "--vault", tmp_path / "vault"), 1)
    assert "output folder" in line and "inside the source" in line
    assert not (slice_dirs[0] / "inside").exists()


def test_archive_gives_train_and_test_splits():
    from radioactive.cli import _folder_or_archive
    from radioactive.data import CIFAR10_ARCHIVE, default_data_dir, list_image_folder

    archive = default_data_dir() / CIFAR10_ARCHIVE
    train, test = list_image_folder(_folder_or_archive(archive)), list_image_folder(_folder_or_archive(archive, "test"))
    assert len(train) == 50_000 and len(test) == 10_000 and train.classes == test.classes


@pytest.mark.parametrize("method,flags,other", [
    ("gradient", ["--max-images", "5"], "--ridge"), ("gradient", ["--decoy-keys", "3"], "--per-class"),
    ("decoy-carrier", ["--temperature", "4"], "--ridge"), ("membership", ["--classes", "cat"], "--ridge"), ("black-box", ["--plot", "p.png"], "--per-class"),
    ("white-box", ["--reference", "."], "--per-class"), ("membership", ["--ridge", "1"], "--per-class")])
def test_detect_refuses_a_flag_its_method_ignores(tmp_path, method, flags, other):
    """A flag the chosen method would silently ignore is a usage error naming it, before anything is read."""
    proc = run_cli("detect", "--method", method, "--suspect", tmp_path, *flags, check_rc=2)
    assert f"{flags[0]} does not apply to --method {method}" in proc.stderr
    two = run_cli("detect", "--method", method, "--suspect", tmp_path, other, "3", *flags, check_rc=2)
    assert flags[0] in two.stderr and other in two.stderr and "do not apply" in two.stderr  # several: all named
