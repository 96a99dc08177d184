"""Tests for radioactive.blackbox: the loss, the paired effect size (descriptive) and the control test, the private record, marking with a
withheld (holdout) set on real CIFAR-10 images, black-box detection from an outputs file or a runnable suspect,
and the ``detect --method black-box`` command line."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats as sps

from radioactive.blackbox import (blackbox_detect, control_test, default_mirror_dir, membership_test, mirror_image,
                                  paired_effect, read_outputs_file, read_record, true_class_loss, write_mirror_images)
from radioactive.data import list_image_folder, load_rgb
from radioactive.detection import DetectionResult
from radioactive.errors import RadioactiveError
from radioactive.marking import MarkingConfig, mark_folder, output_name, select_holdout, select_marked
from radioactive.networks import Preprocessing

FAST = MarkingConfig(steps=3, batch_size=32)
K = 10
PER_CLASS = 12  # cifar_small train images per class
FRACTION = HOLDOUT = 0.25


# ----------------------------------------------------------------------------- true_class_loss


def test_true_class_loss_logits_matches_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, K)) * 5
    logits[0] += 500  # large logits: the log-sum-exp must not overflow
    labels = rng.integers(0, K, 50)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), reduction="none")
    loss = true_class_loss(logits, labels, "logits")
    assert loss.dtype == np.float64 and loss.shape == (50,)
    np.testing.assert_allclose(loss, ref.numpy(), rtol=1e-12, atol=1e-12)
    assert (loss >= 0).all()


def test_true_class_loss_probs_is_minus_log_p():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(K), size=40)
    labels = rng.integers(0, K, 40)
    loss = true_class_loss(p, labels, "probs")
    np.testing.assert_allclose(loss, -np.log(p[np.arange(40), labels]), rtol=1e-12)
    # a zero probability gives a large finite loss, not inf
    p[0, labels[0]] = 0.0
    assert np.isfinite(true_class_loss(p, labels, "probs")[0])


def test_true_class_loss_non_finite_rows_are_nan():
    rng = np.random.default_rng(2)
    o = rng.standard_normal((5, K))
    o[1, 3] = np.nan
    o[2, 0] = np.inf
    o[3, 7] = -np.inf
    labels = np.array([0, 1, 2, 3, 4])
    for kind in ("logits", "probs"):
        loss = true_class_loss(np.abs(o) if kind == "probs" else o, labels, kind)
        assert np.isnan(loss[[1, 2, 3]]).all()
        assert np.isfinite(loss[[0, 4]]).all()


def test_true_class_loss_bad_kind_raises():
    with pytest.raises(RadioactiveError, match="logits"):
        true_class_loss(np.zeros((2, K)), np.array([0, 1]), "softmax")


def _force_underflow(monkeypatch, name):
    """Make scipy's test report p = 0, so that the log-tail branch is used on data where p is representable."""
    real, calls = getattr(sps, name), []

    def zero_p(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(res.pvalue)
        return type(res)(res.statistic, 0.0)

    monkeypatch.setattr(sps, name, zero_p)
    return calls


def test_underflow_branch_agrees_with_scipy_where_both_apply(monkeypatch):
    rng = np.random.default_rng(7)
    d = rng.standard_normal(2000) + 0.4
    other = rng.standard_normal(2000)

    def run():
        return control_test(d, other)[0]

    regular = run()
    assert -300 < regular < -20  # representable: scipy's own p-value was used
    calls = _force_underflow(monkeypatch, "mannwhitneyu")
    tail = run()
    assert len(calls) == 1 and calls[0] > 0  # scipy ran, reported p = 0: the log-tail branch gave `tail`
    assert tail == pytest.approx(regular, rel=2e-3)


# ----------------------------------------------------------------------------- control_test


def test_control_test_shift_gives_small_p():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(40) + 1.5
    b = rng.standard_normal(40)
    lp, med_b = control_test(a, b)
    assert lp < -6
    assert med_b == pytest.approx(np.median(b))
    assert control_test(b, a)[0] > -0.01  # one-sided


def test_control_test_exchangeable_is_uniform():
    ps = []
    for i in range(300):
        rng = np.random.default_rng(1000 + i)
        ps.append(10 ** control_test(rng.standard_normal(30), rng.standard_normal(30))[0])
    ps = np.array(ps)
    assert ((ps > 0) & (ps <= 1)).all()
    assert sps.kstest(ps, "uniform").pvalue > 0.001
    lo, hi = sps.binom.interval(0.99, 300, 0.05)
    assert lo <= int((ps < 0.05).sum()) <= hi


def test_control_test_ties_and_empty_sides():
    const = np.full(20, 0.7)
    assert control_test(const, const.copy())[0] == 0.0
    assert control_test(np.array([]), np.arange(5.0))[0] == 0.0
    assert control_test(np.arange(5.0), np.array([])) == (0.0, 0.0)
    assert control_test(np.full(4, np.nan), np.arange(5.0))[0] == 0.0  # non-finite values dropped


def test_control_test_underflow_branch_finite():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal(3000) + 3, rng.standard_normal(3000)
    lp, _ = control_test(a, b)
    lp2, _ = control_test(a + 1, b)
    assert math.isfinite(lp) and lp < -330 and lp2 < lp


# ----------------------------------------------------------------------------- read_record


def _fake_record(tmp_path, lines, header_extra=None):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "cat").mkdir(parents=True, exist_ok=True)
    (out / "cat").mkdir(parents=True, exist_ok=True)
    header = {"kind": "radioactive-record", "schema": 1, "source": str(src), "output": str(out),
              "holdout": None, "key_fingerprint": "0123456789abcdef", **(header_extra or {})}
    rec = tmp_path / "r.record.jsonl"
    rec.write_text("\n".join(json.dumps(x) for x in [header, *lines]) + "\n")
    return rec, src, out


