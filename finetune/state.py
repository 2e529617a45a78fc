"""A run's resumable state as safetensors + JSON only: nothing here writes or reads a pickle.

A checkpoint folder holds (``r`` = process index):

    trainable.safetensors           the trained tensors: LoRA adapters only, otherwise the trained
                                    module's whole state_dict
    optimizer.json (+ .safetensors) the optimiser's state_dict: tensors by flattened key
                                    (``state.0.exp_avg``), the rest (param_groups, steps) as JSON
    scheduler.json                  the LR schedule's state_dict
    scaler.json                     the fp16 gradient scaler (fp16 runs only)
    ema.json (+ .safetensors)       the EMA shadow (ema_decay > 0)
    rng-rank{r}.json (+ .safetensors)  python ``random``, numpy, torch CPU and CUDA generators
    config.yaml, trainer_state.json see ``checkpoint.py``

DDP processes hold the same weights and optimiser state, so process 0 writes them; each process
writes its own RNG states. Sharded set-ups (FSDP, DeepSpeed) are refused by the trainer.

Nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) is a JSON tree whose
tensors are references into the ``.safetensors`` file next to it (:func:`save_tree`, :func:`load_tree`).
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from .. import atomic
from ..checked import Spec, UserFileError, read_into, read_json, read_safetensors
from .checkpoint import CheckpointError

MODEL_FILE = "trainable.safetensors"
FIX = "resume from another checkpoint (--resume latest falls back past it) or start a new run"


@contextlib.contextmanager
def reading(path: Path):
    """Turn any failure while reading ``path`` into a :class:`CheckpointError` naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except UserFileError as e:  # diffplug.checked: the message already names the file and the key
        raise CheckpointError(str(e)) from None
    except Exception as e:  # truncated safetensors, bad JSON, missing keys, wrong shapes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: {reason}") from None


# -- nested state <-> JSON tree + tensors ---------------------------------------------------------


def _encode(obj, tensors: dict, path: str):
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"{path}: two tensors with the same flattened key")
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.key"), _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be stored as JSON or a tensor")


