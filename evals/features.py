"""Feature networks for FID/KID/precision-recall.

A feature network maps images ``(N, C, H, W)`` (uint8 0..255 or float 0..1) to ``(N, D)`` float
features and carries a ``name`` (used in cache keys and in the JSON output) and ``num_features``.
:func:`get_feature_network` builds one from a name or wraps any callable:

* ``"inception"`` -- the standard FID Inception with a resize ``protocol`` (default ``"clean"``).
* ``"testbed"`` -- the testbed classifier's penultimate features (global-pooled conv features,
  128-d; ``diffplug.testbed.load_classifier()``, imported lazily).
* ``"clip:<dir>"`` -- a local transformers CLIP's image embeddings (``CLIPModel`` folder).
* ``"dinov2:<dir>"`` -- a local transformers DINOv2 (CLS token).
* ``"py:<module>:<attr>"`` -- an importable callable ``images -> features`` (or a zero-argument
  factory returning one when ``<attr>`` ends with ``()``), handy from the command line.
* any callable ``images -> features`` (wrapped in :class:`CallableFeatures`).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .resize import DESCRIPTIONS, canonical_protocol, resize_for_inception, to_pixels


def _autocast(device: torch.device, enabled: bool | None):
    """bf16/fp16 autocast on accelerators by default; plain float32 on CPU unless asked."""
    if enabled is None:
        enabled = device.type == "cuda"
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


class InceptionFeatures(nn.Module):
    """The FID Inception with its resize protocol: images -> ``(N, 2048)`` pool3 features.

    ``autocast=None`` uses fp16 autocast on CUDA (the feature mean agrees with float32 to ~1e-3
    relative; pass ``autocast=False`` for float32 everywhere) and float32 on CPU.
    """

    num_features = 2048

    def __init__(self, protocol: str = "clean", weights=None, autocast: bool | None = None,
                 quantize: bool = True, channels_last: bool = True, net: nn.Module | None = None,
                 compile: bool = False):
        super().__init__()
        from .inception import load_inception

        self.protocol = canonical_protocol(protocol)
        self.net = net if net is not None else load_inception(weights)  # net: share one loaded network
        if compile:  # torch.compile the network (GPU throughput); the first batch pays the compile time
            self.net.forward = torch.compile(self.net.forward)
        self.autocast = autocast
        self.quantize = quantize
        self.channels_last = channels_last
        self.name = "inception-2015-12-05"

    def precision_tag(self, device) -> str:
        """Part of the reference-cache key: fp16 autocast features differ from float32 ones (~1e-3)."""
        on = self.autocast if self.autocast is not None else torch.device(device).type == "cuda"
        return "amp" if on else "fp32"

    def describe(self) -> dict:
        return {"feature_network": self.name, "weights": getattr(self.net, "source", "?"),
                "resize_protocol": self.protocol, "resize": DESCRIPTIONS[self.protocol],
                "quantize_float_input_to_uint8": self.quantize}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        x = resize_for_inception(to_pixels(images.to(dev), self.quantize), self.protocol)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(dev, self.autocast):
            return self.net(x).float()


class CallableFeatures(nn.Module):
    """Wrap any ``images -> (N, D)`` callable (e.g. the testbed's classifier features)."""

    def __init__(self, fn: Callable, name: str | None = None, num_features: int | None = None):
        super().__init__()
        self.fn = fn
        if isinstance(fn, nn.Module):
            self.module = fn  # so .to(device) moves it
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)
        self.num_features = num_features or getattr(fn, "num_features", None)

    def describe(self) -> dict:
        return {"feature_network": self.name, "resize_protocol": "network's own"}

    @torch.no_grad()
    def forward(self, images):
        f = self.fn(images)
        if isinstance(f, (tuple, list)):
            f = f[0]
        if f.ndim != 2:
            raise ValueError(f"feature network {self.name!r} returned shape {tuple(f.shape)}, expected (N, D)")
        return f.float()


