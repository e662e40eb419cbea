"""FSDP2 for `scaling.strategy: fsdp`: the model sharded over the workers, one unit per decoder layer.

Through the HF Trainer's own FSDP2 path (Accelerate's plugin, `fully_shard`): weights, gradients and
optimizer state are split over the workers, and each decoder layer is gathered only while it runs.
Checkpoints are sharded (`torch.distributed.checkpoint`): every worker writes its own part of the
trainable weights and optimizer state, the frozen base is never saved (it is reloaded from
`model.path`), and a rerun resumes from them at the same step with the same optimizer state.
`final/` is gathered into a plain PEFT adapter (or, with `lora: null`, a plain model folder) that
loads without FSDP.
"""

from __future__ import annotations

import os
import re
import shutil

from sft_ray.config import Config


def enabled(cfg: Config) -> bool:
    return cfg.scaling.strategy == "fsdp"


def fsdp_config(cfg: Config) -> dict:
    """The HF Trainer's `fsdp_config`. Units are the model's own decoder layers (Accelerate takes
    them from the model's `_no_split_modules` when none are named). Activation checkpointing is
    FSDP's own: the Trainer's would add an all-gather per layer in the backward pass."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": cfg.train.gradient_checkpointing,
        "cpu_offload": cfg.scaling.cpu_offload,
        "cpu_ram_efficient_loading": loads_once(cfg),
    }


def loads_once(cfg: Config) -> bool:
    """Whether the base is read from disk by one worker per node only (unquantized models under fsdp).

    The others build it on the meta device and get their shards from rank 0 while it is sharded,
    so a node holds one copy in CPU memory at start-up, not one per worker (8 x 140 GB for a 70B
    model on an 8-GPU node). 4-bit weights are quantized as they load, on every worker."""
    return enabled(cfg) and cfg.quantization is None


def announce_loading(cfg: Config) -> None:
    """Tell transformers' `from_pretrained`, before the model is loaded, that only local rank 0
    reads weights (the variables the HF Trainer would set only later, with its arguments)."""
    if loads_once(cfg):
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def holds_weights(cfg: Config) -> bool:
    """Whether this worker's model has real weights before sharding (see loads_once)."""
    return not loads_once(cfg) or os.environ.get("LOCAL_RANK", "0") == "0"


def trainer_class(cfg: Config, device):
    """TRL's SFTTrainer; on CPU workers under fsdp, one whose Accelerator shards there too (compat)."""
    from trl import SFTTrainer

    from sft_ray.train.compat import fsdp_on_cpu

    return fsdp_on_cpu(SFTTrainer) if enabled(cfg) and device.type == "cpu" else SFTTrainer


def sharded(model) -> bool:
    """Whether the model's parameters are FSDP shards (DTensors) on this worker."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def trainable_state_dict(trainer) -> dict | None:
    """The trained weights gathered whole on rank 0 (every rank must call it: it is collective);
    None when the model is not sharded. Frozen base weights are left out, so rank 0 never holds
    the whole base model in memory."""
    if not sharded(trainer.model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(trainer.model, options=options)


_SHARD = re.compile(r"__(\d+)_\d+\.distcp")


def stage_own_shards(folder: str, staged: str, rank: int) -> None:
    """Copy this rank's parts of a sharded checkpoint (`<dir>/__<rank>_<n>.distcp`) into `staged`.

    Every rank uploads its own: on several nodes, a rank's parts exist only on its node."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            m = _SHARD.fullmatch(name)
            if m and int(m.group(1)) == rank:
                dest = os.path.join(staged, os.path.relpath(root, folder))
                os.makedirs(dest, exist_ok=True)
                shutil.copy(os.path.join(root, name), dest)
