"""`ray job submit` for real: a two-node Ray cluster on this machine, token authentication on.

The cluster is what `ray start` builds on real machines: a head (GCS, dashboard with the job
server) and a second node that joins it, each a `ray start --block` in its own process session,
so teardown stops exactly these processes. Never `ray stop`: it stops every Ray on the machine,
and this test session's own `ray_local` may be running (two Ray instances on one machine work;
Ray Train then logs "Found multiple active Ray instances", harmless, stack-notes R11).

Each node offers one CPU, as a GPU node offers one GPU: the two Ray Train workers land on different
nodes, and the files rank 1 uploads into a checkpoint come from the second node. Each node has its
own temp dir, as on its own machine. Storage is a folder outside the repository on
the disk both nodes share: the shared storage of a real cluster. The job runs `jobs/sft.py` from
the uploaded working directory with jobs/runtime_env.yaml, and the `python` it names is the
venv's, first on the nodes' PATH (as the image's python is on a real cluster).

Secrets (HF_TOKEN, AWS_SECRET_ACCESS_KEY) are in the environment of the nodes and of the client
only, as on a real cluster; none may end up in storage, job logs or Ray's session logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import train_steps

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv the tests run in: its `ray` and `python`
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CHECKPOINT_FILES = {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                    "rng_state_0.pth", "rng_state_1.pth"}  # fmt: skip


@dataclass
class Cluster:
    address: str  # the job server, as clients pass it to `ray job ...`
    token: str
    env: dict[str, str]  # the nodes' and the clients' environment: token, PATH, planted secrets
    temp_dir: Path  # --temp-dir of the head: Ray's session logs, plus this test's files
    storage: Path  # storage.path of the jobs
    planted: dict[str, str]  # secret name -> value
    nodes: list[subprocess.Popen]  # the live nodes' `ray start --block` processes, the head first
    port: int  # the GCS port, which a joining node dials
    started: list[subprocess.Popen]  # every node this fixture started, lost ones included: teardown stops all


# ---------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(out: Path, env: dict, args: list[str], tmp: Path) -> subprocess.Popen:
    # TMPDIR: the node's local scratch (the workers' HF output_dir), in this test's folder, so the
    # secret scan covers it and it goes away with the folder.
    tmp.mkdir(parents=True)
    env = {**env, "TMPDIR": str(tmp)}
    with open(out, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
             "--object-store-memory", str(400 * 2**20), "--min-worker-port", "0", "--max-worker-port", "0",
             "--dashboard-agent-listen-port", str(_free_port()), "--disable-usage-stats", *args],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait_started(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while "Ray runtime started" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"`ray start` did not start (exit {proc.poll()}):\n{out.read_text()[-3000:]}")
        time.sleep(0.5)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _family(roots: list[subprocess.Popen]) -> tuple[set[int], list[psutil.Process]]:
    """The sessions of the `ray start` processes and of their descendants (job drivers open their
    own), and those descendants: everything these nodes started."""
    procs = []
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(root.pid)
            procs += [p, *p.children(recursive=True)]
    sessions = {root.pid for root in roots} | {s for s in map(_sid, (p.pid for p in procs)) if s}
    return sessions, procs


def _left(sessions: set[int], known: list[psutil.Process]) -> list[psutil.Process]:
    left = {p.pid: p for p in known if _running(p)}
    for p in psutil.process_iter():
        if p.pid not in left and _sid(p.pid) in sessions and _running(p):
            left[p.pid] = p
    return list(left.values())


def _wait_gone(sessions: set[int], known: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    end = time.monotonic() + timeout
    while (left := _left(sessions, known)) and time.monotonic() < end:
        time.sleep(0.5)
    return left


def _stop_cluster(roots: list[subprocess.Popen]) -> None:
    """SIGTERM to each `ray start --block`, the second node first: it drains its node and stops the
    node's processes (a SIGTERM to the whole group would kill the GCS first and make the head wait
    30 s for it). Then SIGKILL to the sessions and to whatever else of theirs is left."""
    sessions, known = _family(roots)
    for root in reversed(roots):
        with contextlib.suppress(ProcessLookupError):
            os.kill(root.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            root.wait(60)
    if _wait_gone(sessions, known, 15):
        for root in roots:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(root.pid, signal.SIGKILL)
        for p in _left(sessions, known):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for root in roots:
            with contextlib.suppress(subprocess.TimeoutExpired):
                root.wait(10)
    left = _wait_gone(sessions, known, 15)
    assert not left, f"Ray processes left behind: {[(p.pid, p.name()) for p in left]}"


@pytest.fixture(scope="module")
def cluster(request):
    # Everything here goes through subprocesses (`ray start`, `ray job ...`): this pytest process
    # connects to nothing, whatever Ray it may hold already (`ray_local` of other test files).
    temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: unix socket paths are limited
    token = secrets.token_hex(32)
    planted = {"HF_TOKEN": f"hf_secret_{secrets.token_hex(12)}", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "HF_"))}
    env.update(planted)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # `ray job stop` waits this long for the driver to stop at a checkpoint before killing it
        # (Ray's default is 3 s: README, "Interrupts").
        RAY_JOB_STOP_WAIT_TIME_S="60",
        AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",  # not 30 s: nothing here needs draining at teardown
    )
    port, dashboard_port = _free_port(), _free_port()
    failed_before = request.session.testsfailed
    roots: list[subprocess.Popen] = []
    try:
        head = ["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
        head += ["--ray-client-server-port", str(_free_port()), "--temp-dir", str(temp_dir)]
        roots.append(_start_node(temp_dir / "head.out", env, head, temp_dir / "tmp"))
        _wait_started(roots[0], temp_dir / "head.out")
        # Its own temp dir, as on another machine: nodes sharing one would share runtime_resources/,
        # and a node unpacking the job's working_dir replaces the folder the driver runs in.
        node = ["--address", f"127.0.0.1:{port}", "--temp-dir", str(temp_dir / "node2")]
        roots.append(_start_node(temp_dir / "node.out", env, node, temp_dir / "node2" / "tmp"))
        _wait_started(roots[1], temp_dir / "node.out")
        storage = temp_dir / "shared" / "runs"
        c = Cluster(
            f"http://127.0.0.1:{dashboard_port}", token, env, temp_dir, storage, planted, list(roots), port, roots
        )
        _wait_job_server(c)
        yield c
    finally:
        _stop_cluster(roots)
        if request.session.testsfailed == failed_before:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"\ntest_jobs: logs and storage kept in {temp_dir}")


def _add_node(c: Cluster, name: str) -> subprocess.Popen:
    """Another one-CPU node joins the cluster, with its own temp dir (another machine)."""
    args = ["--address", f"127.0.0.1:{c.port}", "--temp-dir", str(c.temp_dir / name)]
    node = _start_node(c.temp_dir / f"{name}.out", c.env, args, c.temp_dir / name / "tmp")
    c.started.append(node)  # before the wait: a node that fails to start is stopped at teardown too
    _wait_started(node, c.temp_dir / f"{name}.out")
    c.nodes.append(node)
    return node


def _lose_node(c: Cluster, node: subprocess.Popen) -> None:
    """The machine is gone: SIGKILL to every process of the node's session at once (its raylet, its
    workers, each in its own process group), no draining. Waits until none is left."""
    c.nodes.remove(node)
    sessions, known = _family([node])
    for p in _left(sessions, known):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    node.wait(30)
    left = _wait_gone(sessions, known, 30)
    assert not left, [(p.pid, p.name()) for p in left]


def _ensure_two_nodes(c: Cluster) -> None:
    """What the module's other tests expect: the head and one more node, both alive in Ray."""
    while len(c.nodes) < 2:
        _add_node(c, f"node{len(c.started) + 1}")
    end = time.monotonic() + 120
    while len(_state(c, "nodes", "state=ALIVE")) != len(c.nodes):  # a lost node is declared dead after ~30 s
        assert time.monotonic() < end, _state(c, "nodes")
        time.sleep(2)


