"""Training with storage.path on s3:// (a real S3-protocol server, moto, on 127.0.0.1).

The driver, the Ray Data tasks and the Ray Train workers reach the bucket through the environment
(AWS_ENDPOINT_URL and credentials, set by the s3_server fixture before Ray starts), as on a cluster.
Nothing may be written to a local folder instead.
"""

import json
from pathlib import Path

import pytest
from conftest import make_config, write_jsonl

ROWS = [{"question": f"What is {i} plus two?", "output": f"{i + 2}"} for i in range(32)]
CHECKPOINT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "rng_state_0.pth",
    "rng_state_1.pth",
}
FINAL_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml", "metrics.json"}


def _cfg(tmp_path, tiny_model, bucket, epochs):
    return make_config(
        tmp_path,
        tiny_model,
        write_jsonl(tmp_path / "train.jsonl", ROWS),
        write_jsonl(tmp_path / "eval.jsonl", ROWS[:8]),
        name="s3run",
        lora={"dropout": 0.0},
        train={"epochs": epochs, "per_device_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1,
               "eval_steps": 2, "save_steps": 2, "samples": 1},
        scaling={"num_workers": 2},
        storage={"path": f"s3://{bucket}/runs", "keep_checkpoints": 2},
    )  # fmt: skip


def _objects(s3, bucket: str, prefix: str) -> dict[str, dict]:
    """Every object under prefix, keyed by its path relative to prefix."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({o["Key"][len(prefix) :]: o for o in page.get("Contents", [])})
    return found


def _checkpoints(objects: dict) -> dict[str, set[str]]:
    """checkpoint-NNNNNNN folder -> the file names directly inside it."""
    out: dict[str, set[str]] = {}
    for key in objects:
        folder, _, name = key.partition("/")
        if folder.startswith("checkpoint-") and "/" not in name:
            out.setdefault(folder, set()).add(name)
    return out


def _train_steps(s3, bucket: str) -> list[int]:
    body = s3.get_object(Bucket=bucket, Key="runs/s3run/metrics.jsonl")["Body"].read().decode()
    return [json.loads(line)["step"] for line in body.splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_train_on_s3_then_resume_from_the_bucket(tmp_path, tiny_model, s3_bucket, ray_local, monkeypatch):
    import boto3
    from safetensors.torch import load

    from sft_ray.train.driver import train

    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would show up here as ./s3:/...
    s3 = boto3.client("s3")

    # 1. One epoch: 32 rows / (2 workers x 4) = 4 steps, a checkpoint every 2.
    first = train(_cfg(tmp_path, tiny_model, s3_bucket, epochs=1))
    assert first["global_step"] == 4
    assert first["final_dir"] == f"s3://{s3_bucket}/runs/s3run/final"
    # Each worker read its own half of the rows from the bucket, memory-mapped.
    assert [(s["rows"], s["memory_mapped"]) for s in first["data_shares"]] == [(16, True), (16, True)]

    datasets = _objects(s3, s3_bucket, "runs/datasets/")
    manifests = [k for k in datasets if k.count("/") == 1 and k.endswith("/manifest.json")]
    assert len(manifests) == 1, sorted(datasets)
    key = manifests[0].split("/")[0]
    assert any(k.startswith(f"{key}/train/") and k.endswith(".parquet") for k in datasets)
    assert any(k.startswith(f"{key}/eval/") and k.endswith(".parquet") for k in datasets)
    manifest_etag = datasets[manifests[0]]["ETag"]

    run = _objects(s3, s3_bucket, "runs/s3run/")
    ckpts = _checkpoints(run)
    assert "checkpoint-0000004" in ckpts and len(ckpts) <= 3, sorted(ckpts)
    for name, files in ckpts.items():
        assert CHECKPOINT_FILES <= files, (name, sorted(files))
    assert FINAL_FILES | {"COMPLETE"} <= {k[len("final/") :] for k in run if k.startswith("final/")}
    assert "checkpoint_manager_snapshot.json" in run  # what Ray Train resumes from
    assert _train_steps(s3, s3_bucket) == [1, 2, 3, 4]
    adapter = load(s3.get_object(Bucket=s3_bucket, Key="runs/s3run/final/adapter_model.safetensors")["Body"].read())
    assert adapter and all("lora_" in k for k in adapter)
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)

    # Nothing landed on local disk instead of the bucket.
    assert not (tmp_path / "storage").exists() and not Path("s3:").exists()

    # 2. Same name, two epochs: resumes from the bucket's step-4 checkpoint and trains steps 5-8 only.
    second = train(_cfg(tmp_path, tiny_model, s3_bucket, epochs=2))
    assert second["global_step"] == 8
    assert _train_steps(s3, s3_bucket) == [1, 2, 3, 4, 5, 6, 7, 8]  # a fresh start would repeat 1-4
    assert second["eval_loss_before"] == pytest.approx(first["eval_loss_before"], rel=1e-6)  # kept in the bucket
    datasets = _objects(s3, s3_bucket, "runs/datasets/")
    assert datasets[manifests[0]]["ETag"] == manifest_etag  # prepared data reused, not rewritten
    run = _objects(s3, s3_bucket, "runs/s3run/")
    ckpts = _checkpoints(run)
    assert "checkpoint-0000008" in ckpts and len(ckpts) <= 3, sorted(ckpts)
    assert CHECKPOINT_FILES <= ckpts["checkpoint-0000008"]
    final_metrics = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/s3run/final/metrics.json")["Body"].read())
    assert final_metrics["global_step"] == 8
    assert "final/COMPLETE" in run
    assert not Path("s3:").exists()

    # 3. `sft-ray eval` of the run in the bucket, on its best checkpoint: each replica downloads it
    # (not its optimizer state), and the rows and summary land in the bucket, whole. The tuned
    # reference loss is the eval loss the trainer logged for that checkpoint's weights.
    from sft_ray.evaluation.run import evaluate
    from sft_ray.train.checkpoints import checkpoint_metrics

    cfg = _cfg(tmp_path, tiny_model, s3_bucket, epochs=2)
    cfg.eval.max_new_tokens = 4
    (summary,) = evaluate(cfg, checkpoint="best")
    assert summary["tuned_weights"].startswith(f"s3://{s3_bucket}/runs/s3run/checkpoint-") and summary["examples"] == 8
    logged = checkpoint_metrics(summary["tuned_weights"])["eval_loss"]
    assert summary["tuned"]["loss"] == pytest.approx(logged, rel=2e-2), (summary["tuned"], logged)
    run = _objects(s3, s3_bucket, "runs/s3run/eval/eval/")
    assert {"summary.json", "examples.parquet", "examples.jsonl", "COMPLETE"} <= set(run), sorted(run)
    assert not (tmp_path / "storage").exists() and not Path("s3:").exists()
