"""Command line: parse flags, call one library function, print one JSON object.

One parser builder (``_add_<command>``) and one handler (``_run_<command>``) per subcommand; the detection
family's are in :mod:`radioactive.cli_args` and :mod:`radioactive.cli_detection`. Defaults come from the config
dataclasses.

Exit codes: 0 success, 1 runtime failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .augment import AUGMENTATIONS
from .cli_args import (_existing, _folder_or_archive, _Formatter, _fraction, _holdout, _linf, _nonneg_float,
                       _nonneg_int, _Parser, _positive_float, _positive_int, _psnr, _psnr_or_off, _quality, _sub,
                       _temperature, add_commands)
from .cli_detection import COMMANDS
from .cli_detection import run as run_detection
from .data import OUTPUT_FORMATS, OutputFormat
from .errors import RadioactiveError
from .demo import SETTINGS, DemoConfig
from .marking import MARKING_PRESETS, MarkingConfig
from .networks import MarkingNetworkSpec
from .training import TrainConfig, default_lr, default_weight_decay

MC, TC, NS = MarkingConfig(), TrainConfig(), MarkingNetworkSpec()
_PRESET_FIELDS = ("steps", "lr", "linf", "lambda_img", "lambda_ft", "augmentation", "views", "batch_size")


def _preset_text(config: MarkingConfig) -> str:
    """A preset's settings as the help text shows them."""
    return ", ".join(f"{k} {getattr(config, k):.4g}" if isinstance(getattr(config, k), float) else
                     f"{k} {getattr(config, k)}" for k in _PRESET_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="radioactive", formatter_class=_Formatter,
                description="Mark an image dataset and detect models trained on it (radioactive data).")
    p.add_argument("--version", action="version", version=f"radioactive {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subs = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_keygen(subs)
    _add_mark(subs)
    _add_train(subs)
    add_commands(subs)
    _add_demo(subs)
    return p


def _add_keygen(subs) -> None:
    k = _sub(subs, "keygen", "draw a secret key: one random unit carrier per class",
             "radioactive keygen --data ../shared/data/cifar10-jpeg.tar.gz --output key.safetensors")
    g = k.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", type=_existing, help="image folder (class sub-folders) or the CIFAR-10 archive, for the class names")
    g.add_argument("--classes", help="class names in index order, comma-separated")
    k.add_argument("--network", default=NS.name, help="marking network: efficientnet_lite0, or trained (see --network-weights)")
    k.add_argument("--network-weights", type=_existing, default=None,
                   help="weights of a marking network saved by `radioactive train` (an in-domain marking network); "
                        "implies --network trained")
    k.add_argument("--image-size", type=_positive_int, default=NS.image_size, help="side in px the marking network sees")
    k.add_argument("--seed", type=_nonneg_int, default=None, help="seed of the carriers (default: drawn from the OS)")
    k.add_argument("--output", type=Path, required=True, help="key file to write (.safetensors); keep it secret")


def _add_mark(subs) -> None:
    m = _sub(subs, "mark", "mark a fraction of an image folder and write a complete released copy",
             "radioactive mark --source train/ --key key.safetensors --fraction 0.1 --output released/train "
             "--vault private/vault\n"
             "  torchrun --nproc_per_node=4 -m radioactive mark ... --device cuda   # 4 processes, same bytes "
             "(docs/distributed.md)")
    m.add_argument("--source", type=_existing, required=True,
                   help="image folder (class sub-folders), or the CIFAR-10 archive (its train split is marked)")
    m.add_argument("--key", type=_existing, required=True, help="key file from keygen")
    m.add_argument("--output", type=Path, required=True, help="folder of the released copy (created)")
    m.add_argument("--vault", type=Path, required=True,
                   help="the owner's private folder (created, mode 0700; files 0600): a copy of the key, the record, "
                        "the holdout images, a manifest and the commitment; never inside the release or the source "
                        "(docs/formats.md)")
    m.add_argument("--known-vault", type=_existing, action="append", default=[],
                   help="the vault of an earlier marking run (repeatable): a source holding an image it marked, or "
                        "its release, is refused as a release of this tool (a release with a NOTICE.txt always is)")
    m.add_argument("--allow-remark", action="store_true", help="mark a source that is a release of this tool anyway")
    m.add_argument("--public-notice", action="store_true",
                   help="write NOTICE.txt into the release: the dataset is marked (and the commitment), never which "
                        "images; the one file of a release that is not an image")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=_fraction, help="marked fraction q in (0, 1], chosen in every class")
    g.add_argument("--files", type=_existing, help="text file listing the relative paths to mark, one a line")
    m.add_argument("--holdout-fraction", type=_holdout, default=0.0,
                   help="also mark this share of each class but release its vanilla version; the marked versions "
                        "stay private and give the black-box test an exact control")
    m.add_argument("--withhold-fraction", type=_holdout, default=0.0,
                   help="leave this share of each class's unmarked images out of the release (listed in the record): "
                        "the control of the membership test (detect --method membership)")
    m.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the selection and augmentation draws")
    _add_mark_settings(m)
    _add_mark_run(m)


