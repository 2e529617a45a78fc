"""Featurise an image source once and cache the result (safetensors) keyed by dataset, feature
network and resize protocol: ``$DIFFPLUG_CACHE/eval_stats/<dataset>__<network>__<protocol>.safetensors``.

A cache file holds the float64 running sums FID needs (``sum``, ``outer``, ``n``) and, when
asked for (KID, precision/recall need the vectors), the float32 ``features``. Its metadata
records the key so a mismatched file is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .data import dist_info, gather_json, gather_rows, image_loader, iterate_batches
from .inception import _save_atomic, cache_dir


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:120]


def cache_path(dataset_id: str, network: str, protocol: str) -> Path:
    return cache_dir() / "eval_stats" / f"{_slug(dataset_id)}__{_slug(network)}__{_slug(protocol)}.safetensors"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def featurize(loader, feature_net, device=None, progress: bool = True, desc: str = "features",
              bad_images: str = "skip", skipped: list | None = None, announce: str | None = None):
    """Run ``feature_net`` over a loader; returns float32 ``(N, D)`` features on ``device``.

    With ``progress``, ``announce`` is printed (stderr) before the first batch and followed, once
    the first batch is timed, by an estimate of the whole run. Undecodable files: see
    :func:`diffplug.evals.data.iterate_batches`."""
    import sys
    import time

    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(
        (p.device for p in feature_net.parameters()), torch.device("cpu"))
    out = []
    n_total = len(loader.dataset) if hasattr(loader, "dataset") else None
    with tqdm(total=n_total, desc=desc, unit="img", disable=not progress) as bar:
        if progress and announce:
            bar.write(announce, file=sys.stderr)
        for batch in iterate_batches(loader, bad_images, skipped):
            t0 = time.perf_counter()
            batch = batch.to(device, non_blocking=True)
            out.append(feature_net(batch).float())
            if progress and announce and len(out) == 1 and n_total:
                rate = len(batch) / max(time.perf_counter() - t0, 1e-9)
                bar.write(f"  ~{rate:.1f} images/s on {device} (first batch): about {_duration(n_total / rate)} "
                          f"for {n_total} images", file=sys.stderr)
            bar.update(len(batch))
    if not out:
        raise ValueError(f"{desc}: no image could be decoded" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return torch.cat(out)


def reference_stats(source: str, feature_net, need_features: bool = False, batch_size: int = 64,
                    num_workers: int | None = None, limit: int | None = None, use_cache: bool = True,
                    device=None, progress: bool = True, bad_images: str = "skip") -> dict:
    """Statistics of a reference image source, from the cache when possible.

    Returns ``{"sum", "outer", "n", "features" (if need_features), "cache": path or None,
    "dataset": id, "skipped": [{"file", "reason"}] undecodable files left out}``.
    """
    if source.endswith(".safetensors") and Path(source).is_file():
        return load_stats_file(source, feature_net, need_features)
    loader, dataset_id = image_loader(source, batch_size, num_workers, limit)
    protocol = getattr(feature_net, "protocol", "native")
    tag = getattr(feature_net, "precision_tag", None)
    if tag is not None:
        dev = device if device is not None else next(feature_net.parameters()).device
        protocol = f"{protocol}-{tag(dev)}"
    path = cache_path(dataset_id, feature_net.name, protocol)
    if use_cache and path.is_file():
        st = load_stats_file(path, feature_net, need_features, strict=False)
        if st is not None:
            st["dataset"] = dataset_id
            return st
    rank, world = dist_info()
    n_all = len(loader.dataset)
    if world > 1:  # each process featurises its shard; everyone gets all features, rank 0 writes the cache
        loader, _ = image_loader(source, batch_size, num_workers, limit, shard=(rank, world))
    announce = (f"reference {dataset_id}: featurising {n_all} images with {feature_net.name}"
                + (f"; cached afterwards in {path}" if use_cache else "")
                + ". Fewer images, faster: --reference-limit N (spec: reference_limit)")
    skipped: list = []
    feats = gather_rows(featurize(loader, feature_net, device, progress and rank == 0,
                                  desc=f"reference {dataset_id}", bad_images=bad_images, skipped=skipped,
                                  announce=announce))
    if world > 1:
        skipped = gather_json(skipped, device)
    f64 = feats.double()
    st = {"sum": f64.sum(0), "outer": f64.T @ f64, "n": torch.tensor(len(feats)), "features": feats}
    if use_cache and rank == 0:
        meta = {"dataset": dataset_id, "feature_network": feature_net.name, "protocol": protocol,
                "n": str(len(feats)), "skipped": skipped}
        _save_atomic({k: v.cpu() for k, v in st.items()}, path, {"diffplug_eval_stats": json.dumps(meta)})
    st["cache"] = str(path) if use_cache else None
    st["dataset"] = dataset_id
    st["skipped"] = skipped
    return st


def load_stats_file(path, feature_net, need_features: bool, strict: bool = True) -> dict | None:
    """A statistics file read through ``diffplug.checked``: ``sum`` (D,) and ``outer`` (D, D) float64,
    ``n`` >= 1, optional ``features`` (n, D), every value finite; otherwise an error naming the file."""
    from ..checked import Spec, UserFileError, read_header, read_safetensors

    what = "reference statistics (.safetensors written by diffplug eval)"
    fix = (f"delete {path}; the next run featurises the reference again" if not strict else
           "pass the statistics file diffplug eval wrote, or the image source itself")
    try:
        entries, file_meta = read_header(path, what=what)
        try:
            meta = json.loads(file_meta.get("diffplug_eval_stats", "{}"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise UserFileError(path, f"bad diffplug_eval_stats metadata ({e})", what=what) from None
        want = (feature_net.name, getattr(feature_net, "protocol", "native"))
        have = (meta.get("feature_network"), str(meta.get("protocol", "")).rsplit("-", 1)[0]
                if str(meta.get("protocol", "")).endswith(("-amp", "-fp32")) else meta.get("protocol"))
        if have != want:
            if strict:
                raise ValueError(f"{path}: statistics were made with network/protocol {have}, this run uses {want}")
            return None
        ints = (torch.int64, torch.int32)
        expect = {"sum": Spec(("D",), torch.float64), "outer": Spec(("D", "D"), torch.float64), "n": Spec((), ints, low=1)}
        if "features" in entries:
            expect["features"] = Spec(("N", "D"), (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        st = read_safetensors(path, expect, what=what)
        if "features" in st and st["features"].shape[0] != int(st["n"]):
            raise UserFileError(path, f"holds {st['features'].shape[0]} feature rows for n = {int(st['n'])}", what=what)
    except UserFileError as e:
        raise UserFileError(path, e.problem, what=what, fix=fix) from None
    if need_features and "features" not in st:
        if strict:
            raise ValueError(f"{path} holds only FID sums; KID and precision/recall need features")
        return None
    st["cache"] = str(path)
    st["dataset"] = meta.get("dataset", str(path))
    st["skipped"] = meta.get("skipped", [])
    return st
