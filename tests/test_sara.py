"""SaRA (finetune/sara.py) and `diffplug finetune sft`: selection, sparse training, the rank
penalty, progressive re-selection, files, and the trainer's adapter choice."""

import copy

import pytest
import torch
from safetensors import safe_open

from diffplug.finetune import sara
from diffplug.finetune.config import ConfigError, build_config
from diffplug.finetune.sft import SFTConfig


@pytest.fixture(scope="module")
def base_unet():
    from diffplug import testbed

    return testbed.load("sd").unet.eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 600]), torch.randn(2, 8, 384, generator=g)


def _train(unet, params, steps=3, lr=1e-2):
    x, t, c = _inputs()
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        unet(x, t, c).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("kw", [dict(fraction=0.15), dict(threshold=2e-3)])
def test_selection_is_exactly_the_small_entries(base_unet, kw):
    unet = copy.deepcopy(base_unet)
    weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
    sara.prepare(unet, **kw)
    a = sara.adapter_of(unet)
    tau = kw.get("threshold", a.threshold)
    small = {n: (w.reshape(-1).abs() < tau) for n, w in weights.items()}
    measured = sum(int(m.sum()) for m in small.values()) / sum(m.numel() for m in small.values())
    assert a.report()["fraction"] == pytest.approx(measured, abs=0)
    if "fraction" in kw:
        assert kw["fraction"] <= measured < kw["fraction"] + 1e-4  # ties at the threshold (fp16-stored weights)
    else:
        assert 0.01 < measured < 0.03  # the official 2e-3 selects only ~2 % of the testbed UNet
    for s in a.slots:
        assert torch.equal(torch.nonzero(small[s.name]).flatten(), s.index.long())
    assert set(a.report()["kinds"]) >= {"Conv2d.weight", "Linear.weight"}


def test_untouched_entries_bit_identical_and_sparse_state(base_unet):
    unet = copy.deepcopy(base_unet)
    keys = list(unet.state_dict())
    params = sara.prepare(unet, fraction=0.1)
    opt = _train(unet, params)
    assert list(unet.state_dict()) == keys  # diffusers' keys, no sara_* entries
    a = sara.adapter_of(unet)
    selected = {s.name: s.index.long() for s in a.slots}
    changed = 0
    for name, p in unet.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("sara_"):
            continue
        assert p.grad is None and not p.requires_grad
        diff = (p.detach() != dict(base_unet.named_parameters())[name].detach()).reshape(-1)
        outside = torch.ones_like(diff)
        if name in selected:
            outside[selected[name]] = False
            changed += int(diff.sum())
        assert not diff[outside].any(), name
    assert changed > 0.5 * a.num_trainable()
    state = sum(t.numel() for st in opt.state.values() for t in st.values() if t.dim() > 0)
    assert state == 2 * a.num_trainable()  # Adam moments for the selected entries only


def test_rank_penalty_reaches_trainable_entries_and_lowers_nuclear_norm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 96, bias=False)
    with torch.no_grad():
        lin.weight.mul_(0.01)
    params = sara.prepare(lin, fraction=0.5)
    s = sara.adapter_of(lin).slots[0]

    def nuclear():
        dense = torch.zeros(lin.weight.numel()).index_put((s.active,), s.delta.detach())
        return float(torch.linalg.matrix_norm(dense.view(96, 96), ord="nuc"))

    before = nuclear()
    opt = torch.optim.SGD(params, lr=2e-5)  # subgradient steps: ||U V^T||_F ~ sqrt(96), small steps
    for step in range(10):
        penalty = sara.rank_penalty(lin, step, weight=1.0, min_dim=64)
        penalty.backward()
        if step == 0:
            assert s.delta.grad is not None and s.delta.grad.abs().sum() > 0  # the official adamw.py's grad stays None
        opt.step()
        opt.zero_grad()
    assert nuclear() < 0.95 * before
    assert float(sara.rank_penalty(lin, 0, min_dim=96)) == 0.0  # no weight with min(shape) > 96: no penalty


def test_progressive_reselection_shrinks_to_still_small(base_unet):
    unet = copy.deepcopy(base_unet)
    params = sara.prepare(unet, fraction=0.1)
    a = sara.adapter_of(unet)
    opt = torch.optim.AdamW(params, lr=1e-2)
    _train(unet, params, steps=1)
    grown = [(s, s.delta.detach().abs() >= a.threshold) for s in a.slots]
    assert sum(int(m.sum()) for _, m in grown) > 0
    pairs = sara.reselect(unet, opt)
    for (s, big), (old, new, keep) in zip(grown, pairs):
        assert torch.equal(keep, ~big) and new.numel() == int(keep.sum()) and old not in opt.state
        assert torch.equal(s.delta.detach(), old.detach()[keep])
        frozen = s.index.long()[torch.isin(s.index, s.active, invert=True)]
        assert torch.equal(s.weight.detach().reshape(-1)[frozen], old.detach()[big].to(s.weight.dtype))
    assert all(p is s.delta for p, s in zip(opt.param_groups[0]["params"], a.slots))
    w_frozen = {s.name: s.weight.detach().clone() for s in a.slots}
    _train(unet, a.parameters(), steps=1)  # training goes on with the smaller set
    for s in a.slots:
        frozen = s.index.long()[torch.isin(s.index, s.active, invert=True)]
        assert torch.equal(s.weight.detach().reshape(-1)[frozen], w_frozen[s.name].reshape(-1)[frozen])


