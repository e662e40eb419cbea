"""Training throughput: a 1-worker Ray Train run against plain TRL in one process, and packing against padding.

    python benchmarks/train_bench.py [--steps N | --quick]

Builds an offline Llama with the tiny tokenizer but wider and deeper than `sft-ray tiny-model`
(hidden 256, 4 layers, ~3.5M parameters: a step is mostly matrix products, not Python overhead),
generates seeded instruction rows whose lengths spread from about 20 tokens to past `max_length`
(log-normal, long tail; the longest are truncated), prepares them once with packing off and once
with packing on (`sft_ray.data.pipeline.prepare`), then measures, in one run on this machine:

- Ray: `sft_ray.train.driver.train(cfg)` with `scaling.num_workers=1`, padded and packed. Its
  worker logs `trained_tokens_per_s` for every logging window to `<storage>/<name>/metrics.jsonl`.
  Then the padded run again through `driver.fit(..., worker_cpus=<all CPUs>)`: Ray sets the
  worker's OMP_NUM_THREADS to its CPUs, so torch uses every core.
- plain: TRL `SFTTrainer` in a fresh process without Ray, on the parquet rows the Ray run trained
  on, with the same model, LoRA config, collator (`make_collator`), `SFTConfig`
  (`sft_ray.train.worker._sft_config`), filler rows (`even_out`), batch size and steps. Once with
  one torch thread (what the Ray worker gets: Ray sets OMP_NUM_THREADS to the worker's 1 CPU) and
  once with torch's default (all cores).
- flattened: the plain run on packed rows flattened padding-free into one sequence per batch, the
  layout the worker uses only with flash attention (`make_collator(..., flatten_packed=True)`); on
  SDPA and eager attention packed rows stay a [batch, max_length] tensor with restarting position ids.

Trained tokens/s = label tokens (labels != -100) of the training steps / seconds inside the steps
(HF's on_step_begin to on_step_end: forward, backward, clipping, optimizer; not data loading,
logging, evaluation, saving or start-up), counted with `TokenCounter` around `training_step`,
the worker's own way. The Ray worker reports a rate per logging window; a run's rate is its
trained tokens over the sum of its windows' step seconds (the windows' token counts come from
the plain run, which trains the same batches: checked with TRL's cumulative `num_tokens` at
every log). "wall" rates divide the same tokens by the time from the first log to the last one,
so they include data loading and everything done at each log.

The machine may be shared: for every run the trainer process's CPU time and run-queue wait
(/proc schedstat) and the cores other processes used are sampled too, so a run slowed by others
shows as "queued" time and "others" load rather than as a slower trainer.

Prints two tables and, last, one JSON line with every number. Starts Ray: run it alone,
`flock /tmp/sft-ray-ray.lock python benchmarks/train_bench.py`.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MAX_LENGTH = 256
BATCH = 8
LOGGING_STEPS = 10
SEED = 1234
HIDDEN, LAYERS, INTERMEDIATE = 256, 4, 688


# ---------------------------------------------------------------- model and data


def generate(path: Path, n: int, max_length: int, seed: int = SEED) -> None:
    """Instruction rows of about 20 tokens to past `max_length` tokens (log-normal, median ~0.27 x
    max_length, so ~4% are longer than max_length and get truncated); half have an input."""
    from sft_ray.tiny_model import _WORDS

    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + "."

    with open(path, "w") as f:
        for _ in range(n):
            total = int(rng.lognormvariate(math.log(0.27 * max_length), 0.8))
            body = max(8, min(int(1.3 * max_length), total) - 14)  # ~14 tokens of headers, BOS, EOS, dots
            q = max(2, int(body * rng.uniform(0.1, 0.3)))
            i = int(body * rng.uniform(0.2, 0.4)) if rng.random() < 0.5 else 0
            o = max(1, body - q - i)
            f.write(json.dumps({"question": text(q), "input": text(i) if i else "", "output": text(o)}) + "\n")


def _config(name: str, model: Path, data: Path, storage: Path, packing: bool, steps: int):
    from sft_ray.config import validate

    return validate(
        {
            "name": name,
            "model": {"path": str(model), "dtype": "float32"},
            "data": {
                "train": [{"path": str(data), "format": "instruction"}],
                "max_length": MAX_LENGTH,
                "packing": packing,
            },
            "train": {
                "max_steps": steps,
                "per_device_batch_size": BATCH,
                "logging_steps": LOGGING_STEPS,
                "save_steps": 10**6,  # no checkpoint: saving is not what is measured
                "samples": 0,
            },
            "scaling": {"num_workers": 1},
            "storage": {"path": str(storage)},
        }
    )


# ---------------------------------------------------------------- what else ran (machine noise)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _ray_worker() -> int | None:
    """The RayTrainWorker started by this process's Ray (another Ray on the machine has its own)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if not f.read().startswith(b"ray::RayTrainWorker"):
                    continue
            pid = int(entry)
            while pid > 1 and pid != os.getpid():
                pid = _ppid(pid)
            if pid == os.getpid():
                return int(entry)
        except OSError:
            continue
    return None


