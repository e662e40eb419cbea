"""The driver's progress lines, from the records rank 0 writes to metrics.jsonl."""

import io
import json
import re
import time

from sft_ray.progress import Follower, Preparation, follow, line


def _records(steps, t0=1000.0, per_step=2.0, eval_every=2):
    out = []
    for s in steps:
        out.append(
            {
                "step": s,
                "time": t0 + s * per_step,
                "loss": 5.0 - 0.1 * s,
                "learning_rate": 2e-3,
                "trained_tokens_per_s": 2100.0,
            }
        )
        if s % eval_every == 0:
            out.append({"step": s, "time": t0 + s * per_step + 0.5, "eval_loss": 4.5 - 0.05 * s})
    return out


def test_one_line_per_step_with_total_percentage_and_a_falling_eta():
    follower = Follower(total=10, start_step=0)
    lines = follower.new_lines(_records(range(1, 6)))
    assert len(lines) == 5 and lines[0].startswith("step 1/10 (10%) · loss 4.9 · lr 2.0e-03 · 2.1k trained tok/s")
    assert "ETA" not in lines[0]  # one point gives no rate
    etas = [re.search(r"ETA (\d+):(\d\d)", x) for x in lines[1:]]
    seconds = [int(m.group(1)) * 60 + int(m.group(2)) for m in etas]
    assert seconds == [16, 14, 12, 10]  # 2 s per step x steps left
    assert "eval 4.4" in lines[2] and "eval" not in lines[0]  # the eval of step 2 shows from then on
    assert follower.new_lines(_records(range(1, 6))) == []  # a rewritten file repeats no step


def test_a_resumed_run_starts_after_its_checkpoint_and_times_only_this_attempt():
    follower = Follower(total=10, start_step=4, since=9_000.0)
    old = _records(range(1, 7), t0=0.0, per_step=100.0)  # an earlier driver's attempt: 5-6 not yet rewritten
    new = _records(range(5, 8), t0=10_000.0, per_step=1.0)
    lines = follower.new_lines(old[:8] + new)
    assert [x.split(" ")[1] for x in lines] == ["5/10", "6/10", "7/10"]
    assert lines[-1].endswith("ETA 0:03")


def test_format_without_total_and_with_large_numbers():
    assert line({"step": 3, "loss": 1.23456}, 0, None, None) == "step 3 · loss 1.235"
    text = line({"step": 1, "loss": 2.0, "trained_tokens_per_s": 2_345_678.0}, 4, 1.5, 3725)
    assert text == "step 1/4 (25%) · loss 2 · eval 1.5 · 2.3M trained tok/s · ETA 1:02:05"


def test_the_exact_match_share_shows_once_an_evaluation_logged_it():
    follower = Follower(total=4, start_step=0)
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.5}, {"step": 2, "eval_exact_match": 0.375},
               {"step": 2, "loss": 2.0}]  # fmt: skip
    first, second = follower.new_lines(records)
    assert "exact" not in first and second.startswith("step 2/4 (50%) · loss 2 · eval 2.5 · exact 38% · ")


def test_follow_prints_what_the_run_writes_and_the_last_lines_at_the_end(tmp_path):
    out = io.StringIO()
    metrics = tmp_path / "metrics.jsonl"
    with follow(str(tmp_path), 3, 0, out=out):
        now = time.time()
        metrics.write_text("\n".join(json.dumps(r) for r in _records(range(1, 4), t0=now)) + "\n")
    assert [x.split(" ·")[0] for x in out.getvalue().splitlines()] == [
        "step 1/3 (33%)",
        "step 2/3 (67%)",
        "step 3/3 (100%)",
    ]


def test_the_console_drops_library_noise_lines_and_keeps_the_rest():
    from sft_ray.console import _FilteredStream

    out = io.StringIO()
    stream = _FilteredStream(out)
    stream.write("prepared data: 1 rows spell a control token\n(RayTrainWorker pid=1) Loading weights:  10%|")
    stream.write("x| 2/21\n[E core_worker.cc:2465: Actor with class name: 'MapWorker' has constructor arguments in")
    stream.write(" the object store and max_restarts > 0.\nWARNING: storage.path is nearly full\n")
    assert out.getvalue() == "prepared data: 1 rows spell a control token\nWARNING: storage.path is nearly full\n"
    stream.write("\r\x1b[2Kstep 1/4 (25%)")  # a live progress line goes out at once, without a newline
    assert out.getvalue().endswith("\r\x1b[2Kstep 1/4 (25%)")


def test_preparation_is_silent_when_quick_and_counts_rows_when_slow():
    """Lines only after PREP_EVERY_S (5 s), at most that often, the last one always; the total is
    estimated from the chunks done (`~`) until every chunk is."""
    now = [0.0]
    out = io.StringIO()
    prep = Preparation(4, out=out, clock=lambda: now[0])
    for at, rows in ((1.0, 1000), (6.0, 1000), (8.0, 1000), (20.0, 500)):
        now[0] = at
        prep.chunk_done(rows)
    assert out.getvalue().splitlines() == [
        "preparing data: 2.0k rows of ~4.0k · 2/4 chunks (50%) · 333 rows/s · ETA 0:06",
        "preparing data: 3.5k rows of 3.5k · 4/4 chunks (100%) · 175 rows/s",
    ]
    quick = io.StringIO()
    fast = Preparation(2, out=quick, clock=lambda: 0.5)
    fast.chunk_done(10)
    fast.chunk_done(10)
    assert quick.getvalue() == ""
