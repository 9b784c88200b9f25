"""The toy task's rule as a reward function, for
`--reward.function examples/positive_words/reward.py:positivity`: +1 for a completion with one of
the task's positive adjectives, -1 for a negative one, 0 for neither or both; and 1 less if it
does not name the thing the prompt asks about (so "the sun is lovely." for "describe the cat."
is not a perfect answer)."""

POSITIVE = {"lovely", "warm", "bright", "kind", "calm", "great", "sweet", "fine"}
NEGATIVE = {"awful", "cold", "dull", "grim", "harsh", "sad", "bleak", "rough"}


def _thing(prompt: str) -> str:
    return prompt.split("the ", 1)[-1].split(" ")[0].rstrip(".?")


def positivity(prompts: list[str], completions: list[str]) -> list[float]:
    scores = []
    for prompt, completion in zip(prompts, completions):
        words = set(completion.replace(".", " ").split())
        tone = float(bool(words & POSITIVE)) - float(bool(words & NEGATIVE))
        scores.append(tone - (0.0 if _thing(prompt) in words else 1.0))
    return scores
