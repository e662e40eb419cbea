"""Shared fixtures: one tiny offline model and one real local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sft_ray.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from sft_ray.model import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="session")
def ray_local():
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


def make_config(tmp_path: Path, model: Path, train_file: Path, eval_file: Path | None = None, **sections):
    """A valid config tree for tests: tiny model, given data, storage under tmp_path."""
    from sft_ray.config import validate

    tree = {
        "name": "t",
        "model": {"path": str(model), "dtype": "float32"},
        "data": {
            "train": [{"path": str(train_file), "format": "instruction"}],
            "eval": [{"path": str(eval_file), "format": "instruction"}] if eval_file else [],
            "max_length": 128,
        },
        "storage": {"path": str(tmp_path / "storage")},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return validate(tree)
