"""GPU fast path: replay the denoiser from CUDA graphs.

At small batch the denoiser is launch-bound (eager SD1.5 UNet: 36.6 ms at batch 1 against 9.6 ms
replayed from a graph on an H100). ``CUDAGraphModel`` wraps a family's ``model(x, t, **fields)``:
the first call with a new input signature (shapes and dtypes) warms up on a side stream and
captures a graph; later calls copy their inputs into the captured buffers and replay. Guidance and
scheduler maths stay eager and tensor-only (no host syncs), so the step around the graph launches
asynchronously.

Use it through ``from_pipe(pipe, ..., cuda_graph=True)``. Each signature holds its own static
buffers and graph, so a guidance that changes the number of passes (AG dropping the unconditional
pass) captures one graph per batch size.
"""

from __future__ import annotations

import torch


class CUDAGraphModel:
    def __init__(self, model, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_graph=True needs a CUDA device; run without it on CPU")
        self.model = model
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every captured graph

    @staticmethod
    def _signature(x, t, fields) -> tuple:
        return (tuple(x.shape), x.dtype, tuple(t.shape)) + tuple(
            (k, tuple(v.shape), v.dtype) for k, v in sorted(fields.items())
        )

    def _capture(self, x, t, fields):
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

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **fields) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        key = self._signature(x, t, fields)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, fields)
        graph, static_x, static_t, static_fields, static_out = self.graphs[key]
        static_x.copy_(x)
        static_t.copy_(t)
        for k, v in fields.items():
            static_fields[k].copy_(v)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out
