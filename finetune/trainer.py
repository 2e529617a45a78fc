"""The trainer, written once: every fine-tuning method of diffplug is a Config + a loss (+ its data).

    trainer = Trainer(DPO(config))
    trainer.train()

A method (:class:`Method`) gives the trainer a dataset, optionally expands a batch into micro-batches
(online methods roll out samples there), and computes a loss; the trainer does the rest:
accelerate (DDP, FSDP/DeepSpeed through ``accelerate launch --config_file``), mixed precision,
gradient accumulation, the adapter that trains in the denoiser (``adapters.py``: LoRA, SaRA, full) and its
reference model, EMA, seeded data order,
atomic checkpoints (safetensors + JSON, no pickle: ``state.py``) and exact resumption, logs (tqdm,
JSONL, TensorBoard), sample grids and the final weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from . import adapters
from . import checkpoint as ckpt
from . import state as run_state
from .config import ConfigError, TrainConfig, save_config
from .data import SeededOrder, generators, loader
from .model import DiffusionModel, load_pipeline
from .progress import RunClock


class Method:
    """What a fine-tuning method supplies. Subclasses set ``name`` and ``Config``."""

    name = "base"
    Config = TrainConfig
    #: True: a step changes the run state its checkpoint holds before the weight update (``prepare`` pops a
    #: rollout), so a step abandoned half-way by a raw KeyboardInterrupt cannot be saved; None: assumed of
    #: every method that has its own run state (:meth:`save_run_state`); False: the state changes only after
    #: the update (e.g. in :meth:`after_step`)
    steps_change_run_state: bool | None = None

    def __init__(self, config: TrainConfig):
        self.config = config

    def setup(self, trainer: "Trainer"):
        """Called on every process once the model is ready -> ``(dataset, collate)``; ``collate``
        maps a list of dataset items to a batch dict."""
        raise NotImplementedError

    def prepare(self, trainer: "Trainer", batch: dict) -> list[dict]:
        """Expand one batch into micro-batches (each gets its own backward). Online methods sample
        here. The losses of the returned micro-batches must *sum* to this process's batch loss; at
        least one must be returned (zero-weighted if there is nothing to learn from), so that every
        process takes part in each gradient synchronisation."""
        return [batch]

    def loss(self, trainer: "Trainer", batch: dict) -> tuple[torch.Tensor, dict]:
        """-> ``(loss, logs)``; logs are floats or 0-d tensors, averaged over the logging window."""
        raise NotImplementedError

    def save_run_state(self, trainer: "Trainer", folder: Path) -> None:
        """Write this process's own resumable state (e.g. an unfinished rollout) into the checkpoint
        ``folder``, as safetensors or JSON (never pickle). Called on every process."""

    def restore_run_state(self, trainer: "Trainer", folder: Path) -> None:
        """Read back what :meth:`save_run_state` wrote; raise on a bad file (the trainer names it and, with
        ``--resume latest``, falls back to the previous checkpoint)."""

    def after_step(self, trainer: "Trainer", step: int) -> bool:
        """Called on every process after optimiser step ``step`` (1-based), before its checkpoint; True stops
        the run there (early stopping: ``pairs.HeldOutPairs``). Every process must return the same."""
        return False

    def finish(self, trainer: "Trainer") -> None:
        """Called once the loop ends, before the last checkpoint and the final weights (e.g. to put back the
        best weights of an early-stopped run)."""

    def phases(self, trainer: "Trainer") -> list[tuple]:
        """The run's phases for its ETA, in order: ``(name, units, work per unit, label)`` with work in denoiser
        image-evaluations (``progress.RunClock``); the trainer's own is ``"train"`` (units: max_steps, work:
        :meth:`step_work`). A method that generates data or evaluates at the end lists those phases around it."""
        return [("train", None, None, "steps")]

    def step_work(self, trainer: "Trainer") -> float | None:
        """Denoiser image-evaluations of one optimiser step, if known: lets the ETA count the training steps
        before the first is timed. None: timed from the first step."""
        return None

    def trainable(self, trainer: "Trainer"):
        """The module to train, or None for the diffusion model's UNet (LoRA or full, per config).
        A method that trains another module (e.g. a reward model) returns it here and may define
        ``save_final(trainer, module, folder)``."""
        return None


class EMA:
    """Exponential moving average of the trained parameters (Polyak); checkpointed with the run."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Inside: the parameters hold the EMA weights."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(saved, self.params):
                    p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params)]


def tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, handled: ``str(e)`` says what was kept (``checkpoint``: the folder saved, if any); the run
    goes on with the same config and ``resume: latest`` (the CLI prints the exact command)."""

    def __init__(self, message: str, checkpoint: Path | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class _StopRequest:
    """Inside: the first Ctrl-C (SIGINT) only sets ``requested``, so the step in progress ends and is saved;
    a second one raises KeyboardInterrupt at once. Outside the main thread, nothing is installed."""

    def __init__(self):
        self.requested, self._old = False, None

    def _handler(self, signum, frame):
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, self._old)  # the next Ctrl-C stops at once
        tqdm_write("\n[diffplug finetune] Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop without saving)")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None and not self.requested:
            signal.signal(signal.SIGINT, self._old)
        self._old = None
        return False


# Sharded set-ups: each process holds a part of the weights and optimiser state, which accelerate
# saves only through pickles; diffplug's checkpoints (state.py) are for unsharded runs.
_SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _refuse_sharded_checkpoints(cfg: TrainConfig, kind: str) -> None:
    if cfg.resume:
        raise ConfigError(f"resume: runs under {kind} cannot be resumed (diffplug checkpoints only unsharded "
                          "runs, without pickle); resume under DDP (accelerate launch --multi_gpu) or start a new run")
    if cfg.checkpoint_every:
        raise ConfigError(f"checkpoint_every: {kind} runs write no checkpoints (diffplug checkpoints only unsharded "
                          "runs, without pickle); pass --checkpoint_every 0 (final weights only) or train under DDP")


def _step_of(line: str) -> float:
    """The step of a logs.jsonl line; inf for a line cut short or without a step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _check_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {str(out)!r} exists and is not a folder")
    if not cfg.resume and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"output_dir: {str(out)!r} is not empty; pass --resume latest to continue that run, "
            "or choose a new --output_dir (diffplug never overwrites a previous run)"
        )


def _make_optimizer(cfg: TrainConfig, params, lr: float):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.adam_weight_decay)
    try:
        from transformers.optimization import Adafactor
    except ImportError:  # pragma: no cover
        raise ConfigError("optimizer: adafactor needs transformers") from None
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=cfg.adam_weight_decay)


