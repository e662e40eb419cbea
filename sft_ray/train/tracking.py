"""Experiment trackers (`train.report_to: [wandb, mlflow]`): one tracker run per training run,
named after it, opened before training and closed after `final/` by rank 0 alone.

A restarted or resumed attempt with the same config logs into the same tracker runs: their ids
are kept in `<run>/trackers.json`. W&B resumes its run (`resume="allow"`); MLflow reopens its run
and leaves its params as the first attempt logged them (MLflow refuses to change a param, and
the HF callback's `output_dir` differs per attempt). A changed config opens new runs.

The HF Trainer's own integrations (WandbCallback, MLflowCallback) log the metrics, on the main
process only; they log into the run opened here when one is open. Opening it here first:
- names it after `name` and attaches the resolved config and the data manifest from the start;
- keeps the MLflow run open past `on_train_end`, where MLflowCallback would end a run it started
  itself: the final evaluation (logged after training) would then open a stray unnamed run;
- lets the final adapter be logged to MLflow (the `final/` folder, from storage) before closing;
- finishes the W&B run: the HF callback never does, and a Ray worker outlives the training.

Settings come from the usual environment variables (WANDB_PROJECT, WANDB_MODE, WANDB_DIR,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...). The driver's values of those listed in
FORWARDED reach the workers through the loop config (`driver_env`), as workers on other nodes
do not share the driver's environment; secrets (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN/PASSWORD)
are not forwarded and come from the nodes' environment, as HF_TOKEN does.

Imports of wandb and mlflow stay inside the functions: the driver imports this module too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile

from sft_ray import storage
from sft_ray.config import Config, ConfigError

FORWARDED = (
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_RUN_GROUP",
    "WANDB_TAGS",
    "WANDB_NOTES",
    "WANDB_BASE_URL",
    "WANDB_LOG_MODEL",
    "WANDB_WATCH",
    "WANDB_SILENT",
    "WANDB_CONSOLE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TAGS",
    "MLFLOW_RUN_ID",
    "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_FLATTEN_PARAMS",
    "MLFLOW_MAX_LOG_PARAMS",
    "HF_MLFLOW_LOG_ARTIFACTS",
)
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # report_to entry -> module the HF integration imports


def driver_env(cfg: Config, environ=None) -> dict:
    """On the driver: fail early when a tracker in `report_to` is not installed, and return the
    tracker settings of this environment that the workers should see."""
    for tracker, module in PACKAGES.items():
        if tracker in cfg.train.report_to and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to: {tracker} is not installed; install it with pip install 'sft-ray[{tracker}]'"
            )
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in FORWARDED if k in environ}


TRACKERS = "trackers.json"  # in the run folder: the config and the tracker run ids it was logged under
# While a reopened MLflow run keeps the HF callback's params off: the MLFLOW_MAX_LOG_PARAMS it replaced.
_REOPENED = "SFT_RAY_MLFLOW_REOPENED"


def start(cfg: Config, loop_config: dict, rank: int, run_dir: str, resumed: bool) -> None:
    """On every worker, before training: take the driver's tracker settings; rank 0 opens the runs
    (an earlier attempt's, when this one resumes the same config)."""
    os.environ.update(loop_config.get("tracker_env", {}))  # every rank: the HF integrations read them on all
    if rank != 0 or not {"wandb", "mlflow"} & set(cfg.train.report_to):
        return
    config, manifest = cfg.model_dump(mode="json"), loop_config.get("manifest", {})
    uri = storage.join(run_dir, TRACKERS)
    earlier = storage.read_json(uri) if resumed and storage.exists(uri) else {}
    if earlier.get("config") != config:
        earlier = {}
    ids = {"config": config}
    if "wandb" in cfg.train.report_to:
        ids["wandb"] = _start_wandb(cfg, config, manifest, earlier.get("wandb"))
    if "mlflow" in cfg.train.report_to:
        ids["mlflow"] = _start_mlflow(cfg, config, manifest, earlier.get("mlflow"))
    storage.write_json(uri, ids)


@contextlib.contextmanager
def closed_on_failure(cfg: Config, rank: int):
    """Around an attempt's work on a worker: when it raises, rank 0 ends the tracker runs as failed
    (MLflow FAILED, W&B exit code 1) instead of leaving them open as running, and the error goes on
    unchanged. A worker process killed outright (SIGKILL, out of memory, a lost node) runs no code:
    its MLflow run stays RUNNING until a restarted attempt reopens and ends it."""
    try:
        yield
    except BaseException:
        try:
            close(cfg, rank, failed=True)
        except Exception as err:  # the attempt's own error is the one to see
            print(f"could not end the tracker runs as failed: {err!r}", flush=True)
        raise


def close(cfg: Config, rank: int, final_dir: str | None = None, failed: bool = False) -> None:
    """Rank 0, after `final/` is written (or after an interrupted attempt, with no `final_dir`):
    log the final folder to MLflow as the artifact `final/`, end both runs."""
    if rank != 0:
        return
    previous = os.environ.pop(_REOPENED, None)  # set by _start_mlflow: the setting it replaced
    if previous is not None:
        os.environ.pop("MLFLOW_MAX_LOG_PARAMS", None)
        if previous:
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = previous
    if "mlflow" in cfg.train.report_to:
        import mlflow

        if mlflow.active_run() is not None:
            if final_dir is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    storage.download_dir(final_dir, tmp)
                    mlflow.log_artifacts(tmp, artifact_path="final")
            mlflow.end_run("FAILED" if failed else "FINISHED" if final_dir is not None else "KILLED")
    if "wandb" in cfg.train.report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
        # finish() returns before W&B's service has written the run's last records (the offline
        # `.wandb` file was measured short of its tail); teardown waits for it. Ray may end this
        # worker right after, without the atexit hook that would do the same.
        wandb.teardown()


def _start_wandb(cfg: Config, config: dict, manifest: dict, earlier: str | None) -> str:
    """Opens (or resumes) the W&B run; returns its id."""
    import wandb

    if wandb.run is not None:  # one left open by an earlier run in this process
        wandb.finish()
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "sft-ray"),
        name=cfg.name,
        config={"sft_ray": config, "data_manifest": manifest},
        id=earlier,
        resume="allow" if earlier else None,
    )
    for name, obj in (("sft_ray_config.json", config), ("data_manifest.json", manifest)):
        path = os.path.join(run.dir, name)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        run.save(path, base_path=run.dir, policy="now")
    return run.id


