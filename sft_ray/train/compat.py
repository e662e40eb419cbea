"""Every use of a private attribute of Ray Train, transformers, TRL or Accelerate, in one place.

Each is pinned by tests/test_compat.py, which fails naming the attribute when a library changes it.
Light at import: the driver uses this module too; libraries are imported inside the functions.
"""

from __future__ import annotations


def attn_implementation(model) -> str:
    """The attention kernel a loaded model runs (`flash_attention_2`, `sdpa`, `eager`, ...).
    transformers keeps it only as `config._attn_implementation`."""
    return model.config._attn_implementation or ""


def total_train_tokens(trainer) -> int:
    """TRL's running count of trained tokens (what it logs as `num_tokens`)."""
    return trainer._total_train_tokens


def set_total_train_tokens(trainer, count: int) -> None:
    """Set TRL's token count and the value it logs next (`_metrics["train"]["num_tokens"]`)."""
    trainer._total_train_tokens = count
    trainer._metrics["train"]["num_tokens"] = [count]


def no_ray_sigint_handler(trainer) -> None:
    """Ray Train's controller replaces the driver's SIGINT handler with one that aborts the run
    without a checkpoint (`DataParallelTrainer._register_sigint_handler`, Ray 2.60); the driver's
    own handler (train/interrupt.py) saves first."""
    trainer._register_sigint_handler = lambda controller: None


def load_weights(trainer, checkpoint_dir: str, sharded: bool) -> None:
    """Load a checkpoint folder's weights into the trainer's model, as the HF Trainer does when it
    resumes (`Trainer._load_from_checkpoint`: a PEFT adapter, a sharded FSDP state dict into the
    wrapped model, or a whole model's safetensors); optimizer and scheduler are left alone."""
    trainer._load_from_checkpoint(checkpoint_dir, trainer.model_wrapped if sharded else None)


def worker_group_startup_timeout():
    """The controller failure Ray Train raises when it cannot place the worker group in time."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return WorkerGroupStartupTimeoutError


def unsharded(loader):
    """`loader` made to yield every batch of its own dataset on this process: Accelerate's
    `BatchSamplerShard` would keep every W-th batch of a worker's own share (see shards.keep_own_share)."""
    from accelerate.data_loader import BatchSamplerShard

    shard = getattr(loader, "batch_sampler", None)
    if isinstance(shard, BatchSamplerShard):
        shard.num_processes, shard.process_index = 1, 0
    return loader


def fsdp_on_cpu(trainer_cls):
    """`trainer_cls` whose Accelerator shards with FSDP2 on CPU workers too.

    Accelerate turns FSDP on only for accelerator devices: on CPU processes its state stays
    MULTI_CPU and the model is wrapped in DDP, silently (measured: plain tensors, no DTensor).
    torch's `fully_shard` itself runs on CPU over gloo, so the state is switched to FSDP right after
    the Accelerator is made, before any model is prepared; everything after (wrapping per decoder
    layer, sharded checkpoints, resume) is then the same code path as on GPUs.
    """

    class FsdpOnCpu(trainer_cls):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            if state.distributed_type == DistributedType.MULTI_CPU and self.args.fsdp_plugin_args is not None:
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    return FsdpOnCpu
