"""The preparation actor: one chunk of a source in, its rows of every split written, its statistics out.

Each chunk is read, encoded, selected (train rows repeated by their source's weight), packed and
written in blocks by the actor that holds it: rows go from the source file to the prepared file
without passing through the object store or the driver, and one pass over the records yields every
split and the statistics. Files are named by chunk index, so the row order (chunks in source order)
is the same on every preparation whatever order the actors finish in.
"""

from __future__ import annotations

import itertools
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sft_ray import storage
from sft_ray.data import stats
from sft_ray.data.cache import SPLITS
from sft_ray.data.encode import Encoder
from sft_ray.data.packing import pack_table
from sft_ray.data.sources import read_chunk, unit_hash

BATCH_ROWS = 512  # records encoded together (the tokenizer's batch)
BLOCK_ROWS = 8192  # examples packed together and written as one row group: ~99% fill, bounded memory


def select(batch: pa.Table, split: str, weights: list[float], seed: int) -> pa.Table:
    """Kept rows of one split; train rows repeated by their source's weight (seeded for fractions)."""
    batch = batch.filter(pc.and_(pc.equal(batch["split"], split), pc.equal(batch["drop_reason"], "")))
    if split == "train" and any(w != 1.0 for w in weights):
        take = []
        for i, (spec, where) in enumerate(zip(batch["spec"].to_pylist(), batch["where"].to_pylist())):
            w = weights[spec]
            # Keyed on the file name and line, not the folder: the same rows are drawn wherever the data lives.
            key = f"{spec}:{where.rsplit('/', 1)[-1]}"
            copies = int(w) + (unit_hash(seed, "weight", key) < w - int(w))
            take += [i] * copies
        batch = batch.take(pa.array(take, pa.int64()))
    return batch.select(["input_ids", "labels"])


class _SplitFile:
    """One split's rows of one chunk: buffered into blocks, written as row groups of one parquet file
    (opened at the first row, so a chunk without rows of a split writes no file)."""

    def __init__(self, out_dir: str, split: str, name: str, counts: dict, pack_to: int | None, seed: int):
        self.uri, self.split, self.name = storage.join(out_dir, split, name), split, name
        self.counts, self.pack_to, self.seed = counts, pack_to, seed
        self.pending: list[pa.Table] = []
        self.buffered = self.rows = 0
        self.writer = None

    def add(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self.pending.append(rows)
            self.buffered += rows.num_rows
        if self.buffered >= BLOCK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        block = pa.concat_tables(self.pending)
        if self.pack_to:
            block = pack_table(block, self.pack_to)
        if self.writer is None:
            fs, path = storage.filesystem(self.uri)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # a no-op on object stores
            self.writer = pq.ParquetWriter(path, block.schema, filesystem=fs)
        self.writer.write_table(block, row_group_size=block.num_rows)
        lengths = pc.list_value_length(block["input_ids"]).to_pylist()
        stats.count_written(self.counts, self.split, lengths, self.pack_to, self.seed)
        self.rows += block.num_rows
        self.pending, self.buffered = [], 0

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.counts["files"][self.split].append([self.name, self.rows])


class PrepareChunks:
    def __init__(
        self,
        out_dir: str,
        specs: list[dict],
        max_length: int,
        packing: bool,
        eval_fraction: float,
        seed: int,
        **encoder_args,
    ):
        # One thread per actor: the pool already runs an actor per CPU, and the Rust tokenizer's own
        # thread pool on top of it oversubscribes the cores (measured: two encoders on 2 CPUs used
        # about 5% more CPU per row with it).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.encoder = Encoder(specs=specs, max_length=max_length, **encoder_args)
        self.out_dir, self.specs, self.max_length, self.packing = out_dir, specs, max_length, packing
        self.eval_fraction, self.seed = eval_fraction, seed
        self.weights = [s["weight"] for s in specs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        chunks = [json.loads(c) for c in batch["chunk"].to_pylist()]
        return pa.table(
            {"index": [c["index"] for c in chunks], "counts": [json.dumps(self.prepare(c)) for c in chunks]}
        )

    def prepare(self, chunk: dict) -> dict:
        counts = stats.new_counts(len(self.specs))
        name = f"{chunk['index']:06d}.parquet"
        pack_to = {"train": self.max_length if self.packing else None, "eval": None}
        files = {split: _SplitFile(self.out_dir, split, name, counts, pack_to[split], self.seed) for split in SPLITS}
        records = read_chunk(chunk, self.eval_fraction, self.seed)
        while rows := list(itertools.islice(records, BATCH_ROWS)):
            encoded = self.encoder.encode(rows)
            stats.count_encoded(counts, encoded, self.max_length)
            for split, f in files.items():
                f.add(select(encoded, split, self.weights, self.seed))
        for f in files.values():
            f.close()
        return counts
