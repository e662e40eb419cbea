"""Raw records -> token ids and labels, one batch at a time (inside the preparation actors)."""

from __future__ import annotations

import json

import pyarrow as pa

from sft_ray.data.chat import build_chat, control_pattern
from sft_ray.data.formats import BadRow, render_record
from sft_ray.data.tokenize import IGNORE, Encoded, encode_batch, special_ids

SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("spec", pa.int32()),
        ("where", pa.string()),
        ("part", pa.int32()),  # which example of its record (a chat turn in its own context); 0 for most
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int64()),
        ("n_trained", pa.int64()),
        ("truncated", pa.bool_()),
        ("control_text", pa.bool_()),  # the record spells a control token in its data (encoded as text)
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


def _parts(results: list[tuple]) -> list[tuple]:
    """A record's (example, encoding) pairs as rows, kept ones first.

    Bad data drops the record whole: a conversation never loses some of its turns to an error.
    A later turn that truncation leaves with nothing to train (its own example, in a template that
    rewrites earlier turns) is dropped alone and counted; the turns that fit are kept.
    """
    bad = next((enc for _, enc in results if isinstance(enc, BadRow)), None)
    if bad is not None:
        return [(results[0][0], bad)]
    kept = [(ex, enc) for ex, enc in results if isinstance(enc, Encoded)]
    lost = [(ex, enc) for ex, enc in results if not isinstance(enc, Encoded)]
    return kept + lost if kept else lost[:1]


class Encoder:
    def __init__(
        self,
        specs: list[dict],
        tokenizer,
        model_path: str,
        trust_remote_code: bool,
        max_length: int,
        chat_template: str | None,
        chat_template_kwargs: dict,
    ):
        """`tokenizer`: the driver's own, unpickled here (about 1 s: no torch import, where
        `AutoTokenizer` costs about 7 CPU-s per actor). None for remote-code tokenizers, whose
        class may not be importable on another node: then each actor loads its own."""
        from sft_ray.model import load_tokenizer

        self.specs = specs
        if tokenizer is None:
            tokenizer = load_tokenizer(model_path, trust_remote_code, chat_template)
        self.tokenizer = tokenizer
        self.special = special_ids(self.tokenizer)
        self.max_length = max_length
        self.control = control_pattern(self.tokenizer)
        self.chat = None
        if any(s["format"] == "messages" for s in specs):
            self.chat = build_chat(self.tokenizer, chat_template, chat_template_kwargs)

    def _examples(self, raw: str, bad_utf8: bool, spec: dict):
        record = parse(raw, bad_utf8)
        return render_record(record, spec["format"], spec["fields"], self.chat, spec["train_on"], self.control)

    def encode(self, rows: list[dict]) -> pa.Table:
        examples, owner, errors = [], [], {}
        for i, r in enumerate(rows):
            try:
                found = self._examples(r["raw"], r["bad_utf8"], self.specs[r["spec"]])
            except BadRow as err:
                errors[i] = err
                continue
            examples += found
            owner += [i] * len(found)
        encoded = encode_batch(self.tokenizer, examples, self.special, self.max_length)
        by_row: dict[int, list] = {}
        for i, ex, enc in zip(owner, examples, encoded):
            by_row.setdefault(i, []).extend((ex, e) for e in (enc if isinstance(enc, list) else [enc]))
        cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        for i, r in enumerate(rows):
            for part, (ex, enc) in enumerate(_parts([(None, errors[i])] if i in errors else by_row[i])):
                cols["split"].append(r["split"])
                cols["spec"].append(r["spec"])
                cols["where"].append(r["where"])
                cols["part"].append(part)
                cols["control_text"].append(bool(ex and ex.control_text))
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
                cols["error"].append(f"{r['where']}: {detail}")
        return pa.table(cols, schema=SCHEMA)
