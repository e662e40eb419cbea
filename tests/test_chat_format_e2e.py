"""ChatML on a base model, end to end on a real local Ray: 2 CPU workers (DDP), the new token rows
trained and saved with the adapter, final/ with the template, a merged export that ends its turns."""

import json

import pytest
from conftest import make_config, write_jsonl
from test_chat_format import IM_END, IM_START, build_base_model

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Is {i} even?"},
            {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"},
        ]
    }
    for i in range(64)
]


@pytest.mark.slow
def test_chatml_on_a_base_model_through_ray(tmp_path, ray_local):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_ray.chat_format import CHATML
    from sft_ray.export import merge
    from sft_ray.train.driver import train

    base = build_base_model(tmp_path / "base")
    base_vocab = len(AutoTokenizer.from_pretrained(base))
    source = {"path": str(write_jsonl(tmp_path / "train.jsonl", CHATS)), "format": "messages"}
    evals = {"path": str(write_jsonl(tmp_path / "eval.jsonl", CHATS[:8])), "format": "messages"}
    cfg = make_config(
        tmp_path,
        base,
        source,
        evals,
        name="chatml",
        data={"chat_template": "chatml"},
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        train={
            "max_steps": 40,
            "per_device_batch_size": 8,
            "learning_rate": 5e-3,
            "logging_steps": 10,
            "eval_steps": 20,
            "save_steps": 20,
            "samples": 4,
        },
        scaling={"num_workers": 2},
    )
    summary = train(cfg)
    assert summary["global_step"] == 40

    run = tmp_path / "storage" / "chatml"
    final = run / "final"
    # final/ holds the tokenizer as trained: template, the two tokens appended, <|im_end|> as EOS.
    assert (final / "chat_template.jinja").read_text() == CHATML
    tokenizer = AutoTokenizer.from_pretrained(final)
    new = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    assert new == [base_vocab, base_vocab + 1] and tokenizer.eos_token == IM_END

    # The adapter (and every checkpoint) carries the trained rows of embeddings and head, no resized matrix.
    for folder in (final, run / "checkpoint-0000040"):
        rows = {k: t for k, t in load_file(folder / "adapter_model.safetensors").items() if "lora_" not in k}
        assert sorted(k.split(".")[-3] for k in rows) == ["embed_tokens", "lm_head"], folder
        assert all(t.shape[0] == 2 for t in rows.values())

    # Before training the base never ended a turn; after it, held-out replies end with <|im_end|>
    # and none runs on into a new user turn (what counts as a clean stop for chat data).
    samples = json.loads((final / "samples.json").read_text())
    assert samples["eos_share_before"] == 0 and samples["eos_share_after"] == 1
    assert all(s["reference"].endswith(IM_END) and s["after"].endswith(IM_END) for s in samples["samples"])
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]

    # The merged export is a plain model: resized, the trained rows in, the old rows as in the base.
    out = merge(str(final), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        weight, before = getattr(merged, get)().weight, getattr(original, get)().weight
        assert weight.shape[0] == base_vocab + 2
        assert torch.equal(weight[:base_vocab], before)
    # It ends its turn: after each held-out answer, and after its own answer, with plain generate().
    for chat in CHATS[:8]:
        question, answer = (m["content"] for m in chat["messages"])
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        for text in (prompt + answer, prompt):
            ids = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                generated = merged.generate(**ids, max_new_tokens=8, do_sample=False)
            reply = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :])
            assert reply.endswith(IM_END) and (text == prompt or reply == IM_END), (text, reply)

    # `sft-ray eval` on the same run and held-out chats, base against tuned on one replica:
    # the tuned model ends every turn with <|im_end|> and never runs on into a new user turn; the
    # base (its new rows at the mean of the old ones, the adapter and its trained rows switched off) never does.
    from sft_ray.evaluation.run import evaluate

    cfg.eval.max_new_tokens, cfg.eval.replicas = 8, 1  # two replicas: test_jobs
    (held_out,) = evaluate(cfg)
    assert held_out["examples"] == 8 and len(held_out["replicas"]) == 1
    assert held_out["base"]["turn_end"] == 0 and held_out["tuned"]["turn_end"] == 1
    rows = [json.loads(x) for x in (run / "eval" / "eval" / "examples.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(8))
    # The prompt is what the template renders for inference, and the reference is the trained reply.
    for r in rows:
        question = CHATS[r["index"]]["messages"][0]["content"]
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                 tokenize=False)  # fmt: skip
        assert r["prompt"] == rendered, r
        assert r["reference"].startswith(CHATS[r["index"]]["messages"][1]["content"] + IM_END), r
        assert r["tuned_output"].endswith(IM_END) and IM_START not in r["tuned_output"], r
        assert r["tuned_turn_end"] and not r["base_turn_end"]
