import json

import pytest

from sft_ray.report import load_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script> & more"


def _jsonl(path, rows, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _train(step: int, loss: float, **extra) -> dict:
    return {"step": step, "epoch": step / 20, "loss": loss, "learning_rate": 2e-4 * (1 - step / 40), **extra}


# Steps 10-30 logged, the run crashed after its step-20 checkpoint and resumed from it: 30 again.
METRICS = [
    {"step": 0, "eval_loss": 3.0, "time": 1.0},
    _train(10, 2.5, trained_tokens_per_s=800.0, real_tokens_fraction=0.97, peak_memory_mb=600.0, mystery=[1]),
    _train(20, 2.0),
    {"step": 20, "epoch": 1.0, "eval_loss": 2.2},
    _train(30, 1.9),
    _train(30, 1.7, trained_tokens_per_s=850.0, peak_memory_mb=640.0),  # after the resume
    _train(40, 1.5),
    {"step": 40, "epoch": 2.0, "eval_loss": 1.8},
]


def test_load_metrics_last_line_wins_and_sorts_by_step(tmp_path):
    _jsonl(tmp_path / "metrics.jsonl", METRICS, tail='{"step": 50, "lo')  # caught mid-append
    series = load_metrics(str(tmp_path))
    assert series["loss"] == [(10, 2.5), (20, 2.0), (30, 1.7), (40, 1.5)]
    assert series["eval_loss"] == [(0, 3.0), (20, 2.2), (40, 1.8)]
    assert series["trained_tokens_per_s"] == [(10, 800.0), (30, 850.0)]
    assert "mystery" not in series and "time" not in series


def test_load_metrics_names_a_bad_line(tmp_path):
    _jsonl(tmp_path / "metrics.jsonl", [METRICS[0]], tail="not json\n" + json.dumps(METRICS[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        load_metrics(str(tmp_path))


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


SUMMARY = {
    "global_step": 40,
    "eval_loss_before": 3.0,
    "eval_loss_after": 1.8,
    "train_loss_first": 2.5,
    "train_loss_last": 1.5,
    "train_runtime_s": 3725.5,
    "tokens_per_second": 14930.4,
    "tokens_seen": 55_620_000,
    "history": {"train": [], "eval": []},
}

MANIFEST = {
    "splits": {
        "train": {
            "rows_read": 1000,
            "rows_written": 990,
            "rows_dropped": {"bad_json": 10},
            "tokens": 51234,
            "trained_fraction": 0.25,
            "length_histogram": [
                {"from": 1, "to": 64, "rows": 700},
                {"from": 65, "to": 128, "rows": 290},
                {"from": 129, "to": 192, "rows": 0},
            ],
            "files": [{"name": "000000.parquet", "rows": 990}],
        },
        "eval": {"rows_read": 100, "rows_written": 100, "rows_dropped": {}, "tokens": 5120},
    }
}


def build_run(folder, summary: dict | None = None) -> None:
    """A finished run folder as training leaves it: metrics.jsonl and final/ (no adapter)."""
    _jsonl(folder / "metrics.jsonl", METRICS)
    final = folder / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text("name: demo\nlora:\n  r: 8\n")
    (final / "metrics.json").write_text(json.dumps(summary or SUMMARY))
    samples = [
        {"prompt": EVIL, "reference": "positive", "before": "x y z", "after": "positive"},
        {"prompt": "Is it good?", "reference": "negative", "before": "", "after": "positive"},
    ]
    shares = {"eos_share_before": 0.0, "eos_share_after": 1.0, "exact_share_before": 0.0, "exact_share_after": 0.5}
    (final / "samples.json").write_text(json.dumps({"samples": samples, **shares}))
    (final / "data_manifest.json").write_text(json.dumps(MANIFEST))


def test_full_run(tmp_path):
    build_run(tmp_path)

    out = write_report(str(tmp_path))

    assert out == tmp_path / "report"
    _assert_png(out / "loss.png")
    _assert_png(out / "learning_rate.png")
    page = (out / "index.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "<script>" not in page
    assert 'src="loss.png"' in page and 'src="learning_rate.png"' in page
    assert "51,234" in page and "bad json: 10" in page and "25%" in page  # data table
    assert "1-64: 700, 65-128: 290<" in page  # the bins that hold rows
    assert "000000.parquet" not in page  # the workers' file list is not a statistic
    # Words and units, never raw keys or exponents.
    assert "14.9k tokens/s" in page and "55.6M tokens" in page and "1:02:05" in page
    assert "640 MB" in page and "850 tokens/s" in page and "97%" in page
    for raw in ("eval_loss", "eos_share", "exact_share", "tokens_per_second", "e+0", "rows_read"):
        assert raw not in page, raw
    # Before and after side by side: a row per measure, before | after | change.
    assert _row(page, "eval loss") == ["3.00", "1.80", "-40%"]
    assert _row(page, "exact answers (of 2 held-out prompts)") == ["0%", "50%", "+50 points"]
    assert _row(page, "stops on its own (of 2 held-out prompts)") == ["0%", "100%", "+100 points"]
    assert "<pre>name: demo" in page
    # At the top, before any table: the curves look healthy; the dropped rows are a data warning.
    top = page[: page.index("<table")]
    assert "No warning sign in the loss curves" in top
    assert "train: 10 rows dropped (bad json: 10)" in top
    assert "Missing" not in page
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def _row(page: str, label: str) -> list[str]:
    """The cells after a table row's header `label`."""
    import re

    row = page[page.index(f"<th>{label}</th>") :].split("</tr>", 1)[0]
    return re.findall(r"<td[^>]*>([^<]*)</td>", row)


def test_the_diagnosis_is_at_the_top(tmp_path):
    overfit = {
        "sign": "overfitting",
        "summary": "eval loss rose from 1.800 (step 40) to 2.300 (step 80, +28%) while train loss fell",
        "numbers": {"best_eval_step": 40},
        "try": ["fewer epochs", "more training data"],
    }
    build_run(tmp_path, {**SUMMARY, "diagnosis": [overfit]})
    page = (write_report(str(tmp_path)) / "index.html").read_text()
    top = page[: page.index("<table")]
    assert "Overfitting" in top and "+28%" in top and "Try: fewer epochs; more training data" in top
    assert "No warning sign" not in page


def test_run_in_progress_renders_and_names_what_is_missing(tmp_path):
    _jsonl(tmp_path / "metrics.jsonl", METRICS[:3])
    out = write_report(str(tmp_path))
    page = (out / "index.html").read_text()
    assert "Missing: final/" in page
    assert "last logged step 20" in page
    _assert_png(out / "loss.png")

    (tmp_path / "final").mkdir()  # final/ being written: only part of it there
    (tmp_path / "final" / "config.yaml").write_text("name: demo\n")
    page = (write_report(str(tmp_path)) / "index.html").read_text()
    assert "Missing: final/metrics.json" in page and "Missing: final/samples.json" in page
    assert "Missing: final/config.yaml" not in page


def test_empty_run_folder_still_renders(tmp_path):
    page = (write_report(str(tmp_path)) / "index.html").read_text()
    assert "Missing: metrics.jsonl" in page and "No loss logged yet" in page
    assert not (tmp_path / "report" / "loss.png").exists()
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        write_report(str(tmp_path / "nope"))
    # storage.path itself (runs next to datasets/) is refused, not rendered as an empty run.
    root = tmp_path / "storage"
    _jsonl(root / "demo" / "metrics.jsonl", METRICS[:3])
    (root / "datasets" / "0123abcd").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds runs \(demo\), it is not one"):
        write_report(str(root))
    assert not (root / "report").exists()


def _eval_summary(name: str, role: str, base: dict, tuned: dict, line: str = "no regression") -> dict:
    """A summary.json as `sft-ray eval` writes it under RUN_DIR/eval/<set>/ (trimmed)."""
    example = {
        "index": 3,
        "prompt": "<s>### Question\nIs it good?\n\n### Output\n",
        "reference": "positive<|im_end|>",
        "base_output": "merThet merThet",
        "tuned_output": "positive<|im_end|>",
        "base_exact_match": False,
        "tuned_exact_match": True,
        "base_loss": 6.84,
        "tuned_loss": 4.07,
    }
    return {
        "set": name,
        "role": role,
        "source": f"data/{name}.jsonl",
        "examples": 60,
        "base": base,
        "tuned": tuned,
        "most_different": [{**example, "index": i} for i in range(7)],
        "regressions": [],
        "regressed": line != "no regression",
        "line": line,
    }


def _scores(share: float, loss: float) -> dict:
    return {
        **dict.fromkeys(("exact_match", "normalized_match", "contains", "turn_end"), share),
        "output_tokens": 16.0,
        "loss": loss,
        "perplexity": 2.718281828**loss,
    }


def test_evaluation_section_shows_each_set_base_against_tuned(tmp_path):
    build_run(tmp_path / "plain")
    page = (write_report(str(tmp_path / "plain")) / "index.html").read_text()
    assert "Evaluation" not in page  # never evaluated: no section, no error

    run = tmp_path / "run"
    build_run(run)
    held_out = _eval_summary("heldout", "held_out", _scores(0.0, 6.621), _scores(1.0, 4.076))
    kept = _eval_summary(
        "alpaca", "retention", _scores(0.5, 6.6), _scores(0.5, 9.1), line="regressed by loss 6.6 -> 9.1 (+2.5)"
    )
    for summary in (held_out, kept):
        (run / "eval" / summary["set"]).mkdir(parents=True)
        (run / "eval" / summary["set"] / "summary.json").write_text(json.dumps(summary))
    (run / "eval" / "heldout" / "examples.jsonl").write_text("not json, and never read\n")
    (run / "eval" / "broken").mkdir()
    (run / "eval" / "broken" / "summary.json").write_text('{"set": "bro')

    page = (write_report(str(run)) / "index.html").read_text()
    section = page[page.index("<h2>Evaluation</h2>") :]
    # Sorted by set name: the skipped one named, the others with their role, size and source.
    broken = section.index("eval/broken/summary.json could not be read")
    assert section.index("<h3>alpaca") < broken < section.index("<h3>heldout")
    assert "(held out · 60 examples · from data/heldout.jsonl)" in section
    assert "(retention · 60 examples · from data/alpaca.jsonl)" in section
    held = section[section.index("<h3>heldout") :]
    assert _row(held, "exact match") == ["0%", "100%", "+100 points"]
    assert _row(held, "turn-end adherence") == ["0%", "100%", "+100 points"]
    assert _row(held, "reference loss") == ["6.62", "4.08", "-38%"]
    assert _row(held, "output tokens (mean)") == ["16", "16", ""]
    assert _row(section, "exact match") == ["50%", "50%", ""]  # alpaca's, first
    # The regression: in its set and among the warnings at the top of the page.
    assert "<b>Retention regressed</b>regressed by loss 6.6 -&gt; 9.1 (+2.5)" in section
    top = page[: page.index("<table")]
    assert "alpaca: regressed by loss 6.6 -&gt; 9.1 (+2.5)" in top
    # Up to 5 examples each, special tokens shown as text.
    assert held.count("Examples where base and tuned differ most") == 1
    assert held.count("<td>merThet merThet</td>") == 5
    assert "positive&lt;|im_end|&gt;" in held and "<|im_end|>" not in page


def build_sweep(folder) -> None:
    """A sweep folder as `sft-ray tune` leaves it: trials/<id>/ run folders, results.json, best/."""
    histories = {
        "t_00000": [(10, 2.4), (20, 2.0), (30, 1.9)],
        "t_00001": [(10, 2.1), (20, 1.7), (30, 1.5)],
        "t_00002": [(10, 2.9)],
    }
    rows = []
    for (trial_id, history), lr, status in zip(
        histories.items(), (1e-4, 5e-4, 3e-5), ("completed", "completed", "stopped early")
    ):
        evals = [{"step": 0, "eval_loss": 3.0}] + [{"step": s, "eval_loss": v} for s, v in history]
        train = [{"step": s, "loss": v - 0.1} for s, v in history]
        _jsonl(folder / "trials" / trial_id / "metrics.jsonl", evals + train)
        rows.append(
            {
                "trial_id": trial_id,
                "params": {"train.learning_rate": lr, "lora.r": 8},
                "best_eval_loss": min(v for _, v in history),
                "steps": max(s for s, _ in history),
                "status": status,
                "eval_loss_history": history,
                "checkpoint": f"{folder}/trials/{trial_id}/final",
            }
        )
    results = {"sweep": "sw", "metric": "eval_loss", "best_trial": "t_00001", "trials": rows}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "best").mkdir()
    (folder / "best" / "adapter_config.json").write_text("{}")


def test_sweep_page_has_the_trials_table_and_the_eval_loss_plot(tmp_path):
    build_sweep(tmp_path)
    out = write_report(str(tmp_path))
    _assert_png(out / "eval_loss.png")
    page = (out / "index.html").read_text()
    assert "<h1>Sweep " in page and "3 trials: 2 completed, 1 stopped early" in page
    assert "Best trial: t_00001" in page and "eval loss 1.50" in page and "learning rate 5.0e-04" in page
    assert "<th>learning rate</th>" in page and "<th>LoRA rank</th>" in page
    # Best first; the best row marked.
    assert page.index("t_00001") < page.index("t_00000") < page.index("t_00002")
    assert "<tr class=best><th>t_00001 (best)</th>" in page
    assert 'src="eval_loss.png"' in page
    assert "train.learning_rate" not in page and "best_eval_loss" not in page

    # A sweep still running (no results.json yet): the trials from their own folders.
    (tmp_path / "results.json").unlink()
    page = (write_report(str(tmp_path)) / "index.html").read_text()
    assert "Sweep not finished" in page and "t_00002" in page


# --- in a real browser --------------------------------------------------------------------------

_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({src: i.getAttribute("src"), width: i.naturalWidth}));
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(images);
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """Headless Chromium from the OS packages: installed once (apt-get, as root) where missing."""
    import os
    import shutil
    import subprocess

    def found():
        return next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)

    if exe := found():
        return exe
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("no chromium, and it cannot be installed here (apt-get needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "install", "-y", "chromium"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "chromium"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if command[1] == "install" and done.returncode == 0:
            break
    if not (exe := found()):
        pytest.skip(f"apt-get install chromium failed: {(done.stderr or done.stdout)[-300:]}")
    return exe


def _loaded_images(chromium: str, report, tmp_path) -> list[dict]:
    """Open the report in headless Chromium and read back each <img>'s natural width after load.

    A copy of the page with a script that, on load, writes what it found into the DOM, which
    `--dump-dom` prints; `--virtual-time-budget` lets the page finish loading first."""
    import html as html_lib
    import re
    import shutil
    import subprocess

    copy = tmp_path / "opened"
    shutil.copytree(report, copy)
    page = (copy / "index.html").read_text()
    (copy / "index.html").write_text(page.replace("</body>", _IMAGE_CHECK + "</body>"))
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (copy / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="image-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"chromium printed no result (exit {done.returncode}): {done.stderr[-1000:]}"
    return json.loads(html_lib.unescape(found.group(1)))


@pytest.mark.slow
def test_every_image_loads_in_a_real_browser(chromium, tmp_path):
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    build_run(run)
    build_sweep(sweep)
    for folder, expected in ((run, {"loss.png", "learning_rate.png"}), (sweep, {"eval_loss.png"})):
        images = _loaded_images(chromium, write_report(str(folder)), tmp_path / folder.name)
        assert {i["src"] for i in images} == expected
        assert all(i["width"] > 0 for i in images), images
    # The check itself sees a broken image.
    (run / "report" / "loss.png").unlink()
    images = _loaded_images(chromium, run / "report", tmp_path / "broken")
    assert {i["src"]: i["width"] for i in images}["loss.png"] == 0
