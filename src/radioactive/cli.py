"""Command line: parse flags, call one library function, print one JSON object.

Exit codes: 0 success, 1 runtime failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from . import __version__
from .augment import AUGMENTATIONS
from .data import OUTPUT_FORMATS, OutputFormat
from .errors import RadioactiveError
from .demo import SETTINGS, DemoConfig
from .gradient import TEMPERATURE as GRADIENT_TEMPERATURE
from .marking import MARKING_PRESETS, MarkingConfig
from .networks import MarkingNetworkSpec
from .training import TrainConfig

MC, TC, NS = MarkingConfig(), TrainConfig(), MarkingNetworkSpec()
_PRESET_FIELDS = ("steps", "lr", "linf", "lambda_img", "lambda_ft", "augmentation", "views", "batch_size")


_DETECT_COMMON = ("command", "method", "output", "alpha", "verbose")
_DETECT_FLAGS = {  # the flags each detection method reads (any other given flag is refused)
    "white-box": ("suspect", "key", "images", "ridge", "classes", "max_images", "layer", "decoys", "plot"),
    "gradient": ("record", "key", "suspect", "reference", "classes", "source", "plot", "temperature"),
    "decoy-carrier": ("record", "key", "suspect", "reference", "decoy_carriers", "per_class", "decoy_seed"),
    "black-box": ("record", "suspect", "outputs", "classes", "mirror"),
    "membership": ("record", "suspect", "outputs"),
}


def _preset_text(config: MarkingConfig) -> str:
    """A preset's settings as the help text shows them."""
    return ", ".join(f"{k} {getattr(config, k):.4g}" if isinstance(getattr(config, k), float) else
                     f"{k} {getattr(config, k)}" for k in _PRESET_FIELDS)


def _number(cast, ok, expected: str):
    """An argparse type: ``cast`` the text, check ``ok(value)``, else say what was ``expected``."""

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v

    return parse


_fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_holdout = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_linf = _number(int, lambda v: 1 <= v <= 255, "an L-infinity radius in 1..255 (8-bit levels)")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
_quality = _number(int, lambda v: 1 <= v <= 100, "an encoder quality in 1..100")
_temperature = _number(float, lambda v: 0.1 <= v <= 100, "a temperature in [0.1, 100]")
_psnr = _number(float, lambda v: 20 <= v <= 80, "a PSNR in [20, 80] dB")
_psnr_or_off = _number(float, lambda v: v == 0 or 20 <= v <= 80, "0 (off) or a PSNR in [20, 80] dB")
_alpha = _number(float, lambda v: 0 < v < 1, "a significance level in (0, 1)")


