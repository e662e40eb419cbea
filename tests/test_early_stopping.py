"""train.early_stopping: the verdict on synthetic curves, the config's refusals, and one real
2-worker run whose eval loss rises: it stops, and final/ is the best evaluation's weights. The run
also restarts once after a worker is killed and logs to W&B and MLflow (one run each across the
restart), so the tracker tests read it too."""

import json
from pathlib import Path

import pytest
from conftest import make_config, train_steps, write_jsonl

from sft_ray.config import ConfigError


def _history(losses: dict[int, float]) -> list[dict]:
    return [{"step": s, "eval_loss": v} for s, v in losses.items()]


def test_judge_counts_evaluations_since_the_last_real_improvement():
    from sft_ray.train.early_stop import judge

    falling = judge(_history({0: 6.0, 2: 5.0, 4: 4.0, 6: 3.0}), patience=2, min_delta=0.0)
    assert falling["stop"] is False and falling["waited"] == 0 and falling["best_step"] == 6
    rising = judge(_history({0: 6.0, 2: 5.0, 4: 5.5, 6: 5.8}), patience=2, min_delta=0.0)
    assert rising["stop"] is True and rising["best_step"] == 2 and rising["best_eval_loss"] == 5.0
    # Improvements smaller than min_delta wait too; the best kept is still the lowest loss.
    creeping = judge(_history({2: 5.0, 4: 4.95, 6: 4.92}), patience=2, min_delta=0.1)
    assert creeping["stop"] is True and creeping["waited"] == 2 and creeping["best_step"] == 6
    assert judge(_history({2: 5.0, 4: 4.95}), patience=2, min_delta=0.1)["stop"] is False
    # Step 0 (the loss before training) has no checkpoint: never the best, never counted.
    assert judge(_history({0: 1.0, 2: 5.0}), patience=1, min_delta=0.0) == {
        "patience": 1,
        "min_delta": 0.0,
        "evaluations": 1,
        "waited": 0,
        "stop": False,
        "best_step": 2,
        "best_eval_loss": 5.0,
    }
    assert judge([{"step": 1, "loss": 3.0}, {"step": 0, "eval_loss": 6.0}], 1, 0.0) is None
    # A resumed run's history holds the earlier attempts' evaluations: one entry per step counts.
    repeated = judge(_history({2: 5.0, 4: 5.5}) + _history({4: 5.5}), patience=2, min_delta=0.0)
    assert repeated["evaluations"] == 2 and repeated["stop"] is False


def test_config_refuses_early_stopping_it_cannot_do(tmp_path, tiny_model):
    data = tmp_path / "t.jsonl"
    data.write_text('{"question": "q", "output": "a"}\n')
    with pytest.raises(ConfigError, match=r"data.eval \(files\) or data.eval_fraction"):
        make_config(tmp_path, tiny_model, data, train={"early_stopping": {"patience": 2}})
    with pytest.raises(ConfigError, match=r"train.save_steps equal to train.eval_steps \(now 50 and 10\)"):
        make_config(tmp_path, tiny_model, data, data, train={"early_stopping": {"patience": 2}, "eval_steps": 10})
    with pytest.raises(ConfigError, match="patience"):
        make_config(tmp_path, tiny_model, data, data, train={"early_stopping": {"patience": 0}})
    cfg = make_config(tmp_path, tiny_model, data, data, train={"early_stopping": {"patience": 3, "min_delta": 0.01}})
    assert cfg.train.early_stopping.patience == 3 and cfg.train.early_stopping.min_delta == 0.01


