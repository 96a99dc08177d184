"""Command-line arguments: value types with their range checks, the parser helpers, and the parsers of the
detection family (``audit``, ``detect``, ``plan``, ``calibrate``, ``report``, ``label-queries``, ``mirror-images``).

The choices, flags, help and range checks of ``detect`` and ``calibrate`` come from the registry
(:mod:`radioactive.detection.registry`): a test's config fields with a ``help`` become flags. Handlers:
:mod:`radioactive.cli` and :mod:`radioactive.cli_detection`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from .training import DISTILLATION_TEMPERATURES

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
_temperature = _number(float, lambda v: DISTILLATION_TEMPERATURES[0] <= v <= DISTILLATION_TEMPERATURES[1],
                       "a temperature in [{:g}, {:g}]".format(*DISTILLATION_TEMPERATURES))
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


def _folder_or_archive(source: Path, split: str = "train") -> Path:
    """An image folder as given, or the ``split`` folder of the CIFAR-10 archive (extracted once into the cache)."""
    from .data import extract_cifar10

    if source is not None and source.is_file() and source.name.endswith((".tar.gz", ".tgz", ".tar")):
        return extract_cifar10(source) / split
    return source


# ----------------------------------------------------------------------------- detection family

_OWNER_FLAGS = {"key": "key", "record": "record", "reference": "references", "images": "images"}


def _setting_flags():
    """field name -> (fields with that name across the registered tests, the tests that take it)."""
    from .detection.registry import _REGISTRY, config_fields

    flags: dict[str, tuple[list, list[str]]] = {}
    for name in sorted(_REGISTRY):
        for f in config_fields(_REGISTRY[name]):
            flags.setdefault(f.name, ([], []))
            flags[f.name][0].append(f)
            flags[f.name][1].append(name)
    return flags


def _parser_of(f: dataclasses.Field):
    """argparse type of a config field: its declared parser (else the default's type) and range check."""
    md = f.metadata
    cast = md.get("parse") or type(f.default)

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {md.get('expected') or cast.__name__}, got {s!r}") from None
        if md.get("check") is not None and not md["check"](v):
            raise argparse.ArgumentTypeError(f"expected {md.get('expected')}, got {s!r}")
        return v

    return parse


def _add_settings(parser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per config field of the registered tests (default: the plan's, or the test's own)."""
    for fname, (fields, methods) in _setting_flags().items():
        if fname in exclude:
            continue
        f = fields[0]
        helps = " / ".join(dict.fromkeys(x.metadata["help"] for x in fields))
        defaults = ", ".join(dict.fromkeys(f"{x.default}" for x in fields))
        parser.add_argument(f"--{fname.replace('_', '-')}", dest=fname, type=_parser_of(f), default=argparse.SUPPRESS,
                            help=f"{helps} (default: the plan's, else {defaults})")


def _common_owner_flags(p) -> None:
    p.add_argument("--vault", type=_existing, default=None,
                   help="the owner's vault written by mark (key, record, references, audit plan)")
    p.add_argument("--key", type=_existing, default=None, help="key file (without --vault)")
    p.add_argument("--record", type=_existing, default=None, help="the private record (without --vault)")
    p.add_argument("--reference", type=_existing, nargs="+", default=None,
                   help="vanilla reference model(s) trained without the key (default: the plan's)")
    p.add_argument("--images", type=_existing, default=None,
                   help="vanilla held-out images (never released marked ones) to fit the white-box alignment, or the "
                        "CIFAR-10 archive (its test split)")
    p.add_argument("--source", type=_existing, default=None,
                   help="the folder of vanilla originals, if it moved since marking (default: the record's)")
    p.add_argument("--mirror", type=_existing, default=None,
                   help="with --outputs: the mirror images the API was queried with (default: the vault's mirror/)")


def _suspect_flags(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--suspect", type=_existing, default=None,
                   help="suspect weights (.safetensors or .pt state dict) or TorchScript, with a .json sidecar "
                        "(architecture, classes, preprocessing; docs/formats.md)")
    g.add_argument("--outputs", type=_existing, default=None,
                   help="JSON lines or CSV of the suspect's outputs from an API (path, logits or probs)")
    g.add_argument("--labels", type=_existing, default=None,
                   help="an API's top-k labels on the label-only test's query images (JSON lines {path, labels}; "
                        "write the queries with label-queries)")
    p.add_argument("--output-classes", default=None,
                   help="with --outputs or --arch: the suspect's class names in output order, comma-separated "
                        "(default: the key's order)")
    p.add_argument("--arch", default=None,
                   help="with --suspect: a state dict without sidecar; its architecture (a torchvision name such as "
                        "resnet18, resnet18_cifar, or timm:<name> with the optional extra timm)")
    p.add_argument("--image-size", type=int, default=None, help="with --arch: side in px the suspect expects "
                                                                "(default: the key's marking network's)")
    p.add_argument("--mean", default=None, help="with --arch: input mean, three comma-separated numbers "
                                                "(default: ImageNet's)")
    p.add_argument("--std", default=None, help="with --arch: input std, three comma-separated numbers "
                                               "(default: ImageNet's)")


def _add_audit(subs) -> None:
    a = _sub(subs, "audit", "the auditor's one command: every valid test that fits the access, one verdict",
            "radioactive audit --vault owner-vault --suspect suspect.safetensors --output audit.json --html audit.html\n"
            "  radioactive audit --vault owner-vault --outputs api-outputs.jsonl")
    _common_owner_flags(a)
    _suspect_flags(a)
    a.add_argument("--commitment", default=None, help="the commitment the owner published when marking (hex)")
    a.add_argument("--alpha", type=_alpha, default=None, help="family-wise level (default: the plan's)")
    a.add_argument("--output", type=Path, default=None, help="audit result JSON to write")
    a.add_argument("--html", type=Path, default=None, help="self-contained HTML report to write")
    _add_settings(a)


def _add_detect(subs) -> None:
    from .detection import list_methods
    from .detection.registry import get_method

    table = "; ".join(f"{n}: {get_method(n).validity}, {'/'.join(get_method(n).access)} access"
                      for n in list_methods())
    d = _sub(subs, "detect", "run one detection test (audit runs every valid one that fits)",
            "radioactive detect --method gradient --vault owner-vault --suspect suspect.safetensors\n"
            "  radioactive detect --method white-box --suspect s.safetensors --key key.safetensors --images test/")
    d.add_argument("--method", choices=list_methods(), required=True, help=f"the test ({table})")
    _common_owner_flags(d)
    _suspect_flags(d)
    d.add_argument("--classes", default=None, help="test only these classes (comma-separated, each once)")
    d.add_argument("--alpha", type=_alpha, default=None, help="significance level (default: the plan's, else 1e-3)")
    d.add_argument("--output", type=Path, default=None, help="result JSON to write")
    d.add_argument("--plot", type=Path, default=None, help="white-box, gradient: PNG of per-class cosines against the "
                                                            "null density")
    _add_settings(d)


def _add_plan(subs) -> None:
    from .detection import list_methods

    pl = _sub(subs, "plan", "fix the audit's settings in the vault before testing any suspect",
             "radioactive plan --vault owner-vault --reference reference.safetensors --temperature 2")
    pl.add_argument("--vault", type=_existing, required=True, help="the owner's vault")
    pl.add_argument("--reference", type=_existing, nargs="+", default=None,
                    help="vanilla reference models (copied into the vault with their sidecars)")
    pl.add_argument("--methods", default=None, help=f"the tests to run, comma-separated (valid ones: "
                                                     f"{', '.join(list_methods(valid_only=True))})")
    pl.add_argument("--classes", default=None, help="classes to test, comma-separated (each once)")
    pl.add_argument("--alpha", type=_alpha, default=None, help="family-wise level of the audit")
    _add_settings(pl)


def _add_calibrate(subs) -> None:
    from .detection import list_methods

    c = _sub(subs, "calibrate", "null calibration: p-values of a test on a model that never saw the marks",
            "radioactive calibrate --method gradient --vault owner-vault --suspect vanilla.safetensors --num 1000")
    c.add_argument("--method", choices=list_methods(valid_only=True), default="white-box",
                   help="the test to calibrate (every test with a null sampler)")
    _common_owner_flags(c)
    _suspect_flags(c)
    c.add_argument("--classes", default=None, help="classes, comma-separated (each once)")
    c.add_argument("--num", "--keys", dest="num", type=_positive_int, default=1000,
                   help="fresh keys (or fresh splits) to score")
    c.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the fresh keys or splits")
    c.add_argument("--output", type=Path, default=None, help="result JSON to write")
    _add_settings(c)


def _add_report(subs) -> None:
    r = _sub(subs, "report", "one self-contained HTML report of a detection or audit result",
            "radioactive report --result audit.json --vault owner-vault --output report.html")
    r.add_argument("--result", type=_existing, required=True, help="result JSON written by audit or detect --output")
    r.add_argument("--vault", type=_existing, default=None, help="the owner's vault (adds the marks' PSNR and examples)")
    r.add_argument("--record", type=_existing, default=None, help="the private record (without --vault)")
    r.add_argument("--output", type=Path, required=True, help="HTML file to write")


def _add_label_queries(subs) -> None:
    lq = _sub(subs, "label-queries", "write the label-only test's query images, to send to a label-only API",
             "radioactive label-queries --vault owner-vault --output queries/   # then audit --labels answers.jsonl")
    lq.add_argument("--vault", type=_existing, required=True, help="the owner's vault (its plan's labels settings)")
    lq.add_argument("--output", type=Path, required=True, help="folder to create for the query images")


def _add_mirror_images(subs) -> None:
    mi = _sub(subs, "mirror-images", "write the mirrors of the marked images (the mark subtracted) to query an API with",
             "radioactive mirror-images --vault owner-vault   # then add their outputs to --outputs")
    g = mi.add_mutually_exclusive_group(required=True)
    g.add_argument("--vault", type=_existing, help="the owner's vault (mirrors go to its mirror/)")
    g.add_argument("--record", type=_existing, help="the private record written by mark")
    mi.add_argument("--output", type=Path, default=None, help="folder to create (default: the vault's mirror/)")

def add_commands(subs) -> None:
    """Add the detection family's subcommands to the main parser's ``subs``, in the order ``--help`` lists them."""
    for add in (_add_audit, _add_detect, _add_plan, _add_calibrate, _add_report, _add_label_queries,
                _add_mirror_images):
        add(subs)


COMMANDS = ("audit", "detect", "plan", "calibrate", "report", "mirror-images", "label-queries")
