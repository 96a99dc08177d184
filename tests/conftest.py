"""Shared fixtures: a small real CIFAR-10 subset, the marking network, a key.

The subset is copied from ``../shared/data/cifar10-jpeg.tar.gz`` through
:func:`radioactive.data.cifar10_subset` (the archive is extracted once into
the user cache). Torch runs on one thread by default: the batches here are
tiny, and a second thread only adds contention on a busy 2-core machine
(set ``RADIOACTIVE_TEST_THREADS`` to change it).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from radioactive.data import cifar10_subset, list_image_folder, load_rgb
from radioactive.errors import RadioactiveError
from radioactive.keys import generate_key
from radioactive.networks import MarkingNetworkSpec, load_marking_network

TRAIN_PER_CLASS = 12
TEST_PER_CLASS = 6

torch.set_num_threads(int(os.environ.get("RADIOACTIVE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory):
    """(train_dir, test_dir): the first 12 train and 6 test images of every CIFAR-10 class."""
    try:
        train, test = cifar10_subset(tmp_path_factory.mktemp("cifar_small"), TRAIN_PER_CLASS, TEST_PER_CLASS)
    except RadioactiveError as e:  # the archive is part of the project's shared data
        pytest.fail(f"CIFAR-10 archive unavailable: {e}")
    return train, test


@pytest.fixture(scope="session")
def classes(cifar_small):
    return list(list_image_folder(cifar_small[0]).classes)


@pytest.fixture(scope="session")
def marking_net():
    """(network, spec) of the default marking network (EfficientNet-Lite0 at 64 px, D = 1280)."""
    return load_marking_network(MarkingNetworkSpec())


@pytest.fixture(scope="session")
def key(classes):
    return generate_key(classes, seed=1)


@pytest.fixture(scope="session")
def real_batch(cifar_small):
    """8 real train images (one of each of 8 classes): uint8 (8, 3, 32, 32), labels (8,), relative names."""
    folder = list_image_folder(cifar_small[0])
    idx = [folder.labels.index(k) for k in range(8)]
    imgs = np.stack([load_rgb(folder.path(i)) for i in idx])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([folder.labels[i] for i in idx]), [folder.files[i] for i in idx]
