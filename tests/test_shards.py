"""Each worker's own rows: which ones (balanced, from all over the split), read by row group, memory-mapped."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_ray.train.shards import PIECES, copy_rows, load_share, share


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), world=st.integers(1, 9))
def test_shares_cover_every_row_once_and_balance(n, world):
    rows = [[i for a, b in share(n, world, r) for i in range(a, b)] for r in range(world)]
    assert sorted(i for r in rows for i in r) == list(range(n))  # every row, once
    assert max(map(len, rows)) - min(map(len, rows)) <= 1  # the same steps, give or take one filler row
    for r in rows:
        assert r == sorted(r)  # the files' order within a share


def test_every_worker_draws_from_the_whole_split():
    """Two sources one after the other (rows 0-4999 and 5000-9999): one contiguous half each would
    give worker 0 only the first; interleaved pieces give each worker half of each."""
    for rank in (0, 1):
        rows = [i for a, b in share(10_000, 2, rank) for i in range(a, b)]
        assert sum(i < 5000 for i in rows) == 2500
        assert len(share(10_000, 2, rank)) == PIECES


@pytest.fixture
def prepared(tmp_path):
    """A prepared split of 3 files with uneven row groups; row i holds the id i."""
    root, start = tmp_path / "prepared", 0
    files = []
    for k, (n, group) in enumerate([(7, 3), (1, 1), (12, 5)]):
        (root / "train").mkdir(parents=True, exist_ok=True)
        ids = [[start + i] for i in range(n)]
        table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": ids})
        pq.write_table(table, root / "train" / f"{k:06d}.parquet", row_group_size=group)
        files.append({"name": f"{k:06d}.parquet", "rows": n})
        start += n
    (root / "manifest.json").write_text("{}")
    return str(root), {"splits": {"train": {"files": files}, "eval": {"files": []}}}


def test_copy_reads_exactly_the_ranges(prepared, tmp_path):
    root, manifest = prepared
    dest = str(tmp_path / "out.arrow")
    ranges = [(2, 4), (6, 9), (19, 20)]
    assert copy_rows(root, "train", manifest["splits"]["train"]["files"], ranges, dest) == 6
    with pa.memory_map(dest) as f:
        got = pa.ipc.open_stream(f).read_all()["input_ids"].to_pylist()
    assert got == [[2], [3], [6], [7], [8], [19]]
    assert not os.path.exists(dest + ".part")


def test_load_share_maps_its_rows_and_leaves_no_file(prepared, tmp_path):
    root, manifest = prepared
    local = tmp_path / "local"
    got = []
    for rank in range(3):
        ds = load_share(root, manifest, "train", rank, 3, str(local))
        assert ds.cache_files  # memory-mapped, not in memory
        got += [row["input_ids"][0] for row in ds]
    assert sorted(got) == list(range(20))
    assert list(local.iterdir()) == []  # unlinked once mapped: nothing left on disk whatever happens next
    assert load_share(root, manifest, "eval", 0, 3, str(local)) is None


def test_a_prepared_folder_this_node_cannot_see_is_named(prepared, tmp_path):
    _, manifest = prepared
    with pytest.raises(FileNotFoundError, match="storage.path must be the same shared folder"):
        load_share(str(tmp_path / "elsewhere"), manifest, "train", 0, 1, str(tmp_path / "local"))
