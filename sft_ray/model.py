"""Tokenizer and model loading (local folders or hub ids), LoRA and QLoRA adapter config.

Imported only where a tokenizer or model is needed: the data driver (which loads the tokenizer
once for the Ray Data actors), the actors and the Ray Train workers.
"""

from __future__ import annotations

import os

from sft_ray.config import Config


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer every stage shares: `chat_template` (the text, from chat_format.template_text)
    replaces its template, and the built-in ChatML adds its turn tokens and makes `<|im_end|>` EOS."""
    from transformers import AutoTokenizer

    from sft_ray.chat_format import apply_chat_format

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Batches need a pad id; padded positions carry label -100. Taken before ChatML moves EOS
        # to `<|im_end|>`, so that padding stays a token apart from the one the model learns to emit.
        tok.pad_token = tok.eos_token
    apply_chat_format(tok, chat_template)
    return tok


def check_model(cfg: Config):
    """The driver's tokenizer (the preparation's template check and actors use it), loaded with the
    model's config before any worker starts, also when the preparation is reused: a tokenizer that
    cannot load failed inside every worker after their start-up. Refuses a `data.max_length`
    beyond the model's positions."""
    from transformers import AutoConfig

    from sft_ray.chat_format import template_text
    from sft_ray.data.errors import DataError

    taken = "" if os.path.isdir(cfg.model.path) else " (no such folder, so it was taken as a hub id)"
    try:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, template_text(cfg.data.chat_template))
    except (OSError, ValueError) as err:
        raise DataError(f"model.path: cannot load a tokenizer from {cfg.model.path}{taken}: {err}") from None
    try:
        config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"model.path: cannot load the model config from {cfg.model.path}{taken}: {err}") from None
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.data.max_length > positions:
        raise DataError(
            f"data.max_length={cfg.data.max_length} is beyond the {positions} positions of {cfg.model.path} "
            f"(max_position_embeddings in its config); lower data.max_length to at most {positions}"
        )
    return tokenizer


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer's vocabulary when tokens were added (never shrink: many
    models carry spare rows) and make `generate` stop on the tokenizer's EOS too (`<|im_end|>` for
    ChatML on a base; the stops the model has, like Llama-3.1's three, are kept).

    Exactly `len(tokenizer)` rows, not a multiple of 64 as TRL's clone_chat_template rounds to: the
    adapter is reloaded onto a base resized the same way from the saved tokenizer alone (export,
    PeftModel.from_pretrained), and rows no token owns would be ids that decode to nothing.
    """
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # New rows start at the mean of the old ones (transformers' default): a neutral start, and
        # one that no logit of the new tokens dominates before they are trained.
        model.resize_token_embeddings(len(tokenizer))
    stops = model.generation_config.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stops]


def plain_generation(max_new_tokens: int, temperature: float, pad_id: int, stops: list[int]):
    """Greedy (temperature 0) or plain temperature sampling, whatever the model's own generation
    config says: transformers fills every setting left unset from it, so a repetition penalty or
    top-p/top-k shipped with the model (Qwen2.5-Instruct: 1.05, top_k 20, top_p 0.8) would act
    on "greedy" answers too. Each is set to its neutral value instead."""
    from transformers import GenerationConfig

    sampled = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_length=0,
        do_sample=sampled,
        temperature=temperature if sampled else 1.0,
        top_p=1.0,
        top_k=0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad_id,
        eos_token_id=stops,
    )


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(cfg: Config, device, tokenizer=None):
    """The base model on `device`, 4-bit when `quantization` is set; with `tokenizer`, its
    embeddings fit that tokenizer (fit_embeddings), before the 4-bit preparation freezes them.

    Under fsdp an unquantized model stays in CPU memory (on one worker per node; the others hold
    it on the meta device): sharding moves each worker's part to its device, so no GPU ever holds
    the whole model. 4-bit weights are stored in the compute dtype
    (`bnb_4bit_quant_storage`), which FSDP can shard; uint8 storage it cannot."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sft_ray.train.fsdp import enabled as sharded_by_fsdp

    sharded = sharded_by_fsdp(cfg)
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    kwargs["dtype"] = "auto" if cfg.model.dtype == "auto" else _dtype(cfg.model.dtype)
    q = cfg.quantization
    if q is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=_dtype(q.compute_dtype),
            **({"bnb_4bit_quant_storage": _dtype(q.compute_dtype)} if sharded else {}),
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **kwargs)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if q is None:
        if not sharded:  # fsdp: sharding moves each worker's part to its device (from meta, see train/fsdp.py)
            model.to(device)
        if device.type == "cpu" and model.dtype == torch.float16:
            model.to(torch.float32)  # fp16 matmuls are not supported on every CPU
        return model
    from peft import prepare_model_for_kbit_training

    if device.type == "cpu":
        keep_4bit_trainable_on_cpu(model)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.train.gradient_checkpointing and not sharded,  # fsdp: FSDP's own
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


