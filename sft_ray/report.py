"""A one-page HTML report of a run folder: loss and learning-rate plots, data, throughput, samples.

It reads only files, so it works on a finished run, on one still training (whatever exists is
shown, whatever is missing is named) and on a copy of a run folder on a laptop.
"""

from __future__ import annotations

import html
import io
import json
import os
import uuid
from pathlib import Path

from sft_ray import storage

# The metrics.jsonl keys the report uses; any other key is ignored.
SERIES = (
    "loss",
    "eval_loss",
    "learning_rate",
    "epoch",
    "trained_tokens_per_s",
    "real_tokens_fraction",
    "peak_memory_mb",
)

# Shown in the throughput table, so left out of the final-metrics table.
_THROUGHPUT_KEYS = ("tokens_per_second", "train_runtime_s", "tokens_seen")

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px;
                   max-width: 260px; overflow-wrap: anywhere; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
.missing { background: #fff4e5; border-left: 4px solid #f0a030; padding: .5em 1em; }
img { max-width: 100%; }
"""


def load_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Series by key from `metrics.jsonl`, sorted by step.

    A resumed run logs again the steps after its last checkpoint, so the last line for a
    (step, key) wins. A run still training may be caught mid-append: an unterminated last line
    that does not parse is skipped, any other bad line is an error.
    """
    path = storage.join(run_dir, "metrics.jsonl")
    fs, where = storage.filesystem(path)
    with fs.open_input_stream(where) as f:
        text = f.read().decode()
    lines = text.split("\n")
    by_key: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: a write in progress
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        for key in SERIES:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key.setdefault(key, {})[row["step"]] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (a browser refreshing the page) never see a half-written file."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _plot(path: Path, lines: dict[str, list[tuple[int, float]]], ylabel: str, title: str) -> None:
    # A bare Figure (no pyplot) renders with Agg and never touches the process-wide backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=100)
    ax = fig.add_subplot()
    for label, points in lines.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _write_atomic(path, buf.getvalue())


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{int(value):,}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none"
    return str(value)


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td class=num>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _lengths(bins: list[dict]) -> str:
    """A length histogram as `from-to: rows` for the bins that hold rows."""
    return ", ".join(f"{b['from']}-{b['to']}: {b['rows']}" for b in bins if b["rows"]) or "none"


def _data_section(manifest: dict | None) -> str:
    if manifest is None:
        return "<p class=missing>final/data_manifest.json is missing: no data statistics.</p>"
    splits = {  # the file list (one entry per chunk) is for the workers, not the reader
        name: {
            **{k: v for k, v in stats.items() if k != "files"},
            "length_histogram": _lengths(stats.get("length_histogram") or []),
        }
        for name, stats in manifest.get("splits", {}).items()
    }
    columns: list[str] = []
    for stats in splits.values():
        columns += [k for k in stats if k not in columns]
    head = "<tr><th>split</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td class=num>{html.escape(_fmt(stats.get(c)))}</td>" for c in columns)
        + "</tr>"
        for name, stats in splits.items()
    )
    return f"<table>{head}{body}</table>"


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    minutes, secs = divmod(int(seconds), 60)
    return f"{seconds:.1f} s ({minutes // 60}:{minutes % 60:02d}:{secs:02d})"


def _throughput_section(summary: dict | None, series: dict[str, list[tuple[int, float]]]) -> str:
    def last(key):
        return series[key][-1][1] if series.get(key) else None

    summary = summary or {}
    rows = [
        ("tokens/s (whole run)", summary.get("tokens_per_second")),
        ("training runtime", _duration(summary.get("train_runtime_s"))),
        ("tokens seen", summary.get("tokens_seen")),
        ("trained tokens/s (last logged)", last("trained_tokens_per_s")),
        ("real tokens fraction (last logged)", last("real_tokens_fraction")),
        ("peak memory MB (max logged)", max((v for _, v in series.get("peak_memory_mb", [])), default=None)),
    ]
    rows = [(k, v) for k, v in rows if v is not None]
    return _table(rows) if rows else "<p>Nothing recorded yet.</p>"


