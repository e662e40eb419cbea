"""Preparation, top to bottom: check the inputs, reuse an identical earlier preparation, or run the
Ray Data pass (sources -> chunks -> read + encode + select + pack + write, in actors) and write
the manifest last.

Output folder: `train/NNNNNN.parquet`, `eval/NNNNNN.parquet` (one file per source chunk that has
rows of that split; int32 list columns `input_ids`, `labels`, and `seq_lengths` when packed) and
`manifest.json`, which lists the files with their row counts. Locally the folder is built aside
(manifest included) and renamed into place, so a crashed preparation is never taken for a finished
one; its leftovers are removed by the next preparation of the same data on that host (`_build`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import uuid

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data import stats
from sft_ray.data.cache import cache_key, check_sources, plan_args, prepared_dir, specs
from sft_ray.data.errors import DataError
from sft_ray.data.sources import plan_chunks
from sft_ray.lease import process_alive

__all__ = ["DataError", "cache_key", "check_sources", "prepare"]
TMP = ".tmp-"  # `<folder>.tmp-<host>-<pid>-<random>`: a preparation's folder until it is published


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
    from sft_ray.progress import Preparation

    ray.data.DataContext.get_current().enable_progress_bars = False
    source_specs = specs(cfg)
    chunks = [c for i, s in enumerate(source_specs) for c in plan_chunks(s["path"], i, s["split"], **plan_args(s))]
    items = [{"chunk": json.dumps({**c, "index": i})} for i, c in enumerate(chunks)]
    remote = cfg.model.trust_remote_code
    d = cfg.data
    actors = max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
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
    shown, done = Preparation(len(items)), []
    for r in results.iter_rows():  # as the chunks finish, in any order
        done.append((r["index"], json.loads(r["counts"])))
        shown.chunk_done(sum(read for read, _ in done[-1][1]["sources"]))
    counts = stats.new_counts(len(source_specs))
    for _, chunk_counts in sorted(done, key=lambda d: d[0]):
        stats.merge(counts, chunk_counts)
    return stats.manifest(cfg, counts)


def _owned_name(out: str) -> str:
    """A folder next to `out` that names its owner, `<out>.tmp-<host>-<pid>-<random>`, so that a later
    preparation can tell a crashed one's leftovers (a process gone from this host) from a live one's."""
    return f"{out}{TMP}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale(out: str) -> None:
    """Remove the folders that crashed preparations of `out` left aside on this host.

    Only folders whose owner process is gone are removed: another host's (whose processes cannot be
    seen from here) and a live one's (a preparation of the same data running now) are left alone.
    """
    parent, name = os.path.split(out)
    host = socket.gethostname()
    for entry in os.listdir(parent):
        if not entry.startswith(name + TMP):
            continue
        owner = entry[len(name + TMP) :].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not process_alive(int(owner[1])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _publish(tmp: str, out: str, shared: bool) -> dict | None:
    """Rename the finished folder `tmp` into place. Returns None, or, when another preparation of the
    same data published `out` first, its manifest: its files equal ours, which are discarded.

    What is at `out` otherwise (the user's earlier output, or a folder without a manifest that an older
    version left) is moved aside first and removed after: a reader never sees half a folder.
    """
    done = os.path.join(out, "manifest.json")
    old = None
    if os.path.isdir(out) and not (shared and os.path.exists(done)):
        old = _owned_name(out)
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another preparation moved it first
            old = None
    try:
        os.rename(tmp, out)  # refused when `out` exists and is not empty: nothing is overwritten
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (shared and os.path.exists(done)):
            raise
        return storage.read_json(done)
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return None


def _build(cfg: Config, out: str, tokenizer, shared: bool) -> tuple[dict, bool]:
    """Write the prepared splits and the manifest to `out`; returns (manifest, whether this run wrote it).

    `shared`: `out` is the cache folder of this data, which another preparation of the same data may
    be writing, or may have published, at the same time. Neither deletes the other's files: both write
    the same rows, the first to publish wins and the other uses its folder. Otherwise `out` was named
    by the user, and what is there is replaced.

    Locally the folder is built aside under a name that tells its owner, manifest included, and
    renamed into place whole. An object store has no rename: the files are written in place and the
    manifest last, and since two preparations of the same data write the same bytes under the same
    names (each PUT whole), a crashed one's files are simply overwritten; nothing is deleted there
    but the user's own output folder.
    """
    start = time.time()
    if not storage.is_local(out):
        storage.check_writable(out)
        if not shared:
            storage.delete_dir(out)
        manifest = {**_run(cfg, out, tokenizer), "seconds": round(time.time() - start, 2)}
        done = storage.join(out, "manifest.json")
        if shared and storage.exists(done):
            return storage.read_json(done), False
        storage.write_json(done, manifest)  # last: marks the folder complete
        return manifest, True
    storage.check_writable(os.path.dirname(out))
    _remove_stale(out)
    tmp = _owned_name(out)
    os.makedirs(tmp)  # exists even when no split has a row to write
    try:
        manifest = {**_run(cfg, tmp, tokenizer), "seconds": round(time.time() - start, 2)}
        storage.write_json(os.path.join(tmp, "manifest.json"), manifest)
        published = _publish(tmp, out, shared)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (published, False) if published else (manifest, True)


def prepare(cfg: Config, output: str | None = None) -> tuple[str, dict]:
    """Prepare the data once; reuse an identical earlier preparation. Returns (folder, manifest)."""
    from sft_ray.model import check_model

    check_sources(cfg)  # a missing file fails here, before anything is loaded or started
    tokenizer = check_model(cfg)
    if output is None:
        out = prepared_dir(cfg)
        if storage.exists(storage.join(out, "manifest.json")):
            manifest = storage.read_json(storage.join(out, "manifest.json"))
            print(f"prepared data: reusing {out} (same sources, tokenizer and settings; {stats.describe(manifest)})")
            stats.check_trainable(manifest, cfg, storage.join(out, "manifest.json"))
            return out, manifest
    else:
        out = output if not storage.is_local(output) else os.path.abspath(output)
    from sft_ray.ray_runtime import ensure_ray

    _check_chat_template(cfg, tokenizer)
    ensure_ray()  # only now: bad input above fails in seconds, and a reused preparation needs no Ray
    manifest, ours = _build(cfg, out, tokenizer, shared=output is None)
    if ours:
        print(f"prepared data: {out} ({stats.describe(manifest)}) in {manifest['seconds']}s")
    else:
        print(f"prepared data: reusing {out}, published by another preparation of the same data while this one ran")
    stats.check_trainable(manifest, cfg, storage.join(out, "manifest.json"))
    return out, manifest
