"""Offline stand-ins for real model families' tokenizers, with each family's published chat template.

Each builder trains a tiny BPE (vocab ~800, well under a second) with the same pipeline as the family's
real `tokenizer.json` (normalizer, pre-tokenizer, decoder, post-processor, byte fallback, special and added
tokens), so chat-template rendering, special-token handling and whitespace behaviour match the real family.
The templates live in `tests/fixtures/chat_templates/` (see SOURCES.md there).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

FAMILIES = (
    "llama3",
    "qwen2_5",
    "qwen3",
    "deepseek_r1_distill_qwen",
    "mistral_v03",
    "gemma",
    "phi3",
    "smollm2",
)

BYTE_LEVEL = ("llama3", "qwen2_5", "qwen3", "deepseek_r1_distill_qwen", "smollm2")  # the others are SentencePiece-style

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DS_TOOL_TOKENS = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]


_MISTRAL_CONTROL = (
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


@dataclass(frozen=True)
class Spec:
    """What a family's tokenizer declares. `specials` are special added tokens in vocab order; for
    SentencePiece families the first ones sit at the front of the vocab (ids 0..), like the real ones."""

    specials: tuple[str, ...]
    added: tuple[str, ...] = ()  # added tokens with special=False
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False  # the post-processor prepends `bos`
    rstrip: tuple[str, ...] = ()  # added tokens that swallow whitespace to their right (Phi-3)
    extra_special: tuple[str, ...] = field(default=())  # additional_special_tokens


SPECS: dict[str, Spec] = {
    "llama3": Spec(
        specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        add_bos=True,
        extra_special=("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>", "<|end_of_text|>"),
    ),
    "qwen2_5": Spec(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added=("<tool_call>", "</tool_call>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra_special=("<|im_start|>", "<|im_end|>"),
    ),
    "qwen3": Spec(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra_special=("<|im_start|>", "<|im_end|>"),
    ),
    "deepseek_r1_distill_qwen": Spec(
        specials=("<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>"),
        added=("<think>", "</think>", *_DS_TOOL_TOKENS),
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>",
        add_bos=True,
        extra_special=("<｜User｜>", "<｜Assistant｜>"),
    ),
    "mistral_v03": Spec(
        specials=("<unk>", "<s>", "</s>", *_MISTRAL_CONTROL),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        add_bos=True,
        extra_special=_MISTRAL_CONTROL,
    ),
    "gemma": Spec(
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",  # tokenizer_config's eos; generation of the -it model also stops at <end_of_turn>
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        extra_special=("<start_of_turn>", "<end_of_turn>"),
    ),
    "phi3": Spec(
        # ids 0-2 in the SentencePiece vocab; role tokens are appended after it (32000+ in the real one).
        specials=("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        add_bos=False,  # the published tokenizer_config has add_bos_token: false
        rstrip=("</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
    ),
    "smollm2": Spec(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos="<|im_start|>",  # declared by the real config but never added by the tokenizer
        eos="<|im_end|>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        extra_special=("<|im_start|>", "<|im_end|>"),
    ),
}

_WORDS = (
    "the a an and or but with without very really not never always food staff service room pasta pizza coffee "
    "tea movie book story music hotel flight seat phone battery price delivery plot ending actor camera sound "
    "view was were is are felt seemed looked wonderful great excellent lovely friendly fast beautiful perfect "
    "terrible awful rude slow boring broken noisy cold late expensive question answer input output classify "
    "sentiment review positive negative capital word text translate summarize hello world yes no weather city "
    "Paris London Tokyo function name arguments content role user assistant system tool call result think "
    "reasoning I you we they it's don't we'll you're I've she'd THE Hello WORLD JSON type object string"
).split()
_EXOTIC = ["Übersetze", "猫", "😺", "é", "naïve", "café", "Straße", "日本語", "Привет", "ß", "—", "“quoted”", "…"]
_PUNCT = list(".,;:!?()[]{}<>\"'`/\\|-_=+*&^%$#@~")
_SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\t\t", "    "]


def read_template(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_bytes().decode("utf-8")


def _corpus(name: str, seed: int = 0, n_lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.7:
                parts.append(rng.choice(_WORDS))
            elif r < 0.8:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.9:
                parts.append(rng.choice(_PUNCT) * rng.randint(1, 2))
            else:
                parts.append(rng.choice(_EXOTIC))
            parts.append(rng.choice(_SPACES) if rng.random() < 0.15 else " ")
        lines.append("".join(parts).strip(" ") if rng.random() < 0.7 else "".join(parts))
    template = read_template(name)
    lines.extend(template.splitlines() * 3)
    return lines


@cache
def _tokenizer_json(name: str, vocab_size: int = 800) -> str:
    """Train the family's tokenizer once per process and return it serialized (builders deserialize a copy)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    spec = SPECS[name]
    corpus = _corpus(name)
    if name in BYTE_LEVEL:
        tok = Tokenizer(models.BPE())
        if name == "smollm2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            regex = LLAMA3_REGEX if name == "llama3" else QWEN2_REGEX
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
                ]
            )
        if name in ("qwen2_5", "qwen3", "deepseek_r1_distill_qwen"):
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(corpus, trainer)
        # Special tokens come after the learned vocab, as in the real byte-level tokenizers.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
        byte_post = processors.ByteLevel(trim_offsets=False)
    else:
        # Train SentencePiece-style pieces: words carry a leading "▁"; the real pipeline is set up afterwards.
        trainer_tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in spec.specials else None))
        trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        n_front = spec.specials.index("<|endoftext|>") if name == "phi3" else len(spec.specials)
        front = list(spec.specials[:n_front])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=front, show_progress=False)
        trainer_tok.train_from_iterator(corpus, trainer)
        import json

        model = json.loads(trainer_tok.to_str())["model"]
        learned = sorted(model["vocab"].items(), key=lambda kv: kv[1])
        vocab: dict[str, int] = {t: i for i, t in enumerate(front)}
        for b in range(256):  # byte-fallback pieces right after the control tokens, like SentencePiece
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for piece, _ in learned:
            if piece not in vocab:
                vocab[piece] = len(vocab)
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
        tok = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk, byte_fallback=True, fuse_unk=True, dropout=None)
        )
        if name == "mistral_v03":
            tok.normalizer = None
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            # transformers' LlamaTokenizer(legacy=False) decoder: unlike a bare Metaspace decoder it also
            # turns byte-fallback pieces back into text.
            tok.decoder = decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
            )
        elif name == "gemma":
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        else:  # phi3: legacy Llama-2 conversion
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            tok.pre_tokenizer = None
            tok.decoder = decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
            )
        for t in spec.specials:
            added = AddedToken(t, normalized=False, rstrip=t in spec.rstrip)
            if name == "phi3" and t == "</s>":  # Phi-3 declares </s> as a non-special added token
                tok.add_tokens([added])
            else:
                tok.add_special_tokens([added])
        byte_post = None
    if spec.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        template = processors.TemplateProcessing(
            single=f"{spec.bos}:0 $A:0",
            pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
            special_tokens=[(spec.bos, bos_id)],
        )
        tok.post_processor = processors.Sequence([byte_post, template]) if byte_post else template
    else:
        tok.post_processor = byte_post
    return tok.to_str()


def build_family_tokenizer(name: str):
    """A `PreTrainedTokenizerFast` built like `name`'s real tokenizer, with its published chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if name not in SPECS:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    spec = SPECS[name]
    kwargs = {k: v for k, v in (("bos_token", spec.bos), ("eos_token", spec.eos), ("pad_token", spec.pad)) if v}
    if spec.unk:
        kwargs["unk_token"] = spec.unk
    if spec.extra_special:
        kwargs["additional_special_tokens"] = list(spec.extra_special)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(name)),
        chat_template=read_template(name),
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def build_family_model_dir(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save the family tokenizer plus a tiny random Llama (hidden 64, 2 layers) for it."""
    from sft_ray.tiny_model import build_tiny_model

    return build_tiny_model(out_dir, seed, 64, 2, 128, tokenizer=build_family_tokenizer(name))
