import json

import pytest

from sft_ray.export import find_checkpoint, merge

LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "init_lora_weights": False}


def _lora_model(tiny_model, seed: int, **load_kwargs):
    """Base + an untrained adapter with random (non-zero) B matrices, so merging changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, **load_kwargs)
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(**LORA))


def _state(step: int, evals: dict[int, float]) -> dict:
    history = [{"loss": 2.0, "step": step - 1}] + [{"eval_loss": v, "step": s} for s, v in evals.items()]
    return {"global_step": step, "log_history": history}


def _fake_checkpoint(run, name: str, state: dict | None):
    """A checkpoint folder with placeholder weights: enough for find_checkpoint, which loads none."""
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    """Two real checkpoints (eval 1.2 at step 10, 1.6 at step 20), one half-uploaded, one temp copy."""
    run = tmp_path_factory.mktemp("run")
    for step, seed, evals in ((10, 1, {10: 1.2}), (20, 2, {10: 1.2, 20: 1.6})):
        folder = run / f"checkpoint-{step:07d}"
        _lora_model(tiny_model, seed).save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps(_state(step, evals)))
        (folder / "optimizer.pt").write_bytes(b"")
    (run / "checkpoint-0000030").mkdir()
    (run / "checkpoint-0000030" / "adapter_config.json").write_text("{}")  # upload cut short
    _fake_checkpoint(run, "checkpoint-0000040.tmp-1a2b3c4d", _state(40, {40: 0.1}))
    return run


def test_best_and_latest_skip_incomplete_and_temp_folders(run):
    assert find_checkpoint(str(run), "best") == run / "checkpoint-0000010"
    assert find_checkpoint(str(run), "latest") == run / "checkpoint-0000020"


def test_only_checkpoints_ray_registered_count(tmp_path):
    # checkpoint-30 has every file but Ray never registered it: its upload was still running.
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, f"checkpoint-{step:07d}", _state(step, {step: 2.0 - step / 100}))
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint-{s:07d}"} for s in (10, 20)]}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert find_checkpoint(str(tmp_path), "latest").name == "checkpoint-0000020"
    assert find_checkpoint(str(tmp_path), "best").name == "checkpoint-0000020"
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Ray Train checkpoint snapshot"):
        find_checkpoint(str(tmp_path), "latest")


def test_best_falls_back_to_the_last_eval_before_the_save(tmp_path):
    # eval every 8 steps, save every 10: checkpoint-20 carries the eval of step 16, not a later one.
    _fake_checkpoint(tmp_path, "checkpoint-0000010", _state(10, {8: 1.0}))
    _fake_checkpoint(tmp_path, "checkpoint-0000020", _state(20, {8: 1.0, 16: 0.9}))
    _fake_checkpoint(tmp_path, "checkpoint-0000030", _state(30, {}))  # no eval at all: not a candidate
    assert find_checkpoint(str(tmp_path), "best").name == "checkpoint-0000020"
    assert find_checkpoint(str(tmp_path), "latest").name == "checkpoint-0000030"


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        find_checkpoint(str(tmp_path / "nope"), "final")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_checkpoint(str(tmp_path), "latest")
    with pytest.raises(FileNotFoundError, match="final"):
        find_checkpoint(str(tmp_path), "final")
    with pytest.raises(ValueError, match="one of final, best, latest"):
        find_checkpoint(str(tmp_path), "newest")
    _fake_checkpoint(tmp_path, "checkpoint-0000010", _state(10, {}))
    _fake_checkpoint(tmp_path, "checkpoint-0000020", None)  # no trainer_state.json: incomplete
    with pytest.raises(ValueError, match="no checkpoint has an eval loss"):
        find_checkpoint(str(tmp_path), "best")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "adapter_config.json").write_text("{}")
    assert find_checkpoint(str(tmp_path), "final") == tmp_path / "final"


def _logits(model, tokenizer):
    import torch

    ids = tokenizer("the food was great", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _close(a, b) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-5)


def test_merged_model_loads_plainly_and_matches_the_adapter(run, tmp_path, tiny_model, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = find_checkpoint(str(run), "best")
    out = merge(str(adapter), str(tmp_path / "merged"))  # base read from adapter_config.json

    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    assert _close(_logits(merged, tokenizer), _logits(with_adapter, tokenizer))
    assert not _close(_logits(merged, tokenizer), _logits(base, tokenizer))
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folder left behind

    with pytest.raises(FileExistsError, match="not empty"):
        merge(str(adapter), str(out))


def test_qlora_adapter_merges_into_the_full_precision_base(tmp_path, tiny_model, tokenizer):
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    qlora = _lora_model(tiny_model, 3, quantization_config=nf4, device_map="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in qlora.modules())
    qlora.save_pretrained(tmp_path / "adapter")

    out = merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), base_path=str(tiny_model))

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "adapter")
    )
    assert _close(_logits(merged, tokenizer), _logits(with_adapter, tokenizer))
    assert not _close(_logits(merged, tokenizer), _logits(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer))


def test_report_and_export_of_a_run_in_s3(run, tmp_path, tiny_model, tokenizer, s3_bucket, capsys):
    """A run folder in the local S3 server (moto): report, find a checkpoint and merge, by its URI."""
    import shutil

    import boto3
    from peft import PeftModel
    from test_report import build_run
    from transformers import AutoModelForCausalLM

    from sft_ray import storage
    from sft_ray.cli import main
    from sft_ray.report import write_report

    local = tmp_path / "demo"
    shutil.copytree(run, local)
    build_run(local)  # metrics.jsonl, final/ metrics, samples, manifest, config
    _lora_model(tiny_model, 5).save_pretrained(local / "final")  # and a real adapter
    uri = f"s3://{s3_bucket}/runs/demo"
    storage.upload_dir(str(local), uri)

    # The report is read from and written into the bucket, next to the run.
    out = write_report(uri)
    assert out == f"{uri}/report"
    s3 = boto3.client("s3")
    page = s3.get_object(Bucket=s3_bucket, Key="runs/demo/report/index.html")["Body"].read().decode()
    assert "eval loss" in page and "14.9k tokens/s" in page and "No warning sign" in page
    for png in ("loss.png", "learning_rate.png"):
        assert s3.get_object(Bucket=s3_bucket, Key=f"runs/demo/report/{png}")["Body"].read()[:4] == b"\x89PNG"
    assert main(["report", uri]) == 0
    assert f"report written to {uri}/report/index.html" in capsys.readouterr().out

    # Checkpoints are picked in the bucket as on disk: the half-uploaded and temp ones skipped.
    assert find_checkpoint(uri, "final") == f"{uri}/final"
    assert find_checkpoint(uri, "best") == f"{uri}/checkpoint-0000010"
    assert find_checkpoint(uri, "latest") == f"{uri}/checkpoint-0000020"
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        find_checkpoint(f"s3://{s3_bucket}/runs/nope", "final")

    # --merge downloads the adapter first; the merged model equals the local merge of the same folder.
    for which, folder in (("best", "checkpoint-0000010"), ("latest", "checkpoint-0000020"), ("final", "final")):
        merged_dir = tmp_path / f"merged-{which}"
        assert main(["export", uri, "--checkpoint", which, "--merge", str(merged_dir)]) == 0
        assert f"adapter: {uri}/{folder}" in capsys.readouterr().out
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(local / folder))
        assert _close(_logits(merged, tokenizer), _logits(with_adapter, tokenizer)), which
    assert not (merged_dir / "optimizer.pt").exists()
