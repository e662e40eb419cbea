"""`sft-ray plan`: per-worker memory of a config under ddp and fsdp, before any GPU is used.

Everything comes from the model's config.json (the model is built on the meta device: no weight
is read) and the config; the data's shape from the preparation's manifest when there is one. No
Ray is started. Each component is in bytes per worker, and follows what this stack does, read in
its sources (sft_ray/model.py, TRL 1.16's SFTTrainer, PEFT 0.21, torch 2.13's AdamW):

- base weights: the parameters at the model's dtype. With `quantization`, bitsandbytes stores
  every Linear but the output head in 4 bits (0.5 byte per weight, plus one absmax per block of
  64: a uint8 with double quantization, whose fp32 second-level absmax covers 256 blocks, else an
  fp32), and `prepare_model_for_kbit_training` then casts everything it did not quantize
  (embeddings, norms, lm_head) to float32.
- adapter weights: LoRA's r x (in + out) per targeted Linear (plus DoRA's magnitude vector, and
  ChatML's trained token rows), float32 (PEFT's autocast_adapter_dtype), bfloat16 under QLoRA
  (TRL casts a quantized model's adapter to bfloat16). Full fine-tuning (`lora: null`) trains the
  base weights themselves: no adapter line.
- gradients: one per trainable parameter, in its dtype. DDP adds its all-reduce buckets, as
  large again (gradient_as_bucket_view is off), when there is more than one worker.
- optimizer state: torch's AdamW (the HF Trainer's `adamw_torch_fused`) keeps exp_avg and
  exp_avg_sq in the parameter's dtype: 8 bytes per float32 parameter, 4 per bfloat16 one. No fp32
  master copy: the HF Trainer keeps none.
- activations, loss: see `activation_bytes` and `loss_bytes`.
- fsdp (FSDP2 through Accelerate 1.15, sft_ray/train/fsdp.py): weights, adapter, gradients and
  optimizer state divided by the workers (frozen weights too; QLoRA's absmax values are no
  parameters and stay whole); plus the gathered units (`_gathered_bytes`). Under bf16 mixed
  precision Accelerate casts the trained parameters to float32 first (full fine-tuning: the whole
  model). With `scaling.cpu_offload` the sharded parts are in CPU memory. The model is loaded
  whole before it is sharded: 4-bit on every worker's device for QLoRA; otherwise in CPU memory by
  one worker per node (local rank 0, the worker this plan describes), the others building it on
  the meta device (load_peak).
- CPU workers: the number compared is the process's RSS, which includes what the worker process
  holds before any model (WORKER_BASELINE_BYTES).

Left out: the CUDA context and the caching allocator's slack on GPUs (hence the 90% in `fits`),
the GPU worker process's own CPU memory, evaluation and generation (smaller than a training step).
"""

from __future__ import annotations

import copy
import functools
import math
import os

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data.errors import DataError

# RSS of a Ray Train 2.60 CPU worker process (TorchTrainer, 2 workers, gloo) after importing torch
# 2.13 (CPU build), transformers 5.24, trl 1.16 (SFTTrainer, SFTConfig) and peft 0.21, which pull
# in accelerate, datasets and bitsandbytes, before loading any tokenizer, data or model: VmRSS
# 585,180 KiB on rank 0, 584,836 KiB on rank 1 (384 MiB of it before those imports: Ray's worker
# runtime, torch through Ray Train's torch backend). Measured 2026-12-01 on this project's 2-core
# x86-64 CPU machine, Python 3.11.
WORKER_BASELINE_BYTES = 585_180 * 1024

FIT_FRACTION = 0.9  # "fits": the total within 90% of the memory (CUDA context, allocator slack, fragmentation)
TOKEN_TILE = 4096  # TRL's chunked log-prob kernel: tokens per tile (trl/kernels/chunked_logprob.py)
VOCAB_TILE = 32768  # ... and vocabulary columns per tile (_CHUNKED_LOGPROB_CHUNK_SIZE)
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size (weights per absmax)
NESTED_BLOCK = 256  # double quantization: first-level absmax values per second-level fp32 absmax