def _add_mark_settings(m) -> None:
    """``mark``: the preset and the marking settings that override it."""
    m.add_argument("--preset", choices=tuple(MARKING_PRESETS), default="linear",
                   help="the settings below that are not given come from this measured configuration: "
                        + "; ".join(f"{n}: {_preset_text(c)}" for n, c in MARKING_PRESETS.items())
                        + " (from-scratch expects an in-domain marking network, benchmarks/studies/from_scratch/NOTES.md)")
    for flag, kind, text in (  # not given: the preset's value (argparse.SUPPRESS leaves the attribute unset)
            ("--steps", _nonneg_int, "optimisation steps"),
            ("--lr", _positive_float, "Adam learning rate (pixels in [0, 1])"),
            ("--linf", _linf, "L-infinity radius in 8-bit levels"),
            ("--lambda-img", _nonneg_float, "weight of the pixel L2 penalty"),
            ("--lambda-ft", _nonneg_float, "weight of the feature drift orthogonal to the carrier"),
            ("--augmentation", None, "augmentation while marking: random resized crop + flip, or the CIFAR "
                                     "trainer's pad-4 crop + flip"),
            ("--views", _positive_int, "augmented views averaged per marking step"),
            ("--batch-size", _positive_int, "images optimised together")):
        m.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text + " (default: the preset's)",
                       **({"choices": tuple(AUGMENTATIONS)} if flag == "--augmentation" else {}))
    m.add_argument("--target-psnr", type=_psnr, default=None,
                   help="choose --lambda-img so that the marks' mean PSNR (before any lossy --output-format) is just "
                        "above this (dB), by marking a pilot of up to 200 of the images first (a minute or more on "
                        "CPU; again on --resume, with the same result on CPU); not with --lambda-img")
    m.add_argument("--min-psnr", type=_nonneg_float, default=MC.min_psnr,
                   help="per-image PSNR floor (dB): an image below it has its perturbation scaled down until it "
                        "reaches it (the mean hides a tail); 0: no floor")


def _add_mark_run(m) -> None:
    """``mark``: resuming, device, threads, metrics and the output format."""
    g = m.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into a non-empty output folder: same arguments required; "
                        "finished images are verified by sha256 and kept, the rest redone; the result is "
                        "byte-identical to an uninterrupted run (on CPU). On an empty output, a fresh start")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty output folder: delete the files a previous mark run wrote "
                        "there (refused if it holds any other file)")
    m.add_argument("--device", default="cpu",
                   help="torch device (cpu, cuda); under torchrun, each process uses cuda:LOCAL_RANK")
    m.add_argument("--threads", type=_positive_int, default=MC.threads,
                   help="CPU threads per process while marking (default: torch's count, at least 2); part of the "
                        "arithmetic: 1 thread and 2 or more differ in a few 8-bit levels, 2, 3, 4 and 8 agree")
    m.add_argument("--metrics", type=Path, default=None,
                   help="append one JSON line per finished unit (images done, images/s, running PSNR) to this file; "
                        "under torchrun, rank r > 0 writes <stem>.rank<r><suffix>")
    m.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    m.add_argument("--output-format", choices=tuple(OUTPUT_FORMATS), default="png",
                   help="encoding of every released image, marked or not; jpeg and webp are lossy, weaken the mark "
                        "and need --allow-lossy (the share of the mark that survives is then measured and printed)")
    m.add_argument("--quality", type=_quality, default=None,
                   help=f"encoder quality of a lossy --output-format, 1..100 (default {OutputFormat().quality})")
    m.add_argument("--allow-lossy", action="store_true", help="consent to a lossy --output-format")


