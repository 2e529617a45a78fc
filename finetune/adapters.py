"""What trains inside the denoiser, behind one interface: LoRA, SaRA or every weight.

The trainer calls an :class:`Adapter` and knows none of its internals (as peft's tuners hide
theirs): :meth:`~Adapter.attach` makes the denoiser trainable and returns the parameters to
optimise, :meth:`~Adapter.reference` gives the frozen initial model, :meth:`~Adapter.penalty` and
:meth:`~Adapter.after_step` carry an adapter's own regulariser and schedule (SaRA's nuclear norm and
re-selection), :meth:`~Adapter.save_run_state` / :meth:`~Adapter.restore_run_state` what a checkpoint needs
beyond the trained tensors, :meth:`~Adapter.save_final` the final weights. Adding an adapter is a
class here and a line in :data:`ADAPTERS`; adding a family is a family adapter in
``diffplug.pipelines`` (and its LoRA targets in :data:`LORA_TARGETS`): no trainer code changes.

Every final folder holds ``adapter.json`` -- the adapter, the family, the pipeline class and the
base model's :func:`fingerprint` -- beside the weights, and :func:`load` applies it to a pipeline
through ``diffplug.checked`` (exact keys and shapes, finite values, nothing applied before all is
checked), refusing a pipeline of another family or another base model::

    from diffplug.finetune.adapters import load
    pipe = load(FluxPipeline.from_pretrained(...), "runs/dpo/final")   # LoRA, SaRA or full
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

from .config import ConfigError

FORMAT = "diffplug-adapter/1"
META = "adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(folder) reads it too
WHAT = f"a diffplug fine-tuning result ({META} and its weights, written by diffplug finetune)"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the config's default lora_target_modules
# LoRA targets per family when lora_target_modules is left at its default: the attention projections,
# as diffusers' LoRA training scripts (SD3/Flux: both streams of the joint attention; Flux's
# single-stream blocks have to_q/k/v and no to_out)
LORA_TARGETS = {
    "sd": UNET_TARGETS,
    "sdxl": UNET_TARGETS,
    "pixart": UNET_TARGETS,
    "sd3": UNET_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "flux": UNET_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "chroma": UNET_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "zimage": UNET_TARGETS,  # single-stream: one attention per block (and in the refiners)
}


def fingerprint(denoiser: torch.nn.Module) -> str:
    """The base model's fingerprint, defined once: sha256 over the denoiser's parameter names, shapes
    and float32 values (``sara.base_hash``; SaRA files carry the same hash): one read of every
    weight, at the start of a run and in :func:`load`."""
    from .sara import base_hash

    return base_hash(denoiser)


def lora_targets(family: str, configured: list) -> list:
    """The modules LoRA adapts: ``configured``, or the family's default where it is left at the UNet default."""
    return list(LORA_TARGETS.get(family, UNET_TARGETS)) if list(configured) == UNET_TARGETS else list(configured)


class Adapter:
    """The trainable part of a denoiser. Subclasses set ``name`` and implement attach / reference /
    save_final / apply; the rest defaults to nothing."""

    name = ""
    trainable_only = True  # a checkpoint holds the trained tensors only (else the whole denoiser)
    checks_base = False  # apply() verifies the base itself (else load() compares the fingerprint)

    def __init__(self, model, config):
        self.model, self.config = model, config
        self.base = ""  # the fingerprint, set by attach

    # -- training -------------------------------------------------------------------------------------
    def attach(self, device, dtype, num_processes: int = 1) -> list[torch.nn.Parameter]:
        """Make the denoiser trainable (frozen parts in ``dtype``, trained tensors in float32) on
        ``device`` -> the parameters to optimise (a list the adapter may change in place)."""
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    @contextlib.contextmanager
    def reference(self, unet):
        """Inside: the frozen initial model, called like ``unet``."""
        raise NotImplementedError
        yield

    def penalty(self, step: int):
        """``(log name, loss term)`` added to the last micro-batch's loss of ``step``, or None."""
        return None

    def after_step(self, step: int, optimizer, ema, params: list) -> str | None:
        """After optimiser step ``step`` (1-based): may change ``params`` in place -> a message or None."""
        return None

    def save_run_state(self, folder: Path) -> None:
        """What a checkpoint needs beyond the trained tensors (safetensors/JSON); main process."""

    def restore_run_state(self, folder: Path, optimizer, params: list) -> None:
        """Read back :meth:`save_run_state` before the trained tensors load; raise on a bad file."""

    # -- the result -----------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What :meth:`apply` needs besides the weights (written into ``adapter.json``)."""
        return {}

    def save_final(self, unet, folder: Path) -> None:
        self.write_weights(unet, folder)
        model = self.model
        record = {"format": FORMAT, "adapter": self.name, "family": model.family.name,
                  "pipeline": type(model.pipe).__name__, "denoiser": model.family.denoiser_attr,
                  "fingerprint": self.base, **self.settings()}
        (folder / META).write_text(json.dumps(record, indent=1) + "\n")

    def write_weights(self, unet, folder: Path) -> None:
        raise NotImplementedError

    @classmethod
    def apply(cls, denoiser: torch.nn.Module, folder: Path, record: dict) -> None:
        """Apply the saved result to the plain base ``denoiser``; nothing changes unless every file checks."""
        raise NotImplementedError


