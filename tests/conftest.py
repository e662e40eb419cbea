"""Shared fixtures: one tiny offline model and one real local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray Train's controller looks at its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so
# each run waits up to that long to see its worker group started, and again to see it finished.
# Tests run dozens of short runs: at 0.5 s a 4-step 2-worker run took 20-28 s instead of 26-35 s
# (measured 2026-12-02). Set before any Ray starts, so the session's Ray, test_jobs' cluster and
# the drivers started as subprocesses all inherit it. Users keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
        # `ray`: starts the session's embedded Ray, asked for directly or through another fixture
        # (`make test-fast` leaves these out; `make test` runs them).
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sft_ray.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from sft_ray.model import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1; credentials and endpoint reach Ray's
    workers through the environment, as on a real cluster, so it starts before Ray does."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    import boto3

    name = "sft-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One embedded Ray for the whole session, started and stopped here and nowhere else."""
    os.environ.pop("RAY_ADDRESS", None)  # never reach a cluster the developer happens to have
    import ray

    from sft_ray.ray_runtime import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_config(tmp_path: Path, model: Path, train_file, eval_file=None, **sections):
    """A valid config tree for tests: tiny model, given data (paths or source dicts), storage under tmp_path."""
    from sft_ray.config import validate

    def sources(x):
        items = x if isinstance(x, list) else [x]
        return [i if isinstance(i, dict) else {"path": str(i), "format": "instruction"} for i in items]

    tree = {
        "name": "t",
        "model": {"path": str(model), "dtype": "float32"},
        "data": {
            "train": sources(train_file),
            "eval": sources(eval_file) if eval_file else [],
            "max_length": 128,
        },
        "storage": {"path": str(tmp_path / "storage")},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return validate(tree)


def train_steps(run: Path) -> list[int]:
    """The steps of a run's metrics.jsonl that logged a training loss, in file order."""
    import json

    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def two_worker_config(tmp_path: Path, model: Path, rows: list, name: str, **train):
    """A 2-worker run on `rows` (the first 8 also held out) with settings that make resume exact:
    no LoRA dropout, a log line per step, no sample generations; `train` overrides the rest."""
    return make_config(
        tmp_path,
        model,
        write_jsonl(tmp_path / "train.jsonl", rows),
        write_jsonl(tmp_path / "eval.jsonl", rows[:8]),
        name=name,
        lora={"dropout": 0.0},
        train={"per_device_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1, "samples": 0, **train},
        scaling={"num_workers": 2},
        storage={"keep_checkpoints": 3},
    )
