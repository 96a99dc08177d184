"""The owner's vault (radioactive.vault) and what mark does with it: private files apart from the release,
their permissions, the manifest and the commitment; every mark verified on disk; the per-image PSNR floor;
alpha kept; re-marking a release refused.

One small real run (CIFAR-10 images in two classes, plus a flat white image, an RGBA image and a palette
image with a transparent colour) serves most tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radioactive.data import list_image_folder, load_rgb, read_image
from radioactive.errors import RadioactiveError
from radioactive.keys import Key
from radioactive.marking import MarkingConfig, mark_folder
from radioactive.marking.optimise import enforce_min_psnr, psnr_db
from radioactive.marking.verify import NOTICE_TITLE, check_not_a_release, unmarked_threshold
from radioactive.vault import (
    COMMITMENT,
    KEY,
    MANIFEST,
    RECORD,
    REFERENCES,
    Vault,
    canonical_json,
    check_commitment,
    check_separate,
    commitment,
    make_private_dir,
    open_vault,
    update_manifest,
    verify_manifest,
    write_commitment,
    write_private,
)

CFG = MarkingConfig(batch_size=16)  # the default 50 steps: a flat white image then keeps no mark
MARKED = ["a/0.png", "a/1.png", "a/flat.png", "a/rgba.png", "b/0.png", "b/pal.png"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def source(cifar_small, tmp_path_factory):
    """Two classes: real CIFAR-10 photos, a flat white image, an RGBA photo with a varied alpha channel, a
    palette image with a transparent colour, and an RGBA image left unmarked."""
    folder = list_image_folder(cifar_small[0])
    photos = [load_rgb(folder.path(i)) for i in range(0, 120, 7)][:10]
    root = tmp_path_factory.mktemp("vault_src") / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for n in range(3):
        Image.fromarray(photos[n]).save(root / "a" / f"{n}.png")
        Image.fromarray(photos[3 + n]).save(root / "b" / f"{n}.png")
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(root / "a" / "flat.png")
    ramp = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8), (32, 1))  # 0 (clear) to 255 (opaque)
    Image.fromarray(np.dstack([photos[6], ramp]), "RGBA").save(root / "a" / "rgba.png")
    Image.fromarray(np.dstack([photos[7], ramp.T]), "RGBA").save(root / "b" / "rgba2.png")
    Image.fromarray(photos[8]).quantize(16).save(root / "b" / "pal.png", transparency=0)
    return root


@pytest.fixture(scope="module")
def two_class_key(key):
    """The first two carriers of the seed-1 key: with the first, a flat white image keeps a carrier shift of
    about 0.007 after the default 50 steps (the pixel penalty wins: white pixels can only go down), while
    with some carriers it moves by much more (0.43 with the third)."""
    return Key(key.carriers[:2].clone(), ("a", "b"), key.network)


@pytest.fixture(scope="module")
def run(source, two_class_key, tmp_path_factory):
    base = tmp_path_factory.mktemp("vault_run")
    summary = mark_folder(source, two_class_key, base / "release", vault=base / "vault", files=MARKED,
                          holdout_fraction=0.2, config=CFG, progress=False, public_notice=True)
    return summary, base / "release", base / "vault"


# ----------------------------------------------------------------------------- the vault API


def test_private_dir_and_file_modes(tmp_path):
    d = make_private_dir(tmp_path / "v" / "a" / "b")
    assert all(_mode(p) == 0o700 for p in (tmp_path / "v", tmp_path / "v" / "a", d))
    write_private(tmp_path / "v" / "new" / "f.bin", b"x")
    assert _mode(tmp_path / "v" / "new") == 0o700 and _mode(tmp_path / "v" / "new" / "f.bin") == 0o600
    assert (tmp_path / "v" / "new" / "f.bin").read_bytes() == b"x"


@pytest.mark.parametrize("release, vault, source, words", [
    ("r", "r/v", None, "inside the release"),
    ("r", "r", None, "inside the release"),
    ("v/r", "v", None, "inside the vault"),
    ("s/r", "v", "s", "release .*s/r is inside the source"),
    ("r", "s/v", "s", "vault .*s/v is inside the source"),
])
def test_check_separate_refuses_nesting(tmp_path, release, vault, source, words):
    with pytest.raises(RadioactiveError, match=words.replace("/", ".")):
        check_separate(tmp_path / release, tmp_path / vault, tmp_path / source if source else None)
    check_separate(tmp_path / "r", tmp_path / "v", tmp_path / "s")  # siblings are fine


def test_open_vault_names_what_is_missing(tmp_path):
    with pytest.raises(RadioactiveError, match="not a vault.*no such folder"):
        open_vault(tmp_path / "nothing")
    (tmp_path / RECORD).write_text("{}\n")
    with pytest.raises(RadioactiveError, match=f"not a vault.*no {KEY}"):
        open_vault(tmp_path)


def _fake_vault(tmp_path: Path, config: dict) -> Path:
    v = make_private_dir(tmp_path / "vault")
    write_private(v / KEY, b"key bytes")
    write_private(v / RECORD, (json.dumps({"kind": "radioactive-record", "config": config}) + "\n{}\n").encode())
    return v


def test_manifest_lists_every_file_and_finds_changes(tmp_path):
    v = _fake_vault(tmp_path, {"steps": 1})
    write_private(v / "holdout" / "a" / "x.png", b"png")
    m = update_manifest(v)
    assert set(m["files"]) == {KEY, RECORD, "holdout/a/x.png"}
    assert m["files"][KEY] == hashlib.sha256(b"key bytes").hexdigest() and m["schema"] == 1
    assert verify_manifest(v) == []
    (v / "holdout" / "a" / "x.png").write_bytes(b"other")
    (v / KEY).unlink()
    (v / "extra.txt").write_text("?")
    assert verify_manifest(v) == ["extra: extra.txt", "changed: holdout/a/x.png", f"missing: {KEY}"]


def test_commitment_is_the_documented_hash(tmp_path):
    config = {"steps": 3, "lambda_img": 0.5, "crop_scale": [0.5, 1.0]}
    v = _fake_vault(tmp_path, config)
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    settings = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    text = (f"radioactive-commitment 1\n{KEY} {sha(b'key bytes')}\n{RECORD} {sha((v / RECORD).read_bytes())}\n"
            f"settings {sha(settings)}\n")
    assert canonical_json(config) == settings
    assert commitment(v) == sha(text.encode())
    out = write_commitment(v)
    assert out["commitment"] == commitment(v) and json.loads((v / COMMITMENT).read_text()) == out
    assert _mode(v / COMMITMENT) == 0o600
    assert check_commitment(v, " " + commitment(v).upper() + "\n")
    write_private(v / KEY, b"another key")
    assert not check_commitment(v, out["commitment"])
    with pytest.raises(RadioactiveError, match="64 hex digits"):
        check_commitment(v, "abc")


def test_references_are_the_weights_in_references(tmp_path):
    v = Vault(make_private_dir(tmp_path / "v"))
    assert v.references() == []
    make_private_dir(v.references_dir)
    for name in ("b.safetensors", "a.pt", "a.json", ".hidden.pt"):
        (v.references_dir / name).write_bytes(b"")
    assert [p.name for p in v.references()] == ["a.pt", "b.safetensors"]


# ----------------------------------------------------------------------------- mark into a vault


def test_vault_layout_and_permissions(run):
    summary, release, vault = run
    assert Path(summary.record) == vault / RECORD and summary.vault == str(vault)
    for name in (KEY, RECORD, MANIFEST, COMMITMENT):
        assert (vault / name).is_file(), name
    assert (vault / REFERENCES).is_dir() and any((vault / "holdout").rglob("*.png"))
    header = json.loads((vault / RECORD).read_text().splitlines()[0])
    assert header["kind"] == "radioactive-record" and Path(header["holdout"]) == (vault / "holdout").resolve()
    entries = [p for p in vault.rglob("*")]
    assert _mode(vault) == 0o700
    assert all(_mode(p) == (0o700 if p.is_dir() else 0o600) for p in entries), \
        {p.name: oct(_mode(p)) for p in entries}
    assert open_vault(vault).load_key().fingerprint == json.loads((vault / RECORD).read_text().splitlines()[0])[
        "key_fingerprint"]


def test_release_holds_only_images_and_the_notice(run):
    summary, release, vault = run
    files = [p for p in release.rglob("*") if p.is_file()]
    assert len(files) == summary.num_marked + summary.num_copied + 1
    for p in files:
        if p.relative_to(release).as_posix() == "NOTICE.txt":
            text = p.read_text()
            assert text.startswith(NOTICE_TITLE) and summary.commitment in text
            assert not any(m.split("/")[1] in text for m in MARKED)  # never which images
            continue
        assert p.suffix == ".png"
        with Image.open(p) as im:  # decodes: an image, nothing else
            im.verify()
    assert not any(vault.resolve().is_relative_to(p.resolve()) for p in [release])
    assert all(_mode(p) & 0o044 == 0o044 for p in files)  # the release is readable by others


def test_manifest_and_commitment_of_the_run(run):
    summary, _, vault = run
    assert verify_manifest(vault) == []
    assert len(summary.commitment) == 64 and summary.commitment == commitment(vault)
    assert json.loads((vault / COMMITMENT).read_text())["commitment"] == summary.commitment
    assert check_commitment(vault, summary.commitment)


def test_every_mark_verified_on_disk_and_the_flat_image_listed(run, source, two_class_key, marking_net):
    summary, release, vault = run
    from radioactive.marking import carrier_shifts
    import torch

    entries = [json.loads(x) for x in (vault / RECORD).read_text().splitlines()[1:]]
    assert all("carrier_shift" in e for e in entries) and summary.num_marked_images == len(entries)
    # the recorded shift is that of the file on disk, re-read
    e = next(e for e in entries if e["source"] == "a/0.png")
    base = release if e["released"] else vault / "holdout"
    v = torch.from_numpy(load_rgb(source / e["source"])).permute(2, 0, 1)[None]
    m = torch.from_numpy(load_rgb(base / e["output"])).permute(2, 0, 1)[None]
    (shift,) = carrier_shifts(marking_net[0], v, [m], two_class_key.carriers[[e["carrier_index"]]])
    assert shift.item() == pytest.approx(e["carrier_shift"], abs=2e-3)
    shifts = np.array([e["carrier_shift"] for e in entries])
    assert summary.unmarked_threshold == pytest.approx(0.1 * np.median(shifts))
    assert summary.carrier_shift_median == pytest.approx(np.median(shifts))
    assert summary.carrier_shift_min == pytest.approx(shifts.min())
    flat = next(e for e in entries if e["source"] == "a/flat.png")
    assert flat["unmarked"] and "a/flat.png" in {u["source"] for u in summary.unmarked}
    assert summary.unmarked_images == len(summary.unmarked) == sum(e.get("unmarked", False) for e in entries)
    assert summary.unmarked_images < len(entries)  # the photos carry the mark
    summary.check_marked()  # some image carries the mark: no error


def test_alpha_kept_and_colour_marked(run, source):
    summary, release, vault = run
    entries = {e["source"]: e for e in (json.loads(x) for x in (vault / RECORD).read_text().splitlines()[1:])}
    for rel in ("a/rgba.png", "b/pal.png", "b/rgba2.png"):
        src = read_image(source / rel)
        e = entries.get(rel)
        base = vault / "holdout" if e is not None and not e["released"] else release
        with Image.open(base / rel) as im:
            assert im.mode == "RGBA", rel
            out = np.asarray(im)
        assert np.array_equal(out[..., 3], src.alpha), rel  # alpha bytes unchanged
        changed = np.abs(out[..., :3].astype(int) - src.colour.astype(int))
        if e is None:
            assert changed.max() == 0, rel  # unmarked: exact colour channels
        else:
            assert 0 < changed.max() <= CFG.linf and changed[src.alpha == 255].max() > 0, rel


def test_a_vault_with_a_record_is_refused(run, source, two_class_key, tmp_path):
    _, _, vault = run
    before = (vault / RECORD).read_bytes()
    with pytest.raises(RadioactiveError, match="already holds the record"):
        mark_folder(source, two_class_key, tmp_path / "r2", vault=vault, files=MARKED[:1], config=CFG, progress=False)
    assert (vault / RECORD).read_bytes() == before and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("where", ["vault in release", "release in vault", "vault in source"])
def test_mark_refuses_nested_vault(source, two_class_key, tmp_path, where):
    release, vault = {"vault in release": (tmp_path / "r", tmp_path / "r" / "v"),
                      "release in vault": (tmp_path / "v" / "r", tmp_path / "v"),
                      "vault in source": (tmp_path / "r", source / "v")}[where]
    with pytest.raises(RadioactiveError, match="inside the"):
        mark_folder(source, two_class_key, release, vault=vault, files=MARKED[:1], config=CFG, progress=False)
    assert not vault.exists() and not release.exists()


def test_a_release_is_refused_as_a_source(run, two_class_key, tmp_path):
    _, release, vault = run
    with pytest.raises(RadioactiveError, match="is a release.*public notice"):
        mark_folder(release, two_class_key, tmp_path / "r", vault=tmp_path / "v", files=["a/0.png"], config=CFG,
                    progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    (copy / "NOTICE.txt").unlink()
    folder = list_image_folder(copy)
    check_not_a_release(folder, [], allow_remark=False)  # nothing says so without the vault
    with pytest.raises(RadioactiveError, match="is a release.*marked.*--allow-remark"):
        mark_folder(copy, two_class_key, tmp_path / "r", vault=tmp_path / "v", files=["a/0.png"], config=CFG,
                    progress=False, known_vaults=(vault,))
    assert not (tmp_path / "r").exists()
    check_not_a_release(folder, [vault], allow_remark=True)
    with pytest.raises(RadioactiveError, match="is the release"):  # the release named by the record itself
        check_not_a_release(list_image_folder(release), [vault / RECORD], allow_remark=False)


# ----------------------------------------------------------------------------- the PSNR floor


def test_enforce_min_psnr_blends_to_the_floor():
    rng = np.random.default_rng(0)
    v = rng.integers(20, 235, (16, 16, 3), dtype=np.uint8)
    m = np.clip(v.astype(int) + rng.integers(-10, 11, v.shape), 0, 255).astype(np.uint8)
    assert psnr_db(v, m) < 33
    out, s = enforce_min_psnr(v, m, 36.0)
    assert psnr_db(v, out) >= 36.0 and 0 < s < 1
    assert psnr_db(v, out) < 36.5  # the largest scale that keeps the floor, not much less
    assert np.all(np.abs(out.astype(int) - v.astype(int)) <= np.abs(m.astype(int) - v.astype(int)))
    same, s1 = enforce_min_psnr(v, m, 20.0)
    assert same is m and s1 == 1.0
    assert enforce_min_psnr(v, m, 0)[0] is m


def test_unmarked_threshold_rule():
    assert unmarked_threshold(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.2)
    assert unmarked_threshold(np.array([-1.0, -2.0, 0.0])) == 0.0
    assert unmarked_threshold(np.array([])) == 0.0


def test_min_psnr_floor_in_a_run(source, two_class_key, tmp_path):
    s = mark_folder(source, two_class_key, tmp_path / "r", vault=tmp_path / "v", files=MARKED,
                    config=MarkingConfig(steps=10, batch_size=16, min_psnr=55.0), progress=False)  # 10 steps: ~50 dB
    entries = [json.loads(x) for x in (tmp_path / "v" / RECORD).read_text().splitlines()[1:]]
    assert s.blended_images == sum("blend" in e for e in entries) > 0
    assert s.psnr_db_min >= 55.0 and all(e["psnr_db"] is None or e["psnr_db"] >= 55.0 for e in entries)


# ----------------------------------------------------------------------------- command line


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radioactive", "mark", *map(str, args)], capture_output=True,
                          text=True, timeout=600, check=False)


def _no_nan(text: str) -> dict:
    def refuse(c):
        raise AssertionError(f"{c} in the summary")
    return json.loads(text, parse_constant=refuse)


def test_cli_steps_0_exits_nonzero_with_one_line(source, two_class_key, tmp_path):
    key = two_class_key.save(tmp_path / "k.safetensors")
    proc = _cli("--source", source, "--key", key, "--files", _list(tmp_path), "--steps", 0, "--output",
                tmp_path / "r", "--vault", tmp_path / "v")
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "no image carries the mark" in errors[0] and "Traceback" not in proc.stderr
    assert "nan" not in proc.stderr.lower()
    out = _no_nan(proc.stdout)
    assert out["identical_images"] == out["unmarked_images"] == len(MARKED) and out["psnr_db_mean"] is None
    assert "identical to their source" in proc.stderr


def _list(tmp_path: Path) -> Path:
    p = tmp_path / "files.txt"
    p.write_text("\n".join(MARKED) + "\n")
    return p


def test_cli_prints_the_distribution_and_the_commitment(source, two_class_key, tmp_path):
    key = two_class_key.save(tmp_path / "k.safetensors")
    proc = _cli("--source", source, "--key", key, "--files", _list(tmp_path), "--batch-size", 16, "--output",
                tmp_path / "r", "--vault", tmp_path / "v", "--public-notice")
    assert proc.returncode == 0, proc.stderr
    out = _no_nan(proc.stdout)
    assert "carrier shift read back from the disk" in proc.stderr and "median" in proc.stderr
    assert f"commitment {out['commitment']}" in proc.stderr and out["commitment"] == commitment(tmp_path / "v")
    assert out["unmarked_images"] >= 1 and "a/flat.png" in proc.stderr
    assert out["psnr_db_min"] is not None and (tmp_path / "r" / "NOTICE.txt").is_file()


def test_cli_needs_a_vault_apart_from_the_release(source, two_class_key, tmp_path):
    key = two_class_key.save(tmp_path / "k.safetensors")
    proc = _cli("--source", source, "--key", key, "--fraction", 0.5, "--output", tmp_path / "r")
    assert proc.returncode == 2 and "--vault" in proc.stderr
    proc = _cli("--source", source, "--key", key, "--fraction", 0.5, "--output", tmp_path / "r", "--vault",
                tmp_path / "r" / "private")
    assert proc.returncode == 1 and "inside the release" in proc.stderr and not (tmp_path / "r").exists()