# ---------------------------------------------------------------- clients


def _api(c: Cluster, path: str) -> dict:
    """The job server's REST API (what `ray job status/logs` call), with the token."""
    req = urllib.request.Request(c.address + path, headers={"Authorization": f"Bearer {c.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_job_server(c: Cluster, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            _api(c, "/api/jobs/")
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def _ray(c: Cluster, *args: str, timeout: float = 120) -> str:
    r = subprocess.run([str(BIN / "ray"), *args], env=c.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"ray {' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _state(c: Cluster, kind: str, *filters: str) -> list[dict]:
    """`ray list KIND` (Ray's state API) as JSON."""
    args = ["list", kind, "--address", c.address, "--format", "json", "--detail", "--limit", "10000"]
    out = _ray(c, *args, *(a for f in filters for a in ("--filter", f)))
    return json.loads(out[out.index("[") : out.rindex("]") + 1]) if "[" in out else []  # none: no JSON


def _submit(
    c: Cluster, job: str, config: Path, *overrides: str, runtime_env: Path = RUNTIME_ENV, script: str = "jobs/sft.py"
) -> None:
    _ray(c, "job", "submit", "--address", c.address, "--submission-id", job, "--working-dir", str(REPO),
         "--runtime-env", str(runtime_env), "--no-wait",
         "--", "python", script, "--config", str(config), *overrides)  # fmt: skip


def _logs(c: Cluster, job: str) -> str:
    return _api(c, f"/api/jobs/{job}/logs")["logs"]


def _wait_status(c: Cluster, job: str, want: str, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while True:
        info = _api(c, f"/api/jobs/{job}")
        if info["status"] == want:
            return info
        if info["status"] in TERMINAL or time.monotonic() > end:
            raise AssertionError(
                f"job {job} is {info['status']} ({info.get('message')}), not {want}:\n{_logs(c, job)[-6000:]}"
            )
        time.sleep(1)


def _wait_actors_gone(c: Cluster, job_id: str, timeout: float = 60) -> None:
    """After a stop: every actor of the job is dead, so nothing writes to its run folder any more."""
    end = time.monotonic() + timeout
    # Detached actors (Ray Data's _StatsActor, autoscaling coordinator...) outlive the job that
    # happened to create them first, by design; they write nothing into a run folder.
    while alive := [a for a in _state(c, "actors", f"job_id={job_id}", "state!=DEAD") if not a["is_detached"]]:
        assert time.monotonic() < end, f"actors of job {job_id} still alive: {[a['class_name'] for a in alive]}"
        time.sleep(1)


def _assert_locked_down(c: Cluster) -> None:
    """Token authentication is on, and the job server listens on the loopback interface only."""
    for headers in ({}, {"Authorization": f"Bearer {'0' * 64}"}):  # no token, a wrong one
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(c.address + "/api/jobs/", headers=headers), timeout=30)
        assert refused.value.code in (401, 403), refused.value
    port = int(c.address.rsplit(":", 1)[1])
    listening = {s.laddr.ip for s in psutil.net_connections("tcp") if s.status == "LISTEN" and s.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening


def _job_processes(c: Cluster) -> dict[str, list[psutil.Process]]:
    """The running job's driver (`python jobs/sft.py`) and Ray Train workers, by process title."""
    on_nodes = _training_nodes(c).values()
    return {kind: [p for procs in on_nodes for p in procs[kind]] for kind in ("driver", "workers")}


def _training_nodes(c: Cluster) -> dict[subprocess.Popen, dict[str, list[psutil.Process]]]:
    """Per live node: the job driver and the Ray Train workers among its processes."""
    found = {}
    for node in c.nodes:
        procs: dict[str, list[psutil.Process]] = {"driver": [], "workers": []}
        for p in psutil.Process(node.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                if cmd[1:2] == ["jobs/sft.py"]:  # not the `sh -c` Ray wraps the entrypoint in
                    procs["driver"].append(p)
                elif cmd[0].startswith("ray::RayTrainWorker"):
                    procs["workers"].append(p)
        found[node] = procs
    return found


# ---------------------------------------------------------------- runs


def _config(c: Cluster, tiny_model: Path) -> Path:
    """jobs/configs/demo.yaml on the tiny model, with storage outside the repository. The data path
    stays relative: it resolves in the job's working directory, the uploaded copy of the repository.

    Eval rows are carved from the train file instead of read from eval.jsonl: with one file, Ray
    Data runs one tokenizer actor (half a CPU) and the read task finds a whole CPU on the other
    node. With two files, one actor lands on each one-CPU node and the read task, which asks for
    a whole CPU, never starts (a hang in sft_ray.data.pipeline._encoded_rows).
    """
    tree = yaml.safe_load((REPO / "jobs" / "configs" / "demo.yaml").read_text())
    tree["model"]["path"] = str(tiny_model)
    tree["storage"]["path"] = str(c.storage)
    tree["data"].update(eval=[], eval_fraction=0.1)
    tree["train"].update(epochs=1, logging_steps=1, samples=1)
    path = c.temp_dir / "demo-tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _latest_checkpoint(run: Path) -> str | None:
    """The newest checkpoint Ray Train registered (what a rerun resumes from), or None."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def _assert_no_secrets(c: Cluster, jobs: list[str]) -> None:
    """Neither planted secret in storage, Ray's session logs, the job logs or the job records."""
    hits = []
    for path in c.temp_dir.rglob("*"):  # storage, session logs, `ray start` output
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [f"{name} in {path}" for name, value in c.planted.items() if value.encode() in data]
    for job in jobs:
        for where, text in (("logs", _logs(c, job)), ("record", json.dumps(_api(c, f"/api/jobs/{job}")))):
            hits += [f"{name} in the {where} of job {job}" for name, value in c.planted.items() if value in text]
    assert not hits, "\n".join(hits)


def test_runtime_env_is_valid_and_holds_no_secrets():
    from ray.runtime_env import RuntimeEnv

    tree = yaml.safe_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**tree)  # Ray's own validation: known fields, env_vars all strings
    secret_like = [k for k in tree["env_vars"] if {"TOKEN", "SECRET", "KEY", "PASSWORD"} & set(k.split("_"))]
    assert not secret_like, f"{RUNTIME_ENV}: secrets come from the nodes' environment, not here: {secret_like}"
    assert tree["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # stack-notes R12


@pytest.mark.slow
def test_stopped_job_resumes_from_its_last_checkpoint(cluster, tiny_model):
    """One demo run, stopped and resubmitted, then evaluated: a job on two nodes into shared storage,
    its resume, its final/, and `sft-ray eval` as a job on the same cluster."""
    nodes = _state(cluster, "nodes", "state=ALIVE")
    assert len(nodes) == 2 and sum(n["is_head_node"] for n in nodes) == 1
    _assert_locked_down(cluster)
    config = _config(cluster, tiny_model)
    args = ["name=jobs-resume", "train.max_steps=150", "train.save_steps=10", "train.eval_steps=50", "train.samples=0"]
    run = cluster.storage / "jobs-resume"

    _submit(cluster, "resume-1", config, *args)
    end = time.monotonic() + 360
    while _latest_checkpoint(run) is None:
        info = _api(cluster, "/api/jobs/resume-1")
        assert info["status"] not in TERMINAL and time.monotonic() < end, (info, _logs(cluster, "resume-1")[-6000:])
        time.sleep(0.5)
    # The secrets reached the job through the nodes' environment (so the scan at the end means
    # something), and so did jobs/runtime_env.yaml: the driver and both training workers hold both.
    procs = _job_processes(cluster)
    assert len(procs["driver"]) == 1 and len(procs["workers"]) == 2, procs
    want = {**cluster.planted, **yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]}
    for p in procs["driver"] + procs["workers"]:
        env = p.environ()
        assert {k: env.get(k) for k in want} == want, p.cmdline()[:2]
    _ray(cluster, "job", "stop", "--address", cluster.address, "resume-1")
    info = _wait_status(cluster, "resume-1", "STOPPED", timeout=60)
    _wait_actors_gone(cluster, info["job_id"])

    # The driver got SIGTERM, had the workers save at the step they were at, and said so.
    resume_from = _latest_checkpoint(run)
    step = int(resume_from.removeprefix("checkpoint-"))
    before = train_steps(run)
    assert not (run / "final").exists() and before == list(range(1, step + 1)), (resume_from, before)
    stopped = f"interrupted at step {step}; rerun the same command to resume from {resume_from}"
    assert stopped in _logs(cluster, "resume-1"), _logs(cluster, "resume-1")[-3000:]

    _submit(cluster, "resume-2", config, *args)
    info = _wait_status(cluster, "resume-2", "SUCCEEDED", timeout=360)
    logs = _logs(cluster, "resume-2")
    assert f"resuming jobs-resume from {resume_from} (step {step} of 150)" in logs
    assert "=== sft-ray result ===" in logs and "steps 150," in logs
    # The two Ray Train workers of this job ran on the two nodes.
    workers = _state(cluster, "actors", "class_name=RayTrainWorker", f"job_id={info['job_id']}")
    assert len({w["node_id"] for w in workers}) == 2, workers
    # The rerun continued right after that checkpoint, ended at max_steps, and logged each step once.
    assert train_steps(run) == list(range(1, 151))
    final = run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml", "metrics.json",
            "COMPLETE"} <= {p.name for p in final.iterdir()}  # fmt: skip
    assert json.loads((final / "metrics.json").read_text())["global_step"] == 150
    resolved = yaml.safe_load((final / "config.yaml").read_text())
    assert resolved["model"]["path"] == str(tiny_model) and resolved["train"]["max_steps"] == 150
    assert Path(resolved["data"]["train"][0]["path"]).name == "train.jsonl"  # from the uploaded working dir
    assert CHECKPOINT_FILES <= {p.name for p in (run / "checkpoint-0000150").iterdir()}
    assert _latest_checkpoint(run) == "checkpoint-0000150"
    assert list((cluster.storage / "datasets").glob("*/manifest.json"))

    # The finished run evaluated as a job (jobs/eval.py): base against tuned on the demo's 60
    # held-out rows (the config carves its eval rows from train, so they come with --data), on a
    # pool of two model replicas, one per node.
    _submit(cluster, "eval-1", config, "--data", "jobs/data/demo/eval.jsonl", args[0], "eval.max_new_tokens=16",
            script="jobs/eval.py")  # fmt: skip
    info = _wait_status(cluster, "eval-1", "SUCCEEDED", timeout=300)
    assert "=== sft-ray eval: eval (60 examples, held out) ===" in _logs(cluster, "eval-1")
    summary = json.loads((run / "eval" / "eval" / "summary.json").read_text())
    assert summary["examples"] == 60 and summary["source"].endswith("jobs/data/demo/eval.jsonl")
    assert summary["base"]["exact_match"] == 0 and summary["tuned"]["exact_match"] >= 0.9, summary
    replicas = _state(cluster, "actors", "class_name=MapWorker(MapBatches(Replica))", f"job_id={info['job_id']}")
    assert len(replicas) == 2 and len({a["node_id"] for a in replicas}) == 2, replicas
    assert len(summary["replicas"]) == 2  # both answered
    rows = [json.loads(x) for x in (run / "eval" / "eval" / "examples.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(60))
    held_out = [json.loads(x) for x in (REPO / "jobs" / "data" / "demo" / "eval.jsonl").read_text().splitlines()]
    assert all(r["reference"].startswith(held_out[r["index"]]["output"]) for r in rows)
    assert all(held_out[r["index"]]["input"] in r["prompt"] for r in rows)
    _assert_no_secrets(cluster, ["resume-1", "resume-2", "eval-1"])


# ---------------------------------------------------------------- a node lost mid-run


def _logged(run: Path) -> dict[int, float]:
    """When each training step was logged (metrics.jsonl keeps one line per step across restarts)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["time"] for r in lines if "loss" in r}


def _lose_a_worker_node(c: Cluster, job: str, run: Path) -> tuple[int, float]:
    """Once the run has registered a checkpoint: lose a node other than the head (where the job's
    driver runs) that holds a training worker. Returns the checkpoint's step and when the node went."""
    end = time.monotonic() + 360
    while _latest_checkpoint(run) is None:
        info = _api(c, f"/api/jobs/{job}")
        assert info["status"] not in TERMINAL and time.monotonic() < end, (info, _logs(c, job)[-6000:])
        time.sleep(0.5)
    step = int(_latest_checkpoint(run).removeprefix("checkpoint-"))
    where = _training_nodes(c)
    assert [len(where[n]["driver"]) for n in c.nodes] == [1] + [0] * (len(c.nodes) - 1), where
    assert sum(len(w["workers"]) for w in where.values()) == 2, where
    victim = next(n for n in c.nodes[1:] if where[n]["workers"])
    lost_at = time.time()
    _lose_node(c, victim)
    return step, lost_at


def _loss_args(name: str) -> list[str]:
    return [f"name={name}", "train.max_steps=60", "train.save_steps=10", "train.eval_steps=1000",
            "train.samples=0", "train.max_failures=1"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lost_node_with_a_spare_node_left_the_run_finishes_from_its_checkpoint(cluster, tiny_model):
    """A third node is there: after the loss, the head and the node left hold both workers again."""
    c = cluster
    try:
        _add_node(c, "spare")
        run = c.storage / "jobs-node-loss"
        _submit(c, "loss-1", _config(c, tiny_model), *_loss_args("jobs-node-loss"))
        checkpointed, lost_at = _lose_a_worker_node(c, "loss-1", run)
        start = time.time()
        _wait_status(c, "loss-1", "SUCCEEDED", timeout=420)
        recovered_s = time.time() - start

        # Nothing trained twice that a checkpoint kept: the steps logged before the loss run up to a
        # checkpoint at or after the one seen then, every later step was logged after the loss, once.
        logged = _logged(run)
        assert sorted(logged) == list(range(1, 61)), sorted(logged)
        kept = max(s for s, t in logged.items() if t < lost_at)
        assert kept >= checkpointed and kept % 10 == 0, (kept, checkpointed)
        assert all(t > lost_at for s, t in logged.items() if s > kept)
        final = json.loads((run / "final" / "metrics.json").read_text())
        assert final["global_step"] == 60 and (run / "final" / "COMPLETE").exists()
        assert _latest_checkpoint(run) == "checkpoint-0000060"
        print(f"\nnode lost after checkpoint {checkpointed}; resumed from step {kept}; done {recovered_s:.0f}s later")
    finally:
        _ensure_two_nodes(c)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lost_node_without_a_spare_fails_the_job_naming_the_resources(cluster, tiny_model):
    """One CPU per node: after the loss the head alone cannot hold 2 workers. Ray Train retries a worker
    group it cannot place every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, by default for ever: the job
    must fail, within a bounded time, saying what it needs and what is left."""
    c = cluster
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["env_vars"].update(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15", SFT_RAY_PLACEMENT_WAIT_S="30")
    runtime_env = c.temp_dir / "runtime_env_short_wait.yaml"
    runtime_env.write_text(yaml.safe_dump(env))
    try:
        run = c.storage / "jobs-node-lost"
        _submit(c, "loss-2", _config(c, tiny_model), *_loss_args("jobs-node-lost"), runtime_env=runtime_env)
        checkpointed, lost_at = _lose_a_worker_node(c, "loss-2", run)
        _wait_status(c, "loss-2", "FAILED", timeout=150)
        failed_s = time.time() - lost_at
        logs = _logs(c, "loss-2")
        # What it needs, what is left, what to do; after (the loss's detection and) two 15 s tries.
        said = ["scaling.num_workers=2 workers need 1 CPU each", "1 live node(s) have 1 CPU in all", "Add nodes"]
        assert all(x in logs for x in said), logs[-4000:]
        assert "sft-ray: scaling.num_workers=2" in logs  # one line, not a traceback
        assert failed_s < 150, failed_s
        assert not (run / "final").exists() and _latest_checkpoint(run) is not None
        print(f"\nnode lost after checkpoint {checkpointed}; the job failed {failed_s:.0f}s later")
    finally:
        with contextlib.suppress(Exception):
            if _api(c, "/api/jobs/loss-2")["status"] not in TERMINAL:
                _ray(c, "job", "stop", "--address", c.address, "loss-2")
                _wait_actors_gone(c, _wait_status(c, "loss-2", "STOPPED", timeout=120)["job_id"])
        _ensure_two_nodes(c)
