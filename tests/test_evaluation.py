"""`sft-ray eval` without Ray: examples cut from prepared rows, the metrics, and one model replica
whose batched answers and reference losses are checked against the model's own unbatched
`generate` and `labels=` loss."""

import json
import math

import pytest
from conftest import make_config

from sft_ray.evaluation import examples, metrics

IGNORE = -100


def test_every_trained_span_is_an_example_after_the_true_tokens_before_it():
    # A two-turn conversation: prompt, answer 1, the next user turn, answer 2, then a packed second example.
    ids = [1, 10, 11, 20, 21, 12, 13, 22, 2, 1, 30, 40]
    labels = [IGNORE, IGNORE, IGNORE, 20, 21, IGNORE, IGNORE, 22, 2, IGNORE, IGNORE, 40]
    assert examples.spans(labels) == [(3, 5), (7, 9), (11, 12)]
    unpacked = examples.of_row(ids, labels)
    assert unpacked[:2] == [([1, 10, 11], [20, 21]), ([1, 10, 11, 20, 21, 12, 13], [22, 2])]
    # Packed: the second example's prompt starts at its own first token, not the row's.
    packed = examples.of_row(ids, labels, [9, 3])
    assert packed == [([1, 10, 11], [20, 21]), ([1, 10, 11, 20, 21, 12, 13], [22, 2]), ([1, 30], [40])]
    # A text row (every token trained) has no prompt to answer: no example.
    assert examples.of_row([5, 6], [5, 6]) == []


def test_metrics_of_an_answer():
    assert metrics.normalize("  The  Pacific, Ocean!\n") == "the pacific ocean"
    assert metrics.example("Paris", " Paris\n", True) == {
        "exact_match": True, "normalized_match": True, "contains": True, "turn_end": True,
    }  # fmt: skip
    assert metrics.example("paris.", "Paris", False) == {
        "exact_match": False, "normalized_match": True, "contains": True, "turn_end": False,
    }  # fmt: skip
    assert metrics.example("It is Paris, I think", "Paris", True)["contains"]
    assert not metrics.example("anything", "", True)["contains"]  # an empty reference is in no answer


def _row(i, base_exact, tuned_exact, base_loss, tuned_loss):
    row = {"index": i, "prompt": "p", "reference": "r", "base_output": "b", "tuned_output": "t", "reference_tokens": 2}
    for m, exact, loss in (("base", base_exact, base_loss), ("tuned", tuned_exact, tuned_loss)):
        row.update({f"{m}_{k}": exact for k in metrics.RATES})
        row.update({f"{m}_output_tokens": 3, f"{m}_loss": loss})
    return row


def test_totals_regressions_and_the_examples_that_differ_most():
    t = metrics.Totals()
    for i in range(20):
        t.add(_row(i, base_exact=i < 10, tuned_exact=i < 2, base_loss=1.0, tuned_loss=1.0 + i / 10))
    s = t.summary()
    assert s["base"]["exact_match"] == 0.5 and s["tuned"]["exact_match"] == 0.1
    assert s["tuned"]["loss"] == pytest.approx(1.95) and s["tuned"]["perplexity"] == pytest.approx(math.exp(1.95))
    # Where exact match flipped first (8 of them), then by the loss difference.
    assert [x["index"] for x in s["most_different"]] == [9, 8, 7, 6, 5, 4, 3, 2, 19, 18]
    assert s["changed"]["exact_match"] == {"lost": 8, "gained": 0}
    found = metrics.regressions(s["base"], s["tuned"], s["changed"])
    assert {r["metric"] for r in found} == set(metrics.RATES) | {"loss"}
    assert "exact match 50% -> 10% (-40 points: 8 examples lost, 0 gained)" in metrics.describe(found)

    # The same examples answered by both: what counts is those that changed (McNemar), not the rates.
    same = {k: 0.5 for k in metrics.RATES} | {"loss": 1.0}
    changed = {k: {"lost": 2, "gained": 0} for k in metrics.RATES}  # two of sixteen lost: chance
    assert metrics.regressions(same, same, changed) == []
    ten_of_a_hundred = {k: {"lost": 10, "gained": 0} for k in metrics.RATES}  # 50% -> 40%, none gained
    assert len(metrics.regressions(same, {k: 0.4 for k in metrics.RATES} | {"loss": 1.0}, ten_of_a_hundred)) == 4
    swapped = {k: {"lost": 40, "gained": 25} for k in metrics.RATES}  # 50% -> 35%, many either way: 15 < 16.1
    assert metrics.regressions(same, {k: 0.35 for k in metrics.RATES} | {"loss": 1.0}, swapped) == []


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter with random non-zero B (an untrained one would equal the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


def _greedy(model, prompt: list[int], n: int, stop: int) -> list[int]:
    """Greedy by hand: the argmax of every next-token distribution, nothing else."""
    import torch

    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], 1)
        if ids[0, -1] == stop:
            break
    return ids[0, len(prompt) :].tolist()


