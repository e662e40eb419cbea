"""Scale: the same short training job at a small and a large number of rows, memory and start-up side by side.

    python benchmarks/scale_bench.py [--sizes 100000,1000000 | --quick]

For every size, generates seeded instruction rows (`prepare_bench.generate`) into a JSONL file and
runs, in a fresh subprocess each (so one size's driver memory does not carry into the next, and
each gets a fresh embedded Ray), `sft_ray.train.driver.train(cfg)`: the tiny offline model
(`sft_ray.tiny_model.build_tiny_model`), max_length 512, packing on, 2 CPU workers, 3 steps of 4
rows per worker, no eval, no samples. It measures:

- preparation rows/s and tokens/s: rows read and tokens of the train split over the manifest's
  `seconds` (the pipeline's own build time: reading, encoding, packing, writing; not Ray's start
  or the tokenizer load). The time around `prepare` as the driver calls it is shown too.
- driver peak RSS: VmHWM of the subprocess (/proc/self/status at the end: the kernel's exact
  peak, imports and Ray's client included; Ray's daemons are other processes, not counted), and
  the peak of its anonymous part (RssAnon, sampled).
- per-worker peak RSS: the Ray Train worker processes (descendants of the subprocess whose
  /proc/PID/cmdline, which Ray sets to the actor's title, contains "RayTrainWorker": seen as
  `ray::RayTrainWorker.init_train_context`, then `ray::RayTrainWorker`), sampled every 0.5 s
  from /proc/PID/status: VmHWM (the kernel's peak, exact up to the last sample before the worker
  exits) and the peaks of RssAnon (the process's own heap: what grows with data held in
  Python/Arrow), RssFile (memory-mapped files: page cache the kernel can drop) and RssShmem
  (pages of Ray's shared object store the worker has mapped; shared, not the worker's own). The
  largest other `ray::` process (Ray Data's actors, the train controller) is shown too.
- seconds from start to the first step: from just before `train(cfg)` to the "time" of the first
  record of `<storage>/<name>/metrics.jsonl`, which rank 0 writes in `on_log` right after step 1
  (logging_steps=1): so it ends when the first optimizer step has finished. Split into Ray's
  start, `prepare`, reading the prepared splits, and `fit` up to that first step, by timing the
  driver's own calls (wrapped in the subprocess; no project code changes); "train workers up" is
  when the sampler first saw a worker process (to within 0.5 s).

Prints a table, one column per size and the ratios largest/smallest next to the targets
(per-worker peak RSS ratio <= 1.2; driver peak RSS < 1 GiB at the largest size, meant for 1M rows)
and, last, one JSON line with every number. Starts Ray: run it alone on the machine
(`flock /tmp/sft-ray-ray.lock python benchmarks/scale_bench.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_bench import generate  # noqa: E402

MAX_LENGTH = 512
WORKERS = 2
STEPS = 3
BATCH = 4
SAMPLE_S = 0.5
WORKER_TITLE = "RayTrainWorker"
STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
GIB = 2**30
TARGET_WORKER_RATIO = 1.2
TARGET_DRIVER_BYTES = GIB


# ---------------------------------------------------------------- the subprocess: one size


def _status(pid: int | str) -> dict[str, int]:
    """Memory fields of /proc/PID/status in bytes ({} once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in STATUS_KEYS:
                    out[key] = int(value.split()[0]) * 1024  # kB
    except OSError:
        return {}
    return out


class MemorySampler(threading.Thread):
    """Every SAMPLE_S: this process's memory, and every Ray Train worker's and other `ray::` process's."""

    def __init__(self):
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.driver: dict[str, int] = {}
        self.workers: dict[int, dict] = {}  # pid -> peaks, titles seen, first seen
        self.others: dict[int, dict] = {}
        self.samples = 0

    @staticmethod
    def _peak(into: dict, status: dict) -> None:
        for k, v in status.items():
            into[k] = max(into.get(k, 0), v)

    @staticmethod
    def _descendants() -> list[int]:
        """This process's descendants: its embedded Ray's daemons and workers, not another Ray on the machine."""
        parent = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
        me, out = os.getpid(), []
        for pid in parent:
            p, hops = parent[pid], 0
            while p > 1 and p != me and hops < 64:
                p, hops = parent.get(p, 0), hops + 1
            if p == me:
                out.append(pid)
        return out

    def sample(self) -> None:
        self._peak(self.driver, _status("self"))
        for entry in self._descendants():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if not title.startswith("ray::") and WORKER_TITLE not in title:
                continue
            status = _status(entry)
            if not status:
                continue
            group = self.workers if WORKER_TITLE in title else self.others
            rec = group.setdefault(int(entry), {"peak": {}, "titles": [], "first_seen": time.time()})
            self._peak(rec["peak"], status)
            if title not in rec["titles"]:
                rec["titles"].append(title)
        self.samples += 1

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join()


def _config(data: str, model: str, storage_path: str):
    from sft_ray.config import validate

    return validate(
        {
            "name": "scale",
            "model": {"path": model, "dtype": "float32"},
            "data": {"train": [{"path": data, "format": "instruction"}], "max_length": MAX_LENGTH, "packing": True},
            "train": {
                "max_steps": STEPS,
                "per_device_batch_size": BATCH,
                "logging_steps": 1,
                "save_steps": 100,
                "samples": 0,
            },
            "scaling": {"num_workers": WORKERS},
            "storage": {"path": storage_path},
        }
    )


def child(spec: dict) -> dict:
    """One size: `driver.train(cfg)` with its phases timed and its memory sampled."""
    os.environ.pop("RAY_ADDRESS", None)  # always an embedded local Ray, never someone's cluster
    from sft_ray import storage
    from sft_ray.train import driver
    from sft_ray.train.final import run_dir

    cfg = _config(spec["data"], spec["model"], spec["storage"])
    marks: dict[str, float] = {}
    manifest: dict = {}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            marks[f"{name}_start"] = time.time()
            out = fn(*args, **kwargs)
            marks[f"{name}_end"] = time.time()
            if name == "prepare":
                manifest.update(out[1])
            return out

        return wrapper

    # train() looks these up in the driver module at call time: wrapping them there times its phases.
    # A phase whose function the driver no longer has is reported as "-".
    for name in ("ensure_ray", "prepare", "fit"):
        if callable(getattr(driver, name, None)):
            setattr(driver, name, timed(name, getattr(driver, name)))

    def between(a: str, b: str) -> float | None:
        return marks[b] - marks[a] if a in marks and b in marks else None

    sampler = MemorySampler()
    sampler.sample()
    sampler.start()
    t0 = time.time()
    summary = driver.train(cfg)
    end = time.time()
    sampler.sample()
    sampler.stop()
    driver_hwm = _status("self").get("VmHWM", 0)

    metrics_uri = storage.join(run_dir(cfg), "metrics.jsonl")
    records = []
    if storage.exists(metrics_uri):
        fs, path = storage.filesystem(metrics_uri)
        with fs.open_input_stream(path) as f:
            records = [json.loads(x) for x in f.read().decode().splitlines() if x.strip()]
    first = next((r for r in records if r.get("step", 0) >= 1 and "loss" in r), None)

    import ray

    ray.shutdown()
    train = manifest["splits"]["train"]
    return {
        "rows": spec["rows"],
        "steps": summary.get("global_step"),
        "prepare": {
            "rows_read": train["rows_read"],
            "rows_written": train["rows_written"],
            "tokens": train["tokens"],
            "packed_rows": manifest["layout"]["rows"],
            "real_fraction": manifest["layout"]["real_fraction"],
            "manifest_seconds": manifest["seconds"],
            "rows_per_s": train["rows_read"] / manifest["seconds"],
            "tokens_per_s": train["tokens"] / manifest["seconds"],
            "call_seconds": between("prepare_start", "prepare_end"),
        },
        "seconds": {
            "ray_start": between("ensure_ray_start", "ensure_ray_end"),
            "to_prepare_start": marks["prepare_start"] - t0 if "prepare_start" in marks else None,
            "prepare": between("prepare_start", "prepare_end"),
            "fit_to_first_step": first["time"] - marks["fit_start"] if first and "fit_start" in marks else None,
            "to_first_step": first["time"] - t0 if first else None,
            "total": end - t0,
        },
        "driver": {"peak_rss": driver_hwm, "peak_sampled": sampler.driver},
        "workers": [
            {"pid": pid, **rec["peak"], "titles": rec["titles"], "first_seen_s": rec["first_seen"] - t0}
            for pid, rec in sorted(sampler.workers.items())
        ],
        "largest_other": max(
            ({"pid": pid, **rec["peak"], "titles": rec["titles"]} for pid, rec in sampler.others.items()),
            key=lambda r: r.get("VmHWM", 0),
            default=None,
        ),
        "samples": sampler.samples,
    }


# ---------------------------------------------------------------- the parent: every size, the table


def run_size(n: int, model: Path, work: Path) -> dict:
    data = work / f"rows-{n}.jsonl"
    t0 = time.perf_counter()
    gen = generate(data, n)
    gen_s = time.perf_counter() - t0
    print(f"{n} rows: generated {gen['words']} words, {gen['bytes'] / 2**20:.1f} MiB in {gen_s:.1f}s; training")
    sys.stdout.flush()
    spec = {"rows": n, "data": str(data), "model": str(model), "storage": str(work / f"runs-{n}")}
    result_path = work / f"result-{n}.json"
    log_path = work / f"log-{n}.txt"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec), str(result_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text().splitlines()[-60:]
        raise SystemExit(f"{n} rows: the training subprocess failed (exit {rc}); its last lines:\n" + "\n".join(tail))
    result = json.loads(result_path.read_text())
    result["generate"] = {"seconds": gen_s, "bytes": gen["bytes"], "words": gen["words"]}
    result["subprocess_wall_s"] = wall
    for p in (data, result_path):  # the large sizes take disk: free it before the next one
        p.unlink()
    import shutil

    shutil.rmtree(spec["storage"], ignore_errors=True)
    print(f"{n} rows: done in {wall:.0f}s")
    return result


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.3f}"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _worker_peak(r: dict, key: str) -> int | None:
    vals = [w.get(key, 0) for w in r["workers"]]
    return max(vals) if vals else None