class Trainer:
    """Runs ``method`` under its config. Methods use: ``config``, ``accelerator``, ``device``,
    ``model`` (:class:`DiffusionModel`), ``unet`` (the prepared, trainable UNet), ``resolution``,
    :meth:`generators` and :meth:`reference`."""

    def __init__(self, method: Method):
        self.method = method
        self.config = method.config
        self.config.validate()
        self.out = Path(self.config.output_dir)

    # -- helpers for methods ---------------------------------------------------------------------
    def generators(self, positions, salt: int = 0) -> list[torch.Generator]:
        """Per-sample generators keyed by the run's seed and each sample's stream position."""
        return generators(self.config.seed, positions, salt)

    def reference(self):
        """Context manager yielding the frozen initial model (call it like ``self.unet``)."""
        return self.model.reference(self.unet)

    def predict(self, unet, x, t, cond) -> torch.Tensor:
        return self.model.predict(unet, x, t, cond)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- setup --------------------------------------------------------------------------------------
    def _setup(self):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        cfg = self.config
        _check_output_dir(cfg)
        self.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision)
        self.device = acc.device
        self.can_checkpoint = acc.distributed_type.value not in _SHARDED
        if not self.can_checkpoint:
            _refuse_sharded_checkpoints(cfg, acc.distributed_type.value)
        candidates = ckpt.resolve(cfg.resume, self.out)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale(self.out)
            self._check_resumed_config(candidates)
            save_config(cfg, self.out / "config.yaml")
        acc.wait_for_everyone()

        set_seed(cfg.seed)  # the same LoRA initialisation on every process
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.model = model = DiffusionModel(load_pipeline(cfg.model), getattr(self.method, "families", None), cfg.guidance_scale)
        self.resolution = model.resolution = cfg.resolution or model.default_resolution()
        model.check_resolution(self.resolution)
        model.freeze_encoders(self.device, weight_dtype)
        module = self.method.trainable(self)
        self.adapter = None
        if module is not None:  # the method trains its own module; the diffusion model stays frozen
            model.unet.requires_grad_(False).eval().to(self.device)
            if weight_dtype != torch.float32:
                model.unet.to(dtype=weight_dtype)
            trained, params = module, [p for p in module.parameters() if p.requires_grad]
        else:  # an adapter (LoRA, SaRA, full) trains inside the denoiser
            self.adapter = model.adapter = adapters.make(cfg, model)
            trained, params = model.unet, self.adapter.attach(self.device, weight_dtype, acc.num_processes)
            if self.adapter.describe():
                self._print(self.adapter.describe())
        if cfg.gradient_checkpointing and module is None:
            model.unet.enable_gradient_checkpointing()
        self.custom_module = module is not None
        self._print(f"trainable parameters: {sum(p.numel() for p in params):,}")

        self.clock = RunClock()
        for name, units, work, label in self.method.phases(self):
            if name == "train":
                units, work = cfg.max_steps, self.method.step_work(self)
            self.clock.plan(name, units, work, label)
        self.dataset, self.collate = self.method.setup(self)

        self.global_batch = cfg.train_batch_size * acc.num_processes
        lr = cfg.learning_rate * (self.global_batch * cfg.gradient_accumulation_steps if cfg.scale_lr else 1)
        optimizer = _make_optimizer(cfg, params, lr)
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
        )
        # The LR schedule is not `prepare`d: accelerate would step it once per process.
        # `self.unet` is the prepared (DDP/FSDP-wrapped) trained module: the UNet, or the method's own.
        self.unet, self.optimizer = acc.prepare(trained, optimizer)
        self.params = params
        self.ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # what a checkpoint holds of the model: LoRA adapters only, else the trained module's state
        self._state_module = trained
        self._trainable_only = self.adapter is not None and self.adapter.trainable_only

        self.start_step = 0
        if candidates:
            self.start_step = self._resume(candidates)
            self.clock.plan("train", cfg.max_steps - self.start_step, self.method.step_work(self), "steps")
        elif cfg.resume:
            self._print(f"resume: no checkpoint in {self.out} yet; starting a new run")

    def _state_parts(self) -> dict:
        return dict(module=self._state_module, trainable_only=self._trainable_only, optimizer=self.optimizer,
                    scheduler=self.lr_scheduler, ema=self.ema, scaler=self.accelerator.scaler)

    def _resume(self, candidates: list[Path]) -> int:
        """Load the first readable checkpoint of ``candidates`` on every process -> its step. With
        ``--resume latest`` an unreadable checkpoint is named, set aside and the previous one tried."""
        acc, errors = self.accelerator, []
        for folder in candidates:
            error = ""
            try:
                state = ckpt.read_state(folder)
                if state.get("num_processes", acc.num_processes) != acc.num_processes:
                    raise ConfigError(
                        f"resume: {folder} was written by {state['num_processes']} processes, this run has "
                        f"{acc.num_processes}; resume with the same number of processes"
                    )
                if self.adapter is not None:  # the adapter's own state first (SaRA: it sizes the tensors below)
                    self.adapter.restore_run_state(folder, self.optimizer, self.params)
                run_state.load(folder, acc.process_index, **self._state_parts())
                with run_state.reading(folder):
                    self.method.restore_run_state(self, folder)
            except ckpt.CheckpointError as e:
                error = str(e)
                tqdm_write(f"[diffplug finetune {self.method.name}] warning: cannot resume from {folder.name}: {error}")
            ok = torch.tensor([0.0 if error else 1.0], device=self.device)
            if acc.num_processes > 1:
                ok = acc.gather(ok)
            if bool(ok.min() > 0):
                if errors and acc.is_main_process:
                    for bad in candidates[: candidates.index(folder)]:
                        self._print(f"warning: unreadable checkpoint kept as {ckpt.set_aside(bad).name}")
                self._print(f"resumed from {folder} at step {state['step']}" + (" (the newer ones were unreadable)" if errors else ""))
                return int(state["step"])
            errors.append(error or "unreadable on another process")
            if len(candidates) > 1 and folder != candidates[-1]:
                self._print(f"falling back to the previous checkpoint, {candidates[candidates.index(folder) + 1].name}")
        if len(candidates) == 1 and self.config.resume != "latest":
            raise ckpt.CheckpointError(f"resume: cannot resume from {candidates[0]}: {errors[0]}")
        raise ckpt.CheckpointError(
            f"resume: no readable checkpoint in {self.out} ({'; '.join(errors)}); pass --resume with another "
            "checkpoint folder, or start a new run with another --output_dir"
        )

    def _check_resumed_config(self, candidates) -> None:
        saved = self.out / "config.yaml"
        if not candidates or not saved.is_file():
            return
        import yaml

        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except (UnicodeDecodeError, yaml.YAMLError):
            old = None
        if not isinstance(old, dict):
            self._print(f"warning: {saved} is unreadable; the resumed config is not compared with it")
            return
        new = self.config.to_dict()
        volatile = {"resume", "max_steps", "checkpoint_every", "checkpoints_total_limit", "log_every", "sample_every",
                    "eval_every", "eval_reward", "eval_prompts", "eval_images_per_prompt"}
        changed = [k for k in new if k not in volatile and k in old and old[k] != new[k]]
        if old.get("method", self.config.method) != self.config.method:
            raise ConfigError(f"resume: {self.out} holds a `{old.get('method')}` run, not `{self.config.method}`")
        if changed:
            self._print(f"warning: resuming with changed config keys {changed} (saved config: {saved})")

    # -- logging ---------------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm_write(f"[diffplug finetune {self.method.name}] {msg}")

    def _open_logs(self):
        self.tb = None
        if not self.is_main:
            return
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run rewrites the steps after its checkpoint: drop the old events
                purge = self.start_step + 1 if self.start_step else 0
                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge if self.config.resume else None)
            except ImportError:
                self.tb = None
        if self.config.resume:
            self._truncate_logs()
        self.jsonl = open(self.out / "logs.jsonl", "a")

    def _truncate_logs(self) -> None:
        """Resuming at step S: drop the records of steps after S (the resumed run writes them again)
        and any line cut short by a kill, so that logs.jsonl holds each step once."""
        path, s = self.out / "logs.jsonl", self.start_step
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if s > 0 and _step_of(line) <= s]
        dropped = len(lines) - len(kept)
        if dropped:
            tmp = path.with_name(".tmp-logs.jsonl")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
            self._print(f"logs.jsonl: dropped {dropped} records after step {s} (the resumed run writes them again)")

    def _log(self, step: int, sums: dict, count: int) -> dict:
        acc = self.accelerator
        keys = sorted(sums)
        values = torch.tensor([float(sums[k]) / max(count, 1) for k in keys], device=self.device, dtype=torch.float64)
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="mean")
        record = {"step": step, **{k: float(v) for k, v in zip(keys, values.tolist())}}
        record["lr"] = self.lr_scheduler.get_last_lr()[0]
        if self.is_main:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in record.items():
                    if k != "step":
                        self.tb.add_scalar(k, v, step)
        return record

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Atomically write ``output_dir/checkpoint-{step}`` (see ``checkpoint.py``)."""
        acc = self.accelerator
        tmp, final = ckpt.tmp_path(self.out, step), self.out / f"checkpoint-{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        run_state.save(tmp, acc.process_index, **self._state_parts())
        if self.adapter is not None and acc.is_main_process:
            self.adapter.save_run_state(tmp)
        self.method.save_run_state(self, tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": step, "num_processes": acc.num_processes, "method": self.method.name, "time": time.time()}
            save_config(self.config, tmp / "config.yaml")
            ckpt.commit(tmp, final, state)
            for p in ckpt.prune(self.out, self.config.checkpoints_total_limit):
                self._print(f"removed old checkpoint {p.name}")
        acc.wait_for_everyone()
        return final

    def save_final(self) -> Path:
        acc = self.accelerator
        final = self.out / "final"
        acc.wait_for_everyone()
        unet = acc.unwrap_model(self.unet)
        state_ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with state_ctx:
            if acc.is_main_process:
                tmp = self.out / ".tmp-final"
                shutil.rmtree(tmp, ignore_errors=True)
                try:  # staged whole, then renamed: a failed write (full disk) leaves the earlier final/ as it was
                    if hasattr(self.method, "save_final"):
                        self.method.save_final(self, unet, tmp)
                    else:
                        self.model.save_final(unet, tmp)
                    save_config(self.config, tmp / "config.yaml")
                except Exception as err:  # safetensors raises its own error type on ENOSPC
                    shutil.rmtree(tmp, ignore_errors=True)
                    from ..atomic import WriteError

                    raise (err if isinstance(err, WriteError) else WriteError(final, err)) from err
                old = self.out / ".old-final"
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    # -- samples -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, prompts: list[str], per_prompt: int = 1) -> torch.Tensor:
        """Images in [0, 1] of the model being trained (EMA weights if any), CFG at ``guidance_scale``,
        from the config's seed: the same noise every time."""
        from ..guidance.base import CFG
        from ..pipelines import from_pipe

        cfg = self.config
        unet = self.accelerator.unwrap_model(self.unet)
        unet.eval()
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with ctx, self.accelerator.autocast():
            g = torch.Generator(device="cpu").manual_seed(cfg.seed)
            images = from_pipe(self.model.pipe, guidance=CFG(cfg.guidance_scale))(
                list(prompts), num_inference_steps=cfg.sample_steps, generator=g, num_images_per_prompt=per_prompt,
                height=self.resolution, width=self.resolution, output_type="pt", **self.model.prompt_arguments(),
            ).images
        unet.train()
        return images.float().clamp(0, 1).cpu()

    def sample_grid(self, step: int) -> None:
        if not self.is_main:
            return
        from torchvision.utils import save_image

        images = self._sample(self.config.sample_prompts)
        (self.out / "samples").mkdir(exist_ok=True)
        save_image(images, str(self.out / "samples" / f"step-{step:06d}.png"), nrow=len(images))

    def evaluate(self, step: int) -> dict | None:
        """Mean ``eval_reward`` of ``eval_images_per_prompt`` images per ``eval_prompts`` (fixed noise),
        written to logs.jsonl with the training time spent so far (evaluations excluded)."""
        if not self.is_main:
            return None
        from ..evals.stats import mean_se
        from .pairs import resolve_reward

        cfg = self.config
        start = time.perf_counter()
        if self._eval_reward is None:
            self._eval_reward = resolve_reward(cfg.eval_reward)
        per = cfg.eval_images_per_prompt
        images = self._sample(cfg.eval_prompts, per)
        prompts = [p for p in cfg.eval_prompts for _ in range(per)]
        with torch.no_grad():
            scores = torch.as_tensor(self._eval_reward(images, prompts)).float().cpu()
        self._eval_seconds += time.perf_counter() - start
        reward = mean_se(scores, "eval_reward")
        record = {
            "step": step, "eval_reward": reward.mean,
            "eval_reward_se": reward.se if reward.n > 1 else None,  # JSON has no nan: no s.e. from one image
            "train_seconds": round(time.perf_counter() - self._train_start - self._eval_seconds, 3),
        }
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.add_scalar("eval_reward", record["eval_reward"], step)
        return record

    # -- Ctrl-C ------------------------------------------------------------------------------------------
    def _stop_requested(self, stop: _StopRequest) -> bool:
        """The first Ctrl-C on any process stops every process after the same step."""
        flag = stop.requested
        if self.accelerator.num_processes > 1:
            flag = bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum") > 0)
        return flag

    def _stop_after(self, done: int):
        """Ctrl-C during step ``done``: that step is complete; save it (unless just saved) and stop."""
        if not self.can_checkpoint:
            raise Interrupted(f"interrupted after step {done} of {self.config.max_steps}: "
                              f"{self.accelerator.distributed_type.value} runs write no checkpoints; nothing saved")
        folder = self.out / f"checkpoint-{done}"
        if not (folder / ckpt.STATE_FILE).is_file():
            folder = self.save_checkpoint(done)
        raise Interrupted(f"interrupted after step {done} of {self.config.max_steps}: saved {folder}", folder)

    def _steps_change_run_state(self) -> bool:
        declared = self.method.steps_change_run_state
        return type(self.method).save_run_state is not Method.save_run_state if declared is None else declared

    def _interrupted_in_step(self, step: int):
        """A KeyboardInterrupt raised inside step ``step + 1`` (not through the Ctrl-C handler). Before the
        weight update the state is that of step ``step`` once the step's random draws are put back, so it is
        saved -- unless the method keeps its own run state (it may have changed it mid-step) or processes
        would have to agree on it. From the update on (a checkpoint being written included) nothing is saved."""
        latest = ckpt.latest(self.out)
        torn = (self._step_phase != "forward" or not self.can_checkpoint or self.accelerator.num_processes > 1
                or self._steps_change_run_state())
        if torn or step == self.start_step:
            why = "the step's state is not consistent" if torn else "nothing trained since the start"
            raise Interrupted(f"interrupted in step {step + 1} of {self.config.max_steps}: not saved ({why}); the last "
                              f"checkpoint is {latest or 'none (a resumed run starts from step 0; generated pairs are reused)'}",
                              latest) from None
        run_state.set_rng_state(self._step_rng)
        self.optimizer.zero_grad(set_to_none=True)
        folder = self.out / f"checkpoint-{step}"
        if not (folder / ckpt.STATE_FILE).is_file():
            folder = self.save_checkpoint(step)
        raise Interrupted(f"interrupted in step {step + 1} of {self.config.max_steps}: saved {folder} (step {step}, the "
                          "last complete one)", folder) from None

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run the method; Ctrl-C saves a checkpoint at the end of the step in progress and raises
        :class:`Interrupted` (the CLI prints how to resume and exits 130)."""
        try:
            return self._train()
        except Interrupted:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps
            latest = ckpt.latest(self.out) if self.out.is_dir() else None
            where = f"in step {self.step + 1}" if getattr(self, "step", None) is not None else "before training"
            raise Interrupted(f"interrupted {where}: nothing more saved; the last checkpoint is "
                              f"{latest or 'none (a resumed run starts from step 0; generated pairs are reused)'}",
                              latest) from None

    def _train(self) -> Path:
        from tqdm.auto import tqdm

        self.step = None
        self._train_start = time.perf_counter()  # train_seconds in eval records counts setup (e.g. DPO's pairs) too
        self._setup()
        cfg, acc = self.config, self.accelerator
        accum = cfg.gradient_accumulation_steps
        order = SeededOrder(len(self.dataset), self.global_batch, cfg.seed)
        batches = iter(
            loader(
                self.dataset, self.collate, order, acc.process_index, cfg.train_batch_size,
                self.start_step * accum, cfg.max_steps * accum, cfg.dataloader_num_workers,
            )
        )
        self._open_logs()
        self._eval_seconds, self._eval_reward = 0.0, None
        if cfg.eval_every and self.start_step == 0:
            self.evaluate(0)
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, disable=not self.is_main, desc=f"finetune {self.method.name}")
        sums, count, record, postfix = {}, 0, {}, {}
        self.unet.train()
        self.clock.start("train")
        stop = _StopRequest()
        try:
            with stop:
                for step in range(self.start_step, cfg.max_steps):
                    self.step = step
                    self._step_rng = run_state.rng_state()  # put back if a raw KeyboardInterrupt abandons this step
                    self._step_phase = "forward"
                    for micro in range(accum):
                        batch = next(batches)
                        with acc.autocast():
                            parts = self.method.prepare(self, batch)
                        if not parts:
                            raise RuntimeError(f"{type(self.method).__name__}.prepare returned no micro-batches")
                        for j, part in enumerate(parts):
                            last = micro == accum - 1 and j == len(parts) - 1
                            with contextlib.nullcontext() if last else acc.no_sync(self.unet):
                                with acc.autocast():
                                    loss, logs = self.method.loss(self, part)
                                penalty = self.adapter.penalty(step) if last and self.adapter is not None else None
                                acc.backward(loss / accum + (penalty[1] if penalty is not None else 0.0))
                                if penalty is not None:
                                    sums[penalty[0]] = sums.get(penalty[0], 0.0) + float(penalty[1].detach())
                            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / accum
                            for k, v in logs.items():
                                sums[k] = sums.get(k, 0.0) + float(v) / (accum * len(parts))
                        if hasattr(self.method, "batch_logs"):
                            for k, v in self.method.batch_logs.items():
                                sums[k] = sums.get(k, 0.0) + float(v) / accum
                    self._step_phase = "update"  # from here on a raw KeyboardInterrupt leaves no step-boundary state
                    if cfg.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update()
                    if self.adapter is not None:
                        message = self.adapter.after_step(step + 1, self.optimizer, self.ema, self.params)
                        if message:
                            self._print(message)
                    self._step_phase = "done"
                    count += 1
                    done = step + 1
                    if not math.isfinite(sums["loss"]):
                        raise FloatingPointError(f"loss is {sums['loss']} at step {done}; lower learning_rate or beta")
                    if done % cfg.log_every == 0 or done == cfg.max_steps:
                        record = self._log(done, sums, count)
                        sums, count = {}, 0
                        postfix.update({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "implicit_acc", "lr")})
                    if self.method.after_step(self, done):  # e.g. early stopping on held-out pairs
                        bar.update(1)
                        break
                    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                        self.save_checkpoint(done)
                    if cfg.sample_every and done % cfg.sample_every == 0 and not self.custom_module:
                        self.sample_grid(done)
                    if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps) and not self.custom_module:
                        self.evaluate(done)
                    self.clock.advance("train")
                    postfix["run_eta"] = self.clock.short()
                    bar.set_postfix(postfix)
                    if step == self.start_step:
                        self._print(self.clock.describe())
                    if done < cfg.max_steps and self._stop_requested(stop):
                        self._stop_after(done)
                    bar.update(1)
        except KeyboardInterrupt as e:
            bar.close()
            if isinstance(e, Interrupted) or self.step is None:
                raise
            self._interrupted_in_step(self.step)
        bar.close()
        self.method.finish(self)
        self.step = cfg.max_steps
        if self.can_checkpoint and (self.start_step < cfg.max_steps or not ckpt.latest(self.out)):
            self.save_checkpoint(cfg.max_steps)
        final = self.save_final()
        if self.is_main:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
        self._print(f"done: final weights in {final}")
        self.last_record = record
        return final
