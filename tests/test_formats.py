"""Every format, property-tested against the inference oracle (tests/oracle.py) on the tiny
byte-level tokenizer; tests/test_family_masking.py runs the same oracle over real families."""

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import check_chat, check_plain, spans

from sft_ray.data.chat import build_chat, control_pattern
from sft_ray.data.formats import MARK_END, MARK_START, BadRow, ChatTemplateError, render_record
from sft_ray.data.tokenize import IGNORE, encode_batch, special_ids

EOS = "<|im_end|>"
MARKERS = MARK_START + MARK_END  # dropped from data, as transformers does
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Text with the things that break masking: spaces and newlines at the ends, unicode, the formats'
# own markers and control tokens spelled out.
tricky = st.text(st.characters(codec="utf-8", exclude_characters=MARKERS), max_size=30) | st.sampled_from(
    ["", " ", "\n\n", " x ", "### Output\n", "</s>", EOS, "<s>💡"]
)
texts = st.lists(tricky, min_size=1, max_size=3).map("".join)
responses = texts.filter(str.strip)
# A Llama-3-like layout: role header, blank line, content, end-of-turn with no newline after it.
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content'] + "
    "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)


# A generation prompt that ends in a space (`ASSISTANT: `), which the reply's first word merges with.
SPACE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)


def encode(tokenizer, record, fmt, chat=None, train_on="all_assistant"):
    examples = render_record(record, fmt, {}, chat, train_on, control_pattern(tokenizer))
    encoded = encode_batch(tokenizer, examples, special_ids(tokenizer), 100_000)
    return [e for x in encoded for e in (x if isinstance(x, list) else [x])]  # a list: turns apart


def trained_text(tokenizer, enc) -> list[str]:
    return [tokenizer.decode(enc.input_ids[a:b]) for a, b in spans(enc.labels)]


PLAIN = {  # format -> (prompt fields, response field)
    "instruction": (("question", "input"), "output"),
    "alpaca": (("instruction", "input"), "output"),
    "prompt_completion": (("prompt",), "completion"),
}


@pytest.mark.parametrize("fmt", list(PLAIN))
@SETTINGS
@given(data=st.data())
def test_plain_formats(tokenizer, fmt, data):
    prompt_fields, response_field = PLAIN[fmt]
    record = {f: data.draw(texts) for f in prompt_fields} | {response_field: data.draw(responses)}
    [enc] = encode(tokenizer, record, fmt)
    check_plain(tokenizer, fmt, record, enc)
    assert trained_text(tokenizer, enc) == [record[response_field] + EOS]


@SETTINGS
@given(body=responses)
def test_text_trains_every_token(tokenizer, body):
    [enc] = encode(tokenizer, {"text": body}, "text")
    check_plain(tokenizer, "text", {"text": body}, enc)
    assert enc.labels[0] == IGNORE and all(lab != IGNORE for lab in enc.labels[1:])  # only BOS untrained


def test_field_mapping(tokenizer):
    examples = render_record({"q": "Why?", "answer": "Because."}, "instruction", {"question": "q", "output": "answer"})
    [enc] = encode_batch(tokenizer, examples, special_ids(tokenizer), 512)
    assert trained_text(tokenizer, enc) == ["Because." + EOS]
    with pytest.raises(BadRow, match="missing field 'answer'"):
        render_record({"q": "Why?", "output": "x"}, "instruction", {"question": "q", "output": "answer"})


def test_control_token_text_is_data(tokenizer):
    """A row explaining `<|im_end|>` must not teach the model to stop mid-answer (it did: the text was
    tokenized as the end-of-turn token and trained as one)."""
    record = {"question": "What does <|im_end|> do?", "output": "<|im_end|> marks the end."}
    [example] = render_record(record, "instruction", {}, None, "all_assistant", control_pattern(tokenizer))
    assert example.control_text
    [enc] = encode_batch(tokenizer, [example], special_ids(tokenizer), 512)
    assert enc.input_ids.count(tokenizer.eos_token_id) == 1 and enc.input_ids[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, enc) == ["<|im_end|> marks the end." + EOS]


def _chat(tokenizer, template, offsets: bool = True):
    tok = copy.deepcopy(tokenizer)
    if template:
        tok.chat_template = template
    if not offsets:  # as a tokenizer class that changes how text is encoded: no Rust offsets
        tok.__class__ = type("NoOffsets", (type(tok),), {"_switch_to_input_mode": lambda self: None})
    return tok, build_chat(tok, None, {})


contents = texts | st.sampled_from(["hello", " padded ", "line\n", "Übersetze 猫 😺"])
conversations = st.lists(
    st.tuples(st.sampled_from(["user", "assistant", "system", "user"]), contents), min_size=1, max_size=6
).filter(
    lambda c: (
        c[0][0] != "assistant"
        and any(r == "assistant" for r, _ in c)
        and all(t.strip() for r, t in c if r == "assistant")
    )
)


