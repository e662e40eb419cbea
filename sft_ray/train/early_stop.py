"""Early stopping on eval loss (`train.early_stopping: {patience, min_delta}`), and final/ from the
best evaluation's checkpoint.

The verdict is read from the trainer's log history, which every checkpoint carries
(`trainer_state.json`), so a resumed run counts the evaluations of the attempts before it, with
no state of its own to save. Every rank evaluates the same eval loss (the HF Trainer gathers the
losses of all ranks), so all ranks stop at the same step. Evaluation at step 0 (the "before" loss)
is no candidate: there is no checkpoint of it.

A run with early stopping saves a checkpoint at every evaluation and only there (the config
requires `save_steps == eval_steps`), so the evaluation with the lowest eval loss has its
checkpoint; Ray Train keeps the checkpoints with the lowest eval loss (`CheckpointConfig` scores
by it), so it is still in storage at the end (once its background upload has landed: see
`_unreadable`), when the workers load it back before the final evaluation, the sample generations
and final/. Measured on 2 CPU workers, under ddp and fsdp: the final evaluation gives the best
evaluation's loss exactly (6.3020935 both, best at step 10 of 14).
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from sft_ray import storage
from sft_ray.config import Config


def judge(log_history: list[dict], patience: int, min_delta: float) -> dict | None:
    """The evaluations so far (step > 0) read as early stopping reads them; None before the first.

    best: the lowest eval loss and its step (what final/ keeps). waited: the evaluations since the
    last improvement, one that beat the previous improvement by more than min_delta (as Keras and
    the HF EarlyStoppingCallback count); stop when waited >= patience."""
    seen: dict[int, float] = {}
    for entry in log_history:
        if "eval_loss" in entry and entry.get("step", 0) > 0:
            seen.setdefault(entry["step"], entry["eval_loss"])
    if not seen:
        return None
    steps = sorted(seen)
    best_so_far, waited = float("inf"), 0
    for step in steps:
        if seen[step] < best_so_far - min_delta:
            best_so_far, waited = seen[step], 0
        else:
            waited += 1
    best_step = min(steps, key=lambda s: (seen[s], s))
    return {
        "patience": patience,
        "min_delta": min_delta,
        "evaluations": len(steps),
        "waited": waited,
        "stop": waited >= patience,
        "best_step": best_step,
        "best_eval_loss": seen[best_step],
    }


class EarlyStopping(TrainerCallback):
    """Stops training after `patience` evaluations without an improvement of more than min_delta."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta

    def on_evaluate(self, args, state, control, **kwargs):
        verdict = judge(state.log_history, self.patience, self.min_delta)
        if verdict is not None and verdict["stop"]:
            control.should_training_stop = True


def keep_best(cfg: Config, trainer, run_dir: str, local_dir: str, rank: int, world: int) -> dict | None:
    """After training (every rank): load the best evaluation's checkpoint into the model when it is
    not the last step, and return what happened for the summary ("line" says it in words); None
    without early stopping.

    "stopped_at" is the step training stopped at when early stopping ended it, else None. Only the
    weights are read (no optimizer state). A best checkpoint that is gone or damaged is said in
    "kept_note"; final/ then holds the last step's weights."""
    from sft_ray.train import compat, fsdp

    rule = cfg.train.early_stopping
    if rule is None:
        return None
    state = trainer.state
    verdict = judge(state.log_history, rule.patience, rule.min_delta)
    if verdict is None:
        return None
    stopped = verdict["stop"] and state.global_step < state.max_steps  # not when the last step is reached anyway
    out = {**verdict, "stopped_at": state.global_step if stopped else None, "kept_step": state.global_step}
    best = verdict["best_step"]
    if best == state.global_step:
        return {**out, "line": summary_line(out)}
    uri = storage.join(run_dir, f"checkpoint-{best:07d}")
    if note := _unreadable(run_dir, best, world, rank):
        out["kept_note"] = f"{note}: final/ holds step {state.global_step}"
        return {**out, "line": summary_line(out)}
    local = storage.download_dir(uri, os.path.join(local_dir, f"best-{rank}"), skip=_NOT_WEIGHTS)
    compat.load_weights(trainer, local, fsdp.enabled(cfg))
    out["kept_step"] = best
    return {**out, "line": summary_line(out)}


UPLOAD_WAIT_S = 600.0


def _unreadable(run_dir: str, step: int, world: int, rank: int) -> str | None:
    """Why the checkpoint of `step` cannot be loaded, or None. Rank 0 looks and all ranks follow
    it: under fsdp the load is collective, and every rank must take the same way.

    Ray Train uploads checkpoints in the background, and on a busy machine they lag behind
    training (measured: two checkpoints behind on 2 CPUs), so rank 0 waits for it to be whole, up
    to UPLOAD_WAIT_S; not when Ray has registered a later checkpoint and not this one (it was
    not kept)."""
    import time

    import torch.distributed as dist

    from sft_ray.train import checkpoints

    uri = storage.join(run_dir, f"checkpoint-{step:07d}")
    box: list = [None]
    if rank == 0:
        start = time.monotonic()
        while True:
            try:
                checkpoints.verify(uri, world)
                break
            except checkpoints.Damaged as err:
                if _dropped(run_dir, step):
                    box = [f"the best checkpoint (step {step}) was not kept by Ray Train ({err})"]
                    break
                if time.monotonic() - start > UPLOAD_WAIT_S:
                    box = [f"the best checkpoint cannot be read after {UPLOAD_WAIT_S:.0f} s ({err})"]
                    break
                time.sleep(1.0)
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _dropped(run_dir: str, step: int) -> bool:
    """Ray Train's checkpoint list has a later checkpoint than `step` and not `step`'s: it was
    uploaded and then not kept (Ray registers checkpoints in the order they were reported)."""
    from sft_ray.train.checkpoints import SNAPSHOT

    try:
        snap = storage.read_json(storage.join(run_dir, SNAPSHOT))
        names = {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}
        latest = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being rewritten
        return False
    return f"checkpoint-{step:07d}" not in names and int(latest.rsplit("-", 1)[1]) > step


# A checkpoint's files that are not the model's weights: left in storage when the best is loaded.
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args")


def summary_line(stop: dict) -> str:
    """What the run's summary says about early stopping."""
    best = f"best eval loss {stop['best_eval_loss']:.4f} at step {stop['best_step']}"
    if stop.get("stopped_at") is not None:
        head = (
            f"stopped early at step {stop['stopped_at']}: eval loss did not improve by more than "
            f"{stop['min_delta']:g} in {stop['waited']} evaluations (patience {stop['patience']}); {best}"
        )
    else:
        waited = f"{stop['waited']} evaluations without improvement at the end, patience {stop['patience']}"
        head = f"training ran to its last step ({waited}); {best}"
    kept = stop.get("kept_note") or f"final/ holds the weights of step {stop['kept_step']}"
    return f"{head}; {kept}"
