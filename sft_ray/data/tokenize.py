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


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, without the offsets it also computes.

    For a tokenizer that is the plain Rust backend, that call is `encode_batch` plus offsets, masks
    and their conversion to Python; `encode_batch_fast` gives the same ids with ~27% less CPU
    (benchmarks/prepare_bench.py data; tokenization is ~80% of the encoder's time). A tokenizer
    class that changes how text is encoded (or has no Rust backend) keeps the call.
    """
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    cls = type(tokenizer)
    if not (
        isinstance(tokenizer, TokenizersBackend)
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
        and not hasattr(tokenizer, "_switch_to_input_mode")
    ):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    backend = tokenizer.backend_tokenizer
    # What that call sets on the backend before encoding: no truncation, no padding, and
    # whether special tokens written in the text are split.
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def encode_batch(tokenizer, examples: list[Example], special: Special, max_length: int) -> list[Encoded | str]:
    """Encode examples; an entry is an `Encoded` or the reason string it was dropped."""
    texts = [seg.text for ex in examples for seg in ex.segments]
    pieces = token_ids(tokenizer, texts) if texts else []
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
        if labels.count(IGNORE) == len(labels):
            out.append("no_trained_tokens_after_truncation")
        else:
            out.append(Encoded(ids, labels, truncated))
    return out
