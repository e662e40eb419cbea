"""Pure row formatting: a raw record becomes text segments, each marked trained or not.

Segments are tokenized one by one, so the label mask follows segment boundaries exactly;
nothing searches the rendered text for markers (a question may itself contain `### Output`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Segment(NamedTuple):
    text: str
    trained: bool


class Example(NamedTuple):
    segments: list[Segment]
    # Chat templates write BOS and end-of-turn tokens themselves; other formats get the
    # tokenizer's BOS in front and EOS (trained) after the response.
    templated: bool = False


class BadRow(ValueError):
    """A record that cannot become a training example; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ROLES = ("system", "user", "assistant")


def _field(record: dict, fields: dict, name: str, *, required: bool = True) -> str:
    key = fields.get(name, name)
    value = record.get(key)
    if value is None:
        if required:
            raise BadRow("missing_field", f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _response(record: dict, fields: dict, name: str) -> str:
    value = _field(record, fields, name)
    if not value.strip():
        raise BadRow("empty_response", f"field '{fields.get(name, name)}' is empty")
    return value


def instruction(record: dict, fields: dict) -> Example:
    """`{question, input, output}` in the `### Question / ### Input / ### Output` layout."""
    question = _field(record, fields, "question")
    extra = _field(record, fields, "input", required=False)
    output = _response(record, fields, "output")
    prompt = f"### Question\n{question}\n\n"
    if extra:
        prompt += f"### Input\n{extra}\n\n"
    prompt += "### Output\n"
    return Example([Segment(prompt, False), Segment(output, True)])


def alpaca(record: dict, fields: dict) -> Example:
    """`{instruction, input, output}` with the Stanford Alpaca prompt."""
    instr = _field(record, fields, "instruction")
    extra = _field(record, fields, "input", required=False)
    output = _response(record, fields, "output")
    if extra:
        prompt = f"{ALPACA_PROMPT_INPUT}### Instruction:\n{instr}\n\n### Input:\n{extra}\n\n### Response:\n"
    else:
        prompt = f"{ALPACA_PROMPT}### Instruction:\n{instr}\n\n### Response:\n"
    return Example([Segment(prompt, False), Segment(output, True)])


def prompt_completion(record: dict, fields: dict) -> Example:
    prompt = _field(record, fields, "prompt")
    completion = _response(record, fields, "completion")
    return Example([Segment(prompt, False), Segment(completion, True)])


def text(record: dict, fields: dict) -> Example:
    body = _field(record, fields, "text")
    if not body.strip():
        raise BadRow("empty_response", f"field '{fields.get('text', 'text')}' is empty")
    return Example([Segment(body, True)])


def _messages(record: dict, fields: dict) -> list[dict]:
    key = fields.get("messages", "messages")
    msgs = record.get(key)
    if msgs is None:
        raise BadRow("missing_field", f"missing field '{key}'")
    if not isinstance(msgs, list) or not msgs:
        raise BadRow("wrong_type", f"field '{key}' must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow("wrong_type", f"message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRow("unknown_role", f"message {i} has unknown role '{m['role']}' (expected one of {ROLES})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRow("no_assistant_turn", "conversation has no assistant turn")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRow("empty_response", f"assistant message {i} is empty")
    if msgs[0]["role"] == "assistant":
        raise BadRow("assistant_first", "conversation starts with an assistant turn: there is no prompt for it")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


class ChatTemplateError(ValueError):
    """The chat template cannot be split into prompt and response spans; no row can be used."""


Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def turn_affixes(render: Render) -> tuple[str, str, str]:
    """What the template writes around an assistant's content: (before, end-of-turn, after).

    Found by rendering two probe replies and comparing: the parts that do not depend on the
    content are the template's own. The end-of-turn part (trained) is what the template writes
    after the content up to trailing whitespace, which is formatting (untrained).
    """
    spans = []
    probes = ("alpha 1", "Zeta-9?")  # first and last characters differ, so no affix absorbs them
    for probe in probes:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
        head = render(msgs[:1], True)
        full = render(msgs, False)
        if not full.startswith(head):
            raise ChatTemplateError(
                "the chat template is not prefix-preserving: the prompt rendered with "
                "add_generation_prompt=True is not a prefix of the rendered conversation"
            )
        spans.append(full[len(head) :])
    a, b = spans
    n_pre = 0
    while n_pre < min(len(a), len(b)) and a[n_pre] == b[n_pre]:
        n_pre += 1
    n_suf = 0
    while n_suf < min(len(a), len(b)) - n_pre and a[-1 - n_suf] == b[-1 - n_suf]:
        n_suf += 1
    before, after = a[:n_pre], a[len(a) - n_suf :]
    if a[n_pre : len(a) - n_suf] != probes[0]:
        raise ChatTemplateError("the chat template changes the assistant's content; cannot locate it")
    return before, after.rstrip(), after[len(after.rstrip()) :]


def messages(record: dict, fields: dict, render: Render, affixes: tuple[str, str, str], train_on: str) -> Example:
    """Multi-turn chat through the tokenizer's chat template, assistant turns trained.

    The text is cut where the template's own renderings of growing prefixes of the conversation
    end, so each assistant turn's span comes from the template, never from searching the text.
    """
    msgs = _messages(record, fields)
    before, eot, after = affixes
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    segments: list[Segment] = []
    done = ""  # text covered by segments so far
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render(msgs[:i], True)
        full = render(msgs[: i + 1], False)
        turn = before + m["content"] + eot + after
        if not head.startswith(done) or full != head + turn:
            raise BadRow(
                "template_mismatch",
                f"the chat template does not render assistant message {i} as prompt + content + end-of-turn",
            )
        trained = train_on == "all_assistant" or i == last
        segments += [Segment(head[len(done) :] + before, False), Segment(m["content"] + eot, trained)]
        done = full[: len(full) - len(after)] if after else full
    rest = render(msgs, False)[len(done) :]
    if rest:
        segments.append(Segment(rest, False))
    return Example([s for s in segments if s.text], templated=True)


PLAIN_FORMATS = {
    "instruction": instruction,
    "alpaca": alpaca,
    "prompt_completion": prompt_completion,
    "text": text,
}


def render_record(
    record: object,
    fmt: str,
    fields: dict | None = None,
    chat: tuple[Render, tuple[str, str, str]] | None = None,
    train_on: str = "all_assistant",
) -> Example:
    if not isinstance(record, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    fields = fields or {}
    if fmt == "messages":
        if chat is None:
            raise ValueError("format 'messages' needs a chat template")
        return messages(record, fields, chat[0], chat[1], train_on)
    return PLAIN_FORMATS[fmt](record, fields)


def prompt_text(example: Example) -> str:
    """The untrained prefix up to the first trained segment: what a model generates from."""
    out = []
    for seg in example.segments:
        if seg.trained:
            break
        out.append(seg.text)
    return "".join(out)
