"""The detection family (issue 16): the registry, one result type and its verdict, Holm's combination, the decoy
streams, the refusals (duplicate classes, marked alignment images, another key's record) and ``radioactive audit``
end to end on real CIFAR-10 images."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from probes import linear_probe  # tests/ is on sys.path (pytest's prepend import mode)

from radioactive.cli import main
from radioactive.data import list_image_folder
from radioactive.detection import (ACCESS, DETAILS, PRIVATE_FILES, VALIDITIES, DetectionResult, MethodEntry,
                                   get_method, list_methods, register_method)
from radioactive.detection.access import check_alignment_images, check_unique, derived_rng
from radioactive.detection.audit import holm
from radioactive.detection.result import (ControlDetails, DecoyCarrierDetails, DecoyKeys, GradientDetails,
                                          MembershipDetails, PairedDetails, WhiteBoxDetails)
from radioactive.errors import RadioactiveError
from radioactive.keys import generate_key, random_carriers
from radioactive.marking import MarkingConfig, mark_folder

FAST = MarkingConfig(steps=2, batch_size=32)


# ----------------------------------------------------------------------------- registry


def test_every_registered_method_declares_validity_config_access_and_files():
    names = list_methods()
    assert {"white-box", "gradient", "decoy-carrier", "black-box", "paired", "membership"} <= set(names)
    for name in names:
        e = get_method(name)
        assert e.name == name and callable(e.run) and e.summary
        assert e.validity in VALIDITIES
        assert dataclasses.is_dataclass(e.config) and e.config.__dataclass_params__.frozen
        cfg = e.defaults()
        for f in dataclasses.fields(cfg)[:1]:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(cfg, f.name, None)
        assert e.access and set(e.access) <= set(ACCESS)
        assert set(e.reads) <= set(PRIVATE_FILES) and set(e.optional) <= set(e.reads)
        assert e.validity != "descriptive" or e.null is None  # nothing to calibrate without a null
    assert get_method("paired").validity == "descriptive" and "paired" not in list_methods(valid_only=True)
    assert get_method("gradient").validity == get_method("white-box").validity == "exact"
    assert get_method("black-box").validity == "approximate"  # Mann-Whitney's normal approximation
    assert get_method("decoy-carrier").validity == get_method("membership").validity == "conservative"


def test_list_methods_by_access():
    outputs = list_methods(access="outputs")
    assert not {"white-box", "gradient", "decoy-carrier"} & set(outputs)
    assert {"black-box", "membership", "paired"} <= set(outputs)
    assert {"white-box", "gradient", "decoy-carrier", "black-box"} <= set(list_methods(access="weights"))
    runnable = list_methods(access="runnable")  # e.g. ONNX: it runs, but its weights cannot be read
    assert "white-box" not in runnable and "decoy-carrier" in runnable and "black-box" in runnable
    with pytest.raises(RadioactiveError, match="access must be one of"):
        list_methods(access="telepathy")
    with pytest.raises(RadioactiveError, match="unknown detection method 'nope'.*gradient"):
        get_method("nope")


def test_register_method_refuses_bad_entries():
    @dataclasses.dataclass(frozen=True)
    class Frozen:
        x: int = 0

    @dataclasses.dataclass
    class Mutable:
        x: int = 0

    base = dict(run=lambda *a: None, access=("outputs",), reads=("record",), validity="exact", config=Frozen,
                summary="test entry")
    with pytest.raises(RadioactiveError, match="registered twice"):
        register_method(MethodEntry(name="gradient", **base))
    with pytest.raises(RadioactiveError, match="validity"):
        register_method(MethodEntry(name="t-validity", **{**base, "validity": "probably"}))
    with pytest.raises(RadioactiveError, match="frozen"):
        register_method(MethodEntry(name="t-frozen", **{**base, "config": Mutable}))
    with pytest.raises(RadioactiveError, match="unknown access or private file"):
        register_method(MethodEntry(name="t-files", **{**base, "reads": ("diary",)}))
    assert not {"t-validity", "t-frozen", "t-files"} & set(list_methods())


# ----------------------------------------------------------------------------- Holm


def test_holm_hand_computed():
    """p = (0.01, 0.04, 0.03): sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)."""
    adjusted = holm(np.log10([0.01, 0.04, 0.03]))
    np.testing.assert_allclose(10**adjusted, [0.03, 0.06, 0.06], rtol=1e-12)
    # capped at 1, never below the raw p-value, in the input order
    lp = np.log10([0.5, 1e-30, 0.9, 0.2])
    adj = holm(lp)
    assert (adj >= lp).all() and (adj <= 0).all() and adj[2] == 0.0
    assert adj[1] == pytest.approx(-30 + math.log10(4))
    assert holm([-3.0]).tolist() == [-3.0]  # one test: unchanged
    assert holm([-400.0, -500.0]).tolist() == pytest.approx([-400.0, -500.0 + math.log10(2)])  # no underflow


# ----------------------------------------------------------------------------- one result type, one verdict


def _result(details, validity="exact", log10_pvalue=-5.0, **kw) -> DetectionResult:
    return DetectionResult(method="m", validity=validity, log10_pvalue=log10_pvalue, alpha=1e-3, classes=["a", "b"],
                           details=details, key_fingerprint="0123456789abcdef", **kw)


def test_descriptive_results_never_give_a_verdict_and_p_values_need_a_valid_null():
    eff = DetectionResult(method="paired", validity="descriptive", log10_pvalue=None, alpha=0.5, classes=["a"],
                          details=PairedDetails(pairs=10, median_loss_difference=5.0, fraction_positive=1.0))
    assert eff.detected is None and eff.verdict().startswith("no verdict") and "DETECTED" not in eff.verdict()
    assert eff.to_dict()["detected"] is None and eff.to_dict()["pvalue"] == "n/a (descriptive)"
    with pytest.raises(RadioactiveError, match="descriptive result has no p-value"):
        DetectionResult(method="paired", validity="descriptive", log10_pvalue=-10.0, alpha=1e-3, classes=["a"])
    for validity in ("exact", "conservative", "approximate"):
        with pytest.raises(RadioactiveError, match="descriptive result has no p-value"):
            DetectionResult(method="x", validity=validity, log10_pvalue=None, alpha=1e-3, classes=["a"])
    with pytest.raises(RadioactiveError, match="validity must be one of"):
        DetectionResult(method="x", validity="plausible", log10_pvalue=-1.0, alpha=1e-3, classes=["a"])
    for bad in (0.5, math.nan, -math.inf):
        with pytest.raises(RadioactiveError, match="finite and <= 0"):
            DetectionResult(method="x", validity="exact", log10_pvalue=bad, alpha=1e-3, classes=["a"])
    hit = _result(None, log10_pvalue=-5.0)
    miss = _result(None, log10_pvalue=-2.0)
    assert hit.detected is True and hit.verdict().startswith("DETECTED")
    assert miss.detected is False and miss.verdict().startswith("not detected")
    hit.exploratory = ["temperature: 2.0 -> 4.0"]
    assert "EXPLORATORY" in hit.verdict()


ALL_DETAILS = [
    WhiteBoxDetails(0.99, 0.3, 60, 0.1, "weak", DecoyKeys(3, "stream", -0.6, [-0.1, -0.2, -0.3])),
    WhiteBoxDetails(),
    GradientDetails("r.jsonl", ["ref.safetensors"], ["ab" * 32], 2.0, [3, 3]),
    DecoyCarrierDetails(["ref"], [None], [2, 2], 29, "stream", [1.0, 2.0], [0.1, 0.2], [0.5, 0.6], -2.9, 240),
    ControlDetails(30, 30, 0.2, -0.1, None, 180),
    PairedDetails(30, 0.6, 1.0, {"cat": 0.6, "ship": 0.5}, 0.3, 180),
    MembershipDetails(0.2, 90, 30, 0.5, 1.2, 120),
]


@pytest.mark.parametrize("details", ALL_DETAILS, ids=lambda d: type(d).__name__ + ("-empty" if d == WhiteBoxDetails()
                                                                                  else ""))
def test_results_round_trip_with_every_details_type(details, tmp_path):
    validity = "descriptive" if isinstance(details, PairedDetails) else "conservative"
    res = _result(details, validity=validity, log10_pvalue=None if validity == "descriptive" else -4.25,
                  cosines=[0.1, -0.2], class_log10_pvalues=[-2.0, -0.1], settings={"classes": None},
                  exploratory=["x: 1 -> 2"])
    path = res.save(tmp_path / "r.json")
    text = path.read_text()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert d["schema"] == 2 and d["details"]["type"] == type(details).__name__
    back = DetectionResult.load(path)
    assert back == res and type(back.details) is type(details) and back.to_dict() == res.to_dict()
    assert set(DETAILS) >= {type(details).__name__}


def test_json_is_strict_and_the_schema_is_checked(tmp_path):
    bad = _result(ControlDetails(median_loss_difference_released=math.nan))
    with pytest.raises(ValueError, match="JSON compliant"):
        bad.save(tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()
    good = _result(GradientDetails()).to_dict()
    for schema in (1, None, 3):
        (tmp_path / "old.json").write_text(json.dumps({**good, "schema": schema}))
        with pytest.raises(RadioactiveError, match="schema 2"):
            DetectionResult.load(tmp_path / "old.json")
    (tmp_path / "typed.json").write_text(json.dumps({**good, "details": {"type": "Extra", "x": 1}}))
    with pytest.raises(RadioactiveError, match="unknown details type"):
        DetectionResult.load(tmp_path / "typed.json")


# ----------------------------------------------------------------------------- duplicate classes


def test_duplicate_classes_refused():
    with pytest.raises(RadioactiveError, match=r"more than once: \['cat'\]"):
        check_unique(["cat", "dog", "cat"])
    with pytest.raises(RadioactiveError, match="empty"):
        check_unique([])
    check_unique(["cat", "dog"])
    check_unique(None)


# ----------------------------------------------------------------------------- decoy streams


def test_decoy_carriers_never_coincide_with_the_keys(classes, monkeypatch, cifar_small, tmp_path):
    """Issue 16: decoys drawn with torch.Generator().manual_seed(seed), like keys, reproduced the carriers of a key
    drawn with the same seed (cosine 1). They now come from a stream derived from the key's fingerprint."""
    from radioactive.detection import decoys as decoy_module
    from radioactive.detection import detect
    from radioactive.detection import whitebox as whitebox_module

    key0 = generate_key(classes, seed=0)
    u = key0.carriers.numpy().astype(np.float64)
    old_stream = random_carriers(len(classes), key0.dim, torch.Generator().manual_seed(0)).numpy()
    assert np.abs(old_stream @ u.T).max() == pytest.approx(1.0, abs=1e-6)  # what the old code drew

    # white-box decoy keys, through detect()
    drawn = []
    real_unit = whitebox_module.unit_vectors
    monkeypatch.setattr(whitebox_module, "unit_vectors", lambda rng, n, d: drawn.append(real_unit(rng, n, d)) or drawn[-1])
    probe = linear_probe(tmp_path / "probe.safetensors", 50.0 * u, key0)
    res = detect(probe, key0, cifar_small[1], ridge=0.1, decoys=20, decoy_seed=0)
    assert len(drawn) == 20 and res.details.decoys.num_keys == 20
    assert key0.fingerprint in res.details.decoys.stream
    decoys = np.concatenate(drawn)
    assert np.abs(decoys @ u.T).max() < 0.5  # ~0.1 for independent unit vectors in D = 1280
    assert max(res.details.decoys.log10_pvalues) > res.log10_pvalue + 10  # no decoy key reads like the real one

    # decoy carriers of the decoy-carrier test, through decoy_marks() (marking replaced by the identity)
    folder = list_image_folder(cifar_small[0])
    files = [folder.files[folder.labels.index(k)] for k in range(len(classes))]
    summary = mark_folder(cifar_small[0], key0, tmp_path / "rel", record=tmp_path / "r.record.jsonl", files=files,
                          config=MarkingConfig(steps=1), progress=False)
    used = []

    def identity_marking(net, x, carriers, cfg, gens):
        used.append(carriers.double().numpy())
        return x

    monkeypatch.setattr(decoy_module, "mark_batch", identity_marking)
    marks = decoy_module.decoy_marks(summary.record, key0, per_class=1, decoys=5, seed=0)
    assert len(marks.classes) == len(classes)
    rows = np.concatenate(used)
    real = np.abs(rows @ u.T).max(1) > 1 - 1e-6  # row 0 of each class is its real carrier
    assert real.sum() == len(classes)
    assert np.abs(rows[~real] @ u.T).max() < 0.5
    # the two tests' streams differ, and so do the streams of different seeds
    a = derived_rng(key0.fingerprint, "decoy carriers", 0).standard_normal(4)
    assert not np.allclose(a, derived_rng(key0.fingerprint, "white-box decoy keys", 0).standard_normal(4))
    assert not np.allclose(a, derived_rng(key0.fingerprint, "decoy carriers", 1).standard_normal(4))
    assert np.array_equal(a, derived_rng(key0.fingerprint, "decoy carriers", 0).standard_normal(4))