def test_a_replica_answers_in_batches_as_the_model_does_one_prompt_at_a_time(tmp_path, tiny_model, tokenizer, adapter):
    """Left padding changes no answer and no loss: each equals the plain model's, for base and tuned.
    Greedy is greedy: the model ships a repetition penalty and top-k/top-p, as Qwen2.5-Instruct
    does, and the answers are still the argmax ones (the first two prompts repeat tokens)."""
    import shutil

    import pyarrow as pa
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_ray.evaluation.replica import Replica

    shipped = tmp_path / "model"
    shutil.copytree(tiny_model, shipped)
    settings = json.loads((shipped / "generation_config.json").read_text())
    settings.update(repetition_penalty=50.0, no_repeat_ngram_size=2, top_k=3, top_p=0.5, do_sample=True)
    (shipped / "generation_config.json").write_text(json.dumps(settings))
    cfg = make_config(tmp_path, shipped, tmp_path / "train.jsonl", tmp_path / "eval.jsonl", eval={"max_new_tokens": 12})
    texts = ["### Question\nIs 4 even?\n\n### Output\n", "Hi", "### Question\nName a very long river in Africa.\n"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    references = [tokenizer("yes")["input_ids"][1:] + [tokenizer.eos_token_id], [5, 6, 7], [9]]
    ints = pa.list_(pa.int32())
    batch = pa.table({
        "set": ["eval"] * 3, "index": [0, 1, 2],
        "prompt_ids": pa.array(prompts, ints), "reference_ids": pa.array(references, ints),
    })  # fmt: skip
    out = Replica(cfg.model_dump(mode="json"), str(adapter), {"eval": ["instruction"]})(batch).to_pylist()

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    for which, model in (("base", base), ("tuned", tuned.eval())):
        for row, prompt, reference in zip(out, prompts, references):
            with torch.no_grad():
                new = _greedy(model, prompt, 12, tokenizer.eos_token_id)
                seq = torch.tensor([prompt + reference])
                labels = torch.tensor([[IGNORE] * len(prompt) + reference])
                loss = model(input_ids=seq, labels=labels).loss.item()
            assert row[f"{which}_output"] == tokenizer.decode(new), (which, row["index"])
            assert row[f"{which}_output_tokens"] == len(new)
            assert row[f"{which}_loss"] == pytest.approx(loss, rel=1e-4), (which, row["index"])
    assert len(set(_greedy(base, prompts[0], 12, -1))) < 12  # a repeat: the penalty would have changed it
    assert [r["base_output"] != r["tuned_output"] for r in out] == [True] * 3  # the adapter was on for tuned only
    assert len({r["replica"] for r in out}) == 1 and out[1]["reference_tokens"] == 3


def test_configs_the_vllm_engine_cannot_serve_are_refused(tmp_path, tiny_model):
    from sft_ray.config import ConfigError

    def cfg(dtype="float32", **sections):
        from sft_ray.config import validate

        tree = make_config(tmp_path, tiny_model, tmp_path / "train.jsonl", tmp_path / "eval.jsonl").model_dump()
        tree["model"]["dtype"] = dtype
        for key, value in sections.items():
            tree[key] = {**(tree.get(key) or {}), **value} if isinstance(value, dict) else value
        return validate(tree)

    gpu = {"use_gpu": True, "num_workers": 1}
    with pytest.raises(ConfigError, match="eval.engine=vllm runs on GPUs: set scaling.use_gpu=true"):
        cfg(eval={"engine": "vllm"})
    with pytest.raises(ConfigError, match=r"fully fine-tuned model \(lora: null\) is evaluated with eval.engine=trans"):
        cfg(eval={"engine": "vllm"}, scaling=gpu, lora=None)
    with pytest.raises(ConfigError, match="cannot serve the token rows ChatML trains"):
        cfg("bfloat16", eval={"engine": "vllm"}, scaling=gpu, data={"chat_template": "chatml"})
    with pytest.raises(ConfigError, match="its LoRA kernels do not run in float32; set model.dtype"):
        cfg(eval={"engine": "vllm"}, scaling=gpu)
    with pytest.raises(ConfigError, match="LoRA adapters of rank <= 512 without DoRA"):
        cfg("bfloat16", eval={"engine": "vllm"}, scaling=gpu, lora={"use_dora": True})
    assert cfg("bfloat16", eval={"engine": "vllm"}, scaling=gpu).eval.engine == "vllm"
    with pytest.raises(ConfigError, match="text rows have none"):
        cfg(eval={"exact_match_rows": 4}, data={"eval": [{"path": str(tmp_path / "e.jsonl"), "format": "text"}]})
    with pytest.raises(ConfigError, match="tune.mode: exact_match is better when higher: set mode: max"):
        cfg(tune={"metric": "exact_match", "mode": "min", "space": {"train.learning_rate": {"choice": [1e-3]}}},
            eval={"exact_match_rows": 8})  # fmt: skip
    with pytest.raises(ConfigError, match="tune.metric=exact_match ranks trials by answers generated at every eval"):
        cfg(tune={"metric": "exact_match", "space": {"train.learning_rate": {"choice": [1e-3]}}})


@pytest.mark.gpu
def test_the_vllm_engine_answers_and_scores_as_the_transformers_one(tmp_path, tiny_model, tokenizer, adapter):
    """Skipped where vllm is not installed (it is an extra: `pip install 'sft-ray[vllm]'`)."""
    pytest.importorskip("vllm")
    import pyarrow as pa

    from sft_ray.config import validate
    from sft_ray.evaluation.replica import Replica, VllmReplica

    gpu, vllm = {"use_gpu": True, "num_workers": 1}, {"max_new_tokens": 12, "engine": "vllm"}
    tree = make_config(tmp_path, tiny_model, tmp_path / "train.jsonl", tmp_path / "eval.jsonl").model_dump()
    tree["model"]["dtype"] = "bfloat16"  # vLLM's LoRA kernels: no float32
    tree["eval"].update(vllm)
    tree["scaling"].update(gpu)
    cfg = validate(tree)
    prompts = [tokenizer(t)["input_ids"] for t in ("### Question\nIs 4 even?\n\n### Output\n", "Hi there")]
    ints = pa.list_(pa.int32())
    batch = pa.table({"set": ["eval"] * 2, "index": [0, 1], "prompt_ids": pa.array(prompts, ints),
                      "reference_ids": pa.array([[5, 6], [7]], ints)})  # fmt: skip
    config = cfg.model_dump(mode="json")
    fast = VllmReplica(config, str(adapter), {"eval": ["instruction"]})(batch).to_pylist()
    plain = Replica(config, str(adapter), {"eval": ["instruction"]})(batch).to_pylist()
    for a, b in zip(fast, plain):  # bfloat16 in two engines: the same start, losses within 5%
        for which in ("base", "tuned"):
            assert a[f"{which}_output"][:8] == b[f"{which}_output"][:8]
            assert a[f"{which}_loss"] == pytest.approx(b[f"{which}_loss"], rel=5e-2)


def test_a_finished_run_is_the_same_training_whatever_its_eval_generation_settings(tmp_path, tiny_model):
    """`sft-ray train` reruns nothing for a config that differs only in how `sft-ray eval` generates."""
    import yaml

    from sft_ray.train.final import same_training

    cfg = make_config(tmp_path, tiny_model, tmp_path / "train.jsonl", tmp_path / "eval.jsonl", name="done")
    final = tmp_path / "storage" / "done" / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert same_training(cfg)
    cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.replicas = 7, 3, 1
    assert same_training(cfg)
    cfg.eval.exact_match_rows = 8  # measured during training: another training
    assert not same_training(cfg)
    cfg.eval.exact_match_rows, cfg.train.learning_rate = 0, 1e-3
    assert not same_training(cfg)
    # A final/ written before the eval section existed.
    tree = cfg.model_dump(mode="json")
    cfg.train.learning_rate = tree["train"]["learning_rate"]
    del tree["eval"]
    (final / "config.yaml").write_text(yaml.safe_dump(tree))
    assert same_training(cfg)
