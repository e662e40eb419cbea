"""Data preparation on a real local Ray: parquet + manifest, drops, bad rows, cache reuse."""

import glob
import json

import pytest
from conftest import make_config, write_jsonl

from sft_ray.data.pipeline import DataError, cache_key, prepare

ROWS = [
    {"question": f"Question {i}?", "input": "ctx" if i % 2 else "", "output": f"answer {i}"}
    for i in range(30)
]


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
    train_stats = manifest["splits"]["train"]
    assert train_stats["rows_read"] == 31 and train_stats["rows_written"] == 30
    assert train_stats["rows_dropped"] == {"no_trained_tokens_after_truncation": 1}
    assert manifest["splits"]["eval"]["rows_written"] == 5

    table = pq.read_table(f"{out}/train")
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.column_names == ["input_ids", "labels"]
    ids, labels = table["input_ids"].to_pylist(), table["labels"].to_pylist()
    assert train_stats["tokens"] == sum(map(len, ids))
    assert train_stats["trained_tokens"] == sum(sum(1 for x in lab if x != -100) for lab in labels)
    # Order is kept, and each row's trained tokens are exactly its answer + EOS.
    for row, seq, lab in zip(ROWS, ids, labels):
        trained = [t for t, x in zip(seq, lab) if x != -100]
        assert tokenizer.decode(trained) == row["output"] + "<|im_end|>"

    hf = datasets.load_dataset("parquet", data_files=glob.glob(f"{out}/train/*.parquet"))["train"]
    assert hf.num_rows == 30 and hf[0]["input_ids"] == ids[0]


def test_bad_row_names_file_and_line(tmp_path, tiny_model, ray_local):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:3] + ['{"question": "x", "output": '] + ROWS[3:6])
    cfg = make_config(tmp_path, tiny_model, train)
    with pytest.raises(DataError, match=rf"{train}:4: malformed JSON"):
        prepare(cfg)
    cfg.data.on_bad_row = "skip"
    _, manifest = prepare(cfg)  # same data, same cache entry: the counts are in its manifest
    assert manifest["splits"]["train"]["rows_dropped"] == {"malformed_json": 1}
    assert manifest["splits"]["train"]["rows_written"] == 6


def test_all_rows_untrainable_is_refused(tmp_path, tiny_model, ray_local):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "word " * 200, "output": "x"}] * 3)
    with pytest.raises(DataError, match="no trained tokens"):
        prepare(make_config(tmp_path, tiny_model, train))


def test_cache_reuse_and_invalidation(tmp_path, tiny_model, ray_local, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = make_config(tmp_path, tiny_model, train)
    first, _ = prepare(cfg)
    again, _ = prepare(cfg)
    assert again == first and "reusing" in capsys.readouterr().out
    datasets_dir = tmp_path / "storage" / "datasets"
    assert [p.name for p in datasets_dir.iterdir()] == [cache_key(cfg)]  # no temporary leftovers

    cfg.data.max_length = 64
    assert cache_key(cfg) != first.rsplit("/", 1)[1]
    write_jsonl(train, ROWS[:-1])
    cfg.data.max_length = 128
    assert cache_key(cfg) != first.rsplit("/", 1)[1]  # changed file contents, new key
