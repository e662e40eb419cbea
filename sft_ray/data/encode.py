"""The Ray Data actor that turns raw records into token ids and labels."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pyarrow as pa

from sft_ray.data.formats import BadRow, render_record, turn_affixes
from sft_ray.data.sources import read_chunk
from sft_ray.data.tokenize import IGNORE, Encoded, encode_batch, special_ids

BATCH_ROWS = 512
SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("spec", pa.int32()),
        ("where", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int64()),
        ("n_trained", pa.int64()),
        ("truncated", pa.bool_()),
        ("drop_reason", pa.string()),  # "" when the row is kept
        ("error", pa.string()),  # "where: reason" for dropped rows
    ]
)


def parse(raw: str, bad_utf8: bool) -> object:
    if bad_utf8:
        raise BadRow("invalid_utf8", "not valid UTF-8")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise BadRow("malformed_json", f"malformed JSON: {err}") from None


def chat_renderer(tokenizer, template: str | None):
    """(messages, add_generation_prompt) -> text, through the given or the tokenizer's template."""
    template = template or tokenizer.chat_template
    if not template:
        raise ValueError("format 'messages' needs a chat template: the tokenizer has none; set data.chat_template")

    def render(msgs: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )

    return render


class Encoder:
    def __init__(
        self,
        specs: list[dict],
        tokenizer,
        model_path: str,
        trust_remote_code: bool,
        max_length: int,
        chat_template: str | None,
        eval_fraction: float,
        seed: int,
    ):
        """`tokenizer`: the driver's own, unpickled here (about 1 s: no torch import, where
        `AutoTokenizer` costs about 7 CPU-s per actor). None for remote-code tokenizers, whose
        class may not be importable on another node: then each actor loads its own."""
        from sft_ray.model import load_tokenizer

        self.specs = specs
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path, trust_remote_code)
        self.special = special_ids(self.tokenizer)
        self.max_length = max_length
        self.eval_fraction, self.seed = eval_fraction, seed
        self.chat = None
        if any(s["format"] == "messages" for s in specs):
            render = chat_renderer(self.tokenizer, chat_template)
            self.chat = (render, turn_affixes(render))

    def _example(self, raw: str, bad_utf8: bool, spec: dict):
        try:
            return render_record(parse(raw, bad_utf8), spec["format"], spec["fields"], self.chat, spec["train_on"])
        except BadRow:
            raise
        except Exception as err:  # a template that raises on this conversation (e.g. role order)
            raise BadRow("template_error", f"chat template failed: {err}") from None

    def __call__(self, chunks: pa.Table) -> Iterator[pa.Table]:
        """Read each chunk here and encode it in batches: no raw-row blocks go through the object store."""
        for chunk in chunks.to_pylist():
            rows = read_chunk(chunk, self.eval_fraction, self.seed)
            while batch := list(itertools.islice(rows, BATCH_ROWS)):
                yield self.encode(batch)

    def encode(self, rows: list[dict]) -> pa.Table:
        wheres = [r["where"] for r in rows]
        examples, errors = [], {}
        for i, (raw, bad_utf8, spec) in enumerate((r["raw"], r["bad_utf8"], r["spec"]) for r in rows):
            try:
                examples.append(self._example(raw, bad_utf8, self.specs[spec]))
            except BadRow as err:
                errors[i] = err
        encoded = iter(encode_batch(self.tokenizer, examples, self.special, self.max_length))
        cols: dict[str, list] = {name: [] for name in SCHEMA.names[3:]}
        for i, where in enumerate(wheres):
            enc = errors[i] if i in errors else next(encoded)
            if isinstance(enc, Encoded):
                cols["input_ids"].append(enc.input_ids)
                cols["labels"].append(enc.labels)
                cols["n_tokens"].append(len(enc.input_ids))
                cols["n_trained"].append(len(enc.labels) - enc.labels.count(IGNORE))
                cols["truncated"].append(enc.truncated)
                cols["drop_reason"].append("")
                cols["error"].append("")
                continue
            reason = enc.reason if isinstance(enc, BadRow) else enc
            detail = str(enc) if isinstance(enc, BadRow) else reason.replace("_", " ")
            cols["input_ids"].append([])
            cols["labels"].append([])
            cols["n_tokens"].append(0)
            cols["n_trained"].append(0)
            cols["truncated"].append(False)
            cols["drop_reason"].append(reason)
            cols["error"].append(f"{where}: {detail}")
        head = {"split": [r["split"] for r in rows], "spec": [r["spec"] for r in rows], "where": wheres}
        return pa.table({**head, **cols}, schema=SCHEMA)
