"""One result type for every detection test, and the one place a verdict is made.

A test's p-value is only printed, and a verdict only given, when its null is valid. Each test declares how:

* ``exact``: P(p <= alpha) = alpha under H0, for every alpha (a continuous null known in closed form);
* ``conservative``: P(p <= alpha) <= alpha under H0 (discrete ranks, bounds);
* ``approximate``: asymptotic; the test's docstring says when the approximation holds;
* ``descriptive``: no valid null is known; the result holds effect sizes only, never a p-value or verdict.

The null-calibration benchmark (``benchmarks/null_calibration.py``, docs/results.md "Null calibration") checks
each declaration on models that never saw the marks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import __version__
from ..data import atomic_write_bytes
from ..errors import RadioactiveError
from ..stats import format_pvalue

RESULT_SCHEMA = 2
VALIDITIES = ("exact", "conservative", "approximate", "descriptive")
"""Validity classes, strongest first (module docstring)."""


@dataclass
class DecoyKeys:
    """White-box only: fresh random keys scored against the same pulled-back classifier (``detect --decoys``).

    Attributes:
        num_keys: decoy keys scored. stream: where their carriers come from (never a key's own stream).
        empirical_log10_pvalue: log10 (1 + #{decoys <= real}) / (1 + num_keys), the real key's rank.
        log10_pvalues: each decoy key's combined log10 p.
    """

    num_keys: int
    stream: str
    empirical_log10_pvalue: float
    log10_pvalues: list[float]


@dataclass
class WhiteBoxDetails:
    """Attributes:
        alignment_r2: in-sample R^2 of the alignment fit (None for the identity alignment).
        alignment_r2_heldout: R^2 on a held-out fifth of the alignment images, refitted on the rest (honest
            when D is close to N); None for the identity.
        num_alignment_images: N. ridge: the alignment's ridge weight.
        alignment_caveat: a sentence the reports show when the alignment is weak ('' when none).
        decoys: :class:`DecoyKeys`, or None.
    """

    alignment_r2: float | None = None
    alignment_r2_heldout: float | None = None
    num_alignment_images: int = 0
    ridge: float = 0.0
    alignment_caveat: str = ""
    decoys: DecoyKeys | None = None


@dataclass
class GradientDetails:
    """Attributes:
        record: the private record read. references, reference_sha256: the vanilla reference models.
        temperature: T dividing the logits. images_per_class: vanilla images summed per tested class.
    """

    record: str = ""
    references: list[str] = field(default_factory=list)
    reference_sha256: list[str | None] = field(default_factory=list)
    temperature: float = 0.0
    images_per_class: list[int] = field(default_factory=list)


@dataclass
class DecoyCarrierDetails:
    """Attributes:
        references, reference_sha256: the vanilla reference models. images_per_class: n per tested class.
        decoy_carriers: M. decoy_stream: where the decoys come from (derived from the key's fingerprint).
        real_statistic: T_k of the real carrier. decoy_statistic_mean, decoy_statistic_std: over the decoys.
        smallest_reachable_log10_pvalue: the combined p-value when every class ranks first.
        queries: images sent to the suspect.
    """

    references: list[str] = field(default_factory=list)
    reference_sha256: list[str | None] = field(default_factory=list)
    images_per_class: list[int] = field(default_factory=list)
    decoy_carriers: int = 0
    decoy_stream: str = ""
    real_statistic: list[float] = field(default_factory=list)
    decoy_statistic_mean: list[float] = field(default_factory=list)
    decoy_statistic_std: list[float] | None = None
    smallest_reachable_log10_pvalue: float = 0.0
    queries: int = 0


@dataclass
class ControlDetails:
    """Black-box control test (released marked images against withheld marked ones).

    Attributes:
        num_released, num_holdout: marked images released / kept private (their vanilla version released).
        median_loss_difference_released, median_loss_difference_holdout: medians of
            d = loss(vanilla) - loss(marked) on each side (nats).
        mirror_log10_pvalue: the same test on loss(mirror) - loss(marked), when mirror outputs exist (None otherwise).
        queries: images sent to the suspect.
    """

    num_released: int = 0
    num_holdout: int = 0
    median_loss_difference_released: float = 0.0
    median_loss_difference_holdout: float = 0.0
    mirror_log10_pvalue: float | None = None
    queries: int = 0


@dataclass
class PairedDetails:
    """Paired black-box effect size (descriptive: no valid null, so no p-value).

    Attributes:
        pairs: released marked images with a finite, non-zero d = loss(vanilla) - loss(marked).
        median_loss_difference: median of d (nats); > 0 means the marked versions fit better.
        fraction_positive: share of pairs with d > 0.
        class_median_loss_difference: class name -> median d.
        median_mirror_difference: median of loss(mirror) - loss(marked), when mirror outputs exist.
        queries: images sent to the suspect.
    """

    pairs: int = 0
    median_loss_difference: float = 0.0
    fraction_positive: float = 0.0
    class_median_loss_difference: dict = field(default_factory=dict)
    median_mirror_difference: float | None = None
    queries: int = 0


@dataclass
class MembershipDetails:
    """Attributes:
        statistic: mean centred within-class rank of the withheld images' losses, in [-1/2, 1/2].
        num_released, num_withheld: images scored. median_loss_released, median_loss_withheld: nats.
        queries: images sent to the suspect.
    """

    statistic: float = 0.0
    num_released: int = 0
    num_withheld: int = 0
    median_loss_released: float = 0.0
    median_loss_withheld: float = 0.0
    queries: int = 0


DETAILS = {c.__name__: c for c in (WhiteBoxDetails, GradientDetails, DecoyCarrierDetails, ControlDetails,
                                    PairedDetails, MembershipDetails)}


def _details_from_dict(d: dict | None):
    if not d:
        return None
    cls = DETAILS.get(d.get("type", ""))
    if cls is None:
        raise RadioactiveError(f"unknown details type {d.get('type')!r}")
    kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
    if cls is WhiteBoxDetails and kwargs.get("decoys"):
        kwargs["decoys"] = DecoyKeys(**kwargs["decoys"])
    return cls(**kwargs)


@dataclass
class DetectionResult:
    """Outcome of one detection test: the same type for every method.

    Attributes:
        method: the registry name (``radioactive.detection.list_methods()``).
        validity: ``exact``, ``conservative``, ``approximate`` or ``descriptive`` (module docstring).
        log10_pvalue: log10 of the combined p-value, <= 0 and finite however small; None when descriptive.
        alpha: significance level of the verdict, in (0, 1).
        classes: class names tested, in order.
        class_log10_pvalues: per-class log10 p-values (empty when the test has none).
        cosines: per-class cosines in [-1, 1] (white-box and gradient tests).
        dim: D, the dimension of the cosines' null (the marking network's features); 0 when unused.
        key_fingerprint: the key's (:attr:`radioactive.keys.Key.fingerprint`).
        suspect: what was tested (path, sha256, architecture, ...).
        settings: every setting that changes the p-value, as used (temperature, references, decoys, classes).
        exploratory: settings that differ from the owner's audit plan, each as ``name: planned -> used``;
            non-empty marks the result exploratory: its p-value holds only if the setting was fixed before
            any suspect was tested, which the result cannot show.
        details: the method's typed details (:data:`DETAILS`), or None.
        seconds: wall time.
    """

    method: str
    validity: str
    log10_pvalue: float | None
    alpha: float
    classes: list[str]
    class_log10_pvalues: list[float] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    dim: int = 0
    key_fingerprint: str = ""
    suspect: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    exploratory: list[str] = field(default_factory=list)
    details: object = None
    seconds: float = 0.0

    def __post_init__(self):
        if self.validity not in VALIDITIES:
            raise RadioactiveError(f"validity must be one of {VALIDITIES}, got {self.validity!r}")
        if not 0 < self.alpha < 1:
            raise RadioactiveError(f"alpha must be in (0, 1), got {self.alpha}")
        if (self.validity == "descriptive") != (self.log10_pvalue is None):
            raise RadioactiveError("a descriptive result has no p-value, and every other result has one")
        if self.log10_pvalue is not None and not (math.isfinite(self.log10_pvalue) and self.log10_pvalue <= 0):
            raise RadioactiveError(f"log10 p-value must be finite and <= 0, got {self.log10_pvalue}")

    @property
    def detected(self) -> bool | None:
        """log10 p < log10 alpha; None for a descriptive result (it gives no verdict)."""
        if self.log10_pvalue is None:
            return None
        return bool(self.log10_pvalue < math.log10(self.alpha))

    @property
    def pvalue_text(self) -> str:
        return "n/a (descriptive)" if self.log10_pvalue is None else format_pvalue(self.log10_pvalue)

    def verdict(self) -> str:
        """One sentence; the only place a test's verdict is worded."""
        tag = f"{self.method}, {self.validity}" + (", EXPLORATORY" if self.exploratory else "")
        if self.log10_pvalue is None:
            return f"no verdict: {self.method} is a descriptive effect size without a valid null ({tag})."
        claim = ("it was trained on the released images" if self.method == "membership"
                 else "it was trained on data marked with this key")
        if self.detected:
            return f"DETECTED: {claim} (p = {self.pvalue_text} < alpha = {self.alpha:g}; {tag})."
        return f"not detected: no evidence that {claim} (p = {self.pvalue_text} >= alpha = {self.alpha:g}; {tag})."

    def to_dict(self) -> dict:
        d = asdict(self)
        d["details"] = None if self.details is None else {"type": type(self.details).__name__, **asdict(self.details)}
        d.update({"schema": RESULT_SCHEMA, "package_version": __version__, "detected": self.detected,
                  "pvalue": self.pvalue_text, "verdict": self.verdict()})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectionResult:
        """Inverse of :meth:`to_dict`.

        Raises:
            RadioactiveError: another schema, a missing field, or invalid values.
        """
        if not isinstance(d, dict) or d.get("schema") != RESULT_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise RadioactiveError(f"not a detection result of schema {RESULT_SCHEMA} (got {got!r})")
        required = [f.name for f in fields(cls) if f.name in ("method", "validity", "log10_pvalue", "alpha", "classes")]
        missing = [n for n in required if n not in d]
        if missing:
            raise RadioactiveError(f"detection result lacks {missing}")
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kwargs["details"] = _details_from_dict(d.get("details"))
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise RadioactiveError(f"malformed detection result ({e})") from e

    @classmethod
    def load(cls, path: str | Path) -> DetectionResult:
        """Read a result JSON written by :meth:`save`.

        Raises:
            RadioactiveError: missing, malformed or another schema's file.
        """
        from ..data import read_json

        return read_json(path, "a detection result", cls.from_dict)

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (strict: no NaN or infinity), atomically."""
        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, allow_nan=False).encode())
        return path
