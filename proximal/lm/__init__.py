"""RLHF for language models: the InstructGPT pipeline on a tiny transformer, offline, on a CPU.

How data flows through the rooms (one job each):

  tasks.py       prompts, noisy demonstrations, the gold reward (measures only; drives the labeller)
     |
  sft.py         demonstrations -> next-token cross-entropy on the response tokens -> SFT model
     |
  labels.py      pairs of SFT samples -> the labeller's answers -> comparisons.jsonl
  reward.py      SFT weights + a scalar head read at EOS, Bradley-Terry loss -> reward model
     |
  rollout.py     per-token rewards (-beta * KL, score at EOS) and GAE over tokens (compute_gae)
  ppo.py         sample -> score -> Eq. 7 update (clipped_surrogate_loss) -> adapt beta
     |
  pipeline.py    the three stages into one run directory, resumable; `proximal rlhf`

model.py holds what every stage shares: the tokenizer, the tiny GPT-2, loading any local Hugging
Face causal LM, `token_logprobs` (the one place a temperature meets the logits) and sampling with
a KV cache. config.py holds the hyperparameters, one dataclass per stage; evaluation.py and
plots.py measure and draw.
"""