def _start_mlflow(cfg: Config, config: dict, manifest: dict, earlier: str | None) -> str:
    """Opens (or reopens) the MLflow run; returns its id."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    if mlflow.active_run() is not None:
        mlflow.end_run()
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    if earlier:
        try:
            run_id = mlflow.start_run(run_id=earlier).info.run_id
        except Exception as err:  # deleted, or another tracking server: a new run instead
            print(f"MLflow run {earlier} cannot be reopened ({err}); starting a new one", flush=True)
        else:
            # Its params are there; the HF callback's would differ (output_dir) and fail: it logs
            # none this attempt (close() takes the setting back).
            os.environ[_REOPENED] = os.environ.get("MLFLOW_MAX_LOG_PARAMS", "")
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
            return run_id
    run = mlflow.start_run(run_name=cfg.name)
    # Prefixed: the HF callback adds the TrainingArguments (learning_rate, ...) as params of their
    # own, and an MLflow param cannot be logged twice with different values.
    params = {f"sft_ray.{k}": str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in _flat(config).items()}
    items = list(params.items())
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH]))
    mlflow.log_dict(config, "sft_ray_config.json")
    mlflow.log_dict(manifest, "data_manifest.json")
    return run.info.run_id


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys; lists (data sources, target modules) as JSON."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out
