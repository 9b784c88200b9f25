"""What PPO sees, token by token: snapshots of a few completions every --ppo.snapshot-every
iterations, for `proximal inspect` (lm/inspector.py) to draw.

At a snapshot iteration the policy also answers a fixed set of prompts (the first
--ppo.snapshot-prompts of the RL prompts; k answers each for RLOO and GRPO), sampled with a generator of
their own, so the training batch and every metric stay exactly as without snapshots. These rows
go through the very functions the batch goes through (`collect_rollout`: old log-probs, values,
reference log-probs, score, per-token rewards, GAE), their advantages are whitened with the
batch's own moments, and their log-probs are computed again as the update computes them: before
its first step (the ratio there is exactly 1 unless old and new log-probs are computed two
different ways, the classic bug) and after its last (the ratio the update ended with, and
whether Eq. 7 would clip it). They are never trained on.

One JSON line per snapshot iteration in ppo/snapshots.jsonl, appended and fsynced; a resumed
stage drops the lines after its checkpoint. Each row holds, per response token t:

  tokens               the token's text (EOS included)
  logprobs             log pi_old(a_t|s_t), the sampling policy's   ref_logprobs  log pi_ref(a_t|s_t)
  kl_penalty           beta * (logprobs - ref_logprobs)             rewards       -kl_penalty (+ score at EOS)
  values               V(s_t) (0 for RLOO)                          returns       advantages + values
  advantages           GAE (or RLOO's, GRPO's)                      whitened      advantages as the update weighs them
  first_ratio          pi / pi_old before the update's first step   ratio         pi_new / pi_old after the update
  clipped              the ratio outside the clip range
and per sequence: the score, the gold (when there is one), and whether EOS was emitted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from proximal.lm.model import sample_completions
from proximal.lm.rollout import collect_rollout, policy_outputs, update_advantages
from proximal.run import read_jsonl, write_text_atomic

SNAPSHOTS_NAME = "snapshots.jsonl"
SNAPSHOT_SEED = 4  # offset from the run's seed: the snapshot prompts' own sampling stream


def snapshot_prompts(rl_prompts: list[str], count: int, group_size: int) -> list[str]:
    """The fixed prompts, each `group_size` times (1 for PPO; k for RLOO's and GRPO's groups)."""
    return [prompt for prompt in rl_prompts[:count] for _ in range(group_size)]


@torch.no_grad()
def take_snapshot(policy, reference, scorer, tokenizer, prompts: list[str], config, kl_coef: float,
                  moments, seed: int, device: str):
    """(The snapshot rows' rollout, the batch's advantage `moments` (mean, variance: the update
    whitens with them), the ratio [B, R] the update's first step would see), before the update."""
    generator = torch.Generator(device=device).manual_seed(seed)
    completions = sample_completions(policy.lm, tokenizer, prompts, config.max_new_tokens, config.temperature,
                                     generator, device)
    rollout = collect_rollout(policy, reference, scorer, prompts, completions, tokenizer,
                              [torch.arange(len(prompts), device=device)], config, kl_coef)
    first_logprobs, _, _ = policy_outputs(policy, completions, config.temperature)
    return rollout, moments, (first_logprobs - rollout.logprobs).exp()


@torch.no_grad()
def snapshot_record(iteration: int, prompts: list[str], rollout, moments, first_ratio, policy, tokenizer, config,
                    kl_coef: float, stats: dict, gold) -> dict:
    """The JSON record of a snapshot, after the update (`policy` is the updated one)."""
    mask = rollout.mask
    new_logprobs, _, _ = policy_outputs(policy, rollout.completions, config.temperature)
    ratio = (new_logprobs - rollout.logprobs).exp()  # [B, R]
    fields = {"logprobs": rollout.logprobs, "ref_logprobs": rollout.ref_logprobs, "kl_penalty": rollout.kl_penalty,
              "rewards": rollout.rewards, "values": rollout.values, "returns": rollout.returns,
              "advantages": rollout.advantages,
              "whitened": update_advantages(rollout.advantages, mask, config.method, moments),
              "first_ratio": first_ratio, "ratio": ratio}
    texts = rollout.completions.texts(tokenizer)
    ended = rollout.completions.ended.tolist()
    golds = gold(prompts, texts, ended) if gold is not None else None
    rows = []
    for row, prompt in enumerate(prompts):
        length = int(mask[row].sum())
        ids = rollout.completions.response_ids[row, :length].tolist()
        record = {"prompt": prompt, "text": texts[row], "ended": bool(ended[row]), "score": float(rollout.scores[row]),
                  "gold": None if golds is None else float(golds[row]),
                  "tokens": [tokenizer.decode([token]) for token in ids]}
        record.update({name: values[row, :length].tolist() for name, values in fields.items()})
        record["clipped"] = [r - 1.0 > config.clip_high or 1.0 - r > config.clip_coef for r in record["ratio"]]
        rows.append(record)
    summary = {name: stats.get(name) for name in ("kl_k1", "clip_fraction", "explained_variance", "score", "gold",
                                                  "approx_kl", "entropy")}
    return {"iteration": iteration, "kl_coef": kl_coef, "clip_coef": config.clip_coef, "method": config.method,
            "summary": summary, "rows": rows}


def append_snapshot(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def keep_snapshots_until(path: Path, iteration: int) -> None:
    """A resumed stage: drop the snapshots a killed run took after its checkpoint (and a cut line)."""
    if path.exists():
        kept = [record for record in read_jsonl(path, repair=True) if record["iteration"] <= iteration]
        write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
