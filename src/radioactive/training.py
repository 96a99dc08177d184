"""Reference recipes that play the trainer, to test a mark.

* ``linear``: a linear classifier on the frozen features of the marking
  network (transfer learning; Sablayrolles et al. 2020, Section 5.1).
* ``scratch``: a torchvision architecture trained from random initialisation
  (Section 5.2); ``resnet18_cifar`` by default.
* either recipe with a ``teacher``: knowledge distillation (Hinton et al.
  2015, "Distilling the knowledge in a neural network"): the student never
  sees a label, only the teacher's softened outputs on the same augmented
  images. With a teacher trained on marked data and a student trained on
  vanilla images, it asks whether the mark passes through a model's outputs
  alone (Sablayrolles et al. 2020, Section 5.5).

Both use the trainer's usual augmentation: random crop with 4 px zero padding
+ horizontal flip (torchvision.transforms.v2), optionally followed by
TrivialAugmentWide (Müller & Hutter 2021), a strong augmentation a trainer may
use. Marking and detection never import this module.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm.auto import tqdm

from . import __version__
from .data import atomic_write_bytes, list_image_folder, load_folder_array, sha256_file
from .errors import RadioactiveError
from .networks import (
    CIFAR_MEAN,
    CIFAR_STD,
    FeatureNetwork,
    LinearProbe,
    MarkingNetworkSpec,
    Preprocessing,
    build_architecture,
    load_marking_network,
)
from .suspects import SIDECAR_SCHEMA, load_suspect, nonfinite_tensors, sidecar_path

log = logging.getLogger(__name__)

TRAINER_AUGMENTATIONS = ("crop_flip", "trivialaugment")


DISTILLATION_TEMPERATURES = (0.1, 100.0)
"""Accepted distillation temperatures T (inclusive); the one home of this range (TrainConfig, the CLI)."""


@dataclass(frozen=True)
class TrainConfig:
    """A trainer recipe.

    Attributes:
        recipe: ``linear`` or ``scratch``.
        architecture: for ``scratch``: ``resnet18_cifar`` or a torchvision model name.
        backbone: for ``linear``: the frozen network (a marking network spec).
        epochs: passes over the training set.
        views: for ``linear``: augmented views of each training image whose
            frozen features are extracted once and reused by the epochs.
        batch_size: images (or feature vectors) per step.
        lr: peak learning rate (SGD with momentum 0.9 and a cosine schedule
            for ``scratch``; Adam for ``linear``).
        weight_decay: L2 weight decay.
        image_size: side in px training images are resized to (None keeps them).
        seed: seeds initialisation, augmentation and batch order.
        teacher: weights of a trained model (``radioactive train`` output, its JSON sidecar beside it;
            read by :func:`radioactive.suspects.load_suspect`, never unpickled) with the training folder's
            classes. When set, the loss is distillation, ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``
            (Hinton et al. 2015, Section 2), between the teacher's logits z_t and the student's z_s on the
            same augmented image; the folder's labels are not used.
        temperature: T of the distillation loss, in :data:`DISTILLATION_TEMPERATURES` ([0.1, 100]).
        augmentation: the trainer's augmentation: ``crop_flip`` (pad-4 random crop + horizontal flip) or
            ``trivialaugment`` (the same, then ``torchvision.transforms.v2.TrivialAugmentWide`` per image).
    """

    recipe: str = "linear"
    architecture: str = "resnet18_cifar"
    backbone: MarkingNetworkSpec = MarkingNetworkSpec()
    epochs: int = 30
    views: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    image_size: int | None = 32
    seed: int = 0
    teacher: str | None = None
    temperature: float = 4.0
    augmentation: str = "crop_flip"

    def __post_init__(self):
        if self.recipe not in ("linear", "scratch"):
            raise RadioactiveError(f"recipe must be 'linear' or 'scratch', got {self.recipe!r}")
        if self.epochs < 1 or self.views < 1 or self.batch_size < 1 or self.lr <= 0:
            raise RadioactiveError("epochs, views and batch_size must be >= 1 and lr > 0")
        if self.augmentation not in TRAINER_AUGMENTATIONS:
            raise RadioactiveError(f"augmentation must be one of {', '.join(TRAINER_AUGMENTATIONS)}, "
                                   f"got {self.augmentation!r}")
        lo, hi = DISTILLATION_TEMPERATURES
        if not lo <= self.temperature <= hi:
            raise RadioactiveError(f"temperature must be in [{lo:g}, {hi:g}] (Hinton et al. use 1 to 20), "
                                   f"got {self.temperature}")


@dataclass
class TrainResult:
    """Where the suspect was written and how well it classifies.

    Attributes:
        weights: safetensors file. sidecar: JSON description beside it.
        test_accuracy: top-1 on the test folder, in [0, 1].
        seconds: wall time.
    """

    weights: str
    sidecar: str
    test_accuracy: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _augment(batch: torch.Tensor, pad: int = 4, augmentation: str = "crop_flip") -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, drawn per image from torch's RNG; with
    ``trivialaugment``, then TrivialAugmentWide per image. (B, 3, H, W) uint8 -> (B, 3, H, W) uint8."""
    h, w = batch.shape[-2:]
    t = v2.Compose([v2.RandomCrop((h, w), padding=pad), v2.RandomHorizontalFlip()])
    out = torch.stack([t(img) for img in batch])
    if augmentation == "trivialaugment":
        strong = v2.TrivialAugmentWide()
        out = torch.stack([strong(img) for img in out])
    return out


