"""Differentiable augmentations used while marking.

The random parameters are drawn from one ``torch.Generator`` per image, so an
image's sequence of augmentations does not depend on which other images share
its batch (marking results are independent of the batch size). The pixel work
is kornia's differentiable ``crop_and_resize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.geometry.transform import crop_and_resize


@dataclass(frozen=True)
class ResizedCropFlip:
    """Random resized crop + horizontal flip (as trainers use), per image.

    Attributes:
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height); the crop is
            clipped to the image.
        flip_p: probability of a horizontal flip.
    """

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def draw(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One parameter draw per image: (B, 5) float64 rows (w_frac, h_frac, x_frac, y_frac, flip)."""
        u = torch.stack([torch.rand(5, generator=g, dtype=torch.float64) for g in generators])
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
        w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
        h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        x0 = u[:, 2] * (1 - w)
        y0 = u[:, 3] * (1 - h)
        flip = (u[:, 4] < self.flip_p).to(torch.float64)
        return torch.stack([w, h, x0, y0, flip], dim=1)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Apply drawn parameters.

        Args:
            x: (B, C, H, W) float images.
            params: (B, 5) from :meth:`draw`.

        Returns:
            (B, C, H, W) augmented images, differentiable with respect to ``x``.
        """
        b, _, hh, ww = x.shape
        p = params.to(x.device, x.dtype)
        x0 = p[:, 2] * ww
        y0 = p[:, 3] * hh
        x1 = x0 + p[:, 0] * ww - 1
        y1 = y0 + p[:, 1] * hh - 1
        boxes = torch.stack(
            [torch.stack([x0, y0], 1), torch.stack([x1, y0], 1), torch.stack([x1, y1], 1), torch.stack([x0, y1], 1)], 1
        )
        out = crop_and_resize(x, boxes, (hh, ww), mode="bilinear", padding_mode="border", align_corners=True)
        flip = p[:, 4].view(b, 1, 1, 1) > 0.5
        return torch.where(flip, out.flip(-1), out)


@dataclass(frozen=True)
class PadCropFlip:
    """Zero-pad by ``pad`` px, random crop back to the original size, horizontal flip: the usual CIFAR
    trainer's augmentation (torchvision ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``), per image.

    Attributes:
        pad: padding in px on each side (the crop is shifted by -pad..pad px in each direction).
        flip_p: probability of a horizontal flip.
    """

    pad: int = 4
    flip_p: float = 0.5

    def draw(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One parameter draw per image: (B, 3) int64 rows (dx, dy, flip), dx and dy in 0..2 pad."""
        return torch.stack([torch.cat([torch.randint(0, 2 * self.pad + 1, (2,), generator=g),
                                       (torch.rand(1, generator=g, dtype=torch.float64) < self.flip_p).long()])
                            for g in generators])

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Apply drawn parameters to (B, C, H, W) float images; exact pixel shifts, differentiable in ``x``."""
        hh, ww = x.shape[-2:]
        padded = F.pad(x, (self.pad,) * 4)
        out = torch.stack([padded[i, :, dy:dy + hh, dx:dx + ww] for i, (dx, dy, _) in enumerate(params.tolist())])
        flip = (params[:, 2] > 0).to(x.device).view(-1, 1, 1, 1)
        return torch.where(flip, out.flip(-1), out)


AUGMENTATIONS = {"resized_crop": ResizedCropFlip, "pad_crop": PadCropFlip}
