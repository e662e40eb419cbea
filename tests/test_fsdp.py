"""FSDP2 (`scaling.strategy: fsdp`) on a real local Ray with 2 CPU workers over gloo: the same
training as DDP, sharded checkpoints that resume exactly, a killed worker, full fine-tuning."""

import json

import pytest
from conftest import train_steps, two_worker_config

ROWS = [{"question": f"What is {i} plus one?", "output": f"{i + 1}"} for i in range(64)]


def _cfg(tmp_path, tiny_model, name, strategy="fsdp", **train):
    cfg = two_worker_config(tmp_path, tiny_model, ROWS, name, epochs=2, eval_steps=4, save_steps=4, **train)
    cfg.scaling.strategy = strategy
    return cfg


def _losses(run) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if "loss" in e}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, ray_local):
    """One DDP and one FSDP run of the same data, seed and steps (16, a checkpoint every 4)."""
    from sft_ray.train.driver import train

    tmp = tmp_path_factory.mktemp("fsdp")
    return {
        "ddp": train(_cfg(tmp, tiny_model, "ddp", strategy="ddp", samples=2)),
        "fsdp": train(_cfg(tmp, tiny_model, "fsdp", samples=2)),
        "storage": tmp / "storage",
        "tmp": tmp,
    }


def test_fsdp_shards_the_model_and_trains_as_ddp_does(runs):
    ddp, fsdp, storage = runs["ddp"], runs["fsdp"], runs["storage"]
    assert [s["sharded"] for s in fsdp["data_shares"]] == [True, True]
    assert [s["sharded"] for s in ddp["data_shares"]] == [False, False]
    a, b = _losses(storage / "ddp"), _losses(storage / "fsdp")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-3), step
    assert b[16] < b[1] - 0.5  # it learned
    assert fsdp["eval_loss_after"] == pytest.approx(ddp["eval_loss_after"], rel=5e-3)
    assert len(fsdp["samples"]) == 2  # generated on both sharded workers, in step


def test_fsdp_checkpoints_hold_every_workers_part(runs):
    ckpt = runs["storage"] / "fsdp" / "checkpoint-0000016"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        names = sorted(p.name for p in (ckpt / folder).iterdir())
        assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"], names
    # The frozen base is not in them: only the adapter's weights (and their optimizer state).
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
    assert keys and all("lora_" in k for k in keys), list(keys)[:5]


def test_fsdp_final_adapter_loads_without_fsdp_and_matches_ddp(runs, tiny_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    storage = runs["storage"]
    fsdp, ddp = (
        load_file(storage / "fsdp/final/adapter_model.safetensors"),
        load_file(storage / "ddp/final/adapter_model.safetensors"),
    )
    assert sorted(fsdp) == sorted(ddp)
    for key in ddp:
        assert fsdp[key].shape == ddp[key].shape
        assert (fsdp[key] - ddp[key]).abs().max() < 2e-3 + 2e-2 * ddp[key].abs().max(), key
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), storage / "fsdp/final")
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())


@pytest.mark.slow
def test_fsdp_interrupted_then_killed_run_resumes_exactly(runs, tiny_model, monkeypatch):
    import ray.train

    from sft_ray.train.driver import train

    tmp, storage = runs["tmp"], runs["storage"]
    monkeypatch.setenv("SFT_RAY_FAIL_AT_STEP", "6:1")
    with pytest.raises(ray.train.TrainingFailedError):
        train(_cfg(tmp, tiny_model, "cut"))
    monkeypatch.setenv("SFT_RAY_FAIL_AT_STEP", "10:1")
    resumed = train(_cfg(tmp, tiny_model, "cut", max_failures=1))
    assert resumed["global_step"] == 16
    assert train_steps(storage / "cut") == list(range(1, 17))
    full, cut = _losses(storage / "fsdp"), _losses(storage / "cut")
    for step in full:
        assert cut[step] == pytest.approx(full[step], rel=1e-4), step
    assert resumed["eval_loss_after"] == pytest.approx(runs["fsdp"]["eval_loss_after"], rel=1e-4)


def _reloaded_eval_loss(model, run, cfg) -> float:
    """The eval loss of `model` (loaded without FSDP) over the run's prepared eval rows, as the
    trainer computes it: mean over trained tokens."""
    import datasets
    import torch

    from sft_ray.data.tokenize import IGNORE

    manifest = next((run.parent / "datasets").glob("*/manifest.json"))
    rows = datasets.load_dataset("parquet", data_files=str(manifest.parent / "eval" / "*.parquet"))["train"]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


