"""Loading a suspect from its files: weights + sidecar, TorchScript, a Hugging Face folder, or ONNX (runnable only).

Every suspect is a :class:`radioactive.networks.FeatureNetwork` (``features`` / ``classifier`` seam) when its
weights can be read, else a module from (B, 3, H, W) images in [0, 1] to (B, K) outputs (:func:`load_runnable`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import RadioactiveError
from ..networks import (FeatureNetwork, LinearProbe, MarkingNetworkSpec, Preprocessing, build_architecture, freeze,
                        load_marking_network)
from .extras import is_hf_folder, load_hf, load_onnx
from .files import _strict_load, read_sidecar, read_state_dict, sidecar_path


def load_suspect(weights: str | Path, sidecar: str | Path | None = None,
                 layer: str | None = None) -> tuple[FeatureNetwork, dict]:
    """Load a suspect: weights + a JSON description (sidecar).

    The sidecar is written by ``radioactive train``; for another model, write
    one with at least ``architecture`` (``resnet18_cifar``, ``linear``, or a
    torchvision model name), ``classes`` (names in output order) and
    ``preprocessing`` (``image_size``, ``mean``, ``std``); ``classifier``
    optionally names the last linear layer (default: the last ``nn.Linear``).
    Weights (see :func:`read_state_dict`) are loaded strictly: missing or
    unexpected tensors are an error that names them. The network is frozen in
    eval mode.

    Args:
        weights: ``.safetensors``, or a ``.pt``/``.pth`` state dict.
        sidecar: JSON description (default: same stem, ``.json``).
        layer: name of the last linear layer, overriding the sidecar's ``classifier``.

    Returns:
        the suspect network and its sidecar dictionary.

    Raises:
        RadioactiveError: missing files, unsafe or malformed weights, or
            weights that do not match the described architecture.
    """
    weights = Path(weights)
    if is_hf_folder(weights):
        model, meta = load_hf(weights)
        net = FeatureNetwork(model, Preprocessing.from_dict(meta["preprocessing"]), layer, name=meta["architecture"])
        if net.num_classes != len(meta["classes"]):
            raise RadioactiveError(f"layer {net.classifier_name!r} of {weights} is not its classifier; name it")
        return freeze(net), meta
    sidecar = Path(sidecar) if sidecar else sidecar_path(weights)
    if not weights.is_file():
        raise RadioactiveError(f"suspect weights not found: {weights}")
    if not sidecar.is_file():
        raise RadioactiveError(f"suspect description not found: {sidecar} (written by `radioactive train` beside the weights)")
    meta = read_sidecar(sidecar)
    arch, classes = meta["architecture"], list(meta["classes"])
    try:
        backbone_spec = MarkingNetworkSpec(**meta["backbone"]) if arch == "linear" else None
    except (ValueError, KeyError, TypeError) as e:
        raise RadioactiveError(f"{sidecar} is not a suspect description (missing or bad {e})") from e
    if arch == "onnx":
        raise RadioactiveError(f"{weights} is ONNX: it runs but its weights cannot be read or differentiated, so only "
                               "the tests with runnable or outputs access apply")
    if arch == "torchscript":
        net = ScriptedFeatureNetwork(_load_torchscript(weights), Preprocessing.from_dict(meta["preprocessing"]),
                                     layer or meta.get("classifier"), name="suspect:torchscript")
        _check_classes(net, classes)
        return net.eval(), meta
    state = read_state_dict(weights)
    if backbone_spec is not None:
        backbone, _ = load_marking_network(backbone_spec)
        model: nn.Module = LinearProbe(backbone, len(classes))
        target, pre, cls_name = model.head, Preprocessing(None), "head"
    else:
        model = build_architecture(arch, len(classes))
        target, pre, cls_name = model, Preprocessing.from_dict(meta["preprocessing"]), layer or meta.get("classifier")
    problems = _strict_load(target, state)
    if problems:
        raise RadioactiveError(f"weights in {weights} do not match architecture {arch!r}: {problems}")
    net = FeatureNetwork(model, pre, cls_name, name=f"suspect:{arch}")
    _check_classes(net, classes)
    return freeze(net), meta


def _check_classes(net: FeatureNetwork, classes: list[str]) -> None:
    if net.num_classes != len(classes):
        raise RadioactiveError(f"layer {net.classifier_name!r} has {net.num_classes} outputs but the suspect has "
                               f"{len(classes)} classes; name its last linear layer")


def load_runnable(weights: str | Path, sidecar: str | Path | None = None) -> tuple[nn.Module, dict]:
    """A suspect that only needs to run (black-box): what :func:`load_suspect` reads (weights + sidecar, TorchScript,
    a Hugging Face folder), or an ONNX file described by a sidecar with ``architecture: "onnx"``, ``classes`` and
    ``preprocessing`` (:mod:`radioactive.suspects`).

    Returns:
        a module mapping (B, 3, H, W) images in [0, 1] to (B, K) outputs, in eval mode, and the sidecar.

    Raises:
        RadioactiveError: as :func:`load_suspect`, or a TorchScript file that does not load.
    """
    weights = Path(weights)
    if is_hf_folder(weights):
        return load_suspect(weights)
    side = Path(sidecar) if sidecar else sidecar_path(weights)
    meta = read_sidecar(side)
    if meta["architecture"] == "onnx":
        return load_onnx(weights, meta), meta
    if meta["architecture"] == "torchscript":
        scripted = _load_torchscript(weights)
        model = _Runnable(scripted, Preprocessing.from_dict(meta["preprocessing"]))
        return model.eval(), meta
    net, meta = load_suspect(weights, side)
    return net, meta


def _load_torchscript(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise RadioactiveError(f"{path} is not a TorchScript file ({str(e).splitlines()[0][:200]})") from e


class ScriptedFeatureNetwork(FeatureNetwork):
    """A TorchScript classifier seen as features + last linear layer.

    Hooks cannot be added to TorchScript, so the features are read by running
    the model with its last linear layer's weight temporarily set to the
    identity and its bias to zero (the layer then outputs its input); the
    original weights are restored at once. The features are checked: W f + b
    must give the model's logits.

    Args:
        model: a loaded TorchScript module mapping normalised images to logits (B, K).
        preprocessing: applied to [0, 1] inputs.
        classifier_name: dotted name of the last linear layer (default: the last ``Linear`` submodule).
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, classifier_name: str | None = None,
                 name: str = "torchscript"):
        nn.Module.__init__(self)
        self.model, self.preprocessing, self.name = model, preprocessing, name
        linears = [n for n, m in model.named_modules() if getattr(m, "original_name", "") == "Linear"]
        if classifier_name is None:
            if not linears:
                raise RadioactiveError("the TorchScript model has no Linear layer")
            classifier_name = linears[-1]
        if classifier_name not in linears:
            raise RadioactiveError(f"the TorchScript model has no Linear layer named {classifier_name!r}")
        self.classifier_name = classifier_name
        self._layer = dict(model.named_modules())[classifier_name]
        self.classifier = nn.Linear(self._layer.weight.shape[1], self._layer.weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(self._layer.weight)
            self.classifier.bias.copy_(self._layer.bias)

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B, 3, H, W) in [0, 1]. Returns: features (B, D_s), logits (B, K)."""
        xn = self.preprocessing(x)
        logits = self.model(xn)
        w, b = self._layer.weight.data, self._layer.bias.data
        try:
            self._layer.weight.data = torch.eye(self.feature_dim, dtype=w.dtype)
            self._layer.bias.data = torch.zeros(self.feature_dim, dtype=b.dtype)
            f = self.model(xn)
        finally:
            self._layer.weight.data, self._layer.bias.data = w, b
        if f.shape != (x.shape[0], self.feature_dim) or not torch.allclose(
                f @ w.T + b, logits, rtol=1e-3, atol=1e-3 * (1 + float(logits.abs().max()))):
            raise RadioactiveError(f"layer {self.classifier_name!r} is not the model's last step; name the last "
                                   "linear layer")
        return f, logits


class _Runnable(nn.Module):
    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model, self.preprocessing = model, preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocessing(x))
