"""Hyperparameter sweeps: Ray Tune runs one Ray Train run per trial over data prepared once.

Layout under `storage.path/<sweep name>/`: `tune/` (Tune's own state, what a rerun resumes from),
`trials/<trial id>/` (each trial's run folder: checkpoints, metrics.jsonl, final/), and, when the
sweep ends, `results.csv`, `results.json`, `eval_loss.png` and `best/` (the best trial's adapter
and its resolved config.yaml).

Driver code: no torch or transformers import here; trials import them in their Train workers.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import tempfile

import pyarrow.fs as pafs
import yaml

from sft_ray import storage
from sft_ray.config import Config, ConfigError, SearchDim, _set_dotted, validate
from sft_ray.console import verbose
from sft_ray.lease import Lease
from sft_ray.train.checkpoints import SNAPSHOT

# Keys a trial may not change: they name or place the sweep, size its trials, or change the
# prepared data that every trial shares.
FIXED = ("name", "tune", "storage", "scaling", "data", "model.path")
# The Tune function of each trial holds almost no CPU; its Train workers hold the rest, so that
# concurrent trials never wait on each other for a CPU (stack-notes §8.6).
TRIAL_FN_CPUS = 0.01
WORKER_CPUS = 0.95
# ASHA stops every trial that reaches max_t; trials should end when their training ends instead.
NEVER = 10**6


class SweepInterrupted(RuntimeError):
    """The sweep stopped (Ctrl-C) with trials unfinished; rerunning it resumes them."""


def trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}/trials/{trial_id}"


def trial_config(tree: dict, name: str, params: dict) -> Config:
    """The config one trial trains with: the sweep's config, its own name, the sampled values."""
    tree = copy.deepcopy(tree)
    tree["name"], tree["tune"] = name, None
    for key, value in params.items():
        _set_dotted(tree, key, value)
    return validate(tree, f"trial {name} ({', '.join(f'{k}={v!r}' for k, v in params.items())})")


def _points(dim: SearchDim) -> list:
    """The values that stand for a dimension when checking it: every listed value, or both bounds."""
    if dim.choice or dim.grid:
        return dim.choice or dim.grid
    if dim.randint:
        return [dim.randint[0], dim.randint[1] - 1]
    return list(dim.uniform or dim.loguniform)


def _check_trainable(cfg: Config, where: str) -> None:
    t = cfg.train
    if t.save_steps % t.eval_steps:
        # A save reports its metrics to Tune; one before the first evaluation has no eval_loss,
        # and Tune stops the whole sweep on a result without the metric.
        raise ConfigError(
            f"{where}: train.save_steps ({t.save_steps}) must be a multiple of train.eval_steps ({t.eval_steps}) "
            "in a sweep, so that every report to Tune carries a fresh eval_loss"
        )


