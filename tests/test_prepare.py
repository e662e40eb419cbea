"""Data preparation on a real local Ray: sources, formats, bad input, mixing, packing, cache, s3://."""

import glob
import json
import os
import re

import pytest
from conftest import make_config, write_jsonl

from sft_ray.data.pipeline import DataError, cache_key, prepare

ROWS = [{"question": f"Question {i}?", "input": "ctx" if i % 2 else "", "output": f"answer {i}"} for i in range(30)]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Say {i}"},
            {"role": "assistant", "content": f"{i}"},
        ]
    }
    for i in range(10)
]


def _trained_texts(tokenizer, table):
    out = []
    for seq, lab in zip(table["input_ids"].to_pylist(), table["labels"].to_pylist()):
        out.append(tokenizer.decode([t for t, x in zip(seq, lab) if x != -100]))
    return out


def test_prepare_writes_parquet_and_manifest(tmp_path, tiny_model, tokenizer, ray_local):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    long_prompt = {"question": "word " * 200, "output": "lost"}
    train = write_jsonl(tmp_path / "train.jsonl", ROWS + [long_prompt])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", ROWS[:5])
    cfg = make_config(tmp_path, tiny_model, train, eval_)
    out, manifest = prepare(cfg, str(tmp_path / "prepared"))

    on_disk = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"]
    stats = manifest["splits"]["train"]
    assert (stats["rows_read"], stats["rows_kept"], stats["rows_written"]) == (31, 30, 30)
    assert stats["rows_dropped"] == {"no_trained_tokens_after_truncation": 1}
    assert manifest["splits"]["eval"]["rows_written"] == 5
    assert sum(b["rows"] for b in stats["length_histogram"]) == 30

    table = pq.read_table(f"{out}/train")
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.column_names == ["input_ids", "labels"]
    assert stats["tokens"] == sum(map(len, table["input_ids"].to_pylist()))
    assert stats["trained_tokens"] == sum(sum(1 for x in lab if x != -100) for lab in table["labels"].to_pylist())
    # Order is kept, and each row's trained tokens are exactly its answer + EOS.
    assert _trained_texts(tokenizer, table) == [r["output"] + "<|im_end|>" for r in ROWS]
    layout = manifest["layout"]
    assert layout["real_tokens"] == stats["tokens"] and layout["computed_tokens"] >= layout["real_tokens"]
    # The data stage holds no training setting: another batch size reuses the same preparation,
    # whose layout must not be the other run's (it said "batches of 8" for a run of 2).
    cfg.train.per_device_batch_size = 2
    assert prepare(cfg, str(tmp_path / "again"))[1]["layout"] == layout and "for reference" in layout["note"]

    hf = datasets.load_dataset("parquet", data_files=glob.glob(f"{out}/train/*.parquet"))["train"]
    assert hf.num_rows == 30 and hf[0]["input_ids"] == table["input_ids"][0].as_py()


