"""Exact resume and surviving a killed worker, on a real local Ray with 2 CPU workers."""

import glob
import json
import tempfile

import pytest
from conftest import train_steps, two_worker_config

ROWS = [{"question": f"What is {i} plus one?", "output": f"{i + 1}"} for i in range(64)]


def _cfg(tmp_path, tiny_model, name, **train):
    return two_worker_config(tmp_path, tiny_model, ROWS, name, epochs=2, eval_steps=4, save_steps=4, **train)


@pytest.mark.slow
def test_interrupted_then_killed_run_matches_uninterrupted(tmp_path, tiny_model, ray_local, monkeypatch):
    import ray.train

    from sft_ray.train.driver import train

    full = train(_cfg(tmp_path, tiny_model, "full"))
    assert full["global_step"] == 16  # 64 rows / (2 x 4) = 8 steps per epoch

    # 1. Interrupted: rank 1 is killed at step 6 and no restart is allowed, so the run fails.
    monkeypatch.setenv("SFT_RAY_FAIL_AT_STEP", "6:1")
    with pytest.raises(ray.train.TrainingFailedError):
        train(_cfg(tmp_path, tiny_model, "cut"))
    run = tmp_path / "storage" / "cut"
    assert not (run / "final").exists()
    # A half-written checkpoint folder that Ray never registered must not be resumed from.
    (run / "checkpoint-0000099").mkdir()
    (run / "checkpoint-0000099" / "trainer_state.json").write_text("{half")

    # 2. Rerun with the same name: resumes from step 4; a worker killed at step 10 restarts from step 8.
    monkeypatch.setenv("SFT_RAY_FAIL_AT_STEP", "10:1")
    resumed = train(_cfg(tmp_path, tiny_model, "cut", max_failures=1))
    assert resumed["global_step"] == 16
    # Steps 1-5 ran before the first kill; the rerun continued at 5 (after checkpoint 4), the restart
    # at 9 (after checkpoint 8). Each attempt replaced the lines logged after its checkpoint.
    assert train_steps(run) == list(range(1, 17))
    assert (run / "final" / "COMPLETE").exists() and (run / "final" / "adapter_model.safetensors").exists()

    full_hist = {e["step"]: e["loss"] for e in full["history"]["train"]}
    final_loss = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert final_loss["step"] == 16
    assert final_loss["loss"] == pytest.approx(full_hist[16], rel=1e-3)
    assert resumed["eval_loss_after"] == pytest.approx(full["eval_loss_after"], rel=1e-3)
    assert resumed["eval_loss_before"] == pytest.approx(full["eval_loss_before"], rel=1e-6)  # kept from run 1
    # Each attempt removes the scratch its killed predecessors left on this node (HF checkpoints with
    # optimizer state) and its own at the end: only staged uploads may remain, which Ray deletes.
    left = [p for d in glob.glob(f"{tempfile.gettempdir()}/sft-ray/cut-*") for p in glob.glob(f"{d}/*")]
    assert not [p for p in left if "/upload-" not in p], left
