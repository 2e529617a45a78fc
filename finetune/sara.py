"""SaRA: progressive Sparse low-Rank Adaptation (Hu et al., ICLR 2025, arXiv:2409.06633).

The smallest-magnitude entries of a pre-trained denoiser are retrained; everything else stays
frozen, bit for bit. For people with their own loop::

    params = sara.prepare(unet, fraction=0.1)            # or threshold=2e-3 (the official code's)
    opt = torch.optim.AdamW(params, lr=5e-4)
    loss = mse + sara.rank_penalty(unet, step)           # the paper's nuclear-norm term
    sara.save(unet, "out")                               # (indices, values) + threshold + base hash
    sara.load(base_unet, "out"); sara.merge(unet).save_pretrained("dense")

How (the paper's "unstructured backpropagation"): each selected tensor ``W`` gets a 1-D trainable
``delta`` (its selected entries) and int32 flat indices. ``W``'s own storage holds the effective
weight (``delta`` is written into it whenever ``delta`` changed), and a forward pre-hook hands the
module ``_Scatter(W, delta)``: an alias of ``W`` whose backward gathers the gradient at the indices.
So no dense copy of the effective weight exists, and gradients, optimizer state and saved tensors
exist for the selected entries only. ``delta`` is registered on the module as ``sara_<name>`` (so
DDP and ``unet.parameters()`` see it) but left out of ``state_dict``: the keys stay diffusers'.

Differences from the official ``optim/adamw.py`` (see /work/shared/methods/sara.md): the rank
penalty acts on the trained entries (it is a no-op there), signs are never flipped, selection can
be given as a fraction, and a checkpoint holds the indices so a re-selected run resumes exactly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

FILE = "sara.safetensors"
FORMAT = "diffplug-sara/1"
DEFAULT_FRACTION = 0.1  # the paper: 10-20 % of SD's entries can be zeroed without visible effect
LAMBDA_RANK = 5e-4  # the official examples' lambda_rank
RANK_MIN_DIM = 64  # the official code penalises one 2-D weight with min(shape) > 64 per step


class SaRAError(ValueError):
    """A bad SaRA argument or adapter file; the message names it and the fix."""


class _Scatter(torch.autograd.Function):
    """``W`` with ``delta`` at ``index`` (already written into ``W``'s storage): returns an alias of
    ``W``; the backward sends ``grad[index]`` to ``delta`` and saves nothing but ``index``."""

    @staticmethod
    def forward(ctx, weight, delta, index):
        ctx.save_for_backward(index)
        ctx.delta_dtype = delta.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return None, grad.reshape(-1).index_select(0, index).to(ctx.delta_dtype), None


class _Slot:
    """One selected tensor: ``module.<attr>`` (frozen), the entries ever selected (``index``, their
    ``base`` values) and those trained now (``active`` with values ``delta``)."""

    def __init__(self, name: str, module: nn.Module, attr: str, index: torch.Tensor):
        self.name, self.module, self.attr = name, module, attr
        weight = getattr(module, attr)
        self.weight = weight
        self.index = index
        self.base = weight.detach().reshape(-1)[index].clone()
        self.active = index
        self.delta = nn.Parameter(self.base.float().clone())
        module.register_parameter(f"sara_{attr}", self.delta)
        self._synced = None

    def sync(self) -> None:
        """Write ``delta`` into ``W`` if it changed since the last write (optimizer step, EMA, load)."""
        key = (self.delta._version, self.delta.data_ptr(), self.delta.numel())
        if key != self._synced:
            with torch.no_grad():
                self.weight.view(-1)[self.active] = self.delta.detach().to(self.weight.dtype)
            self._synced = key

    def values(self) -> torch.Tensor:
        """float32 values at ``index`` (the trained ones from ``delta``)."""
        self.sync()
        return self.weight.detach().reshape(-1)[self.index].float()


def _kind(module: nn.Module, attr: str) -> str:
    return f"{type(module).__name__}.{attr}"


def _candidates(model: nn.Module, exclude) -> list[tuple[str, nn.Module, str]]:
    out = []
    for mname, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{mname}.{attr}" if mname else attr
            if attr.startswith("sara_") or not p.is_floating_point():
                continue
            if any(fnmatch.fnmatch(name, pat) or pat in name for pat in exclude):
                continue
            out.append((name, module, attr))
    return out


def threshold_for_fraction(tensors, fraction: float) -> float:
    """The smallest ``tau`` with ``|x| < tau`` for at least ``fraction`` of all entries: exact, in two
    passes (a histogram over the top 16 bits of float32 ``|x|``, then the k-th value in one bin)."""
    total = sum(t.numel() for t in tensors)
    k = max(1, math.ceil(fraction * total))
    counts = torch.zeros(1 << 15, dtype=torch.long)
    for t in tensors:
        bits = t.detach().float().abs().reshape(-1).view(torch.int32) >> 16
        counts += torch.bincount(bits.cpu(), minlength=1 << 15)
    b = int(torch.searchsorted(counts.cumsum(0), torch.tensor(k)))
    below = int(counts[:b].sum())
    inside = torch.cat([a[(a.view(torch.int32) >> 16) == b] for a in (t.detach().float().abs().reshape(-1).cpu() for t in tensors)])
    kth = float(inside.kthvalue(k - below).values)
    return float(torch.nextafter(torch.tensor(kth), torch.tensor(math.inf)))


def base_hash(model: nn.Module) -> str:
    """sha256 of the model's parameters (names, shapes, float32 values); SaRA deltas excluded."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.rsplit(".", 1)[-1].startswith("sara_"):
            continue
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class SaRA:
    """The adapter of one model (``model._sara``); made by :func:`prepare`."""

    def __init__(self, model: nn.Module, threshold: float | None, fraction: float | None, exclude=()):
        if threshold is not None and fraction is not None:
            raise SaRAError("pass one of threshold= (absolute |w|) or fraction= (of all entries), not both")
        if threshold is None and fraction is None:
            fraction = DEFAULT_FRACTION
        if fraction is not None and not 0 < fraction < 1:
            raise SaRAError(f"fraction={fraction}: must be in (0, 1) (the paper trains 0.1-0.2)")
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
            raise SaRAError(f"threshold={threshold}: must be a finite number > 0 (the official code uses 2e-3)")
        cands = _candidates(model, list(exclude))
        if not cands:
            raise SaRAError("exclude: leaves no parameter to select from; name fewer patterns")
        for name, module, attr in cands:
            if not getattr(module, attr).is_contiguous():
                raise SaRAError(f"{name} is not contiguous; call model.to(memory_format=torch.contiguous_format) first")
        self.base_sha256 = base_hash(model)
        tensors = [getattr(m, a) for _, m, a in cands]
        self.threshold = threshold if threshold is not None else threshold_for_fraction(tensors, fraction)
        self.slots: list[_Slot] = []
        self.kinds: dict[str, list[int]] = {}  # kind -> [selected, total]
        for name, module, attr in cands:
            w = getattr(module, attr)
            index = torch.nonzero(w.detach().reshape(-1).abs() < self.threshold).flatten().to(torch.int32)
            k = self.kinds.setdefault(_kind(module, attr), [0, 0])
            k[0], k[1] = k[0] + index.numel(), k[1] + w.numel()
            if index.numel():
                w.requires_grad_(False)
                self.slots.append(_Slot(name, module, attr, index))
        for _, module, attr in cands:  # unselected tensors are frozen too
            getattr(module, attr).requires_grad_(False)
        self.disabled_ = False
        self._hooks = []
        for module in {id(s.module): s.module for s in self.slots}.values():
            mine = [s for s in self.slots if s.module is module]
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook(mine)))
            self._hooks.append(module.register_forward_hook(self._post_hook(mine), always_call=True))
            self._hooks.append(module.register_state_dict_post_hook(_drop_sara_keys))
        self._hooks.append(model.register_load_state_dict_post_hook(_ignore_sara_keys))

    # -- the forward --------------------------------------------------------------------------------
    def _pre_hook(self, slots):
        def hook(module, args):
            for s in slots:
                if self.disabled_:  # the base model: a dense copy, under no_grad in practice
                    w = s.weight.detach()
                    eff = w.reshape(-1).index_put((s.index,), s.base.to(w.dtype)).view_as(w)
                else:
                    s.sync()
                    eff = _Scatter.apply(s.weight, s.delta, s.active)
                module._parameters[s.attr] = eff

        return hook

    def _post_hook(self, slots):
        def hook(module, args, output):
            for s in slots:
                module._parameters[s.attr] = s.weight

        return hook

    @contextlib.contextmanager
    def disabled(self):
        """Inside: the model computes with its base weights (the reference of DPO/SPO)."""
        self.disabled_ = True
        try:
            yield
        finally:
            self.disabled_ = False

    # -- what is trained ------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [s.delta for s in self.slots]

    def num_trainable(self) -> int:
        return sum(s.active.numel() for s in self.slots)

    def report(self) -> dict:
        """``{"threshold", "fraction", "trainable", "total", "kinds": {kind: fraction}}``."""
        sel, tot = sum(v[0] for v in self.kinds.values()), sum(v[1] for v in self.kinds.values())
        return {"threshold": self.threshold, "fraction": sel / tot, "trainable": self.num_trainable(), "total": tot,
                "kinds": {k: v[0] / v[1] for k, v in sorted(self.kinds.items())}}

    def describe(self) -> str:
        r = self.report()
        kinds = ", ".join(f"{k} {100 * f:.1f}%" for k, f in r["kinds"].items())
        return f"threshold {r['threshold']:.4g} selects {100 * r['fraction']:.2f}% of {r['total']:,} entries ({kinds})"

    # -- the paper's two extras ----------------------------------------------------------------------------
    def rank_penalty(self, weight: float = LAMBDA_RANK, min_dim: int = RANK_MIN_DIM,
                     generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``weight * ||W (.) M||_*`` of one random 2-D weight with ``min(shape) > min_dim`` (the official
        choice), as a function of its trained entries; None when no weight qualifies."""
        eligible = [s for s in self.slots if s.weight.dim() == 2 and min(s.weight.shape) > min_dim and s.active.numel()]
        if not eligible or weight == 0:
            return None
        s = eligible[int(torch.randint(len(eligible), (), generator=generator))]
        sparse = torch.zeros(s.weight.numel(), device=s.delta.device, dtype=s.delta.dtype).index_put((s.active,), s.delta)
        return weight * torch.linalg.matrix_norm(sparse.view(s.weight.shape), ord="nuc")

    def _resize(self, s: _Slot, active: torch.Tensor, values: torch.Tensor, optimizer) -> tuple:
        """A new delta Parameter for a new ``active`` set (autograd caches a leaf's shape, so a
        Parameter is never resized in place); ``optimizer`` is pointed at it, its old state dropped."""
        old = s.delta
        s.active, s.delta, s._synced = active, nn.Parameter(values.detach().clone()), None
        s.module._parameters[f"sara_{s.attr}"] = s.delta
        if optimizer is not None:
            optimizer.state.pop(old, None)
            for group in optimizer.param_groups:
                group["params"] = [s.delta if p is old else p for p in group["params"]]
        return old, s.delta

    @torch.no_grad()
    def reselect(self, optimizer: torch.optim.Optimizer | None = None) -> list[tuple]:
        """Progressive adjustment: entries still ``|w| < threshold`` keep training, the others freeze
        at their values; ``optimizer`` gets the new deltas with fresh state. Returns ``(old delta,
        new delta, keep mask)`` per tensor (e.g. to shrink an EMA)."""
        out = []
        for s in self.slots:
            s.sync()
            keep = s.delta.abs() < self.threshold
            out.append((*self._resize(s, s.active[keep.to(s.active.device)], s.delta[keep], optimizer), keep))
        return out

    # -- files ------------------------------------------------------------------------------------------
    def tensors(self, layout: bool = False) -> dict:
        out = {}
        for s in self.slots:
            out[f"{s.name}.index"] = s.index.cpu().contiguous()
            out[f"{s.name}.values"] = s.values().cpu().contiguous()
            if layout:
                out[f"{s.name}.active"] = s.active.cpu().clone()  # may be `index` itself
        return out

    def metadata(self) -> dict:
        return {"format": FORMAT, "threshold": repr(self.threshold), "base_sha256": self.base_sha256,
                "report": json.dumps(self.report())}

    def save(self, folder: str | Path, layout: bool = False) -> Path:
        """``folder/sara.safetensors``: per tensor ``<name>.index`` (int32 flat) and ``<name>.values``
        (float32), plus ``<name>.active`` with ``layout`` (a checkpoint); threshold and base hash in
        the metadata."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(layout), str(folder / FILE), metadata=self.metadata())
        return folder / FILE

    @torch.no_grad()
    def load_layout(self, path: str | Path, optimizer=None) -> list[tuple]:
        """Resume: restore values and the trained subset from a checkpoint's ``sara.safetensors``
        (read whole and checked before anything changes) -> ``(old delta, new delta)`` pairs."""
        from ..checked import UserFileError

        sizes = {s.name: s.weight.numel() for s in self.slots}
        tensors, meta = _read(path, sizes, layout=True, exact=True)  # everything checked before anything changes
        if meta.get("base_sha256") != self.base_sha256:
            raise UserFileError(_file(path), "written for another base model (base_sha256 differs)", what=WHAT,
                                fix="resume with the base model the run started from")
        for s in self.slots:
            if not torch.equal(tensors[f"{s.name}.index"], s.index.cpu()):
                raise UserFileError(_file(path), f"{s.name} was selected differently", what=WHAT,
                                    fix="resume with the run's own SaRA settings (sara_threshold / sara_fraction)")
        pairs = []
        for s in self.slots:
            dev, values, active = s.weight.device, tensors[f"{s.name}.values"], tensors[f"{s.name}.active"]
            s.weight.view(-1)[s.index] = values.to(dev, s.weight.dtype)
            pos = torch.searchsorted(s.index.cpu().long(), active.long())
            pairs.append(self._resize(s, active.to(dev), values[pos].to(dev, s.delta.dtype), optimizer))
        return pairs

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for s in self.slots:
            s.sync()
            s.module._parameters[s.attr] = s.weight
            del s.module._parameters[f"sara_{s.attr}"]


def _drop_sara_keys(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.rsplit(".", 1)[-1].startswith("sara_")]:
        del state_dict[k]


def _ignore_sara_keys(module, incompatible):
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.rsplit(".", 1)[-1].startswith("sara_")]