def test_every_source_kind_and_format_mixed_with_weights(
    tmp_path, tiny_model, tokenizer, ray_local, monkeypatch, capsys
):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    alpaca = [{"instruction": f"Do {i}", "input": "", "output": f"done {i}"} for i in range(8)]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))  # a JSON array
    pc_rows = [{"p": f"P{i}", "c": f"C{i}"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(pc_rows), tmp_path / "pc.parquet", row_group_size=4)
    datasets.Dataset.from_list(CHAT).save_to_disk(str(tmp_path / "chat_hf"))
    write_jsonl(tmp_path / "text.json", [{"text": f"plain {i}"} for i in range(4)])  # JSON lines named .json
    cfg = make_config(
        tmp_path,
        tiny_model,
        [
            {"path": str(tmp_path / "alpaca.json"), "format": "alpaca", "weight": 0.5},
            {
                "path": str(tmp_path / "pc.parquet"),
                "format": "prompt_completion",
                "fields": {"prompt": "p", "completion": "c"},
                "weight": 2.0,
            },
            {"path": str(tmp_path / "chat_hf"), "format": "messages"},
            {"path": str(tmp_path / "text.json"), "format": "text"},
        ],
    )
    monkeypatch.setattr("sft_ray.progress.PREP_EVERY_S", 0.0)  # a line per chunk, however fast
    out, manifest = prepare(cfg)
    assert [s["rows_kept"] for s in manifest["sources"]] == [8, 6, 10, 4]
    shown = [x for x in capsys.readouterr().out.splitlines() if x.startswith("preparing data: ")]
    chunks = len(shown)
    assert chunks >= 5  # one JSON array, two Parquet row groups, the saved dataset, one JSONL range
    assert [int(re.search(r" (\d+)/(\d+) chunks", x).group(1)) for x in shown] == list(range(1, chunks + 1))
    assert shown[-1].startswith(f"preparing data: 28 rows of 28 · {chunks}/{chunks} chunks (100%) · ")
    trained = _trained_texts(tokenizer, pq.read_table(f"{out}/train"))
    kept_alpaca = [t for t in trained if t.startswith("done")]
    assert 0 < len(kept_alpaca) < 8 and len(set(kept_alpaca)) == len(kept_alpaca)  # a seeded part, no repeats
    for i in range(6):
        assert trained.count(f"C{i}<|im_end|>") == 2  # weight 2: every row twice
    assert sorted(t for t in trained if t[0].isdigit()) == sorted(f"{i}<|im_end|>" for i in range(10))
    assert sorted(t for t in trained if t.startswith("plain")) == [f"plain {i}<|im_end|>" for i in range(4)]
    assert manifest["splits"]["train"]["rows_written"] == len(kept_alpaca) + 12 + 10 + 4
    # With trust_remote_code the actors take the other path (each loads its own tokenizer, as the
    # driver's may not unpickle on another node): it must give the very same rows.
    remote = cfg.model_copy(update={"model": cfg.model.model_copy(update={"trust_remote_code": True})})
    out_remote, _ = prepare(remote, str(tmp_path / "remote"))
    assert pq.read_table(f"{out_remote}/train").equals(pq.read_table(f"{out}/train"))


BAD_ROWS = [
    ('{"question": "x", "output": ', "malformed_json"),
    ('{"output": "y"}', "missing_field"),
    ('{"question": 1, "output": "y"}', "wrong_type"),
    ('{"question": "x", "output": ""}', "empty_response"),
]
BAD_CHATS = [
    (
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "unknown_role",
    ),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
]


def _bad_files(tmp_path):
    instr = tmp_path / "instr.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS[:20]]
    lines[3:3] = [raw.encode() for raw, _ in BAD_ROWS]
    lines.insert(10, b'{"question": "caf\xe9", "output": "latin-1 bytes"}')  # line 11: not UTF-8
    instr.write_bytes(b"\n".join(lines) + b"\n")
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT + [r for r, _ in BAD_CHATS])
    return instr, chat


def test_bad_rows_stop_with_file_and_line(tmp_path, tiny_model, ray_local):
    instr, chat = _bad_files(tmp_path)
    cfg = make_config(tmp_path, tiny_model, [instr, {"path": str(chat), "format": "messages"}])
    with pytest.raises(DataError) as err:
        prepare(cfg)
    msg = str(err.value)
    assert "1 x empty_response, 1 x invalid_utf8, 1 x malformed_json, 1 x missing_field" in msg
    assert "1 x no_assistant_turn" in msg and "1 x unknown_role" in msg
    assert f"{instr}:4: malformed JSON" in msg and f"{instr}:5: missing field 'question'" in msg
    assert "data.on_bad_row=skip" in msg


def test_bad_rows_skipped_and_counted(tmp_path, tiny_model, ray_local):
    instr, chat = _bad_files(tmp_path)
    cfg = make_config(
        tmp_path,
        tiny_model,
        [instr, {"path": str(chat), "format": "messages"}],
        data={"on_bad_row": "skip", "max_dropped_fraction": 0.3},
    )
    _, manifest = prepare(cfg)
    stats = manifest["splits"]["train"]
    assert stats["rows_dropped"] == {
        "empty_response": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "no_assistant_turn": 1,
        "unknown_role": 1,
        "wrong_type": 1,
    }
    assert stats["rows_read"] == 20 + 5 + 12 and stats["rows_written"] == 30
    assert any(f"{instr}:11: not valid UTF-8" in e for e in manifest["example_errors"])
    # The same data with a stricter drop limit is refused, naming the limit.
    cfg.data.max_dropped_fraction = 0.1
    with pytest.raises(DataError, match=r"7 of 37 rows \(18.9%\) were dropped.*max_dropped_fraction=0.1"):
        prepare(cfg)


