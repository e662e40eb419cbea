"""Which checkpoint a rerun resumes from: the run's checkpoint list repaired, the checkpoint checked.

Ray Train keeps the run's registered checkpoints in `<run>/checkpoint_manager_snapshot.json` and
hands the latest one to the workers. Two of its habits lose runs (Ray 2.60):
- It writes that list in place, not whole-or-nothing: a full disk leaves it empty, and every later
  run of the name then fails at start-up (`CheckpointManagerInitializationError: Expecting value`).
- It trusts the files of the checkpoint it hands out: a truncated adapter fails every rerun with a
  raw `SafetensorError`, and a missing `optimizer.pt` resumes silently with a fresh optimizer.

So the driver reads the list before each run. An unreadable list is rebuilt from the checkpoint
folders that are whole; a listed checkpoint whose files are damaged is set aside (with one line
naming the file) and the previous whole one is used. Whole means: the trainer state, optimizer,
scheduler, weights and every worker's RNG state are there, non-empty and readable (safetensors
headers match their sizes, `torch.save` archives have their index, JSON parses); under fsdp, every
rank's part of the sharded weights and optimizer state. The list's format
is Ray's private one; `tests/test_faults.py` pins it by having Ray load what this module wrote.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
import zipfile

import pyarrow.fs as pafs

from sft_ray import storage

SNAPSHOT = "checkpoint_manager_snapshot.json"
_NAME = re.compile(r"checkpoint-(\d+)")


class Damaged(Exception):
    """A checkpoint file that cannot be resumed from; the message names the file."""


def _safetensors(f, size: int, uri: str) -> None:
    if size < 8:
        raise Damaged(f"{uri}: {size} bytes, not a safetensors file")
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
        raise Damaged(f"{uri}: truncated ({size} bytes, its header alone needs {8 + n})")
    try:
        header = json.loads(f.read(n))
    except ValueError:
        raise Damaged(f"{uri}: unreadable safetensors header") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise Damaged(f"{uri}: truncated ({size} bytes, its tensors need {8 + n + end})")


def _archive(f, uri: str) -> None:
    """`torch.save` files are zip archives whose index sits at the end: a cut one has none."""
    try:
        zipfile.ZipFile(f).namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise Damaged(f"{uri}: unreadable ({err})") from None


def _check_file(fs, path: str, uri: str, size: int) -> None:
    if size == 0:
        raise Damaged(f"{uri}: empty")
    with fs.open_input_file(path) as f:
        if path.endswith(".safetensors"):
            _safetensors(f, size, uri)
        elif path.endswith((".pt", ".pth", ".bin")):
            _archive(f, uri)
        elif path.endswith(".json"):
            try:
                json.loads(f.read())
            except ValueError:
                raise Damaged(f"{uri}: not valid JSON") from None


def _needed(files: dict, world: int | None) -> list[str]:
    """The files a whole checkpoint holds, given the names present (see verify)."""
    rng = sorted(int(m.group(1)) for n in files if (m := re.fullmatch(r"rng_state_(\d+)\.pth", n)))
    ranks = range(world) if world and world > 1 else range(max(rng, default=-1) + 1)
    needed = ["trainer_state.json", "scheduler.pt"]
    # fsdp: weights and optimizer state are folders of parts (torch.distributed.checkpoint), one per rank.
    sharded = sorted({n.rsplit("/", 1)[0] for n in files if n.endswith("/.metadata")})
    for folder in sharded:
        needed += [f"{folder}/__{r}_0.distcp" for r in ranks or [0]]
    if not sharded:
        needed.append("optimizer.pt")
        if not any(n.endswith(".safetensors") for n in files):
            needed.append("adapter_model.safetensors")
    if "rng_state.pth" not in files:
        needed += [f"rng_state_{r}.pth" for r in ranks] or ["rng_state.pth"]
    return needed


def verify(uri: str, world: int | None = None) -> int:
    """The step of the whole checkpoint at `uri`; raises Damaged naming what is missing or broken.

    `world`: the RNG states every rank must have left (a folder nobody registered may hold rank 0's
    files only). Without it, the RNG states present must be ranks 0..k-1 with none missing between.
    """
    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = {i.path[len(path.rstrip("/")) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}
    if not files:
        raise Damaged(f"{uri}: no files")
    for name in _needed(files, world):
        if name not in files:
            raise Damaged(f"{storage.join(uri, name)}: missing")
    for name, size in sorted(files.items()):
        _check_file(fs, storage.join(path, name), storage.join(uri, name), size)
    with fs.open_input_stream(storage.join(path, "trainer_state.json")) as f:
        state = json.loads(f.read())
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise Damaged(f"{storage.join(uri, 'trainer_state.json')}: no global_step")
    return state["global_step"]


def reported_metrics(log_history: list[dict], step: int) -> dict:
    """What a worker reports with a checkpoint: the latest value of every number logged so far.
    Also rebuilt from a checkpoint's trainer state, so a rebuilt list ranks checkpoints the same way."""
    merged: dict = {}
    for entry in log_history:
        merged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return {**merged, "step": step}


