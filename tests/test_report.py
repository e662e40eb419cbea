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


def test_full_run(tmp_path):
    _jsonl(tmp_path / "metrics.jsonl", METRICS)
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.yaml").write_text("name: demo\nlora:\n  r: 8\n")
    summary = {
        "global_step": 40,
        "eval_loss_before": 3.0,
        "eval_loss_after": 1.8,
        "train_loss_first": 2.5,
        "train_loss_last": 1.5,
        "train_runtime_s": 3725.5,
        "tokens_per_second": 812.5,
        "history": {"train": [], "eval": []},
    }
    (final / "metrics.json").write_text(json.dumps(summary))
    samples = [{"prompt": EVIL, "reference": "positive", "before": "x y z", "after": "positive"}]
    (final / "samples.json").write_text(
        json.dumps(
            {
                "samples": samples,
                "eos_share_before": 0.0,
                "eos_share_after": 1.0,
                "exact_share_before": 0.0,
                "exact_share_after": 0.5,
            }
        )
    )
    manifest = {
        "splits": {
            "train": {
                "rows_read": 1000,
                "rows_written": 990,
                "rows_dropped": {"bad_json": 10},
                "tokens": 51234,
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
    (final / "data_manifest.json").write_text(json.dumps(manifest))

    out = write_report(str(tmp_path))

    assert out == tmp_path / "report"
    _assert_png(out / "loss.png")
    _assert_png(out / "learning_rate.png")
    page = (out / "index.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "<script>" not in page
    assert 'src="loss.png"' in page and 'src="learning_rate.png"' in page
    assert "51,234" in page and "bad_json: 10" in page  # data table
    assert "1-64: 700, 65-128: 290<" in page  # the bins that hold rows
    assert "000000.parquet" not in page  # the workers' file list is not a statistic
    assert "812.5" in page and "1:02:05" in page  # throughput
    assert "eval_loss_after" in page and "<pre>name: demo" in page
    assert "ended with EOS: before: 0%, after: 100%" in page
    assert "were the reference exactly: before: 0%, after: 50%" in page
    assert "Missing" not in page
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


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