# Train answers and held-out answers disagree on the same questions: the more the model learns to
# answer "yes", the less likely the held-out "no no no no" gets, so the eval loss rises after its
# first evaluations (measured: a held-out answer in words the training never uses only flattens).
TRAIN = [{"question": f"Is {i} a number?", "output": "yes"} for i in range(64)]
EVAL = [{"question": f"Is {i} a number?", "output": "no no no no"} for i in range(8)]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model, ray_local):
    """One real 2-worker run shared with the tracker tests: early stopping on, both trackers on,
    and rank 0 killed once at step 6 (`train.max_failures: 1`), so the restarted attempt resumes
    from the last uploaded checkpoint (2 or 4), carries on counting evaluations from the
    checkpoint's history, and logs into the same tracker runs."""
    from test_tracking import tracker_env

    from sft_ray.train.driver import train

    tmp = tmp_path_factory.mktemp("early")
    cfg = make_config(
        tmp,
        tiny_model,
        write_jsonl(tmp / "train.jsonl", TRAIN),
        write_jsonl(tmp / "eval.jsonl", EVAL),
        name="early",
        lora={"dropout": 0.0},
        train={
            "per_device_batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "samples": 0,
            "max_steps": 40,
            "eval_steps": 2,
            "save_steps": 2,
            "early_stopping": {"patience": 2},
            "report_to": ["wandb", "mlflow"],
            "max_failures": 1,
        },
        scaling={"num_workers": 2},
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tracker_env(tmp).items():
            mp.setenv(k, v)  # set after the session's Ray started: the driver forwards them
        mp.setenv("SFT_RAY_FAIL_AT_STEP", "6")
        summary = train(cfg)
    return summary, tmp / "storage" / "early", cfg, tmp


def test_a_run_stops_early_and_keeps_its_best_evaluation(stopped):
    summary, run = stopped[:2]
    stop = summary["early_stopping"]
    evals: dict[int, float] = {}  # during training; the final evaluation is logged at the last step too
    for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        if "eval_loss" in e and e["step"] > 0:
            evals.setdefault(e["step"], e["eval_loss"])
    print(stop["line"], evals)
    assert stop["stopped_at"] == summary["global_step"] < 40
    assert train_steps(run) == list(range(1, stop["stopped_at"] + 1))
    best = min(evals, key=evals.get)
    assert stop["best_step"] == stop["kept_step"] == best < stop["stopped_at"]
    assert stop["waited"] == 2 and sorted(evals).index(best) == len(evals) - 3  # patience 2, min_delta 0
    # The final evaluation ran on the best checkpoint's weights: it gives that evaluation's loss.
    assert summary["eval_loss_after"] == pytest.approx(evals[best], rel=1e-5)
    assert summary["eval_loss_after"] < evals[stop["stopped_at"]]
    assert f"stopped early at step {stop['stopped_at']}" in stop["line"]
    assert f"final/ holds the weights of step {best}" in stop["line"]
    stored = json.loads((run / "final" / "metrics.json").read_text())
    assert stored["early_stopping"]["kept_step"] == best


def test_final_is_the_best_checkpoints_adapter(stopped):
    from safetensors.torch import load_file

    summary, run = stopped[:2]
    best = summary["early_stopping"]["best_step"]
    final = load_file(run / "final" / "adapter_model.safetensors")
    kept = load_file(run / f"checkpoint-{best:07d}" / "adapter_model.safetensors")
    last = load_file(run / f"checkpoint-{summary['global_step']:07d}" / "adapter_model.safetensors")
    assert final.keys() == kept.keys()
    assert all((final[k] == kept[k]).all() for k in final)
    assert any((final[k] != last[k]).any() for k in final)


def test_the_report_says_it_stopped_early(stopped):
    from sft_ray.report import write_report

    summary, run = stopped[:2]
    page = (write_report(str(run)) / "index.html").read_text()
    assert f"stopped early at step {summary['early_stopping']['stopped_at']}" in page


def test_both_trackers_hold_one_run_across_the_restart(stopped, monkeypatch):
    """The driver's tracker settings reach the workers; each tracker holds one run (rank 0's) for
    both attempts, named after the run, with the loss of every step metrics.jsonl has; MLflow holds
    the final adapter byte for byte and ends FINISHED."""
    import mlflow
    from test_tracking import mlflow_losses, mlflow_run, tracker_env, wandb_losses, wandb_run

    summary, run_dir, cfg, tmp = stopped
    for k, v in tracker_env(tmp).items():  # the MLflow client reads the file store as the run wrote it
        monkeypatch.setenv(k, v)
    assert train_steps(run_dir) == list(range(1, summary["global_step"] + 1))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in metrics if "loss" in e}
    manifest = json.loads((run_dir / "final" / "data_manifest.json").read_text())
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert ids["config"] == cfg.model_dump(mode="json")

    run = wandb_run(tmp / "wandb-dir", attempts=2)  # a folder per attempt, one run id
    assert (run["name"], run["project"], run["id"]) == ("early", "sft-ray-tests", ids["wandb"])
    # W&B: every step of the restarted attempt (from step 6 at the latest), with metrics.jsonl's
    # losses. The killed attempt's records were measured lost (SIGKILL before W&B wrote its file).
    logged = wandb_losses(run)
    assert set(range(6, summary["global_step"] + 1)) <= set(logged) <= set(losses)
    assert logged == pytest.approx({s: losses[s] for s in logged})
    assert run["config"]["sft_ray"] == cfg.model_dump(mode="json")
    assert run["config"]["data_manifest"] == manifest
    assert json.loads(Path(run["dir"], "files", "data_manifest.json").read_text()) == manifest
    assert any("train/trained_tokens_per_s" in h for h in run["history"])  # RunCallback's keys reach it

    client, mrun = mlflow_run(tmp, "early")  # one run for both attempts
    assert mrun.info.status == "FINISHED" and mrun.info.run_id == ids["mlflow"]
    # The steps between the checkpoint resumed from and the kill at step 6 are logged twice (which
    # checkpoint depends on how far the background uploads had got), the last value is the rerun's.
    assert mlflow_losses(client, mrun, again=tuple(range(1, 7))) == pytest.approx(losses)
    assert client.get_metric_history(mrun.info.run_id, "trained_tokens_per_s")
    assert mrun.data.params["sft_ray.name"] == "early"
    assert mrun.data.params["sft_ray.scaling.num_workers"] == "2"
    got = Path(client.download_artifacts(mrun.info.run_id, "final", str(tmp / "fetched")))
    final = run_dir / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml"):
        assert (got / name).read_bytes() == (final / name).read_bytes()
    assert mlflow.artifacts.load_dict(f"{mrun.info.artifact_uri}/data_manifest.json") == manifest
