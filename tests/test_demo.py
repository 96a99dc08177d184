"""The demo's two settings end to end on a tiny real CIFAR-10 slice, and the marking presets on the CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from radioactive.data import sha256_file
from radioactive.demo import DemoConfig, run_demo
from radioactive.errors import RadioactiveError
from radioactive.gradient import gradient_detect
from radioactive.keys import Key
from radioactive.marking import MARKING_PRESETS, MarkingConfig
from radioactive.training import TrainConfig
from test_cli import _one_line_error, run_cli


def test_config_fills_the_setting_defaults():
    scratch, linear = DemoConfig().resolved(), DemoConfig(setting="linear").resolved()
    assert scratch.setting == "from-scratch" and scratch.marking == MARKING_PRESETS["from-scratch"]
    assert scratch.marking.augmentation == "pad_crop" and scratch.training.recipe == "scratch"
    assert linear.marking == MarkingConfig() and linear.training.recipe == "linear"
    # the setting can be changed on an unresolved configuration: its defaults follow
    switched = replace(DemoConfig(), setting="linear").resolved()
    assert switched.training.recipe == "linear" and switched.marking == MARKING_PRESETS["linear"]
    assert DemoConfig().marking is None  # resolving does not change the original
    assert scratch.target_psnr == 40.5 and linear.target_psnr == 0  # lambda_img calibrated from scratch only
    assert DemoConfig(target_psnr=0).resolved().target_psnr == 0


def test_config_errors():
    with pytest.raises(RadioactiveError, match="setting must be one of"):
        DemoConfig(setting="scratch")
    with pytest.raises(RadioactiveError, match="trains with recipe 'scratch'"):
        DemoConfig(training=TrainConfig(recipe="linear"))
    with pytest.raises(RadioactiveError, match="references must be"):
        DemoConfig(references=0)
    with pytest.raises(RadioactiveError, match="target_psnr must be"):
        DemoConfig(target_psnr=10)
    with pytest.raises(RadioactiveError, match="marks none"):  # refused before any training
        DemoConfig(train_per_class=2, marked_fraction=0.1)


@pytest.mark.slow
def test_from_scratch_demo_end_to_end(tmp_path):
    """Marker and reference trained on the vanilla slice, key in the marker's feature space, gradient test."""
    base = DemoConfig().resolved()
    cfg = DemoConfig(train_per_class=10, test_per_class=4, seed=3, references=2,
                     marking=replace(base.marking, steps=3), training=replace(base.training, epochs=1))
    out = tmp_path / "demo"
    summary = run_demo(out, cfg, progress=False)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["setting"] == "from-scratch" and saved["suspects"].keys() == {"marked", "vanilla"}
    marker = out / "vault" / "marking-network.safetensors"
    references = [out / "vault" / "references" / f"reference{i}.safetensors" for i in (1, 2)]
    network = summary["key"]["network"]
    assert network["name"] == "trained" and network["weights_sha256"] == sha256_file(marker)
    assert summary["marking"]["num_marked"] == 10 and summary["psnr_db_mean"] > 35
    for name in ("marked", "vanilla"):
        audit = json.loads((out / f"audit-{name}.json").read_text())
        assert audit["kind"] == "radioactive-audit" and [t["method"] for t in audit["tests"]] == ["gradient"]
        assert audit["verdict"] == summary["suspects"][name]["verdict"] and not audit["exploratory"]
        result = audit["tests"][0]  # the plan holds the gradient test with the two references, fixed before testing
        assert result["validity"] == "exact" and len(result["cosines"]) == 10
        assert [Path(r).resolve() for r in result["details"]["references"]] == [r.resolve() for r in references]
        assert result["details"]["reference_sha256"] == [sha256_file(r) for r in references]
        assert audit["adjusted_log10_pvalues"]["gradient"] == pytest.approx(result["log10_pvalue"])  # one test: m = 1
        assert (out / f"audit-{name}.html").is_file() and (out / f"cosines-{name}.png").is_file()
        assert summary["suspects"][name]["commitment_matches"] is True
    # a model that never saw the marks is not detected (exact null: fails with probability alpha)
    assert summary["suspects"]["vanilla"]["detected"] is False
    # the suspects train with another seed than the marking network: they are not the marker
    models = [marker, *references, out / "models" / "vanilla.safetensors", out / "models" / "marked.safetensors"]
    assert len({sha256_file(m) for m in models}) == 5
    assert [r["path"] for r in summary["references"]] == [f"vault/references/reference{i}.safetensors" for i in (1, 2)]
    assert saved["config"]["marking"]["augmentation"] == "pad_crop"  # the resolved configuration is recorded
    calibration = saved["lambda_img_calibration"]  # lambda_img calibrated on a pilot before marking
    assert calibration["target_psnr_db"] == 40.5 and len(calibration["trials"]) >= 2
    record = json.loads((out / "vault" / "record.jsonl").read_text().splitlines()[0])
    assert record["config"]["lambda_img"] == calibration["lambda_img"]
    report = (out / "report.md").read_text()
    assert "gradient (exact" in report and "from scratch" in report and "2 more vanilla ResNet-18" in report
    # the demo folder moved as a whole still tests: the key finds its marking network beside it
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    key = Key.load(moved / "vault" / "key.safetensors")
    assert key.network.path == str((moved / "vault" / "marking-network.safetensors").resolve())
    again = gradient_detect(moved / "vault" / "record.jsonl", key, moved / "models" / "marked.safetensors",
                            [moved / "vault" / "references" / f"reference{i}.safetensors" for i in (1, 2)],
                            source_root=moved / "data" / "vanilla" / "train")
    assert again.log10_pvalue == pytest.approx(summary["suspects"]["marked"]["tests"]["gradient"]["log10_pvalue"],
                                               abs=1e-6)


