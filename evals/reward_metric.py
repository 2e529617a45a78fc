"""The ``reward:NAME`` metrics of ``diffplug eval``: build the rewards from ``--reward-opt``, find
each image's prompt, summarise the per-image scores (mean, standard error) and write them."""

from __future__ import annotations

import json
from pathlib import Path


from .stats import mean_se


def reward_options(pairs) -> dict:
    """``--reward-opt`` pairs -> options, parsed like every other ``--*-opt``."""
    if not pairs:
        return {}
    from diffplug.pipelines.registry import parse_options  # imports diffusers: only when needed

    return parse_options(pairs)


def make_rewards(names: list[str], opts: dict) -> dict:
    from .rewards import get_reward

    if opts and not names:
        raise ValueError("--reward-opt: no reward to pass it to; add reward:NAME to --metrics")
    out = {}
    for name in names:
        try:
            out[name] = get_reward(name, **opts)
        except TypeError as e:
            raise ValueError(f"--reward-opt {opts}: reward {name!r} does not take these options ({e})") from e
        except FileNotFoundError as e:
            raise FileNotFoundError(f"reward {name!r}: {e} (give it as --reward-opt KEY=VALUE)") from e
    return out


def reward_prompts(rewards: dict, files: list, args) -> dict | None:
    """Resolved path -> prompt for the reward metrics, or None when some image has no prompt and
    every reward works without (checked on the first image). An image without a prompt for a
    reward that needs one is an error naming it, before anything is scored."""
    from .data import load_image, prompt_map

    prompts = prompt_map(args.generated, args.prompts)
    missing = [f for f in files if f.resolve() not in prompts]
    if not missing:
        return prompts
    probe = None
    for f in files[:16]:  # an image to ask the rewards with (broken files are reported by the scan)
        try:
            probe = load_image(f)[None]
            break
        except Exception:  # noqa: BLE001
            continue
    for name, reward in rewards.items():
        need = getattr(reward, "needs_prompts", None)
        err = None
        if need is None and probe is not None:  # not declared: does it score an image without a prompt?
            try:
                reward(probe, None)
                need = False
            except Exception as e:  # noqa: BLE001  (any failure means: it needs prompts)
                need, err = True, e
        if need:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"reward {name!r} needs a prompt per image; {missing[0]} has none{more}. Give --prompts "
                             "FILE (JSONL of {\"file\": ..., \"prompt\": ...}) or score a diffplug sample folder"
                             + (f" [without a prompt it failed: {type(err).__name__}: {err}]" if err else ""))
    return None


def summarize(rewards: dict, scores: dict, opts: dict, prompts: dict | None, prompts_source: str | None,
              result: dict, protocol: dict, skipped: dict) -> None:
    """Per reward: mean and standard error into ``result``, its settings into ``protocol``, or the
    reason it has no score into ``skipped``."""
    for name, reward in rewards.items():
        sc = scores.get(name)
        if sc is None or not len(sc):
            skipped[f"reward:{name}"] = "no generated image decoded"
            continue
        m = mean_se(sc, f"reward:{name}")
        result[f"reward_{name}"], result[f"reward_{name}_stderr"] = m.mean, (m.se if m.n > 1 else None)  # JSON: no nan
        protocol[f"reward:{name}"] = {
            "options": json.loads(json.dumps(opts, default=str)),
            "higher_is_better": getattr(reward, "higher_is_better", True),
            "prompts": "none (the reward does not use them)" if prompts is None else
                       (prompts_source or "settings.json of diffplug sample"),
            "stderr": "std (ddof=1) / sqrt(n) (diffplug.evals.stats.mean_se)"}


def scores_jsonl(files: list, scores: dict, prompts: dict | None, rewards=None) -> str:
    """One JSON line per image: ``{"file", "prompt", "reward:NAME": score, ..., "judge_logprob": ..., ...}``;
    the names in ``rewards`` (default: all) carry the ``reward:`` prefix, other per-image scores (the
    judge, sharpness) their own name."""
    rewards = scores if rewards is None else rewards
    lines = []
    for i, file in enumerate(files):
        rec = {"file": str(file), "prompt": None if prompts is None else prompts[file.resolve()]}
        rec.update({(f"reward:{k}" if k in rewards else k): float(v[i]) for k, v in scores.items()})
        lines.append(json.dumps(rec) + "\n")
    return "".join(lines)

