"""benchmarks/early_exit_bench.py on a flow model (``--model flux``), on tiny:flux-schnell (no guidance
embedding, true CFG, as the flow testbed): threshold 0 renders the full model's images bit for bit
through the bench's render path; a threshold above a UEM's output makes those calls exit after block 1
(fewer blocks, counted, placed on the trajectory by sigma); FLOPs per evaluation; the exits' errors
keyed on sigma through the training code path; the heads / backbone pairing is checked before loading."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from diffplug.samplers import EarlyExit
from diffplug.testing import tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import early_exit_bench as bench  # noqa: E402

ARGS = Namespace(model="flux", scale=3.0, steps=6, batch=2, seed=0)
PROMPTS = ["a red shirt", "a blue shoe", "a cat"]  # two batches: 2 + 1


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    pipe = tiny_pipeline("flux-schnell")
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.transformer.config.guidance_embeds
    return pipe


def _split_by_sigma(ee: EarlyExit) -> None:
    """UEM after block 1 (2 sigma buckets): very certain for sigma < 0.5, very uncertain above."""
    with torch.no_grad():
        ee.uems[0].bias.copy_(torch.tensor([-6.0, 6.0]))


@torch.no_grad()
def test_render_threshold_zero_is_the_full_model_and_a_threshold_skips_blocks(pipe):
    original = pipe.transformer
    try:
        full, _, cpu, log = bench.render(pipe, PROMPTS, ARGS, "cpu")
        assert log == [] and cpu > 0 and full.shape[0] == 3
        ee = EarlyExit(original, uem_buckets=2)
        _split_by_sigma(ee)
        pipe.transformer = ee
        same, _, _, log = bench.render(pipe, PROMPTS, ARGS, "cpu")
        n = ee.num_blocks
        assert torch.equal(same, full)  # threshold 0: the full model, bit for bit
        assert ee.stats()["mean_blocks"] == n and ee.stats()["exits_per_block"][-1] == ee.stats()["rows"]
        assert ee.stats()["rows"] == 2 * 3 * ARGS.steps  # true CFG: a conditional and an unconditional row per image and step

        ee.threshold = 0.5
        fewer, _, _, log = bench.render(pipe, PROMPTS, ARGS, "cpu")
        stats = ee.stats()
        assert 1 < stats["mean_blocks"] < n and stats["exits_per_block"][1:-1] == [0] * (n - 2)
        for key, blocks in log:  # exits exactly where sigma < 0.5: after block 1
            assert torch.equal(blocks, torch.where(key < 0.5, 1, n))
        assert not torch.equal(fewer, full) and torch.isfinite(fewer).all()
        thirds = bench.trajectory(log, ARGS.steps)
        assert thirds[0] == n and thirds[-1] == 1  # high noise first: full depth; low noise: block 1

        f = bench.flux_piece_flops(pipe, ee)
        assert len(f["blocks"]) == n and sum(c for _, c in f["kinds"].values()) == n
        assert bench.flops_per_eval(f, [0] * (n - 1) + [4], 0.0) == f["full"]
        assert bench.flops_per_eval(f, stats["exits_per_block"], 0.5) < f["full"]
    finally:
        pipe.transformer = original


@torch.no_grad()
def test_flow_head_errors_keyed_on_sigma_through_the_training_path(pipe):
    from diffplug.finetune.model import DiffusionModel

    size = pipe.default_sample_size * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    items = [(p, 0, torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)) for p in PROMPTS]
    ee = EarlyExit(pipe.transformer)
    with torch.no_grad():  # the heads differ from the final layer: exits and the full model give different errors
        for head in ee.heads:
            head.proj_out.weight.mul_(0.5)
    errors = bench.flow_head_errors(pipe, ee, items, sigmas=(0.2, 0.8))
    n = ee.num_blocks
    assert [e["t"] for e in errors] == [0.2, 0.8]
    assert all(len(e["mse"]) == n and len(e["u"]) == len(e["u_hat"]) == n - 1 for e in errors)
    assert all(u == pytest.approx(0.5) for e in errors for u in e["u"])  # untrained UEMs: sigmoid(0)
    # the last column is the bare model's velocity error on the same inputs (same noise draw)
    model = DiffusionModel(pipe, families=("flux",))
    model.resolution = size
    real = torch.stack([r for _, _, r in items]).float() / 127.5 - 1
    x0, cond = model.encode_images(real), model.encode_prompts(PROMPTS, size)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 200.0)
    x_t, target = model.noisy(x0, eps, t)
    assert torch.allclose(target, eps - x0)  # the velocity
    mse = float((model.predict(pipe.transformer, x_t, t, cond) - target).pow(2).mean())
    assert errors[0]["mse"][-1] == pytest.approx(mse, rel=1e-5)
    assert errors[0]["mse"][0] != pytest.approx(mse, rel=1e-3)


def test_flux_needs_heads_and_jointly_trained_heads_need_their_backbone(tmp_path):
    with pytest.raises(ValueError, match="--heads: --model flux has no shipped heads"):
        bench.main(["--model", "flux"])
    heads = tmp_path / "final" / "early_exit.safetensors"
    heads.parent.mkdir()
    (heads.parent / "early_exit.json").write_text(json.dumps({"backbone": "transformer/"}))
    with pytest.raises(ValueError, match=r"--backbone: .* trained jointly"):
        bench.main(["--model", "flux", "--heads", str(heads)])