def token_rows(model, tokenizer, chat_template: str | None) -> dict[str, list[int]] | None:
    """The embedding rows to train with the adapter: those of the built-in ChatML's turn tokens, in
    the input embeddings and in the output head (the same module for tied embeddings).

    A base model's rows for them are new (mean-initialised) or were never trained, whether or not
    the tokenizer already had the tokens: the model must learn to read them, and to emit
    `<|im_end|>`, which an untrained output row never wins. A user's Jinja template adds no token,
    so its rows are not known to need training; none are trained.
    """
    from sft_ray.chat_format import CHATML, CHATML_TOKENS

    if chat_template != CHATML:
        return None
    ids = tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS))
    names = {module: name for name, module in model.named_modules()}
    return {names[model.get_input_embeddings()]: ids, names[model.get_output_embeddings()]: ids}


def serve_trained_rows_to_trl(model) -> None:
    """Make the trained token rows of a PEFT model work under TRL's SFTTrainer, and stay light.

    TRL computes the loss with a fused LM head that reads `lm_head.weight` and `lm_head.bias`
    directly (stack-notes T5). PEFT's trainable-token wrapper serves `.weight` as the base rows with
    the trained rows copied in (differentiable), but has no `.bias`: the first step fails with
    AttributeError. Given the wrapped layer's bias, the head's trained rows learn (measured: only the
    new rows of embeddings and head change, and the model ends its turns with `<|im_end|>`).
    Training the whole head instead (`modules_to_save=["lm_head"]`, which TRL accepts) also works,
    but trains and saves vocabulary x hidden values (525M for Llama-3-8B) instead of 2 rows.

    The trained rows replace the base rows (they are not added to them), so the adapter needs no
    copy of the resized matrices, which PEFT saves by default once the vocabulary grew (2 GB per
    checkpoint for Llama-3-8B): every save leaves them out. Forward passes outside the fused loss
    (generation) go through PEFT's own wrapper, which drops a head bias (huggingface/peft#3649):
    Llama-style heads have none.
    """
    import functools

    from peft.utils import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if not isinstance(head, TrainableTokensWrapper):
        return
    # Set on the instance without registering it, so the state dict gains no second `bias`.
    object.__setattr__(head, "bias", head.token_adapter.base_layer.bias)
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)


def lora_config(cfg: Config, trainable_rows: dict[str, list[int]] | None = None):
    """The adapter: LoRA on `lora.target_modules`, plus the embedding rows of `trainable_rows`
    (token_rows) trained whole and saved with it. None for full fine-tuning (`lora: null`)."""
    from peft import LoraConfig

    if cfg.lora is None:
        return None

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_dora=cfg.lora.use_dora,
        use_rslora=cfg.lora.use_rslora,
        trainable_token_indices=trainable_rows,
        task_type="CAUSAL_LM",
    )