def _add_train(subs) -> None:
    t = _sub(subs, "train", "train a suspect with a reference recipe (plays the trainer)",
             "radioactive train --recipe linear --train released/ --test test/ --output suspect.safetensors")
    t.add_argument("--recipe", choices=("linear", "scratch"), default=TC.recipe,
                   help="linear: classifier on frozen marking-network features; scratch: architecture from random init")
    t.add_argument("--train", type=_existing, required=True, help="training image folder")
    t.add_argument("--test", type=_existing, required=True,
                   help="test image folder (same classes), or the CIFAR-10 archive (its test split)")
    t.add_argument("--output", type=Path, required=True, help="weights to write (.safetensors; a .json sidecar is written beside)")
    t.add_argument("--arch", default=TC.architecture, help="scratch: resnet18_cifar or a torchvision model name")
    t.add_argument("--network", default=NS.name, help="linear: frozen backbone (a marking network)")
    t.add_argument("--network-image-size", type=_positive_int, default=NS.image_size, help="linear: side the backbone sees")
    t.add_argument("--epochs", type=_positive_int, default=TC.epochs, help="epochs")
    t.add_argument("--views", type=_positive_int, default=TC.views, help="linear: augmented views whose features are extracted")
    t.add_argument("--batch-size", type=_positive_int, default=TC.batch_size, help="batch size")
    t.add_argument("--lr", type=_positive_float, default=None, help=f"peak learning rate (default {default_lr('linear'):g} linear, {default_lr('scratch'):g} scratch)")
    t.add_argument("--weight-decay", type=_nonneg_float, default=None, help=f"weight decay (default {default_weight_decay('linear'):g} linear, "
                        f"{default_weight_decay('scratch'):g} scratch)")
    t.add_argument("--image-size", type=_positive_int, default=TC.image_size, help="side training images are resized to")
    t.add_argument("--seed", type=_nonneg_int, default=TC.seed, help="seed of initialisation and augmentation")
    t.add_argument("--teacher", type=_existing, default=None,
                   help="distillation: weights of a trained model (with its .json sidecar); the student learns from "
                        "its softened outputs on the training images, never from their labels")
    t.add_argument("--temperature", type=_temperature, default=None,
                   help=f"distillation temperature T in [0.1, 100] (with --teacher; default {TC.temperature:g})")
    t.add_argument("--augmentation", choices=("crop_flip", "trivialaugment"), default=TC.augmentation,
                   help="trainer augmentation: pad-4 random crop + flip, or the same then TrivialAugmentWide")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")


def _add_demo(subs) -> None:
    e = _sub(subs, "demo", "the whole story on CIFAR-10: keygen, mark, train a suspect and a control, detect, report",
             "radioactive demo --output-dir demo-output  # from scratch, ~35 min on 2 CPU cores\n"
             "  radioactive demo --setting linear --output-dir demo-linear  # linear probe, ~7 min")
    e.add_argument("--setting", choices=SETTINGS, default=DemoConfig.setting,
                   help="from-scratch: the trainer trains a ResNet-18 from scratch; the owner trains an in-domain "
                        "marking network and a vanilla reference, marks with the from-scratch preset and runs the "
                        "gradient test. linear: "
                        "a linear classifier on EfficientNet-Lite0 features, classic white-box test")
    e.add_argument("--output-dir", type=Path, required=True, help="folder to create for every artefact")
    e.add_argument("--data", type=_existing, default=None, help="the CIFAR-10 archive (default: looked up)")
    e.add_argument("--train-per-class", type=_positive_int, default=DemoConfig.train_per_class, help="training images per class")
    e.add_argument("--test-per-class", type=_positive_int, default=DemoConfig.test_per_class, help="test images per class")
    e.add_argument("--fraction", type=_fraction, default=DemoConfig.marked_fraction, help="marked fraction q")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="seed of everything")
    e.add_argument("--steps", type=_nonneg_int, default=MC.steps, help="marking steps")
    e.add_argument("--epochs", type=_positive_int, default=TC.epochs,
                   help="training epochs (each model the demo trains)")
    e.add_argument("--target-psnr", type=_psnr_or_off, default=None,
                   help="mean PSNR (dB) that lambda_img is calibrated to before marking; 0: the preset's lambda_img "
                        "(default: 40.5 for from-scratch, 0 for linear)")
    e.add_argument("--references", type=_positive_int, default=DemoConfig.references,
                   help="from-scratch: vanilla reference models for the gradient test (each is one more training)")


