"""Throughput of diffplug's FID pipeline.

    python benchmarks/evals_speed.py --device cuda --n 50000          # the GPU target: <= 15 s
    python benchmarks/evals_speed.py --device cpu --n 200             # what CI-class CPUs manage

Measures, on Fashion-MNIST test images padded to 32x32 RGB (the testbed's format):
  1. ``tensors``: FID from uint8 tensors already on the device -- clean resize to 299, Inception
     (fp16 autocast on CUDA unless --no-autocast), float64 running sums, then the Fréchet distance.
  2. ``folder``: the same from a folder of PNGs through the DataLoader (parallel decoding), plus the
     decode-only rate (is decoding the bottleneck?).
  3. ``frechet``: the 2048-d float64 Fréchet distance alone (matrix square root included).
Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _images(n: int) -> torch.Tensor:
    from diffplug.evals.data import fashion_mnist

    x = fashion_mnist("test")
    reps = -(-n // len(x))
    return x.repeat(reps, 1, 1, 1)[:n]


def bench_tensors(feats, fid_cls, n, batch, device):
    x = _images(n).to(device)
    fid = fid_cls(features=feats).to(device)
    ref = fid_cls(features=None, num_features=2048).to(device)
    feats(x[:batch])  # warm-up (cudnn autotune, lazy init)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        fid.update(x[i:i + batch], real=False)
    _sync(device)
    t_feat = time.perf_counter() - t0
    # reference statistics = the same set (as if loaded from the cache): only the compute is timed here
    ref_mu, ref_sigma = fid.stats(real=False)
    fid.load_reference(ref_mu, ref_sigma, n)
    t1 = time.perf_counter()
    value = fid.compute().item()
    _sync(device)
    t_fd = time.perf_counter() - t1
    del ref
    return {"what": "fid_from_tensors", "n": n, "batch": batch, "features_s": round(t_feat, 3),
            "images_per_s": round(n / t_feat, 1), "frechet_s": round(t_fd, 3), "total_s": round(t_feat + t_fd, 3),
            "fid_self": value}


def bench_folder(feats, n, batch, workers, device):
    from PIL import Image

    from diffplug.evals.data import image_loader, iterate_batches

    x = _images(n)
    with tempfile.TemporaryDirectory() as d:
        for i, a in enumerate(x):
            Image.fromarray(a.permute(1, 2, 0).numpy()).save(os.path.join(d, f"{i:06d}.png"))
        loader, _ = image_loader(d, batch, workers)
        t0 = time.perf_counter()
        m = sum(len(b) for b in iterate_batches(loader))
        t_decode = time.perf_counter() - t0
        loader, _ = image_loader(d, batch, workers)
        _sync(device)
        t0 = time.perf_counter()
        for b in iterate_batches(loader):
            feats(b.to(device, non_blocking=True))
        _sync(device)
        t_all = time.perf_counter() - t0
    return {"what": "features_from_png_folder", "n": m, "batch": batch, "workers": workers,
            "decode_only_images_per_s": round(m / t_decode, 1), "images_per_s": round(m / t_all, 1),
            "total_s": round(t_all, 3)}


def bench_frechet(device, reps=3):
    from diffplug.evals import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 2048, generator=g, dtype=torch.float64)
    s1 = (a.T @ a / 4096).to(device)
    b = torch.randn(4096, 2048, generator=g, dtype=torch.float64) * 1.1
    s2 = (b.T @ b / 4096).to(device)
    mu = torch.zeros(2048, dtype=torch.float64, device=device)
    frechet_distance(mu, s1, mu, s2)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        frechet_distance(mu, s1, mu, s2)
    _sync(device)
    return {"what": "frechet_distance_2048d_float64", "seconds": round((time.perf_counter() - t0) / reps, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="images (default 50000 on CUDA, 200 on CPU)")
    ap.add_argument("--n-folder", type=int, default=None, help="PNG images (default n, at most 10000)")
    ap.add_argument("--batch", type=int, default=None, help="default 500 on CUDA, 25 on CPU")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--protocol", default="clean")
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the Inception")
    ap.add_argument("--only", default="tensors,folder,frechet")
    args = ap.parse_args()

    from diffplug.evals import FID, InceptionFeatures

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (50000 if cuda else 200)
    batch = args.batch or (500 if cuda else 25)
    feats = InceptionFeatures(protocol=args.protocol, autocast=False if args.no_autocast else None,
                              compile=args.compile).to(device)
    info = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "autocast": feats.precision_tag(device), "protocol": feats.protocol,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps({"what": "setup", **info}), flush=True)
    only = args.only.split(",")
    with torch.inference_mode():
        if "frechet" in only:
            print(json.dumps(bench_frechet(device)), flush=True)
        if "tensors" in only:
            print(json.dumps(bench_tensors(feats, FID, n, batch, device)), flush=True)
        if "folder" in only:
            nf = args.n_folder or min(n, 10000)
            print(json.dumps(bench_folder(feats, nf, batch, args.workers, device)), flush=True)


if __name__ == "__main__":
    main()
