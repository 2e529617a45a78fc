"""One checked loader for every file a user hands diffplug (adapters, SaRA, noise policies, early-exit
heads, preference models, checkpoints, Inception weights, reference statistics).

A file is read whole and checked before anything is returned, so a consumer applies nothing from a
bad file (no half-applied loads)::

    from diffplug.checked import Spec, read_safetensors
    t = read_safetensors(path, {"mean": Spec((8, 4, 8, 8), torch.float32),
                                "std": Spec((8, 4, 8, 8), torch.float32, positive=True)},
                         what="a FIND noise policy (written by diffplug finetune find)")

Checked, in order: the file opens (missing, a folder, truncated, a header over 100 MB, not
safetensors), keys (exactly; ``allow_extra`` tolerates more), shapes (exactly: no broadcasting; a
``str`` dimension is a symbol that must take one value across the file, ``None`` any size), dtypes,
then values: floating tensors finite, optional ``low``/``high`` ([low, high)), ``positive``
(> 0), ``increasing`` (strictly, e.g. sorted unique indices). Every error is a :class:`UserFileError`
(a ``ValueError``) naming the file, what it was meant to be and the fix (every reader takes
``fix=``: the consumer's own advice, e.g. "train it again with diffplug finetune find").

Model folders load through diffusers' ``from_pretrained``; :func:`check_finite_weights` scans the
freshly loaded pipeline or module once (a min and max per tensor, one host sync per device).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100_000_000  # the safetensors library's own limit on a header
# safetensors dtype name -> torch dtype name (torch is imported on first use: read_json needs no torch)
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
_FIX = "write the file again with the tool that made it, or pass the right path"


class UserFileError(ValueError):
    """A file handed to diffplug that cannot be used; the message names the file, what it was meant
    to be and the fix. ``path``, ``problem``, ``what`` and ``fix`` are kept as attributes."""

    def __init__(self, path, problem: str, *, what: str, fix: str = _FIX):
        self.path, self.problem, self.what, self.fix = str(path), problem, what, fix
        super().__init__(f"{path}: {problem}; it should be {what}; fix: {fix}")


@dataclass(frozen=True)
class Spec:
    """What one tensor must be. ``shape``: exact sizes; a ``str`` is a symbol bound by its first use in
    the file (``("n",)`` for an index and its values), ``None`` any size; ``shape=None`` any shape.
    ``dtype``: one dtype or a tuple of allowed ones (``None``: any). ``finite`` applies to floating
    tensors; ``low``/``high`` bound values to [low, high); ``positive`` asks > 0; ``increasing``
    asks a strictly increasing 1-D tensor (sorted, no repeats)."""

    shape: tuple | None = None
    dtype: torch.dtype | tuple | None = None
    finite: bool = True
    low: float | None = None
    high: float | None = None
    positive: bool = False
    increasing: bool = False


def like(tensors: Mapping[str, torch.Tensor], *, dtype: bool = True, **values) -> dict[str, Spec]:
    """Specs for exactly the keys, shapes (and dtypes) of ``tensors``, e.g. a module's ``state_dict()``."""
    return {k: Spec(tuple(t.shape), t.dtype if dtype else None, **values) for k, t in tensors.items()}


# -- the header (read without loading any tensor) ----------------------------------------------------------


def _need_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UserFileError(path, "is a folder, not a file", what=what, fix="pass the file inside it")
    if not path.is_file():
        raise UserFileError(path, "no such file", what=what, fix="check the path")


