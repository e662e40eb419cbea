"""A one-page HTML report of a run folder (or a sweep's), written for people: what changed,
whether the loss curves show a warning sign, how fast it ran, what the data was, samples.

It reads only files, so it works on a finished run, on one still training (whatever exists is
shown, whatever is missing is named) and on a copy of a run folder on a laptop. Run folders in
object storage (`s3://bucket/runs/demo`) are read and the report written next to them
(`.../report/`) through the same storage layer as training (pyarrow filesystems).
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import pyarrow.fs as pafs

from sft_ray import storage
from sft_ray.diagnose import diagnose

# The metrics.jsonl keys the report uses; any other key is ignored.
SERIES = (
    "loss",
    "eval_loss",
    "eval_exact_match",  # eval.exact_match_rows: the share of held-out answers that are exact, per evaluation
    "learning_rate",
    "epoch",
    "trained_tokens_per_s",
    "real_tokens_fraction",
    "peak_memory_mb",
)

# final/metrics.json keys shown in their own places (before/after, the run table, the diagnosis);
# any other scalar key lands in "Other numbers", its name in words.
_SHOWN_KEYS = {
    "global_step",
    "eval_loss_before",
    "eval_loss_after",
    "train_loss_first",
    "train_loss_last",
    "tokens_per_second",
    "trained_tokens_per_second",
    "train_runtime_s",
    "tokens_seen",
    "eos_share_before",
    "eos_share_after",
    "exact_share_before",
    "exact_share_after",
}

# Manifest split statistics in words, in the order shown; other keys are shown with `_` as spaces.
_DATA_WORDS = {
    "rows_read": "rows read",
    "rows_kept": "rows kept",
    "rows_dropped": "rows dropped",
    "rows_written": "rows written",
    "rows_truncated": "rows cut to max length",
    "examples": "examples",
    "tokens": "tokens",
    "trained_tokens": "trained tokens",
    "trained_fraction": "trained share of tokens",
    "length_histogram": "lengths (tokens: rows)",
}
_DATA_HIDDEN = {
    "files",  # the file list (one entry per chunk) is for the workers, not the reader
    "extra_turn_examples",
    "extra_turn_tokens",
    "turns_truncated_away",
    "written_tokens",
    "computed_tokens",
}

_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } .sub { color: #666; margin-top: 0; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 1.4em 0 .3em; } h4 { font-size: 1em; margin: 1em 0 .2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .35em .7em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.change td.better { color: #1a7f37; } table.change td.worse { color: #b42318; }
table.samples td { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px;
                   max-width: 260px; overflow-wrap: anywhere; }
tr.best td, tr.best th { background: #eef8ee; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
.box { border-left: 4px solid; padding: .5em 1em; margin: .6em 0; border-radius: 2px; }
.warn { background: #fff4e5; border-color: #f0a030; } .ok { background: #eef8ee; border-color: #2da44e; }
.note { background: #f3f4f6; border-color: #9aa0a6; }
.box b { display: block; } .box ul { margin: .3em 0 0; padding-left: 1.3em; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots img { max-width: 100%; width: 540px; }
"""


# --- storage ------------------------------------------------------------------------------------


def _info(uri: str) -> pafs.FileInfo:
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path)


def _is_file(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.File


def _is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def _children(uri: str) -> list[str]:
    """Names of the folders directly in `uri`."""
    fs, path = storage.filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, NotADirectoryError):
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _read_text(uri: str) -> str | None:
    if not _is_file(uri):
        return None
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _read_json(uri: str) -> dict | None:
    text = _read_text(uri)
    return None if text is None else json.loads(text)


