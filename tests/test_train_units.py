"""The worker's training pieces in one process (no Ray): packed-batch loss, QLoRA gradients on CPU."""

import pyarrow as pa
import pytest
import torch

from sft_ray.config import validate


def _cfg(tiny_model, tmp_path, **extra):
    return validate(
        {
            "name": "unit",
            "model": {"path": str(tiny_model), "dtype": "float32"},
            "lora": {"dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "storage": {"path": str(tmp_path)},
            **extra,
        }
    )


def _trainer(cfg, tokenizer, tmp_path, flatten_packed=False):
    import datasets
    from trl import SFTTrainer

    from sft_ray.model import load_model, lora_config
    from sft_ray.train.callbacks import count_packed_rows_in_num_tokens
    from sft_ray.train.collate import make_collator
    from sft_ray.train.worker import _sft_config

    device = torch.device("cpu")
    dummy = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]})
    trainer = SFTTrainer(
        model=load_model(cfg, device),
        args=_sft_config(cfg, str(tmp_path / "out"), device, has_eval=False, resumed=False),
        train_dataset=dummy,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        data_collator=make_collator(tokenizer.pad_token_id, flatten_packed),
    )
    count_packed_rows_in_num_tokens(trainer)  # as the worker does
    return trainer


def _examples(tokenizer):
    from sft_ray.data.formats import render_record
    from sft_ray.data.tokenize import encode_batch, special_ids

    records = [
        {"question": "Is the sky blue?", "output": "yes"},
        {"question": "Name three colours of the rainbow, please.", "output": "red, orange and yellow"},
        {"question": "2+2?", "input": "think", "output": "4"},
    ]
    examples = [ex for r in records for ex in render_record(r, "instruction")]
    encoded = encode_batch(tokenizer, examples, special_ids(tokenizer), 512)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
def test_packed_batch_loss_equals_separate_examples(tiny_model, tokenizer, tmp_path, flatten):
    """Packed rows attend only within each example: the loss matches the examples run one by one,
    whether a batch stays [rows, length] (SDPA, eager) or is flattened into one sequence (flash)."""
    from sft_ray.data.formats import render_record
    from sft_ray.data.packing import pack_table
    from sft_ray.data.tokenize import encode_batch, special_ids
    from sft_ray.train.callbacks import TokenCounter

    trainer = _trainer(_cfg(tiny_model, tmp_path), tokenizer, tmp_path, flatten_packed=flatten)
    model = trainer.model
    model.train()
    # Plus a text example with no BOS (as from a tokenizer that adds none): its first label is trained,
    # and in a packed row it must not be predicted from the previous example's last token.
    text = encode_batch(tokenizer, render_record({"text": "plain words to learn"}, "text"), special_ids(tokenizer), 64)
    examples = _examples(tokenizer) + [{"input_ids": text[0].input_ids[1:], "labels": text[0].labels[1:]}]
    assert examples[-1]["labels"][0] != -100
    # Give the adapter non-zero weights so the comparison covers LoRA too.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)

    def loss_of(batch):
        with torch.no_grad():
            return float(trainer.compute_loss(model, batch))

    sums, counts = 0.0, 0
    for ex in examples:
        n = sum(1 for x in ex["labels"][1:] if x != -100)  # labels shift by one inside the loss
        sums += loss_of(trainer.data_collator([ex])) * n
        counts += n
    separate = sums / counts

    one_row = pack_table(pa.Table.from_pylist(examples), 512).to_pylist()
    assert len(one_row) == 1  # all four in one row, positions restarting at each example
    assert loss_of(trainer.data_collator(one_row)) == pytest.approx(separate, rel=1e-5)
    assert loss_of(trainer.data_collator(examples)) == pytest.approx(separate, rel=1e-5)  # padded rows
    # Control: the same row with positions running on (no boundaries) gives a different loss,
    # so the equality above is not an accident of the data.
    leaky = [{**one_row[0], "seq_lengths": [len(one_row[0]["input_ids"])]}]
    assert loss_of(trainer.data_collator(leaky)) != pytest.approx(separate, rel=1e-3)

    # Several packed rows of different fill in one batch: the padding attends to nothing and trains
    # nothing, and the token counter sees exactly the trained and the real tokens.
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_table(pa.Table.from_pylist(examples), max(lengths) + 1).to_pylist()
    batch = trainer.data_collator(rows)
    assert len(rows) >= 2 and "attention_mask" not in batch
    assert batch["input_ids"].shape[0] == (1 if flatten else len(rows))
    seen = trainer._total_train_tokens
    assert loss_of(batch) == pytest.approx(separate, rel=1e-5)
    counter = TokenCounter()
    counter.add(batch)
    assert counter.totals[:2] == [counts, sum(lengths)]
    # TRL's num_tokens (logged, and the run summary's tokens_seen) counts every row's tokens too; the
    # flattened batch is padded to a multiple of 8 and TRL counts that padding there.
    expected = batch["input_ids"].numel() if flatten else sum(lengths)
    assert trainer._total_train_tokens - seen == expected
    assert trainer._metrics["train"]["num_tokens"] == [trainer._total_train_tokens]