def _with_fix(fn):
    """``fix=`` on a reader replaces the generic fix of its errors by the consumer's own."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, fix: str | None = None, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserFileError as e:
            if fix is None or e.fix != _FIX:
                raise
            raise UserFileError(e.path, e.problem, what=e.what, fix=fix) from None
    return wrapper


@_with_fix
def read_header(path, *, what: str) -> tuple[dict[str, tuple[torch.dtype, tuple]], dict[str, str]]:
    """``({key: (dtype, shape)}, metadata)`` of a safetensors file, checked for truncation, a huge
    header and format errors without reading any tensor."""
    import torch

    path = Path(path)
    _need_file(path, what)
    size = path.stat().st_size
    not_st = "not a safetensors file"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserFileError(path, f"truncated ({size} bytes) or {not_st}", what=what)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise UserFileError(path, f"{not_st} (its header claims {n:,} bytes, over the {MAX_HEADER:,} limit)", what=what)
        if 8 + n > size:
            raise UserFileError(path, f"truncated: the header needs {8 + n:,} bytes, the file has {size:,}", what=what)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise UserFileError(path, f"{not_st} (bad header: {str(e).splitlines()[0]})", what=what) from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserFileError(path, f"{not_st} (its __metadata__ is not a map of strings)", what=what)
    data, entries, end = size - 8 - n, {}, 0
    for key, e in header.items():
        try:
            dtype, shape, (lo, hi) = getattr(torch, _DTYPES[e["dtype"]]), tuple(int(s) for s in e["shape"]), e["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not (0 <= lo <= hi and hi - lo == nbytes):
                raise ValueError
        except Exception:
            raise UserFileError(path, f"{not_st} (bad header entry for {key!r})", what=what) from None
        entries[key], end = (dtype, shape), max(end, hi)
    if end > data:
        raise UserFileError(path, f"truncated: the tensors need {end:,} bytes of data, the file holds {data:,}", what=what)
    return entries, meta


@_with_fix
def read_metadata(path, *, what: str) -> dict[str, str]:
    """The string metadata of a safetensors file (checked like :func:`read_header`)."""
    return read_header(path, what=what)[1]


# -- tensors -------------------------------------------------------------------------------------------


def _keys(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(map(repr, keys[:limit])) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _dtype_name(d) -> str:
    return " or ".join(str(x).replace("torch.", "") for x in (d if isinstance(d, tuple) else (d,)))


def _check_values(path, key: str, t: torch.Tensor, spec: Spec, what: str) -> None:
    import torch

    def bad(problem: str):
        raise UserFileError(path, f"tensor {key!r} {problem}", what=what)

    if t.numel() == 0:
        return
    if spec.finite and t.is_floating_point():
        ok = torch.isfinite(t)
        if not bool(ok.all()):
            n_nan, n_bad = int(torch.isnan(t).sum()), int((~ok).sum())
            first = tuple(int(i) for i in torch.nonzero(~ok)[0])
            bad(f"holds {n_bad:,} non-finite values ({n_nan:,} NaN, {n_bad - n_nan:,} inf) of {t.numel():,}, first at {first}")
    if spec.low is not None or spec.high is not None or spec.positive:
        lo, hi = t.min(), t.max()
        if spec.low is not None and lo < spec.low:
            bad(f"holds {lo.item()!r}, below the smallest allowed value {spec.low!r}")
        if spec.high is not None and hi >= spec.high:
            bad(f"holds {hi.item()!r}; values must be below {spec.high!r}")
        if spec.positive and lo <= 0:
            bad(f"holds {lo.item()!r}; every value must be > 0")
    if spec.increasing and t.numel() > 1 and not bool((t.reshape(-1)[1:] > t.reshape(-1)[:-1]).all()):
        bad("is not strictly increasing (values must be sorted with no repeats)")


@_with_fix
def read_safetensors(path, expect: Mapping[str, Spec], *, what: str, allow_extra: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` named by ``expect`` (CPU), returned only after the file, every key,
    shape, dtype and value passed; otherwise a :class:`UserFileError`. ``allow_extra``: keys the file
    holds beyond ``expect`` are ignored (not loaded) instead of refused."""
    from safetensors import safe_open

    path = Path(path)
    entries, _ = read_header(path, what=what)
    missing, extra = set(expect) - set(entries), set(entries) - set(expect)
    if missing:
        raise UserFileError(path, f"{len(missing)} tensor(s) missing: {_keys(missing)}", what=what)
    if extra and not allow_extra:
        raise UserFileError(path, f"{len(extra)} unexpected tensor(s): {_keys(extra)}", what=what)
    symbols: dict[str, tuple[int, str]] = {}
    for key, spec in expect.items():
        dtype, shape = entries[key]
        if spec.dtype is not None and dtype not in (spec.dtype if isinstance(spec.dtype, tuple) else (spec.dtype,)):
            raise UserFileError(path, f"tensor {key!r} is {_dtype_name(dtype)}, not {_dtype_name(spec.dtype)}", what=what)
        if spec.shape is None:
            continue
        ok = len(shape) == len(spec.shape)
        for got, want in zip(shape, spec.shape) if ok else ():
            if isinstance(want, str):
                bound = symbols.setdefault(want, (got, key))
                if bound[0] != got:
                    raise UserFileError(path, f"tensor {key!r} has shape {shape}, which does not match "
                                        f"{bound[1]!r} ({bound[0]} entries)", what=what)
            elif want is not None and want != got:
                ok = False
        if not ok:
            want = tuple("*" if w is None else w for w in spec.shape)
            raise UserFileError(path, f"tensor {key!r} has shape {shape}, expected {want}", what=what)
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in expect:
                out[key] = f.get_tensor(key)
    except Exception as e:  # the library's own checks (offsets overlapping, etc.)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserFileError(path, f"cannot be read as safetensors ({reason})", what=what) from None
    for key, spec in expect.items():
        _check_values(path, key, out[key], spec, what)
    return out


