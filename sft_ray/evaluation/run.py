"""`sft-ray eval`, driver side: prepare the sets, stream them through a Ray Data pool of model
replicas (sft_ray/evaluation/replica.py), write each set's rows and summary whole.

Layout: `<storage.path>/<name>/eval/<set>/` with `examples.parquet` and `examples.jsonl` (one row
per example: prompt, reference, base and tuned outputs, per-example metrics) and `summary.json`.
The driver holds the sets' token ids (what the replicas are sent), never their answers: rows are
written and summed as they arrive.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sft_ray import storage
from sft_ray.config import Config, DatasetSource
from sft_ray.console import verbose
from sft_ray.evaluation import metrics
from sft_ray.train.final import run_dir

REPLICA_START_S = 900  # for every replica of the pool to load its model


class EvalError(ValueError):
    """An evaluation that cannot run; the message names the flag, key or file."""


@dataclass
class EvalSet:
    name: str
    role: str  # "held_out" or "retention" (flagged when the tuned model does worse than the base)
    source: str
    formats: list[str]
    prepared: str
    manifest: dict
    split: str


def _held_out(cfg: Config) -> EvalSet:
    """The config's eval split, from the training preparation itself (the same cache)."""
    from sft_ray.data.pipeline import prepare

    prepared, manifest = prepare(cfg)
    if not manifest["splits"]["eval"]["rows_written"]:
        raise EvalError(
            f"{cfg.name}: the config has no eval data (data.eval or data.eval_fraction): give a set with --data PATH"
        )
    formats = sorted({s.format for s in cfg.data.eval or cfg.data.train})
    return EvalSet("eval", "held_out", "data.eval" if cfg.data.eval else "data.eval_fraction", formats, prepared,
                   manifest, "eval")  # fmt: skip


def _file_set(cfg: Config, path: str, fmt: str, role: str, flag: str) -> EvalSet:
    """A set from a file (any supported format), prepared like training data but unpacked: the
    config with this file as its only train source, nothing carved out."""
    from sft_ray.data.pipeline import prepare

    if "://" not in path and os.path.exists(path):
        path = str(Path(path).resolve())
    try:
        source = DatasetSource(path=path, format=fmt)
    except ValueError as err:
        raise EvalError(f"{flag} {path}: {err}") from None
    from sft_ray.data.errors import DataError

    data = cfg.data.model_copy(update={"train": [source], "eval": [], "eval_fraction": 0.0, "packing": False})
    try:
        prepared, manifest = prepare(cfg.model_copy(update={"data": data}))
    except (DataError, FileNotFoundError) as err:  # its messages say "train split": here it is this set
        raise EvalError(f"{flag} {path}: {err}") from None
    name = Path(path.rstrip("/")).name.split(".")[0] or role
    return EvalSet(name, role, path, [fmt], prepared, manifest, "train")


def _tuned_dir(cfg: Config, which: str) -> str:
    from sft_ray.export import find_checkpoint

    try:
        return str(find_checkpoint(run_dir(cfg), which))
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(f"--checkpoint {which}: {err}") from None


def evaluate(
    cfg: Config,
    data: str | None = None,
    fmt: str = "instruction",
    checkpoint: str = "final",
    retention: str | None = None,
    retention_format: str = "instruction",
) -> list[dict]:
    """Base against tuned on the held-out set (the config's eval split, or `data`) and on
    `retention`; returns each set's summary (also in `eval/<set>/summary.json`)."""
    from sft_ray.ray_runtime import ensure_ray

    storage.check_writable(cfg.storage.path)
    tuned = _tuned_dir(cfg, checkpoint)
    sets = [_file_set(cfg, data, fmt, "held_out", "--data") if data else _held_out(cfg)]
    if retention:
        sets.append(_file_set(cfg, retention, retention_format, "retention", "--retention"))
    names = [s.name for s in sets]
    for i, s in enumerate(sets):  # two files of one name (eval.jsonl twice): the second is eval-2
        if names.count(s.name) > 1 and names.index(s.name) != i:
            s.name = f"{s.name}-{i + 1}"
    ensure_ray()
    return _run(cfg, tuned, sets)


