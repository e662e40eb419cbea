"""`sft-ray audit`: look at what will be trained before paying for it.

Shows prepared rows with the trained tokens highlighted (terminal colours or an HTML page) and
the dataset report from the manifest. Runs of equal label state are decoded whole, so the text
shown is exactly what the tokens decode to (no per-token mojibake for multi-byte characters).
"""

from __future__ import annotations

import html
import itertools
import os

import pyarrow.parquet as pq

from sft_ray import storage

TRAINED, PROMPT, RESET, BOUNDARY = "\x1b[30;42m", "\x1b[2m", "\x1b[0m", "\x1b[1;35m|\x1b[0m"


def runs(input_ids: list[int], labels: list[int], seq_lengths: list[int] | None = None) -> list[tuple[str, list[int]]]:
    """Split a row into runs: ("trained" | "prompt" | "boundary", token ids); a boundary between packed examples."""
    out: list[tuple[str, list[int]]] = []
    starts = set(itertools.accumulate(seq_lengths[:-1])) if seq_lengths else set()
    for i, (t, lab) in enumerate(zip(input_ids, labels)):
        if i in starts:
            out.append(("boundary", []))
        kind = "trained" if lab != -100 else "prompt"
        if out and out[-1][0] == kind:
            out[-1][1].append(t)
        else:
            out.append((kind, [t]))
    return out


def decoded_runs(tokenizer, row: dict) -> list[tuple[str, str]]:
    """(kind, text) per run, each run's text being what it adds to the decoded row so far: decoded
    alone, a run's first `▁` (SentencePiece) would be dropped and the display would lose a space."""
    out, ids, before = [], [], ""
    for kind, run in runs(row["input_ids"], row["labels"], row.get("seq_lengths")):
        ids += run
        text = tokenizer.decode(ids)
        out.append((kind, text[len(before) :] if text.startswith(before) else tokenizer.decode(run)))
        before = text
    return out


def _rows(prepared: str, manifest: dict, n: int) -> list[dict]:
    """The first n train rows, reading only the row groups that hold them (not the whole split)."""
    out: list[dict] = []
    for f in manifest["splits"]["train"]["files"]:
        fs, path = storage.filesystem(storage.join(prepared, "train", f["name"]))
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            for g in range(pf.num_row_groups):
                out += pf.read_row_group(g).slice(0, n - len(out)).to_pylist()
                if len(out) >= n:
                    return out
    return out


def report_lines(manifest: dict) -> list[str]:
    lines = []
    for split, s in manifest["splits"].items():
        dropped = ", ".join(f"{r}={n}" for r, n in s["rows_dropped"].items()) or "none"
        lines.append(
            f"{split:5s} rows read {s['rows_read']}, kept {s['rows_kept']}, written {s.get('rows_written', '?')}, "
            f"truncated {s['rows_truncated']}, dropped: {dropped}"
        )
        lines.append(
            f"      tokens {s['tokens']}, trained {s['trained_tokens']} ({s['trained_fraction']:.1%} of tokens)"
        )
        if s.get("extra_turn_examples"):
            lines.append(
                f"      {s['extra_turn_examples']} chat turns trained in their own context, as extra examples "
                f"({s['extra_turn_tokens']} tokens): the template renders earlier turns differently later"
            )
        if s.get("turns_truncated_away"):
            lines.append(
                f"      {s['turns_truncated_away']} later chat turns left with no trained token by truncation "
                "were dropped (their records' other turns are kept); raise data.max_length to keep them"
            )
        if s.get("rows_with_control_token_text"):
            lines.append(
                f"      {s['rows_with_control_token_text']} rows spell a control token in their text "
                "(tokenized as text, never as the control token)"
            )
        if split == "train":
            top = max([b["rows"] for b in s["length_histogram"]] or [1]) or 1
            for b in s["length_histogram"]:
                bar = "#" * round(40 * b["rows"] / top)
                lines.append(f"      {b['from']:>5}-{b['to']:<5} {b['rows']:>7} {bar}")
    layout = manifest.get("layout")
    if layout:
        lines.append(
            f"layout: {'packed' if layout['packing'] else 'padded'}, {layout['rows']} rows, real/computed tokens "
            f"{layout['real_tokens']}/{layout['computed_tokens']} = {layout['real_fraction']:.1%} ({layout['note']})"
        )
    return lines


def terminal(tokenizer, rows: list[dict], manifest: dict, color: bool) -> str:
    out = []
    for k, row in enumerate(rows):
        out.append(f"--- row {k} ({len(row['input_ids'])} tokens) ---")
        parts = []
        for kind, text in decoded_runs(tokenizer, row):
            if kind == "boundary":
                parts.append(BOUNDARY if color else "|")
            elif color:
                parts.append((TRAINED if kind == "trained" else PROMPT) + text + RESET)
            else:
                parts.append(f"[[{text}]]" if kind == "trained" else text)
        out.append("".join(parts))
    legend = "trained tokens on green" if color else "trained tokens in [[...]]"
    return "\n".join([*out, "", f"({legend})", *report_lines(manifest)])


def html_page(tokenizer, rows: list[dict], manifest: dict) -> str:
    body = []
    for k, row in enumerate(rows):
        spans = []
        for kind, text in decoded_runs(tokenizer, row):
            if kind == "boundary":
                spans.append('<span class="b">|</span>')
            else:
                spans.append(f'<span class="{kind[0]}">{html.escape(text)}</span>')
        body.append(f"<h3>row {k} ({len(row['input_ids'])} tokens)</h3><pre>{''.join(spans)}</pre>")
    report = html.escape("\n".join(report_lines(manifest)))
    return (
        "<!doctype html><meta charset='utf-8'><title>sft-ray audit</title><style>"
        "body{font-family:sans-serif;margin:2em}pre{white-space:pre-wrap;background:#f6f6f6;padding:.6em}"
        ".t{background:#b6f2b6}.p{color:#666}.b{color:#c0c;font-weight:bold}</style>"
        "<h1>sft-ray audit</h1><p><span class='t'>trained tokens</span> / <span class='p'>prompt (label -100)"
        f"</span></p><h2>Dataset report</h2><pre>{report}</pre><h2>Examples</h2>{''.join(body)}"
    )


def audit(cfg, n: int = 5, html_path: str | None = None, color: bool | None = None) -> str:
    from sft_ray.chat_format import template_text
    from sft_ray.data.pipeline import prepare
    from sft_ray.model import load_tokenizer

    prepared, manifest = prepare(cfg)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, template_text(cfg.data.chat_template))
    rows = _rows(prepared, manifest, n)
    if html_path:
        tmp = f"{html_path}.tmp"
        with open(tmp, "w") as f:
            f.write(html_page(tokenizer, rows, manifest))
        os.replace(tmp, html_path)
    return terminal(tokenizer, rows, manifest, color)