WHAT = f"a SaRA adapter ({FILE} written by sara.save or diffplug finetune --adapter sara)"
FIX = "save it again (sara.save or diffplug finetune --adapter sara), or pass the folder that holds the right file"


def _file(path: str | Path) -> Path:
    path = Path(path)
    return path / FILE if path.is_dir() else path


def _read(path: str | Path, sizes: dict[str, int], *, layout: bool, exact: bool) -> tuple[dict, dict]:
    """A SaRA file read whole and checked (``diffplug.checked``) before anything is applied: format,
    ``<name>.index`` (int32, sorted, in [0, numel)) and ``<name>.values`` (float32, finite, as many)
    for parameters of ``sizes`` (name -> numel), ``<name>.active`` (a subset of the index) with
    ``layout``; ``exact``: every name of ``sizes`` present."""
    from ..checked import Spec, UserFileError, read_header, read_safetensors

    path = _file(path)
    entries, meta = read_header(path, what=WHAT, fix=FIX)
    if meta.get("format") != FORMAT:
        raise UserFileError(path, f"not a SaRA adapter (format {meta.get('format')!r}, expected {FORMAT!r})", what=WHAT, fix=FIX)
    suffixes = ("index", "values", "active") if layout else ("index", "values")
    names = sizes if exact else sorted({k.rsplit(".", 1)[0] for k in entries})
    unknown = [n for n in names if n not in sizes]
    if unknown:
        raise UserFileError(path, f"names {unknown[0]!r}, which this model does not have as a floating parameter "
                            f"({len(unknown)} such names)", what=WHAT, fix="load it into the model it was trained on")
    expect = {}
    for n in names:
        expect[f"{n}.index"] = Spec((f"{n}#",), torch.int32, low=0, high=sizes[n], increasing=True)
        expect[f"{n}.values"] = Spec((f"{n}#",), torch.float32)
        if layout:
            expect[f"{n}.active"] = Spec((f"{n}@",), torch.int32, low=0, high=sizes[n], increasing=True)
    tensors = read_safetensors(path, expect, what=WHAT, fix=FIX, allow_extra=not layout and all(
        k.rsplit(".", 1)[-1] in suffixes + ("active",) for k in entries))
    if layout:
        for n in names:  # every trained entry is one of the selected ones
            idx, act = tensors[f"{n}.index"], tensors[f"{n}.active"]
            pos = torch.searchsorted(idx, act).clamp(max=max(idx.numel() - 1, 0))
            if act.numel() and (idx.numel() == 0 or not torch.equal(idx[pos], act)):
                raise UserFileError(path, f"tensor {n + '.active'!r} holds entries that {n + '.index'!r} does not",
                                    what=WHAT, fix=FIX)
    return tensors, meta


