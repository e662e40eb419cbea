"""Sweeps: the search space is checked before anything runs; ASHA over one-worker trials on a real local Ray."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, make_config, train_steps, write_jsonl

from sft_ray.config import ConfigError, load_config

ROWS = [{"question": f"Is {i} even?", "output": "yes" if i % 2 == 0 else "no"} for i in range(32)]
GOOD, TERRIBLE = (5e-3, 3e-3), (1e-7, 1e-6)
# By exact match: one answer to learn, at learning rates that learn it (and its end) within a few steps.
YES, GOOD_FOR_YES = [{"question": f"Is {i} a number?", "output": "yes"} for i in range(32)], (2e-2, 1e-2)


def _cfg(tmp_path, tiny_model, space, metric="eval_loss", rows=ROWS, **train):
    return make_config(
        tmp_path,
        tiny_model,
        write_jsonl(tmp_path / "train.jsonl", rows),
        write_jsonl(tmp_path / "eval.jsonl", rows[:8]),
        name="sweep",
        lora={"dropout": 0.0},
        # 2 epochs x 32 rows / 4 = 16 steps; an evaluation (and a checkpoint) every 2: 8 reports, then the
        # final one. A stopped trial halts within ~3 reports of its stop (each report waits for Tune to
        # take the one before), so one stopped at step 2 or 4 never reaches the end.
        train={
            "epochs": 2,
            "per_device_batch_size": 4,
            "logging_steps": 1,
            "eval_steps": 2,
            "save_steps": 2,
            "samples": 0,
            **train,
        },
        scaling={"num_workers": 1},
        storage={"keep_checkpoints": 1},
        eval={"exact_match_rows": 8 if metric == "exact_match" else 0},
        tune={
            "metric": metric,
            "num_samples": 1,
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "space": space,
        },
    )


def test_space_is_checked_before_anything_runs(tmp_path, tiny_model, monkeypatch):
    from sft_ray.tune import check_space

    lr = {"train.learning_rate": {"choice": [1e-3]}}
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.learning_rat:(.|\n)*train\.learning_rat: unknown key"):
        check_space(_cfg(tmp_path, tiny_model, {"train.learning_rat": {"choice": [1e-3]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.lora\.r:(.|\n)*lora\.r: Input should be greater than 0"):
        check_space(_cfg(tmp_path, tiny_model, {"lora.r": {"grid": [8, 0]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.warmup:(.|\n)*greater than or equal to 0"):
        check_space(_cfg(tmp_path, tiny_model, {"train.warmup": {"uniform": [-1.0, 0.5]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.data\.max_length: trials cannot differ"):
        check_space(_cfg(tmp_path, tiny_model, {"data.max_length": {"choice": [64, 128]}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.save_steps=3: .*multiple of train\.eval_steps"):
        check_space(_cfg(tmp_path, tiny_model, {"train.save_steps": {"choice": [2, 3]}}))
    no_eval = _cfg(tmp_path, tiny_model, lr)
    no_eval.data.eval = []
    with pytest.raises(ConfigError, match="set data.eval or data.eval_fraction"):
        check_space(no_eval)
    with pytest.raises(ConfigError, match="no `tune` section"):
        check_space(make_config(tmp_path, tiny_model, tmp_path / "train.jsonl"))

    monkeypatch.chdir(REPO)
    check_space(load_config(REPO / "jobs" / "configs" / "tune_demo.yaml"))


@pytest.mark.slow
def test_asha_sweep_by_exact_match_stops_weak_trials_and_exports_the_best(tmp_path, tiny_model, ray_local, capfd):
    """Ranked by the answers themselves: at every evaluation each trial generates its 8 held-out
    answers and reports the share that is exact (eval_exact_match); ASHA stops on it and best/ is chosen by it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_ray.tune import format_table, sweep

    # A grid keeps the trial order fixed: the two good learning rates start first (2 CPUs hold
    # 2 one-worker trials), so when a terrible one reaches its first evaluation, a better eval
    # loss is already recorded at that rung and ASHA stops it there.
    space = {"train.learning_rate": {"grid": [*GOOD_FOR_YES, *TERRIBLE]}}
    cfg = _cfg(tmp_path, tiny_model, space, metric="exact_match", rows=YES)
    start = time.time()
    result = sweep(cfg)
    wall = time.time() - start
    out = capfd.readouterr().out
    table = format_table(result["trials"])
    with capfd.disabled():
        print(f"\nsweep of {len(result['trials'])} trials: {wall:.0f}s\n{table}")

    sweep_dir = tmp_path / "storage" / "sweep"
    rows = json.loads((sweep_dir / "results.json").read_text())["trials"]
    assert len(rows) == 4 and {r["trial_id"] for r in rows} == {p.name for p in (sweep_dir / "trials").iterdir()}
    by_lr = {r["params"]["train.learning_rate"]: r for r in rows}
    assert not [r for r in rows if r["status"] == "errored"], [r["error"] for r in rows]
    for lr in TERRIBLE:
        assert by_lr[lr]["status"] == "stopped early" and by_lr[lr]["steps"] < 16, by_lr[lr]
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and all((sweep_dir / "trials" / r["trial_id"] / "final" / "COMPLETE").exists() for r in completed)
    # The console follows the trials: their states as they change, and a line for each that ends.
    states = [x for x in out.splitlines() if re.match(r"sweep: \d+ running · ", x)]
    stopped = len(rows) - len(completed)
    ended = f"{len(completed)} finished · {stopped} stopped early · 0 errored · 0 waiting (4 trials)"
    assert states[-1] == f"sweep: 0 running · {ended}"
    assert any(x.startswith("sweep: 2 running · ") for x in states)
    for r in rows:
        kind = "finished" if r["status"] == "completed" else r["status"]
        lr = r["params"]["train.learning_rate"]
        assert f"sweep: trial {r['trial_id']} {kind} (train.learning_rate={lr}): best exact match " in out
    # Every evaluation reached Tune as it happened (a result per report), not only the last one.
    assert [s for s, _ in completed[0]["eval_loss_history"]] == list(range(2, 17, 2))

    # A stopped trial's record is what it reported before it was killed: its last metrics and a
    # registered checkpoint with the adapter, and no final/.
    for lr in TERRIBLE:
        row = by_lr[lr]
        assert row["last_report"]["step"] == row["steps"] and row["last_report"]["checkpoint_path"]
        assert (Path(row["checkpoint"]) / "adapter_model.safetensors").is_file()
        assert not (sweep_dir / "trials" / row["trial_id"] / "final").exists()

    # The data was prepared once, by the sweep's driver: one cache folder, and one "prepared data"
    # line in everything printed, the trials' output included (Ray forwards it to this driver).
    assert len(list((tmp_path / "storage" / "datasets").iterdir())) == 1
    assert out.count("prepared data: ") == 1, [x for x in out.splitlines() if "prepared data" in x]

    head = "trial_id,train.learning_rate,best_exact_match,best_eval_loss,"
    assert (sweep_dir / "results.csv").read_text().splitlines()[0].startswith(head)
    assert (sweep_dir / "eval_loss.png").stat().st_size > 1000

    # Each row's best is the highest exact-match share its evaluations logged; the weak trials answered nothing right.
    for r in rows:
        logged = [
            json.loads(x) for x in (sweep_dir / "trials" / r["trial_id"] / "metrics.jsonl").read_text().splitlines()
        ]
        shares = [e["eval_exact_match"] for e in logged if "eval_exact_match" in e and e["step"] <= r["steps"]]
        assert r["metric"] == "exact_match" and r["best"] == max(shares), (r, shares)
    assert all(by_lr[lr]["best"] == 0 for lr in TERRIBLE) and all(by_lr[lr]["best"] > 0 for lr in GOOD_FOR_YES)
    best_row = min(rows, key=lambda r: (-r["best"], r["best_eval_loss"]))  # equals: the lower eval loss
    assert result["best_trial"] == best_row["trial_id"] and best_row["params"]["train.learning_rate"] in GOOD_FOR_YES
    best = sweep_dir / "best"
    trial_cfg = yaml.safe_load((best / "config.yaml").read_text())
    assert trial_cfg["train"]["learning_rate"] == best_row["params"]["train.learning_rate"]
    assert trial_cfg["name"] == f"sweep/trials/{best_row['trial_id']}" and trial_cfg["tune"] is None
    assert not (best / "optimizer.pt").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(best))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())