# ----------------------------------------------------------------------------- alignment images, another key's record


@pytest.fixture(scope="module")
def small_release(cifar_small, key, tmp_path_factory):
    """One marked image a class (2 steps), into a plain record."""
    tmp = tmp_path_factory.mktemp("small-release")
    folder = list_image_folder(cifar_small[0])
    files = [folder.files[folder.labels.index(k)] for k in range(len(folder.classes))]
    summary = mark_folder(cifar_small[0], key, tmp / "released", record=tmp / "r.record.jsonl", files=files,
                          config=FAST, progress=False)
    return tmp / "released", Path(summary.record)


def test_marked_alignment_images_are_refused(small_release, key, cifar_small, tmp_path):
    """Issue 16: an alignment fitted on the released (marked) copy made a clean model read p 1.8e-3."""
    from radioactive.detection import detect

    released, record = small_release
    folder = list_image_folder(released)
    check_alignment_images([folder.path(i) for i in range(len(folder))], None)  # without the record: cannot tell
    vanilla = list_image_folder(cifar_small[1])
    check_alignment_images([vanilla.path(i) for i in range(len(vanilla))], record)  # vanilla images pass
    with pytest.raises(RadioactiveError, match="10 of the alignment images are marked images of the record"):
        check_alignment_images([folder.path(i) for i in range(len(folder))], record)
    probe = linear_probe(tmp_path / "probe.safetensors", np.random.default_rng(0).standard_normal((10, key.dim)), key)
    with pytest.raises(RadioactiveError, match="marked images of the record"):
        detect(probe, key, released, ridge=0.1, record=record)


