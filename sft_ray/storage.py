"""Paths and URIs (local/NFS folders and s3://), JSON manifests, and whole-or-nothing publication.

Everything goes through pyarrow filesystems, the same layer Ray Train and Ray Data use, so a
path that works for one works for all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

COMPLETE = "COMPLETE"  # written last into a published folder


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (pyarrow needs one); a URI as it is, without a trailing slash."""
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def as_path(uri: str) -> Path | str:
    """What commands hand back for a folder: a Path when it is local, the URI otherwise."""
    return Path(uri) if is_local(uri) else uri


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def fingerprint(uri: str) -> str:
    """Content hash of a file, or of a folder's files by relative name (hidden ones, such as the
    `.cache` that `hf download` leaves, left out); size and mtime on object stores (no download)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        prefix = path.rstrip("/") + "/"
        children = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        names = sorted(
            c.path[len(prefix) :]
            for c in children
            if c.type == pafs.FileType.File and not any(p.startswith(".") for p in c.path[len(prefix) :].split("/"))
        )
        return hashlib.sha256(json.dumps([[n, fingerprint(join(uri, n))] for n in names]).encode()).hexdigest()
    if not is_local(uri):
        return f"{info.size}:{info.mtime_ns}"
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_json(uri: str) -> dict:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(uri: str, obj: dict) -> None:
    """Write whole or not at all: a reader never sees half a file."""
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_bytes(uri: str, data: bytes) -> None:
    """Whole or not at all, and an error names the file (a full disk says only `[Errno 28]`)."""
    if is_local(uri):
        tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).write_bytes(data)
            os.replace(tmp, uri)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise OSError(err.errno, f"cannot write {uri}: {err.strerror or err}") from err
        return
    fs, path = filesystem(uri)
    try:
        with fs.open_output_stream(path) as f:  # an object store PUT is atomic
            f.write(data)
    except (OSError, pa.ArrowException) as err:
        raise OSError(getattr(err, "errno", None), f"cannot write {uri}: {err}") from err


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local folder's files into `dest` (merging; for logs that only grow)."""
    fs, path = filesystem(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, destination_filesystem=fs)


def download_dir(uri: str, local_dir: str, skip: tuple[str, ...] = ()) -> str:
    """Copy the files of a folder (local or in object storage) into `local_dir`, leaving out those
    whose paths inside it start with one of `skip` (a name or a subfolder's name); raises
    FileNotFoundError when there are none."""
    fs, path = filesystem(uri)
    inside = len(path.rstrip("/")) + 1
    files = [
        i
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if i.type == pafs.FileType.File and not i.path[inside:].startswith(skip)
    ]
    if not files:
        raise FileNotFoundError(f"{uri}: no such folder, or it is empty")
    for info in files:
        target = os.path.join(local_dir, info.path[inside:])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(info.path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def publish_dir(local_dir: str, dest: str) -> None:
    """Put the contents of `local_dir` at `dest`, replacing what was there, never half-copied.

    Locally the folder is copied aside and renamed into place. An object store has no rename:
    the old prefix is removed, the files are uploaded, and `COMPLETE` is written last; readers
    of an s3:// folder trust it only when `COMPLETE` is there.
    """
    if not is_local(dest):
        delete_dir(dest)
        upload_dir(local_dir, dest)
        write_bytes(join(dest, COMPLETE), b"ok")
        return
    parent = os.path.dirname(dest.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dest.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(local_dir, tmp)
    old = None
    if os.path.exists(dest):
        old = f"{dest.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    Path(tmp, COMPLETE).write_bytes(b"ok")
    os.replace(tmp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


class StorageError(ValueError):
    """Storage that cannot be used; raised before any work starts."""


def check_writable(uri: str) -> None:
    """Fail before any work starts when the storage cannot be written (or reached)."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        if is_local(uri):
            Path(uri).mkdir(parents=True, exist_ok=True)
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except (OSError, pa.ArrowException) as err:
        raise StorageError(f"storage.path {uri} is not writable: {err}") from None
