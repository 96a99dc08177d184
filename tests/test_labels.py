"""The label-only test: the two-round protocol through an API gives the same result as the model itself, query
names do not reveal the real carrier, and the null of fresh carriers is not liberal."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from radioactive.data import load_rgb
from radioactive.detection import OwnerFiles, SuspectAccess, get_method
from radioactive.detection.labels import LabelConfig, label_statistic, read_label_answers, write_label_queries
from radioactive.errors import RadioactiveError
from radioactive.marking import MARKING_PRESETS, mark_folder
from radioactive.networks import load_runnable
from radioactive.training import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, cifar_small, key):
    """A vault (3 marked images a class, 2 marking steps) and a linear suspect trained on its release."""
    root = tmp_path_factory.mktemp("labels")
    cfg = dataclasses.replace(MARKING_PRESETS["linear"], steps=2)
    mark_folder(cifar_small[0], key, root / "release", vault=root / "vault", fraction=0.25, config=cfg,
                progress=False)
    suspect = train(root / "release", cifar_small[1], root / "suspect.safetensors",
                    TrainConfig(recipe="linear", epochs=1, views=1), progress=False)
    return root, key, suspect.weights


def _answer(folder, model, path, k=3):
    net, meta = load_runnable(model)
    with open(path, "w") as f:
        for p in sorted(folder.iterdir()):
            x = torch.from_numpy(load_rgb(p)).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                top = net(x)[0].argsort(descending=True)[:k].tolist()
            f.write(json.dumps({"path": str(p), "labels": [meta["classes"][i] for i in top]}) + "\n")


def test_answers_equal_the_model(labelled, tmp_path):
    root, key, suspect = labelled
    cfg = LabelConfig(top_k=2, decoy_carriers=5, per_class=2)
    out = write_label_queries(root / "vault", tmp_path / "q", cfg)
    assert out["num_images"] == 2 * 6 * 2 * len(key.classes)
    names = [p.name for p in (tmp_path / "q").iterdir()]
    assert all(len(n) == 20 and n.endswith(".png") for n in names)  # opaque: no carrier index in the name
    _answer(tmp_path / "q", suspect, tmp_path / "answers.jsonl")
    owner = OwnerFiles(key=key, record=root / "vault" / "record.jsonl", vault=root / "vault")
    entry = get_method("labels")
    via_api = entry.run(owner, SuspectAccess.of_labels(tmp_path / "answers.jsonl"), cfg, 1e-3)
    direct = entry.run(owner, SuspectAccess.of_model(suspect), cfg, 1e-3)
    assert via_api.class_log10_pvalues == direct.class_log10_pvalues
    assert via_api.log10_pvalue == direct.log10_pvalue and via_api.validity == "conservative"


def test_missing_answers_refused(labelled, tmp_path):
    root, key, _ = labelled
    write_label_queries(root / "vault", tmp_path / "q", LabelConfig(decoy_carriers=2, per_class=1))
    (tmp_path / "a.jsonl").write_text(json.dumps({"path": "nothing.png", "labels": ["cat"]}) + "\n")
    with pytest.raises(RadioactiveError, match="has no labels for"):
        read_label_answers(tmp_path / "a.jsonl", root / "vault", 1)


def test_statistic_counts_flips_toward_the_class():
    hits = [np.zeros((2, 3, 4), dtype=bool)]
    hits[0][0, 0, :3] = True  # the real carrier's marked images labelled as the class 3 times of 4
    hits[0][1, 0, 0] = True   # its mirrors once
    t = label_statistic(hits)
    assert t.shape == (1, 3) and t[0, 0] == pytest.approx(0.5) and t[0, 1] == 0.0


def test_null_not_liberal(labelled):
    root, key, suspect = labelled
    owner = OwnerFiles(key=key, record=root / "vault" / "record.jsonl")
    lp = get_method("labels").null(owner, SuspectAccess.of_model(suspect), LabelConfig(decoy_carriers=4, per_class=1),
                                   20, 1)
    assert lp.shape == (20,) and np.all(lp <= 0)
    assert np.mean(lp <= np.log10(0.05)) <= 0.25  # 20 samples: an exact test exceeds 0.25 with prob. < 0.3 %
