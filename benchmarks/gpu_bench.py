"""GPU benchmarks of `make gpu-check` (scripts/gpu_check.sh): real model shapes, random weights, no hub.

    python benchmarks/gpu_bench.py [--out DIR] [--dry-run]

Models are written offline from config.json shapes with random bf16 weights and the tiny tokenizer
(`sft_ray.tiny_model.build_tokenizer`), then loaded through the project's own `sft_ray.model.load_model`;
training runs TRL's SFTTrainer set up as sft_ray/train/worker.py sets it up (`_sft_config`, `lora_config`,
`make_collator`, `TokenCounter`), on random token ids packed into rows of `seq` tokens (examples of
seq/8 to seq/2 tokens, with `seq_lengths`, like prepared packed rows):

a. lora_1b: a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate
   8192, vocab 128256), LoRA r=16 on every linear layer, bf16, seq 2048 packed, batch 4: trained
   tokens/s and MFU with SDPA, with flash attention 2 (`flash_attn` installed: the collator then
   flattens packed rows padding-free, as the worker does) and with `kernels-community/flash-attn`
   (only when the `kernels` package is installed); an unavailable one is reported with the reason.
b. qlora_8b: a Llama-3-8B-shaped model (hidden 4096, 32 layers, 32 heads, 8 kv heads, intermediate
   14336, vocab 128256) in 4 bits (nf4, double quantization, bf16 compute), LoRA r=16 on every linear
   layer, gradient checkpointing, batch 1 x seq 2048: peak `torch.cuda.max_memory_allocated` over the
   training steps (reset after loading; the load's own peak is reported too), and tokens/s.
c. ddp_vs_fsdp: the 1B model of (a) through the project's Ray Train path (`sft_ray.train.driver.train`,
   `scaling.strategy` ddp then fsdp) on every GPU present; with fewer than two GPUs it is not run.

Each GPU run trains a fixed number of steps after a warm-up and times only the steps after the
warm-up (CUDA synchronized at each step end). Trained tokens are the tokens with a label (each
example's first token has none), counted by the worker's `TokenCounter`.

MFU = trained tokens/s x model FLOPs per token / peak bf16 dense FLOP/s of the GPU (H100/H200: 989
TFLOP/s; `GPU_PEAK_TFLOPS` overrides). Model FLOPs per token for LoRA: 4N + 6 N_lora + 12 L d T, where
N counts the weights of every matrix product (all linear layers and the output head; not the
embedding lookup): forward 2N, backward through the frozen weights for the activation gradients 2N
(no weight gradients); the adapter's own forward and backward 6 N_lora; attention scores and values
12 L d T (PaLM's term, forward and backward, no causal halving) with T the token-weighted mean
example length (sum of l^2 / sum of l: a token attends within its own packed example). Recomputation
by gradient checkpointing is not counted (that would be hardware FLOPs).

--dry-run: every benchmark at toy size on CPU (2 layers, hidden 64, seq 64, 2 steps, float32 weights,
2 CPU workers for ddp_vs_fsdp, fsdp only), flash attention reported unavailable, MFU null with the reason.
Writes `results.json` to --out after each benchmark, prints a table per benchmark. Starts Ray for (c).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
}
LLAMA_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
}
TOY = {  # vocab above the tokenizer's 1024 tokens, as with the real shapes' 128256
    "vocab_size": 2048,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
}
# Steps: (warm-up, timed). ddp_vs_fsdp logs every `warm-up` steps and drops the first window.
GPU_SIZES = {"seq": 2048, "lora_batch": 4, "lora_steps": (5, 20), "qlora_steps": (2, 4), "parallel_steps": (5, 15)}
TOY_SIZES = {"seq": 64, "lora_batch": 2, "lora_steps": (1, 1), "qlora_steps": (1, 1), "parallel_steps": (1, 1)}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
QLORA = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


# ---------------------------------------------------------------- models, rows, configs


def build_model(out: Path, shape: dict, tokenizer, device, dtype) -> Path:
    """A random Llama of `shape` written as a model folder (bf16 weights on GPU, as models ship)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    _free()
    return out


