"""What identifies a preparation: the sources (checked to exist first), the tokenizer and the data settings.

Training settings stay out: a preparation is reused by every run that reads the same data the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data.errors import DataError
from sft_ray.data.sources import HUB_KEYS, HubSourceError, check_file, hub_fingerprint, is_hub

# Bump when the output of preparation changes for the same inputs (invalidates the cache).
PREP_VERSION = 4  # 4: one file per chunk and split, packed rows carry seq_lengths instead of position_ids
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
SPLITS = ("train", "eval")


def specs(cfg: Config) -> list[dict]:
    """Every source of every split, in a fixed order; rows refer to their source by index."""
    return [{"split": split, **src.model_dump()} for split in SPLITS for src in getattr(cfg.data, split)]


def check_sources(cfg: Config) -> list[dict]:
    """specs(cfg), refusing a missing file or one that holds no records before any work is done (Ray
    not started), with the config key that names it."""
    out = specs(cfg)
    for split in SPLITS:
        for i, src in enumerate(getattr(cfg.data, split)):
            if is_hub(src.path, src.data_files):
                continue
            if not storage.exists(src.path):
                raise DataError(f"data.{split}[{i}].path: no such file or folder: {src.path}")
            try:
                check_file(src.path)
            except ValueError as err:
                raise DataError(f"data.{split}[{i}].path: {err}") from None
    if cfg.data.chat_template not in (None, "chatml") and not storage.exists(cfg.data.chat_template):
        raise DataError(f"data.chat_template: no such file: {cfg.data.chat_template} (the built-in is `chatml`)")
    return out


def prepared_dir(cfg: Config) -> str:
    """Where this config's preparation lives: `<storage.path>/datasets/<cache key>`."""
    return storage.join(cfg.storage.path, "datasets", cache_key(cfg))


def cache_key(cfg: Config) -> str:
    """Hash of everything that changes the prepared rows."""
    model_dir = Path(cfg.model.path)
    if model_dir.is_dir():
        tokenizer = {n: storage.fingerprint(str(model_dir / n)) for n in TOKENIZER_FILES if (model_dir / n).exists()}
    else:
        tokenizer = {"hub_id": cfg.model.path}
    sources = check_sources(cfg)
    d = cfg.data
    parts = {
        "version": PREP_VERSION,
        "tokenizer": tokenizer,
        "chat_template": _template_key(d.chat_template),
        "chat_template_kwargs": d.chat_template_kwargs,
        "sources": [{**s, "path": f} for s, f in zip(sources, _source_fingerprints(cfg))],
        "max_length": d.max_length,
        "packing": d.packing,
        "eval_fraction": d.eval_fraction,
        "seed": d.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _source_fingerprints(cfg: Config) -> list[str]:
    """Content for files; for a dataset read through `datasets.load_dataset`, its load arguments and
    files (or the hub commit: this fails here, in seconds, when the hub cannot be reached). In specs() order."""
    out = []
    for split in SPLITS:
        for i, src in enumerate(getattr(cfg.data, split)):
            if not is_hub(src.path, src.data_files):
                out.append(storage.fingerprint(src.path))
                continue
            try:
                out.append(hub_fingerprint(src.model_dump()))
            except HubSourceError as err:
                raise DataError(f"data.{split}[{i}].path: {err}") from None
    return out


def plan_args(spec: dict) -> dict:
    """The `datasets.load_dataset` arguments of a source, as `plan_chunks` takes them."""
    return {k: spec[k] for k in HUB_KEYS}


def _template_key(template: str | None) -> str | None:
    return template if template in (None, "chatml") else storage.fingerprint(template)
