"""Inputs an operator hit (issue #13): whole-file problems named before Ray, tool-call turns without
content, null fields, a UTF-8 BOM, and preparations that crash or run at the same time."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import make_config, write_jsonl
from families import build_family_tokenizer
from oracle import check_chat, spans

from sft_ray.data.chat import build_chat, control_pattern
from sft_ray.data.formats import BadRow, render_record
from sft_ray.data.pipeline import DataError, cache_key, check_sources, prepare
from sft_ray.data.sources import plan_chunks, read_chunk
from sft_ray.data.tokenize import Encoded, encode_batch, special_ids

BOM = b"\xef\xbb\xbf"
ROWS = [{"question": f"Q{i}?", "output": f"A{i}"} for i in range(6)]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _no_ray(monkeypatch):
    def no_ray():
        raise AssertionError("Ray was started")

    monkeypatch.setattr("sft_ray.ray_runtime.ensure_ray", no_ray)


# ---- 1. whole-file problems: one line naming the file, from the driver, before Ray ----


@pytest.mark.parametrize(
    "name, body, problem",
    [
        ("obj.json", b'{\n  "data": [{"question": "q", "output": "a"}]\n}\n', "it holds a JSON object"),
        ("one.json", b'{"data": [{"question": "q", "output": "a"}]}', "it holds one JSON object"),
        ("nums.json", b"[1, 2, 3]", "it holds a JSON array of number values"),
        ("strs.json", b'[\n  "a",\n  "b"\n]', "it holds a JSON array of string values"),
        ("none.json", b"[]", "it holds an empty JSON array"),
        ("empty.json", b"", "the file is empty"),
        ("blank.jsonl", BOM + b"\n  \n", "the file is empty"),
    ],
)
def test_whole_file_problem_is_one_line_before_ray(tmp_path, tiny_model, monkeypatch, name, body, problem):
    _no_ray(monkeypatch)
    path = tmp_path / name
    path.write_bytes(body)
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = make_config(tmp_path, tiny_model, train, path)
    with pytest.raises(DataError) as err:
        check_sources(cfg)
    msg = str(err.value)
    assert msg.startswith(f"data.eval[0].path: {path}: {problem}; expected ") and "\n" not in msg
    for output in (None, str(tmp_path / "out")):
        with pytest.raises(DataError, match=r"data\.eval\[0\]\.path: .*" + problem):
            prepare(cfg, output)
    assert not (tmp_path / "storage").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "body",
    [
        b'[\n  {"question": "q", "output": "a"},\n  {"question": "r", "output": "b"}\n]\n',  # pretty array
        b'{"question": "q", "output": "a"}\n{"question": "r", "output": "b"}\n',  # JSON lines, as HF writes
        b'{"question": \n{"question": "r", "output": "b"}\n',  # JSON lines whose first line is a bad row
        BOM + b'[{"question": "q", "output": "a"}]',
    ],
)
def test_readable_json_files_pass_the_check(tmp_path, tiny_model, body):
    path = tmp_path / "data.json"
    path.write_bytes(body)
    check_sources(make_config(tmp_path, tiny_model, path))


# ---- 2. an assistant turn with tool calls and no content ----


def _encode(tok, record, chat) -> list[Encoded]:
    examples = render_record(record, "messages", {}, chat, "all_assistant", control_pattern(tok))
    encoded = [
        e for x in encode_batch(tok, examples, special_ids(tok), 100_000) for e in (x if isinstance(x, list) else [x])
    ]
    assert all(isinstance(e, Encoded) for e in encoded), encoded
    return encoded


@pytest.mark.parametrize("content", ["missing", None])
@pytest.mark.parametrize("family", ["qwen2_5", "qwen3"])
def test_tool_call_turn_without_content_is_trained_as_the_template_writes_it(family, content):
    tok = build_family_tokenizer(family)
    tok.chat_control_tokens = []
    call_turn = {"role": "assistant", "tool_calls": [CALL]}
    if content != "missing":
        call_turn["content"] = content
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        call_turn,
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    encoded = _encode(tok, {"messages": msgs, "tools": TOOLS}, build_chat(tok, None, {}))
    assert check_chat(tok, msgs, TOOLS, {}, encoded, [1, 3]) == 2  # the ids and spans inference gives
    first = tok.decode([t for t, lab in zip(encoded[0].input_ids, encoded[0].labels) if lab != -100])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in first


# DeepSeek-V3's way: the calls are written only for a turn whose content is none (null).
CONTENT_IS_NONE_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and m['content'] is none %}"
    "{% for c in m['tool_calls'] %}{{ 'call ' + c['function']['name'] }}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("content", ["missing", None])
def test_tool_call_turn_reaches_the_template_with_content_none(tokenizer, content):
    """OpenAI and HF datasets give a tool-call turn `content: None`; a missing key is the same turn."""
    tok = copy.deepcopy(tokenizer)
    chat = build_chat(tok, CONTENT_IS_NONE_TEMPLATE, {})
    call_turn = {"role": "assistant", "tool_calls": [CALL]}
    if content != "missing":
        call_turn["content"] = content
    msgs = [{"role": "user", "content": "Weather?"}, call_turn]
    [enc] = _encode(tok, {"messages": msgs}, chat)
    assert [tok.decode(enc.input_ids[a:b]) for a, b in spans(enc.labels)] == ["call get_weather<|im_end|>"]


@pytest.mark.parametrize(
    "turn",
    [
        {"role": "assistant"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "assistant", "content": " ", "tool_calls": None},
    ],
)
def test_turn_with_neither_content_nor_tool_calls_is_empty(tokenizer, turn):
    chat = build_chat(copy.deepcopy(tokenizer), CONTENT_IS_NONE_TEMPLATE, {})
    with pytest.raises(BadRow) as err:
        render_record({"messages": [{"role": "user", "content": "hi"}, turn]}, "messages", {}, chat)
    assert err.value.reason == "empty_response"


# ---- 3. a null field is not a missing one ----


@pytest.mark.parametrize(
    "fmt, record, reason, detail",
    [
        ("instruction", {"question": "q", "output": None}, "null_field", "field 'output' is null"),
        ("instruction", {"question": "q"}, "missing_field", "missing field 'output'"),
        ("instruction", {"question": None, "output": "a"}, "null_field", "field 'question' is null"),
        ("alpaca", {"instruction": "i", "output": None}, "null_field", "field 'output' is null"),
        ("alpaca", {"instruction": None, "output": "a"}, "null_field", "field 'instruction' is null"),
        ("prompt_completion", {"prompt": "p", "completion": None}, "null_field", "field 'completion' is null"),
        ("prompt_completion", {"prompt": None, "completion": "c"}, "null_field", "field 'prompt' is null"),
        ("text", {"text": None}, "null_field", "field 'text' is null"),
        ("text", {}, "missing_field", "missing field 'text'"),
        ("messages", {"messages": None}, "null_field", "field 'messages' is null"),
        ("messages", {}, "missing_field", "missing field 'messages'"),
        (
            "messages",
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
            "null_field",
            "message 0 (user): 'content' is null",
        ),
        (
            "messages",
            {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
            "null_field",
            "message 0 (user): 'value' is null",
        ),
        (
            "messages",
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
            "missing_field",
            "message 0 (user) has no 'value'",
        ),
    ],
)
def test_null_field_is_told_from_a_missing_one(tokenizer, fmt, record, reason, detail):
    chat = build_chat(copy.deepcopy(tokenizer), None, {}) if fmt == "messages" else None
    with pytest.raises(BadRow) as err:
        render_record(record, fmt, {}, chat)
    assert (err.value.reason, str(err.value)) == (reason, detail)


def test_null_response_is_reported_with_file_and_line(tmp_path, tiny_model, ray_local):
    rows = [*ROWS[:2], {"question": "q", "output": None}, *ROWS[2:]]
    cfg = make_config(tmp_path, tiny_model, write_jsonl(tmp_path / "train.jsonl", rows))
    with pytest.raises(DataError, match=rf"{tmp_path}/train.jsonl:3: field 'output' is null"):
        prepare(cfg)


# ---- 4. a UTF-8 BOM ----


def _read(path, chunk_bytes=1 << 22):
    chunks = plan_chunks(str(path), 0, "train", chunk_bytes=chunk_bytes)
    return chunks, [r for c in chunks for r in read_chunk(c)]


@pytest.mark.parametrize("chunk_bytes", [1 << 22, 40])
def test_bom_at_the_start_of_jsonl_is_read_and_lines_stay_right(tmp_path, chunk_bytes):
    rows = [*ROWS[:3], "{broken", *ROWS[3:]]  # line 4 is malformed
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(BOM + plain.read_bytes())
    chunks, read = _read(bom, chunk_bytes)
    assert (len(chunks) > 1) == (chunk_bytes < 100)  # ranges cut on line ends, the BOM in the first
    assert [r["raw"] for r in read] == [r["raw"] for r in _read(plain, chunk_bytes)[1]]
    assert [r["where"] for r in read] == [f"{bom}:{i}" for i in range(1, 8)]
    for r in read:
        if r["where"] != f"{bom}:4":
            json.loads(r["raw"])


@pytest.mark.parametrize(
    "body",
    [
        b'[{"question": "q", "output": "a"}, {"question": "r", "output": "b"}]',
        b'{"question": "q", "output": "a"}\n{"question": "r", "output": "b"}\n',  # JSON lines in a .json
    ],
)
def test_bom_at_the_start_of_json_is_read(tmp_path, tiny_model, body):
    path = tmp_path / "data.json"
    path.write_bytes(BOM + body)
    check_sources(make_config(tmp_path, tiny_model, path))
    _, read = _read(path)
    assert [json.loads(r["raw"])["output"] for r in read] == ["a", "b"]


# ---- 5. crashed and concurrent preparations ----


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_run(calls: list, during=None):
    """Stands in for the Ray Data pass: writes one marker file per preparation into its folder."""

    def run(cfg, out_dir, tokenizer):
        from sft_ray import storage

        n = len(calls)
        calls.append(out_dir)
        storage.write_bytes(storage.join(out_dir, "train", f"{n:06d}.parquet"), f"run {n}".encode())
        if during is not None and n == 0:
            during()  # another preparation of the same data runs and publishes meanwhile
        return {"splits": {}, "run": n}

    return run


@pytest.fixture
def no_ray_build(monkeypatch):
    monkeypatch.setattr("sft_ray.ray_runtime.ensure_ray", lambda: False)
    monkeypatch.setattr("sft_ray.data.stats.describe", lambda m: "fake")
    monkeypatch.setattr("sft_ray.data.stats.check_trainable", lambda *a: None)


def test_stale_leftovers_are_removed_and_live_ones_kept(tmp_path, tiny_model, monkeypatch, no_ray_build):
    cfg = make_config(tmp_path, tiny_model, write_jsonl(tmp_path / "train.jsonl", ROWS))
    key = cache_key(cfg)
    datasets = tmp_path / "storage" / "datasets"
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = {
            "dead": datasets / f"{key}.tmp-{host}-{_dead_pid()}-0badc0de",
            "live": datasets / f"{key}.tmp-{host}-{live.pid}-1badc0de",
            "other_host": datasets / f"{key}.tmp-{host}x-{_dead_pid()}-2badc0de",
            "other_key": datasets / f"{'0' * 16}.tmp-{host}-{_dead_pid()}-3badc0de",
            "unnamed": datasets / f"{key}.tmp-deadbeef",  # no owner in its name: it cannot be told
        }
        for folder in left.values():
            (folder / "train").mkdir(parents=True)
            (folder / "train" / "000000.parquet").write_bytes(b"PAR1 half")
        calls = []
        monkeypatch.setattr("sft_ray.data.pipeline._run", _fake_run(calls))
        out, manifest = prepare(cfg)
        assert manifest["run"] == 0 and os.path.basename(calls[0]).startswith(f"{key}.tmp-{host}-{os.getpid()}-")
        assert not left["dead"].exists()
        assert all(left[k].exists() for k in ("live", "other_host", "other_key", "unnamed"))
        assert sorted(p.name for p in datasets.iterdir() if p.name.startswith(key)) == sorted(
            [key, left["live"].name, left["other_host"].name, left["unnamed"].name]
        )
    finally:
        live.kill()
        live.wait()


def test_concurrent_preparations_of_one_key_never_delete_each_others_files(
    tmp_path, tiny_model, monkeypatch, no_ray_build, capsys
):
    """The first to publish wins; the second discards its own folder and uses the published one."""
    cfg = make_config(tmp_path, tiny_model, write_jsonl(tmp_path / "train.jsonl", ROWS))
    out = tmp_path / "storage" / "datasets" / cache_key(cfg)
    calls = []
    seen = {}

    def other():  # runs while the first preparation's folder is being written
        seen["out"], seen["manifest"] = prepare(cfg)
        seen["first_in_progress"] = sorted(os.listdir(calls[0]))

    monkeypatch.setattr("sft_ray.data.pipeline._run", _fake_run(calls, during=other))
    first_out, first = prepare(cfg)
    assert seen["first_in_progress"] == ["train"]  # the second left the first's folder alone
    assert seen["manifest"]["run"] == 1 and first["run"] == 1  # the second published; the first uses it
    assert first_out == seen["out"] == str(out)
    assert sorted(os.listdir(out / "train")) == ["000001.parquet"] and (out / "manifest.json").exists()
    assert (out / "train" / "000001.parquet").read_bytes() == b"run 1"
    assert not any(".tmp-" in p for p in os.listdir(out.parent))  # the first's own folder discarded
    assert "published by another preparation" in capsys.readouterr().out


def test_s3_preparation_deletes_nothing_of_another_one(tmp_path, tiny_model, monkeypatch, no_ray_build, s3_bucket):
    """An object store has no rename: the files are written in place, the manifest last, and a
    preparation of the same key never deletes the prefix (another's files in progress are there)."""
    from sft_ray import storage

    cfg = make_config(
        tmp_path, tiny_model, write_jsonl(tmp_path / "train.jsonl", ROWS), storage={"path": f"s3://{s3_bucket}/runs"}
    )
    out = f"s3://{s3_bucket}/runs/datasets/{cache_key(cfg)}"
    in_progress = storage.join(out, "train", "000009.parquet")
    storage.write_bytes(in_progress, b"another preparation's file")
    calls = []
    monkeypatch.setattr("sft_ray.data.pipeline._run", _fake_run(calls))
    assert prepare(cfg)[1]["run"] == 0
    assert storage.exists(in_progress) and storage.exists(storage.join(out, "train", "000000.parquet"))
    # Published by another one while this one ran: its manifest is kept, and is the one used.
    storage.delete_dir(out)
    calls.clear()

    def other():
        storage.write_json(storage.join(out, "manifest.json"), {"splits": {}, "run": "other"})

    monkeypatch.setattr("sft_ray.data.pipeline._run", _fake_run(calls, during=other))
    assert prepare(cfg)[1]["run"] == "other"
    assert storage.read_json(storage.join(out, "manifest.json"))["run"] == "other"