def test_report_refuses_a_record_of_another_key(small_release, capsys, tmp_path):
    _, record = small_release
    res = _result(GradientDetails())  # computed with key 0123456789abcdef, not the record's
    res.save(tmp_path / "r.json")
    assert main(["report", "--result", str(tmp_path / "r.json"), "--record", str(record),
                 "--output", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert "marked with key" in err and "0123456789abcdef" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


# ----------------------------------------------------------------------------- radioactive audit, end to end


@pytest.fixture(scope="module")
def audit_vault_run(cifar_small, key, tmp_path_factory):
    """A vault with holdout and withheld images (3 a class each, 2 marking steps), and a suspect whose classifier
    rows are the carriers (weights access)."""
    tmp = tmp_path_factory.mktemp("audit")
    vault = tmp / "vault"
    summary = mark_folder(cifar_small[0], key, tmp / "release", vault=vault, fraction=0.25, holdout_fraction=0.25,
                          withhold_fraction=0.25, seed=0, config=FAST, progress=False)
    suspect = linear_probe(tmp / "suspect.safetensors", 50.0 * key.carriers.numpy(), key)
    return vault, suspect, summary


@pytest.mark.slow
def test_audit_end_to_end(audit_vault_run, tmp_path, capsys):
    vault, suspect, summary = audit_vault_run
    # the plan, fixed before testing: four tests (decoy-carrier left out: it marks images at test time)
    assert main(["plan", "--vault", str(vault), "--methods", "white-box,gradient,black-box,membership"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(plan["methods"]) == ["black-box", "gradient", "membership", "white-box"]
    assert main(["plan", "--vault", str(vault), "--classes", "cat,cat"]) == 1  # a class twice: refused
    assert "more than once" in capsys.readouterr().err

    out = tmp_path / "audit.json"
    assert main(["audit", "--vault", str(vault), "--suspect", str(suspect), "--output", str(out),
                 "--commitment", summary.commitment]) == 0
    printed = json.loads(capsys.readouterr().out)
    audit = json.loads(out.read_text())
    assert printed == audit and audit["kind"] == "radioactive-audit"
    # one verdict, from the tests that could run
    assert audit["detected"] is True and audit["verdict"].startswith("DETECTED") and not audit["exploratory"]
    tests = {t["method"]: t for t in audit["tests"]}
    assert sorted(tests) == ["black-box", "gradient", "membership"]
    assert all(t["validity"] != "descriptive" for t in tests.values())
    assert "white-box" in audit["not_run"] and "images" in audit["not_run"]["white-box"]  # no --images given
    m = len(tests)
    for name, t in tests.items():
        adjusted = audit["adjusted_log10_pvalues"][name]
        assert t["log10_pvalue"] <= adjusted <= 0
    strongest = min(tests, key=lambda n: tests[n]["log10_pvalue"])
    assert strongest == "gradient" and tests["gradient"]["log10_pvalue"] < -10
    assert audit["log10_pvalue"] == pytest.approx(tests["gradient"]["log10_pvalue"] + math.log10(m))
    assert audit["vault"]["commitment_matches"] is True and not audit["vault"]["manifest_problems"]

    # a setting changed at audit time is recorded, and marks the audit exploratory
    out2 = tmp_path / "audit-t4.json"
    assert main(["audit", "--vault", str(vault), "--suspect", str(suspect), "--temperature", "4",
                 "--output", str(out2)]) == 0
    capsys.readouterr()
    audit2 = json.loads(out2.read_text())
    assert audit2["exploratory"] == ["gradient.temperature: 2.0 -> 4.0"] and "EXPLORATORY" in audit2["verdict"]
    t2 = {t["method"]: t for t in audit2["tests"]}
    assert t2["gradient"]["exploratory"] and t2["gradient"]["settings"]["temperature"] == 4.0
    assert not t2["black-box"]["exploratory"]  # the control test does not read the temperature
    # a setting no planned test takes is refused
    assert main(["audit", "--vault", str(vault), "--suspect", str(suspect), "--ridge", "0.1",
                 "--decoy-carriers", "5"]) == 1
    assert "apply to no test of the plan" in capsys.readouterr().err


def test_audit_needs_a_vault_and_a_suspect(audit_vault_run, capsys):
    vault, suspect, _ = audit_vault_run
    with pytest.raises(SystemExit) as e:
        main(["audit", "--suspect", str(suspect)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--vault" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["audit", "--vault", str(vault)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--suspect" in err and len(err.strip().splitlines()) == 1
