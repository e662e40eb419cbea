"""Preparation, top to bottom: check the inputs, reuse an identical earlier preparation, or run the
Ray Data pass (sources -> chunks -> read + encode + select + pack + write, in actors) and write
the manifest last.

Output folder: `train/NNNNNN.parquet`, `eval/NNNNNN.parquet` (one file per source chunk that has
rows of that split; int32 list columns `input_ids`, `labels`, and `seq_lengths` when packed) and
`manifest.json`, which lists the files with their row counts. Locally the folder is built aside
and renamed into place, so a crashed preparation is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data import stats
from sft_ray.data.cache import cache_key, check_sources, plan_args, specs
from sft_ray.data.errors import DataError
from sft_ray.data.sources import plan_chunks

__all__ = ["DataError", "cache_key", "check_sources", "prepare"]


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


def _run(cfg: Config, out_dir: str, tokenizer) -> dict:
    """One Ray Data pass over the records: every split written, and the statistics summed from one
    small record per chunk (the driver never holds a row)."""
    import ray

    from sft_ray.chat_format import template_text
    from sft_ray.data.write import PrepareChunks

    ray.data.DataContext.get_current().enable_progress_bars = False
    source_specs = specs(cfg)
    chunks = [c for i, s in enumerate(source_specs) for c in plan_chunks(s["path"], i, s["split"], **plan_args(s))]
    items = [{"chunk": json.dumps({**c, "index": i})} for i, c in enumerate(chunks)]
    remote = cfg.model.trust_remote_code
    d = cfg.data
    actors = max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
    results = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            PrepareChunks,
            fn_constructor_kwargs={
                "out_dir": out_dir,
                "specs": source_specs,
                "max_length": d.max_length,
                "packing": d.packing,
                "eval_fraction": d.eval_fraction,
                "seed": d.seed,
                "tokenizer": None if remote else tokenizer,
                "model_path": cfg.model.path,
                "trust_remote_code": remote,
                "chat_template": template_text(d.chat_template),
                "chat_template_kwargs": d.chat_template_kwargs,
            },
            batch_size=1,
            batch_format="pyarrow",
            # Half a CPU each: the pool fits where other work holds CPUs too.
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0.5,
        )
        .take_all()
    )
    counts = stats.new_counts(len(source_specs))
    for r in sorted(results, key=lambda r: r["index"]):
        stats.merge(counts, json.loads(r["counts"]))
    return stats.manifest(cfg, counts)


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


def prepare(cfg: Config, output: str | None = None) -> tuple[str, dict]:
    """Prepare the data once; reuse an identical earlier preparation. Returns (folder, manifest)."""
    if output is None:
        out = storage.join(cfg.storage.path, "datasets", cache_key(cfg))
        if storage.exists(storage.join(out, "manifest.json")):
            manifest = storage.read_json(storage.join(out, "manifest.json"))
            print(f"prepared data: reusing {out} (same sources, tokenizer and settings; {stats.describe(manifest)})")
            stats.check_trainable(manifest, cfg, storage.join(out, "manifest.json"))
            return out, manifest
    else:
        out = output if not storage.is_local(output) else os.path.abspath(output)
        check_sources(cfg)  # a missing file fails here, before anything is loaded or started
    from sft_ray.chat_format import template_text
    from sft_ray.model import load_tokenizer
    from sft_ray.ray_runtime import ensure_ray

    # Loaded once here: the template check uses it, and the actors get a pickled copy.
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
    print(f"prepared data: {out} ({stats.describe(manifest)}) in {manifest['seconds']}s")
    stats.check_trainable(manifest, cfg, storage.join(out, "manifest.json"))
    return out, manifest
