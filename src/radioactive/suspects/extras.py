"""Suspects in the formats people publish them, beyond ``radioactive train``'s weights + sidecar
(:mod:`radioactive.suspects.load` reads those).

* a torchvision or timm architecture name with a state dict (:func:`state_dict_suspect`): the sidecar is written
  for it into a private temporary folder, beside a link to the weights (the user's files are never modified);
* a Hugging Face image-classification folder (``config.json`` + ``model.safetensors``; optional extra ``hf``,
  :func:`load_hf`): classes from ``id2label``, preprocessing from ``preprocessor_config.json``;
* ONNX (optional extra ``onnx``, :func:`load_onnx`): a sidecar with ``"architecture": "onnx"``; it runs but cannot
  be differentiated, so it offers ``runnable`` access (black-box tests), not ``weights``.

Every loader reads tensors only (safetensors, or ``weights_only`` state dicts); nothing a user hands over is
unpickled.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import RadioactiveError
from .files import SIDECAR_SCHEMA

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_hf_folder(path: str | Path) -> bool:
    """A folder holding a Hugging Face model: ``config.json`` and ``model.safetensors``."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def state_dict_suspect(weights: str | Path, architecture: str, classes: list[str], image_size: int,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """A suspect given as an architecture name and a state dict, made loadable without touching the user's files.

    Args:
        weights: ``.safetensors`` or ``.pt``/``.pth`` state dict (read with ``weights_only=True``).
        architecture: a torchvision model name (``resnet18``, ``vgg11_bn``), ``resnet18_cifar``, or ``timm:<name>``.
        classes: class names in output order. image_size: side in px the model expects.
        mean, std: input normalisation (3 values each, images in [0, 1]).

    Returns:
        a path to pass wherever a suspect is expected: a link to ``weights`` in a new private temporary folder,
        with the sidecar beside it (removed when the process exits is not guaranteed: the folder is small).

    Raises:
        RadioactiveError: no such weights; a bad size, mean or std.
    """
    weights = Path(weights).resolve()
    if not weights.is_file():
        raise RadioactiveError(f"suspect weights not found: {weights}")
    if image_size < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise RadioactiveError("image size must be >= 1, and mean and std three values each (std > 0)")
    folder = Path(tempfile.mkdtemp(prefix="radioactive-suspect-"))
    link = folder / f"suspect{weights.suffix}"
    link.symlink_to(weights)
    sidecar = {"schema": SIDECAR_SCHEMA, "architecture": architecture, "classes": list(classes),
               "preprocessing": {"image_size": int(image_size), "mean": list(mean), "std": list(std)},
               "source": str(weights)}
    link.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return link


def build_timm(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised timm model (``timm.create_model(name, pretrained=False)``): never downloads.

    Raises:
        RadioactiveError: timm not installed (``pip install radioactive[timm]``), or an unknown name.
    """
    try:
        import timm
    except ImportError as e:
        raise RadioactiveError("timm architectures need the optional extra: pip install 'radioactive[timm]'") from e
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except (RuntimeError, ValueError, KeyError) as e:
        raise RadioactiveError(f"unknown timm architecture {name!r} ({e})") from e


class _HFClassifier(nn.Module):
    """A transformers image classifier as a module from normalised (B, 3, H, W) pixels to (B, K) logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf(folder: str | Path) -> tuple[nn.Module, dict]:
    """A Hugging Face image-classification folder as a suspect.

    Args:
        folder: ``config.json`` (with ``id2label``) + ``model.safetensors``; ``preprocessor_config.json`` gives
            ``image_mean``, ``image_std`` and ``size`` when present (else ImageNet statistics and 224 px).

    Returns:
        the model (logits from normalised pixels, eval mode, frozen) and a sidecar dictionary (``architecture``
        ``hf:<model_type>``, ``classes``, ``preprocessing``).

    Raises:
        RadioactiveError: transformers not installed (``pip install 'radioactive[hf]'``), no ``id2label``, weights
            that do not load.
    """
    folder = Path(folder)
    try:
        from transformers import AutoModelForImageClassification
    except ImportError as e:
        raise RadioactiveError("Hugging Face folders need the optional extra: pip install 'radioactive[hf]'") from e
    try:
        config = json.loads((folder / "config.json").read_text())
        id2label = {int(k): str(v) for k, v in config["id2label"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise RadioactiveError(f"{folder}/config.json has no usable id2label ({e})") from e
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except Exception as e:  # transformers raises many kinds; one line for the user
        raise RadioactiveError(f"{folder} does not load as an image classifier ({str(e).splitlines()[0][:200]})") from e
    pre = {}
    if (folder / "preprocessor_config.json").is_file():
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    size = pre.get("size", 224)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    meta = {"architecture": f"hf:{config.get('model_type', 'unknown')}",
            "classes": [id2label[i] for i in range(len(id2label))],
            "preprocessing": {"image_size": int(size), "mean": list(pre.get("image_mean", IMAGENET_MEAN)),
                              "std": list(pre.get("image_std", IMAGENET_STD))}}
    net = _HFClassifier(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, meta


class _OnnxRunnable(nn.Module):
    """An ONNX classifier as a module from (B, 3, H, W) images in [0, 1] to (B, K) outputs (no gradients)."""

    def __init__(self, session, preprocessing):
        super().__init__()
        self.session, self.preprocessing = session, preprocessing
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.preprocessing(x).detach().cpu().numpy().astype(np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: z})[0]).double()


def load_onnx(path: str | Path, meta: dict) -> nn.Module:
    """An ONNX file described by a sidecar (``"architecture": "onnx"``, ``classes``, ``preprocessing``).

    Raises:
        RadioactiveError: onnxruntime not installed (``pip install 'radioactive[onnx]'``), a file that does not load.
    """
    from ..networks import Preprocessing

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RadioactiveError("ONNX suspects need the optional extra: pip install 'radioactive[onnx]'") from e
    if "preprocessing" not in meta or "classes" not in meta:
        raise RadioactiveError(f"the sidecar of {path} needs 'classes' and 'preprocessing'")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own kinds
        raise RadioactiveError(f"{path} is not an ONNX model ({str(e).splitlines()[0][:200]})") from e
    return _OnnxRunnable(session, Preprocessing.from_dict(meta["preprocessing"])).eval()
