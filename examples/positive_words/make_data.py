"""Writes the toy text task's data, in the JSON-lines formats `proximal rlhf --data.*` reads.

The task: asked about a thing ("describe the cat."), answer "the cat is <adjective>.". The
demonstrations use a positive or a negative adjective, half and half, so SFT learns to say
both; the preferences always prefer the positive one (the known rule: a reward model that
scores each completion alone cannot do better than chance, 0.5, without learning it). The
held-out prompts ask about things no training record mentions.

  python3 examples/positive_words/make_data.py      # rewrites the five .jsonl files beside it
"""

import json
import random
from pathlib import Path

THINGS = ["cat", "dog", "sun", "sea", "tea", "park", "book", "song", "cake", "rain", "town", "moon", "bread",
          "river", "garden", "train", "lamp", "hill", "snow", "bike", "room", "road", "lake", "coat", "bell",
          "farm", "ship", "door", "tree", "shop", "game", "bird", "fish", "star", "wind", "soup", "hat", "boat",
          "kite", "car"]
HELD_OUT_THINGS = ["house", "forest", "city", "beach", "horse", "piano", "market", "bridge", "cloud", "apple"]
TEMPLATES = ["describe the {}.", "tell me about the {}.", "what is the {} like?"]
POSITIVE = ["lovely", "warm", "bright", "kind", "calm", "great", "sweet", "fine"]
NEGATIVE = ["awful", "cold", "dull", "grim", "harsh", "sad", "bleak", "rough"]


def answer(thing: str, adjective: str) -> str:
    return f"the {thing} is {adjective}."


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def main() -> None:
    rng, here = random.Random(0), Path(__file__).parent
    prompts = [(template.format(thing), thing) for thing in THINGS for template in TEMPLATES]  # 120
    write(here / "prompts.jsonl", [{"prompt": prompt} for prompt, _ in prompts])
    write(here / "eval_prompts.jsonl", [{"prompt": template.format(thing)}
                                        for thing in HELD_OUT_THINGS for template in TEMPLATES])  # 30
    demonstrations = []
    for _ in range(300):
        prompt, thing = rng.choice(prompts)
        demonstrations.append({"prompt": prompt,
                               "completion": answer(thing, rng.choice(rng.choice([POSITIVE, NEGATIVE])))})
    write(here / "sft.jsonl", demonstrations)
    preferences = []
    for _ in range(300):
        prompt, thing = rng.choice(prompts)
        preferences.append({"prompt": prompt, "chosen": answer(thing, rng.choice(POSITIVE)),
                            "rejected": answer(thing, rng.choice(NEGATIVE))})
    write(here / "preferences.jsonl", preferences)


if __name__ == "__main__":
    main()