@pytest.mark.parametrize("template", [None, HEADER_TEMPLATE, SPACE_TEMPLATE], ids=["chatml", "header", "space"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
@pytest.mark.parametrize("offsets", [True, False], ids=["offsets", "no-offsets"])
@SETTINGS
@given(conv=conversations)
def test_messages(tokenizer, template, train_on, offsets, conv):
    tok, chat = _chat(tokenizer, template, offsets)
    msgs = [{"role": r, "content": c} for r, c in conv]
    encoded = encode(tok, {"messages": msgs}, "messages", chat, train_on)
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    turns = assistant if train_on == "all_assistant" else assistant[-1:]
    assert check_chat(tok, msgs, None, {}, encoded, turns) == len(turns)
    for enc, m in zip([e for e in encoded for _ in spans(e.labels)], [msgs[i] for i in turns]):
        assert m["content"] + EOS in trained_text(tok, enc)


def test_trailing_user_turn_is_cut_not_corrupted(tokenizer):
    """It was `…A1<|im_end|>2<|im_end|>\\n`: the last render sliced by length without a prefix check."""
    tok, chat = _chat(tokenizer, None)
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    [enc] = encode(tok, {"messages": msgs}, "messages", chat)
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(msgs[:2], tokenize=False)
    check_chat(tok, msgs, None, {}, [enc], [1])


def test_tool_calls_trained_tool_results_not(tokenizer):
    tok, chat = _chat(tokenizer, None)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m.tool_calls %}"
        "{% for c in m.tool_calls %}{{ 'call ' + c.function.name + ' ' + (c.function.arguments | tojson) }}{% endfor %}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok.chat_template = template
    chat = build_chat(tok, None, {})
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny."},
    ]
    encoded = encode(tok, {"messages": msgs, "tools": tools}, "messages", chat)
    check_chat(tok, msgs, tools, {}, encoded, [1, 3])
    [enc] = encoded
    assert trained_text(tok, enc) == ['call get_weather {"city": "Paris"}' + EOS, "Sunny." + EOS]


@pytest.mark.parametrize(
    "msgs, reason",
    [
        ([{"role": "user", "content": "hi"}], "no_assistant_turn"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown_role"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty_response"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "empty_response"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "wrong_type"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "missing_field"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "tool_calls": "f"}], "wrong_type"),
        ("not a list", "wrong_type"),
        ([{"role": "assistant", "content": "x"}], "assistant_first"),
        ([], "wrong_type"),
    ],
)
def test_bad_conversations(tokenizer, msgs, reason):
    _, chat = _chat(tokenizer, None)
    with pytest.raises(BadRow) as err:
        render_record({"messages": msgs}, "messages", {}, chat)
    assert err.value.reason == reason


def test_reasoning_the_template_does_not_write_is_refused(tokenizer):
    _, chat = _chat(tokenizer, None)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "why"}]
    with pytest.raises(BadRow) as err:
        render_record({"messages": msgs}, "messages", {}, chat)
    assert err.value.reason == "reasoning_not_rendered"


def test_template_that_rewrites_history_trains_each_turn_in_its_context(tokenizer):
    """A template that drops earlier assistant turns (as Qwen3 drops past reasoning) was refused
    row by row as `template_mismatch`; each turn is now an example in the context it is generated in."""
    rewrites = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok, chat = _chat(tokenizer, rewrites)
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    encoded = encode(tok, {"messages": msgs}, "messages", chat)
    assert len(encoded) == 2
    check_chat(tok, msgs, None, {}, encoded, [1, 3])
    assert tok.decode(encoded[1].input_ids) == "user: a<|im_end|>user: c<|im_end|>assistant: d<|im_end|>"


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] | upper) + '<|im_end|>' }}{% endfor %}",
            "changes the assistant's content",
        ),
        (
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
            "never learn to stop",
        ),
    ],
    ids=["shouting", "no-end-token"],
)
def test_unusable_templates_are_refused_before_any_row(tokenizer, template, message):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(ChatTemplateError, match=message):
        build_chat(tok, None, {})


def test_common_dataset_shapes_are_read(tokenizer):
    """Text parts (`[{type: text, text}]`), a tool's JSON object result, and ShareGPT's
    `conversations` of `{from, value}` become the messages they spell."""
    tok, chat = _chat(tokenizer, None)
    plain = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": "Clear."},
    ]
    shaped = [
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}]},
        {"role": "tool", "content": {"sky": "clear"}},
        {"role": "assistant", "content": "Clear."},
    ]
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in plain]  # fmt: skip
    want = encode(tok, {"messages": plain}, "messages", chat)
    assert encode(tok, {"messages": shaped}, "messages", chat) == want
    assert encode(tok, {"conversations": sharegpt}, "messages", chat) == want
    image = [{"type": "image", "url": "x.png"}, {"type": "text", "text": "What is this?"}]
    with pytest.raises(BadRow, match="list of text parts"):
        render_record({"messages": [{"role": "user", "content": image}, plain[1]]}, "messages", {}, chat)
    with pytest.raises(BadRow, match="unknown ShareGPT 'from' 'bot'"):
        render_record({"conversations": [{"from": "bot", "value": "x"}]}, "messages", {}, chat)
