"""The Ray Data preparation: sources -> chunks -> records -> tokenize+mask (actors) -> [pack] -> parquet.

Output folder: `train/*.parquet`, `eval/*.parquet` (int32 list columns `input_ids`, `labels`, and
`position_ids` when packed) and `manifest.json`, written last. Locally the folder is built aside
and renamed into place, so a crashed preparation is never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data.sources import plan_chunks, unit_hash

# Bump when the output of preparation changes for the same inputs (invalidates the cache).
PREP_VERSION = 3  # 3: whole-text tokenization (inference-exact masks), chat turns per context
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
REFERENCE_BATCH = 8  # the padded layout the manifest reports (see _layout)
PACK_BLOCK_ROWS = 8192  # examples packed together; large enough for ~99% fill, small enough to stream
SPLITS = ("train", "eval")


class DataError(ValueError):
    """Prepared data that must not be trained on, or input that cannot be prepared."""


def specs(cfg: Config) -> list[dict]:
    """Every source of every split, in a fixed order; rows refer to their source by index."""
    return [{"split": split, **src.model_dump()} for split in SPLITS for src in getattr(cfg.data, split)]


def _fingerprint(uri: str) -> str:
    """Content hash for local files; size and mtime for object stores (no full download)."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        children = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(c.path for c in children if c.type == pafs.FileType.File)
        prefix = path.rstrip("/") + "/"
        return hashlib.sha256(
            json.dumps([[f[len(prefix) :], _fingerprint(storage.join(uri, f[len(prefix) :]))] for f in files]).encode()
        ).hexdigest()
    if not storage.is_local(uri):
        return f"{info.size}:{info.mtime_ns}"
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_sources(cfg: Config) -> list[dict]:
    """specs(cfg), refusing a missing file before any work is done, with the config key that names it."""
    out = specs(cfg)
    for split in SPLITS:
        for i, src in enumerate(getattr(cfg.data, split)):
            if not storage.exists(src.path):
                raise DataError(f"data.{split}[{i}].path: no such file or folder: {src.path}")
    if cfg.data.chat_template not in (None, "chatml") and not storage.exists(cfg.data.chat_template):
        raise DataError(f"data.chat_template: no such file: {cfg.data.chat_template} (the built-in is `chatml`)")
    return out


