"""Tests for radioactive.decoys: the decoy-carrier black-box test on real CIFAR-10 images (marking network:
the default EfficientNet-Lite0), with linear-probe suspects that do or do not know the key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from probes import linear_probe  # tests/ is on sys.path (pytest's prepend import mode)

from radioactive.decoys import decoy_carrier_detect, record_marking_config
from radioactive.errors import RadioactiveError
from radioactive.keys import generate_key
from radioactive.marking import MarkingConfig, mark_folder
from radioactive.stats import fisher_log10_pvalue

CFG = MarkingConfig(steps=10, batch_size=32)
N, M = 2, 3


@pytest.fixture(scope="module")
def release(cifar_small, key, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoy") / "released"
    summary = mark_folder(cifar_small[0], key, out, fraction=0.25, seed=5, config=CFG, progress=False)
    return Path(summary.record)


def test_record_marking_config_round_trips(release):
    header = json.loads(release.read_text().splitlines()[0])
    assert record_marking_config(header) == CFG
    with pytest.raises(RadioactiveError, match="config"):
        record_marking_config({})


def test_a_suspect_that_learnt_the_carriers_ranks_first_in_every_class(release, key, tmp_path):
    """Classifier rows along the carriers: marking with the real carrier raises the true class's logit, a decoy
    does not, so the real carrier beats the M decoys and p_k reaches its floor.

    With n = 2 images per class T_k is noisy (measured: the decoys' T_k spread by ~60 around 0, the real carrier's
    is 50 to 180), so the real carrier ranks first in most classes, not in every one: 8, 9 and 9 of 10 with decoy
    seeds 0, 1, 2 of the stream derived from the key. (It ranked first in all 10 with the old stream, by chance.)"""
    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    res = decoy_carrier_detect(release, key, suspect, per_class=N, decoys=M, seed=0)
    assert res.method == "decoy-carrier" and res.validity == "conservative" and len(res.classes) == len(key.classes)
    first = np.isclose(res.class_log10_pvalues, -math.log10(M + 1))
    assert first.sum() >= 8
    assert res.details.smallest_reachable_log10_pvalue == pytest.approx(
        float(fisher_log10_pvalue(np.full(len(key.classes), -math.log10(M + 1)))))
    assert res.details.smallest_reachable_log10_pvalue <= res.log10_pvalue < -0.5
    assert res.details.images_per_class == [N] * len(key.classes) and res.details.decoy_carriers == M
    assert all(r > d for r, d in zip(res.details.real_statistic, res.details.decoy_statistic_mean))
    assert key.fingerprint in res.details.decoy_stream and "decoy carriers" in res.details.decoy_stream


def test_a_suspect_independent_of_the_key_is_not_detected(release, key, tmp_path):
    w = np.random.default_rng(3).standard_normal((len(key.classes), key.dim)) / math.sqrt(key.dim)
    suspect = linear_probe(tmp_path / "v.safetensors", w, key)
    res = decoy_carrier_detect(release, key, suspect, per_class=N, decoys=M, seed=1)
    allowed = {round(math.log10(r / (M + 1)), 9) for r in range(1, M + 2)}
    assert {round(p, 9) for p in res.class_log10_pvalues} <= allowed
    assert not res.detected and res.log10_pvalue > -3
    # the suspect as its own reference: every statistic is 0, every rank ties, p = 1
    res2 = decoy_carrier_detect(release, key, suspect, reference=suspect, per_class=N, decoys=M, seed=1)
    assert res2.log10_pvalue == 0.0 and res2.details.real_statistic == [0.0] * len(key.classes)


def test_wrong_key_and_bad_sizes_raise(release, key, tmp_path):
    other = generate_key(key.classes, seed=99)
    suspect = linear_probe(tmp_path / "s.safetensors", key.carriers.numpy(), key)
    with pytest.raises(RadioactiveError, match="not the one"):
        decoy_carrier_detect(release, other, suspect, per_class=N, decoys=M)
    with pytest.raises(RadioactiveError, match="at least 1"):
        decoy_carrier_detect(release, key, suspect, per_class=0, decoys=M)


def test_cli_decoy_carrier(release, key, tmp_path, capsys):
    from radioactive.cli import main

    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    key.save(tmp_path / "key.safetensors")
    rc = main(["detect", "--method", "decoy-carrier", "--record", str(release), "--key", str(tmp_path / "key.safetensors"),
               "--suspect", str(suspect), "--per-class", str(N), "--decoy-carriers", str(M)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "decoy-carrier" and out["details"]["decoy_carriers"] == M
    assert out["details"]["type"] == "DecoyCarrierDetails" and out["validity"] == "conservative"
    assert np.isclose(out["class_log10_pvalues"], -math.log10(M + 1)).sum() >= 8  # as in the library test above
    assert out["details"]["smallest_reachable_log10_pvalue"] <= out["log10_pvalue"] < -0.5
    (tmp_path / "res.json").write_text(json.dumps(out))  # the HTML report renders this result
    assert main(["report", "--result", str(tmp_path / "res.json"), "--output", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "decoy-carrier" in page and page.count("<tr><td>") == len(key.classes)
    capsys.readouterr()
    # the key is missing: an error (exit status 1), one line naming the flag
    assert main(["detect", "--method", "decoy-carrier", "--record", str(release), "--suspect", str(suspect)]) == 1
    err = capsys.readouterr().err
    assert "--key" in err and len(err.strip().splitlines()) == 1
    # a white-box setting is refused by this method: usage error, exit status 2
    with pytest.raises(SystemExit) as e:
        main(["detect", "--method", "decoy-carrier", "--record", str(release), "--key", str(tmp_path / "key.safetensors"),
              "--suspect", str(suspect), "--decoy-keys", "5"])
    assert e.value.code == 2 and "--decoy-keys does not apply to --method decoy-carrier" in capsys.readouterr().err


def test_classes_restrict_the_test_and_duplicates_are_refused(release, key, tmp_path):
    """The plan's classes reach the decoy-carrier test (they were refused at run time before): only those classes
    are marked and ranked; a class named twice or unknown to the key is refused."""
    suspect = linear_probe(tmp_path / "s.safetensors", 50.0 * key.carriers.numpy(), key)
    res = decoy_carrier_detect(release, key, suspect, per_class=1, decoys=2, seed=0, only_classes=["ship", "cat"])
    assert res.classes == ["cat", "ship"] and len(res.class_log10_pvalues) == 2
    assert res.settings["classes"] == ["ship", "cat"] and res.details.images_per_class == [1, 1]
    with pytest.raises(RadioactiveError, match="more than once"):
        decoy_carrier_detect(release, key, suspect, per_class=1, decoys=2, only_classes=["cat", "cat"])
    with pytest.raises(RadioactiveError, match="not in the key"):
        decoy_carrier_detect(release, key, suspect, per_class=1, decoys=2, only_classes=["unicorn"])
