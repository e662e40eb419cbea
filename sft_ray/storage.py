"""Paths and URIs (local/NFS folders now), JSON manifests, and atomic publication of folders.

Everything goes through pyarrow filesystems, the same layer Ray Train and Ray Data use, so a
path that works for one works for all.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(uri: str, obj: dict) -> None:
    """Write whole or not at all: a reader never sees half a file."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if is_local(uri):
        tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        Path(tmp).write_bytes(data)
        os.replace(tmp, uri)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:  # an object store PUT is atomic
        f.write(data)


def publish_dir(local_dir: str, dest: str) -> None:
    """Put the contents of `local_dir` at `dest`, replacing what was there, never half-copied."""
    parent = os.path.dirname(dest.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dest.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(local_dir, tmp)
    old = None
    if os.path.exists(dest):
        old = f"{dest.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(uri: str) -> None:
    """Fail before any work starts when the storage cannot be written."""
    if not is_local(uri):
        raise ValueError(f"storage.path: only local or NFS folders are supported so far, got {uri}")
    probe = Path(uri) / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"storage.path {uri} is not writable: {err}") from None