def load_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Series by key from `metrics.jsonl`, sorted by step.

    A resumed run logs again the steps after its last checkpoint, so the last line for a
    (step, key) wins. A run still training may be caught mid-append: an unterminated last line
    that does not parse is skipped, any other bad line is an error.
    """
    path = storage.join(storage.absolute(run_dir), "metrics.jsonl")
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


def _png(lines: dict[str, list[tuple[int, float]]], ylabel: str, title: str, legend_size: int = 9) -> bytes:
    # A bare Figure (no pyplot) renders with Agg and never touches the process-wide backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    for label, points in lines.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Tick labels that read alone (2.0e-04), not a `1e-4` multiplier in the corner.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if 0 < abs(v) < 1e-2 else f"{v:g}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- numbers in words -----------------------------------------------------------------------------


def short(x: float) -> str:
    """14930 -> 14.9k, 2_100_000 -> 2.1M, 812.5 -> 812, 0.0123 -> 0.0123."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}" if abs(x) >= 100 or float(x).is_integer() else f"{x:.3g}"


def _loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    # A perplexity can be exp(700): past a trillion its size is all that matters.
    return "n/a" if x is None else short(x) if abs(x) < 1e12 else "over 1000B"


def clock(seconds: float | None) -> str | None:
    """3725.5 -> 1:02:05; 10.5 -> 10.5 s."""
    if seconds is None:
        return None
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _words(key: str) -> str:
    return key.replace("_", " ")


def _value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return short(value)
    if isinstance(value, dict):
        return ", ".join(f"{_words(str(k))}: {_value(v)}" for k, v in value.items()) or "none"
    return str(value)


def _esc(x) -> str:
    return html.escape(str(x))


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td class=num>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


# --- sections -------------------------------------------------------------------------------------


def _change_row(what: str, before, after, fmt, lower_is_better: bool | None) -> str:
    """`lower_is_better` None: a change without a direction (e.g. answer length), not coloured."""
    cls, delta = "", ""
    if before is not None and after is not None and after != before:
        if lower_is_better is not None:
            cls = " better" if (after < before) == lower_is_better else " worse"
        if fmt is _pct:
            delta = f"{(after - before) * 100:+.0f} points"
        elif before:
            delta = f"{(after - before) / abs(before):+.0%}"
    return (
        f"<tr><th>{_esc(what)}</th><td class=num>{_esc(fmt(before))}</td>"
        f"<td class=num>{_esc(fmt(after))}</td><td class='num{cls}'>{_esc(delta)}</td></tr>"
    )


def _before_after(summary: dict | None, samples: dict | None, n_samples: int) -> str:
    s = {**(samples or {}), **(summary or {})}
    rows = []
    if s.get("eval_loss_before") is not None or s.get("eval_loss_after") is not None:
        rows.append(_change_row("eval loss", s.get("eval_loss_before"), s.get("eval_loss_after"), _loss, True))
    if s.get("train_loss_first") is not None:
        rows.append(
            _change_row(
                "train loss (first → last logged)", s.get("train_loss_first"), s.get("train_loss_last"), _loss, True
            )
        )
    of = f" (of {n_samples} held-out prompts)" if n_samples else ""
    if s.get("exact_share_after") is not None:
        rows.append(
            _change_row(f"exact answers{of}", s.get("exact_share_before"), s.get("exact_share_after"), _pct, False)
        )
    if s.get("eos_share_after") is not None:
        rows.append(
            _change_row(f"stops on its own{of}", s.get("eos_share_before"), s.get("eos_share_after"), _pct, False)
        )
    if not rows:
        return "<p>Nothing yet: final/metrics.json is written when training ends.</p>"
    head = "<tr><th></th><th>before training</th><th>after training</th><th>change</th></tr>"
    return f"<table class=change>{head}{''.join(rows)}</table>"


