"""A tokenizer's chat template made into what formats.messages needs (imports transformers' objects
only through the tokenizer it is given)."""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from sft_ray.data.formats import Chat, check_template


def control_pattern(tokenizer) -> re.Pattern:
    """The control tokens that data must not spell: the tokenizer's special tokens, plus the ones it
    lists in `chat_control_tokens` (transformers' own knob for `sanitize_control_tokens`).

    Non-special added tokens (Qwen3's `<think>`, `<tool_call>`) stay tokens: reasoning and tool
    call data are written with them, and templates parse them out of the content.
    """
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens |= set(getattr(tokenizer, "chat_control_tokens", None) or ())
    pattern = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))
    return re.compile(pattern or "(?!)")


@lru_cache(maxsize=4)
def training_variant(template: str) -> str | None:
    """TRL's training variant of a published template it ships (`<name>_training.jinja` next to a
    verbatim `<name>.jinja` in trl/chat_templates), found without importing TRL; None otherwise."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    for training in sorted(folder.glob("*_training.jinja")):
        original = training.with_name(training.name.replace("_training.jinja", ".jinja"))
        if original.is_file() and original.read_text(encoding="utf-8") == template:
            return training.read_text(encoding="utf-8")
    return None


def build_chat(tokenizer, template: str | None, kwargs: dict) -> Chat:
    """The template (given, or the tokenizer's) as a renderer with `kwargs` (e.g. enable_thinking)
    applied to every render, checked with a probe conversation before any row is read."""
    template = template or tokenizer.chat_template
    if not template:
        raise ValueError("format 'messages' needs a chat template: the tokenizer has none; set data.chat_template")

    from transformers.utils.chat_template_utils import render_jinja_template

    # What apply_chat_template(tokenize=False) does, without rebuilding the special-token map on
    # each of the two renders per turn (a third of the time; the oracle tests compare the two).
    variables = {**tokenizer.special_tokens_map, **kwargs}

    def renderer(text: str):
        def render(msgs: list[dict], tools: list | None, add_generation_prompt: bool) -> str:
            rendered, _ = render_jinja_template(
                conversations=[msgs],
                tools=tools,
                chat_template=text,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
            return rendered[0]

        return render

    training = training_variant(template)
    specials = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    chat = Chat(renderer(template), control_pattern(tokenizer), specials, renderer(training) if training else None)
    check_template(chat)
    return chat
