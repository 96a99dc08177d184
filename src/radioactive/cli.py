"""Command line: parse flags, call one library function, print one JSON object.

Exit codes: 0 success, 1 runtime failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from . import __version__
from .errors import RadioactiveError
from .marking import MarkingConfig
from .networks import MarkingNetworkSpec
from .training import TrainConfig

MC, TC, NS = MarkingConfig(), TrainConfig(), MarkingNetworkSpec()


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _linf(s: str) -> int:
    v = _positive_int(s)
    if v > 255:
        raise argparse.ArgumentTypeError(f"expected an L-infinity radius in 1..255 (8-bit levels), got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def _alpha(s: str) -> float:
    v = _positive_float(s)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a significance level in (0, 1), got {s!r}")
    return v


def _existing(s: str) -> Path:
    p = Path(s)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {s}")
    return p


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _sub(subs, name, help_, example):
    return subs.add_parser(name, help=help_, description=f"{help_}\n\nexample:\n  {example}",
                           formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radioactive", formatter_class=_Formatter,
                                description="Mark an image dataset and detect models trained on it (radioactive data).")
    p.add_argument("--version", action="version", version=f"radioactive {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subs = p.add_subparsers(dest="command", required=True)

    k = _sub(subs, "keygen", "draw a secret key: one random unit carrier per class",
             "radioactive keygen --data ../shared/data/cifar10-jpeg.tar.gz --output key.safetensors")
    g = k.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", type=_existing, help="image folder (class sub-folders) or the CIFAR-10 archive, for the class names")
    g.add_argument("--classes", help="class names in index order, comma-separated")
    k.add_argument("--network", default=NS.name, help="marking network")
    k.add_argument("--image-size", type=_positive_int, default=NS.image_size, help="side in px the marking network sees")
    k.add_argument("--seed", type=_nonneg_int, default=None, help="seed of the carriers (default: drawn from the OS)")
    k.add_argument("--output", type=Path, required=True, help="key file to write (.safetensors); keep it secret")

    m = _sub(subs, "mark", "mark a fraction of an image folder and write a complete released copy",
             "radioactive mark --source train/ --key key.safetensors --fraction 0.1 --output released/")
    m.add_argument("--source", type=_existing, required=True,
                   help="image folder (class sub-folders), or the CIFAR-10 archive (its train split is marked)")
    m.add_argument("--key", type=_existing, required=True, help="key file from keygen")
    m.add_argument("--output", type=Path, required=True, help="folder of the released copy (created)")
    m.add_argument("--record", type=Path, default=None,
                   help="private record (JSON lines) of the marked images; default <output>.record.jsonl beside the copy")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=_fraction, help="marked fraction q in (0, 1], chosen in every class")
    g.add_argument("--files", type=_existing, help="text file listing the relative paths to mark, one a line")
    m.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the selection and augmentation draws")
    m.add_argument("--steps", type=_nonneg_int, default=MC.steps, help="optimisation steps")
    m.add_argument("--lr", type=_positive_float, default=MC.lr, help="Adam learning rate (pixels in [0, 1])")
    m.add_argument("--linf", type=_linf, default=MC.linf, help="L-infinity radius in 8-bit levels")
    m.add_argument("--lambda-img", type=_nonneg_float, default=MC.lambda_img, help="weight of the pixel L2 penalty")
    m.add_argument("--lambda-ft", type=_nonneg_float, default=MC.lambda_ft,
                   help="weight of the feature drift orthogonal to the carrier")
    m.add_argument("--batch-size", type=_positive_int, default=MC.batch_size, help="images optimised together")
    m.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")

    t = _sub(subs, "train", "train a suspect with a reference recipe (plays the trainer)",
             "radioactive train --recipe linear --train released/ --test test/ --output suspect.safetensors")
    t.add_argument("--recipe", choices=("linear", "scratch"), default=TC.recipe,
                   help="linear: classifier on frozen marking-network features; scratch: architecture from random init")
    t.add_argument("--train", type=_existing, required=True, help="training image folder")
    t.add_argument("--test", type=_existing, required=True, help="test image folder (same classes)")
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

    d = _sub(subs, "detect", "white-box test: was the suspect trained on data marked with this key?",
             "radioactive detect --suspect suspect.safetensors --key key.safetensors --images test/ --output result.json")
    d.add_argument("--suspect", type=_existing, required=True, help="suspect weights (.safetensors with its .json sidecar)")
    d.add_argument("--key", type=_existing, required=True, help="key file")
    d.add_argument("--images", type=_existing, required=True,
                   help="vanilla held-out image folder (never marked images) to fit the alignment")
    d.add_argument("--output", type=Path, default=None, help="result JSON to write")
    d.add_argument("--plot", type=Path, default=None, help="PNG of per-class cosines against the null density")
    d.add_argument("--alpha", type=_alpha, default=1e-3, help="significance level of the verdict")
    d.add_argument("--ridge", type=_nonneg_float, default=0.0, help="alignment ridge weight")
    d.add_argument("--classes", default=None, help="test only these classes (comma-separated), e.g. the marked ones")
    d.add_argument("--max-images", type=_positive_int, default=None, help="use at most this many images")

    e = _sub(subs, "demo", "the whole story on CIFAR-10: keygen, mark, train a suspect and a control, detect, report",
             "radioactive demo --output-dir demo-output")
    e.add_argument("--output-dir", type=Path, required=True, help="folder to create for every artefact")
    e.add_argument("--data", type=_existing, default=None, help="the CIFAR-10 archive (default: looked up)")
    e.add_argument("--train-per-class", type=_positive_int, default=1000, help="training images per class")
    e.add_argument("--test-per-class", type=_positive_int, default=200, help="test images per class")
    e.add_argument("--fraction", type=_fraction, default=0.1, help="marked fraction q")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="seed of everything")
    e.add_argument("--steps", type=_nonneg_int, default=MC.steps, help="marking steps")
    e.add_argument("--epochs", type=_positive_int, default=30, help="linear classifier epochs")
    return p


def _emit(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cifar_train(source: Path) -> Path:
    from .data import extract_cifar10

    if source.is_file() and source.name.endswith((".tar.gz", ".tgz", ".tar")):
        return extract_cifar10(source) / "train"
    return source


def run(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        from .data import list_image_folder
        from .keys import generate_key

        if args.data is not None:
            classes = list(list_image_folder(_cifar_train(args.data)).classes)
        else:
            classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        key = generate_key(classes, MarkingNetworkSpec(args.network, args.image_size), seed=args.seed)
        path = key.save(args.output)
        _emit({"key": str(path), "fingerprint": key.fingerprint, "classes": len(classes), "dim": key.dim,
               "network": key.network.to_dict()})
    elif args.command == "mark":
        from .keys import Key
        from .marking import mark_folder

        cfg = MarkingConfig(steps=args.steps, lr=args.lr, linf=args.linf, lambda_img=args.lambda_img,
                            lambda_ft=args.lambda_ft, batch_size=args.batch_size)
        files = None
        if args.files is not None:
            files = [ln.strip() for ln in args.files.read_text().splitlines() if ln.strip()]
        summary = mark_folder(_cifar_train(args.source), Key.load(args.key), args.output, args.record,
                              fraction=args.fraction, files=files, seed=args.seed, config=cfg,
                              overwrite=args.overwrite, progress=sys.stderr.isatty())
        _emit(summary.to_dict())
    elif args.command == "train":
        from .training import default_lr, train

        wd = args.weight_decay if args.weight_decay is not None else (0.0 if args.recipe == "linear" else 5e-4)
        cfg = TrainConfig(recipe=args.recipe, architecture=args.arch,
                          backbone=MarkingNetworkSpec(args.network, args.network_image_size), epochs=args.epochs,
                          views=args.views, batch_size=args.batch_size, lr=args.lr or default_lr(args.recipe),
                          weight_decay=wd, image_size=args.image_size, seed=args.seed)
        _emit(train(args.train, args.test, args.output, cfg, progress=sys.stderr.isatty()).to_dict())
    elif args.command == "detect":
        from .detection import detect
        from .keys import Key
        from .report import plot_cosines

        only = [c.strip() for c in args.classes.split(",")] if args.classes else None
        result = detect(args.suspect, Key.load(args.key), args.images, alpha=args.alpha, ridge=args.ridge,
                        only_classes=only, max_images=args.max_images)
        if args.output:
            result.save(args.output)
        if args.plot:
            plot_cosines(result, args.plot)
        print(result.verdict(), file=sys.stderr)
        _emit(result.to_dict())
    elif args.command == "demo":
        import dataclasses

        from .demo import DemoConfig, run_demo

        base = DemoConfig()
        cfg = DemoConfig(train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                         marked_fraction=args.fraction, seed=args.seed,
                         marking=dataclasses.replace(base.marking, steps=args.steps),
                         training=dataclasses.replace(base.training, epochs=args.epochs, seed=args.seed))
        summary = run_demo(args.output_dir, cfg, archive=args.data, progress=sys.stderr.isatty())
        rows = [f"{'suspect':<10} {'accuracy':>9} {'log10 p':>9}  verdict"]
        for name, s in summary["suspects"].items():
            rows.append(f"{name:<10} {100 * s['accuracy']:>8.2f}% {s['log10_pvalue']:>9.2f}  "
                        f"{'detected' if s['detected'] else 'not detected'}")
        print("\n".join(rows), file=sys.stderr)
        print(f"PSNR {summary['psnr_db_mean']:.2f} dB, linf {summary['linf_max']}, "
              f"{summary['seconds']:.0f} s; report: {Path(args.output_dir) / 'report.md'}", file=sys.stderr)
        _emit({k: summary[k] for k in ("dataset", "marked_fraction", "psnr_db_mean", "linf_max", "suspects", "seconds")})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except RadioactiveError as e:
        print(f"radioactive {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"radioactive {args.command}: interrupted", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"radioactive {args.command}: error: {e}", file=sys.stderr)
        return 1

