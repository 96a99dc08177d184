"""The whole story on the built-in CIFAR-10 data: keygen, mark, train, detect, report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .blackbox import blackbox_detect
from .data import atomic_write_bytes, cifar10_subset
from .detection import detect
from .errors import RadioactiveError
from .keys import generate_key
from .marking import MarkingConfig, mark_folder
from .report import html_report, markdown_report, plot_cosines
from .training import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``radioactive demo`` (defaults finish in about 10 minutes on 2 CPU cores).

    Attributes:
        train_per_class: CIFAR-10 training images per class (of 5,000).
        test_per_class: CIFAR-10 test images per class (of 1,000); used for
            accuracy and to fit the alignment.
        marked_fraction: q, share of the training images marked, in (0, 1].
        seed: seeds the key, the selection, marking and both trainings.
        alpha: significance level of the verdicts.
        decoys: fresh random keys scored against each suspect (empirical p-value).
        marking: marking settings. training: the trainer's recipe.
    """

    train_per_class: int = 1000
    test_per_class: int = 200
    marked_fraction: float = 0.1
    seed: int = 0
    alpha: float = 1e-3
    decoys: int = 200
    marking: MarkingConfig = MarkingConfig()
    training: TrainConfig = field(default_factory=lambda: TrainConfig(recipe="linear", epochs=30, views=2))


def run_demo(output_dir: str | Path, config: DemoConfig = DemoConfig(), archive: str | Path | None = None,
             progress: bool = True) -> dict:
    """Run the demo and write ``summary.json``, ``report.md`` and plots into ``output_dir``.

    Layout of ``output_dir``: ``data/vanilla/{train,test}`` (the CIFAR-10
    slice), ``data/released/train`` (the released copy), ``private/`` (key
    and record: secret), ``models/`` (suspects), ``detect-*.json``,
    ``cosines-*.png``, ``report-*.html`` (self-contained), ``summary.json``, ``report.md``.

    Returns:
        the summary dictionary.

    Raises:
        RadioactiveError: data not found, output folder not empty.
    """
    t0 = time.time()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise RadioactiveError(f"output folder {out} exists and is not empty; choose a new one")
    train_dir, test_dir = cifar10_subset(out / "data" / "vanilla", config.train_per_class, config.test_per_class,
                                         archive)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    key = generate_key(classes, config.training.backbone, seed=config.seed)
    key_path = key.save(out / "private" / "key.safetensors")
    released = out / "data" / "released" / "train"
    mark = mark_folder(train_dir, key, released, record=out / "private" / "record.jsonl",
                       fraction=config.marked_fraction, seed=config.seed, config=config.marking, progress=progress)
    log.info("marked %d images: PSNR %.2f dB", mark.num_marked, mark.psnr_db_mean)
    suspects = {}
    plots = {}
    for name, data in (("marked", released), ("vanilla", train_dir)):
        trained = train(data, test_dir, out / "models" / f"{name}.safetensors", config.training, progress=progress)
        result = detect(trained.weights, key, test_dir, alpha=config.alpha, decoys=config.decoys,
                        decoy_seed=config.seed)
        result.save(out / f"detect-{name}.json")
        black = blackbox_detect(mark.record, trained.weights, alpha=config.alpha)
        black.save(out / f"detect-blackbox-{name}.json")
        html_report(result, out / f"report-{name}.html", mark.record)
        plots[name] = plot_cosines(result, out / f"cosines-{name}.png",
                                   f"suspect trained on {name} data: log10 p = {result.log10_pvalue:.2f}").name
        suspects[name] = {
            "trained_on": str(data.relative_to(out)), "accuracy": trained.test_accuracy,
            "log10_pvalue": result.log10_pvalue, "pvalue": result.pvalue_text, "detected": result.detected,
            "alignment_r2": result.alignment_r2,
            "decoy_empirical_log10_pvalue": result.extra.get("decoys", {}).get("empirical_log10_pvalue"),
            "blackbox_log10_pvalue": black.log10_pvalue, "blackbox_detected": black.detected, "train_seconds": trained.seconds, "detect_seconds": result.seconds,
        }
    summary = {
        "package_version": __version__,
        "dataset": f"CIFAR-10 ({config.train_per_class} training and {config.test_per_class} test images per class)",
        "marked_fraction": config.marked_fraction,
        "psnr_db_mean": mark.psnr_db_mean, "psnr_db_p5": mark.psnr_db_p5, "linf_max": mark.linf_max,
        "alpha": config.alpha,
        "key": {"path": str(key_path.relative_to(out)), "fingerprint": key.fingerprint,
                "network": key.network.to_dict()},
        "marking": mark.to_dict(),
        "suspects": suspects,
        "config": asdict(config),
        "seconds": time.time() - t0,
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "report.md", markdown_report(summary, plots).encode())
    return summary
