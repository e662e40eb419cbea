"""Reading source files as raw records that keep where they came from.

Sources: JSONL, JSON (an array, or JSON lines under a .json name), parquet files or folders of
them, and HF `save_to_disk` folders; local paths, NFS paths and `s3://` URIs (pyarrow
filesystems). And hub sources (see `is_hub`), read through `datasets.load_dataset(...,
streaming=True)`: a hub id, a local dataset repo folder, or a builder with `data_files`. The driver
cuts each source into chunks (line-aligned byte ranges, parquet row groups, arrow files, shards of
a streamed hub dataset) so Ray Data reads them in parallel, and every record carries `where`
(`file:line`, `file row N` or `org/name[split] shard S row N`) for error messages. Records travel
as JSON text and are parsed next to tokenization, so one malformed line is reported instead of
failing a whole read. A UTF-8 byte order mark at the start of a JSON or JSONL file is skipped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sft_ray import storage
from sft_ray.config import HUB_ID

CHUNK_BYTES = 4 << 20
HUB_KEYS = ("hub_split", "subset", "data_files", "revision")  # DatasetSource's load_dataset arguments
HUB_PROBE_TIMEOUT_S = 10.0  # one request to the hub at plan time, so an unreachable hub fails in seconds
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as some Windows tools write at the start of a text file
HEAD_BYTES = 1 << 16


class HubSourceError(ValueError):
    """A hub source that cannot be planned or read; the message names its path."""


def source_kind(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data file not found: {uri}")
    if info.type == pafs.FileType.Directory:
        kind = _folder_kind({i.base_name for i in fs.get_file_info(pafs.FileSelector(path))})
        if kind is None:
            raise ValueError(f"{uri}: a folder must be an HF save_to_disk folder or hold .parquet files")
        return kind
    for ext, kind in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if path.endswith(ext):
            return kind
    raise ValueError(f"{uri}: unknown file type (expected .jsonl, .json, .parquet or an HF save_to_disk folder)")


def _folder_kind(names: set[str]) -> str | None:
    if "state.json" in names and "dataset_info.json" in names:
        return "hf_disk"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    return None


def is_hub(path: str, data_files: str | list[str] | None = None) -> bool:
    """Whether a source is read through `datasets.load_dataset` (chunk kind "hub") instead of directly.

    The first rule that applies decides:
    1. `data_files` set: hub. `path` is then a builder (`json`, `parquet`, `csv`, ...), a local
       dataset folder or a hub id, and the files are relative to the folder or repo (to the current
       directory for a builder).
    2. A URI with a scheme (`s3://`, `file://`, ...): not hub.
    3. An existing local file: not hub.
    4. An existing local folder: not hub when it is an HF save_to_disk folder (state.json and
       dataset_info.json) or holds .parquet files at its top level; hub otherwise (a dataset repo
       folder such as data/train-*.jsonl plus README.md, read with its splits and `configs:`).
    5. Nothing at that path: hub when shaped like a hub id (`name` or `org/name`, `config.HUB_ID`)
       and not ending in .jsonl/.json/.parquet; otherwise not (a missing local file).
    Relative paths are looked up from the current directory.
    """
    if data_files:
        return True
    if "://" in path:
        return False
    local = os.path.expanduser(path)
    if os.path.isfile(local):
        return False
    if os.path.isdir(local):
        return _folder_kind(set(os.listdir(local))) is None
    return bool(HUB_ID.match(path)) and not path.lower().endswith(_FILE_SUFFIXES)


def _files(uri: str, suffix: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path))
        return sorted(storage.join(uri, i.base_name) for i in infos if i.base_name.endswith(suffix))
    return [uri]


def plan_chunks(
    uri: str,
    spec: int,
    split: str,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    hub_split: str | None = None,
    subset: str | None = None,
    data_files: str | list[str] | None = None,
    revision: str | None = None,
) -> list[dict]:
    """Chunks of one source; each is read by one Ray task.

    `split` is the pipeline's (train/eval); the keyword arguments are DatasetSource's `HUB_KEYS`,
    for hub sources only (`plan_chunks(s["path"], i, s["split"], **{k: s[k] for k in HUB_KEYS})`).
    """
    if is_hub(uri, data_files):
        return _plan_hub({"spec": spec, "split": split}, uri, hub_split, subset, data_files, revision)
    kind = source_kind(uri)
    given = [k for k, v in (("split", hub_split), ("subset", subset), ("revision", revision)) if v is not None]
    if given:
        raise HubSourceError(
            f"{uri}: {', '.join(given)} only apply to a dataset read through datasets.load_dataset; "
            f"this is a {kind} source, read directly"
        )
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


def check_file(uri: str) -> None:
    """Refuse a whole-file problem (unknown type, no records, a .json that is not an array of records)
    on the driver, before any Ray work: one line naming the file, not a failed Ray task per chunk.

    Only the start of a file is read: a .json is judged by its first value or first lines, as the
    reader will take it (one JSON array, or JSON lines).
    """
    kind = source_kind(uri)
    if kind not in ("jsonl", "json"):
        return
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        head = _read_past_blanks(f, f.read(HEAD_BYTES).removeprefix(BOM))
        problem = "the file is empty" if not head else _json_problem(f, head) if kind == "json" else None
    if problem:
        expected = "an array of records (JSON objects), or JSON lines" if kind == "json" else "one JSON record a line"
        raise ValueError(f"{uri}: {problem}; expected {expected}")


def _read_past_blanks(f, data: bytes) -> bytes:
    """`data` and what follows it in `f`, from its first non-blank byte (empty at the end of the file)."""
    data = data.lstrip()
    while not data and (block := f.read(HEAD_BYTES)):
        data = block.lstrip()
    return data


def _json_type(start: bytes) -> str:
    """The type of the JSON value that starts with `start`."""
    names = {b"{": "object", b"[": "array", b'"': "string", b"t": "boolean", b"f": "boolean", b"n": "null"}
    return names.get(start[:1], "number")


def _json_problem(f, head: bytes) -> str | None:
    """What a .json file starting with `head` (non-blank) holds instead of records, or None."""
    if head.startswith(b"["):
        first = _read_past_blanks(f, head[1:])
        if first.startswith(b"]"):
            return "it holds an empty JSON array"
        if first and not first.startswith(b"{"):
            return f"it holds a JSON array of {_json_type(first)} values"
        return None
    lines = _first_lines(f, head)
    if _parses(lines[0]):
        return f"it holds one JSON {_json_type(lines[0].strip())}" if len(lines) == 1 else None
    # Not JSON lines with a bad first line (a row to report) but one object written over many lines.
    next_is_record = len(lines) > 1 and lines[1].strip().startswith(b"{") and _parses(lines[1])
    return "it holds a JSON object" if head.startswith(b"{") and not next_is_record else None


def _first_lines(f, head: bytes) -> list[bytes]:
    """The first two non-blank lines of a file that goes on from `head` in `f` (fewer at its end).
    A bytearray grows in place: a one-line file of gigabytes is read once, not copied per block."""
    head = bytearray(head)
    while True:
        parts = head.split(b"\n")
        lines = [p for p in parts[:-1] if p.strip()]
        if len(lines) >= 2:
            return [bytes(x) for x in lines[:2]]
        block = f.read(HEAD_BYTES)
        if not block:
            return [bytes(p) for p in parts if p.strip()][:2]
        head += block


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


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
    if chunk["kind"] == "hub":
        yield from _hub_records(chunk)
        return
    fs, path = storage.filesystem(chunk["source"])
    src, kind = chunk["source"], chunk["kind"]
    if kind == "jsonl":
        with fs.open_input_file(path) as f:
            f.seek(chunk["start"])
            data = f.read(chunk["end"] - chunk["start"])
        yield from _lines(src, data.removeprefix(BOM) if chunk["start"] == 0 else data, chunk["first"])
    elif kind == "json":
        with fs.open_input_stream(path) as f:
            data = f.read().removeprefix(BOM)
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


# ---- hub sources: datasets.load_dataset(..., streaming=True), one chunk per shard ----


def _is_local_dir(path: str) -> bool:
    return "://" not in path and os.path.isdir(os.path.expanduser(path))


def _is_builder(path: str) -> bool:
    """A packaged `datasets` builder name (json, parquet, csv, ...) that reads `data_files`."""
    if _is_local_dir(path):
        return False
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return path in _PACKAGED_DATASETS_MODULES


def _names_repo(path: str) -> bool:
    """A dataset repo on the hub (not a local folder, not a builder)."""
    return not _is_local_dir(path) and not _is_builder(path)


def _load_args(
    path: str,
    hub_split: str | None = None,
    subset: str | None = None,
    data_files: str | list[str] | None = None,
    revision: str | None = None,
) -> dict:
    """`load_dataset` keyword arguments, JSON-able, that mean the same in any working directory."""
    files = [data_files] if isinstance(data_files, str) else list(data_files) if data_files else None
    if _is_local_dir(path):
        path = os.path.abspath(os.path.expanduser(path))
    elif files and _is_builder(path):  # a builder reads data_files from the current directory
        files = [f if "://" in f else os.path.abspath(os.path.expanduser(f)) for f in files]
    return {"path": path, "name": subset, "split": hub_split or "train", "data_files": files, "revision": revision}


def _hub_hint(path: str) -> str:
    return (
        f"Point path at a local copy (e.g. `hf download --repo-type dataset {path} --local-dir DIR`), "
        "or set HF_HUB_OFFLINE=1 to use only what datasets has already cached."
    )


@lru_cache(maxsize=32)  # the cache key and the plan both ask, in the driver: one request
def _hub_revision(path: str, revision: str | None) -> str | None:
    """The commit a hub id resolves to, asked once and quickly; under HF_HUB_OFFLINE, `revision` as given.

    `load_dataset` alone retries an unreachable hub for about 25 s (5 retries with backoff); this
    single request without retries fails at once, and its commit pins every shard's reader.
    """
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if datasets.config.HF_HUB_OFFLINE:
        return revision
    try:
        return HfApi().dataset_info(path, revision=revision, timeout=HUB_PROBE_TIMEOUT_S).sha
    except RevisionNotFoundError:
        raise HubSourceError(f"{path}: revision {revision!r} not found on the Hugging Face Hub") from None
    except RepositoryNotFoundError:  # gated and private ones too, without a token
        raise HubSourceError(
            f"{path}: no local file or folder of that name, and the Hugging Face Hub has no dataset {path} "
            f"(or it is private or gated: log in or set HF_TOKEN). {_hub_hint(path)}"
        ) from None
    except Exception as err:  # connection refused, unknown host, timeout, proxy, server error
        raise HubSourceError(
            f"{path}: no local file or folder of that name, and the Hugging Face Hub could not be reached "
            f"({type(err).__name__}: {err}). {_hub_hint(path)}"
        ) from None


def _stream(load: dict, label: str):
    import datasets

    try:
        return datasets.load_dataset(**load, streaming=True)
    except ConnectionError as err:  # HF_HUB_OFFLINE=1 and not cached, or the hub went away since the probe
        raise HubSourceError(
            f"{label}: no local file or folder of that name, and the Hugging Face Hub could not be reached "
            f"({err}). {_hub_hint(load['path'])}"
        ) from None
    except Exception as err:
        raise HubSourceError(f"{label}: datasets.load_dataset could not load it: {type(err).__name__}: {err}") from err


def _hub_label(path: str, hub_split: str | None, subset: str | None, data_files) -> str:
    """`org/name[train]`, `org/name:subset[test]`, `json(a.jsonl,b.jsonl)[train]`, as the user wrote them."""
    label = path
    if data_files and _is_builder(path):
        label += "(" + ",".join([data_files] if isinstance(data_files, str) else data_files) + ")"
    if subset:
        label += f":{subset}"
    return f"{label}[{hub_split or 'train'}]"


def _plan_hub(base: dict, path: str, hub_split, subset, data_files, revision) -> list[dict]:
    load = _load_args(path, hub_split, subset, data_files, revision)
    if _names_repo(load["path"]):
        load["revision"] = _hub_revision(load["path"], revision)  # fails fast when the hub is out of reach
    label = _hub_label(path, hub_split, subset, data_files)
    n = _stream(load, label).num_shards
    chunk = {**base, "kind": "hub", "source": load["path"], "load": load, "label": label, "num_shards": n}
    return [{**chunk, "shard": i} for i in range(n)]


def _hub_records(chunk: dict) -> Iterator[tuple[str, str, bool]]:
    """Rows of one shard, streamed; `where` counts rows within the shard (`org/name[train] shard 3 row 17`).

    For file-based datasets a shard is one data file, in the order load_dataset lists them (sorted).
    """
    label, n = chunk["label"], chunk["num_shards"]
    ds = _stream(chunk["load"], label)
    if ds.num_shards != n:
        raise HubSourceError(f"{label}: {ds.num_shards} shards now, {n} when planned: it changed during preparation")
    prefix = f"{label} shard {chunk['shard']} row "
    for i, row in enumerate(ds.shard(n, chunk["shard"])):
        yield f"{prefix}{i}", json.dumps(row, default=str), False


def hub_fingerprint(src: dict) -> str:
    """What the cache key holds for a hub source (`src`: `path` and the `HUB_KEYS`; other keys ignored).

    The load arguments plus: for a local dataset folder, the names and contents of its files; for
    local data files (a builder's, or absolute paths), the contents of the files each pattern
    matches; for a hub id, the commit it resolves to now (one request; under HF_HUB_OFFLINE only the
    `revision` given, so hub updates are not seen). Local paths themselves are left out: moving
    the data keeps the key, as for plain files.
    """
    load = _load_args(src["path"], *(src.get(k) for k in HUB_KEYS))
    path, files = load["path"], load["data_files"] or []
    key: dict = {"name": load["name"], "split": load["split"]}
    if _is_local_dir(path):
        key["folder"] = storage.fingerprint(path)
    elif _is_builder(path):
        key["builder"] = path
    else:
        key["hub"], key["revision"] = path, _hub_revision(path, load["revision"])
    key["data_files"] = [
        [storage.fingerprint(f) for f in sorted(glob.glob(p, recursive=True)) if os.path.isfile(f)]
        if "://" not in p and os.path.isabs(p)
        else p  # relative to the folder (hashed above) or to the hub repo (pinned by the commit)
        for p in files
    ]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


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