def packed_rows(n: int, seq: int, vocab: int, seed: int = 0) -> tuple[dict, float]:
    """n packed rows of `seq` random token ids, examples of seq/8 to seq/2 tokens, every token
    labelled; and T, the token-weighted mean example length (sum l^2 / sum l)."""
    rng = random.Random(seed)
    rows = {"input_ids": [], "labels": [], "seq_lengths": []}
    for _ in range(n):
        lengths, left = [], seq
        while left:
            lengths.append(min(left, rng.randint(seq // 8, seq // 2)))
            left -= lengths[-1]
        ids = [rng.randrange(4, vocab) for _ in range(seq)]
        rows["input_ids"].append(ids)
        rows["labels"].append(list(ids))
        rows["seq_lengths"].append(lengths)
    flat = [x for lengths in rows["seq_lengths"] for x in lengths]
    return rows, sum(x * x for x in flat) / sum(flat)


def text_rows(path: Path, tokens: int, seq: int, seed: int = 0) -> Path:
    """`text` rows of seq/8 to seq/2 words, about `tokens` tokens in all, for the Ray pipeline."""
    from sft_ray.tiny_model import _WORDS

    rng = random.Random(seed)
    with open(path, "w") as f:
        while tokens > 0:
            k = rng.randint(seq // 8, seq // 2)
            f.write(json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(k))}) + "\n")
            tokens -= k
    return path


def config(name: str, model: Path, work: Path, seq: int, batch: int, steps: int, gpu: bool, **extra):
    from sft_ray.config import validate

    tree = {
        "name": name,
        "model": {"path": str(model), "dtype": "bfloat16" if gpu else "float32"},
        "lora": LORA,
        "data": {"train": [{"path": str(work / "unused.jsonl")}], "max_length": seq, "packing": True},
        "train": {
            "max_steps": steps,
            "per_device_batch_size": batch,
            "logging_steps": steps,
            "save_steps": 10**6,
            "samples": 0,
            "learning_rate": 1e-4,
        },
        "scaling": {"num_workers": 1, "use_gpu": gpu},
        "storage": {"path": str(work / "storage")},
    }
    for section, values in extra.items():  # merged into the section above, or a section of its own
        tree[section] = {**tree[section], **values} if isinstance(tree.get(section), dict) else values
    return validate(tree)


# ---------------------------------------------------------------- measuring


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> tuple[float | None, str | None]:
    """The GPU's peak bf16 dense FLOP/s, or None and why."""
    import torch

    if device.type != "cuda":
        return None, "no CUDA device: MFU is measured against a GPU's peak bf16 dense FLOP/s"
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12, None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, None
    return None, f"peak bf16 FLOP/s of {name} not known here: set GPU_PEAK_TFLOPS"


def flops_per_token(model_config, lora_params: int, t: float) -> dict:
    """Model FLOPs per trained token for LoRA (see the module docstring)."""
    c = model_config
    d, layers, heads, kv = c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * c.intermediate_size
    n = layers * per_layer + d * c.vocab_size
    attention = 12 * layers * heads * hd * t
    return {
        "matmul_params": n,
        "lora_params": lora_params,
        "mean_example_tokens": round(t, 1),
        "attention": attention,
        "total": 4 * n + 6 * lora_params + attention,
    }


def mfu(tokens_per_s: float, flops: dict, device, gpus: int = 1) -> dict:
    peak, reason = peak_flops(device)
    value = tokens_per_s * flops["total"] / (peak * gpus) if peak else None
    return {"mfu": value, "mfu_reason": reason, "peak_flops": peak}


def train_steps(cfg, rows: dict, t: float, device, warmup: int, attn: str | None, work: Path) -> dict:
    """Load through `load_model`, train `cfg.train.max_steps` steps with TRL's SFTTrainer as the worker
    builds it, and time the steps after `warmup`."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from sft_ray.model import load_model, load_tokenizer, lora_config
    from sft_ray.train.callbacks import TokenCounter, peak_memory_mb
    from sft_ray.train.collate import make_collator
    from sft_ray.train.worker import _sft_config

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_model(cfg, device, tokenizer)
    if attn:
        model.set_attn_implementation(attn)
    loaded = {
        "model_memory_mb": torch.cuda.memory_allocated(device) / 2**20 if cuda else None,
        "load_peak_memory_mb": peak_memory_mb(device),
    }
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(cfg, str(work / f"trainer-{cfg.name}"), device, has_eval=False, resumed=False),
        train_dataset=datasets.Dataset.from_dict(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        # Packed rows flattened padding-free for a varlen (flash) kernel, as the worker does.
        data_collator=make_collator(tokenizer.pad_token_id, flatten_packed="flash" in (attn or "")),
    )
    counter = TokenCounter()
    trainer.training_step = counter.wrap(trainer.training_step)
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            marks["start" if state.global_step == warmup else "end"] = (
                time.perf_counter(),
                counter.totals[0],
                state.global_step,
            )

    trainer.add_callback(Clock())
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result = trainer.train()
    (t0, tok0, s0), (t1, tok1, s1) = marks["start"], marks["end"]
    out = {
        "tokens_per_s": (tok1 - tok0) / (t1 - t0),
        "step_ms": 1000 * (t1 - t0) / (s1 - s0),
        "timed_steps": s1 - s0,
        "warmup_steps": warmup,
        "trained_tokens_timed": tok1 - tok0,
        "train_loss": result.training_loss,
        "peak_memory_mb": peak_memory_mb(device),
        "memory_kind": "torch.cuda.max_memory_allocated, training steps" if cuda else "peak RSS of this process",
        **loaded,
    }
    lora_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out["flops_per_token"] = flops_per_token(model.config, lora_params, t)
    out.update(mfu(out["tokens_per_s"], out["flops_per_token"], device))
    del trainer, model, result
    _free()
    return out


# ---------------------------------------------------------------- the benchmarks


def attention_variants(device) -> dict[str, tuple[str | None, str | None]]:
    """name -> (attn_implementation, None) or (None, why it is not run)."""
    out = {"sdpa": ("sdpa", None)}
    if device.type != "cuda":
        why = "no CUDA device"
        return {**out, "flash_attention_2": (None, why), "kernels_flash": (None, why)}
    try:
        import flash_attn  # noqa: F401

        out["flash_attention_2"] = ("flash_attention_2", None)
    except Exception as err:  # not installed, or built for another torch/CUDA
        out["flash_attention_2"] = (None, f"flash_attn is not importable ({err})")
    if importlib.util.find_spec("kernels") is not None:
        out["kernels_flash"] = ("kernels-community/flash-attn", None)
    else:
        out["kernels_flash"] = (None, "the kernels package is not installed")
    return out


def bench_lora_1b(ctx: dict) -> dict:
    s, device = ctx["sizes"], ctx["device"]
    warmup, timed = s["lora_steps"]
    rows, t = packed_rows((warmup + timed) * s["lora_batch"], s["seq"], ctx["vocab_1b"])
    out = {"shape": ctx["shape_1b"], "seq": s["seq"], "batch": s["lora_batch"], "lora": LORA, "dtype": ctx["dtype"]}
    for name, (attn, why) in attention_variants(device).items():
        if attn is None:
            out[name] = {"available": False, "reason": why}
            continue
        steps = warmup + timed
        cfg = config(f"lora-{name}", ctx["model_1b"], ctx["work"], s["seq"], s["lora_batch"], steps, ctx["gpu"])
        measured = _guarded(ctx, f"lora_1b/{name}", train_steps, cfg, rows, t, device, warmup, attn, ctx["work"])
        if name == "kernels_flash" and "error" in measured:  # a hub kernel: offline, only if cached
            ctx["errors"].remove(f"lora_1b/{name}")
            out[name] = {"available": False, "reason": measured["error"]}
            continue
        out[name] = {"available": True, "attn_implementation": attn, **measured}
    return out


def bench_qlora_8b(ctx: dict) -> dict:
    import torch

    s, device = ctx["sizes"], ctx["device"]
    warmup, timed = s["qlora_steps"]
    model = build_model(ctx["work"] / "llama-8b", ctx["shape_8b"], ctx["tokenizer"], device, torch.bfloat16)
    rows, t = packed_rows(warmup + timed, s["seq"], ctx["vocab_8b"], seed=1)
    cfg = config(
        "qlora-8b",
        model,
        ctx["work"],
        s["seq"],
        1,
        warmup + timed,
        ctx["gpu"],
        quantization=QLORA,
        train={"gradient_checkpointing": True},
    )
    out = {"shape": ctx["shape_8b"], "seq": s["seq"], "batch": 1, "lora": LORA, "quantization": QLORA}
    out.update(_guarded(ctx, "qlora_8b", train_steps, cfg, rows, t, device, warmup, None, ctx["work"]))
    shutil.rmtree(model, ignore_errors=True)
    return out


def bench_ddp_vs_fsdp(ctx: dict) -> dict:
    """The project's Ray Train path, once per strategy, on every GPU (or 2 CPU workers in a dry run)."""
    import torch

    gpus = torch.cuda.device_count()
    if not ctx["dry_run"] and gpus < 2:
        return {"gpus": gpus, "skipped": f"{gpus} GPU on this machine: DDP vs FSDP needs 2 or more; not run"}
    from sft_ray.ray_runtime import ensure_ray

    s = ctx["sizes"]
    warmup, timed = s["parallel_steps"]
    workers = gpus if gpus >= 2 else 2
    steps, batch = warmup + timed, s["lora_batch"]
    data = text_rows(ctx["work"] / "parallel.jsonl", int(1.5 * steps * batch * workers * s["seq"]), s["seq"])
    out = {"workers": workers, "device": "cuda" if gpus else "cpu", "seq": s["seq"], "batch_per_worker": batch}
    ensure_ray()
    for strategy in ("ddp", "fsdp"):
        if ctx["dry_run"] and strategy == "ddp":  # the same code with another strategy; saves a minute of CI
            out[strategy] = {"skipped": "dry run: fsdp only (tests/test_fsdp.py trains both on CPU)"}
            continue
        cfg = config(
            f"parallel-{strategy}",
            ctx["model_1b"],
            ctx["work"],
            s["seq"],
            batch,
            steps,
            gpus > 0,
            data={"train": [{"path": str(data), "format": "text"}]},
            train={"logging_steps": warmup},
            scaling={"num_workers": workers, "use_gpu": gpus > 0, "strategy": strategy},
        )
        out[strategy] = _guarded(ctx, f"ddp_vs_fsdp/{strategy}", _ray_run, cfg)
    import ray

    ray.shutdown()
    return out


def _ray_run(cfg) -> dict:
    """train(cfg); rates from its metrics.jsonl, the first logging window (the warm-up) left out."""
    from sft_ray.train.driver import train

    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    path = Path(cfg.storage.path, cfg.name, "metrics.jsonl")
    logs = [r for r in map(json.loads, path.read_text().splitlines()) if "trained_tokens_per_s" in r]
    timed = logs[1:] or logs
    return {
        "tokens_per_s": sum(r["trained_tokens_per_s"] for r in timed) / len(timed),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in logs),
        "memory_kind": "rank 0: torch.cuda.max_memory_allocated" if cfg.scaling.use_gpu else "rank 0: peak RSS",
        "windows": len(timed),
        "wall_s": wall,
    }


