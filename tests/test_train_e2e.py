"""End to end on a real local Ray: 2 CPU workers, TRL SFTTrainer with LoRA, adapter in final/."""

import hashlib
import json

import pytest
from conftest import make_config, write_jsonl

ROWS = [{"question": f"Is {i} even?", "output": "yes" if i % 2 == 0 else "no"} for i in range(48)]


@pytest.mark.slow
def test_two_workers_train_and_write_final(tmp_path, tiny_model, tokenizer, ray_local):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sft_ray.train.driver import train

    base_digest = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    cfg = make_config(
        tmp_path,
        tiny_model,
        write_jsonl(tmp_path / "train.jsonl", ROWS),
        write_jsonl(tmp_path / "eval.jsonl", ROWS[:8]),
        name="e2e",
        train={
            "epochs": 1,
            "per_device_batch_size": 4,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "eval_steps": 3,
            "save_steps": 3,
            "samples": 2,
        },
        scaling={"num_workers": 2},
        storage={"keep_checkpoints": 1},
    )
    summary = train(cfg)

    # 48 rows / (4 per worker x 2 workers) = 6 steps: each row once per epoch, no double sharding.
    assert summary["global_step"] == 6
    run = tmp_path / "storage" / "e2e"
    final = run / "final"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "config.yaml",
        "metrics.json",
        "samples.json",
    } <= {p.name for p in final.iterdir()}
    metrics = json.loads((final / "metrics.json").read_text())
    assert [e["step"] for e in metrics["history"]["train"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in metrics["history"]["eval"]] == [0, 3, 6]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert len(json.loads((final / "samples.json").read_text())["samples"]) == 2
    # keep_checkpoints=1: only the step-6 checkpoint remains, holding what a resume needs.
    ckpts = sorted(p.name for p in run.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-0000006"]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in (run / ckpts[0]).iterdir()
    }

    # The adapter holds LoRA tensors only, all B matrices moved away from their zero init.
    tensors = load_file(final / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    # The base on disk is untouched, and the adapter loads onto it and changes its outputs.
    assert hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest() == base_digest
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.tensor([tokenizer("### Question\nIs 3 even?\n\n### Output\n")["input_ids"]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(final))
        tuned_logits = tuned(ids).logits
        base_again = tuned.get_base_model()
    assert not torch.allclose(base_logits, tuned_logits)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    for name, value in base_again.state_dict().items():
        if "lora_" not in name and "base_layer" not in name and name in fresh:
            assert torch.equal(value, fresh[name]), name