class Sampler(threading.Thread):
    """Every 0.2 s: one process's CPU time and run-queue wait (all its threads, /proc schedstat) and the
    busy time of the whole machine, so that a run slowed by other processes can be told apart from
    a run that does more work. Linux only."""

    def __init__(self, find):
        super().__init__(daemon=True)
        self.find, self.pid, self.samples, self.done = find, None, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.pid = self.pid or self.find()
            if self.pid is None:
                continue
            try:
                cpu = wait = 0
                for tid in os.listdir(f"/proc/{self.pid}/task"):
                    with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                        c, w, _ = map(int, f.read().split())
                    cpu, wait = cpu + c, wait + w
                with open("/proc/stat") as f:
                    ticks = [int(x) for x in f.readline().split()[1:8]]
            except (OSError, ValueError):  # the process ended, or a thread did while being read
                continue
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
            self.samples.append((time.time(), cpu / 1e9, wait / 1e9, busy))

    def stop(self) -> list:
        self.done.set()
        self.join()
        return self.samples


def _load(samples: list, logs: list[dict]) -> dict:
    """Per step between the first and the last log: the trainer process's CPU ms and run-queue wait
    ms, and the cores other processes kept busy meanwhile."""
    if len(logs) < 2 or len(samples) < 2:
        return {}
    a = min(samples, key=lambda s: abs(s[0] - logs[0]["time"]))
    b = min(samples, key=lambda s: abs(s[0] - logs[-1]["time"]))
    steps, wall = logs[-1]["step"] - logs[0]["step"], b[0] - a[0]
    cpu, wait, busy = (b[i] - a[i] for i in (1, 2, 3))
    return {
        "cpu_ms_per_step": 1000 * cpu / steps,
        "runq_ms_per_step": 1000 * wait / steps,
        "others_cores": max(0.0, busy - cpu) / wall,
    }


# ---------------------------------------------------------------- the plain run (a child process)


