"""Best-fit-decreasing packing of tokenized examples into rows of at most `max_length` tokens.

No example is split. Each packed row carries `seq_lengths`, the lengths of its examples in order:
the collator rebuilds `position_ids` that restart at 0 at every example from them, which is what
lets attention stay inside each example (block-diagonal mask or varlen kernels). Lengths take a
few int32 per row where positions would take one per token.
"""

from __future__ import annotations

import bisect
import itertools

import pyarrow as pa
import pyarrow.compute as pc


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
    """Pack rows of `input_ids`/`labels` into rows with `input_ids`, `labels`, `seq_lengths`."""
    lengths = pc.list_value_length(table["input_ids"]).to_pylist()
    bins = best_fit_decreasing(lengths, max_length)
    order = pa.array([i for members in bins for i in members], pa.int64())
    row_lengths = [sum(lengths[i] for i in members) for members in bins]
    offsets = pa.array([0, *itertools.accumulate(row_lengths)], pa.int32())
    # The examples in bin order, flattened, then cut into rows: no Python list per token.
    ids = pc.take(table["input_ids"], order).combine_chunks().flatten().cast(pa.int32())
    labels = pc.take(table["labels"], order).combine_chunks().flatten().cast(pa.int32())
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, ids),
            "labels": pa.ListArray.from_arrays(offsets, labels),
            "seq_lengths": pa.array([[lengths[i] for i in members] for members in bins], pa.list_(pa.int32())),
        }
    )
