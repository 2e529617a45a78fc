"""DeeDiff early exit: threshold 0 is the wrapped model bit for bit, exited rows skip compute
(counted), per-sample exits equal running samples alone, the loss trains heads and UEMs, heads I/O,
the stock PixArt pipeline, diffplug's loop and the CLI; ``finetune deediff`` on a tiny PixArt."""

import json

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from diffplug.finetune.deediff import deediff_loss, per_token
from diffplug.pipelines import from_pipe
from diffplug.samplers import EarlyExit
from diffplug.samplers.early_exit import check_threshold
from diffplug.testing import tiny_pipeline

ADDED = {"resolution": None, "aspect_ratio": None}


def _transformer(layers=4, out_channels=8, seed=0):
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=out_channels, num_layers=layers,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=24,
        norm_type="ada_norm_single", use_additional_conditions=False,
    ).eval()


def _inputs(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 5, 24, generator=g)
    mask = torch.ones(batch, 5)
    mask[::2, 3:] = 0
    t = torch.linspace(999, 1, batch).long()
    return x, dict(encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=ADDED)


def _split_by_time(ee: EarlyExit, layer: int = 1):
    """UEM of ``layer``: very certain for t < 500, very uncertain for t >= 500 (2 timestep buckets)."""
    uem = ee.uems[layer - 1]
    with torch.no_grad():
        uem.bias.copy_(torch.tensor([-6.0, 6.0]))


def _block_rows(ee: EarlyExit) -> list[list[int]]:
    """Rows each block receives, recorded by forward hooks."""
    rows = [[] for _ in ee.transformer.transformer_blocks]
    for i, block in enumerate(ee.transformer.transformer_blocks):
        block.register_forward_hook(lambda m, args, out, i=i: rows[i].append(out.shape[0]))
    return rows


@torch.no_grad()
def test_threshold_zero_is_the_wrapped_model_exactly():
    tr = _transformer()
    ee = EarlyExit(tr, threshold=0.0)
    x, kw = _inputs()
    assert torch.equal(ee(x, **kw).sample, tr(x, **kw).sample)
    assert torch.equal(ee(x, **kw, return_dict=False)[0], tr(x, **kw, return_dict=False)[0])
    assert ee.stats()["mean_blocks"] == 4.0 and ee.stats()["exits_per_block"] == [0, 0, 0, 12]


@torch.no_grad()
def test_threshold_one_exits_after_block_one_and_later_blocks_never_run():
    ee = EarlyExit(_transformer(), threshold=1.0)  # untrained UEMs give u = 0.5 < 1
    rows = _block_rows(ee)
    x, kw = _inputs()
    out = ee(x, **kw).sample
    assert rows == [[6], [], [], []]
    assert ee.stats()["blocks_executed"] == 6 and ee.stats()["exits_per_block"] == [6, 0, 0, 0]
    p = ee.embed(x, **kw)
    p.x = ee.transformer.transformer_blocks[0](p.x, encoder_hidden_states=p.rows["ctx"],
                                               encoder_attention_mask=p.rows["ctx_mask"], timestep=p.rows["temb"])
    torch.testing.assert_close(out, ee.head(1, p))


@torch.no_grad()
def test_exited_rows_skip_later_blocks_and_match_running_alone():
    ee = EarlyExit(_transformer(), uem_buckets=2, threshold=0.5)
    _split_by_time(ee)
    rows = _block_rows(ee)
    x, kw = _inputs(batch=6)  # timesteps 999 .. 1: three rows at t >= 500
    out = ee(x, **kw).sample
    assert rows == [[6], [3], [3], [3]]  # the three certain rows left after block 1
    assert ee.stats()["blocks_executed"] == 6 + 3 * 3 and ee.stats()["exits_per_block"] == [3, 0, 0, 3]
    alone = torch.cat([
        ee(x[i : i + 1], **{k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in kw.items()}).sample
        for i in range(6)
    ])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    full = ee.transformer(x, **kw).sample
    torch.testing.assert_close(out[:3], full[:3], atol=1e-5, rtol=1e-5)  # uncertain rows ran every block


def test_loss_reaches_heads_and_uems_and_targets_are_in_unit_interval():
    ee = EarlyExit(_transformer(out_channels=8))
    x, kw = _inputs()
    eps = torch.randn_like(x)
    preds, us = ee(x, **kw, return_all_exits=True)
    assert len(preds) == 4 and len(us) == 3 and us[0].shape == (6, 16)
    loss, logs = deediff_loss(preds, us, eps, patch=2)
    loss.backward()
    for i in range(3):
        assert ee.heads[i].proj_out.weight.grad.abs().sum() > 0
        assert ee.heads[i].scale_shift_table.grad.abs().sum() > 0
        for p in ee.uems[i].parameters():
            assert p.grad.abs().sum() > 0
    target = per_token(torch.tanh((preds[0][:, :4] - eps).abs()), 2)
    assert target.min() >= 0 and target.max() < 1 and target.shape == (6, 16)
    assert set(logs) >= {"l_simple", "l_u", "l_ual", "u_1", "u_hat_3"}