COMPONENTS = (
    ("base_weights", "base weights"),
    ("adapter_weights", "adapter weights (LoRA)"),
    ("gradients", "gradients"),
    ("ddp_buckets", "DDP gradient buckets"),
    ("optimizer_state", "optimizer state (AdamW)"),
    ("activations", "activations"),
    ("loss", "loss (chunked LM head)"),
    ("fsdp_gathered", "FSDP gathered units"),
    ("worker_baseline", "worker process baseline"),
)
SHARDED = ("base_weights", "adapter_weights", "gradients", "optimizer_state")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _dtype_name(value) -> str | None:
    return None if value is None else str(value).removeprefix("torch.")


@functools.lru_cache(maxsize=8)
def model_shape(path: str, trust_remote_code: bool = False) -> dict:
    """The numbers the estimate needs from a model's config.json, with its exact parameter count:
    the model is built on the meta device (no memory, no weight read), tied embeddings counted once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    taken = "" if os.path.isdir(path) else " (no such folder, so it was taken as a hub id)"
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"model.path: cannot load the model config from {path}{taken}: {err}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    head = model.get_output_embeddings()
    names = {module: name for name, module in model.named_modules()}
    n_layers = text.num_hidden_layers
    layers = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers),
        key=lambda m: sum(p.numel() for p in m.parameters()),
        default=None,
    )
    if layers is None:
        raise DataError(f"model.path: {path}: no list of its {n_layers} decoder layers was found to plan with")
    in_layers = {id(p) for p in layers.parameters()}
    modules = []  # (name, kind, in, out, weight numel): what LoRA can target and bitsandbytes quantizes
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            modules.append((name, "linear", m.in_features, m.out_features, m.weight.numel()))
        elif isinstance(m, torch.nn.Embedding):
            modules.append((name, "embedding", m.num_embeddings, m.embedding_dim, m.weight.numel()))
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "root_params": sum(p.numel() for p in model.parameters() if id(p) not in in_layers),
        "embed_params": model.get_input_embeddings().weight.numel(),
        "layer_params": max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        "modules": modules,
        "head": names.get(head),
        "embed": names.get(model.get_input_embeddings()),
        "tied": head is not None and head.weight is model.get_input_embeddings().weight,
        "layers": n_layers,
        "hidden": hidden,
        "heads": heads,
        "kv_width": (getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        "q_width": heads * head_dim,
        "intermediate": getattr(text, "intermediate_size", None) or 4 * hidden,
        "vocab": text.vocab_size,
        "dtype": _dtype_name(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)),
    }


def _shape(cfg: Config) -> dict:
    return model_shape(cfg.model.path, cfg.model.trust_remote_code)


def weight_dtype(cfg: Config, shape: dict | None = None) -> str:
    """The dtype the weights are loaded in: model.dtype, or for `auto` the config's (float32 when it
    names none, as transformers loads it); float16 becomes float32 on CPU workers (sft_ray/model.py)."""
    shape = shape or _shape(cfg)
    name = cfg.model.dtype if cfg.model.dtype != "auto" else (shape["dtype"] or "float32")
    name = name if name in _BYTES else "float32"
    if name == "float16" and not cfg.scaling.use_gpu and cfg.quantization is None:
        return "float32"
    return name


def _matches(name: str, targets) -> bool:
    """PEFT's rule for a list of target module names: the full name, or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(cfg: Config, shape: dict | None = None) -> list[tuple]:
    """The modules LoRA adapts: `all-linear` is every Linear but the output head (PEFT's rule)."""
    shape = shape or _shape(cfg)
    if cfg.lora is None:
        return []
    t = cfg.lora.target_modules
    if t == "all-linear":
        return [m for m in shape["modules"] if m[1] == "linear" and m[0] != shape["head"]]
    return [m for m in shape["modules"] if _matches(m[0], t)]


