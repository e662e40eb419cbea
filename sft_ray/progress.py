"""Progress on the driver: one line per logged training step, read from the run's metrics.jsonl,
and rows done while the data is prepared (`Preparation`).

Rank 0 rewrites `<run>/metrics.jsonl` at every log (train/callbacks.py), in shared storage, so the
driver can follow a run wherever its workers are: locally, on a cluster (`ray job logs` shows the
driver's lines) or in object storage. In a terminal the line is redrawn in place; elsewhere
(files, job logs) each is printed on its own.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time

from sft_ray import storage
from sft_ray.report import short

POLL_S = 2.0
PREP_EVERY_S = 5.0  # a preparation shorter than this prints no progress; a longer one, a line this often
CLOCK_SKEW_S = 5.0  # rank 0's clock (it stamps the records) may be a little behind the driver's


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def line(record: dict, total: int, eval_loss: float | None, eta_s: float | None, exact: float | None = None) -> str:
    """`step 50/150 (33%) · loss 4.27 · eval 4.27 · exact 97% · lr 2.0e-03 · 2.1k trained tok/s · ETA 0:42`
    (exact: eval_exact_match, with eval.exact_match_rows)."""
    step = record["step"]
    parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
    parts.append(f"loss {record['loss']:.4g}")
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4g}")
    if exact is not None:
        parts.append(f"exact {exact:.0%}")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.1e}")
    if record.get("trained_tokens_per_s"):
        parts.append(f"{short(record['trained_tokens_per_s'])} trained tok/s")
    if eta_s is not None:
        parts.append(f"ETA {_clock(eta_s)}")
    return " · ".join(parts)


class Follower:
    """Turns the records of metrics.jsonl into progress lines, each step once.

    ETA: the seconds per step of this attempt (between its first and latest logged steps) times
    the steps left, so the start-up and a resumed run's earlier attempts do not count. Records
    older than `since` are an earlier driver's (the file keeps them until this run's first log
    rewrites it) and are skipped."""

    def __init__(self, total: int, start_step: int, since: float = 0.0):
        self.total, self.last, self.since = total, start_step, since
        self.eval_loss: float | None = None
        self.exact: float | None = None
        self.first: tuple[int, float] | None = None  # (step, time) of this attempt's first log

    def new_lines(self, records: list[dict]) -> list[str]:
        out = []
        for record in records:
            step = record.get("step", 0)
            if "eval_loss" in record:
                self.eval_loss = record["eval_loss"]
            if "eval_exact_match" in record:
                self.exact = record["eval_exact_match"]
            if "loss" not in record or step <= self.last or record.get("time", 0.0) < self.since:
                continue
            self.last = step
            eta = None
            if self.first is None:
                self.first = (step, record.get("time", 0.0))
            elif step > self.first[0] and self.total:
                per_step = (record.get("time", 0.0) - self.first[1]) / (step - self.first[0])
                eta = per_step * (self.total - step)
            out.append(line(record, self.total, self.eval_loss, eta, self.exact))
        return out


def _records(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        text = f.read().decode()
    records = []
    for raw in text.splitlines():
        with contextlib.suppress(ValueError):  # a line being rewritten: read again next time
            records.append(json.loads(raw))
    return records


@contextlib.contextmanager
def follow(run_dir: str, total: int, start_step: int, out=None):
    """Print progress lines while the body runs (a training run), and the last ones after it."""
    out = out or sys.stdout
    follower = Follower(total, start_step, since=time.time() - CLOCK_SKEW_S)
    uri = storage.join(run_dir, "metrics.jsonl")
    live = out.isatty()
    stop = threading.Event()

    def show() -> None:
        try:
            lines = follower.new_lines(_records(uri))
        except OSError:  # storage briefly unreachable: the next poll tries again
            return
        for text in lines:
            out.write(f"\r\x1b[2K{text}" if live else f"{text}\n")
        out.flush()

    def loop() -> None:
        while not stop.wait(POLL_S):
            show()

    thread = threading.Thread(target=loop, name="sft-ray-progress", daemon=True)
    thread.start()
    try:
        yield follower
    finally:
        stop.set()
        thread.join()
        show()
        if live and follower.first is not None:
            out.write("\n")
            out.flush()


class Preparation:
    """Rows done while the data is prepared, as the chunks (4 MiB of JSONL, a Parquet row group: one
    Ray task each) finish: `preparing data: 312k rows of ~1.0M · 14/40 chunks (35%) · 24.1k rows/s ·
    ETA 0:26`. The total is estimated from the chunks done until all are. Silent for the first
    PREP_EVERY_S seconds, then a line at most that often, and the last one when it took longer."""

    def __init__(self, chunks: int, out=None, clock=time.monotonic):
        self.chunks, self.out, self.clock = chunks, out or sys.stdout, clock
        self.start = self.shown = clock()
        self.done = self.rows = 0

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        total = self.rows if self.done == self.chunks else round(self.rows * self.chunks / max(self.done, 1))
        parts = [f"preparing data: {short(self.rows)} rows of {'' if self.done == self.chunks else '~'}{short(total)}"]
        parts.append(f"{self.done}/{self.chunks} chunks ({self.done / self.chunks:.0%})")
        parts.append(f"{short(self.rows / elapsed)} rows/s")
        if self.done < self.chunks:
            parts.append(f"ETA {_clock(elapsed / max(self.done, 1) * (self.chunks - self.done))}")
        return " · ".join(parts)

    def chunk_done(self, rows: int) -> None:
        self.done += 1
        self.rows += rows
        now = self.clock()
        last = self.done == self.chunks
        if now - self.start >= PREP_EVERY_S and (last or now - self.shown >= PREP_EVERY_S):
            self.shown = now
            self.out.write(self.line() + "\n")
            self.out.flush()
