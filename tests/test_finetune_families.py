"""One trainer for every family: DPO and SFT with LoRA, SaRA and full fine-tuning on tiny random SD,
SDXL, PixArt, SD3, Flux, Chroma and Z-Image pipelines; exact resume; the tuned weights loaded back through
``adapters.load`` (diffplug.checked); flow DPO's beta rule; flow sigma sampling; refusals.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffplug.checked import UserFileError
from diffplug.finetune import ConfigError, Trainer, adapters, load_config
from diffplug.finetune.dpo import DiffusionDPO, DPOConfig, dpo_loss, error_weight
from diffplug.finetune.model import FAMILIES, SUPPORTED, DiffusionModel
from diffplug.finetune.sft import SFT, SFTConfig
from diffplug.predictions import convert
from diffplug.testing import tiny_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import make_pairs  # noqa: E402

torch.set_num_threads(1)

COMMON = dict(max_steps=2, log_every=1, train_batch_size=2, learning_rate=1e-2, lr_scheduler="constant",
              tensorboard=False, seed=0, sara_rank_min_dim=4, sara_fraction=0.2)
# every family runs both methods and every adapter: (method, adapter) per family
MATRIX = [(f, m, a) for f in FAMILIES
          for m, a in (("dpo", "lora"), ("sft", "sara"), ("dpo", "full"))]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"))


def _train(out: Path, family: str, method: str, adapter: str, pairs: Path, **kw) -> Trainer:
    values = {**COMMON, "output_dir": str(out), "model": f"tiny:{family}", "adapter": adapter, **kw}
    if method == "dpo":
        cfg = load_config(DPOConfig, None, {**values, "data": str(pairs), "beta": 500.0})
        trainer = Trainer(DiffusionDPO(cfg))
    else:
        cfg = load_config(SFTConfig, None, {**values, "data": "testbed:food-drink"})
        trainer = Trainer(SFT(cfg))
    trainer.train()
    return trainer


def _probe(model: DiffusionModel, module, seed: int = 0) -> torch.Tensor:
    """One denoiser call on fixed inputs, through the family adapter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *model.latent_shape(32), generator=g)
    t = torch.tensor([300.0]) if model.is_flow else torch.tensor([300])
    with torch.no_grad():
        return model.predict(module, x, t, model.encode_prompts(["a photo 0"], 32))