def _line(source="cat/a.jpg", output="cat/a.png", released=True):
    return {"source": source, "output": output, "class": "cat", "carrier_index": 3, "released": released}


def test_read_record_resolves_paths(tmp_path):
    rec, src, out = _fake_record(tmp_path, [_line(), _line("cat/b.jpg", "cat/b.png", released=False)])
    header, entries = read_record(rec)
    assert header["kind"] == "radioactive-record"
    assert entries[0].source == (src / "cat/a.jpg").resolve() and entries[0].output == (out / "cat/a.png").resolve()
    assert entries[0].label == 3 and entries[0].class_name == "cat" and entries[0].released
    # a withheld image's marked version is beside the record, in <record stem>.holdout/
    assert not entries[1].released
    assert entries[1].output == (tmp_path / "r.record.holdout" / "cat/b.png").resolve()


@pytest.mark.parametrize("field", ["source", "output"])
@pytest.mark.parametrize("released", [True, False])
@pytest.mark.parametrize("bad", ["../escape.png", "cat/../../escape.png", "/etc/passwd"])
def test_read_record_refuses_escaping_paths(tmp_path, field, released, bad):
    rec, _, _ = _fake_record(tmp_path, [_line(), {**_line(released=released), field: bad}])
    with pytest.raises(RadioactiveError, match="escapes"):
        read_record(rec)


def test_read_record_refuses_non_records(tmp_path):
    with pytest.raises(RadioactiveError, match="not found"):
        read_record(tmp_path / "absent.jsonl")
    for i, text in enumerate(["", "not json at all\n", json.dumps({"kind": "something-else"}) + "\n",
                              json.dumps({"path": "x.png", "logits": [1, 2]}) + "\n"]):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(text)
        with pytest.raises(RadioactiveError, match="not a radioactive record"):
            read_record(bad)


def test_read_record_malformed_entry_raises_radioactive_error(tmp_path):
    line = _line()
    del line["carrier_index"]
    rec, _, _ = _fake_record(tmp_path, [line])
    with pytest.raises(RadioactiveError):
        read_record(rec)


# ----------------------------------------------------------------------------- mark_folder with a holdout set


@pytest.fixture(scope="module")
def holdout_run(cifar_small, key, tmp_path_factory):
    parent = tmp_path_factory.mktemp("bb-released")
    out = parent / "released"
    summary = mark_folder(cifar_small[0], key, out, fraction=FRACTION, holdout_fraction=HOLDOUT, seed=3,
                          config=FAST, progress=False)
    record = Path(summary.record)
    lines = [json.loads(s) for s in record.read_text().splitlines()]
    return {"summary": summary, "output": out, "record": record, "header": lines[0], "entries": lines[1:],
            "source": cifar_small[0]}


def test_mark_folder_holdout_record_and_summary(holdout_run, key):
    s, header, entries = holdout_run["summary"], holdout_run["header"], holdout_run["entries"]
    per = int(round(HOLDOUT * PER_CLASS))
    assert per == 3
    assert s.num_images == K * PER_CLASS
    assert s.num_marked == K * per and s.num_holdout == K * per
    assert s.num_copied == s.num_images - s.num_marked  # holdout images are released (vanilla)
    released = [e for e in entries if e["released"] is True]
    withheld = [e for e in entries if e["released"] is False]
    assert len(released) + len(withheld) == len(entries)
    for group in (released, withheld):
        counts = {c: sum(e["class"] == c for e in group) for c in key.classes}
        assert counts == {c: per for c in key.classes}
    assert not {e["source"] for e in released} & {e["source"] for e in withheld}
    assert len({e["source"] for e in entries}) == len(entries)
    hold_dir = holdout_run["record"].parent / f"{holdout_run['record'].stem}.holdout"
    assert Path(header["holdout"]) == hold_dir.resolve() and header["holdout_fraction"] == HOLDOUT


