"""Batching prepared rows: padded rows, or packed rows.

Packed rows carry `seq_lengths`, from which the collator builds `position_ids` that restart at
every example; they go in with no attention mask,
so transformers derives a block-diagonal mask from the position ids and no example attends to
another. With a varlen kernel (flash attention) a batch is flattened padding-free into one
sequence; with SDPA or eager attention it stays [batch, longest row]: a flattened batch would
make that mask (batch x length)^2 instead of batch x length^2 (2x slower steps on CPU, measured
by benchmarks/train_bench.py).
"""

from __future__ import annotations

IGNORE = -100


def packed_rows(examples: list[dict], pad_token_id: int) -> dict:
    """Packed rows as [batch, length] tensors; a pad position is a one-token sequence of its own."""
    import torch

    n = -(-max(len(e["input_ids"]) for e in examples) // 8) * 8
    ids = torch.full((len(examples), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        positions[i, :k] = torch.cat([torch.arange(n) for n in e["seq_lengths"]])
    # An example's first token has no predecessor of its own: its label would be predicted from the
    # previous example's last token (TRL's padding-free collator masks it the same way).
    labels[positions == 0] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def make_collator(pad_token_id: int, flatten_packed: bool = False):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, pad_to_multiple_of=8)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True, pad_to_multiple_of=8)

    def collate(examples: list[dict]) -> dict:
        if "seq_lengths" not in examples[0]:
            return padded([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        if not flatten_packed:
            return packed_rows(examples, pad_token_id)
        return packed(
            [
                {
                    "input_ids": e["input_ids"],
                    "labels": e["labels"],
                    "seq_lengths": e["seq_lengths"],
                }
                for e in examples
            ]
        )

    return collate


def filler_rows(n: int, pad_token_id: int, packed: bool) -> dict[str, list]:
    """Rows that train nothing (every label -100): they even out the rows per worker without repeating data."""
    rows = {"input_ids": [[pad_token_id]] * n, "labels": [[IGNORE]] * n}
    if packed:
        rows["seq_lengths"] = [[1]] * n
    return rows
