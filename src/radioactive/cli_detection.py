"""Command line of the detection family: ``audit``, ``detect``, ``plan``, ``calibrate``, ``report``, ``mirror-images``.

The choices, flags, help and range checks of ``detect`` and ``calibrate`` come from the registry
(:mod:`radioactive.detection.registry`): a test's config fields with a ``help`` become flags, and a flag a test does
not read is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .errors import RadioactiveError

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


def _common_owner_flags(p, existing) -> None:
    p.add_argument("--vault", type=existing, default=None,
                   help="the owner's vault written by mark (key, record, references, audit plan)")
    p.add_argument("--key", type=existing, default=None, help="key file (without --vault)")
    p.add_argument("--record", type=existing, default=None, help="the private record (without --vault)")
    p.add_argument("--reference", type=existing, nargs="+", default=None,
                   help="vanilla reference model(s) trained without the key (default: the plan's)")
    p.add_argument("--images", type=existing, default=None,
                   help="vanilla held-out images (never released marked ones) to fit the white-box alignment, or the "
                        "CIFAR-10 archive (its test split)")
    p.add_argument("--source", type=existing, default=None,
                   help="the folder of vanilla originals, if it moved since marking (default: the record's)")
    p.add_argument("--mirror", type=existing, default=None,
                   help="with --outputs: the mirror images the API was queried with (default: the vault's mirror/)")


def _suspect_flags(p, existing) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--suspect", type=existing, default=None,
                   help="suspect weights (.safetensors or .pt state dict) or TorchScript, with a .json sidecar "
                        "(architecture, classes, preprocessing; docs/formats.md)")
    g.add_argument("--outputs", type=existing, default=None,
                   help="JSON lines or CSV of the suspect's outputs from an API (path, logits or probs)")
    g.add_argument("--labels", type=existing, default=None,
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


def add_commands(subs, sub, existing, alpha_type, positive_int, nonneg_int) -> None:
    """Add the detection family's subcommands to the main parser's ``subs``."""
    from .detection import list_methods
    from .detection.registry import ACCESS, get_method

    a = sub(subs, "audit", "the auditor's one command: every valid test that fits the access, one verdict",
            "radioactive audit --vault owner-vault --suspect suspect.safetensors --output audit.json --html audit.html\n"
            "  radioactive audit --vault owner-vault --outputs api-outputs.jsonl")
    _common_owner_flags(a, existing)
    _suspect_flags(a, existing)
    a.add_argument("--commitment", default=None, help="the commitment the owner published when marking (hex)")
    a.add_argument("--alpha", type=alpha_type, default=None, help="family-wise level (default: the plan's)")
    a.add_argument("--output", type=Path, default=None, help="audit result JSON to write")
    a.add_argument("--html", type=Path, default=None, help="self-contained HTML report to write")
    _add_settings(a)

    table = "; ".join(f"{n}: {get_method(n).validity}, {'/'.join(get_method(n).access)} access"
                      for n in list_methods())
    d = sub(subs, "detect", "run one detection test (audit runs every valid one that fits)",
            "radioactive detect --method gradient --vault owner-vault --suspect suspect.safetensors\n"
            "  radioactive detect --method white-box --suspect s.safetensors --key key.safetensors --images test/")
    d.add_argument("--method", choices=list_methods(), required=True, help=f"the test ({table})")
    _common_owner_flags(d, existing)
    _suspect_flags(d, existing)
    d.add_argument("--classes", default=None, help="test only these classes (comma-separated, each once)")
    d.add_argument("--alpha", type=alpha_type, default=None, help="significance level (default: the plan's, else 1e-3)")
    d.add_argument("--output", type=Path, default=None, help="result JSON to write")
    d.add_argument("--plot", type=Path, default=None, help="white-box, gradient: PNG of per-class cosines against the "
                                                            "null density")
    _add_settings(d)

    pl = sub(subs, "plan", "fix the audit's settings in the vault before testing any suspect",
             "radioactive plan --vault owner-vault --reference reference.safetensors --temperature 2")
    pl.add_argument("--vault", type=existing, required=True, help="the owner's vault")
    pl.add_argument("--reference", type=existing, nargs="+", default=None,
                    help="vanilla reference models (copied into the vault with their sidecars)")
    pl.add_argument("--methods", default=None, help=f"the tests to run, comma-separated (valid ones: "
                                                     f"{', '.join(list_methods(valid_only=True))})")
    pl.add_argument("--classes", default=None, help="classes to test, comma-separated (each once)")
    pl.add_argument("--alpha", type=alpha_type, default=None, help="family-wise level of the audit")
    _add_settings(pl)

    c = sub(subs, "calibrate", "null calibration: p-values of a test on a model that never saw the marks",
            "radioactive calibrate --method gradient --vault owner-vault --suspect vanilla.safetensors --num 1000")
    c.add_argument("--method", choices=list_methods(valid_only=True), default="white-box",
                   help="the test to calibrate (every test with a null sampler)")
    _common_owner_flags(c, existing)
    _suspect_flags(c, existing)
    c.add_argument("--classes", default=None, help="classes, comma-separated (each once)")
    c.add_argument("--num", "--keys", dest="num", type=positive_int, default=1000,
                   help="fresh keys (or fresh splits) to score")
    c.add_argument("--seed", type=nonneg_int, default=0, help="seed of the fresh keys or splits")
    c.add_argument("--output", type=Path, default=None, help="result JSON to write")
    _add_settings(c)

    r = sub(subs, "report", "one self-contained HTML report of a detection or audit result",
            "radioactive report --result audit.json --vault owner-vault --output report.html")
    r.add_argument("--result", type=existing, required=True, help="result JSON written by audit or detect --output")
    r.add_argument("--vault", type=existing, default=None, help="the owner's vault (adds the marks' PSNR and examples)")
    r.add_argument("--record", type=existing, default=None, help="the private record (without --vault)")
    r.add_argument("--output", type=Path, required=True, help="HTML file to write")

    lq = sub(subs, "label-queries", "write the label-only test's query images, to send to a label-only API",
             "radioactive label-queries --vault owner-vault --output queries/   # then audit --labels answers.jsonl")
    lq.add_argument("--vault", type=existing, required=True, help="the owner's vault (its plan's labels settings)")
    lq.add_argument("--output", type=Path, required=True, help="folder to create for the query images")

    mi = sub(subs, "mirror-images", "write the mirrors of the marked images (the mark subtracted) to query an API with",
             "radioactive mirror-images --vault owner-vault   # then add their outputs to --outputs")
    g = mi.add_mutually_exclusive_group(required=True)
    g.add_argument("--vault", type=existing, help="the owner's vault (mirrors go to its mirror/)")
    g.add_argument("--record", type=existing, help="the private record written by mark")
    mi.add_argument("--output", type=Path, default=None, help="folder to create (default: the vault's mirror/)")
    del ACCESS


COMMANDS = ("audit", "detect", "plan", "calibrate", "report", "mirror-images", "label-queries")


def _given_settings(args) -> dict:
    return {k: getattr(args, k) for k in _setting_flags() if hasattr(args, k)}


def _classes(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(c.strip() for c in text.split(",") if c.strip())


def _folder_or_archive(p):
    from .cli import _folder_or_archive as f

    return f(p, "test") if p is not None else None


def _triple(text: str | None, default):
    if text is None:
        return default
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise RadioactiveError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(v) != 3:
        raise RadioactiveError(f"expected three comma-separated numbers, got {text!r}")
    return v


def _suspect(args, parser, key=None):
    from .detection import SuspectAccess
    from .suspects import IMAGENET_MEAN, IMAGENET_STD, state_dict_suspect

    if args.labels is not None:
        return SuspectAccess.of_labels(args.labels)
    if args.arch is not None:
        if args.suspect is None:
            parser.error("--arch describes the state dict given with --suspect")
        classes = _classes(args.output_classes) or (tuple(key.classes) if key is not None else None)
        if classes is None:
            parser.error("--arch needs the class order: give --output-classes (or the key)")
        size = args.image_size or (key.network.image_size if key is not None else None)
        if not size:
            parser.error("--arch needs --image-size")
        path = state_dict_suspect(args.suspect, args.arch, list(classes), size,
                                  _triple(args.mean, IMAGENET_MEAN), _triple(args.std, IMAGENET_STD))
        return SuspectAccess.of_model(path)
    if any(getattr(args, k) is not None for k in ("image_size", "mean", "std")):
        parser.error("--image-size, --mean and --std describe a state dict given with --arch")
    if args.suspect is not None:
        return SuspectAccess.of_model(args.suspect)
    if args.outputs is not None:
        return SuspectAccess.of_outputs(args.outputs, _classes(args.output_classes))
    parser.error("give the suspect: --suspect (weights or TorchScript with a sidecar) or --outputs (an API's outputs)")


def _owner(args, plan=None):
    """The owner's files from --vault (and the plan's references) or from --key/--record/--reference."""
    from .detection import OwnerFiles
    from .detection.audit import owner_from_vault
    from .keys import Key

    images = _folder_or_archive(args.images)
    if args.vault is not None:
        if args.key is not None or args.record is not None:
            raise RadioactiveError("--vault holds the key and the record: do not give --key or --record with it")
        return owner_from_vault(args.vault, plan, images, args.reference, args.source, args.mirror)
    return OwnerFiles(key=Key.load(args.key) if args.key else None, record=args.record,
                      references=tuple(args.reference or ()), images=images, source_root=args.source,
                      mirror_root=args.mirror)


def _refuse_foreign(args, parser, entry) -> None:
    """Refuse flags the chosen test does not read (settings, owner files, plot)."""
    from .detection.registry import config_fields

    mine = {f.name for f in config_fields(entry)}
    bad = [f"--{k.replace('_', '-')}" for k in _given_settings(args) if k not in mine]
    bad += [f"--{flag}" for flag, need in _OWNER_FLAGS.items()
            if getattr(args, flag, None) is not None and need not in entry.reads]
    if getattr(args, "classes", None) is not None and "classes" not in {f.name for f in dataclasses.fields(entry.config)}:
        bad.append("--classes")  # e.g. membership: its config has no classes (a TypeError before this check)
    if getattr(args, "plot", None) is not None and entry.name not in ("white-box", "gradient"):
        bad.append("--plot")
    if getattr(args, "mirror", None) is not None and "outputs" not in entry.access:
        bad.append("--mirror")
    if bad:
        verb = "does" if len(bad) == 1 else "do"
        parser.error(f"{', '.join(bad)} {verb} not apply to --method {entry.name}; it reads "
                     + ", ".join(entry.reads) + (f" and takes {', '.join('--' + m.replace('_', '-') for m in sorted(mine))}"
                                                 if mine else ""))


def _plan(args):
    from .detection.plan import read_plan

    return read_plan(args.vault) if args.vault is not None else None


def run_audit(args, parser) -> dict:
    from .detection.audit import audit_vault
    from .report import audit_html

    if args.vault is None:
        parser.error("audit reads the owner's vault: give --vault (written by mark)")
    if args.key is not None or args.record is not None:
        parser.error("--vault holds the key and the record: do not give --key or --record")
    from .vault import open_vault

    suspect = _suspect(args, parser, open_vault(args.vault).load_key())
    result = audit_vault(args.vault, suspect, _folder_or_archive(args.images), _given_settings(args),
                         args.alpha, args.reference, args.commitment, args.source, args.mirror)
    if args.output:
        result.save(args.output)
    if args.html:
        audit_html(result, args.html, args.vault)
    print(result.verdict(), file=sys.stderr)
    for name, why in result.not_run.items():
        print(f"  not run: {name}: {why}", file=sys.stderr)
    if result.vault.get("commitment_matches") is False:
        print("  WARNING: the vault does not match the published commitment", file=sys.stderr)
    if result.vault.get("manifest_problems"):
        print(f"  WARNING: the vault differs from its manifest: {result.vault['manifest_problems'][:3]}", file=sys.stderr)
    return result.to_dict()


def _one_test(args, parser):
    """The entry, owner, suspect and config of ``detect``/``calibrate``, with plan overrides recorded."""
    import dataclasses as dc

    from .detection import list_methods
    from .detection.audit import apply_overrides
    from .detection.plan import AuditPlan
    from .detection.registry import check_config, get_method

    entry = get_method(args.method)
    _refuse_foreign(args, parser, entry)
    plan = _plan(args)
    given = _given_settings(args)
    classes = _classes(args.classes)
    if classes is not None:
        given["classes"] = classes
    if plan is not None:
        solo = AuditPlan(plan.key_fingerprint, plan.alpha, plan.classes, plan.references,
                         {entry.name: plan.methods.get(entry.name, {})} if entry.validity != "descriptive" else {})
        configs, changed = apply_overrides(solo, {k: v for k, v in given.items()
                                                  if k in {f.name for f in dc.fields(entry.config)}})
        config = configs.get(entry.name) or dc.replace(entry.defaults(), **given)
    else:
        config, changed = dc.replace(entry.defaults(), **given), []
    check_config(config)
    given_alpha = getattr(args, "alpha", None)
    alpha = given_alpha if given_alpha is not None else (plan.alpha if plan is not None else 1e-3)
    if plan is not None and given_alpha is not None and given_alpha != plan.alpha:
        changed.append(f"alpha: {plan.alpha:g} -> {args.alpha:g}")
    if plan is not None and args.reference is not None:
        changed.append(f"references: {list(plan.references)} -> {[str(r) for r in args.reference]}")
    owner = _owner(args, plan)
    suspect = _suspect(args, parser, owner.key)
    if not entry.fits(suspect.kind):
        raise RadioactiveError(f"{entry.name} needs {' or '.join(entry.access)} access; this suspect offers "
                               f"{suspect.kind} access (tests that fit: {', '.join(list_methods(suspect.kind))})")
    return entry, owner, suspect, config, alpha, changed


def run_detect(args, parser) -> dict:
    from .report import plot_cosines

    entry, owner, suspect, config, alpha, changed = _one_test(args, parser)
    result = entry.run(owner, suspect, config, alpha)
    result.exploratory = changed
    if args.plot:
        plot_cosines(result, args.plot)
    if args.output:
        result.save(args.output)
    print(result.verdict(), file=sys.stderr)
    return result.to_dict()


def run_plan(args, parser) -> dict:
    from .detection.access import check_unique
    from .detection.plan import change_plan, read_plan
    from .detection.registry import _REGISTRY, config_fields

    methods = _classes(args.methods)
    classes = _classes(args.classes)
    check_unique(classes)
    current = read_plan(args.vault)
    tests = list(methods) if methods is not None else list(current.methods)
    settings: dict = {}
    for k, v in _given_settings(args).items():
        takers = [m for m in tests if k in {f.name for f in config_fields(_REGISTRY[m])}]
        if not takers:
            parser.error(f"--{k.replace('_', '-')} applies to no test of the plan ({', '.join(tests)})")
        for m in takers:
            settings.setdefault(m, {})[k] = v
    plan = change_plan(args.vault, alpha=args.alpha, classes=list(classes) if classes else None,
                       references=args.reference, methods=list(methods) if methods else None, settings=settings)
    from .data import sha256_file
    from .detection.plan import PLAN_FILE

    digest = sha256_file(Path(args.vault) / PLAN_FILE)
    print(f"audit plan sha256 {digest}: publish or timestamp it before testing any suspect, to show the settings "
          "were fixed first", file=sys.stderr)
    return {**plan.to_dict(), "sha256": digest}


def run_calibrate(args, parser) -> dict:
    from .calibration import summarise

    entry, owner, suspect, config, _, changed = _one_test(args, parser)
    if entry.null is None:
        raise RadioactiveError(f"{entry.name} has no null sampler")
    lp = entry.null(owner, suspect, config, args.num, args.seed)
    out = summarise(lp, entry.name, entry.validity, entry.null_unit, str(args.suspect or args.outputs)).to_dict()
    if args.output:
        from .data import atomic_write_bytes

        atomic_write_bytes(args.output, json.dumps(out, indent=2, allow_nan=False).encode())
    return out


def run_report(args, parser) -> dict:
    from .detection import DetectionResult
    from .detection.audit import AuditResult
    from .report import audit_html, html_report
    from .vault import open_vault

    if args.vault is not None and args.record is not None:
        parser.error("--vault holds the record: give one of --vault or --record")
    record = open_vault(args.vault).record_path if args.vault is not None else args.record
    try:
        d = json.loads(Path(args.result).read_text())
    except (OSError, ValueError) as e:
        raise RadioactiveError(f"{args.result} is not a result ({e})") from e
    if isinstance(d, dict) and d.get("kind") == "radioactive-audit":
        path = audit_html(AuditResult.from_dict(d), args.output, args.vault, record)
    else:
        path = html_report(DetectionResult.load(args.result), args.output, record)
    return {"report": str(path)}


def run_mirror(args, parser) -> dict:
    from .detection.outputs import write_mirror_images
    from .vault import open_vault

    record = open_vault(args.vault).record_path if args.vault is not None else args.record
    return write_mirror_images(record, args.output)


def run_label_queries(args, parser) -> dict:
    from .detection.labels import write_label_queries
    from .detection.plan import read_plan

    plan = read_plan(args.vault)
    if "labels" not in plan.methods:
        raise RadioactiveError("the vault's plan has no labels test: add it first (radioactive plan --methods ...)")
    return write_label_queries(args.vault, args.output, plan.config("labels"))


def run(args, parser) -> dict:
    """Dispatch one of :data:`COMMANDS`; returns the JSON object to print."""
    return {"audit": run_audit, "detect": run_detect, "plan": run_plan, "calibrate": run_calibrate,
            "report": run_report, "mirror-images": run_mirror,
            "label-queries": run_label_queries}[args.command](args, parser)
