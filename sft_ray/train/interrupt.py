"""Ctrl-C, `kill`, `ray job stop` and spot preemption: stop at a checkpoint, not between two.

SIGINT or SIGTERM to the driver writes `<run>/.stop-requested`. The workers look for it at every
step (rank 0 reads storage at most every POLL_S, all ranks agree through one all-reduce), save a
checkpoint at that step, hand it to Ray Train and end without writing final/. The driver then
says at which step it stopped and exits with 128 + the signal number (130 for SIGINT, 143 for
SIGTERM), so scripts can tell an interrupt from a failure (1).

The wait is bounded by GRACE_S: past it, or at a second signal, the driver exits at once and a
rerun resumes from the last checkpoint Ray registered. `ray job stop` sends SIGTERM and kills
after RAY_JOB_STOP_WAIT_TIME_S (3 s by default): set it on the cluster above the time one step
plus one checkpoint upload take, or the save is cut short (nothing is lost beyond the save interval).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from sft_ray import storage

FLAG = ".stop-requested"
POLL_S = 2.0
GRACE_S = float(os.environ.get("SFT_RAY_STOP_GRACE_S", "300"))


class Interrupted(Exception):
    """The run stopped at a signal after saving; `status` is the exit status to use."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def flag_uri(run: str) -> str:
    return storage.join(run, FLAG)


def clear(run: str) -> None:
    """A request left by an earlier driver must not stop this run at its first step."""
    fs, path = storage.filesystem(flag_uri(run))
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(path)


@contextlib.contextmanager
def stop_on_signals(run: str, name: str):
    """Within: SIGINT/SIGTERM ask the workers to save and stop. Yields a dict whose "signal" is set
    to the signal number once one came."""
    got: dict = {"signal": None}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def give_up() -> None:
        print(
            f"sft-ray: {name} did not save within {GRACE_S:.0f} s of the interrupt; exiting now. "
            "Rerun the same command to resume from its last registered checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + got["signal"])

    def handler(signum, frame) -> None:
        if got["signal"] is not None:
            print(f"sft-ray: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        got["signal"] = signum
        print(
            f"sft-ray: {signal.Signals(signum).name} received: {name} saves a checkpoint at the next step and stops "
            f"(at most {GRACE_S:.0f} s; interrupt again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
        try:
            storage.write_bytes(flag_uri(run), str(time.time()).encode())
        except OSError as err:
            print(f"sft-ray: cannot ask the workers to stop ({err}); exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        timer = threading.Timer(GRACE_S, give_up)
        timer.daemon = True
        timer.start()

    clear(run)
    for s in previous:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        clear(run)


class StopWatch:
    """Worker side: whether the driver asked to stop, the same answer on every rank at every step."""

    def __init__(self, run: str, rank: int):
        self.uri, self.rank, self.checked = flag_uri(run), rank, 0.0

    def requested(self, device) -> bool:
        import torch
        import torch.distributed as dist

        seen = False
        if self.rank == 0 and time.time() - self.checked >= POLL_S:
            self.checked = time.time()
            seen = storage.exists(self.uri)
        if not dist.is_initialized():
            return seen
        flag = torch.tensor([1.0 if seen else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
