"""Per-example metrics of a generated answer against its reference, and their sums per set.

Plain Python: the generation actors compute the per-example values, the driver sums them as the
rows stream in (it never holds a whole set).
"""

from __future__ import annotations

import heapq
import math
import re
import unicodedata

RATES = ("exact_match", "normalized_match", "contains", "turn_end")
MODELS = ("base", "tuned")
LOSS_TOLERANCE = 0.01  # a retention set's reference loss may rise by 1% before it counts as regressed
SHOWN = 10  # examples kept in summary.json where base and tuned differ most


def normalize(text: str) -> str:
    """Case, punctuation and runs of whitespace do not count (the SQuAD normalization, minus articles)."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return re.sub(r"\s+", " ", text).strip()


def example(answer: str, reference: str, clean_stop: bool) -> dict:
    """`answer` and `reference` without special tokens; `clean_stop`: ended with its own end-of-turn
    token and did not run on into a new turn of the format (sft_ray.train.final.clean_stop)."""
    a, r = normalize(answer), normalize(reference)
    return {
        "exact_match": answer.strip() == reference.strip(),
        "normalized_match": a == r,
        "contains": bool(r) and r in a,
        "turn_end": clean_stop,
    }


class Totals:
    """Sums of one set's examples, for base and tuned side by side."""

    def __init__(self):
        self.n = 0
        self.sums = {m: dict.fromkeys((*RATES, "output_tokens"), 0.0) for m in MODELS}
        self.nll = dict.fromkeys(MODELS, 0.0)
        self.tokens = 0
        self.lost = dict.fromkeys(RATES, 0)  # examples the base got and the tuned model did not
        self.gained = dict.fromkeys(RATES, 0)
        self.differ: list[tuple] = []  # a heap of the SHOWN examples where base and tuned differ most

    def add(self, row: dict) -> None:
        self.n += 1
        self.tokens += row["reference_tokens"]
        for m in MODELS:
            for key in (*RATES, "output_tokens"):
                self.sums[m][key] += float(row[f"{m}_{key}"])
            self.nll[m] += row[f"{m}_loss"] * row["reference_tokens"]
        for k in RATES:
            self.lost[k] += bool(row[f"base_{k}"]) and not row[f"tuned_{k}"]
            self.gained[k] += bool(row[f"tuned_{k}"]) and not row[f"base_{k}"]
        key = (sum(row[f"base_{k}"] != row[f"tuned_{k}"] for k in RATES), abs(row["tuned_loss"] - row["base_loss"]))
        item = (key, row["index"], {k: row[k] for k in SHOWN_KEYS})
        if len(self.differ) < SHOWN:
            heapq.heappush(self.differ, item)
        elif item[:2] > self.differ[0][:2]:
            heapq.heapreplace(self.differ, item)

    def summary(self) -> dict:
        out = {}
        for m in MODELS:
            s = {k: v / self.n if self.n else None for k, v in self.sums[m].items()}
            loss = self.nll[m] / self.tokens if self.tokens else None
            s.update(loss=loss, perplexity=math.exp(min(loss, 700)) if loss is not None else None)
            out[m] = s
        out["most_different"] = [x[2] for x in sorted(self.differ, key=lambda x: x[:2], reverse=True)]
        out["changed"] = {k: {"lost": self.lost[k], "gained": self.gained[k]} for k in RATES}
        return out


SHOWN_KEYS = (
    "index", "prompt", "reference", "base_output", "tuned_output",
    *(f"{m}_{k}" for m in MODELS for k in (*RATES, "loss")),
)  # fmt: skip


def regressions(base: dict, tuned: dict, changed: dict) -> list[dict]:
    """Where the tuned model does worse than the base beyond chance.

    A rate: base and tuned answer the same examples, so what counts is the examples that changed
    (McNemar's test): flagged when the examples lost outnumber those gained by more than twice the
    standard deviation of that difference under no change, sqrt(lost + gained) (about p < 0.05).
    Two of sixteen lost and none gained is not flagged (2 < 2.8); ten of a hundred is (10 > 6.3).
    The reference loss: flagged when more than LOSS_TOLERANCE above the base's."""
    out = []
    for k in RATES:
        lost, gained = changed[k]["lost"], changed[k]["gained"]
        if lost - gained > 2 * math.sqrt(lost + gained):
            out.append({"metric": k, "base": base[k], "tuned": tuned[k], "by": base[k] - tuned[k], "lost": lost,
                        "gained": gained})  # fmt: skip
    if base["loss"] is not None and tuned["loss"] > base["loss"] * (1 + LOSS_TOLERANCE):
        out.append({"metric": "loss", "base": base["loss"], "tuned": tuned["loss"], "by": tuned["loss"] - base["loss"]})
    return out


def describe(found: list[dict]) -> str:
    """`regressed by ...` in words, one clause per metric."""
    parts = [
        f"{r['metric'].replace('_', ' ')} {r['base']:.4f} -> {r['tuned']:.4f} (+{r['by']:.4f})"
        if r["metric"] == "loss"
        else f"{r['metric'].replace('_', ' ')} {r['base']:.0%} -> {r['tuned']:.0%} (-{r['by'] * 100:.0f} points: "
        f"{r['lost']} examples lost, {r['gained']} gained)"
        for r in found
    ]
    return "regressed by " + "; ".join(parts) if parts else "no regression"