# -- the functional interface ---------------------------------------------------------------------------


def adapter_of(model: nn.Module) -> SaRA | None:
    return model.__dict__.get("_sara")


def prepare(model: nn.Module, threshold: float | None = None, fraction: float | None = None, exclude=()) -> list[nn.Parameter]:
    """Select ``|w| < threshold`` (or the ``fraction`` of smallest entries; default 0.1) of every
    floating tensor of ``model`` not matching ``exclude`` (name patterns), freeze the rest, and
    return the trainable 1-D deltas for any torch optimizer."""
    if adapter_of(model) is not None:
        raise SaRAError("this model already has a SaRA adapter; call sara.merge(model) before preparing again")
    adapter = SaRA(model, threshold, fraction, exclude)
    model.__dict__["_sara"] = adapter
    return adapter.parameters()


def _adapter(model: nn.Module) -> SaRA:
    adapter = adapter_of(model)
    if adapter is None:
        raise SaRAError("this model has no SaRA adapter; call sara.prepare(model, ...) first")
    return adapter


def penalty_generator(seed: int, step: int) -> torch.Generator:
    """The generator that picks step ``step``'s penalised weight (the trainer's and :func:`rank_penalty`'s)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def rank_penalty(model: nn.Module, step: int = 0, weight: float = LAMBDA_RANK, min_dim: int = RANK_MIN_DIM, seed: int = 0):
    """The nuclear-norm penalty of one weight chosen by ``(seed, step)``; a 0-d zero when none qualifies."""
    out = _adapter(model).rank_penalty(weight, min_dim, penalty_generator(seed, step))
    return out if out is not None else torch.zeros(())


def reselect(model: nn.Module, optimizer=None) -> list[torch.Tensor]:
    return _adapter(model).reselect(optimizer)


def save(model: nn.Module, folder: str | Path) -> Path:
    """``folder/sara.safetensors``: the trained entries' (indices, values), threshold, base hash."""
    return _adapter(model).save(folder)


