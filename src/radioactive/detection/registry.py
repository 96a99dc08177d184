"""The detection family: every test registered by name, in the spirit of timm's model registry.

An entry says what a test needs and what it promises: the access to the suspect it can use, the owner's
private files it reads, its validity class (:data:`radioactive.detection.result.VALIDITIES`), its config
dataclass (one source of truth for its defaults; the CLI's flags, help and ranges are read from the fields'
metadata) and its entry point. ``radioactive audit`` runs every registered test whose access fits and whose
validity is not ``descriptive``; ``radioactive detect --method NAME`` runs one.

    >>> from radioactive.detection import list_methods, get_method
    >>> list_methods(access="outputs")
    ['black-box', 'membership', 'paired']
    >>> get_method("gradient").validity
    'exact'

A new test touches one module (which calls :func:`register_method`) and one import line in
``radioactive/detection/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import RadioactiveError
from .result import VALIDITIES

ACCESS = {
    "weights": "a model whose weights can be read and differentiated: weights with a sidecar or an architecture name, "
               "TorchScript, a Hugging Face folder",
    "runnable": "a model the auditor can run on images made at test time, without gradients (ONNX)",
    "outputs": "a file of the suspect's outputs (logits or probabilities) on images the auditor sent, e.g. an API",
    "labels": "the suspect's top-k labels only",
}
"""Kinds of access to a suspect, strongest first. Weights imply runnable, and runnable implies outputs."""
_IMPLIED = {"weights": ("weights", "runnable", "outputs", "labels"), "runnable": ("runnable", "outputs", "labels"),
            "outputs": ("outputs", "labels"), "labels": ("labels",)}

PRIVATE_FILES = {
    "key": "the secret key (carriers, marking network)",
    "record": "the private record of the marked images (vanilla originals and marked outputs)",
    "references": "vanilla reference models the owner trained without the key",
    "holdout": "marked images kept private, whose vanilla versions were released (mark --holdout-fraction)",
    "withheld": "images left out of the release (mark --withhold-fraction)",
    "images": "vanilla held-out images to fit the alignment (never a released marked image)",
}


@dataclass(frozen=True)
class MethodEntry:
    """One registered detection test.

    Attributes:
        name: registry name (``detect --method``).
        run: entry point ``run(owner, suspect, config, alpha) -> DetectionResult`` with
            :class:`radioactive.detection.audit.OwnerFiles` and :class:`radioactive.detection.audit.SuspectAccess`.
        access: the access kinds it can use (keys of :data:`ACCESS`); it runs when the suspect offers any of them.
        reads: the owner's files it reads (keys of :data:`PRIVATE_FILES`); ``optional`` ones need not exist.
        optional: the files of ``reads`` it can do without.
        validity: its validity class.
        config: its frozen config dataclass.
        summary: one line for help texts and the README's table.
        null: ``null(owner, suspect, config, num, seed) -> (num,) log10 p-values`` under H0 for this suspect
            (fresh keys, or fresh randomisations of what the null says is random), for ``radioactive calibrate``;
            None when no cheap sampler exists.
        null_unit: what ``null`` redraws (``keys``, ``splits``).
    """

    name: str
    run: Callable
    access: tuple[str, ...]
    reads: tuple[str, ...]
    validity: str
    config: type
    summary: str
    optional: tuple[str, ...] = ()
    null: Callable | None = None
    null_unit: str = "keys"

    def defaults(self):
        """The config with every default."""
        return self.config()

    def fits(self, access: str) -> bool:
        """Whether a suspect offering ``access`` can be tested (weights imply runnable imply outputs)."""
        return any(a in self.access for a in _IMPLIED[access])


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(entry: MethodEntry) -> MethodEntry:
    """Add a test to the family.

    Raises:
        RadioactiveError: a name registered twice, an unknown access, file or validity, a config that is not a
            frozen dataclass.
    """
    if entry.name in _REGISTRY:
        raise RadioactiveError(f"detection method {entry.name!r} is registered twice")
    if entry.validity not in VALIDITIES:
        raise RadioactiveError(f"{entry.name}: validity must be one of {VALIDITIES}")
    if not set(entry.access) <= set(ACCESS) or not set(entry.reads) <= set(PRIVATE_FILES):
        raise RadioactiveError(f"{entry.name}: unknown access or private file")
    if not (dataclasses.is_dataclass(entry.config) and entry.config.__dataclass_params__.frozen):
        raise RadioactiveError(f"{entry.name}: config must be a frozen dataclass")
    _REGISTRY[entry.name] = entry
    return entry


def list_methods(access: str | None = None, valid_only: bool = False) -> list[str]:
    """Registered names, sorted; only those that fit ``access`` and, with ``valid_only``, give a p-value."""
    if access is not None and access not in ACCESS:
        raise RadioactiveError(f"access must be one of {', '.join(ACCESS)}, got {access!r}")
    return sorted(n for n, e in _REGISTRY.items()
                  if (access is None or e.fits(access)) and not (valid_only and e.validity == "descriptive"))


def get_method(name: str) -> MethodEntry:
    """The entry registered as ``name``.

    Raises:
        RadioactiveError: an unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RadioactiveError(f"unknown detection method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def config_fields(entry: MethodEntry) -> list[dataclasses.Field]:
    """The config's fields that the CLI exposes (those with a ``help`` in their metadata)."""
    return [f for f in dataclasses.fields(entry.config) if "help" in f.metadata]


def setting(default, help: str, parse: Callable | None = None, check: Callable | None = None, expected: str = ""):
    """A config field with its CLI help, parser and range check in one place (sklearn's declarative style).

    Args:
        default: the default value (immutable).
        help: help text. parse: text -> value (default: the default's type).
        check: value -> bool, the accepted range. expected: the range in words, for error messages.
    """
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "check": check,
                                                        "expected": expected})


def check_config(config) -> None:
    """Check every field of a config against its declared range.

    Raises:
        RadioactiveError: a value outside its range (the message names the field and the range).
    """
    for f in dataclasses.fields(config):
        check, value = f.metadata.get("check"), getattr(config, f.name)
        if check is not None and value is not None and not check(value):
            raise RadioactiveError(f"{f.name} must be {f.metadata.get('expected') or 'in range'}, got {value!r}")
