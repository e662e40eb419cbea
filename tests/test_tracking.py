"""W&B and MLflow (`train.report_to`): offline W&B run files and a local MLflow file store, read
back: the run named after `name`, a loss at every logging step, the resolved config and the data
manifest attached, the final adapter as an MLflow artifact. The real 2-worker run (one tracker run
across a worker restart) is shared with early stopping: tests/test_early_stopping.py."""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path

import pytest

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ROWS = [{"question": f"What is {i} plus one?", "output": f"{i + 1}"} for i in range(64)]


def tracker_env(tmp_path: Path) -> dict:
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_PROJECT": "sft-ray-tests",
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_EXPERIMENT_NAME": "sft-ray-tests",
        # MLflow 3 refuses the file store unless told; a server or sqlite:// needs more than mlflow-skinny.
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }


def wandb_records(run_dir: str) -> list:
    """Every record of an offline run's `.wandb` file. Its format: a 7-byte header (`:W&B`, a
    version), then LevelDB log blocks of 32 KiB, each record (checksum, length, type: 1 full,
    2 first, 3 middle, 4 last) a piece of a serialized `Record` protobuf. wandb ships no reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too small for a header: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero fill (preallocated or padded block)
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def wandb_run(wandb_dir: Path, attempts: int = 1) -> dict:
    """The one offline run under WANDB_DIR: its name, project, config, history rows, saved files.
    A resumed run leaves a folder per attempt, each named with the same run id; read in order."""
    runs = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*")))
    assert len(runs) == attempts, runs  # rank 0 alone opened a run
    assert len({r.rsplit("-", 1)[1] for r in runs}) == 1, runs  # one run id
    out = {"dir": runs[0], "history": [], "config": {}, "files": set(), "id": runs[0].rsplit("-", 1)[1]}
    for r in (record for run in runs for record in wandb_records(run)):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = r.run.display_name, r.run.project
            out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "files":
            out["files"].update(f.path for f in r.files.files)
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def wandb_losses(run: dict) -> dict[int, float]:
    """The loss of each step, the last logged (a resumed attempt trains some steps again)."""
    return {int(h["train/global_step"]): h["train/loss"] for h in run["history"] if "train/loss" in h}


def mlflow_run(tmp_path: Path, name: str):
    """The one MLflow run of the test experiment, and a client on the file store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("sft-ray-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 0 alone, and no stray run for the last eval
    assert runs[0].info.run_name == name
    return client, runs[0]


def mlflow_losses(client, run, again: tuple[int, ...] = ()) -> dict[int, float]:
    """The loss of each step, the last logged; each once, but the steps in `again` (those a
    restarted attempt may have trained twice) at most twice."""
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp)
    steps = [m.step for m in history]
    assert all(steps.count(s) == 1 or (s in again and steps.count(s) == 2) for s in steps), steps
    return {m.step: m.value for m in history}


def _rows(tokenizer, n: int) -> list[dict]:
    from sft_ray.data.formats import render_record
    from sft_ray.data.tokenize import encode_batch, special_ids

    examples = [ex for r in ROWS[:n] for ex in render_record(r, "instruction")]
    return [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in encode_batch(tokenizer, examples, special_ids(tokenizer), 64)
    ]