def plain_run(spec: dict) -> dict:
    """TRL SFTTrainer in this process, set up as the Ray worker sets it up, minus Ray."""
    t_start = time.perf_counter()
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from sft_ray.config import Config
    from sft_ray.model import load_model, load_tokenizer, lora_config
    from sft_ray.train.callbacks import TokenCounter, count_packed_rows_in_num_tokens
    from sft_ray.train.collate import make_collator
    from sft_ray.train.shards import even_out
    from sft_ray.train.worker import _sft_config

    datasets.disable_progress_bars()
    cfg = Config.model_validate(spec["config"])
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_model(cfg, device)
    files = sorted(glob.glob(os.path.join(spec["prepared"], "train", "*.parquet")))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    cols = [c for c in ("input_ids", "labels", "seq_lengths") if c in table.column_names]
    bs = cfg.train.per_device_batch_size
    train_ds = even_out(datasets.Dataset(table.select(cols)), -(-table.num_rows // bs) * bs, tokenizer.pad_token_id)
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(cfg, spec["output_dir"], device, has_eval=False, resumed=False),
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        data_collator=make_collator(tokenizer.pad_token_id, flatten_packed=spec["collator"] == "flattened"),
    )
    counter = TokenCounter()
    trainer.training_step = counter.wrap(trainer.training_step)
    count_packed_rows_in_num_tokens(trainer)

    class StepClock(TrainerCallback):
        """The worker's RunCallback clock (on_step_begin to on_step_end), kept per step."""

        def __init__(self):
            self.steps, self.logs, self.begin, self.before = [], [], 0.0, [0, 0, 0]

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin, self.before = time.time(), list(counter.totals)

        def on_step_end(self, args, state, control, **kwargs):
            delta = [a - b for a, b in zip(counter.totals, self.before)]
            self.steps.append({"step": state.global_step, "seconds": time.time() - self.begin, "tokens": delta})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append({"step": state.global_step, "time": time.time(), **logs})

    clock = StepClock()
    trainer.callback_handler.callbacks.insert(0, clock)
    setup_s = time.perf_counter() - t_start
    result = trainer.train()
    return {
        "threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "train_runtime_s": result.metrics["train_runtime"],
        "steps": clock.steps,
        "logs": clock.logs,
    }


def run_plain(name: str, prepared: str, cfg, work: Path, threads: int | None, collator: str = "sft_ray") -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "prepared": prepared,
        "output_dir": str(work / f"plain-{name}"),
        "collator": collator,
    }
    spec_path, out_path, log_path = (work / f"plain-{name}.{x}" for x in ("spec.json", "json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"  # as in the Ray runtime env
    start = time.perf_counter()
    with open(log_path, "w") as log:
        cmd = [sys.executable, __file__, "--plain", str(spec_path), str(out_path)]
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(lambda: child.pid)
        sampler.start()
        child.wait()
        samples = sampler.stop()
    if child.returncode:
        sys.exit(f"plain run {name} failed (exit {child.returncode}); its log:\n{log_path.read_text()[-4000:]}")
    out = json.loads(out_path.read_text())
    out["process_s"] = time.perf_counter() - start
    out["load"] = _load(samples, out["logs"])
    return out


# ---------------------------------------------------------------- the Ray run


def run_ray(cfg, worker_cpus: int | None = None) -> dict:
    """`train(cfg)`, the user's path; with `worker_cpus`, the same run through `fit` with that many CPUs."""
    from sft_ray.data.pipeline import prepare
    from sft_ray.train.driver import fit, train

    sampler = Sampler(_ray_worker)
    sampler.start()
    start = time.perf_counter()
    if worker_cpus is None:
        summary = train(cfg)
    else:
        prepared, manifest = prepare(cfg)  # reuses the earlier preparation
        summary = fit(cfg, prepared, manifest, worker_cpus=worker_cpus).return_value
    fit_s = time.perf_counter() - start
    samples = sampler.stop()
    lines = Path(cfg.storage.path, cfg.name, "metrics.jsonl").read_text().splitlines()
    logs = [r for r in map(json.loads, lines) if "loss" in r]
    return {
        "fit_s": fit_s,
        "summary_trained_tokens_per_second": summary["trained_tokens_per_second"],
        "logs": logs,
        "load": _load(samples, logs),
    }


# ---------------------------------------------------------------- numbers


def _windows(steps: list[dict]) -> list[dict]:
    """Per logging window: trained/real/computed tokens and step seconds."""
    out: dict[int, dict] = {}
    for s in steps:
        w = out.setdefault((s["step"] - 1) // LOGGING_STEPS, {"tokens": [0, 0, 0], "seconds": 0.0, "steps": 0})
        w["tokens"] = [a + b for a, b in zip(w["tokens"], s["tokens"])]
        w["seconds"] += s["seconds"]
        w["steps"] += 1
    return [out[k] for k in sorted(out)]


def _wall(logs: list[dict], windows: list[dict], seconds: list[float]) -> dict:
    """From the first log to the last (windows 2..N): trained tokens per second of wall time, and the ms
    per step spent outside the steps (data loading, logging, callbacks' on_log)."""
    if len(logs) < 2:
        return {"wall_tokens_per_s": None, "outside_ms_per_step": None}
    span, steps = logs[-1]["time"] - logs[0]["time"], logs[-1]["step"] - logs[0]["step"]
    return {
        "wall_tokens_per_s": sum(w["tokens"][0] for w in windows[1:]) / span,
        "outside_ms_per_step": 1000 * (span - sum(seconds[1:])) / steps,
    }


def _loss_gap(a: list[float], b: list[float]) -> float | None:
    """Largest difference between two runs' logged losses (same batches, same seed: ~0)."""
    return max(abs(x - y) for x, y in zip(a, b)) if a and len(a) == len(b) else None


def plain_numbers(run: dict) -> dict:
    wins = _windows(run["steps"])
    trained, real, computed = (sum(w["tokens"][i] for w in wins) for i in range(3))
    busy = sum(w["seconds"] for w in wins)
    return {
        "threads": run["threads"],
        "steps": len(run["steps"]),
        "trained_tokens": trained,
        "real_fraction": real / computed,
        "step_seconds": busy,
        "ms_per_step": 1000 * busy / len(run["steps"]),
        "median_step_ms": 1000 * statistics.median(s["seconds"] for s in run["steps"]),
        "trained_tokens_per_s": trained / busy,
        "mean_window_rate": statistics.mean(w["tokens"][0] / w["seconds"] for w in wins),
        **_wall(run["logs"], wins, [w["seconds"] for w in wins]),
        "setup_s": run["setup_s"],
        "process_s": run["process_s"],
        "train_runtime_s": run["train_runtime_s"],
        "num_tokens": [r["num_tokens"] for r in run["logs"]],
        "loss": [round(r["loss"], 4) for r in run["logs"]],
        "windows": wins,
        **run["load"],
    }


def ray_numbers(run: dict, same_batches: dict, threads: str) -> dict:
    """Ray's window rates turned into seconds with the token counts of the plain run on the same batches."""
    logs = run["logs"]
    rates = [r["trained_tokens_per_s"] for r in logs]
    out = {
        "threads": threads,
        "steps": logs[-1]["step"],
        "mean_window_rate": statistics.mean(rates),
        "summary_trained_tokens_per_second": run["summary_trained_tokens_per_second"],
        "real_fraction": statistics.mean(r["real_tokens_fraction"] for r in logs),
        "fit_s": run["fit_s"],
        "num_tokens": [r["num_tokens"] for r in logs],
        "loss": [round(r["loss"], 4) for r in logs],
        **run["load"],
    }
    wins = same_batches["windows"]
    out["same_batches_as_plain"] = out["num_tokens"] == same_batches["num_tokens"] and len(wins) == len(rates)
    if out["same_batches_as_plain"]:
        busy = sum(w["tokens"][0] / r for w, r in zip(wins, rates))
        trained = sum(w["tokens"][0] for w in wins)
        out.update(
            trained_tokens=trained,
            step_seconds=busy,
            ms_per_step=1000 * busy / out["steps"],
            trained_tokens_per_s=trained / busy,
            **_wall(logs, wins, [w["tokens"][0] / r for w, r in zip(wins, rates)]),
        )
    else:  # cannot split the time by window: fall back to the mean of the window rates
        out.update(trained_tokens_per_s=out["mean_window_rate"], wall_tokens_per_s=None)
    out["loss_gap_to_plain"] = _loss_gap(out["loss"], same_batches["loss"])
    return out


def numbers(plain: dict, ray_runs: dict, manifests: dict) -> dict:
    """Every number the tables and the JSON line show, from the runs' raw records."""
    r = {name: plain_numbers(run) for name, run in plain.items()}
    r["ray_padded"] = ray_numbers(ray_runs[False], r["plain_padded_1t"], "1")
    r["ray_packed"] = ray_numbers(ray_runs[True], r["plain_packed_1t"], "1")
    r["ray_padded_all_threads"] = ray_numbers(ray_runs["threads"], r["plain_padded_1t"], str(os.cpu_count()))
    for packing, key in ((False, "layout_padded"), (True, "layout_packed")):
        manifest = manifests[packing]
        r[key] = {k: manifest["layout"][k] for k in ("rows", "real_tokens", "computed_tokens", "real_fraction")}
    split = manifests[False]["splits"]["train"]
    r["data"] = {
        "rows": split["rows_kept"],
        "mean_tokens": split["tokens"] / split["rows_kept"],
        "truncated": split["rows_truncated"],
        "trained_fraction": split["trained_fraction"],
        "histogram": [h["rows"] for h in split["length_histogram"]],
    }
    r["ratio_ray_plain"] = r["ray_padded"]["trained_tokens_per_s"] / r["plain_padded_1t"]["trained_tokens_per_s"]
    r["ratio_ray_plain_default"] = (
        r["ray_padded"]["trained_tokens_per_s"] / r["plain_padded_default"]["trained_tokens_per_s"]
    )
    wall = r["ray_padded"].get("wall_tokens_per_s")
    r["ratio_ray_plain_wall"] = wall / r["plain_padded_1t"]["wall_tokens_per_s"] if wall else None
    cpu = r["ray_padded"].get("cpu_ms_per_step"), r["plain_padded_1t"].get("cpu_ms_per_step")
    r["ratio_ray_plain_cpu"] = cpu[1] / cpu[0] if all(cpu) else None
    r["ratio_ray_all_threads_plain_default"] = (
        r["ray_padded_all_threads"]["trained_tokens_per_s"] / r["plain_padded_default"]["trained_tokens_per_s"]
    )
    r["ratio_packing_ray"] = r["ray_packed"]["trained_tokens_per_s"] / r["ray_padded"]["trained_tokens_per_s"]
    r["ratio_packing_plain"] = (
        r["plain_packed_1t"]["trained_tokens_per_s"] / r["plain_padded_1t"]["trained_tokens_per_s"]
    )
    r["loss_gap_rows_flattened"] = _loss_gap(r["plain_packed_flat_1t"]["loss"], r["plain_packed_1t"]["loss"])
    r["ratio_packing_flattened_plain"] = (
        r["plain_packed_flat_1t"]["trained_tokens_per_s"] / r["plain_padded_1t"]["trained_tokens_per_s"]
    )
    return r


# ---------------------------------------------------------------- report


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def print_tables(r: dict) -> None:
    ray_pad, ray_pack = r["ray_padded"], r["ray_packed"]
    print()
    print(f"1. Ray Train (1 worker) vs plain TRL, padded batches of {BATCH}, {ray_pad['steps']} steps")
    head = f"{'':34}{'threads':>8}{'trained tok':>12}{'ms/step':>8}{'tok/s':>7}{'Ray/this':>9}"
    head += f"{'wall tok/s':>11}{'outside ms':>11}{'CPU ms/step':>12}{'queued ms':>10}{'others':>7}"
    print(head)
    rows = [
        ("Ray, train(cfg)", ray_pad),
        (f"Ray, worker_cpus={os.cpu_count()}", r["ray_padded_all_threads"]),
        ("plain SFTTrainer, 1 thread", r["plain_padded_1t"]),
        ("plain SFTTrainer, default threads", r["plain_padded_default"]),
    ]
    for name, n in rows:
        ratio = ray_pad["trained_tokens_per_s"] / n["trained_tokens_per_s"]
        line = f"{name:34}{n['threads']:>8}{_fmt(n.get('trained_tokens'), 'd', 12)}"
        line += f"{_fmt(n.get('ms_per_step'), '.1f', 8)}"
        line += f"{n['trained_tokens_per_s']:>7.0f}{ratio:>9.3f}{_fmt(n.get('wall_tokens_per_s'), '.0f', 11)}"
        line += f"{_fmt(n.get('outside_ms_per_step'), '.1f', 11)}"
        line += f"{_fmt(n.get('cpu_ms_per_step'), '.1f', 12)}{_fmt(n.get('runq_ms_per_step'), '.1f', 10)}"
        line += f"{_fmt(n.get('others_cores'), '.2f', 7)}"
        print(line)
    print(
        "(ms/step, tok/s: inside the steps; wall: from the first log to the last; outside ms: per step, spent "
        "outside the steps in that span (data loading, logging, on_log callbacks); CPU ms/step: the trainer "
        "process's CPU in that span, all threads; queued: its threads' run-queue wait; others: cores that "
        "other processes kept busy meanwhile)"
    )
    print(
        f"Ray / plain, both 1 thread (what Ray gives the worker): {r['ratio_ray_plain']:.3f} (target >= 0.95); "
        f"wall: {_fmt(r['ratio_ray_plain_wall'], '.3f', 0)}; by process CPU per step (insensitive to other "
        f"load): {_fmt(r['ratio_ray_plain_cpu'], '.3f', 0)}"
    )
    print(
        f"Ray / plain with torch's default threads: {r['ratio_ray_plain_default']:.3f}; "
        f"Ray with worker_cpus={os.cpu_count()} / the same: {r['ratio_ray_all_threads_plain_default']:.3f}"
    )
    print(
        f"same batches in both (TRL num_tokens at every log): {ray_pad['same_batches_as_plain']}, largest "
        f"loss difference at a log: {_fmt(ray_pad['loss_gap_to_plain'], '.1e', 0)}; mean of window "
        f"rates: Ray {ray_pad['mean_window_rate']:.0f} (train() summary's trained_tokens_per_second: "
        f"{ray_pad['summary_trained_tokens_per_second']}), plain {r['plain_padded_1t']['mean_window_rate']:.0f}"
    )
    print(
        f"start-up: Ray train() {ray_pad['fit_s']:.1f}s end to end (steps {ray_pad.get('step_seconds', 0):.1f}s); "
        f"plain process {r['plain_padded_1t']['process_s']:.1f}s (setup {r['plain_padded_1t']['setup_s']:.1f}s, "
        f"steps {r['plain_padded_1t']['step_seconds']:.1f}s)"
    )
    print()
    print(f"2. Packing vs padding, {ray_pack['steps']} steps of {BATCH} rows, max_length {MAX_LENGTH}")
    head = f"{'':44}{'rows':>6}{'real tok':>10}{'computed':>10}{'real % (manifest)':>18}{'real % (metrics)':>17}"
    head += f"{'tok/s':>9}{'vs padded':>10}{'others':>7}"
    print(head)
    lay_pad, lay_pack = r["layout_padded"], r["layout_packed"]
    rows = [
        ("Ray, padding (packing: false)", lay_pad, ray_pad, ray_pad),
        ("Ray, packing (packing: true)", lay_pack, ray_pack, ray_pad),
        ("plain 1 thread, padding", lay_pad, r["plain_padded_1t"], r["plain_padded_1t"]),
        ("plain 1 thread, packing", lay_pack, r["plain_packed_1t"], r["plain_padded_1t"]),
        ("plain 1 thread, packing, flattened (flash)", lay_pack, r["plain_packed_flat_1t"], r["plain_padded_1t"]),
    ]
    for name, lay, n, base in rows:
        line = f"{name:44}{lay['rows']:>6}{lay['real_tokens']:>10}{lay['computed_tokens']:>10}"
        line += f"{lay['real_fraction']:>18.1%}{n['real_fraction']:>17.1%}"
        line += f"{n['trained_tokens_per_s']:>9.0f}{n['trained_tokens_per_s'] / base['trained_tokens_per_s']:>9.2f}x"
        line += f"{_fmt(n.get('others_cores'), '.2f', 7)}"
        print(line)
    print(
        f"packing / padding through Ray: {r['ratio_packing_ray']:.2f}x (target >= 1.5x); "
        f"plain path: {r['ratio_packing_plain']:.2f}x; flattened into one sequence (the flash-attention "
        f"layout): {r['ratio_packing_flattened_plain']:.2f}x (largest loss difference to rows at a log: "
        f"{_fmt(r['loss_gap_rows_flattened'], '.1e', 0)})"
    )
    pad, pack, flat = r["plain_padded_1t"], r["plain_packed_1t"], r["plain_packed_flat_1t"]
    print(
        f"plain step time: padded {pad['ms_per_step']:.0f} ms for {pad['trained_tokens'] / pad['steps']:.0f} "
        f"trained tok/step; packed {pack['ms_per_step']:.0f} ms as rows, {flat['ms_per_step']:.0f} ms "
        f"flattened, for {pack['trained_tokens'] / pack['steps']:.0f}"
    )


def _rounded(v):
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items() if k not in ("windows", "num_tokens", "loss")}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return round(v, 4) if isinstance(v, float) else v


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help=f"training steps per run, a multiple of {LOGGING_STEPS}")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 steps")
    p.add_argument("--plain", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.plain:
        result = plain_run(json.loads(Path(args.plain[0]).read_text()))
        Path(args.plain[1]).write_text(json.dumps(result))
        return
    steps = 20 if args.quick else args.steps
    started = time.perf_counter()
    if steps % LOGGING_STEPS:
        p.error(f"--steps must be a multiple of {LOGGING_STEPS}")
    os.environ.pop("RAY_ADDRESS", None)  # always an embedded local Ray, never someone's cluster
    os.environ.pop("OMP_NUM_THREADS", None)  # Ray then sets it to each worker's CPUs
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        from sft_ray.tiny_model import build_tiny_model

        model = build_tiny_model(work / "model", SEED, HIDDEN, LAYERS, INTERMEDIATE)
        data = work / "rows.jsonl"
        generate(data, max(600, steps * BATCH * 4), MAX_LENGTH)
        storage = work / "storage"
        cfgs = {
            p: _config(f"bench-{'packed' if p else 'padded'}", model, data, storage, p, steps) for p in (False, True)
        }

        from sft_ray.data.pipeline import prepare
        from sft_ray.ray_runtime import ensure_ray

        ensure_ray()
        prepared = {packing: prepare(cfg) for packing, cfg in cfgs.items()}
        ray_runs = {packing: run_ray(cfg) for packing, cfg in cfgs.items()}
        threads_cfg = cfgs[False].model_copy(update={"name": "bench-padded-threads"})
        ray_runs["threads"] = run_ray(threads_cfg, worker_cpus=os.cpu_count())
        import ray

        ray.shutdown()  # the plain runs get the machine without Ray

        plain = {
            "plain_padded_1t": run_plain("padded-1t", prepared[False][0], cfgs[False], work, threads=1),
            "plain_padded_default": run_plain("padded-default", prepared[False][0], cfgs[False], work, threads=None),
            "plain_packed_1t": run_plain("packed-1t", prepared[True][0], cfgs[True], work, threads=1),
            "plain_packed_flat_1t": run_plain("packed-flat-1t", prepared[True][0], cfgs[True], work, 1, "flattened"),
        }
    load_after = os.getloadavg()

    r = numbers(plain, ray_runs, {p: m for p, (_, m) in prepared.items()})
    d = r["data"]
    print(
        f"\ndata: {d['rows']} rows, mean {d['mean_tokens']:.0f} tokens, {d['truncated']} truncated at {MAX_LENGTH}, "
        f"{d['trained_fraction']:.0%} of tokens trained; rows per length bin of {MAX_LENGTH // 8}: {d['histogram']}; "
        f"{os.cpu_count()} CPUs; model: Llama hidden {HIDDEN}, {LAYERS} layers, LoRA defaults (r=8 on q,k,v,o)"
    )
    print(
        "load average (1/5/15 min) before: "
        + "/".join(f"{x:.2f}" for x in load_before)
        + ", after: "
        + "/".join(f"{x:.2f}" for x in load_after)
    )
    print_tables(r)
    print(f"benchmark wall time {time.perf_counter() - started:.0f}s")
    summary = {"bench": "train", "steps": steps, "batch": BATCH, "max_length": MAX_LENGTH, "cpus": os.cpu_count()}
    summary["model"] = {"hidden": HIDDEN, "layers": LAYERS, "intermediate": INTERMEDIATE}
    summary["load_average_before_after"] = [round(load_before[0], 2), round(load_after[0], 2)]
    summary.update(_rounded(r))
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
