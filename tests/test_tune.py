"""Sweeps: the search space is checked before anything runs; ASHA over one-worker trials on a real local Ray."""

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_config, write_jsonl

from sft_ray.config import ConfigError, load_config

ROWS = [{"question": f"Is {i} even?", "output": "yes" if i % 2 == 0 else "no"} for i in range(32)]
GOOD, TERRIBLE = (5e-3, 3e-3), (1e-7, 1e-6)


def _cfg(tmp_path, tiny_model, space, **train):
    return make_config(
        tmp_path,
        tiny_model,
        write_jsonl(tmp_path / "train.jsonl", ROWS),
        write_jsonl(tmp_path / "eval.jsonl", ROWS[:8]),
        name="sweep",
        lora={"dropout": 0.0},
        # 2 epochs x 32 rows / 4 = 16 steps; an evaluation (and a checkpoint) every 2: 8 reports, then the
        # final one. A stopped trial halts within ~3 reports of its stop (each report waits for Tune to
        # take the one before), so one stopped at step 2 or 4 never reaches the end.
        train={
            "epochs": 2,
            "per_device_batch_size": 4,
            "logging_steps": 1,
            "eval_steps": 2,
            "save_steps": 2,
            "samples": 0,
            **train,
        },
        scaling={"num_workers": 1},
        storage={"keep_checkpoints": 1},
        tune={
            "num_samples": 1,
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "space": space,
        },
    )


def test_space_is_checked_before_anything_runs(tmp_path, tiny_model, monkeypatch):
    from sft_ray.tune import check_space

    lr = {"train.learning_rate": {"choice": [1e-3]}}
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.learning_rat:(.|\n)*train\.learning_rat: unknown key"):
        check_space(_cfg(tmp_path, tiny_model, {"train.learning_rat": {"choice": [1e-3]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.lora\.r:(.|\n)*lora\.r: Input should be greater than 0"):
        check_space(_cfg(tmp_path, tiny_model, {"lora.r": {"grid": [8, 0]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.warmup:(.|\n)*greater than or equal to 0"):
        check_space(_cfg(tmp_path, tiny_model, {"train.warmup": {"uniform": [-1.0, 0.5]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.data\.max_length: trials cannot differ"):
        check_space(_cfg(tmp_path, tiny_model, {"data.max_length": {"choice": [64, 128]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.save_steps=3: .*multiple of train\.eval_steps"):
        check_space(_cfg(tmp_path, tiny_model, {"train.save_steps": {"choice": [2, 3]}}))
    no_eval = _cfg(tmp_path, tiny_model, lr)
    no_eval.data.eval = []
    with pytest.raises(ConfigError, match="set data.eval or data.eval_fraction"):
        check_space(no_eval)
    with pytest.raises(ConfigError, match="no `tune` section"):
        check_space(make_config(tmp_path, tiny_model, tmp_path / "train.jsonl"))

    monkeypatch.chdir(REPO)
    check_space(load_config(REPO / "jobs" / "configs" / "tune_demo.yaml"))


@pytest.mark.slow
def test_asha_sweep_stops_weak_trials_and_exports_the_best(tmp_path, tiny_model, ray_local, capfd):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_ray.tune import format_table, sweep

    # A grid keeps the trial order fixed: the two good learning rates start first (2 CPUs hold
    # 2 one-worker trials), so when a terrible one reaches its first evaluation, a better eval
    # loss is already recorded at that rung and ASHA stops it there.
    cfg = _cfg(tmp_path, tiny_model, {"train.learning_rate": {"grid": [*GOOD, *TERRIBLE]}})
    start = time.time()
    result = sweep(cfg)
    wall = time.time() - start
    out = capfd.readouterr().out
    table = format_table(result["trials"])
    with capfd.disabled():
        print(f"\nsweep of {len(result['trials'])} trials: {wall:.0f}s\n{table}")

    sweep_dir = tmp_path / "storage" / "sweep"
    rows = json.loads((sweep_dir / "results.json").read_text())["trials"]
    assert len(rows) == 4 and {r["trial_id"] for r in rows} == {p.name for p in (sweep_dir / "trials").iterdir()}
    by_lr = {r["params"]["train.learning_rate"]: r for r in rows}
    assert not [r for r in rows if r["status"] == "errored"], [r["error"] for r in rows]
    for lr in TERRIBLE:
        assert by_lr[lr]["status"] == "stopped early" and by_lr[lr]["steps"] < 16, by_lr[lr]
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and all((sweep_dir / "trials" / r["trial_id"] / "final" / "COMPLETE").exists() for r in completed)
    # Every evaluation reached Tune as it happened (a result per report), not only the last one.
    assert [s for s, _ in completed[0]["eval_loss_history"]] == list(range(2, 17, 2))

    # A stopped trial's record is what it reported before it was killed: its last metrics and a
    # registered checkpoint with the adapter, and no final/.
    for lr in TERRIBLE:
        row = by_lr[lr]
        assert row["last_report"]["step"] == row["steps"] and row["last_report"]["checkpoint_path"]
        assert (Path(row["checkpoint"]) / "adapter_model.safetensors").is_file()
        assert not (sweep_dir / "trials" / row["trial_id"] / "final").exists()

    # The data was prepared once, by the sweep's driver: one cache folder, and one "prepared data"
    # line in everything printed, the trials' output included (Ray forwards it to this driver).
    assert len(list((tmp_path / "storage" / "datasets").iterdir())) == 1
    assert out.count("prepared data: ") == 1, [x for x in out.splitlines() if "prepared data" in x]

    assert (sweep_dir / "results.csv").read_text().splitlines()[0].startswith("trial_id,train.learning_rate,")
    assert (sweep_dir / "eval_loss.png").stat().st_size > 1000

    best_row = min(rows, key=lambda r: r["best_eval_loss"])
    assert result["best_trial"] == best_row["trial_id"] and best_row["params"]["train.learning_rate"] in GOOD
    best = sweep_dir / "best"
    trial_cfg = yaml.safe_load((best / "config.yaml").read_text())
    assert trial_cfg["train"]["learning_rate"] == best_row["params"]["train.learning_rate"]
    assert trial_cfg["name"] == f"sweep/trials/{best_row['trial_id']}" and trial_cfg["tune"] is None
    assert not (best / "optimizer.pt").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(best))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())

    # A rerun with the same name resumes the sweep: nothing is left to run, the results stay.
    again = sweep(cfg)
    assert "sweep: resuming" in capfd.readouterr().out
    assert [(r["trial_id"], r["status"], r["steps"]) for r in again["trials"]] == [
        (r["trial_id"], r["status"], r["steps"]) for r in rows
    ]