@torch.no_grad()
def _features(net: FeatureNetwork, images: torch.Tensor, batch_size: int = 250, augment: str | None = None,
              desc: str = "features", progress: bool = False,
              teacher: FeatureNetwork | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (N, D) of ``images`` (N, 3, H, W) uint8, each augmented once by the ``augment``
    augmentation when given; and the ``teacher``'s logits (N, K) on the same augmented images (None
    without a teacher)."""
    out, logits = [], []
    dev = next(net.parameters()).device
    for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
        b = images[s:s + batch_size]
        if augment:
            b = _augment(b, augmentation=augment)
        b = b.to(dev).float() / 255
        out.append(net.features(b))
        if teacher is not None:
            logits.append(teacher(b))
    return torch.cat(out), torch.cat(logits) if teacher is not None else None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``, mean over the batch (Hinton et al. 2015, Section 2:
    the T^2 keeps the gradients' scale independent of T). Both (B, K) logits; returns a scalar."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    log_target=True, reduction="batchmean") * t * t


def _teacher(config: TrainConfig, classes: list[str], device: str) -> FeatureNetwork | None:
    """The recipe's teacher (frozen, eval mode), checked to have the training folder's classes."""
    if config.teacher is None:
        return None
    net, meta = load_suspect(config.teacher)
    if list(meta["classes"]) != list(classes):
        theirs, ours = list(meta["classes"]), list(classes)
        raise RadioactiveError(f"the teacher {config.teacher} has other classes ({len(theirs)}: {', '.join(theirs[:5])}"
                               f"{', ...' if len(theirs) > 5 else ''}) than the training folder ({len(ours)}: "
                               f"{', '.join(ours[:5])}{', ...' if len(ours) > 5 else ''}), in output order")
    return net.to(device)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 of ``model`` ((B,3,H,W) [0,1] -> logits) on uint8 images (N,3,H,W), labels (N,)."""
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for s in range(0, len(images), batch_size):
        logits = model(images[s:s + batch_size].to(dev).float() / 255)
        correct += int((logits.argmax(1).cpu() == labels[s:s + batch_size]).sum())
    return correct / len(images)


def _load(folder: Path, size: int | None, classes=None):
    f = list_image_folder(folder, classes)
    x, y = load_folder_array(f, size)
    return f, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def train(train_dir: str | Path, test_dir: str | Path, output: str | Path, config: TrainConfig = TrainConfig(),
          progress: bool = True, device: str = "cpu") -> TrainResult:
    """Train a suspect with a reference recipe and save it.

    Args:
        train_dir: ImageFolder-style training images (possibly a marked copy).
        test_dir: ImageFolder-style test images with the same classes.
        output: weights file to write (``.safetensors``); the JSON sidecar is
            written beside it with the same stem.
        config: the recipe.
        progress: show progress bars.
        device: torch device (``cpu``, ``cuda``).

    Returns:
        paths and test accuracy.

    Raises:
        RadioactiveError: unreadable folders, class mismatch between splits.
    """
    from safetensors.torch import save

    t0 = time.time()
    output = Path(output)
    if output.suffix != ".safetensors":
        raise RadioactiveError(f"weights are written as .safetensors, got {output.name}")
    if config.teacher is not None and Path(config.teacher).resolve() == output.resolve():
        raise RadioactiveError(f"the output {output} is the teacher's weights; write the student elsewhere")
    train_f, x_train, y_train = _load(Path(train_dir), config.image_size)
    _, x_test, y_test = _load(Path(test_dir), config.image_size, train_f.classes)
    classes = list(train_f.classes)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        teacher = _teacher(config, classes, device)
        if config.recipe == "linear":
            model, state, meta = _train_linear(x_train, y_train, len(classes), config, progress, device, teacher)
        else:
            model, state, meta = _train_scratch(x_train, y_train, len(classes), config, progress, device, teacher)
    state = {k: v.cpu() for k, v in state.items()}
    bad = nonfinite_tensors(state)
    if bad:
        raise RadioactiveError(f"training diverged: {len(bad)} weight tensors hold NaN or infinite values "
                               f"(e.g. {bad[0]}); lower the learning rate{' or the temperature' if config.teacher else ''}")
    acc = accuracy(model, x_test, y_test)
    meta.update({
        "schema": SIDECAR_SCHEMA, "package_version": __version__, "kind": "radioactive-suspect",
        "classes": classes, "recipe": asdict(config), "test_accuracy": acc,
        "train_dir": str(Path(train_dir)), "num_train": len(x_train), "num_test": len(x_test),
    })
    meta["recipe"]["backbone"] = config.backbone.to_dict()
    if config.teacher is not None:
        meta["teacher_sha256"] = sha256_file(config.teacher)
    atomic_write_bytes(output, save({k: v.contiguous() for k, v in state.items()}))
    side = sidecar_path(output)
    atomic_write_bytes(side, json.dumps(meta, indent=2).encode())
    log.info("trained %s suspect: test accuracy %.4f", config.recipe, acc)
    return TrainResult(str(output), str(side), acc, time.time() - t0)