def _run_table(summary: dict | None, series: dict) -> str:
    def last(key):
        return series[key][-1][1] if series.get(key) else None

    s = summary or {}
    peak = max((v for _, v in series.get("peak_memory_mb", [])), default=None)
    rows = [
        ("steps", s.get("global_step") and f"{s['global_step']:,}"),
        ("training time", clock(s.get("train_runtime_s"))),
        ("tokens seen", s.get("tokens_seen") and f"{short(s['tokens_seen'])} tokens"),
        ("speed (whole run)", s.get("tokens_per_second") and f"{short(s['tokens_per_second'])} tokens/s"),
        (
            "trained tokens per second (in training steps)",
            s.get("trained_tokens_per_second") and f"{short(s['trained_tokens_per_second'])} tokens/s",
        ),
        (
            "trained tokens per second (last logged)",
            last("trained_tokens_per_s") and f"{short(last('trained_tokens_per_s'))} tokens/s",
        ),
        (
            "real tokens in a batch (last logged; the rest is padding)",
            _pct(last("real_tokens_fraction")) if last("real_tokens_fraction") is not None else None,
        ),
        ("peak memory (highest logged)", peak and (f"{peak / 1024:.1f} GB" if peak >= 1024 else f"{peak:.0f} MB")),
    ]
    rows += [
        (_words(k), _value(v))
        for k, v in s.items()
        if k not in _SHOWN_KEYS and (v is None or isinstance(v, (int, float, str)))
    ]
    rows = [(k, v) for k, v in rows if v is not None]
    return _table(rows) if rows else "<p>Nothing recorded yet.</p>"


def _lengths(bins: list[dict]) -> str:
    """A length histogram as `from-to: rows` for the bins that hold rows."""
    return ", ".join(f"{b['from']}-{b['to']}: {b['rows']}" for b in bins if b["rows"]) or "none"


def _data_cell(key: str, value) -> str:
    if key == "length_histogram":
        return _lengths(value or [])
    if key == "trained_fraction":
        return _pct(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _value(value)


def _data_section(manifest: dict | None) -> str:
    if manifest is None:
        return "<p>final/data_manifest.json is missing: no data statistics.</p>"
    splits = manifest.get("splits", {})
    keys: list[str] = [k for k in _DATA_WORDS if any(k in s for s in splits.values())]
    for stats in splits.values():
        keys += [k for k in stats if k not in keys and k not in _DATA_HIDDEN]
    head = "<tr><th></th>" + "".join(f"<th>{_esc(name)}</th>" for name in splits) + "</tr>"
    body = "".join(
        f"<tr><th>{_esc(_DATA_WORDS.get(k, _words(k)))}</th>"
        + "".join(f"<td class=num>{_esc(_data_cell(k, s.get(k)) if k in s else '')}</td>" for s in splits.values())
        + "</tr>"
        for k in keys
    )
    return f"<table>{head}{body}</table>"


def _data_warnings(manifest: dict | None) -> list[str]:
    out = []
    for name, s in ((manifest or {}).get("splits") or {}).items():
        if dropped := {k: v for k, v in (s.get("rows_dropped") or {}).items() if v}:
            out.append(f"{name}: {sum(dropped.values()):,} rows dropped ({_value(dropped)})")
        if s.get("rows_truncated"):
            out.append(f"{name}: {s['rows_truncated']:,} rows cut to data.max_length")
        if s.get("rows_with_control_token_text"):
            out.append(f"{name}: {s['rows_with_control_token_text']:,} rows hold text that looks like a control token")
    return out


def _samples_section(samples: dict | None) -> str:
    if samples is None:
        return "<p>final/samples.json is missing: no sample generations.</p>"
    cols = ("prompt", "reference", "before", "after")
    head = "<tr><th>prompt</th><th>reference answer</th><th>before training</th><th>after training</th></tr>"
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(s.get(c, ''))}</td>" for c in cols) + "</tr>" for s in samples.get("samples", [])
    )
    return f"<table class=samples>{head}{body}</table>" if body else "<p>No sample generations (train.samples: 0).</p>"


