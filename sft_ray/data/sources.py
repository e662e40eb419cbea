"""Reading source files as raw records that keep where they came from.

Sources: JSONL, JSON (an array, or JSON lines under a .json name), parquet files or folders of
them, and HF `save_to_disk` folders; local paths, NFS paths and `s3://` URIs (pyarrow
filesystems). The driver cuts each source into chunks (line-aligned byte ranges, parquet row
groups, arrow files) so Ray Data reads them in parallel, and every record carries `where`
(`file:line` or `file row N`) for error messages. Records travel as JSON text and are parsed next
to tokenization, so one malformed line is reported instead of failing a whole read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sft_ray import storage

CHUNK_BYTES = 4 << 20


def source_kind(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data file not found: {uri}")
    if info.type == pafs.FileType.Directory:
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
        if "state.json" in names and "dataset_info.json" in names:
            return "hf_disk"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        raise ValueError(f"{uri}: a folder must be an HF save_to_disk folder or hold .parquet files")
    for ext, kind in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if path.endswith(ext):
            return kind
    raise ValueError(f"{uri}: unknown file type (expected .jsonl, .json, .parquet or an HF save_to_disk folder)")


def _files(uri: str, suffix: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path))
        return sorted(storage.join(uri, i.base_name) for i in infos if i.base_name.endswith(suffix))
    return [uri]


def plan_chunks(uri: str, spec: int, split: str, chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Chunks of one source; each is read by one Ray task."""
    kind = source_kind(uri)
    base = {"spec": spec, "split": split, "kind": kind}
    if kind == "jsonl":
        return [{**base, **c} for c in _line_ranges(uri, chunk_bytes)]
    if kind == "json":
        return [{**base, "source": uri, "start": 0, "end": -1, "first": 1}]
    if kind == "parquet":
        chunks = []
        for f in _files(uri, ".parquet"):
            fs, path = storage.filesystem(f)
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh).metadata
            first = 0
            for g in range(meta.num_row_groups):
                chunks.append({**base, "source": f, "start": g, "end": g + 1, "first": first})
                first += meta.row_group(g).num_rows
        return chunks
    state = storage.read_json(storage.join(uri, "state.json"))
    return [
        {**base, "source": storage.join(uri, f["filename"]), "start": 0, "end": -1, "first": 0}
        for f in state["_data_files"]
    ]


def _line_ranges(uri: str, chunk_bytes: int) -> list[dict]:
    """Line-aligned byte ranges of a JSONL file, each with the line number it starts at."""
    fs, path = storage.filesystem(uri)
    chunks: list[dict] = []
    start, line, pos, carry = 0, 1, 0, b""
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk_bytes):
            carry += block
            pos += len(block)
            cut = carry.rfind(b"\n") + 1
            if cut == 0:
                continue  # a line longer than one block: keep reading
            end = pos - (len(carry) - cut)
            chunks.append({"source": uri, "start": start, "end": end, "first": line})
            line += carry.count(b"\n", 0, cut)
            start, carry = end, carry[cut:]
    if pos > start:
        chunks.append({"source": uri, "start": start, "end": pos, "first": line})
    return chunks


def unit_hash(seed: int, salt: str, where: str) -> float:
    """A stable number in [0, 1) per record: seeded sampling that does not depend on row order."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{where}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _row(chunk: dict, where: str, raw: str, bad_utf8: bool, eval_fraction: float, seed: int) -> dict:
    split = chunk["split"]
    # Keyed on the record's text, not its place: moving the files keeps the split, and duplicates never
    # straddle train and eval.
    if split == "train" and eval_fraction > 0 and unit_hash(seed, "eval", raw) < eval_fraction:
        split = "eval"
    return {"split": split, "spec": chunk["spec"], "where": where, "raw": raw, "bad_utf8": bad_utf8}


def _records(chunk: dict) -> Iterator[tuple[str, str, bool]]:
    """(where, raw JSON text, bad_utf8) for every record of a chunk."""
    fs, path = storage.filesystem(chunk["source"])
    src, kind = chunk["source"], chunk["kind"]
    if kind == "jsonl":
        with fs.open_input_file(path) as f:
            f.seek(chunk["start"])
            data = f.read(chunk["end"] - chunk["start"])
        yield from _lines(src, data, chunk["first"])
    elif kind == "json":
        with fs.open_input_stream(path) as f:
            data = f.read()
        try:
            records = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            yield from _lines(src, data, 1)  # JSON lines under a .json name, as HF writes them
            return
        if not isinstance(records, list):
            raise ValueError(f"{src}: a .json file must hold an array of records (or JSON lines)")
        for i, r in enumerate(records):
            yield f"{src} row {i}", json.dumps(r), False
    else:
        if kind == "parquet":
            with fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(chunk["start"])
        else:
            with fs.open_input_file(path) as f:
                table = pa.ipc.open_stream(f).read_all()
        for i, r in enumerate(table.to_pylist()):
            yield f"{src} row {chunk['first'] + i}", json.dumps(r, default=str), False


def _lines(src: str, data: bytes, first: int) -> Iterator[tuple[str, str, bool]]:
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            yield f"{src}:{first + i}", raw.decode("utf-8"), False
        except UnicodeDecodeError:
            yield f"{src}:{first + i}", raw.decode("utf-8", errors="replace"), True


def read_chunk(chunk: dict, eval_fraction: float = 0.0, seed: int = 0) -> Iterator[dict]:
    for where, raw, bad_utf8 in _records(chunk):
        yield _row(chunk, where, raw, bad_utf8, eval_fraction, seed)