def report(results: list[dict], load: tuple[float, float]) -> dict:
    small, large = results[0], results[-1]
    cols = [f"{r['rows']} rows" for r in results]

    def ratio(a, b):
        return a / b if a is not None and b else None

    lines: list[tuple[str, list, str, str]] = []  # label, values (formatted), ratio, target

    def row(label: str, get, fmt, target: str = "", with_ratio: bool = True) -> None:
        vals = [get(r) for r in results]
        rat = ratio(vals[-1], vals[0]) if with_ratio else None
        lines.append((label, [fmt(v) for v in vals], _fmt(rat, ".2f") + "x" if with_ratio else "", target))

    row("prepare: rows/s", lambda r: r["prepare"]["rows_per_s"], lambda v: _fmt(v, ".0f"))
    row("prepare: tokens/s", lambda r: r["prepare"]["tokens_per_s"], lambda v: _fmt(v, ".0f"))
    row("prepare: seconds (manifest)", lambda r: r["prepare"]["manifest_seconds"], lambda v: _fmt(v, ".1f"))
    row("prepare: seconds (call)", lambda r: r["prepare"]["call_seconds"], lambda v: _fmt(v, ".1f"))
    row("prepare: tokens", lambda r: r["prepare"]["tokens"], lambda v: _fmt(v, "d"))
    row("prepare: packed rows", lambda r: r["prepare"]["packed_rows"], lambda v: _fmt(v, "d"))
    row("prepare: real tokens %", lambda r: 100 * r["prepare"]["real_fraction"], lambda v: _fmt(v, ".2f"))
    row("s: Ray start", lambda r: r["seconds"]["ray_start"], lambda v: _fmt(v, ".1f"))
    row(
        "s: start to train workers up",
        lambda r: min((w["first_seen_s"] for w in r["workers"]), default=None),
        lambda v: _fmt(v, ".1f"),
    )
    row("s: fit to first step", lambda r: r["seconds"]["fit_to_first_step"], lambda v: _fmt(v, ".1f"))
    row("s: start to first step", lambda r: r["seconds"]["to_first_step"], lambda v: _fmt(v, ".1f"))
    row("s: train() total", lambda r: r["seconds"]["total"], lambda v: _fmt(v, ".1f"))
    row(
        "driver peak RSS GiB",
        lambda r: r["driver"]["peak_rss"],
        _gib,
        f"< {TARGET_DRIVER_BYTES / GIB:g} GiB at largest",
    )
    row("driver peak RssAnon GiB", lambda r: r["driver"]["peak_sampled"].get("RssAnon"), _gib)
    row("worker peak RSS GiB (max)", lambda r: _worker_peak(r, "VmHWM"), _gib, f"ratio <= {TARGET_WORKER_RATIO}")
    row("worker peak RssAnon GiB (max)", lambda r: _worker_peak(r, "RssAnon"), _gib)
    row("worker peak RssFile GiB (max)", lambda r: _worker_peak(r, "RssFile"), _gib)
    row("worker peak RssShmem GiB (max)", lambda r: _worker_peak(r, "RssShmem"), _gib)
    row(
        "workers seen (peak RSS GiB each)",
        lambda r: "/".join(_gib(w.get("VmHWM")) for w in r["workers"]) or "-",
        str,
        with_ratio=False,
    )
    row("largest other ray:: peak RSS GiB", lambda r: (r["largest_other"] or {}).get("VmHWM"), _gib)

    width = max(14, *(len(c) + 2 for c in cols), *(len(v) + 2 for _, vals, _, _ in lines for v in vals))
    print()
    print(
        f"sizes {', '.join(str(r['rows']) for r in results)}; max_length {MAX_LENGTH}, packing on, {WORKERS} CPU "
        f"workers, {STEPS} steps of {BATCH} rows per worker; {os.cpu_count()} CPUs; load average before/after "
        f"{load[0]}/{load[1]}"
    )
    head = f"{'':34}" + "".join(f"{c:>{width}}" for c in cols) + f"{'ratio':>9}  target"
    print(head)
    for label, vals, rat, target in lines:
        print(f"{label:34}" + "".join(f"{v:>{width}}" for v in vals) + f"{rat:>9}  {target}")
    worker_ratio = ratio(_worker_peak(large, "VmHWM"), _worker_peak(small, "VmHWM"))
    anon_ratio = ratio(_worker_peak(large, "RssAnon"), _worker_peak(small, "RssAnon"))
    driver_peak = large["driver"]["peak_rss"]
    print(
        f"ratios {large['rows']}/{small['rows']} rows. Targets: per-worker peak RSS ratio {_fmt(worker_ratio, '.2f')}x "
        f"(RssAnon {_fmt(anon_ratio, '.2f')}x; target <= {TARGET_WORKER_RATIO}x); driver peak RSS at "
        f"{large['rows']} rows {_gib(driver_peak)} GiB (target < {TARGET_DRIVER_BYTES / GIB:g} GiB, set for 1M rows)"
    )
    print(
        "start to first step: from just before driver.train(cfg) to the 'time' of the first metrics.jsonl record "
        "(rank 0, written right after optimizer step 1); worker RSS: VmHWM of processes titled "
        f"{', '.join(sorted({t for r in results for w in r['workers'] for t in w['titles']})) or '-'}"
    )
    return {
        "bench": "scale",
        "sizes": [r["rows"] for r in results],
        "max_length": MAX_LENGTH,
        "workers": WORKERS,
        "steps": STEPS,
        "per_device_batch_size": BATCH,
        "cpus": os.cpu_count(),
        "load_average_before_after": load,
        "results": [_rounded(r) for r in results],
        "ratios": {
            "rows": large["rows"] / small["rows"],
            "prepare_rows_per_s": _round(ratio(large["prepare"]["rows_per_s"], small["prepare"]["rows_per_s"])),
            "prepare_tokens_per_s": _round(ratio(large["prepare"]["tokens_per_s"], small["prepare"]["tokens_per_s"])),
            "driver_peak_rss": _round(ratio(driver_peak, small["driver"]["peak_rss"])),
            "worker_peak_rss": _round(worker_ratio),
            "worker_peak_rss_anon": _round(anon_ratio),
            "to_first_step_s": _round(ratio(large["seconds"]["to_first_step"], small["seconds"]["to_first_step"])),
        },
        "targets": {
            "worker_peak_rss_ratio_max": TARGET_WORKER_RATIO,
            "driver_peak_rss_bytes_below": TARGET_DRIVER_BYTES,
        },
        "met": {
            "worker_peak_rss_ratio": worker_ratio is not None and worker_ratio <= TARGET_WORKER_RATIO,
            "driver_peak_rss": driver_peak < TARGET_DRIVER_BYTES,
        },
    }


def _round(x):
    return None if x is None else round(x, 3)


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_rounded(v) for v in d]
    return round(d, 3) if isinstance(d, float) else d


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        result = child(json.loads(argv[1]))
        Path(argv[2]).write_text(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated row counts (default 100000,1000000)")
    p.add_argument("--quick", action="store_true", help="smoke run: --sizes 2000,20000")
    args = p.parse_args(argv)
    sizes = sorted(int(x) for x in ("2000,20000" if args.quick else args.sizes).split(","))
    if len(sizes) < 2:
        p.error("give at least two sizes: the ratios are largest/smallest")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = Path(tmp)
        from sft_ray.tiny_model import build_tiny_model

        model = build_tiny_model(work / "model")
        results = [run_size(n, model, work) for n in sizes]
    summary = report(results, (round(load_before, 2), round(os.getloadavg()[0], 2)))
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
