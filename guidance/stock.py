"""Stock pipelines' own ways of combining their two passes, reproduced exactly so that ``from_pipe``
with nothing swapped equals the stock pipeline. Users pick diffplug's guidance (CFG, APG, ...) instead;
these are the families' defaults.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from .base import Guidance, check_guidance_scale


class ZImageCFG(Guidance):
    """``ZImagePipeline``'s combination: ``pred = pos + s * (pos - neg)``, i.e. CFG at w = 1 + s.

    ``cfg_normalization`` (> 0; True = 1): per sample, ``pred`` is scaled down to at most that multiple
    of ``‖pos‖``. ``cfg_truncation`` (<= 1): steps whose ``(1000 - t) / 1000`` exceeds it run the
    conditional pass alone. ``s <= 0``: no guidance (one pass), as stock.
    """

    @register_to_config
    def __init__(self, s: float = 5.0, cfg_normalization: float = 0.0, cfg_truncation: float = 1.0):
        self.s = check_guidance_scale(s, "guidance_scale")
        super().__init__(1.0 + self.s if self.s > 0 else 1.0)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)

    def new(self, guidance_scale: float | None = None, **kwargs):
        """A copy at Z-Image's scale s = ``guidance_scale``."""
        config = {**self.config, **({} if guidance_scale is None else {"s": guidance_scale}), **kwargs}
        return ZImageCFG(config["s"], config["cfg_normalization"], config["cfg_truncation"])

    def is_active(self) -> bool:
        if self.s <= 0 or not self._enabled:
            return False
        if self.cfg_truncation < 1 and self._timestep is not None:  # a host read only when truncating
            t_norm = ((1000 - torch.as_tensor(self._timestep).float()) / 1000).item()
            return t_norm <= self.cfg_truncation
        return True

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if pred_uncond is None:
            return self.output(pred_cond, pred_cond)
        pred = pred_cond + self.s * (pred_cond - pred_uncond)
        if self.cfg_normalization > 0:
            rows = []
            for pos, row in zip(pred_cond, pred):  # per sample, as the stock loop
                cap = torch.linalg.vector_norm(pos) * self.cfg_normalization
                norm = torch.linalg.vector_norm(row)
                rows.append(torch.where(norm > cap, row * (cap / norm), row))
            pred = torch.stack(rows)
        return self.output(pred, pred_cond, pred_uncond)


class QwenImageCFG(Guidance):
    """``QwenImagePipeline``'s combination: CFG at ``true_cfg_scale`` w, then each token's vector rescaled
    to the conditional prediction's norm: ``pred = c · ‖cond‖ / ‖c‖`` with ``c = uncond + w (cond − uncond)``,
    norms over the packed channels (last dim)."""

    @register_to_config
    def __init__(self, guidance_scale: float = 4.0):
        super().__init__(guidance_scale)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if pred_uncond is None:
            return self.output(pred_cond, pred_cond)
        combined = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        cond_norm = torch.norm(pred_cond, dim=-1, keepdim=True)
        pred = combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))
        return self.output(pred, pred_cond, pred_uncond)