def test_mark_folder_holdout_files(holdout_run):
    src, out, record = holdout_run["source"], holdout_run["output"], holdout_run["record"]
    folder = list_image_folder(src)
    entries = holdout_run["entries"]
    released = {e["source"] for e in entries if e["released"]}
    withheld = {e["source"] for e in entries if not e["released"]}
    # the released copy: every image, as PNG
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(output_name(f) for f in folder.files)
    # the withheld marked versions: beside the record, never in the released copy
    hold_dir = record.parent / f"{record.stem}.holdout"
    assert not hold_dir.resolve().is_relative_to(out.resolve())
    held = sorted(p.relative_to(hold_dir).as_posix() for p in hold_dir.rglob("*") if p.is_file())
    assert held == sorted(output_name(f) for f in withheld)
    for f in folder.files:
        vanilla = load_rgb(src / f)
        in_copy = load_rgb(out / output_name(f))
        if f in released:
            assert not np.array_equal(in_copy, vanilla), f
        else:  # withheld and never-marked images: exact source pixels in the copy
            np.testing.assert_array_equal(in_copy, vanilla)
        if f in withheld:
            marked = load_rgb(hold_dir / output_name(f))
            assert not np.array_equal(marked, vanilla), f
            assert np.abs(marked.astype(int) - vanilla.astype(int)).max() <= FAST.linf


def test_select_holdout_excludes_marked_and_is_seeded(cifar_small):
    folder = list_image_folder(cifar_small[0])
    marked = select_marked(folder, 0.5, seed=0)
    h = select_holdout(folder, 0.5, 0, set(marked))
    assert not set(h) & set(marked)
    assert np.bincount(np.asarray(folder.labels)[h], minlength=K).tolist() == [6] * K
    assert h == select_holdout(folder, 0.5, 0, set(marked))
    # more than what is left: capped at the unmarked images of the class
    h2 = select_holdout(folder, 0.75, 0, set(marked))
    assert sorted(set(h2) | set(marked)) == list(range(len(folder)))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(RadioactiveError, match="holdout"):
            select_holdout(folder, bad, 0, set())


# ----------------------------------------------------------------------------- blackbox_detect from outputs


def _write_outputs(path: Path, entries, fn, kind="logits", relative=False, mirror=None):
    """An outputs file: for every entry, a row for its marked version (entry.output) and one for its vanilla
    version (entry.source), and with ``mirror`` (a mirror folder) one for its mirror;
    fn(entry, 'marked' | 'vanilla' | 'mirror') -> (K,) outputs."""
    rows = []
    for e in entries:
        versions = [("marked", e.output), ("vanilla", e.source)]
        if mirror is not None:
            versions.append(("mirror", Path(mirror) / e.mirror_name))
        for version, p in versions:
            name = os.path.relpath(p, path.parent.resolve()) if relative else str(p)
            rows.append((name, np.asarray(fn(e, version), dtype=np.float64)))
    if path.suffix == ".csv":
        prefix = "logit_" if kind == "logits" else "prob_"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", *(f"{prefix}{k}" for k in range(K))])
            for name, v in rows:
                w.writerow([name, *(repr(float(x)) for x in v)])
    else:
        path.write_text("".join(json.dumps({"path": name, kind: v.tolist()}) + "\n" for name, v in rows))
    return path


def _memorising(seed=0):
    """A model trained on the release: it fits what was released (the marked version of released images, the
    vanilla version of withheld ones) better than what was not."""
    rng = np.random.default_rng(seed)

    def fn(e, version):
        seen = (version == "marked") == e.released
        row = 0.1 * rng.standard_normal(K)
        row[e.label] = (4.0 if seen else 2.0) + 0.3 * rng.standard_normal()
        return row

    return fn


