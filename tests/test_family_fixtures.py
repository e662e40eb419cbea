"""The offline model-family fixtures (tests/families.py) behave like the real families."""

from __future__ import annotations

import hashlib
import re

import pytest
from families import BYTE_LEVEL, FAMILIES, FIXTURES, SPECS, build_family_model_dir, build_family_tokenizer

MIXED = "Hello  world,\n\n\tÜbersetze 猫 😺 é — 12345 it's <tag> ž🦀"
ODD = [" leading", "trailing ", "  both  ", "a\n\nb", "\ttab\t\tx", "😺🦀 emoji", "\n", "   ", "x \n \n y", "é\u0301"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def _conversation(system: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": "You are terse."}] if system else []
    return msgs + [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
    ]


def _sources() -> dict[str, str]:
    text = (FIXTURES / "SOURCES.md").read_text()
    return dict(re.findall(r"^\| (\w+) \| ([0-9a-f]{64}) \|", text, flags=re.M))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, build_family_tokenizer(request.param)


def test_template_matches_sources():
    sources = _sources()
    assert set(sources) == set(FAMILIES)
    for name in FAMILIES:
        assert hashlib.sha256((FIXTURES / f"{name}.jinja").read_bytes()).hexdigest() == sources[name], name


def test_save_and_autotokenizer_reload(family, tmp_path):
    from transformers import AutoTokenizer

    name, tok = family
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = MIXED + "".join(SPECS[name].specials + SPECS[name].added) + " tail"
    assert loaded(sample).input_ids == tok(sample).input_ids
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert 700 <= len(loaded) <= 1100


def test_special_and_added_tokens_are_single_ids(family):
    name, tok = family
    spec = SPECS[name]
    for t in spec.specials + spec.added:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [t], (t, ids)
    added = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    for t in spec.added:
        assert added[t] is False, t
    for t in spec.specials:
        assert added[t] is (not (name == "phi3" and t == "</s>")), t


def test_bos_added_only_where_the_family_adds_it(family):
    name, tok = family
    ids = tok("hi").input_ids
    if SPECS[name].add_bos:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert tok.bos_token_id not in ids if tok.bos_token_id is not None else True
        assert ids == tok("hi", add_special_tokens=False).input_ids


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_byte_level_round_trip(name):
    tok = build_family_tokenizer(name)
    for text in ODD + [MIXED]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, repr(text)
    if name in ("qwen2_5", "qwen3", "deepseek_r1_distill_qwen"):  # NFC normalizer composes e + U+0301
        assert tok.decode(tok.encode("e\u0301", add_special_tokens=False)) == "é"


def _pieces(tok, text):
    return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))


def test_mistral_metaspace_prepends_only_at_start():
    tok = build_family_tokenizer("mistral_v03")
    assert _pieces(tok, "Hello world")[0].startswith("▁")
    assert _pieces(tok, "[INST]Hello")[1:2] == ["Hello"]  # no "▁" after a special token...
    assert _pieces(tok, "[INST] Hello")[1].startswith("▁")  # ...unless the text has a space there
    assert "▁" not in "".join(_pieces(tok, "[INST]Hello")[1:])
    assert tok("Hi").input_ids[0] == tok.bos_token_id
    for text in ["Hello  world\n\tx 🦀 ž", "a\n\nb  "]:  # byte fallback and whitespace survive; the prefix is dropped
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert "<0xF0>" in _pieces(tok, "🦀")


def test_gemma_is_lossless_and_adds_no_prefix():
    tok = build_family_tokenizer("gemma")
    assert not _pieces(tok, "Hello")[0].startswith("▁")
    assert _pieces(tok, " Hello")[0].startswith("▁")
    for text in ODD + [MIXED]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok("Hi").input_ids[0] == tok.bos_token_id


def test_phi3_legacy_normalizer_prepends_per_piece_and_role_tokens_eat_whitespace():
    tok = build_family_tokenizer("phi3")
    assert _pieces(tok, "Hello")[0] == "▁Hello"
    assert _pieces(tok, "<|user|>Hello")[1].startswith("▁")  # "▁" prepended after every special token
    assert _pieces(tok, " Hello")[:1] == ["▁"]  # a real leading space becomes an extra "▁"
    # rstrip=True on the role tokens: the "\n" the template writes after them is swallowed.
    assert tok.encode("<|user|>\nHello", add_special_tokens=False) == tok.encode(
        "<|user|>Hello", add_special_tokens=False
    )
    assert tok.decode(tok.encode("<|user|>\nHello", add_special_tokens=False)) == "<|user|> Hello"
    assert tok.decode(tok.encode("Hello world 🦀", add_special_tokens=False)) == "Hello world 🦀"
    assert tok.bos_token_id not in tok("Hi").input_ids  # add_bos_token is false in the published config


def test_chat_template_renders_conversation(family):
    name, tok = family
    if name == "gemma":
        with pytest.raises(Exception, match="System role not supported"):
            tok.apply_chat_template(_conversation(), tokenize=False)
        conv = _conversation(system=False)
    else:
        conv = _conversation()
    text = tok.apply_chat_template(conv, tokenize=False)
    assert "Fine, thanks." in text and "How are you?" in text
    prompt = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str) and "How are you?" in prompt
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False).count("Fine, thanks.") == 1


@pytest.mark.parametrize("name", ["llama3", "qwen2_5", "qwen3", "mistral_v03"])
def test_chat_template_renders_tools(name):
    tok = build_family_tokenizer(name)
    conv = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
    text = tok.apply_chat_template(conv, tools=TOOLS, tokenize=False)
    assert "get_weather" in text and "Paris" in text and "21" in text and "It is 21 degrees." in text


def test_qwen3_thinking():
    tok = build_family_tokenizer("qwen3")
    conv = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "EARLIER-REASONING", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    prompt = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "EARLIER-REASONING" not in prompt
    longer = conv + [{"role": "assistant", "reasoning_content": "LAST-REASONING", "content": "6"}]
    text = tok.apply_chat_template(longer, tokenize=False)
    assert "EARLIER-REASONING" not in text
    assert "<think>\nLAST-REASONING\n</think>\n\n6<|im_end|>" in text
    later = longer + [{"role": "user", "content": "thanks"}]
    assert "LAST-REASONING" not in tok.apply_chat_template(later, tokenize=False)


def test_build_family_model_dir(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    for name in ("llama3", "qwen3", "phi3", "gemma"):
        out = build_family_model_dir(name, tmp_path / name)
        tok = AutoTokenizer.from_pretrained(out)
        cfg = AutoConfig.from_pretrained(out)
        gen = GenerationConfig.from_pretrained(out)
        assert cfg.vocab_size == len(tok) and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, pad)
        assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, pad)
        assert not cfg.tie_word_embeddings
