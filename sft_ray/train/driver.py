"""The driver side of training: prepare (or reuse) the data, then run a Ray Train TorchTrainer.

Light on purpose: no torch or transformers import here; those happen in the workers.
"""

from __future__ import annotations

import contextlib
import math
import os

from sft_ray import storage
from sft_ray.config import Config, ConfigError
from sft_ray.console import ray_train_log_level, verbose
from sft_ray.data.pipeline import check_sources, prepare
from sft_ray.lease import Lease
from sft_ray.progress import follow
from sft_ray.ray_runtime import ensure_ray
from sft_ray.train import tracking
from sft_ray.train.checkpoints import resume_point
from sft_ray.train.compat import no_ray_sigint_handler, worker_group_startup_timeout
from sft_ray.train.final import run_dir, same_training, stored_summary
from sft_ray.train.interrupt import Interrupted, stop_on_signals
from sft_ray.train.shards import check_batch, total_steps


def _check_resources(cfg: Config, local: bool) -> None:
    """An embedded Ray cannot grow: too many workers are refused. A cluster may (an autoscaler adds
    nodes), so there it is said once, instead of Ray Train waiting without a word."""
    import ray

    have = ray.cluster_resources()
    kind = "GPU" if cfg.scaling.use_gpu else "CPU"
    if have.get(kind, 0) >= cfg.scaling.num_workers:
        return
    need = f"scaling.num_workers={cfg.scaling.num_workers} needs {cfg.scaling.num_workers} {kind}s"
    if local:
        raise ConfigError(f"{need}, but this local Ray has {have.get(kind, 0):g}; lower scaling.num_workers")
    print(f"{need}; the cluster has {have.get(kind, 0):g} now: training starts when nodes join", flush=True)


class Unplaceable(RuntimeError):
    """The cluster has had no room for the run's workers for longer than the run waits."""


def _placement_wait_s() -> float:
    """How long a run waits for room for its workers before it fails (`SFT_RAY_PLACEMENT_WAIT_S`).

    A worker group Ray cannot place (a node lost and none to replace it) fails its start after
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) and Ray Train starts it again, by default for ever:
    the job hangs, logging a traceback each time. An autoscaler brings a node within minutes."""
    return float(os.environ.get("SFT_RAY_PLACEMENT_WAIT_S", "900"))


def _placement_retries() -> int:
    """Ray Train's controller_failure_limit: the worker-group starts after the first within the wait."""
    start_s = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    return max(0, math.ceil(_placement_wait_s() / start_s) - 1)


def _unplaceable(cfg: Config, worker_cpus: float) -> str:
    import ray

    kind = "GPU" if cfg.scaling.use_gpu else "CPU"
    each = 1 if cfg.scaling.use_gpu else worker_cpus
    nodes = [n for n in ray.nodes() if n["Alive"]]
    have = sum(n["Resources"].get(kind, 0) for n in nodes)
    per_node = ", ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get(kind, 0):g}" for n in nodes)
    return (
        f"scaling.num_workers={cfg.scaling.num_workers} workers need {each:g} {kind} each, and the cluster had no room "
        f"for them for {_placement_wait_s():.0f} s (SFT_RAY_PLACEMENT_WAIT_S): its {len(nodes)} live node(s) have "
        f"{have:g} {kind} in all ({per_node}). Was a node lost and not replaced? Add nodes or lower "
        "scaling.num_workers, then rerun the same command: it resumes from the last checkpoint"
    )


def _fault_injection() -> dict:
    """`SFT_RAY_FAIL_AT_STEP=STEP[:RANK]` kills that worker once at that step (failure tests)."""
    spec = os.environ.get("SFT_RAY_FAIL_AT_STEP")
    if not spec:
        return {}
    step, _, rank = spec.partition(":")
    return {"step": int(step), "rank": int(rank or 0)}


