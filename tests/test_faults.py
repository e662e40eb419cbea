"""Faults a real cluster throws: damaged checkpoints, an unreadable checkpoint list, two drivers with
one name, an oversized batch. One trained run (2 CPU workers, checkpoints at steps 2, 4 and 6) is
shared; each test damages its own copy."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import train_steps, two_worker_config

ROWS = [{"question": f"What is {i} plus one?", "output": f"{i + 1}"} for i in range(48)]


def _cfg(tmp_path, tiny_model, storage, name="run", **train):
    train = {"max_steps": 6, "eval_steps": 2, "save_steps": 2, **train}
    cfg = two_worker_config(tmp_path, tiny_model, ROWS, name, **train)
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"path": str(storage)})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, ray_local):
    """A finished 6-step run; tests copy its folder (checkpoints, list, metrics) into their own storage."""
    from sft_ray.train.driver import train

    tmp = tmp_path_factory.mktemp("trained")
    summary = train(_cfg(tmp, tiny_model, tmp / "storage"))
    assert summary["global_step"] == 6
    return tmp / "storage" / "run"


def _copy(trained, tmp_path):
    storage = tmp_path / "storage"
    shutil.copytree(trained, storage / "run", ignore=shutil.ignore_patterns("final"))
    return storage, storage / "run"


def test_checkpoints_of_a_trained_run_verify(trained):
    from sft_ray.train.checkpoints import verify

    assert sorted(p.name for p in trained.glob("checkpoint-*")) == [f"checkpoint-000000{s}" for s in (2, 4, 6)]
    assert [verify(str(trained / f"checkpoint-000000{s}"), world=2) for s in (2, 4, 6)] == [2, 4, 6]


def test_missing_optimizer_is_set_aside_and_the_previous_checkpoint_used(trained, tmp_path):
    """Deleting the latest optimizer.pt resumed silently with a fresh optimizer before."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    from sft_ray.train.checkpoints import resume_point

    _, run = _copy(trained, tmp_path)
    (run / "checkpoint-0000006" / "optimizer.pt").unlink()
    said: list[str] = []
    assert resume_point(str(run), 2, said.append) == ("checkpoint-0000004", 4)
    assert len(said) == 1 and "checkpoint-0000006/optimizer.pt: missing" in said[0], said
    assert "resuming from checkpoint-0000004" in said[0]
    assert not (run / "checkpoint-0000006").exists() and len(list(run.glob("checkpoint-0000006.damaged-*"))) == 1
    snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    _CheckpointManagerState.parse_obj(snap)  # still Ray's format
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint-0000004"
    kept = [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]
    assert kept == ["checkpoint-0000002", "checkpoint-0000004"]
    # A sound list is left as it is.
    before = (run / "checkpoint_manager_snapshot.json").read_bytes()
    assert resume_point(str(run), 2, said.append) == ("checkpoint-0000004", 4) and len(said) == 1
    assert (run / "checkpoint_manager_snapshot.json").read_bytes() == before


def test_damaged_checkpoint_on_s3_is_removed_and_the_previous_one_used(trained, tmp_path, s3_bucket):
    """The same checks through the storage layer on an S3-protocol server (moto): no rename there,
    so the damaged checkpoint is removed rather than moved aside."""
    import pyarrow.fs as pafs

    from sft_ray import storage
    from sft_ray.train.checkpoints import resume_point

    _, run = _copy(trained, tmp_path)
    adapter = run / "checkpoint-0000006" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])
    uri = f"s3://{s3_bucket}/runs/run"
    fs, path = storage.filesystem(uri)
    pafs.copy_files(str(run), path, destination_filesystem=fs)
    said: list[str] = []
    assert resume_point(uri, 2, said.append) == ("checkpoint-0000004", 4)
    assert "checkpoint-0000006/adapter_model.safetensors: truncated" in said[0] and "removed" in said[0], said
    assert not storage.exists(f"{uri}/checkpoint-0000006")
    assert storage.read_json(f"{uri}/checkpoint_manager_snapshot.json")["latest_checkpoint_result"] == {
        "version": 0,
        "checkpoint_dir_name": "checkpoint-0000004",
        "metrics": json.loads((run / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"][1][
            "metrics"
        ],
    }


@pytest.mark.parametrize(
    "damage,why",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "adapter_model.safetensors: truncated"),
        (lambda p: p.write_bytes(b""), "adapter_model.safetensors: empty"),
        (lambda p: (p.parent / "trainer_state.json").write_text("{half"), "trainer_state.json: not valid JSON"),
        (lambda p: (p.parent / "rng_state_1.pth").unlink(), "rng_state_1.pth: missing"),
        (
            lambda p: (p.parent / "scheduler.pt").write_bytes((p.parent / "scheduler.pt").read_bytes()[:50]),
            "scheduler.pt: unreadable",
        ),
    ],
)
def test_each_damaged_file_is_named(trained, tmp_path, damage, why):
    from sft_ray.train.checkpoints import Damaged, verify

    _, run = _copy(trained, tmp_path)
    damage(run / "checkpoint-0000006" / "adapter_model.safetensors")
    with pytest.raises(Damaged, match=why.replace(".", r"\.")):
        verify(str(run / "checkpoint-0000006"), world=2)


