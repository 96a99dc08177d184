"""What the auditor holds: the owner's private files, and some access to the suspect.

Every registered test's entry point takes an :class:`OwnerFiles` and a :class:`SuspectAccess`, so ``audit`` can
run any test that fits, and the CLI builds both in one place.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RadioactiveError
from ..keys import Key


@dataclass(frozen=True)
class OwnerFiles:
    """The owner's private files an audit may read.

    Attributes:
        key: the secret key (None when no test that needs it is run).
        record: the private record of ``mark`` (JSON lines), or None.
        references: vanilla reference models the owner trained without the key (weights + sidecar, or TorchScript).
        images: vanilla held-out images (ImageFolder, or the CIFAR-10 archive's test split already extracted) for
            the white-box alignment; never a released marked image.
        source_root: the folder of vanilla originals, if it moved since marking (default: the record's).
        mirror_root: the mirror images an API was queried with (default: beside the record, or the vault's).
        vault: the vault these files come from, when there is one.
    """

    key: Key | None = None
    record: Path | None = None
    references: tuple[Path, ...] = ()
    images: Path | None = None
    source_root: Path | None = None
    mirror_root: Path | None = None
    vault: Path | None = None

    def need(self, *names: str, method: str = "") -> None:
        """Raise a one-line error naming the first missing file among ``names`` (``key``, ``record``, ``images``)."""
        for n in names:
            if getattr(self, n) is None:
                flag = {"key": "--key (or --vault)", "record": "--record (or --vault)", "images": "--images"}[n]
                raise RadioactiveError(f"{method or 'this test'} needs the owner's {n}: give {flag}")


@dataclass(frozen=True)
class SuspectAccess:
    """The auditor's access to the suspect.

    Attributes:
        kind: ``weights``, ``runnable``, ``outputs`` or ``labels`` (:data:`radioactive.detection.registry.ACCESS`).
        path: weights (``.safetensors``/``.pt`` with a ``.json`` sidecar) or TorchScript (with a sidecar), or None.
        outputs: a file of the suspect's outputs (JSON lines or CSV, :func:`read_outputs_file`), or None.
        classes: the suspect's class names in output order, for an outputs file (default: the record's order).
    """

    kind: str
    path: Path | None = None
    outputs: Path | None = None
    classes: tuple[str, ...] | None = None

    @classmethod
    def of_model(cls, path: str | Path) -> SuspectAccess:
        """Access to a model: ``weights`` for weights + sidecar, TorchScript + sidecar or a Hugging Face folder
        (they can be read and differentiated), ``runnable`` for ONNX (it only runs).

        Raises:
            RadioactiveError: no such file, or no readable sidecar beside it.
        """
        from ..suspects import sidecar_path
        from ..suspects import is_hf_folder

        path = Path(path)
        if is_hf_folder(path):
            return cls("weights", path=path)
        if not path.is_file():
            raise RadioactiveError(f"suspect not found: {path}")
        side = sidecar_path(path)
        try:
            meta = json.loads(side.read_text())
            meta["classes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RadioactiveError(f"suspect description not readable: {side} ({e}); write one with 'architecture', "
                                   "'classes' and 'preprocessing' (docs/formats.md), or give a state dict's "
                                   "architecture with --arch") from e
        return cls("runnable" if meta.get("architecture") == "onnx" else "weights", path=path)

    @classmethod
    def of_outputs(cls, path: str | Path, classes: list[str] | tuple[str, ...] | None = None) -> SuspectAccess:
        """Access through a file of outputs an API returned."""
        path = Path(path)
        if not path.is_file():
            raise RadioactiveError(f"outputs file not found: {path}")
        return cls("outputs", outputs=path, classes=tuple(classes) if classes else None)

    @classmethod
    def of_labels(cls, path: str | Path) -> SuspectAccess:
        """Access through an API's top-k labels on the label-only test's query images (``label-queries``)."""
        path = Path(path)
        if not path.is_file():
            raise RadioactiveError(f"labels file not found: {path}")
        return cls("labels", outputs=path)

    def describe(self) -> dict:
        """What the result records about the suspect."""
        from ..data import sha256_file

        p = self.path or self.outputs
        if p is not None and Path(p).is_symlink():  # a state dict given with --arch: the user's own file
            p = Path(p).resolve()
        if p is not None and Path(p).is_dir():
            p = Path(p) / "model.safetensors"
        return {"access": self.kind, "path": None if p is None else str(p),
                "sha256": sha256_file(p) if p is not None and Path(p).is_file() else None}


def derived_rng(fingerprint: str, tag: str, seed: int = 0) -> np.random.Generator:
    """A random stream of its own for decoys: seeded with sha256(fingerprint | tag | seed).

    Keys are drawn with torch's generator from a small integer seed (or the OS); this stream is numpy's PCG64
    seeded with 256 bits derived from the key's fingerprint and a domain tag, so a decoy can never reproduce the
    key's own carriers (nor another test's decoys), whatever seed the user gives.

    Args:
        fingerprint: the key's fingerprint. tag: the use (``white-box decoy keys``, ``decoy carriers``).
        seed: an integer >= 0 the owner may change before any suspect is tested.

    Returns:
        a numpy Generator.
    """
    digest = hashlib.sha256(f"radioactive|{tag}|{fingerprint}|{int(seed)}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32).astype(np.uint64).tolist())


def stream_name(fingerprint: str, tag: str, seed: int = 0) -> str:
    """How :func:`derived_rng`'s stream is described in a result."""
    return f"sha256(radioactive|{tag}|{fingerprint}|{int(seed)}) -> numpy PCG64"


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float64 rows uniform on the unit sphere (normalised Gaussians)."""
    u = rng.standard_normal((n, dim))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def check_unique(classes: list[str] | tuple[str, ...] | None) -> None:
    """Refuse a class list that names a class twice (Fisher's combination would count it twice).

    Raises:
        RadioactiveError: a duplicate name.
    """
    if classes is None:
        return
    seen, dup = set(), []
    for c in classes:
        if c in seen:
            dup.append(c)
        seen.add(c)
    if dup:
        raise RadioactiveError(f"classes named more than once: {sorted(set(dup))}; each class is tested once")
    if not classes:
        raise RadioactiveError("the list of classes to test is empty")


def marked_output_hashes(record: str | Path) -> dict[str, str]:
    """sha256 -> released name of every marked image a record lists (released or holdout)."""
    from ..data.record import read_record

    return {e.sha256: e.name for e in read_record(record)[1] if e.sha256}


def check_alignment_images(paths: list[Path], record: str | Path | None) -> None:
    """Refuse alignment images that are marked images of the record (by file hash).

    The alignment must be fitted on vanilla images: fitted on marked ones, it can make a clean model look marked
    (../shared/PAPER.md, "Known traps": a clean model went from p 0.26 to 1.8e-3).

    Raises:
        RadioactiveError: one of ``paths`` has the sha256 of a marked output of the record.
    """
    if record is None:
        return
    from ..data import sha256_file

    marked = marked_output_hashes(record)
    if not marked:
        return
    hits = [p for p in paths if sha256_file(p) in marked]
    if hits:
        raise RadioactiveError(f"{len(hits)} of the alignment images are marked images of the record (e.g. {hits[0]}); "
                               "fit the alignment on vanilla held-out images, never on the released copy")
