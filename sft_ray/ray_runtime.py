"""Connecting to Ray: the cluster of a submitted job, RAY_ADDRESS, or an embedded local instance."""

from __future__ import annotations

import logging
import os
import signal
import threading


def ensure_ray() -> bool:
    """Initialize Ray once; returns True when this call started an embedded local instance."""
    # Set before Ray starts so every worker inherits it: the print patch floods logs (stack-notes R12).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if ray.is_initialized():
        return False
    local = "RAY_ADDRESS" not in os.environ
    # The dashboard (on 127.0.0.1 only) also serves the State API, which Ray Train's placement-group
    # cleaner needs: without it, a Tune trial stopped early keeps its workers' CPUs reserved and the
    # next trials never start (ray-project/ray#54305).
    # Its State API calls find the dashboard through RAY_API_SERVER_ADDRESS, or else by looking for
    # "the" Ray on the machine, which fails as soon as another one runs there (a notebook, a test
    # session): "Found multiple active Ray instances". So the port is chosen here and every process
    # of this instance is told it.
    port = _free_port() if local else None
    local_only = {"address": "local", "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("SFT_RAY_VERBOSE"):  # sweep trials decide their own logging from it (console.py)
        env["SFT_RAY_VERBOSE"] = os.environ["SFT_RAY_VERBOSE"]
    if local:
        env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ctrl-C in a terminal signals the whole foreground process group, and the embedded instance's
    # daemons (GCS, raylet, dashboard) are in it: they would die before the driver could stop the
    # run at a checkpoint (train/interrupt.py). Started while SIGINT is ignored, they inherit that.
    shield = local and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if shield else None
    try:
        ray.init(
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env} if local else None,
            **(local_only if local else {}),
        )
    finally:
        if shield:
            signal.signal(signal.SIGINT, previous)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    return local


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
