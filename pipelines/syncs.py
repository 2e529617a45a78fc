"""Count host-device synchronisations and ATen ops per denoising step, on any machine.

On a GPU the host blocks where it reads a device tensor (``.item()``, ``bool(t)``, ``float(t)``,
indexing with a tensor, ``.tolist()``, ``.cpu()``, ``nonzero``, ``torch.equal``, a boolean mask)
and where it copies between host and device without ``non_blocking`` (``host.to(device)``).
On a CPU every tensor is host memory, so :class:`HostSyncs` emulates the split: a tensor is
*device-resident* if it is a parameter or buffer of the pipeline, the result of ``.to(device)``
(a ``torch.device`` or non-"cpu" string) or computed from a device-resident input; everything else
(schedulers' CPU tables, Python numbers, ``.to("cpu")``) is host memory. A sync is counted where
the GPU would block. Not seen on a CPU: ``torch.tensor(data, device=...)`` (a factory call).

    with HostSyncs(pipe) as counter:
        pipe(prompt, ...)
    counter.syncs, counter.ops, counter.sites

:func:`per_step` counts inside the steps only (``benchmarks/loop_syncs.py``, ``tests/test_loop_syncs.py``).
"""

from __future__ import annotations

import traceback
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ops whose result the host must wait for when an input is on the device
READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2", "unique_dim"}


_ROOT = str(Path(__file__).resolve().parents[1]) + "/"  # the diffplug package


def _site(depth: int = 3) -> str:
    """The innermost ``depth`` frames outside torch and this file, as ``file:line <- caller:line``."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    return " <- ".join(f"{f.filename.removeprefix(_ROOT).split('site-packages/')[-1]}:{f.lineno}"
                       for f in frames[::-1][:depth])


class HostSyncs(TorchDispatchMode):
    """Counts ATen ops and (emulated) host syncs while ``counting`` is true; see the module doc."""

    def __init__(self, *modules_or_pipes):
        super().__init__()
        self.ops, self.syncs, self.sites = 0, 0, Counter()
        self.counting = True
        self._device: dict[int, weakref.ref] = {}
        self._patched: dict[str, object] = {}
        for obj in modules_or_pipes:
            self.mark(*_tensors_of(obj))

    # -- device residency ------------------------------------------------------------------------
    def mark(self, *tensors) -> None:
        for t in tensors:
            key = id(t)
            self._device[key] = weakref.ref(t, lambda _, key=key: self._device.pop(key, None))

    def unmark(self, t) -> None:
        self._device.pop(id(t), None)

    def on_device(self, t) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def _sync(self, what: str) -> None:
        if self.counting:
            self.syncs += 1
            self.sites[f"{what} @ {_site()}"] += 1

    # -- ATen ops --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.counting:
            self.ops += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_in = [t for t in inputs if self.on_device(t)]
        if device_in and (name in READS or (name == "index" and _bool_index(args))):
            self._sync(name)
        if name == "copy_" and self.on_device(args[0]) != self.on_device(args[1]) and not kwargs.get("non_blocking"):
            self._sync("copy_ " + ("host->device" if self.on_device(args[0]) else "device->host"))
            return func(*args, **kwargs)  # the destination keeps its place
        out = func(*args, **kwargs)
        if device_in:
            self.mark(*[t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out

    # -- Tensor methods that move data without an ATen op on a CPU --------------------------------
    def __enter__(self):
        orig = {name: getattr(torch.Tensor, name) for name in ("to", "cpu", "tolist", "numpy")}
        self._patched = orig
        counter = self

        def to(t, *args, **kwargs):
            target = counter._target(args, kwargs)
            out = orig["to"](t, *args, **kwargs)
            return counter._moved(t, out, target, kwargs.get("non_blocking", False))

        def cpu(t, *args, **kwargs):
            return counter._moved(t, orig["cpu"](t, *args, **kwargs), "host", False)

        def reader(name):
            def read(t, *args, **kwargs):
                if counter.on_device(t):
                    counter._sync(name)
                return orig[name](t, *args, **kwargs)
            return read

        torch.Tensor.to, torch.Tensor.cpu = to, cpu
        torch.Tensor.tolist, torch.Tensor.numpy = reader("tolist"), reader("numpy")
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._patched.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)

    def _target(self, args, kwargs) -> str | None:
        """Where ``.to(...)`` sends a tensor: "host", "device" or None (dtype only)."""
        dest = kwargs.get("device", kwargs.get("other"))
        if dest is None and args and not isinstance(args[0], torch.dtype):
            dest = args[0]
        if dest is None:
            return None
        if isinstance(dest, torch.Tensor):
            return "device" if self.on_device(dest) else "host"
        if isinstance(dest, str):
            return "host" if dest.split(":")[0] == "cpu" else "device"
        return "device"  # a torch.device: the pipeline's execution device

    def _moved(self, src, out, target, non_blocking) -> torch.Tensor:
        if target is None or self.on_device(src) == (target == "device"):
            return out  # no transfer
        if not non_blocking:
            self._sync(f"to {target}")
        if out is src:  # a no-op on a CPU; a copy on a GPU
            out = src.clone()
        (self.mark if target == "device" else self.unmark)(out)
        return out


def _bool_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:]))


def _tensors_of(obj):
    """Parameters and buffers of a module, or of every module component of a pipeline."""
    if isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
        return
    pipe = getattr(obj, "pipe", obj)  # a DiffplugPipeline wraps the stock pipeline
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            yield from _tensors_of(component)


def per_step(pipe, prompt, num_inference_steps: int, **call) -> dict:
    """Run ``pipe(prompt, ...)`` (stock or ``from_pipe``) under :class:`HostSyncs` and count the
    steps after the first (the first may set up state once, as diffusers' multistep schedulers do).

    Returns ``syncs_per_step``, ``ops_per_step``, the step ``sites`` and the whole call's ``syncs``."""
    if num_inference_steps < 2:
        raise ValueError("num_inference_steps must be >= 2: the first step is not counted")
    counter = HostSyncs(pipe)
    window = {"syncs": 0, "ops": 0}

    def callback(p, i, t, kw):
        if i == 0:  # steps 1..n-1 are counted from here to the last callback
            window["syncs"], window["ops"], counter.sites = counter.syncs, counter.ops, Counter()
        if i == num_inference_steps - 1:
            window["syncs"], window["ops"] = counter.syncs - window["syncs"], counter.ops - window["ops"]
            window["sites"] = dict(counter.sites)
        return {}

    with counter:
        pipe(prompt, num_inference_steps=num_inference_steps, callback_on_step_end=callback, **call)
    n = num_inference_steps - 1
    return {"syncs_per_step": window["syncs"] / n, "ops_per_step": window["ops"] / n,
            "sites": window.get("sites", {}), "syncs": counter.syncs}
