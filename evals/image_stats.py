"""Pixel statistics that track guidance artefacts: colour saturation, brightness and gray-image
contrast/clipping.

**Saturation (APG, Sadat et al. 2025, arXiv:2410.02416).** The paper reports a "saturation" score
next to FID, precision and recall to show that high-scale CFG oversaturates and APG does not.
What we could check (the abstract, the OpenReview summary and our methods spec; the full text was
not retrievable offline) says it is a per-image colour saturation averaged over the samples, without
the exact formula. We use the standard definition in HSV space (the one image libraries and the
APG spec describe): per pixel S = (max(R,G,B) - min(R,G,B)) / max(R,G,B) (0 where max = 0), averaged
over pixels, then over images; range 0..1. Compare methods against each other and against the
reference data, not against the paper's absolute numbers.

**Gray contrast/clipping.** For gray images (Fashion-MNIST-like), high-scale guidance pushes pixels
to the ends of the range. We report per image the RMS contrast (std of intensity in 0..1) and the
fractions of pixels clipped at black (<= ``tol``) and at white (>= 1 - ``tol``), ``tol`` = 1/255
by default. Fashion-MNIST's black background makes the black fraction large on real data too:
read these next to the reference set's values (the CLI reports both).

**Sharpness.** Variance of the 3x3 Laplacian of each image's brightest channel (the grey value of grey
images, the red one of a red tint): blur lowers it. Fine-tuning tables put it beside every reward gain,
since a reward that prefers smooth images (JPEG compressibility) can be raised by blurring.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean intensity per image in 0..1 over all channels and pixels, shape (N,); uint8 or float 0..1."""
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got {tuple(images.shape)}")
    return _unit(images).mean(dim=(1, 2, 3))


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Variance of the 3x3 Laplacian of the brightest channel per image, shape (N,); uint8 or float 0..1."""
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got {tuple(images.shape)}")
    grey = _unit(images).amax(1, keepdim=True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=grey.device).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(grey, kernel).flatten(1).var(dim=1)


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation per image, shape (N,); images (N, 3, H, W) uint8 or float 0..1."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W) colour images, got {tuple(images.shape)}")
    x = _unit(images)
    mx, mn = x.amax(1), x.amin(1)
    s = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-12), torch.zeros_like(mx))
    return s.mean(dim=(1, 2))


def gray_contrast(images: torch.Tensor, tol: float = 1 / 255) -> dict[str, torch.Tensor]:
    """Per-image ``contrast`` (std of intensity), ``clip_black`` and ``clip_white`` fractions.

    Colour input is reduced to luma (ITU-R BT.601 weights) first.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, 1|3, H, W), got {tuple(images.shape)}")
    x = _unit(images)
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = x.flatten(1)
    return {"contrast": x.std(1, unbiased=False),
            "clip_black": (x <= tol).float().mean(1),
            "clip_white": (x >= 1 - tol).float().mean(1)}


class _MeanOf(Metric):
    is_differentiable = False
    full_state_update = False
    keys: tuple = ()

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for k in self.keys:
            self.add_state(f"{k}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: dict) -> None:
        for k in self.keys:
            setattr(self, f"{k}_sum", getattr(self, f"{k}_sum") + values[k].double().sum())
        self.n += len(values[self.keys[0]])

    def compute(self):
        out = {k: getattr(self, f"{k}_sum") / self.n for k in self.keys}
        return out[self.keys[0]] if len(out) == 1 else out


class Saturation(_MeanOf):
    """Mean HSV saturation over all images seen (see :func:`saturation`)."""

    keys = ("saturation",)
    higher_is_better = None  # compare with the reference data: neither direction is "better"

    def update(self, images: torch.Tensor) -> None:
        self._add({"saturation": saturation(images)})


class GrayContrast(_MeanOf):
    """Means of :func:`gray_contrast`'s three numbers; ``compute()`` returns a dict."""

    keys = ("contrast", "clip_black", "clip_white")

    def __init__(self, tol: float = 1 / 255, **kwargs):
        super().__init__(**kwargs)
        self.tol = tol

    def update(self, images: torch.Tensor) -> None:
        self._add(gray_contrast(images, self.tol))
