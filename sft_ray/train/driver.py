"""The driver side of training: prepare (or reuse) the data, then run a Ray Train TorchTrainer.

Light on purpose: no torch or transformers import here; those happen in the workers.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data.pipeline import check_sources, prepare
from sft_ray.ray_runtime import ensure_ray
from sft_ray.train.final import run_dir, stored_config, stored_summary

# A split up to this size is read by the driver itself: Ray Data's read tasks take 10-20 s to
# start on a fresh cluster (measured: 18 s against 0.3-2.7 s for the demo's 125 KiB).
DRIVER_READ_BYTES = 64 << 20


def _read_split(prepared: str, split: str, manifest: dict):
    import pyarrow.parquet as pq
    import ray

    if manifest["splits"][split]["rows_written"] == 0:
        return None
    fs, path = storage.filesystem(storage.join(prepared, split))
    files = sorted((i.path, i.size) for i in fs.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet"))
    if sum(size for _, size in files) <= DRIVER_READ_BYTES:
        return ray.data.from_arrow([pq.read_table(f, filesystem=fs) for f, _ in files])
    # Materialized before fit(): a lazy read would wait forever for CPUs the workers hold (stack-notes §8.5).
    return ray.data.read_parquet([f for f, _ in files], filesystem=fs).materialize()


def _check_resources(cfg: Config) -> None:
    import ray

    have = ray.cluster_resources()
    kind = "GPU" if cfg.scaling.use_gpu else "CPU"
    if have.get(kind, 0) < cfg.scaling.num_workers:
        raise RuntimeError(
            f"scaling.num_workers={cfg.scaling.num_workers} needs {cfg.scaling.num_workers} {kind}s, "
            f"but this local Ray has {have.get(kind, 0):g}; lower scaling.num_workers"
        )


def _fault_injection() -> dict:
    """`SFT_RAY_FAIL_AT_STEP=STEP[:RANK]` kills that worker once at that step (failure tests)."""
    spec = os.environ.get("SFT_RAY_FAIL_AT_STEP")
    if not spec:
        return {}
    step, _, rank = spec.partition(":")
    return {"step": int(step), "rank": int(rank or 0)}


def load_splits(prepared: str, manifest: dict) -> dict:
    """The prepared splits as materialized Ray Datasets, read once and shared by every run that trains on them."""
    import ray

    # Blocks in file order on every read, or a resumed run would skip other rows than it trained.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    datasets = {"train": _read_split(prepared, "train", manifest)}
    if (eval_ds := _read_split(prepared, "eval", manifest)) is not None:
        datasets["eval"] = eval_ds
    return datasets


def fit(
    cfg: Config,
    datasets: dict,
    manifest: dict,
    worker_cpus: float = 1,
    callbacks: list | None = None,
    async_upload: bool = True,
):
    """One Ray Train run on already prepared data; returns the Ray Train Result.

    A sweep calls it once per trial with the same datasets, fewer CPUs per worker so that all
    concurrent trials fit, Tune's report callback, and synchronous uploads: then a worker's report
    waits until Tune has taken the one before, so a trial that ASHA stopped halts within a couple
    of reports instead of training on while Tune shuts it down.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from sft_ray.train.worker import train_loop

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "manifest": manifest,
            "fail": _fault_injection(),
            "has_eval": "eval" in datasets,
            "async_upload": async_upload,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=None if cfg.scaling.use_gpu else {"CPU": worker_cpus},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage.path,
            # Keeps the best by eval loss; Ray always keeps the latest too, for resuming.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.storage.keep_checkpoints,
                checkpoint_score_attribute="eval_loss" if "eval" in datasets else None,
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Every worker gets all rows; Accelerate inside the HF Trainer shards them exactly once.
        # Rows in the same order on every rank and every attempt: a resumed run skips exactly the
        # batches it already trained only if the order it skips in is the order it trained in.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ray.data.ExecutionOptions(preserve_order=True)
        ),
    )
    return trainer.fit()


def _finished(cfg: Config) -> dict | None:
    """The stored summary when this very config already finished under this name.

    Rerunning it would train nothing and overwrite final/ with a zero-step summary. A changed
    config (more epochs, say) still resumes from the last checkpoint and trains on.
    """
    done = stored_summary(cfg)
    if done is None or stored_config(cfg) != cfg.model_dump(mode="json"):
        return None
    print(
        f"run {cfg.name} already finished with this config (data files are not compared); its results are "
        f"below. To train again, choose another name (name=...) or remove {run_dir(cfg)}"
    )
    return done


def train(cfg: Config) -> dict:
    """Run one training job end to end; returns rank 0's summary."""
    storage.check_writable(cfg.storage.path)
    if (done := _finished(cfg)) is not None:
        return done
    check_sources(cfg)  # before Ray starts: a wrong path fails in a second, not after the start-up
    started_local = ensure_ray()
    if started_local:
        _check_resources(cfg)
    prepared, manifest = prepare(cfg)
    return fit(cfg, load_splits(prepared, manifest), manifest).return_value
