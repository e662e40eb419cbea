import re

from conftest import make_config, write_jsonl

from sft_ray.data.audit import runs


def test_runs_split_on_label_state_and_packing_boundaries():
    assert runs([1, 2, 3, 4, 5], [-100, -100, 3, 4, -100], [3, 2]) == [
        ("prompt", [1, 2]),
        ("trained", [3]),
        ("boundary", []),
        ("trained", [4]),
        ("prompt", [5]),
    ]


def test_audit_shows_trained_tokens_and_report(tmp_path, tiny_model, ray_local):
    from sft_ray.data.audit import audit

    rows = [{"question": "Is <b>this</b> bold?", "output": f"yes {i}"} for i in range(12)]
    cfg = make_config(tmp_path, tiny_model, write_jsonl(tmp_path / "t.jsonl", rows), data={"packing": True})
    html_path = tmp_path / "audit.html"
    text = audit(cfg, n=2, html_path=str(html_path), color=False)
    assert "[[yes 0<|im_end|>]]" in text and "### Question\nIs <b>this</b> bold?" in text
    assert "train rows read 12, kept 12" in text and "layout: packed" in text
    page = html_path.read_text()
    assert '<span class="t">yes 0&lt;|im_end|&gt;</span>' in page
    assert "&lt;b&gt;this&lt;/b&gt;" in page and "<b>this</b>" not in page  # escaped
    colored = audit(cfg, n=1, color=True)
    assert re.search(r"\x1b\[30;42myes \d+<\|im_end\|>\x1b\[0m", colored)


def test_audit_shows_the_space_a_sentencepiece_reply_starts_with():
    """Decoded alone, Mistral's `▁Paris` loses its space: the audit showed `[/INST][[Paris.</s>]]`."""
    from families import build_family_tokenizer

    from sft_ray.data.audit import decoded_runs

    tok = build_family_tokenizer("mistral_v03")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris."}]
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    start = ids.index(tok.convert_tokens_to_ids("[/INST]")) + 1
    runs_ = decoded_runs(tok, {"input_ids": ids, "labels": [-100] * start + ids[start:]})
    assert runs_ == [("prompt", "<s>[INST] Hi[/INST]"), ("trained", " Paris.</s>")]
