"""The inference oracle (tests/oracle.py) over every model family's published chat template and a
tokenizer built like the family's (tests/families.py): hypothesis-generated conversations with
unicode, leading/trailing spaces and newlines, empty system prompts, marker and control-token text,
reasoning, tool calls and trailing user turns; and the plain formats with the same text."""

from __future__ import annotations

import functools
import os

import pytest
from families import FAMILIES, build_family_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import check_chat, check_plain

from sft_ray.data.chat import build_chat, control_pattern, training_variant
from sft_ray.data.formats import MARK_END, MARK_START, BadRow, render_record
from sft_ray.data.tokenize import Encoded, encode_batch, special_ids

MARKERS = MARK_START + MARK_END  # dropped from data, as transformers does
# SFT_RAY_EXAMPLES=500 for a thorough run (the closing note of issue #11 reports one).
SETTINGS = settings(
    max_examples=int(os.environ.get("SFT_RAY_EXAMPLES", 25)), deadline=None, suppress_health_check=list(HealthCheck)
)
TOOLS = ("llama3", "qwen2_5", "qwen3", "mistral_v03")  # families whose templates write tool calls
NO_SYSTEM = ("gemma",)  # "System role not supported"
TOOL_DEF = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@functools.cache
def family(name: str):
    tok = build_family_tokenizer(name)
    tok.chat_control_tokens = []  # the oracle's transformers call then sanitizes what sft-ray does
    return tok


def text_for(name: str):
    control = st.sampled_from(sorted(family(name).all_special_tokens))
    pieces = (
        st.text(st.characters(codec="utf-8", exclude_characters=MARKERS), max_size=20)
        | st.sampled_from(["", " ", "  ", "\n", "\n\n", "\t", " x ", "### Output\n", "Übersetze 猫 😺", "1", "23"])
        | control
    )
    return st.lists(pieces, min_size=1, max_size=4).map("".join)


@st.composite
def conversations(draw, name: str, reasoning: bool):
    text = text_for(name)
    reply = text.filter(lambda s: s.strip())
    msgs = []
    if name not in NO_SYSTEM and draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(st.sampled_from(["", "Be brief."]) | text)})
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(text)})
        answer = {"role": "assistant", "content": draw(reply)}
        if reasoning and draw(st.booleans()):
            answer["reasoning_content"] = draw(reply)
        msgs.append(answer)
    if draw(st.booleans()):
        msgs.append({"role": "user", "content": draw(text)})  # trailing user turn: cut, never trained
    return msgs


def _encode(tok, record, chat, train_on="all_assistant") -> list[Encoded]:
    examples = render_record(record, "messages", {}, chat, train_on, control_pattern(tok))
    encoded = [
        e for x in encode_batch(tok, examples, special_ids(tok), 100_000) for e in (x if isinstance(x, list) else [x])
    ]
    assert all(isinstance(e, Encoded) for e in encoded), encoded
    return encoded


def _turns(msgs, train_on):
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    return assistant if train_on == "all_assistant" else assistant[-1:]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
@pytest.mark.parametrize("name", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_chat_masks_equal_inference(name, train_on, data):
    tok = family(name)
    kwargs = {}
    if name == "qwen3":
        kwargs = {"enable_thinking": data.draw(st.booleans(), label="enable_thinking")}
    reasoning = name == "qwen3" and kwargs["enable_thinking"]
    msgs = data.draw(conversations(name, reasoning), label="messages")
    if name == "deepseek_r1_distill_qwen":  # its generation prompt opens the reasoning block
        for m in msgs:
            if m["role"] == "assistant":
                m["content"] = "<think>\n" + m["content"].strip() + "\n</think>\n\nanswer " + m["content"]
    chat = build_chat(tok, None, kwargs)
    encoded = _encode(tok, {"messages": msgs}, chat, train_on)
    turns = _turns(msgs, train_on)
    assert check_chat(tok, msgs, None, kwargs, encoded, turns, training_variant(tok.chat_template)) == len(turns)


@pytest.mark.parametrize("name", TOOLS)
@SETTINGS
@given(data=st.data())
def test_tool_calls_are_trained_tool_results_are_not(name, data):
    tok = family(name)
    text = text_for(name).filter(lambda s: s.strip())
    call = {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    msgs = [
        {"role": "user", "content": data.draw(text)},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "Sunny " + data.draw(text)},
        {"role": "assistant", "content": data.draw(text)},
    ]
    chat = build_chat(tok, None, {})
    encoded = _encode(tok, {"messages": msgs, "tools": [TOOL_DEF]}, chat)
    # Exactly two trained spans, each the tokenizer's ids of its assistant turn: the tool result is not one.
    assert check_chat(tok, msgs, [TOOL_DEF], {}, encoded, [1, 3]) == 2
    trained = [tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100]) for e in encoded]
    assert "get_weather" in "".join(trained)


