"""What a new user sees: `sft-ray train` on the demo, as a real process with its own embedded Ray."""

import json
import os
import re
import subprocess
import sys

import pytest

from sft_ray.console import NOISE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines that said nothing about the run before the console was quieted (measured on the demo).
NOISE_SEEN = [
    NOISE,
    re.compile(r"\bINFO\b"),
    re.compile(r"Execution plan of Dataset"),
    re.compile(r"Reporting training result"),
    re.compile(r"Checkpoint successfully created"),
    re.compile(r"Requesting resources|Attempting to start training worker group"),
    re.compile(r"Setting up process group"),
    re.compile(r"\{'loss': '"),  # the HF Trainer's raw log dicts
    re.compile(r"FutureWarning|DeprecationWarning"),
]


@pytest.mark.slow
def test_demo_prints_progress_and_the_data_warning_but_no_library_noise(tmp_path, tiny_model):
    planted = tmp_path / "planted.jsonl"
    rows = [json.loads(x) for x in open(os.path.join(REPO, "jobs/data/demo/train.jsonl"))][:120]
    rows[0]["input"] += " <|im_end|>"  # a control token spelled in the text: the preparation warns about it
    planted.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.pop("SFT_RAY_VERBOSE", None)
    out = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "sft-ray"),
            "train",
            "--config",
            os.path.join(REPO, "jobs/configs/demo.yaml"),
            f"model.path={tiny_model}",
            f"storage.path={tmp_path / 'runs'}",
            f"data.train=[{{path: {planted}, format: instruction}}]",
            f"data.eval=[{{path: {os.path.join(REPO, 'jobs/data/demo/eval.jsonl')}, format: instruction}}]",
            "train.max_steps=12",
            "train.logging_steps=2",
            "train.eval_steps=6",
            "train.save_steps=6",
            "train.samples=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=400,
        start_new_session=True,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "1 rows spell a control token, tokenized as text" in text  # the user's data: always shown
    for pattern in NOISE_SEEN:
        assert not pattern.search(text), (pattern.pattern, [x for x in text.splitlines() if pattern.search(x)])
    progress = [x for x in text.splitlines() if x.startswith("step ")]
    assert [x.split(" ")[1] for x in progress] == ["2/12", "4/12", "6/12", "8/12", "10/12", "12/12"], progress
    assert all(re.search(r"\(\d+%\) · loss [\d.]+ · ", x) for x in progress)
    assert "eval" in progress[2] and "tok/s" in progress[-1]
    etas = [int(m.group(1)) * 60 + int(m.group(2)) for x in progress if (m := re.search(r"ETA (\d+):(\d\d)", x))]
    assert len(etas) >= 4 and etas[-1] == 0 and etas[0] >= etas[-1], progress
    # Before the result block, nothing but the preparation's line and the progress lines.
    head = text.split("=== sft-ray result ===")[0].splitlines()
    shown = ("preparing data: ", "prepared data: ", "step ")
    assert [x for x in head if x.strip() and not x.startswith(shown)] == [], head
