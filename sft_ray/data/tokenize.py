"""Pure tokenization with token-exact labels.

Each segment is tokenized on its own (one batched call for speed), so every token belongs to
exactly one segment and its label is decided by that segment: -100 for prompt tokens, the token
id for response tokens and the EOS that follows the response. Chat-templated examples carry their
own BOS and end-of-turn tokens in the text, so nothing is added to them.

Truncation rule: an example longer than `max_length` keeps its first `max_length` tokens (the
start of the prompt is kept, the end of the response is cut, EOS included). An example left with
no trained token is dropped with reason `no_trained_tokens_after_truncation`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sft_ray.data.formats import Example

IGNORE = -100


@dataclass(frozen=True)
class Special:
    """Token ids the encoder adds itself, read once from the tokenizer."""

    prefix: tuple[int, ...]  # what the tokenizer puts in front of a text (BOS), possibly empty
    eos: int


def special_ids(tokenizer) -> Special:
    # Encoding "" with special tokens shows exactly what the post-processor adds (e.g. BOS).
    prefix = tuple(tokenizer("", add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one so responses can be terminated")
    return Special(prefix=prefix, eos=tokenizer.eos_token_id)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_batch(tokenizer, examples: list[Example], special: Special, max_length: int) -> list[Encoded | str]:
    """Encode examples; an entry is an `Encoded` or the reason string it was dropped."""
    texts = [seg.text for ex in examples for seg in ex.segments]
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out: list[Encoded | str] = []
    k = 0
    for ex in examples:
        ids = [] if ex.templated else list(special.prefix)
        labels = [IGNORE] * len(ids)
        for seg in ex.segments:
            toks = pieces[k]
            k += 1
            ids += toks
            labels += toks if seg.trained else [IGNORE] * len(toks)
        if not ex.templated:
            ids.append(special.eos)
            labels.append(special.eos)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            out.append("no_trained_tokens_after_truncation")
        else:
            out.append(Encoded(ids, labels, truncated))
    return out
