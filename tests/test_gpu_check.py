"""`make gpu-check`'s CPU rehearsal: scripts/gpu_check.sh --dry-run runs every step, every benchmark at toy size."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_model_flops_count_every_matrix_product_weight():
    """N in the MFU's 4N is the weight count of every Linear (the output head included, the embedding
    lookup not): checked against a Llama of the benchmark's 1B shape built on the meta device."""
    import torch
    from gpu_bench import LLAMA_1B, LLAMA_8B, flops_per_token
    from transformers import LlamaConfig, LlamaForCausalLM

    for shape in (LLAMA_1B, LLAMA_8B):
        config = LlamaConfig(**shape)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        flops = flops_per_token(config, lora_params=1000, t=512)
        assert flops["matmul_params"] == linear
        layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
        assert flops["total"] == 4 * linear + 6 * 1000 + 12 * layers * hidden * 512
    assert 1.23e9 < flops_per_token(LlamaConfig(**LLAMA_1B), 0, 0)["matmul_params"] < 1.24e9  # Llama-3.2-1B


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
    """The entry people use, on CPU: install plan, gpu tests collected, every benchmark measured at toy
    size through the project's code (the Ray Train path included), results.json complete."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "failed steps: none" in proc.stdout

    install = (tmp_path / "install.log").read_text()
    assert "dry run: nothing installed" in install and "wheels found:" in install
    assert all(name in install for name in ("ray", "trl", "datasets", "bitsandbytes", "peft"))
    tests = (tmp_path / "tests.log").read_text()
    assert "tests/test_train_e2e.py::test_qlora_bf16_on_every_gpu_through_ray" in tests
    assert (tmp_path / "env.txt").exists() and (tmp_path / "bench.log").exists()

    r = json.loads((tmp_path / "results.json").read_text())
    assert r["errors"] == [] and r["mode"].startswith("dry-run")
    sdpa = r["lora_1b"]["sdpa"]
    assert sdpa["tokens_per_s"] > 0 and sdpa["peak_memory_mb"] > 0 and sdpa["timed_steps"] == 1
    assert sdpa["flops_per_token"]["total"] > 0 and sdpa["flops_per_token"]["lora_params"] > 0
    assert "mfu" in sdpa and sdpa["mfu"] is None and "no CUDA device" in sdpa["mfu_reason"]
    for flash in ("flash_attention_2", "kernels_flash"):
        assert r["lora_1b"][flash] == {"available": False, "reason": "no CUDA device"}
    qlora = r["qlora_8b"]
    assert qlora["peak_memory_mb"] > 0 and qlora["tokens_per_s"] > 0 and qlora["quantization"]["quant_type"] == "nf4"
    assert "mfu" in qlora and qlora["mfu_reason"]
    parallel = r["ddp_vs_fsdp"]
    assert parallel["workers"] == 2 and parallel["device"] == "cpu"
    assert parallel["fsdp"]["tokens_per_s"] > 0 and parallel["fsdp"]["peak_memory_mb"] > 0
    assert "fsdp only" in parallel["ddp"]["skipped"]
