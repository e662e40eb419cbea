"""A chat format for a base model: the built-in ChatML template and the tokens it needs.

A base model has no chat template and no turn tokens. `data.chat_template: chatml` gives it
ChatML; the tokens it adds get new embedding rows, which the worker grows and trains with the
adapter (sft_ray.model: fit_embeddings, token_rows, serve_trained_rows_to_trl).
"""

from __future__ import annotations

from sft_ray import storage

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (IM_START, IM_END)

# No default system prompt and no BOS: a base model's tokenizer adds its own BOS, if any.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def template_text(value: str | None) -> str | None:
    """The template `data.chat_template` names: the built-in `chatml`, or a Jinja file (local or s3://)."""
    if value is None:
        return None
    if value == "chatml":
        return CHATML
    fs, path = storage.filesystem(value)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def apply_chat_format(tokenizer, template: str | None) -> list[str]:
    """Give `tokenizer` the template; for the built-in ChatML also its turn tokens, with `<|im_end|>`
    as EOS (the token the model must emit to end its turn, and the one generation stops on).

    Returns the tokens added (none when the tokenizer had them: calling twice adds nothing). A user
    Jinja file only replaces the template: its tokens must already be in the tokenizer, since only
    ChatML's are known here.
    """
    if template is None:
        return []
    tokenizer.chat_template = template
    if template != CHATML:
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        # Special, so that text never splits them and decode keeps them whole.
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.eos_token = IM_END
    return missing
