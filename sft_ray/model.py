"""Tokenizer and model loading (local folders or hub ids), LoRA and QLoRA adapter config.

Imported only where a tokenizer or model is needed: the data driver (which loads the tokenizer
once for the Ray Data actors), the actors and the Ray Train workers.
"""

from __future__ import annotations

from sft_ray.config import Config


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batches need a pad id; padded positions carry label -100
    return tok


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(cfg: Config, device):
    """The frozen base model on `device`, 4-bit when `quantization` is set."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    kwargs["dtype"] = "auto" if cfg.model.dtype == "auto" else _dtype(cfg.model.dtype)
    q = cfg.quantization
    if q is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=_dtype(q.compute_dtype),
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **kwargs)
    if q is None:
        model.to(device)
        if device.type == "cpu" and model.dtype == torch.float16:
            model.to(torch.float32)  # fp16 matmuls are not supported on every CPU
        return model
    from peft import prepare_model_for_kbit_training

    if device.type == "cpu":
        keep_4bit_trainable_on_cpu(model)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def check_packing_isolates(model, where: str) -> None:
    """Packed rows rely on the model building a per-example mask from `position_ids`. Some
    architectures (OPT, Bloom, Falcon, MPT, much remote code) ignore them and would let every
    example attend to the ones before it, silently: refuse those before any step is trained."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=device)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 3:].float()
        alone = model(input_ids=ids[:, 3:], position_ids=pos[:, 3:], use_cache=False).logits[0].float()
    # Half-precision and 4-bit kernels differ a little between the two shapes; attending across
    # examples changes the logits by far more.
    if (packed - alone).abs().max() > 0.05 * alone.abs().max() + 1e-3:
        raise ValueError(
            f"data.packing: the model {where} ({model.config.model_type}) does not keep packed examples apart "
            "(its attention ignores position_ids), so they would attend to each other; set data.packing=false"
        )


def keep_4bit_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights on the first eval-mode CPU forward.

    On CPUs with avx512_bf16 that repacking routes every later forward through a kernel with no
    autograd, so gradients through the frozen base silently vanish after an evaluation or a
    generation (stack-notes §8.3). Training must never depend on whether eval ran first.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(cfg: Config):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_dora=cfg.lora.use_dora,
        use_rslora=cfg.lora.use_rslora,
        task_type="CAUSAL_LM",
    )
