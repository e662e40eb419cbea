"""Every format, property-tested: trained tokens decode to exactly the response(s) and end tokens,
the rest to exactly the prompt, labels equal input_ids where trained and -100 elsewhere."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_ray.data.encode import chat_renderer
from sft_ray.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_INPUT,
    BadRow,
    ChatTemplateError,
    render_record,
    turn_affixes,
)
from sft_ray.data.tokenize import IGNORE, encode_batch, special_ids

EOS = "<|im_end|>"
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
texts = st.text(max_size=40)
responses = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
# A Llama-3-like layout: role header, blank line, content, end-of-turn with no newline after it.
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content'] + "
    "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)


def encode(tokenizer, record, fmt, fields=None, chat=None, train_on="all_assistant"):
    example = render_record(record, fmt, fields, chat, train_on)
    [enc] = encode_batch(tokenizer, [example], special_ids(tokenizer), 100_000)
    assert len(enc.input_ids) == len(enc.labels)
    assert all(lab in (IGNORE, t) for t, lab in zip(enc.input_ids, enc.labels))
    return enc


def trained_runs(tokenizer, enc) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def untrained(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE])


@SETTINGS
@given(instruction=texts, extra=texts, output=responses)
def test_alpaca(tokenizer, instruction, extra, output):
    enc = encode(tokenizer, {"instruction": instruction, "input": extra, "output": output}, "alpaca")
    assert trained_runs(tokenizer, enc) == [output + EOS]
    if extra:
        prompt = f"{ALPACA_PROMPT_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n### Response:\n"
    else:
        prompt = f"{ALPACA_PROMPT}### Instruction:\n{instruction}\n\n### Response:\n"
    assert untrained(tokenizer, enc) == "<s>" + prompt


@SETTINGS
@given(prompt=texts, completion=responses)
def test_prompt_completion(tokenizer, prompt, completion):
    enc = encode(tokenizer, {"prompt": prompt, "completion": completion}, "prompt_completion")
    assert trained_runs(tokenizer, enc) == [completion + EOS]
    assert untrained(tokenizer, enc) == "<s>" + prompt


@SETTINGS
@given(body=responses)
def test_text_trains_every_token(tokenizer, body):
    enc = encode(tokenizer, {"text": body}, "text")
    assert trained_runs(tokenizer, enc) == [body + EOS]
    assert untrained(tokenizer, enc) == "<s>"  # only BOS, which no position predicts


def test_field_mapping(tokenizer):
    enc = encode(tokenizer, {"q": "Why?", "answer": "Because."}, "instruction", {"question": "q", "output": "answer"})
    assert trained_runs(tokenizer, enc) == ["Because." + EOS]
    with pytest.raises(BadRow, match="missing field 'answer'"):
        render_record({"q": "Why?", "output": "x"}, "instruction", {"question": "q", "output": "answer"})


conversations = st.lists(
    st.tuples(st.sampled_from(["user", "assistant", "system"]), responses), min_size=1, max_size=6
).filter(lambda c: c[0][0] != "assistant" and any(r == "assistant" for r, _ in c))


@pytest.mark.parametrize("template", [None, HEADER_TEMPLATE], ids=["chatml", "header"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
@SETTINGS
@given(conv=conversations)
def test_messages(tokenizer, template, train_on, conv):
    render = chat_renderer(tokenizer, template)
    chat = (render, turn_affixes(render))
    msgs = [{"role": r, "content": c} for r, c in conv]
    enc = encode(tokenizer, {"messages": msgs}, "messages", chat=chat, train_on=train_on)
    assistant = [m["content"] + EOS for m in msgs if m["role"] == "assistant"]
    expected = assistant if train_on == "all_assistant" else assistant[-1:]
    assert trained_runs(tokenizer, enc) == expected
    full = render(msgs, False)
    assert tokenizer.decode(enc.input_ids) == full  # nothing added, nothing lost
    # Cutting each trained turn out of the full text where its generation prompt ends leaves the prompt.
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    rest, removed = full, 0
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and (train_on == "all_assistant" or i == last):
            start = len(render(msgs[:i], True)) - removed
            span = m["content"] + EOS
            assert rest[start : start + len(span)] == span
            rest, removed = rest[:start] + rest[start + len(span) :], removed + len(span)
    assert untrained(tokenizer, enc) == rest


def test_messages_exact_tokens(tokenizer):
    render = chat_renderer(tokenizer, None)
    chat = (render, turn_affixes(render))
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    enc = encode(tokenizer, {"messages": msgs}, "messages", chat=chat)
    n_prompt = len(tokenizer(render(msgs[:1], True), add_special_tokens=False)["input_ids"])
    n_answer = len(tokenizer("4", add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE] * n_prompt
    assert enc.labels[n_prompt : n_prompt + n_answer + 1] == enc.input_ids[n_prompt : n_prompt + n_answer + 1]
    assert enc.input_ids[n_prompt + n_answer] == tokenizer.eos_token_id
    assert enc.labels[n_prompt + n_answer + 1 :] == [IGNORE]  # the template's trailing newline


@pytest.mark.parametrize(
    "msgs, reason",
    [
        ([{"role": "user", "content": "hi"}], "no_assistant_turn"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown_role"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty_response"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "wrong_type"),
        ("not a list", "wrong_type"),
        ([{"role": "assistant", "content": "x"}], "assistant_first"),
        ([], "wrong_type"),
    ],
)
def test_bad_conversations(tokenizer, msgs, reason):
    render = chat_renderer(tokenizer, None)
    with pytest.raises(BadRow) as err:
        render_record({"messages": msgs}, "messages", {}, (render, turn_affixes(render)))
    assert err.value.reason == reason


def test_template_that_rewrites_history_is_refused(tokenizer):
    # Drops earlier assistant turns, like templates that strip past reasoning: not prefix-preserving.
    bad = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    render = chat_renderer(tokenizer, bad)
    chat = (render, turn_affixes(render))  # one turn looks fine
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(BadRow) as err:
        render_record({"messages": msgs}, "messages", {}, chat)
    assert err.value.reason == "template_mismatch"
    shouting = "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] | upper) + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="changes the assistant's content"):
        turn_affixes(chat_renderer(tokenizer, shouting))