def check_space(cfg: Config) -> None:
    """Fail before any work when a key or any value the sweep can sample does not make a valid config."""
    if cfg.tune is None:
        raise ConfigError("the config has no `tune` section; see jobs/configs/tune_demo.yaml for one")
    if not (cfg.data.eval or cfg.data.eval_fraction):
        raise ConfigError("tune: trials are compared on eval_loss; set data.eval or data.eval_fraction")
    _check_trainable(cfg, "config")
    tree = cfg.model_dump(mode="json")
    for key, dim in cfg.tune.space.items():
        if key == "model.path" or key.split(".")[0] in FIXED:
            raise ConfigError(
                f"tune.space.{key}: trials cannot differ in it (name, tune, storage and scaling define the sweep "
                "and the size of its trials; data and model.path change the data, prepared once for all trials)"
            )
        for value in _points(dim):
            try:
                trial = trial_config(tree, trial_name(cfg.name, "check"), {key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.space.{key}: {err}") from None
            _check_trainable(trial, f"tune.space.{key}={value!r}")


def _param_space(cfg: Config) -> dict:
    from ray import tune

    space = {}
    for key, dim in cfg.tune.space.items():
        if dim.choice is not None:
            space[key] = tune.choice(dim.choice)
        elif dim.grid is not None:
            space[key] = tune.grid_search(dim.grid)
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            space[key] = tune.loguniform(*dim.loguniform)
        else:
            space[key] = tune.randint(*dim.randint)
    return space


def _run_trial(params: dict, tree: dict, prepared: str, manifest: dict, score: tuple[str, str]) -> None:
    """One trial: a Ray Train run whose every report becomes a Tune result.

    Runs in the trial's Tune actor. When a scheduler stops the trial, this actor is killed and
    nothing after fit() runs: whatever the trial leaves is what its workers reported and saved.
    A rerun of the trial has the same name, so Ray Train resumes it from its last checkpoint.

    Tune records trial states every 10 s or so: a sweep killed just after a trial finished reruns
    it. Its final/ is there: its final result goes to Tune again without starting any worker.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sft_ray.train.driver import fit
    from sft_ray.train.final import run_dir, same_training, stored_summary

    cfg = trial_config(tree, trial_name(tree["name"], tune.get_context().get_trial_id()), params)
    done = stored_summary(cfg)
    if done is not None and same_training(cfg):
        print(f"{cfg.name} finished before the sweep was interrupted; its results are kept", flush=True)
        measured = _evaluations(run_dir(cfg), None, score[0])  # the last value measured, as finish() reports
        last = {} if score[0] == "eval_loss" or not measured else {score[0]: measured[max(measured)]}
        tune.report({"finished": 1, "step": done["global_step"], "eval_loss": done["eval_loss_after"], **last})
        return
    callbacks = [TuneReportCallback()]
    fit(cfg, prepared, manifest, worker_cpus=WORKER_CPUS, callbacks=callbacks, async_upload=False, score=score)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _concurrency(cfg: Config) -> int:
    """As many trials at once as the cluster holds whole sets of Train workers for, unless the config says."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    kind = "GPU" if cfg.scaling.use_gpu else "CPU"
    have = ray.cluster_resources().get(kind, 0)
    fits = int(have // cfg.scaling.num_workers)
    if fits < 1:
        raise RuntimeError(
            f"one trial needs scaling.num_workers={cfg.scaling.num_workers} {kind}s but the cluster has {have:g}; "
            "lower scaling.num_workers"
        )
    return fits


def _trial_status(cfg: Config):
    """A Tune callback that prints the trials' states whenever they change, `sweep: 2 running ·
    1 finished · 1 stopped early · 0 errored · 0 waiting (4 trials)`, and a line for each trial
    that ends, with its parameters and best eval loss. Counted from Tune's own list of trials at
    each turn of its loop, so a resumed sweep counts the trials that ended before it too."""
    from ray import tune

    class TrialStatus(tune.Callback):
        def __init__(self):
            self.ended: dict[str, str] = {}
            self.last: dict | None = None

        def _ending(self, trial) -> str:
            if trial.trial_id not in self.ended:
                run_dir = storage.join(cfg.storage.path, trial_name(cfg.name, trial.trial_id))
                if trial.status == "ERROR":
                    kind = "errored"
                elif storage.exists(storage.join(run_dir, "final", storage.COMPLETE)):
                    kind = "finished"
                else:  # ended by the scheduler (ASHA) before its last step
                    kind = "stopped early"
                self.ended[trial.trial_id] = kind
                params = ", ".join(f"{k}={trial.config.get(k)}" for k in cfg.tune.space)
                best = _best_line(_evaluations(run_dir, None, cfg.tune.reported), cfg.tune)
                print(f"sweep: trial {trial.trial_id} {kind} ({params}): {best}", flush=True)
            return self.ended[trial.trial_id]

        def on_step_end(self, iteration, trials, **info):
            try:
                self._show(trials)
            except Exception as err:  # storage unreachable for a moment: a missed line, not a failed sweep
                print(f"sweep: trial states not shown ({err!r})", flush=True)

        def _show(self, trials):
            counts = dict.fromkeys(("running", "finished", "stopped early", "errored", "waiting"), 0)
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    counts[self._ending(trial)] += 1
                else:
                    counts["running" if trial.status == "RUNNING" else "waiting"] += 1
            if counts != self.last:
                self.last = counts
                shown = " · ".join(f"{n} {state}" for state, n in counts.items())
                print(f"sweep: {shown} ({len(trials)} trials)", flush=True)

    return TrialStatus()


def _best(values, mode: str):
    return (max if mode == "max" else min)(values)


def _best_line(evals: dict[int, float], t) -> str:
    if not evals:
        return "no evaluation"
    best = _best(evals.values(), t.direction)
    return f"best exact match {best:.0%}" if t.metric == "exact_match" else f"best eval loss {best:.4f}"


def _tuner(cfg: Config, trainable, sweep_dir: str):
    """A new sweep, or the interrupted one in `sweep_dir/tune` (finished trials are kept, the rest go on)."""
    from ray import tune

    tune_dir = storage.join(sweep_dir, "tune")
    if tune.Tuner.can_restore(tune_dir):
        print(f"sweep: resuming {tune_dir}")
        return tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
    s = cfg.tune.scheduler
    scheduler = (
        tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=NEVER,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
        if s.type == "asha"
        else tune.schedulers.FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space=_param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.reported,
            mode=cfg.tune.direction,
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=_concurrency(cfg),
            trial_name_creator=_trial_dirname,
            trial_dirname_creator=_trial_dirname,
        ),
        # Tune's own status tables only with --verbose; _trial_status prints the trials' states.
        run_config=tune.RunConfig(
            name="tune", storage_path=sweep_dir, verbose=1 if verbose() else 0, callbacks=[_trial_status(cfg)]
        ),
    )


def _number(x):
    return None if x is None or x != x else float(x)  # NaN (no value in that report) -> None


def _evaluations(run_dir: str, upto: int | None, key: str = "eval_loss") -> dict[int, float]:
    """Eval loss (or the evaluations' `key`) per step, from the trial's metrics.jsonl (across resumes).

    Not from Tune's record: a trial that a rerun resumes starts a new one, without its reports from
    before the interruption. Step 0 (before training) was never a result; `upto`, Tune's last step
    of the trial, leaves out an evaluation whose report a stopped trial did not get to send.
    """
    from sft_ray.report import load_metrics

    if not storage.exists(storage.join(run_dir, "metrics.jsonl")):
        return {}
    return {s: v for s, v in load_metrics(run_dir).get(key, []) if 0 < s <= (upto if upto is not None else s)}


def _checkpoints(run_dir: str, upto: int | None, key: str) -> list[tuple[float, str]]:
    """(the metric `key`, folder) of the checkpoints Ray Train registered and kept, from its checkpoint list.

    Only registered ones: a folder the trial was still uploading when it was stopped is not one.
    """
    try:
        snap = storage.read_json(storage.join(run_dir, SNAPSHOT))
    except (OSError, ValueError):  # none yet, or left unreadable (repaired when the trial runs again)
        return []
    saved = [
        (_number(r["metrics"].get(key)), storage.join(run_dir, r["checkpoint_dir_name"]))
        for r in snap.get("checkpoint_results", [])
        if upto is None or r["metrics"].get("step", 0) <= upto
    ]
    return [(loss, path) for loss, path in saved if loss is not None and storage.exists(path)]


def _row(result, cfg: Config) -> dict:
    """What one trial left: its status as Tune recorded it, its evaluations and checkpoints from its run folder."""
    trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
    run_dir = storage.join(cfg.storage.path, trial_name(cfg.name, trial_id))
    last = result.metrics or {}
    upto = int(last["step"]) if _number(last.get("step")) is not None else None
    history = _evaluations(run_dir, upto)
    t = cfg.tune
    measured = history if t.reported == "eval_loss" else _evaluations(run_dir, upto, t.reported)
    if result.error is not None:
        status = "errored"
    elif storage.exists(storage.join(run_dir, "final", storage.COMPLETE)):
        status = "completed"
    elif last.get("done"):  # Tune marks the last result of a trial its scheduler stopped (workers never send `done`)
        status = "stopped early"
    else:  # the sweep was interrupted before this trial ended (or started)
        status = "unfinished"
    saved = _checkpoints(run_dir, upto, t.reported)
    if status == "completed":
        checkpoint = storage.join(run_dir, "final")
    else:  # the best registered checkpoint by the sweep's metric
        checkpoint = _best(saved, t.direction)[1] if saved else None
    return {
        "trial_id": trial_id,
        "params": {k: result.config.get(k) for k in cfg.tune.space},
        "best_eval_loss": min(history.values()) if history else None,
        "metric": t.metric,
        "best": _best(measured.values(), t.direction) if measured else None,  # by the sweep's metric
        "steps": max(history) if history else 0,
        "status": status,
        "eval_loss_history": sorted(history.items()),
        "last_report": {
            k: last[k] for k in ("step", "eval_loss", t.reported, "training_iteration", "checkpoint_path") if k in last
        },
        "run_dir": run_dir,
        "checkpoint": checkpoint,
        "error": None if result.error is None else str(result.error)[:500],
    }


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _by_exact_match(rows: list[dict]) -> bool:
    return bool(rows) and rows[0].get("metric") == "exact_match"


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0]["params"]) if rows else []
    exact = _by_exact_match(rows)
    head = ["trial", *keys, *(["best exact_match"] if exact else []), "best eval_loss", "steps", "status"]
    body = [
        [
            r["trial_id"],
            *(_fmt(v) for v in r["params"].values()),
            *(["n/a" if r["best"] is None else f"{r['best']:.0%}"] if exact else []),
            "n/a" if r["best_eval_loss"] is None else f"{r['best_eval_loss']:.4f}",
            str(r["steps"]),
            r["status"],
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])


