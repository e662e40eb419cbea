"""The Ray Data preparation: sources -> chunks -> rows -> tokenize+mask (actors) -> parquet + manifest.

Output folder layout: `train/*.parquet`, `eval/*.parquet` (int32 list columns `input_ids`,
`labels`) and `manifest.json`, written last, which marks the folder as complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data.sources import plan_chunks, read_chunk

log = logging.getLogger(__name__)

# Bump when the output of preparation changes for the same inputs (invalidates the cache).
PREP_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


class DataError(ValueError):
    """Prepared data that must not be trained on, or input that cannot be prepared."""


def _file_digest(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cache_key(cfg: Config) -> str:
    """Hash of everything that changes the prepared rows: sources' bytes, formats, tokenizer, length."""
    model_dir = Path(cfg.model.path)
    if model_dir.is_dir():
        tokenizer = {n: _file_digest(str(model_dir / n)) for n in TOKENIZER_FILES if (model_dir / n).exists()}
    else:
        tokenizer = {"hub_id": cfg.model.path}
    parts = {
        "version": PREP_VERSION,
        "tokenizer": tokenizer,
        "max_length": cfg.data.max_length,
        "splits": {
            split: [{**src.model_dump(), "path": _file_digest(src.path)} for src in getattr(cfg.data, split)]
            for split in ("train", "eval")
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _num_actors(n_chunks: int) -> int:
    import ray

    return max(1, min(n_chunks, int(ray.cluster_resources().get("CPU", 1))))


def _run(cfg: Config, out_dir: str) -> dict:
    import ray

    from sft_ray.data.encode import Encoder

    chunks = [
        c
        for split in ("train", "eval")
        for src in getattr(cfg.data, split)
        for c in plan_chunks(src.path, split, src.format)
    ]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs, same row order: needed for exact resume
    ctx.enable_progress_bars = False
    # Actors take half a CPU each so the read tasks upstream always find one (stack-notes §8.4).
    rows = (
        ray.data.from_items(chunks, override_num_blocks=len(chunks))
        .flat_map(read_chunk)
        .map_batches(
            Encoder,
            fn_constructor_kwargs={
                "model_path": cfg.model.path,
                "trust_remote_code": cfg.model.trust_remote_code,
                "max_length": cfg.data.max_length,
            },
            batch_size=512,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=_num_actors(len(chunks))),
            num_cpus=0.5,
        )
        .materialize()
    )
    stats = rows.select_columns(
        ["split", "n_tokens", "n_trained", "truncated", "drop_reason", "error"]
    ).to_arrow_refs()
    table = pa.concat_tables(ray.get(stats))
    manifest = _manifest(cfg, table)
    for split in ("train", "eval"):
        kept = rows.map_batches(
            _select_kept, fn_kwargs={"split": split}, batch_format="pyarrow", batch_size=None
        )
        kept.write_parquet(storage.join(out_dir, split))
    return manifest


def _select_kept(batch: pa.Table, split: str) -> pa.Table:
    mask = pc.and_(pc.equal(batch["split"], split), pc.equal(batch["drop_reason"], ""))
    return batch.filter(mask).select(["input_ids", "labels"])


def _manifest(cfg: Config, table: pa.Table) -> dict:
    splits = {}
    errors = []
    for split in ("train", "eval"):
        t = table.filter(pc.equal(table["split"], split))
        kept = t.filter(pc.equal(t["drop_reason"], ""))
        dropped = t.filter(pc.not_equal(t["drop_reason"], ""))
        reasons = {}
        for r in dropped["drop_reason"].to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
        errors += [e for e in dropped["error"].to_pylist() if e][:5]
        splits[split] = {
            "rows_read": t.num_rows,
            "rows_written": kept.num_rows,
            "rows_dropped": dict(sorted(reasons.items())),
            "rows_truncated": int(pc.sum(kept["truncated"]).as_py() or 0),
            "tokens": int(pc.sum(kept["n_tokens"]).as_py() or 0),
            "trained_tokens": int(pc.sum(kept["n_trained"]).as_py() or 0),
        }
    return {
        "version": PREP_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.model.path,
        "max_length": cfg.data.max_length,
        "sources": {s: [src.model_dump() for src in getattr(cfg.data, s)] for s in ("train", "eval")},
        "splits": splits,
        "example_errors": errors,
    }


def check_trainable(manifest: dict, where: str, on_bad_row: str) -> None:
    """Refuse data that would train on nothing (the field's known silent failure) or bad rows."""
    bad_rows = [
        r
        for s in manifest["splits"].values()
        for reason, n in s["rows_dropped"].items()
        if reason != "no_trained_tokens_after_truncation"
        for r in [f"{n} x {reason}"]
    ]
    if bad_rows and on_bad_row == "error":
        raise DataError(
            f"bad input rows ({', '.join(bad_rows)}), for example:\n  "
            + "\n  ".join(manifest["example_errors"])
            + f"\nfix the data, or set data.on_bad_row=skip to drop such rows; manifest: {where}"
        )
    train = manifest["splits"]["train"]
    if train["trained_tokens"] == 0:
        raise DataError(
            f"the train split has no trained tokens ({train['rows_read']} rows read); see {where}"
        )


def prepare(cfg: Config, output: str | None = None) -> tuple[str, dict]:
    """Prepare the data once; reuse an identical earlier preparation. Returns (folder, manifest)."""
    if output is None:
        out = storage.join(cfg.storage.path, "datasets", cache_key(cfg))
        if storage.exists(storage.join(out, "manifest.json")):
            print(f"prepared data: reusing {out}")
            manifest = storage.read_json(storage.join(out, "manifest.json"))
            check_trainable(manifest, storage.join(out, "manifest.json"), cfg.data.on_bad_row)
            return out, manifest
    else:
        out = os.path.abspath(output)
    storage.check_writable(os.path.dirname(out))
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    start = time.time()
    try:
        manifest = _run(cfg, tmp)
        manifest["seconds"] = round(time.time() - start, 2)
        storage.write_json(storage.join(tmp, "manifest.json"), manifest)  # last: marks it complete
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check_trainable(manifest, storage.join(out, "manifest.json"), cfg.data.on_bad_row)
    s = manifest["splits"]["train"]
    print(
        f"prepared data: {out} (train {s['rows_written']}/{s['rows_read']} rows, "
        f"{s['trained_tokens']}/{s['tokens']} tokens trained) in {manifest['seconds']}s"
    )
    return out, manifest