@pytest.fixture(scope="module")
def entries(holdout_run):
    return read_record(holdout_run["record"])[1]


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
def test_blackbox_constant_outputs_not_detected(holdout_run, entries, tmp_path, ext):
    f = _write_outputs(tmp_path / f"out{ext}", entries, lambda e, v: np.linspace(-1, 1, K))
    res = blackbox_detect(holdout_run["record"], outputs=f)
    assert isinstance(res, DetectionResult) and res.method == "black-box" and res.validity == "approximate"
    assert not res.detected and res.log10_pvalue == 0.0
    assert res.details.num_released == res.details.num_holdout == 30
    assert res.details.median_loss_difference_released == res.details.median_loss_difference_holdout == 0.0
    eff = paired_effect(holdout_run["record"], outputs=f)
    assert eff.details.pairs == 0 and eff.details.median_loss_difference == 0.0 and eff.detected is None


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
def test_blackbox_memorising_model_detected_by_control_test(holdout_run, entries, key, tmp_path, ext):
    f = _write_outputs(tmp_path / f"out{ext}", entries, _memorising())
    res = blackbox_detect(holdout_run["record"], outputs=f)
    assert res.detected and res.log10_pvalue < -6
    assert res.method == "black-box" and res.validity == "approximate"  # Mann-Whitney's normal approximation
    n_rel = sum(e.released for e in entries)
    assert res.details.num_released == n_rel == 30 and res.details.num_holdout == 30
    assert res.details.median_loss_difference_released > 0 > res.details.median_loss_difference_holdout
    assert res.classes == sorted(key.classes) and res.key_fingerprint == key.fingerprint
    assert res.to_dict()["verdict"].startswith("DETECTED")
    eff = paired_effect(holdout_run["record"], outputs=f)
    assert eff.details.pairs == n_rel and eff.details.median_loss_difference > 0


def test_blackbox_key_aware_model_is_not_detected_by_control_test(holdout_run, entries, tmp_path):
    """A model that prefers marked images whether or not they were released (e.g. it knows the key, or marking
    itself helps) shifts d on both halves: the paired effect is large (the old paired test fired), the control test
    does not."""
    rng = np.random.default_rng(9)

    def fn(e, version):
        row = 0.1 * rng.standard_normal(K)
        row[e.label] = (4.0 if version == "marked" else 2.0) + 0.3 * rng.standard_normal()
        return row

    f = _write_outputs(tmp_path / "o.jsonl", entries, fn)
    res = blackbox_detect(holdout_run["record"], outputs=f)
    assert not res.detected and res.log10_pvalue > -3
    eff = paired_effect(holdout_run["record"], outputs=f)
    assert eff.details.median_loss_difference > 0.4 and eff.details.fraction_positive > 0.9  # ~0.64 nats, every image
    assert eff.log10_pvalue is None and eff.detected is None and eff.verdict().startswith("no verdict")


# ----------------------------------------------------------------------------- paired effect size (descriptive)


def _fixed_shift(marked_logit: float, vanilla_logit: float, nan_for=frozenset()):
    """Outputs whose true-class logit is ``marked_logit`` on marked versions and ``vanilla_logit`` on vanilla ones
    (every other logit 0), so d = loss(vanilla) - loss(marked) is the same for every image; NaN rows for the marked
    versions of the sources in ``nan_for``."""

    def fn(e, version):
        row = np.zeros(K)
        row[e.label] = marked_logit if version == "marked" else vanilla_logit
        return np.full(K, np.nan) if version == "marked" and e.source in nan_for else row

    return fn


def _ce(logit: float) -> float:
    return math.log(K - 1 + math.exp(logit)) - logit


def test_paired_effect_is_descriptive_and_measures_the_shift(holdout_run, entries, tmp_path):
    """The paired statistic has no valid null (issue 16): effect sizes only, never a p-value or a verdict."""
    record = holdout_run["record"]
    f = _write_outputs(tmp_path / "up.jsonl", entries, _fixed_shift(4.0, 2.0))
    eff = paired_effect(record, outputs=f)
    assert eff.method == "paired" and eff.validity == "descriptive"
    assert eff.log10_pvalue is None and eff.detected is None and eff.pvalue_text == "n/a (descriptive)"
    assert eff.verdict().startswith("no verdict") and "DETECTED" not in eff.verdict()
    d = eff.to_dict()
    assert d["log10_pvalue"] is None and d["detected"] is None and d["details"]["type"] == "PairedDetails"
    shift = _ce(2.0) - _ce(4.0)
    assert eff.details.pairs == 30  # released marked images only, not the 30 withheld ones
    assert eff.details.median_loss_difference == pytest.approx(shift) and eff.details.fraction_positive == 1.0
    assert eff.details.queries == 2 * 60  # marked and vanilla versions (no mirror outputs in this file)
    # the opposite direction
    down = paired_effect(record, outputs=_write_outputs(tmp_path / "down.jsonl", entries, _fixed_shift(2.0, 4.0)))
    assert down.details.median_loss_difference == pytest.approx(-shift) and down.details.fraction_positive == 0.0
    # non-finite outputs are dropped from the pairs
    bad = frozenset([e.source for e in entries if e.released][::3])
    part = paired_effect(record, outputs=_write_outputs(tmp_path / "nan.jsonl", entries, _fixed_shift(4.0, 2.0, bad)))
    assert part.details.pairs == 30 - len(bad) == 20
    assert part.details.median_loss_difference == pytest.approx(shift)


