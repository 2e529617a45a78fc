"""GPU fast path: replay the denoiser from CUDA graphs.

At small batch the denoiser is launch-bound (an SD1.5-shape UNet in fp16 on an H200: 27.4 ms eager,
11.9 ms replayed from a graph at batch 2; benchmarks/loop_results.md). ``CUDAGraphModel`` wraps a
family's ``model(x, t, **fields)``: the first call with a new input signature (shapes and dtypes)
warms up on a side stream and captures a graph; later calls copy their inputs into the captured
buffers and replay. Guidance and scheduler maths stay eager and tensor-only (``syncs.py`` counts
the host syncs per step), so the step around the graph launches asynchronously.

``from_pipe(pipe, cuda_graph=...)`` (:class:`GraphChoice`):

* ``None`` (default, auto): graphs when the pipeline runs on CUDA and the model allows them; on a
  CPU eager, silently; on CUDA where they cannot be used, eager with one warning saying why
  (CPU offload hooks, a torch.compile'd denoiser, a guider that patches the model per condition,
  a non-tensor model input, a failed capture, more than ``max_graphs`` input signatures).
* ``True``: graphs or a ``ValueError`` saying why not (on a CPU: at ``from_pipe``).
* ``False``: always eager.

Each signature holds its own buffers and graph, so a guidance that changes the number of passes
(AG dropping the unconditional pass) captures one graph per batch size. Graphs are dropped and
re-captured when the denoiser's modules or parameter storage change (a LoRA loaded, ``.to()``).
"""

from __future__ import annotations

import warnings

import torch

from ..guidance.base import Guidance


def _refuse_or_warn(reason: str, strict: bool, warned: set, stacklevel: int = 3) -> None:
    """Graphs cannot be used for ``reason``: an error when they were asked for (``cuda_graph=True``),
    else one warning per reason (the caller then runs eagerly)."""
    if strict:
        raise ValueError(f"cuda_graph=True: {reason}; pass cuda_graph=None (auto) or False to run eagerly")
    if reason not in warned:
        warned.add(reason)
        warnings.warn(f"CUDA graphs off, running the denoiser eagerly: {reason}", stacklevel=stacklevel)


class CUDAGraphModel:
    """``model(x, t, **fields)`` replayed from one CUDA graph per input signature.

    ``strict=False`` (auto mode): a call that cannot be graphed runs eagerly after one warning."""

    def __init__(self, model, warmup: int = 2, strict: bool = True, max_graphs: int = 8):
        self.model, self.warmup, self.strict, self.max_graphs = model, warmup, strict, max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None  # one memory pool shared by every captured graph, made on first capture
        self.eager_reason: str | None = None  # set once a capture failed: eager from then on
        self._warned: set[str] = set()

    @staticmethod
    def _signature(x, t, fields) -> tuple:
        return (tuple(x.shape), x.dtype, tuple(t.shape)) + tuple(
            (k, tuple(v.shape), v.dtype) for k, v in sorted(fields.items())
        )

    def _capture(self, x, t, fields):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_x, static_t = x.clone(), t.clone()
        static_fields = {k: v.clone() for k, v in fields.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.model(static_x, static_t, **static_fields)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.model(static_x, static_t, **static_fields)
        return graph, static_x, static_t, static_fields, static_out

    def _eager(self, reason: str, x, t, fields, *, forever: bool = False):
        _refuse_or_warn(reason, self.strict, self._warned, stacklevel=5)
        if forever:
            self.eager_reason = reason
        return self.model(x, t, **fields)

    def __call__(self, x: torch.Tensor, t, **fields) -> torch.Tensor:
        if self.eager_reason:
            return self.model(x, t, **fields)
        t = torch.as_tensor(t, device=x.device)
        loose = [k for k, v in fields.items() if not isinstance(v, torch.Tensor)]
        if loose:
            return self._eager(f"model inputs {loose} are not tensors", x, t, fields)
        key = self._signature(x, t, fields)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(f"more than max_graphs={self.max_graphs} input signatures", x, t, fields)
            try:
                self.graphs[key] = self._capture(x, t, fields)
            except Exception as err:  # e.g. a host sync or a CPU tensor inside the model
                if self.strict:
                    raise
                return self._eager(f"capture failed ({type(err).__name__}: {err})", x, t, fields, forever=True)
        graph, static_x, static_t, static_fields, static_out = self.graphs[key]
        static_x.copy_(x)
        static_t.copy_(t)
        for k, v in fields.items():
            static_fields[k].copy_(v)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out


def graph_blocker(family, guidance=None) -> str | None:
    """Why ``family``'s denoiser cannot be replayed from CUDA graphs with ``guidance`` (None: it can)."""
    if getattr(family, "no_cuda_graph", None):  # the family's model call itself (e.g. a host read)
        return family.no_cuda_graph
    device = family.device
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the pipeline runs on {device}, not a CUDA device (move it with pipe.to('cuda'))"
    denoiser = family.denoiser
    if hasattr(denoiser, "_orig_mod"):  # torch.compile's OptimizedModule
        return "the denoiser is torch.compile'd (use mode='reduce-overhead' for its own graphs)"
    if any(hasattr(m, "_hf_hook") for m in denoiser.modules()):
        return "the denoiser has accelerate hooks (CPU offload moves its weights during each call)"
    if guidance is not None and not isinstance(guidance, Guidance):
        return f"{type(guidance).__name__} patches the model per condition (prepare_models)"
    return None


def _fingerprint(denoiser) -> tuple:
    return tuple(id(m) for m in denoiser.modules()) + tuple(p.data_ptr() for p in denoiser.parameters())


class GraphChoice:
    """Which model a ``from_pipe`` call runs, for ``cuda_graph`` True / False / None (auto)."""

    def __init__(self, family, cuda_graph: bool | None = None):
        if cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be None (auto), True or False, got {cuda_graph!r}")
        self.family, self.setting = family, cuda_graph
        self.graphs: CUDAGraphModel | None = None
        self._key = None
        self._warned: set[str] = set()
        if cuda_graph and (reason := graph_blocker(family)):
            _refuse_or_warn(reason, True, self._warned)

    def model(self, guidance=None):
        """The family's model, or its graphed twin when graphs can be used for this call."""
        eager = self.family.model
        if self.setting is False or (self.setting is None and self.family.device.type != "cuda"):
            return eager  # off, or auto on a CPU: eager without a word
        reason = graph_blocker(self.family, guidance)
        if reason:
            _refuse_or_warn(reason, bool(self.setting), self._warned, stacklevel=4)
            return eager
        key = _fingerprint(self.family.denoiser)
        if self.graphs is None or key != self._key:
            self.graphs, self._key = CUDAGraphModel(eager, strict=bool(self.setting)), key
        return self.graphs