class LoRA(Adapter):
    """peft LoRA adapters on :func:`lora_targets`; the reference is the denoiser with adapters disabled.
    Saved in diffusers' layout (``pipe.load_lora_weights(folder)`` where the pipeline has a LoRA loader)."""

    name = "lora"

    def attach(self, device, dtype, num_processes=1):
        cfg, unet = self.config, self.model.unet
        self.base = fingerprint(unet)
        self.lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank, "init": cfg.lora_init,
                     "target_modules": lora_targets(self.model.family.name, cfg.lora_target_modules)}
        unet.requires_grad_(False)
        try:
            add_lora(unet, self.lora)
        except ValueError as e:
            raise ConfigError(f"lora_target_modules: {e}") from None
        unet.to(device)
        if dtype != torch.float32:  # frozen base in the autocast dtype
            unet.to(dtype=dtype)
        params = self.model.trainable_parameters()
        for p in params:  # adapters train in float32
            p.data = p.data.float()
        return params

    def describe(self) -> str:
        return f"lora: rank {self.lora['rank']} on {', '.join(self.lora['target_modules'])}"

    @contextlib.contextmanager
    def reference(self, unet):
        _lora_layers_enabled(self.model.unet, False)
        try:
            yield unet
        finally:
            _lora_layers_enabled(self.model.unet, True)

    def settings(self):
        return {"lora": self.lora}

    def write_weights(self, unet, folder):
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        attr, pipe = self.model.family.denoiser_attr, self.model.pipe
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        if not hasattr(pipe, "save_lora_weights"):  # PixArt: no LoRA loader in diffusers; the same layout
            from ..atomic import save_safetensors

            save_safetensors({f"{attr}.{k}": v.detach().cpu().contiguous() for k, v in layers.items()}, folder / LORA_FILE)
            return
        kwargs = {f"{attr}_lora_layers": layers}
        try:
            from diffusers.training_utils import _collate_lora_metadata

            kwargs.update(_collate_lora_metadata({attr: unet}))
        except ImportError:
            pass
        type(pipe).save_lora_weights(str(folder), **kwargs)

    @classmethod
    def apply(cls, denoiser, folder, record):
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        from ..checked import Spec, UserFileError, read_safetensors

        settings = record.get("lora")
        if not isinstance(settings, dict) or not {"rank", "alpha", "init", "target_modules"} <= set(settings):
            raise UserFileError(folder / META, "has no complete 'lora' entry (rank, alpha, init, target_modules)", what=WHAT)
        add_lora(denoiser, settings)
        try:
            fresh = get_peft_model_state_dict(denoiser)
            by_tensor = {id(v): k for k, v in fresh.items()}  # the conversion renames keys, keeps the tensors
            names = {f"{record['denoiser']}.{n}": by_tensor[id(v)] for n, v in convert_state_dict_to_diffusers(fresh).items()}
            tensors = read_safetensors(folder / LORA_FILE, {n: Spec(tuple(fresh[k].shape), FLOATS) for n, k in names.items()},
                                       what=WHAT)
            set_peft_model_state_dict(denoiser, {names[n]: t for n, t in tensors.items()})
        except BaseException:
            for layer in _lora_layers(denoiser):  # nothing applied from a bad file
                layer.delete_adapter("default")
            raise