def trainable_params(cfg: Config, shape: dict | None = None) -> int:
    """Parameters the optimizer updates: every one for full fine-tuning; else LoRA's A and B (r x
    (in + out) per targeted module), DoRA's magnitude (out per module) and, with the built-in
    ChatML, its 2 token rows in the input embeddings and (untied) the output head."""
    shape = shape or _shape(cfg)
    if cfg.lora is None:
        return shape["params"]
    r = cfg.lora.r
    n = sum(r * (i + o) + (o if cfg.lora.use_dora else 0) for _, _, i, o, _ in lora_targets(cfg, shape))
    if cfg.data.chat_template == "chatml":
        from sft_ray.chat_format import CHATML_TOKENS

        n += len(CHATML_TOKENS) * shape["hidden"] * (1 if shape["tied"] else 2)
    return n


def _quantized_weights(shape: dict) -> int:
    """Weights bitsandbytes stores in 4 bits: every Linear's but the output head's."""
    return sum(m[4] for m in shape["modules"] if m[1] == "linear" and m[0] != shape["head"])


def _base_parts(cfg: Config, shape: dict) -> tuple[int, int]:
    """(bytes FSDP shards, bytes it does not): the parameters; under QLoRA the packed 4-bit weights
    and the float32 rest, and apart the absmax values, which are no parameters (quant_state)."""
    if cfg.quantization is None:
        return shape["params"] * _BYTES[weight_dtype(cfg, shape)], 0
    q = _quantized_weights(shape)
    per_block = 1 + 4 / NESTED_BLOCK if cfg.quantization.double_quant else 4
    rest = (shape["params"] - q) * 4  # prepare_model_for_kbit_training: the rest in float32
    return math.ceil(q / 2) + rest, math.ceil(q / QUANT_BLOCK * per_block)


def base_weight_bytes(cfg: Config, shape: dict | None = None) -> int:
    """The whole base model's bytes on one worker (before any sharding)."""
    return sum(_base_parts(cfg, shape or _shape(cfg)))


def _autocast(cfg: Config, shape: dict) -> bool:
    """The HF Trainer's bf16 autocast: on GPUs, for a bfloat16 model or QLoRA computing in bfloat16 (worker.py)."""
    q = cfg.quantization
    return cfg.scaling.use_gpu and (
        weight_dtype(cfg, shape) == "bfloat16" if q is None else q.compute_dtype == "bfloat16"
    )


def _activation_widths(cfg: Config, shape: dict) -> tuple[int, int, int]:
    """(bytes of the residual stream and norm tensors, bytes of the attention tensors SDPA saves,
    bytes of the adapter's saved input copies)."""
    autocast = _autocast(cfg, shape)
    res = 4 if cfg.quantization is not None else _BYTES[weight_dtype(cfg, shape)]
    attn = 2 if autocast else res
    return res, attn, 2 if autocast else _adapter_bytes(cfg, shape)


def _adapter_bytes(cfg: Config, shape: dict) -> int:
    if cfg.lora is None:
        return _BYTES[weight_dtype(cfg, shape)]
    return 2 if cfg.quantization is not None else 4