def test_heads_save_load_and_mismatch(tmp_path):
    ee = EarlyExit(_transformer(), uem_buckets=2, threshold=0.5)
    _split_by_time(ee)
    with torch.no_grad():
        ee.heads[1].proj_out.weight.add_(0.1)
    path = ee.save_heads(tmp_path / "heads.safetensors")
    again = EarlyExit(_transformer(), heads=path, threshold=0.5)
    for k, v in ee.heads_state().items():
        assert torch.equal(v, again.heads_state()[k]), k
    with pytest.raises(ValueError, match="another model"):
        EarlyExit(_transformer(layers=3), heads=path)
    with pytest.raises(ValueError, match="none.safetensors: no such file.*finetune deediff"):
        EarlyExit(_transformer(), heads=tmp_path / "none.safetensors")


def test_bad_input():
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="threshold: must be a number in \\[0, 1\\]"):
            check_threshold(bad)
    ee = EarlyExit(_transformer())
    with pytest.raises(ValueError, match="threshold"):
        ee.threshold = 2
    with pytest.raises(TypeError, match="PixArtTransformer2DModel"):
        EarlyExit(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_stock_pipeline_and_diffplug_loop():
    pipe = tiny_pipeline("pixart")
    call = dict(prompt=["a cat", "a dog"], num_inference_steps=3, output_type="latent", max_sequence_length=32)
    stock = pipe(**call, generator=torch.manual_seed(0), use_resolution_binning=False).images
    loop = from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images
    original = pipe.transformer
    pipe.transformer = EarlyExit(original, threshold=0.0)
    assert pipe.transformer.config is original.config and pipe.transformer.dtype == original.dtype
    assert torch.equal(pipe(**call, generator=torch.manual_seed(0), use_resolution_binning=False).images, stock)
    assert torch.equal(from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images, loop)
    pipe.transformer.threshold = 1.0  # every row exits after block 1 (of 2): cond and uncond passes alike
    pipe.transformer.reset_stats()
    out = from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images
    assert pipe.transformer.stats()["exits_per_block"] == [12, 0] and not torch.equal(out, loop)


def test_testbed_heads_ship_and_exit():
    ee = EarlyExit.from_testbed(threshold=0.0)
    assert ee.heads_config()["num_layers"] == 4
    from diffplug.testbed.models import load_model

    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(encoder_hidden_states=torch.randn(4, 20, 384), encoder_attention_mask=torch.ones(4, 20),
              timestep=torch.tensor([999, 900, 100, 10]), added_cond_kwargs=ADDED)
    with torch.no_grad():
        assert torch.equal(ee(x, **kw).sample, load_model("dit")(x, **kw).sample)
        ee.threshold = 1.0
        ee(x, **kw)
    assert ee.stats()["exits_per_block"][0] == 4


def test_cli_early_exit(tmp_path):
    from diffplug.cli import main

    assert main(["sample", "--model", "testbed-dit", "--early-exit", "2", "--prompt", "a photo of a bag",
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "ee"
    assert main(["sample", "--model", "testbed-dit", "--early-exit", "0.3", "--prompt", "a photo of a bag",
                 "--steps", "3", "--device", "cpu", "--out", str(out)]) == 0
    info = json.loads((out / "settings.json").read_text())["early_exit"]
    assert info["threshold"] == 0.3 and info["rows"] == 6 and 1 <= info["mean_blocks"] <= 4


def test_deediff_config_errors_name_the_key():
    from diffplug.finetune import ConfigError
    from diffplug.finetune.deediff import DeeDiffConfig

    DeeDiffConfig(output_dir="x").validate()
    for key, value in (("data", "pairs.jsonl"), ("timesteps", "logit_normal"), ("lambda_u", -1.0), ("uem_buckets", 0), ("prompt_dropout", 1.0),
                       ("use_lora", True)):
        with pytest.raises(ConfigError, match=f"^{key}:"):
            DeeDiffConfig(output_dir="x", **{key: value}).validate()


def test_deediff_trains_pixart_heads_and_backbone(tmp_path):
    """A few steps on a tiny PixArt through the one trainer: the heads load in EarlyExit beside the saved
    backbone, threshold 0 is that backbone exactly, and the backbone moved."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file

    from diffplug.finetune.deediff import DeeDiff, DeeDiffConfig
    from diffplug.finetune.trainer import Trainer

    torch.set_num_threads(1)
    out = tmp_path / "run"
    Trainer(DeeDiff(DeeDiffConfig(output_dir=str(out), model="tiny:pixart", train_backbone=True, max_steps=3, log_every=1,
                                  train_batch_size=4, learning_rate=1e-2, lr_warmup_steps=0, lr_scheduler="constant",
                                  checkpoint_every=0, tensorboard=False, seed=0, gamma_layer=0.5))).train()
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3] and logs[-1]["loss"] < logs[0]["loss"]
    assert all(r["u_1"] != 0.5 for r in logs[1:])  # the UEMs train (they start at sigmoid(0))
    final = out / "final"
    assert json.loads((final / "early_exit.json").read_text())["backbone"] == "transformer/"
    pipe = tiny_pipeline("pixart")
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    backbone = PixArtTransformer2DModel.from_pretrained(str(final / "transformer")).eval()
    trained = load_file(str(final / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(v, base[k]) for k, v in trained.items())
    call = dict(prompt=["a cat"], num_inference_steps=2, output_type="latent", max_sequence_length=32)
    pipe.transformer = backbone
    with torch.no_grad():
        plain = from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images
        pipe.transformer = EarlyExit(backbone, heads=final / "early_exit.safetensors", threshold=0.0)
        assert torch.equal(from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images, plain)
        pipe.transformer.threshold = 1.0
        exited = from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images
    assert torch.isfinite(exited).all() and not torch.equal(exited, plain)


# -- bad heads files (issue 24, bad case 3): one clear error naming the file, nothing applied ---------------


def _heads_file(tmp_path, buckets=16, name="heads.safetensors"):
    ee = EarlyExit(_transformer(), uem_buckets=buckets)
    with torch.no_grad():
        for p in ee.uems.parameters():
            p.add_(0.25)
    return ee, ee.save_heads(tmp_path / name)


def _rewrite(path, **changes):
    """The heads file at ``path`` with some tensors replaced (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state.update({k.replace("__", "."): v for k, v in changes.items()})
    save_file(state, str(path), metadata=meta)
    return path


def _refused(call, path, *words):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    for word in (str(path), *words):
        assert word in msg, (word, msg)
    return msg


def test_nan_heads_are_refused_naming_the_file(tmp_path):
    _, path = _heads_file(tmp_path)
    bad = torch.full((32,), float("nan"))
    _rewrite(path, heads__2__proj_out__bias=bad)  # the UEMs intact, as in the probe
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "heads.2.proj_out.bias", "non-finite", "finetune deediff")


def test_a_scalar_where_a_bias_belongs_is_not_broadcast(tmp_path):
    _, path = _heads_file(tmp_path, buckets=16)
    _rewrite(path, uems__0__bias=torch.zeros(1))
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "uems.0.bias", "(1,)", "(16,)")
    _, path = _heads_file(tmp_path, buckets=1, name="h1.safetensors")
    _rewrite(path, heads__0__proj_out__bias=torch.zeros(1))
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "heads.0.proj_out.bias", "(1,)", "(32,)")


def test_truncated_huge_header_wrong_shape_and_damaged_config(tmp_path):
    _, path = _heads_file(tmp_path)
    data = path.read_bytes()
    for cut in (5, 100, len(data) - 7):
        path.write_bytes(data[:cut])
        _refused(lambda: EarlyExit(_transformer(), heads=path), path, "truncated")
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "header")
    path.write_bytes(data)
    _rewrite(path, heads__1__proj_out__weight=torch.zeros(32, 15))
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "heads.1.proj_out.weight", "(32, 15)", "(32, 16)")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(path), metadata={"diffplug_early_exit": "{not json"})
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "damaged diffplug_early_exit config")
    save_file({"x": torch.zeros(1)}, str(path), metadata={"diffplug_early_exit": json.dumps({"uem_buckets": -3})})
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "uem_buckets -3")
    save_file({"x": torch.zeros(1)}, str(path))
    _refused(lambda: EarlyExit(_transformer(), heads=path), path, "not an early-exit heads file")