def test_paired_wilcoxon_is_invalid_under_class_shifts_while_the_control_test_holds():
    """Issue 16's finding, reproduced on synthetic losses: a carrier moves every image of its class the same way,
    and an innocent model may like or dislike that direction, so its d = loss(vanilla) - loss(marked) carry a
    random per-class shift (mean 0 over keys). The old paired test (one-sided Wilcoxon signed-rank on the released
    d) then rejects far more often than alpha; the control test (released against withheld d of the same classes,
    under random holdout splits) stays within its band."""
    from radioactive.calibration import summarise
    from radioactive.detection.blackbox import split_null

    rng = np.random.default_rng(16)
    classes, per_side, trials = 10, 10, 1000
    groups = np.repeat(np.arange(classes), 2 * per_side)
    wilcoxon, control = [], []
    for t in range(trials):
        d = 0.5 * rng.standard_normal(classes)[groups] + rng.standard_normal(len(groups))
        released = np.zeros(len(d), bool)
        for g in range(classes):
            released[rng.choice(np.flatnonzero(groups == g), per_side, replace=False)] = True
        wilcoxon.append(math.log10(sps.wilcoxon(d[released], alternative="greater").pvalue))
        control.append(split_null(d, groups, {g: per_side for g in range(classes)}, 1, seed=t)[0])
    old = summarise(wilcoxon, "paired (old Wilcoxon)", "exact")
    new = summarise(control, "black-box", "approximate", "splits")
    assert old.fpr["0.05"] > 2 * 0.05 and not old.within_band  # measured: ~0.15
    assert new.within_band and new.fpr["0.05"] <= new.fpr_interval_99["0.05"][1]


def test_blackbox_nan_outputs_not_detected(holdout_run, entries, tmp_path):
    f = _write_outputs(tmp_path / "nan.jsonl", entries, lambda e, v: np.full(K, np.nan))
    res = blackbox_detect(holdout_run["record"], outputs=f)
    assert not res.detected and res.log10_pvalue == 0.0
    assert paired_effect(holdout_run["record"], outputs=f).details.pairs == 0
    # the result is still written as strict JSON (no NaN) and read back
    assert math.isfinite(res.details.median_loss_difference_released)
    assert DetectionResult.load(res.save(tmp_path / "nan-result.json")).to_dict() == res.to_dict()


def test_blackbox_outputs_for_no_recorded_image_raise(holdout_run, tmp_path):
    f = tmp_path / "other.jsonl"
    f.write_text(json.dumps({"path": str(tmp_path / "elsewhere.png"), "logits": [0.0] * K}) + "\n")
    with pytest.raises(RadioactiveError, match="no outputs"):
        blackbox_detect(holdout_run["record"], outputs=f)


def test_blackbox_partial_outputs_use_covered_images(holdout_run, entries, tmp_path):
    covered = [e for i, e in enumerate(entries) if i % 2 == 0]
    res = blackbox_detect(holdout_run["record"], outputs=_write_outputs(tmp_path / "o.jsonl", covered, _memorising()))
    assert res.details.num_released + res.details.num_holdout == len(covered)
    assert res.details.num_released == sum(e.released for e in covered)


@pytest.mark.parametrize("ext, relative", [(".jsonl", False), (".csv", True)])
def test_blackbox_probs_format(holdout_run, entries, tmp_path, ext, relative):
    logits_fn = _memorising(seed=1)

    def fn(e, v):
        z = logits_fn(e, v)
        return np.exp(z - z.max()) / np.exp(z - z.max()).sum()

    f = _write_outputs(tmp_path / f"probs{ext}", entries, fn, kind="probs", relative=relative)
    rows, kind = read_outputs_file(f)
    assert kind == "probs" and len(rows) == 2 * len(entries)
    res = blackbox_detect(holdout_run["record"], outputs=f)
    assert res.detected and res.log10_pvalue < -6
    # the same outputs as logits give the same losses, hence the same p-values
    g = _write_outputs(tmp_path / f"logits{ext}", entries, _memorising(seed=1))
    assert blackbox_detect(holdout_run["record"], outputs=g).log10_pvalue == pytest.approx(res.log10_pvalue, abs=1e-6)


def test_blackbox_needs_exactly_one_of_suspect_and_outputs(holdout_run, tmp_path):
    with pytest.raises(RadioactiveError, match="either"):
        blackbox_detect(holdout_run["record"])
    with pytest.raises(RadioactiveError, match="either"):
        blackbox_detect(holdout_run["record"], suspect=tmp_path / "s.safetensors", outputs=tmp_path / "o.jsonl")