def test_a_second_sweep_driver_of_the_same_name_is_refused(tmp_path, tiny_model):
    from sft_ray.lease import Lease, RunBusy
    from sft_ray.tune import sweep

    cfg = _cfg(tmp_path, tiny_model, {"train.learning_rate": {"grid": list(GOOD)}})
    started = time.time()
    with Lease(str(tmp_path / "storage" / "sweep"), "sweep"):  # the first driver, still running
        with pytest.raises(
            RunBusy, match=f"run sweep is already running: pid {os.getpid()} on host {socket.gethostname()}"
        ):
            sweep(cfg)
    assert time.time() - started < 30  # refused before Ray or the data preparation start
    assert not (tmp_path / "storage" / "sweep" / "tune").exists() and not (tmp_path / "storage" / "datasets").exists()


# -- a sweep driver killed mid-trial, then rerun: real `sft-ray tune` processes -----------------------


def _sweep_driver(cfg_file: Path, out: Path) -> subprocess.Popen:
    """`sft-ray tune` in its own session with its own embedded Ray (daemons and workers in that session)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "sft-ray"), "tune", "--config", str(cfg_file)],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _session(sid: int) -> list[psutil.Process]:
    """Every live process of a session: the driver, its Ray daemons, and Ray's workers (each in its own
    process group, so a signal to the driver's group misses them)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def _kill_session(proc: subprocess.Popen, wait_s: float = 60) -> float:
    """SIGKILL to the driver's process group (a lost terminal, the OOM killer taking it all); returns how
    long the rest of its session (Ray's workers) took to go on its own. Whatever is left is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    start = time.time()
    while (left := _session(proc.pid)) and time.time() - start < wait_s:
        time.sleep(0.2)
    for p in left:
        p.kill()
    return time.time() - start


@pytest.fixture
def drivers():
    """The `sft-ray tune` processes a test starts; any still running at the end are killed with their session."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None or _session(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _kill_session(proc, wait_s=30)


