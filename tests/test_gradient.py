"""Tests for radioactive.gradient: the white-box gradient test, on real CIFAR-10 images marked with the
default EfficientNet-Lite0, with linear-probe suspects that do or do not know the key."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from probes import linear_probe  # tests/ is on sys.path (pytest's prepend import mode)

from radioactive.data import sha256_file
from radioactive.errors import RadioactiveError
from radioactive.gradient import gradient_detect, pulled_back_gradients
from radioactive.keys import generate_key
from radioactive.marking import MarkingConfig, mark_folder
from radioactive.networks import load_marking_network, load_runnable

CFG = MarkingConfig(steps=5, batch_size=32)


@pytest.fixture(scope="module")
def release(cifar_small, key, tmp_path_factory):
    out = tmp_path_factory.mktemp("gradient") / "released"
    summary = mark_folder(cifar_small[0], key, out, fraction=0.25, seed=5, config=CFG, progress=False)
    return Path(summary.record)


def test_pulled_back_gradient_is_the_jacobian_vector_product(real_batch, key, tmp_path):
    """h(x) against a central finite difference of the marking network's features along -grad_x CE."""
    marker = load_marking_network(key.network)[0].eval().double()
    w = np.random.default_rng(0).standard_normal((len(key.classes), key.dim))
    net, _ = load_runnable(linear_probe(tmp_path / "p.safetensors", w, key))
    net = net.double()
    x = real_batch[0][:2].double() / 255
    y = real_batch[1][:2]
    h = pulled_back_gradients(net, marker, x, y, temperature=1.0)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(xg), y, reduction="sum"), xg)
    eps = 1e-8 / g.abs().max()  # small: the network is piecewise linear (ReLU6), with kinks
    with torch.no_grad():
        fd = (marker.features(x - eps * g) - marker.features(x + eps * g)) / (2 * eps)
    assert h.shape == (2, key.dim)
    np.testing.assert_allclose(h.numpy(), fd.numpy(), rtol=1e-3, atol=1e-6 * float(fd.abs().max()))


def test_a_suspect_that_learnt_the_carriers_is_detected(release, key, tmp_path):
    """Classifier rows along the carriers: the suspect's loss falls when features move along the class's
    carrier, so every class's cosine is positive and the combined p is tiny."""
    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    res = gradient_detect(release, key, suspect)
    assert res.method == "gradient" and res.validity == "exact" and res.classes == list(key.classes)
    assert res.details.images_per_class == [3] * len(key.classes)
    assert res.details.temperature == res.settings["temperature"] == 2.0
    assert min(res.cosines) > 0 and res.detected and res.log10_pvalue < -10


def test_an_independent_suspect_is_not_detected_and_its_own_reference_gives_zero(release, key, tmp_path):
    w = np.random.default_rng(3).standard_normal((len(key.classes), key.dim)) / math.sqrt(key.dim)
    suspect = linear_probe(tmp_path / "v.safetensors", w, key)
    res = gradient_detect(release, key, suspect)
    assert not res.detected and res.log10_pvalue > -3
    assert max(abs(c) for c in res.cosines) < 5 / math.sqrt(key.dim)
    with pytest.raises(RadioactiveError, match="is the suspect itself"):
        gradient_detect(release, key, suspect, reference=[suspect])
    copy = tmp_path / "copy.safetensors"  # a byte copy under another name is refused too
    copy.write_bytes(suspect.read_bytes())
    copy.with_suffix(".json").write_text(suspect.with_suffix(".json").read_text())
    with pytest.raises(RadioactiveError, match="is the suspect itself"):
        gradient_detect(release, key, suspect, reference=copy)


def test_batch_size_and_class_subset_do_not_change_a_class_result(release, key, tmp_path):
    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    ref = linear_probe(tmp_path / "r.safetensors", np.random.default_rng(5).standard_normal((len(key.classes), key.dim)), key)
    full = gradient_detect(release, key, suspect, ref)
    sub = gradient_detect(release, key, suspect, ref, only_classes=["frog", "cat"], batch_size=1)
    assert sub.classes == ["cat", "frog"] and sub.details.images_per_class == [3, 3]
    for c, cos in zip(sub.classes, sub.cosines):
        assert cos == pytest.approx(full.cosines[full.classes.index(c)], rel=1e-4)  # float32 kernels vary with batch size
    with pytest.raises(RadioactiveError, match="not in the key"):
        gradient_detect(release, key, suspect, only_classes=["unicorn"])


def test_only_vanilla_originals_are_read(release, key, tmp_path):
    """The null is exact only if no marked pixel enters the statistic: removing the released copy changes nothing."""
    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    before = gradient_detect(release, key, suspect)
    header = json.loads(release.read_text().splitlines()[0])
    moved = tmp_path / "moved"
    shutil.move(header["output"], moved)
    try:
        after = gradient_detect(release, key, suspect)
    finally:
        shutil.move(moved, header["output"])
    assert after.cosines == before.cosines