def fit(
    cfg: Config,
    prepared: str,
    manifest: dict,
    worker_cpus: float = 1,
    callbacks: list | None = None,
    async_upload: bool = True,
    progress: bool = False,
    score: tuple[str, str] = ("eval_loss", "min"),
):
    """One Ray Train run on already prepared data; returns the Ray Train Result.

    A sweep calls it once per trial with the same prepared data, fewer CPUs per worker so that all
    concurrent trials fit, Tune's report callback, and synchronous uploads: then a worker's report
    waits until Tune has taken the one before, so a trial that ASHA stopped halts within a couple
    of reports instead of training on while Tune shuts it down. `score`: the reported metric (and
    its better direction) by which Ray Train keeps the best checkpoints; a sweep's own metric.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from sft_ray.train.worker import train_loop

    check_batch(cfg, manifest)
    point = resume_point(run_dir(cfg), cfg.scaling.num_workers)
    steps = total_steps(cfg, manifest)
    if point is not None:
        print(f"resuming {cfg.name} from {point[0]} (step {point[1]} of {steps})", flush=True)
    has_eval = manifest["splits"]["eval"]["rows_written"] > 0
    if cfg.train.early_stopping is not None and not has_eval:
        raise ConfigError(
            f"train.early_stopping stops on eval loss, but the prepared eval split of {prepared} has no rows"
        )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            # Each worker reads its own share from here (train/shards.py): no dataset goes through Ray Train.
            "prepared": prepared,
            "manifest": manifest,
            "fail": _fault_injection(),
            "async_upload": async_upload,
            "verbose": verbose(),
            "tracker_env": tracking.driver_env(cfg),  # W&B / MLflow settings for the workers
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=None if cfg.scaling.use_gpu else {"CPU": worker_cpus},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage.path,
            # Keeps the best by eval loss (a sweep: by its metric); Ray always keeps the latest too, for resuming.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.storage.keep_checkpoints,
                checkpoint_score_attribute=score[0] if has_eval else None,
                checkpoint_score_order=score[1],
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures, controller_failure_limit=_placement_retries()
            ),
            callbacks=callbacks,
            # Ray Train's INFO lines (resources requested, each report) go to its log files only.
            logging_config=ray.train.LoggingConfig(log_level=ray_train_log_level()),
        ),
    )
    no_ray_sigint_handler(trainer)
    try:
        # A sweep's trials run side by side: their lines would interleave, so only `train` follows.
        with follow(run_dir(cfg), steps, point[1] if point else 0) if progress else contextlib.nullcontext():
            return trainer.fit()
    except ray.train.ControllerError as err:
        if isinstance(err.controller_failure, worker_group_startup_timeout()):
            raise Unplaceable(_unplaceable(cfg, worker_cpus)) from err
        raise


def _finished(cfg: Config) -> dict | None:
    """The stored summary when this very config already finished under this name.

    Rerunning it would train nothing and overwrite final/ with a zero-step summary. A changed
    config (more epochs, say) still resumes from the last checkpoint and trains on.
    """
    done = stored_summary(cfg)
    if done is None or not same_training(cfg):
        return None
    print(
        f"run {cfg.name} already finished with this config (data files are not compared); its results are "
        f"below. To train again, choose another name (name=...) or remove {run_dir(cfg)}"
    )
    return done


@contextlib.contextmanager
def _out_of_space_named(cfg: Config):
    """A full disk surfaces from Ray's controller or a worker as a bare `[Errno 28]` with no path."""
    try:
        yield
    except Exception as err:
        if "No space left on device" not in str(err) and "errno 28" not in str(err).lower():
            raise
        raise storage.StorageError(
            f"storage.path {cfg.storage.path} ran out of space while running {cfg.name} (No space left on device). "
            "Free space there (or choose another storage.path) and rerun the same command: it resumes from the "
            "last whole checkpoint"
        ) from err


def train(cfg: Config) -> dict:
    """Run one training job end to end; returns rank 0's summary.

    Raises RunBusy while another driver runs this name, Interrupted after a signal stopped it at a
    checkpoint."""
    storage.check_writable(cfg.storage.path)
    with Lease(run_dir(cfg), cfg.name):
        if (done := _finished(cfg)) is not None:
            return done
        check_sources(cfg)  # before Ray starts: a wrong path fails in a second, not after the start-up
        _check_resources(cfg, local=ensure_ray())
        with _out_of_space_named(cfg):
            prepared, manifest = prepare(cfg)
            with stop_on_signals(run_dir(cfg), cfg.name) as got:
                result = fit(cfg, prepared, manifest, progress=True)
        summary = result.return_value
        if summary.get("interrupted"):
            where = os.path.basename(result.checkpoint.path.rstrip("/")) if result.checkpoint else "its start"
            raise Interrupted(
                f"interrupted at step {summary['global_step']}; rerun the same command to resume from {where}",
                128 + (got["signal"] or 2),
            )
        return summary
