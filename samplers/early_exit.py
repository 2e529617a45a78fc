"""DeeDiff early exit (Tang et al., arXiv:2309.17074; AdaDiff, ECCV 2024): a transformer denoiser
that stops at the first block whose estimated uncertainty is below a threshold.

After every block ``i < N`` (hidden tokens ``L_i``) the wrapper owns

* an output head ``g_i``: a copy of the model's final layer (adaLN shift/scale table, the model's own
  parameter-free ``norm_out``, a linear to patch pixels, unpatchify), initialised from it;
* a UEM ``u_i = mean_tokens sigmoid(w_t . LN(L_i) + v_t . emb(t) + b_t)``: the paper's linear layer on
  ``[L_i, emb(t)]`` per token, ``emb(t)`` the model's own timestep embedding (``adaln_single``),
  ``LN`` the head's ``norm_out``. The exit decision needs one scalar per sample: the mean over tokens.
  ``uem_buckets`` sets of ``(w, v, b)`` per layer, indexed by timestep: 1 (default) = one UEM per
  layer, 1000 = the paper's literal per-timestep UEMs.

``forward`` runs block after block; after block ``i`` the rows with ``u_i < threshold`` return
``g_i(L_i)`` and leave the batch: later blocks run on the rows still active only, so an exited
sample really stops consuming compute (cond and uncond rows of CFG decide separately). The last
block always uses the model's own head. ``threshold = 0`` never exits and skips the UEMs: the output
is the wrapped model's, bit for bit.

Supported: ``PixArtTransformer2DModel`` (PixArt-alpha/Sigma, the testbed DiT). The wrapper reuses
the model's modules (``pos_embed``, ``adaln_single``, ``caption_projection``, ``transformer_blocks``,
``norm_out``, ``scale_shift_table``, ``proj_out``) and copies none of its code paths beyond the
final layer's few lines. DiT (class-conditional) and SD3 (joint blocks) are not supported yet.

Statistics: ``stats()`` -> rows evaluated, blocks executed, exits per block, since ``reset_stats()``.
With ``log_exits = True`` each call also appends ``(timesteps, exit block per row)`` to ``exit_log``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

SUPPORTED = ("PixArtTransformer2DModel",)
TESTBED_HEADS = "dit_early_exit.safetensors"


def _final_layer(tokens, embedded_timestep, scale_shift_table, norm_out, proj_out, height, width, patch, channels):
    """PixArt's output layer, in the model's own op order (so the last head is bit-identical)."""
    shift, scale = (scale_shift_table[None] + embedded_timestep[:, None].to(scale_shift_table.device)).chunk(2, dim=1)
    hidden = norm_out(tokens)
    hidden = hidden * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
    hidden = proj_out(hidden).squeeze(1)
    hidden = hidden.reshape(shape=(-1, height, width, patch, patch, channels))
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(shape=(-1, channels, height * patch, width * patch))


class ExitHead(nn.Module):
    """``g_i``: the final layer's adaLN table and linear, copied from the model's."""

    def __init__(self, transformer):
        super().__init__()
        self.scale_shift_table = nn.Parameter(transformer.scale_shift_table.detach().clone())
        self.proj_out = nn.Linear(transformer.proj_out.in_features, transformer.proj_out.out_features)
        self.proj_out.load_state_dict(transformer.proj_out.state_dict())


class UEM(nn.Module):
    """Per-token uncertainty in (0, 1) from LN(tokens) and the timestep embedding; ``buckets`` weight
    sets indexed by timestep (1 = one per layer)."""

    def __init__(self, dim: int, buckets: int = 1, num_train_timesteps: int = 1000):
        super().__init__()
        self.buckets, self.num_train_timesteps = buckets, num_train_timesteps
        self.token = nn.Parameter(torch.zeros(buckets, dim))
        self.time = nn.Parameter(torch.zeros(buckets, dim))
        self.bias = nn.Parameter(torch.zeros(buckets))

    def forward(self, normed: torch.Tensor, temb: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """(B, L, D), (B, D), (B,) -> per-token uncertainty (B, L)."""
        k = (timestep.float() * self.buckets / self.num_train_timesteps).long().clamp(0, self.buckets - 1)
        logits = (normed * self.token[k][:, None].to(normed.dtype)).sum(-1)
        logits = logits + ((temb * self.time[k].to(temb.dtype)).sum(-1) + self.bias[k].to(temb.dtype))[:, None]
        return torch.sigmoid(logits)


def check_threshold(value, name: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{name}: must be a number in [0, 1] (0 = never exit, the full model); got {value!r}")
    return float(value)


class EarlyExit(nn.Module):
    """``EarlyExit(transformer, heads=PATH, threshold=TAU)``: stands in for ``transformer`` (same
    ``config``, ``dtype``, ``device``, ``forward`` signature and output type; other attributes are the
    transformer's), e.g. ``pipe.transformer = EarlyExit(pipe.transformer, heads=..., threshold=0.1)``.

    ``heads``: a safetensors file written by :meth:`save_heads` (``diffplug finetune deediff``), or
    None for fresh heads copied from the final layer and untrained UEMs (for training)."""

    def __init__(self, transformer: nn.Module, heads: str | Path | None = None, threshold: float = 0.0,
                 uem_buckets: int = 1):
        super().__init__()
        if type(transformer).__name__ not in SUPPORTED:
            raise TypeError(f"EarlyExit wraps {', '.join(SUPPORTED)} (PixArt-alpha/Sigma, the testbed DiT); "
                            f"got {type(transformer).__name__}")
        self.transformer = transformer
        meta = read_heads_config(heads) if heads is not None else {"uem_buckets": uem_buckets}
        n, dim = len(transformer.transformer_blocks), transformer.proj_out.in_features
        steps = int(meta.get("num_train_timesteps", 1000))
        self.heads = nn.ModuleList(ExitHead(transformer) for _ in range(n - 1))
        self.uems = nn.ModuleList(UEM(dim, int(meta["uem_buckets"]), steps) for _ in range(n - 1))
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
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    # -- heads I/O ------------------------------------------------------------------------------------
    def heads_config(self) -> dict:
        tr = self.transformer
        return {"model_class": type(tr).__name__, "num_layers": self.num_blocks, "dim": tr.proj_out.in_features,
                "out_features": tr.proj_out.out_features, "uem_buckets": self.uems[0].buckets if len(self.uems) else 1,
                "num_train_timesteps": self.uems[0].num_train_timesteps if len(self.uems) else 1000}

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
        from safetensors.torch import load_file

        meta, mine = read_heads_config(path), self.heads_config()
        wrong = {k: (meta.get(k), v) for k, v in mine.items() if k != "uem_buckets" and meta.get(k) != v}
        if wrong:
            raise ValueError(f"heads: {path} was trained for another model ({', '.join(f'{k} {a} != {b}' for k, (a, b) in wrong.items())})")
        state = load_file(str(path))
        missing = set(self.heads_state()) - set(state)
        if missing or set(state) - set(self.heads_state()):
            raise ValueError(f"heads: {path} does not hold this model's heads and UEMs (missing {sorted(missing)[:3]})")
        own = self.heads_state()
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

    def _record(self, timestep, exit_block: torch.Tensor | None, rows: int) -> None:
        self._rows += rows
        if exit_block is None:  # every row ran all blocks: counted without reading the device
            self._exits[-1] += rows
            exit_block = torch.full((rows,), self.num_blocks, dtype=torch.long)
        else:
            self._exits += torch.bincount(exit_block.cpu() - 1, minlength=self.num_blocks)
        if self.log_exits:
            self.exit_log.append((timestep.detach().float().cpu(), exit_block.cpu()))

    # -- the forward ------------------------------------------------------------------------------------
    def embed(self, hidden_states, encoder_hidden_states, timestep, added_cond_kwargs=None,
              attention_mask=None, encoder_attention_mask=None):
        """The model's input stage: tokens, block conditioning and caption tokens (PixArt's forward, step 1)."""
        tr = self.transformer
        if tr.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        if attention_mask is not None and attention_mask.ndim == 2:  # masks -> biases, as the model does
            attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        batch = hidden_states.shape[0]
        tokens = tr.pos_embed(hidden_states)
        temb, embedded = tr.adaln_single(timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=tokens.dtype)
        if tr.caption_projection is not None:
            encoder_hidden_states = tr.caption_projection(encoder_hidden_states).view(batch, -1, tokens.shape[-1])
        return tokens, temb, embedded, encoder_hidden_states, attention_mask, encoder_attention_mask

    def head(self, i: int, tokens, embedded, size) -> torch.Tensor:
        """``g_i`` for block ``i`` (1-based); ``i = N`` is the model's own final layer."""
        tr = self.transformer
        table, proj = (tr.scale_shift_table, tr.proj_out) if i == self.num_blocks else (
            self.heads[i - 1].scale_shift_table, self.heads[i - 1].proj_out)
        p = tr.config.patch_size
        return _final_layer(tokens, embedded, table, tr.norm_out, proj, size[0] // p, size[1] // p, p, tr.out_channels)

    def uncertainty(self, i: int, tokens, embedded, timestep) -> torch.Tensor:
        """Per-token ``u_i`` (B, L) after block ``i`` (1-based, < N)."""
        return self.uems[i - 1](self.transformer.norm_out(tokens), embedded, timestep)

    def all_exits(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None,
                  added_cond_kwargs=None):
        """Training view, no exits: every block's head output ``[g_1 .. g_N]`` (``g_N`` the model's own)
        and every UEM's per-token uncertainty ``[u_1 .. u_{N-1}]`` (B, L)."""
        batch, size = hidden_states.shape[0], hidden_states.shape[-2:]
        t_rows = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)
        x, temb, emb, ctx, mask, ctx_mask = self.embed(
            hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, None, encoder_attention_mask)
        preds, uncertainties = [], []
        for i, block in enumerate(self.transformer.transformer_blocks, start=1):
            x = block(x, attention_mask=mask, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask,
                      timestep=temb, class_labels=None)
            preds.append(self.head(i, x, emb, size))
            if i < self.num_blocks:
                uncertainties.append(self.uncertainty(i, x, emb, t_rows))
        return preds, uncertainties

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        return_all_exits: bool = False,
    ):
        """As ``PixArtTransformer2DModel.forward``; rows exit at the first block with ``u < threshold``.
        ``return_all_exits``: :meth:`all_exits` instead (training, through a DDP wrapper)."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if return_all_exits:
            return self.all_exits(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, added_cond_kwargs)

        batch, size = hidden_states.shape[0], hidden_states.shape[-2:]
        t_rows = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)
        x, temb, emb, ctx, mask, ctx_mask = self.embed(
            hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, attention_mask, encoder_attention_mask)
        n, tau = self.num_blocks, self._threshold
        out = exit_block = None
        active = None  # row indices still running; None = all rows (no gather while nobody exited)
        for i, block in enumerate(self.transformer.transformer_blocks, start=1):
            x = block(x, attention_mask=mask, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask,
                      timestep=temb, cross_attention_kwargs=cross_attention_kwargs, class_labels=None)
            if i == n or tau <= 0:
                continue
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("EarlyExit decides per sample on the host; it cannot run inside a CUDA graph")
            t_now, emb_now = (t_rows, emb) if active is None else (t_rows[active], emb[active])
            done = self.uncertainty(i, x, emb_now, t_now).mean(dim=1) < tau
            if not bool(done.any()):
                continue
            rows = torch.arange(batch, device=x.device) if active is None else active
            if out is None:
                out = hidden_states.new_empty((batch, self.transformer.out_channels, *size))
                exit_block = torch.full((batch,), n, dtype=torch.long, device=x.device)
            out[rows[done]] = self.head(i, x[done], emb[rows[done]], size).to(out.dtype)
            exit_block[rows[done]] = i
            keep = ~done
            active, x = rows[keep], x[keep]
            temb, ctx = temb[keep], ctx[keep]
            mask = None if mask is None else mask[keep]
            ctx_mask = None if ctx_mask is None else ctx_mask[keep]
            if active.numel() == 0:
                break
        if active is None:  # nobody exited: the model's own final layer on the whole batch
            out = self.head(n, x, emb, size)
        elif active.numel():
            out[active] = self.head(n, x, emb[active], size).to(out.dtype)
        self._record(t_rows, exit_block, batch)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def read_heads_config(path: str | Path) -> dict:
    """The config stored in a heads file's safetensors metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"heads: {path} does not exist; train heads with: diffplug finetune deediff --output_dir D")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("diffplug_early_exit")
    if meta is None:
        raise ValueError(f"heads: {path} is not an early-exit heads file (no diffplug_early_exit metadata)")
    return json.loads(meta)


def attach(pipe, threshold: float, heads: str | Path | None = None) -> EarlyExit:
    """``pipe.transformer = EarlyExit(pipe.transformer, heads, threshold)`` (the CLI's ``--early-exit``).
    ``heads=None``: the testbed DiT's shipped heads, when ``pipe`` runs the testbed DiT."""
    threshold = check_threshold(threshold, "--early-exit")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"--early-exit: {type(pipe).__name__} has no transformer; early exit needs a transformer "
                         f"denoiser ({', '.join(SUPPORTED)}), e.g. --model testbed-dit")
    if isinstance(transformer, EarlyExit):
        transformer.threshold = threshold
        return transformer
    if heads is None:
        from ..testbed.models import WEIGHTS_DIR

        heads = WEIGHTS_DIR / TESTBED_HEADS
    try:
        pipe.transformer = EarlyExit(transformer, heads=heads, threshold=threshold)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--early-exit: {err}; train heads for this model with `diffplug finetune deediff` "
                         "and pass them with --early-exit-heads") from None
    return pipe.transformer
