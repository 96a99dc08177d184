"""Null calibration of every registered detection test on models that never saw marked data (issue #16, point 4).

For each (test, model) pair the test's own null sampler (``radioactive.detection.get_method(name).null``) draws
``num`` log10 p-values under H0 for that model: fresh keys for ``white-box``, ``gradient`` and ``decoy-carrier``,
fresh holdout splits for ``black-box``. :func:`radioactive.calibration.summarise` turns them into false-positive
rates at alpha 0.05 / 0.01 / 0.001 with the 99 % binomial band of an exact test. One JSON line per
(method, model, alpha) goes to ``benchmarks/results/null_calibration.jsonl`` as soon as a pair finishes; a rerun
skips the pairs already there (resumable). ``membership`` has no null sampler yet and is skipped.

Models (none saw marked data):

* ``random-init-resnet18``: torchvision ResNet-18 (10 classes) at random init, written by ``prepare``.
* ``linear-probe``: a linear classifier on frozen EfficientNet-Lite0 features, trained by ``prepare`` with
  ``radioactive train --recipe linear`` on the demo's vanilla training images.
* ``vanilla-resnet18-a`` / ``-b``: the demo's vanilla suspect (``models/vanilla``, seed 1) and its reference
  (``vault/references/reference1``, seed 2), ResNet-18s trained from scratch on vanilla images.
* ``in-domain-marking-network``: the demo's in-domain marking network (vanilla images only).

Owner files. The demo's models are tested with the demo's key (in-domain marking network, D = 512) and record
(``vault/record.jsonl``); the linear probe and the random-init model with a fresh EfficientNet-Lite0 key
(D = 1280) drawn by ``prepare``, and its small record for every test.
The black-box control test needs withheld marked images: ``prepare`` marks a small record for each key
(100 images a class copied from the demo's vanilla training slice, ``--fraction 0.1 --holdout-fraction 0.1``:
10 released and 10 withheld marked images a class). White-box alignments use the demo's 2,000 vanilla test
images. Gradient and decoy-carrier references are fixed (:data:`REFERENCES`): vanilla-b for vanilla-a and the
marking network; the marking network for vanilla-b; the linear probe for the random-init model; none for the
linear probe.

decoy-carrier runs with M 29 and n 5 on ``--decoy-models``; a timed pilot sets the number of samples that fit
``--decoy-seconds`` per model, and a model where none fits is skipped (nothing written).

Usage (from the repository root; ``prepare`` is idempotent; ``run`` skips the demo's models until the demo has
written them, and ``--wait`` keeps polling for them)::

    .venv/bin/python benchmarks/null_calibration.py prepare --demo runs/demo-seed0
    .venv/bin/python benchmarks/null_calibration.py run --demo runs/demo-seed0 --wait 7800
    .venv/bin/python benchmarks/null_calibration.py table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
from _common import RESULTS, ROOT, append_result  # noqa: E402

OUT = RESULTS / "null_calibration.jsonl"
WORK = ROOT / "runs" / "null_calibration"
METHODS = ("white-box", "gradient", "black-box", "decoy-carrier")
MODELS = ("random-init-resnet18", "linear-probe", "vanilla-resnet18-a", "vanilla-resnet18-b",
          "in-domain-marking-network")
DECOY_MODELS = ("random-init-resnet18", "vanilla-resnet18-a")
"""decoy-carrier's null costs (M + 1) * n * K markings a sample: run on two models only (``--decoy-models``)."""
CLASSES_PER_SOURCE = 100
"""Images a class copied from the demo's vanilla training slice into the small black-box records' source."""

log = logging.getLogger("null_calibration")


def radioactive_cli() -> str:
    return str(Path(sys.executable).parent / "radioactive")


def demo_paths(demo: Path) -> dict:
    """The demo run's files: the vault layout of ``radioactive demo`` (vault/, models/, data/), or the layout before
    the vault (private/key.safetensors, private/record.jsonl, private/reference.safetensors, ...)."""
    common = {"vanilla-resnet18-a": demo / "models" / "vanilla.safetensors",
              "train": demo / "data" / "vanilla" / "train", "test": demo / "data" / "vanilla" / "test",
              "summary": demo / "summary.json"}
    if (demo / "private").is_dir():
        p = demo / "private"
        return {**common, "key": p / "key.safetensors", "record": p / "record.jsonl",
                "vanilla-resnet18-b": p / "reference.safetensors",
                "in-domain-marking-network": p / "marking-network.safetensors"}
    v = demo / "vault"
    return {**common, "key": v / "key.safetensors", "record": v / "record.jsonl",
            "vanilla-resnet18-b": v / "references" / "reference1.safetensors",
            "in-domain-marking-network": v / "marking-network.safetensors"}