def _lora_grads_after_eval(cfg, tokenizer, tmp_path, guard: bool) -> dict:
    import bitsandbytes as bnb

    trainer = _trainer(cfg, tokenizer, tmp_path)
    model = trainer.model
    if not guard:  # undo the guard load_model applied, to show the trap it prevents
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    batch = trainer.data_collator(_examples(tokenizer))
    model.eval()
    with torch.no_grad():  # what trainer.evaluate() and generate() do
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    trainer.compute_loss(model, batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def test_qlora_lora_gradients_survive_an_eval_pass_on_cpu(tiny_model, tokenizer, tmp_path):
    import bitsandbytes as bnb

    q = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    cfg = _cfg(tiny_model, tmp_path, quantization=q)
    trainer = _trainer(cfg, tokenizer, tmp_path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    grads = _lora_grads_after_eval(cfg, tokenizer, tmp_path, guard=True)
    layers = {n.split(".lora_")[0] for n in grads}
    assert len(layers) == 2 * 7  # all-linear: q, k, v, o, gate, up, down in both layers
    # B starts at zero, so A's gradient is zero on the first step by construction; B's must flow.
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)

    # Skip decided by the CPU, not by the result: only with avx512_bf16 does bitsandbytes repack on eval.
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks 4-bit weights on eval, no trap to show")
    unguarded = _lora_grads_after_eval(cfg, tokenizer, tmp_path, guard=False)
    lost = [n for n, g in unguarded.items() if "lora_B" in n and (g is None or g.abs().sum() == 0)]
    assert lost  # without the guard, gradients through the frozen 4-bit base are silently dropped


@pytest.mark.gpu
def test_bf16_lora_and_qlora_on_cuda(tiny_model, tokenizer, tmp_path):
    from sft_ray.model import load_model

    device = torch.device("cuda", 0)
    bf16 = load_model(_cfg(tiny_model, tmp_path, model={"path": str(tiny_model), "dtype": "bfloat16"}), device)
    assert bf16.dtype == torch.bfloat16 and next(bf16.parameters()).device == device
    q = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    cfg = _cfg(tiny_model, tmp_path, quantization=q)
    trainer = _trainer(cfg, tokenizer, tmp_path)
    assert trainer.args.bf16
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in trainer.data_collator(_examples(tokenizer)).items()}
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    assert all(p.grad is not None for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_sample_prompts_take_the_first_trained_span_as_the_reference():
    import datasets

    from sft_ray.train.worker import sample_prompts

    # A two-turn conversation: prompt 1-2, first reply 3-4, second user turn 5, second reply 6-7.
    row = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [-100, -100, 3, 4, -100, 6, 7]}
    text = {"input_ids": [9, 8], "labels": [9, 8]}  # trained from the first token on
    got = sample_prompts(datasets.Dataset.from_list([row, text, row]), 2)
    assert got == [{"prompt_ids": [1, 2], "reference_ids": [3, 4]}, {"prompt_ids": [], "reference_ids": [9, 8]}]


@pytest.mark.parametrize("on", [False, True])
def test_gradient_checkpointing_follows_the_config_without_a_warning(tiny_model, tmp_path, on):
    import warnings

    from sft_ray.train.worker import _sft_config

    cfg = _cfg(tiny_model, tmp_path, train={"gradient_checkpointing": on})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = _sft_config(cfg, str(tmp_path / "out"), torch.device("cpu"), has_eval=False, resumed=False)
    assert args.activation_checkpointing is on and args.gradient_checkpointing is on  # TRL's default is True
    assert not [w for w in caught if "checkpointing" in str(w.message)]


def test_packing_refused_for_a_model_that_ignores_position_ids(tiny_model, tmp_path):
    """Llama builds the per-example mask from position_ids; OPT derives positions from the attention
    mask and would let packed examples attend to each other: refused, naming the config key."""
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    from sft_ray.model import check_packing_isolates

    check_packing_isolates(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(tiny_model))
    torch.manual_seed(0)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    ).eval()
    with pytest.raises(ValueError, match=r"data.packing: the model tiny-opt \(opt\) does not keep packed examples"):
        check_packing_isolates(opt, "tiny-opt")
