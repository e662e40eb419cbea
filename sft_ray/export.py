"""Pick a checkpoint of a run (final, best, latest) and merge its adapter into a plain model.

A merged model loads with `AutoModelForCausalLM.from_pretrained(out_dir)` alone, with no PEFT, so
it can be served by anything that serves a Hugging Face model. Runs in object storage
(`s3://bucket/runs/demo`) are read through the same storage layer as training; merging one first
downloads the adapter (not the optimizer state) to a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from sft_ray import storage

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # full match: `checkpoint-0000050.tmp-…` is not one
_DTYPES = ("float32", "bfloat16", "float16")
# Checkpoint files only a resumed run needs: not downloaded to merge.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state", "optimizer", storage.COMPLETE)


class _Folder:
    """A folder on a local disk or in object storage, as `Path` is used here: `/`, is_file, is_dir."""

    def __init__(self, uri: str):
        self.uri = os.path.abspath(uri) if "://" not in uri else uri.rstrip("/")
        self.name = self.uri.rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> _Folder:
        return _Folder(storage.join(self.uri, name))

    def _type(self) -> pafs.FileType:
        fs, path = storage.filesystem(self.uri)
        return fs.get_file_info(path).type

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> list[_Folder]:
        fs, path = storage.filesystem(self.uri)
        return [self / i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]

    def read_text(self) -> str:
        fs, path = storage.filesystem(self.uri)
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    def result(self) -> Path | str:
        """A Path for a local folder (what callers compare with), the URI for object storage."""
        return Path(self.uri) if storage.is_local(self.uri) else self.uri

    def __str__(self) -> str:
        return self.uri


def _registered(run: _Folder) -> set[str] | None:
    """Checkpoint folders Ray Train registered (uploaded whole), from its snapshot; None without one."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        return {c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{snapshot}: not a Ray Train checkpoint snapshot ({err!r})") from None


def _complete_checkpoints(run: _Folder) -> list[tuple[int, _Folder]]:
    """(step, folder) of checkpoints whose upload finished, oldest first.

    Ray Train's snapshot names the checkpoints it registered; a folder it does not name is an upload
    that was cut short (background uploads make that likelier). Without a snapshot (a run folder
    copied without it), the files present decide.
    """
    registered = _registered(run)
    found = []
    for child in run.iterdir() if run.is_dir() else []:
        match = _CHECKPOINT.fullmatch(child.name)
        if registered is not None and child.name not in registered:
            continue
        if match and (child / "adapter_model.safetensors").is_file() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found, key=lambda x: x[0])


def _eval_loss_at(checkpoint: _Folder, step: int) -> float | None:
    """The eval loss this checkpoint was saved with: the last one logged at or before its step."""
    path = checkpoint / "trainer_state.json"
    try:
        history = json.loads(path.read_text())["log_history"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path}: not an HF trainer state ({err!r})") from None
    latest, loss = -1, None
    for entry in history:
        if "eval_loss" in entry and "step" in entry and latest <= entry["step"] <= step:
            latest, loss = entry["step"], entry["eval_loss"]
    return loss


def find_checkpoint(run_dir: str, which: str) -> Path | str:
    """The adapter folder to export: `final/`, the lowest-eval-loss checkpoint, or the newest one.

    A Path for a local run, the URI for a run in object storage."""
    run = _Folder(str(run_dir))
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    if which == "final":
        final = run / "final"
        # An adapter, or with `lora: null` (full fine-tuning) a whole model.
        if not (final / "adapter_config.json").is_file() and not (final / "config.json").is_file():
            raise FileNotFoundError(
                f"{final}: no final adapter (the run has not finished); use --checkpoint latest or best"
            )
        return final.result()
    if which not in ("best", "latest"):
        raise ValueError(f"checkpoint must be one of final, best, latest; got {which!r}")
    checkpoints = _complete_checkpoints(run)
    if not checkpoints:
        raise FileNotFoundError(
            f"{run}: no complete checkpoint-NNNNNNN folder (one with adapter_model.safetensors and trainer_state.json)"
        )
    if which == "latest":
        return checkpoints[-1][1].result()
    scored = [(loss, step, path) for step, path in checkpoints if (loss := _eval_loss_at(path, step)) is not None]
    if not scored:
        names = ", ".join(p.name for _, p in checkpoints)
        raise ValueError(
            f"{run}: no checkpoint has an eval loss in its trainer_state.json ({names}); "
            "the run had no eval data or no eval before a save; use --checkpoint latest"
        )
    return min(scored, key=lambda x: x[:2])[2].result()


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def download(uri: str, dest: str) -> str:
    """Copy the files of a folder in object storage that a merge needs (no optimizer or RNG state) to `dest`."""
    fs, path = storage.filesystem(uri)
    files = [
        i
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if i.type == pafs.FileType.File and not i.base_name.startswith(_RESUME_ONLY)
    ]
    if not files:
        raise FileNotFoundError(f"{uri}: no such folder, or it is empty")
    for info in files:
        target = os.path.join(dest, info.path[len(path.rstrip("/")) + 1 :])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(info.path, target, source_filesystem=fs)
    return dest


def merge(adapter_dir: str, out_dir: str, base_path: str | None = None, dtype: str = "float32") -> Path:
    """Fold the LoRA weights (and trained token rows) into the base and save a plain model +
    tokenizer at `out_dir` (a local folder).

    The base is always loaded unquantized: a QLoRA adapter was trained against the 4-bit base,
    but merging into 4-bit weights would round the update away (and PEFT cannot save it).
    An adapter in object storage is downloaded to a temporary folder first.
    """
    if not storage.is_local(str(adapter_dir)):
        with tempfile.TemporaryDirectory(prefix="sft-ray-adapter-") as tmp:
            return _merge(download(str(adapter_dir), tmp), out_dir, base_path, dtype)
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
