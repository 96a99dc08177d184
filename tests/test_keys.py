"""Tests for radioactive.keys: carriers, determinism, save/load and its errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from radioactive.errors import RadioactiveError
from radioactive.keys import Key, carriers_fingerprint, generate_key, key_fingerprint, key_from_numpy, random_carriers
from radioactive.networks import MarkingNetworkSpec


def test_carriers_shape_dtype_and_unit_norm(key, classes, marking_net):
    net, _ = marking_net
    assert key.carriers.shape == (len(classes), net.feature_dim) == (10, 1280)
    assert key.carriers.dtype == torch.float32
    torch.testing.assert_close(key.carriers.norm(dim=1), torch.ones(10), atol=1e-6, rtol=0)
    assert key.classes == tuple(classes)
    assert key.dim == 1280 and key.seed == 1


def test_carriers_look_uniform_on_sphere(key):
    # independent uniform unit vectors in R^1280: pairwise cosines ~ N(0, 1/1280), coordinates centred
    c = key.carriers.double()
    gram = c @ c.T
    off = gram[~torch.eye(10, dtype=torch.bool)]
    assert off.abs().max() < 6 / 1280**0.5
    assert abs(float(c.mean())) < 5 * (1 / 1280 / c.numel()) ** 0.5  # within 5 sd of the mean of 12,800 coordinates


def test_same_seed_same_carriers_different_seed_different(classes):
    a = generate_key(classes, seed=1)
    b = generate_key(classes, seed=1)
    c = generate_key(classes, seed=2)
    assert torch.equal(a.carriers, b.carriers) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.carriers, c.carriers) and a.fingerprint != c.fingerprint
    # different seeds give unrelated carriers, not e.g. a permutation or a sign flip
    assert (a.carriers @ c.carriers.T).abs().max() < 0.2


def test_random_carriers_depends_only_on_generator():
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    a = random_carriers(4, 64, g1)
    torch.manual_seed(123)  # the global RNG must not matter
    b = random_carriers(4, 64, g2)
    assert torch.equal(a, b)


def test_generate_key_fills_network_hash(key):
    assert key.network.name == "efficientnet_lite0" and key.network.image_size == 64
    assert key.network.weights_sha256 is not None and len(key.network.weights_sha256) == 64


def test_save_load_roundtrip(key, tmp_path):
    path = key.save(tmp_path / "secret.key")
    assert path == tmp_path / "secret.key" and path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # atomic write cleaned up
    loaded = Key.load(path)
    assert torch.equal(loaded.carriers, key.carriers)
    assert loaded.classes == key.classes
    assert loaded.network == key.network and loaded.network.weights_sha256 == key.network.weights_sha256
    assert loaded.fingerprint == key.fingerprint == key_fingerprint(key.carriers, key.classes)
    assert loaded.seed == 1


def test_saved_key_is_self_describing(key, tmp_path):
    path = key.save(tmp_path / "k.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["radioactive"])
        assert list(f.keys()) == ["carriers"]
    assert meta["schema"] == 2 and meta["kind"] == "radioactive-key"
    assert meta["classes"] == list(key.classes) and meta["dim"] == 1280
    assert meta["network"]["weights_sha256"] == key.network.weights_sha256


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(RadioactiveError, match="not found"):
        Key.load(tmp_path / "nope.key")


@pytest.mark.parametrize("content", [os.urandom(4096), b"this is a text file, not a key\n" * 10, b""])
def test_load_non_key_raises(tmp_path, content):
    path = tmp_path / "bogus.key"
    path.write_bytes(content)
    with pytest.raises(RadioactiveError, match="not a radioactive key"):
        Key.load(path)


def test_load_safetensors_without_key_metadata_raises(tmp_path):
    # e.g. a suspect's weights passed where the key is expected
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.randn(10, 1280), "bias": torch.zeros(10)}, str(path))
    with pytest.raises(RadioactiveError, match="not a radioactive key"):
        Key.load(path)


def test_load_unknown_schema_raises(key, tmp_path):
    path = key.save(tmp_path / "k.key")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["radioactive"])
        carriers = f.get_tensor("carriers")
    meta["schema"] = 99
    save_file({"carriers": carriers}, str(path), metadata={"radioactive": json.dumps(meta)})
    with pytest.raises(RadioactiveError, match="schema"):
        Key.load(path)


def test_tampered_carriers_raise(key, tmp_path):
    path = key.save(tmp_path / "k.key")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    other = random_carriers(10, 1280, torch.Generator().manual_seed(77))
    save_file({"carriers": other}, str(path), metadata=metadata)
    with pytest.raises(RadioactiveError, match="fingerprint"):
        Key.load(path)
    # one flipped sign is enough
    tweaked = key.carriers.clone()
    tweaked[3, 17] = -tweaked[3, 17]
    save_file({"carriers": tweaked}, str(path), metadata=metadata)
    with pytest.raises(RadioactiveError, match="fingerprint"):
        Key.load(path)


@pytest.mark.parametrize("bad", [[], ("cat", "dog", "cat"), ["a", "a"]])
def test_duplicate_or_empty_classes_raise(bad):
    with pytest.raises(RadioactiveError, match="unique"):
        generate_key(bad, seed=0)


def test_unknown_marking_network_raises():
    with pytest.raises(RadioactiveError, match="unknown marking network"):
        generate_key(["a", "b"], network=MarkingNetworkSpec(name="resnet9000"), seed=0)


def test_key_rejects_mismatched_carriers(key):
    with pytest.raises(RadioactiveError):
        Key(key.carriers[:9], key.classes, key.network)
    with pytest.raises(RadioactiveError):
        Key(key.carriers[0], key.classes[:1], key.network)


def test_key_from_numpy_keeps_classes_new_fingerprint(key):
    other = key_from_numpy(-key.carriers.numpy(), key)
    assert other.classes == key.classes and other.network == key.network
    assert other.fingerprint != key.fingerprint and other.seed is None
    assert torch.equal(other.carriers, -key.carriers)


@pytest.mark.parametrize("meta", ['{"schema": 1}', "[1, 2]",
                                  '{"schema": 1, "classes": ["a"], "network": {"name": "x", "extra": 1}, '
                                  '"fingerprint": "0"}'], ids=["no-classes", "not-an-object", "unknown-network-field"])
def test_load_malformed_key_metadata_raises(tmp_path, meta):
    path = tmp_path / "k.key"
    save_file({"carriers": torch.ones(1, 4) / 2}, str(path), metadata={"radioactive": meta})
    with pytest.raises(RadioactiveError):
        Key.load(path)


def test_fingerprint_covers_class_names_and_order(key):
    """Issue 16: the fingerprint covered the carriers only, so the same carriers under other classes matched."""
    swapped = Key(key.carriers, tuple(reversed(key.classes)), key.network, key.seed)
    renamed = Key(key.carriers, ("renamed",) + tuple(key.classes[1:]), key.network, key.seed)
    assert len({key.fingerprint, swapped.fingerprint, renamed.fingerprint}) == 3
    assert key.fingerprint != carriers_fingerprint(key.carriers)  # not the carriers-only hash any more


def test_schema1_key_still_read(key, tmp_path):
    """A key written before the fingerprint covered the classes (schema 1) loads, checked with and keeping its own
    carriers-only fingerprint (records made with it carry that one)."""
    import json

    from safetensors.torch import save

    meta = {"schema": 1, "kind": "radioactive-key", "classes": list(key.classes), "network": key.network.to_dict(),
            "dim": key.dim, "seed": key.seed, "fingerprint": carriers_fingerprint(key.carriers)}
    path = tmp_path / "old.safetensors"
    path.write_bytes(save({"carriers": key.carriers.contiguous()}, metadata={"radioactive": json.dumps(meta)}))
    assert Key.load(path).fingerprint == carriers_fingerprint(key.carriers) != key.fingerprint
    meta["fingerprint"] = "0" * 16
    path.write_bytes(save({"carriers": key.carriers.contiguous()}, metadata={"radioactive": json.dumps(meta)}))
    with pytest.raises(RadioactiveError, match="fingerprint"):
        Key.load(path)
