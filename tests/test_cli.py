"""The command line: exit codes and one-line messages for bad input, and what the summary shows."""

from conftest import REPO

from sft_ray import ray_runtime
from sft_ray.cli import _varied, main
from sft_ray.train import driver  # imported before the patch below, so it keeps the real ensure_ray

DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")


def test_bad_input_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    def no_ray():
        raise AssertionError("Ray was started")

    # All of these fail before Ray starts.
    monkeypatch.setattr(ray_runtime, "ensure_ray", no_ray)
    monkeypatch.setattr(driver, "ensure_ray", no_ray)
    missing = f"{tmp_path}/nope.jsonl"
    cases = [
        (["train.learning_rate=abc"], 2, "train.learning_rate: Input should be a valid number"),
        (["lora.target_modules=[q_proj"], 2, "override 'lora.target_modules=[q_proj': the value is not valid YAML"),
        ([f"model.path={tmp_path}/nope"], 2, f"model.path: {tmp_path}/nope is neither a folder"),
        (["storage.path=/proc/sft-ray-runs"], 1, "storage.path /proc/sft-ray-runs is not writable"),
        ([f"data.train=[{{path: {missing}}}]"], 1, f"data.train[0].path: no such file or folder: {missing}"),
    ]
    for overrides, code, message in cases:
        assert main(["train", "--config", DEMO, f"storage.path={tmp_path}/runs", *overrides]) == code, overrides
        out = capsys.readouterr()
        assert out.err.startswith("sft-ray: ") and message in out.err, out.err
        assert "Traceback" not in out.err + out.out


def test_printed_samples_show_different_references_first():
    samples = [{"reference": r, "n": i} for i, r in enumerate(["neg", "neg", "neg", "pos", "neg"])]
    assert [s["n"] for s in _varied(samples, 3)] == [0, 3, 1]
    assert _varied(samples[:2], 3) == samples[:2]
