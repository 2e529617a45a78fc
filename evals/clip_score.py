"""CLIP score (Hessel et al. 2021) with pluggable image-text scorers.

Scale: per image ``100 * max(cos(E_I, E_C), 0)``, averaged -- the formula torchmetrics documents.
(torchmetrics' code clamps the *mean* instead of each image; the two agree whenever no cosine is
negative, which is the case for trained CLIP models.) The raw mean cosine is reported alongside.

Scorers are callables ``(images, prompts) -> cosine (N,)``:

* :class:`TransformersCLIP` -- a local transformers ``CLIPModel`` folder (safetensors).
* :class:`OpenCLIP` -- an open_clip architecture name plus a local ``.safetensors`` checkpoint.
* anything else with that signature (e.g. ``diffplug.testbed.load_scorer()``).

Nothing is downloaded: missing weights raise an error naming the argument to fix.

Long prompts: CLIP's text tower has a fixed context (77 tokens for OpenAI CLIP). Prompts longer
than that are, by default, truncated *keeping the end-of-text token* (CLIP pools its text
embedding at that token; cutting it off, as a plain slice does, silently changes the embedding),
with one warning per call naming how many prompts were cut. ``long_prompts="error"`` raises instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from .resize import to_pixels

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIP's eval transform on a batch, on the images' device: bicubic (antialiased) resize of the
    shorter side to ``size``, centre crop, normalise. Input uint8 0..255 or float 0..1."""
    x = to_pixels(images, quantize=False) / 255
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / sd


def _report_long(n_long: int, ctx: int, mode: str) -> None:
    if n_long == 0:
        return
    msg = f"{n_long} prompt(s) exceed the text context of {ctx} tokens"
    if mode == "error":
        raise ValueError(msg + "; shorten them or pass long_prompts='truncate'")
    warnings.warn(msg + "; truncated, keeping the end-of-text token", stacklevel=3)


def _features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object


class TransformersCLIP(torch.nn.Module):
    """Cosine between CLIP image and text embeddings from a local transformers folder."""

    def __init__(self, path: str, long_prompts: str = "truncate", device=None):
        super().__init__()
        import transformers

        if long_prompts not in ("truncate", "error"):
            raise ValueError(f"long_prompts={long_prompts!r}: use 'truncate' or 'error'")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"path={path!r}: not a local CLIP folder (config.json, model.safetensors, "
                                    "tokenizer files); diffplug never downloads weights")
        self.model = transformers.CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.ctx = self.model.config.text_config.max_position_embeddings
        self.size = self.model.config.vision_config.image_size
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        try:
            ip = transformers.CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        except (OSError, ValueError, TypeError):
            pass  # no preprocessor_config.json: OpenAI CLIP's normalisation
        self.long_prompts = long_prompts
        self.name = f"transformers-clip:{path}"

    def tokenize(self, prompts: Sequence[str]) -> dict:
        n_long = sum(len(ids) > self.ctx for ids in self.tokenizer(list(prompts))["input_ids"])
        _report_long(n_long, self.ctx, self.long_prompts)
        # HF truncates the text and then adds the special tokens, so <|endoftext|> is kept.
        return self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.ctx,
                              return_tensors="pt")

    def embed(self, images: torch.Tensor, prompts: Sequence[str]):
        dev = next(self.model.parameters()).device
        tok = {k: v.to(dev) for k, v in self.tokenize(prompts).items()}
        img = _features(self.model.get_image_features(
            pixel_values=clip_preprocess(images.to(dev), self.size, self.mean, self.std)))
        txt = _features(self.model.get_text_features(**tok))
        return img.float(), txt.float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        img, txt = self.embed(images, prompts)
        return F.cosine_similarity(img, txt, dim=-1)


