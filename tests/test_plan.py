"""`sft-ray plan`: the memory estimate from config.json alone, both strategies, the verdict. No Ray."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from sft_ray import plan, ray_runtime
from sft_ray.cli import main
from sft_ray.config import validate

# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json): 8,030,261,248 parameters.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
LLAMA3_8B_PARAMS = 8_030_261_248
QLORA = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama3-8b")
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def config(tmp_path: Path, model_dir: Path, **sections):
    tree = {
        "name": "plan",
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(tmp_path / "train.jsonl")}], "max_length": 2048},
        "train": {"per_device_batch_size": 2, "gradient_checkpointing": True},
        "scaling": {"num_workers": 2, "use_gpu": True},
        "storage": {"path": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and key in tree else value
    return validate(tree)


def test_base_weights_of_8b_from_config_json_alone(tmp_path, llama8b):
    cfg = config(tmp_path, llama8b)
    assert plan.model_shape(str(llama8b))["params"] == LLAMA3_8B_PARAMS
    assert plan.estimate(cfg, "ddp")["base_weights"] == pytest.approx(LLAMA3_8B_PARAMS * 2, rel=0.01)
    # model.dtype overrides the config's; float16 trains as float32 on CPU workers (sft_ray/model.py)
    assert plan.estimate(config(tmp_path, llama8b, model={"dtype": "float32"}), "ddp")["base_weights"] == (
        LLAMA3_8B_PARAMS * 4
    )
    cpu16 = config(tmp_path, llama8b, model={"dtype": "float16"}, scaling={"use_gpu": False})
    assert plan.estimate(cpu16, "ddp")["base_weights"] == LLAMA3_8B_PARAMS * 4


def test_qlora_base_is_4_bit_linears_plus_float32_rest(tmp_path, llama8b):
    """bitsandbytes stores the decoder's Linears in 4 bits (3.60 GB with double quant's absmax),
    and prepare_model_for_kbit_training (sft_ray/model.py) casts the rest (embeddings, lm_head,
    norms: 1.05B) to float32: 4.2 GB, where bitsandbytes alone would leave them in bfloat16 (the
    5.5-6 GB often quoted for an 8B QLoRA base)."""
    shape = plan.model_shape(str(llama8b))
    rest = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096
    linear = LLAMA3_8B_PARAMS - rest
    base = plan.estimate(config(tmp_path, llama8b, quantization=QLORA), "ddp")["base_weights"]
    assert shape["params"] - plan._quantized_weights(shape) == rest
    assert base - rest * 4 == pytest.approx(linear * (0.5 + 1 / 64), rel=0.01)
    assert 3.5e9 < base - rest * 4 < 3.7e9 and 7.6e9 < base < 8.0e9
    single = config(tmp_path, llama8b, quantization={**QLORA, "double_quant": False})
    assert plan.estimate(single, "ddp")["base_weights"] - rest * 4 == pytest.approx(linear * (0.5 + 4 / 64), rel=0.01)


def test_fsdp_over_two_workers_halves_the_sharded_parts(tmp_path, llama8b):
    cases = [{}, {"lora": None, "model": {"dtype": "float32"}}, {"lora": None, "scaling": {"use_gpu": False}}]
    for extra in cases:
        cfg = config(tmp_path, llama8b, **extra)
        ddp, fsdp = plan.estimate(cfg, "ddp"), plan.estimate(cfg, "fsdp")
        for key in plan.SHARDED:
            assert fsdp[key] == pytest.approx(ddp[key] / 2, abs=1), (extra, key)
        assert fsdp["activations"] == ddp["activations"] and fsdp["loss"] == ddp["loss"]
        assert fsdp["fsdp_gathered"] > 0 == ddp["fsdp_gathered"]
        assert ddp["ddp_buckets"] == ddp["gradients"] and fsdp["ddp_buckets"] == 0
        for est in (ddp, fsdp):
            assert est["total"] == sum(est[k] for k, _ in plan.COMPONENTS)
    four = plan.estimate(config(tmp_path, llama8b, scaling={"num_workers": 4}), "fsdp")
    assert four["base_weights"] == pytest.approx(plan.estimate(config(tmp_path, llama8b), "ddp")["base_weights"] / 4)


def test_fsdp_specifics(tmp_path, llama8b):
    """Accelerate's FSDP2 casts a bf16 full fine-tuning to float32 before sharding; QLoRA's absmax
    values are no parameters (not sharded); QLoRA loads the whole 4-bit model on the GPU first."""
    full = config(tmp_path, llama8b, lora=None)
    ddp, fsdp = plan.estimate(full, "ddp"), plan.estimate(full, "fsdp")
    assert fsdp["base_weights"] == LLAMA3_8B_PARAMS * 4 / 2 == ddp["base_weights"]
    assert fsdp["optimizer_state"] == LLAMA3_8B_PARAMS * 8 / 2
    assert ddp["cpu_at_load"] == LLAMA3_8B_PARAMS * 2 and fsdp["cpu_at_load"] == LLAMA3_8B_PARAMS * 4
    assert fsdp["load_peak"] == 0  # on GPUs an unquantized model waits in CPU memory
    qlora = config(tmp_path, llama8b, quantization=QLORA)
    ddp, fsdp = plan.estimate(qlora, "ddp"), plan.estimate(qlora, "fsdp")
    absmax = 2 * fsdp["base_weights"] - ddp["base_weights"]  # fsdp = (whole - absmax) / 2 + absmax
    assert absmax == pytest.approx((LLAMA3_8B_PARAMS - 2 * 128256 * 4096 - 65 * 4096) / 64, rel=0.02)
    assert fsdp["load_peak"] == pytest.approx(ddp["base_weights"] + fsdp["base_weights"], rel=1e-6)
    assert fsdp["load_peak"] > fsdp["total"] and ddp["load_peak"] == ddp["cpu_at_load"] == 0


def test_lora_trainable_count_by_hand(tmp_path, llama8b):
    cfg = config(tmp_path, llama8b, lora={"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    h, kv = 4096, 8 * 128
    per_layer = 16 * (h + h) + 16 * (h + kv) + 16 * (h + kv) + 16 * (h + h)  # q, k, v, o
    assert plan.trainable_params(cfg) == 32 * per_layer == 13_631_488
    est = plan.estimate(cfg, "ddp")
    # float32 adapter (PEFT upcasts it), its gradients, AdamW's two float32 moments
    assert (est["adapter_weights"], est["gradients"], est["optimizer_state"]) == (
        32 * per_layer * 4,
        32 * per_layer * 4,
        32 * per_layer * 8,
    )
    # under QLoRA TRL casts the adapter to bfloat16, and AdamW's moments follow the parameter's dtype
    q = plan.estimate(config(tmp_path, llama8b, quantization=QLORA, lora=cfg.lora.model_dump()), "ddp")
    assert q["optimizer_state"] == 32 * per_layer * 4


def test_full_fine_tuning_optimizer_state(tmp_path, llama8b):
    fp32 = plan.estimate(config(tmp_path, llama8b, lora=None, model={"dtype": "float32"}), "ddp")
    assert fp32["optimizer_state"] == 8 * LLAMA3_8B_PARAMS
    assert fp32["gradients"] == 4 * LLAMA3_8B_PARAMS and fp32["adapter_weights"] == 0
    # torch's AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype: bfloat16 for a bfloat16 model
    bf16 = plan.estimate(config(tmp_path, llama8b, lora=None), "ddp")
    assert bf16["optimizer_state"] == 4 * LLAMA3_8B_PARAMS


def test_activation_checkpointing_and_batch_scale_activations(tmp_path, llama8b):
    on = plan.estimate(config(tmp_path, llama8b), "ddp")["activations"]
    off = plan.estimate(config(tmp_path, llama8b, train={"gradient_checkpointing": False}), "ddp")["activations"]
    double = config(tmp_path, llama8b, train={"per_device_batch_size": 4, "gradient_checkpointing": False})
    assert off > 10 * on
    assert plan.estimate(double, "ddp")["activations"] == pytest.approx(2 * off, rel=0.01)


def test_worker_baseline_only_for_cpu_workers(tmp_path, llama8b):
    assert plan.estimate(config(tmp_path, llama8b), "ddp")["worker_baseline"] == 0
    cpu = plan.estimate(config(tmp_path, llama8b, scaling={"use_gpu": False}), "ddp")
    assert cpu["worker_baseline"] == plan.WORKER_BASELINE_BYTES


def write_config(tmp_path: Path, model_dir: Path, name: str, **sections) -> str:
    tree = config(tmp_path, model_dir, **sections).model_dump(mode="json", by_alias=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def no_ray(monkeypatch):
    def refuse():
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_runtime, "ensure_ray", refuse)


def test_cli_verdicts_on_24_gb(tmp_path, llama8b, capsys, monkeypatch):
    import torch

    no_ray(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    qlora = write_config(tmp_path, llama8b, "qlora", quantization=QLORA, lora={"target_modules": "all-linear"})
    assert main(["plan", "--config", qlora, "--gpu-memory-gb", "24"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("per worker"))
    assert header.split()[-2:] == ["ddp", "fsdp"]
    for label in ("base weights", "adapter weights", "gradients", "optimizer state", "activations", "total per GPU"):
        assert label in out, label
    assert "verdict: ddp fits" in out
    assert "steps per epoch: known after `sft-ray prepare` (cannot look for a preparation: data.train[0].path" in out

    full = write_config(tmp_path, llama8b, "full", lora=None, train={"per_device_batch_size": 1})
    assert main(["plan", "--config", full, "--gpu-memory-gb", "24"]) == 0
    out = capsys.readouterr().out
    fits = next(line for line in out.splitlines() if line.startswith("fits in"))
    assert fits.split()[-2] == "no"  # ddp
    verdict = next(line for line in out.splitlines() if line.startswith("verdict:"))
    assert "ddp fits" not in verdict and "what would" in verdict
    # overrides apply; without --gpu-memory-gb and without a GPU there is no verdict, and it says why
    assert main(["plan", "--config", full, "train.per_device_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 x max_length 2048" in out and "verdict: no verdict: pass --gpu-memory-gb" in out


def test_cli_errors_like_the_other_commands(tmp_path, capsys):
    assert main(["plan", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("sft-ray: config file not found")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cfg = write_config(tmp_path, tmp_path / "broken", "broken")
    assert main(["plan", "--config", cfg]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sft-ray: model.path: cannot load the model config") and "Traceback" not in err


def test_tiny_model_exact_parameter_count(tiny_model, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert plan.model_shape(str(tiny_model))["params"] == loaded.num_parameters()
    cfg = config(tmp_path, tiny_model, model={"dtype": "float32"})
    assert plan.estimate(cfg, "ddp")["base_weights"] == sum(p.numel() * p.element_size() for p in loaded.parameters())
    # tied embeddings are one parameter
    tied = tmp_path / "tied"
    tied.mkdir()
    tree = json.loads((tiny_model / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**tree, "tie_word_embeddings": True}))
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tied))
    assert plan.model_shape(str(tied))["params"] == real.num_parameters() < loaded.num_parameters()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_count_equals_peft(tiny_model, tmp_path, targets):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sft_ray.model import lora_config

    for use_dora in (False, True):
        cfg = config(tmp_path, tiny_model, lora={"r": 4, "target_modules": targets, "use_dora": use_dora})
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora_config(cfg))
        assert plan.trainable_params(cfg) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_qlora_bytes_equal_bitsandbytes_on_the_tiny_model(tiny_model, tmp_path):
    """The 4-bit base as sft_ray.model.load_model leaves it on a CPU: packed weights, absmax (and
    double quantization's second level), everything else in float32."""
    import torch

    from sft_ray.model import load_model

    cfg = config(tmp_path, tiny_model, quantization=QLORA, scaling={"use_gpu": False})
    model = load_model(cfg, torch.device("cpu"))
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            held += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert plan.estimate(cfg, "ddp")["base_weights"] == pytest.approx(held, rel=0.01)


def test_steps_from_the_prepared_manifest(tiny_model, tmp_path, capsys, monkeypatch):
    """With the data prepared, steps come from its manifest (train/shards.py's counting); no Ray."""
    from sft_ray.data.cache import cache_key

    no_ray(monkeypatch)
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "output": "a"}])
    sections = {"model": {"dtype": "float32"}, "data": {"max_length": 128}, "scaling": {"use_gpu": False}}
    cfg = config(tmp_path, tiny_model, **sections, train={"per_device_batch_size": 8, "gradient_accumulation_steps": 2})
    folder = tmp_path / "runs" / "datasets" / cache_key(cfg)
    folder.mkdir(parents=True)
    manifest = {
        "splits": {"train": {"files": [{"name": "000000.parquet", "rows": 100}]}, "eval": {"files": []}},
        "layout": {"rows": 100, "real_tokens": 4000},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    d = plan.data_plan(cfg, plan.find_manifest(cfg)[0])
    # 100 rows over 2 workers: 50 each, padded to 7 batches of 8, 4 optimizer steps with accumulation 2
    assert (d["steps_per_epoch"], d["total_steps"]) == (4, 12)
    assert d["tokens_per_step_max"] == 8 * 128 * 2 * 2 and d["real_tokens_per_step"] == 40 * 8 * 2 * 2
    path = write_config(tmp_path, tiny_model, "tiny", **sections, train={"gradient_accumulation_steps": 2})
    assert main(["plan", "--config", path, "--gpu-memory-gb", "4", "train.per_device_batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "steps per epoch: 4 (100 train rows), 12 in all" in out and "40.0 per row" in out
    assert "worker process baseline" in out and "verdict: ddp fits within 90% of 4 GiB per worker" in out
