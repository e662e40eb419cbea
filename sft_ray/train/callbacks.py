"""Trainer callbacks run on every worker: token accounting, metrics.jsonl, reports to Ray Train.

Every rank calls `ray.train.report` at the same points (it is a barrier); only rank 0 attaches
the HF checkpoint folder, other ranks attach just their own RNG state file, so storage holds one
copy of every file an exact resume needs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import tempfile
import time

from transformers import TrainerCallback

from sft_ray import storage

IGNORE = -100


def packed_real_tokens(position_ids) -> int:
    """Real tokens of packed rows: a position > 0, or a 0 followed by 1, is inside an example; a pad is a lone 0."""
    return int((position_ids > 0).sum() + (position_ids[:, 1:] == 1).sum())


def count_packed_rows_in_num_tokens(trainer) -> None:
    """TRL counts a batch without attention mask as one flattened sequence (`position_ids.size(1)`),
    so its `num_tokens` would count one row per batch of packed rows: count every real token instead.
    Same gather as TRL's own, at the same point, so every rank takes part."""
    import torch

    from sft_ray.train.compat import set_total_train_tokens, total_train_tokens

    compute_loss = trainer.compute_loss

    def counted(model, inputs, *args, **kwargs):
        before = total_train_tokens(trainer)
        out = compute_loss(model, inputs, *args, **kwargs)
        rows = "position_ids" in inputs and "attention_mask" not in inputs and "cu_seq_lens_q" not in inputs
        if rows and total_train_tokens(trainer) != before:  # a training batch TRL has just counted
            pos = inputs["position_ids"]
            real = torch.tensor([packed_real_tokens(pos)], device=pos.device)
            set_total_train_tokens(trainer, before + int(trainer.accelerator.gather_for_metrics(real).sum()))
        return out

    trainer.compute_loss = counted