class OpenCLIP(torch.nn.Module):
    """Cosine from an open_clip model: ``OpenCLIP("ViT-B-32", pretrained="/path/weights.safetensors")``."""

    def __init__(self, model_name: str, pretrained: str, long_prompts: str = "truncate", device=None):
        super().__init__()
        import open_clip

        if long_prompts not in ("truncate", "error"):
            raise ValueError(f"long_prompts={long_prompts!r}: use 'truncate' or 'error'")
        p = Path(pretrained)
        if not p.is_file() or p.suffix != ".safetensors":
            raise FileNotFoundError(f"pretrained={pretrained!r}: give a local .safetensors checkpoint for "
                                    f"open_clip model {model_name!r}; diffplug never downloads weights")
        self.model = open_clip.create_model(model_name, pretrained=str(p), device=device or "cpu")
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.ctx = self.model.context_length
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", self.model.visual.image_size)
        self.size = size if isinstance(size, int) else size[0]
        self.mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_CLIP_STD))
        self.long_prompts = long_prompts
        self.name = f"open_clip:{model_name}:{p.name}"

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        enc = getattr(self.tokenizer, "encode", None)
        if enc is not None:  # SimpleTokenizer: ids without <sot>/<eot>
            _report_long(sum(len(enc(p)) + 2 > self.ctx for p in prompts), self.ctx, self.long_prompts)
        # open_clip's tokenizer truncates and writes <eot> into the last kept position.
        return self.tokenizer(list(prompts), context_length=self.ctx)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        img = self.model.encode_image(clip_preprocess(images.to(dev), self.size, self.mean, self.std))
        txt = self.model.encode_text(self.tokenize(prompts).to(dev))
        return F.cosine_similarity(img.float(), txt.float(), dim=-1)


def testbed_scorer(**kw) -> Callable:
    """The testbed's LiT-style scorer (``diffplug.testbed.load_scorer``), fed float [0, 1] images."""
    try:
        from diffplug import testbed
        s = testbed.load_scorer(**kw)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"scorer='testbed' needs diffplug.testbed.load_scorer() (not available: {e})") from e

    def score(images, prompts):
        dev = next(s.parameters()).device
        return s(to_pixels(images.to(dev), quantize=False) / 255, list(prompts))

    score.name = "testbed-lit-scorer"
    return score


def get_clip_scorer(scorer="transformers", path: str | None = None, model_name: str | None = None,
                    **kw) -> Callable:
    """``"transformers"`` + ``path`` | ``"open_clip"`` + ``model_name`` + ``path`` | ``"testbed"`` | callable."""
    if callable(scorer):
        return scorer
    if scorer == "transformers":
        if path is None:
            raise ValueError("scorer='transformers' (the default) needs path=<local CLIP folder> (diffplug downloads "
                             "nothing); offline, use the testbed's image-text scorer: scorer='testbed' "
                             "(diffplug eval: --reward-opt scorer=testbed)")
        return TransformersCLIP(path, **kw)
    if scorer == "open_clip":
        if path is None or model_name is None:
            raise ValueError("scorer='open_clip' needs model_name= (e.g. 'ViT-B-32') and path=<weights.safetensors>")
        return OpenCLIP(model_name, path, **kw)
    if scorer == "testbed":
        return testbed_scorer(**kw)
    raise ValueError(f"scorer={scorer!r}: use 'transformers', 'open_clip', 'testbed' or a callable "
                     "(images, prompts) -> cosine")


def clip_score(images: torch.Tensor, prompts: Sequence[str], scorer: Callable) -> torch.Tensor:
    """Per-image CLIP score ``100 * max(cos, 0)``, shape (N,). Functional twin of :class:`CLIPScore`."""
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"prompts: got {len(prompts)} for {len(images)} images")
    cos = torch.as_tensor(scorer(images, list(prompts))).float()
    return 100 * cos.clamp(min=0)


class CLIPScore(Metric):
    """Mean CLIP score over all updates (``100 * max(cos, 0)`` per image); states sync by sum.

    ``compute()`` returns the mean score; :attr:`mean_cosine` is the raw mean cosine.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    plot_lower_bound, plot_upper_bound = 0.0, 100.0

    def __init__(self, scorer="transformers", path: str | None = None, model_name: str | None = None,
                 scorer_kwargs: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.scorer = get_clip_scorer(scorer, path, model_name, **(scorer_kwargs or {}))
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cos_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: Sequence[str] | str) -> None:
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        cos = torch.as_tensor(self.scorer(images, list(prompts))).double().to(self.score_sum.device)
        self.score_sum += (100 * cos.clamp(min=0)).sum()
        self.cos_sum += cos.sum()
        self.n += cos.numel()

    def compute(self) -> torch.Tensor:
        return self.score_sum / self.n

    @property
    def mean_cosine(self) -> torch.Tensor:
        return self.cos_sum / self.n