def test_unusable_chat_template_is_refused_before_ray(tmp_path, tiny_model):
    """Checked on the driver with the tokenizer prepare loads, before any Ray work or output."""
    shouting = tmp_path / "shouting.jinja"
    shouting.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] | upper) + '<|im_end|>' }}{% endfor %}"
    )
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    cfg = make_config(
        tmp_path, tiny_model, {"path": str(chat), "format": "messages"}, data={"chat_template": str(shouting)}
    )
    with pytest.raises(DataError, match="data.chat_template: .*changes the assistant's content"):
        prepare(cfg)
    assert not (tmp_path / "storage" / "datasets").exists()


def test_missing_source_and_unloadable_model_are_named_before_ray(tmp_path, tiny_model, monkeypatch):
    """Bad input fails in seconds with the config key, before Ray starts or anything is written."""

    def no_ray():
        raise AssertionError("Ray was started")

    monkeypatch.setattr("sft_ray.ray_runtime.ensure_ray", no_ray)
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = make_config(tmp_path, tiny_model, train, tmp_path / "nope.jsonl")
    for output in (None, str(tmp_path / "out")):
        with pytest.raises(DataError, match=r"data\.eval\[0\]\.path: no such file or folder: .*nope\.jsonl"):
            prepare(cfg, output)
    cfg = make_config(tmp_path, tiny_model, train, data={"chat_template": str(tmp_path / "nope.jinja")})
    with pytest.raises(DataError, match=r"data\.chat_template: no such file: .*nope\.jinja"):
        prepare(cfg)
    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    with pytest.raises(DataError, match=r"model\.path: cannot load a tokenizer from .*weights_only"):
        prepare(make_config(tmp_path, no_tokenizer, train))
    assert not (tmp_path / "storage").exists() and not (tmp_path / "out").exists()


def test_zero_trained_tokens_is_refused(tmp_path, tiny_model, ray_local):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "word " * 200, "output": "x"}] * 3)
    with pytest.raises(DataError, match="the train split has no trained tokens"):
        prepare(make_config(tmp_path, tiny_model, train, data={"max_dropped_fraction": 1.0}))


