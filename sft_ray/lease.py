"""One driver per run name: a lease in the run's folder in storage.

Two drivers with one name write into one folder: both train from step 0, one prunes checkpoints the
other resumes from. Resubmitting a job that is still running is the most common way to get there,
so the second driver is refused, naming the first (host, pid, start time).

The lease is `<storage.path>/<name>/.lease.json`, rewritten by a heartbeat thread every BEAT_S.
A lease whose driver is gone is taken over: at once where the owner ran on this host and its pid
is dead, after STALE_S without a heartbeat otherwise (another host, a lost node).
- Local and NFS paths: created with O_EXCL (atomic on NFSv3 and later); a takeover holds a second
  O_EXCL file while it replaces the stale lease, so two takers cannot both win.
- Object stores have no exclusive create here (pyarrow's S3 client sends no conditional writes):
  the lease is written, then read back after SETTLE_S; of drivers that raced, the one whose write
  landed last reads its own token and the others are refused. S3 reads are strongly consistent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from sft_ray import storage

LEASE = ".lease.json"
BEAT_S = 15.0
STALE_S = 90.0
SETTLE_S = 2.0


class RunBusy(RuntimeError):
    """Another live driver holds the run's name."""


def process_alive(pid: int) -> bool:
    """Whether a process of this host is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(record: dict | None, age_s: float) -> bool:
    """Whether the lease's driver is gone. `age_s`: seconds since its last heartbeat."""
    if record is None:  # unreadable: a driver that died while creating it, or one creating it now
        return age_s > STALE_S
    if record.get("host") == socket.gethostname() and not process_alive(int(record.get("pid", 0))):
        return True
    return age_s > STALE_S


def _read(uri: str) -> tuple[dict | None, float]:
    """The lease record (None if unreadable) and seconds since it was last written."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
    try:
        record = storage.read_json(uri)
    except (OSError, ValueError):
        return None, age
    beat = record.get("heartbeat") if isinstance(record, dict) else None
    return (record if isinstance(record, dict) else None), (time.time() - beat if beat else age)


def _busy_message(name: str, uri: str, record: dict | None, age_s: float) -> str:
    if record is None:
        owner = "a driver that is starting now"
    else:
        started = datetime.fromtimestamp(record.get("started", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        owner = f"pid {record.get('pid')} on host {record.get('host')}, started {started}"
    return (
        f"run {name} is already running: {owner} (lease {uri}, last heartbeat {age_s:.0f} s ago). "
        f"Wait for it to finish, stop it, or choose another name (name=...). If that driver is gone, its lease "
        f"is taken over at once on its own host, elsewhere after {STALE_S:.0f} s without a heartbeat."
    )


class Lease:
    def __init__(self, run: str, name: str):
        self.uri, self.name = storage.join(run, LEASE), name
        self.record = {
            "name": name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "heartbeat": time.time(),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it ---------------------------------------------------------------------------
    def _create_local(self) -> bool:
        path = self.uri
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def _take_over_local(self, seen: dict | None) -> bool:
        """Replace a stale lease, holding `<lease>.takeover` so that one taker wins."""
        guard = f"{self.uri}.takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if time.time() - os.path.getmtime(guard) > STALE_S:  # a taker that died mid-takeover
                with contextlib.suppress(FileNotFoundError):
                    os.remove(guard)
            return False
        try:
            os.close(fd)
            record, age = _read(self.uri) if os.path.exists(self.uri) else (None, float("inf"))
            if os.path.exists(self.uri) and (record != seen or not _stale(record, age)):
                return False  # it changed hands (or came alive) meanwhile
            storage.write_json(self.uri, self.record)  # whole-file replace
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(guard)

    def acquire(self) -> Lease:
        local = storage.is_local(self.uri)
        for _ in range(3):
            if local and self._create_local():
                break
            if not local and not storage.exists(self.uri):
                if self._put_and_confirm():
                    break
                continue
            record, age = _read(self.uri)
            if not _stale(record, age):
                raise RunBusy(_busy_message(self.name, self.uri, record, age))
            owner = f"pid {record.get('pid')} on {record.get('host')}" if record else "an unknown driver"
            if self._take_over_local(record) if local else self._put_and_confirm():
                print(f"run {self.name}: took over the lease of {owner}, whose driver is gone ({self.uri})")
                break
        else:
            record, age = _read(self.uri)
            raise RunBusy(_busy_message(self.name, self.uri, record, age))
        self._thread = threading.Thread(target=self._beat, name="sft-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _put_and_confirm(self) -> bool:
        storage.write_json(self.uri, self.record)
        time.sleep(SETTLE_S)
        record, _ = _read(self.uri)
        return bool(record) and record.get("token") == self.record["token"]

    # -- holding it --------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(OSError, ValueError):
                record, _ = _read(self.uri)
                if record and record.get("token") != self.record["token"]:
                    print(
                        f"run {self.name}: its lease {self.uri} was taken by pid {record.get('pid')} on "
                        f"{record.get('host')}; this driver's heartbeat stopped (was it paused for {STALE_S:.0f} s?)"
                    )
                    return
                self.record["heartbeat"] = time.time()
                storage.write_json(self.uri, self.record)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            record, _ = _read(self.uri)
            if record and record.get("token") == self.record["token"]:
                fs, path = storage.filesystem(self.uri)
                fs.delete_file(path)

    def __enter__(self) -> Lease:
        """`with Lease(run_dir, name):` refused with RunBusy while another driver holds the name."""
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