def checkpoint_metrics(uri: str) -> dict:
    """What the checkpoint at `uri` was saved with (its trainer state's latest numbers)."""
    path = storage.join(uri, "trainer_state.json")
    try:
        state = storage.read_json(path)
        return reported_metrics(state.get("log_history", []), state["global_step"])
    except (ValueError, KeyError, TypeError) as err:
        raise Damaged(f"{path}: not an HF trainer state ({err!r})") from None


def folders(run: str) -> list[str]:
    """The run's `checkpoint-N` folder names, oldest first (`checkpoint-N.tmp-…` is none)."""
    fs, path = storage.filesystem(run)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and _NAME.fullmatch(i.base_name)]
    return sorted(names, key=lambda n: int(_NAME.fullmatch(n).group(1)))


def _rebuilt(run: str, world: int, say) -> dict | None:
    """A checkpoint list of the whole checkpoint folders, oldest first; None when there is none."""
    results = []
    for name in folders(run):
        try:
            verify(storage.join(run, name), world)
        except Damaged as err:
            say(f"  not whole, left out: {err}")
            continue
        results.append(
            {"version": 0, "checkpoint_dir_name": name, "metrics": checkpoint_metrics(storage.join(run, name))}
        )
    if not results:
        return None
    import ray

    return {
        "ray_version": ray.__version__,
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(1, len(results) + 1)),
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(results),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }


def _read(uri: str) -> tuple[dict | None, str]:
    """The list, or None and why it cannot be used."""
    import ray

    try:
        snap = storage.read_json(uri)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return None, f"unreadable ({err})"
    keys = ("checkpoint_results", "checkpoint_report_indices", "pending_training_results", "current_report_index")
    if not isinstance(snap, dict) or any(k not in snap for k in keys):
        return None, "not a checkpoint list"
    if snap.get("ray_version") != ray.__version__:
        return None, f"written by Ray {snap.get('ray_version')}, this is Ray {ray.__version__}"
    return snap, ""


def _set_aside(uri: str) -> str:
    """Keep a damaged checkpoint for inspection where a rename exists (locally); on object stores it
    is removed, or the next save of the same step would merge into its files."""
    if storage.is_local(uri):
        fs, path = storage.filesystem(uri)
        aside = f"{path}.damaged-{uuid.uuid4().hex[:6]}"
        fs.move(path, aside)
        return f"moved to {aside}"
    storage.delete_dir(uri)
    return "removed"


def _drop(snap: dict, name: str) -> dict:
    keep = [i for i, r in enumerate(snap["checkpoint_results"]) if r["checkpoint_dir_name"] != name]
    results = [snap["checkpoint_results"][i] for i in keep]
    indices = [snap["checkpoint_report_indices"][i] for i in keep]
    pending = [
        (r, s)
        for r, s in zip(snap["pending_training_results"], snap.get("pending_validation_specs", []))
        if r["checkpoint_dir_name"] != name
    ]
    latest = results[max(range(len(results)), key=indices.__getitem__)] if results else None
    return {
        **snap,
        "checkpoint_results": results,
        "checkpoint_report_indices": indices,
        "latest_checkpoint_result": latest,
        "pending_training_results": [r for r, _ in pending],
        "pending_validation_specs": [s for _, s in pending],
        **{
            k: [n for n in snap.get(k, []) if n != name]
            for k in (
                "validated_checkpoint_dir_names",
                "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names",
            )
        },
    }


def resume_point(run: str, world: int, say=print) -> tuple[str, int] | None:
    """Make the run's checkpoint list whole and its latest checkpoint sound; returns (folder, step)
    of the checkpoint Ray will resume from, or None for a fresh start. Prints what it repaired."""
    uri = storage.join(run, SNAPSHOT)
    snap, why = (None, "") if not storage.exists(uri) else _read(uri)
    original = snap
    if snap is None and (why or folders(run)):
        say(f"the checkpoint list {uri} is {why or 'missing'}; rebuilding it from the checkpoint folders")
        snap = _rebuilt(run, world, say)
        if snap is None and why:  # nothing to resume from: Ray starts afresh without the list
            say(f"  no whole checkpoint in {run}: starting from step 0")
            fs, path = storage.filesystem(uri)
            fs.delete_file(path)
    for r in list(snap["checkpoint_results"] if snap else []):
        if not storage.exists(storage.join(run, r["checkpoint_dir_name"])):  # Ray refuses to start over one
            say(f"checkpoint {r['checkpoint_dir_name']} is listed in {uri} but gone; left out of the list")
            snap = _drop(snap, r["checkpoint_dir_name"])
    while snap is not None and snap.get("latest_checkpoint_result"):
        name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
        try:
            step = verify(storage.join(run, name))
        except Damaged as err:
            fate = _set_aside(storage.join(run, name))
            snap = _drop(snap, name)
            latest = snap["latest_checkpoint_result"]
            instead = f"resuming from {latest['checkpoint_dir_name']}" if latest else "starting from step 0"
            say(f"checkpoint {name} is damaged ({err}); it was {fate}; {instead}, the last whole one before it")
            continue
        if snap is not original:
            storage.write_json(uri, snap)
        return name, step
    if snap is not None and snap is not original:
        storage.write_json(uri, snap)
    return None