def _finding_box(f: dict) -> str:
    kind = "note" if f["sign"] == "too few points" else "warn"
    tries = f"<ul><li>Try: {_esc('; '.join(f['try']))}</li></ul>" if f.get("try") else ""
    return f"<div class='box {kind}'><b>{_esc(f['sign'].capitalize())}</b>{_esc(f['summary'])}{tries}</div>"


def _top(findings: list[dict], warnings: list[str], missing: list[str], regressed: list[str]) -> str:
    parts = [_finding_box(f) for f in findings]
    if not findings:
        ok = "No warning sign in the loss curves</b>no overfitting, no stalled learning, no memorization."
        parts.insert(0, f"<div class='box ok'><b>{ok}</div>")
    if regressed:
        items = "".join(f"<li>{_esc(r)}</li>" for r in regressed)
        parts.append(f"<div class='box warn'><b>Retention regressed (see Evaluation)</b><ul>{items}</ul></div>")
    if warnings:
        items = "".join(f"<li>{_esc(w)}</li>" for w in warnings)
        parts.append(f"<div class='box warn'><b>Data warnings</b><ul>{items}</ul></div>")
    if missing:
        items = "".join(f"<li>Missing: {_esc(m)}</li>" for m in missing)
        parts.append(f"<div class='box warn'><b>Not there (yet)</b><ul>{items}</ul></div>")
    return "".join(parts)


# `sft-ray eval` summary keys, in the order shown: label, format, lower is better (None: no direction).
_EVAL_ROWS = (
    ("exact_match", "exact match", _pct, False),
    ("normalized_match", "normalized match", _pct, False),
    ("contains", "reference contained", _pct, False),
    ("turn_end", "turn-end adherence", _pct, False),
    ("output_tokens", "output tokens (mean)", _num, None),
    ("loss", "reference loss", _loss, True),
    ("perplexity", "perplexity", _num, True),
)
_EVAL_SHOWN = 5  # of summary.json's most_different examples


def _eval_sets(run: str) -> list[tuple[str, dict | None, str]]:
    """(set name, summary or None, why not) for each `eval/<set>/summary.json`, by set name.

    Only the summaries: a set's examples.parquet/.jsonl can be large and are for other tools."""
    where = storage.join(run, "eval")
    out = []
    for name in _children(where):
        try:
            summary = _read_json(storage.join(where, name, "summary.json"))
        except ValueError as err:  # bad JSON or bad UTF-8: the other sets still show
            out.append((name, None, f"eval/{name}/summary.json could not be read ({err}): skipped."))
            continue
        if summary is None:
            out.append((name, None, f"eval/{name}/summary.json is missing: skipped."))
        elif not isinstance(summary, dict):
            out.append((name, None, f"eval/{name}/summary.json is not a JSON object: skipped."))
        else:
            out.append((name, summary, ""))
    return out


def _regressed(sets: list[tuple[str, dict | None, str]]) -> list[str]:
    return [f"{name}: {s.get('line', 'regressed')}" for name, s, _ in sets if s and s.get("regressed")]


def _eval_examples(examples: list[dict]) -> str:
    head = (
        "<tr><th>prompt</th><th>reference answer</th><th>base output</th><th>tuned output</th>"
        "<th>reference loss (base → tuned)</th></tr>"
    )
    cols = ("prompt", "reference", "base_output", "tuned_output")
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_esc(e.get(c, ''))}</td>" for c in cols)
        + f"<td>{_esc(_loss(e.get('base_loss')))} → {_esc(_loss(e.get('tuned_loss')))}</td></tr>"
        for e in examples[:_EVAL_SHOWN]
    )
    return f"<table class=samples>{head}{body}</table>"


