"""Statistics of a preparation: counted per chunk inside the pipeline, summed on the driver into the manifest.

Every number is a sum over chunks (counts, token totals, histogram bins), so the driver receives
one small record per chunk and never a row. `check_trainable` refuses data that would train on
nothing or lost too much.
"""

from __future__ import annotations

import math
import random
import time

import pyarrow as pa
import pyarrow.compute as pc

from sft_ray.config import Config
from sft_ray.data.cache import PREP_VERSION, SPLITS, specs
from sft_ray.data.errors import DataError

REFERENCE_BATCH = 8  # the padded layout the manifest reports (see layout)
HISTOGRAM_BINS = 8
MAX_ERRORS = 10


def new_counts(n_specs: int) -> dict:
    split = {
        "rows_read": 0,
        "rows_dropped": {},
        "rows_truncated": 0,
        "examples": 0,
        "extra_turn_examples": 0,
        "extra_turn_tokens": 0,
        "turns_truncated_away": 0,
        "rows_with_control_token_text": 0,
        "tokens": 0,
        "trained_tokens": 0,
        "length_histogram": [0] * HISTOGRAM_BINS,
        "rows_written": 0,
        "written_tokens": 0,
        "computed_tokens": 0,
    }
    return {
        "splits": {s: {k: (v.copy() if isinstance(v, list | dict) else v) for k, v in split.items()} for s in SPLITS},
        "sources": [[0, 0] for _ in range(n_specs)],  # rows read, rows kept
        "errors": [],
        "files": {s: [] for s in SPLITS},  # [file name, rows] in row order
    }


def _width(max_length: int) -> int:
    return max(1, math.ceil(max_length / HISTOGRAM_BINS))


