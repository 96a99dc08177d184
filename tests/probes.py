"""Test helper shared by the decoy-carrier and gradient tests: linear-probe suspects with chosen weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from radioactive.networks import Preprocessing


def linear_probe(path: Path, weight: np.ndarray, key) -> Path:
    """A linear probe on the marking network's features, written like radioactive.training does."""
    save_file({"weight": torch.as_tensor(weight, dtype=torch.float32).contiguous(),
               "bias": torch.zeros(len(weight), dtype=torch.float32)}, str(path))
    meta = {"architecture": "linear", "backbone": key.network.to_dict(), "classifier": "head",
            "preprocessing": Preprocessing(None).to_dict(), "classes": list(key.classes), "test_accuracy": None}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path