def add_lora(unet, settings: dict) -> None:
    """peft LoRA on ``unet`` from ``{rank, alpha, target_modules, init}`` (the trainer's and the loader's):
    diffusers' ``add_adapter`` where the model has it, peft's own injection otherwise (PixArt's DiT)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=int(settings["rank"]), lora_alpha=settings["alpha"], target_modules=list(settings["target_modules"]),
        init_lora_weights="gaussian" if settings["init"] == "gaussian" else True,
    )
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config)
    else:
        inject_adapter_in_model(config, unet, adapter_name="default")


def _lora_layers(unet) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _lora_layers_enabled(unet, enabled: bool) -> None:
    """LoRA on or off in every adapted layer (what diffusers' ``disable_adapters`` does, for any model)."""
    for layer in _lora_layers(unet):
        layer.enable_adapters(enabled)


class Full(Adapter):
    """Every weight trains; the reference is a frozen copy (in the mixed-precision dtype)."""

    name = "full"
    trainable_only = False

    def attach(self, device, dtype, num_processes=1):
        unet = self.model.unet
        self.base = fingerprint(unet)
        self.copy = copy.deepcopy(unet).requires_grad_(False).eval()
        if dtype != torch.float32:
            self.copy.to(dtype=dtype)
        unet.requires_grad_(True)
        unet.to(device)
        self.copy.to(device)
        return self.model.trainable_parameters()

    def describe(self) -> str:
        return "full: every weight of the denoiser"

    @contextlib.contextmanager
    def reference(self, unet):
        yield self.copy

    def write_weights(self, unet, folder):
        """``folder/<unet|transformer>``: ``from_pretrained(folder, subfolder=...)`` reads it too."""
        unet.save_pretrained(str(folder / self.model.family.denoiser_attr))

    @classmethod
    def apply(cls, denoiser, folder, record):
        from ..checked import Spec, UserFileError, read_json, read_safetensors

        sub = folder / record["denoiser"]
        own = denoiser.state_dict()
        index = sub / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():  # sharded: check each shard's keys, then that the shards cover the model
            weight_map = read_json(index, what=WHAT).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserFileError(index, "has no weight_map", what=WHAT)
            shards = {}
            for key, shard in weight_map.items():
                shards.setdefault(shard, []).append(key)
        else:
            shards = {"diffusion_pytorch_model.safetensors": list(own)}
        tensors = {}
        for shard, keys in shards.items():
            unknown = [k for k in keys if k not in own]
            if unknown:
                raise UserFileError(sub / shard, f"holds {unknown[0]!r}, which this {type(denoiser).__name__} does not have",
                                    what=WHAT, fix="load it into the model it was trained from")
            tensors.update(read_safetensors(sub / Path(shard).name, {k: Spec(tuple(own[k].shape), FLOATS) for k in keys},
                                            what=WHAT))
        missing = [k for k in own if k not in tensors]
        if missing:
            raise UserFileError(sub, f"{len(missing)} weights missing (e.g. {missing[0]!r})", what=WHAT)
        denoiser.load_state_dict(tensors, strict=True)


class SaRA(Adapter):
    """SaRA (``sara.py``): the smallest entries train, the rest stays frozen bit for bit; reference = base entries."""

    name = "sara"
    checks_base = True  # sara.load compares the file's base hash (the same fingerprint)

    def attach(self, device, dtype, num_processes=1):
        from . import sara

        cfg, unet = self.config, self.model.unet
        if cfg.sara_reselect_at and num_processes > 1:
            raise ConfigError("sara_progressive_step: re-selection resizes the trained tensors, which DDP cannot "
                              "follow; pass --sara_progressive_step 0 for multi-process runs")
        try:  # selected on the float32 base weights; the frozen base is then stored in dtype
            sara.prepare(unet, threshold=cfg.sara_threshold or None,
                         fraction=None if cfg.sara_threshold else cfg.sara_fraction or sara.DEFAULT_FRACTION,
                         exclude=cfg.sara_exclude)
        except sara.SaRAError as e:
            raise ConfigError(f"sara_threshold / sara_fraction / sara_exclude: {e}") from None
        self.sara = sara.adapter_of(unet)
        self.base = self.sara.base_sha256
        unet.to(device)
        if dtype != torch.float32:
            unet.to(dtype=dtype)
            for p in self.sara.parameters():  # the deltas train in float32
                p.data = p.data.float()
        return self.sara.parameters()

    def describe(self) -> str:
        return "sara: " + self.sara.describe()

    @contextlib.contextmanager
    def reference(self, unet):
        with self.sara.disabled():  # the base weights: dense copies of the selected tensors, no grad
            yield unet

    def penalty(self, step):
        """The nuclear-norm penalty of this step (the penalised weight drawn from seed and step)."""
        from .sara import penalty_generator

        cfg = self.config
        if not cfg.sara_lambda_rank:
            return None
        term = self.sara.rank_penalty(cfg.sara_lambda_rank, cfg.sara_rank_min_dim, penalty_generator(cfg.seed, step))
        return None if term is None else ("sara_rank_loss", term)

    def after_step(self, step, optimizer, ema, params):
        """Progressive re-selection at ``sara_reselect_at``: entries grown past the threshold freeze."""
        if step != self.config.sara_reselect_at:
            return None
        before = self.sara.num_trainable()
        pairs = self.sara.reselect(optimizer)
        if ema is not None:  # the frozen entries leave the EMA at their trained values
            keep = {id(old): k for old, _, k in pairs}
            ema.shadow = [sh[keep[id(p)].to(sh.device)] for sh, p in zip(ema.shadow, ema.params)]
        _swap(params, pairs)
        return (f"sara: re-selected at step {step}: {self.sara.num_trainable():,} of {before:,} entries "
                "still below the threshold keep training; optimizer state re-initialised")

    def save_run_state(self, folder):
        self.sara.save(folder, layout=True)

    def restore_run_state(self, folder, optimizer, params):
        from . import sara
        from . import state as run_state

        with run_state.reading(folder / sara.FILE):  # the trained subset first: it sizes the tensors after it
            _swap(params, self.sara.load_layout(folder / sara.FILE, optimizer))

    def write_weights(self, unet, folder):
        self.sara.save(folder)

    @classmethod
    def apply(cls, denoiser, folder, record):
        from . import sara

        sara.load(denoiser, folder)


def _swap(params: list, pairs) -> None:
    """Point the trainer's (and EMA's) parameter list at new tensors: ``(old, new, ...)`` pairs."""
    new = {id(old): p for old, p, *_ in pairs}
    params[:] = [new.get(id(p), p) for p in params]


ADAPTERS = {"lora": LoRA, "full": Full, "sara": SaRA}


def make(config, model) -> Adapter:
    """The adapter ``config.trained_adapter`` names, for ``model`` (a :class:`~diffplug.finetune.model.DiffusionModel`)."""
    return ADAPTERS[config.trained_adapter](model, config)


def load(pipe, folder):
    """Apply what ``diffplug finetune`` wrote to ``folder`` (its ``adapter.json`` says which adapter) to
    ``pipe``'s denoiser, in place -> ``pipe``. Refuses (``UserFileError``, a ``ValueError`` naming the
    file and the fix) a folder of another family or base model, or any file that does not check."""
    from ..checked import UserFileError, read_json
    from ..pipelines import family_of

    folder = Path(folder)
    record = read_json(folder / META, what=WHAT)
    if record.get("format") != FORMAT or record.get("adapter") not in ADAPTERS:
        raise UserFileError(folder / META, f"is not a diffplug adapter record (format {record.get('format')!r}, "
                            f"adapter {record.get('adapter')!r})", what=WHAT)
    family = family_of(pipe)
    if record.get("family") != family.name or record.get("denoiser") != family.denoiser_attr:
        raise UserFileError(folder / META, f"was trained on a {record.get('pipeline')} ({record.get('family')}), not on "
                            f"this {type(pipe).__name__} ({family.name})", what=WHAT,
                            fix=f"load it into the {record.get('pipeline')} it was trained from")
    cls = ADAPTERS[record["adapter"]]
    if not cls.checks_base and fingerprint(family.denoiser) != record.get("fingerprint"):
        raise UserFileError(folder / META, "was trained from another base model (the fingerprint of this "
                            f"{type(family.denoiser).__name__}'s weights differs)", what=WHAT,
                            fix="load it into the base model it was trained from (the run's --model)")
    cls.apply(family.denoiser, folder, record)
    return pipe


__all__ = ["Adapter", "ADAPTERS", "LoRA", "Full", "SaRA", "fingerprint", "lora_targets", "make", "load"]