@pytest.mark.parametrize("fmt", ["instruction", "prompt_completion", "text"])
@pytest.mark.parametrize("name", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_plain_formats_equal_inference(name, fmt, data):
    tok = family(name)
    text = text_for(name)
    reply = text.filter(lambda s: s.strip())
    record = {
        "instruction": lambda: {"question": data.draw(text), "input": data.draw(text), "output": data.draw(reply)},
        "prompt_completion": lambda: {"prompt": data.draw(text), "completion": data.draw(reply)},
        "text": lambda: {"text": data.draw(reply)},
    }[fmt]()
    [example] = render_record(record, fmt, {}, None, "all_assistant", control_pattern(tok))
    [enc] = encode_batch(tok, [example], special_ids(tok), 100_000)
    check_plain(tok, fmt, record, enc)


def _tokens(tok, enc, trained: bool) -> list[str]:
    return tok.convert_ids_to_tokens([t for t, lab in zip(enc.input_ids, enc.labels) if (lab != -100) == trained])


def test_mistral_reply_has_no_stray_prefix_space():
    """Each segment used to be tokenized alone: `[/INST]` `▁` `▁Paris` and `<0x0A>` `▁` `4`, a `▁`
    trained before every response that the model never sees at inference."""
    tok = family("mistral_v03")
    chat = build_chat(tok, None, {})
    msgs = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    [enc] = _encode(tok, {"messages": msgs}, chat)
    assert _tokens(tok, enc, False)[-1] == "[/INST]"
    trained = _tokens(tok, enc, True)
    assert trained[0].startswith("▁P") and trained[-1] == "</s>" and "▁" not in trained
    assert enc.input_ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    for fmt, record, last in [
        ("instruction", {"question": "What is 2+2?", "output": "4"}, ["4", "</s>"]),
        ("prompt_completion", {"prompt": "Answer: 1", "completion": "23"}, None),
    ]:
        [example] = render_record(record, fmt, {}, None, "all_assistant", control_pattern(tok))
        [enc] = encode_batch(tok, [example], special_ids(tok), 512)
        check_plain(tok, fmt, record, enc)
        if last:  # `Output` newline, then `4`: no `▁` between them
            tokens = tok.convert_ids_to_tokens(enc.input_ids)
            assert tokens[-2:] == last and tokens[-3] in ("\n", "<0x0A>")
        assert tok.decode(enc.input_ids, skip_special_tokens=True) == tok.decode(
            tok(example.text)["input_ids"], skip_special_tokens=True
        )


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_trains_for_the_mode_it_is_told(thinking):
    """The untrained prompt ended with `<think>\\n\\n</think>\\n\\n` whatever the run was for, and
    multi-turn rows were dropped as template_mismatch (Qwen3 strips earlier turns' reasoning)."""
    tok = family("qwen3")
    chat = build_chat(tok, None, {"enable_thinking": thinking})
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", **({"reasoning_content": "Add them."} if thinking else {})},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", **({"reasoning_content": "Add again."} if thinking else {})},
    ]
    encoded = _encode(tok, {"messages": msgs}, chat)
    check_chat(tok, msgs, None, {"enable_thinking": thinking}, encoded, [1, 3])
    prompt = tok.decode(
        encoded[-1].input_ids[: encoded[-1].labels.index(next(x for x in encoded[-1].labels if x != -100))]
    )
    trained = tok.decode([t for t, lab in zip(encoded[-1].input_ids, encoded[-1].labels) if lab != -100])
    if thinking:  # reasoning is trained; the earlier turn's is gone from the later turn's prompt
        assert len(encoded) == 2 and prompt.endswith("<|im_start|>assistant\n") and "Add them." not in prompt
        assert trained == "<think>\nAdd again.\n</think>\n\n6<|im_end|>"
    else:  # the prompt carries the empty think block, as inference with enable_thinking=False does
        assert len(encoded) == 2 and prompt.endswith("<think>\n\n</think>\n\n") and trained == "6<|im_end|>"


@pytest.mark.parametrize("name", ["llama3", "qwen2_5", "mistral_v03", "gemma", "phi3", "smollm2"])
def test_prefix_preserving_turns_share_one_example(name):
    """Turns of one conversation are one example where later prompts repeat earlier turns (Phi-3
    too, whose last turn alone gets `<|endoftext|>`): a 3-turn chat is not 3 examples (tokens ~N^2)."""
    tok = family(name)
    msgs = [
        m for k in range(3) for m in ({"role": "user", "content": f"Q{k}"}, {"role": "assistant", "content": f"A{k}"})
    ]
    encoded = _encode(tok, {"messages": msgs}, build_chat(tok, None, {}))
    assert len(encoded) == 1
    check_chat(tok, msgs, None, {}, encoded, [1, 3, 5])


def test_a_later_turn_truncated_away_drops_alone():
    """Qwen3 trains each reasoning turn in its own context; when the later context no longer fits
    max_length, that turn is dropped and counted, and the record's first turn is kept (it dropped
    the whole conversation)."""
    import json

    from sft_ray.data.encode import Encoder

    tok = family("qwen3")
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "four " * 40, "reasoning_content": "Two plus two."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Three plus three."},
    ]
    spec = {"format": "messages", "fields": {}, "train_on": "all_assistant"}
    encoder = Encoder([spec], tok, "", False, 60, None, {"enable_thinking": True})
    row = {"raw": json.dumps({"messages": msgs}), "bad_utf8": False, "spec": 0, "split": "train", "where": "a:1"}
    table = encoder.encode([row]).to_pylist()
    assert [(r["part"], r["drop_reason"]) for r in table] == [(0, ""), (1, "no_trained_tokens_after_truncation")]
    assert table[0]["truncated"] and table[0]["n_trained"] > 0 and "Two plus two." in tok.decode(table[0]["input_ids"])


def test_reasoning_in_non_thinking_mode_is_refused_naming_the_mode():
    tok = family("qwen3")
    chat = build_chat(tok, None, {"enable_thinking": False})
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add."}]
    with pytest.raises(BadRow, match="enable_thinking") as err:
        render_record({"messages": msgs}, "messages", {}, chat)
    assert err.value.reason == "template_mismatch"
