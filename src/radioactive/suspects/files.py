"""Suspect files on disk: the sidecar (its schema checked on load) and state dicts read as tensors only.

A sidecar is the JSON description beside a suspect's weights (same stem, ``.json``), written by ``radioactive
train`` or by hand: ``architecture``, ``classes`` (names in output order), ``preprocessing`` (``image_size``,
``mean``, ``std``; not needed by a ``linear`` probe, whose ``backbone`` gives it), optionally ``classifier`` and
``schema`` (:data:`SIDECAR_SCHEMA`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import RadioactiveError
from ..networks import Preprocessing

SIDECAR_SCHEMA = 1


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinite value."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]



def check_sidecar(meta, path: str | Path) -> dict:
    """Check a suspect description against its schema; returns it unchanged.

    Checked: a JSON object; ``schema``, when present, an integer from 1 to :data:`SIDECAR_SCHEMA`;
    ``architecture`` a non-empty string; ``classes`` a non-empty list of unique strings; ``preprocessing``
    (required unless ``architecture`` is ``linear``, checked whenever present) as
    :meth:`radioactive.networks.Preprocessing.from_dict` checks it; ``backbone`` an object for ``linear``.

    Raises:
        RadioactiveError: one line naming the file and the first field that is missing or wrong.
    """
    def bad(why: str) -> RadioactiveError:
        return RadioactiveError(f"{path} is not a valid suspect description: {why} (docs/formats.md)")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    schema = meta.get("schema", SIDECAR_SCHEMA)
    if isinstance(schema, bool) or not isinstance(schema, int) or not 1 <= schema <= SIDECAR_SCHEMA:
        raise bad(f"schema {schema!r} is not one this version reads (1..{SIDECAR_SCHEMA}); upgrade radioactive")
    arch = meta.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise bad(f"'architecture' must be a non-empty string, got {arch!r}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("'classes' must be a non-empty list of class names (strings) in output order")
    if len(set(classes)) != len(classes):
        raise bad(f"'classes' repeats {sorted({c for c in classes if classes.count(c) > 1})[:5]}")
    if arch == "linear" and not isinstance(meta.get("backbone"), dict):
        raise bad("a 'linear' probe needs 'backbone' (the marking network it was trained on)")
    if "preprocessing" not in meta and arch != "linear":
        raise bad("'preprocessing' (image_size, mean, std) is missing")
    if "preprocessing" in meta:
        try:
            Preprocessing.from_dict(meta["preprocessing"])
        except RadioactiveError as e:
            raise bad(str(e)) from e
    return meta


def read_sidecar(path: str | Path) -> dict:
    """A suspect description read from ``path`` and checked (:func:`check_sidecar`).

    Raises:
        RadioactiveError: unreadable file, not JSON, or a description that fails :func:`check_sidecar`.
    """
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RadioactiveError(f"suspect description not readable: {path} ({e})") from e
    return check_sidecar(meta, path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, without running code from the file.

    ``.safetensors`` files are read with safetensors; any other file with
    ``torch.load(weights_only=True)``, which refuses every object that is not
    a tensor or a plain container (a file that would run code when unpickled
    is refused, never executed). A ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped, and a ``module.`` prefix on every
    name (DataParallel) is removed.

    Raises:
        RadioactiveError: unreadable file, objects other than tensors, or floating-point tensors holding
            NaN or infinite values (a diverged training: no test result on it would mean anything).
    """
    state = _read_state_dict(Path(path))
    bad = nonfinite_tensors(state)
    if bad:
        raise RadioactiveError(f"{path} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}): "
                               "the model diverged; nothing can be tested on it")
    return state


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RadioactiveError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise RadioactiveError(f"{path} is not a valid safetensors file ({e})") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RadioactiveError(
            f"refused to load {path}: it is not a plain tensor checkpoint (it holds objects whose unpickling "
            "could run code, or is not a torch file); give safetensors or a torch.save(model.state_dict()) file"
        ) from e
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RadioactiveError(f"{path} does not hold a state dict (name -> tensor)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _strict_load(module: nn.Module, state: dict) -> str:
    """Load ``state`` into ``module`` only if names and shapes match exactly; else describe the mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
              if k in state and own[k].shape != state[k].shape]
    parts = [f"{label} {items[:5]}" for label, items in (("missing", missing), ("unexpected", unexpected),
                                                         ("wrong shape", shapes)) if items]
    if parts:
        return "; ".join(parts)
    module.load_state_dict(state, strict=True)
    return ""