class TokenCounter:
    """Counts trained, real and computed tokens of the batches the trainer steps on.

    It wraps `trainer.training_step`, not the collator: the dataloader collates one batch ahead,
    and evaluation batches go through the same collator.
    """

    def __init__(self):
        self.totals = [0, 0, 0]  # trained, real, computed

    def add(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        if "attention_mask" in inputs:
            real = int(inputs["attention_mask"].sum())
        elif "cu_seq_lens_q" in inputs:  # padding-free: every pad is a length-1 "sequence"; examples are longer
            lengths = inputs["cu_seq_lens_q"].diff()
            real = int(lengths[lengths > 1].sum())
        else:
            real = packed_real_tokens(inputs["position_ids"])
        self.totals[0] += int((inputs["labels"] != IGNORE).sum())
        self.totals[1] += real
        self.totals[2] += ids.numel()

    def wrap(self, training_step):
        def step(model, inputs, *args, **kwargs):
            self.add(inputs)
            return training_step(model, inputs, *args, **kwargs)

        return step


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RunCallback(TrainerCallback):
    def __init__(
        self,
        counter: TokenCounter,
        run_dir: str,
        rank: int,
        device,
        tb_dir: str | None,
        fail: dict,
        async_upload: bool,
        sharded_checkpoints: bool = False,
    ):
        from sft_ray.train.interrupt import StopWatch

        self.counter, self.run_dir, self.rank, self.device = counter, run_dir, rank, device
        self.stop, self.interrupted = StopWatch(run_dir, rank), False
        self.tb_dir, self.fail, self.async_upload = tb_dir, fail, async_upload
        self.sharded_checkpoints = sharded_checkpoints  # fsdp: each rank writes its own part
        self.rates: list[float] = []  # trained tokens/s per log (the HF log history keeps no copy)
        self.logged = list(counter.totals)
        self.busy = 0.0  # seconds spent inside training steps since the last log (no eval, no saving)
        self.step_start = 0.0
        self.lines: list[str] = []
        self.training = False  # evaluations outside train() (the final one) are not reported
        metrics_uri = storage.join(run_dir, "metrics.jsonl")
        if rank == 0 and storage.exists(metrics_uri):  # a resumed run continues the same file
            fs, path = storage.filesystem(metrics_uri)
            with fs.open_input_stream(path) as f:
                self.lines = [line for line in f.read().decode().splitlines() if line.strip()]

    def on_train_begin(self, args, state, control, **kwargs):
        """The trainer state is the checkpoint's by now: what an earlier attempt logged after it is
        trained again by this one and replaced, so the file keeps one line per step."""
        self.training = True
        self.lines = [line for line in self.lines if json.loads(line).get("step", 0) <= state.global_step]

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.busy += time.time() - self.step_start
        if self.stop.requested(self.device):  # the driver was interrupted: save this step, then stop
            control.should_save = control.should_training_stop = self.interrupted = True
        if self.fail.get("step") == state.global_step and self.fail.get("rank") == self.rank:
            self._crash_once()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0:
            if self.rank == 0 and metrics and "eval_loss" in metrics:  # kept for resumed runs
                uri = storage.join(self.run_dir, "baseline.json")
                baseline = storage.read_json(uri) if storage.exists(uri) else {}
                storage.write_json(uri, {**baseline, "eval_loss": metrics["eval_loss"]})
            return  # the same for every trial of a sweep: not a result to report
        if self.training and not control.should_save:  # a save follows at this step and reports these metrics with it
            _report(self._metrics(state), None, None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs if logs is not None else {}
        if "loss" in logs:
            logs.update(self._throughput())
        if self.rank == 0:
            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time()}
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"})
            self.lines.append(json.dumps(record))
            storage.write_bytes(storage.join(self.run_dir, "metrics.jsonl"), ("\n".join(self.lines) + "\n").encode())

    def on_save(self, args, state, control, **kwargs):
        """Hand the checkpoint to Ray Train, which uploads it in the background while training goes on
        (synchronously in a sweep: see `driver.fit`).

        The upload reads a staged copy (hard links, no bytes copied) that Ray deletes once uploaded:
        HF deletes its own folder at a later save, possibly mid-upload.
        """
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        name = f"checkpoint-{state.global_step:07d}"
        staged = tempfile.mkdtemp(prefix=f"upload-{name}-", dir=args.output_dir)  # not `checkpoint-*`: HF rotates those
        if self.rank == 0:
            _link_tree(folder, staged)
        else:  # other ranks add their own RNG state (and fsdp parts); the rest is the same on every rank
            rng = os.path.join(folder, f"rng_state_{self.rank}.pth")
            if os.path.exists(rng):
                shutil.copy(rng, staged)
            if self.sharded_checkpoints:
                from sft_ray.train.fsdp import stage_own_shards

                stage_own_shards(folder, staged, self.rank)
        _report(self._metrics(state), staged, name, self.async_upload)
        if self.rank == 0:
            self.upload_logs()

    def upload_logs(self) -> None:
        if self.rank == 0 and self.tb_dir and os.path.isdir(self.tb_dir):
            storage.upload_dir(self.tb_dir, storage.join(self.run_dir, "tensorboard"))

    def _throughput(self) -> dict:
        import torch
        import torch.distributed as dist

        delta = [t - s for t, s in zip(self.counter.totals, self.logged)]
        sums = torch.tensor([*delta, self.busy], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(sums)
        trained, real, computed, busy = sums.tolist()
        elapsed = max(busy / (dist.get_world_size() if dist.is_initialized() else 1), 1e-9)
        self.logged, self.busy = list(self.counter.totals), 0.0
        self.rates.append(trained / elapsed)
        return {
            "trained_tokens_per_s": trained / elapsed,
            "real_tokens_fraction": real / computed if computed else 0.0,
            "peak_memory_mb": peak_memory_mb(self.device),
        }

    def _metrics(self, state) -> dict:
        from sft_ray.train.checkpoints import reported_metrics

        return reported_metrics(state.log_history, state.global_step)

    def _crash_once(self) -> None:
        """Fault injection for the failure tests: SIGKILL this worker once per run."""
        marker = storage.join(self.run_dir, f".crashed-at-{self.fail['step']}")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, b"")
        time.sleep(self.fail.get("delay_s", 3.0))  # let the controller register the last checkpoint
        os.kill(os.getpid(), signal.SIGKILL)


def _report(metrics: dict, folder: str | None, name: str | None, async_upload: bool = False) -> None:
    import ray.train

    if folder is None:
        ray.train.report(metrics)
        return
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(folder),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC
        if async_upload
        else ray.train.CheckpointUploadMode.SYNC,
        delete_local_checkpoint_after_upload=True,  # `folder` is the staged copy
    )


def _link_tree(src: str, dst: str) -> None:
    """Hard-link every file of src into dst (copy where links are not possible)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)