def _csv(rows: list[dict]) -> bytes:
    keys = list(rows[0]["params"]) if rows else []
    out = io.StringIO()
    writer = csv.writer(out)
    exact = _by_exact_match(rows)
    writer.writerow(["trial_id", *keys, *(["best_exact_match"] if exact else []), "best_eval_loss", "steps", "status",
                     "checkpoint"])  # fmt: skip
    for r in rows:
        writer.writerow(
            [
                r["trial_id"],
                *r["params"].values(),
                *([r["best"]] if exact else []),
                r["best_eval_loss"],
                r["steps"],
                r["status"],
                r["checkpoint"],
            ]  # fmt: skip
        )
    return out.getvalue().encode()


def _plot(rows: list[dict]) -> bytes:
    # A bare Figure (no pyplot) renders with Agg and never touches the process-wide backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for r in rows:
        if r["eval_loss_history"]:
            steps, losses = zip(*r["eval_loss_history"])
            params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in r["params"].items())
            ax.plot(steps, losses, marker="o", markersize=3, label=f"{r['trial_id']} {params} ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title("Eval loss per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _export_best(row: dict, cfg: Config, dest: str) -> None:
    """best/: the trial's final adapter, or its best registered checkpoint without the resume-only state."""
    trial = trial_config(cfg.model_dump(mode="json"), trial_name(cfg.name, row["trial_id"]), row["params"])
    fs, src = storage.filesystem(row["checkpoint"])
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(src, tmp, source_filesystem=fs)
        for name in os.listdir(tmp):
            if name in ("optimizer.pt", "scheduler.pt", storage.COMPLETE) or name.startswith("rng_state"):
                os.remove(os.path.join(tmp, name))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(trial.model_dump(mode="json"), f, sort_keys=False)
        storage.write_json(
            os.path.join(tmp, "trial.json"),
            {
                k: row[k]
                for k in ("trial_id", "params", "metric", "best", "best_eval_loss", "steps", "status", "checkpoint")
            },
        )
        storage.publish_dir(tmp, dest)


def sweep(cfg: Config) -> dict:
    """Prepare the data once, run the trials (or resume them), then write the results and best/.

    Raises RunBusy while another driver runs a sweep of this name."""
    check_space(cfg)
    storage.check_writable(cfg.storage.path)
    sweep_dir = storage.join(cfg.storage.path, cfg.name)
    with Lease(sweep_dir, cfg.name):  # RunBusy while another driver runs this sweep
        return _sweep(cfg, sweep_dir)


def _sweep(cfg: Config, sweep_dir: str) -> dict:
    from ray import tune

    from sft_ray.data.pipeline import prepare
    from sft_ray.ray_runtime import ensure_ray

    ensure_ray()
    prepared, manifest = prepare(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            tree=cfg.model_dump(mode="json"),
            prepared=prepared,
            manifest=manifest,
            score=(cfg.tune.reported, cfg.tune.direction),
        ),
        {"CPU": TRIAL_FN_CPUS},
    )
    grid = _tuner(cfg, trainable, sweep_dir).fit()

    rows = sorted((_row(r, cfg) for r in grid), key=lambda r: r["trial_id"])
    if unfinished := [r["trial_id"] for r in rows if r["status"] == "unfinished"]:
        raise SweepInterrupted(
            f"sweep {cfg.name} was interrupted with {len(unfinished)} trial(s) unfinished ({', '.join(unfinished)}); "
            "run the same command again to resume it"
        )
    scored = [r for r in rows if r["checkpoint"] and r["best"] is not None]
    sign = -1 if cfg.tune.direction == "max" else 1
    # Equals (exact match is often 100% for several) go to the lower eval loss, then the first.
    best = min(scored, key=lambda r: (sign * r["best"], r["best_eval_loss"] or float("inf"))) if scored else None
    if best:
        _export_best(best, cfg, storage.join(sweep_dir, "best"))
    results = {"sweep": cfg.name, "metric": cfg.tune.metric, "best_trial": best and best["trial_id"], "trials": rows}
    storage.write_json(storage.join(sweep_dir, "results.json"), results)
    storage.write_bytes(storage.join(sweep_dir, "results.csv"), _csv(rows))
    storage.write_bytes(storage.join(sweep_dir, "eval_loss.png"), _plot(rows))
    return {**results, "sweep_dir": sweep_dir, "best_dir": storage.join(sweep_dir, "best") if best else None}
