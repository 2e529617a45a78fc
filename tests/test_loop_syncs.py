"""The loop stays asynchronous (no host syncs inside a step) and picks CUDA graphs sensibly.

Syncs are counted on a CPU by ``diffplug.pipelines.syncs.HostSyncs``, which emulates where a GPU
would block; the CUDA-graph choice is tested through its decision logic (no GPU needed).
"""

import warnings

import pytest
import torch

from diffplug import samplers
from diffplug.guidance import CFG
from diffplug.pipelines import from_pipe
from diffplug.pipelines.graphs import CUDAGraphModel, GraphChoice, graph_blocker
from diffplug.pipelines.registry import make_scheduler
from diffplug.pipelines.syncs import HostSyncs, per_step
from diffplug.testing import tiny_pipeline

STEPS = 5  # DC-Solver's default (CPR-fitted) ratios cover 5-10 steps


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline("sd")
    p.set_progress_bar_config(disable=True)
    return p


def _set_scheduler(pipe, name):
    if name == "fast-unipc":
        pipe.scheduler = samplers.FastUniPCScheduler.from_config(pipe.scheduler.config)
    elif name == "dc-solver":  # the stock loop cannot tell DC-Solver the scale; from_pipe does (5.0)
        pipe.scheduler = make_scheduler(name, pipe, cpr_guidance_scale=5.0)
    else:
        pipe.scheduler = make_scheduler(name, pipe)


def test_counter_sees_device_reads_and_copies_but_not_host_reads():
    weight, to = torch.nn.Linear(3, 3), torch.Tensor.to
    with HostSyncs(weight) as counter:
        host = torch.arange(4.0)
        y = weight(torch.ones(3))  # computed from device-resident parameters
        assert counter.syncs == 0
        float(host[1]), host.tolist(), host[host > 1]  # host memory: no sync
        assert counter.syncs == 0
        y.sum().item()
        bool(y[0] > 0)
        y.tolist()
        y.cpu()
        assert counter.syncs == 4
        moved = host.to(torch.device("cpu"))  # the execution device: a host->device copy
        assert counter.syncs == 5 and counter.on_device(moved) and not counter.on_device(host)
        moved.to("cpu")  # explicitly to the host: a device->host copy
        assert counter.syncs == 6
        assert counter.ops > 0
    assert torch.Tensor.to is to  # methods restored on exit
    assert torch.Tensor.tolist(torch.ones(2)) == [1.0, 1.0]


SCHEDULERS = ["ddim", "dpm++", "dc-solver"] + (["fast-unipc"] if hasattr(samplers, "FastUniPCScheduler") else [])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cfg_step_has_no_host_sync(pipe, scheduler):
    _set_scheduler(pipe, scheduler)
    call = dict(guidance_scale=5.0, output_type="latent")
    ours = per_step(from_pipe(pipe, guidance=CFG(5.0)), "a photo of a bag", STEPS, **call)
    assert ours["syncs_per_step"] == 0, ours["sites"]
    stock = per_step(pipe, "a photo of a bag", STEPS, **call)
    # one op more than stock per step: stock concatenates (uncond, cond) embeddings once, we per step
    assert ours["ops_per_step"] <= stock["ops_per_step"] + 1, (ours["ops_per_step"], stock["ops_per_step"])


def test_stock_ddim_syncs_per_step_where_the_loop_does_not(pipe):
    # the counter can fail: stock hands DDIM a device timestep, which indexes a CPU table
    _set_scheduler(pipe, "ddim")
    stock = per_step(pipe, "a photo of a bag", STEPS, guidance_scale=5.0, output_type="latent")
    assert stock["syncs_per_step"] >= 2
    assert any("scheduling_ddim" in site for site in stock["sites"])


# -- CUDA graphs: the decision (cuda_graph None = auto, True, False) ---------------------------------