def test_save_load_merge_round_trip_and_wrong_base(base_unet, tmp_path):
    unet = copy.deepcopy(base_unet)
    params = sara.prepare(unet, fraction=0.1)
    _train(unet, params)
    x, t, c = _inputs()
    with torch.no_grad():
        trained = unet(x, t, c).sample
        with sara.disabled(unet):
            assert torch.equal(unet(x, t, c).sample, base_unet(x, t, c).sample)  # the reference = the base
    path = sara.save(unet, tmp_path / "final")
    with safe_open(str(path), "pt") as f:
        assert float(f.metadata()["threshold"]) == sara.adapter_of(unet).threshold and len(f.metadata()["base_sha256"]) == 64
        assert all(k.endswith((".index", ".values")) for k in f.keys())
    fresh = copy.deepcopy(base_unet)
    keys = list(fresh.state_dict())
    assert sara.load(fresh, tmp_path / "final") is fresh and list(fresh.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(fresh(x, t, c).sample, trained)
    dense = sara.merge(unet)
    assert sara.adapter_of(dense) is None and list(dense.state_dict()) == keys
    assert not any("sara_" in n for n, _ in dense.named_parameters())
    dense.save_pretrained(str(tmp_path / "dense"))
    reloaded = type(base_unet).from_pretrained(str(tmp_path / "dense"), use_safetensors=True)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, c).sample, trained)
    with pytest.raises(sara.SaRAError, match="another base model"):
        sara.load(fresh, tmp_path / "final")  # already changed: not the base any more
    with pytest.raises(sara.SaRAError, match="not both"):
        sara.prepare(copy.deepcopy(base_unet), threshold=1e-3, fraction=0.1)


def test_config_adapter_choice_and_use_lora_alias():
    cfg = build_config(SFTConfig, {"output_dir": "o"})
    assert cfg.trained_adapter == "lora" and cfg.sara_reselect_at == cfg.max_steps // 2
    assert build_config(SFTConfig, {"output_dir": "o", "use_lora": "false"}).trained_adapter == "full"
    with pytest.raises(ConfigError, match="use_lora: False contradicts adapter 'sara'"):
        build_config(SFTConfig, {"output_dir": "o", "adapter": "sara", "use_lora": "false"})
    with pytest.raises(ConfigError, match="sara_threshold, sara_fraction"):
        build_config(SFTConfig, {"output_dir": "o", "adapter": "sara", "sara_threshold": "2e-3", "sara_fraction": "0.1"})
    with pytest.raises(ConfigError, match="testbed:emoji"):
        from diffplug.finetune.sft import CaptionedImages

        CaptionedImages("testbed:nope", 32)


def _sft(out, *extra):
    from diffplug.finetune.cli import main

    argv = ["sft", "--data", "testbed:food-drink", "--output_dir", str(out), "--seed", "0", "--train_batch_size", "2",
            "--log_every", "1", "--tensorboard", "false", "--learning_rate", "1e-3", *extra]
    assert main(argv) == 0


def test_sft_sara_resumes_exactly_across_reselection(tmp_path):
    common = ["--adapter", "sara", "--sara_progressive_step", "2", "--sara_rank_min_dim", "16", "--checkpoint_every", "3"]
    _sft(tmp_path / "a", "--max_steps", "4", *common)
    _sft(tmp_path / "b", "--max_steps", "3", *common)
    _sft(tmp_path / "b", "--max_steps", "4", "--resume", "latest", *common)
    read = lambda p: open(p).read().splitlines()  # noqa: E731
    assert read(tmp_path / "a" / "logs.jsonl") == read(tmp_path / "b" / "logs.jsonl")
    files = [safe_open(str(tmp_path / r / "final" / sara.FILE), "pt") for r in "ab"]
    assert sorted(files[0].keys()) == sorted(files[1].keys())
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())


def test_sft_lora_and_full_run(tmp_path):
    _sft(tmp_path / "lora", "--adapter", "lora", "--max_steps", "2")
    assert (tmp_path / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()
    _sft(tmp_path / "full", "--adapter", "full", "--max_steps", "2")
    assert (tmp_path / "full" / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
