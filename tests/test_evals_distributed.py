"""Metric states sync across processes: torchrun --nproc_per_node 2 (gloo, CPU) vs one process."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from diffplug.evals import FID, KID, CLIPScore, PrecisionRecall, Saturation

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from data_for_dist import make
    from diffplug.evals import FID, KID, CLIPScore, PrecisionRecall, Saturation

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    real, fake, images, cos = make()
    fid = FID(features=None, num_features=real.shape[1])
    kid = KID(features=None, subsets=5, subset_size=40)
    pr = PrecisionRecall(features=None)
    clip = CLIPScore(scorer=lambda im, p: cos[torch.as_tensor([int(s) for s in p])])
    sat = Saturation()
    for chunk in real[rank::world].split(16):          # uneven shards and chunk sizes
        for m in (fid, kid, pr):
            m.update(features=chunk, real=True)
    for m in (fid, kid, pr):
        m.update(features=fake[rank::world], real=False)
    idx = list(range(len(images)))[rank::world]
    clip.update(images[idx], [str(i) for i in idx])
    sat.update(images[idx])
    out = {"fid": fid.compute().item(), "kid": kid.compute()[0].item(), "pr": [v.item() for v in pr.compute()],
           "clip": clip.compute().item(), "sat": sat.compute().item()}
    with fid.sync_context():  # the synced (summed) states themselves
        out.update(real_sum=fid.real_sum.tolist(), real_n=int(fid.real_n), fake_n=int(fid.fake_n))
    # the CLI in the same process group: each process decodes and scores a shard of each folder
    import argparse
    from diffplug.evals.cli import register, run
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    d = sys.argv[2]
    args = parser.parse_args(["eval", "--generated", d + "/gen", "--reference", d + "/ref", "--features",
                              "py:data_for_dist:pool_features", "--metrics", "fid,kid,precision,recall,saturation",
                              "--out", d + "/cli_dist", "--no-progress", "--num-workers", "0", "--no-cache",
                              "--kid-subsets", "5"])
    run(args)
    if rank == 0:
        json.dump(out, open(sys.argv[1], "w"))
    dist.destroy_process_group()
""")

DATA = textwrap.dedent("""
    import torch
    def make():
        g = torch.Generator().manual_seed(0)
        real = torch.rand(101, 24, generator=g, dtype=torch.float64)
        fake = torch.rand(77, 24, generator=g, dtype=torch.float64) ** 1.5
        images = torch.rand(9, 3, 8, 8, generator=g)
        cos = torch.rand(9, generator=g) - 0.3
        return real, fake, images, cos

    def pool_features(images):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
    pool_features.num_features = 12
""")


def test_torchrun_two_processes_equal_one(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "data_for_dist.py").write_text(DATA)
    from PIL import Image
    g = torch.Generator().manual_seed(1)
    for name, n, shift in (("gen", 23, 0.2), ("ref", 30, 0.0)):
        (tmp_path / name).mkdir()
        for i in range(n):
            a = ((torch.rand(16, 16, 3, generator=g) * 0.7 + shift) * 255).round().clamp(0, 255).to(torch.uint8)
            Image.fromarray(a.numpy()).save(tmp_path / name / f"{i:02d}.png")
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(out), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())

    sys.path.insert(0, str(tmp_path))
    try:
        from data_for_dist import make
    finally:
        sys.path.remove(str(tmp_path))
    real, fake, images, cos = make()
    fid = FID(features=None, num_features=24)
    fid.update(features=real, real=True)
    fid.update(features=fake, real=False)
    assert got["real_n"] == 101 and got["fake_n"] == 77
    torch.testing.assert_close(torch.tensor(got["real_sum"], dtype=torch.float64), fid.real_sum)
    assert got["fid"] == pytest.approx(fid.compute().item(), rel=1e-9)
    # list states are gathered rank by rank: the same concatenation order in one process
    kid = KID(features=None, subsets=5, subset_size=40)
    kid.update(features=torch.cat([real[0::2], real[1::2]]), real=True)
    kid.update(features=torch.cat([fake[0::2], fake[1::2]]), real=False)
    assert got["kid"] == pytest.approx(kid.compute()[0].item(), rel=1e-6)
    pr = PrecisionRecall(features=None)
    pr.update(features=real, real=True)
    pr.update(features=fake, real=False)
    assert got["pr"] == pytest.approx([v.item() for v in pr.compute()])
    clip = CLIPScore(scorer=lambda im, p: cos[torch.as_tensor([int(s) for s in p])])
    clip.update(images, [str(i) for i in range(9)])
    assert got["clip"] == pytest.approx(clip.compute().item(), rel=1e-9)
    sat = Saturation()
    sat.update(images)
    assert got["sat"] == pytest.approx(sat.compute().item(), rel=1e-9)

    # CLI: 2 processes == 1 process (features are gathered rank by rank: same set, other order)
    from diffplug.evals.cli import register as reg, run as run_cli
    import argparse
    parser = argparse.ArgumentParser()
    reg(parser.add_subparsers())
    sys.path.insert(0, str(tmp_path))
    try:
        args = parser.parse_args(["eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                                  "--features", "py:data_for_dist:pool_features", "--metrics",
                                  "fid,kid,precision,recall,saturation", "--out", str(tmp_path / "cli_one"),
                                  "--no-progress", "--num-workers", "0", "--no-cache", "--kid-subsets", "5"])
        one = run_cli(args)
    finally:
        sys.path.remove(str(tmp_path))
    two = json.loads((tmp_path / "cli_dist" / "metrics.json").read_text())
    assert two["processes"] == 2 and two["n_generated"] == 23 and two["n_reference"] == 30
    for key in ("fid", "precision", "recall", "saturation"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
