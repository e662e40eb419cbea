"""Best-fit-decreasing packing of tokenized examples into rows of at most `max_length` tokens.

No example is split. Each packed row carries `position_ids` that restart at 0 at every example,
which is what lets attention stay inside each example (block-diagonal mask or varlen kernels).
"""

from __future__ import annotations

import bisect

import pyarrow as pa


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices; each example goes to the fullest bin it still fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example of {n} tokens does not fit in rows of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, b = free.pop(k)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    return [sorted(b) for b in bins]


def pack_table(table: pa.Table, max_length: int) -> pa.Table:
    """Pack rows of `input_ids`/`labels` into rows with `input_ids`, `labels`, `position_ids`."""
    ids = table["input_ids"].to_pylist()
    labels = table["labels"].to_pylist()
    out_ids, out_labels, out_pos = [], [], []
    for members in best_fit_decreasing([len(x) for x in ids], max_length):
        row_ids, row_labels, row_pos = [], [], []
        for i in members:
            row_ids += ids[i]
            row_labels += labels[i]
            row_pos += range(len(ids[i]))
        out_ids.append(row_ids)
        out_labels.append(row_labels)
        out_pos.append(row_pos)
    int_list = pa.list_(pa.int32())
    return pa.table(
        {
            "input_ids": pa.array(out_ids, int_list),
            "labels": pa.array(out_labels, int_list),
            "position_ids": pa.array(out_pos, int_list),
        }
    )
