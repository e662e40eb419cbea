"""Batching prepared rows: padded rows, or packed rows flattened padding-free.

Packed rows carry `position_ids` that restart at every example. They are flattened into one
sequence per batch with no attention mask, so transformers derives a block-diagonal mask (or
varlen lengths for flash attention) from the position ids and no example attends to another.
"""

from __future__ import annotations

IGNORE = -100


def seq_lengths(position_ids: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


def make_collator(pad_token_id: int):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, pad_to_multiple_of=8)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True, pad_to_multiple_of=8)

    def collate(examples: list[dict]) -> dict:
        if "position_ids" not in examples[0]:
            return padded([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        return packed(
            [
                {
                    "input_ids": e["input_ids"],
                    "labels": e["labels"],
                    "seq_lengths": seq_lengths(e["position_ids"]),
                }
                for e in examples
            ]
        )

    return collate


def filler_rows(n: int, pad_token_id: int, packed: bool) -> dict[str, list]:
    """Rows that train nothing (every label -100): they even out the rows per worker without repeating data."""
    rows = {"input_ids": [[pad_token_id]] * n, "labels": [[IGNORE]] * n}
    if packed:
        rows["position_ids"] = [[0]] * n
    return rows