@pytest.mark.slow
def test_unreadable_list_and_truncated_adapter_resume_from_the_last_whole_checkpoint(
    trained, tmp_path, tiny_model, capsys
):
    """An empty checkpoint list (a full disk) failed every rerun with CheckpointManagerInitializationError,
    and a truncated adapter with a raw SafetensorError. Now: rebuilt, resumed, one line per step."""
    from sft_ray.train.driver import train

    storage, run = _copy(trained, tmp_path)
    (run / "checkpoint_manager_snapshot.json").write_bytes(b"")
    adapter = run / "checkpoint-0000006" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    summary = train(_cfg(tmp_path, tiny_model, storage, max_steps=8))
    out = capsys.readouterr().out
    assert "checkpoint_manager_snapshot.json is unreadable" in out, out
    assert "checkpoint-0000006/adapter_model.safetensors: truncated" in out
    assert "resuming run from checkpoint-0000004 (step 4 of 8)" in out
    assert summary["global_step"] == 8
    # Steps 5 and 6 were logged by the first run and again by this one: the file keeps one line each.
    assert train_steps(run) == list(range(1, 9))
    assert (run / "final" / "COMPLETE").exists()


@pytest.mark.slow
def test_full_disk_names_the_path_and_the_rerun_resumes(tmp_path, tiny_model, ray_local):
    """On a 400 KB filesystem the run failed with a bare `[Errno 28]` and left a 0-byte checkpoint list
    that made every rerun fail, even after space was freed."""
    from sft_ray.train.driver import train

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        cfg = _cfg(tmp_path, tiny_model, disk)
        with pytest.raises(Exception) as err:
            train(cfg)
        message = str(err.value)
        assert "No space left on device" in message and str(disk) in message, message
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        summary = train(cfg)
        assert summary["global_step"] == 6
        assert train_steps(disk / "run") == list(range(1, 7))
        assert not list(disk.rglob("*.tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_oversized_batch_is_refused_before_any_worker_starts(trained, tmp_path, tiny_model):
    """per_device_batch_size=100000 on 48 rows appended 99,976 filler rows per worker and ran the node out of memory."""
    from sft_ray.train.driver import train

    cfg = _cfg(tmp_path, tiny_model, tmp_path / "storage", per_device_batch_size=100000)
    started = time.time()
    refused = r"train.per_device_batch_size=100000 is larger than the 24 rows each of the 2 workers"
    with pytest.raises(ValueError, match=refused):
        train(cfg)
    assert time.time() - started < 60
    assert not list((tmp_path / "storage" / "run").glob("checkpoint-*"))


def test_model_limits_and_a_broken_model_are_refused_before_any_worker(trained, tmp_path, tiny_model, capsys):
    """A model that cannot load failed inside every worker after start-up when the preparation was
    reused (it needs no tokenizer); a max_length beyond the model's positions was never checked."""
    from sft_ray.data.pipeline import DataError, prepare

    storage = trained.parent  # the trained run's preparation is there
    cfg = _cfg(tmp_path, tiny_model, storage)
    long = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": 4096})})
    with pytest.raises(DataError, match=r"data.max_length=4096 is beyond the 2048 positions of "):
        prepare(long)
    # Same tokenizer files, so the same preparation, which is reused; the model's config is broken.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{")
    capsys.readouterr()
    # (transformers reads config.json for the tokenizer too: either load names it)
    with pytest.raises(DataError, match=f"model.path: cannot load .* from {broken}.*config.json"):
        prepare(_cfg(tmp_path, broken, storage))
    (broken / "config.json").write_text((tiny_model / "config.json").read_text())
    prepare(_cfg(tmp_path, broken, storage))
    assert "prepared data: reusing" in capsys.readouterr().out
    (broken / "tokenizer.json").write_text("{")
    with pytest.raises(DataError, match=f"model.path: cannot load a tokenizer from {broken}"):
        prepare(_cfg(tmp_path, broken, storage))


# -- one driver per name ------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_driver_of_the_same_name_is_refused_with_the_owner(tmp_path):
    from sft_ray.lease import Lease, RunBusy

    run = str(tmp_path / "storage" / "run")
    with Lease(run, "run"):
        with pytest.raises(RunBusy) as err:
            Lease(run, "run").acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(err.value)
        assert "run run is already running" in str(err.value)
    with Lease(run, "run"):  # released: free again
        pass
    assert not os.path.exists(os.path.join(run, ".lease.json"))


def test_a_stale_lease_is_taken_over(tmp_path, capsys):
    from sft_ray import lease
    from sft_ray.lease import Lease, RunBusy

    run = tmp_path / "run"
    run.mkdir()
    path = run / ".lease.json"
    now = time.time()
    here = {"host": socket.gethostname(), "started": now, "heartbeat": now, "token": "x"}
    # Same host, its pid gone: taken over at once.
    path.write_text(json.dumps({**here, "pid": _dead_pid()}))
    with Lease(str(run), "run") as held:
        assert json.loads(path.read_text())["token"] == held.record["token"]
    assert "whose driver is gone" in capsys.readouterr().out
    # Another host: alive while its heartbeat is fresh, stale after STALE_S without one.
    path.write_text(json.dumps({**here, "host": "elsewhere", "pid": 1}))
    with pytest.raises(RunBusy, match="pid 1 on host elsewhere"):
        Lease(str(run), "run").acquire()
    old = now - lease.STALE_S - 5
    path.write_text(json.dumps({**here, "host": "elsewhere", "pid": 1, "heartbeat": old}))
    with Lease(str(run), "run"):
        pass


def test_lease_on_s3(s3_bucket, monkeypatch):
    from sft_ray import lease
    from sft_ray.lease import Lease, RunBusy

    monkeypatch.setattr(lease, "SETTLE_S", 0.2)
    run = f"s3://{s3_bucket}/runs/run"
    with Lease(run, "run"):
        with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):
            Lease(run, "run").acquire()
    with Lease(run, "run"):
        pass


# -- interrupts, a second driver, another Ray on the machine: real `sft-ray train` processes -----


def _driver(cfg_file, out, *overrides):
    """`sft-ray train` in its own session (its own embedded Ray: the test session's Ray is the other
    instance on the machine), as a terminal would run it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "sft-ray"), "train", "--config", str(cfg_file), *overrides],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _wait_for(cond, proc, out, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited with {proc.returncode}:\n{out.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out:\n{out.read_text()[-3000:]}")


def _checkpoints(run) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if p.name.split("-")[1].isdigit())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_signals_stop_at_a_checkpoint_and_a_second_driver_is_refused(tmp_path, tiny_model, ray_local):
    import yaml

    cfg = _cfg(tmp_path, tiny_model, tmp_path / "storage", max_steps=400, save_steps=10, eval_steps=1000)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run = tmp_path / "storage" / "run"

    # 1. SIGTERM (a spot node's notice, `ray job stop`) once training has begun; meanwhile a second
    #    driver of the same name is refused, naming the first.
    first = _driver(cfg_file, tmp_path / "first.log")
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(train_steps(run)) >= 3, first, tmp_path / "first.log")
    second = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "sft-ray"), "train", "--config", str(cfg_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1
    assert f"run run is already running: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(timeout=180) == 143
    log = (tmp_path / "first.log").read_text()
    stopped = max(train_steps(run))
    assert f"interrupted at step {stopped}; rerun the same command to resume from checkpoint-{stopped:07d}" in log, log
    assert "Found multiple active Ray instances" not in log
    assert _checkpoints(run)[-1] == stopped  # saved at the step it stopped, not at the last save interval
    assert not (run / "final").exists()

    # 2. Ctrl-C in a terminal: SIGINT to the driver's whole process group.
    again = _driver(cfg_file, tmp_path / "again.log")
    _wait_for(lambda: max(train_steps(run)) >= stopped + 3, again, tmp_path / "again.log")
    os.killpg(again.pid, signal.SIGINT)
    assert again.wait(timeout=180) == 130
    log = (tmp_path / "again.log").read_text()
    assert f"resuming run from checkpoint-{stopped:07d} (step {stopped} of 400)" in log, log
    second_stop = max(train_steps(run))
    assert f"interrupted at step {second_stop}; rerun the same command" in log, log
    # Every step trained once so far, across both drivers, and the lease is given back. (That a
    # rerun then finishes with every step logged once: test_jobs' stopped job, test_train_resume.)
    assert train_steps(run) == list(range(1, second_stop + 1))
    assert _checkpoints(run)[-1] == second_stop and not (run / ".lease.json").exists()
