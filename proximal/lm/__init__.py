"""RLHF for language models: the InstructGPT pipeline on a tiny transformer or yours, offline, on a CPU.

How data flows through the rooms (one job each):

  tasks.py       the Task protocol: prompts, demonstrations, an optional gold score (addition built in)
  data.py        a user's JSON-lines files as a task (TRL's standard and conversational formats)
  reward_function.py   a Python reward in place of a learned one (--reward.function)
     |
  stage.py       what every stage receives: config, task, its data, the run folder, the start model,
                 and proximal.dist's context (torchrun: each rank its share of every batch, rank 0 writes)
  sft.py         demonstrations -> next-token cross-entropy on the response tokens -> SFT model
     |
  labels.py      pairs of completions -> the labeller's answers -> comparisons.jsonl
  reward.py      SFT weights + a scalar head read at EOS, Bradley-Terry loss -> reward model
     |
  rollout.py     per-token rewards (-beta * KL, score at EOS) and GAE over tokens (compute_gae), or
                 RLOO's and GRPO's group baselines
  ppo.py         sample -> score -> Eq. 7 update (clipped_surrogate), in passes of a few rows -> adapt beta
  memory.py      how many rows a pass may take, and each stage's peak resident memory
  snapshots.py   a few completions' per-token quantities, for inspector.py (`proximal inspect`)
  dpo.py         (when asked) the policy fitted to the pairs directly
     |
  pipeline.py    the order of the stages, the checks before anything is written, resume

loading.py and model.py hold what every stage shares: loading.py the tokenizer, the tiny GPT-2,
loading and saving any local Hugging Face causal LM (a directory or a GGUF file) and LoRA;
model.py the forward pass, `token_logprobs` (the one place a temperature meets the logits),
batches of prompts and responses, and sampling with a KV cache. config.py holds the hyperparameters, one dataclass per stage; evaluation.py and
plots.py measure and draw; studies.py and best_of_n.py run the studies of docs/lm_studies.md.
"""
