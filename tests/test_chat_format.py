"""A chat format for a base model (no Ray): ChatML's tokens added, their embedding rows trained
with the adapter under TRL's SFTTrainer, saved, reloaded and merged into a model that ends its turns."""

from pathlib import Path

import pytest
import torch

from sft_ray.chat_format import CHATML, IM_END, IM_START, apply_chat_format, template_text

BASE_EOS = "</s>"
QA = [(f"Is {i} even?", "yes" if i % 2 == 0 else "no") for i in range(16)]


def build_base_model(out_dir: Path, seed: int = 0, tied: bool = False, spare_rows: int = 0) -> Path:
    """A tiny random Llama whose tokenizer has no chat template and no chat tokens, like a base model
    (with `spare_rows`, embedding rows no token owns, as many models carry)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sft_ray.tiny_model import _corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", BASE_EOS]
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=BASE_EOS, pad_token="<pad>")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    cfg = LlamaConfig(
        vocab_size=len(tokenizer) + spare_rows,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        **ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("base") / "model")


def chat_rows(tokenizer) -> list[dict]:
    """ChatML conversations with the reply (and its `<|im_end|>`) trained, the prompt not."""
    rows = []
    for question, answer in QA:
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt = tokenizer.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt + answer + IM_END + "\n")["input_ids"]
        n_prompt = len(tokenizer(prompt)["input_ids"])
        labels = [-100] * n_prompt + ids[n_prompt:-1] + [-100]  # the newline after <|im_end|> is formatting
        rows.append({"input_ids": ids, "labels": labels})
    return rows


# --- the tokenizer -------------------------------------------------------------------------------


def test_template_text_reads_the_builtin_a_file_and_s3(tmp_path, s3_bucket):
    import boto3

    assert template_text(None) is None
    assert template_text("chatml") == CHATML
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(jinja)
    assert template_text(str(tmp_path / "t.jinja")) == jinja
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="t.jinja", Body=jinja.encode())
    assert template_text(f"s3://{s3_bucket}/t.jinja") == jinja


def test_chatml_on_a_base_tokenizer(base_model, tmp_path):
    from transformers import AutoTokenizer

    from sft_ray.model import load_tokenizer

    base = AutoTokenizer.from_pretrained(base_model)
    assert base.chat_template is None and IM_END not in base.get_vocab()
    tok = load_tokenizer(str(base_model), chat_template=CHATML)
    assert len(tok) == len(base) + 2
    assert tok.convert_tokens_to_ids([IM_START, IM_END]) == [len(base), len(base) + 1]  # appended: old ids stay
    assert tok.eos_token == IM_END and tok.pad_token == "<pad>"
    assert apply_chat_format(tok, CHATML) == [] and len(tok) == len(base) + 2  # idempotent

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"  # no BOS, no system
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
    # Special: never split, even glued to text; skipped by decode(skip_special_tokens=True).
    ids = tok("x<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids(IM_START) in ids and tok.convert_tokens_to_ids(IM_END) in ids
    assert tok.decode(ids, skip_special_tokens=True) == "xuser"

    # Saved with the template (chat_template.jinja) and the tokens: reloading adds nothing.
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "chat_template.jinja").read_text() == CHATML
    again = load_tokenizer(str(tmp_path / "tok"), chat_template=CHATML)
    assert again.get_vocab() == tok.get_vocab() and again.eos_token == IM_END


def test_a_user_template_adds_nothing_and_present_tokens_keep_their_ids(base_model):
    from sft_ray.model import load_tokenizer

    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = load_tokenizer(str(base_model), chat_template=jinja)
    assert tok.chat_template == jinja and tok.eos_token == BASE_EOS and IM_END not in tok.get_vocab()
    assert load_tokenizer(str(base_model)).chat_template is None

    # A base that has the tokens but another EOS (like Qwen's base models): nothing added, EOS moves.
    tok = load_tokenizer(str(base_model))
    tok.add_special_tokens({"extra_special_tokens": [IM_END, IM_START]})
    vocab = tok.get_vocab()
    assert apply_chat_format(tok, CHATML) == [] and tok.get_vocab() == vocab and tok.eos_token == IM_END


# --- training the new rows -----------------------------------------------------------------------


def _cfg(base_model, tmp_path, **extra):
    from sft_ray.config import validate

    return validate(
        {
            "name": "chatml",
            "model": {"path": str(base_model), "dtype": "float32"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": [{"path": "unused.jsonl", "format": "messages"}], "chat_template": "chatml"},
            "train": {"learning_rate": 5e-3, "max_steps": 60, "per_device_batch_size": 8, "logging_steps": 10},
            "storage": {"path": str(tmp_path)},
            **extra,
        }
    )


def _trainer(cfg, tmp_path, serve: bool = True, device: str = "cpu"):
    """What the worker builds, in this process: tokenizer and model fitted, rows to train, TRL."""
    import datasets
    from trl import SFTTrainer

    from sft_ray.model import load_model, load_tokenizer, lora_config, serve_trained_rows_to_trl, token_rows
    from sft_ray.train.collate import make_collator
    from sft_ray.train.worker import _sft_config

    device = torch.device(device)
    tokenizer = load_tokenizer(cfg.model.path, chat_template=template_text(cfg.data.chat_template))
    model = load_model(cfg, device, tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(cfg, str(tmp_path / "out"), device, has_eval=False, resumed=False),
        train_dataset=datasets.Dataset.from_list(chat_rows(tokenizer)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg, token_rows(model, tokenizer, template_text(cfg.data.chat_template))),
        data_collator=make_collator(tokenizer.pad_token_id, False),
    )
    if serve:
        serve_trained_rows_to_trl(trainer.model)
    return trainer, tokenizer


def _rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return torch.nonzero((before.float() - after.float()).abs().sum(1) > 0).flatten().tolist()


def _continue(model, tokenizer, question: str, answer: str, **kwargs) -> str:
    """Greedy continuation of the assistant turn `answer` to `question`, up to a stop token.

    Whether the tiny random model gets the answer itself right depends on its frozen random output
    rows (as in the demo); whether it ends its turn after the answer is what the new rows decide."""
    msgs = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt + answer, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=6, do_sample=False, **kwargs)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.fixture(scope="module")
def trained(base_model, tmp_path_factory):
    """One run on the base: ChatML added, 24 steps, adapter saved as the worker's final/ saves it."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = _cfg(base_model, tmp)
    trainer, tokenizer = _trainer(cfg, tmp)
    start = _rows(trainer.model)
    before = [_continue(trainer.model, tokenizer, q, a, eos_token_id=tokenizer.eos_token_id) for q, a in QA]
    trainer.train()
    trainer.model.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")
    return {"trainer": trainer, "tokenizer": tokenizer, "start": start, "before": before, "adapter": tmp / "adapter"}