def _existing(s: str) -> Path:
    p = Path(s)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {s}")
    return p


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (exit status 2); `--help` shows the full usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sub(subs, name, help_, example):
    return subs.add_parser(name, help=help_, description=f"{help_}\n\nexample:\n  {example}",
                           formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="radioactive", formatter_class=_Formatter,
                                description="Mark an image dataset and detect models trained on it (radioactive data).")
    p.add_argument("--version", action="version", version=f"radioactive {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subs = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    m = _sub(subs, "mark", "mark a fraction of an image folder and write a complete released copy",
             "radioactive mark --source train/ --key key.safetensors --fraction 0.1 --output released/\n"
             "  torchrun --nproc_per_node=4 -m radioactive mark ... --device cuda   # 4 processes, same bytes "
             "(docs/distributed.md)")
    m.add_argument("--source", type=_existing, required=True,
                   help="image folder (class sub-folders), or the CIFAR-10 archive (its train split is marked)")
    m.add_argument("--key", type=_existing, required=True, help="key file from keygen")
    m.add_argument("--output", type=Path, required=True, help="folder of the released copy (created)")
    m.add_argument("--record", type=Path, default=None,
                   help="private record (JSON lines) of the marked images; default <output>.record.jsonl beside the copy")
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
    m.add_argument("--preset", choices=tuple(MARKING_PRESETS), default="linear",
                   help="the settings below that are not given come from this measured configuration: "
                        + "; ".join(f"{n}: {_preset_text(c)}" for n, c in MARKING_PRESETS.items())
                        + " (from-scratch expects an in-domain marking network, docs/from-scratch.md)")
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
    t.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default 1e-3 linear, 0.05 scratch)")
    t.add_argument("--weight-decay", type=_nonneg_float, default=None, help="weight decay (default 0 linear, 5e-4 scratch)")
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

    d = _sub(subs, "detect", "test a suspect: was it trained on data marked with this key?",
             "radioactive detect --suspect suspect.safetensors --key key.safetensors --images test/ --output result.json\n"
             "  radioactive detect --method black-box --record released.record.jsonl --outputs api-outputs.jsonl")
    d.add_argument("--method", choices=("white-box", "gradient", "black-box", "membership", "decoy-carrier"),
                   default="white-box",
                   help="white-box: weights needed; gradient: a differentiable suspect, the record and the key "
                        "(its input gradients read in the marking network's feature space; the white-box test "
                        "for models trained from scratch, docs/concepts.md); black-box: outputs on marked and "
                        "vanilla images only; membership: outputs on released and withheld images (mark "
                        "--withhold-fraction); decoy-carrier: a runnable suspect, the record and the key (real "
                        "carrier ranked among decoy carriers; the black-box test for models trained from scratch)")
    d.add_argument("--suspect", type=_existing, default=None, help="suspect weights (.safetensors with its .json sidecar)")
    d.add_argument("--key", type=_existing, default=None, help="key file (white-box)")
    d.add_argument("--images", type=_existing, default=None,
                   help="white-box: vanilla held-out image folder (never marked images) to fit the alignment, "
                        "or the CIFAR-10 archive (its test split)")
    d.add_argument("--record", type=_existing, default=None, help="black-box: the private record written by mark")
    d.add_argument("--outputs", type=_existing, default=None,
                   help="black-box: JSON lines or CSV of the suspect's outputs (path, logits or probs)")
    d.add_argument("--mirror", type=_existing, default=None,
                   help="black-box with --outputs: folder written by mirror-images (default <record>.mirror)")
    d.add_argument("--output", type=Path, default=None, help="result JSON to write")
    d.add_argument("--plot", type=Path, default=None, help="PNG of per-class cosines against the null density")
    d.add_argument("--alpha", type=_alpha, default=1e-3, help="significance level of the verdict")
    d.add_argument("--ridge", type=_nonneg_float, default=0.0, help="alignment ridge weight")
    d.add_argument("--classes", default=None, help="test only these classes (comma-separated), e.g. the marked ones")
    d.add_argument("--max-images", type=_positive_int, default=None, help="use at most this many images")
    d.add_argument("--layer", default=None, help="white-box: name of the suspect's last linear layer "
                                                 "(default: the sidecar's 'classifier', else the last nn.Linear)")
    d.add_argument("--decoys", type=_nonneg_int, default=0,
                   help="white-box: also score this many fresh random keys and report the real key's rank")
    d.add_argument("--reference", type=_existing, nargs="+", default=[],
                   help="gradient, decoy-carrier: vanilla model(s) trained without the key (recommended)")
    d.add_argument("--source", type=_existing, default=None,
                   help="gradient: the folder of vanilla originals, if it moved since marking (default: the record's)")
    d.add_argument("--temperature", type=_temperature, default=GRADIENT_TEMPERATURE,
                   help="gradient: T dividing the models' logits in the test's loss, in [0.1, 100]; fix it before "
                        "testing (default %(default)g)")
    d.add_argument("--decoy-carriers", type=_positive_int, default=29, help="decoy-carrier: decoys per class (M)")
    d.add_argument("--per-class", type=_positive_int, default=20,
                   help="decoy-carrier: released marked images per class (n)")
    d.add_argument("--decoy-seed", type=_nonneg_int, default=0, help="decoy-carrier: seed of the decoy carriers")

    mi = _sub(subs, "mirror-images", "write the mirrors of the marked images (the mark subtracted) to query an API with",
              "radioactive mirror-images --record released.record.jsonl   # then add their outputs to --outputs")
    mi.add_argument("--record", type=_existing, required=True, help="the private record written by mark")
    mi.add_argument("--output", type=Path, default=None,
                    help="folder to create (default: <record>.mirror next to the record); keep it private")

    c = _sub(subs, "calibrate", "check that keys a model never saw give uniform p-values",
             "radioactive calibrate --suspect vanilla.safetensors --key key.safetensors --images test/ --keys 1000")
    c.add_argument("--suspect", type=_existing, default=None, help="a model (default: random classifier weights)")
    c.add_argument("--key", type=_existing, required=True,
                   help="a key, for its marking network and classes (its carriers are not used)")
    c.add_argument("--images", type=_existing, default=None, help="vanilla images to fit the alignment (with --suspect)")
    c.add_argument("--keys", type=_positive_int, default=1000, help="fresh keys to score")
    c.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the fresh keys")
    c.add_argument("--output", type=Path, default=None, help="result JSON to write")

    r = _sub(subs, "report", "one self-contained HTML report of a detection result",
             "radioactive report --result result.json --record released.record.jsonl --output report.html")
    r.add_argument("--result", type=_existing, required=True, help="result JSON written by detect --output")
    r.add_argument("--record", type=_existing, default=None,
                   help="private record of the marking: adds PSNR distribution and example images")
    r.add_argument("--output", type=Path, required=True, help="HTML file to write")

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
    e.add_argument("--train-per-class", type=_positive_int, default=1000, help="training images per class")
    e.add_argument("--test-per-class", type=_positive_int, default=200, help="test images per class")
    e.add_argument("--fraction", type=_fraction, default=0.1, help="marked fraction q")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="seed of everything")
    e.add_argument("--steps", type=_nonneg_int, default=MC.steps, help="marking steps")
    e.add_argument("--epochs", type=_positive_int, default=30, help="training epochs (each model the demo trains)")
    e.add_argument("--target-psnr", type=_psnr_or_off, default=None,
                   help="mean PSNR (dB) that lambda_img is calibrated to before marking; 0: the preset's lambda_img "
                        "(default: 40.5 for from-scratch, 0 for linear)")
    e.add_argument("--references", type=_positive_int, default=DemoConfig.references,
                   help="from-scratch: vanilla reference models for the gradient test (each is one more training)")
    return p