def test_a_source_replaced_by_its_marked_output_is_refused(release, key, tmp_path):
    """If the vanilla originals were overwritten by the release, marked pixels would enter the statistic."""
    header = json.loads(release.read_text().splitlines()[0])
    entry = json.loads(release.read_text().splitlines()[1])
    src = tmp_path / "src"
    shutil.copytree(header["source"], src)
    (src / entry["source"]).write_bytes((Path(header["output"]) / entry["output"]).read_bytes())
    suspect = linear_probe(tmp_path / "s.safetensors", key.carriers.numpy(), key)
    with pytest.raises(RadioactiveError, match="byte-identical"):
        gradient_detect(release, key, suspect, source_root=src)


def test_wrong_key_and_unknown_class_raise(release, key, tmp_path):
    suspect = linear_probe(tmp_path / "s.safetensors", key.carriers.numpy(), key)
    with pytest.raises(RadioactiveError, match="not the one"):
        gradient_detect(release, generate_key(key.classes, seed=99), suspect)
    with pytest.raises(RadioactiveError, match="more than once"):  # Fisher would count cat twice
        gradient_detect(release, key, suspect, only_classes=["cat", "frog", "cat"])
    meta = json.loads(suspect.with_suffix(".json").read_text())
    meta["classes"] = [f"c{i}" for i in range(len(key.classes))]
    suspect.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(RadioactiveError, match="unknown"):
        gradient_detect(release, key, suspect)


def test_cli_gradient_with_two_references_and_report(release, key, tmp_path, capsys):
    from radioactive.cli import main

    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    refs = [str(linear_probe(tmp_path / f"r{i}.safetensors",
                       np.random.default_rng(i).standard_normal((len(key.classes), key.dim)) / 20, key)) for i in (1, 2)]
    key.save(tmp_path / "key.safetensors")
    rc = main(["detect", "--method", "gradient", "--record", str(release), "--key", str(tmp_path / "key.safetensors"),
               "--suspect", str(suspect), "--reference", *refs, "--output", str(tmp_path / "res.json"),
               "--plot", str(tmp_path / "cos.png")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "gradient" and out["details"]["references"] == refs and out["log10_pvalue"] < -10
    assert out["details"]["type"] == "GradientDetails" and out["settings"]["references"] == refs
    assert out["details"]["reference_sha256"] == [sha256_file(Path(r)) for r in refs]
    assert (tmp_path / "cos.png").stat().st_size > 1000
    assert main(["report", "--result", str(tmp_path / "res.json"), "--output", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "gradient" in page and "Per-class cosines" in page
    capsys.readouterr()
    # the test needs the key: refused with one line naming the flag
    assert main(["detect", "--method", "gradient", "--record", str(release), "--suspect", str(suspect)]) == 1
    err = capsys.readouterr().err
    assert "--key" in err and len(err.strip().splitlines()) == 1


def test_temperature_divides_the_logits(real_batch, key, tmp_path):
    """h at temperature T is h at T = 1 of the model whose logits are divided by T (not the loss scaled)."""
    marker = load_marking_network(key.network)[0].eval().double()
    w = np.random.default_rng(1).standard_normal((len(key.classes), key.dim))
    net, _ = load_runnable(linear_probe(tmp_path / "p.safetensors", w, key))
    net = net.double()
    x, y = real_batch[0][:3].double() / 255, real_batch[1][:3]
    h2 = pulled_back_gradients(net, marker, x, y, temperature=2.0)
    h1 = pulled_back_gradients(lambda v: net(v) / 2, marker, x, y, temperature=1.0)
    np.testing.assert_allclose(h2.numpy(), h1.numpy(), rtol=1e-9, atol=1e-12 * float(h1.abs().max()))
    ratio = (h2.norm(dim=1) / pulled_back_gradients(net, marker, x, y, temperature=1.0).norm(dim=1)).numpy()
    assert torch.equal(pulled_back_gradients(net, marker, x, y), h2)  # the default is the test's T = 2
    with pytest.raises(RadioactiveError, match="temperature"):
        pulled_back_gradients(net, marker, x, y, temperature=0.0)
    assert not np.allclose(ratio, 0.5)  # the softmax changes, not only the scale


def test_temperature_is_recorded_and_checked(release, key, tmp_path, capsys):
    from radioactive.cli import main

    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    soft = gradient_detect(release, key, suspect, temperature=4.0)
    assert soft.details.temperature == soft.settings["temperature"] == 4.0 and soft.detected
    assert soft.cosines != gradient_detect(release, key, suspect).cosines
    for bad in (0.0, 1000.0):
        with pytest.raises(RadioactiveError, match="temperature"):
            gradient_detect(release, key, suspect, temperature=bad)
    key.save(tmp_path / "key.safetensors")
    assert main(["detect", "--method", "gradient", "--record", str(release), "--key", str(tmp_path / "key.safetensors"),
                 "--suspect", str(suspect), "--temperature", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["cosines"] == pytest.approx(soft.cosines, rel=1e-6)
    with pytest.raises(SystemExit):  # a gradient setting: refused by the other methods
        main(["detect", "--method", "black-box", "--record", str(release), "--suspect", str(suspect),
              "--temperature", "4"])
    assert "temperature does not apply" in capsys.readouterr().err