def test_eval_carved_from_train_and_packing(tmp_path, tiny_model, tokenizer, ray_local):
    import pyarrow.parquet as pq

    rows = [{"question": f"Q{i} " + "pad " * (i % 7), "output": f"A{i}"} for i in range(200)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_config(tmp_path, tiny_model, train, data={"eval_fraction": 0.2, "packing": True})
    out, manifest = prepare(cfg)
    n_eval = manifest["splits"]["eval"]["rows_written"]
    assert 20 <= n_eval <= 60 and manifest["splits"]["train"]["rows_kept"] == 200 - n_eval
    packed = pq.read_table(f"{out}/train")
    assert packed.column_names == ["input_ids", "labels", "seq_lengths"]  # lengths, not a position per token
    examples = []
    for ids, labs, lengths in zip(*(packed[c].to_pylist() for c in packed.column_names)):
        assert len(ids) == sum(lengths) <= 128
        starts = [sum(lengths[:k]) for k in range(len(lengths) + 1)]
        examples += [
            tokenizer.decode([t for t, x in zip(ids[a:b], labs[a:b]) if x != -100]) for a, b in zip(starts, starts[1:])
        ]
    evals = _trained_texts(tokenizer, pq.read_table(f"{out}/eval"))
    assert sorted(examples + evals) == sorted(f"A{i}<|im_end|>" for i in range(200))  # each once, whole
    layout = manifest["layout"]
    assert layout["packing"] and layout["rows"] == packed.num_rows
    assert layout["real_tokens"] == manifest["splits"]["train"]["tokens"]
    # best-fit-decreasing is within one row of the lower bound on this data
    assert layout["rows"] <= -(-layout["real_tokens"] // 128) + 1
    assert layout["real_fraction"] == layout["real_tokens"] / (128 * packed.num_rows)
    # The carve is seeded: another seed is another preparation (its own cache key, not a reuse of
    # the first) that carves other rows, and still each row once, in train or in eval.
    cfg.data.seed = 7
    other_out, other = prepare(cfg)
    assert other_out.rsplit("/", 1)[1] == cache_key(cfg) != out.rsplit("/", 1)[1]
    other_evals = _trained_texts(tokenizer, pq.read_table(f"{other_out}/eval"))
    assert len(other_evals) == other["splits"]["eval"]["rows_written"]
    assert other["splits"]["train"]["rows_kept"] == 200 - len(other_evals)
    assert sorted(other_evals) != sorted(evals)


def test_cache_reuse_invalidation_and_crash_safety(tmp_path, tiny_model, ray_local, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = make_config(tmp_path, tiny_model, train)
    key = cache_key(cfg)
    datasets_dir = tmp_path / "storage" / "datasets"
    # What a crash leaves behind: a half-written folder aside and a folder without its manifest.
    (datasets_dir / f"{key}.tmp-deadbeef" / "train").mkdir(parents=True)
    (datasets_dir / key / "train").mkdir(parents=True)
    (datasets_dir / key / "train" / "partial.parquet").write_bytes(b"PAR1 half")
    first, _ = prepare(cfg)
    assert "reusing" not in capsys.readouterr().out
    assert sorted(p.name for p in (datasets_dir / key / "train").iterdir()) != ["partial.parquet"]
    again, _ = prepare(cfg)
    assert again == first and "reusing" in capsys.readouterr().out

    cfg.data.max_length = 64
    assert cache_key(cfg) != key
    cfg.data.max_length = 128
    cfg.data.packing = True
    assert cache_key(cfg) != key
    cfg.data.packing = False
    cfg.data.train[0].fields = {"question": "question"}
    assert cache_key(cfg) != key
    cfg.data.train[0].fields = {}
    write_jsonl(train, ROWS[:-1])
    assert cache_key(cfg) != key  # changed file contents, new key
    write_jsonl(train, ROWS)
    assert cache_key(cfg) == key


def test_reads_from_s3(tmp_path, tiny_model, tokenizer, ray_local, s3_bucket):
    import boto3
    import pyarrow.parquet as pq

    body = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="data/train.jsonl", Body=body)
    cfg = make_config(tmp_path, tiny_model, f"s3://{s3_bucket}/data/train.jsonl")
    out, manifest = prepare(cfg)
    assert manifest["splits"]["train"]["rows_written"] == 30
    assert _trained_texts(tokenizer, pq.read_table(f"{out}/train")) == [r["output"] + "<|im_end|>" for r in ROWS]


def test_dataset_read_through_load_dataset_follows_the_same_pipeline(tmp_path, tiny_model, tokenizer, ray_local):
    """A dataset folder as `hf download` leaves it (two train shards, a test split, a card), named in
    the YAML like a hub id: `datasets.load_dataset` streams it, shard by shard (the code path of a hub
    id), and the pipeline writes the same rows as for the files read directly."""
    import pyarrow.parquet as pq
    import yaml

    from sft_ray.config import load_config

    root = tmp_path / "acme" / "instruct"
    write_jsonl(root / "data" / "train-00000-of-00002.jsonl", ROWS[:20])
    write_jsonl(root / "data" / "train-00001-of-00002.jsonl", ROWS[20:])
    write_jsonl(root / "data" / "test-00000-of-00001.jsonl", ROWS[:5])
    (root / "README.md").write_text("---\nlicense: mit\n---\n# instruct\n")
    tree = {
        "name": "hub",
        "model": {"path": str(tiny_model), "dtype": "float32"},
        "data": {"train": [{"path": "acme/instruct"}], "eval": [{"path": "acme/instruct", "split": "test"}]},
        "storage": {"path": "storage"},
    }
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(tree))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = load_config("hub.yaml")
    finally:
        os.chdir(cwd)
    out, manifest = prepare(cfg)
    assert [s["rows_read"] for s in manifest["sources"]] == [30, 5]
    assert _trained_texts(tokenizer, pq.read_table(f"{out}/train")) == [r["output"] + "<|im_end|>" for r in ROWS]
    assert _trained_texts(tokenizer, pq.read_table(f"{out}/eval")) == [r["output"] + "<|im_end|>" for r in ROWS[:5]]
    # The cache key follows the files' contents: a changed row, a new preparation.
    write_jsonl(root / "data" / "test-00000-of-00001.jsonl", ROWS[1:6])
    assert cache_key(cfg) != out.rsplit("/", 1)[1]


def test_weights_that_keep_no_train_row_are_refused(tmp_path, tiny_model, ray_local):
    """Rows read and kept, then all weighted away (a 0.01 weight on 30 rows): refused with the key to
    change, not a crash in every training worker."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = make_config(tmp_path, tiny_model, {"path": str(train), "format": "instruction", "weight": 0.01})
    with pytest.raises(DataError, match=r"no train row was written.*weight"):
        prepare(cfg)