def _examples(sets: list[EvalSet]):
    import pyarrow as pa

    from sft_ray.evaluation.examples import read

    tables = [read(s.prepared, s.manifest, s.split, s.name) for s in sets]
    for s, t in zip(sets, tables):
        if t.num_rows == 0:
            raise EvalError(
                f"{s.source}: no example to evaluate in set {s.name}: no row has a prompt before a trained span "
                "(text rows are trained whole: there is nothing to answer)"
            )
    return pa.concat_tables(tables)


def _replicas(cfg: Config, examples: int) -> int:
    import ray

    want = cfg.eval.replicas or cfg.scaling.num_workers
    kind = "GPU" if cfg.scaling.use_gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if have < 1:
        raise EvalError(f"scaling.use_gpu={cfg.scaling.use_gpu}: this Ray has no {kind} for a model replica")
    return max(1, min(want, examples, have))


def _run(cfg: Config, tuned: str, sets: list[EvalSet]) -> list[dict]:
    import pyarrow as pa
    import ray

    from sft_ray.evaluation.replica import Replica, VllmReplica

    table = _examples(sets)
    replicas = _replicas(cfg, table.num_rows)
    size = min(cfg.eval.batch_size, math.ceil(table.num_rows / replicas))  # a small set still reaches every replica
    blocks = [table.slice(i, size) for i in range(0, table.num_rows, size)]
    print(
        f"eval: {table.num_rows} examples in {len(sets)} set(s) ({', '.join(s.name for s in sets)}), "
        f"base and tuned ({tuned}) on {replicas} model replica(s)",
        flush=True,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Every replica loads its model before the first batch goes out; otherwise the first one ready
    # takes a small set whole. A pool the cluster cannot start fails (GetTimeoutError) instead of waiting for ever.
    waited = ctx.wait_for_min_actors_s
    # From the driver's table, not read tasks: a read task asks for a whole CPU, which the replicas
    # may all hold (a hang on a cluster of one-CPU nodes).
    ds = ray.data.from_arrow(blocks).map_batches(
        VllmReplica if cfg.eval.engine == "vllm" else Replica,
        fn_constructor_kwargs={
            "config": cfg.model_dump(mode="json"),
            "tuned_dir": tuned,
            "formats": {s.name: s.formats for s in sets},
            "loud": verbose(),
        },
        batch_size=size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
        **({"num_gpus": 1} if cfg.scaling.use_gpu else {"num_cpus": 1}),
    )
    start, first = time.time(), None  # first: when the first batch came back, and its rows
    with tempfile.TemporaryDirectory(prefix="sft-ray-eval-") as tmp:
        out = {s.name: _Writer(os.path.join(tmp, s.name), cfg.eval.max_new_tokens) for s in sets}
        try:
            ctx.wait_for_min_actors_s = REPLICA_START_S
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                first = first or (time.time(), batch.num_rows)
                for name in set(batch.column("set").to_pylist()):
                    rows = batch.filter(pa.compute.equal(batch.column("set"), name))
                    out[name].add(rows)
        except ray.exceptions.GetTimeoutError as err:
            raise EvalError(
                f"eval.replicas: {replicas} model replicas did not all start and load the model within "
                f"{REPLICA_START_S} s ({err}); the cluster may lack room for them (lower eval.replicas or add nodes), "
                "or the model takes longer to download and load"
            ) from None
        finally:
            ctx.wait_for_min_actors_s = waited
        timing = _timing(start, first, time.time(), table.num_rows)
        summaries = []
        for s in sets:
            summary = out[s.name].close(_meta(cfg, s, tuned, timing))
            storage.publish_dir(out[s.name].folder, storage.join(run_dir(cfg), "eval", s.name))
            summaries.append(summary)
    return summaries


def _timing(start: float, first: tuple[float, int] | None, end: float, total: int) -> dict:
    """Of the whole pool, all sets together: `seconds` from the first batch asked for to the last,
    `start_seconds` until the first came back (the replicas load their models first), and the rate
    after it (what more examples would run at)."""
    timing = {"seconds": round(end - start, 2), "examples_per_second": total / (end - start)}
    if first is not None:
        after = end - first[0]
        timing.update(
            start_seconds=round(first[0] - start, 2),
            examples_per_second_after_start=(total - first[1]) / after if after > 0 and total > first[1] else None,
        )
    return timing


def _meta(cfg: Config, s: EvalSet, tuned: str, timing: dict) -> dict:
    e = cfg.eval
    return {
        "set": s.name,
        "role": s.role,
        "source": s.source,
        "formats": s.formats,
        "base_model": cfg.model.path,
        "tuned_weights": tuned,  # the folder the tuned answers came from
        "generation": {
            "engine": e.engine,
            "max_new_tokens": e.max_new_tokens,
            "temperature": e.temperature,
            "seed": e.seed,
        },  # fmt: skip
        **timing,
    }


class _Writer:
    """One set's rows to Parquet and JSONL in a local folder, summed as they come."""

    def __init__(self, folder: str, budget: int):
        os.makedirs(folder)
        self.folder, self.parquet, self.totals, self.replicas = folder, None, metrics.Totals(), set()
        self.budget, self.over_budget = budget, 0  # references longer than eval.max_new_tokens
        self.jsonl = open(os.path.join(folder, "examples.jsonl"), "w")

    def add(self, rows) -> None:
        import pyarrow.parquet as pq

        self.parquet = self.parquet or pq.ParquetWriter(os.path.join(self.folder, "examples.parquet"), rows.schema)
        self.parquet.write_table(rows)
        for row in rows.to_pylist():
            self.jsonl.write(json.dumps(row) + "\n")
            self.totals.add(row)
            self.replicas.add(row["replica"])
            self.over_budget += row["reference_tokens"] > self.budget

    def close(self, meta: dict) -> dict:
        self.jsonl.close()
        if self.parquet is not None:
            self.parquet.close()
        summary = {**meta, "examples": self.totals.n, "replicas": sorted(self.replicas), **self.totals.summary()}
        summary["references_over_budget"] = self.over_budget  # their answers are cut: never an exact match
        found = (
            metrics.regressions(summary["base"], summary["tuned"], summary["changed"])
            if meta["role"] == "retention"
            else []
        )
        summary.update(regressions=found, regressed=bool(found), line=metrics.describe(found))
        storage.write_json(os.path.join(self.folder, "summary.json"), summary)
        return summary


def format_summary(s: dict) -> str:
    """The console table of one set: base and tuned side by side."""

    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    def num(x):
        return "n/a" if x is None else f"{x:.4g}"

    rows = [
        ("exact match", pct), ("normalized match", pct), ("reference contained", pct), ("turn-end adherence", pct),
        ("output tokens", num), ("reference loss", num), ("perplexity", num),
    ]  # fmt: skip
    keys = [*metrics.RATES, "output_tokens", "loss", "perplexity"]
    role = "retention" if s["role"] == "retention" else "held out"
    lines = [
        f"\n=== sft-ray eval: {s['set']} ({s['examples']} examples, {role}) ===",
        f"{'':22}{'base':>10}{'tuned':>10}",
    ]
    for (label, f), key in zip(rows, keys):
        lines.append(f"{label:22}{f(s['base'][key]):>10}{f(s['tuned'][key]):>10}")
    if s["role"] == "retention":
        lines.append(f"retention: {s['line']}" + ("  << REGRESSED" if s["regressed"] else ""))
    if s.get("references_over_budget"):
        lines.append(
            f"note: {s['references_over_budget']} references are longer than eval.max_new_tokens="
            f"{s['generation']['max_new_tokens']}: those answers are cut and cannot match exactly"
        )
    return "\n".join(lines)