class _Family:
    """The parts of a family adapter the graph decision reads."""

    def __init__(self, device="cuda", denoiser=None):
        self.device = torch.device(device)
        self.denoiser = denoiser if denoiser is not None else torch.nn.Linear(2, 2)

    def model(self, x, t, **fields):
        return x * 2


def test_auto_on_cpu_is_eager_without_warning(pipe):
    _set_scheduler(pipe, "dpm++")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run = from_pipe(pipe)
        assert not isinstance(run.graphs.model(run.guidance), CUDAGraphModel)
        run("a photo of a bag", num_inference_steps=2, output_type="latent")
    assert not [w for w in record if "graph" in str(w.message).lower()]


def test_explicit_true_on_cpu_and_bad_values_are_clear_errors(pipe):
    with pytest.raises(ValueError, match=r"cuda_graph=True: the pipeline runs on cpu.*cuda_graph=None"):
        from_pipe(pipe, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be None"):
        from_pipe(pipe, cuda_graph="yes")
    assert not isinstance(from_pipe(pipe, cuda_graph=False).graphs.model(), CUDAGraphModel)


def test_blockers_name_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert graph_blocker(_Family()) is None
    assert "runs on cpu" in graph_blocker(_Family("cpu"))
    offloaded = torch.nn.Linear(2, 2)
    offloaded._hf_hook = object()  # what accelerate's cpu offload attaches
    assert "accelerate hooks" in graph_blocker(_Family(denoiser=offloaded))
    compiled = torch.nn.Linear(2, 2)
    compiled._orig_mod = torch.nn.Linear(2, 2)  # torch.compile's OptimizedModule
    assert "torch.compile" in graph_blocker(_Family(denoiser=compiled))
    assert graph_blocker(_Family(), CFG(5.0)) is None
    assert "prepare_models" in graph_blocker(_Family(), object())


def test_auto_on_cuda_graphs_or_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    family = _Family()
    choice = GraphChoice(family)
    graphed = choice.model(CFG(5.0))
    assert isinstance(graphed, CUDAGraphModel) and not graphed.strict
    assert choice.model(CFG(5.0)) is graphed  # kept while the denoiser is unchanged
    family.denoiser = torch.nn.Linear(2, 2)  # new weights (a LoRA, a reload): capture again
    assert choice.model(CFG(5.0)) is not graphed
    with pytest.warns(UserWarning, match="prepare_models") as record:
        eager = choice.model(object())
        choice.model(object())
    assert len(record) == 1 and not isinstance(eager, CUDAGraphModel)
    with pytest.raises(ValueError, match="prepare_models"):
        GraphChoice(family, True).model(object())


def test_graph_model_falls_back_with_one_warning(monkeypatch):
    model = CUDAGraphModel(lambda x, t, **f: x + 1, strict=False)

    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(model, "_capture", fail)
    x = torch.zeros(2)
    with pytest.warns(UserWarning, match="capture failed") as record:
        assert torch.equal(model(x, torch.tensor(1)), x + 1)
        assert torch.equal(model(x, torch.tensor(1)), x + 1)
    assert len(record) == 1
    with pytest.warns(UserWarning, match="not tensors"):
        CUDAGraphModel(lambda x, t, **f: x, strict=False)(x, 1, mask=None)
    with pytest.raises(ValueError, match="not tensors"):
        CUDAGraphModel(lambda x, t, **f: x)(x, 1, mask=None)
    strict = CUDAGraphModel(lambda x, t, **f: x)
    monkeypatch.setattr(strict, "_capture", fail)
    with pytest.raises(RuntimeError, match="capturing"):
        strict(x, 1)


def test_graph_model_caps_signatures():
    model = CUDAGraphModel(lambda x, t, **f: x - 1, strict=False, max_graphs=1)
    model.graphs[("other",)] = None
    with pytest.warns(UserWarning, match="max_graphs=1"):
        assert torch.equal(model(torch.ones(1), 0), torch.zeros(1))
