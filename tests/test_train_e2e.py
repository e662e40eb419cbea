"""End to end on a real local Ray: 2 CPU workers, TRL SFTTrainer with LoRA, adapter in final/."""

import glob
import hashlib
import json
import os
import tempfile
import time

import pytest
from conftest import make_config, write_jsonl

ROWS = [{"question": f"Is {i} even?", "output": "yes" if i % 2 == 0 else "no"} for i in range(48)]


@pytest.mark.slow
def test_two_workers_train_and_write_final(tmp_path, tiny_model, tokenizer, ray_local, capsys):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sft_ray.export import find_checkpoint, merge
    from sft_ray.report import write_report
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
            "eval_steps": 2,
            "save_steps": 2,
            "samples": 2,
            "report_to": ["tensorboard"],
        },
        scaling={"num_workers": 2},
        storage={"keep_checkpoints": 1},
    )
    started = time.time()
    summary = train(cfg)

    # 48 rows / (4 per worker x 2 workers) = 6 steps: each row once per epoch, no double sharding.
    assert summary["global_step"] == 6
    # The workers' local scratch (HF checkpoints with optimizer state) is gone; storage keeps what counts.
    scratch = [d for d in glob.glob(f"{tempfile.gettempdir()}/sft-ray/e2e-*") if os.path.getmtime(d) >= started - 1]
    assert scratch and not [p for d in scratch for p in glob.glob(f"{d}/*") if "/upload-" not in p], scratch
    run = tmp_path / "storage" / "e2e"
    final = run / "final"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "config.yaml",
        "metrics.json",
        "samples.json",
        "data_manifest.json",
        "COMPLETE",
    } <= {p.name for p in final.iterdir()}
    metrics = json.loads((final / "metrics.json").read_text())
    assert [e["step"] for e in metrics["history"]["train"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in metrics["history"]["eval"]] == [0, 2, 4, 6]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    samples = json.loads((final / "samples.json").read_text())
    assert len(samples["samples"]) == 2 and 0 <= samples["eos_share_after"] <= 1
    exact = sum(x["after"] == x["reference"] for x in samples["samples"]) / 2
    assert samples["exact_share_after"] == metrics["exact_share_after"] == exact
    assert all(x["reference"].endswith("<|im_end|>") for x in samples["samples"])  # EOS is part of an exact answer

    # metrics.jsonl: one line per log, with throughput and memory on training logs.
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(x["trained_tokens_per_s"] > 0 and 0 < x["real_tokens_fraction"] <= 1 for x in train_lines)
    assert all(x["peak_memory_mb"] > 50 and "learning_rate" in x and "grad_norm" in x for x in train_lines)
    assert sorted({x["step"] for x in lines if "eval_loss" in x}) == [0, 2, 4, 6]  # 0: before training
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # keep_checkpoints=1 keeps the best by eval loss and always the latest (step 6).
    ckpts = sorted(p.name for p in run.glob("checkpoint-*"))
    assert "checkpoint-0000006" in ckpts and len(ckpts) <= 2
    latest = run / "checkpoint-0000006"
    assert {
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state_0.pth",
        "rng_state_1.pth",
    } <= {p.name for p in latest.iterdir()}
    assert not list(latest.glob("*/adapter_model.safetensors"))  # one copy, no nested duplicates

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

    # Report and export work on the real run folder.
    report = write_report(str(run))
    assert (report / "loss.png").stat().st_size > 1000 and "eval" in (report / "index.html").read_text()
    assert find_checkpoint(str(run), "latest") == latest
    merged = merge(str(find_checkpoint(str(run), "final")), str(tmp_path / "merged"))
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)

    # Rerunning the finished run trains nothing and rewrites nothing: the same config is answered
    # from final/ without starting a worker; a changed config that adds no step (here only the
    # logging interval) resumes, finds no step left and keeps final/ as it was.
    def files(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    kept, kept_lines = files(final), (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = train(cfg)
    assert "run e2e already finished with this config" in capsys.readouterr().out
    assert files(final) == kept and (run / "metrics.jsonl").read_text() == kept_lines
    assert again["global_step"] == 6 and again["tokens_per_second"] == summary["tokens_per_second"]
    assert again["samples"] == summary["samples"] and again["final_dir"] == summary["final_dir"]
    cfg.train.logging_steps = 2
    resumed = train(cfg)
    assert files(final) == kept and resumed["global_step"] == 6
    assert resumed["tokens_per_second"] == summary["tokens_per_second"]
    # But a final/ of an earlier step (a run extended, then stopped after its last checkpoint and
    # before its final/) is replaced by the adapter of the step resumed from.
    stale = {**json.loads((final / "metrics.json").read_text()), "global_step": 4}
    (final / "metrics.json").write_text(json.dumps(stale))
    cfg.train.logging_steps = 3
    assert train(cfg)["global_step"] == 6
    rewritten = json.loads((final / "metrics.json").read_text())
    assert rewritten["global_step"] == 6 and rewritten["tokens_per_second"] is None  # no step in that attempt


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_qlora_two_workers_awkward_row_count(tmp_path, tiny_model, ray_local, packing):
    """13 rows (or 7 packed rows) on 2 workers: filler rows even out the steps, every row trained once, no hang."""
    from safetensors.torch import load_file

    from sft_ray.train.driver import train

    # Examples are 17-19 tokens: max_length 40 packs two to a row, 13 examples into 7 rows.
    data = {"packing": True, "max_length": 40} if packing else {}
    cfg = make_config(
        tmp_path,
        tiny_model,
        write_jsonl(tmp_path / "train.jsonl", ROWS[:13]),
        name="qlora",
        quantization={"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        lora={"target_modules": "all-linear"},
        data=data,
        train={
            "epochs": 2,
            "per_device_batch_size": 2 if packing else 4,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_steps": 100,
        },
        scaling={"num_workers": 2},
    )
    summary = train(cfg)
    # ceil(13 / (2 x 4)) = 2 steps per epoch padded; ceil(7 / (2 x 2)) = 2 packed; 2 epochs.
    assert summary["global_step"] == 4
    manifest = json.loads(next((tmp_path / "storage" / "datasets").glob("*/manifest.json")).read_text())
    assert manifest["layout"]["rows"] == (7 if packing else 13)
    # Each worker held its own contiguous share, memory-mapped, and filler up to whole batches of
    # the same count on both: 6 + 7 rows padded to 8 each (batches of 4), or 3 + 4 packed rows to 4.
    shares = [(s["rank"], s["rows"], s["filler"], s["memory_mapped"]) for s in summary["data_shares"]]
    assert shares == ([(0, 3, 1, True), (1, 4, 0, True)] if packing else [(0, 6, 2, True), (1, 7, 1, True)])
    # The HF Trainer's samples/s counts every worker's rows (filler included), not one worker's share.
    logs = [json.loads(line) for line in (tmp_path / "storage" / "qlora" / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in logs if "train_samples_per_second" in e)
    rows = 2 * (4 if packing else 8)  # both workers' rows per epoch
    assert end["train_samples_per_second"] == pytest.approx(2 * rows / end["train_runtime"], rel=0.05)
    tensors = load_file(tmp_path / "storage" / "qlora" / "final" / "adapter_model.safetensors")
    assert any("mlp.down_proj" in k for k in tensors)  # all-linear reached the MLP
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    if packing:  # batches are packed rows: almost no compute goes to padding (filler rows aside)
        # Tokens seen, summed over both workers: every real token of the packed rows, once per epoch.
        assert summary["tokens_seen"] == 2 * manifest["layout"]["real_tokens"]
        logs = [
            json.loads(line) for line in (tmp_path / "storage" / "qlora" / "metrics.jsonl").read_text().splitlines()
        ]
        fractions = [e["real_tokens_fraction"] for e in logs if "real_tokens_fraction" in e]
        assert len(fractions) == 4 and max(fractions) > 0.85, fractions


def test_unwritable_storage_fails_before_training(tmp_path, tiny_model):
    from sft_ray.storage import StorageError
    from sft_ray.train.driver import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = make_config(tmp_path, tiny_model, write_jsonl(tmp_path / "t.jsonl", ROWS), storage={"path": str(blocker)})
    with pytest.raises(StorageError, match="is not writable"):
        train(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_qlora_bf16_on_every_gpu_through_ray(tmp_path, tiny_model, ray_local, packing):
    """One worker per visible GPU (Ray gives each its own): QLoRA with bf16 compute trains every
    LoRA layer, padded and packed, and writes final/. Placement itself is Ray's: not asserted here."""
    import torch
    from safetensors.torch import load_file

    from sft_ray.train.driver import train

    gpus = torch.cuda.device_count()
    cfg = make_config(
        tmp_path,
        tiny_model,
        write_jsonl(tmp_path / "train.jsonl", ROWS),
        name="gpu",
        model={"path": str(tiny_model), "dtype": "bfloat16"},
        quantization={"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        data={"packing": packing, "max_length": 40},
        train={"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1},
        scaling={"num_workers": gpus, "use_gpu": True},
    )
    assert train(cfg)["global_step"] == 4
    tensors = load_file(tmp_path / "storage" / "gpu" / "final" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
