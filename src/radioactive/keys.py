"""The secret key: one random unit carrier per class in the marking network's feature space.

Sablayrolles et al. 2020, Section 3.1: carriers u_k are drawn uniformly on
the unit sphere of R^D, independently for each class k. A key file is a
safetensors file holding ``carriers`` (K, D) float32 and, in its metadata,
everything needed to use it: classes in order, the marking network with the
hash of its weights, and a fingerprint of the carriers.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import RadioactiveError
from .networks import MarkingNetworkSpec

KEY_SCHEMA = 2
"""2: the fingerprint covers the class names and their order. Schema 1 keys are still read and keep their
carriers-only fingerprint, which the records and plans made with them carry."""


def carriers_fingerprint(carriers: torch.Tensor) -> str:
    """Schema 1's fingerprint: first 16 hex digits of the sha256 of the float32 carriers (row-major) alone."""
    data = carriers.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def key_fingerprint(carriers: torch.Tensor, classes: tuple[str, ...] | list[str]) -> str:
    """First 16 hex digits of sha256 over a domain tag, the float32 carriers (row-major) and each class name in
    order (4-byte big-endian length, then UTF-8): two keys with the same carriers but classes in another order, or
    other names, have different fingerprints."""
    h = hashlib.sha256(b"radioactive-key-fingerprint-2\0")
    h.update(carriers.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    for name in classes:
        data = str(name).encode("utf-8")
        h.update(len(data).to_bytes(4, "big") + data)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Key:
    """A radioactive key.

    Attributes:
        carriers: (K, D) float32, unit-norm rows; row k is the carrier of class k.
        classes: the K class names, in the order of ``carriers``' rows.
        network: the marking network the carriers live in.
        seed: the seed the carriers were drawn from (secret like the carriers).
        fingerprint: identifies the carriers and the classes in order (see :func:`key_fingerprint`).
    """

    carriers: torch.Tensor
    classes: tuple[str, ...]
    network: MarkingNetworkSpec
    seed: int | None = None
    fingerprint: str = field(default="")

    def __post_init__(self):
        if self.carriers.ndim != 2 or self.carriers.shape[0] != len(self.classes):
            raise RadioactiveError(
                f"carriers must be (K, D) with K = {len(self.classes)} classes, got {tuple(self.carriers.shape)}"
            )
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", key_fingerprint(self.carriers, self.classes))

    @property
    def dim(self) -> int:
        return int(self.carriers.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write the key (safetensors), atomically. Returns the path."""
        from safetensors.torch import save

        from .data import atomic_write_bytes

        meta = {
            "schema": KEY_SCHEMA,
            "package_version": __version__,
            "kind": "radioactive-key",
            "classes": list(self.classes),
            "network": self.network.to_dict(),
            "dim": self.dim,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
        }
        blob = save({"carriers": self.carriers.to(torch.float32).contiguous()}, metadata={"radioactive": json.dumps(meta)})
        path = Path(path)
        atomic_write_bytes(path, blob, private=True)  # the key is secret: 0600 from its creation on
        return path

    @classmethod
    def load(cls, path: str | Path) -> Key:
        """Read a key written by :meth:`save`.

        A ``trained`` marking network whose recorded path no longer exists is looked for in the key's own
        folder under the same file name (a folder moved with its key and network still works); its sha256
        is checked against the key's when it is loaded.

        Raises:
            RadioactiveError: missing file, not a key, unknown schema, or
                carriers whose fingerprint differs from the recorded one.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RadioactiveError(f"key not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["radioactive"])
                carriers = f.get_tensor("carriers")
        except Exception as e:
            raise RadioactiveError(f"{path} is not a radioactive key (not a safetensors file with key metadata)") from e
        if not isinstance(meta, dict) or meta.get("schema") not in (1, KEY_SCHEMA):
            schema = meta.get("schema") if isinstance(meta, dict) else None
            raise RadioactiveError(f"{path}: not a key of schema 1 or {KEY_SCHEMA} (schema {schema})")
        try:
            key = cls(carriers, tuple(meta["classes"]), MarkingNetworkSpec(**meta["network"]), meta.get("seed"))
            recorded = meta["fingerprint"]
        except (KeyError, TypeError, ValueError) as e:
            raise RadioactiveError(f"{path}: malformed key metadata ({e!r})") from e
        expected = key.fingerprint
        if meta["schema"] == 1:  # records and plans made with it carry this carriers-only fingerprint: keep it
            expected = carriers_fingerprint(carriers)
            key = replace(key, fingerprint=expected)
        if expected != recorded:
            raise RadioactiveError(f"{path}: carriers and classes do not match the recorded fingerprint (file damaged?)")
        net = key.network
        if net.path and not Path(net.path).is_file() and (path.parent / Path(net.path).name).is_file():
            # a trained marking network moved with its key (same folder); its sha256 is checked when it is loaded
            key = replace(key, network=replace(net, path=str((path.parent / Path(net.path).name).resolve())))
        return key


def random_carriers(num_classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(K, D) float32 rows drawn uniformly on the unit sphere (normalised Gaussians)."""
    g = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    return (g / g.norm(dim=1, keepdim=True)).to(torch.float32)


def generate_key(classes: list[str] | tuple[str, ...], network: MarkingNetworkSpec = MarkingNetworkSpec(),
                 seed: int | None = None) -> Key:
    """Draw a new key for ``classes`` in the feature space of ``network``.

    Loads the marking network to read its feature dimension D and the hash of
    its weights, then draws K independent uniform unit carriers.

    Args:
        classes: class names in index order (K >= 1, unique).
        network: marking network spec.
        seed: seed of the generator; None draws one from the OS.

    Raises:
        RadioactiveError: empty or duplicated classes, unknown network.
    """
    from .networks import load_marking_network

    classes = tuple(classes)
    if not classes or len(set(classes)) != len(classes):
        raise RadioactiveError("classes must be a non-empty list of unique names")
    net, spec = load_marking_network(network)
    if seed is None:
        seed = secrets.randbits(63)
    gen = torch.Generator().manual_seed(int(seed))
    carriers = random_carriers(len(classes), net.feature_dim, gen)
    return Key(carriers, classes, spec, int(seed))


def key_from_numpy(carriers: np.ndarray, like: Key) -> Key:
    """A key with other carriers but the same classes and network (decoys, controls)."""
    return Key(torch.as_tensor(carriers, dtype=torch.float32), like.classes, like.network, None)
