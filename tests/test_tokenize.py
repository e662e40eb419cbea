"""Token-exact masks: the trained tokens decode to exactly the response + EOS, the rest to the prompt."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_ray.data.formats import BadRow, Example, instruction, render_record
from sft_ray.data.tokenize import IGNORE, encode_batch, encode_texts, special_ids

EOS = "<|im_end|>"


def _encode(tokenizer, record, max_length=512):
    [enc] = encode_batch(tokenizer, render_record(record, "instruction"), special_ids(tokenizer), max_length)
    return enc


def _split_decode(tokenizer, enc):
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    rest = [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE]
    return tokenizer.decode(trained), tokenizer.decode(rest)


def test_instruction_template_exact():
    assert instruction({"question": "Q?", "input": "", "output": "A"}, {}) == Example(
        "### Question\nQ?\n\n### Output\nA", [(28, 29)]
    )
    assert instruction({"question": "Q?", "input": "ctx", "output": "A"}, {}).text == (
        "### Question\nQ?\n\n### Input\nctx\n\n### Output\nA"
    )


def test_labels_equal_ids_on_response_and_eos(tokenizer):
    enc = _encode(tokenizer, {"question": "What is it?", "output": "positive"})
    trained, rest = _split_decode(tokenizer, enc)
    assert trained == "positive" + EOS
    assert rest == "<s>### Question\nWhat is it?\n\n### Output\n"
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == IGNORE
    assert enc.input_ids[-1] == enc.labels[-1] == tokenizer.eos_token_id
    # Labels are a contiguous suffix: once training starts it does not stop.
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE)
    assert all(lab == t for lab, t in zip(enc.labels[first:], enc.input_ids[first:]))
    assert all(lab == IGNORE for lab in enc.labels[:first])


def test_question_containing_the_output_marker(tokenizer):
    record = {"question": "Explain:\n### Output\nfake answer", "input": "### Output\n", "output": "real"}
    trained, rest = _split_decode(tokenizer, _encode(tokenizer, record))
    assert trained == "real" + EOS
    assert rest == "<s>### Question\nExplain:\n### Output\nfake answer\n\n### Input\n### Output\n\n\n### Output\n"


def test_non_ascii(tokenizer):
    record = {
        "question": "Übersetze: 猫は可愛い 😺",
        "input": "émoji → ✓",
        "output": "Die Katze ist süß 🐈‍⬛",
    }
    trained, rest = _split_decode(tokenizer, _encode(tokenizer, record))
    assert trained == "Die Katze ist süß 🐈‍⬛" + EOS
    assert rest == "<s>### Question\nÜbersetze: 猫は可愛い 😺\n\n### Input\némoji → ✓\n\n### Output\n"


def test_truncation_cuts_the_response_end_then_drops(tokenizer):
    record = {"question": "q", "output": "a long response " * 10}
    full = _encode(tokenizer, record)
    prompt_len = sum(1 for lab in full.labels if lab == IGNORE)
    cut = _encode(tokenizer, record, max_length=prompt_len + 3)
    assert cut.truncated and len(cut.input_ids) == prompt_len + 3
    assert cut.input_ids == full.input_ids[: prompt_len + 3] and cut.labels == full.labels[: prompt_len + 3]
    assert _encode(tokenizer, record, max_length=prompt_len) == "no_trained_tokens_after_truncation"


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"input": "x", "output": "y"}, "missing_field"),
        ({"question": "x"}, "missing_field"),
        ({"question": 3, "output": "y"}, "wrong_type"),
        ({"question": "x", "output": ""}, "empty_response"),
        (["not", "an", "object"], "not_an_object"),
    ],
)
def test_bad_records(record, reason):
    with pytest.raises(BadRow) as err:
        render_record(record, "instruction")
    assert err.value.reason == reason


def test_a_merge_across_the_prompt_end_keeps_the_inference_prompt(tokenizer):
    """`Answer: ` + `yes` tokenizes jointly as `Answer:` `Ġyes`: a token straddles the prompt's end.
    The model is given `tokenizer("Answer: ")` at inference, so that is the prompt trained from."""
    [example] = render_record({"prompt": "Answer: ", "completion": "yes"}, "prompt_completion")
    [joint] = encode_texts(tokenizer, [example.text], True)
    assert any(a < 8 < b for a, b in joint[1]), "the test needs a straddling token"
    [enc] = encode_batch(tokenizer, [example], special_ids(tokenizer), 512)
    start = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE)
    assert enc.input_ids[:start] == tokenizer("Answer: ")["input_ids"]
    assert tokenizer.decode(enc.input_ids[start:]) == "yes" + EOS
    assert tokenizer.decode(enc.input_ids) == "<s>Answer: yes" + EOS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.text(max_size=40) | st.sampled_from(["<s>", "<|im_end|>", "<pad>x<|im_start|>", ""]), min_size=1, max_size=6
    ),
    as_text=st.booleans(),
)
def test_encode_texts_matches_the_tokenizer_call(tokenizer, texts, as_text):
    """The fast path (the Rust backend, with offsets) gives the ids `tokenizer(...)` gives."""
    expected = tokenizer(texts, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
    assert [ids for ids, _ in encode_texts(tokenizer, texts, as_text)] == expected


def test_encode_texts_ignores_backend_state(tiny_model):
    from sft_ray.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    texts = ["<s>hello world<|im_end|>", "a" * 50]
    expected = tok(texts, add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(max_length=3)  # left over by someone else's call
    tok.backend_tokenizer.enable_padding(length=64)
    assert [ids for ids, _ in encode_texts(tok, texts, False)] == expected


def test_encode_texts_keeps_the_call_for_a_tokenizer_that_overrides_it(tokenizer):
    class Custom(type(tokenizer)):
        def __call__(self, texts, **kwargs):
            return {"input_ids": [[7] for _ in texts]}

    custom = Custom.__new__(Custom)
    custom.__dict__.update(tokenizer.__dict__)
    assert encode_texts(custom, ["anything"], False) == [([7], None)]


def test_a_post_processor_that_appends_eos_adds_only_its_bos_in_front(tokenizer):
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|im_end|>", special_tokens=[("<s>", bos), ("<|im_end|>", eos)]
    )
    assert special_ids(tok).prefix == (bos,)  # it was (bos, eos): every example began `<s><|im_end|>`
    [enc] = encode_batch(
        tok, render_record({"prompt": "Q:", "completion": " A"}, "prompt_completion"), special_ids(tok), 64
    )
    assert enc.input_ids[0] == bos and enc.input_ids.count(eos) == 1 and enc.input_ids[-1] == eos


@pytest.mark.parametrize("family", ["llama3", "qwen2_5", "mistral_v03", "gemma", "phi3"])
def test_offsets_read_around_a_cut_agree_with_the_full_scan(family):
    """`_split` on a Rust encoding's lazy offsets (two tokens read around the cut) gives what the
    scan over every token's offsets gives, at every character of texts with multi-byte characters,
    runs of whitespace and newlines, for byte-level and SentencePiece-style tokenizers."""
    from families import build_family_tokenizer

    from sft_ray.data.tokenize import Offsets, _split

    tok = build_family_tokenizer(family)
    texts = [
        "### Question\nWhat is 2+2?\n\n### Output\n4",
        "  leading spaces,\ttabs\t\tand  double  spaces  ",
        "naïve café — 東京 ✓ émoji 🙂 done\n\n\nend",
        "",
        "x",
    ]
    for text in texts:
        enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        for base in (0, 1, 3):
            lazy, full = Offsets(enc)[base:], list(enc.offsets)[base:]
            assert list(lazy) == full and len(lazy) == len(full)
            for at in range(len(text) + 1):
                assert _split(lazy, at) == _split(full, at), (family, text, base, at)
        for at in range(len(text) + 1):  # what the lazy offsets rely on: the first token that holds `at`
            assert enc.char_to_token(at) == next((i for i, (a, b) in enumerate(enc.offsets) if a <= at < b), None)


class _Encoding:
    """An encoding's offsets as the Rust `Encoding` answers for them: `char_to_token` gives the
    first token whose span holds the character. Built from hand-made offsets, to reach what the
    small tokenizers above do not make: zero-width tokens, several tokens starting at one
    character, tokens that overlap."""

    def __init__(self, offsets):
        self.offsets = offsets

    def __len__(self):
        return len(self.offsets)

    def char_to_token(self, at):
        return next((i for i, (a, b) in enumerate(self.offsets) if a <= at < b), None)

    def token_to_chars(self, i):
        return self.offsets[i]


@settings(max_examples=300, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=12),
    base=st.integers(0, 3),
)
def test_offsets_read_around_a_cut_agree_with_the_full_scan_on_odd_offsets(spans, base):
    """Starts in text order, as a Rust encoding of one text without added special tokens has them
    (the lazy offsets rely on it); widths of 0, several tokens at one start, ends past the next start."""
    from sft_ray.data.tokenize import Offsets, _split

    offsets, pos = [], 0
    for step, width in spans:
        pos += step
        offsets.append((pos, pos + width))
    lazy, full = Offsets(_Encoding(offsets))[base:], offsets[base:]
    for at in range(pos + 4):
        assert _split(lazy, at) == _split(full, at), (offsets, base, at)
