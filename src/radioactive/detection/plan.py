"""The audit plan: every setting that changes a p-value, fixed in the owner's vault before any suspect is tested.

``mark`` writes a default plan into the vault (``audit-plan.json``): the significance level, the classes, the
reference models and each valid test's config. The owner may change it with ``radioactive plan`` while preparing
the audit (after training references, say); each change is appended to the plan's history with its time. ``audit``
reads the plan; a setting given at audit time that differs from the plan is recorded in the result, which is then
marked exploratory.

File format (JSON): ``{"kind": "radioactive-audit-plan", "schema", "package_version", "key_fingerprint", "alpha",
"classes", "references", "methods": {name: {field: value}}, "history": [{"time", "change"}]}``. ``references`` are
paths relative to the vault.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import RadioactiveError
from .registry import get_method, list_methods

PLAN_KIND = "radioactive-audit-plan"
PLAN_SCHEMA = 1
PLAN_FILE = "audit-plan.json"


@dataclass(frozen=True)
class AuditPlan:
    """Settings fixed before any suspect is tested.

    Attributes:
        key_fingerprint: the key the plan belongs to.
        alpha: family-wise significance level of the audit's verdict, in (0, 1).
        classes: classes to test (each once), or None for every class of the record.
        references: reference models, relative to the vault (or absolute).
        methods: test name -> its config fields; only these tests run (each must be registered and not descriptive).
        history: the plan's changes, oldest first: ``{"time": ISO 8601 UTC, "change": text}``.
    """

    key_fingerprint: str
    alpha: float = 1e-3
    classes: tuple[str, ...] | None = None
    references: tuple[str, ...] = ()
    methods: dict = field(default_factory=dict)
    history: tuple[dict, ...] = ()

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise RadioactiveError(f"the plan's alpha must be in (0, 1), got {self.alpha}")
        for name in self.methods:
            if get_method(name).validity == "descriptive":
                raise RadioactiveError(f"{name} is descriptive (no valid null): it cannot be part of an audit plan")

    def config(self, name: str):
        """The config of test ``name`` under this plan (the plan's fields over the defaults, and the plan's classes)."""
        entry = get_method(name)
        known = {f.name for f in dataclasses.fields(entry.config)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.methods.get(name, {}).items() if k in known}
        if "classes" in known and self.classes is not None:
            values["classes"] = tuple(self.classes)
        return entry.config(**values)

    def to_dict(self) -> dict:
        return {"kind": PLAN_KIND, "schema": PLAN_SCHEMA, "package_version": __version__,
                "key_fingerprint": self.key_fingerprint, "alpha": self.alpha,
                "classes": None if self.classes is None else list(self.classes),
                "references": list(self.references), "methods": self.methods, "history": list(self.history)}

    @classmethod
    def from_dict(cls, d: dict) -> AuditPlan:
        """Raises:
            RadioactiveError: not a plan, another schema, unknown tests or fields.
        """
        if not isinstance(d, dict) or d.get("kind") != PLAN_KIND or d.get("schema") != PLAN_SCHEMA:
            raise RadioactiveError(f"not an audit plan of schema {PLAN_SCHEMA}")
        try:
            methods = {str(k): dict(v) for k, v in d["methods"].items()}
            for name, values in methods.items():
                known = {f.name for f in dataclasses.fields(get_method(name).config)}
                unknown = set(values) - known
                if unknown:
                    raise RadioactiveError(f"the plan gives {name} unknown settings {sorted(unknown)}")
            return cls(str(d["key_fingerprint"]), float(d["alpha"]),
                       None if d.get("classes") is None else tuple(d["classes"]), tuple(d.get("references", ())),
                       methods, tuple(d.get("history", ())))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RadioactiveError(f"malformed audit plan ({e!r})") from e


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_plan(key_fingerprint: str, references: tuple[str, ...] = ()) -> AuditPlan:
    """Every registered valid test with its default config, all classes, alpha 1e-3."""
    methods = {name: dataclasses.asdict(get_method(name).defaults()) for name in list_methods(valid_only=True)}
    for values in methods.values():
        values.pop("classes", None)
    return AuditPlan(key_fingerprint, references=tuple(references), methods=methods,
                     history=({"time": _now(), "change": "default plan written by mark"},))


def read_plan(path: str | Path) -> AuditPlan:
    """Read an audit plan (a file, or a vault folder holding ``audit-plan.json``).

    Raises:
        RadioactiveError: missing or malformed file.
    """
    from ..data import read_json

    path = Path(path)
    return read_json(path / PLAN_FILE if path.is_dir() else path, "an audit plan", AuditPlan.from_dict)


def write_plan(vault: str | Path, plan: AuditPlan) -> Path:
    """Write ``audit-plan.json`` into the vault (0600, atomic) and refresh the vault's manifest."""
    from ..vault import update_manifest, write_private

    path = Path(vault) / PLAN_FILE
    write_private(path, json.dumps(plan.to_dict(), indent=2, allow_nan=False).encode())
    update_manifest(vault)
    return path