def _decode(node, tensors: dict):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        key = node["__tensor__"]
        if key not in tensors:
            raise KeyError(f"missing tensor {key!r}")
        return tensors[key]
    if "__ndarray__" in node:
        return np.asarray(node["__ndarray__"], dtype=node["dtype"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__items__" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__items__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def save_tree(folder: Path, name: str, obj) -> None:
    """``folder/name.json`` (+ ``name.safetensors`` when ``obj`` holds tensors)."""
    tensors: dict = {}
    tree = _encode(obj, tensors, name)
    if tensors:
        atomic.save_safetensors(tensors, folder / f"{name}.safetensors")  # a failed write names the file
    atomic.write_text(folder / f"{name}.json", json.dumps({"tensors": bool(tensors), "tree": tree}))


def _tensor_keys(node, out: set) -> set:
    if isinstance(node, list):
        for v in node:
            _tensor_keys(v, out)
    elif isinstance(node, dict):
        if "__tensor__" in node:
            out.add(node["__tensor__"])
        for v in node.values():
            _tensor_keys(v, out)
    return out


def load_tree(folder: Path, name: str):
    """Read back :func:`save_tree`: the JSON (strict) and exactly the tensors it references, every
    floating one finite (``diffplug.checked``): a NaN is named here, not as a NaN loss steps later."""
    doc_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    what = f"a training checkpoint's {name} state (written by diffplug finetune)"
    fix = FIX
    with reading(doc_path):
        doc = read_json(doc_path, what=what, fix=fix)
        tree, has_tensors = doc["tree"], doc["tensors"]
    tensors = {}
    if has_tensors:
        with reading(tensor_path):
            tensors = read_safetensors(tensor_path, {k: Spec() for k in _tensor_keys(tree, set())}, what=what, fix=fix)
    with reading(tensor_path if has_tensors else doc_path):
        try:
            return _decode(tree, tensors)
        except Exception as e:
            raise UserFileError(doc_path, f"not a readable {name} state ({type(e).__name__}: {e})", what=what, fix=fix) from None


# -- RNG ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=i)


# -- the trained module --------------------------------------------------------------------------------


def _trainable(module: torch.nn.Module) -> dict:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def save_module(module: torch.nn.Module, path: Path, trainable_only: bool) -> None:
    if trainable_only:
        atomic.save_safetensors({n: p.detach().cpu().contiguous() for n, p in _trainable(module).items()}, path)
    else:
        with atomic.replacing(path) as tmp:
            save_model(module, str(tmp))  # the whole state_dict; tied tensors once


def load_module(module: torch.nn.Module, path: Path, trainable_only: bool) -> None:
    """Check the file whole (keys, shapes, dtypes, finite values), then copy it into ``module``."""
    with reading(path):
        read_into(module, path, trainable_only=trainable_only, fix=FIX,
                  what="a training checkpoint's trained tensors (written by diffplug finetune for this model and adapter)")


def _check_shapes(path: Path, saved: list, live: list, what: str) -> None:
    """Optimiser / EMA tensors of a parameter must have that parameter's shape (no broadcasting)."""
    for i, (s, p) in enumerate(zip(saved, live)):
        for key, v in (s.items() if isinstance(s, dict) else [("", s)]):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise UserFileError(path, f"{what} {i}{'.' + key if key else ''} has shape {tuple(v.shape)}, its "
                                    f"parameter {tuple(p.shape)}", what="a checkpoint of this run",
                                    fix="resume from another checkpoint or start a new run")


# -- a whole checkpoint --------------------------------------------------------------------------------


def save(folder: Path, rank: int, module, trainable_only: bool, optimizer, scheduler, ema=None, scaler=None) -> None:
    """Write process ``rank``'s part of a checkpoint into ``folder`` (process 0 writes the shared part)."""
    if rank == 0:
        save_module(module, folder / MODEL_FILE, trainable_only)
        save_tree(folder, "optimizer", optimizer.state_dict())
        save_tree(folder, "scheduler", scheduler.state_dict())
        if ema is not None:
            save_tree(folder, "ema", ema.state_dict())
        if scaler is not None:
            save_tree(folder, "scaler", scaler.state_dict())
    save_tree(folder, f"rng-rank{rank}", rng_state())


def load(folder: Path, rank: int, module, trainable_only: bool, optimizer, scheduler, ema=None, scaler=None) -> None:
    """Restore process ``rank``'s state from ``folder``; raises :class:`CheckpointError` naming a bad file.
    Every part is overwritten, so a failed load followed by one of another checkpoint leaves nothing behind."""
    rng = load_tree(folder, f"rng-rank{rank}")
    opt_state, sched_state = load_tree(folder, "optimizer"), load_tree(folder, "scheduler")
    ema_state = load_tree(folder, "ema") if ema is not None else None
    scaler_state = load_tree(folder, "scaler") if scaler is not None else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with reading(folder / "optimizer.safetensors"):
        state = opt_state.get("state", {}) if isinstance(opt_state, dict) else {}
        _check_shapes(folder / "optimizer.safetensors", [state.get(i, {}) for i in range(len(params))], params,
                      "optimizer state of parameter")
    if ema is not None:
        with reading(folder / "ema.safetensors"):
            _check_shapes(folder / "ema.safetensors", list(ema_state.get("shadow", [])), list(ema.params), "EMA tensor")
    load_module(module, folder / MODEL_FILE, trainable_only)  # nothing above changed the run; from here all is overwritten
    with reading(folder / "optimizer.json"):
        optimizer.load_state_dict(opt_state)
    with reading(folder / "scheduler.json"):
        scheduler.load_state_dict(sched_state)
    if ema is not None:
        with reading(folder / "ema.json"):
            if len(ema_state["shadow"]) != len(ema.params):
                raise ValueError(f"{len(ema_state['shadow'])} EMA tensors, the run trains {len(ema.params)}")
            ema.load_state_dict(ema_state)
    if scaler is not None:
        with reading(folder / "scaler.json"):
            scaler.load_state_dict(scaler_state)
    with reading(folder / f"rng-rank{rank}.json"):
        set_rng_state(rng)