def test_blackbox_record_with_some_classes_uses_key_class_order(cifar_small, key, tmp_path):
    folder = list_image_folder(cifar_small[0])
    wanted = {"cat", "ship"}
    files = [f for f, lab in zip(folder.files, folder.labels) if folder.classes[lab] in wanted]
    summary = mark_folder(cifar_small[0], key, tmp_path / "copy", files=files, config=MarkingConfig(steps=0),
                          progress=False)
    _, ents = read_record(summary.record)
    assert {e.class_name for e in ents} == wanted and len(ents) == 24

    def fn(e, version):  # outputs in the key's (= the folder's) class order; marked versions fitted better
        row = np.zeros(K)
        row[key.classes.index(e.class_name)] = 4.0 if version == "marked" else 1.0
        return row

    f = _write_outputs(tmp_path / "o.jsonl", ents, fn)
    eff = paired_effect(summary.record, outputs=f)
    shift = _ce(1.0) - _ce(4.0)  # read in the key's class order, else the true-class logit would be 0 on both
    assert eff.details.pairs == 24 and eff.details.median_loss_difference == pytest.approx(shift)
    assert eff.details.class_median_loss_difference == pytest.approx({"cat": shift, "ship": shift})
    # no withheld marked images: the control test cannot run, and says why
    with pytest.raises(RadioactiveError, match="no withheld marked images.*holdout-fraction"):
        blackbox_detect(summary.record, outputs=f)


# ----------------------------------------------------------------------------- mirror images and the mirror tests


def test_mirror_image_subtracts_the_mark_and_clips():
    v = np.array([[[10, 200, 0]]], dtype=np.uint8)
    m = np.array([[[13, 190, 5]]], dtype=np.uint8)
    x = mirror_image(v, m)
    assert x.dtype == np.uint8 and x.tolist() == [[[7, 210, 0]]]  # 2v - m, clipped at 0
    assert mirror_image(np.full((1, 1, 3), 250, np.uint8), np.full((1, 1, 3), 240, np.uint8)).max() == 255
    with pytest.raises(RadioactiveError, match="shape"):
        mirror_image(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 3), np.uint8))


def test_write_mirror_images_writes_every_marked_image_once(holdout_run, entries, tmp_path):
    res = write_mirror_images(holdout_run["record"], tmp_path / "mirror")
    files = sorted((tmp_path / "mirror").rglob("*.png"))
    assert res["num_images"] == len(entries) == len(files) == 60
    assert {f.relative_to(tmp_path / "mirror").as_posix() for f in files} == {e.mirror_name for e in entries}
    for e in entries[:5] + entries[-5:]:
        x = load_rgb(tmp_path / "mirror" / e.mirror_name)
        np.testing.assert_array_equal(x, mirror_image(load_rgb(e.source), load_rgb(e.output)))
        assert not np.array_equal(x, load_rgb(e.source))  # the mark was subtracted
    with pytest.raises(RadioactiveError, match="exists"):
        write_mirror_images(holdout_run["record"], tmp_path / "mirror")
    assert not list(tmp_path.glob("*.partial"))
    (tmp_path / "m2.partial").mkdir()  # a leftover (or a user's folder) is refused, never deleted
    (tmp_path / "m2.partial" / "keep.txt").write_text("mine")
    with pytest.raises(RadioactiveError, match="partial exists"):
        write_mirror_images(holdout_run["record"], tmp_path / "m2")
    assert (tmp_path / "m2.partial" / "keep.txt").read_text() == "mine" and not (tmp_path / "m2").exists()
    assert default_mirror_dir(holdout_run["record"]).name == holdout_run["record"].stem + ".mirror"


def _memorising_with_mirror(seed=0):
    """A model trained on the release that also scores mirrors: the released version of each image is fitted
    best, and the mirror of a released marked image (twice as far from it as the vanilla image) worst."""
    rng = np.random.default_rng(seed)

    def fn(e, version):
        seen = (version == "marked") == e.released
        fit = {True: 4.0, False: 2.0}[seen] if version != "mirror" else (1.0 if e.released else 2.0)
        row = 0.1 * rng.standard_normal(K)
        row[e.label] = fit + 0.3 * rng.standard_normal()
        return row

    return fn