@pytest.mark.slow
def test_linear_demo_end_to_end(tmp_path):
    """The public marking network, a linear suspect, the classic white-box test with decoy keys.

    The alignment needs more test images than the marking network's D = 1,280 features: 130 a class."""
    base = DemoConfig(setting="linear").resolved()
    cfg = replace(base, train_per_class=8, test_per_class=130, decoys=5, marking=replace(base.marking, steps=2),
                  training=replace(base.training, epochs=1))
    summary = run_demo(tmp_path / "demo", cfg, progress=False)
    assert summary["setting"] == "linear" and summary["marking_network"] is None
    assert summary["lambda_img_calibration"] is None
    assert summary["key"]["network"]["name"] == "efficientnet_lite0"
    assert summary["marking"]["num_marked"] == 10  # one a class
    for name, row in summary["suspects"].items():
        assert row["test"] == "audit (white-box)" and not row["not_run"] and row["detected"] is not None
        assert row["tests"]["white-box"]["validity"] == "exact"
        audit = json.loads((tmp_path / "demo" / f"audit-{name}.json").read_text())
        details = audit["tests"][0]["details"]
        assert details["type"] == "WhiteBoxDetails" and details["num_alignment_images"] == 1300
        assert details["alignment_r2"] is not None and details["decoys"]["num_keys"] == 5
        assert row["decoy_empirical_log10_pvalue"] <= 0 and (tmp_path / "demo" / f"audit-{name}.html").is_file()
    assert not (tmp_path / "demo" / "vault" / "marking-network.safetensors").exists()
    assert "decoy keys" in (tmp_path / "demo" / "report.md").read_text()


def test_demo_refuses_unknown_setting_and_non_empty_output(tmp_path):
    assert "invalid choice" in run_cli("demo", "--output-dir", tmp_path / "d", "--setting", "x", check_rc=2).stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    line = _one_line_error(run_cli("demo", "--output-dir", tmp_path / "full", "--train-per-class", 10), 1)
    assert "not empty" in line and (tmp_path / "full" / "keep.txt").read_text() == "mine"


def _record_config(record: Path) -> dict:
    return json.loads(record.read_text().splitlines()[0])["config"]


def test_mark_preset_and_explicit_flags(tmp_path):
    """--preset fills the settings not given; a given flag wins over the preset."""
    from radioactive.data import cifar10_subset

    train_dir, _ = cifar10_subset(tmp_path / "v", train_per_class=2, test_per_class=1)
    key = tmp_path / "k.safetensors"
    run_cli("keygen", "--data", train_dir, "--seed", 5, "--output", key, check_rc=0)
    got = {}
    for name, extra in (("scratch", ["--preset", "from-scratch"]), ("override", ["--preset", "from-scratch",
                                                                                 "--lambda-img", "2"]),
                        ("default", [])):
        out = json.loads(run_cli("mark", "--source", train_dir, "--key", key, "--fraction", 0.5, "--steps", 1,
                                 "--output", tmp_path / name / "train", "--vault", tmp_path / name / "vault", *extra,
                                 check_rc=0).stdout)
        got[name] = _record_config(Path(out["record"]))
    assert got["scratch"]["augmentation"] == "pad_crop" and got["scratch"]["lambda_img"] == 0.7
    assert got["override"]["augmentation"] == "pad_crop" and got["override"]["lambda_img"] == 2.0
    assert got["default"]["augmentation"] == MarkingConfig.augmentation
    assert got["default"]["lambda_img"] == MarkingConfig.lambda_img
    assert all(c["steps"] == 1 for c in got.values())