def _train_linear(x, y, num_classes, config, progress, device, teacher=None):
    backbone, spec = load_marking_network(config.backbone)
    backbone = backbone.to(device)
    views = [_features(backbone, x, augment=config.augmentation, desc=f"features view {v + 1}", progress=progress, teacher=teacher)
             for v in range(config.views)]
    feats = torch.cat([f for f, _ in views])
    targets = torch.cat([t for _, t in views]) if teacher is not None else y.repeat(config.views)
    probe = LinearProbe(backbone, num_classes).to(device)
    opt = torch.optim.Adam(probe.head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(feats)
    for _ in tqdm(range(config.epochs), desc="linear epochs", disable=not progress):
        perm = torch.randperm(n)
        for s in range(0, n, config.batch_size):
            idx = perm[s:s + config.batch_size]
            logits = probe.head(feats[idx])
            loss = (F.cross_entropy(logits, targets[idx].to(device)) if teacher is None
                    else distillation_loss(logits, targets[idx], config.temperature))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    meta = {"architecture": "linear", "backbone": spec.to_dict(), "classifier": "head",
            "preprocessing": Preprocessing(None).to_dict()}
    return probe, probe.head.state_dict(), meta


def _train_scratch(x, y, num_classes, config, progress, device, teacher=None):
    pre = Preprocessing(config.image_size, CIFAR_MEAN, CIFAR_STD)
    model = build_architecture(config.architecture, num_classes).to(device, memory_format=torch.channels_last)
    net = FeatureNetwork(model, pre)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                          weight_decay=config.weight_decay)
    steps = config.epochs * ((len(x) + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(len(x))
        bar = tqdm(range(0, len(x), config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress)
        for s in bar:
            idx = perm[s:s + config.batch_size]
            batch = _augment(x[idx], augmentation=config.augmentation).to(device).float() / 255
            logits = net(batch)
            if teacher is None:
                loss = F.cross_entropy(logits, y[idx].to(device))
            else:
                with torch.no_grad():
                    target = teacher(batch)
                loss = distillation_loss(logits, target, config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    meta = {"architecture": config.architecture, "classifier": net.classifier_name, "preprocessing": pre.to_dict()}
    return net, model.state_dict(), meta


SCRATCH_RECIPE = TrainConfig(recipe="scratch", architecture="resnet18", lr=0.05, weight_decay=5e-4, image_size=32)
"""The from-scratch recipe (benchmarks/studies/from_scratch/NOTES.md, "Protocol"): ResNet-18 at 32 px, SGD 0.05 with a cosine
schedule, weight decay 5e-4, 30 epochs. The one home of its numbers: the demo trains with it, and ``train
--recipe scratch`` takes its lr and weight decay when none is given."""


def default_lr(recipe: str) -> float:
    """Peak learning rate of a recipe when none is given."""
    return TrainConfig.lr if recipe == "linear" else SCRATCH_RECIPE.lr


def default_weight_decay(recipe: str) -> float:
    """Weight decay of a recipe when none is given."""
    return TrainConfig.weight_decay if recipe == "linear" else SCRATCH_RECIPE.weight_decay