def cache_key(cfg: Config) -> str:
    """Hash of everything that changes the prepared rows."""
    model_dir = Path(cfg.model.path)
    if model_dir.is_dir():
        tokenizer = {n: _fingerprint(str(model_dir / n)) for n in TOKENIZER_FILES if (model_dir / n).exists()}
    else:
        tokenizer = {"hub_id": cfg.model.path}
    sources = check_sources(cfg)
    d = cfg.data
    parts = {
        "version": PREP_VERSION,
        "tokenizer": tokenizer,
        "chat_template": _template_key(d.chat_template),
        "chat_template_kwargs": d.chat_template_kwargs,
        "sources": [{**s, "path": _fingerprint(s["path"])} for s in sources],
        "max_length": d.max_length,
        "packing": d.packing,
        "eval_fraction": d.eval_fraction,
        "seed": d.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _template_key(value: str | None) -> str | None:
    return value if value in (None, "chatml") else _fingerprint(value)


def _check_chat_template(cfg: Config, tokenizer) -> None:
    """Fail before any Ray work when a `messages` dataset cannot be masked with this template."""
    if not any(s.format == "messages" for s in cfg.data.train + cfg.data.eval):
        return
    from sft_ray.chat_format import template_text
    from sft_ray.data.chat import build_chat

    try:
        build_chat(tokenizer, template_text(cfg.data.chat_template), cfg.data.chat_template_kwargs)
    except ValueError as err:  # ChatTemplateError included
        key = "data.chat_template" if cfg.data.chat_template else f"the chat template of {cfg.model.path}"
        raise DataError(f"{key}: {err}") from None


def _num_actors(n_chunks: int) -> int:
    import ray

    return max(1, min(n_chunks, int(ray.cluster_resources().get("CPU", 1))))


def _encoded_rows(cfg: Config, tokenizer):
    import ray

    from sft_ray.chat_format import template_text
    from sft_ray.data.encode import Encoder

    source_specs = specs(cfg)
    remote = cfg.model.trust_remote_code
    chunks = [c for i, s in enumerate(source_specs) for c in plan_chunks(s["path"], i, s["split"])]
    # Each actor reads its chunks itself (one per call) and encodes them, so raw rows never go
    # through the object store. Half a CPU each: the pool fits where other work holds CPUs too.
    return (
        ray.data.from_items(chunks, override_num_blocks=len(chunks))
        .map_batches(
            Encoder,
            fn_constructor_kwargs={
                "specs": source_specs,
                "tokenizer": None if remote else tokenizer,
                "model_path": cfg.model.path,
                "trust_remote_code": remote,
                "max_length": cfg.data.max_length,
                "chat_template": template_text(cfg.data.chat_template),
                "chat_template_kwargs": cfg.data.chat_template_kwargs,
                "eval_fraction": cfg.data.eval_fraction,
                "seed": cfg.data.seed,
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=_num_actors(len(chunks))),
            num_cpus=0.5,
        )
        .materialize()
    )


def _select(batch: pa.Table, split: str, weights: list[float], seed: int) -> pa.Table:
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
    return batch.select(["input_ids", "labels", "n_tokens"])


def _write_split(rows, cfg: Config, split: str, out_dir: str) -> list[int]:
    """Write one split; returns the token count of every written row (packed rows when packing)."""
    import ray

    from sft_ray.data.packing import pack_table

    weights = [s["weight"] for s in specs(cfg)]
    kept = rows.map_batches(
        _select,
        fn_kwargs={"split": split, "weights": weights, "seed": cfg.data.seed},
        batch_format="pyarrow",
        batch_size=None,
    )
    if split == "train" and cfg.data.packing:
        kept = kept.map_batches(
            pack_table,
            fn_kwargs={"max_length": cfg.data.max_length},
            batch_format="pyarrow",
            batch_size=PACK_BLOCK_ROWS,
        )
    else:
        kept = kept.drop_columns(["n_tokens"])
    kept = kept.materialize()
    if kept.count():
        kept.write_parquet(storage.join(out_dir, split))
    # Only the lengths come to the driver: on a cluster the rows would travel to the head node.
    lengths = kept.map_batches(_lengths, batch_format="pyarrow", batch_size=None)
    tables = [ray.get(ref) for ref in lengths.to_arrow_refs()]
    return [n for t in tables if t.num_rows for n in t["n"].to_pylist()]  # an empty block keeps its schema


def _lengths(batch: pa.Table) -> pa.Table:
    return pa.table({"n": pc.list_value_length(batch["input_ids"])})


def padded_tokens(lengths: list[int], batch_size: int, seed: int, multiple: int = 8) -> int:
    """Tokens computed when shuffled rows are padded per batch to the longest, rounded up to `multiple`."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    total = 0
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        total += len(batch) * (math.ceil(max(batch) / multiple) * multiple)
    return total


def _layout(cfg: Config, lengths: list[int]) -> dict:
    real = sum(lengths)
    if cfg.data.packing:
        computed = len(lengths) * cfg.data.max_length
        return {
            "packing": True,
            "rows": len(lengths),
            "real_tokens": real,
            "computed_tokens": computed,
            "real_fraction": real / computed if computed else 0.0,
            "note": "packed rows of max_length",
        }
    # A fixed reference batch, not the run's: the prepared data is reused by runs with other batch
    # sizes (training settings are not in the cache key). A run logs its own `real_tokens_fraction`.
    computed = padded_tokens(lengths, REFERENCE_BATCH, cfg.data.seed)
    return {
        "packing": False,
        "rows": len(lengths),
        "real_tokens": real,
        "computed_tokens": computed,
        "real_fraction": real / computed if computed else 0.0,
        "note": f"for reference: shuffled batches of {REFERENCE_BATCH} padded to their longest row, rounded up to 8",
    }


def _histogram(lengths: list[int], max_length: int, bins: int = 8) -> list[dict]:
    width = max(1, math.ceil(max_length / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - 1) // width)] += 1
    return [{"from": i * width + 1, "to": min(max_length, (i + 1) * width), "rows": c} for i, c in enumerate(counts)]


def _split_stats(t: pa.Table, cfg: Config) -> dict:
    records = t.filter(pc.equal(t["part"], 0))
    kept = t.filter(pc.equal(t["drop_reason"], ""))
    reasons: dict[str, int] = {}
    for r in records.filter(pc.not_equal(records["drop_reason"], ""))["drop_reason"].to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    lengths = kept["n_tokens"].to_pylist()
    tokens, trained = sum(lengths), int(pc.sum(kept["n_trained"]).as_py() or 0)
    extra = kept.filter(pc.greater(kept["part"], 0))
    return {
        "rows_read": records.num_rows,
        "rows_kept": records.num_rows - sum(reasons.values()),
        "rows_dropped": dict(sorted(reasons.items())),
        "rows_truncated": int(pc.sum(kept["truncated"]).as_py() or 0),
        # Chat turns that a template renders differently once later turns follow (Qwen3 strips past
        # reasoning) are trained in their own context: one more example each, its prompt repeated.
        "examples": kept.num_rows,
        "extra_turn_examples": extra.num_rows,
        "extra_turn_tokens": int(pc.sum(extra["n_tokens"]).as_py() or 0),
        # Such a turn that truncation left with nothing to train; the record's other turns are kept.
        "turns_truncated_away": t.filter(
            pc.and_(pc.greater(t["part"], 0), pc.not_equal(t["drop_reason"], ""))
        ).num_rows,
        "rows_with_control_token_text": int(pc.sum(records["control_text"]).as_py() or 0),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": trained / tokens if tokens else 0.0,
        "length_histogram": _histogram(lengths, cfg.data.max_length),
    }


def _manifest(cfg: Config, stats: pa.Table) -> dict:
    splits = {s: _split_stats(stats.filter(pc.equal(stats["split"], s)), cfg) for s in SPLITS}
    sources = []
    for i, spec in enumerate(specs(cfg)):
        t = stats.filter(pc.and_(pc.equal(stats["spec"], i), pc.equal(stats["part"], 0)))
        sources.append(
            {**spec, "rows_read": t.num_rows, "rows_kept": t.filter(pc.equal(t["drop_reason"], "")).num_rows}
        )
    errors = stats.filter(pc.not_equal(stats["error"], ""))["error"].to_pylist()
    return {
        "version": PREP_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.model.path,
        "data": cfg.data.model_dump(mode="json"),
        "sources": sources,
        "splits": splits,
        "example_errors": errors[:10],
    }


def _run(cfg: Config, out_dir: str, tokenizer) -> dict:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs, same row order: needed for exact resume
    ctx.enable_progress_bars = False
    rows = _encoded_rows(cfg, tokenizer)
    stats = rows.select_columns(
        ["split", "spec", "part", "n_tokens", "n_trained", "truncated", "control_text", "drop_reason", "error"]
    )
    manifest = _manifest(cfg, pa.concat_tables(ray.get(stats.to_arrow_refs())))
    for split in SPLITS:
        # A split with no kept row writes nothing; skipping it saves a pass over every row.
        lengths = _write_split(rows, cfg, split, out_dir) if manifest["splits"][split]["rows_kept"] else []
        manifest["splits"][split]["rows_written"] = len(lengths)
        if split == "train":
            manifest["layout"] = _layout(cfg, lengths)
    return manifest


def check_trainable(manifest: dict, cfg: Config, where: str) -> None:
    """Refuse data that would train on nothing (the field's known silent failure) or lost too much."""
    splits = manifest["splits"]
    bad = {
        r: n for s in splits.values() for r, n in s["rows_dropped"].items() if r != "no_trained_tokens_after_truncation"
    }
    if bad and cfg.data.on_bad_row == "error":
        raise DataError(
            f"bad input rows ({', '.join(f'{n} x {r}' for r, n in sorted(bad.items()))}), for example:\n  "
            + "\n  ".join(manifest["example_errors"][:5])
            + f"\nfix the data, or set data.on_bad_row=skip to drop such rows; manifest: {where}"
        )
    if splits["train"]["trained_tokens"] == 0:
        too_long = "no_trained_tokens_after_truncation" in splits["train"]["rows_dropped"]
        raise DataError(
            f"the train split has no trained tokens ({splits['train']['rows_read']} rows read, "
            f"dropped: {splits['train']['rows_dropped'] or 'none'}); nothing to learn from"
            + (f"; prompts reach data.max_length={cfg.data.max_length}: raise it" if too_long else "")
            + f". Manifest: {where}"
        )
    read = sum(s["rows_read"] for s in splits.values())
    dropped = sum(sum(s["rows_dropped"].values()) for s in splits.values())
    if read and dropped / read > cfg.data.max_dropped_fraction:
        raise DataError(
            f"{dropped} of {read} rows ({dropped / read:.1%}) were dropped, more than "
            f"data.max_dropped_fraction={cfg.data.max_dropped_fraction}: {splits['train']['rows_dropped']} "
            f"(train), {splits['eval']['rows_dropped']} (eval). Manifest: {where}"
        )


def _build(cfg: Config, out: str, tokenizer) -> dict:
    """Write the prepared splits to `out` (without the manifest), never mixing with an older attempt.

    Locally the folder is built aside and renamed into place; an object store has no rename, so
    any earlier partial prefix is removed first and the manifest, written last, marks completion.
    """
    if not storage.is_local(out):
        storage.check_writable(out)
        storage.delete_dir(out)
        return _run(cfg, out, tokenizer)
    storage.check_writable(os.path.dirname(out))
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)  # exists even when no split has a row to write
    try:
        manifest = _run(cfg, tmp, tokenizer)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _describe(manifest: dict) -> str:
    s = manifest["splits"]["train"]
    dropped = ", ".join(f"{n} {r}" for r, n in s["rows_dropped"].items())
    text = (
        f"train {s['rows_kept']}/{s['rows_read']} rows kept{f' (dropped: {dropped})' if dropped else ''}, "
        f"{s['trained_tokens']}/{s['tokens']} tokens trained, {manifest['layout']['rows']} rows written"
        f"{' packed' if manifest['layout']['packing'] else ''}"
    )
    if s.get("extra_turn_examples"):
        text += (
            f"; {s['extra_turn_examples']} chat turns as examples of their own (the template rewrites earlier turns)"
        )
    if s.get("rows_with_control_token_text"):
        plain = any(src["format"] != "messages" for src in manifest["sources"])
        text += f"; {s['rows_with_control_token_text']} rows spell a control token, tokenized as text" + (
            " (for chat already rendered into text, use format: messages)" if plain else ""
        )
    return text


def prepare(cfg: Config, output: str | None = None) -> tuple[str, dict]:
    """Prepare the data once; reuse an identical earlier preparation. Returns (folder, manifest)."""
    if output is None:
        out = storage.join(cfg.storage.path, "datasets", cache_key(cfg))
        if storage.exists(storage.join(out, "manifest.json")):
            manifest = storage.read_json(storage.join(out, "manifest.json"))
            print(f"prepared data: reusing {out} (same sources, tokenizer and settings; {_describe(manifest)})")
            check_trainable(manifest, cfg, storage.join(out, "manifest.json"))
            return out, manifest
    else:
        out = output if not storage.is_local(output) else os.path.abspath(output)
        check_sources(cfg)  # a missing file fails here, before anything is loaded or started
    from sft_ray.chat_format import template_text
    from sft_ray.model import load_tokenizer
    from sft_ray.ray_runtime import ensure_ray

    # Loaded once here: the template check uses it, and the encoder actors get a pickled copy.
    try:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, template_text(cfg.data.chat_template))
    except (OSError, ValueError) as err:
        taken = "" if os.path.isdir(cfg.model.path) else " (no such folder, so it was taken as a hub id)"
        raise DataError(f"model.path: cannot load a tokenizer from {cfg.model.path}{taken}: {err}") from None
    _check_chat_template(cfg, tokenizer)
    ensure_ray()  # only now: bad input above fails in seconds, and a reused preparation needs no Ray
    start = time.time()
    manifest = _build(cfg, out, tokenizer)
    manifest["seconds"] = round(time.time() - start, 2)
    storage.write_json(storage.join(out, "manifest.json"), manifest)  # last: marks the folder complete
    print(f"prepared data: {out} ({_describe(manifest)}) in {manifest['seconds']}s")
    check_trainable(manifest, cfg, storage.join(out, "manifest.json"))
    return out, manifest