def _bins(lengths: list[int], max_length: int) -> list[int]:
    width = _width(max_length)
    counts = [0] * HISTOGRAM_BINS
    for n in lengths:
        counts[min(HISTOGRAM_BINS - 1, (n - 1) // width)] += 1
    return counts


def count_encoded(counts: dict, t: pa.Table, max_length: int) -> None:
    """Add one batch of encoded rows (sft_ray.data.encode.SCHEMA) to `counts`."""
    for split in SPLITS:
        s = counts["splits"][split]
        rows = t.filter(pc.equal(t["split"], split))
        if not rows.num_rows:
            continue
        records = rows.filter(pc.equal(rows["part"], 0))
        kept = rows.filter(pc.equal(rows["drop_reason"], ""))
        for r in records.filter(pc.not_equal(records["drop_reason"], ""))["drop_reason"].to_pylist():
            s["rows_dropped"][r] = s["rows_dropped"].get(r, 0) + 1
        extra = kept.filter(pc.greater(kept["part"], 0))
        lengths = kept["n_tokens"].to_pylist()
        s["rows_read"] += records.num_rows
        s["rows_truncated"] += int(pc.sum(kept["truncated"]).as_py() or 0)
        # Chat turns that a template renders differently once later turns follow (Qwen3 strips past
        # reasoning) are trained in their own context: one more example each, its prompt repeated.
        s["examples"] += kept.num_rows
        s["extra_turn_examples"] += extra.num_rows
        s["extra_turn_tokens"] += int(pc.sum(extra["n_tokens"]).as_py() or 0)
        # Such a turn that truncation left with nothing to train; the record's other turns are kept.
        s["turns_truncated_away"] += rows.filter(
            pc.and_(pc.greater(rows["part"], 0), pc.not_equal(rows["drop_reason"], ""))
        ).num_rows
        s["rows_with_control_token_text"] += int(pc.sum(records["control_text"]).as_py() or 0)
        s["tokens"] += sum(lengths)
        s["trained_tokens"] += int(pc.sum(kept["n_trained"]).as_py() or 0)
        s["length_histogram"] = [a + b for a, b in zip(s["length_histogram"], _bins(lengths, max_length))]
    records = t.filter(pc.equal(t["part"], 0))
    for spec, reason in zip(records["spec"].to_pylist(), records["drop_reason"].to_pylist()):
        counts["sources"][spec][0] += 1
        counts["sources"][spec][1] += reason == ""
    room = MAX_ERRORS - len(counts["errors"])
    if room > 0:
        counts["errors"] += t.filter(pc.not_equal(t["error"], ""))["error"].to_pylist()[:room]


def padded_tokens(lengths: list[int], batch_size: int, seed: int, multiple: int = 8) -> int:
    """Tokens computed when shuffled rows are padded per batch to the longest, rounded up to `multiple`."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    total = 0
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        total += len(batch) * (math.ceil(max(batch) / multiple) * multiple)
    return total


def count_written(counts: dict, split: str, lengths: list[int], packed_to: int | None, seed: int) -> None:
    """Add one written block of rows: packed rows compute `packed_to` tokens each; padded rows are
    estimated in shuffled batches of REFERENCE_BATCH within the block (a fixed reference, not the
    run's batch size: runs with other batch sizes reuse the data, and each logs its own fraction)."""
    s = counts["splits"][split]
    s["rows_written"] += len(lengths)
    s["written_tokens"] += sum(lengths)
    s["computed_tokens"] += (
        len(lengths) * packed_to if packed_to else padded_tokens(lengths, REFERENCE_BATCH, seed) if lengths else 0
    )


def merge(total: dict, part: dict) -> None:
    """Add a chunk's counts to the running total (chunks in order, so errors and files stay in order)."""
    for split in SPLITS:
        t, p = total["splits"][split], part["splits"][split]
        for key, value in p.items():
            if key == "rows_dropped":
                for r, n in value.items():
                    t[key][r] = t[key].get(r, 0) + n
            elif key == "length_histogram":
                t[key] = [a + b for a, b in zip(t[key], value)]
            else:
                t[key] += value
        total["files"][split] += part["files"][split]
    for t, p in zip(total["sources"], part["sources"]):
        t[0] += p[0]
        t[1] += p[1]
    total["errors"] = (total["errors"] + part["errors"])[:MAX_ERRORS]


def _histogram(counts: list[int], max_length: int) -> list[dict]:
    width = _width(max_length)
    return [{"from": i * width + 1, "to": min(max_length, (i + 1) * width), "rows": c} for i, c in enumerate(counts)]


def layout(cfg: Config, s: dict) -> dict:
    real, computed = s["written_tokens"], s["computed_tokens"]
    return {
        "packing": cfg.data.packing,
        "rows": s["rows_written"],
        "real_tokens": real,
        "computed_tokens": computed,
        "real_fraction": real / computed if computed else 0.0,
        "note": "packed rows of max_length"
        if cfg.data.packing
        else f"for reference: shuffled batches of {REFERENCE_BATCH} padded to their longest row, rounded up to 8",
    }


def manifest(cfg: Config, counts: dict) -> dict:
    """The manifest of a finished preparation; `splits.<split>.files` lists its files in row order."""
    splits = {}
    for split in SPLITS:
        s = dict(counts["splits"][split])
        del s["written_tokens"], s["computed_tokens"]  # the layout's, below
        s["rows_dropped"] = dict(sorted(s["rows_dropped"].items()))
        s["rows_kept"] = s["rows_read"] - sum(s["rows_dropped"].values())
        s["trained_fraction"] = s["trained_tokens"] / s["tokens"] if s["tokens"] else 0.0
        s["length_histogram"] = _histogram(s["length_histogram"], cfg.data.max_length)
        s["files"] = [{"name": name, "rows": n} for name, n in counts["files"][split]]
        splits[split] = s
    return {
        "version": PREP_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.model.path,
        "data": cfg.data.model_dump(mode="json"),
        "sources": [
            {**spec, "rows_read": read, "rows_kept": kept} for spec, (read, kept) in zip(specs(cfg), counts["sources"])
        ],
        "splits": splits,
        "layout": layout(cfg, counts["splits"]["train"]),
        "example_errors": counts["errors"],
    }


def check_trainable(manifest: dict, cfg: Config, where: str) -> None:
    """Refuse data that would train on nothing (the field's known silent failure) or lost too much."""
    splits = manifest["splits"]
    bad = {
        r: n for s in splits.values() for r, n in s["rows_dropped"].items() if r != "no_trained_tokens_after_truncation"
    }
    if bad and cfg.data.on_bad_row == "error":
        raise DataError(
            f"bad input rows ({', '.join(f'{n} x {r}' for r, n in sorted(bad.items()))}), for example:\n  "
            + "\n  ".join(manifest["example_errors"][:5])
            + f"\nfix the data, or set data.on_bad_row=skip to drop such rows; manifest: {where}"
        )
    if splits["train"]["trained_tokens"] == 0:
        too_long = "no_trained_tokens_after_truncation" in splits["train"]["rows_dropped"]
        raise DataError(
            f"the train split has no trained tokens ({splits['train']['rows_read']} rows read, "
            f"dropped: {splits['train']['rows_dropped'] or 'none'}); nothing to learn from"
            + (f"; prompts reach data.max_length={cfg.data.max_length}: raise it" if too_long else "")
            + f". Manifest: {where}"
        )
    if splits["train"]["rows_written"] == 0:  # every train row weighted away (a small fractional weight)
        raise DataError(
            f"no train row was written: the sources' weights kept none of the {splits['train']['rows_kept']} kept "
            f"rows (data.train[*].weight below 1 keeps a seeded fraction); raise the weights. Manifest: {where}"
        )
    read = sum(s["rows_read"] for s in splits.values())
    dropped = sum(sum(s["rows_dropped"].values()) for s in splits.values())
    if read and dropped / read > cfg.data.max_dropped_fraction:
        raise DataError(
            f"{dropped} of {read} rows ({dropped / read:.1%}) were dropped, more than "
            f"data.max_dropped_fraction={cfg.data.max_dropped_fraction}: {splits['train']['rows_dropped']} "
            f"(train), {splits['eval']['rows_dropped']} (eval). Manifest: {where}"
        )


def describe(manifest: dict) -> str:
    s = manifest["splits"]["train"]
    dropped = ", ".join(f"{n} {r}" for r, n in s["rows_dropped"].items())
    text = (
        f"train {s['rows_kept']}/{s['rows_read']} rows kept{f' (dropped: {dropped})' if dropped else ''}, "
        f"{s['trained_tokens']}/{s['tokens']} tokens trained, {manifest['layout']['rows']} rows written"
        f"{' packed' if manifest['layout']['packing'] else ''}"
    )
    if s.get("extra_turn_examples"):
        text += (
            f"; {s['extra_turn_examples']} chat turns as examples of their own (the template rewrites earlier turns)"
        )
    if s.get("rows_with_control_token_text"):
        plain = any(src["format"] != "messages" for src in manifest["sources"])
        text += f"; {s['rows_with_control_token_text']} rows spell a control token, tokenized as text" + (
            " (for chat already rendered into text, use format: messages)" if plain else ""
        )
    return text
