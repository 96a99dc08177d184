"""Withheld images and the black-box membership test (mark --withhold-fraction, detect --method membership)."""

from __future__ import annotations

import json

import pytest

from radioactive.blackbox import membership_detect, read_record, read_withheld
from radioactive.cli import main
from radioactive.data import list_image_folder
from radioactive.errors import RadioactiveError
from radioactive.marking import MarkingConfig, mark_folder
from radioactive.training import TrainConfig, train

FAST = MarkingConfig(steps=2, batch_size=32)


@pytest.fixture(scope="module")
def withheld_run(cifar_small, key, tmp_path_factory):
    out = tmp_path_factory.mktemp("withheld") / "released"
    s = mark_folder(cifar_small[0], key, out, fraction=0.1, withhold_fraction=0.25, seed=0, config=FAST,
                    progress=False)
    return out, out.parent / "released.record.jsonl", s


def test_withheld_images_are_not_released_and_every_file_is_accounted_for(withheld_run, cifar_small):
    out, record, s = withheld_run
    source = list_image_folder(cifar_small[0])
    assert s.num_withheld == 30  # 3 of each class's 12
    assert s.num_marked + s.num_copied + s.num_withheld + s.num_skipped == s.num_images == len(source)
    released = {p.relative_to(out).with_suffix("").as_posix() for p in out.rglob("*.png")}
    _, withheld = read_withheld(record)
    names = {p.relative_to(cifar_small[0].resolve()).with_suffix("").as_posix() for p, _ in withheld}
    assert len(names) == 30 and not names & released
    assert len(released) == len(source) - 30
    _, entries = read_record(record)  # marked entries only, none withheld
    marked = {e.source.relative_to(cifar_small[0].resolve()).with_suffix("").as_posix() for e in entries}
    assert len(entries) == s.num_marked and not marked & names
    header = json.loads(record.read_text().splitlines()[0])
    assert header["withhold_fraction"] == 0.25


def test_membership_test_detects_a_model_trained_on_the_release_and_not_one_trained_on_everything(
        withheld_run, cifar_small, tmp_path):
    out, record, _ = withheld_run
    recipe = TrainConfig(recipe="linear", epochs=300, views=1, lr=1e-2, seed=0)  # memorises its 90 images
    suspect = train(out, cifar_small[1], tmp_path / "suspect.safetensors", recipe, progress=False).weights
    control = train(cifar_small[0], cifar_small[1], tmp_path / "control.safetensors", recipe, progress=False).weights
    hit = membership_detect(record, suspect)
    null = membership_detect(record, control)
    assert hit.method == "membership" and hit.validity == "conservative" and hit.details.num_withheld == 30
    assert hit.log10_pvalue < -3 and hit.detected, hit.details
    assert hit.details.median_loss_withheld > hit.details.median_loss_released
    assert hit.details.statistic > 0 and hit.to_dict()["details"]["type"] == "MembershipDetails"
    assert null.log10_pvalue > -2 and not null.detected, null.details
    assert "trained on the release" in hit.verdict()


def test_membership_cli_and_a_record_without_withheld_images(withheld_run, cifar_small, key, tmp_path, capsys):
    _, record, _ = withheld_run
    with pytest.raises(RadioactiveError, match="no withheld"):
        plain = tmp_path / "plain"
        mark_folder(cifar_small[0], key, plain, fraction=0.1, seed=0, config=FAST, progress=False)
        membership_detect(tmp_path / "plain.record.jsonl", outputs=record)
    with pytest.raises(SystemExit) as e:  # needs a suspect or outputs: a usage error
        main(["detect", "--method", "membership", "--record", str(record)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "give the suspect: --suspect" in err and len(err.strip().splitlines()) == 1
    # membership does not take classes, nor another test's settings: usage errors, one line each
    for extra in (["--classes", "cat"], ["--temperature", "4"]):
        with pytest.raises(SystemExit) as e:
            main(["detect", "--method", "membership", "--record", str(record), "--outputs", str(record), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{extra[0]} does not apply to --method membership" in err
        assert len(err.strip().splitlines()) == 1
