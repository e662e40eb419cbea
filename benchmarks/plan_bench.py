"""`sft-ray plan` against measured memory on a model large enough to count: a 62M-parameter Llama
(246 MiB in float32: hidden 1024, 4 layers, MLP 4096), LoRA under fsdp on 2 CPU workers.

    python benchmarks/plan_bench.py [--steps 4]

Trains twice, each in a fresh subprocess with its own embedded Ray: once as users run it, once
with glibc's mmap threshold fixed at 1 MiB in the workers (MALLOC_MMAP_THRESHOLD_, read by glibc
when a process starts). The second run shows what the first one's memory is made of: glibc
raises its mmap threshold after a large block is freed, so FSDP's all-gather copies (a decoder
layer's weights, 60 MiB here, gathered and freed again in every step) are then served from the
heap, which fragments and is not given back; RSS grows over the steps beyond what is live.
Fixing the threshold keeps RSS at the live memory, at a cost in step time (measured 2026-12-01 in
a plain 12-step FSDP loop on this model: peak 856 against 1128 MiB, 28.3 against 23.0 s).

Prints, for each run, the plan's total and each rank's peak RSS (ru_maxrss, what the run logs as
peak_memory_mb) with the plan's error, and the seconds of training. Starts Ray: run it alone on
the machine (`flock /tmp/sft-ray-ray.lock python benchmarks/plan_bench.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [{"question": f"What is {i} plus one?", "output": f"{i + 1}"} for i in range(64)]


def one_run(spec: dict) -> dict:
    """In the subprocess: build the model, train under fsdp, return the plan and the peaks."""
    from sft_ray.config import validate
    from sft_ray.plan import estimate, peak
    from sft_ray.tiny_model import build_tiny_model
    from sft_ray.train.driver import train

    tmp = Path(spec["tmp"])
    model = build_tiny_model(tmp / "mid", hidden_size=1024, num_hidden_layers=4, intermediate_size=4096)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = validate(
        {
            "name": "mid",
            "model": {"path": str(model), "dtype": "float32"},
            "data": {"train": [{"path": str(data), "format": "instruction"}], "max_length": 128},
            "lora": {"dropout": 0.0},
            "train": {"per_device_batch_size": 4, "max_steps": spec["steps"], "logging_steps": 1, "samples": 0},
            "scaling": {"num_workers": 2, "strategy": "fsdp"},
            "storage": {"path": str(tmp / "storage")},
        }
    )
    started = time.time()
    summary = train(cfg)
    return {
        "plan_mib": peak(estimate(cfg, "fsdp")) / 2**20,
        "peaks_mib": {s["rank"]: s["peak_memory_mb"] for s in summary["data_shares"]},
        "seconds": time.time() - started,
        "model_mib": (model / "model.safetensors").stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_run(json.loads(args.child))), flush=True)
        return
    results = {}
    fixed = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
    for label, env in (("default allocator", {}), ("MALLOC_MMAP_THRESHOLD_=1048576", fixed)):
        with tempfile.TemporaryDirectory() as tmp:
            spec = json.dumps({"tmp": tmp, "steps": args.steps})
            # The embedded Ray's workers inherit the driver's environment, so the variable reaches them.
            out = subprocess.run(
                [sys.executable, __file__, "--child", spec],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{label}: the run failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            results[label] = json.loads(line[len("RESULT ") :])
    model = next(iter(results.values()))["model_mib"]
    print(f"62M-parameter Llama ({model:.0f} MiB float32), LoRA, fsdp, 2 CPU workers, {args.steps} steps")
    print(f"{'run':34} {'plan MiB':>9} {'rank 0':>8} {'rank 1':>8} {'error':>14} {'train s':>8}")
    for label, r in results.items():
        peaks = {int(k): v for k, v in r["peaks_mib"].items()}
        errors = [(r["plan_mib"] - peaks[k]) / peaks[k] for k in (0, 1)]
        err = f"{min(errors):+.0%} / {max(errors):+.0%}"
        print(f"{label:34} {r['plan_mib']:9.0f} {peaks[0]:8.0f} {peaks[1]:8.0f} {err:>14} {r['seconds']:8.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
