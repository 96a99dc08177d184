"""The whole story on the built-in CIFAR-10 data: keygen, mark, train, audit, report.

Two settings, each with its measured best configuration:

* ``from-scratch`` (default): the trainer trains a ResNet-18 from random initialisation, the setting of most
  real suspects (docs/results.md, "Models trained from scratch"). The owner first trains an in-domain marking network on the vanilla
  images, draws the key in its feature space, marks with the ``from-scratch`` preset (the trainer's pad-crop
  + flip while marking) with lambda_img calibrated to a 40.5 dB mean PSNR, trains one or more vanilla models
  as references, fixes the audit plan (the gradient test with those references) in the vault, and audits each
  suspect: one verdict per suspect.
* ``linear``: the trainer fits a linear classifier on the frozen features of the public marking network
  (EfficientNet-Lite0); the audit plan holds the classic white-box test (alignment, cosines, decoy keys)
  (docs/results.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import __version__
from .data import atomic_write_bytes, cifar10_subset
from .errors import RadioactiveError
from .keys import generate_key
from .marking import MARKING_PRESETS, MarkingConfig, calibrate_lambda_img, mark_folder
from .networks import MarkingNetworkSpec
from .report import markdown_report, plot_cosines
from .training import SCRATCH_RECIPE, TrainConfig, train

log = logging.getLogger(__name__)

SETTINGS = ("from-scratch", "linear")
_TRAINERS = {
    "from-scratch": SCRATCH_RECIPE,  # benchmarks/studies/from_scratch/NOTES.md, "Protocol"
    "linear": TrainConfig(recipe="linear"),  # the linear recipe's defaults (30 epochs, 2 views)
}
# dB; 0: the preset's lambda_img (benchmarks/studies/from_scratch/NOTES.md, "Calibrated marks and a softer loss")
_TARGET_PSNR = {"from-scratch": 40.5, "linear": 0.0}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``radioactive demo``.

    On 2 CPU cores the ``from-scratch`` setting takes about 35 minutes (four ResNet-18 trainings on
    10,000 images), the ``linear`` setting about 7.

    Attributes:
        setting: ``from-scratch`` or ``linear`` (module docstring).
        train_per_class: CIFAR-10 training images per class (of 5,000).
        test_per_class: CIFAR-10 test images per class (of 1,000); used for
            accuracy (and, for ``linear``, to fit the alignment).
        marked_fraction: q, share of the training images marked, in (0, 1].
        seed: seeds the key, the selection and marking, and every training (``training.seed`` is not
            used): ``from-scratch`` trains the marking network with ``seed``, both suspects with
            ``seed + 1`` and the references with ``seed + 2``, ``seed + 3``, ...; ``linear`` trains both suspects
            with ``seed``.
        references: ``from-scratch`` only: vanilla reference models of the gradient test (>= 1; each is one more
            training; 1, 2 and 3 read -4.00 / -4.84 / -5.65 on seed 0, benchmarks/studies/from_scratch/NOTES.md "The demo").
        alpha: significance level of the verdicts.
        decoys: ``linear`` only: fresh random keys scored against each suspect (empirical p-value).
        marking: marking settings; None: the setting's preset in ``MARKING_PRESETS``.
        target_psnr: mean PSNR in dB that ``marking.lambda_img`` is calibrated to before marking
            (:func:`radioactive.marking.calibrate_lambda_img`; it replaces the lambda_img of ``marking``, and the
            summary's config records the weight used); 0: no calibration; None: the setting's (40.5 for
            ``from-scratch``, 0 for ``linear``).
        training: the trainer's recipe (also the marking network's for ``from-scratch``); None: the
            setting's measured recipe. :meth:`resolved` fills both.

    Raises:
        RadioactiveError: unknown setting, or a training recipe that does not match the setting.
    """

    setting: str = "from-scratch"
    train_per_class: int = 1000
    test_per_class: int = 200
    marked_fraction: float = 0.1
    seed: int = 0
    alpha: float = 1e-3
    decoys: int = 200
    references: int = 1
    marking: MarkingConfig | None = None
    training: TrainConfig | None = None
    target_psnr: float | None = None

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise RadioactiveError(f"setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        expected = _TRAINERS[self.setting].recipe
        if self.training is not None and self.training.recipe != expected:
            raise RadioactiveError(f"the {self.setting} setting trains with recipe {expected!r}, "
                                   f"got {self.training.recipe!r}")
        if self.references < 1:
            raise RadioactiveError(f"references must be >= 1, got {self.references}")
        if self.train_per_class < 1 or self.test_per_class < 1 or not 0 < self.marked_fraction <= 1:
            raise RadioactiveError("train_per_class and test_per_class must be >= 1 and marked_fraction in (0, 1]")
        if self.target_psnr is not None and self.target_psnr != 0 and not 20 <= self.target_psnr <= 80:
            raise RadioactiveError(f"target_psnr must be 0 (off) or in [20, 80] dB, got {self.target_psnr}")
        if round(self.marked_fraction * self.train_per_class) < 1:
            raise RadioactiveError(f"a marked fraction of {self.marked_fraction} of {self.train_per_class} images a "
                                   "class marks none: raise one of them")

    def resolved(self) -> DemoConfig:
        """This configuration with ``marking``, ``training`` and ``target_psnr`` filled from the setting when None."""
        return replace(self, marking=self.marking or MARKING_PRESETS[self.setting],
                       training=self.training or _TRAINERS[self.setting],
                       target_psnr=_TARGET_PSNR[self.setting] if self.target_psnr is None else self.target_psnr)


def _private(trained) -> None:
    """The owner's models are private: 0600, like every file of the vault."""
    from .suspects import sidecar_path

    for p in (Path(trained.weights), sidecar_path(Path(trained.weights))):
        if p.is_file():
            p.chmod(0o600)


def run_demo(output_dir: str | Path, config: DemoConfig = DemoConfig(), archive: str | Path | None = None,
             progress: bool = True) -> dict:
    """Run the demo and write ``summary.json``, ``report.md`` and the audits into ``output_dir``.

    Layout of ``output_dir``:

    * ``data/vanilla/{train,test}``: the owner's CIFAR-10 slice (originals);
    * ``release/train``: the released copy (images only: publish this folder);
    * ``vault/`` (0700, files 0600): the key, the record, the audit plan, the manifest, the commitment and, for
      ``from-scratch``, the marking network and the references (``vault/references/``): keep it private;
    * ``models/``: the trainer's suspects (marked, vanilla);
    * ``audit-*.json`` and ``audit-*.html`` (self-contained), ``cosines-*.png``, ``summary.json``, ``report.md``.

    Each suspect gets one audit verdict (:func:`radioactive.detection.audit.audit_vault`) from the tests of the
    vault's plan: the gradient test for ``from-scratch``, the white-box test (with decoy keys) for ``linear``.

    Returns:
        the summary dictionary.

    Raises:
        RadioactiveError: data not found, output folder not empty.
    """
    from .detection import SuspectAccess
    from .detection.audit import audit_vault
    from .detection.plan import change_plan
    from .report import audit_html
    from .vault import make_private_dir

    t0 = time.time()
    config = config.resolved()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise RadioactiveError(f"output folder {out} exists and is not empty; choose a new one")
    train_dir, test_dir = cifar10_subset(out / "data" / "vanilla", config.train_per_class, config.test_per_class,
                                         archive)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    vault = make_private_dir(out / "vault")
    marker, references = None, []
    if config.setting == "from-scratch":  # the owner's in-domain marking network, trained on the vanilla images
        marker = train(train_dir, test_dir, vault / "marking-network.safetensors",
                       replace(config.training, seed=config.seed), progress=progress)
        _private(marker)
        network = MarkingNetworkSpec("trained", 32, path=str(Path(marker.weights).resolve()))
        trainer = replace(config.training, seed=config.seed + 1)
        # The gradient test's vanilla reference: the trainer's recipe on the vanilla images with another seed. The
        # marking network would be a valid reference too, but a weak one: its own loss gradient, pulled back
        # through its own features, is several times larger than a suspect's and swamps the per-class sums
        # (benchmarks/studies/from_scratch/NOTES.md, "The demo").
        make_private_dir(vault / "references")
        for i in range(config.references):
            references.append(train(train_dir, test_dir, vault / "references" / f"reference{i + 1}.safetensors",
                                    replace(config.training, seed=config.seed + 2 + i), progress=progress))
            _private(references[-1])
    else:
        network, trainer = config.training.backbone, replace(config.training, seed=config.seed)
    key = generate_key(classes, network, seed=config.seed)
    released = out / "release" / "train"
    marking, calibration = config.marking, None
    if config.target_psnr:
        calibration = calibrate_lambda_img(train_dir, key, config.target_psnr, fraction=config.marked_fraction,
                                           seed=config.seed, config=marking)
        marking = replace(marking, lambda_img=calibration.lambda_img)
        config = replace(config, marking=marking)  # the summary records the weight used
        log.info("lambda_img %.4g: pilot mean PSNR %.2f dB", calibration.lambda_img, calibration.psnr_db_mean)
    mark = mark_folder(train_dir, key, released, vault=vault, fraction=config.marked_fraction, seed=config.seed,
                       config=marking, progress=progress)
    log.info("marked %d images: PSNR %.2f dB", mark.num_marked, mark.psnr_db_mean)
    # the audit plan, fixed before any suspect is trained or tested
    if references:
        change_plan(vault, references=[r.weights for r in references], methods=["gradient"], alpha=config.alpha)
    else:
        change_plan(vault, methods=["white-box"], alpha=config.alpha,
                    settings={"white-box": {"decoy_keys": config.decoys, "decoy_seed": config.seed}})
    suspects, plots = {}, {}
    for name, data in (("marked", released), ("vanilla", train_dir)):
        trained = train(data, test_dir, out / "models" / f"{name}.safetensors", trainer, progress=progress)
        result = audit_vault(vault, SuspectAccess.of_model(trained.weights),
                             images=None if references else test_dir, commitment=mark.commitment)
        result.save(out / f"audit-{name}.json")
        audit_html(result, out / f"audit-{name}.html", vault)
        main = result.tests[0] if result.tests else None
        if main is not None and main.cosines:
            plots[name] = plot_cosines(main, out / f"cosines-{name}.png",
                                       f"suspect trained on {name} data: {main.method} log10 p = "
                                       f"{main.log10_pvalue:.2f}").name
        suspects[name] = _suspect_row(result, trained, str(data.relative_to(out)))
    summary = {
        "package_version": __version__,
        "setting": config.setting,
        "dataset": f"CIFAR-10 ({config.train_per_class} training and {config.test_per_class} test images per class)",
        "marked_fraction": config.marked_fraction,
        "psnr_db_mean": mark.psnr_db_mean, "psnr_db_p5": mark.psnr_db_p5, "linf_max": mark.linf_max,
        "alpha": config.alpha,
        "release": str(released.relative_to(out)), "vault": str(vault.relative_to(out)),
        "commitment": mark.commitment,
        "key": {"path": str((vault / "key.safetensors").relative_to(out)), "fingerprint": key.fingerprint,
                "network": key.network.to_dict()},
        "marking_network": None if marker is None else _model_row(marker, out),
        "references": [_model_row(r, out) for r in references],
        "marking": mark.to_dict(),
        "lambda_img_calibration": None if calibration is None else asdict(calibration),
        "suspects": suspects,
        "config": asdict(config),
        "seconds": time.time() - t0,
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "report.md", markdown_report(summary, plots).encode())
    return summary


def _model_row(trained, out: Path) -> dict:
    """Where one of the owner's own models is, its test accuracy and training time."""
    return {"path": str(Path(trained.weights).relative_to(out)), "accuracy": trained.test_accuracy,
            "train_seconds": trained.seconds}


def _suspect_row(result, trained, trained_on: str) -> dict:
    """One suspect's line of the summary: its accuracy, the audit's verdict and each test's reading."""
    return {
        "trained_on": trained_on, "accuracy": trained.test_accuracy,
        "test": "audit (" + ", ".join(t.method for t in result.tests) + ")",
        "log10_pvalue": result.log10_pvalue, "detected": result.detected, "verdict": result.verdict(),
        "tests": {t.method: {"validity": t.validity, "log10_pvalue": t.log10_pvalue,
                             "adjusted_log10_pvalue": result.adjusted_log10_pvalues.get(t.method)}
                  for t in result.tests},
        "not_run": result.not_run,
        "decoy_empirical_log10_pvalue": next((t.details.decoys.empirical_log10_pvalue for t in result.tests
                                              if getattr(t.details, "decoys", None)), None),
        "commitment_matches": result.vault.get("commitment_matches"),
        "train_seconds": trained.seconds, "audit_seconds": result.seconds,
    }