def test_one_process_run_logs_every_step_config_manifest_and_adapter(tiny_model, tokenizer, tmp_path, monkeypatch):
    """The worker's pieces without Ray: `tracking.start` before the HF integrations, a few steps,
    the final evaluation after training (still in the same MLflow run), `tracking.close` with a
    final folder."""
    import datasets
    import mlflow
    import torch
    from trl import SFTTrainer

    from sft_ray.config import validate
    from sft_ray.model import load_model, lora_config
    from sft_ray.train import tracking
    from sft_ray.train.collate import make_collator
    from sft_ray.train.worker import _sft_config

    env = tracker_env(tmp_path)
    for k, v in env.items():  # restored after the test; start() sets them again from the loop config
        monkeypatch.setenv(k, v)
    cfg = validate(
        {
            "name": "tracked-unit",
            "model": {"path": str(tiny_model), "dtype": "float32"},
            "lora": {"dropout": 0.0},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "storage": {"path": str(tmp_path / "storage")},
            "train": {"max_steps": 4, "logging_steps": 1, "per_device_batch_size": 4, "report_to": ["wandb", "mlflow"]},
        }
    )
    manifest = {"splits": {"train": {"rows_written": 16}}, "note": "a manifest"}
    assert tracking.driver_env(cfg, {**env, "WANDB_API_KEY": "secret", "HOME": "/x"}) == env
    tracking.start(cfg, {"manifest": manifest, "tracker_env": env}, 0, str(tmp_path / "storage" / cfg.name), False)
    device = torch.device("cpu")
    rows = datasets.Dataset.from_list(_rows(tokenizer, 16))
    trainer = SFTTrainer(
        model=load_model(cfg, device),
        args=_sft_config(cfg, str(tmp_path / "out"), device, has_eval=True, resumed=True),
        train_dataset=rows,
        eval_dataset=rows.select(range(8)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        data_collator=make_collator(tokenizer.pad_token_id, False),
    )
    trainer.train()
    final_eval = trainer.evaluate()["eval_loss"]
    final = tmp_path / "storage" / "tracked-unit" / "final"
    trainer.save_model(str(final))
    tracking.close(cfg, rank=0, final_dir=str(final))
    assert mlflow.active_run() is None

    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == [1, 2, 3, 4]

    run = wandb_run(tmp_path / "wandb-dir")
    assert (run["name"], run["project"]) == ("tracked-unit", "sft-ray-tests")
    assert wandb_losses(run) == pytest.approx(logged)
    assert run["config"]["sft_ray"] == cfg.model_dump(mode="json")
    assert run["config"]["data_manifest"] == manifest
    assert {"sft_ray_config.json", "data_manifest.json"} <= run["files"]
    assert json.loads(Path(run["dir"], "files", "data_manifest.json").read_text()) == manifest

    client, mrun = mlflow_run(tmp_path, "tracked-unit")
    assert mrun.info.status == "FINISHED"
    assert mlflow_losses(client, mrun) == pytest.approx(logged)
    evals = client.get_metric_history(mrun.info.run_id, "eval_loss")
    assert evals[-1].value == pytest.approx(final_eval)  # logged after on_train_end, into the same run
    params = mrun.data.params
    assert params["sft_ray.name"] == "tracked-unit"
    assert params["sft_ray.train.report_to"] == '["wandb", "mlflow"]'
    assert float(params["sft_ray.train.learning_rate"]) == cfg.train.learning_rate
    assert params["learning_rate"] == str(cfg.train.learning_rate)  # the HF callback's TrainingArguments
    got = Path(client.download_artifacts(mrun.info.run_id, "final", str(tmp_path / "fetched")))
    assert (got / "adapter_model.safetensors").read_bytes() == (final / "adapter_model.safetensors").read_bytes()
    assert mlflow.artifacts.load_dict(f"{mrun.info.artifact_uri}/data_manifest.json") == manifest


def test_a_failed_attempt_ends_its_tracker_runs_as_failed(tiny_model, tmp_path, monkeypatch):
    """An attempt that raises inside `closed_on_failure` ends its tracker runs as failed (MLflow
    FAILED, W&B exit code 1) instead of leaving them open as running, and its error goes on."""
    from sft_ray.config import validate
    from sft_ray.train import tracking

    env = tracker_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = validate(
        {
            "name": "failed-unit",
            "model": {"path": str(tiny_model)},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "storage": {"path": str(tmp_path / "storage")},
            "train": {"report_to": ["wandb", "mlflow"]},
        }
    )
    tracking.start(cfg, {"manifest": {}, "tracker_env": env}, 0, str(tmp_path / "storage" / cfg.name), False)
    with pytest.raises(MemoryError, match="the attempt's own error"):
        with tracking.closed_on_failure(cfg, rank=0):
            raise MemoryError("the attempt's own error")
    assert mlflow_run(tmp_path, "failed-unit")[1].info.status == "FAILED"
    assert wandb_run(tmp_path / "wandb-dir")["exit_code"] == 1


def test_the_worker_runs_its_attempt_inside_closed_on_failure():
    """The wiring of the test above: train_loop's work, from building the trainer to final/, is
    inside `tracking.closed_on_failure`."""
    import inspect

    from sft_ray.train import worker

    source = inspect.getsource(worker.train_loop)
    inside = source.split("with tracking.closed_on_failure(cfg, me.rank):")[1]
    assert "build_trainer(" in inside and "finish(" in inside.split("tracking.close(cfg, me.rank, summary")[0]


def test_report_to_accepts_wandb_and_names_the_run(tiny_model, tmp_path):
    import torch

    from sft_ray.config import ConfigError, validate
    from sft_ray.train.worker import _sft_config

    cfg = validate(
        {
            "name": "named",
            "model": {"path": str(tiny_model)},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "train": {"report_to": ["wandb", "mlflow", "tensorboard"]},
        }
    )
    args = _sft_config(cfg, str(tmp_path / "out"), torch.device("cpu"), has_eval=False, resumed=False)
    assert args.run_name == "named"
    assert sorted(args.report_to) == ["mlflow", "tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="report_to"):
        validate(
            {
                "name": "x",
                "model": {"path": "m"},
                "data": {"train": [{"path": "a"}]},
                "train": {"report_to": ["neptune"]},
            }
        )