def layer_activation_bytes(cfg: Config, tokens: int, shape: dict | None = None) -> int:
    """Bytes one decoder layer saves for its backward over `tokens` (= batch x sequence) tokens.

    Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models")
    count sbh(34 + 5as/h) bytes per layer for a GPT layer in 16 bits: 11sbh in attention, 19sbh in
    a 4h GELU MLP, 4sbh in the two LayerNorms, 5as^2b for the attention scores and their dropout.
    The same count for the Llama-style layers that transformers runs here: SDPA keeps no s x s
    score matrix (only q, k, v, its output and a per-head log-sum-exp), and there is no dropout
    but LoRA's. Per token, in elements of the residual width h, q width, kv width and MLP width i:
    - each RMSNorm: its input and its normalized output (2h), plus an fp32 copy of its input when
      the stream is 16-bit (the norm computes in fp32);
    - attention: the q/k/v projections' input (h), q, k and v, the attention output (o's input);
    - SwiGLU MLP: gate/up's input (h), gate's output, silu's output, up's output, down's input (4i);
    - each LoRA-adapted Linear: r values of lora_A's output, plus a copy of its input when the
      adapter's dtype differs from the input's or LoRA dropout is on (then also a 1-byte mask).
    Under GPU autocast q, k, v and the attention output are bfloat16; QLoRA's stream is float32
    (its embeddings and norms were cast to float32). MoE and other MLP shapes are counted as one
    dense MLP of intermediate_size.
    """
    shape = shape or _shape(cfg)
    h, i = shape["hidden"], shape["intermediate"]
    res, attn, copy_bytes = _activation_widths(cfg, shape)
    per_token = res * (6 * h) + attn * (2 * shape["q_width"] + 2 * shape["kv_width"]) + res * 4 * i
    if res < 4:
        per_token += 2 * 4 * h  # the two RMSNorms' fp32 copies of their input
    if cfg.lora is not None:
        adapter = _adapter_bytes(cfg, shape)
        dropout = cfg.lora.dropout > 0
        # A copy when the input is cast to the adapter's dtype (all inputs are counted at the stream's dtype).
        copy = (copy_bytes if dropout or res != adapter else 0) + (1 if dropout else 0)
        inside = [m for m in lora_targets(cfg, shape) if m[0] not in (shape["head"], shape["embed"])]
        per_token += sum(copy * fan_in + adapter * cfg.lora.r for _, _, fan_in, _, _ in inside) / shape["layers"]
    return math.ceil(tokens * per_token)


def activation_bytes(cfg: Config, checkpointing: bool | None = None, shape: dict | None = None) -> int:
    """Saved activations of a training step at per_device_batch_size x data.max_length (an upper
    bound: batches are padded to their longest row, packed rows fill max_length).

    Without activation checkpointing every layer keeps `layer_activation_bytes`; with it (HF's
    non-reentrant checkpoint around each decoder layer) every layer keeps only its input (h
    values per token in the stream's dtype) and one layer's full activations exist again during
    its recomputation in backward. Plus the final norm's (as one RMSNorm above)."""
    shape = shape or _shape(cfg)
    checkpointing = cfg.train.gradient_checkpointing if checkpointing is None else checkpointing
    tokens = cfg.train.per_device_batch_size * cfg.data.max_length
    res = _activation_widths(cfg, shape)[0]
    layer = layer_activation_bytes(cfg, tokens, shape)
    final_norm = tokens * shape["hidden"] * (2 * res + (4 if res < 4 else 0))
    if checkpointing:
        return shape["layers"] * tokens * shape["hidden"] * res + layer + final_norm
    return shape["layers"] * layer + final_norm


def loss_bytes(cfg: Config, shape: dict | None = None) -> int:
    """The loss's working set. TRL's SFTTrainer computes the per-token log-probabilities with a
    chunked LM head (trl/kernels/chunked_logprob.py) that never builds the batch x seq x vocab
    logits: one tile of 4096 tokens x 32768 vocabulary columns at a time, in the compute dtype
    (on CPUs the torch fallback makes about four float32 temporaries of the tile and a bool mask;
    on GPUs a Triton kernel works in place), a copy of the hidden states it projects, their
    float32 gradient, a head slice cast to the compute dtype when the head's dtype differs, and,
    when the head is trained (full fine-tuning), its float32 gradient accumulator."""
    shape = shape or _shape(cfg)
    tokens = cfg.train.per_device_batch_size * cfg.data.max_length
    h, vocab = shape["hidden"], shape["vocab"]
    res, attn, _ = _activation_widths(cfg, shape)
    compute = attn  # the autocast dtype, else the hidden states'
    tile = min(tokens, TOKEN_TILE) * min(vocab, VOCAB_TILE)
    total = tile * (compute + (0 if cfg.scaling.use_gpu else 4 * 4 + 1))
    total += tokens * h * (res + 4)
    head_bytes = 4 if cfg.quantization is not None else _BYTES[weight_dtype(cfg, shape)]
    if head_bytes != compute:
        total += min(vocab, VOCAB_TILE) * h * compute
    if cfg.lora is None:
        total += vocab * h * 4
    return total