class TestbedFeatures(nn.Module):
    """Penultimate (pooled conv) features of the testbed classifier, trained on the testbed's data:
    a FID-like distance that knows Fashion-MNIST and emoji better than ImageNet's Inception."""

    def __init__(self, device=None, weights=None):
        super().__init__()
        try:
            from diffplug import testbed
        except ImportError as e:
            raise RuntimeError(f"features='testbed' needs diffplug.testbed ({e})") from e
        self.classifier = testbed.load_classifier(device=device, weights=weights).eval().requires_grad_(False)
        net = self.classifier.net
        self.num_features = net.head.in_features
        # the weights' digest is part of the name, so cached reference statistics of an older
        # classifier are never reused after it is retrained
        file = (Path(weights) if weights is not None else testbed.WEIGHTS_DIR) / "classifier.safetensors"
        self.name = f"testbed-classifier-pool-{hashlib.sha256(file.read_bytes()).hexdigest()[:10]}"

    def describe(self) -> dict:
        return {"feature_network": self.name,
                "resize_protocol": f"bilinear antialias to {self.classifier.size} (the classifier's own)"}

    @torch.no_grad()
    def forward(self, images):
        from diffplug.testbed.models import _resize

        dev = self.classifier.net.head.weight.device
        x = _resize(to_pixels(images.to(dev), quantize=True) / 255, self.classifier.size)
        return self.classifier.net.features(2.0 * x - 1.0).mean(dim=(2, 3)).float()


class _HFImageFeatures(nn.Module):
    """Image embeddings of a local transformers CLIP or DINOv2 (folder with config + safetensors)."""

    def __init__(self, kind: str, path: str):
        super().__init__()
        import transformers

        try:
            if kind == "clip":
                self.model = transformers.CLIPModel.from_pretrained(path, local_files_only=True,
                                                                    use_safetensors=True)
            else:
                self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True,
                                                                    use_safetensors=True)
        except OSError as e:
            raise FileNotFoundError(f"features='{kind}:{path}': no local {kind} weights there ({e}); pass a "
                                    "folder holding config.json and model.safetensors") from e
        self.model.eval().requires_grad_(False)
        cfg = self.model.config.vision_config if kind == "clip" else self.model.config
        self.size = cfg.image_size
        self.kind = kind
        self.name = f"{kind}:{path}"
        self.num_features = self.model.config.projection_dim if kind == "clip" else cfg.hidden_size
        mean, std = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)) if kind == "clip" \
            else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def describe(self) -> dict:
        return {"feature_network": self.name, "resize_protocol": f"bicubic antialias to {self.size}"}

    @torch.no_grad()
    def forward(self, images):
        x = to_pixels(images.to(self.mean.device)) / 255
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        if self.kind == "clip":
            out = self.model.get_image_features(pixel_values=x)
            return (out if torch.is_tensor(out) else out.pooler_output).float()
        return self.model(pixel_values=x).last_hidden_state[:, 0].float()


def get_feature_network(features="inception", protocol: str = "clean", **kw) -> nn.Module:
    """Build a feature network from a name (see module doc) or wrap a callable."""
    if isinstance(features, nn.Module) and hasattr(features, "name") and hasattr(features, "describe"):
        return features
    if callable(features):
        return CallableFeatures(features)
    if not isinstance(features, str):
        raise TypeError(f"features={features!r}: pass a name ('inception', 'testbed', 'clip:<dir>', "
                        "'dinov2:<dir>') or a callable images -> (N, D)")
    if features == "inception":
        return InceptionFeatures(protocol=protocol, **kw)
    if features == "testbed":
        return TestbedFeatures(**kw)
    if features.startswith("py:"):
        import importlib

        mod, _, attr = features[3:].partition(":")
        call = attr.endswith("()")
        try:
            fn = getattr(importlib.import_module(mod), attr[:-2] if call else attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"features={features!r}: cannot import ({e})") from e
        return CallableFeatures(fn() if call else fn, name=features[3:])
    kind, _, path = features.partition(":")
    if kind in ("clip", "dinov2") and path:
        return _HFImageFeatures(kind, path)
    raise ValueError(f"features={features!r}: unknown; use 'inception', 'testbed', 'clip:<dir>', "
                     "'dinov2:<dir>' or a callable")


class FeatureMetric:
    """Mixin for torchmetrics ``Metric``s that score images through a feature network.

    ``update(images, real)`` featurises images; ``update(features=f, real=...)`` (or
    :meth:`update_features`) takes precomputed ``(N, D)`` features. Both go through torchmetrics'
    wrapped ``update`` so its bookkeeping (update count, cached compute) stays right.
    """

    def _init_features(self, features, protocol, feature_kwargs):
        self.feature_net = None if features is None else get_feature_network(features, protocol,
                                                                              **(feature_kwargs or {}))

    def describe(self) -> dict:
        return self.feature_net.describe() if self.feature_net is not None else {"feature_network": "user features"}

    def update(self, images: torch.Tensor | None = None, real: bool = False, features: torch.Tensor | None = None):
        if features is None:
            if images is None:
                raise ValueError("update: pass images or features=")
            if self.feature_net is None:
                raise RuntimeError(f"{type(self).__name__} was built with features=None: pass features=")
            features = self.feature_net(images)
        self._update_features(features, real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        self.update(features=features, real=real)