@_with_fix
def read_into(module: torch.nn.Module, path, *, what: str, trainable_only: bool = False, dtype: bool = True) -> None:
    """Load a state file into ``module`` all or nothing: the file is checked against the module's own
    ``state_dict`` (its trainable parameters with ``trainable_only``): keys exactly (a tied tensor may be
    stored once, as ``save_model`` writes it), shapes, dtypes (``dtype=False``: any, cast on copy),
    finite values; only then is anything copied."""
    path = Path(path)
    if trainable_only:
        own = {n: p for n, p in module.named_parameters() if p.requires_grad}
        state = read_safetensors(path, like(own, dtype=dtype), what=what)
    else:
        own = module.state_dict()
        entries, _ = read_header(path, what=what)
        state = read_safetensors(path, like({k: v for k, v in own.items() if k in entries}, dtype=dtype), what=what)
        stored = {own[k].data_ptr() for k in state}
        untied = sorted(k for k in own if k not in state and own[k].data_ptr() not in stored)
        if untied:
            raise UserFileError(path, f"{len(untied)} tensor(s) missing: {_keys(untied)}", what=what)
    import torch

    with torch.no_grad():
        for name, t in own.items():
            if name in state:
                t.copy_(state[name])


# -- JSON ---------------------------------------------------------------------------------------------


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


@_with_fix
def read_json(path, *, what: str, kind: type | tuple | None = dict):
    """The parsed JSON of ``path`` (strict: no NaN/Infinity), of type ``kind`` (``None``: any)."""
    path = Path(path)
    _need_file(path, what)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise UserFileError(path, "is not UTF-8 text", what=what) from None
    except ValueError as e:
        raise UserFileError(path, f"is not valid JSON ({str(e).splitlines()[0]})", what=what) from None
    if kind is not None and not isinstance(doc, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserFileError(path, f"holds a JSON {type(doc).__name__}, not a {names}", what=what)
    return doc


# -- model folders: one scan after from_pretrained ---------------------------------------------------------


def _modules(obj) -> dict[str, torch.nn.Module]:
    import torch

    if isinstance(obj, torch.nn.Module):
        return {"": obj}
    components = getattr(obj, "components", obj)  # a DiffusionPipeline, or a {name: module} map
    return {n: m for n, m in components.items() if isinstance(m, torch.nn.Module)}


def nonfinite_weights(obj) -> list[str]:
    """Names (``component.param``) of floating parameters/buffers of a module, pipeline or
    ``{name: module}`` map holding NaN or inf: per tensor its min and max (NaN propagates through
    both; no copy of the weights), one host sync per device."""
    import torch

    found: dict[torch.device, list] = {}
    for comp, module in _modules(obj).items():
        seen = set()
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta" or id(t) in seen:
                continue
            seen.add(id(t))
            with torch.no_grad():
                lo, hi = torch.aminmax(t.detach().reshape(-1))
            found.setdefault(t.device, []).append((f"{comp}.{name}" if comp else name, torch.stack([lo, hi]).float()))
    bad = []
    for rows in found.values():
        finite = torch.isfinite(torch.stack([m for _, m in rows])).all(1).tolist()
        bad += [n for (n, _), ok in zip(rows, finite) if not ok]
    return bad


def check_finite_weights(obj, *, path, what: str, fix: str | None = None) -> None:
    """Raise a :class:`UserFileError` naming ``path`` when a freshly loaded pipeline or module holds
    NaN/inf weights (they give black images or NaN losses, never an error, downstream)."""
    bad = nonfinite_weights(obj)
    if bad:
        raise UserFileError(path, f"{len(bad)} weight tensor(s) hold NaN or inf values: {_keys(bad)}", what=what,
                            fix=fix or "the weights are damaged: download or save the model again")


__all__ = ["UserFileError", "Spec", "like", "read_header", "read_metadata", "read_safetensors", "read_into", "read_json",
           "nonfinite_weights", "check_finite_weights", "MAX_HEADER"]
