"""Each worker's own share of the prepared data, memory-mapped from a node-local copy.

Worker r of W trains on rows [r*n/W, (r+1)*n/W) of the train split, in the files' order. It reads
only the row groups that hold them from shared storage (the manifest lists the files with their
row counts, so no listing and no other worker's rows), streams them into an Arrow file on local
disk, and memory-maps it: the rows stay in the page cache, not in the process, so a worker's
memory does not grow with the dataset. Its share is shuffled by the HF Trainer's seeded sampler,
epoch by epoch, the same way on every attempt; a resumed run skips the batches it trained by
index, without reading them.

Measured against the alternatives (README, "Data at scale"): every worker materializing every
row, which Accelerate then sharded, grew to 5 GiB per worker at 200k rows; Ray Data's
`streaming_split` hands out blocks dynamically, so a restarted attempt would see other rows in
another order, and exact resume would have to replay the data from the start.
"""

from __future__ import annotations

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq

from sft_ray import storage


def bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of worker `rank`: contiguous shares whose sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


def copy_rows(prepared: str, split: str, files: list[dict], lo: int, hi: int, dest: str) -> int:
    """Stream rows [lo, hi) of a split into an Arrow IPC stream file at `dest`; returns the rows
    written. Written aside and renamed: a copy cut short is never taken for a whole one."""
    tmp, writer, start, written = f"{dest}.part", None, 0, 0
    schema = None
    for f in files:
        end = start + f["rows"]
        if end > lo and start < hi or schema is None:
            fs, path = storage.filesystem(storage.join(prepared, split, f["name"]))
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                schema = schema or pf.schema_arrow
                first = start
                for g in range(pf.num_row_groups):
                    rows = pf.metadata.row_group(g).num_rows
                    a, b = max(lo, first), min(hi, first + rows)
                    if a < b:
                        writer = writer or pa.ipc.new_stream(tmp, schema)
                        writer.write_table(pf.read_row_group(g).slice(a - first, b - a))
                        written += b - a
                    first += rows
        start = end
    writer = writer or pa.ipc.new_stream(tmp, schema)  # an empty share still has the columns
    writer.close()
    os.replace(tmp, dest)
    return written


def load_share(prepared: str, manifest: dict, split: str, rank: int, world: int, local_dir: str):
    """This worker's rows of `split` as a memory-mapped HF Dataset (the Trainer takes nothing else):
    its own share of train, all of eval (the HF Trainer shards evaluation itself). None when the
    split has no row."""
    import datasets

    files = manifest["splits"][split]["files"]
    n = sum(f["rows"] for f in files)
    if not n:
        return None
    lo, hi = bounds(n, world, rank) if split == "train" else (0, n)
    os.makedirs(local_dir, exist_ok=True)
    dest = os.path.join(local_dir, f"{split}-rank{rank}.arrow")  # ranks of a node share local_dir
    copy_rows(prepared, split, files, lo, hi, dest)
    return datasets.Dataset.from_file(dest)


def rows_per_worker(manifest: dict, world: int, batch_size: int) -> int:
    """Rows every worker trains per epoch, filler included: the largest share rounded up to whole batches."""
    n = sum(f["rows"] for f in manifest["splits"]["train"]["files"])
    return math.ceil(math.ceil(n / world) / batch_size) * batch_size


def even_out(ds, rows: int, pad_token_id: int):
    """Append rows with no trained token up to `rows`, so that every worker runs the same number of
    full batches. Accelerate would otherwise fill the last round by repeating rows: some rows would be
    trained twice per epoch. Filler rows add no loss and no gradient."""
    import datasets

    from sft_ray.train.collate import filler_rows

    missing = rows - len(ds)
    if not missing:
        return ds
    filler = datasets.Dataset.from_dict(filler_rows(missing, pad_token_id, "seq_lengths" in ds.column_names))
    return datasets.concatenate_datasets([ds, filler.cast(ds.features)])


def keep_own_share(trainer) -> None:
    """The train loader yields this worker's rows, all of them: the HF Trainer passes it through
    Accelerate, whose `BatchSamplerShard` would keep only every W-th batch of them. Making that
    wrapper a passthrough (one process) is what transformers itself does for its rank-aware
    `BatchRebalanceSampler` (Trainer._get_dataloader, transformers 5.24); the sampler below it,
    the seeded shuffle and the skip on resume stay Accelerate's. Pinned by tests/test_train_units.py."""
    build = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: unsharded(build())


def unsharded(loader):
    """`loader` made to yield every batch of its own dataset on this process (see keep_own_share)."""
    from accelerate.data_loader import BatchSamplerShard

    shard = getattr(loader, "batch_sampler", None)
    if isinstance(shard, BatchSamplerShard):
        shard.num_processes, shard.process_index = 1, 0
    return loader
