"""How many pairs and steps the SPO preference model (``spo-pm``) needs: held-out step-wise accuracy during
training, on the pairs of an earlier ``diffplug finetune spo-pm`` run (its ``pairs/`` and ``pairs-heldout/``).

    python benchmarks/spm_recipe.py --run /tmp/spo5/old --out /tmp/spo5/eB --every 25 --max_steps 150 --learning_rate 3e-4
    python benchmarks/spm_recipe.py --run /tmp/spo5/old --out /tmp/spo5/eC --every 25 --max_steps 150 --learning_rate 3e-4 --pairs 100

``--pairs N`` trains on the run's first N pairs (N / 20 rounds over the 10 prompts, as ``--generate_repeats`` would
make them). Prints one JSON line per evaluation: step, training CPU seconds (evaluations excluded) and the SPM's
accuracy on the decided held-out pairs at t = 0 / 251 / 501 / 701 / 951 (``SPMTraining.stepwise_accuracy``, as
``final/stepwise_accuracy.json``). Run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
from pathlib import Path

import torch


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    from diffplug.finetune import Trainer, load_config
    from diffplug.finetune.pairs import load_pairs, resolve_reward
    from diffplug.finetune.spm import SPMConfig, SPMTraining

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an spo-pm output_dir with pairs/ and pairs-heldout/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--pairs", type=int, default=0, help="train on the first N pairs; 0 = all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run, out = Path(args.run), Path(args.out)
    config = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    rows = [json.loads(line) for line in (run / "pairs" / "pairs.jsonl").read_text().splitlines()]
    rows = rows[: args.pairs] if args.pairs else rows
    data = out / "data"
    shutil.rmtree(out, ignore_errors=True)
    data.mkdir(parents=True)
    for r in rows:
        for k in ("jpg_0", "jpg_1"):
            shutil.copy(run / "pairs" / r[k], data / r[k])
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"pairs": len(rows), "decided": sum(r["label_0"] != 0.5 for r in rows)}), flush=True)

    class Monitored(SPMTraining):
        def after_step(self, trainer, step):
            if step % args.every == 0 or step == self.config.max_steps:
                start = cpu_seconds()
                acc = self.stepwise_accuracy(trainer, trainer.unet, self.held, self.reward_fn)
                print(json.dumps({"step": step, "train_cpu_s": round(start - self.cpu0 - self.eval_cpu, 1),
                                  **{t: round(a["spm"], 3) for t, a in acc.items()}}), flush=True)
                self.eval_cpu += cpu_seconds() - start
            return False

    cfg = load_config(SPMConfig, None, dict(
        output_dir=str(out / "run"), data=str(data), reward=config["reward"], seed=config["seed"], max_steps=args.max_steps,
        learning_rate=args.learning_rate, checkpoint_every=0, tensorboard=False, log_every=10))
    method = Monitored(cfg)
    method.held = load_pairs(str(run / "pairs-heldout"), 32, keep_ties=True)
    method.reward_fn = resolve_reward(config["reward"])
    method.cpu0, method.eval_cpu = cpu_seconds(), 0.0
    Trainer(method).train()


if __name__ == "__main__":
    main()
