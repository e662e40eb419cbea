"""Reading source files as raw lines that keep their file and line number.

Files are cut into line-aligned byte ranges (chunks) on the driver, so Ray Data can read and
tokenize them in parallel while every row still knows where it came from for error messages.
JSON is parsed later, next to tokenization, so one malformed line can be reported, not crash a read.
"""

from __future__ import annotations

from collections.abc import Iterator

from sft_ray import storage

CHUNK_BYTES = 4 << 20


def plan_chunks(uri: str, split: str, fmt: str, chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Line-aligned byte ranges of a JSONL file, each with the line number it starts at."""
    fs, path = storage.filesystem(uri)
    try:
        f = fs.open_input_stream(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {uri}") from None
    chunks: list[dict] = []
    start, line, pos, carry = 0, 1, 0, b""
    with f:
        while block := f.read(chunk_bytes):
            carry += block
            pos += len(block)
            cut = carry.rfind(b"\n") + 1
            if cut == 0:
                continue  # a line longer than one block: keep reading
            end = pos - (len(carry) - cut)
            chunks.append(_chunk(uri, split, fmt, start, end, line))
            line += carry.count(b"\n", 0, cut)
            start, carry = end, carry[cut:]
    if pos > start:
        chunks.append(_chunk(uri, split, fmt, start, pos, line))
    return chunks


def _chunk(uri: str, split: str, fmt: str, start: int, end: int, line: int) -> dict:
    return {"source": uri, "split": split, "format": fmt, "start": start, "end": end, "line": line}


def read_chunk(chunk: dict) -> Iterator[dict]:
    """Yield one row per non-blank line: where it is from and its raw bytes as text."""
    fs, path = storage.filesystem(chunk["source"])
    with fs.open_input_file(path) as f:
        f.seek(chunk["start"])
        data = f.read(chunk["end"] - chunk["start"])
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            text, bad_utf8 = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text, bad_utf8 = raw.decode("utf-8", errors="replace"), True
        yield {
            "split": chunk["split"],
            "source": chunk["source"],
            "line": chunk["line"] + i,
            "format": chunk["format"],
            "raw": text,
            "bad_utf8": bad_utf8,
        }