def work_paths(work: Path) -> dict:
    return {"random-init-resnet18": work / "models" / "random-init-resnet18.safetensors",
            "linear-probe": work / "models" / "linear-probe.safetensors",
            "effnet-key": work / "key-efficientnet.safetensors",
            "source": work / "source",
            "effnet-vault": work / "vault-efficientnet", "effnet-release": work / "release-efficientnet",
            "demo-vault": work / "vault-demo", "demo-release": work / "release-demo",
            "samples": work / "samples"}


def run_cmd(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- prepare

def write_random_init(path: Path, classes: list[str], seed: int) -> None:
    """torchvision ResNet-18 at random init, with the sidecar ``radioactive train`` writes for its scratch recipe."""
    import torch
    import torchvision
    from safetensors.torch import save

    from radioactive import __version__
    from radioactive.networks import CIFAR_MEAN, CIFAR_STD, Preprocessing, sidecar_path

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=len(classes)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    meta = {"architecture": "resnet18", "classifier": "fc",
            "preprocessing": Preprocessing(32, CIFAR_MEAN, CIFAR_STD).to_dict(), "schema": 1,
            "package_version": __version__, "kind": "radioactive-suspect", "classes": list(classes),
            "recipe": {"random_init_seed": seed, "note": "never trained"}, "test_accuracy": None}
    sidecar_path(path).write_text(json.dumps(meta, indent=2))


def copy_source(train: Path, dest: Path, per_class: int) -> None:
    """The first ``per_class`` images (sorted) of each class of ``train``, copied (not linked) into ``dest``."""
    if dest.is_dir() and any(dest.iterdir()):
        return
    for cdir in sorted(p for p in train.iterdir() if p.is_dir()):
        (dest / cdir.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cdir.iterdir())[:per_class]:
            shutil.copy2(f, dest / cdir.name / f.name)


def mark_small(source: Path, key: Path, release: Path, vault: Path, preset: str) -> None:
    """10 released + 10 withheld marked images a class (of 100), for the black-box control test."""
    if (vault / "record.jsonl").is_file():
        from radioactive.keys import Key

        header = json.loads((vault / "record.jsonl").read_text().splitlines()[0])
        if header.get("key_fingerprint") != Key.load(key).fingerprint:
            log.warning("%s was marked with another key (or a key of another fingerprint schema): the gradient "
                        "and decoy-carrier tests will refuse it; delete %s and %s to remark", vault / "record.jsonl",
                        vault, release)
        return
    run_cmd([radioactive_cli(), "mark", "--source", str(source), "--key", str(key), "--fraction", "0.1",
             "--holdout-fraction", "0.1", "--output", str(release), "--vault", str(vault), "--preset", preset,
             "--seed", "0"])


def prepare(args) -> None:
    from radioactive.data import list_image_folder
    from radioactive.keys import Key, generate_key

    d, w = demo_paths(args.demo), work_paths(args.work)
    classes = list(list_image_folder(d["train"]).classes)
    if not w["random-init-resnet18"].is_file():
        write_random_init(w["random-init-resnet18"], classes, seed=args.seed)
        log.info("wrote %s", w["random-init-resnet18"])
    if not w["effnet-key"].is_file():
        w["effnet-key"].parent.mkdir(parents=True, exist_ok=True)
        generate_key(classes, seed=1000 + args.seed).save(w["effnet-key"])
    copy_source(d["train"], w["source"], CLASSES_PER_SOURCE)
    if not w["linear-probe"].is_file():
        run_cmd([radioactive_cli(), "train", "--recipe", "linear", "--train", str(d["train"]), "--test",
                 str(d["test"]), "--epochs", "5", "--views", "1", "--seed", str(args.seed),
                 "--output", str(w["linear-probe"])])
    mark_small(w["source"], w["effnet-key"], w["effnet-release"], w["effnet-vault"], "linear")
    if d["key"].is_file():
        Key.load(d["key"])  # readable with the current code
        mark_small(w["source"], d["key"], w["demo-release"], w["demo-vault"], "from-scratch")
    else:
        log.info("the demo has not written its key yet (%s): its black-box record is made later (run marks it)",
                 d["key"])


# ----------------------------------------------------------------------------- run

REFERENCES = {"vanilla-resnet18-a": ["vanilla-resnet18-b"], "vanilla-resnet18-b": ["in-domain-marking-network"],
              "random-init-resnet18": ["linear-probe"], "in-domain-marking-network": ["vanilla-resnet18-b"],
              "linear-probe": []}
"""The gradient and decoy-carrier tests' reference models, fixed here before any run. The demo trains its
marking network first, vanilla-b (its reference) second and vanilla-a (its vanilla suspect) last, so every model
but vanilla-a uses an earlier one; any vanilla model is a valid reference (the nulls hold whatever it is). The
random-init model is tested with the EfficientNet-Lite0 key (:data:`EFFNET_KEY_MODELS`), so its reference is the
linear probe."""
EFFNET_KEY_MODELS = ("linear-probe", "random-init-resnet18")
"""Models tested with the EfficientNet-Lite0 key and its small record (the others: the demo's key and record).
The random-init model never saw any data, so either key fits it; this one exists before the demo finishes."""


def model_ready(path: Path) -> bool:
    from radioactive.networks import sidecar_path

    return Path(path).is_file() and sidecar_path(Path(path)).is_file()


def owner_and_suspect(method: str, model: str, d: dict, w: dict):
    """(OwnerFiles, SuspectAccess) for one pair, or None when a file it needs does not exist yet."""
    from radioactive.detection import OwnerFiles, SuspectAccess
    from radioactive.keys import Key

    files = {**d, **w}
    suspect = files[model]
    refs = [files[r] for r in REFERENCES[model]] if method in ("gradient", "decoy-carrier") else []
    if model in EFFNET_KEY_MODELS:
        key, record, small = w["effnet-key"], w["effnet-vault"] / "record.jsonl", w["effnet-vault"] / "record.jsonl"
    else:
        key, record, small = d["key"], d["record"], w["demo-vault"] / "record.jsonl"
    needed = {"white-box": [key], "gradient": [key, record], "black-box": [small],
              "decoy-carrier": [key, record]}[method]
    if not (all(model_ready(m) for m in [suspect, *refs]) and all(Path(f).is_file() for f in needed)):
        return None
    if method == "black-box":
        owner = OwnerFiles(record=small)
    else:
        owner = OwnerFiles(key=Key.load(key), record=record if record.is_file() else None, images=d["test"],
                           references=tuple(refs))
    return owner, SuspectAccess.of_model(suspect)


def done_pairs(path: Path) -> set[tuple[str, str]]:
    if not path.is_file():
        return set()
    return {(r["method"], r["model"]) for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}


def decoy_num(owner, config, budget_s: float) -> tuple[int, float]:
    """Samples of the decoy-carrier null that fit ``budget_s`` (0 when not even one does), and the estimated seconds
    a sample, from a timed pilot: one image a class marked with the real carrier and one decoy (2 K markings; a
    sample is (M + 1) n K of them). The pilot's decoys come from another seed than the null's."""
    from radioactive.detection.decoys import decoy_marks

    t0 = time.time()
    marks = decoy_marks(owner.record, owner.key, 1, 1, seed=10**6)
    markings = sum(m.shape[0] * m.shape[1] for m in marks.marked)
    per_marking = (time.time() - t0) / markings
    per_sample = per_marking * (config.decoy_carriers + 1) * config.per_class * len(marks.classes) * 1.1
    log.info("decoy-carrier pilot: %d markings, %.2f s each", markings, per_marking)
    return int(budget_s // per_sample), per_sample


def run_pass(args, d: dict, w: dict) -> int:
    """Run every pair whose files exist and that the results file lacks; return how many are still pending (waiting
    for files, or refused by the library in this pass)."""
    from radioactive.calibration import summarise
    from radioactive.detection import get_method

    from radioactive.errors import RadioactiveError

    done, waiting, failed = done_pairs(args.output), 0, 0
    pairs = [(method, model) for method in args.methods for model in args.models
             if method != "decoy-carrier" or model in args.decoy_models]
    for method, model in pairs:  # the cheap tests first, decoy-carrier last
        if (method, model) in done:
            continue
        try:
            pair = owner_and_suspect(method, model, d, w)
        except Exception as e:  # noqa: BLE001 - e.g. a library module caught mid-edit; retried on the next pass
            log.error("%s on %s: cannot set up (%s: %s)", method, model, type(e).__name__, e)
            failed += 1
            continue
        if pair is None:
            waiting += 1
            continue
        owner, suspect = pair
        entry = get_method(method)
        config, num = entry.defaults(), args.num
        if method == "decoy-carrier":
            config = dataclasses.replace(config, decoy_carriers=args.decoy_m, per_class=args.decoy_per_class)
            if (method, model) in args.unaffordable:
                continue
            try:
                num, per_sample = decoy_num(owner, config, args.decoy_seconds)
            except RadioactiveError as e:
                log.error("%s on %s failed: %s", method, model, e)
                failed += 1
                continue
            log.info("decoy-carrier on %s: about %.0f s a sample, %d samples in %.0f s", model, per_sample, num,
                     args.decoy_seconds)
            if num < args.decoy_min_samples:
                log.warning("decoy-carrier on %s: fewer than %d samples fit the budget; not run (nothing written)",
                            model, args.decoy_min_samples)
                args.unaffordable.add((method, model))
                continue
        log.info("%s on %s: %d null samples", method, model, num)
        t0 = time.time()
        try:
            lp = np.asarray(entry.null(owner, suspect, config, num, args.seed), dtype=np.float64)
        except RadioactiveError as e:  # a library refusal: logged, nothing written, the pair stays pending
            log.error("%s on %s failed: %s", method, model, e)
            failed += 1
            continue
        seconds = time.time() - t0
        np.save(w["samples"] / f"{method}__{model}.npy", lp)
        cal = summarise(lp, method, entry.validity, entry.null_unit, model)
        for a in ("0.05", "0.01", "0.001"):
            lo, hi = cal.fpr_interval_99[a]
            append_result(args.output, {
                "method": method, "model": model, "alpha": float(a), "keys": cal.num_keys,
                "false_positives": cal.false_positives[a], "rate": cal.fpr[a], "band_99": [lo, hi],
                "within_band": bool(cal.fpr[a] <= hi), "validity": entry.validity, "unit": entry.null_unit,
                "seconds": round(seconds, 1)})
        log.info("%s on %s: rates %s (bands %s), KS p %.3g, %.0f s", method, model, cal.fpr,
                 cal.fpr_interval_99, cal.ks_pvalue, seconds)
    if failed:
        log.error("%d pairs failed in this pass (see above); a later pass retries them", failed)
    return waiting + failed


def run(args) -> None:
    """Passes over the pairs until none waits for files, or ``--wait`` seconds have passed; between passes, the
    demo key's small black-box record is marked as soon as the demo has written its key."""
    d, w = demo_paths(args.demo), work_paths(args.work)
    w["samples"].mkdir(parents=True, exist_ok=True)
    args.unaffordable = set()
    deadline = time.time() + args.wait
    while True:
        if d["key"].is_file() and not (w["demo-vault"] / "record.jsonl").is_file():
            mark_small(w["source"], d["key"], w["demo-release"], w["demo-vault"], "from-scratch")
        waiting = run_pass(args, d, w)
        if not waiting or time.time() > deadline:
            break
        log.info("%d pairs wait for the demo's files; next pass in %d s", waiting, args.poll)
        time.sleep(args.poll)
    if waiting:
        log.info("%d pairs never got their files", waiting)


def table(args) -> None:
    """Print the results file as a markdown table: one row per (method, model), the three alphas as columns."""
    rows = [json.loads(ln) for ln in args.output.read_text().splitlines() if ln.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["model"]), {})[r["alpha"]] = r
    order = {m: i for i, m in enumerate(METHODS)}
    print("| test (validity) | model | samples | alpha 0.05: rate [99 % band] | alpha 0.01 | alpha 0.001 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (method, model), cells in sorted(by.items(), key=lambda kv: (order.get(kv[0][0], 9), MODELS.index(kv[0][1]) if kv[0][1] in MODELS else len(MODELS), kv[0][1])):
        first = next(iter(cells.values()))
        txt = []
        for a in (0.05, 0.01, 0.001):
            r = cells[a]
            flag = "" if r["within_band"] else " **above**"
            txt.append(f"{r['rate']:.4f} [{r['band_99'][0]:.4f}, {r['band_99'][1]:.4f}]{flag}")
        print(f"| {method} ({first['validity']}) | {model} | {first['keys']} {first['unit']} | " + " | ".join(txt) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "run", "table"):
        s = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo-seed0",
                       help="a finished `radioactive demo` (from-scratch) output folder")
        s.add_argument("--work", type=Path, default=WORK, help="models, keys and small records made here")
        s.add_argument("--seed", type=int, default=0, help="seed of the random-init model and of the null draws")
        if name in ("run", "table"):
            s.add_argument("--output", type=Path, default=OUT, help="results file (JSON lines, appended)")
        if name == "run":
            s.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
            s.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
            s.add_argument("--num", type=int, default=10000, help="null samples for the cheap tests")
            s.add_argument("--decoy-models", nargs="+", default=list(DECOY_MODELS), choices=MODELS,
                           help="decoy-carrier: the models it runs on")
            s.add_argument("--decoy-m", type=int, default=29, help="decoy-carrier: M")
            s.add_argument("--decoy-per-class", type=int, default=5, help="decoy-carrier: n")
            s.add_argument("--decoy-seconds", type=float, default=900.0,
                           help="decoy-carrier: time budget per model (sets the number of samples)")
            s.add_argument("--decoy-min-samples", type=int, default=1,
                           help="decoy-carrier: skip a model when fewer samples than this fit the budget")
            s.add_argument("--wait", type=float, default=0.0,
                           help="keep polling for the demo's files this many seconds (0: one pass)")
            s.add_argument("--poll", type=int, default=60, help="seconds between passes while waiting")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    {"prepare": prepare, "run": run, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