def _guarded(ctx: dict, what: str, fn, *args) -> dict:
    """fn(*args), or its error (the other benchmarks still run; the exit status says it failed)."""
    try:
        return fn(*args)
    except Exception as err:
        traceback.print_exc()
        ctx["errors"].append(what)
        return {"error": f"{type(err).__name__}: {err}"[:2000]}


# ---------------------------------------------------------------- report


def _num(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(name: str, r: dict) -> None:
    """One line per measured variant (or the benchmark itself), with why a variant was not measured."""
    rows = [(k, v) for k, v in r.items() if isinstance(v, dict) and {"tokens_per_s", "reason", "error"} & v.keys()]
    if {"tokens_per_s", "skipped", "error"} & r.keys():
        rows.append((name, r))
    print(f"\n{name}")
    print(f"  {'':22}{'tokens/s':>12}{'step ms':>10}{'MFU %':>8}{'peak MiB':>11}  note")
    for label, v in rows:
        note = v.get("skipped") or v.get("reason") or v.get("error") or v.get("mfu_reason") or v.get("memory_kind")
        mfu_pct = None if v.get("mfu") is None else 100 * v["mfu"]
        print(
            f"  {label:22}{_num(v.get('tokens_per_s'), '.0f'):>12}{_num(v.get('step_ms')):>10}{_num(mfu_pct):>8}"
            f"{_num(v.get('peak_memory_mb'), '.0f'):>11}  {(note or '')[:110]}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check-out", help="folder for results.json")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU")
    p.add_argument("--only", default="lora_1b,qlora_8b,ddp_vs_fsdp", help="comma-separated benchmarks")
    args = p.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)  # an embedded local Ray for (c), never someone's cluster
    # Stopped by `timeout` (SIGTERM): exit through the context managers, so the model folders go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("no CUDA device: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from sft_ray.tiny_model import build_tokenizer

    results = {
        "mode": "gpu" if gpu else "dry-run (toy sizes on CPU)",
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "gpus": torch.cuda.device_count(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, datasets)},
    }
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        tokenizer = build_tokenizer(0)
        ctx = {
            "dry_run": not gpu,
            "gpu": gpu,
            "device": device,
            "sizes": GPU_SIZES if gpu else TOY_SIZES,
            "work": work,
            "tokenizer": tokenizer,
            "errors": [],
            "dtype": "bfloat16" if gpu else "float32",
            "shape_1b": LLAMA_1B if gpu else TOY,
            "shape_8b": LLAMA_8B if gpu else TOY,
        }
        ctx["vocab_1b"], ctx["vocab_8b"] = ctx["shape_1b"]["vocab_size"], ctx["shape_8b"]["vocab_size"]
        results["sizes"] = ctx["sizes"]
        benches = {"lora_1b": bench_lora_1b, "qlora_8b": bench_qlora_8b, "ddp_vs_fsdp": bench_ddp_vs_fsdp}
        wanted = [b for b in args.only.split(",") if b]
        if {"lora_1b", "ddp_vs_fsdp"} & set(wanted):
            ctx["model_1b"] = build_model(work / "llama-1b", ctx["shape_1b"], tokenizer, device, torch.bfloat16)
        for name in wanted:
            t0 = time.perf_counter()
            print(f"\n--- {name} ({time.perf_counter() - started:.0f}s in)", flush=True)
            results[name] = _guarded(ctx, name, benches[name], ctx)
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            (out_dir / "results.json").write_text(json.dumps(results, indent=1))
            print_table(name, results[name])
    results["errors"] = ctx["errors"]
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out_dir / 'results.json'}; {results['seconds']}s; errors: {', '.join(ctx['errors']) or 'none'}")
    return 1 if ctx["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