def _samples_section(samples: dict | None) -> str:
    if samples is None:
        return "<p class=missing>final/samples.json is missing: no sample generations.</p>"
    parts = []
    for key, what in (("eos_share", "ended with EOS"), ("exact_share", "were the reference exactly")):
        got = [(k, samples.get(f"{key}_{k}")) for k in ("before", "after")]
        if any(v is not None for _, v in got):
            shares = ", ".join(f"{k}: {'n/a' if v is None else f'{v:.0%}'}" for k, v in got)
            parts.append(f"<p>Generations that {what}: {html.escape(shares)}</p>")
    cols = ("prompt", "reference", "before", "after")
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(s.get(c, '')))}</td>" for c in cols) + "</tr>"
        for s in samples.get("samples", [])
    )
    parts.append(f"<table class=samples>{head}{body}</table>")
    return "".join(parts)


def write_report(run_dir: str) -> Path:
    """Write `RUN_DIR/report/` (loss.png, learning_rate.png, index.html) and return that folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    runs = sorted(p.name for p in run.iterdir() if (p / "metrics.jsonl").is_file() or (p / "final").is_dir())
    if runs and not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run} holds runs ({', '.join(runs)}), it is not one: give {run}/<name>")
    final = run / "final"
    out = run / "report"
    out.mkdir(exist_ok=True)

    missing = []
    series = load_metrics(str(run)) if (run / "metrics.jsonl").is_file() else {}
    if not (run / "metrics.jsonl").is_file():
        missing.append("metrics.jsonl (no training step logged yet)")
    if not final.is_dir():
        missing.append("final/ (the run is still training, or stopped before it finished)")
    summary = _read_json(final / "metrics.json")
    samples = _read_json(final / "samples.json")
    manifest = _read_json(final / "data_manifest.json")
    config = (final / "config.yaml").read_text() if (final / "config.yaml").is_file() else None
    if final.is_dir():
        wanted = {"metrics.json": summary, "samples.json": samples, "config.yaml": config}
        missing += [f"final/{name}" for name, got in wanted.items() if got is None]

    plots = []
    if series.get("loss") or series.get("eval_loss"):
        lines = {"train loss": series.get("loss", []), "eval loss": series.get("eval_loss", [])}
        _plot(out / "loss.png", lines, "loss", "Loss")
        plots.append("loss.png")
    if series.get("learning_rate"):
        _plot(
            out / "learning_rate.png",
            {"learning rate": series["learning_rate"]},
            "learning rate",
            "Learning rate",
        )
        plots.append("learning_rate.png")

    steps = [s for points in series.values() for s, _ in points]
    status = f"last logged step {max(steps)}" if steps else "no step logged"
    if series.get("epoch"):
        status += f", epoch {series['epoch'][-1][1]:.2f}"
    final_rows = [
        (k, v)
        for k, v in (summary or {}).items()
        if k not in _THROUGHPUT_KEYS and (v is None or isinstance(v, (int, float, str)))
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sft-ray report: {html.escape(run.name)}</title>
<style>{_CSS}</style></head><body>
<h1>sft-ray run <code>{html.escape(run.name)}</code></h1>
<p>{html.escape(str(run.resolve()))} &middot; {html.escape(status)}</p>
{"".join(f"<p class=missing>Missing: {html.escape(m)}</p>" for m in missing)}
<h2>Final metrics</h2>
{_table(final_rows) if final_rows else "<p>None yet: final/metrics.json is written when training ends.</p>"}
<h2>Throughput</h2>
{_throughput_section(summary, series)}
<h2>Curves</h2>
{"".join(f'<p><img src="{p}" alt="{p}"></p>' for p in plots) or "<p>No loss logged yet.</p>"}
<h2>Data</h2>
{_data_section(manifest)}
<h2>Sample generations</h2>
{_samples_section(samples)}
<h2>Config</h2>
{f"<pre>{html.escape(config)}</pre>" if config is not None else "<p>final/config.yaml is missing.</p>"}
</body></html>
"""
    _write_atomic(out / "index.html", page.encode())  # last, so every image it names exists
    return out