def test_blackbox_mirror_tests_from_outputs(holdout_run, entries, tmp_path):
    mirror = write_mirror_images(holdout_run["record"], tmp_path / "mirror")["mirror"]
    f = _write_outputs(tmp_path / "o.jsonl", entries, _memorising_with_mirror(), mirror=mirror)
    res = blackbox_detect(holdout_run["record"], outputs=f, mirror_root=mirror)
    eff = paired_effect(holdout_run["record"], outputs=f, mirror_root=mirror)
    assert res.details.mirror_log10_pvalue < -6 and eff.details.median_mirror_difference > 0
    medians = eff.details.class_median_loss_difference
    assert sorted(medians) == sorted({e.class_name for e in entries if e.released}) and min(medians.values()) > 0
    # without the mirror outputs (or at the default folder, which does not exist) the mirror tests are not run
    g = _write_outputs(tmp_path / "g.jsonl", entries, _memorising_with_mirror())
    res2 = blackbox_detect(holdout_run["record"], outputs=g, mirror_root=mirror)
    assert res2.details.mirror_log10_pvalue is None
    assert paired_effect(holdout_run["record"], outputs=g, mirror_root=mirror).details.median_mirror_difference is None


def test_blackbox_mirror_control_test_ignores_a_model_that_merely_prefers_marked_images(holdout_run, entries,
                                                                                        tmp_path):
    """A model that fits every marked image better than its mirror, released or not (it knows the key, or the
    marks suit it): the mirror differences are large, yet the exact mirror control test does not fire."""
    rng = np.random.default_rng(4)

    def fn(e, version):
        row = 0.1 * rng.standard_normal(K)
        row[e.label] = {"marked": 4.0, "vanilla": 3.0, "mirror": 2.0}[version] + 0.3 * rng.standard_normal()
        return row

    mirror = write_mirror_images(holdout_run["record"], tmp_path / "mirror")["mirror"]
    f = _write_outputs(tmp_path / "o.jsonl", entries, fn, mirror=mirror)
    res = blackbox_detect(holdout_run["record"], outputs=f, mirror_root=mirror)
    eff = paired_effect(holdout_run["record"], outputs=f, mirror_root=mirror)
    assert eff.details.median_mirror_difference > 0.3  # marked fitted better than mirrored, every image
    assert res.details.mirror_log10_pvalue > -3 and not res.detected


# ----------------------------------------------------------------------------- blackbox_detect on a runnable suspect


def _write_suspect(path: Path, weight: np.ndarray, classes, spec) -> Path:
    """A linear-probe suspect written like radioactive.training does (as in tests/test_detection.py)."""
    state = {"weight": torch.as_tensor(weight, dtype=torch.float32).contiguous(),
             "bias": torch.zeros(len(weight), dtype=torch.float32)}
    save_file(state, str(path))
    meta = {"architecture": "linear", "backbone": spec.to_dict(), "classifier": "head",
            "preprocessing": Preprocessing(None).to_dict(), "classes": list(classes), "test_accuracy": None}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def test_blackbox_runnable_suspect(holdout_run, entries, key, tmp_path):
    w = np.random.default_rng(12).standard_normal((K, key.dim)) / np.sqrt(key.dim)
    suspect = _write_suspect(tmp_path / "suspect.safetensors", w, key.classes, key.network)
    res = blackbox_detect(holdout_run["record"], suspect=suspect)
    assert isinstance(res, DetectionResult) and res.method == "black-box" and res.validity == "approximate"
    assert math.isfinite(res.log10_pvalue) and res.log10_pvalue <= 0
    n_rel = sum(e.released for e in entries)
    eff = paired_effect(holdout_run["record"], suspect=suspect)
    assert eff.details.pairs == n_rel == 30  # every released marked image changed the suspect's loss
    assert res.details.num_released == res.details.num_holdout == 30
    assert res.details.queries == 3 * 60  # marked, vanilla and mirror of every marked image
    assert res.suspect["path"] == str(suspect)
    assert not res.detected  # random head that never saw the release (p not below 1e-3)
    # the mirrors are computed on the fly for a runnable suspect
    assert math.isfinite(eff.details.median_mirror_difference) and -3 < res.details.mirror_log10_pvalue <= 0


# ----------------------------------------------------------------------------- command line


def test_cli_detect_black_box(holdout_run, entries, tmp_path):
    f = _write_outputs(tmp_path / "api.jsonl", entries, _memorising())
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "radioactive", "detect", "--method", "black-box",
                           "--record", str(holdout_run["record"]), "--outputs", str(f), "--output", str(result)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "black-box" and out["detected"] is True and out["log10_pvalue"] < -6
    assert json.loads(result.read_text()) == out
    assert "DETECTED" in proc.stderr


