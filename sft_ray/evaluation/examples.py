"""Held-out examples from prepared rows: the prompt is every token before a trained span, the
reference is the span.

The rows are the preparation's own (the same rendering, chat template and masking as training),
so the prompt is what the model sees at inference: for chat data, the tokens before each trained
span equal the template's rendering with `add_generation_prompt=True`, which the masking tests
check against the model's own `apply_chat_template`. A conversation with several assistant
turns gives one example per turn, each after the true turns before it. Packed rows are cut back
into their examples first (`seq_lengths`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from sft_ray import storage
from sft_ray.data.tokenize import IGNORE


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of trained (non -100) labels."""
    out, start = [], None
    for i, lab in enumerate(labels):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(labels)))
    return out


def of_row(input_ids: list[int], labels: list[int], seq_lengths: list[int] | None = None) -> list[tuple[list, list]]:
    """(prompt ids, reference ids) of every trained span of a prepared row."""
    out, begin = [], 0
    for length in seq_lengths or [len(input_ids)]:
        ids, labs = input_ids[begin : begin + length], labels[begin : begin + length]
        out += [(ids[:a], labs[a:b]) for a, b in spans(labs) if a > 0]
        begin += length
    return out


def read(prepared: str, manifest: dict, split: str, set_name: str) -> pa.Table:
    """The examples of a prepared split as a table (set, index, prompt_ids, reference_ids), in row order.

    Read on the driver, token ids only: a held-out set of 100k examples of 300 tokens is ~120 MB."""
    index, prompts, references = [], [], []
    for f in manifest["splits"][split]["files"]:
        fs, path = storage.filesystem(storage.join(prepared, split, f["name"]))
        with fs.open_input_file(path) as fh:
            table = pq.read_table(fh)
        lengths = table.column("seq_lengths").to_pylist() if "seq_lengths" in table.column_names else None
        for i, (ids, labs) in enumerate(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())):
            for prompt, reference in of_row(ids, labs, lengths[i] if lengths else None):
                index.append(len(index))
                prompts.append(prompt)
                references.append(reference)
    return _table(set_name, index, prompts, references)


def _table(set_name: str, index: list, prompts: list, references: list) -> pa.Table:
    return pa.table(
        {
            "set": pa.array([set_name] * len(index), pa.string()),
            "index": pa.array(index, pa.int64()),
            "prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
            "reference_ids": pa.array(references, pa.list_(pa.int32())),
        }
    )
