"""Real families end to end on a real local Ray (2 CPU workers): a SentencePiece-style model with
Mistral v0.3's template, and a Qwen3-style one trained on reasoning in thinking mode. The prepared
rows are checked against the tokenizer's own inference prompt, and the run must learn."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import make_config, write_jsonl
from families import build_family_model_dir

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]


def mistral_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        country, city = CAPITALS[i % 4]
        msgs = [{"role": "user", "content": f"Capital of {country}? ({i})"}, {"role": "assistant", "content": city}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "Answer with one word."})
        rows.append({"messages": msgs})
    return rows


def qwen3_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{a}+{b}?"},
                    {"role": "assistant", "content": str(a + b), "reasoning_content": f"{a} plus {b}."},
                    {"role": "user", "content": f"And {a}*{b}?"},
                    {"role": "assistant", "content": str(a * b), "reasoning_content": f"{a} times {b}."},
                ]
            }
        )
    return rows


def _first_rows(prepared: str, n: int) -> list[dict]:
    return pq.read_table(f"{prepared}/train").slice(0, n).to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, rows, kwargs",
    [("mistral_v03", mistral_rows, {}), ("qwen3", qwen3_rows, {"enable_thinking": True})],
    ids=["mistral-sentencepiece", "qwen3-reasoning"],
)
def test_family_trains_end_to_end(tmp_path, ray_local, family, rows, kwargs):
    from transformers import AutoTokenizer

    from sft_ray.data.pipeline import prepare
    from sft_ray.train.driver import train

    model = build_family_model_dir(family, tmp_path / "model")
    data = rows(48)
    cfg = make_config(
        tmp_path,
        model,
        {"path": str(write_jsonl(tmp_path / "train.jsonl", data)), "format": "messages"},
        {"path": str(write_jsonl(tmp_path / "eval.jsonl", data[:8])), "format": "messages"},
        name=family,
        data={"chat_template_kwargs": kwargs, "max_length": 256},
        train={"epochs": 2, "per_device_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2, "eval_steps": 6,
               "save_steps": 6, "samples": 2},
        scaling={"num_workers": 2},
    )  # fmt: skip
    prepared, manifest = prepare(cfg)
    tok = AutoTokenizer.from_pretrained(model)
    # Every prepared row's prompt is what the model is given at inference (rows keep their order).
    examples = _first_rows(prepared, 100)
    turns = [(row, i) for row in data for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    # Qwen3 drops earlier reasoning: each of its two turns is an example of its own; Mistral's rows
    # have one turn each.
    extra = 48 if family == "qwen3" else 0
    split = manifest["splits"]["train"]
    assert split["extra_turn_examples"] == extra and split["examples"] == len(examples) == 48 + extra
    for ex, (row, i) in list(zip(examples, turns))[:20]:
        first = next(k for k, lab in enumerate(ex["labels"]) if lab != -100)
        prompt = tok.apply_chat_template(
            row["messages"][:i], add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
        )
        assert ex["input_ids"][:first] == prompt
        trained = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
        content = row["messages"][i]["content"]
        if family == "qwen3":
            assert trained == f"<think>\n{row['messages'][i]['reasoning_content']}\n</think>\n\n{content}<|im_end|>"
        else:
            assert trained == f"{content}</s>"

    summary = train(cfg)
    assert summary["global_step"] == len(examples) * 2 // 8
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    final = tmp_path / "storage" / family / "final"
    assert (final / "chat_template.jinja").read_text() == tok.chat_template
    saved = json.loads((final / "data_manifest.json").read_text())
    assert saved["data"]["chat_template_kwargs"] == kwargs
