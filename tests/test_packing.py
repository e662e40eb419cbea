from hypothesis import given, settings
from hypothesis import strategies as st

from sft_ray.data.packing import best_fit_decreasing, pack_table


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=300), capacity=st.integers(64, 200))
def test_bfd_places_every_example_once_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never leaves two bins that could have been one.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_bfd_is_tight_on_a_known_case():
    assert best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10) == [[0, 1, 6], [2, 3, 4, 5]]


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=30), min_size=1, max_size=80))
def test_pack_table_keeps_examples_whole_with_their_lengths(rows):
    import pyarrow as pa

    labels = [[-100] + r[1:] for r in rows]
    table = pa.table({"input_ids": rows, "labels": labels})
    packed = pack_table(table, 40)
    seen = []
    assert packed.schema.field("input_ids").type == pa.list_(pa.int32())
    for ids, labs, lengths in zip(*(packed[c].to_pylist() for c in ("input_ids", "labels", "seq_lengths"))):
        assert len(ids) == len(labs) == sum(lengths) <= 40
        a = 0
        for n in lengths:  # the examples of a row, whole and in order
            seen.append((ids[a : a + n], labs[a : a + n]))
            a += n
    assert sorted(seen) == sorted(zip(rows, labels))  # every example once, whole, labels with it
    real = sum(map(len, rows))
    assert sum(len(x) for x in packed["input_ids"].to_pylist()) == real
