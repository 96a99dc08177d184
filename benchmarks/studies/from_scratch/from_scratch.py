"""From-scratch harness (issue: radioactivity that survives training from scratch).

One cell: mark a fraction q of a CIFAR-10 training slice with a marking
configuration; train a suspect from scratch on the marked copy and a vanilla
control with the same recipe and seed; run white-box detection (alignment
on the vanilla test slice) and black-box detection (paired loss test on the
marked images) on both; print one JSON line and append it to the results
file. Finished cells (same configuration) are skipped, so the script can be
re-run to resume; marked copies and trained models are cached in --workdir.

Example (the command of every recorded cell is stored in its JSON line):
    python benchmarks/studies/from_scratch/from_scratch.py --fraction 0.1 --arch resnet18 --epochs 15 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from radioactive.blackbox import blackbox_detect, membership_test, model_outputs, true_class_loss
from radioactive.data import cifar10_subset
from radioactive.detection import detect
from radioactive.gradient import gradient_detect
from radioactive.keys import generate_key
from radioactive.marking import MarkingConfig, mark_folder
from radioactive.networks import MarkingNetworkSpec, load_runnable
from radioactive.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line, use_study  # noqa: E402
use_study("reproduce")
from reproduce import cifar100_extract  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=MarkingConfig.steps)
    p.add_argument("--linf", type=int, default=MarkingConfig.linf)
    p.add_argument("--lambda-img", type=float, default=MarkingConfig.lambda_img)
    p.add_argument("--marker", type=Path, default=None,
                   help="marking network saved by `radioactive train` (in-domain); default EfficientNet-Lite0 at 64 px")
    p.add_argument("--augment", default=MarkingConfig.augmentation, help="marking augmentation: resized_crop or pad_crop")
    p.add_argument("--views", type=int, default=MarkingConfig.views, help="augmented views per marking step")
    p.add_argument("--control-seed", type=int, default=None,
                   help="training seed of the vanilla control (default: the suspect's); an existing control is reused")
    p.add_argument("--train-seed", type=int, default=None, help="seed of the suspect's and control's training (default --seed)")
    p.add_argument("--withhold", type=float, default=0.0,
                   help="share of each class's unmarked images left out of the release (membership test)")
    p.add_argument("--holdout", type=float, default=0.0, help="withheld marked fraction (black-box control)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=Path("runs/from_scratch"))
    p.add_argument("--results", type=Path, default=RESULTS / "from_scratch.jsonl")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--reference", type=Path, nargs="+", default=None,
                   help="vanilla models trained without the key: also run the gradient test (radioactive.gradient)")
    a = p.parse_args(argv)

    cell = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in vars(a).items()
            if k not in ("workdir", "results", "device") and not (k in ("marker", "train_seed", "control_seed") and v is None)
            and not (k == "augment" and v == MarkingConfig.augmentation) and not (k == "views" and v == 1)
            and not (k == "withhold" and not v) and not (k == "dataset" and v == "cifar10")
            and not (k == "reference" and v is None)}
    cell_id = hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:12]
    if a.results.is_file():
        for ln in a.results.read_text().splitlines():
            if json.loads(ln).get("cell_id") == cell_id:
                print(ln)
                return 0
    t0 = time.time()
    work = a.workdir
    if a.dataset == "cifar100":
        data = cifar100_extract(work, {"train": a.train_per_class, "test": a.test_per_class})
    else:
        data = work / f"cifar10-{a.train_per_class}-{a.test_per_class}"
        if not (data / "test").is_dir():
            cifar10_subset(data, a.train_per_class, a.test_per_class)
    train_dir, test_dir = data / "train", data / "test"
    classes = sorted(x.name for x in train_dir.iterdir())
    spec = MarkingNetworkSpec("trained", 32, path=str(a.marker)) if a.marker else MarkingNetworkSpec()
    key = generate_key(classes, spec, seed=1000 + a.seed)
    mcfg = replace(MarkingConfig(), steps=a.steps, linf=a.linf, lambda_img=a.lambda_img, augmentation=a.augment,
                   views=a.views)
    mark_id = hashlib.sha256(json.dumps([a.fraction, a.seed, a.steps, a.linf, a.lambda_img, a.train_per_class]
                                        + ([a.holdout] if a.holdout else [])
                                        + ([str(a.marker), a.augment, a.views] if a.marker or a.augment != "resized_crop"
                                           or a.views != 1 else [])
                                        + ([a.dataset] if a.dataset != "cifar10" else []))
                             .encode()).hexdigest()[:10]
    released = work / f"marked-{mark_id}" / "train"
    record = work / f"marked-{mark_id}.record.jsonl"
    summary_path = work / f"marked-{mark_id}.summary.json"
    if not summary_path.is_file():
        s = mark_folder(train_dir, key, released, record, fraction=a.fraction, seed=a.seed, config=mcfg,
                        overwrite=True, progress=False, device=a.device, holdout_fraction=a.holdout)
        summary_path.write_text(json.dumps(s.to_dict()))
    mark = json.loads(summary_path.read_text())
    marked_sources = {json.loads(ln)["source"] for ln in record.read_text().splitlines()[1:]}
    withheld: list[str] = []
    if a.withhold:  # a seeded random share of each class's unmarked images is never released
        rng = np.random.default_rng([a.seed, 0x57]) 
        for c in classes:
            pool = sorted(f"{c}/{f.name}" for f in (train_dir / c).iterdir() if f"{c}/{f.name}" not in marked_sources)
            k = round(a.withhold * len(list((train_dir / c).iterdir())))
            withheld += [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))]
        trainer_dir = work / f"released-{mark_id}-w{a.withhold}-{a.seed}"
        if not trainer_dir.is_dir():
            tmp = trainer_dir.with_name(trainer_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            drop = {str(Path(w).with_suffix(".png")) for w in withheld}
            for f in sorted(released.rglob("*.png")):
                rel = f.relative_to(released).as_posix()
                if rel not in drop:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.link(f, tmp / rel)
            tmp.rename(trainer_dir)
        released = trainer_dir
    tcfg = TrainConfig(recipe="scratch", architecture=a.arch, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                       weight_decay=5e-4, image_size=32, seed=a.seed if a.train_seed is None else a.train_seed)
    out = {"cell_id": cell_id, "q": a.fraction, "config": cell, "psnr_db_mean": mark["psnr_db_mean"],
           "psnr_db_p5": mark["psnr_db_p5"], "linf_max": mark["linf_max"], "num_marked": mark["num_marked"]}
    # alignment set 2: the test images plus every training image released unmarked (never a marked one)
    align_dir = work / f"align-{mark_id}"
    if not align_dir.is_dir():
        marked = {json.loads(ln)["source"] for ln in record.read_text().splitlines()[1:]
                  if json.loads(ln).get("released", True)}
        for split in (test_dir, train_dir):
            for f in sorted(split.rglob("*.jpg")):
                rel = f.relative_to(split).as_posix()
                if split == train_dir and rel in marked:
                    continue
                dst = align_dir / f.parent.name / f"{split.name}-{f.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(f.resolve())
    for name, tdir in (("suspect", released), ("control", train_dir)):
        if name == "control" and a.control_seed is not None:
            tcfg = replace(tcfg, seed=a.control_seed)
        tag = f"{name}-{mark_id if name == 'suspect' else 'vanilla'}-{a.arch}-{a.epochs}-{a.lr}-{tcfg.seed}"
        if a.dataset != "cifar10":
            tag = f"{a.dataset}-{a.train_per_class}-{tag}"
        if a.withhold and name == "suspect":
            tag += f"-w{a.withhold}"
        weights = work / "models" / f"{tag}.safetensors"
        if not weights.is_file():
            res = train(tdir, test_dir, weights, tcfg, progress=False, device=a.device)
            acc = res.test_accuracy
        else:
            acc = json.loads(weights.with_suffix(".json").read_text())["test_accuracy"]
        wb = detect(weights, key, test_dir, decoys=100, decoy_seed=a.seed)
        wb_ridge = detect(weights, key, test_dir, ridge=0.1)
        wb_big = detect(weights, key, align_dir)
        bb = blackbox_detect(record, weights)
        out[name] = {"accuracy": acc, "log10_p_whitebox": wb.log10_pvalue, "alignment_r2": wb.alignment_r2,
                     "log10_p_whitebox_ridge0.1": wb_ridge.log10_pvalue,
                     "log10_p_whitebox_align_train": wb_big.log10_pvalue, "alignment_r2_align_train": wb_big.alignment_r2,
                     "num_alignment_images_align_train": wb_big.num_alignment_images,
                     "decoy_empirical_log10_p": wb.extra["decoys"]["empirical_log10_pvalue"],
                     "log10_p_blackbox": bb.log10_pvalue, "blackbox_test": bb.extra["test"],
                     "log10_p_blackbox_paired": bb.extra["paired_log10_pvalue"],
                     "blackbox_median_mirror_diff": bb.extra.get("median_mirror_difference"),
                     "log10_p_blackbox_control": bb.extra.get("control_log10_pvalue"),
                     "log10_p_blackbox_control_mirror": bb.extra.get("control_mirror_log10_pvalue"),
                     "blackbox_median_loss_diff": bb.extra["median_loss_difference"],
                     "blackbox_median_loss_diff_holdout": bb.extra.get("median_loss_difference_holdout")}
        if a.reference and weights.resolve() not in {r.resolve() for r in a.reference}:  # a reference is not tested
            gr = gradient_detect(record, key, weights, a.reference)
            out[name].update({"log10_p_gradient": gr.log10_pvalue, "gradient_reference": [str(r) for r in a.reference]})
        if withheld:  # membership: vanilla versions of released vs withheld images (a control saw them all)
            net, meta = load_runnable(weights)
            index = {c: i for i, c in enumerate(meta["classes"])}
            rel_imgs = [f"{c}/{f.name}" for c in classes for f in sorted((train_dir / c).iterdir())]
            rel_imgs = [r for r in rel_imgs if r not in set(withheld)]
            losses = {}
            for part, names in (("released", rel_imgs), ("withheld", withheld)):
                o = model_outputs(net, [train_dir / r for r in names], 32)
                lab = np.array([index[r.split("/")[0]] for r in names])
                losses[part] = (true_class_loss(o, lab), lab)
            mt = membership_test(losses["released"][0], losses["withheld"][0], losses["released"][1],
                                 losses["withheld"][1])
            out[name].update({"log10_p_membership": mt["log10_pvalue"], "membership": mt})
    out["seconds"] = time.time() - t0
    out = append_result(a.results, out, command_line(__file__, argv or sys.argv[1:]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
