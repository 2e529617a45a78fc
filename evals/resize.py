"""Resize protocols for the FID Inception (299x299 input). FID changes with the resize, so every
result names its protocol. All run batched on any device, in float32, on 0..255 pixel values:

``clean`` (default)
    clean-fid's "clean" mode: PIL bicubic on each channel of the uint8 image as float (mode "F",
    no re-quantisation), clipped to 0..255. Done here with torch's antialiased bicubic (a = -0.5,
    the same separable PIL kernel), which agrees with PIL to ~2e-3 grey levels (float rounding).
``torchmetrics``
    torchmetrics >= 1.4 ``FrechetInceptionDistance`` default: bilinear with antialias.
``tf1`` (aliases ``torch-fidelity``, ``legacy_tensorflow``)
    TensorFlow 1.x bilinear, align_corners=False without half-pixel centres: the original TF FID
    code, torch-fidelity, and torchmetrics with ``antialias=False``.
``legacy_pytorch``
    clean-fid's "legacy_pytorch": ``F.interpolate(mode="bilinear", align_corners=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROTOCOLS = ("clean", "torchmetrics", "tf1", "legacy_pytorch")
_ALIASES = {"torch-fidelity": "tf1", "torch_fidelity": "tf1", "legacy_tensorflow": "tf1", "tf": "tf1",
            "clean-fid": "clean"}

DESCRIPTIONS = {
    "clean": "clean-fid 'clean': PIL-equivalent bicubic (antialiased, float, clipped 0..255) to 299x299",
    "torchmetrics": "torchmetrics default: bilinear with antialias to 299x299",
    "tf1": "TensorFlow-1 bilinear (torch-fidelity / original TF FID) to 299x299",
    "legacy_pytorch": "clean-fid 'legacy_pytorch': torch bilinear, no antialias, to 299x299",
}


def canonical_protocol(protocol: str) -> str:
    p = _ALIASES.get(protocol, protocol)
    if p not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose one of {PROTOCOLS} (aliases {sorted(_ALIASES)})")
    return p


def to_pixels(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 0..255 or float 0..1 -> float32 0..255 with 3 channels.

    Float input is clamped to [0, 1] and, with ``quantize=True`` (default), rounded to 8 bits, so
    a tensor scores exactly like the PNG it would be saved as. Gray (C=1) is repeated to RGB.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, 1|3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float()
    elif images.is_floating_point():
        x = images.float().clamp(0, 1) * 255
        if quantize:
            x = x.round()
    else:
        raise TypeError(f"images: expected uint8 (0..255) or float (0..1), got {images.dtype}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: source = dst * in/out, no half-pixel offset."""

    def axis(n_in: int):
        scale = n_in / size
        src = torch.arange(size, device=x.device, dtype=torch.float64) * scale
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(torch.float32)

    h0, h1, fh = axis(x.shape[2])
    w0, w1, fw = axis(x.shape[3])
    top, bot = x[:, :, h0], x[:, :, h1]
    rows = top + (bot - top) * fh[:, None]
    left, right = rows[..., w0], rows[..., w1]
    return left + (right - left) * fw


def resize_for_inception(x: torch.Tensor, protocol: str = "clean", size: int = 299) -> torch.Tensor:
    """Resize float 0..255 ``(N, 3, H, W)`` to ``size`` with the named protocol (see module doc)."""
    protocol = canonical_protocol(protocol)
    x = x.float()
    if x.shape[-2:] == (size, size):
        return x  # every protocol is the identity at the target size
    if protocol == "clean":
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                             antialias=True).clamp_(0, 255)
    if protocol == "torchmetrics":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if protocol == "legacy_pytorch":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 255)
    return _tf1_bilinear(x, size)
