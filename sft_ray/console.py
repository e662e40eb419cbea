"""What a run prints by default: the run, not the libraries' chatter.

Quiet by default; `--verbose` (or SFT_RAY_VERBOSE=1) shows everything. Only messages that say
nothing about the user's run are dropped: Ray Data's execution plans and INFO lines, Ray Train's
INFO lines (it keeps them in its own log files), known-harmless lines Ray and bitsandbytes print,
progress bars of weight loading and saving, and deprecation warnings raised inside dependencies.
Warnings and errors about data, config, storage or hardware still show; Ray's log files under
its session folder keep everything either way.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Lines that say nothing about the run, matched anywhere in a line the driver prints (worker
# lines arrive prefixed with `(RayTrainWorker pid=...)`).
NOISE = re.compile(
    "|".join(
        [
            r"has constructor arguments in the object store and max_restarts > 0",  # Ray's own actors
            r"Token authentication is enabled for this Ray cluster",
            r"Progress bars disabled\. To enable",
            r"Failed to load CPU gemm_4bit_forward from kernels-community",  # bitsandbytes, CPU only
            r"(Loading weights|Writing model shards):\s+\d+%",  # progress bars
            r"Ray deduplicates logs by default",
            r"^\S+ \S+\s+INFO \S+\.py:\d+ -- ",  # Ray's Python INFO lines (Ray Data's execution plans)
            r"Reporting training result \d+: TrainingReport",  # Ray Train worker INFO (its files keep it)
            r"Checkpoint successfully created at: Checkpoint",
        ]
    )
)
LIBRARIES = r"(transformers|trl|peft|accelerate|torch|ray|datasets|bitsandbytes|huggingface_hub|pydantic)(\.|$)"


def verbose() -> bool:
    return os.environ.get("SFT_RAY_VERBOSE", "") not in ("", "0", "false")


def ray_train_log_level() -> str:
    """Ray Train's console level (`RunConfig(logging_config=...)`); its system log files keep all."""
    return "INFO" if verbose() else "WARNING"


class _FilteredStream:
    """A text stream that drops whole lines matching NOISE (the driver's stdout and stderr, which
    carry the lines Ray forwards from its workers and actors)."""

    def __init__(self, stream):
        self._stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        kept = [line for line in lines if not NOISE.search(line)]
        if kept:
            self._stream.write("\n".join(kept) + "\n")
        if self._pending.startswith(("\r", "\x1b")):  # a live progress line is written without a newline
            self._stream.write(self._pending)
            self._pending = ""
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


_FILTER = """
import re, signal, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)  # it ends when every writer has closed the pipe, not before
noise = re.compile(sys.argv[1])
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not noise.search(line.decode(errors="replace")):
        out.write(line)
        out.flush()
"""


def _filter_stderr_descriptor() -> None:
    """Ray's C++ core worker in the driver writes its lines to file descriptor 2 itself, past
    Python. Route that descriptor through a small process that drops NOISE lines and passes every
    other byte on. It is its own session and ignores signals, so Ctrl-C or `ray job stop` cannot
    take it down before the driver's last words: it ends when the driver (and anything that
    inherited the descriptor) has exited. Only for the real stderr: not under a test's capture."""
    import subprocess

    if sys.stderr is not sys.__stderr__ or getattr(_filter_stderr_descriptor, "done", False):
        return
    read, write = os.pipe()
    subprocess.Popen([sys.executable, "-c", _FILTER, NOISE.pattern], stdin=read, stdout=2, start_new_session=True)
    sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)
    os.close(read)
    _filter_stderr_descriptor.done = True


def quiet_driver() -> None:
    """Called once by the command line before Ray starts."""
    if verbose():
        return
    _filter_stderr_descriptor()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=LIBRARIES)
    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARIES)
    if not isinstance(sys.stdout, _FilteredStream):
        sys.stdout, sys.stderr = _FilteredStream(sys.stdout), _FilteredStream(sys.stderr)


def quiet_worker(loud: bool) -> None:
    """Called first in every Ray Train worker; `loud` is the driver's verbose()."""
    if loud:
        return
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=LIBRARIES)
    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARIES)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.utils\.checkpoint")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
