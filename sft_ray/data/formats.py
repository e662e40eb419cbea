"""Pure row formatting: a raw record becomes text segments, each marked trained or not.

Segments are tokenized one by one, so the label mask follows segment boundaries exactly;
nothing searches the rendered text for markers (a question may itself contain `### Output`).
"""

from __future__ import annotations

from typing import NamedTuple


class Segment(NamedTuple):
    text: str
    trained: bool


class BadRow(ValueError):
    """A record that cannot become a training example; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text_field(record: dict, name: str, *, required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise BadRow("missing_field", f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def instruction(record: dict) -> list[Segment]:
    """`{question, input, output}` in the `### Question / ### Input / ### Output` layout."""
    question = _text_field(record, "question", required=True)
    extra = _text_field(record, "input", required=False)
    output = _text_field(record, "output", required=True)
    if not output:
        raise BadRow("empty_response", "field 'output' is empty")
    prompt = f"### Question\n{question}\n\n"
    if extra:
        prompt += f"### Input\n{extra}\n\n"
    prompt += "### Output\n"
    return [Segment(prompt, False), Segment(output, True)]


FORMATS = {"instruction": instruction}


def render(record: dict, fmt: str) -> list[Segment]:
    if not isinstance(record, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    return FORMATS[fmt](record)


def prompt_of(record: dict, fmt: str) -> str:
    """The untrained prefix up to the first response: what a model is given to generate from."""
    segments = render(record, fmt)
    return "".join(s.text for s in segments[: next(i for i, s in enumerate(segments) if s.trained)])