def _emit(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _folder_or_archive(source: Path, split: str = "train") -> Path:
    """An image folder as given, or the ``split`` folder of the CIFAR-10 archive (extracted once into the cache)."""
    from .data import extract_cifar10

    if source is not None and source.is_file() and source.name.endswith((".tar.gz", ".tgz", ".tar")):
        return extract_cifar10(source) / split
    return source


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "keygen":
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
    elif args.command == "mark":
        from .keys import Key
        from .marking import mark_folder
        from .marking.distributed import from_env, shutdown

        given = {k: getattr(args, k) for k in _PRESET_FIELDS if hasattr(args, k)}  # flags the user gave
        cfg = dataclasses.replace(MARKING_PRESETS[args.preset], threads=args.threads, **given)
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
        ranks = from_env(args.device)  # one process unless started by torchrun
        try:
            if args.target_psnr is not None:
                cfg = _calibrated(args, cfg, files, ranks)
            summary = mark_folder(_folder_or_archive(args.source), Key.load(args.key), args.output, args.record,
                                  fraction=args.fraction, files=files, seed=args.seed, config=cfg,
                                  overwrite=args.overwrite, resume=args.resume, progress=sys.stderr.isatty(),
                                  device=args.device, holdout_fraction=args.holdout_fraction, strict=args.strict,
                                  withhold_fraction=args.withhold_fraction, metrics=args.metrics, ranks=ranks,
                                  output_format=fmt)
        except RadioactiveError:
            if ranks.rank != 0:  # every rank fails alike; rank 0 says why, once
                raise SystemExit(1) from None
            raise
        finally:
            shutdown()
        if ranks.rank != 0:
            return 0
        total = (summary.num_marked + summary.num_copied + summary.num_withheld + summary.num_skipped
                 + len(summary.ignored))
        print(f"{total} files: {summary.num_marked} marked, {summary.num_copied} copied"
              f"{f' (incl. {summary.num_holdout} holdout: marked privately, released vanilla)' if summary.num_holdout else ''}, "
              f"{f'{summary.num_withheld} withheld (not released), ' if summary.num_withheld else ''}"
              f"{summary.num_skipped} skipped, {len(summary.ignored)} ignored (not images); "
              f"PSNR {summary.psnr_db_mean or float('nan'):.2f} dB", file=sys.stderr)
        if summary.psnr_db_released_mean is not None:
            print(f"lossy output ({summary.output_format}): released images (marked or not) as decoded: PSNR "
                  f"{summary.psnr_db_released_mean:.2f} dB (5th percentile {summary.psnr_db_released_p5:.2f} dB) "
                  "against their sources; the PSNR above is the marked images' before encoding", file=sys.stderr)
        if summary.output_format != "png" and summary.mark_survival is None and summary.num_marked:
            print(f"lossy output ({summary.output_format}): no mark to measure (the marked images moved no "
                  "feature along their carrier before encoding)", file=sys.stderr)
        if summary.mark_survival is not None:
            print(f"lossy output ({summary.output_format}): the released marked images keep "
                  f"{100 * summary.mark_survival:.1f} % of the mark's feature shift along the carrier "
                  f"({summary.carrier_shift_mean:.4f} of {summary.carrier_shift_lossless_mean:.4f}, mean over "
                  f"{summary.num_marked} images, marking network, centre view); a lossless png keeps 100 %",
                  file=sys.stderr)
        _emit(summary.to_dict())
    elif args.command == "train":
        from .training import default_lr, train

        if args.temperature is not None and args.teacher is None:
            parser.error("--temperature is a distillation setting: give --teacher too")
        wd = args.weight_decay if args.weight_decay is not None else (0.0 if args.recipe == "linear" else 5e-4)
        cfg = TrainConfig(recipe=args.recipe, architecture=args.arch,
                          backbone=MarkingNetworkSpec(args.network, args.network_image_size), epochs=args.epochs,
                          views=args.views, batch_size=args.batch_size, lr=args.lr or default_lr(args.recipe),
                          weight_decay=wd, image_size=args.image_size, seed=args.seed,
                          teacher=str(args.teacher) if args.teacher else None,
                          temperature=TC.temperature if args.temperature is None else args.temperature,
                          augmentation=args.augmentation)
        _emit(train(_folder_or_archive(args.train), _folder_or_archive(args.test, "test"), args.output, cfg, progress=sys.stderr.isatty(), device=args.device).to_dict())
    elif args.command == "detect":
        from .keys import Key
        from .report import plot_cosines

        defaults = vars(parser.parse_args(["detect"]))
        unused = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                  if k in defaults and v != defaults[k] and k not in _DETECT_FLAGS[args.method] + _DETECT_COMMON]
        if unused:
            verb = "does" if len(unused) == 1 else "do"
            parser.error(f"{', '.join(unused)} {verb} not apply to --method {args.method}; it takes "
                         + ", ".join(f"--{k.replace('_', '-')}" for k in _DETECT_FLAGS[args.method]))
        only = [c.strip() for c in args.classes.split(",")] if args.classes else None
        if args.method == "white-box":
            from .detection import detect

            if args.suspect is None or args.key is None or args.images is None:
                parser.error("white-box detection needs --suspect, --key and --images")
            result = detect(args.suspect, Key.load(args.key), _folder_or_archive(args.images, "test"), alpha=args.alpha, ridge=args.ridge,
                            only_classes=only, max_images=args.max_images, decoys=args.decoys, layer=args.layer)
        elif args.method == "gradient":
            from .gradient import gradient_detect

            if args.record is None or args.suspect is None or args.key is None:
                parser.error("gradient detection needs --record, --key and --suspect")
            result = gradient_detect(args.record, Key.load(args.key), args.suspect, args.reference, alpha=args.alpha,
                                     only_classes=only, source_root=args.source, temperature=args.temperature)
        elif args.method == "decoy-carrier":
            from .decoys import decoy_carrier_detect

            if args.record is None or args.suspect is None or args.key is None:
                parser.error("decoy-carrier detection needs --record, --key and --suspect")
            result = decoy_carrier_detect(args.record, Key.load(args.key), args.suspect, args.reference,
                                          per_class=args.per_class, decoys=args.decoy_carriers, seed=args.decoy_seed,
                                          alpha=args.alpha)
        else:
            from .blackbox import blackbox_detect, membership_detect

            if args.record is None or (args.suspect is None) == (args.outputs is None):
                parser.error(f"{args.method} detection needs --record and one of --suspect or --outputs")
            if args.mirror is not None and args.outputs is None:
                parser.error("--mirror goes with --outputs (the suspect's outputs on the mirror images)")
            if args.method == "membership":
                result = membership_detect(args.record, args.suspect, args.outputs, alpha=args.alpha)
            else:
                result = blackbox_detect(args.record, args.suspect, args.outputs, alpha=args.alpha, only_classes=only,
                                         mirror_root=args.mirror)
        if args.plot:
            plot_cosines(result, args.plot)
        if args.output:
            result.save(args.output)
        print(result.verdict(), file=sys.stderr)
        _emit(result.to_dict())
    elif args.command == "mirror-images":
        from .blackbox import write_mirror_images

        _emit(write_mirror_images(args.record, args.output))
    elif args.command == "calibrate":
        from .calibration import calibrate_weights, random_weights
        from .data import atomic_write_bytes
        from .detection import pull_back
        from .keys import Key

        key = Key.load(args.key)
        if args.suspect is None:
            w, name = random_weights(len(key.classes), key.dim, args.seed + 1), f"random weights {len(key.classes)}x{key.dim}"
        else:
            if args.images is None:
                parser.error("calibrating a suspect needs --images (vanilla images for the alignment)")
            w, name = pull_back(args.suspect, key, _folder_or_archive(args.images, "test"))[0], str(args.suspect)
        result = calibrate_weights(w, args.keys, args.seed, name).to_dict()
        if args.output:
            atomic_write_bytes(args.output, json.dumps(result, indent=2).encode())
        _emit(result)
    elif args.command == "report":
        from .detection import DetectionResult
        from .report import html_report

        path = html_report(DetectionResult.load(args.result), args.output, args.record)
        _emit({"report": str(path)})
    elif args.command == "demo":
        from .demo import run_demo

        base = DemoConfig(setting=args.setting).resolved()
        cfg = DemoConfig(setting=args.setting, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                         marked_fraction=args.fraction, seed=args.seed, references=args.references,
                         target_psnr=args.target_psnr,
                         marking=dataclasses.replace(base.marking, steps=args.steps),
                         training=dataclasses.replace(base.training, epochs=args.epochs, seed=args.seed))
        summary = run_demo(args.output_dir, cfg, archive=args.data, progress=sys.stderr.isatty())
        rows = [f"{'suspect':<10} {'accuracy':>9} {'log10 p':>9}  verdict ({summary['setting']}, {base.training.recipe} "
                f"trainer, {next(iter(summary['suspects'].values()))['test']} test)"]
        for name, s in summary["suspects"].items():
            rows.append(f"{name:<10} {100 * s['accuracy']:>8.2f}% {s['log10_pvalue']:>9.2f}  "
                        f"{'detected' if s['detected'] else 'not detected'}")
        print("\n".join(rows), file=sys.stderr)
        print(f"PSNR {summary['psnr_db_mean']:.2f} dB, linf {summary['linf_max']}, "
              f"{summary['seconds']:.0f} s; report: {Path(args.output_dir) / 'report.md'}", file=sys.stderr)
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

