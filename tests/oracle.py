"""The masking oracle: what the model is given at inference, computed by the tokenizer itself.

For every encoded example it checks the three invariants of the masking (issue #11):
1. the ids are the tokenizer's own ids of the rendered text (`apply_chat_template(..., tokenize=True)`
   for chat, `tokenizer(prompt + response) + EOS` for the plain formats), except where a BPE merge
   crosses a prompt/response boundary, where the inference prompt wins and the decode must match;
2. the ids before each trained span are exactly the inference prompt:
   `apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True)` for the k-th
   trained assistant message, `tokenizer(prompt)` for the plain formats;
3. each trained span decodes to exactly the text the template writes for that turn (content,
   reasoning and tool calls as rendered, then its end-of-turn token), and nothing else is trained.

Control tokens spelled in data are text on both sides (`sanitize_control_tokens=True`); the
tokenizer's `chat_control_tokens` is set to [] so that transformers, like sft-ray, treats only
special tokens as control tokens (see sft_ray/data/chat.py).
"""

from __future__ import annotations

import re

from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens

from sft_ray.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT
from sft_ray.data.tokenize import IGNORE


def spans(labels: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, lab in enumerate([*labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def _exact_decoder(tok) -> bool:
    """Byte-level tokenizers decode any ids back to the exact (normalized) text; SentencePiece-style
    ones may not (Phi-3's `<|end|>` swallows the newline after it, its normalizer adds `▁` after
    special tokens)."""
    return type(tok.backend_tokenizer.decoder).__name__ == "ByteLevel"


def _norm(tok, text: str) -> str:
    """The text as the tokenizer sees it (Qwen normalizes to NFC)."""
    normalizer = tok.backend_tokenizer.normalizer
    return normalizer.normalize_str(text) if normalizer else text


def chat_oracle(tok, tools, kwargs: dict):
    """Renders and ids as transformers computes them, control-token text sanitized."""
    tok.chat_control_tokens = []
    control = tok._get_control_tokens(tok.chat_template)  # transformers' own choice (special tokens)
    control_re = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True))) or "(?!)")

    def ids(conv, gen):
        return tok.apply_chat_template(
            conv, tools=tools, add_generation_prompt=gen, tokenize=True, return_dict=False,
            sanitize_control_tokens=True, **kwargs,
        )  # fmt: skip

    def text(conv, gen, chat_template=None, marked=False):
        if marked:
            conv = mark_control_tokens(conv, control_re)
        return tok.apply_chat_template(
            conv, tools=mark_control_tokens(tools, control_re) if marked else tools, add_generation_prompt=gen,
            tokenize=False, chat_template=chat_template, **kwargs,
        )  # fmt: skip

    return ids, text


def _turn_text(text_of, msgs, i: int, training_template, marked: bool) -> tuple[str, str, str | None]:
    """(prompt text, trained text, how) of assistant message i: what follows its generation prompt."""
    head = text_of(msgs[:i], True, marked=marked)
    full = text_of(msgs[: i + 1], False, marked=marked)
    how = None
    if not full.startswith(head) and training_template:
        how = "training template"  # the turn as TRL's training variant writes it
        t_head = text_of(msgs[:i], True, training_template, marked=marked)
        full = head + text_of(msgs[: i + 1], False, training_template, marked=marked)[len(t_head) :]
    elif not full.startswith(head):
        # Mistral v0.3 writes the system prompt only into a conversation's last user message, so a
        # finished turn is rendered without it: the turn is what follows the generation prompt of the
        # same messages without the system prompt.
        how = "no system prompt"
        rest = text_of([m for m in msgs[:i] if m["role"] != "system"], True, marked=marked)
        assert full.startswith(rest)
        full = head + full[len(rest) :]
    return head, full[len(head) :].rstrip(), how


def check_chat(tok, msgs, tools, kwargs, encoded: list, trained_turns: list[int], training_template=None) -> int:
    """Check chat examples (in order) against the oracle; returns the number of spans checked."""
    ids_of, text_of = chat_oracle(tok, tools, kwargs)
    turns = iter(trained_turns)
    checked = 0
    for enc in encoded:
        ids = enc.input_ids
        assert all(lab in (IGNORE, t) for t, lab in zip(ids, enc.labels))
        found = spans(enc.labels)
        for k, (start, end) in enumerate(found):
            i = next(turns)
            prompt = ids_of(msgs[:i], True)
            assert ids[:start] == prompt, f"prompt of message {i} differs"
            # The trained ids are the tokenizer's own ids of the turn's text after that prompt.
            m_head, m_turn, how = _turn_text(text_of, msgs, i, training_template, marked=True)
            want = encode_marked_chat(tok, m_head + m_turn)
            last = k == len(found) - 1
            if want[: len(prompt)] == prompt:  # else a merge across the prompt's end: the prompt won
                want = want[len(prompt) :]
                assert ids[start:end] == (want if last else want[: end - start])
            else:
                assert tok.decode(ids[:end]) == tok.decode(encode_marked_chat(tok, m_head + m_turn))
            if not last:  # a turn followed by more in one example may end at an earlier end-of-turn token
                assert tok.added_tokens_decoder[ids[end - 1]].special
            head, turn, _ = _turn_text(text_of, msgs, i, training_template, marked=False)
            if _exact_decoder(tok):
                got = tok.decode(ids[:end])[len(tok.decode(ids[:start])) :]
                turn = _norm(tok, turn)
                assert got == turn if last else turn.startswith(got), (got, turn)
            checked += 1
        if how is None:
            whole = ids_of(msgs[: i + 1], False)
            if ids != whole:  # a merge across a prompt's end (e.g. `assistant: ` + `b`): the prompt won
                assert tok.decode(ids) == tok.decode(whole)
        elif _exact_decoder(tok):  # not one render of the template: the prompt, then the turn
            assert tok.decode(ids).rstrip() == _norm(tok, head) + turn
    assert next(turns, None) is None, "a trained turn has no span"
    return checked


def plain_prompt(fmt: str, record: dict) -> tuple[str, str]:
    """(prompt, response) as each plain format writes them, spelled out here independently."""
    if fmt == "instruction":
        extra = f"### Input\n{record['input']}\n\n" if record.get("input") else ""
        return f"### Question\n{record['question']}\n\n{extra}### Output\n", record["output"]
    if fmt == "alpaca":
        if record.get("input"):
            head = (
                f"{ALPACA_PROMPT_INPUT}### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n"
            )
        else:
            head = f"{ALPACA_PROMPT}### Instruction:\n{record['instruction']}\n\n"
        return head + "### Response:\n", record["output"]
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    return "", record["text"]


def check_plain(tok, fmt: str, record: dict, enc) -> None:
    prompt, response = plain_prompt(fmt, record)
    [(start, end)] = spans(enc.labels)
    inference = tok(prompt, split_special_tokens=True)["input_ids"]
    assert enc.input_ids[:start] == inference
    assert end == len(enc.input_ids) and enc.input_ids[-1] == tok.eos_token_id
    joint = tok(prompt + response, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    if joint[:start] == inference:
        assert enc.input_ids == joint
    else:  # a merge across the prompt's end: the prompt won
        assert tok.decode(enc.input_ids) == tok.decode(joint)
    if _exact_decoder(tok):
        got = tok.decode(enc.input_ids)[len(tok.decode(enc.input_ids[:start])) :]
        assert got == _norm(tok, response) + tok.eos_token