def _fsdp_upcast(cfg: Config, shape: dict) -> bool:
    """Accelerate's FSDP2 casts the trainable parameters to float32 under mixed precision (bf16 on
    GPUs), unless the model has 4-bit weights: a full fine-tuning's whole model (LoRA's adapter is
    float32 already)."""
    return cfg.lora is None and cfg.quantization is None and _autocast(cfg, shape)


def _gathered_bytes(cfg: Config, shape: dict, trained_bytes: int) -> int:
    """What FSDP2 holds unsharded at its peak, with Accelerate 1.15's units (fsdp2_prepare_model):
    one per decoder layer, the input embedding alone, and a tail unit of the final norm and the
    head (both embeddings when tied) that stays gathered from its forward to its backward. At the
    backward's start: the tail, the current decoder layer and the one prefetched, and the current
    layer's gradients before their reduce-scatter. Gathered weights are in bfloat16 under mixed
    precision, else as stored."""
    gathered = 2 if _autocast(cfg, shape) else None
    if cfg.quantization is not None:
        layer = math.ceil(_quantized_weights(shape) / 2) / shape["layers"]  # packed 4-bit bytes
        per_param = gathered or 4  # the float32 rest
    else:
        per_param = gathered or _BYTES[weight_dtype(cfg, shape)]
        layer = shape["layer_params"] * per_param
    tail = (shape["root_params"] - (0 if shape["tied"] else shape["embed_params"])) * per_param
    embed = 0 if shape["tied"] else shape["embed_params"] * per_param
    if cfg.lora is None:  # the layer's weights are the trained ones
        adapter, grads = 0, shape["layer_params"] * trained_bytes / shape["params"]
    else:  # one layer's share of the adapter, and of its gradients
        adapter = grads = trained_bytes / shape["layers"]
    return math.ceil(max(tail + 2 * (layer + adapter), embed) + grads)


