"""What every Ray Train worker runs: TRL's SFTTrainer with a LoRA adapter on prepared rows.

Heavy imports (torch, transformers, trl, peft) happen here, inside the worker process.
Every worker receives all prepared rows and Accelerate shards them (DataConfig(datasets_to_split=[])
on the driver): Ray and Accelerate must not both shard, or each epoch sees a fraction of the data.
"""

from __future__ import annotations

import os
import tempfile

from sft_ray.config import Config
from sft_ray.data.tokenize import IGNORE


def _to_hf(shard):
    """Materialize a Ray Data shard as an HF Dataset (SFTTrainer accepts nothing else; stack-notes R9/R10)."""
    import datasets
    import pyarrow as pa

    table = pa.concat_tables(list(shard.iter_batches(batch_size=None, batch_format="pyarrow")))
    return datasets.Dataset(
        table.select([c for c in ("input_ids", "labels", "position_ids") if c in table.column_names])
    )


def _even_out(ds, per_step_rows: int, pad_token_id: int):
    """Append rows with no trained token so the row count divides by workers x batch size.

    Accelerate would otherwise fill the last round by repeating rows from the start: some rows
    would be trained twice per epoch. Filler rows add no loss and no gradient, and every worker
    runs the same number of steps.
    """
    import datasets

    from sft_ray.train.collate import filler_rows

    missing = -len(ds) % per_step_rows
    if not missing:
        return ds
    filler = datasets.Dataset.from_dict(filler_rows(missing, pad_token_id, "position_ids" in ds.column_names))
    return datasets.concatenate_datasets([ds, filler.cast(ds.features)])


def _report_callback():
    """Report to Ray Train at each save (rank 0 uploads the HF checkpoint once) and each eval."""
    import ray.train
    from transformers import TrainerCallback

    class RayReport(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            metrics = _latest_metrics(state)
            metrics["step"] = state.global_step
            ckpt = None
            if ray.train.get_context().get_world_rank() == 0:
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                ckpt = ray.train.Checkpoint.from_directory(path)
            # A barrier: every rank reports, only rank 0 carries files, so storage gets one copy.
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint-{state.global_step:07d}")

    return RayReport()


def _latest_metrics(state) -> dict:
    merged: dict = {}
    for entry in state.log_history:
        merged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return merged


def _sample_prompts(eval_ds, n: int) -> list[dict]:
    """The first n held-out rows split into prompt ids (the untrained prefix) and reference ids."""
    out = []
    for row in eval_ds.select(range(min(n, len(eval_ds)))):
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        out.append({"prompt_ids": ids[:first], "reference_ids": [t for t in labels[first:] if t != IGNORE]})
    return out


def _generate(model, tokenizer, prompts: list[dict], device) -> list[str]:
    import torch

    texts = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["prompt_ids"]], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(p["reference_ids"]) + 16,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False))
    model.train(was_training)
    return texts


def _sft_config(cfg: Config, output_dir: str, use_cpu: bool, has_eval: bool):
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        output_dir=output_dir,
        use_cpu=use_cpu,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,  # local copies only; the kept checkpoints live in storage
        seed=t.seed,
        data_seed=t.seed,
        bf16=not use_cpu and cfg.model.dtype == "bfloat16",
        gradient_checkpointing=False,  # TRL defaults it on (stack-notes T2)
        report_to="none",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized and masked already
        remove_unused_columns=False,
    )


def train_loop(loop_config: dict) -> dict:
    import ray.train
    from trl import SFTTrainer

    from sft_ray.model import load_model, load_tokenizer, lora_config
    from sft_ray.train.collate import make_collator
    from sft_ray.train.final import write_final

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    use_cpu = device.type == "cpu"

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    model = load_model(cfg, device)
    train_ds = _even_out(
        _to_hf(ray.train.get_dataset_shard("train")),
        ctx.get_world_size() * cfg.train.per_device_batch_size,
        tokenizer.pad_token_id,
    )
    eval_shard = ray.train.get_dataset_shard("eval")
    eval_ds = _to_hf(eval_shard) if eval_shard is not None else None

    # Each rank on a node writes HF's local checkpoints into one folder; rank 0 uploads it.
    output_dir = os.path.join(
        tempfile.gettempdir(),
        "sft-ray",
        cfg.name,
        ctx.get_run_name() if hasattr(ctx, "get_run_name") else "run",
    )
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(cfg, output_dir, use_cpu, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        data_collator=make_collator(tokenizer.pad_token_id),
        callbacks=[_report_callback()],
    )

    checkpoint = ray.train.get_checkpoint()
    prompts = _sample_prompts(eval_ds, cfg.train.samples) if eval_ds is not None else []
    before = {}
    if checkpoint is None:
        if eval_ds is not None:
            before["eval_loss"] = trainer.evaluate()["eval_loss"]
        if rank == 0 and prompts:
            before["generations"] = _generate(trainer.model, tokenizer, prompts, device)
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            result = trainer.train(resume_from_checkpoint=ckpt_dir)
    else:
        result = trainer.train()
    after = {"eval_loss": trainer.evaluate()["eval_loss"]} if eval_ds is not None else {}

    summary = {}
    if rank == 0:
        if prompts:
            after["generations"] = _generate(trainer.model, tokenizer, prompts, device)
        summary = write_final(cfg, trainer, tokenizer, prompts, before, after, result.metrics)
    ray.train.report({"done": 1, **{k: v for k, v in summary.items() if isinstance(v, (int, float))}})
    return summary
