"""Tests for radioactive.augment.ResizedCropFlip on real CIFAR-10 images."""

from __future__ import annotations

import pytest
import torch
from scipy import stats as sps

from radioactive.augment import ResizedCropFlip


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def images(real_batch):
    return real_batch[0][:4].float() / 255  # (4, 3, 32, 32) in [0, 1]


def test_apply_is_differentiable(images):
    aug = ResizedCropFlip()
    x = images.clone().requires_grad_(True)
    params = aug.draw(_gens(0, 1, 2, 3))
    out = aug.apply(x, params)
    assert out.shape == x.shape and out.dtype == x.dtype
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for b in range(4):  # every image of the batch gets its own nonzero gradient
        assert x.grad[b].abs().sum() > 0
    # the gradient of image b flows only from output b
    x.grad = None
    aug.apply(x, params)[1].sum().backward()
    assert x.grad[[0, 2, 3]].abs().max() == 0 and x.grad[1].abs().sum() > 0


def test_unit_crop_without_flip_is_identity(images):
    aug = ResizedCropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    params = aug.draw(_gens(0, 1, 2, 3))
    torch.testing.assert_close(params[:, :2], torch.ones(4, 2, dtype=torch.float64))
    assert (params[:, 2:] == 0).all()
    out = aug.apply(images, params)
    assert (out - images).abs().max() < 1e-4


def test_unit_crop_with_certain_flip_mirrors(images):
    aug = ResizedCropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    out = aug.apply(images, aug.draw(_gens(0, 1, 2, 3)))
    assert (out - images.flip(-1)).abs().max() < 1e-4
    assert (out - images).abs().max() > 0.1  # real images are not mirror-symmetric


def test_crop_changes_image(images):
    aug = ResizedCropFlip(scale=(0.3, 0.5), flip_p=0.0)
    out = aug.apply(images, aug.draw(_gens(0, 1, 2, 3)))
    assert ((out - images).abs().flatten(1).mean(1) > 0.01).all()
    assert out.min() >= images.min() - 1e-5 and out.max() <= images.max() + 1e-5  # bilinear: no overshoot


def test_params_inside_image_and_in_range():
    aug = ResizedCropFlip(scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)
    p = aug.draw(_gens(*range(2000)))
    w, h, x0, y0, flip = p.unbind(1)
    assert p.shape == (2000, 5) and p.dtype == torch.float64
    assert (w > 0).all() and (h > 0).all() and (w <= 1).all() and (h <= 1).all()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-12).all() and (y0 + h <= 1 + 1e-12).all()
    assert set(flip.unique().tolist()) == {0.0, 1.0}
    unclipped = (w < 1) & (h < 1)
    area = (w * h)[unclipped]
    assert area.min() >= 0.5 - 1e-9 and area.max() <= 1.0 + 1e-9
    r = (w / h)[unclipped]
    assert r.min() >= 3 / 4 - 1e-9 and r.max() <= 4 / 3 + 1e-9


def test_params_depend_only_on_own_generator():
    aug = ResizedCropFlip()
    g_alone = _gens(42)
    alone = [aug.draw(g_alone) for _ in range(3)]
    gens = _gens(7, 42, 8, 9, 10)
    crowded = [aug.draw(gens) for _ in range(3)]
    for a, c in zip(alone, crowded):
        assert torch.equal(a[0], c[1])
    assert not torch.equal(crowded[0][0], crowded[0][1])  # different seeds, different draws
    assert not torch.equal(alone[0], alone[1])  # successive draws advance the generator
    # and the global RNG plays no part
    torch.manual_seed(0)
    a = aug.draw(_gens(3))
    torch.manual_seed(1)
    assert torch.equal(a, aug.draw(_gens(3)))


@pytest.mark.parametrize("flip_p", [0.0, 0.3, 0.5, 1.0])
def test_flip_rate(flip_p):
    aug = ResizedCropFlip(flip_p=flip_p)
    n = 4000
    gen = _gens(11)
    flips = torch.cat([aug.draw(gen)[:, 4] for _ in range(n)])
    count = int(flips.sum())
    if flip_p in (0.0, 1.0):
        assert count == flip_p * n
    else:
        lo, hi = sps.binom.interval(0.999, n, flip_p)
        assert lo <= count <= hi, (count, lo, hi)


def test_flip_applied_per_image(images):
    aug = ResizedCropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5)
    params = aug.draw(_gens(4, 5, 6, 7))
    assert 0 < params[:, 4].sum() < 4  # these seeds give both flipped and kept images
    out = aug.apply(images, params)
    for b in range(4):
        ref = images[b].flip(-1) if params[b, 4] > 0.5 else images[b]
        assert (out[b] - ref).abs().max() < 1e-4