def _eval_set(name: str, s: dict) -> str:
    role = s.get("role")
    words = [
        "held out" if role == "held_out" else _words(str(role or "role not recorded")),
        f"{s['examples']:,} examples" if isinstance(s.get("examples"), int) else None,
        f"from {s['source']}" if s.get("source") else None,
    ]
    parts = [f"<h3>{_esc(name)} <small>({_esc(' · '.join(w for w in words if w))})</small></h3>"]
    if s.get("regressed"):
        parts.append(f"<div class='box warn'><b>Retention regressed</b>{_esc(s.get('line', ''))}</div>")
    elif role == "retention":
        parts.append(f"<div class='box ok'><b>Retention kept</b>{_esc(s.get('line', 'no regression'))}</div>")
    base, tuned = s.get("base") or {}, s.get("tuned") or {}
    rows = "".join(
        _change_row(label, base.get(key), tuned.get(key), fmt, lower)
        for key, label, fmt, lower in _EVAL_ROWS
        if key in base or key in tuned
    )
    head = "<tr><th></th><th>base</th><th>tuned</th><th>change</th></tr>"
    parts.append(f"<table class=change>{head}{rows}</table>" if rows else "<p>No metrics in this summary.</p>")
    if examples := [e for e in s.get("most_different") or [] if isinstance(e, dict)]:
        parts.append(f"<h4>Examples where base and tuned differ most</h4>{_eval_examples(examples)}")
    return "".join(parts)


def _eval_section(sets: list[tuple[str, dict | None, str]]) -> str:
    """`sft-ray eval`'s sets, base against tuned; empty (no heading) for a run never evaluated."""
    if not sets:
        return ""
    body = "".join(_eval_set(name, s) if s is not None else f"<p>{_esc(why)}</p>" for name, s, why in sets)
    return f"<h2>Evaluation</h2>\n{body}\n"


def _page(title: str, body: str) -> bytes:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>{_CSS}</style></head><body>
{body}
</body></html>
""".encode()


def _history(series: dict) -> dict:
    return {
        "train": [{"step": s, "loss": v} for s, v in series.get("loss", [])],
        "eval": [{"step": s, "eval_loss": v} for s, v in series.get("eval_loss", [])],
    }


# --- the pages ------------------------------------------------------------------------------------


def write_report(run_dir: str) -> Path | str:
    """Write `RUN_DIR/report/` (plots and index.html) and return that folder: a Path for a local
    run, the URI for one in object storage. A sweep's folder gets the sweep's page."""
    run = storage.absolute(run_dir)
    if not _is_dir(run):
        raise FileNotFoundError(f"{run}: no such run folder")
    if _is_dir(storage.join(run, "trials")) or _is_file(storage.join(run, "results.json")):
        return _write_sweep(run)
    has_metrics = _is_file(storage.join(run, "metrics.jsonl"))
    runs = [
        name
        for name in _children(run)
        if _is_file(storage.join(run, name, "metrics.jsonl")) or _is_dir(storage.join(run, name, "final"))
    ]
    if runs and not has_metrics:
        raise FileNotFoundError(f"{run} holds runs ({', '.join(runs)}), it is not one: give {run}/<name>")
    final, out = storage.join(run, "final"), storage.join(run, "report")
    has_final = _is_dir(final)

    missing = []
    series = load_metrics(run) if has_metrics else {}
    if not has_metrics:
        missing.append("metrics.jsonl (no training step logged yet)")
    if not has_final:
        missing.append("final/ (the run is still training, or stopped before it finished)")
    summary = _read_json(storage.join(final, "metrics.json"))
    samples = _read_json(storage.join(final, "samples.json"))
    manifest = _read_json(storage.join(final, "data_manifest.json"))
    config = _read_text(storage.join(final, "config.yaml"))
    if has_final:
        wanted = {"metrics.json": summary, "samples.json": samples, "config.yaml": config}
        missing += [f"final/{name}" for name, got in wanted.items() if got is None]

    plots = []
    if series.get("loss") or series.get("eval_loss"):
        lines = {"train loss": series.get("loss", []), "eval loss": series.get("eval_loss", [])}
        storage.write_bytes(storage.join(out, "loss.png"), _png(lines, "loss", "Loss"))
        plots.append(("loss.png", "train and eval loss over steps"))
    if series.get("learning_rate"):
        png = _png({"learning rate": series["learning_rate"]}, "learning rate", "Learning rate")
        storage.write_bytes(storage.join(out, "learning_rate.png"), png)
        plots.append(("learning_rate.png", "learning rate over steps"))

    # A summary written before the diagnosis existed, or none yet: read the curves logged so far.
    if summary and "diagnosis" in summary:
        findings = summary["diagnosis"]
    else:
        findings = diagnose(_history(series) if series else (summary or {}).get("history"))

    steps = [s for points in series.values() for s, _ in points]
    status = "finished" if summary else "training, or stopped before it finished"
    status += f" · last logged step {max(steps):,}" if steps else " · no step logged"
    if series.get("epoch"):
        status += f" · epoch {series['epoch'][-1][1]:.2f}"
    n_samples = len((samples or {}).get("samples", []))
    evals = _eval_sets(run)
    images = "".join(f'<img src="{p}" alt="{_esc(a)}">' for p, a in plots)
    images = f"<div class=plots>{images}</div>" if plots else "<p>No loss logged yet.</p>"
    config_html = (
        f"<details><summary>final/config.yaml (resolved)</summary><pre>{_esc(config)}</pre></details>"
        if config is not None
        else "<p>final/config.yaml is missing.</p>"
    )
    name = run.rstrip("/").rsplit("/", 1)[-1]
    stopping = (summary or {}).get("early_stopping")
    stopping_html = f"<p><b>Early stopping</b>: {_esc(stopping['line'])}</p>" if stopping else ""
    body = f"""<h1>Run {_esc(name)}</h1>
