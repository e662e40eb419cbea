"""Hub sources (`datasets.load_dataset`, streamed) without Ray and without network: local dataset
folders and `data_files` go through the same loading code as a hub id; an unknown hub id fails fast."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO, write_jsonl

from sft_ray.config import ConfigError, validate
from sft_ray.data.sources import HUB_KEYS, HubSourceError, hub_fingerprint, is_hub, plan_chunks, read_chunk

MISSING = "sft-ray-tests/no-such-dataset-3f9c"


def _rows(prefix, n):
    return [
        {"question": f"{prefix} Q{i} é ✓", "output": f"A{i}", "n": i, "messages": [{"role": "user", "content": "hi"}]}
        for i in range(n)
    ]


@pytest.fixture
def repo(tmp_path):
    """A dataset repo folder as `hf download` leaves it: two train shards, a test split, a card."""
    root = tmp_path / "acme" / "instruct"
    files = {
        "train0": write_jsonl(root / "data" / "train-00000-of-00002.jsonl", _rows("t0", 5)),
        "train1": write_jsonl(root / "data" / "train-00001-of-00002.jsonl", _rows("t1", 4)),
        "test": write_jsonl(root / "data" / "test-00000-of-00001.jsonl", _rows("test", 3)),
    }
    (root / "README.md").write_text("---\nlicense: mit\n---\n# instruct\n")
    return root, files


def _read(chunks):
    # Chunks travel to Ray actors: they must survive JSON.
    assert json.loads(json.dumps(chunks)) == chunks
    return [r for c in json.loads(json.dumps(chunks)) for r in read_chunk(c)]


def _plain(path):
    return [json.loads(r["raw"]) for r in _read(plan_chunks(str(path), 0, "train"))]


def test_dataset_folder_reads_every_row_once_with_where(repo):
    root, files = repo
    chunks = plan_chunks(str(root), 3, "train")
    assert [c["shard"] for c in chunks] == [0, 1] and {c["kind"] for c in chunks} == {"hub"}
    assert all(c["spec"] == 3 and c["split"] == "train" and c["num_shards"] == 2 for c in chunks)
    rows = _read(chunks)
    assert [r["where"] for r in rows] == [f"{root}[train] shard 0 row {i}" for i in range(5)] + [
        f"{root}[train] shard 1 row {i}" for i in range(4)
    ]
    # Every row exactly once, shard i being the i-th file, and the same rows as the plain jsonl reader's.
    assert [json.loads(r["raw"]) for r in rows] == _plain(files["train0"]) + _plain(files["train1"])
    assert {r["split"] for r in rows} == {"train"} and not any(r["bad_utf8"] for r in rows)


def test_split_is_honoured(repo):
    root, files = repo
    rows = _read(plan_chunks(str(root), 0, "eval", hub_split="test"))
    assert [json.loads(r["raw"]) for r in rows] == _plain(files["test"])
    assert rows[0]["where"] == f"{root}[test] shard 0 row 0" and rows[0]["split"] == "eval"
    with pytest.raises(HubSourceError, match=r"\[validation\]: datasets.load_dataset could not load it"):
        plan_chunks(str(root), 0, "train", hub_split="validation")


def test_subset_from_the_card_configs(tmp_path):
    root = tmp_path / "multi"
    write_jsonl(root / "short" / "train.jsonl", _rows("short-train", 2))
    write_jsonl(root / "short" / "test.jsonl", _rows("short-test", 3))
    write_jsonl(root / "long" / "train.jsonl", _rows("long-train", 4))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: long\n  default: true\n  data_files:\n  - split: train\n    path: long/*.jsonl\n"
        "- config_name: short\n  data_files:\n  - split: train\n    path: short/train.jsonl\n"
        "  - split: test\n    path: short/test.jsonl\n---\n"
    )
    rows = _read(plan_chunks(str(root), 0, "train", subset="short", hub_split="test"))
    assert [json.loads(r["raw"]) for r in rows] == _rows("short-test", 3)
    assert rows[2]["where"] == f"{root}:short[test] shard 0 row 2"
    assert [json.loads(r["raw"]) for r in _read(plan_chunks(str(root), 0, "train"))] == _rows("long-train", 4)
    with pytest.raises(HubSourceError, match="could not load it"):
        plan_chunks(str(root), 0, "train", subset="medium")


def test_data_files_with_a_builder_and_with_a_folder(repo, tmp_path, monkeypatch):
    root, files = repo
    monkeypatch.chdir(root)  # relative data_files of a builder: from the current directory, at plan time
    chunks = plan_chunks("json", 1, "train", data_files="data/train-*.jsonl")
    assert chunks[0]["load"]["data_files"] == [str(root / "data" / "train-*.jsonl")]
    assert chunks[0]["label"] == "json(data/train-*.jsonl)[train]"
    monkeypatch.chdir(tmp_path)  # actors run elsewhere
    rows = _read(chunks)
    assert [json.loads(r["raw"]) for r in rows] == _plain(files["train0"]) + _plain(files["train1"])
    assert rows[-1]["where"] == "json(data/train-*.jsonl)[train] shard 1 row 3"
    # data_files relative to a dataset folder pick files of it, here into the default split "train".
    folder = _read(plan_chunks(str(root), 0, "train", data_files=["data/test-00000-of-00001.jsonl"]))
    assert [json.loads(r["raw"]) for r in folder] == _plain(files["test"])


def test_plan_refuses_hub_arguments_on_a_plain_source(tmp_path):
    f = write_jsonl(tmp_path / "p" / "a.jsonl", _rows("a", 2))
    with pytest.raises(HubSourceError, match=r"a.jsonl: subset only apply to a dataset read through"):
        plan_chunks(str(f), 0, "train", subset="x")
    # an HF save_to_disk folder is read directly, so `split` does not apply to it
    import datasets

    datasets.Dataset.from_list(_rows("d", 2)).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(HubSourceError, match=r"disk: split only apply .* this is a hf_disk source"):
        plan_chunks(str(tmp_path / "disk"), 0, "train", hub_split="test")


def test_a_folder_that_changed_since_planning_is_an_error(repo):
    root, _ = repo
    chunks = plan_chunks(str(root), 0, "train")
    write_jsonl(root / "data" / "train-00002-of-00002.jsonl", _rows("late", 1))
    with pytest.raises(HubSourceError, match="3 shards now, 2 when planned"):
        list(read_chunk(chunks[0]))


def test_is_hub_rules(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "file.jsonl", _rows("f", 1))
    write_jsonl(tmp_path / "repo" / "data" / "train.jsonl", _rows("r", 1))
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(_rows("p", 2)).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    datasets.Dataset.from_list(_rows("d", 2)).save_to_disk(str(tmp_path / "disk"))
    assert is_hub("acme/instruct") and is_hub("squad") and is_hub("org/name.v2")
    assert is_hub("repo") and is_hub(str(tmp_path / "repo"))  # a folder load_dataset reads
    assert is_hub("json", data_files="x/*.jsonl") and is_hub("file.jsonl", ["file.jsonl"])  # data_files: always
    assert not is_hub("file.jsonl") and not is_hub(str(tmp_path / "file.jsonl"))  # an existing file
    assert not is_hub("pq") and not is_hub("disk")  # a parquet folder, an HF save_to_disk folder
    assert not is_hub("s3://bucket/acme/instruct") and not is_hub("file:///x/y")  # URIs
    assert not is_hub("missing.jsonl") and not is_hub("acme/missing.parquet")  # a missing file, not a hub id
    assert not is_hub("/abs/missing") and not is_hub("a/b/c") and not is_hub("./acme") and not is_hub("")


def test_unreachable_hub_id_fails_fast_at_plan_time():
    t = time.monotonic()
    with pytest.raises(HubSourceError) as err:
        plan_chunks(MISSING, 0, "train")
    elapsed = time.monotonic() - t
    msg = str(err.value)
    assert msg.startswith(f"{MISSING}: no local file or folder of that name, and the Hugging Face Hub ")
    assert re.search(r"could not be reached|has no dataset", msg)  # offline here; not found where online
    assert "HF_HUB_OFFLINE=1" in msg and f"hf download --repo-type dataset {MISSING} --local-dir" in msg
    assert elapsed < 20  # load_dataset alone retries for about 25 s; the probe makes one request


def test_offline_mode_fails_at_once_with_the_same_advice(tmp_path):
    code = f"from sft_ray.data.sources import plan_chunks; plan_chunks({MISSING!r}, 0, 'train')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t < 30 and out.returncode != 0
    assert f"HubSourceError: {MISSING}[train]: no local file or folder of that name" in out.stderr
    assert "could not be reached" in out.stderr and "HF_HUB_OFFLINE=1" in out.stderr


def test_fingerprint_follows_content_not_location(repo, tmp_path):
    import shutil

    root, files = repo
    src = {"path": str(root), "split": "train", "format": "instruction"}  # a pipeline spec; extra keys ignored
    key = hub_fingerprint(src)
    assert hub_fingerprint(src) == key
    assert hub_fingerprint({**src, "hub_split": "test"}) != key and hub_fingerprint({**src, "subset": "x"}) != key
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "instruct")
    (moved / ".cache").mkdir()  # what `hf download --local-dir` leaves: not content
    (moved / ".cache" / "x.metadata").write_text("123")
    assert hub_fingerprint({**src, "path": str(moved)}) == key
    files["train1"].write_text(files["train1"].read_text().replace("A1", "B1"))
    assert hub_fingerprint(src) != key
    # a builder's data files: their contents, not their paths
    built = {"path": "json", "data_files": [str(files["test"])]}
    copy = shutil.copy(files["test"], tmp_path / "copy.jsonl")
    assert hub_fingerprint(built) == hub_fingerprint({**built, "data_files": str(copy)})
    files["test"].write_text(files["test"].read_text() + json.dumps(_rows("x", 1)[0]) + "\n")
    assert hub_fingerprint(built) != hub_fingerprint({**built, "data_files": str(copy)})
    # a hub id: its args and the commit; the probe's error when the hub is out of reach
    with pytest.raises(HubSourceError, match=MISSING):
        hub_fingerprint({"path": MISSING})


def _config(src):
    return validate({"name": "x", "model": {"path": "m"}, "data": {"train": [src]}})


@pytest.mark.parametrize(
    ("src", "key"),
    [
        ({"path": "train.jsonl", "subset": "s"}, "subset"),
        ({"path": "x/data.parquet", "split": "test"}, "split"),
        ({"path": "s3://bucket/acme/instruct", "revision": "main"}, "revision"),
        ({"path": "a.json", "data_files": ["b.jsonl"]}, "data_files"),
    ],
)
def test_config_refuses_load_dataset_keys_on_a_plain_file(src, key):
    with pytest.raises(ConfigError, match=rf"data\.train\.0\.{key}: .*{key} is a datasets.load_dataset argument"):
        _config(src)


def test_config_hub_keys_round_trip():
    cfg = _config({"path": "acme/instruct", "name": "short", "split": "test", "data_files": "d/*.jsonl"})
    src = cfg.data.train[0]
    assert (src.subset, src.hub_split, src.data_files, src.revision) == ("short", "test", "d/*.jsonl", None)
    # `split` is stored as hub_split: pipeline specs use "split" for train/eval
    dumped = cfg.model_dump(mode="json")
    assert "split" not in dumped["data"]["train"][0] and set(HUB_KEYS) <= set(dumped["data"]["train"][0])
    assert validate(dumped) == cfg  # as the config travels to Ray workers
    assert _config({"path": "acme/instruct", "subset": "s"}).data.train[0].subset == "s"
    with pytest.raises(ConfigError, match=r"data\.train\.0\.data_files: .*at least one"):
        _config({"path": "json", "data_files": []})