@pytest.mark.parametrize("family,method,adapter", MATRIX)
def test_every_family_trains_and_loads_back(tmp_path, pairs, family, method, adapter):
    grid = dict(sample_every=2, sample_prompts=["a"], sample_steps=2) if adapter == "lora" else {}
    trainer = _train(tmp_path / "run", family, method, adapter, pairs, resolution=32, **grid)  # (Z-Image's default: 1024)
    assert not grid or (tmp_path / "run" / "samples" / "step-000002.png").is_file()  # the trainer's sample grid
    record = json.loads((tmp_path / "run" / "logs.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and torch.isfinite(torch.tensor(record["loss"]))
    model = trainer.model
    assert model.family.name == family and model.is_flow == (family in ("sd3", "flux", "chroma", "zimage"))
    trained = _probe(model, trainer.unet)
    with trainer.reference() as ref:
        initial = _probe(model, ref)
    base_pipe = tiny_pipeline(family)
    base = DiffusionModel(base_pipe, FAMILIES)
    torch.testing.assert_close(initial, _probe(base, base.unet), rtol=0, atol=1e-6)  # the reference is the base
    assert (trained - initial).abs().max() > 1e-6  # the steps moved the model
    final = tmp_path / "run" / "final"
    meta = json.loads((final / adapters.META).read_text())
    assert meta["adapter"] == adapter and meta["family"] == family and meta["fingerprint"] == adapters.fingerprint(base.unet)
    adapters.load(base_pipe, final)  # what diffplug sample --adapter calls
    torch.testing.assert_close(_probe(base, base.unet), trained, rtol=0, atol=1e-5)


def test_lora_targets_per_family_and_stock_loader(tmp_path, pairs):
    """Flux LoRA adapts both attention streams and the single-stream blocks; FluxPipeline's own
    load_lora_weights reads the file and gives the model adapters.load gives."""
    trainer = _train(tmp_path / "run", "flux", "sft", "lora", pairs)
    keys = load_file(str(tmp_path / "run" / "final" / adapters.LORA_FILE))
    assert any(".add_q_proj." in k for k in keys) and any(k.startswith("transformer.single_transformer_blocks") for k in keys)
    stock = tiny_pipeline("flux")
    stock.load_lora_weights(str(tmp_path / "run" / "final"))
    ours = adapters.load(tiny_pipeline("flux"), tmp_path / "run" / "final")
    a, b = DiffusionModel(stock, FAMILIES), DiffusionModel(ours, FAMILIES)
    torch.testing.assert_close(_probe(a, a.unet), _probe(b, b.unet), rtol=0, atol=1e-6)
    torch.testing.assert_close(_probe(b, b.unet), _probe(trainer.model, trainer.unet), rtol=0, atol=1e-6)
    assert adapters.lora_targets("sd", adapters.UNET_TARGETS) == adapters.UNET_TARGETS
    assert adapters.lora_targets("flux", ["to_q"]) == ["to_q"]  # a given list is kept


def _cli(out: Path, model: str, method: str, adapter: str, pairs: Path, *extra) -> int:
    from diffplug.finetune.cli import main

    argv = [method, "--model", model, "--output_dir", str(out), "--adapter", adapter, "--seed", "0",
            "--train_batch_size", "2", "--log_every", "1", "--tensorboard", "false", "--learning_rate", "1e-2",
            "--checkpoint_every", "2", "--sara_rank_min_dim", "4", "--sara_fraction", "0.2", *extra]
    argv += ["--data", str(pairs), "--beta", "500"] if method == "dpo" else ["--data", "testbed:food-drink"]
    return main(argv)


@pytest.mark.parametrize("family,method,adapter", [("flux", "sft", "sara"), ("flux", "dpo", "full"), ("sd", "dpo", "lora")])
def test_resume_is_bit_identical(tmp_path, pairs, family, method, adapter):
    """``diffplug finetune`` 4 steps, vs 4 steps resumed from the step-2 checkpoint (SaRA re-selects at 2).
    flux-sft-sara trains a local pipeline folder (``--model DIR``)."""
    model = f"tiny:{family}"
    extra = ["--max_steps", "4"]
    if adapter == "sara":
        tiny_pipeline(family).save_pretrained(str(tmp_path / "model"))
        model, extra = str(tmp_path / "model"), [*extra, "--resolution", "32"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(a, model, method, adapter, pairs, *extra) == 0
    shutil.copytree(a, b)
    shutil.rmtree(b / "final")
    shutil.rmtree(b / "checkpoint-4")
    assert _cli(b, model, method, adapter, pairs, *extra, "--resume", "latest") == 0
    assert (a / "logs.jsonl").read_text() == (b / "logs.jsonl").read_text()
    files = sorted(p.relative_to(a / "final") for p in (a / "final").rglob("*.safetensors"))
    assert files
    for f in files:
        x, y = load_file(str(a / "final" / f)), load_file(str(b / "final" / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_flow_dpo_beta_rule_reproduces_epsilon_dpo():
    """flow.md §6: on velocity errors, beta_v(sigma) = beta (1 - sigma)^2 is exactly epsilon-DPO at beta."""
    g = torch.Generator().manual_seed(0)
    n, shape, beta = 6, (4, 8, 8), 500.0
    sigma = torch.rand(n, generator=g) * 0.98 + 0.01
    alpha, s = (1 - sigma).view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x0 = torch.randn(2 * n, *shape, generator=g)
    eps = torch.randn(n, *shape, generator=g).repeat(2, 1, 1, 1)  # shared by winner and loser
    a2, s2 = alpha.repeat(2, 1, 1, 1), s.repeat(2, 1, 1, 1)
    x_t = a2 * x0 + s2 * eps
    u = eps - x0
    u_theta, u_ref = u + 0.3 * torch.randn(u.shape, generator=g), u + 0.3 * torch.randn(u.shape, generator=g)

    def errs(pred, target):
        return (pred - target).pow(2).flatten(1).mean(1)

    def eps_err(pred_u):  # the same models read as epsilon predictions
        return errs(convert(pred_u, x_t, a2, s2, "flow", "epsilon"), eps)

    expected, _ = dpo_loss(eps_err(u_theta)[:n], eps_err(u_theta)[n:], eps_err(u_ref)[:n], eps_err(u_ref)[n:], beta)
    w = error_weight("flow", a2, "epsilon")
    m, r = errs(u_theta, u) * w, errs(u_ref, u) * w
    got, _ = dpo_loss(m[:n], m[n:], r[:n], r[n:], beta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    m, r = errs(u_theta, u), errs(u_ref, u)  # a constant beta is another loss
    assert not torch.allclose(dpo_loss(m[:n], m[n:], r[:n], r[n:], beta)[0], expected, rtol=1e-3)
    assert error_weight("epsilon", a2) == 1.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_sigmas_are_logit_normal_with_the_schedulers_shift(family):
    """sigma = shift(sigmoid(u)), u ~ N(0, 1): the shift the stock scheduler applies to the same sigmas
    (SD3: static 3; Flux: dynamic, mu from the token count)."""
    from diffplug.finetune import data as D

    model = DiffusionModel(tiny_pipeline(family), FAMILIES)
    model.resolution = 32
    positions = range(200)
    t = model.sample_timesteps(D.generators(0, positions))
    u = D.randn(D.generators(0, positions), ())
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    mu = None
    if scheduler.config.use_dynamic_shifting:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        mu = calculate_shift(model.latent_shape(32)[0], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=torch.sigmoid(u).tolist(), mu=mu)
    torch.testing.assert_close(t / 1000, scheduler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    assert 0 < float(t.min()) and float(t.max()) < 1000 and t.dtype == torch.float32


def test_refusals(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"FluxPipeline \(flux\) is not supported by this method; it runs on sd, sdxl"):
        DiffusionModel(tiny_pipeline("flux"), SUPPORTED)
    with pytest.raises(ConfigError, match="model: diffplug.pipelines.from_pipe does not know object"):
        DiffusionModel(object(), FAMILIES)
    from diffplug.finetune.cli import main

    assert main(["pso", "--model", "tiny:sd3", "--output_dir", str(tmp_path / "pso"), "--data", "testbed:food-drink",
                 "--max_steps", "1"]) == 2  # pso runs on the UNets only (README's table)
    assert "StableDiffusion3Pipeline (sd3) is not supported by this method" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"resolution: FluxPipeline \(flux\) needs a multiple of 4"):
        DiffusionModel(tiny_pipeline("flux"), FAMILIES).check_resolution(42)


def test_adapter_loader_refuses_other_bases_and_bad_files(tmp_path, pairs):
    _train(tmp_path / "run", "sd3", "sft", "lora", pairs, max_steps=1)
    final = tmp_path / "run" / "final"
    with pytest.raises(UserFileError, match=r"trained on a StableDiffusion3Pipeline \(sd3\), not on this FluxPipeline"):
        adapters.load(tiny_pipeline("flux"), final)
    with pytest.raises(UserFileError, match="another base model"):
        adapters.load(tiny_pipeline("sd3", seed=1), final)
    bad = tmp_path / "bad"
    shutil.copytree(final, bad)
    tensors = load_file(str(bad / adapters.LORA_FILE))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(bad / adapters.LORA_FILE))
    pipe = tiny_pipeline("sd3")
    before = _probe(DiffusionModel(pipe, FAMILIES), pipe.transformer)
    with pytest.raises(UserFileError, match="NaN|finite"):
        adapters.load(pipe, bad)
    after = _probe(DiffusionModel(pipe, FAMILIES), pipe.transformer)
    assert torch.equal(before, after)  # nothing applied from the bad file


def _matrix_rows() -> set[str]:
    """The fine-tuning table as the code has it: each method's ``families`` and what it trains."""
    from diffplug.finetune.cli import _methods
    from diffplug.finetune.trainer import Method

    columns = list(FAMILIES)
    rows = {"| method | trains | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)}
    for name, cls in _methods().items():
        families = getattr(cls, "families", SUPPORTED)
        trains = "own module" if cls.trainable is not Method.trainable else "adapter"
        rows.add(f"| {name} | {trains} | " + " | ".join("yes" if f in families else "no" for f in columns) + " |")
    return rows


@pytest.mark.parametrize("readme", ["README.md", "finetune/README.md"])
def test_readme_matrix_is_the_code(readme):
    text = (Path(__file__).parent.parent / readme).read_text()
    block = text.split("<!-- finetune-matrix")[1].split("<!-- /finetune-matrix -->")[0]
    assert {line for line in block.splitlines()[1:] if line.strip()} == _matrix_rows()


def test_finetune_accepts_both_spellings_of_built_in_models():
    from diffplug.finetune.config import ConfigError
    from diffplug.finetune.model import load_pipeline

    assert type(load_pipeline("tiny-flux")) is type(load_pipeline("tiny:flux"))
    assert type(load_pipeline("testbed-dit")).__name__ == "PixArtSigmaPipeline"
    with pytest.raises(ConfigError, match="no built-in model"):
        load_pipeline("tiny-nope")