def write_default_plan(vault: str | Path, key, record_header: dict | None = None) -> Path:
    """The hook ``mark`` calls once the record is written: a default plan for ``key`` (kept if one exists)."""
    path = Path(vault) / PLAN_FILE
    if path.is_file():
        return path
    return write_plan(vault, default_plan(key.fingerprint))


def change_plan(vault: str | Path, *, alpha: float | None = None, classes: list[str] | None = None,
                references: list[str | Path] | None = None, methods: list[str] | None = None,
                settings: dict | None = None) -> AuditPlan:
    """Change the vault's plan before any suspect is tested; the change is appended to its history.

    Args:
        alpha, classes: new values (None: unchanged). references: reference models; files outside the vault are
            copied into its ``references/`` (with their ``.json`` sidecars). methods: the tests to run (None:
            unchanged). settings: ``{test name: {field: value}}`` (checked against each config's ranges).

    Raises:
        RadioactiveError: unknown tests or fields, out-of-range values, unreadable references.
    """
    import shutil

    from ..suspects import sidecar_path
    from ..vault import make_private_dir
    from .registry import check_config

    vault = Path(vault)
    plan = read_plan(vault)
    changes = []
    new = dict(plan.methods)
    if methods is not None:
        new = {m: new.get(m, {k: v for k, v in dataclasses.asdict(get_method(m).defaults()).items() if k != "classes"})
               for m in methods}
        changes.append(f"tests: {', '.join(methods)}")
    for name, values in (settings or {}).items():
        if name not in new:
            raise RadioactiveError(f"{name} is not a test of the plan (tests: {', '.join(new)})")
        merged = {**new[name], **values}
        check_config(dataclasses.replace(get_method(name).config(**{k: v for k, v in merged.items()})))
        new[name] = merged
        changes.append(f"{name}: {values}")
    refs = plan.references
    if references is not None:
        folder = make_private_dir(vault / "references")
        kept = []
        for r in map(Path, references):
            if not r.is_file():
                raise RadioactiveError(f"reference not found: {r}")
            if r.resolve().is_relative_to(vault.resolve()):
                kept.append(str(r.resolve().relative_to(vault.resolve())))
                continue
            for src in (r, sidecar_path(r)):
                if src.is_file():
                    shutil.copyfile(src, folder / src.name)
                    (folder / src.name).chmod(0o600)
            kept.append(f"references/{r.name}")
        refs = tuple(kept)
        changes.append(f"references: {', '.join(refs) or 'none'}")
    if classes is not None:
        changes.append(f"classes: {', '.join(classes)}")
    if alpha is not None:
        changes.append(f"alpha: {alpha:g}")
    out = AuditPlan(plan.key_fingerprint, plan.alpha if alpha is None else alpha,
                    plan.classes if classes is None else tuple(classes), refs, new,
                    plan.history + tuple({"time": _now(), "change": c} for c in changes))
    write_plan(vault, out)
    return out
