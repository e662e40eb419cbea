"""Regenerate the demo data: python jobs/data/demo/generate.py (deterministic)."""

import json
import random
from pathlib import Path

SUBJECTS = [
    "The food",
    "The staff",
    "The service",
    "The room",
    "The pasta",
    "The pizza",
    "The coffee",
    "The movie",
    "The book",
    "The music",
    "The hotel",
    "The flight",
    "The seat",
    "The phone",
    "The battery",
    "The delivery",
    "The waiter",
    "The plot",
    "The ending",
    "The camera",
    "The sound",
    "The view",
    "The bed",
    "The breakfast",
]
VERBS = ["was", "felt", "seemed", "looked", "tasted", "sounded"]
POSITIVE = [
    "wonderful",
    "great",
    "excellent",
    "lovely",
    "amazing",
    "delicious",
    "friendly",
    "comfortable",
    "fast",
    "beautiful",
    "perfect",
    "brilliant",
]
NEGATIVE = [
    "terrible",
    "awful",
    "horrible",
    "bland",
    "rude",
    "dirty",
    "slow",
    "boring",
    "broken",
    "noisy",
    "cold",
    "disappointing",
]
ADVERBS = ["", "", "very ", "really ", "quite ", "always "]
QUESTIONS = [
    "Classify the sentiment of this review.",
    "Is this review positive or negative?",
    "What is the sentiment of the text?",
]


def clause(rng, words):
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADVERBS)}{rng.choice(words)}"


def row(rng):
    label = rng.choice(["positive", "negative"])
    words = POSITIVE if label == "positive" else NEGATIVE
    parts = [clause(rng, words) for _ in range(rng.randint(1, 2))]
    review = " and ".join([parts[0]] + [p[0].lower() + p[1:] for p in parts[1:]]) + rng.choice([".", "!"])
    return {"question": rng.choice(QUESTIONS), "input": review, "output": label}


def main():
    rng = random.Random(7)
    here = Path(__file__).parent
    seen, rows = set(), []
    while len(rows) < 460:
        r = row(rng)
        if r["input"] not in seen:
            seen.add(r["input"])
            rows.append(r)
    for name, part in (("train", rows[:400]), ("eval", rows[400:])):
        with open(here / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main()