def estimate(cfg: Config, strategy: str) -> dict[str, int]:
    """Per-worker bytes of each component (COMPONENTS) for `strategy` ("ddp" or "fsdp"), and
    "total", their sum: what one GPU holds while training (use_gpu), or the worker process's RSS
    (CPU workers). Beside the total, not in it:
    - "load_peak": under fsdp, the same memory while the whole model waits to be sharded, when it
      is loaded there whole (QLoRA loads onto the worker's device; on CPU workers every model):
      the whole base, its shards, and on CPU workers the process baseline; else 0.
    - "cpu_at_load": GPU workers, unquantized: the whole model in CPU memory while it loads (and
      under fsdp until it is sharded).
    - "cpu_offload": with scaling.cpu_offload under fsdp, the sharded parts, moved to CPU memory.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, not {strategy!r}")
    shape = _shape(cfg)
    workers = cfg.scaling.num_workers
    sharding = strategy == "fsdp"
    trainable = trainable_params(cfg, shape)
    upcast = sharding and _fsdp_upcast(cfg, shape)
    own = 4 if upcast else _adapter_bytes(cfg, shape)  # bytes per trainable parameter (its dtype)
    sharded, whole_only = (shape["params"] * 4, 0) if upcast else _base_parts(cfg, shape)
    out = dict.fromkeys(k for k, _ in COMPONENTS)
    out["base_weights"] = sharded + whole_only
    out["adapter_weights"] = 0 if cfg.lora is None else trainable * own
    out["gradients"] = trainable * own
    out["optimizer_state"] = 2 * trainable * own
    out["activations"] = activation_bytes(cfg, shape=shape)
    out["loss"] = loss_bytes(cfg, shape)
    out["ddp_buckets"] = out["gradients"] if not sharding and workers > 1 else 0
    out["fsdp_gathered"] = 0
    out["worker_baseline"] = 0 if cfg.scaling.use_gpu else WORKER_BASELINE_BYTES
    extra = {"load_peak": 0, "cpu_at_load": 0, "cpu_offload": 0}
    if cfg.scaling.use_gpu and cfg.quantization is None:
        extra["cpu_at_load"] = sharded
    if sharding:
        for key in SHARDED:
            out[key] = math.ceil(out[key] / workers)
        out["base_weights"] = math.ceil(sharded / workers) + whole_only
        out["fsdp_gathered"] = _gathered_bytes(cfg, shape, trainable * own)
        if cfg.quantization is not None or not cfg.scaling.use_gpu:
            extra["load_peak"] = sharded + whole_only + out["base_weights"] + out["worker_baseline"]
        if cfg.scaling.cpu_offload and cfg.scaling.use_gpu:  # QLoRA's absmax values stay
            extra["cpu_offload"] = sum(out[key] for key in SHARDED) - whole_only
            out.update(dict.fromkeys(SHARDED, 0), base_weights=whole_only)
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return {**out, **extra}


def find_manifest(cfg: Config) -> tuple[dict | None, str]:
    """The manifest of this config's preparation under storage.path and where it is; or None and
    why there is none (not prepared yet, or the sources cannot be fingerprinted). Reads only:
    nothing is prepared, no Ray is started."""
    from sft_ray.data.cache import prepared_dir

    try:
        where = storage.join(prepared_dir(cfg), "manifest.json")
    except DataError as err:
        return None, f"cannot look for a preparation: {err}"
    if not storage.exists(where):
        return None, f"no preparation of this data at {where} yet"
    return storage.read_json(where), where


def data_plan(cfg: Config, manifest: dict | None) -> dict:
    """Tokens per step (an upper bound: every row at max_length), and with a manifest the steps per
    epoch and in all (train/shards.py counts them as the HF Trainer does) and the mean real tokens."""
    from sft_ray.train.shards import total_steps

    t, workers = cfg.train, cfg.scaling.num_workers
    out = {
        "tokens_per_step_max": t.per_device_batch_size * cfg.data.max_length * workers * t.gradient_accumulation_steps
    }
    if manifest is None:
        return out
    one_epoch = copy.deepcopy(cfg)
    one_epoch.train.max_steps, one_epoch.train.epochs = None, 1
    out["steps_per_epoch"] = total_steps(one_epoch, manifest)
    out["total_steps"] = total_steps(cfg, manifest)
    out["train_rows"] = sum(f["rows"] for f in manifest["splits"]["train"]["files"])
    layout = manifest.get("layout") or {}
    if layout.get("rows"):
        out["mean_real_tokens_per_row"] = layout["real_tokens"] / layout["rows"]
        out["real_tokens_per_step"] = round(
            out["mean_real_tokens_per_row"] * t.per_device_batch_size * workers * t.gradient_accumulation_steps
        )
    return out


def memory_budget(cfg: Config, memory_gb: float | None) -> tuple[int | None, str]:
    """The bytes one worker may hold, and where that number comes from. GPUs: --gpu-memory-gb, or
    this machine's GPU when it has one; a Ray cluster reports GPU counts, not their memory. CPU
    workers: --gpu-memory-gb read as the memory per worker, else this machine's memory shared by
    all workers (an embedded Ray runs them all here)."""
    if memory_gb is not None:
        return int(memory_gb * 2**30), f"{memory_gb:g} GiB per {'GPU' if cfg.scaling.use_gpu else 'worker'}"
    if cfg.scaling.use_gpu:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"this machine's {props.name}, {_human(props.total_memory)}"
        return None, (
            "no verdict: pass --gpu-memory-gb (a Ray cluster reports how many GPUs it has, not their memory, "
            "and this machine has no GPU to ask)"
        )
    if os.environ.get("RAY_ADDRESS"):
        return None, "no verdict: pass --gpu-memory-gb as the memory each CPU worker may hold on the cluster's nodes"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    workers = cfg.scaling.num_workers
    return total // workers, f"this machine's {_human(total)} shared by {workers} CPU worker(s)"


def _human(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB" if n else "0"


def _fits(total: int, budget: int) -> bool:
    return total <= FIT_FRACTION * budget


def _variant(cfg: Config, section: str, key: str, value) -> Config:
    c = copy.deepcopy(cfg)
    setattr(getattr(c, section), key, value) if section else setattr(c, key, value)
    return c


def peak(est: dict[str, int]) -> int:
    """The most the compared memory holds: training, or loading when that is more (load_peak)."""
    return max(est["total"], est["load_peak"])


def _fitting(cfg: Config, budget: int) -> list[str]:
    """The strategies whose peak fits `budget` (fsdp only with more than one worker)."""
    strategies = ["ddp", "fsdp"] if cfg.scaling.num_workers > 1 else ["ddp"]
    return [s for s in strategies if _fits(peak(estimate(cfg, s)), budget)]


def what_would_fit(cfg: Config, budget: int) -> list[str]:
    """Single changes after which a strategy fits: a 4-bit base, activation checkpointing, batch 1,
    more workers with fsdp."""
    from sft_ray.config import QuantizationConfig

    tries = []
    if cfg.quantization is None and cfg.lora is not None:
        tries.append(
            ("a 4-bit base (quantization: {quant_type: nf4})", _variant(cfg, "", "quantization", QuantizationConfig()))
        )
    if not cfg.train.gradient_checkpointing:
        tries.append(("train.gradient_checkpointing=true", _variant(cfg, "train", "gradient_checkpointing", True)))
    if cfg.train.per_device_batch_size > 1:
        tries.append(("train.per_device_batch_size=1", _variant(cfg, "train", "per_device_batch_size", 1)))
    found = [f"{label} ({' or '.join(ok)})" for label, c in tries if (ok := _fitting(c, budget))]
    for workers in (2, 4, 8, 16, 32, 64):
        more = _variant(cfg, "scaling", "num_workers", workers)
        if workers > cfg.scaling.num_workers and _fits(peak(estimate(more, "fsdp")), budget):
            found.append(f"scaling.num_workers={workers} with fsdp")
            break
    return found


def format_plan(cfg: Config, memory_gb: float | None = None) -> str:
    """The printed plan: both strategies side by side, the data's steps and tokens, the verdict."""
    shape = _shape(cfg)
    workers, gpu, q = cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.quantization
    est = {s: estimate(cfg, s) for s in (["ddp", "fsdp"] if workers > 1 else ["ddp"])}
    if cfg.lora is None:
        how = "full fine-tuning (lora: null)"
    else:
        targets = cfg.lora.target_modules
        how = f"LoRA r={cfg.lora.r} on {targets if isinstance(targets, str) else ', '.join(targets)}"
    lines = [
        f"memory plan for {cfg.name}: {workers} worker(s) on {'GPUs' if gpu else 'CPUs'}, batch "
        f"{cfg.train.per_device_batch_size} x max_length {cfg.data.max_length} per worker, activation "
        f"checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}",
        f"model {cfg.model.path}: {shape['params']:,} parameters, {weight_dtype(cfg, shape)}"
        + (
            f", 4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"
            if q
            else ""
        ),
        f"trained: {trainable_params(cfg, shape):,} parameters, {how}",
        "",
    ]

    def row(label: str, cell) -> str:
        cells = [cell(s) if s in est else "n/a" for s in ("ddp", "fsdp")]
        return f"{label:<32}" + "".join(f"{c:>12}" for c in cells)

    rule = "-" * (32 + 2 * 12)
    lines += [f"{'per worker':<32}{'ddp':>12}{'fsdp':>12}", rule]
    for key, label in COMPONENTS:
        if any(e[key] for e in est.values()):
            lines.append(row(label, lambda s, key=key: _human(est[s][key])))
    lines += [rule, row(f"total per {'GPU' if gpu else 'worker (RSS)'}", lambda s: _human(est[s]["total"]))]
    memory = "GPU" if gpu else "RSS"
    if any(e["load_peak"] > e["total"] for e in est.values()):
        lines.append(
            row(f"{memory} peak while loading", lambda s: _human(est[s]["load_peak"]) if est[s]["load_peak"] else "-")
        )
    if any(e["cpu_offload"] for e in est.values()):
        lines.append(row("CPU memory per worker (offload)", lambda s: _human(est[s]["cpu_offload"])))
    if any(e["cpu_at_load"] for e in est.values()):
        lines.append(row("CPU memory per worker at load", lambda s: _human(est[s]["cpu_at_load"])))
    notes = []
    if any(e["load_peak"] > e["total"] for e in est.values()):
        notes.append(
            "(fsdp loads the whole 4-bit model on each worker before sharding it)"
            if q
            else "(fsdp: one worker per node reads the whole model before sharding it; the others build it empty)"
        )
    if any(e["cpu_at_load"] for e in est.values()):
        notes.append(
            "(GPU workers load the model in CPU memory first"
            + ("; under fsdp one worker per node does, until sharded)" if workers > 1 else ")")
        )
    budget, source = memory_budget(cfg, memory_gb)
    fits = [] if budget is None else _fitting(cfg, budget)
    if budget is not None:
        lines.append(row(f"fits in {_human(FIT_FRACTION * budget)}?", lambda s: "yes" if s in fits else "no"))
    other = activation_bytes(cfg, not cfg.train.gradient_checkpointing, shape)
    lines += notes
    lines.append(
        f"(activations {'without' if cfg.train.gradient_checkpointing else 'with'} activation checkpointing: "
        f"{_human(other)}; all at max_length: an upper bound for padded rows)"
    )
    if workers == 1:
        lines.append("(fsdp shards the model over the workers: it needs scaling.num_workers >= 2)")

    manifest, where = find_manifest(cfg)
    d, t = data_plan(cfg, manifest), cfg.train
    lines += [
        "",
        f"tokens per step: at most {d['tokens_per_step_max']:,} ({t.per_device_batch_size} x {cfg.data.max_length} x "
        f"{workers} worker(s) x {t.gradient_accumulation_steps} accumulation; rows shorter than max_length hold fewer)",
    ]
    if manifest is None:
        lines.append(f"steps per epoch: known after `sft-ray prepare` ({where})")
    else:
        lines.append(
            f"steps per epoch: {d['steps_per_epoch']:,} ({d['train_rows']:,} train rows), {d['total_steps']:,} "
            f"in all (prepared data: {where})"
        )
        if "mean_real_tokens_per_row" in d:
            lines.append(
                f"real tokens: {d['mean_real_tokens_per_row']:.1f} per row on average, about "
                f"{d['real_tokens_per_step']:,} per step"
            )
    lines.append("")
    if budget is None:
        lines.append(f"verdict: {source}")
        return "\n".join(lines)
    where = f"within {FIT_FRACTION:.0%} of {source}"
    if "ddp" in fits:
        verdict = f"ddp fits {where}" + ("; so does fsdp, but ddp needs no gathers" if "fsdp" in fits else "")
    elif fits:
        verdict = f"fsdp fits {where}, ddp does not: set scaling.strategy=fsdp"
    else:
        would = what_would_fit(cfg, budget)
        verdict = f"neither ddp nor fsdp fits {where}; " + (
            "what would: " + "; ".join(would)
            if would
            else "no single change tried (4-bit, activation checkpointing, batch 1, up to 64 workers with fsdp) does"
        )
    if gpu:
        verdict += " (the CUDA context is not in the totals)"
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines)
