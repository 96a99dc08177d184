"""Suspects people actually have: torchvision families, checkpoint formats, unsafe files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from radioactive.errors import RadioactiveError
from radioactive.networks import (
    CIFAR_MEAN,
    CIFAR_STD,
    FeatureNetwork,
    Preprocessing,
    build_architecture,
    load_suspect,
    read_state_dict,
)

FAMILIES = [  # (architecture, expected classifier layer, input side)
    ("resnet18", "fc", 32),
    ("vgg11", "classifier.6", 32),
    ("densenet121", "classifier", 32),
    ("efficientnet_b0", "classifier.1", 32),
    ("mobilenet_v3_small", "classifier.3", 32),
    ("convnext_tiny", "classifier.2", 32),
    ("vit_b_16", "heads.head", 224),
]


@pytest.mark.parametrize("arch,layer,side", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_last_linear_found_for_each_family(arch, layer, side):
    torch.manual_seed(0)
    model = build_architecture(arch, 7).eval()
    net = FeatureNetwork(model, Preprocessing(side, CIFAR_MEAN, CIFAR_STD))
    assert net.classifier_name == layer
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        f, logits = net.features_and_logits(x)
        assert f.shape == (2, net.classifier.in_features) and logits.shape == (2, 7)
        # the features are exactly what the classifier reads
        torch.testing.assert_close(net.classifier(f), logits)


def test_named_layer_must_be_linear():
    model = build_architecture("resnet18", 3)
    with pytest.raises(RadioactiveError, match="not nn.Linear"):
        FeatureNetwork(model, Preprocessing(32), "layer4")
    with pytest.raises(RadioactiveError, match="no layer named"):
        FeatureNetwork(model, Preprocessing(32), "nope")


def _sidecar(path, arch="resnet18", classes=("a", "b", "c")):
    path.with_suffix(".json").write_text(json.dumps({
        "architecture": arch, "classes": list(classes),
        "preprocessing": Preprocessing(32, CIFAR_MEAN, CIFAR_STD).to_dict()}))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_state_dict_formats_load_strictly(tmp_path, suffix):
    torch.manual_seed(1)
    model = build_architecture("resnet18", 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    _sidecar(path)
    net, meta = load_suspect(path)
    assert not net.training and meta["classes"] == ["a", "b", "c"]
    torch.testing.assert_close(net.classifier.weight, state["fc.weight"])


def test_missing_tensor_is_named(tmp_path):
    state = build_architecture("resnet18", 3).state_dict()
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "m.safetensors"
    save_file(dict(state), str(path))
    _sidecar(path)
    with pytest.raises(RadioactiveError, match="layer1.0.conv1.weight"):
        load_suspect(path)


class _Payload:
    """Unpickling this object would create a file (arbitrary code execution)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_checkpoint_is_refused_not_executed(tmp_path, key, cifar_small):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Payload(str(marker))}, f)
    with pytest.raises(RadioactiveError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()
    # through the real command line
    _sidecar(path, classes=key.classes)
    key_path = key.save(tmp_path / "key.safetensors")
    proc = subprocess.run([sys.executable, "-m", "radioactive", "detect", "--method", "white-box", "--suspect", str(path),
                           "--key", str(key_path), "--images", str(cifar_small[1]), "--ridge", "0.1"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refused to load" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()


def test_malicious_checkpoint_refused_by_detect_before_key(tmp_path, key):
    marker = tmp_path / "pwned2.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    _sidecar(path, classes=key.classes)
    with pytest.raises(RadioactiveError, match="refused"):
        load_suspect(path)
    assert not marker.exists()


def test_torchscript_runs_black_box_and_reads_features(tmp_path):
    from radioactive.networks import load_runnable

    torch.manual_seed(2)
    model = build_architecture("resnet18", 3).eval()
    path = tmp_path / "m.pt"
    torch.jit.script(model).save(str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "architecture": "torchscript", "classes": ["a", "b", "c"],
        "preprocessing": Preprocessing(32, CIFAR_MEAN, CIFAR_STD).to_dict()}))
    run, meta = load_runnable(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(Preprocessing(32, CIFAR_MEAN, CIFAR_STD)(x))
        torch.testing.assert_close(run(x), expected)
    net, _ = load_suspect(path)
    with torch.no_grad():
        f, logits = net.features_and_logits(x)
        model.fc, fc = torch.nn.Identity(), model.fc
        torch.testing.assert_close(f, model(Preprocessing(32, CIFAR_MEAN, CIFAR_STD)(x)))
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(net.classifier.weight, fc.weight)
        # the weights were restored
        torch.testing.assert_close(run(x), expected)


@pytest.mark.parametrize("pre", [{"image_size": 32, "mean": [0, 0], "std": [1, 1, 1]},
                                 {"image_size": 32, "mean": [0, 0, 0], "std": [1, 0, 1]},
                                 {"image_size": -3, "mean": [0, 0, 0], "std": [1, 1, 1]},
                                 {"mean": [0, 0, 0], "std": [1, 1, 1]}])
def test_bad_preprocessing_is_an_error(tmp_path, pre):
    path = tmp_path / "m.safetensors"
    save_file(dict(build_architecture("resnet18", 3).state_dict()), str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": "resnet18", "classes": ["a", "b", "c"],
                                                     "preprocessing": pre}))
    with pytest.raises(RadioactiveError, match="preprocessing"):
        load_suspect(path)


def test_layer_can_be_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(dict(build_architecture("vgg11", 3).state_dict()), str(path))
    _sidecar(path, arch="vgg11")
    net, _ = load_suspect(path, layer="classifier.6")
    assert net.classifier_name == "classifier.6" and net.feature_dim == 4096
    with pytest.raises(RadioactiveError, match="4096 outputs"):
        load_suspect(path, layer="classifier.3")
