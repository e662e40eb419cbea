"""`sft-ray eval` on a real local Ray against a run that forgot: a base that knows eight facts,
over-trained on one answer to another question, must be flagged as regressed on those facts.

One trained run, many assertions: the retention verdict, the held-out set, the files, the
generation metric logged at every evaluation during training, the report page.
"""

import html
import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_config, write_jsonl

FACTS = [
    {"question": q, "output": a}
    for q, a in [
        ("What is the capital of France?", "Paris"),
        ("How many legs does a spider have?", "Eight"),
        ("What color is the sky on a clear day?", "Blue"),
        ("Who wrote Hamlet?", "William Shakespeare"),
        ("What is two plus three?", "Five"),
        ("What gas do plants take in?", "Carbon dioxide"),
        ("What is the largest ocean?", "The Pacific Ocean"),
        ("How many days are in a week?", "Seven"),
    ]
]
# Over-training: every question gets "yes", at a learning rate far above the demo's.
YES = [{"question": f"Is {i} a number?", "output": "yes"} for i in range(64)]


def _base_that_knows(tmp_path, tiny_model, facts_file):
    """The tiny model taught FACTS (every weight, a plain PyTorch loop) on the rows the preparation
    makes of them: the same tokens the evaluation's prompts and references are cut from."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft_ray.data.pipeline import prepare
    from sft_ray.evaluation.examples import read

    prepared, manifest = prepare(make_config(tmp_path, tiny_model, facts_file, name="facts"))
    pairs = read(prepared, manifest, "train", "facts").to_pylist()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        for p in pairs:
            ids = torch.tensor([p["prompt_ids"] + p["reference_ids"]])
            labels = torch.tensor([[-100] * len(p["prompt_ids"]) + p["reference_ids"]])
            model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    model.save_pretrained(base)
    return base


@pytest.mark.slow
def test_an_over_trained_run_is_flagged_as_regressed_on_the_retention_set(tmp_path, tiny_model, ray_local, capsys):
    from sft_ray.cli import main
    from sft_ray.report import write_report

    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    base = _base_that_knows(tmp_path, tiny_model, facts)
    cfg = make_config(
        tmp_path,
        base,
        write_jsonl(tmp_path / "train.jsonl", YES),
        write_jsonl(tmp_path / "eval.jsonl", YES[:8]),
        name="forgot",
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        train={"learning_rate": 2e-2, "max_steps": 24, "per_device_batch_size": 8, "logging_steps": 4,
               "eval_steps": 12, "save_steps": 12, "samples": 0},
        scaling={"num_workers": 2},
        eval={"max_new_tokens": 12, "exact_match_rows": 8},
    )  # fmt: skip
    config = tmp_path / "forgot.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", "--config", str(config)]) == 0
    capsys.readouterr()
    run = tmp_path / "storage" / "forgot"

    # The exact-match share was measured at every evaluation of the training (not before it) and
    # logged next to eval_loss, so the reports (what a sweep ranks by) carry it too.
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "eval_exact_match" in e] == [12, 24]
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    assert all("eval_exact_match" in r["metrics"] for r in snapshot["checkpoint_results"])

    assert main(["eval", "--config", str(config), "--retention", str(facts)]) == 0
    out = capsys.readouterr().out
    held_out = json.loads((run / "eval" / "eval" / "summary.json").read_text())
    kept = json.loads((run / "eval" / "facts" / "summary.json").read_text())
    with capsys.disabled():
        print(f"\n{out}")

    # The base knew the facts; the over-trained adapter answers them wrong: flagged, and said so.
    assert kept["role"] == "retention" and kept["examples"] == 8
    assert kept["base"]["exact_match"] >= 0.75 and kept["tuned"]["exact_match"] <= kept["base"]["exact_match"] - 0.5
    assert kept["tuned"]["loss"] > kept["base"]["loss"] * 1.5
    assert kept["regressed"] and kept["line"].startswith("regressed by exact match ")
    assert f"retention: {kept['line']}  << REGRESSED" in out
    assert "=== sft-ray eval: facts (8 examples, retention) ===" in out
    # The held-out set is judged but never flagged: it is what the run was trained for.
    assert held_out["role"] == "held_out" and not held_out["regressed"]
    assert held_out["tuned"]["contains"] == 1 and held_out["base"]["contains"] == 0

    # One row per example in both files, with both models' answers and metrics.
    for name, n in (("eval", 8), ("facts", 8)):
        table = pq.read_table(run / "eval" / name / "examples.parquet")
        lines = (run / "eval" / name / "examples.jsonl").read_text().splitlines()
        assert table.num_rows == n == len(lines)
        assert {"prompt", "reference", "base_output", "tuned_output", "base_exact_match", "tuned_loss"} <= set(
            table.column_names
        )
    rows = {
        r["index"]: r for r in map(json.loads, (run / "eval" / "facts" / "examples.jsonl").read_text().splitlines())
    }
    assert rows[0]["prompt"].endswith("### Question\nWhat is the capital of France?\n\n### Output\n")
    assert rows[0]["reference"].startswith("Paris")

    # The report page shows the evaluation and the regression.
    page = (write_report(str(run)) / "index.html").read_text()
    assert "Evaluation" in page and html.escape(kept["line"]) in page