def test_nothing_is_applied_until_every_tensor_is_checked(tmp_path):
    ee, path = _heads_file(tmp_path)
    other = EarlyExit(_transformer(), uem_buckets=16)  # fresh heads: every tensor differs from the file's UEMs
    before = {k: v.clone() for k, v in other.heads_state().items()}
    keys = sorted(before)
    _rewrite(path, **{keys[-1].replace(".", "__"): torch.full_like(before[keys[-1]], float("inf"))})  # the last key read
    _refused(lambda: other.load_heads(path), path, keys[-1])
    assert all(torch.equal(v, other.heads_state()[k]) for k, v in before.items())
    pipe = tiny_pipeline("pixart")
    original = pipe.transformer
    with pytest.raises(ValueError):
        from diffplug.samplers.early_exit import attach

        attach(pipe, 0.3, path)
    assert pipe.transformer is original


def test_cli_bad_heads_exit_2_naming_the_file(tmp_path, capsys):
    from diffplug.cli import main

    ee = EarlyExit.from_testbed()
    path = ee.save_heads(tmp_path / "heads.safetensors")
    _rewrite(path, uems__1__bias=torch.tensor([float("nan")]))
    out = tmp_path / "out"
    assert main(["sample", "--model", "testbed-dit", "--early-exit", "0.3", "--early-exit-heads", str(path),
                 "--prompt", "a photo of a bag", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "uems.1.bias" in err and not (out / "settings.json").exists()
