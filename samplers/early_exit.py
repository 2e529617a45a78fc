"""DeeDiff early exit (Tang et al., arXiv:2309.17074; AdaDiff, ECCV 2024): a transformer denoiser
that stops at the first block whose estimated uncertainty is below a threshold.

After every block ``i < N`` (image tokens ``L_i``) the wrapper owns

* an output head ``g_i``: the model's final layer (adaLN modulation, the model's own parameter-free
  LayerNorm, a linear to patch pixels, unpatchify where the model does) with its own adaLN table and
  linear, initialised so that ``g_i`` starts as the final layer applied to ``L_i``;
* a UEM ``u_i = mean_tokens sigmoid(w_k . LN(L_i) + v_k . emb + b_k)``: the paper's linear layer on
  ``[L_i, emb]`` per token, ``emb`` the model's own conditioning vector (PixArt: the embedded
  timestep of ``adaln_single``; Flux / SD3: ``temb``, timestep + pooled text [+ guidance]), ``LN``
  the final layer's LayerNorm. The exit decision needs one scalar per sample: the mean over tokens.
  ``uem_buckets`` sets of ``(w, v, b)`` per layer, indexed by the noise level ``k``: 1 (default) =
  one UEM per layer, 1000 = the paper's literal per-timestep UEMs.

The noise level that picks the bucket: PixArt (epsilon DDPM) its timestep in [0, 1000); Flux and
SD3 (rectified flow) sigma in [0, 1], never their raw timestep input (Flux passes sigma, SD3
sigma * 1000: ``../shared/methods/flow.md`` section 1).

``forward`` runs block after block; after block ``i`` the rows with ``u_i < threshold`` return
``g_i(L_i)`` and leave the batch: later blocks run on the rows still active only, so an exited
sample really stops consuming compute (cond and uncond rows of CFG decide separately). The last
block always uses the model's own head. ``threshold = 0`` never exits and skips the UEMs: the output
is the wrapped model's, bit for bit.

Supported (one :class:`Trunk` each: input stage, block call, final layer, in the model's own op order):

* ``PixArtTransformer2DModel`` (PixArt-alpha/Sigma, the testbed DiT): head table = a copy of the
  model's ``scale_shift_table``;
* ``FluxTransformer2DModel``: double-stream then single-stream blocks, one exit after each; the head
  is ``norm_out`` (adaLN on ``temb``) + ``proj_out`` on that block's image tokens; output packed
  tokens, as the model's;
* ``ChromaTransformer2DModel``: Flux's blocks modulated by slices of one ``pooled_temb``; the
  single-stream blocks run on ``[text, image]`` joined and the heads read the image tail; ``norm_out``
  takes ``pooled_temb``'s last two rows, the UEM its last (the final scale) as ``emb``;
* ``SD3Transformer2DModel`` (SD3 / 3.5): joint blocks, the same head as Flux, unpatchified.
  ``skip_layers`` (skip-layer guidance) is honoured.

For Flux, Chroma and SD3 the head's table is a learned offset (zeros at first) added to ``norm_out``'s
``(scale, shift)``: a copy of ``norm_out.linear`` per head would cost ``2 D^2`` parameters each (19 M
on Flux.1). ControlNet residuals and IP-Adapter embeddings are refused (not carried per row).

Statistics: ``stats()`` -> rows evaluated, blocks executed, exits per block, since ``reset_stats()``.
With ``log_exits = True`` each call also appends ``(noise level, exit block per row)`` to ``exit_log``.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TESTBED_HEADS = "dit_early_exit.safetensors"
HEADS_WHAT = "early-exit heads written by `diffplug finetune deediff` (EarlyExit.save_heads)"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# -- one pass through the trunk ----------------------------------------------------------------------


@dataclass
class Pass:
    """The state of one forward between blocks: image tokens ``x``, per-row tensors ``rows`` (sliced
    when rows exit; ``key`` is the UEM's noise level), what every row shares, the latent size."""

    x: torch.Tensor
    rows: dict
    shared: dict = field(default_factory=dict)
    size: tuple = ()

    def select(self, keep: torch.Tensor) -> "Pass":
        return Pass(self.x[keep], {k: None if v is None else v[keep] for k, v in self.rows.items()}, self.shared, self.size)


def _per_row(value, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(value, device=device).reshape(-1).float().expand(batch)


def _unpatchify(hidden, height, width, patch, channels):
    """(B, L, p*p*C) -> (B, C, H, W), the models' own reshape."""
    hidden = hidden.reshape(shape=(hidden.shape[0], height, width, patch, patch, channels))
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(shape=(hidden.shape[0], channels, height * patch, width * patch))


class Trunk:
    """How :class:`EarlyExit` walks one family of transformers."""

    key_range = 1.0  # the UEM key's range: bucket = floor(key * buckets / key_range)

    def __init__(self, transformer):
        self.tr = transformer

    def blocks(self) -> list:
        return list(self.tr.transformer_blocks)

    def initial_table(self) -> torch.Tensor:
        """The heads' (2, D) adaLN table at initialisation."""
        return torch.zeros(2, self.tr.proj_out.in_features)

    def config(self) -> dict:
        """What a heads file must match (besides the UEM buckets)."""
        return {"model_class": type(self.tr).__name__, "num_layers": len(self.blocks()),
                "dim": self.tr.proj_out.in_features, "out_features": self.tr.proj_out.out_features, "uem_key": "sigma"}

    def image(self, p: "Pass") -> torch.Tensor:
        """The image tokens of ``p`` (what heads and UEMs read)."""
        return p.x

    def call(self, block, **kwargs):
        """One block; under the model's gradient checkpointing (training), recomputed in backward."""
        if self.tr.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, use_reentrant=False, **kwargs)
        return block(**kwargs)

    def refuse(self, call: dict, *names) -> None:
        given = [n for n in names if call.get(n) is not None]
        jak = call.get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in jak:
            given.append("joint_attention_kwargs['ip_adapter_image_embeds']")
        if given:
            raise ValueError(f"EarlyExit: {', '.join(given)} not supported (not carried per row when samples exit); "
                             "run the unwrapped transformer (EarlyExit(...).transformer) for ControlNet / IP-Adapter")


class PixArtTrunk(Trunk):
    """PixArt-alpha/Sigma: ``adaln_single`` conditioning, cross-attention blocks, table-modulated final layer."""

    def __init__(self, transformer, key_range: float = 1000):
        super().__init__(transformer)
        self.key_range = key_range  # the timestep's range (num_train_timesteps)

    def initial_table(self):
        return self.tr.scale_shift_table.detach().clone()

    def config(self):  # the keys of the heads shipped with the testbed (unchanged)
        tr = self.tr
        return {"model_class": type(tr).__name__, "num_layers": len(self.blocks()), "dim": tr.proj_out.in_features,
                "out_features": tr.proj_out.out_features, "num_train_timesteps": int(self.key_range)}

    def embed(self, call: dict) -> Pass:
        """PixArt's forward, step 1: tokens, block conditioning, caption tokens, masks as biases."""
        tr, hidden = self.tr, call["hidden_states"]
        added, mask, ctx_mask = call.get("added_cond_kwargs"), call.get("attention_mask"), call.get("encoder_attention_mask")
        if tr.use_additional_conditions and added is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        if mask is not None and mask.ndim == 2:
            mask = ((1 - mask.to(hidden.dtype)) * -10000.0).unsqueeze(1)
        if ctx_mask is not None and ctx_mask.ndim == 2:
            ctx_mask = ((1 - ctx_mask.to(hidden.dtype)) * -10000.0).unsqueeze(1)
        batch, size = hidden.shape[0], tuple(hidden.shape[-2:])
        tokens = tr.pos_embed(hidden)
        temb, embedded = tr.adaln_single(call["timestep"], added, batch_size=batch, hidden_dtype=tokens.dtype)
        ctx = call["encoder_hidden_states"]
        if tr.caption_projection is not None:
            ctx = tr.caption_projection(ctx).view(batch, -1, tokens.shape[-1])
        rows = {"key": _per_row(call["timestep"], batch, hidden.device), "temb": temb, "embedded": embedded,
                "ctx": ctx, "mask": mask, "ctx_mask": ctx_mask}
        return Pass(tokens, rows, {"cross_attention_kwargs": call.get("cross_attention_kwargs")}, size)

    def block(self, index, block, p: Pass) -> None:
        r = p.rows
        p.x = self.call(block, hidden_states=p.x, attention_mask=r["mask"], encoder_hidden_states=r["ctx"],
                        encoder_attention_mask=r["ctx_mask"], timestep=r["temb"],
                        cross_attention_kwargs=p.shared["cross_attention_kwargs"], class_labels=None)

    def _layer(self, tokens, embedded, table, proj, size):
        tr = self.tr
        shift, scale = (table[None] + embedded[:, None].to(table.device)).chunk(2, dim=1)
        hidden = tr.norm_out(tokens)
        hidden = hidden * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
        hidden = proj(hidden).squeeze(1)
        p = tr.config.patch_size
        return _unpatchify(hidden, size[0] // p, size[1] // p, p, tr.out_channels)

    def final(self, p: Pass):
        return self._layer(p.x, p.rows["embedded"], self.tr.scale_shift_table, self.tr.proj_out, p.size)

    def exit(self, head, x, rows, size):
        return self._layer(x, rows["embedded"], head.scale_shift_table, head.proj_out, size)

    def uem_inputs(self, x, rows):
        return self.tr.norm_out(x), rows["embedded"]


class FlowTrunk(Trunk):
    """Shared by Flux and SD3: ``temb`` conditions blocks and ``norm_out`` (AdaLayerNormContinuous)."""

    def final_tokens(self, p: Pass):
        return self.tr.proj_out(self.tr.norm_out(p.x, p.rows["temb"]))

    def exit_tokens(self, head, x, rows):
        """``norm_out`` with the head's offset on its (scale, shift), then the head's ``proj_out``."""
        norm = self.tr.norm_out
        emb = norm.linear(norm.silu(rows["temb"]).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        table = head.scale_shift_table.to(x.dtype)
        hidden = norm.norm(x) * (1 + scale + table[0])[:, None, :] + (shift + table[1])[:, None, :]
        return head.proj_out(hidden)

    def uem_inputs(self, x, rows):
        return self.tr.norm_out.norm(x), rows["temb"]


class FluxTrunk(FlowTrunk):
    """Flux.1: double-stream blocks (image and text streams), then single-stream blocks; RoPE ids."""

    def blocks(self):
        return [*self.tr.transformer_blocks, *self.tr.single_transformer_blocks]

    def config(self):
        return {**super().config(), "num_double_layers": len(self.tr.transformer_blocks)}

    def embed(self, call: dict) -> Pass:
        """Flux's forward up to the blocks (``timestep`` is sigma; the model embeds ``1000 sigma``)."""
        self.refuse(call, "controlnet_block_samples", "controlnet_single_block_samples")
        tr, hidden = self.tr, call["hidden_states"]
        batch, sigma = hidden.shape[0], call["timestep"]
        x = tr.x_embedder(hidden)
        timestep = sigma.to(x.dtype) * 1000
        guidance = call.get("guidance")
        if guidance is not None:
            guidance = guidance.to(x.dtype) * 1000
        pooled = call.get("pooled_projections")
        temb = tr.time_text_embed(timestep, pooled) if guidance is None else tr.time_text_embed(timestep, guidance, pooled)
        ctx = tr.context_embedder(call["encoder_hidden_states"])
        txt_ids, img_ids = call["txt_ids"], call["img_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids  # the model's deprecated batched ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = tr.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        rows = {"key": _per_row(sigma, batch, hidden.device), "temb": temb, "ctx": ctx}
        return Pass(x, rows, {"image_rotary_emb": rotary, "joint_attention_kwargs": call.get("joint_attention_kwargs")})

    def block(self, index, block, p: Pass) -> None:
        p.rows["ctx"], p.x = self.call(block, hidden_states=p.x, encoder_hidden_states=p.rows["ctx"], temb=p.rows["temb"],
                                       image_rotary_emb=p.shared["image_rotary_emb"],
                                       joint_attention_kwargs=p.shared["joint_attention_kwargs"])

    def final(self, p: Pass):
        return self.final_tokens(p)

    def exit(self, head, x, rows, size):
        return self.exit_tokens(head, x, rows)


class ChromaTrunk(FluxTrunk):
    """Chroma: Flux's blocks, modulated by per-block slices of one ``pooled_temb`` (no pooled text);
    the single-stream blocks run on ``[text, image]`` joined, the image tokens being the tail."""

    def embed(self, call: dict) -> Pass:
        """Chroma's forward up to the blocks (``timestep`` is sigma)."""
        self.refuse(call, "controlnet_block_samples", "controlnet_single_block_samples")
        tr, hidden = self.tr, call["hidden_states"]
        batch, sigma = hidden.shape[0], call["timestep"]
        x = tr.x_embedder(hidden)
        pooled_temb = tr.distilled_guidance_layer(tr.time_text_embed(sigma.to(x.dtype) * 1000))
        ctx = tr.context_embedder(call["encoder_hidden_states"])
        txt_ids, img_ids = call["txt_ids"], call["img_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = tr.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        rows = {"key": _per_row(sigma, batch, hidden.device), "temb": pooled_temb, "ctx": ctx,
                "mask": call.get("attention_mask")}
        return Pass(x, rows, {"image_rotary_emb": rotary, "joint_attention_kwargs": call.get("joint_attention_kwargs"),
                              "text": ctx.shape[1]})

    def block(self, index, block, p: Pass) -> None:
        tr, r, double = self.tr, p.rows, len(self.tr.transformer_blocks)
        common = dict(image_rotary_emb=p.shared["image_rotary_emb"], attention_mask=r["mask"],
                      joint_attention_kwargs=p.shared["joint_attention_kwargs"])
        if index < double:  # the model's slices of pooled_temb: image then text modulations of block `index`
            img = 3 * len(tr.single_transformer_blocks) + 6 * index
            txt = 3 * len(tr.single_transformer_blocks) + 6 * double + 6 * index
            temb = torch.cat((r["temb"][:, img : img + 6], r["temb"][:, txt : txt + 6]), dim=1)
            r["ctx"], p.x = self.call(block, hidden_states=p.x, encoder_hidden_states=r["ctx"], temb=temb, **common)
            return
        if index == double:  # the single-stream blocks run on [text, image] joined
            p.x, p.shared = torch.cat([r["ctx"], p.x], dim=1), {**p.shared, "joined": True}
        start = 3 * (index - double)
        p.x = self.call(block, hidden_states=p.x, temb=r["temb"][:, start : start + 3], **common)

    def image(self, p: Pass) -> torch.Tensor:
        return p.x[:, p.shared["text"]:] if p.shared.get("joined") else p.x

    def final(self, p: Pass):
        return self.tr.proj_out(self.tr.norm_out(self.image(p), p.rows["temb"][:, -2:]))

    def exit(self, head, x, rows, size):
        """``norm_out`` (shift, scale from ``pooled_temb``'s last two rows) with the head's offset, then ``proj_out``."""
        norm = self.tr.norm_out
        shift, scale = torch.chunk((rows["temb"][:, -2:] + head.scale_shift_table).flatten(1, 2).to(x.dtype), 2, dim=1)
        return head.proj_out(norm.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :])

    def uem_inputs(self, x, rows):  # the final norm's scale row: the model's own timestep vector of width D
        return self.tr.norm_out.norm(x), rows["temb"][:, -1]


class SD3Trunk(FlowTrunk):
    """SD3 / SD3.5: joint (MMDiT) blocks; ``timestep`` is sigma * 1000 (the scheduler's timesteps)."""

    def embed(self, call: dict) -> Pass:
        self.refuse(call, "block_controlnet_hidden_states")
        tr, hidden = self.tr, call["hidden_states"]
        batch, size = hidden.shape[0], tuple(hidden.shape[-2:])
        x = tr.pos_embed(hidden).contiguous()
        temb = tr.time_text_embed(call["timestep"], call.get("pooled_projections"))
        ctx = tr.context_embedder(call["encoder_hidden_states"])
        sigma = _per_row(call["timestep"], batch, hidden.device) / 1000  # flow.md 1: SD3 passes sigma * 1000
        return Pass(x, {"key": sigma, "temb": temb, "ctx": ctx},
                    {"joint_attention_kwargs": call.get("joint_attention_kwargs"),
                     "skip": set(call.get("skip_layers") or ())}, size)

    def block(self, index, block, p: Pass) -> None:
        if index in p.shared["skip"]:
            return
        p.rows["ctx"], p.x = self.call(block, hidden_states=p.x, encoder_hidden_states=p.rows["ctx"], temb=p.rows["temb"],
                                       joint_attention_kwargs=p.shared["joint_attention_kwargs"])

    def _out(self, tokens, size):
        patch = self.tr.config.patch_size
        return _unpatchify(tokens, size[0] // patch, size[1] // patch, patch, self.tr.out_channels)

    def final(self, p: Pass):
        return self._out(self.final_tokens(p), p.size)

    def exit(self, head, x, rows, size):
        return self._out(self.exit_tokens(head, x, rows), size)


TRUNKS = {"PixArtTransformer2DModel": PixArtTrunk, "FluxTransformer2DModel": FluxTrunk,
          "ChromaTransformer2DModel": ChromaTrunk, "SD3Transformer2DModel": SD3Trunk}
SUPPORTED = tuple(TRUNKS)


# -- heads and UEMs ----------------------------------------------------------------------------------------


class ExitHead(nn.Module):
    """``g_i``: an adaLN table (2, D) and a copy of the model's ``proj_out``."""

    def __init__(self, transformer, table: torch.Tensor):
        super().__init__()
        self.scale_shift_table = nn.Parameter(table.detach().clone())
        self.proj_out = nn.Linear(transformer.proj_out.in_features, transformer.proj_out.out_features)
        self.proj_out.load_state_dict(transformer.proj_out.state_dict())


class UEM(nn.Module):
    """Per-token uncertainty in (0, 1) from LN(tokens) and the conditioning vector; ``buckets`` weight
    sets indexed by the noise level ``key`` in [0, ``key_range``] (1 = one per layer)."""

    def __init__(self, dim: int, buckets: int = 1, key_range: float = 1000):
        super().__init__()
        self.buckets, self.key_range = buckets, key_range
        self.token = nn.Parameter(torch.zeros(buckets, dim))
        self.time = nn.Parameter(torch.zeros(buckets, dim))
        self.bias = nn.Parameter(torch.zeros(buckets))

    def forward(self, normed: torch.Tensor, vec: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(B, L, D), (B, D), (B,) -> per-token uncertainty (B, L)."""
        k = (key.float() * self.buckets / self.key_range).long().clamp(0, self.buckets - 1)
        logits = (normed * self.token[k][:, None].to(normed.dtype)).sum(-1)
        logits = logits + ((vec * self.time[k].to(vec.dtype)).sum(-1) + self.bias[k].to(vec.dtype))[:, None]
        return torch.sigmoid(logits)


def check_threshold(value, name: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{name}: must be a number in [0, 1] (0 = never exit, the full model); got {value!r}")
    return float(value)


class EarlyExit(nn.Module):
    """``EarlyExit(transformer, heads=PATH, threshold=TAU)``: stands in for ``transformer`` (same
    ``config``, ``dtype``, ``device``, ``forward`` arguments and output type; other attributes are the
    transformer's), e.g. ``pipe.transformer = EarlyExit(pipe.transformer, heads=..., threshold=0.1)``.

    ``heads``: a safetensors file written by :meth:`save_heads` (``diffplug finetune deediff``), or
    None for fresh heads copied from the final layer and untrained UEMs (for training)."""

    def __init__(self, transformer: nn.Module, heads: str | Path | None = None, threshold: float = 0.0,
                 uem_buckets: int = 1):
        super().__init__()
        kind = type(transformer).__name__
        if kind not in TRUNKS:
            raise TypeError(f"EarlyExit wraps {', '.join(SUPPORTED)} (PixArt-alpha/Sigma and the testbed DiT, "
                            f"Flux.1, Chroma, SD3/3.5); got {kind}")
        meta = read_heads_config(heads) if heads is not None else {"uem_buckets": uem_buckets}
        self.transformer = transformer
        trunk = PixArtTrunk(transformer, meta.get("num_train_timesteps", 1000)) if kind == "PixArtTransformer2DModel" \
            else TRUNKS[kind](transformer)
        object.__setattr__(self, "trunk", trunk)  # not a submodule: it holds the transformer, not weights
        self._signature = inspect.signature(transformer.forward)
        n, dim = len(trunk.blocks()), transformer.proj_out.in_features
        table = trunk.initial_table()
        self.heads = nn.ModuleList(ExitHead(transformer, table) for _ in range(n - 1))
        self.uems = nn.ModuleList(UEM(dim, int(meta["uem_buckets"]), trunk.key_range) for _ in range(n - 1))
        self.heads.to(transformer.device, transformer.dtype)
        self.uems.to(transformer.device, transformer.dtype)
        if heads is not None:
            self.load_heads(heads)
        self.threshold = threshold
        self.log_exits, self.exit_log = False, []
        self.reset_stats()

    # -- looking like the transformer -------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "transformer":
                raise
            return getattr(self._modules["transformer"], name)

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._threshold = check_threshold(value)

    @property
    def blocks(self) -> list:
        """Every block in the order they run (Flux: double-stream, then single-stream)."""
        return self.trunk.blocks()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    # -- heads I/O ------------------------------------------------------------------------------------
    def heads_config(self) -> dict:
        return {**self.trunk.config(), "uem_buckets": self.uems[0].buckets if len(self.uems) else 1}

    def heads_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("transformer.")}

    def save_heads(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Heads and UEMs only (not the backbone) as safetensors; their config in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.heads_state().items()}
        save_file(state, str(path), metadata={"diffplug_early_exit": json.dumps(self.heads_config())})
        return path

    def load_heads(self, path: str | Path) -> None:
        """Read ``path`` whole through the checked loader (config, keys, exact shapes, float dtypes,
        finite values), then copy: a bad file changes nothing."""
        from ..checked import Spec, UserFileError, read_safetensors

        meta, mine = read_heads_config(path), self.heads_config()
        wrong = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
        if wrong:
            raise UserFileError(path, "was trained for another model ("
                                + ", ".join(f"{k} {a} != {b}" for k, (a, b) in wrong.items()) + ")", what=HEADS_WHAT,
                                fix=f"train heads for this {mine['model_class']} with `diffplug finetune deediff`")
        own = self.heads_state()
        state = read_safetensors(path, {k: Spec(tuple(v.shape), FLOATS) for k, v in own.items()}, what=HEADS_WHAT)
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k]))

    @classmethod
    def from_testbed(cls, threshold: float = 0.0, weights: str | Path | None = None) -> "EarlyExit":
        """The testbed DiT with its shipped heads (``testbed/weights/dit_early_exit.safetensors``)."""
        from ..testbed.models import WEIGHTS_DIR, load_model

        folder = Path(weights) if weights is not None else WEIGHTS_DIR
        return cls(load_model("dit", folder), heads=folder / TESTBED_HEADS, threshold=threshold)

    # -- statistics ---------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._rows = 0
        self._exits = torch.zeros(self.num_blocks, dtype=torch.long)  # exits after block i (index i-1)
        self.exit_log = []

    def stats(self) -> dict:
        """Rows evaluated, blocks executed and exits per block since :meth:`reset_stats`."""
        exits = self._exits.tolist()
        blocks = sum((i + 1) * c for i, c in enumerate(exits))
        return {"rows": self._rows, "blocks_executed": blocks, "num_blocks": self.num_blocks,
                "mean_blocks": blocks / self._rows if self._rows else float("nan"), "exits_per_block": exits}

    def _record(self, key, exit_block: torch.Tensor | None, rows: int) -> None:
        self._rows += rows
        if exit_block is None:  # every row ran all blocks: counted without reading the device
            self._exits[-1] += rows
            exit_block = torch.full((rows,), self.num_blocks, dtype=torch.long)
        else:
            self._exits += torch.bincount(exit_block.cpu() - 1, minlength=self.num_blocks)
        if self.log_exits:
            self.exit_log.append((key.detach().float().cpu(), exit_block.cpu()))

    # -- the forward ------------------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The wrapped model's forward arguments by name (positional ones as the model names them)."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"EarlyExit({type(self.transformer).__name__}): {e}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def embed(self, *args, **kwargs) -> Pass:
        """The model's input stage on its forward arguments -> the :class:`Pass` before block 1."""
        return self.trunk.embed(self.bind(args, kwargs))

    def head(self, i: int, p: Pass) -> torch.Tensor:
        """``g_i`` on the tokens of ``p`` after block ``i`` (1-based); ``i = N`` is the model's own final layer."""
        if i == self.num_blocks:
            return self.trunk.final(p)
        return self.trunk.exit(self.heads[i - 1], self.trunk.image(p), p.rows, p.size)

    def uncertainty(self, i: int, p: Pass) -> torch.Tensor:
        """Per-token ``u_i`` (B, L) on the tokens of ``p`` after block ``i`` (1-based, < N)."""
        normed, vec = self.trunk.uem_inputs(self.trunk.image(p), p.rows)
        return self.uems[i - 1](normed, vec, p.rows["key"])

    def all_exits(self, *args, **kwargs):
        """Training view, no exits: every block's head output ``[g_1 .. g_N]`` (``g_N`` the model's own)
        and every UEM's per-token uncertainty ``[u_1 .. u_{N-1}]`` (B, L)."""
        call = self.bind(args, kwargs)
        p = self.trunk.embed(call)
        preds, uncertainties = [], []
        for i, block in enumerate(self.blocks, start=1):
            self.trunk.block(i - 1, block, p)
            preds.append(self.head(i, p))
            if i < self.num_blocks:
                uncertainties.append(self.uncertainty(i, p))
        return preds, uncertainties

    def forward(self, *args, return_all_exits: bool = False, **kwargs):
        """As the wrapped model's ``forward``; rows exit at the first block with ``u < threshold``.
        ``return_all_exits``: :meth:`all_exits` instead (training, through a DDP wrapper)."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if return_all_exits:
            return self.all_exits(*args, **kwargs)
        call = self.bind(args, kwargs)
        return_dict = call.pop("return_dict", True)
        p = self.trunk.embed(call)
        batch, key = p.x.shape[0], p.rows["key"]
        n, tau = self.num_blocks, self._threshold
        out = exit_block = None
        active = None  # row indices still running; None = all rows (no gather while nobody exited)
        for i, block in enumerate(self.blocks, start=1):
            self.trunk.block(i - 1, block, p)
            if i == n or tau <= 0:
                continue
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("EarlyExit decides per sample on the host; it cannot run inside a CUDA graph")
            done = self.uncertainty(i, p).mean(dim=1) < tau
            if not bool(done.any()):
                continue
            rows = torch.arange(batch, device=p.x.device) if active is None else active
            exited = self.trunk.exit(self.heads[i - 1], self.trunk.image(p)[done], {k: None if v is None else v[done]
                                                                    for k, v in p.rows.items()}, p.size)
            if out is None:
                out = exited.new_empty((batch, *exited.shape[1:]))
                exit_block = torch.full((batch,), n, dtype=torch.long, device=p.x.device)
            out[rows[done]] = exited
            exit_block[rows[done]] = i
            active, p = rows[~done], p.select(~done)
            if active.numel() == 0:
                break
        if active is None:  # nobody exited: the model's own final layer on the whole batch
            out = self.trunk.final(p)
        elif active.numel():
            out[active] = self.trunk.final(p).to(out.dtype)
        self._record(key, exit_block, batch)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def read_heads_config(path: str | Path) -> dict:
    """The config stored in a heads file's safetensors metadata (header checked: missing, truncated,
    huge or malformed files are a :class:`~diffplug.checked.UserFileError` naming the file)."""
    from ..checked import UserFileError, read_metadata

    raw = read_metadata(path, what=HEADS_WHAT).get("diffplug_early_exit")
    if raw is None:
        raise UserFileError(path, "is not an early-exit heads file (no diffplug_early_exit metadata)", what=HEADS_WHAT,
                            fix="train heads with `diffplug finetune deediff --output_dir D` and pass D/final/early_exit.safetensors")
    try:
        meta = json.loads(raw)
        buckets = meta["uem_buckets"]
        if not isinstance(buckets, int) or isinstance(buckets, bool) or not 1 <= buckets <= 1000:
            raise ValueError(f"uem_buckets {buckets!r} is not an integer in 1..1000")
        steps = meta.get("num_train_timesteps", 1000)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"num_train_timesteps {steps!r} is not a positive integer")
    except (ValueError, KeyError, TypeError) as e:
        raise UserFileError(path, f"has a damaged diffplug_early_exit config ({type(e).__name__}: {e})", what=HEADS_WHAT) from None
    return meta


def attach(pipe, threshold: float, heads: str | Path | None = None) -> EarlyExit:
    """``pipe.transformer = EarlyExit(pipe.transformer, heads, threshold)`` (the CLI's ``--early-exit``).
    ``heads=None``: the testbed DiT's shipped heads, when ``pipe`` runs the testbed DiT. The pipeline
    is changed only once the heads file passed every check."""
    from ..checked import UserFileError

    threshold = check_threshold(threshold, "--early-exit")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"--early-exit: {type(pipe).__name__} has no transformer; early exit needs a transformer "
                         f"denoiser ({', '.join(SUPPORTED)}), e.g. --model testbed-dit")
    if isinstance(transformer, EarlyExit):
        transformer.threshold = threshold
        return transformer
    shipped = heads is None
    if shipped:
        from ..testbed.models import WEIGHTS_DIR

        heads = WEIGHTS_DIR / TESTBED_HEADS
    try:
        wrapped = EarlyExit(transformer, heads=heads, threshold=threshold)
    except UserFileError as err:
        if shipped and "another model" in err.problem:
            raise ValueError(f"--early-exit: no --early-exit-heads given, and the shipped heads are the testbed DiT's; "
                             f"train heads for this {type(transformer).__name__} with `diffplug finetune deediff "
                             "--model ...` and pass D/final/early_exit.safetensors with --early-exit-heads") from None
        raise  # names the file, what it should be and the fix
    except (TypeError, ValueError) as err:
        raise ValueError(f"--early-exit: {err}; train heads for this model with `diffplug finetune deediff` "
                         "and pass them with --early-exit-heads") from None
    pipe.transformer = wrapped
    return wrapped
