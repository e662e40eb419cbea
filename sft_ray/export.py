"""Pick a checkpoint of a run (final, best, latest) and merge its adapter into a plain model.

A merged model loads with `AutoModelForCausalLM.from_pretrained(out_dir)` alone, with no PEFT, so
it can be served by anything that serves a Hugging Face model. Runs in object storage
(`s3://bucket/runs/demo`) are read through the same storage layer as training; merging one first
downloads the adapter (not the optimizer state) to a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from sft_ray import storage
from sft_ray.train.checkpoints import SNAPSHOT, Damaged, checkpoint_metrics, folders

_DTYPES = ("float32", "bfloat16", "float16")
# Checkpoint files only a resumed run needs: not downloaded to merge.
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state", "optimizer", storage.COMPLETE)


def _registered(run: str) -> set[str] | None:
    """Checkpoint folders Ray Train registered (uploaded whole), from its snapshot; None without one."""
    snapshot = storage.join(run, SNAPSHOT)
    if not storage.exists(snapshot):
        return None
    try:
        return {c["checkpoint_dir_name"] for c in storage.read_json(snapshot)["checkpoint_results"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{snapshot}: not a Ray Train checkpoint snapshot ({err!r})") from None


def _complete_checkpoints(run: str) -> list[tuple[int, str]]:
    """(step, folder) of checkpoints whose upload finished, oldest first.

    Ray Train's snapshot names the checkpoints it registered; a folder it does not name is an upload
    that was cut short (background uploads make that likelier). Without a snapshot (a run folder
    copied without it), the files present decide.
    """
    registered = _registered(run)
    found = []
    for name in folders(run):
        uri = storage.join(run, name)
        if registered is not None and name not in registered:
            continue
        if storage.exists(storage.join(uri, "adapter_model.safetensors")) and storage.exists(
            storage.join(uri, "trainer_state.json")
        ):
            found.append((int(name.split("-")[1]), uri))
    return found


def find_checkpoint(run_dir: str, which: str) -> Path | str:
    """The adapter folder to export: `final/`, the lowest-eval-loss checkpoint, or the newest one.

    A Path for a local run, the URI for a run in object storage."""
    run = storage.absolute(str(run_dir))
    fs, path = storage.filesystem(run)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{run}: no such run folder")
    if which == "final":
        final = storage.join(run, "final")
        # An adapter, or with `lora: null` (full fine-tuning) a whole model.
        if not any(storage.exists(storage.join(final, n)) for n in ("adapter_config.json", "config.json")):
            raise FileNotFoundError(
                f"{final}: no final adapter (the run has not finished); use --checkpoint latest or best"
            )
        return storage.as_path(final)
    if which not in ("best", "latest"):
        raise ValueError(f"checkpoint must be one of final, best, latest; got {which!r}")
    checkpoints = _complete_checkpoints(run)
    if not checkpoints:
        raise FileNotFoundError(
            f"{run}: no complete checkpoint-NNNNNNN folder (one with adapter_model.safetensors and trainer_state.json)"
        )
    if which == "latest":
        return storage.as_path(checkpoints[-1][1])
    try:
        losses = [(checkpoint_metrics(uri).get("eval_loss"), step, uri) for step, uri in checkpoints]
    except Damaged as err:
        raise ValueError(str(err)) from None
    scored = [x for x in losses if x[0] is not None]
    if not scored:
        names = ", ".join(uri.rsplit("/", 1)[-1] for _, uri in checkpoints)
        raise ValueError(
            f"{run}: no checkpoint has an eval loss in its trainer_state.json ({names}); "
            "the run had no eval data or no eval before a save; use --checkpoint latest"
        )
    return storage.as_path(min(scored, key=lambda x: x[:2])[2])


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def merge(adapter_dir: str, out_dir: str, base_path: str | None = None, dtype: str = "float32") -> Path:
    """Fold the LoRA weights (and trained token rows) into the base and save a plain model +
    tokenizer at `out_dir` (a local folder).

    The base is always loaded unquantized: a QLoRA adapter was trained against the 4-bit base,
    but merging into 4-bit weights would round the update away (and PEFT cannot save it).
    An adapter in object storage is downloaded to a temporary folder first.
    """
    if not storage.is_local(str(adapter_dir)):
        with tempfile.TemporaryDirectory(prefix="sft-ray-adapter-") as tmp:
            return _merge(storage.download_dir(str(adapter_dir), tmp, skip=RESUME_ONLY), out_dir, base_path, dtype)
    return _merge(adapter_dir, out_dir, base_path, dtype)


def _merge(adapter_dir: str, out_dir: str, base_path: str | None, dtype: str) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_ray.model import fit_embeddings

    adapter, out = Path(adapter_dir), Path(out_dir)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file() and (adapter / "config.json").is_file():
        raise FileNotFoundError(
            f"{adapter}: a whole model (the run fine-tuned every weight, lora: null), not an adapter: there is "
            "nothing to merge; it loads with AutoModelForCausalLM.from_pretrained as it is"
        )
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json, not a LoRA adapter folder")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or remove it")
    base = base_path or json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} names no base_model_name_or_path; pass the base model path")

    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if _has_tokenizer(adapter) else base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    # A run that added chat tokens trained their rows on a base grown to its tokenizer: grow this
    # one the same way, so the adapter's rows land where they were trained and EOS is the turn end.
    fit_embeddings(model, tokenizer)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # also replaces an empty folder the user made beforehand
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