def test_only_the_new_rows_train_in_embeddings_and_head(trained, base_model):
    from transformers import AutoConfig

    trainer, tokenizer = trained["trainer"], trained["tokenizer"]
    model = trainer.model
    new = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    hidden = AutoConfig.from_pretrained(base_model).hidden_size
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)  # resized, exactly
    # Trainable: LoRA on every linear layer plus 2 rows in the embeddings and 2 in the (untied) head.
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    rows = {n: k for n, k in trainable.items() if "trainable_tokens" in n}
    assert sorted(rows.values()) == [2 * hidden, 2 * hidden] and len(rows) == 2
    assert all("lora_" in n for n in trainable.keys() - rows.keys())

    embed, head = _rows(model)
    assert _changed_rows(trained["start"][0], embed) == new
    assert _changed_rows(trained["start"][1], head) == new  # the model must learn to emit <|im_end|>
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.7 * losses[0]
    # After its answer it ends the turn with <|im_end|>, which the mean-initialised row never won.
    assert not any(x.startswith(IM_END) for x in trained["before"])
    assert [_continue(model, tokenizer, q, a, eos_token_id=tokenizer.eos_token_id) for q, a in QA] == [IM_END] * 16


def test_without_the_bias_the_fused_head_fails(base_model, tmp_path):
    """The trap serve_trained_rows_to_trl removes: TRL's fused LM head reads `lm_head.bias`."""
    trainer, _ = _trainer(_cfg(base_model, tmp_path, train={"max_steps": 1}), tmp_path, serve=False)
    with pytest.raises(AttributeError, match="bias"):
        trainer.train()


