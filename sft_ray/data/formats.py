"""Pure row formatting: a raw record becomes the text a model reads, with the spans it is trained on.

The text is rendered whole (the format's prompt and response together, or the chat template over
the conversation) and tokenized whole afterwards (tokenize.py), so the ids are the ones inference
produces; the trained spans are character ranges, never found by searching the text for markers
(a question may itself contain `### Output`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import NamedTuple


class Example(NamedTuple):
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges of `text` that are trained
    # Chat templates write BOS and end-of-turn tokens themselves; the other formats get the
    # tokenizer's BOS in front and EOS (trained) after the response.
    templated: bool = False
    control_text: bool = False  # the record spells a control token (e.g. `</s>`) in its content


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
ROLES = ("system", "user", "assistant", "tool")
# The message keys chat templates read (TRL and transformers conventions); others are dropped.
MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")


def _absent(record: dict, key: str) -> BadRow:
    """A required field that is not there: a null value is told apart from a missing key, since
    they are different mistakes (a null is often a failed generation or an export's empty cell)."""
    if key in record:
        return BadRow("null_field", f"field '{key}' is null")
    return BadRow("missing_field", f"missing field '{key}'")


def _field(record: dict, fields: dict, name: str, *, required: bool = True) -> str:
    key = fields.get(name, name)
    value = record.get(key)
    if value is None:
        if required:
            raise _absent(record, key)
        return ""
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _response(record: dict, fields: dict, name: str) -> str:
    value = _field(record, fields, name)
    if not value.strip():
        raise BadRow("empty_response", f"field '{fields.get(name, name)}' is empty")
    return value


def _plain(prompt: str, response: str) -> Example:
    return Example(prompt + response, [(len(prompt), len(prompt) + len(response))])


def instruction(record: dict, fields: dict) -> Example:
    """`{question, input, output}` in the `### Question / ### Input / ### Output` layout."""
    question = _field(record, fields, "question")
    extra = _field(record, fields, "input", required=False)
    output = _response(record, fields, "output")
    prompt = f"### Question\n{question}\n\n"
    if extra:
        prompt += f"### Input\n{extra}\n\n"
    return _plain(prompt + "### Output\n", output)


def alpaca(record: dict, fields: dict) -> Example:
    """`{instruction, input, output}` with the Stanford Alpaca prompt."""
    instr = _field(record, fields, "instruction")
    extra = _field(record, fields, "input", required=False)
    output = _response(record, fields, "output")
    if extra:
        prompt = f"{ALPACA_PROMPT_INPUT}### Instruction:\n{instr}\n\n### Input:\n{extra}\n\n### Response:\n"
    else:
        prompt = f"{ALPACA_PROMPT}### Instruction:\n{instr}\n\n### Response:\n"
    return _plain(prompt, output)


def prompt_completion(record: dict, fields: dict) -> Example:
    return _plain(_field(record, fields, "prompt"), _response(record, fields, "completion"))


def text(record: dict, fields: dict) -> Example:
    body = _field(record, fields, "text")
    if not body.strip():
        raise BadRow("empty_response", f"field '{fields.get('text', 'text')}' is empty")
    return _plain("", body)


# Where the next prompt starts in each plain format: a generation that runs into it did not stop.
NEXT_TURN = {"instruction": "### Question", "alpaca": "### Instruction:", "prompt_completion": None, "text": None}


# ShareGPT's `{from, value}` messages, as most public chat datasets store them.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_response": "tool"}  # fmt: skip


def _content(i: int, role: str, content: object) -> str | None:
    """A message's content as text: text parts (`[{type: text, text}]`) joined; a tool's JSON
    result (an object or list) written as JSON."""
    if content is None or isinstance(content, str):
        return content
    if role == "tool" and isinstance(content, (dict, list)):
        return json.dumps(content, ensure_ascii=False)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise BadRow(
        "wrong_type",
        f"message {i}: 'content' must be a string or a list of text parts ({{type: text, text}}), "
        f"got {json.dumps(content)[:80]}",
    )


def _message(i: int, m: object) -> dict:
    content_key = "content"
    if isinstance(m, dict) and "role" not in m and "from" in m:
        if m["from"] not in SHAREGPT_ROLES:
            raise BadRow("unknown_role", f"message {i} has unknown ShareGPT 'from' {m['from']!r}")
        content_key = "value"
        m = {**{k: v for k, v in m.items() if k != "content"}, "role": SHAREGPT_ROLES[m["from"]]}
        if "value" in m:
            m["content"] = m["value"]
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRow("wrong_type", f"message {i} must be an object with a string 'role' (or ShareGPT's 'from')")
    if m["role"] not in ROLES:
        raise BadRow("unknown_role", f"message {i} has unknown role '{m['role']}' (expected one of {ROLES})")
    content = _content(i, m["role"], m.get("content"))
    calls = m.get("tool_calls")
    if calls is not None and not (m["role"] == "assistant" and isinstance(calls, list)):
        raise BadRow("wrong_type", f"message {i}: 'tool_calls' must be a list on an assistant message")
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise BadRow("wrong_type", f"message {i}: 'reasoning_content' must be a string")
    if m["role"] == "assistant" and not ((content or "").strip() or calls or (reasoning or "").strip()):
        null = f" ('{content_key}' is null)" if content is None and "content" in m else ""
        raise BadRow("empty_response", f"assistant message {i} has no content{null}, reasoning or tool calls")
    if content is None and m["role"] != "assistant":
        if "content" in m:
            raise BadRow("null_field", f"message {i} ({m['role']}): '{content_key}' is null")
        raise BadRow("missing_field", f"message {i} ({m['role']}) has no '{content_key}'")
    out = {k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None and k != "content"}
    if content is not None or calls:
        # A tool-call turn without text keeps `content: None`, as OpenAI and HF datasets write it:
        # templates test for it (DeepSeek-R1 writes the calls only when `content is none`).
        out["content"] = content
    return out


def _messages(record: dict, fields: dict) -> tuple[list[dict], list | None]:
    key = fields.get("messages", "messages")
    if key not in record and "messages" not in fields and "conversations" in record:
        key = "conversations"  # ShareGPT's name for them
    msgs = record.get(key)
    if msgs is None:
        raise _absent(record, key)
    if not isinstance(msgs, list) or not msgs:
        raise BadRow("wrong_type", f"field '{key}' must be a non-empty list of messages")
    msgs = [_message(i, m) for i, m in enumerate(msgs)]
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRow("no_assistant_turn", "conversation has no assistant turn")
    if msgs[0]["role"] == "assistant":
        raise BadRow("assistant_first", "conversation starts with an assistant turn: there is no prompt for it")
    tools_key = fields.get("tools", "tools")
    tools = record.get(tools_key)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRow("wrong_type", f"field '{tools_key}' must be a list of tool (JSON schema) objects")
    return msgs, tools or None


class ChatTemplateError(ValueError):
    """The chat template cannot be used to mask assistant turns; no row can be used."""


# What transformers' `apply_chat_template(..., sanitize_control_tokens=True)` wraps around a control
# token spelled in user data, so that it is encoded as text (transformers.utils.chat_template_utils).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


def mark_control_text(obj, control: re.Pattern):
    """Wrap control-token spellings in every string of `obj` with the markers (stray markers dropped)."""
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return control.sub(f"{MARK_START}\\g<0>{MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: mark_control_text(v, control) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mark_control_text(v, control) for v in obj]
    return obj


class Chat(NamedTuple):
    """A tokenizer's chat template, as the formatting needs it."""

    render: Callable[..., str]  # (messages, tools, add_generation_prompt) -> text, template kwargs applied
    control: re.Pattern  # control tokens that data must not spell (special tokens)
    specials: tuple[str, ...]  # the tokenizer's special tokens: a turn ends with one
    # TRL's training variant of the same template, for a turn the template itself cannot write
    # after its own generation prompt (DeepSeek-R1 prefills `<think>\n` and strips reasoning).
    render_training: Callable[..., str] | None = None


def _common(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _overlap(tail: str, text: str) -> int:
    """The length of the longest end of `tail` that `text` starts with."""
    return next((k for k in range(min(len(tail), len(text)), 0, -1) if tail.endswith(text[:k])), 0)


def _turn(chat: Chat, msgs: list[dict], tools, i: int) -> tuple[str, str, str]:
    """(prompt, trained text, trailing text) of assistant message i, rendered in its own context.

    The prompt is the generation prompt for msgs[:i], exactly what the model is given at inference;
    the trained text is what the template writes after it for message i up to its end-of-turn
    token; trailing whitespace after that token (a newline before the next turn) is formatting.
    Some templates write a finished turn after a different prompt than their generation prompt;
    the turn is then taken from where that generation prompt ends in the finished rendering:
    - DeepSeek-R1 prefills `<think>\n` and strips reasoning: TRL's training variant of the template
      writes the turn after its own generation prompt;
    - Mistral v0.3 puts the system prompt into the last user message only when it is last: the
      finished rendering lacks it, and the generation prompt's end (`[/INST]`) is found in it.
    """
    head = chat.render(msgs[:i], tools, True)
    full = chat.render(msgs[: i + 1], tools, False)
    if not full.startswith(head) and chat.render_training is not None:
        t_head = chat.render_training(msgs[:i], tools, True)
        t_full = chat.render_training(msgs[: i + 1], tools, False)
        full = head + t_full[len(t_head) :] if t_full.startswith(t_head) else full
    if not full.startswith(head):
        n = _common(head, full)
        k = _overlap(head[n:], full[n:])
        if any(s in head[len(head) - k :] for s in chat.specials):
            full = head + full[n + k :]
    if not full.startswith(head):
        n = _common(head, full)
        raise BadRow(
            "template_mismatch",
            f"the chat template renders assistant message {i} after a different prompt than its generation "
            f"prompt: from character {n} the generation prompt goes on with {head[n : n + 30]!r}, the rendered "
            f"turn with {full[n : n + 30]!r}"
            + (f" (the reply must start with {head[n:]!r})" if head[n:].strip() and len(head) - n < 20 else "")
            + (
                "; a reply with reasoning after a prompt that closes the reasoning block cannot be trained "
                "(data.chat_template_kwargs, e.g. enable_thinking, sets the mode)"
                if "think>" in head[n:] + full[n : n + 30]
                else ""
            ),
        )
    turn = full[len(head) :]
    trained = turn.rstrip()
    return head, trained, turn[len(trained) :]


def _check_rendered(msg: dict, i: int, trained: str) -> None:
    """Reasoning or tool calls the template does not write would silently not be trained."""
    reasoning = (msg.get("reasoning_content") or "").strip()
    if reasoning and reasoning not in trained:
        raise BadRow(
            "reasoning_not_rendered",
            f"assistant message {i} has reasoning_content, but the chat template does not write it "
            "(use a reasoning template, or put the reasoning in the content)",
        )
    for call in msg.get("tool_calls") or []:
        name = (call.get("function") or {}).get("name") if isinstance(call, dict) else None
        if not name or name not in trained:
            raise BadRow(
                "tool_call_not_rendered",
                f"assistant message {i}: a tool call ({json.dumps(call)[:60]}) is not written by the chat "
                "template (does it support tool calls? each call needs {'function': {'name', 'arguments'}})",
            )


def _continues(head: str, prev_head: str, prev_trained: str, specials: tuple[str, ...]) -> int | None:
    """How much of the previous trained turn a later prompt `head` keeps, or None if it changes it.

    The later prompt must repeat the earlier one and the earlier turn up to an end-of-turn token:
    Phi-3 closes only the last turn of a conversation with an extra `<|endoftext|>`, which a later
    prompt does not repeat, while Qwen3 drops past reasoning, which changes the turn itself.
    """
    if not head.startswith(prev_head):
        return None
    rest = head[len(prev_head) :]
    if rest.startswith(prev_trained):
        return len(prev_trained)
    common = prev_trained[: _common(prev_trained, rest)]
    # Back to the last end-of-turn token they share (`<|end|>\n<|` of `<|endoftext|>`/`<|user|>` is
    # not one); a control token spelled in the content is followed by a marker, and is not one either.
    ends = [common.rfind(s) + len(s) for s in specials if s in common]
    ends = [e for e in ends if not common.startswith(MARK_END, e)]
    if not ends:
        return None
    # Only the turn's closing tokens may be left out, never any of what it says.
    left_out = prev_trained[max(ends) :]
    for s in specials:
        left_out = left_out.replace(s, "")
    return max(ends) if not left_out.strip() else None


def messages(record: dict, fields: dict, chat: Chat, train_on: str) -> list[Example]:
    """Chat through the tokenizer's template, assistant turns trained, each in its own context.

    Each trained turn's prompt is the template's generation prompt for the messages before it.
    Turns whose prompt extends the text so far share one example; a template that rewrites
    earlier turns (Qwen3 strips past reasoning) starts a new example for the turn, so every turn
    is trained exactly as it is generated. Messages after the last trained turn are left out.
    """
    msgs, tools = _messages(record, fields)
    marked_msgs = mark_control_text(msgs, chat.control)
    marked_tools = mark_control_text(tools, chat.control)
    control_text = marked_msgs != msgs or marked_tools != tools
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    trained_turns = assistant if train_on == "all_assistant" else assistant[-1:]
    examples: list[Example] = []
    spans: list[tuple[int, int]] = []
    prev = ("", "", "")  # the last turn's (prompt, trained text, trailing text)
    for i in trained_turns:
        try:
            head, trained, after = _turn(chat, marked_msgs, marked_tools, i)
        except BadRow:
            raise
        except Exception as err:  # the template itself refused the conversation (e.g. role order)
            raise BadRow("template_error", f"chat template failed: {err}") from None
        if not trained:
            raise BadRow("empty_response", f"assistant message {i} renders as nothing")
        _check_rendered(marked_msgs[i], i, trained)
        if spans:
            kept = _continues(head, prev[0], prev[1], chat.specials)
            if kept is None:
                examples.append(Example("".join(prev), spans, True, control_text))
                spans = []
            else:
                spans[-1] = (spans[-1][0], spans[-1][0] + kept)
        spans.append((len(head), len(head) + len(trained)))
        prev = (head, trained, after)
    examples.append(Example("".join(prev), spans, True, control_text))
    return examples


def check_template(chat: Chat) -> None:
    """Refuse a template that cannot be masked, before any row is read.

    A probe reply must render after its generation prompt (a prompt that prefills the reply, like
    DeepSeek-R1's `<think>\n`, gets a probe that starts with it), unchanged, and end with a special
    token: otherwise the model would never learn to end its turn.
    """
    probe = "alpha 1"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    head, full = chat.render(msgs[:1], None, True), chat.render(msgs, None, False)
    msgs[1]["content"] = head[_common(head, full) :] + probe
    try:
        _, trained, _ = _turn(chat, msgs, None, 1)
    except BadRow as err:
        raise ChatTemplateError(f"the chat template is not prefix-preserving: {err}") from None
    if probe not in trained:
        raise ChatTemplateError(f"the chat template changes the assistant's content: {trained!r}")
    if not any(trained.endswith(s) for s in chat.specials):
        raise ChatTemplateError(
            f"the chat template ends an assistant turn with {trained[-20:]!r}, not with a special token: "
            "the model would never learn to stop"
        )


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
    chat: Chat | None = None,
    train_on: str = "all_assistant",
    control: re.Pattern | None = None,
) -> list[Example]:
    """The examples of one record: one, or for chat one per context the template gives its turns.

    `control` (plain formats) matches control-token spellings, to count rows that contain them.
    """
    if not isinstance(record, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    fields = fields or {}
    if fmt == "messages":
        if chat is None:
            raise ValueError("format 'messages' needs a chat template")
        return messages(record, fields, chat, train_on)
    ex = PLAIN_FORMATS[fmt](record, fields)
    if control is not None and control.search(ex.text):
        ex = ex._replace(control_text=True)
    return [ex]
