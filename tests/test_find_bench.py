"""benchmarks/find_bench.py's cost accounting (``PassCounter``): outermost calls counted by class, backward
passes counted only where a gradient arrived, FLOPs per sample x samples = what FlopCounterMode measures on
the same work, RNG and buffers untouched by the measuring re-runs (tiny UNet, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from find_bench import Cost, PassCounter  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    from diffplug.testing import tiny_pipeline

    return tiny_pipeline("sd").unet.eval()


def _call(unet, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g)
    text = torch.randn(n, 7, unet.config.cross_attention_dim, generator=g)
    return unet(x, torch.full((n,), 500), encoder_hidden_states=text).sample


def _work(unet):
    """Two no-grad calls (batch 2 and 4), one call with gradients and a backward (batch 3), one call with
    gradients and no backward (batch 1)."""
    with torch.no_grad():
        _call(unet, 2, 0)
        _call(unet, 4, 1)
    _call(unet, 3, 2).square().mean().backward()
    _call(unet, 1, 3)
    unet.zero_grad(set_to_none=True)


def test_counts_and_flops_add_up(unet):
    with PassCounter() as pc:
        _work(unet)
    s = pc.summary()
    assert set(s["kinds"]) == {"UNet2DConditionModel"}, s  # submodules are inside the counted call
    k = s["kinds"]["UNet2DConditionModel"]
    assert (k["calls"], k["samples"], k["backward_samples"]) == (4, 10, 3)
    (fwd,) = set(pc.per_sample.values())  # one input shape per sample
    (bwd,) = set(pc.per_sample_bwd.values())
    assert fwd > 0 and bwd > 0
    # full-parameter backward: input and weight gradients, about 2x the forward (measured, not assumed)
    assert 1.5 < bwd / fwd < 2.5, bwd / fwd
    assert k["gflops_fwd"] == pytest.approx(10 * fwd / 1e9)
    assert k["gflops_bwd"] == pytest.approx(3 * bwd / 1e9)
    assert s["total_gflops"] == pytest.approx(k["gflops_fwd"] + k["gflops_bwd"])
    # the same work under one FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        _work(unet)
    assert s["total_gflops"] * 1e9 == pytest.approx(fc.get_total_flops(), rel=1e-6)


def test_frozen_weights_measure_a_smaller_backward(unet):
    """Only the last layer trains (as an adapter would): the backward FLOPs per sample are measured with
    the call's own requires_grad, so they are less than with every weight trained."""
    with PassCounter() as full:
        _call(unet, 2, 0).sum().backward()
    unet.requires_grad_(False)
    unet.conv_out.requires_grad_(True)
    try:
        with PassCounter() as part:
            _call(unet, 2, 0).sum().backward()
    finally:
        unet.requires_grad_(True)
        unet.zero_grad(set_to_none=True)
    (b_full,), (b_part,) = set(full.per_sample_bwd.values()), set(part.per_sample_bwd.values())
    assert 0 < b_part < 0.5 * b_full


def test_outermost_only_and_state_untouched():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    outer = torch.nn.Sequential(inner, torch.nn.Linear(8, 2)).train()
    x = torch.randn(5, 8)

    def run():
        torch.manual_seed(1)
        ys = [outer(x) for _ in range(2)]
        ys[0].sum().backward()  # the graph of a counted call stays valid (its buffers are not written)
        grad = outer[1].weight.grad.clone()
        outer.zero_grad(set_to_none=True)
        return ys + [grad], inner[1].running_mean.clone()

    state = {k: v.clone() for k, v in outer.state_dict().items()}
    plain, stats_plain = run()
    outer.load_state_dict(state)
    with PassCounter() as pc:
        counted, stats_counted = run()
    assert dict(pc.calls) == {"Sequential": 2}  # the outer Sequential only
    assert pc.samples["Sequential"] == 10 and pc.backward_samples["Sequential"] == 5  # one of the two had a backward
    for a, b in zip(plain, counted):  # dropout's RNG, BatchNorm's statistics, gradients as without the counter
        assert torch.equal(a, b)
    assert torch.equal(stats_plain, stats_counted)
    # linear layers only: 2 * 5 * (8 * 8 + 8 * 2) per call; backward: input and weight gradients of the last
    # layer, weight gradient of the first (its input needs none), for the 5 samples that had one
    k = pc.summary()["kinds"]["Sequential"]
    assert k["gflops_fwd"] * 1e9 == pytest.approx(2 * 2 * 5 * (64 + 16))
    assert k["gflops_bwd"] * 1e9 == pytest.approx(2 * 5 * (2 * 16 + 64))


def test_hooks_removed_and_cost_record(unet):
    with Cost() as c:
        with torch.no_grad():
            _call(unet, 2, 0)
    with torch.no_grad():
        _call(unet, 2, 0)  # after the block: not counted
    r = c.record()
    assert r["kinds"]["UNet2DConditionModel"]["samples"] == 2
    assert r["wall_seconds"] >= 0 and r["cpu_seconds"] >= 0 and r["measure_seconds"] > 0
