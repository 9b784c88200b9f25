"""How the sentiment preset's reward model grows with its labelled pairs, on a fixed test set.

The start model draws K = 4 responses (32 new tokens, temperature 1) for each of P training
prompts, and 2 for each of 300 other training prompts (the test pairs). Each arm fits the
preset's reward model (bottom 10 blocks, mean-pooled, every weight, AdamW 3e-4, one pass, 16
responses a step) on pairs of those responses, labelled by the exact VADER ordering (the
preset's labeller), and reports its agreement with VADER on the strict test pairs:

  one    the pair (1, 2) of each prompt                      P pairs, 2 responses a prompt
  two    the pairs (1, 2) and (3, 4)                         2P pairs, 4 a prompt
  all    every two of the four (Ouyang et al. 2022, 3.5)     6P pairs, 4 a prompt, each scored once

`--prompts` limits an arm to the first prompts. Optional, never needed by the tests; about 6
minutes of sampling and 3 of fitting an arm for P = 384 on a 2-core CPU. Usage (docs/lm_real_model.md):

  python3 benchmarks/reward_model_pairs.py --model SmolLM2-135M-Instruct.Q4_1.gguf --seed 0 \\
      --arm two:384 --arm all:384 --arm two:192 --arm one:384
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from proximal.lm.loading import bottom_blocks, load_pretrained, trainable_parameters
from proximal.lm.model import ScalarHeadLM, encode_completions, sample_texts
from proximal.lm.reward import reward_scores
from proximal.lm.tasks import SentimentTask, vader_scores
from proximal.losses import bradley_terry_loss

K = 4
PAIRS = {"one": [(0, 1)], "two": [(0, 1), (2, 3)], "all": list(itertools.combinations(range(K), 2))}
TEST_PROMPTS = 300


def sample(model, tokenizer, prompts: list[str], generator: torch.Generator) -> list[tuple[str, bool]]:
    """One (response, ended) per prompt."""
    return list(zip(*sample_texts(model, tokenizer, prompts, 32, 1.0, generator, "cpu")))


def scores(model: ScalarHeadLM, tokenizer, prompts: list[str], responses: list[tuple[str, bool]]) -> torch.Tensor:
    """The reward model's score [B] of each response."""
    batch = encode_completions(tokenizer, prompts, [text for text, _ in responses], [end for _, end in responses], "cpu")
    return reward_scores(model, batch)


def fit_and_test(path: str, tokenizer, groups, test, truth: torch.Tensor, pairs: list[tuple[int, int]], seed: int
                 ) -> float:
    """Agreement with VADER (`truth` [N]: the first response of test pair n scores higher) on the
    strict test pairs after one pass over `groups` with `pairs`."""
    lm, _ = load_pretrained(path)
    model = ScalarHeadLM(bottom_blocks(lm, 10), pooling="mean")
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=3e-4, weight_decay=0.0)
    first, second = (list(side) for side in zip(*pairs))
    model.train()
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), 16 // K):  # 16 responses a step
        batch = [groups[i] for i in order[start:start + 16 // K]]
        prompts = [prompt for prompt, responses in batch for _ in responses]
        responses = [response for _, group in batch for response in group]
        score = scores(model, tokenizer, prompts, responses).view(len(batch), K)  # [G, K]
        gold = torch.tensor(vader_scores(prompts, [text for text, _ in responses])).view(len(batch), K)  # [G, K]
        labels = (gold[:, first] > gold[:, second]).double() + 0.5 * (gold[:, first] == gold[:, second]).double()
        differs = torch.tensor([[group[a] != group[b] for a, b in pairs] for _, group in batch])  # [G, pairs]
        loss = bradley_terry_loss(score[:, first][differs], score[:, second][differs], labels[differs].float(), 0.0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        prompts = [prompt for prompt, _, _ in test]
        s1 = torch.cat([scores(model, tokenizer, prompts[i:i + 64], [a for _, a, _ in test[i:i + 64]])
                        for i in range(0, len(test), 64)])
        s2 = torch.cat([scores(model, tokenizer, prompts[i:i + 64], [b for _, _, b in test[i:i + 64]])
                        for i in range(0, len(test), 64)])
    return float(((s1 > s2) == truth).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct's GGUF file (or any HF directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=384, help="P: training prompts sampled")
    parser.add_argument("--arm", action="append", required=True, metavar="PAIRS:PROMPTS",
                        help=f"pairs ({', '.join(PAIRS)}) and how many of the prompts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model)
    train, _ = SentimentTask.questions(args.seed)
    pick = lambda rng, count: [SentimentTask.render(tokenizer, train[i]) for i in rng.integers(len(train), size=count)]  # noqa: E731
    prompts = pick(np.random.default_rng(args.seed), args.prompts)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    rounds = [sample(model, tokenizer, prompts, generator) for _ in range(K)]
    groups = [(prompt, [rounds[k][i] for k in range(K)]) for i, prompt in enumerate(prompts)]
    test_prompts = pick(np.random.default_rng(args.seed + 999), TEST_PROMPTS)
    test = [(p, a, b) for p, a, b in zip(test_prompts, sample(model, tokenizer, test_prompts, generator),
                                          sample(model, tokenizer, test_prompts, generator))]
    gold = [vader_scores(None, [a[0], b[0]]) for _, a, b in test]  # [N, 2]
    test, truth = ([t for t, (x, y) in zip(test, gold) if x != y],  # strict pairs only
                   torch.tensor([x > y for x, y in gold if x != y]))
    print(f"sampled in {time.perf_counter() - started:.0f} s; {len(test)} strict test pairs", flush=True)
    for arm in args.arm:
        name, count = arm.split(":")
        started = time.perf_counter()
        agreement = fit_and_test(args.model, tokenizer, groups[:int(count)], test, truth, PAIRS[name], args.seed)
        print(json.dumps({"seed": args.seed, "pairs": name, "prompts": int(count), "agreement": round(agreement, 3),
                          "test_pairs": len(test), "fit_seconds": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()