@torch.no_grad()
def load(model: nn.Module, folder: str | Path) -> nn.Module:
    """Write a saved adapter's values into ``model``'s own parameters, in place (state_dict keys
    unchanged); refuses a model other than the base it was trained from."""
    if adapter_of(model) is not None:
        raise SaRAError("load: this model has a SaRA adapter attached; load into the plain base model")
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.is_floating_point()}
    tensors, meta = _read(folder, sizes, layout=False, exact=False)  # checked whole: nothing applied from a bad file
    got = base_hash(model)
    if got != meta.get("base_sha256"):
        raise SaRAError(
            f"load: {folder} was trained on another base model (base sha256 {meta.get('base_sha256', '?')[:12]}..., "
            f"this model {got[:12]}...); load it into the model it was trained from, before any other change"
        )
    params = dict(model.named_parameters())
    for key in tensors:
        if key.endswith(".index"):
            name = key[: -len(".index")]
            p = params[name]
            p.view(-1)[tensors[key].long().to(p.device)] = tensors[f"{name}.values"].to(p.device, p.dtype)
    return model


def merge(model: nn.Module) -> nn.Module:
    """The plain dense module (trained values in place, no hooks or deltas) for ``save_pretrained``;
    a model without an adapter is returned as it is."""
    adapter = adapter_of(model)
    if adapter is not None:
        adapter.remove()
        del model.__dict__["_sara"]
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside: ``model`` computes with its base weights."""
    with _adapter(model).disabled():
        yield


__all__ = ["prepare", "rank_penalty", "reselect", "save", "load", "merge", "disabled", "adapter_of", "SaRA",
           "SaRAError", "threshold_for_fraction", "base_hash", "DEFAULT_FRACTION", "FILE"]