<p class=sub>{_esc(run)} &middot; {_esc(status)}</p>
{stopping_html}
{_top(findings, _data_warnings(manifest), missing, _regressed(evals))}
<h2>Before and after training</h2>
{_before_after(summary, samples, n_samples)}
{_eval_section(evals)}<h2>Curves</h2>
{images}
<h2>The run</h2>
{_run_table(summary, series)}
<h2>Data</h2>
{_data_section(manifest)}
<h2>Sample generations</h2>
{_samples_section(samples)}
<h2>Config</h2>
{config_html}
"""
    # Last, so every image it names exists; whole or not at all (storage.write_bytes).
    storage.write_bytes(storage.join(out, "index.html"), _page(f"sft-ray run {name}", body))
    return storage.as_path(out)


_STATUS_ORDER = {"completed": 0, "stopped early": 1, "unfinished": 2, "errored": 3}


def _trials(sweep: str, results: dict | None) -> list[dict]:
    """The sweep's trials: from results.json when it ended, else from each trial's run folder."""
    if results is not None:
        return list(results.get("trials", []))
    rows = []
    for trial_id in _children(storage.join(sweep, "trials")):
        trial_dir = storage.join(sweep, "trials", trial_id)
        metrics = load_metrics(trial_dir) if _is_file(storage.join(trial_dir, "metrics.jsonl")) else {}
        history = [(s, v) for s, v in metrics.get("eval_loss", []) if s > 0]
        config = _read_text(storage.join(trial_dir, "final", "config.yaml"))
        rows.append(
            {
                "trial_id": trial_id,
                "params": {},
                "best_eval_loss": min(v for _, v in history) if history else None,
                "steps": max(s for s, _ in history) if history else 0,
                "status": "completed" if config is not None else "running or unfinished",
                "eval_loss_history": history,
                "run_dir": trial_dir,
            }
        )
    return rows


def _trial_signs(sweep: str, row: dict) -> str:
    trial_dir = storage.join(sweep, "trials", row["trial_id"])
    summary = _read_json(storage.join(trial_dir, "final", "metrics.json"))
    if summary and "diagnosis" in summary:
        findings = summary["diagnosis"]
    elif _is_file(storage.join(trial_dir, "metrics.jsonl")):
        findings = diagnose(_history(load_metrics(trial_dir)))
    else:
        return ""
    return ", ".join(f["sign"] for f in findings if f["sign"] != "too few points") or "none"


def _param_name(key: str) -> str:
    words = {"lora.r": "LoRA rank", "lora.alpha": "LoRA alpha", "train.learning_rate": "learning rate"}
    return words.get(key, _words(key.rsplit(".", 1)[-1]))


def _param(value) -> str:
    if isinstance(value, float) and value and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.1e}"
    return _value(value) if not isinstance(value, float) else f"{value:.3g}"


def _write_sweep(sweep: str) -> Path | str:
    out = storage.join(sweep, "report")
    results = _read_json(storage.join(sweep, "results.json"))
    rows = _trials(sweep, results)
    best_id = (results or {}).get("best_trial")
    keys = list(rows[0]["params"]) if rows and rows[0].get("params") else []
    head = (
        "<tr><th>trial</th>"
        + "".join(f"<th>{_esc(_param_name(k))}</th>" for k in keys)
        + "<th>best eval loss</th><th>steps</th><th>status</th><th>warning signs</th></tr>"
    )
    body = "".join(
        f"<tr{' class=best' if r['trial_id'] == best_id else ''}><th>{_esc(r['trial_id'])}"
        f"{' (best)' if r['trial_id'] == best_id else ''}</th>"
        + "".join(f"<td class=num>{_esc(_param(r['params'].get(k)))}</td>" for k in keys)
        + f"<td class=num>{_esc(_loss(r.get('best_eval_loss')))}</td><td class=num>{r.get('steps', 0):,}</td>"
        f"<td>{_esc(r.get('status', ''))}</td><td>{_esc(_trial_signs(sweep, r))}</td></tr>"
        for r in sorted(rows, key=lambda r: (r.get("best_eval_loss") is None, r.get("best_eval_loss") or 0))
    )
    lines = {
        f"{r['trial_id']} ({r.get('status', '')})": [tuple(p) for p in r.get("eval_loss_history", [])] for r in rows
    }
    plot = ""
    if any(lines.values()):
        storage.write_bytes(storage.join(out, "eval_loss.png"), _png(lines, "eval loss", "Eval loss per trial", 7))
        plot = '<div class=plots><img src="eval_loss.png" alt="eval loss per trial over steps"></div>'
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: _STATUS_ORDER.get(x[0], 9)))
    name = sweep.rstrip("/").rsplit("/", 1)[-1]
    if results is None:
        top = "<div class='box note'><b>Sweep not finished</b>results.json and best/ are written when it ends.</div>"
    elif best_id:
        best = next((r for r in rows if r["trial_id"] == best_id), {})
        params = ", ".join(f"{_param_name(k)} {_param(v)}" for k, v in best.get("params", {}).items())
        top = (
            f"<div class='box ok'><b>Best trial: {_esc(best_id)}</b>eval loss {_esc(_loss(best.get('best_eval_loss')))}"
            f" with {_esc(params)}; its adapter is in best/.</div>"
        )
    else:
        top = "<div class='box warn'><b>No best trial</b>no trial saved a checkpoint with an eval loss.</div>"
    page = f"""<h1>Sweep {_esc(name)}</h1>
<p class=sub>{_esc(sweep)} &middot; {len(rows)} trials: {_esc(tally or "none yet")}</p>
{top}
<h2>Trials (best eval loss first)</h2>
{f"<table>{head}{body}</table>" if rows else "<p>No trial has started yet.</p>"}
<h2>Eval loss per trial</h2>
{plot or "<p>No evaluation logged yet.</p>"}
"""
    storage.write_bytes(storage.join(out, "index.html"), _page(f"sft-ray sweep {name}", page))
    return storage.as_path(out)
