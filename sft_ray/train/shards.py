"""Each worker's own share of the prepared data, memory-mapped from a local copy.

Worker r of W trains on its own rows of the train split: as many as every other worker, give or
take one, taken as PIECES contiguous pieces spread over the whole split (worker 0's first piece,
worker 1's first, ..., worker 0's second, ...), so that every worker's rows mix every source in
its proportion, where one contiguous share each would give one worker the first source and
another the last. It reads only the row groups that hold its pieces from shared storage (the
manifest lists the files with their row counts: no listing, no other worker's rows), streams them
into an Arrow file on local disk and memory-maps it: the rows stay in the page cache, not in the
process, so a worker's memory does not grow with the dataset. The file is unlinked once mapped,
so its disk space goes back when the process ends, however it ends (a Tune trial stopped early
never reaches any clean-up). Its rows are shuffled by the HF Trainer's seeded sampler, epoch by
epoch, the same way on every attempt; a resumed run skips the batches it trained by index,
without reading them.

Measured against the alternatives (README, "Data at scale"): every worker materializing every
row, which Accelerate then sharded, grew to 5 GiB per worker at 200k rows; Ray Data's
`streaming_split` hands out blocks dynamically, so a restarted attempt would see other rows in
another order, and exact resume would have to replay the data from the start.
"""

from __future__ import annotations

import math
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq

from sft_ray import storage

# Pieces per worker: its rows come from all over the split; a large split's pieces are many row groups each.
PIECES = 64


def bounds(n: int, parts: int, k: int) -> tuple[int, int]:
    """[lo, hi) of part k of n rows cut into `parts` contiguous parts whose sizes differ by at most one."""
    return n * k // parts, n * (k + 1) // parts


def share(n: int, world: int, rank: int, pieces: int = PIECES) -> list[tuple[int, int]]:
    """The row ranges of worker `rank`: its bounds(n, world, rank)-many rows, in `pieces` pieces
    interleaved with the other workers' over the whole split."""
    sizes = [b - a for a, b in (bounds(n, world, r) for r in range(world))]
    out, start = [], 0
    for k in range(pieces):
        for r in range(world):
            a, b = bounds(sizes[r], pieces, k)
            if r == rank and b > a:
                if out and out[-1][1] == start:
                    out[-1] = (out[-1][0], start + b - a)
                else:
                    out.append((start, start + b - a))
            start += b - a
    return out


def copy_rows(prepared: str, split: str, files: list[dict], ranges: list[tuple[int, int]], dest: str) -> int:
    """Stream the rows in `ranges` (sorted, disjoint) of a split into an Arrow IPC stream file at
    `dest`, reading only the row groups that hold them; returns the rows written. Written aside and
    renamed: a copy cut short is never taken for a whole one."""
    tmp, writer, start, written, schema = f"{dest}.part", None, 0, 0, None
    for f in files:
        end = start + f["rows"]
        if schema is None or any(a < end and b > start for a, b in ranges):
            fs, path = storage.filesystem(storage.join(prepared, split, f["name"]))
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                schema = schema or pf.schema_arrow
                first = start
                for g in range(pf.num_row_groups):
                    rows = pf.metadata.row_group(g).num_rows
                    cuts = [(max(a, first), min(b, first + rows)) for a, b in ranges if a < first + rows and b > first]
                    if cuts:
                        group = pf.read_row_group(g)
                        writer = writer or pa.ipc.new_stream(tmp, schema)
                        for a, b in cuts:
                            writer.write_table(group.slice(a - first, b - a))
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
    if not storage.exists(storage.join(prepared, "manifest.json")):
        raise FileNotFoundError(
            f"the prepared data {prepared} is not readable on this worker's node ({socket.gethostname()}): "
            "storage.path must be the same shared folder (NFS) or s3:// URI on every node"
        )
    ranges = share(n, world, rank) if split == "train" else [(0, n)]
    os.makedirs(local_dir, exist_ok=True)
    dest = os.path.join(local_dir, f"{split}-rank{rank}.arrow")  # ranks of a node share local_dir
    copy_rows(prepared, split, files, ranges, dest)
    ds = datasets.Dataset.from_file(dest)
    os.remove(dest)  # the mapping keeps the rows; the disk space goes back when the process ends
    return ds


def rows_per_worker(manifest: dict, world: int, batch_size: int) -> int:
    """Rows every worker trains per epoch, filler included: the largest share rounded up to whole batches."""
    n = sum(f["rows"] for f in manifest["splits"]["train"]["files"])
    return math.ceil(math.ceil(n / world) / batch_size) * batch_size


def check_batch(cfg, manifest: dict) -> None:
    """A batch no worker can fill would be made of filler rows (even_out): refused with the key."""
    n = sum(f["rows"] for f in manifest["splits"]["train"]["files"])
    world, batch = cfg.scaling.num_workers, cfg.train.per_device_batch_size
    if batch > math.ceil(n / world):
        raise ValueError(
            f"train.per_device_batch_size={batch} is larger than the {math.ceil(n / world)} rows each of the "
            f"{world} workers trains per epoch ({n} prepared train rows); lower it to at most {math.ceil(n / world)}"
        )


def total_steps(cfg, manifest: dict) -> int:
    """Optimizer steps of the whole run, counted as the HF Trainer counts them."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    batches = rows_per_worker(manifest, cfg.scaling.num_workers, t.per_device_batch_size) // t.per_device_batch_size
    per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
    return math.ceil(t.epochs * per_epoch)


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


def keep_own_share(trainer, world: int) -> None:
    """The train loader yields this worker's rows, all of them: the HF Trainer passes it through
    Accelerate, whose `BatchSamplerShard` would keep only every W-th batch of them. Making that
    wrapper a passthrough (one process) is what transformers itself does for its rank-aware
    `BatchRebalanceSampler` (Trainer._get_dataloader, transformers 5.24); the sampler below it,
    the seeded shuffle and the skip on resume stay Accelerate's. Pinned by tests/test_train_units.py."""
    from sft_ray.train.compat import unsharded

    build, count = trainer.get_train_dataloader, trainer.num_examples
    trainer.get_train_dataloader = lambda: unsharded(build())
    # The HF Trainer's train_samples_per_second counts the train loader's dataset: this worker's
    # share, all workers' rows only once multiplied by the worker count.
    trainer.num_examples = lambda loader: count(loader) * (world if loader.dataset is trainer.train_dataset else 1)
