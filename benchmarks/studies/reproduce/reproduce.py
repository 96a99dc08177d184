"""Reproduction study of issue #6: a named grid of cells, one JSON line per finished cell.

Each cell marks a share q of a training slice with a key (the library's
``mark_folder``), lets a reference trainer (``radioactive.training.train``)
train a suspect on the released copy and a vanilla control on the vanilla
slice with the same recipe and seed, and tests both: white-box
(``detection.detect``, with decoy keys) and black-box
(``blackbox.blackbox_detect``, paired loss test on the marked images).
A finished cell is appended to ``benchmarks/results/reproduce.jsonl`` at once
and never recomputed: re-running resumes. Marked copies, derived copies (JPEG)
and trained models are cached under ``runs/reproduce/`` by their
configuration, so cells that share a marking or a model reuse it.

Studies (issue #6): ``fraction`` (q x setting), ``robustness`` (JPEG
re-encoding, strong augmentation), ``classes`` (CIFAR-100 restricted to K
classes), ``quality`` (L-inf radius / pixel penalty against power),
``controls`` (vanilla suspects with fresh keys). Cells whose setting trains
a network from scratch are marked "needs GPU" and run only when asked for by
``--cell`` (or ``--study ... --include-gpu``).

Examples:
    python benchmarks/studies/reproduce/reproduce.py --list
    python benchmarks/studies/reproduce/reproduce.py --cell lin-q10
    python benchmarks/studies/reproduce/reproduce.py --study controls
    python benchmarks/studies/reproduce/reproduce.py --plots
    python benchmarks/studies/reproduce/reproduce.py --markdown      # tables for docs/results.md
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
import _common  # noqa: E402

ROOT = _common.ROOT
RESULTS = _common.RESULTS / "reproduce.jsonl"
FIGURES = _common.RESULTS / "figures"
WORKDIR = ROOT / "runs" / "reproduce"
STUDIES = ("controls", "fraction", "robustness", "quality", "classes")

# Numbers published elsewhere (../shared/PAPER.md), shown beside ours.
PAPER = {"scratch_q1": "p < 1e-4 (ImageNet, ResNet-18, 1 %)", "accuracy_cost": "about 0.1 point"}
INDEPENDENT = {("linear", 0.10): -0.60, ("linear", 0.20): -2.27, ("scratch", 0.10): -0.97, ("scratch", 0.20): -0.07}


@dataclass(frozen=True)
class Cell:
    """One cell of the grid.

    Attributes:
        id: name used on the command line.
        study: one of ``STUDIES``.
        setting: ``linear`` (linear classifier on the frozen marking network's features), ``scratch``
            (the marking network's architecture from scratch), ``cross-arch`` (another architecture
            from scratch), ``distill`` (student trained on vanilla images against a marked teacher).
        q: marked fraction (0: no marking; the suspect is the vanilla model).
        architecture: suspect architecture (``linear`` for the linear recipe).
        seed: trainer seed (initialisation, augmentation draws, batch order).
        key_seed: seed of the key, of the marked selection and of the marking's augmentation draws.
        dataset: ``cifar10`` or ``cifar100``. classes: the first ``classes`` class names (sorted) are used.
        train_per_class, test_per_class: first images of each class (None: all).
        linf, lambda_img: marking L-inf radius (8-bit levels) and pixel penalty; other marking settings
            are the library defaults (``MarkingConfig``) unless ``marker`` is set.
        marker: ``default`` (EfficientNet-Lite0 at 64 px) or ``resnet18_cifar`` (in-domain: trained from
            scratch on the vanilla training set, seed 100, then frozen), marking with ``pad_crop``.
        jpeg: re-encode every released image as JPEG of this quality before the trainer reads it.
        augment: trainer augmentation: ``crop_flip`` (the recipes' pad-4 crop + flip) or ``trivialaugment``
            (crop + flip, then torchvision TrivialAugmentWide).
        epochs, views, lr: trainer recipe (views: linear recipe only).
        teacher: ``distill`` cells: the teacher's architecture (``linear``: the linear recipe on the marking
            network; ``resnet18_cifar``: from scratch); the teacher is trained on the released (marked) copy
            with its own recipe, the student (``architecture``) only on the vanilla images, against the
            teacher's outputs (``TrainConfig.teacher``, temperature ``temperature``). The control student
            learns from a teacher trained on the vanilla images.
        fresh_key: test the vanilla model with a fresh key (controls): no marking at all.
        needs_gpu: not run by ``--study``/``--all`` on a CPU machine unless asked for.
        implemented: False when the library lacks what the cell needs (``note`` says what).
    """

    id: str
    study: str
    setting: str = "linear"
    q: float = 0.1
    architecture: str = "linear"
    seed: int = 0
    key_seed: int = 0
    dataset: str = "cifar10"
    classes: int = 10
    train_per_class: int | None = 1000
    test_per_class: int | None = 200
    linf: int = 10
    lambda_img: float = 10.0
    marker: str = "default"
    jpeg: int | None = None
    augment: str = "crop_flip"
    epochs: int = 30
    views: int = 2
    lr: float = 1e-3
    teacher: str | None = None
    temperature: float = 4.0
    fresh_key: bool = False
    needs_gpu: bool = False
    implemented: bool = True
    note: str = ""

    @property
    def command(self) -> str:
        return f"python benchmarks/studies/reproduce/reproduce.py --cell {self.id}"


def _pct(q: float) -> str:
    return f"{q * 100:g}"


def grid() -> dict[str, Cell]:
    """The cells of issue #6, in the order ``--all`` runs them (cheapest studies first)."""
    cells: list[Cell] = []
    # 6. controls: vanilla linear suspects, each trained with its own seed and tested with a fresh key
    for s in range(10):
        cells.append(Cell(f"ctl-s{s}", "controls", q=0.0, seed=s, key_seed=10_000 + s, fresh_key=True))
    # 1-2. marked fraction x setting
    qs = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
    for q in qs:
        cells.append(Cell(f"lin-q{_pct(q)}", "fraction", q=q))
    # GPU cells: full CIFAR-10, in-domain ResNet-18 marker; lambda_img 0.7 as in the in-flight from_scratch.py
    # cell with an in-domain marker (the default 10 gives ~60 dB, almost no mark, with that marker)
    gpu = {"train_per_class": None, "test_per_class": None, "epochs": 30, "lr": 0.05, "marker": "resnet18_cifar",
           "lambda_img": 0.7, "needs_gpu": True}
    for q in qs:
        cells.append(Cell(f"scr-q{_pct(q)}", "fraction", setting="scratch", q=q, architecture="resnet18_cifar", **gpu))
    for q in qs:
        cells.append(Cell(f"xarch-q{_pct(q)}", "fraction", setting="cross-arch", q=q, architecture="mobilenet_v2",
                          **gpu))
    for q in qs:  # CPU scale: linear teacher and linear student on the marking network's features
        cells.append(Cell(f"distill-lin-q{_pct(q)}", "fraction", setting="distill", q=q, teacher="linear"))
    for q in qs:
        cells.append(Cell(f"distill-q{_pct(q)}", "fraction", setting="distill", q=q, architecture="mobilenet_v2",
                          teacher="resnet18_cifar", **gpu))
    # 3. robustness of the released data (linear, q = 10 %)
    cells.append(Cell("lin-q10-jpeg90", "robustness", jpeg=90))
    cells.append(Cell("lin-q10-jpeg75", "robustness", jpeg=75))
    cells.append(Cell("lin-q10-trivaug", "robustness", augment="trivialaugment"))
    # 5. quality against power (linear, q = 10 %); the default marking (linf 10, lambda_img 10) is lin-q10
    # (the pixel penalty, not the L-inf radius, sets the PSNR at lambda_img 10: linf 4 gave 42.8 dB, so the
    # high-PSNR end needs a larger lambda_img)
    for linf, lam in ((4, 10.0), (6, 10.0), (16, 10.0), (16, 1.0), (24, 0.3), (10, 40.0)):
        cells.append(Cell(f"lin-q10-linf{linf}-lam{lam:g}", "quality", linf=linf, lambda_img=lam))
    # 4. number of classes: CIFAR-100, first K classes, 200 training / 50 test images a class, q = 10 %
    for k in (10, 20, 50, 100):
        cells.append(Cell(f"c100-k{k}", "classes", dataset="cifar100", classes=k, train_per_class=200,
                          test_per_class=50))
    cells.append(Cell("c100-k100-scr-q1", "classes", setting="scratch", dataset="cifar100", classes=100, q=0.01,
                      architecture="resnet18_cifar", **gpu))
    return {c.id: c for c in cells}


# ----------------------------------------------------------------------------- bookkeeping

def read_results(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        for ln in path.read_text().splitlines():
            if ln.strip():
                row = json.loads(ln)
                done[row["cell"]] = row
    return done


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def hardlink_tree(src: Path, dst: Path, classes: list[str] | None = None) -> Path:
    """Link the class folders ``classes`` (all by default) of ``src`` into ``dst`` (atomic, cached)."""
    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in classes or sorted(p.name for p in src.iterdir() if p.is_dir()):
        (tmp / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir()):
            os.link(f, tmp / c / f.name)
    tmp.rename(dst)
    return dst


# ----------------------------------------------------------------------------- data

def cifar10_slice(work: Path, n_train: int | None, n_test: int | None) -> tuple[Path, Path]:
    from radioactive.data import cifar10_subset

    dest = work / "data" / f"cifar10-{n_train}-{n_test}"
    if not (dest / ".complete").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        cifar10_subset(dest, n_train, n_test)
        (dest / ".complete").write_text("ok\n")
    return dest / "train", dest / "test"


def cifar100_extract(work: Path, wanted: dict[str, int | None]) -> Path:
    """The first images (sorted by name) of every CIFAR-100 class, per split, from ../shared/data.

    The library has no CIFAR-100 loader (``radioactive.data`` reads CIFAR-10 only), so the archive
    is read here. ``wanted`` maps split to images per class (None: all).
    """
    from radioactive.data import default_data_dir

    dest = work / "data" / ("cifar100-" + "-".join(f"{s}{n}" for s, n in sorted(wanted.items())))
    if (dest / ".complete").is_file():
        return dest
    archive = default_data_dir() / "cifar100-jpeg.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"CIFAR-100 archive not found: {archive}")
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_class: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            parts = Path(m.name).parts
            split, cls = parts[-3], parts[-2]
            if split in wanted:
                by_class.setdefault((split, cls), []).append(m)
        keep = []
        for (split, cls), ms in by_class.items():
            n = wanted[split]
            keep += sorted(ms, key=lambda m: m.name)[:n]
        keep_names = {m.name for m in keep}
        for m in tf:  # one sequential pass over the gzip stream
            if m.name in keep_names:
                parts = Path(m.name).parts
                target = dest / parts[-3] / parts[-2] / parts[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tf.extractfile(m).read())
    (dest / ".complete").write_text("ok\n")
    return dest


def cell_data(c: Cell, work: Path) -> dict:
    """Folders of a cell: the full vanilla training slice that is marked, the trainer's class subset,
    the test split of those classes (accuracy) and the alignment images (vanilla, never marked)."""
    if c.dataset == "cifar10":
        train_dir, test_dir = cifar10_slice(work, c.train_per_class, c.test_per_class)
        all_classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        return {"train_full": train_dir, "test": test_dir, "align": test_dir, "all_classes": all_classes,
                "classes": all_classes[:c.classes], "subset": c.classes < len(all_classes)}
    root = cifar100_extract(work, {"train": c.train_per_class, "test": c.test_per_class})
    all_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    classes = all_classes[:c.classes]
    # alignment: 20 test images of every one of the 100 classes (2,000 >= D = 1,280 features, so the
    # least-squares map is determined; images of classes the suspect never saw are fine for alignment)
    align = cifar100_extract(work, {"test": 20}) / "test"
    sub = work / "data" / f"{root.name}-k{c.classes}"
    test = hardlink_tree(root / "test", sub / "test", classes)
    train = hardlink_tree(root / "train", sub / "train", classes)
    return {"train_full": root / "train", "train_sub": train, "test": test, "align": align,
            "all_classes": all_classes, "classes": classes, "subset": c.classes < len(all_classes)}


# ----------------------------------------------------------------------------- key and marking

def recipe_dict(tcfg) -> dict:
    """A recipe as the cache digests see it: the distillation fields only when there is a teacher, and no
    augmentation field (the cell's ``augment`` is digested beside it), so the models cached before these
    fields existed keep their names."""
    d = asdict(tcfg)
    d.pop("augmentation", None)
    if d.get("teacher") is None:
        d.pop("teacher", None)
        d.pop("temperature", None)
    return d


def marker_spec(c: Cell, work: Path, data: dict, device: str):
    """Marking network of a cell (trains the in-domain marker once when asked for)."""
    from radioactive.networks import MarkingNetworkSpec
    from radioactive.training import TrainConfig, train

    if c.marker == "default":
        return MarkingNetworkSpec()
    if c.marker != "resnet18_cifar":
        raise SystemExit(f"unknown marker {c.marker!r}")
    tcfg = TrainConfig(recipe="scratch", architecture="resnet18_cifar", epochs=c.epochs, lr=0.05,
                       weight_decay=5e-4, image_size=32, seed=100)
    path = work / "models" / f"marker-{digest([str(data['train_full']), recipe_dict(tcfg)])}.safetensors"
    if not path.is_file():
        train(data["train_full"], data["test"], path, tcfg, progress=False, device=device)
    return MarkingNetworkSpec("trained", 32, path=str(path))


def marking_config(c: Cell):
    from radioactive.marking import MarkingConfig

    cfg = replace(MarkingConfig(), linf=c.linf, lambda_img=c.lambda_img)
    if "threads" in {f.name for f in fields(MarkingConfig)}:
        # the recorded cells were marked on 1 CPU thread; the thread count changes the last bit of the
        # optimisation (docs/distributed.md), so reruns pin it
        cfg = replace(cfg, threads=1)
    if c.marker != "default":
        cfg = replace(cfg, augmentation="pad_crop")
    return cfg


def get_marking(c: Cell, key, data: dict, work: Path, device: str) -> dict:
    """Mark (or reuse) the released copy of the full training slice; returns paths and the summary."""
    from radioactive.marking import mark_folder

    mcfg = marking_config(c)
    mid = digest([str(data["train_full"]), key.fingerprint, c.q, c.key_seed, asdict(mcfg)])
    base = work / "marks" / mid
    summary_path = base / "summary.json"
    if not summary_path.is_file():
        s = mark_folder(data["train_full"], key, base / "train", record=base / "record.jsonl", fraction=c.q,
                        seed=c.key_seed, config=mcfg, overwrite=True, progress=False, device=device)
        summary_path.write_text(json.dumps({**s.to_dict(), "config": asdict(mcfg)}))
    return {"id": mid, "released": base / "train", "record": base / "record.jsonl",
            "summary": json.loads(summary_path.read_text()), "cached_dir": base}


def jpeg_copy(src: Path, dst: Path, quality: int) -> Path:
    """Every image of ``src`` re-encoded as JPEG (Pillow, ``quality``, its default 4:2:0 subsampling)."""
    from PIL import Image

    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(src.rglob("*.png")):
        out = tmp / f.relative_to(src).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        with Image.open(f) as im:
            im.convert("RGB").save(buf, format="JPEG", quality=quality)
        out.write_bytes(buf.getvalue())
    tmp.rename(dst)
    return dst


# ----------------------------------------------------------------------------- training

def train_config(c: Cell, teacher: Path | None = None):
    from radioactive.networks import MarkingNetworkSpec
    from radioactive.training import TrainConfig

    extra = {"teacher": str(teacher), "temperature": c.temperature} if teacher else {}
    extra["augmentation"] = c.augment
    if c.architecture == "linear":
        return TrainConfig(recipe="linear", backbone=MarkingNetworkSpec(), epochs=c.epochs, views=c.views,
                           lr=c.lr, seed=c.seed, **extra)
    return TrainConfig(recipe="scratch", architecture=c.architecture, epochs=c.epochs, lr=c.lr, weight_decay=5e-4,
                       image_size=32, seed=c.seed, **extra)


def get_model(c: Cell, train_dir: Path, test_dir: Path, work: Path, device: str,
              teacher: Path | None = None) -> tuple[Path, float, float]:
    """Train (or reuse) a model on ``train_dir`` (distilled from ``teacher`` when given); returns weights,
    test accuracy, training seconds."""
    from radioactive.training import train

    tcfg = train_config(c, teacher)
    cfg = recipe_dict(tcfg)
    cfg["backbone"] = tcfg.backbone.to_dict()
    mid = digest([str(train_dir), str(test_dir), cfg, c.augment])
    weights = work / "models" / f"{mid}.safetensors"
    if not weights.is_file():
        res = train(train_dir, test_dir, weights, tcfg, progress=False, device=device)
        (work / "models" / f"{mid}.seconds").write_text(f"{res.seconds}\n")
    side = json.loads(weights.with_suffix(".json").read_text())
    secs_file = work / "models" / f"{mid}.seconds"
    secs = float(secs_file.read_text()) if secs_file.is_file() else float("nan")
    return weights, side["test_accuracy"], secs


# ----------------------------------------------------------------------------- one cell

def run_cell(c: Cell, work: Path, device: str, decoys: int) -> dict:
    from radioactive.blackbox import blackbox_detect
    from radioactive.detection import detect
    from radioactive.keys import generate_key

    if not c.implemented:
        raise SystemExit(f"cell {c.id} cannot run: {c.note}")
    t0 = time.time()
    data = cell_data(c, work)
    spec = marker_spec(c, work, data, device)
    key = generate_key(data["all_classes"], spec, seed=c.key_seed)
    only = data["classes"] if data["subset"] else None
    trainer_test = data["test"]
    vanilla_train = data.get("train_sub", data["train_full"])
    row: dict = {"cell": c.id, "study": c.study, "setting": c.setting, "architecture": c.architecture,
                 "dataset": c.dataset, "classes": c.classes, "q": c.q, "seed": c.seed, "key_seed": c.key_seed,
                 "train_per_class": c.train_per_class, "test_per_class": c.test_per_class,
                 "jpeg_quality": c.jpeg, "trainer_augment": c.augment, "epochs": c.epochs, "views": c.views,
                 "lr": c.lr, "marker": key.network.to_dict(), "key_fingerprint": key.fingerprint}
    mark = None
    if c.q > 0:
        mark = get_marking(c, key, data, work, device)
        s = mark["summary"]
        row.update({"marking": s["config"], "num_marked": s["num_marked"], "psnr_db_mean": s["psnr_db_mean"],
                    "psnr_db_p5": s["psnr_db_p5"], "linf_max": s["linf_max"], "mark_seconds": s["seconds"]})
        released = mark["released"]
        if c.jpeg:
            released = jpeg_copy(released, mark["cached_dir"] / f"jpeg{c.jpeg}" / "train", c.jpeg)
        if data["subset"]:
            tag = f"jpeg{c.jpeg}" if c.jpeg else "png"
            released = hardlink_tree(released, mark["cached_dir"] / f"k{c.classes}-{tag}" / "train", data["classes"])
        trainer_data = released
    else:
        row.update({"num_marked": 0, "psnr_db_mean": None, "psnr_db_p5": None})
        trainer_data = vanilla_train
    if c.setting == "distill":
        tc = replace(c, setting="linear" if c.teacher == "linear" else "scratch", architecture=c.teacher)
        teacher, tacc, _ = get_model(tc, trainer_data, trainer_test, work, device)
        vteacher, vtacc, _ = get_model(tc, vanilla_train, trainer_test, work, device)
        suspect, acc, secs = get_model(c, vanilla_train, trainer_test, work, device, teacher=teacher)
        control, acc0, secs0 = get_model(c, vanilla_train, trainer_test, work, device, teacher=vteacher)
        row.update({"teacher": c.teacher, "temperature": c.temperature, "teacher_accuracy": tacc,
                    "control_teacher_accuracy": vtacc})
    else:
        suspect, acc, secs = get_model(c, trainer_data, trainer_test, work, device)
        control, acc0, secs0 = get_model(c, vanilla_train, trainer_test, work, device)
    row.update({"accuracy": acc, "control_accuracy": acc0, "accuracy_cost_points": 100 * (acc0 - acc),
                "train_seconds": secs, "control_train_seconds": secs0})
    wb = detect(suspect, key, data["align"], decoys=decoys, decoy_seed=c.key_seed, only_classes=only)
    row.update({"log10_p_whitebox": wb.log10_pvalue, "alignment_r2": wb.alignment_r2,
                "decoy_empirical_log10_p": wb.extra["decoys"]["empirical_log10_pvalue"], "decoys": decoys,
                "num_alignment_images": wb.num_alignment_images})
    if c.q > 0:
        wb0 = detect(control, key, data["align"], decoys=decoys, decoy_seed=c.key_seed, only_classes=only)
        row.update({"control_log10_p_whitebox": wb0.log10_pvalue,
                    "control_decoy_empirical_log10_p": wb0.extra["decoys"]["empirical_log10_pvalue"]})
        for name, model in (("", suspect), ("control_", control)):
            bb = blackbox_detect(mark["record"], model, only_classes=only)
            row.update({f"{name}log10_p_blackbox": bb.log10_pvalue,
                        f"{name}blackbox_median_loss_diff": bb.extra["median_loss_difference"]})
    else:
        row.update({"log10_p_blackbox": None, "control_log10_p_whitebox": None})
    row.update({"seconds": time.time() - t0, "device": device, "torch_threads": _threads(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return row


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ----------------------------------------------------------------------------- summaries

def status(c: Cell, done: dict) -> str:
    if c.id in done:
        return "done"
    if not c.implemented:
        return "not implemented"
    return "needs GPU" if c.needs_gpu else "pending"


def controls_summary(done: dict) -> dict | None:
    from scipy import stats

    rows = [r for r in done.values() if r["study"] == "controls"]
    if not rows:
        return None
    p = np.array([10 ** r["log10_p_whitebox"] for r in rows])
    pe = np.array([10 ** r["decoy_empirical_log10_p"] for r in rows])
    return {"n": len(rows), "ks_pvalue": float(stats.kstest(p, "uniform").pvalue), "min_p": float(p.min()),
            "below_1e-3": int((p < 1e-3).sum()), "below_0.05": int((p < 0.05).sum()),
            "ks_pvalue_decoy_rank": float(stats.kstest(pe, "uniform").pvalue)}


def null_check(cells: dict[str, Cell], done: dict, work: Path, num_keys: int) -> dict:
    """Fresh random keys against every finished control's classifier (``detection.decoy_log10_pvalues``).

    For a linear suspect on the marking network's own features the alignment is the identity, so the
    pulled-back classifier is the head's weight itself and no image needs to be read.
    """
    from safetensors.numpy import load_file
    from scipy import stats

    from radioactive.detection import decoy_log10_pvalues

    logp = []
    for c in cells.values():
        if c.study != "controls" or c.id not in done:
            continue
        data = cell_data(c, work)
        weights, _, _ = get_model(c, data["train_full"], data["test"], work, "cpu")
        w = load_file(str(weights))["weight"].astype(np.float64)
        logp.append(decoy_log10_pvalues(w, num_keys, seed=c.key_seed + 1))
    p = 10 ** np.concatenate(logp)
    return {"models": len(logp), "keys_per_model": num_keys, "ks_pvalue": float(stats.kstest(p, "uniform").pvalue),
            "fpr_0.05": float((p < 0.05).mean()), "fpr_0.01": float((p < 0.01).mean()),
            "fpr_0.001": float((p < 0.001).mean()), "min_p": float(p.min())}


def print_list(cells: dict[str, Cell], done: dict) -> None:
    print(f"{'cell':24} {'study':11} {'setting':10} {'q':>5} {'status':16} {'log10 p':>8} {'black-box':>9}  command")
    for c in cells.values():
        r = done.get(c.id, {})
        lp = f"{r['log10_p_whitebox']:.2f}" if r else ""
        bb = f"{r['log10_p_blackbox']:.2f}" if r and r.get("log10_p_blackbox") is not None else ""
        print(f"{c.id:24} {c.study:11} {c.setting:10} {_pct(c.q):>5} {status(c, done):16} {lp:>8} {bb:>9}  {c.command}")
    ks = controls_summary(done)
    if ks:
        print(f"controls: n={ks['n']} KS p vs uniform {ks['ks_pvalue']:.3f}, min p {ks['min_p']:.3g}")


def _f(x, fmt="{:.2f}"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x).replace("-", "−")


def markdown(cells: dict[str, Cell], done: dict) -> str:
    """Per-study tables of the finished and pending cells (what docs/results.md shows)."""
    out = []
    head = ("| cell | q | marking PSNR mean / p5 (dB) | suspect acc. | control acc. | white-box log10 p | "
            "decoy rank log10 | black-box log10 p | control white-box / black-box | s | command |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for study in STUDIES:
        out.append(f"\n#### {study}\n")
        if study == "controls":
            out.append("| cell | train seed | key seed | accuracy | white-box log10 p | decoy rank log10 | s | command |\n"
                       "| --- | --- | --- | --- | --- | --- | --- | --- |")
        else:
            out.append(head)
        for c in cells.values():
            if c.study != study:
                continue
            r = done.get(c.id)
            if r is None:
                if study == "controls":
                    out.append(f"| {c.id} | {c.seed} | {c.key_seed} | {status(c, done)} | | | | `{c.command}` |")
                else:
                    out.append(f"| {c.id} | {_pct(c.q)} % | {status(c, done)} | | | | | | | | `{c.command}` |")
                continue
            if study == "controls":
                out.append(f"| {c.id} | {c.seed} | {c.key_seed} | {100 * r['accuracy']:.2f} % | "
                           f"{_f(r['log10_p_whitebox'])} | {_f(r['decoy_empirical_log10_p'])} | "
                           f"{r['seconds']:.0f} | `{r['command']}` |")
                continue
            psnr = (f"{r['psnr_db_mean']:.2f} / {r['psnr_db_p5']:.2f}" if r.get("psnr_db_mean") else "–")
            ctl = f"{_f(r.get('control_log10_p_whitebox'))} / {_f(r.get('control_log10_p_blackbox'))}"
            out.append(f"| {c.id} | {_pct(c.q)} % | {psnr} | {100 * r['accuracy']:.2f} % | "
                       f"{100 * r['control_accuracy']:.2f} % | **{_f(r['log10_p_whitebox'])}** | "
                       f"{_f(r['decoy_empirical_log10_p'])} | {_f(r.get('log10_p_blackbox'))} | {ctl} | "
                       f"{r['seconds']:.0f} | `{r['command']}` |")
    ks = controls_summary(done)
    if ks:
        out.append(f"\ncontrols: {ks}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots

def plots(done: dict, figures: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    written = []
    rows = list(done.values())
    frac = [r for r in rows if r["study"] == "fraction"]

    def save(fig, name):
        p = figures / name
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    # log10 p against q per setting
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, marker in (("linear", "o"), ("scratch", "s"), ("cross-arch", "^"), ("distill", "v")):
        pts = sorted((r["q"] * 100, r["log10_p_whitebox"]) for r in frac if r["setting"] == setting)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=f"{setting} (white-box)")
        pts = sorted((r["q"] * 100, r["log10_p_blackbox"]) for r in frac
                     if r["setting"] == setting and r.get("log10_p_blackbox") is not None)
        if pts:
            ax.plot(*zip(*pts), marker=marker, ls="--", alpha=0.6, label=f"{setting} (black-box)")
    scratch_file = _common.RESULTS / "from_scratch.jsonl"
    if scratch_file.is_file():  # CPU cells of studies/from_scratch/from_scratch.py (10,000 images, ResNet-18)
        fs = [json.loads(ln) for ln in scratch_file.read_text().splitlines() if ln.strip()]
        pts = [(r["q"] * 100, r["suspect"]["log10_p_whitebox"]) for r in fs]
        if pts:
            ax.plot(*zip(*pts), "s", mfc="none", color="grey", label="from_scratch.py cells, ResNet-18 (white-box)")
    ind = sorted((q * 100, v) for (s, q), v in INDEPENDENT.items() if s == "linear")
    ax.plot(*zip(*ind), "kx", ms=8, label="independent reproduction (linear)")
    ind = sorted((q * 100, v) for (s, q), v in INDEPENDENT.items() if s == "scratch")
    ax.plot(*zip(*ind), "k+", ms=9, label="independent reproduction (scratch)")
    ax.axhline(-4, color="r", lw=1, ls=":", label="p = 1e-4")
    ax.set_xlabel("marked fraction q (%)")
    ax.set_ylabel("log10 p")
    ax.set_title("CIFAR-10: detection against marked fraction")
    ax.legend(fontsize=7)
    save(fig, "reproduce_log10p_vs_q.png")

    # accuracy against q
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in ("linear", "scratch", "cross-arch", "distill"):
        pts = sorted((r["q"] * 100, 100 * r["accuracy"], 100 * r["control_accuracy"]) for r in frac
                     if r["setting"] == setting)
        if pts:
            q, a, a0 = zip(*pts)
            ax.plot(q, a, "o-", label=f"{setting}: suspect")
            ax.plot(q, a0, "k:", label=f"{setting}: vanilla control")
    ctl_acc = [100 * r["accuracy"] for r in rows if r["study"] == "controls"]
    if ctl_acc:
        ax.axhspan(min(ctl_acc), max(ctl_acc), color="grey", alpha=0.2,
                   label=f"linear vanilla, {len(ctl_acc)} training seeds (range)")
    ax.set_xlabel("marked fraction q (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy cost of marking")
    ax.legend(fontsize=7)
    save(fig, "reproduce_accuracy_vs_q.png")

    # log10 p against number of classes
    cls = sorted((r["classes"], r["log10_p_whitebox"], r.get("log10_p_blackbox"), r.get("control_log10_p_whitebox"))
                 for r in rows if r["study"] == "classes" and r["setting"] == "linear")
    if cls:
        fig, ax = plt.subplots(figsize=(6, 4))
        k, wb, bb, c0 = zip(*cls)
        ax.plot(k, wb, "o-", label="white-box (marked)")
        ax.plot(k, [b if b is not None else np.nan for b in bb], "s--", label="black-box (marked)")
        ax.plot(k, [b if b is not None else np.nan for b in c0], "k:", marker=".", label="white-box (vanilla control)")
        ax.axhline(-4, color="r", lw=1, ls=":", label="p = 1e-4")
        ax.set_xscale("log")
        ax.set_xticks(k, [str(v) for v in k])
        ax.set_xlabel("number of classes (CIFAR-100, 200 training images a class, q = 10 %)")
        ax.set_ylabel("log10 p")
        ax.legend(fontsize=7)
        save(fig, "reproduce_log10p_vs_classes.png")

    # log10 p against PSNR
    qual = [r for r in rows if r["setting"] == "linear" and r["q"] == 0.1 and r["dataset"] == "cifar10"
            and r["study"] in ("quality", "fraction") and r.get("psnr_db_mean")]
    if qual:
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = sorted((r["psnr_db_mean"], r["log10_p_whitebox"], r["cell"]) for r in qual)
        x, y, _ = zip(*pts)
        ax.plot(x, y, "o-", label="white-box")
        ax.plot(x, [r.get("log10_p_blackbox") for r in sorted(qual, key=lambda r: r["psnr_db_mean"])], "s--",
                alpha=0.6, label="black-box")
        for xi, yi, n in pts:
            ax.annotate(n.replace("lin-q10-", "").replace("lin-q10", "linf10-lam10"), (xi, yi), fontsize=6)
        ax.axhline(-4, color="r", lw=1, ls=":", label="p = 1e-4")
        ax.set_xlabel("mean PSNR of the marked images (dB)")
        ax.set_ylabel("log10 p")
        ax.set_title("Quality against power (linear, q = 10 %)")
        ax.legend(fontsize=7)
        save(fig, "reproduce_log10p_vs_psnr.png")

    # controls: p-values against uniform quantiles
    ctl = sorted(10 ** r["log10_p_whitebox"] for r in rows if r["study"] == "controls")
    if ctl:
        fig, ax = plt.subplots(figsize=(4, 4))
        n = len(ctl)
        ax.plot((np.arange(1, n + 1) - 0.5) / n, ctl, "o")
        ax.plot([0, 1], [0, 1], "k:")
        ax.set_xlabel("uniform quantile")
        ax.set_ylabel("control p-value (sorted)")
        ks = controls_summary(done)
        ax.set_title(f"{n} vanilla controls, fresh keys\nKS p = {ks['ks_pvalue']:.2f}", fontsize=9)
        save(fig, "reproduce_controls_qq.png")
    return written


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the grid with done/pending")
    p.add_argument("--cell", action="append", default=[], help="run this cell (repeatable)")
    p.add_argument("--study", action="append", default=[], choices=STUDIES, help="run the CPU cells of a study")
    p.add_argument("--all", action="store_true", help="run every CPU cell, cheapest studies first")
    p.add_argument("--include-gpu", action="store_true", help="with --study/--all: also the cells marked needs GPU")
    p.add_argument("--plots", action="store_true", help="regenerate the figures from the results file")
    p.add_argument("--markdown", action="store_true", help="print the per-study tables")
    p.add_argument("--null-check", type=int, default=0, metavar="KEYS",
                   help="score KEYS fresh random keys against every finished control model; print KS and FPR")
    p.add_argument("--stop-after-min", type=float, default=None,
                   help="start no new cell after this many minutes (finished cells are kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--decoys", type=int, default=200)
    p.add_argument("--workdir", type=Path, default=WORKDIR)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--figures", type=Path, default=FIGURES)
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: 20 training / 10 test images a class, 1 epoch (use another --workdir/--results)")
    a = p.parse_args(argv)

    cells = grid()
    if a.tiny:
        if a.results == RESULTS or a.workdir == WORKDIR:
            raise SystemExit("--tiny needs its own --results and --workdir")
        cells = {k: replace(c, train_per_class=20 if c.dataset == "cifar10" else 10,
                            test_per_class=10 if c.dataset == "cifar10" else 5, epochs=1)
                 for k, c in cells.items()}
    done = read_results(a.results)
    if a.list:
        print_list(cells, done)
    if a.markdown:
        print(markdown(cells, done))
    if a.null_check:
        print(json.dumps(null_check(cells, done, a.workdir, a.null_check)))
    todo: list[Cell] = []
    for cid in a.cell:
        if cid not in cells:
            raise SystemExit(f"unknown cell {cid!r}; `--list` shows the grid")
        todo.append(cells[cid])
    for c in cells.values():
        if (a.all or c.study in a.study) and (a.include_gpu or not c.needs_gpu) and c.implemented:
            todo.append(c)
    if todo:
        import torch

        # import the whole pipeline now: a long run keeps the library version it started with
        import radioactive.blackbox
        import radioactive.detection
        import radioactive.keys
        import radioactive.marking
        import radioactive.training  # noqa: F401

        torch.set_num_threads(a.threads)
    t_start = time.time()
    for c in todo:
        if c.id in read_results(a.results):
            print(f"{c.id}: done (not recomputed)", flush=True)
            continue
        if a.stop_after_min is not None and time.time() - t_start > 60 * a.stop_after_min:
            print(f"{c.id}: not started (--stop-after-min {a.stop_after_min})", flush=True)
            continue
        print(f"{c.id}: running", flush=True)
        row = run_cell(c, a.workdir, a.device, a.decoys)
        row = _common.append_result(a.results, row, c.command)  # stamps command, commit, versions
        print(json.dumps({k: row[k] for k in ("cell", "q", "psnr_db_mean", "accuracy", "control_accuracy",
                                              "log10_p_whitebox", "decoy_empirical_log10_p", "log10_p_blackbox",
                                              "seconds")}), flush=True)
    if a.plots:
        for f in plots(read_results(a.results), a.figures):
            print(f"wrote {f}")
    if not (a.list or a.markdown or a.plots or a.null_check or todo):
        p.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
