"""A tiny random Llama and a byte-level BPE tokenizer, built offline in seconds.

The demo and the tests load it through the real `from_pretrained` path, so nothing in
the library knows it is tiny. Deterministic for a seed.
"""

from __future__ import annotations

import random
from pathlib import Path

BOS, EOS, PAD, IM_START = "<s>", "<|im_end|>", "<pad>", "<|im_start|>"

# ChatML without `{% generation %}` markers, like most real templates: masking must not rely on them.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an and or but with without very really quite not never always food staff service room "
    "pasta pizza coffee tea movie film book story music song hotel flight seat screen phone battery "
    "price delivery waiter plot ending actor camera sound view bed breakfast was were is are felt "
    "seemed looked tasted sounded wonderful great excellent lovely amazing delicious friendly "
    "comfortable fast beautiful perfect brilliant terrible awful horrible bland rude dirty slow "
    "boring broken noisy cold late expensive disappointing question input output classify sentiment "
    "of this review positive negative answer what is capital opposite word text translate summarize "
    "hello world yes no one two three four five six seven eight nine ten"
).split()


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        line = " ".join(words).capitalize() + rng.choice([".", "!", "?", ""])
        lines.append(rng.choice(["### Question\n", "### Input\n", "### Output\n", ""]) + line)
    return lines


def build_tokenizer(seed: int = 0, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, IM_START]
    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenizer and decoder with no normalizer: any UTF-8 text round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    intermediate_size: int = 256,
    tokenizer=None,
) -> Path:
    """Write tokenizer files and a random Llama to `out_dir` (~1M parameters at the default size;
    benchmarks/train_bench.py builds a larger one so a step is mostly matrix products). `tokenizer`:
    another one than the byte-level BPE built here (tests build them like real families')."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = tokenizer if tokenizer is not None else build_tokenizer(seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
