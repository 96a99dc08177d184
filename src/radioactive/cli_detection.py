"""Command line of the detection family: ``audit``, ``detect``, ``plan``, ``calibrate``, ``report``, ``mirror-images``,
``label-queries``: one handler per subcommand (their parsers: :mod:`radioactive.cli_args`).

The choices, flags, help and range checks of ``detect`` and ``calibrate`` come from the registry
(:mod:`radioactive.detection.registry`): a test's config fields with a ``help`` become flags, and a flag a test does
not read is refused.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .cli_args import _OWNER_FLAGS, COMMANDS, _setting_flags, add_commands  # noqa: F401 (add_commands: old path)
from .cli_args import _folder_or_archive as folder_or_archive
from .errors import RadioactiveError


def _given_settings(args) -> dict:
    return {k: getattr(args, k) for k in _setting_flags() if hasattr(args, k)}


def _classes(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(c.strip() for c in text.split(",") if c.strip())


def _folder_or_archive(p):
    return folder_or_archive(p, "test") if p is not None else None


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
    from .data import read_json
    from .detection import DetectionResult
    from .detection.audit import AuditResult
    from .report import audit_html, html_report
    from .vault import open_vault

    if args.vault is not None and args.record is not None:
        parser.error("--vault holds the record: give one of --vault or --record")
    record = open_vault(args.vault).record_path if args.vault is not None else args.record
    def parse(d):
        audit = isinstance(d, dict) and d.get("kind") == "radioactive-audit"
        return (AuditResult if audit else DetectionResult).from_dict(d)

    result = read_json(args.result, "a detection or audit result", parse)
    if isinstance(result, AuditResult):
        path = audit_html(result, args.output, args.vault, record)
    else:
        path = html_report(result, args.output, record)
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
