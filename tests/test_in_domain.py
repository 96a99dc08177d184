"""In-domain marking: a marking network trained by ``radioactive train``, the trainer's pad-crop
augmentation while marking, and several augmented views per step (issue: from-scratch radioactivity)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radioactive.augment import PadCropFlip
from radioactive.cli import main
from radioactive.errors import RadioactiveError
from radioactive.keys import Key, generate_key
from radioactive.marking.calibrate import search_lambda
from radioactive.marking import MarkingConfig, calibrate_lambda_img, image_generator, mark_batch, mark_folder
from radioactive.networks import MarkingNetworkSpec, load_marking_network
from radioactive.training import TrainConfig, train


def test_pad_crop_flip_matches_padded_slices_and_flips():
    aug = PadCropFlip(pad=4)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    params = torch.tensor([[0, 8, 0], [4, 4, 1]])  # shift (-4, +4) unflipped; centred and flipped
    out = aug.apply(x, params)
    padded = F.pad(x, (4, 4, 4, 4))
    assert torch.equal(out[0], padded[0, :, 8:16, 0:8])
    assert torch.equal(out[1], x[1].flip(-1))


def test_pad_crop_flip_draws_stay_in_range_and_follow_the_generator():
    aug = PadCropFlip(pad=4)
    p = aug.draw([torch.Generator().manual_seed(i) for i in range(200)])
    assert p.shape == (200, 3)
    assert p[:, :2].min() == 0 and p[:, :2].max() == 8
    assert set(p[:, 2].tolist()) == {0, 1}
    again = aug.draw([torch.Generator().manual_seed(i) for i in range(200)])
    assert torch.equal(p, again)


def test_pad_crop_flip_is_differentiable():
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    params = PadCropFlip().draw([torch.Generator().manual_seed(i) for i in range(3)])
    PadCropFlip().apply(x, params).sum().backward()
    assert x.grad is not None and 0 < x.grad.sum() <= x.numel()


@pytest.mark.parametrize("kwargs", [{"augmentation": "rotate"}, {"views": 0}])
def test_marking_config_rejects_unknown_augmentation_and_zero_views(kwargs):
    with pytest.raises(RadioactiveError):
        MarkingConfig(**kwargs)


@pytest.fixture(scope="module")
def trained_marker(cifar_small, tmp_path_factory):
    """A ResNet-18 (CIFAR variant) trained for one epoch on the small slice: an in-domain marking network."""
    train_dir, test_dir = cifar_small
    out = tmp_path_factory.mktemp("marker") / "marker.safetensors"
    train(train_dir, test_dir, out, TrainConfig(recipe="scratch", architecture="resnet18_cifar", epochs=1,
                                                batch_size=60, lr=0.05, image_size=32, seed=0), progress=False)
    return out


def test_keygen_with_a_trained_marking_network(trained_marker, cifar_small, tmp_path, capsys):
    path = tmp_path / "key.safetensors"
    assert main(["keygen", "--data", str(cifar_small[0]), "--network-weights", str(trained_marker),
                 "--seed", "3", "--output", str(path)]) == 0
    key = Key.load(path)
    assert key.dim == 512 and key.network.name == "trained" and key.network.image_size == 32
    assert key.network.weights_sha256 and key.network.path == str(trained_marker.resolve())
    assert json.loads(capsys.readouterr().out)["dim"] == 512


def test_trained_marking_network_refuses_changed_weights(trained_marker, classes, tmp_path):
    key = generate_key(classes, MarkingNetworkSpec("trained", 32, path=str(trained_marker)), seed=1)
    copy = tmp_path / "marker.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(trained_marker)
    name = next(k for k in state if k.endswith("weight") and state[k].dtype == torch.float32)
    state[name] = state[name] + 1e-3
    save_file(state, copy)
    (tmp_path / "marker.json").write_text(trained_marker.with_suffix(".json").read_text())
    spec = MarkingNetworkSpec("trained", 32, key.network.weights_sha256, str(copy))
    with pytest.raises(RadioactiveError, match="differ"):
        load_marking_network(spec)
    with pytest.raises(RadioactiveError, match="path"):
        load_marking_network(MarkingNetworkSpec("trained", 32))
    with pytest.raises(RadioactiveError, match="not found"):
        load_marking_network(MarkingNetworkSpec("trained", 32, path=str(tmp_path / "none.safetensors")))


def test_marking_with_trained_network_and_pad_crop_moves_features_along_the_carrier(trained_marker, classes,
                                                                                    real_batch):
    key = generate_key(classes, MarkingNetworkSpec("trained", 32, path=str(trained_marker)), seed=2)
    net, _ = load_marking_network(key.network)
    x, labels, names = real_batch
    cfg = MarkingConfig(steps=10, lambda_img=0.7, augmentation="pad_crop", views=2, batch_size=8)
    marked = mark_batch(net, x, key.carriers[labels], cfg, [image_generator(0, n) for n in names])
    assert (marked.int() - x.int()).abs().max() <= cfg.linf
    with torch.no_grad():
        shift = net.features(marked.float() / 255) - net.features(x.float() / 255)
    own = (shift * key.carriers[labels]).sum(1)
    other = (shift * key.carriers[(labels + 1) % 10]).sum(1)
    assert own.mean() > 0 and own.mean() > other.mean() and (own > 0).sum() >= 6, own


def test_mark_folder_with_trained_network(trained_marker, classes, cifar_small, tmp_path):
    key = generate_key(classes, MarkingNetworkSpec("trained", 32, path=str(trained_marker)), seed=2)
    s = mark_folder(cifar_small[0], key, tmp_path / "out", fraction=0.1, seed=0, progress=False,
                    config=MarkingConfig(steps=4, lambda_img=0.7, augmentation="pad_crop"))
    assert s.num_marked == 10 and s.num_marked + s.num_copied == s.num_images
    header = json.loads((tmp_path / "out.record.jsonl").read_text().splitlines()[0])
    assert header["config"]["augmentation"] == "pad_crop" and header["key_fingerprint"] == key.fingerprint
    assert np.isfinite(s.psnr_db_mean)


def _calibration_key(trained_marker, classes):
    return generate_key(classes, MarkingNetworkSpec("trained", 32, path=str(trained_marker)), seed=3)


def test_calibrated_lambda_img_gives_the_target_psnr_and_the_run_the_pilot_s_marks(trained_marker, classes,
                                                                                   cifar_small, tmp_path):
    key = _calibration_key(trained_marker, classes)
    config = MarkingConfig(steps=10, lr=2 / 255, lambda_img=0.7, augmentation="pad_crop")
    cal = calibrate_lambda_img(cifar_small[0], key, 40.0, fraction=0.25, seed=0, config=config, pilot_images=100)
    assert cal.reached and cal.pilot_images == 30  # 3 images a class: the pilot is the whole run
    assert 40.0 <= cal.psnr_db_mean <= 40.15 and (cal.lambda_img, cal.psnr_db_mean) in cal.trials
    s = mark_folder(cifar_small[0], key, tmp_path / "out", fraction=0.25, seed=0, progress=False,
                    config=replace(config, lambda_img=cal.lambda_img))
    assert s.psnr_db_mean == pytest.approx(cal.psnr_db_mean, abs=1e-9)
    higher = calibrate_lambda_img(cifar_small[0], key, 44.0, fraction=0.25, seed=0, config=config, pilot_images=100)
    assert higher.reached and higher.lambda_img > cal.lambda_img and higher.psnr_db_mean >= 44.0


def test_calibration_pilot_size_and_bad_arguments_are_refused(trained_marker, classes, cifar_small):
    key = _calibration_key(trained_marker, classes)
    config = MarkingConfig(steps=2, lambda_img=0.7, augmentation="pad_crop")
    cal = calibrate_lambda_img(cifar_small[0], key, 40.0, fraction=0.25, seed=0, config=config, pilot_images=7,
                               max_trials=2)
    assert cal.pilot_images == 7 and cal.trials[0][0] == 0.7  # the search starts from the configuration's weight
    with pytest.raises(RadioactiveError, match="0 marking steps"):
        calibrate_lambda_img(cifar_small[0], key, 40.0, fraction=0.25, config=replace(config, steps=0))
    for target in (10.0, 95.0):
        with pytest.raises(RadioactiveError, match="target PSNR"):
            calibrate_lambda_img(cifar_small[0], key, target, fraction=0.25, config=config)
    with pytest.raises(RadioactiveError, match="no image would be marked"):
        calibrate_lambda_img(cifar_small[0], key, 40.0, files=[], config=config)


def test_cli_mark_target_psnr_calibrates_lambda_img_and_refuses_both(trained_marker, classes, cifar_small, tmp_path,
                                                                     capsys):
    key_path = _calibration_key(trained_marker, classes).save(tmp_path / "key.safetensors")
    common = ["mark", "--source", str(cifar_small[0]), "--key", str(key_path), "--fraction", "0.25",
              "--preset", "from-scratch", "--steps", "10", "--lr", str(2 / 255)]
    with pytest.raises(SystemExit) as e:
        main([*common, "--output", str(tmp_path / "a"), "--vault", str(tmp_path / "va"), "--target-psnr", "40",
              "--lambda-img", "0.5"])
    assert e.value.code == 2 and "give one of them" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([*common, "--output", str(tmp_path / "b"), "--vault", str(tmp_path / "vb"), "--target-psnr", "40"]) == 0
    err = capsys.readouterr().err
    header = json.loads((tmp_path / "vb" / "record.jsonl").read_text().splitlines()[0])
    assert f"lambda_img {header['config']['lambda_img']:.4g}:" in err and "target 40 dB" in err
    assert header["config"]["lambda_img"] != 0.7 and header["config"]["augmentation"] == "pad_crop"


def _curve(slope=6.5, at=0.6, floor=-math.inf, top=math.inf):
    """A synthetic pilot: mean PSNR linear in log lambda_img (40 dB at ``at``), clipped to [floor, top]; counts calls."""
    calls = []

    def psnr_at(lam):
        calls.append(lam)
        return min(max(40 + slope * math.log(lam / at), floor), top if lam < 5 else math.inf)
    return psnr_at, calls


def test_lambda_search_reaches_a_target_brackets_and_never_repeats_a_weight():
    for lam0, target in ((0.7, 40.5), (0.05, 41.0), (50.0, 39.0)):
        psnr_at, calls = _curve()
        cal = search_lambda(psnr_at, lam0, target, 0.15, 10)
        assert cal.reached and cal.stopped == "tolerance" and target <= cal.psnr_db_mean <= target + 0.15
        assert len(calls) == len(set(calls)) == len(cal.trials) <= (4 if lam0 == 0.7 else 10)
    psnr_at, calls = _curve(slope=20.0, top=45.0)  # the weights above 5 leave images unmarked: PSNR inf
    cal = search_lambda(psnr_at, 8.0, 44.9, 0.01, 10)
    assert len(calls) == len(set(calls)) and cal.psnr_db_mean >= 44.9 and math.isfinite(cal.psnr_db_mean)


def test_lambda_search_says_why_it_stops_short():
    psnr_at, _ = _curve(floor=42.5)  # steps or L-inf bind: no weight gets below 42.5 dB
    cal = search_lambda(psnr_at, 0.7, 40.0, 0.15, 10)
    assert not cal.reached and cal.stopped == "plateau" and cal.psnr_db_mean == 42.5
    assert cal.lambda_img == min(lam for lam, p in cal.trials)  # the strongest marks tried
    step = search_lambda(lambda lam: 39.0 if lam < 1 else 45.0, 0.7, 40.0, 0.15, 10)  # a jump over the target
    assert not step.reached and step.lambda_img >= 1 and step.psnr_db_mean == 45.0 and len(step.trials) <= 10
    few = search_lambda(_curve()[0], 0.7, 40.5, 0.001, 2)  # 41.0 dB, then 36.5 dB: out of trials
    assert not few.reached and few.stopped == "max_trials" and few.lambda_img == 0.7 and len(few.trials) == 2