@pytest.mark.slow
def test_fsdp_qlora_trains_the_adapter_over_an_unchanged_4bit_base(tmp_path, tiny_model, ray_local):
    """4-bit weights stored in float32 (bnb_4bit_quant_storage) are sharded too. The adapter in
    final/, put on a freshly quantized base without FSDP, gives the run's own final eval loss: the
    base the run trained over is the published one, unchanged."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from sft_ray.model import load_model
    from sft_ray.train.driver import train

    cfg = _cfg(tmp_path, tiny_model, "qlora", max_steps=4)
    cfg.quantization = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    summary = train(cfg)
    assert [s["sharded"] for s in summary["data_shares"]] == [True, True]
    run = tmp_path / "storage" / "qlora"
    tensors = load_file(run / "final" / "adapter_model.safetensors")
    assert tensors and all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    import torch

    cfg.scaling.strategy = "ddp"  # the same 4-bit load, without sharding
    model = PeftModel.from_pretrained(load_model(cfg, torch.device("cpu")), run / "final").eval()
    assert _reloaded_eval_loss(model, run, cfg) == pytest.approx(summary["eval_loss_after"], rel=2e-3)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.3


@pytest.mark.slow
def test_fsdp_full_fine_tuning_writes_a_plain_model(tmp_path, tiny_model, ray_local):
    """`lora: null`: every weight trained, sharded; final/ is a model folder that loads alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft_ray.train.driver import train

    cfg = _cfg(tmp_path, tiny_model, "full", max_steps=4, learning_rate=1e-3)
    cfg.lora = None
    summary = train(cfg)
    assert [s["sharded"] for s in summary["data_shares"]] == [True, True]
    run = tmp_path / "storage" / "full"
    tuned = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = {n for (n, a), b in zip(tuned.named_parameters(), base.parameters()) if not torch.equal(a, b)}
    assert len(changed) == len(list(base.parameters())), "every weight trains in full fine-tuning"
    assert _reloaded_eval_loss(tuned, run, cfg) == pytest.approx(summary["eval_loss_after"], rel=2e-3)
    ckpt = run / "checkpoint-0000004" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from sft_ray.export import find_checkpoint, merge

    assert find_checkpoint(str(run), "final") == run / "final"
    with pytest.raises(FileNotFoundError, match="a whole model .* nothing to merge"):
        merge(str(run / "final"), str(tmp_path / "merged"))


def test_plan_is_within_a_quarter_of_the_measured_peak(runs, tiny_model):
    """`sft-ray plan`'s per-worker total against the peak RSS each run's rank 0 logged."""
    from sft_ray.plan import estimate

    for strategy in ("ddp", "fsdp"):
        cfg = _cfg(runs["tmp"], tiny_model, strategy, strategy=strategy, samples=2)
        lines = [json.loads(x) for x in (runs["storage"] / strategy / "metrics.jsonl").read_text().splitlines()]
        measured = max(e["peak_memory_mb"] for e in lines if "peak_memory_mb" in e) * 2**20
        planned = estimate(cfg, strategy)["total"]
        assert abs(planned - measured) / measured < 0.25, (strategy, planned / 2**20, measured / 2**20)


def test_a_sharded_checkpoint_missing_a_workers_part_is_damaged(tmp_path):
    """Resume checks every rank's part of the sharded weights and optimizer state (checkpoints.verify)."""
    import torch

    from sft_ray.train.checkpoints import Damaged, verify

    ckpt = tmp_path / "checkpoint-0000004"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (ckpt / folder).mkdir(parents=True)
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
            (ckpt / folder / name).write_bytes(b"part")
    (ckpt / "trainer_state.json").write_text('{"global_step": 4}')
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch.save({}, ckpt / name)
    assert verify(str(ckpt), world=2) == 4  # no optimizer.pt, no safetensors: the sharded folders hold them
    (ckpt / "optimizer_0" / "__1_0.distcp").unlink()
    with pytest.raises(Damaged, match=r"optimizer_0/__1_0.distcp: missing"):
        verify(str(ckpt), world=2)


@pytest.mark.slow
def test_each_rank_stages_only_its_own_checkpoint_parts(tmp_path):
    """On several nodes a rank's parts exist only on its node, so each rank uploads its own
    (RunCallback.on_save with sharded_checkpoints, which the worker sets under fsdp)."""
    from sft_ray.train.fsdp import stage_own_shards

    ckpt = tmp_path / "checkpoint-4"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (ckpt / folder).mkdir(parents=True)
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "__10_0.distcp"):
            (ckpt / folder / name).write_bytes(name.encode())
    (ckpt / "trainer_state.json").write_text("{}")
    staged = tmp_path / "staged"
    staged.mkdir()
    stage_own_shards(str(ckpt), str(staged), 1)
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert files == ["optimizer_0/__1_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"]
    assert (staged / "optimizer_0" / "__1_0.distcp").read_bytes() == b"__1_0.distcp"


def test_the_worker_turns_on_per_rank_checkpoint_parts_under_fsdp():
    """The wiring: build_trainer passes sharded_checkpoints=fsdp.enabled(cfg) to RunCallback."""
    import inspect

    from sft_ray.train import worker

    assert "sharded_checkpoints=fsdp.enabled(cfg)" in inspect.getsource(worker.build_trainer)