def test_the_adapter_holds_the_rows_and_reloads_onto_a_fresh_resized_base(trained, base_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sft_ray.model import fit_embeddings, load_tokenizer

    tensors = load_file(trained["adapter"] / "adapter_model.safetensors")
    rows = {k: t.shape for k, t in tensors.items() if "lora_" not in k}
    # Only the trained rows: no copy of the resized matrices (PEFT's default once the vocabulary grew).
    assert sorted(rows) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    ]
    tokenizer = load_tokenizer(str(trained["adapter"]))  # as saved: template, tokens, EOS
    assert tokenizer.eos_token == IM_END and tokenizer.chat_template == CHATML

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    fit_embeddings(base, tokenizer)
    reloaded = PeftModel.from_pretrained(base, str(trained["adapter"])).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is 7 even?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        expected = trained["trainer"].model.eval()(**ids).logits
        assert torch.allclose(reloaded(**ids).logits, expected, atol=1e-5)


def test_merged_export_is_a_plain_model_that_ends_its_turn(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_ray.export import merge

    out = merge(str(trained["adapter"]), str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == len(trained["tokenizer"])
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == IM_END
    eos = tokenizer.convert_tokens_to_ids([IM_END, BASE_EOS])
    assert model.generation_config.eos_token_id == eos  # the turn end first, the base's own stop kept
    # Plain generate, no stop token given: the saved generation config stops on <|im_end|>.
    assert [_continue(model, tokenizer, q, a) for q, a in QA[:4]] == [IM_END] * 4
    assert _continue(model, tokenizer, "Is 4 even?", "").endswith(IM_END)  # its own answer ends the turn too


def test_resume_restores_the_trained_rows(base_model, tmp_path):
    """A run resumed from its step-4 checkpoint ends where the uninterrupted run ends, rows included."""

    def run(name: str, resume: str | None = None):
        cfg = _cfg(base_model, tmp_path / name, train={"max_steps": 8, "save_steps": 4, "learning_rate": 5e-3})
        trainer, _ = _trainer(cfg, tmp_path / name)
        trainer.args.save_total_limit = None  # keep checkpoint-4 (the worker keeps one locally)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}

    whole = run("whole")
    resumed = run("resumed", str(tmp_path / "whole" / "out" / "checkpoint-4"))
    assert sum("trainable_tokens" in n for n in whole) == 2
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


@pytest.mark.parametrize("shape", ["tied", "spare_rows"])
def test_tied_embeddings_and_spare_rows(tmp_path, shape):
    """Tied embeddings train one set of rows for both ends; spare rows take the new tokens unresized."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_ray.model import fit_embeddings

    base = build_base_model(tmp_path / "base", tied=shape == "tied", spare_rows=6 if shape == "spare_rows" else 0)
    rows_before = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().num_embeddings
    trainer, tokenizer = _trainer(_cfg(base, tmp_path, train={"max_steps": 4}), tmp_path)
    model = trainer.model
    assert model.get_input_embeddings().weight.shape[0] == max(rows_before, len(tokenizer))
    start = _rows(model)
    trainer.train()
    new = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    embed, head = _rows(model)
    assert _changed_rows(start[0], embed) == new and _changed_rows(start[1], head) == new
    if shape == "tied":
        assert torch.equal(embed, head)

    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    fit_embeddings(fresh, tokenizer)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    ids = tokenizer("<|im_start|>user\nHi<|im_end|>\n", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**ids).logits, model.eval()(**ids).logits, atol=1e-5)


def test_qlora_trains_the_new_rows_on_cpu(base_model, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_ray.model import fit_embeddings

    q = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    train = {"max_steps": 4, "gradient_checkpointing": True}
    trainer, tokenizer = _trainer(_cfg(base_model, tmp_path, quantization=q, train=train), tmp_path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    start = _rows(trainer.model)
    trainer.train()
    new = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    embed, head = _rows(trainer.model)
    assert _changed_rows(start[0], embed) == new and _changed_rows(start[1], head) == new

    trainer.model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    fit_embeddings(base, tokenizer)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.equal(reloaded.get_output_embeddings().weight[new].float(), head[new].float())


@pytest.mark.gpu
def test_new_rows_train_with_bf16_qlora_on_cuda(base_model, tmp_path):
    """On CUDA, TRL's fused head scores only the trained positions (its Triton path), and TRL casts a
    quantized model's trainable parameters, the rows included, to bf16: the rows still learn."""
    q = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    model = {"path": str(base_model), "dtype": "bfloat16"}
    cfg = _cfg(base_model, tmp_path, model=model, quantization=q, train={"max_steps": 4})
    trainer, tokenizer = _trainer(cfg, tmp_path, device="cuda:0")
    assert trainer.args.bf16
    start = _rows(trainer.model)
    trainer.train()
    new = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    embed, head = _rows(trainer.model)
    assert _changed_rows(start[0], embed) == new and _changed_rows(start[1], head) == new


# --- what a clean stop is ------------------------------------------------------------------------

LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _sampled(base_model, tmp_path, *formats):
    """A config whose held-out rows have these formats."""
    from sft_ray.config import validate

    sources = [{"path": "t.jsonl", "format": f} for f in formats]
    tree = {"name": "m", "model": {"path": str(base_model)}, "data": {"train": sources, "chat_template": "chatml"}}
    return validate({**tree, "storage": {"path": str(tmp_path)}})


def test_turn_markers_come_from_rendering_the_template(base_model, tmp_path):
    from sft_ray.model import load_tokenizer
    from sft_ray.train.final import end_of_turn_id, stop_ids, user_turn_opener

    chatml = load_tokenizer(str(base_model), chat_template=CHATML)
    assert user_turn_opener(chatml, {}) == "<|im_start|>user"
    assert end_of_turn_id(chatml, {}) is None  # <|im_end|> is EOS already

    llama = load_tokenizer(str(base_model), chat_template=LLAMA3_LIKE)
    llama.add_special_tokens({"extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    eot = llama.convert_tokens_to_ids("<|eot_id|>")
    assert user_turn_opener(llama, {}) == "<|start_header_id|>user<|end_header_id|>"
    assert llama.eos_token == BASE_EOS and end_of_turn_id(llama, {}) == eot
    assert end_of_turn_id(load_tokenizer(str(base_model)), {}) is None  # no template, nothing but EOS
    # Sample generations of chat rows stop on the turn end too; plain rows end with EOS only.
    assert stop_ids(_sampled(base_model, tmp_path, "messages"), llama) == [llama.eos_token_id, eot]
    assert stop_ids(_sampled(base_model, tmp_path, "instruction"), llama) == [llama.eos_token_id]


def test_clean_stop_uses_each_formats_next_turn(base_model, tmp_path):
    from sft_ray.model import load_tokenizer
    from sft_ray.train.final import clean_stop, next_turn_markers

    def markers(*formats):
        tokenizer = load_tokenizer(str(base_model), chat_template=CHATML)
        return next_turn_markers(_sampled(base_model, tmp_path, *formats), tokenizer)

    assert markers("instruction") == ["### Question"]
    assert markers("alpaca") == ["### Instruction:"]
    assert markers("messages") == ["<|im_start|>user"]
    assert markers("prompt_completion", "text") == []
    assert markers("instruction", "messages") == ["### Question", "<|im_start|>user"]

    stopped = {"text": f"yes{IM_END}", "stopped": True}
    ran_on = {"text": f"yes\n<|im_start|>user\nAnd 5?{IM_END}", "stopped": True}
    assert clean_stop(stopped, ["<|im_start|>user"]) and not clean_stop(ran_on, ["<|im_start|>user"])
    assert clean_stop({"text": "yes\n### Question\nx</s>", "stopped": True}, [])  # text: nothing to run into
    assert not clean_stop({"text": "yes yes yes", "stopped": False}, [])