def test_cli_black_box_without_record_is_one_line_error(tmp_path):
    f = tmp_path / "api.jsonl"
    f.write_text(json.dumps({"path": "x.png", "logits": [0.0] * K}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "radioactive", "detect", "--method", "black-box", "--outputs", str(f)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # a missing private file: an error, not a usage error
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--record" in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_black_box_classes_restricts_the_test(holdout_run, entries, tmp_path, capsys):
    from radioactive.cli import main

    f = _write_outputs(tmp_path / "api.jsonl", entries, _memorising())
    rc = main(["detect", "--method", "black-box", "--record", str(holdout_run["record"]), "--outputs", str(f),
               "--classes", "ship,cat"])
    assert rc == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["classes"]) == ["cat", "ship"] and out["details"]["num_released"] == 6
    # a class named twice would count twice: refused, one line
    rc = main(["detect", "--method", "black-box", "--record", str(holdout_run["record"]), "--outputs", str(f),
               "--classes", "cat,ship,cat"])
    err = capsys.readouterr().err
    assert rc == 1 and "more than once" in err and len(err.strip().splitlines()) == 1


def test_cli_paired_is_descriptive(holdout_run, entries, tmp_path, capsys):
    from radioactive.cli import main

    f = _write_outputs(tmp_path / "api.jsonl", entries, _memorising())
    assert main(["detect", "--method", "paired", "--record", str(holdout_run["record"]), "--outputs", str(f),
                 "--output", str(tmp_path / "paired.json")]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["method"] == "paired" and out["validity"] == "descriptive"
    assert out["log10_pvalue"] is None and out["detected"] is None and out["verdict"].startswith("no verdict")
    assert out["details"]["pairs"] == 30 and out["details"]["median_loss_difference"] > 0
    assert "DETECTED" not in captured.err and "no verdict" in captured.err
    assert DetectionResult.load(tmp_path / "paired.json").to_dict()["verdict"] == out["verdict"]


# ----------------------------------------------------------------------------- membership test

def _split(rng, per_class=110, withheld=10, classes=10):
    g = np.repeat(np.arange(classes), per_class)
    w = np.zeros(len(g), bool)
    for c in range(classes):
        w[np.where(g == c)[0][rng.permutation(per_class)[:withheld]]] = True
    return g, w


def test_membership_test_is_valid_under_exchangeable_losses():
    """Random withheld splits of one set of losses: the bound never rejects more often than its level."""
    rng = np.random.default_rng(0)
    loss = rng.exponential(size=1100)
    logp = []
    for _ in range(1000):
        g, w = _split(rng)
        logp.append(membership_test(loss[~w], loss[w], g[~w], g[w])["log10_pvalue"])
    logp = np.array(logp)
    assert (logp <= 0).all()
    for level in (0.2, 0.05, 0.01):
        assert (logp < np.log10(level)).mean() <= level


def test_membership_test_detects_a_generalisation_gap_and_matches_the_exact_tail_on_a_small_case():
    rng = np.random.default_rng(1)
    g, w = _split(rng)
    loss = rng.exponential(size=len(g))
    loss[w] += 1.0  # unseen images: higher loss
    r = membership_test(loss[~w], loss[w], g[~w], g[w])
    assert r["log10_pvalue"] < -20 and r["statistic"] > 0.25 and r["num_withheld"] == 100
    # one class, 2 of 6 withheld, both with the largest losses: the exact p is 1 / C(6, 2) = 1/15;
    # the Chernoff bound is larger (valid) but within a factor of 10
    small = membership_test(np.arange(4.0), np.array([10.0, 11.0]), np.zeros(4), np.zeros(2))
    assert np.log10(1 / 15) <= small["log10_pvalue"] <= np.log10(10 / 15)


def test_membership_test_does_not_fire_when_withheld_losses_are_lower():
    rng = np.random.default_rng(2)
    g, w = _split(rng)
    loss = rng.exponential(size=len(g))
    loss[w] -= 5
    assert membership_test(loss[~w], loss[w], g[~w], g[w])["log10_pvalue"] == 0.0


def test_membership_test_rejects_empty_or_mismatched_input():
    with pytest.raises(RadioactiveError):
        membership_test(np.ones(3), np.ones(0), np.zeros(3), np.zeros(0))
    with pytest.raises(RadioactiveError):
        membership_test(np.ones(3), np.ones(2), np.zeros(2), np.zeros(2))
    with pytest.raises(RadioactiveError, match="no class"):
        membership_test(np.ones(3), np.ones(2), np.zeros(3), np.ones(2))


def test_cli_mirror_images_then_black_box_with_mirror_outputs(holdout_run, entries, tmp_path, capsys):
    from radioactive.cli import main

    folder = tmp_path / "queries"
    assert main(["mirror-images", "--record", str(holdout_run["record"]), "--output", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out) == {"mirror": str(folder), "num_images": len(entries)}
    assert main(["mirror-images", "--record", str(holdout_run["record"]), "--output", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    f = _write_outputs(tmp_path / "api.jsonl", entries, _memorising_with_mirror(), mirror=folder)
    rc = main(["detect", "--method", "black-box", "--record", str(holdout_run["record"]), "--outputs", str(f),
               "--mirror", str(folder)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["details"]["mirror_log10_pvalue"] < -6
