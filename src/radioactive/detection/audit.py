"""One audit, one verdict: every valid test that fits the access to a suspect, with family-wise error control.

Procedure:

1. Read the owner's vault: key, record, references and the audit plan (:mod:`radioactive.detection.plan`), and
   check the vault against its manifest and, when given, the published commitment.
2. For each test of the plan whose access fits the suspect (:meth:`MethodEntry.fits`) and whose private files
   exist, run it with the plan's config; a test that cannot run is listed with the reason.
3. Combine the m p-values with Holm's step-down method (Holm 1979): sort p_(1) <= ... <= p_(m), adjusted
   p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting every test with p~ < alpha controls the family-wise
   error at alpha under any dependence between the tests. The audit's verdict is "detected" when at least one
   adjusted p-value is below alpha, and its p-value is the smallest adjusted one (m times the smallest p).

A setting given at audit time that differs from the plan is recorded in each affected result's ``exploratory``
list and in the audit's; the verdict then says EXPLORATORY.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..data import atomic_write_bytes
from ..errors import RadioactiveError
from ..stats import format_pvalue
from .access import OwnerFiles, SuspectAccess
from .plan import AuditPlan
from .registry import check_config, get_method
from .result import DetectionResult

log = logging.getLogger(__name__)

AUDIT_SCHEMA = 1


def holm(log10_pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, in log10 (Holm 1979, "A simple sequentially rejective multiple test
    procedure").

    Args:
        log10_pvalues: (m,) log10 p-values (<= 0).

    Returns:
        (m,) adjusted log10 p-values in the input order, each >= its input and <= 0.
    """
    lp = np.asarray(log10_pvalues, dtype=np.float64).reshape(-1)
    m = len(lp)
    order = np.argsort(lp, kind="stable")
    adjusted = np.empty(m)
    running = -math.inf
    for rank, i in enumerate(order):
        running = max(running, min(0.0, math.log10(m - rank) + lp[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class AuditResult:
    """The audit's verdict and every test's own result.

    Attributes:
        alpha: family-wise significance level.
        log10_pvalue: the smallest Holm-adjusted log10 p-value over the tests run (None when none ran).
        tests: each test's :class:`DetectionResult`.
        adjusted_log10_pvalues: test name -> its Holm-adjusted log10 p-value.
        not_run: test name -> why it did not run (access, missing files, an error).
        access: the access to the suspect. suspect: what was tested.
        plan: ``{"path", "sha256"}`` of the audit plan read.
        exploratory: settings given at audit time that differ from the plan (``name: planned -> used``).
        vault: ``{"path", "manifest_problems", "commitment", "commitment_matches"}`` (commitment None when none
            was given).
        seconds: wall time.
    """

    alpha: float
    log10_pvalue: float | None
    tests: list[DetectionResult] = field(default_factory=list)
    adjusted_log10_pvalues: dict = field(default_factory=dict)
    not_run: dict = field(default_factory=dict)
    access: str = ""
    suspect: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    exploratory: list[str] = field(default_factory=list)
    vault: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def detected(self) -> bool | None:
        """At least one Holm-adjusted p-value below alpha; None when no valid test ran."""
        return None if self.log10_pvalue is None else bool(self.log10_pvalue < math.log10(self.alpha))

    def verdict(self) -> str:
        """One sentence: the audit's verdict (the family's, not any single test's)."""
        tag = ", EXPLORATORY" if self.exploratory else ""
        if self.log10_pvalue is None:
            return f"no verdict: no valid test could run with this access ({self.access}); see not_run."
        names = ", ".join(t.method for t in self.tests)
        if self.detected:
            best = min(self.tests, key=lambda t: self.adjusted_log10_pvalues[t.method])
            return (f"DETECTED: the suspect was trained on data marked with this key (family-wise p = "
                    f"{format_pvalue(self.log10_pvalue)} < alpha = {self.alpha:g}, Holm over {len(self.tests)} "
                    f"test(s): {names}; strongest: {best.method}{tag}).")
        return (f"not detected: no evidence that the suspect was trained on data marked with this key (family-wise "
                f"p = {format_pvalue(self.log10_pvalue)} >= alpha = {self.alpha:g}, Holm over {len(self.tests)} "
                f"test(s): {names}{tag}).")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tests"] = [t.to_dict() for t in self.tests]
        d.update({"kind": "radioactive-audit", "schema": AUDIT_SCHEMA, "package_version": __version__,
                  "detected": self.detected, "verdict": self.verdict(),
                  "pvalue": None if self.log10_pvalue is None else format_pvalue(self.log10_pvalue)})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AuditResult:
        """Raises:
            RadioactiveError: not an audit result of this schema.
        """
        if not isinstance(d, dict) or d.get("kind") != "radioactive-audit" or d.get("schema") != AUDIT_SCHEMA:
            raise RadioactiveError(f"not an audit result of schema {AUDIT_SCHEMA}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["tests"] = [DetectionResult.from_dict(t) for t in d.get("tests", [])]
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write the audit as strict JSON, atomically."""
        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, allow_nan=False).encode())
        return path


def _record_has(record: Path | None, flag: str) -> bool:
    """Whether the record lists holdout (``released: false``) or withheld entries (read with the record reader)."""
    from ..data.record import read_record, read_withheld

    if record is None or not Path(record).is_file():
        return False
    if flag == "holdout":
        return any(not e.released for e in read_record(record)[1])
    try:
        return bool(read_withheld(record)[1])
    except RadioactiveError:
        return False


def _missing(entry, owner: OwnerFiles) -> str | None:
    """Why the owner's files do not allow this test ('' / None when they do)."""
    for f in entry.reads:
        if f in entry.optional:
            continue
        if f in ("key", "record", "images") and getattr(owner, f) is None:
            return f"needs the owner's {f}" + (" (give --images: vanilla held-out images)" if f == "images" else "")
        if f in ("holdout", "withheld") and not _record_has(owner.record, f):
            flag = "--holdout-fraction" if f == "holdout" else "--withhold-fraction"
            return f"the record has no {f} images (mark {flag})"
    return None


def apply_overrides(plan: AuditPlan, overrides: dict | None) -> tuple[dict, list[str]]:
    """Each planned test's config with audit-time overrides applied, and the list of differences.

    Args:
        overrides: field name -> value, applied to every planned test whose config has that field.

    Returns:
        test name -> config, and ``["test.field: planned -> used", ...]``.

    Raises:
        RadioactiveError: an override no planned test takes, or a value out of range.
    """
    configs, changed, used = {}, [], set()
    for name in plan.methods:
        cfg = plan.config(name)
        fields = {f.name for f in dataclasses.fields(cfg)}
        mine = {k: v for k, v in (overrides or {}).items() if k in fields}
        used |= set(mine)
        for k, v in mine.items():
            if getattr(cfg, k) != v:
                changed.append(f"{name}.{k}: {getattr(cfg, k)!r} -> {v!r}")
        cfg = dataclasses.replace(cfg, **mine)
        check_config(cfg)
        configs[name] = cfg
    unused = sorted(set(overrides or {}) - used)
    if unused:
        raise RadioactiveError(f"settings {unused} apply to no test of the plan ({', '.join(plan.methods)})")
    return configs, changed


def audit(owner: OwnerFiles, suspect: SuspectAccess, plan: AuditPlan, overrides: dict | None = None,
          plan_info: dict | None = None, vault_info: dict | None = None, alpha: float | None = None,
          reference_override: bool = False) -> AuditResult:
    """Run every planned valid test that fits the suspect's access and combine them (module docstring).

    Args:
        owner: the owner's files (from the vault: :func:`radioactive.detection.audit.owner_from_vault`).
        suspect: the access to the suspect.
        plan: the audit plan (settings fixed before testing).
        overrides: settings changed at audit time (recorded, exploratory).
        plan_info, vault_info: what the result records about the plan file and the vault.
        alpha: a family-wise level other than the plan's (recorded, exploratory).
        reference_override: the references were given at audit time instead of the plan's (recorded, exploratory).

    Returns:
        the :class:`AuditResult`.

    Raises:
        RadioactiveError: the key does not match the plan; bad overrides.
    """
    t0 = time.time()
    if owner.key is not None and plan.key_fingerprint and owner.key.fingerprint != plan.key_fingerprint:
        raise RadioactiveError("the audit plan was written for another key")
    configs, changed = apply_overrides(plan, overrides)
    if alpha is not None and alpha != plan.alpha:
        changed.append(f"alpha: {plan.alpha:g} -> {alpha:g}")
    if reference_override:
        changed.append(f"references: {list(plan.references)} -> {[str(r) for r in owner.references]}")
    level = plan.alpha if alpha is None else alpha
    results, not_run = [], {}
    for name, cfg in configs.items():
        entry = get_method(name)
        if not entry.fits(suspect.kind):
            not_run[name] = f"needs {' or '.join(entry.access)} access; the suspect offers {suspect.kind}"
            continue
        why = _missing(entry, owner)
        if why:
            not_run[name] = why
            continue
        log.info("audit: running %s", name)
        try:
            result = entry.run(owner, suspect, cfg, level)
        except RadioactiveError as e:
            not_run[name] = f"error: {e}"
            continue
        result.exploratory = [c for c in changed if c.startswith(f"{name}.") or not c.split(":")[0].count(".")]
        results.append(result)
    adjusted = holm([r.log10_pvalue for r in results]) if results else np.array([])
    return AuditResult(
        alpha=level, log10_pvalue=float(adjusted.min()) if results else None, tests=results,
        adjusted_log10_pvalues={r.method: float(a) for r, a in zip(results, adjusted)}, not_run=not_run,
        access=suspect.kind, suspect=suspect.describe(), plan=plan_info or {}, exploratory=changed,
        vault=vault_info or {}, seconds=time.time() - t0,
    )


def owner_from_vault(vault: str | Path, plan: AuditPlan, images: str | Path | None = None,
                     references: list[str | Path] | None = None, source_root: str | Path | None = None,
                     mirror_root: str | Path | None = None) -> OwnerFiles:
    """The owner's files from a vault: its key, record, and the plan's references (or those given).

    Raises:
        RadioactiveError: not a vault; a planned reference that is missing.
    """
    from ..vault import open_vault

    v = open_vault(vault)
    key = v.load_key()
    if references is None:
        refs = []
        for r in plan.references:
            p = Path(r) if Path(r).is_absolute() else v.path / r
            if not p.is_file():
                raise RadioactiveError(f"the plan's reference {r} is not in the vault")
            refs.append(p)
    else:
        refs = [Path(r) for r in references]
    return OwnerFiles(key=key, record=v.record_path, references=tuple(refs),
                      images=None if images is None else Path(images),
                      source_root=None if source_root is None else Path(source_root),
                      mirror_root=None if mirror_root is None else Path(mirror_root), vault=v.path)


def audit_vault(vault: str | Path, suspect: SuspectAccess, images: str | Path | None = None,
                overrides: dict | None = None, alpha: float | None = None, references: list | None = None,
                commitment: str | None = None, source_root=None, mirror_root=None) -> AuditResult:
    """``radioactive audit``: the audit of a suspect from the owner's vault (module docstring).

    Args:
        vault: the owner's vault (written by ``mark``; holds the key, record, references and audit plan).
        suspect: the access to the suspect (:class:`SuspectAccess`).
        images: vanilla held-out images for the white-box alignment (optional; without them white-box does not run).
        overrides, alpha, references: audit-time changes to the plan (recorded; the result is then exploratory).
        commitment: the commitment the owner published at marking time; checked against the vault.

    Returns:
        the :class:`AuditResult`.

    Raises:
        RadioactiveError: not a vault, no plan, a plan for another key, bad overrides.
    """
    from ..data import sha256_file
    from ..vault import check_commitment, open_vault, verify_manifest
    from .plan import PLAN_FILE, read_plan

    v = open_vault(vault)
    plan_path = v.path / PLAN_FILE
    if not plan_path.is_file():
        raise RadioactiveError(f"{vault} has no audit plan ({PLAN_FILE}); write one with `radioactive plan --vault`")
    plan = read_plan(plan_path)
    owner = owner_from_vault(v.path, plan, images, references, source_root, mirror_root)
    vault_info = {"path": str(v.path), "manifest_problems": verify_manifest(v.path), "commitment": commitment,
                  "commitment_matches": None if commitment is None else bool(check_commitment(v.path, commitment))}
    return audit(owner, suspect, plan, overrides, {"path": str(plan_path), "sha256": sha256_file(plan_path),
                                                   "history": list(plan.history)},
                 vault_info, alpha, reference_override=references is not None)
