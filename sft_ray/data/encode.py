"""The Ray Data actor that turns raw rows into token ids and labels (tokenizer loaded once per actor)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from sft_ray.data.formats import BadRow, render
from sft_ray.data.tokenize import Encoded, encode_batch, special_ids

SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int64()),
        ("n_trained", pa.int64()),
        ("truncated", pa.bool_()),
        ("drop_reason", pa.string()),  # "" when the row is kept
        ("error", pa.string()),  # human-readable "file:line: reason" for dropped bad rows
    ]
)


def parse(raw: str, bad_utf8: bool) -> dict:
    if bad_utf8:
        raise BadRow("invalid_utf8", "line is not valid UTF-8")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise BadRow("malformed_json", f"malformed JSON: {err}") from None


class Encoder:
    def __init__(self, model_path: str, trust_remote_code: bool, max_length: int):
        from sft_ray.model import load_tokenizer

        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.special = special_ids(self.tokenizer)
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["raw"])
        segments, errors = [], {}
        for i in range(n):
            try:
                segments.append(
                    render(parse(batch["raw"][i], bool(batch["bad_utf8"][i])), batch["format"][i])
                )
            except BadRow as err:
                errors[i] = err
                segments.append([])
        encoded = encode_batch(self.tokenizer, [s for s in segments if s], self.special, self.max_length)
        it = iter(encoded)
        cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        for i in range(n):
            enc = None if i in errors else next(it)
            cols["split"].append(batch["split"][i])
            cols["source"].append(batch["source"][i])
            cols["line"].append(int(batch["line"][i]))
            if isinstance(enc, Encoded):
                n_trained = sum(1 for x in enc.labels if x != -100)
                cols["input_ids"].append(enc.input_ids)
                cols["labels"].append(enc.labels)
                cols["n_tokens"].append(len(enc.input_ids))
                cols["n_trained"].append(n_trained)
                cols["truncated"].append(enc.truncated)
                cols["drop_reason"].append("")
                cols["error"].append("")
            else:
                reason = errors[i].reason if i in errors else enc
                detail = str(errors[i]) if i in errors else reason.replace("_", " ")
                cols["input_ids"].append([])
                cols["labels"].append([])
                cols["n_tokens"].append(0)
                cols["n_trained"].append(0)
                cols["truncated"].append(False)
                cols["drop_reason"].append(reason)
                cols["error"].append(f"{batch['source'][i]}:{int(batch['line'][i])}: {detail}")
        return pa.table(cols, schema=SCHEMA)