def _registered(run: Path) -> str | None:
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_sweep_resumes_unfinished_trials_from_their_checkpoints(tmp_path, tiny_model, drivers):
    """Before: the resumed trial's evaluations from before the kill were missing from results.json and
    eval_loss.png (Tune restarts the record of a trial it reruns without a Tune checkpoint)."""
    # Two trials at once: a short one and a long one. The driver is killed the moment the short one
    # has written final/ (Tune records trial states every ~10 s, so it likely still counts it
    # running), while the long one is mid-way with registered checkpoints.
    cfg = _cfg(tmp_path, tiny_model, {"train.max_steps": {"grid": [6, 24]}}, learning_rate=3e-3, epochs=4)
    cfg.tune.scheduler.type, cfg.tune.max_concurrent_trials = "fifo", 2
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sweep_dir = tmp_path / "storage" / "sweep"
    trials = sweep_dir / "trials"

    first = _sweep_driver(cfg_file, tmp_path / "first.log")
    drivers.append(first)
    start, end = time.time(), time.time() + 400

    def short_done_long_saved() -> bool:
        # Steps take 0.1 s here and the long trial may start 2 s after the short one: wait for
        # its first registered checkpoint too (a second or so, well inside Tune's ~10 s record).
        ts = list(trials.iterdir()) if trials.exists() else []
        done = [(t / "final" / "COMPLETE").exists() for t in ts]
        return len(ts) == 2 and any(done) and all(d or _registered(t) for d, t in zip(done, ts))

    while not short_done_long_saved():
        assert first.poll() is None and time.time() < end, (tmp_path / "first.log").read_text()[-4000:]
        time.sleep(0.2)
    killed_after = time.time() - start
    gone_s = _kill_session(first)
    short, long_ = sorted(trials.iterdir(), key=lambda t: not (t / "final").exists())
    kept = {p: p.stat().st_mtime_ns for p in [short / "metrics.jsonl", *(short / "final").iterdir()]}
    resume_from = _registered(long_)
    assert resume_from and not (long_ / "final").exists(), (resume_from, (tmp_path / "first.log").read_text()[-4000:])
    step = int(resume_from.removeprefix("checkpoint-"))
    assert 0 < step < 24

    second = _sweep_driver(cfg_file, tmp_path / "second.log")
    drivers.append(second)
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log = (tmp_path / "second.log").read_text()
    with_tune_record = f"{short.name} finished before the sweep was interrupted" not in log
    print(f"\nkilled after {killed_after:.0f}s (session gone {gone_s:.1f}s later), long trial at {resume_from}; "
          f"short trial {'skipped by Tune' if with_tune_record else 'rerun by Tune, kept from final/'}; "
          f"rerun {time.time() - start - killed_after:.0f}s")  # fmt: skip
    assert "took over the lease" in log and f"sweep: resuming {sweep_dir / 'tune'}" in log, log[-4000:]

    # The finished trial was not trained again: its run folder is as the kill left it.
    assert f"resuming sweep/trials/{short.name}" not in log
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert train_steps(short) == list(range(1, 7))
    # The interrupted one went on from its last registered checkpoint: every step trained once.
    assert f"resuming sweep/trials/{long_.name} from {resume_from} (step {step} of 24)" in log, log[-4000:]
    assert train_steps(long_) == list(range(1, 25))
    assert json.loads((long_ / "final" / "metrics.json").read_text())["global_step"] == 24

    # Results and best/ over both trials, with each trial's whole history.
    results = json.loads((sweep_dir / "results.json").read_text())
    rows = {r["trial_id"]: r for r in results["trials"]}
    assert set(rows) == {short.name, long_.name} and {r["status"] for r in rows.values()} == {"completed"}
    assert [s for s, _ in rows[short.name]["eval_loss_history"]] == [2, 4, 6]
    assert [s for s, _ in rows[long_.name]["eval_loss_history"]] == list(range(2, 25, 2))
    best = min(rows.values(), key=lambda r: r["best_eval_loss"])
    assert results["best_trial"] == best["trial_id"]
    trial_cfg = yaml.safe_load((sweep_dir / "best" / "config.yaml").read_text())
    assert trial_cfg["name"] == f"sweep/trials/{best['trial_id']}"
    adapter = (trials / best["trial_id"] / "final" / "adapter_model.safetensors").read_bytes()
    assert (sweep_dir / "best" / "adapter_model.safetensors").read_bytes() == adapter
    assert not (sweep_dir / ".lease.json").exists()