def _emit(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the subcommand of ``args``; returns the exit status."""
    if args.command in COMMANDS:
        _emit(run_detection(args, parser))
        return 0
    handlers = {"keygen": _run_keygen, "mark": _run_mark, "train": _run_train, "demo": _run_demo}
    return handlers[args.command](args, parser)


def _run_keygen(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .data import list_image_folder
    from .keys import generate_key

    if args.data is not None:
        classes = list(list_image_folder(_folder_or_archive(args.data)).classes)
    else:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    spec = (MarkingNetworkSpec("trained", args.image_size, path=str(args.network_weights))
            if args.network_weights else MarkingNetworkSpec(args.network, args.image_size))
    key = generate_key(classes, spec, seed=args.seed)
    path = key.save(args.output)
    _emit({"key": str(path), "fingerprint": key.fingerprint, "classes": len(classes), "dim": key.dim,
           "network": key.network.to_dict()})
    return 0


def _mark_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """``mark``: (marking config, output format, files to mark or None) from the flags; usage errors exit 2."""
    given = {k: getattr(args, k) for k in _PRESET_FIELDS if hasattr(args, k)}  # flags the user gave
    cfg = dataclasses.replace(MARKING_PRESETS[args.preset], threads=args.threads, min_psnr=args.min_psnr, **given)
    if args.output_format != "png" and not args.allow_lossy:
        parser.error(f"--output-format {args.output_format} is lossy and weakens the mark; add --allow-lossy to "
                     "accept that (the share of the mark that survives is then measured), or keep png")
    if args.output_format == "png" and args.quality is not None:
        parser.error("--quality applies to a lossy --output-format (jpeg, webp); png is lossless")
    fmt = OutputFormat(args.output_format, args.quality or OutputFormat().quality, allow_lossy=args.allow_lossy)
    files = None
    if args.files is not None:
        files = [ln.strip() for ln in args.files.read_text().splitlines() if ln.strip()]
    if args.target_psnr is not None and "lambda_img" in given:
        parser.error("--target-psnr chooses --lambda-img: give one of them")
    return cfg, fmt, files


def _run_mark(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .keys import Key
    from .marking import mark_folder
    from .marking.distributed import from_env, shutdown

    cfg, fmt, files = _mark_config(args, parser)
    ranks = from_env(args.device)  # one process unless started by torchrun
    try:
        if args.target_psnr is not None:
            cfg = _calibrated(args, cfg, files, ranks)
        summary = mark_folder(_folder_or_archive(args.source), Key.load(args.key), args.output, vault=args.vault,
                              fraction=args.fraction, files=files, seed=args.seed, config=cfg,
                              overwrite=args.overwrite, resume=args.resume, progress=sys.stderr.isatty(),
                              device=args.device, holdout_fraction=args.holdout_fraction, strict=args.strict,
                              withhold_fraction=args.withhold_fraction, metrics=args.metrics, ranks=ranks,
                              output_format=fmt, known_vaults=tuple(args.known_vault),
                              allow_remark=args.allow_remark, public_notice=args.public_notice)
    except RadioactiveError:
        if ranks.rank != 0:  # every rank fails alike; rank 0 says why, once
            raise SystemExit(1) from None
        raise
    finally:
        shutdown()
    if ranks.rank != 0:
        return 0
    print("\n".join(summary.lines()), file=sys.stderr)
    _emit(summary.to_dict())
    summary.check_marked()  # no image carries the mark: one line, exit 1
    return 0


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .training import train

    if args.temperature is not None and args.teacher is None:
        parser.error("--temperature is a distillation setting: give --teacher too")
    wd = args.weight_decay if args.weight_decay is not None else default_weight_decay(args.recipe)
    cfg = TrainConfig(recipe=args.recipe, architecture=args.arch,
                      backbone=MarkingNetworkSpec(args.network, args.network_image_size), epochs=args.epochs,
                      views=args.views, batch_size=args.batch_size, lr=args.lr or default_lr(args.recipe),
                      weight_decay=wd, image_size=args.image_size, seed=args.seed,
                      teacher=str(args.teacher) if args.teacher else None,
                      temperature=TC.temperature if args.temperature is None else args.temperature,
                      augmentation=args.augmentation)
    _emit(train(_folder_or_archive(args.train), _folder_or_archive(args.test, "test"), args.output, cfg,
                progress=sys.stderr.isatty(), device=args.device).to_dict())
    return 0


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .demo import run_demo

    base = DemoConfig(setting=args.setting).resolved()
    cfg = DemoConfig(setting=args.setting, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                     marked_fraction=args.fraction, seed=args.seed, references=args.references,
                     target_psnr=args.target_psnr,
                     marking=dataclasses.replace(base.marking, steps=args.steps),
                     training=dataclasses.replace(base.training, epochs=args.epochs, seed=args.seed))
    summary = run_demo(args.output_dir, cfg, archive=args.data, progress=sys.stderr.isatty())
    for name, s in summary["suspects"].items():
        print(f"{name:<8} accuracy {100 * s['accuracy']:.2f} %: {s['verdict']}", file=sys.stderr)
    print(f"PSNR {summary['psnr_db_mean']:.2f} dB, linf {summary['linf_max']}, {summary['seconds']:.0f} s; release "
          f"{Path(args.output_dir) / summary['release']} (publish), vault {Path(args.output_dir) / summary['vault']} "
          f"(private, 0700); report: {Path(args.output_dir) / 'report.md'}", file=sys.stderr)
    _emit({k: summary[k] for k in ("setting", "dataset", "marked_fraction", "psnr_db_mean", "linf_max", "suspects",
                                   "seconds")})
    return 0


def _calibrated(args: argparse.Namespace, cfg: MarkingConfig, files: list[str] | None, ranks) -> MarkingConfig:
    """``mark --target-psnr``: the configuration with lambda_img calibrated on a pilot of the marked images."""
    from .keys import Key
    from .marking import calibrate_lambda_img

    out = args.output
    if not (args.resume or args.overwrite) and out.is_dir() and any(out.iterdir()):
        raise RadioactiveError(f"output folder {out} is not empty: give --resume or --overwrite, or a new folder")
    if ranks.distributed:
        raise RadioactiveError("--target-psnr is not calibrated under torchrun (each process would search alone): "
                               "run `radioactive mark --target-psnr` once without torchrun, or pass the --lambda-img "
                               "it prints")
    cal = calibrate_lambda_img(_folder_or_archive(args.source), Key.load(args.key), args.target_psnr,
                               fraction=args.fraction, files=files, seed=args.seed, config=cfg, device=args.device)
    print(f"lambda_img {cal.lambda_img:.4g}: a pilot of {cal.pilot_images} of the images to mark reads "
          f"{cal.psnr_db_mean:.2f} dB mean PSNR (target {cal.target_psnr_db:g} dB, {len(cal.trials)} trials"
          f"{_calibration_miss(cal)})",
          file=sys.stderr)
    return dataclasses.replace(cfg, lambda_img=cal.lambda_img)


def _calibration_miss(cal) -> str:
    """Why a calibration missed its target, for the line ``mark --target-psnr`` prints ('' when it did not)."""
    if cal.reached:
        return ""
    if cal.stopped == "plateau":
        return "; above the target: the marks are as strong as --steps and --linf allow"
    return f"; not within 0.15 dB of the target after {len(cal.trials)} pilot markings"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args, parser)
    except RadioactiveError as e:
        print(f"radioactive {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"radioactive {args.command}: interrupted", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"radioactive {args.command}: error: {e}", file=sys.stderr)
        return 1

